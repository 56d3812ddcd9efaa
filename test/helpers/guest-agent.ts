/**
 * A scripted guest agent on a unix socket, speaking qemu-ga's protocol: the real agent runs
 * inside a guest, and run on this host it would freeze the host's own file systems.
 */
import net from 'node:net';
import path from 'node:path';

import { encodeMessage, JsonLineDecoder } from '../../lib/qmp/codec.js';

export interface ScriptedAgent {
  path: string;
  /** Commands received, in order. */
  calls: string[];
  server: net.Server;
}

/** Starts the agent at `<dir>/qga.sock`; close `server` when done. */
export async function startScriptedAgent(dir: string, opts: { failFreeze?: boolean; failThaw?: boolean } = {}): Promise<ScriptedAgent> {
  const p = path.join(dir, 'qga.sock');
  const calls: string[] = [];
  const server = net.createServer((sock) => {
    // Stale output from an earlier user of the channel.
    sock.write('{"return": 17}\n');
    const dec = new JsonLineDecoder();
    sock.on('data', (c) => {
      for (const m of dec.push(c)) {
        if (!m.ok) continue;
        const cmd = String(m.value.execute);
        calls.push(cmd);
        const reply = (r: Record<string, unknown>): boolean => sock.write(encodeMessage(r));
        if (cmd === 'guest-sync-delimited') {
          sock.write(Buffer.from([0xff]));
          reply({ return: (m.value.arguments as { id: number }).id });
        } else if (cmd === 'guest-fsfreeze-freeze') {
          if (opts.failFreeze) reply({ error: { class: 'GenericError', desc: 'freeze failed' } });
          else reply({ return: 2 });
        } else if (cmd === 'guest-fsfreeze-thaw') {
          if (opts.failThaw) reply({ error: { class: 'GenericError', desc: 'thaw failed' } });
          else reply({ return: 2 });
        } else if (cmd === 'guest-fsfreeze-status') reply({ return: 'thawed' });
      }
    });
  });
  await new Promise<void>((r) => server.listen(p, r));
  return { path: p, calls, server };
}

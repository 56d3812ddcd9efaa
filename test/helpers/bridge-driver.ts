/**
 * Runs the stand-in for Proxmox VE's callers (test/pve/driver.pl) under `perl -T` against the
 * Perl bridge, and does QEMU's part of a VM backup for it, as qemu-server's `archive_external`
 * does. Needs `npm run build:ts` (the host runs from dist/).
 */
import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';

import { setupBackupAccess, teardownBackupAccess } from '../../lib/qemu/backup-access.js';
import { dropDeviceBitmap, resolveDevices } from '../../lib/qemu/devices.js';
import { requireTool } from './tools.js';
import type { QemuInstance } from './qemu.js';

export const ROOT = path.resolve(import.meta.dirname, '../..');

/** One line the driver printed. */
export type Msg = {
  log?: [string, string];
  phase?: string;
  done?: { archive?: string; size?: number; error?: string | null; job_error?: string | null; [k: string]: unknown };
  [k: string]: unknown;
};

/** What a driver run gave. */
export interface Run {
  messages: Msg[];
  logs: Array<[string, string]>;
  done: NonNullable<Msg['done']>;
  stderr: string;
  exitCode: number | null;
}

/**
 * Runs the driver on `job`; `onMessage` answers the phases that wait for the test (its return
 * value is sent back as a line). `o.perl5`: a folder `pve-plugin generate` wrote, put on `@INC`
 * for a job whose `plugin` names the storage plugin there.
 */
export async function drive(
  job: Record<string, unknown>,
  onMessage: (m: Msg) => Promise<object | undefined> | object | undefined = () => undefined,
  o: { perl5?: string } = {},
): Promise<Run> {
  const perl = requireTool('perl', 'perl');
  await fs.access(path.join(ROOT, 'dist/cli/main.js')).catch(() => {
    throw new Error('dist/cli/main.js is missing: run npm run build:ts');
  });
  const inc = ['-I', path.join(ROOT, 'test/pve'), '-I', path.join(ROOT, 'perl'), ...(o.perl5 ? ['-I', o.perl5] : [])];
  const child = spawn(perl, ['-T', ...inc, path.join(ROOT, 'test/pve/driver.pl')], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  child.stdin.write(`${JSON.stringify(job)}\n`);
  const messages: Msg[] = [];
  for await (const line of createInterface({ input: child.stdout })) {
    const m = JSON.parse(line) as Msg;
    messages.push(m);
    const reply = await onMessage(m);
    if (reply !== undefined) child.stdin.write(`${JSON.stringify(reply)}\n`);
  }
  child.stdin.end();
  const exitCode = await exited;
  const done = messages.find((m) => m.done)?.done;
  if (!done) throw new Error(`the driver ended without a result (exit ${String(exitCode)}): ${stderr}`);
  return { messages, logs: messages.filter((m) => m.log).map((m) => m.log!), done, stderr, exitCode };
}

/** The driver's `bridge` options: a provider module of test/pve/providers on the built host. */
export function bridgeOptions(provider: string, stateDir: string): Record<string, unknown> {
  return {
    provider: path.join(ROOT, 'test/pve/providers', provider),
    node: process.execPath,
    cli: path.join(ROOT, 'dist/cli/main.js'),
    env: { PVE_BACKUP_PROVIDER_STATE_DIR: stateDir },
  };
}

/**
 * QEMU's part of a VM backup of device `disk0` (backup access setup and teardown) for the driver's
 * phases, as qemu-server's `archive_external` does it: QEMU gets the provider's answer to
 * `backup_vm_query_incremental` per device as its `bitmap-mode`.
 */
export function qemuPart(q: QemuInstance, storeid: string, fleece: string): (m: Msg) => Promise<object | undefined> {
  const targetId = `snapshot-access:${storeid}`;
  return async (m) => {
    if (m.phase === 'setup') {
      const incremental = (m.incremental ?? {}) as Record<string, 'use' | 'new' | 'none'>;
      const any = Object.values(incremental).some((v) => v === 'new' || v === 'use');
      // Proxmox's QEMU recreates the bitmap of a device answered `new` (and removes it for `none`);
      // on stock QEMU (these tests) the caller drops it first, as the job runner does
      // (lib/qemu/types.ts bitmapModes), or an old bitmap would outlive the provider's answer.
      for (const d of await resolveDevices(q.qmp, ['disk0'])) {
        if (incremental[d.device] === 'new' || incremental[d.device] === 'none') await dropDeviceBitmap(q.qmp, d, targetId, storeid);
      }
      const access = await setupBackupAccess(q.qmp, {
        targetId,
        devices: ['disk0'],
        ...(any ? { bitmap: storeid, bitmapModes: incremental } : {}),
        fleecing: { dir: fleece },
        nbdServer: { path: q.nbdPath! },
      });
      const volumes: Record<string, object> = {};
      for (const d of access.devices) {
        volumes[d.device] = {
          size: String(d.size), // Perl scalars may be strings
          'nbd-path': access.socketPath,
          'bitmap-mode': d.bitmapMode,
          ...(d.bitmapName !== undefined && d.bitmapMode !== 'none' ? { 'bitmap-name': d.bitmapName } : {}),
        };
      }
      return { volumes };
    }
    if (m.phase === 'teardown') {
      await teardownBackupAccess(q.qmp, { targetId, success: m.success === true });
      return {};
    }
    return undefined;
  };
}

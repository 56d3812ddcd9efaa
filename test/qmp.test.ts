import net from 'node:net';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { InvalidArgumentError } from '../lib/errors.js';
import { QmpClient, type QmpEvent } from '../lib/qmp/client.js';
import { JsonLineDecoder, decodeLine, encodeMessage } from '../lib/qmp/codec.js';
import { QmpBusyError, QmpClosedError, QmpError, QmpProtocolError } from '../lib/qmp/errors.js';
import { GuestAgentClient, withFrozenFilesystems } from '../lib/qmp/guest-agent.js';
import { startScriptedAgent, type ScriptedAgent } from './helpers/guest-agent.js';
import { startStorageDaemon, stopAll, tempDir } from './helpers/qemu.js';

type Handler = (msg: Record<string, unknown>, send: (m: Record<string, unknown>) => void, sock: net.Socket) => void;

const servers: net.Server[] = [];
const sockets = new Set<net.Socket>();

function track(server: net.Server): net.Server {
  server.on('connection', (sock: net.Socket) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
  });
  return server;
}

/** A scripted QMP peer on a unix socket: greeting, then `handler` for each command. */
async function fakeQmp(handler: Handler, greeting: string | null = null): Promise<string> {
  const dir = await tempDir();
  const p = path.join(dir, 'fake.sock');
  const server = net.createServer((sock) => {
    const send = (m: Record<string, unknown>): void => {
      sock.write(encodeMessage(m));
    };
    sock.write(greeting ?? encodeMessage({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 22 }, package: 'fake' }, capabilities: ['oob'] } }));
    const dec = new JsonLineDecoder();
    sock.on('data', (c) => {
      for (const m of dec.push(c)) {
        if (!m.ok) continue;
        if (m.value.execute === 'qmp_capabilities') send({ return: {}, id: m.value.id });
        else handler(m.value, send, sock);
      }
    });
    sock.on('error', () => undefined);
  });
  servers.push(track(server));
  await new Promise<void>((r) => server.listen(p, r));
  return p;
}

afterEach(async () => {
  for (const s of sockets) s.destroy();
  for (const s of servers.splice(0)) await new Promise((r) => s.close(() => r(undefined)));
  await stopAll();
});

describe('codec', () => {
  it('splits lines, handles split UTF-8 and skips the guest agent sentinel', () => {
    const d = new JsonLineDecoder();
    const bytes = Buffer.from('{"a":"é"}\r\n\xff{"b":1}\n', 'latin1');
    const utf = Buffer.concat([Buffer.from('{"a":"'), Buffer.from('é'), Buffer.from('"}\r\n')]);
    expect(d.push(utf.subarray(0, 7))).toEqual([]);
    expect(d.push(utf.subarray(7))).toEqual([{ ok: true, value: { a: 'é' } }]);
    const out = new JsonLineDecoder().push(bytes);
    expect(out[1]).toEqual({ ok: true, value: { b: 1 } });
    expect(decodeLine('   ')).toBeUndefined();
    expect(decodeLine('[1]')?.ok).toBe(false);
    expect(encodeMessage({ execute: 'x' })).toBe('{"execute":"x"}\n');
  });
});

describe('QmpClient against a scripted peer', () => {
  it('negotiates, runs commands in flight out of order and reports QEMU errors', async () => {
    const held: Array<() => void> = [];
    const p = await fakeQmp((m, send) => {
      if (m.execute === 'slow') held.push(() => send({ return: 'slow', id: m.id }));
      else if (m.execute === 'fast') {
        send({ return: { args: m.arguments }, id: m.id });
        for (const h of held.splice(0)) h();
      } else send({ error: { class: 'CommandNotFound', desc: `The command ${String(m.execute)} has not been found` }, id: m.id });
    });
    const q = await QmpClient.connect(p);
    expect(q.version.qemu).toEqual({ major: 7, minor: 2, micro: 22 });
    expect(q.version.package).toBe('fake');
    const slow = q.execute('slow');
    const fast = q.execute('fast', { x: 1 });
    expect(await fast).toEqual({ args: { x: 1 } });
    expect(await slow).toBe('slow');
    const err = await q.execute('nope', {}, { device: 'disk0' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpError);
    expect(err).toMatchObject({ code: 'ERR_QMP', qmpClass: 'CommandNotFound', command: 'nope', device: 'disk0' });
    await expect(q.execute('bad name')).rejects.toBeInstanceOf(InvalidArgumentError);
    await q.close();
    expect(q.closed).toBe(true);
    await q.close();
    await expect(q.execute('fast')).rejects.toMatchObject({ code: 'ERR_QMP_CLOSED' });
  });

  it('times out a command and drops its late reply', async () => {
    let later: (() => void) | undefined;
    const p = await fakeQmp((m, send) => {
      if (m.execute === 'hang') later = () => send({ return: 'late', id: m.id });
      else send({ return: 'ok', id: m.id });
    });
    const q = await QmpClient.connect(p);
    const err = await q.execute('hang', undefined, { timeoutMs: 50 }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_QMP_TIMEOUT', command: 'hang', timeoutMs: 50 });
    // The peer got the command and now answers it late: the client must drop that reply.
    expect(later).toBeTypeOf('function');
    later!();
    expect(await q.execute('other')).toBe('ok');
    await q.close();
  });

  it('fails pending commands at once when the peer closes', async () => {
    const p = await fakeQmp((m, _send, sock) => {
      if (m.execute === 'die') setTimeout(() => sock.destroy(), 20);
    });
    const q = await QmpClient.connect(p);
    const closed = new Promise((r) => q.once('close', r));
    const a = q.execute('wait1', undefined, { timeoutMs: 0 });
    const b = q.execute('die', undefined, { timeoutMs: 0 });
    const t0 = Date.now();
    await expect(a).rejects.toMatchObject({ code: 'ERR_QMP_CLOSED', command: 'wait1' });
    await expect(b).rejects.toBeInstanceOf(QmpClosedError);
    expect(Date.now() - t0).toBeLessThan(2000);
    await closed;
    expect(q.closed).toBe(true);
  });

  it('rejects a socket that does not greet with QMP', async () => {
    const p = await fakeQmp(() => undefined, 'SSH-2.0-OpenSSH\r\n');
    await expect(QmpClient.connect(p)).rejects.toMatchObject({ code: 'ERR_QMP_NOT_QMP' });
    const p2 = await fakeQmp(() => undefined, '{"hello": 1}\n');
    await expect(QmpClient.connect(p2)).rejects.toBeInstanceOf(QmpProtocolError);
    const p3 = await fakeQmp(() => undefined, '');
    await expect(QmpClient.connect(p3, { timeoutMs: 100 })).rejects.toMatchObject({ code: 'ERR_QMP_BUSY', timeoutMs: 100 });
    const dir = await tempDir();
    await expect(QmpClient.connect(path.join(dir, 'missing.sock'))).rejects.toMatchObject({ code: 'ERR_QMP_CLOSED' });
    await expect(QmpClient.connect({ host: 'localhost', port: 0 })).rejects.toBeInstanceOf(InvalidArgumentError);
  });

  it('says a monitor is busy, and an NBD socket is not QMP without waiting (real qemu-storage-daemon)', async () => {
    const q = await startStorageDaemon(); // q.qmp holds the monitor: QEMU greets no second client
    const busy = await QmpClient.connect(q.qmpPath, { timeoutMs: 300 }).catch((e: unknown) => e);
    expect(busy).toBeInstanceOf(QmpBusyError);
    expect(busy).toMatchObject({ code: 'ERR_QMP_BUSY', message: expect.stringMatching(/busy with another client/) });
    // The NBD server's greeting has no newline: only reading its first bytes can tell (a wait would end in ERR_QMP_BUSY).
    await expect(QmpClient.connect(q.nbdPath!, { timeoutMs: 60_000 })).rejects.toMatchObject({
      code: 'ERR_QMP_NOT_QMP',
      message: `${q.nbdPath!} is not a QMP socket: it is an NBD server`,
    });
    // Once the first client leaves, the monitor greets the next one.
    await q.qmp.close();
    const again = await QmpClient.connect(q.qmpPath, { timeoutMs: 5000 });
    expect(again.version.qemu.major).toBeGreaterThanOrEqual(7);
    await again.close();
  }, 20_000);

  it('delivers events to listeners and iterators, and ends iterators on close', async () => {
    const p = await fakeQmp((m, send, sock) => {
      send({ event: 'E1', data: { n: 1 }, timestamp: { seconds: 1, microseconds: 2 } });
      send({ return: {}, id: m.id });
      send({ event: 'E2', timestamp: { seconds: 1, microseconds: 3 } });
      if (m.execute === 'bye') setTimeout(() => sock.end(), 20);
    });
    const q = await QmpClient.connect(p);
    const seen: QmpEvent[] = [];
    q.on('event', (e: QmpEvent) => seen.push(e));
    const it1 = q.events();
    const waited = q.waitForEvent('E2');
    await q.execute('bye');
    expect((await waited).data).toEqual({});
    const got: string[] = [];
    for await (const e of it1) got.push(e.event);
    expect(got).toEqual(['E1', 'E2']);
    expect(seen.map((e) => [e.event, e.data])).toEqual([
      ['E1', { n: 1 }],
      ['E2', {}],
    ]);
  });

  it('connects over TCP', async () => {
    const server = net.createServer((sock) => {
      sock.write(encodeMessage({ QMP: { version: { qemu: { major: 9, minor: 0, micro: 0 }, package: '' }, capabilities: [] } }));
      const dec = new JsonLineDecoder();
      sock.on('data', (c) => {
        for (const m of dec.push(c)) if (m.ok) sock.write(encodeMessage({ return: {}, id: m.value.id }));
      });
    });
    servers.push(track(server));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const port = (server.address() as net.AddressInfo).port;
    const q = await QmpClient.connect({ host: '127.0.0.1', port });
    expect(q.version.qemu.major).toBe(9);
    await q.close();
  });
});

describe('QmpClient against qemu-storage-daemon', () => {
  it('runs commands and sees events', async () => {
    const q = await startStorageDaemon();
    expect(q.qmp.version.qemu.major).toBeGreaterThanOrEqual(7);
    const v = await q.qmp.execute<{ qemu: { major: number } }>('query-version');
    expect(v.qemu.major).toBe(q.qmp.version.qemu.major);
    const ev = q.qmp.waitForEvent('BLOCK_EXPORT_DELETED', { predicate: (d) => d.id === 'live0', timeoutMs: 10_000 });
    await q.qmp.execute('block-export-del', { id: 'live0' });
    expect((await ev).data).toEqual({ id: 'live0' });
    const err = await q.qmp.execute('blockdev-del', { 'node-name': 'nosuch' }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_QMP', command: 'blockdev-del', qmpClass: 'GenericError' });
  });
});

describe('GuestAgentClient against a scripted agent', () => {
  async function fakeAgent(opts: { failFreeze?: boolean; failThaw?: boolean } = {}): Promise<ScriptedAgent> {
    const agent = await startScriptedAgent(await tempDir(), opts);
    servers.push(track(agent.server));
    return agent;
  }

  it('syncs, freezes and thaws', async () => {
    const a = await fakeAgent();
    const g = await GuestAgentClient.connect(a.path);
    expect(await g.fsfreezeStatus()).toBe('thawed');
    expect(await g.fsfreezeFreeze()).toBe(2);
    expect(await g.fsfreezeThaw()).toBe(2);
    await g.close();
    expect(g.closed).toBe(true);
  });

  it('withFrozenFilesystems thaws on every path once frozen', async () => {
    const a = await fakeAgent();
    const g = await GuestAgentClient.connect(a.path);
    expect(await withFrozenFilesystems(g, async () => 42)).toBe(42);
    await expect(withFrozenFilesystems(g, async () => Promise.reject(new Error('boom')))).rejects.toThrow('boom');
    expect(a.calls.filter((c) => c.startsWith('guest-fsfreeze'))).toEqual([
      'guest-fsfreeze-freeze',
      'guest-fsfreeze-thaw',
      'guest-fsfreeze-freeze',
      'guest-fsfreeze-thaw',
    ]);
    expect(await withFrozenFilesystems(undefined, async () => 'plain')).toBe('plain');
    await g.close();

    const f = await fakeAgent({ failFreeze: true });
    const g2 = await GuestAgentClient.connect(f.path);
    let ran = false;
    await expect(withFrozenFilesystems(g2, async () => (ran = true))).rejects.toMatchObject({ code: 'ERR_QMP', command: 'guest-fsfreeze-freeze' });
    expect(ran).toBe(false);
    await g2.close();

    const t = await fakeAgent({ failThaw: true });
    const g3 = await GuestAgentClient.connect(t.path);
    await expect(withFrozenFilesystems(g3, async () => 1)).rejects.toMatchObject({ command: 'guest-fsfreeze-thaw' });
    await expect(withFrozenFilesystems(g3, async () => Promise.reject(new Error('first')))).rejects.toThrow('first');
    await g3.close();
  });
});

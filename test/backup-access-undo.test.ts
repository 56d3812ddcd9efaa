/**
 * Setup undoes everything when any of its steps fails. Each step is made to fail in turn against
 * real QEMU: the fleecing image on a full filesystem, and every QMP step through a proxy that
 * answers that one command with an error instead of passing it to QEMU (everything else reaches
 * QEMU unchanged). Afterwards QEMU must be as before: no node, export, bitmap or record left, the
 * device on its original node, the provider's bitmap untouched, no fleecing file; and the next
 * setup works incrementally.
 */
import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import net from 'node:net';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { QmpClient } from '../lib/qmp/client.js';
import { JsonLineDecoder, encodeMessage } from '../lib/qmp/codec.js';
import { setupBackupAccess, teardownBackupAccess, type SetupBackupAccessOptions } from '../lib/qemu/backup-access.js';
import { nbdWrite, startStorageDaemon, startVm, stopAll, tempDir, type QemuInstance } from './helpers/qemu.js';

const MiB = 1024 * 1024;
const T = 'snapshot-access:store1';
const closers: Array<() => Promise<void>> = [];
const mounts: string[] = [];

afterEach(async () => {
  for (const c of closers.splice(0).reverse()) await c(); // clients before the proxy
  for (const m of mounts.splice(0)) execFileSync('umount', [m]);
  await stopAll();
});

type Msg = { execute?: string; id?: unknown; arguments?: Record<string, unknown> };

/** A QMP proxy in front of QEMU that fails the next command matching `fail` (once), and passes everything else. */
interface QmpProxy {
  path: string;
  fail: ((m: Msg) => boolean) | undefined;
  failed: string[];
}

async function qmpProxy(q: QemuInstance): Promise<QmpProxy> {
  await q.qmp.close(); // QEMU serves one client per monitor socket: the proxy takes it
  const proxy: QmpProxy = { path: path.join(q.dir, 'proxy.sock'), fail: undefined, failed: [] };
  const server = net.createServer((client) => {
    const upstream = net.connect(q.qmpPath);
    upstream.pipe(client);
    const decoder = new JsonLineDecoder();
    client.on('data', (chunk: Buffer) => {
      for (const m of decoder.push(chunk)) {
        if (!m.ok) continue;
        const msg = m.value as Msg;
        if (proxy.fail?.(msg)) {
          proxy.fail = undefined;
          proxy.failed.push(String(msg.execute));
          client.write(encodeMessage({ error: { class: 'GenericError', desc: `injected failure of ${String(msg.execute)}` }, id: msg.id }));
        } else {
          upstream.write(encodeMessage(m.value));
        }
      }
    });
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  });
  await new Promise<void>((r) => server.listen(proxy.path, r));
  closers.push(() => new Promise<void>((r) => server.close(() => r())));
  return proxy;
}

/** What a backup access could leave: our nodes, exports, bitmaps (with counts and state), the record, the devices' nodes. */
async function qemuState(qmp: QmpClient): Promise<unknown> {
  const nodes = await qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name?: string; count: number; recording: boolean; busy: boolean }> }>>(
    'query-named-block-nodes',
    { flat: true },
  );
  const graph = await qmp.execute<{ nodes: Array<{ id: number; name: string }>; edges: Array<{ parent: number; child: number; name: string }> }>(
    'x-debug-query-block-graph',
  );
  const name = (id: number): string => graph.nodes.find((n) => n.id === id)?.name ?? '?';
  return {
    nodes: nodes.map((n) => n['node-name']).filter((n) => !n.startsWith('#')).sort(),
    exports: (await qmp.execute<Array<{ id: string }>>('query-block-exports')).map((e) => e.id).sort(),
    bitmaps: nodes.flatMap((n) => (n['dirty-bitmaps'] ?? []).map((b) => `${n['node-name']}:${b.name ?? '(anonymous)'}:${b.count}:${b.recording}:${b.busy}`)).sort(),
    record: await qmp.execute('qom-get', { path: '/objects/pvebp-access', property: 'data' }).then(() => true, () => false),
    // which node each parent (device or raw node) reads through
    edges: graph.edges.map((e) => `${name(e.parent)} -${e.name}-> ${name(e.child)}`).filter((e) => !e.includes('?')).sort(),
  };
}

const isAdd = (driver: string) => (m: Msg): boolean => m.execute === 'blockdev-add' && m.arguments?.driver === driver;

interface Step {
  step: string;
  fail: (m: Msg) => boolean;
  code: string;
  message: RegExp;
}

/** Fails each step in turn on `q`, checking QEMU is as before every time, then sets up for real. */
async function failEachStep(q: QemuInstance, steps: Step[], opts: Omit<SetupBackupAccessOptions, 'targetId' | 'bitmap' | 'fleecing'>, write: (qmp: QmpClient) => Promise<unknown>): Promise<void> {
  const fleece = await tempDir();
  const proxy = await qmpProxy(q);
  const qmp = await QmpClient.connect(proxy.path);
  closers.push(() => qmp.close());
  const setup = (): ReturnType<typeof setupBackupAccess> => setupBackupAccess(qmp, { ...opts, targetId: T, bitmap: 'b1', fleecing: { dir: fleece } });
  // A first backup creates the provider's bitmap; the guest then writes 1 MiB: the next one is incremental.
  await setup();
  await teardownBackupAccess(qmp, { targetId: T, success: true });
  await write(qmp);
  const before = await qemuState(qmp);
  expect(JSON.stringify(before)).toMatch(/b1:1048576:true:false/);

  for (const s of steps) {
    const failedBefore = proxy.failed.length;
    proxy.fail = s.fail;
    const err = await setup().then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(proxy.failed.length, `${s.step}: the step was never reached`).toBe(failedBefore + 1);
    expect(err, s.step).toMatchObject({ code: s.code, message: expect.stringMatching(s.message) });
    expect(await qemuState(qmp), s.step).toEqual(before);
    expect(await fs.readdir(fleece), s.step).toEqual([]);
  }
  // Nothing stale: the next setup is incremental over the untouched bitmap.
  const a = await setup();
  expect(a.devices[0]).toMatchObject({ bitmapAction: 'used', bitmapMode: 'reuse' });
  await teardownBackupAccess(qmp, { targetId: T, success: true });
  expect(await fs.readdir(fleece)).toEqual([]);
}

describe('setup undoes every step when one fails', () => {
  it('qemu-storage-daemon (filter below a raw node, existing NBD server)', async () => {
    const q = await startStorageDaemon();
    const nbd = q.nbdPath!;
    const steps: Step[] = [
      { step: 'the access record', fail: (m) => m.execute === 'object-add', code: 'ERR_QMP', message: /injected failure of object-add/ },
      { step: 'the fleecing node', fail: isAdd('qcow2'), code: 'ERR_BACKUP_ACCESS', message: /disk0: attaching the fleecing image failed/ },
      { step: 'the bitmaps', fail: (m) => m.execute === 'transaction', code: 'ERR_BACKUP_ACCESS', message: /freezing the dirty bitmaps failed/ },
      { step: 'the filter node', fail: isAdd('copy-before-write'), code: 'ERR_BACKUP_ACCESS', message: /disk0: adding the copy-before-write filter failed/ },
      { step: 'inserting the filter', fail: (m) => m.execute === 'blockdev-reopen', code: 'ERR_BACKUP_ACCESS', message: /disk0: inserting the filter above the device failed/ },
      { step: 'the snapshot node', fail: isAdd('snapshot-access'), code: 'ERR_BACKUP_ACCESS', message: /disk0: adding the snapshot-access node failed/ },
      { step: 'the export', fail: (m) => m.execute === 'block-export-add', code: 'ERR_BACKUP_ACCESS', message: /disk0: exporting the snapshot over NBD failed/ },
    ];
    await failEachStep(q, steps, { devices: ['disk0'], nbdServer: { path: nbd } }, () => nbdWrite(`nbd+unix:///live0?socket=${nbd}`, 0x21, 0, MiB));
  }, 120_000);

  it('a VM (filter inserted with qom-set, NBD server started by the access)', async () => {
    const q = await startVm();
    const steps: Step[] = [
      { step: 'the fleecing node', fail: isAdd('qcow2'), code: 'ERR_BACKUP_ACCESS', message: /virtio0: attaching the fleecing image failed/ },
      { step: 'the bitmaps', fail: (m) => m.execute === 'transaction', code: 'ERR_BACKUP_ACCESS', message: /freezing the dirty bitmaps failed/ },
      { step: 'the filter node', fail: isAdd('copy-before-write'), code: 'ERR_BACKUP_ACCESS', message: /virtio0: adding the copy-before-write filter failed/ },
      {
        step: 'inserting the filter',
        fail: (m) => m.execute === 'qom-set' && m.arguments?.property === 'drive',
        code: 'ERR_BACKUP_ACCESS',
        message: /virtio0: inserting the filter above the device failed/,
      },
      { step: 'the snapshot node', fail: isAdd('snapshot-access'), code: 'ERR_BACKUP_ACCESS', message: /virtio0: adding the snapshot-access node failed/ },
      { step: 'the NBD server', fail: (m) => m.execute === 'nbd-server-start', code: 'ERR_BACKUP_ACCESS', message: /starting the NBD server on .* failed/ },
      {
        step: 'updating the record',
        fail: (m) => m.execute === 'qom-set' && m.arguments?.property === 'data',
        code: 'ERR_QMP',
        message: /injected failure of qom-set/,
      },
      { step: 'the export', fail: (m) => m.execute === 'block-export-add', code: 'ERR_BACKUP_ACCESS', message: /virtio0: exporting the snapshot over NBD failed/ },
    ];
    await failEachStep(q, steps, { devices: ['virtio0'] }, (qmp) =>
      qmp.execute('human-monitor-command', { 'command-line': `qemu-io -d /machine/peripheral/virtio0/virtio-backend "write -P 0x21 0 ${MiB}"` }),
    );
  }, 120_000);

  it('the fleecing image cannot be created (full filesystem)', async () => {
    const q = await startStorageDaemon();
    const before = await qemuState(q.qmp);
    const fleece = await tempDir();
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', fleece]);
    mounts.push(fleece);
    await fs.writeFile(path.join(fleece, 'filler'), Buffer.alloc(MiB)).catch(() => undefined); // fills it up
    const err = await setupBackupAccess(q.qmp, { targetId: T, bitmap: 'b1', devices: ['disk0'], fleecing: { dir: fleece }, nbdServer: { path: q.nbdPath! } }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toMatchObject({ code: 'ERR_BACKUP_ACCESS', device: 'disk0', message: expect.stringMatching(/^disk0: creating fleecing image .* failed: .*No space left on device/i) });
    expect(await qemuState(q.qmp)).toEqual(before);
    expect(await fs.readdir(fleece)).toEqual(['filler']);
  });
});

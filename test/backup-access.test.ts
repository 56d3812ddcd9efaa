import { promises as fs } from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { QmpClient } from '../lib/qmp/client.js';
import {
  bitmapModeFor,
  recoverBackupAccess,
  setupBackupAccess,
  teardownBackupAccess,
  type BackupAccess,
} from '../lib/qemu/backup-access.js';
import { PveBackupError } from '../lib/errors.js';
import { NbdClient } from '../lib/nbd/client.js';
import { bitmapDirtyBytes } from '../lib/qemu/devices.js';
import {
  nbdRead,
  nbdWrite,
  startStorageDaemon,
  startVm,
  stopAll,
  tempDir,
  vmWrite,
  type QemuInstance,
} from './helpers/qemu.js';

const MiB = 1024 * 1024;
const T = 'snapshot-access:store1';

afterEach(async () => {
  await stopAll();
});

async function snapshotOf(qmp: QmpClient): Promise<{ nodes: string[]; exports: string[]; bitmaps: string[] }> {
  const nodes = await qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string }> }>>(
    'query-named-block-nodes',
    { flat: true },
  );
  const exports = await qmp.execute<Array<{ id: string }>>('query-block-exports');
  return {
    nodes: nodes.map((n) => n['node-name']).filter((n) => !n.startsWith('#')).sort(),
    exports: exports.map((e) => e.id).sort(),
    bitmaps: nodes.flatMap((n) => (n['dirty-bitmaps'] ?? []).map((b) => `${n['node-name']}:${b.name}`)).sort(),
  };
}

function liveUri(q: QemuInstance): string {
  return `nbd+unix:///live0?socket=${q.nbdPath!}`;
}

describe('backup access on qemu-storage-daemon (upstream backend)', () => {
  it('exports the disk at the point in time while the live disk is written', async () => {
    const q = await startStorageDaemon();
    const fleece = await tempDir();
    await nbdWrite(liveUri(q), 0x11, 0, 8 * MiB);
    const before = await snapshotOf(q.qmp);

    const access = await setupBackupAccess(q.qmp, {
      targetId: T,
      devices: ['disk0'],
      fleecing: { dir: fleece },
      nbdServer: { path: q.nbdPath! },
    });
    expect(access.backend).toBe('upstream');
    expect(access.socketPath).toBe(q.nbdPath);
    const dev = access.devices[0]!;
    expect(dev).toMatchObject({ device: 'disk0', size: 8 * MiB, exportName: 'disk0', bitmapAction: 'not-used', bitmapMode: 'none' });
    expect(dev.nbdUri).toBe(`nbd+unix:///disk0?socket=${q.nbdPath!}`);
    expect(await fs.readdir(fleece)).toHaveLength(1);

    await nbdWrite(liveUri(q), 0x55, 0, MiB);
    await nbdWrite(liveUri(q), 0x66, 5 * MiB, 512 * 1024);

    const snap = await nbdRead(dev.nbdUri, q.dir);
    expect(snap.equals(Buffer.alloc(8 * MiB, 0x11))).toBe(true);
    const live = await nbdRead(liveUri(q), q.dir);
    expect(live.subarray(0, MiB).equals(Buffer.alloc(MiB, 0x55))).toBe(true);

    await teardownBackupAccess(q.qmp, { targetId: T, success: true });
    expect(await snapshotOf(q.qmp)).toEqual(before);
    expect(await fs.readdir(fleece)).toEqual([]);
    // The live disk keeps the writes made during the access.
    const after = await nbdRead(liveUri(q), q.dir);
    expect(after.subarray(5 * MiB, 5 * MiB + 512 * 1024).equals(Buffer.alloc(512 * 1024, 0x66))).toBe(true);
    // Idempotent: a second teardown finds nothing to do, changes nothing and leaves nothing.
    await teardownBackupAccess(q.qmp, { targetId: T, success: true });
    expect(await snapshotOf(q.qmp)).toEqual(before);
    expect(await fs.readdir(fleece)).toEqual([]);
    expect((await nbdRead(liveUri(q), q.dir)).equals(after)).toBe(true);
  });

  it('fails clearly when QEMU already runs an NBD server and none is given, leaving nothing behind', async () => {
    const q = await startStorageDaemon();
    const fleece = await tempDir();
    const before = await snapshotOf(q.qmp);
    const err = await setupBackupAccess(q.qmp, { targetId: T, devices: ['disk0'], fleecing: { dir: fleece } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(PveBackupError);
    expect((err as PveBackupError).code).toBe('ERR_BACKUP_ACCESS');
    expect((err as Error).message).toMatch(/already runs an NBD server/);
    expect(await snapshotOf(q.qmp)).toEqual(before);
    expect(await fs.readdir(fleece)).toEqual([]);
  });

  it('runs the bitmap action matrix and settles bitmaps by success', async () => {
    const q = await startStorageDaemon();
    const fleece = await tempDir();
    const base = { devices: ['disk0'], fleecing: { dir: fleece }, nbdServer: { path: q.nbdPath! } };
    const setup = (targetId: string, bitmap?: string): Promise<BackupAccess> =>
      setupBackupAccess(q.qmp, { ...base, targetId, ...(bitmap ? { bitmap } : {}) });
    const main = `${T}/b1`;

    // First run: new (full read, no bitmap on the export upstream).
    let a = await setup(T, 'b1');
    expect(a.devices[0]).toMatchObject({ bitmapAction: 'new', bitmapMode: 'new' });
    expect(a.devices[0]!.bitmapName).toBeUndefined();
    await nbdWrite(liveUri(q), 0x22, 0, MiB); // written during the backup
    await teardownBackupAccess(q.qmp, { targetId: T, success: true });
    // Only what was written during the access is dirty now.
    expect(await bitmapDirtyBytes(q.qmp, { node: 'disk0-fmt', name: main })).toBe(MiB);

    // Same target again: used, exported with the bitmap; the snapshot shows the dirty area.
    await nbdWrite(liveUri(q), 0x23, 2 * MiB, MiB);
    a = await setup(T, 'b1');
    expect(a.devices[0]).toMatchObject({ bitmapAction: 'used', bitmapMode: 'reuse', bitmapName: main });
    await nbdWrite(liveUri(q), 0x24, 4 * MiB, MiB); // during the access
    // Failure: the next run still sees everything since the last success, plus the new writes.
    await teardownBackupAccess(q.qmp, { targetId: T, success: false });
    expect(await bitmapDirtyBytes(q.qmp, { node: 'disk0-fmt', name: main })).toBe(3 * MiB);

    // Success: only writes during the access remain.
    a = await setup(T, 'b1');
    expect(a.devices[0]!.bitmapAction).toBe('used');
    await nbdWrite(liveUri(q), 0x25, 6 * MiB, 64 * 1024);
    await teardownBackupAccess(q.qmp, { targetId: T, success: true });
    expect(await bitmapDirtyBytes(q.qmp, { node: 'disk0-fmt', name: main })).toBe(64 * 1024);

    // Another target id has its own bitmap and leaves this one alone.
    a = await setup('other-target', 'b1');
    expect(a.devices[0]!.bitmapAction).toBe('new');
    await teardownBackupAccess(q.qmp, { targetId: 'other-target', success: true });
    expect(await bitmapDirtyBytes(q.qmp, { node: 'disk0-fmt', name: main })).toBe(64 * 1024);

    // Same target without a bitmap: removed; then new again.
    a = await setup(T);
    expect(a.devices[0]).toMatchObject({ bitmapAction: 'not-used-removed', bitmapMode: 'none' });
    await teardownBackupAccess(q.qmp, { targetId: T, success: true });
    expect(await bitmapDirtyBytes(q.qmp, { node: 'disk0-fmt', name: main })).toBeUndefined();
    a = await setup(T, 'b1');
    expect(a.devices[0]!.bitmapAction).toBe('new');
    await teardownBackupAccess(q.qmp, { targetId: T, success: true });

    // Bitmap removed behind our back: invalid (mode new), then used again.
    await q.qmp.execute('block-dirty-bitmap-remove', { node: 'disk0-fmt', name: main });
    a = await setup(T, 'b1');
    expect(a.devices[0]).toMatchObject({ bitmapAction: 'invalid', bitmapMode: 'new' });
    await teardownBackupAccess(q.qmp, { targetId: T, success: true });
    a = await setup(T, 'b1');
    expect(a.devices[0]!.bitmapAction).toBe('used');
    await teardownBackupAccess(q.qmp, { targetId: T, success: true });

    // A failed first run forgets the new bitmap, so the next run is new again.
    a = await setup('third', 'x');
    expect(a.devices[0]!.bitmapAction).toBe('new');
    await teardownBackupAccess(q.qmp, { targetId: 'third', success: false });
    a = await setup('third', 'x');
    expect(a.devices[0]!.bitmapAction).toBe('new');
    await teardownBackupAccess(q.qmp, { targetId: 'third', success: true });
    expect(await fs.readdir(fleece)).toEqual([]);
  });

  it('reads only dirty areas of an incremental snapshot at the point in time', async () => {
    const q = await startStorageDaemon();
    const fleece = await tempDir();
    const base = { targetId: T, bitmap: 'b1', devices: ['disk0'], fleecing: { dir: fleece }, nbdServer: { path: q.nbdPath! } };
    await setupBackupAccess(q.qmp, base);
    await teardownBackupAccess(q.qmp, { targetId: T, success: true });
    await nbdWrite(liveUri(q), 0x31, MiB, MiB);
    const a = await setupBackupAccess(q.qmp, base);
    await nbdWrite(liveUri(q), 0x32, MiB, MiB); // overwrite the dirty area during the access
    const { execFileP } = await import('./helpers/qemu.js');
    await execFileP('qemu-io', ['-f', 'raw', '-c', `read -P 0x31 ${MiB} ${MiB}`, a.devices[0]!.nbdUri]);
    // Outside the bitmap the snapshot refuses reads with EINVAL (QEMU's EACCES, as NBD carries it), inside it serves them.
    const nbd = await NbdClient.connect(a.devices[0]!.nbdUri);
    await expect(nbd.read(0, 65536)).rejects.toMatchObject({ code: 'ERR_NBD_SERVER', errno: 'EINVAL', command: 'READ', offset: 0 });
    expect((await nbd.read(MiB, 65536)).equals(Buffer.alloc(65536, 0x31))).toBe(true);
    await nbd.close();
    await teardownBackupAccess(q.qmp, { targetId: T, success: true });
  });

  it('allows one access at a time and names the active target', async () => {
    const q = await startStorageDaemon();
    const fleece = await tempDir();
    await setupBackupAccess(q.qmp, { targetId: T, devices: ['disk0'], fleecing: { dir: fleece }, nbdServer: { path: q.nbdPath! } });
    const err = await setupBackupAccess(q.qmp, {
      targetId: 'second',
      devices: ['disk0'],
      fleecing: { dir: fleece },
      nbdServer: { path: q.nbdPath! },
    }).catch((e: unknown) => e);
    expect((err as PveBackupError).code).toBe('ERR_BACKUP_ACCESS_ACTIVE');
    expect((err as Error).message).toContain(`'${T}'`);
    // Tearing down with the wrong target is refused.
    await expect(teardownBackupAccess(q.qmp, { targetId: 'second', success: true })).rejects.toThrow(/active access is for target/);
    await teardownBackupAccess(q.qmp, { targetId: T, success: true });
  });

  it('leaves nodes, exports and the fleecing dir as before when setup fails', async () => {
    const q = await startStorageDaemon();
    const fleece = await tempDir();
    const before = await snapshotOf(q.qmp);
    const opts = { targetId: T, fleecing: { dir: fleece }, nbdServer: { path: q.nbdPath! } };

    const unknown = await setupBackupAccess(q.qmp, { ...opts, devices: ['disk0', 'nosuchdisk'] }).catch((e: unknown) => e);
    expect((unknown as PveBackupError).code).toBe('ERR_INVALID_ARGUMENT');
    expect((unknown as Error).message).toContain('nosuchdisk');

    const notWritable = await setupBackupAccess(q.qmp, { ...opts, devices: ['disk0'], fleecing: { dir: '/proc/self' } }).catch((e: unknown) => e);
    expect((notWritable as PveBackupError).code).toBe('ERR_BACKUP_ACCESS');
    expect((notWritable as Error).message).toMatch(/not writable/);

    const bad = await setupBackupAccess(q.qmp, { ...opts, devices: ['../etc/passwd'] }).catch((e: unknown) => e);
    expect((bad as PveBackupError).code).toBe('ERR_INVALID_ARGUMENT');

    // Half-way: an NBD export named like the device already exists, so the last step fails.
    await q.qmp.execute('block-export-add', { type: 'nbd', id: 'blocker', 'node-name': 'disk0', name: 'disk0', writable: false });
    const beforeBlocked = await snapshotOf(q.qmp);
    const half = await setupBackupAccess(q.qmp, { ...opts, bitmap: 'b1', devices: ['disk0'] }).catch((e: unknown) => e);
    expect((half as PveBackupError).code).toBe('ERR_BACKUP_ACCESS');
    expect((half as Error).message).toMatch(/disk0/);
    expect((half as Error).message).toMatch(/block-export-add/);
    expect(await snapshotOf(q.qmp)).toEqual(beforeBlocked);
    expect(await fs.readdir(fleece)).toEqual([]);
    await q.qmp.execute('block-export-del', { id: 'blocker' });
    await new Promise((r) => setTimeout(r, 100));
    expect(await snapshotOf(q.qmp)).toEqual(before);
  });

  it('recovers what a crashed orchestrator left behind', async () => {
    const q = await startStorageDaemon();
    const fleece = await tempDir();
    const before = await snapshotOf(q.qmp);
    await setupBackupAccess(q.qmp, { targetId: T, bitmap: 'b1', devices: ['disk0'], fleecing: { dir: fleece }, nbdServer: { path: q.nbdPath! } });
    await expect(
      setupBackupAccess(q.qmp, { targetId: T, bitmap: 'b1', devices: ['disk0'], fleecing: { dir: fleece }, nbdServer: { path: q.nbdPath! } }),
    ).rejects.toMatchObject({ code: 'ERR_BACKUP_ACCESS_ACTIVE', activeTargetId: T });
    // A new orchestrator process: a new connection, no memory of the access.
    await q.qmp.close();
    const qmp2 = await QmpClient.connect(q.qmpPath);
    // The owner (this process) still runs: refused unless forced (test/backup-access-recovery.test.ts kills a real owner).
    await expect(recoverBackupAccess(qmp2)).rejects.toMatchObject({ code: 'ERR_BACKUP_ACCESS_ACTIVE', activeTargetId: T });
    const removed = await recoverBackupAccess(qmp2, { force: true });
    expect(removed.join('\n')).toContain(T);
    const after = await snapshotOf(qmp2);
    expect(after.nodes).toEqual(before.nodes);
    expect(after.exports).toEqual(before.exports);
    expect(await fs.readdir(fleece)).toEqual([]);
    expect(await recoverBackupAccess(qmp2)).toEqual([]);
    await qmp2.close();
  });
});

describe('backup access on a VM (upstream backend)', () => {
  it('exports virtio and EFI disks at the point in time and restores the devices', async () => {
    const q = await startVm();
    const fleece = await tempDir();
    await vmWrite(q, 'virtio0', 0x11, 0, 8 * MiB);
    await q.qmp.execute('human-monitor-command', { 'command-line': 'qemu-io drive-efidisk0 "write -P 0x44 0 256k"' });
    const before = await snapshotOf(q.qmp);
    const blockBefore = await q.qmp.execute('query-block');

    const a = await setupBackupAccess(q.qmp, { targetId: T, bitmap: 'b1', devices: ['virtio0', 'drive-efidisk0'], fleecing: { dir: fleece, format: 'raw' } });
    expect(a.devices.map((d) => [d.device, d.size, d.bitmapAction])).toEqual([
      ['virtio0', 8 * MiB, 'new'],
      ['drive-efidisk0', 256 * 1024, 'new'],
    ]);
    expect(a.socketPath).toMatch(/nbd\.sock$/);
    await vmWrite(q, 'virtio0', 0x55, MiB, MiB);
    await vmWrite(q, 'efidisk0', 0x66, 0, 4096);
    expect((await nbdRead(a.devices[0]!.nbdUri, q.dir)).equals(Buffer.alloc(8 * MiB, 0x11))).toBe(true);
    expect((await nbdRead(a.devices[1]!.nbdUri, q.dir)).equals(Buffer.alloc(256 * 1024, 0x44))).toBe(true);

    await teardownBackupAccess(q.qmp, { targetId: T, success: true });
    const after = await snapshotOf(q.qmp);
    expect(after.nodes).toEqual(before.nodes);
    expect(after.exports).toEqual([]);
    const attached = (b: unknown): unknown =>
      (b as Array<{ device: string; qdev?: string; inserted?: { 'node-name': string } }>).map((x) => [x.device, x.qdev, x.inserted?.['node-name']]);
    expect(attached(await q.qmp.execute('query-block'))).toEqual(attached(blockBefore));
    expect(await bitmapDirtyBytes(q.qmp, { node: 'drive-virtio0', name: `${T}/b1` })).toBe(MiB);
    expect(await fs.readdir(fleece)).toEqual([]);
    await fs.access(path.dirname(a.socketPath)).then(
      () => expect.fail('socket dir left behind'),
      () => undefined,
    );
  });

  it('QEMU killed mid-backup: clear error, no hang, teardown does not throw', async () => {
    const q = await startVm();
    const fleece = await tempDir();
    const a = await setupBackupAccess(q.qmp, { targetId: T, devices: ['virtio0'], fleecing: { dir: fleece } });
    expect(await fs.readdir(fleece)).toHaveLength(1);
    // Stopped first, QEMU cannot answer: the command is surely pending when it dies.
    q.proc.kill('SIGSTOP');
    const pending = q.qmp.execute('query-block', undefined, { timeoutMs: 0 });
    // the expectation holds the promise before it rejects: no unhandled rejection while QEMU dies
    const failed = expect(pending).rejects.toMatchObject({ code: 'ERR_QMP_CLOSED', command: 'query-block' });
    await q.kill();
    await failed;
    await expect(q.qmp.execute('query-status')).rejects.toMatchObject({ code: 'ERR_QMP_CLOSED' });
    await teardownBackupAccess(q.qmp, { targetId: T, success: false });
    expect(await fs.readdir(fleece)).toEqual([]);
    void a;
  });

  it('maps bitmap actions to provider modes', () => {
    expect(bitmapModeFor('not-used')).toBe('none');
    expect(bitmapModeFor('not-used-removed')).toBe('none');
    expect(bitmapModeFor('new')).toBe('new');
    expect(bitmapModeFor('invalid')).toBe('new');
    expect(bitmapModeFor('used')).toBe('reuse');
  });
});

import { afterEach, describe, expect, it } from 'vitest';
import { bitmapDirtyBytes, resolveDevices, writableDevices } from '../lib/qemu/devices.js';
import { setupBackupAccess } from '../lib/qemu/backup-access.js';
import { nbdWrite, startStorageDaemon, startVm, stopAll, tempDir } from './helpers/qemu.js';

const MiB = 1024 * 1024;

afterEach(async () => {
  await stopAll();
});

describe('device lookup (lib/qemu/devices.ts), the one the runner and backup access share', () => {
  it('resolves a raw node to its file child, with the size the snapshot export serves (qemu-storage-daemon)', async () => {
    const q = await startStorageDaemon({ size: 8 * MiB });
    const [d] = await resolveDevices(q.qmp, ['disk0']);
    expect(d).toMatchObject({ device: 'disk0', source: 'disk0-fmt', parent: { kind: 'node', node: 'disk0', driver: 'raw' }, size: 8 * MiB });
  });

  it('resolves any other node name to itself, without a parent: upstream backup access then refuses it', async () => {
    const q = await startStorageDaemon();
    const [d] = await resolveDevices(q.qmp, ['disk0-fmt']);
    expect(d).toMatchObject({ source: 'disk0-fmt', parent: undefined, size: 8 * MiB });
    expect(d!.why).toMatch(/driver qcow2/);
    await expect(setupBackupAccess(q.qmp, { targetId: 't', devices: ['disk0-fmt'], fleecing: { dir: await tempDir() }, backend: 'upstream' })).rejects.toMatchObject({
      code: 'ERR_BACKUP_ACCESS',
      device: 'disk0-fmt',
      message: expect.stringMatching(/pass a raw node over the disk/),
    });
  });

  it('refuses unknown devices and two names of one node', async () => {
    const q = await startStorageDaemon();
    await expect(resolveDevices(q.qmp, ['nosuch'])).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
    await expect(resolveDevices(q.qmp, ['disk0', 'disk0-fmt'])).rejects.toMatchObject({
      code: 'ERR_INVALID_ARGUMENT',
      message: expect.stringMatching(/given twice/),
    });
  });

  it('finds VM devices by qdev id and by BlockBackend name, and lists the writable ones', async () => {
    const q = await startVm();
    expect(await writableDevices(q.qmp)).toEqual(expect.arrayContaining(['virtio0', 'drive-efidisk0']));
    const [v, e] = await resolveDevices(q.qmp, ['virtio0', 'drive-efidisk0']);
    expect(v).toMatchObject({ source: 'drive-virtio0', parent: { kind: 'qdev', path: '/machine/peripheral/virtio0' }, size: 8 * MiB });
    expect(e).toMatchObject({ parent: { kind: 'qdev', path: '/machine/peripheral/efidisk0' }, size: 256 * 1024 });
  });

  it("counts a bitmap's dirty bytes as QEMU does", async () => {
    const q = await startStorageDaemon();
    await q.qmp.execute('block-dirty-bitmap-add', { node: 'disk0-fmt', name: 'b', granularity: 65536 });
    await nbdWrite(`nbd+unix:///live0?socket=${q.nbdPath!}`, 0x22, 64 * 1024, 100 * 1024);
    expect(await bitmapDirtyBytes(q.qmp, { node: 'disk0-fmt', name: 'b' })).toBe(2 * 65536);
    expect(await bitmapDirtyBytes(q.qmp, { node: 'disk0-fmt', name: 'other' })).toBeUndefined();
  });
});

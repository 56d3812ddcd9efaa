import { promises as fs } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { QmpClient } from '../lib/qmp/client.js';
import { setupBackupAccess, teardownBackupAccess, recoverBackupAccess } from '../lib/qemu/backup-access.js';
import { closePeers, proxmoxPeer } from './helpers/proxmox-peer.js';
import { stopAll, tempDir } from './helpers/qemu.js';

const MiB = 1024 * 1024;

afterEach(async () => {
  await closePeers();
  await stopAll();
});

const T = 'snapshot-access:store1';

describe('Proxmox backend', () => {
  it('sets up and tears down with the landed devices/bitmap-mode form (scripted Proxmox QMP peer)', async () => {
    const peer = await proxmoxPeer('devices');
    const fleece = await tempDir();
    const qmp = await QmpClient.connect(peer.path);
    const opts = { targetId: T, bitmap: 'b1', devices: ['drive-scsi0', 'drive-efidisk0'], fleecing: { dir: fleece } };

    const a = await setupBackupAccess(qmp, opts);
    expect(a.backend).toBe('proxmox');
    const setup = peer.calls.find((c) => c.cmd === 'backup-access-setup')!;
    expect(setup.args).toEqual({
      'target-id': `${T}/b1`,
      devices: [
        { device: 'drive-scsi0', 'bitmap-mode': 'use' },
        { device: 'drive-efidisk0', 'bitmap-mode': 'use' },
      ],
    });
    // The fleecing images were attached as <device>-fleecing before the setup.
    const order = peer.calls.map((c) => c.cmd);
    expect(order.indexOf('blockdev-add')).toBeLessThan(order.indexOf('backup-access-setup'));
    expect(peer.calls.filter((c) => c.cmd === 'blockdev-add').map((c) => c.args['node-name'])).toEqual([
      'drive-scsi0-fleecing',
      'drive-efidisk0-fleecing',
    ]);
    expect(await fs.readdir(fleece)).toHaveLength(2);
    expect(a.devices.map((d) => [d.device, d.nodeName, d.size, d.bitmapName, d.bitmapAction, d.bitmapMode])).toEqual([
      ['drive-scsi0', 'snapshot-access-drive-scsi0', 8 * MiB, `${T}/b1`, 'new', 'new'],
      ['drive-efidisk0', 'snapshot-access-drive-efidisk0', 256 * 1024, `${T}/b1`, 'new', 'new'],
    ]);
    const exp = peer.calls.filter((c) => c.cmd === 'block-export-add').map((c) => c.args);
    expect(exp[0]).toEqual({
      type: 'nbd',
      id: 'pvebp-0',
      'node-name': 'snapshot-access-drive-scsi0',
      name: 'drive-scsi0',
      writable: true,
      bitmaps: [{ node: '#block100', name: `${T}/b1` }],
    });
    expect(a.devices[0]!.nbdUri).toBe(`nbd+unix:///drive-scsi0?socket=${a.socketPath}`);

    await teardownBackupAccess(qmp, { targetId: T, success: true });
    const td = peer.calls.find((c) => c.cmd === 'backup-access-teardown')!;
    expect(td.args).toEqual({ 'target-id': `${T}/b1`, success: true });
    const cmds = peer.calls.map((c) => c.cmd);
    expect(cmds.lastIndexOf('block-export-del')).toBeLessThan(cmds.indexOf('backup-access-teardown'));
    expect([...peer.nodes.keys()].filter((n) => !n.startsWith('#'))).toEqual([]);
    expect(peer.nbd).toBe(false);
    expect(await fs.readdir(fleece)).toEqual([]);

    // Second run: the bitmap is reused.
    const b = await setupBackupAccess(qmp, opts);
    expect(b.devices.map((d) => d.bitmapAction)).toEqual(['used', 'used']);
    await teardownBackupAccess(qmp, { targetId: T, success: false });
    expect(peer.calls.filter((c) => c.cmd === 'backup-access-teardown').at(-1)!.args.success).toBe(false);

    // Bitmap removed behind our back: invalid.
    peer.bitmaps.set('#block100', (peer.bitmaps.get('#block100') ?? []).filter((x) => x !== `${T}/b1`));
    const c = await setupBackupAccess(qmp, opts);
    expect(c.devices.map((d) => [d.bitmapAction, d.bitmapMode])).toEqual([
      ['invalid', 'new'],
      ['used', 'reuse'],
    ]);
    await teardownBackupAccess(qmp, { targetId: T, success: true });

    // Without a bitmap: the target's bitmaps are removed.
    const d = await setupBackupAccess(qmp, { ...opts, bitmap: undefined });
    expect(d.devices.map((x) => x.bitmapAction)).toEqual(['not-used-removed', 'not-used-removed']);
    expect(d.devices[0]!.bitmapName).toBeUndefined();
    await teardownBackupAccess(qmp, { targetId: T, success: true });
    await qmp.close();
  });

  it("uses qemu-server's names for the storage's bitmap and passes the bitmap mode per device (scripted Proxmox QMP peer)", async () => {
    const peer = await proxmoxPeer('devices');
    const fleece = await tempDir();
    const qmp = await QmpClient.connect(peer.path);
    // what the job runner passes for a Proxmox VE 8.4 provider: bitmap id = storage id
    const opts = { targetId: T, bitmap: 'store1', devices: ['drive-scsi0', 'drive-efidisk0'], fleecing: { dir: fleece } };
    const a = await setupBackupAccess(qmp, opts);
    // qemu-server VZDump/QemuServer.pm: 'target-id' => "snapshot-access:$storeid"; QEMU names the bitmap after it
    expect(peer.calls.find((c) => c.cmd === 'backup-access-setup')!.args).toEqual({
      'target-id': T,
      devices: [
        { device: 'drive-scsi0', 'bitmap-mode': 'use' },
        { device: 'drive-efidisk0', 'bitmap-mode': 'use' },
      ],
    });
    // a bitmap QEMU recreates ('missing-recreated') is a new one
    expect(a.devices.map((d) => [d.bitmapName, d.bitmapAction, d.bitmapMode])).toEqual([
      [T, 'new', 'new'],
      [T, 'new', 'new'],
    ]);
    expect(peer.calls.filter((c) => c.cmd === 'block-export-add').map((c) => c.args.bitmaps)).toEqual([[{ node: '#block100', name: T }], [{ node: '#block200', name: T }]]);
    await teardownBackupAccess(qmp, { targetId: T, success: true });
    expect(peer.calls.filter((c) => c.cmd === 'backup-access-teardown').at(-1)!.args).toEqual({ 'target-id': T, success: true });
    // one bitmap per storage, the one vzdump uses too
    expect(peer.bitmaps.get('#block100')!.filter((b) => !b.includes('//'))).toEqual([T]);

    // the provider's answer per device, as qemu-server passes it
    peer.calls.length = 0;
    const b = await setupBackupAccess(qmp, { ...opts, bitmapModes: { 'drive-scsi0': 'new', 'drive-efidisk0': 'use' } });
    expect(peer.calls.find((c) => c.cmd === 'backup-access-setup')!.args.devices).toEqual([
      { device: 'drive-scsi0', 'bitmap-mode': 'new' },
      { device: 'drive-efidisk0', 'bitmap-mode': 'use' },
    ]);
    expect(b.devices.map((d) => [d.bitmapAction, d.bitmapMode])).toEqual([
      ['new', 'new'],
      ['used', 'reuse'],
    ]);
    await teardownBackupAccess(qmp, { targetId: T, success: true });
    peer.calls.length = 0;
    const c = await setupBackupAccess(qmp, { ...opts, bitmapModes: { 'drive-scsi0': 'none', 'drive-efidisk0': 'use' } });
    expect(peer.calls.find((x) => x.cmd === 'backup-access-setup')!.args.devices).toEqual([
      { device: 'drive-scsi0', 'bitmap-mode': 'none' },
      { device: 'drive-efidisk0', 'bitmap-mode': 'use' },
    ]);
    expect(c.devices.map((d) => [d.bitmapName, d.bitmapMode])).toEqual([
      [undefined, 'none'],
      [T, 'reuse'],
    ]);
    await teardownBackupAccess(qmp, { targetId: T, success: false });
    await qmp.close();
  });

  it('sets up the TPM state as drive-tpmstate0-backup and the EFI disk with fleecing images like any disk (scripted Proxmox QMP peer)', async () => {
    const peer = await proxmoxPeer('devices', { tpm: true });
    const fleece = await tempDir();
    const qmp = await QmpClient.connect(peer.path);
    const devices = ['drive-scsi0', 'drive-efidisk0', 'drive-tpmstate0-backup'];
    const a = await setupBackupAccess(qmp, { targetId: T, bitmap: 'store1', devices, fleecing: { dir: fleece } });
    // qemu-server check_and_prepare_fleecing: with a provider, EFI and TPM get fleecing images too
    expect(peer.calls.filter((c) => c.cmd === 'blockdev-add').map((c) => c.args['node-name'])).toEqual(devices.map((d) => `${d}-fleecing`));
    expect(peer.calls.find((c) => c.cmd === 'backup-access-setup')!.args.devices).toEqual(devices.map((device) => ({ device, 'bitmap-mode': 'use' })));
    expect(a.devices.map((d) => [d.device, d.size])).toEqual([
      ['drive-scsi0', 8 * MiB],
      ['drive-efidisk0', 256 * 1024],
      ['drive-tpmstate0-backup', 4 * MiB],
    ]);
    expect(await fs.readdir(fleece)).toHaveLength(3);
    await teardownBackupAccess(qmp, { targetId: T, success: true });
    expect(await fs.readdir(fleece)).toEqual([]);
    await qmp.close();
  });

  it('speaks the seed devlist/bitmap-name form (scripted Proxmox QMP peer)', async () => {
    const peer = await proxmoxPeer('devlist');
    const fleece = await tempDir();
    const qmp = await QmpClient.connect(peer.path);
    const a = await setupBackupAccess(qmp, { targetId: T, bitmap: 'b1', devices: ['drive-scsi0'], fleecing: { dir: fleece, format: 'raw' } });
    expect(peer.calls.find((c) => c.cmd === 'backup-access-setup')!.args).toEqual({ 'target-id': T, devlist: 'drive-scsi0', 'bitmap-name': 'b1' });
    expect(a.devices[0]).toMatchObject({ bitmapAction: 'new', bitmapMode: 'new', bitmapName: `${T}:b1` });
    // Without bitmap-node-name the bitmap is looked up on the device's node.
    expect(peer.calls.find((c) => c.cmd === 'block-export-add')!.args.bitmaps).toEqual([{ node: '#block100', name: `${T}:b1` }]);
    expect((await fs.readdir(fleece))[0]).toMatch(/\.raw$/);
    await teardownBackupAccess(qmp, { targetId: T, success: true });
    expect(peer.calls.find((c) => c.cmd === 'backup-access-teardown')!.args).toEqual({ 'target-id': T, success: true });
    await qmp.close();
  });

  it('undoes everything when backup-access-setup fails and names the device (scripted Proxmox QMP peer)', async () => {
    const peer = await proxmoxPeer('devices', { failSetup: 'drive-efidisk0' });
    const fleece = await tempDir();
    const qmp = await QmpClient.connect(peer.path);
    const err = await setupBackupAccess(qmp, { targetId: T, devices: ['drive-scsi0', 'drive-efidisk0'], fleecing: { dir: fleece } }).catch(
      (e: unknown) => e,
    );
    expect(err).toMatchObject({ code: 'ERR_BACKUP_ACCESS', device: 'drive-efidisk0', command: 'backup-access-setup' });
    expect((err as Error).message).toMatch(/drive-efidisk0.*backup-access-setup/);
    expect([...peer.nodes.keys()].filter((n) => !n.startsWith('#'))).toEqual([]);
    expect(peer.exports.size).toBe(0);
    expect(peer.nbd).toBe(false);
    expect(await fs.readdir(fleece)).toEqual([]);
    await expect(setupBackupAccess(qmp, { targetId: T, devices: ['drive-nosuch'], fleecing: { dir: fleece } })).rejects.toMatchObject({
      code: 'ERR_INVALID_ARGUMENT',
    });
    await qmp.close();
  });

  it('reports an access QEMU already has as active, and recovers after a restart (scripted Proxmox QMP peer)', async () => {
    const peer = await proxmoxPeer('devices');
    const fleece = await tempDir();
    peer.access = 'Proxmox VE';
    const qmp = await QmpClient.connect(peer.path);
    await expect(setupBackupAccess(qmp, { targetId: T, devices: ['drive-scsi0'], fleecing: { dir: fleece } })).rejects.toMatchObject({
      code: 'ERR_BACKUP_ACCESS_ACTIVE',
      activeTargetId: 'Proxmox VE',
    });
    expect(await fs.readdir(fleece)).toEqual([]);
    peer.access = undefined;
    await setupBackupAccess(qmp, { targetId: T, devices: ['drive-scsi0'], fleecing: { dir: fleece } });
    await qmp.close();
    const qmp2 = await QmpClient.connect(peer.path);
    await expect(recoverBackupAccess(qmp2)).rejects.toMatchObject({ code: 'ERR_BACKUP_ACCESS_ACTIVE', activeTargetId: T }); // its owner (this process) runs
    const removed = await recoverBackupAccess(qmp2, { force: true });
    expect(removed[0]).toContain(T);
    expect(peer.calls.at(-1)!.cmd).toBe('object-del');
    expect(peer.calls.find((c) => c.cmd === 'backup-access-teardown')!.args).toEqual({ 'target-id': T, success: false });
    expect(peer.access).toBeUndefined();
    expect(await fs.readdir(fleece)).toEqual([]);
    await qmp2.close();
  });
});

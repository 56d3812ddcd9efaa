import { promises as fs } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { QmpClient } from '../lib/qmp/client.js';
import { JsonLineDecoder, encodeMessage } from '../lib/qmp/codec.js';
import { setupBackupAccess, teardownBackupAccess, recoverBackupAccess } from '../lib/qemu/backup-access.js';
import { stopAll, tempDir } from './helpers/qemu.js';

const MiB = 1024 * 1024;

interface Peer {
  path: string;
  calls: Array<{ cmd: string; args: Record<string, unknown> }>;
  nodes: Map<string, { size: number; file?: string }>;
  bitmaps: Map<string, string[]>; // node -> names
  exports: Map<string, string>;
  nbd: boolean;
  access: string | undefined;
}

const servers: net.Server[] = [];
const sockets = new Set<net.Socket>();

/**
 * A scripted Proxmox QEMU: speaks `query-proxmox-support`, `backup-access-setup` (seed form with
 * devlist/bitmap-name, or the landed form with devices/bitmap-mode) and `backup-access-teardown`,
 * plus the standard commands the library uses around them.
 */
async function proxmoxPeer(form: 'devices' | 'devlist', opts: { failSetup?: string; tpm?: boolean } = {}): Promise<Peer> {
  const dir = await tempDir();
  const peer: Peer = {
    path: path.join(dir, 'pve.qmp'),
    calls: [],
    nodes: new Map([
      ['#block100', { size: 8 * MiB }],
      ['#block200', { size: 256 * 1024 }],
      // qemu-server attaches the TPM state for a backup as a node without a device (PVE 9 blockdev)
      // (a raw node over the state file, as qemu-server's blockdev code attaches it)
      ...(opts.tpm ? [['drive-tpmstate0-backup', { size: 4 * MiB }] as const, ['#block300', { size: 4 * MiB }] as const] : []),
    ]),
    bitmaps: new Map(),
    exports: new Map(),
    nbd: false,
    access: undefined,
  };
  const devices: Record<string, string> = { 'drive-scsi0': '#block100', 'drive-efidisk0': '#block200' };
  let secret: string | undefined;
  const err = (desc: string, klass = 'GenericError'): { error: { class: string; desc: string } } => ({ error: { class: klass, desc } });
  const handle = (cmd: string, a: Record<string, unknown>): Record<string, unknown> => {
    switch (cmd) {
      case 'query-proxmox-support':
        return { return: { 'backup-access-api': true, 'pbs-dirty-bitmap': true } };
      case 'query-qmp-schema':
        return {
          return: [
            { name: 'backup-access-setup', 'meta-type': 'command', 'arg-type': '42', 'ret-type': '[43]' },
            {
              name: '42',
              'meta-type': 'object',
              members:
                form === 'devices'
                  ? [{ name: 'target-id' }, { name: 'devices' }]
                  : [{ name: 'target-id' }, { name: 'devlist' }, { name: 'bitmap-name' }],
            },
          ],
        };
      case 'query-block':
        return {
          return: Object.entries(devices).map(([device, node]) => ({
            device,
            qdev: `/machine/peripheral/${device.replace('drive-', '')}`,
            inserted: { 'node-name': node, drv: 'raw', file: '', ro: false, image: { 'virtual-size': peer.nodes.get(node)!.size } },
          })),
        };
      case 'query-named-block-nodes':
        return {
          return: [...peer.nodes].map(([name, n]) => ({
            'node-name': name,
            drv: 'raw',
            file: n.file ?? '',
            ro: false,
            image: { 'virtual-size': n.size },
            'dirty-bitmaps': (peer.bitmaps.get(name) ?? []).map((b) => ({ name: b, count: 0, granularity: 65536, recording: true })),
          })),
        };
      case 'x-debug-query-block-graph': {
        const names = [...peer.nodes.keys()];
        const id = (n: string): number => names.indexOf(n);
        return {
          return: {
            nodes: names.map((name) => ({ id: id(name), name, type: 'block-driver' })),
            edges: opts.tpm ? [{ parent: id('drive-tpmstate0-backup'), child: id('#block300'), name: 'file', perm: [], 'shared-perm': [] }] : [],
          },
        };
      }
      case 'query-block-exports':
        return { return: [...peer.exports].map(([id, node]) => ({ id, type: 'nbd', 'node-name': node, 'shutting-down': false })) };
      case 'object-add':
        if (secret !== undefined) return err(`attempt to add duplicate property '${String(a.id)}'`);
        secret = String(a.data);
        return { return: {} };
      case 'object-del':
        if (secret === undefined) return err(`object '${String(a.id)}' not found`);
        secret = undefined;
        return { return: {} };
      case 'qom-set':
        if (secret === undefined) return err('Device not found', 'DeviceNotFound');
        secret = String(a.value);
        return { return: {} };
      case 'qom-get':
        return secret === undefined ? err('Device not found', 'DeviceNotFound') : { return: secret };
      case 'blockdev-add': {
        const name = String(a['node-name']);
        const file = a.file as { filename: string; 'node-name': string };
        peer.nodes.set(name, { size: 0, file: file.filename });
        peer.nodes.set(file['node-name'], { size: 0, file: file.filename });
        return { return: {} };
      }
      case 'blockdev-del': {
        const name = String(a['node-name']);
        if (!peer.nodes.delete(name)) return err(`Failed to find node with node-name='${name}'`);
        for (const [n, v] of peer.nodes) if (n.endsWith('-flf') && !n.startsWith('#') && v.file && ![...peer.nodes.keys()].some((k) => k.endsWith('-fleecing') && peer.nodes.get(k)?.file === v.file)) peer.nodes.delete(n);
        return { return: {} };
      }
      case 'block-dirty-bitmap-add': {
        const l = peer.bitmaps.get(String(a.node)) ?? [];
        l.push(String(a.name));
        peer.bitmaps.set(String(a.node), l);
        return { return: {} };
      }
      case 'block-dirty-bitmap-remove': {
        const l = peer.bitmaps.get(String(a.node)) ?? [];
        peer.bitmaps.set(String(a.node), l.filter((b) => b !== a.name));
        return { return: {} };
      }
      case 'backup-access-setup': {
        if (peer.access) return err(`previous backup for target '${peer.access}' not finished`);
        const target = String(a['target-id']);
        const list: Array<{ device: string; mode: string }> =
          form === 'devices'
            ? (a.devices as Array<{ device: string; 'bitmap-mode'?: string }>).map((d) => ({ device: d.device, mode: d['bitmap-mode'] ?? 'none' }))
            : String(a.devlist)
                .split(',')
                .map((device) => ({ device, mode: a['bitmap-name'] ? 'use' : 'none' }));
        const out = [];
        for (const { device, mode } of list) {
          const node = devices[device] ?? (opts.tpm && device === 'drive-tpmstate0-backup' ? device : undefined);
          if (!node) return err(`Device '${device}' not found`, 'DeviceNotFound');
          if (opts.failSetup === device) return err(`${device} - setting up snapshot access failed: injected`);
          const fl = peer.nodes.get(`${device}-fleecing`);
          if (!fl) return err(`Device '${device}-fleecing' not found`, 'DeviceNotFound');
          const name = form === 'devices' ? target : `${target}:${String(a['bitmap-name'])}`;
          const have = peer.bitmaps.get(node) ?? [];
          let action = 'not-used';
          if (mode === 'none' && have.includes(name)) {
            peer.bitmaps.set(node, have.filter((b) => b !== name));
            action = 'not-used-removed';
          } else if (mode === 'new') {
            // pve-qemu patch 0044: 'new' recreates the bitmap
            peer.bitmaps.set(node, [...have.filter((b) => b !== name), name]);
            action = 'new';
          } else if (mode === 'use') {
            if (have.includes(name)) action = 'used';
            else {
              peer.bitmaps.set(node, [...have, name]);
              action = form === 'devices' ? 'missing-recreated' : 'new';
            }
          }
          out.push({
            'node-name': `snapshot-access-${device}`,
            device,
            size: peer.nodes.get(node)!.size,
            ...(mode !== 'none'
              ? { ...(form === 'devices' ? { 'bitmap-node-name': node } : {}), 'bitmap-name': name, 'bitmap-action': action }
              : {}),
          });
        }
        peer.access = target;
        for (const o of out) peer.nodes.set(o['node-name'], { size: o.size });
        return { return: out };
      }
      case 'backup-access-teardown':
        if (peer.exports.size > 0) return err('bitmap is busy: exports still active');
        if (peer.access && peer.access !== a['target-id']) return err(`cannot teardown backup access - got target ${String(a['target-id'])} instead of ${peer.access}`);
        for (const k of [...peer.nodes.keys()]) if (k.startsWith('snapshot-access-')) peer.nodes.delete(k);
        peer.access = undefined;
        return { return: {} };
      case 'nbd-server-start':
        if (peer.nbd) return err('NBD server already running');
        peer.nbd = true;
        return { return: {} };
      case 'nbd-server-stop':
        peer.nbd = false;
        peer.exports.clear();
        return { return: {} };
      case 'block-export-add':
        if (!peer.nbd) return err('NBD server not running');
        if (!peer.nodes.has(String(a['node-name']))) return err(`Cannot find node ${String(a['node-name'])}`);
        for (const b of (a.bitmaps as Array<{ node: string; name: string }> | undefined) ?? []) {
          if (!(peer.bitmaps.get(b.node) ?? []).includes(b.name)) return err(`Bitmap '${b.name}' is not found`);
        }
        peer.exports.set(String(a.id), String(a['node-name']));
        return { return: {} };
      case 'block-export-del':
        peer.exports.delete(String(a.id));
        return { return: {} };
      default:
        return err(`The command ${cmd} has not been found`, 'CommandNotFound');
    }
  };
  const server = net.createServer((sock) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
    sock.write(encodeMessage({ QMP: { version: { qemu: { major: 9, minor: 2, micro: 0 }, package: 'pve-qemu-kvm_9.2.0' }, capabilities: [] } }));
    const dec = new JsonLineDecoder();
    sock.on('data', (c) => {
      for (const m of dec.push(c)) {
        if (!m.ok) continue;
        const cmd = String(m.value.execute);
        const args = (m.value.arguments ?? {}) as Record<string, unknown>;
        if (cmd !== 'qmp_capabilities') peer.calls.push({ cmd, args });
        sock.write(encodeMessage({ ...(cmd === 'qmp_capabilities' ? { return: {} } : handle(cmd, args)), id: m.value.id }));
      }
    });
    sock.on('error', () => undefined);
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(peer.path, r));
  return peer;
}

afterEach(async () => {
  for (const s of sockets) s.destroy();
  for (const s of servers.splice(0)) await new Promise((r) => s.close(() => r(undefined)));
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

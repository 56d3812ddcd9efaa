/**
 * Test helper: a scripted Proxmox QEMU QMP peer on a private unix socket (tests that use it say
 * "scripted Proxmox QMP peer" in their names). {@link closePeers} closes every peer (call it in
 * afterEach).
 */
import net from 'node:net';
import path from 'node:path';
import { JsonLineDecoder, encodeMessage } from '../../lib/qmp/codec.js';
import { tempDir } from './qemu.js';

const MiB = 1024 * 1024;

export interface Peer {
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
export async function proxmoxPeer(form: 'devices' | 'devlist', opts: { failSetup?: string; tpm?: boolean } = {}): Promise<Peer> {
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

/** Closes every peer's connections and server. */
export async function closePeers(): Promise<void> {
  for (const s of sockets) s.destroy();
  for (const s of servers.splice(0)) await new Promise((r) => s.close(() => r(undefined)));
}

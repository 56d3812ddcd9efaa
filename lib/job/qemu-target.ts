/**
 * The QEMU side of a VM backup as the runner needs it: connecting to a running QEMU or starting
 * qemu-storage-daemon on a stopped VM's disks, finding the devices and their sizes before backup
 * access is set up, and dropping a device's bitmap when the provider asks for a new one.
 *
 * @packageDocumentation
 */
import { QmpClient } from '../qmp/client.js';
import { queryBlock, queryNamedBlockNodes, type QmpBlockInfo, type QmpBlockNodeInfo } from '../qmp/commands.js';
import { QmpError } from '../qmp/errors.js';
import { InvalidArgumentError } from '../errors.js';
import { mainBitmapName } from '../qemu/names.js';
import { startStorageDaemon } from '../qemu/storage-daemon.js';
import type { VmGuest } from './types.js';

/** A QEMU process to back up from. */
export interface QemuTarget {
  qmp: QmpClient;
  /** NBD server the process already runs (qemu-storage-daemon), for backup access. */
  nbdServer: { path: string } | undefined;
  /** Devices to back up. */
  devices: string[];
  /** Whether the runner started the process (a stopped VM). */
  started: boolean;
  /** Disconnects, and stops the process when the runner started it. */
  close(): Promise<void>;
}

function qdevId(b: QmpBlockInfo): string | undefined {
  const m = /^\/machine\/peripheral\/([^/]+)(\/|$)/.exec(b.qdev ?? '');
  return m?.[1];
}

/** Connects to (or, for a stopped VM, starts) the QEMU holding the guest's disks. */
export async function openQemuTarget(guest: VmGuest, dir: string): Promise<QemuTarget> {
  if (typeof guest.qmp === 'string' || guest.qmp instanceof QmpClient) {
    const own = typeof guest.qmp === 'string';
    const qmp = typeof guest.qmp === 'string' ? await QmpClient.connect(guest.qmp) : guest.qmp;
    const close = async (): Promise<void> => {
      if (own) await qmp.close().catch(() => undefined);
    };
    try {
      let devices = guest.devices;
      if (!devices) {
        devices = (await queryBlock(qmp))
          .filter((b) => b.inserted && !b.inserted.ro)
          .map((b) => (b.device !== '' ? b.device : qdevId(b)))
          .filter((d): d is string => typeof d === 'string');
      }
      if (devices.length === 0) throw new InvalidArgumentError(`VM ${guest.vmid}: no devices to back up (pass devices)`);
      return { qmp, nbdServer: guest.nbdServer ? { path: guest.nbdServer } : undefined, devices, started: false, close };
    } catch (err) {
      await close();
      throw err;
    }
  }
  const disks = (guest.qmp as { disks?: Array<{ device: string; file: string; format: 'raw' | 'qcow2' }> })?.disks;
  if (!Array.isArray(disks) || disks.length === 0) throw new InvalidArgumentError(`VM ${guest.vmid}: qmp must be a socket path or { disks: [...] }`);
  const qsd = await startStorageDaemon({ dir, disks: disks.map((d) => ({ id: d.device, file: d.file, format: d.format })) });
  const all = disks.map((d) => d.device);
  const devices = guest.devices ?? all;
  return { qmp: qsd.qmp, nbdServer: { path: qsd.nbdSocket }, devices, started: true, close: () => qsd.stop() };
}

/** A device's source node (where its bitmaps live) and size. */
export interface DeviceSource {
  device: string;
  node: QmpBlockNodeInfo;
  size: number;
}

/**
 * Finds each device's source node the way backup access does: a guest device's inserted node,
 * or the `file` child of a raw node (qemu-storage-daemon).
 */
export async function resolveDeviceSources(qmp: QmpClient, devices: string[]): Promise<DeviceSource[]> {
  const nodes = await queryNamedBlockNodes(qmp);
  const byName = new Map(nodes.map((n) => [n['node-name'], n]));
  let blocks: QmpBlockInfo[] = [];
  try {
    blocks = await queryBlock(qmp);
  } catch (err) {
    if (!(err instanceof QmpError)) throw err;
  }
  type Graph = { nodes: Array<{ id: number; name: string }>; edges: Array<{ parent: number; child: number; name: string }> };
  let graph: Graph | undefined;
  const out: DeviceSource[] = [];
  for (const device of devices) {
    const b = blocks.find((x) => x.inserted && ((x.device !== '' && x.device === device) || qdevId(x) === device));
    let node: QmpBlockNodeInfo | undefined;
    if (b?.inserted) node = byName.get(b.inserted['node-name']) ?? b.inserted;
    else if (byName.get(device)?.drv === 'raw') {
      graph ??= await qmp.execute<Graph>('x-debug-query-block-graph');
      const top = graph.nodes.find((n) => n.name === device)?.id;
      const edge = graph.edges.find((e) => e.parent === top && e.name === 'file');
      const child = edge ? graph.nodes.find((n) => n.id === edge.child)?.name : undefined;
      node = child ? byName.get(child) : undefined;
    }
    if (!node) throw new InvalidArgumentError(`device ${device} not found in QEMU`);
    const size = node.image?.['virtual-size'] ?? byName.get(device)?.image?.['virtual-size'];
    if (typeof size !== 'number') throw new InvalidArgumentError(`device ${device}: QEMU reports no size`);
    out.push({ device, node, size });
  }
  return out;
}

/**
 * Removes the bitmap of `targetId`/`bitmapId` from a device's source node so that backup access
 * creates it anew (the provider asked for `new`, or for no bitmap on this device). Returns
 * whether a bitmap was removed.
 */
export async function dropDeviceBitmap(qmp: QmpClient, source: DeviceSource, targetId: string, bitmapId: string): Promise<boolean> {
  const name = mainBitmapName(targetId, bitmapId);
  if (!(source.node['dirty-bitmaps'] ?? []).some((b) => b.name === name)) return false;
  await qmp.execute('block-dirty-bitmap-remove', { node: source.node['node-name'], name });
  return true;
}

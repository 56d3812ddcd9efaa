/**
 * Device lookup in a QEMU process, in one place: which devices a VM has to back up, which node a
 * caller's device name stands for (its *source*: the node whose content is backed up and on which
 * the dirty bitmaps live), where a filter goes above it (and what a guest device reads from now),
 * its size, and the dirty bitmaps on it.
 * The job runner (sizes it reports to the provider, bitmaps it drops) and both backup access
 * backends (fleecing image sizes, filter insertion) resolve devices here, so they cannot disagree.
 *
 * @packageDocumentation
 */
import type { QmpClient } from '../qmp/client.js';
import { queryBlock, queryNamedBlockNodes, type QmpBlockInfo, type QmpBlockNodeInfo } from '../qmp/commands.js';
import { QmpError } from '../qmp/errors.js';
import { InvalidArgumentError } from '../errors.js';
import { BackupAccessError } from './errors.js';
import { mainBitmapName } from './names.js';
import type { ParentRef } from './state.js';

/** A device resolved to its source node. */
export interface ResolvedDevice {
  /** Device name as the caller gave it. */
  device: string;
  /** Name of the source node: what is backed up, and where the device's dirty bitmaps live. */
  source: string;
  /** The source node as `query-named-block-nodes` reports it. */
  sourceNode: QmpBlockNodeInfo;
  /**
   * Where a filter is inserted above the source: the guest device (`qom-set` of its `drive`) or
   * the raw node over the disk (`blockdev-reopen` of its `file`). Absent for a block backend with
   * no guest device and for a node name that is not a raw node with a named `file` child; `why`
   * then says which, for the backend that needs a parent.
   */
  parent: ParentRef | undefined;
  /** Why {@link ResolvedDevice.parent} is absent. */
  why?: string;
  /** Size in bytes: the source node's virtual size (what the snapshot export serves). */
  size: number;
}

/** QOM path of a block backend's guest device (`/machine/peripheral/virtio0`), without the virtio backend. */
function qdevPathOf(b: QmpBlockInfo): string | undefined {
  if (!b.qdev) return undefined;
  return b.qdev.replace(/\/virtio-backend$/, '');
}

/** The node the guest device at QOM path `qdevPath` (a `qdev` {@link ResolvedDevice.parent}) reads from now, if any. */
export async function nodeOfGuestDevice(qmp: QmpClient, qdevPath: string): Promise<string | undefined> {
  return (await queryBlock(qmp)).find((b) => qdevPathOf(b) === qdevPath)?.inserted?.['node-name'];
}

/** The qdev id (`virtio0`) of a block backend's guest device, when it has one. */
function qdevIdOf(b: QmpBlockInfo): string | undefined {
  return /^\/machine\/peripheral\/([^/]+)(\/|$)/.exec(b.qdev ?? '')?.[1];
}

/** `query-block`, or nothing where QEMU has no such command (qemu-storage-daemon builds without it). */
async function blocksOf(qmp: QmpClient): Promise<QmpBlockInfo[]> {
  try {
    return await queryBlock(qmp);
  } catch (err) {
    if (!(err instanceof QmpError)) throw err;
    return [];
  }
}

/**
 * The devices of a running VM worth backing up: every writable inserted drive, named by its
 * BlockBackend name (`drive-scsi0`) or, for `-blockdev` devices, its qdev id (`virtio0`).
 */
export async function writableDevices(qmp: QmpClient): Promise<string[]> {
  return (await queryBlock(qmp))
    .filter((b) => b.inserted && !b.inserted.ro)
    .map((b) => (b.device !== '' ? b.device : qdevIdOf(b)))
    .filter((d): d is string => typeof d === 'string');
}

type BlockGraph = { nodes: Array<{ id: number; name: string }>; edges: Array<{ parent: number; child: number; name: string }> };

/**
 * Resolves device names to their source nodes: a block backend (by BlockBackend name, qdev id or
 * qdev path) stands for its inserted node; a raw node (qemu-storage-daemon) for its `file` child;
 * any other node name for itself (it then has no {@link ResolvedDevice.parent}).
 *
 * @param nodes - `query-named-block-nodes`, when the caller has it already.
 * @throws {@link InvalidArgumentError} for a device QEMU does not have, or two names of one node;
 *   {@link BackupAccessError} when QEMU reports no size for a source node.
 */
export async function resolveDevices(qmp: QmpClient, devices: string[], nodes?: QmpBlockNodeInfo[]): Promise<ResolvedDevice[]> {
  const blocks = await blocksOf(qmp);
  const byNode = new Map((nodes ?? (await queryNamedBlockNodes(qmp))).map((n) => [n['node-name'], n]));
  let graph: BlockGraph | undefined;
  const out: ResolvedDevice[] = [];
  for (const device of devices) {
    const block = blocks.find((b) => b.inserted && ((b.device !== '' && b.device === device) || qdevIdOf(b) === device || qdevPathOf(b) === device));
    if (block?.inserted) {
      const qdev = qdevPathOf(block);
      const source = block.inserted['node-name'];
      const sourceNode = byNode.get(source) ?? block.inserted;
      out.push({
        device,
        source,
        sourceNode,
        parent: qdev ? { kind: 'qdev', path: qdev } : undefined,
        ...(qdev ? {} : { why: 'block backend is not attached to a guest device' }),
        size: sizeOf(device, sourceNode),
      });
      continue;
    }
    const top = byNode.get(device);
    if (!top) throw new InvalidArgumentError(`device ${device} not found in QEMU (neither a block device, a qdev id nor a node name)`);
    if (top.drv !== 'raw') {
      out.push({
        device,
        source: device,
        sourceNode: top,
        parent: undefined,
        why: `node has driver ${top.drv}; without a guest device the filter is inserted below a raw node, so pass a raw node over the disk`,
        size: sizeOf(device, top),
      });
      continue;
    }
    graph ??= await qmp.execute<BlockGraph>('x-debug-query-block-graph');
    const topId = graph.nodes.find((n) => n.name === device)?.id;
    const edge = graph.edges.find((e) => e.parent === topId && e.name === 'file');
    const child = edge ? graph.nodes.find((n) => n.id === edge.child)?.name : undefined;
    const sourceNode = child ? byNode.get(child) : undefined;
    if (!child || !sourceNode) throw new BackupAccessError(`${device}: raw node has no named file child`, { device });
    out.push({ device, source: child, sourceNode, parent: { kind: 'node', node: device, driver: 'raw' }, size: sizeOf(device, sourceNode) });
  }
  const seen = new Set<string>();
  for (const r of out) {
    if (seen.has(r.source)) throw new InvalidArgumentError(`device ${r.device} is given twice (node ${r.source})`);
    seen.add(r.source);
  }
  return out;
}

function sizeOf(device: string, node: QmpBlockNodeInfo): number {
  const size = node.image?.['virtual-size'];
  if (typeof size !== 'number' || size <= 0) throw new BackupAccessError(`${device}: QEMU reports no size for node ${node['node-name']}`, { device });
  return size;
}

/**
 * Removes the bitmap of `targetId`/`bitmapId` from a device's source node so that backup access
 * creates it anew (the provider asked for `new`, or for no bitmap on this device).
 *
 * @returns Whether a bitmap was removed.
 */
export async function dropDeviceBitmap(qmp: QmpClient, device: ResolvedDevice, targetId: string, bitmapId: string): Promise<boolean> {
  const name = mainBitmapName(targetId, bitmapId);
  if (!(device.sourceNode['dirty-bitmaps'] ?? []).some((b) => b.name === name)) return false;
  await qmp.execute('block-dirty-bitmap-remove', { node: device.source, name });
  return true;
}

/**
 * How many bytes a dirty bitmap marks, as QEMU counts them (`count` in
 * `query-named-block-nodes`): no need to walk the bitmap over NBD for it.
 *
 * @param bitmap - The bitmap's node and name.
 * @returns The count, or `undefined` when QEMU lists no such bitmap.
 */
export async function bitmapDirtyBytes(qmp: QmpClient, bitmap: { node: string; name: string }): Promise<number | undefined> {
  const node = (await queryNamedBlockNodes(qmp)).find((n) => n['node-name'] === bitmap.node);
  const count = (node?.['dirty-bitmaps'] ?? []).find((b) => b.name === bitmap.name)?.count;
  return typeof count === 'number' ? count : undefined;
}

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
  return nodeOfGuestDeviceIn(await queryBlock(qmp), qdevPath);
}

/** {@link nodeOfGuestDevice} in a `query-block` answer the caller has. */
export function nodeOfGuestDeviceIn(blocks: QmpBlockInfo[], qdevPath: string): string | undefined {
  return blocks.find((b) => qdevPathOf(b) === qdevPath)?.inserted?.['node-name'];
}

/** The qdev id (`virtio0`) of a block backend's guest device, when it has one. */
function qdevIdOf(b: QmpBlockInfo): string | undefined {
  return /^\/machine\/peripheral\/([^/]+)(\/|$)/.exec(b.qdev ?? '')?.[1];
}

/**
 * QEMU's block devices and named nodes, as one lookup read them: handed on to the next lookup
 * (backup access setup) so the same two queries are not sent again for the same job.
 */
export interface BlockInfo {
  /** `query-block` (empty where QEMU has no such command). */
  blocks: QmpBlockInfo[];
  /** `query-named-block-nodes`. */
  nodes: QmpBlockNodeInfo[];
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
 * @param known - What the caller has queried already (`query-block`, `query-named-block-nodes`);
 *   what is missing is queried here.
 * @throws {@link InvalidArgumentError} for a device QEMU does not have, or two names of one node;
 *   {@link BackupAccessError} when QEMU reports no size for a source node.
 */
export async function resolveDevices(qmp: QmpClient, devices: string[], known: Partial<BlockInfo> = {}): Promise<ResolvedDevice[]> {
  return (await resolveDevicesWithInfo(qmp, devices, known)).devices;
}

/**
 * {@link resolveDevices}, also returning the block devices and nodes it looked them up in (to be
 * handed to `setupBackupAccess` as `blockInfo`).
 */
export async function resolveDevicesWithInfo(
  qmp: QmpClient,
  devices: string[],
  known: Partial<BlockInfo> = {},
): Promise<{ devices: ResolvedDevice[]; info: BlockInfo }> {
  const blocks = known.blocks ?? (await blocksOf(qmp));
  const nodes = known.nodes ?? (await queryNamedBlockNodes(qmp));
  const byNode = new Map(nodes.map((n) => [n['node-name'], n]));
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
  return { devices: out, info: { blocks, nodes } };
}

function sizeOf(device: string, node: QmpBlockNodeInfo): number {
  const size = node.image?.['virtual-size'];
  if (typeof size !== 'number' || size <= 0) throw new BackupAccessError(`${device}: QEMU reports no size for node ${node['node-name']}`, { device });
  return size;
}

/**
 * Removes the bitmap of `targetId`/`bitmapId` from a device's source node so that backup access
 * creates it anew (the provider asked for `new`, or for no bitmap on this device). The node as
 * the lookup reported it (`device.sourceNode`) is updated to match, so the lookup's
 * {@link BlockInfo} stays true and can be handed on.
 *
 * @returns Whether a bitmap was removed.
 */
export async function dropDeviceBitmap(qmp: QmpClient, device: ResolvedDevice, targetId: string, bitmapId: string): Promise<boolean> {
  const name = mainBitmapName(targetId, bitmapId);
  const bitmaps = device.sourceNode['dirty-bitmaps'] ?? [];
  if (!bitmaps.some((b) => b.name === name)) return false;
  await qmp.execute('block-dirty-bitmap-remove', { node: device.source, name });
  device.sourceNode['dirty-bitmaps'] = bitmaps.filter((b) => b.name !== name);
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
  return (await bitmapsDirtyBytes(qmp, [bitmap]))[0];
}

/**
 * {@link bitmapDirtyBytes} of several bitmaps from one `query-named-block-nodes` (nothing is
 * sent for an empty list).
 *
 * @returns The counts, in the order given (`undefined` where QEMU lists no such bitmap).
 */
export async function bitmapsDirtyBytes(qmp: QmpClient, bitmaps: Array<{ node: string; name: string }>): Promise<Array<number | undefined>> {
  if (bitmaps.length === 0) return [];
  const nodes = new Map((await queryNamedBlockNodes(qmp)).map((n) => [n['node-name'], n]));
  return bitmaps.map((bitmap) => {
    const count = (nodes.get(bitmap.node)?.['dirty-bitmaps'] ?? []).find((b) => b.name === bitmap.name)?.count;
    return typeof count === 'number' ? count : undefined;
  });
}

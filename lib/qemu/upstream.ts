/**
 * Backup access on stock QEMU (7.2 and newer) with standard QMP commands: fleecing image,
 * copy-before-write filter, snapshot-access node, dirty bitmap frozen with a background bitmap,
 * NBD export.
 *
 * @packageDocumentation
 */
import { randomBytes } from 'node:crypto';
import type { QmpClient } from '../qmp/client.js';
import { queryBlock, queryNamedBlockNodes, type QmpBlockInfo, type QmpBlockNodeInfo, type QmpDirtyBitmapInfo } from '../qmp/commands.js';
import { QmpError } from '../qmp/errors.js';
import { withFrozenFilesystems, type GuestAgentClient } from '../qmp/guest-agent.js';
import { addFleecingNodes, createFleecingImage } from './fleecing.js';
import { addExport, deleteExports, startNbdServer } from './nbd-exports.js';
import { StepRunner, removeLocalFiles } from './teardown-steps.js';
import { nodeOfGuestDeviceIn, resolveDevices, type BlockInfo } from './devices.js';
import { BackupAccessActiveError, BackupAccessError, deviceError } from './errors.js';
import {
  BACKGROUND_SUFFIX,
  NAME_PREFIX,
  anchorBitmapName,
  backgroundBitmapName,
  fleecingPath,
  mainBitmapName,
  slotNames,
} from './names.js';
import { claimState, deleteState, newAccessState, readState, writeState, type AccessState, type DeviceState } from './state.js';
import type { BitmapAction } from './types.js';

/** Validated input of {@link setupUpstream}. */
export interface UpstreamSetupInput {
  targetId: string;
  devices: string[];
  bitmap: string | undefined;
  /** Per-device bitmap modes (Proxmox's landed form only; see `SetupBackupAccessOptions`). */
  bitmapModes: Record<string, 'use' | 'new' | 'none'> | undefined;
  fleecingDir: string;
  fleecingFormat: 'qcow2' | 'raw';
  qga: GuestAgentClient | undefined;
  socket: { ownNbd: true; socketPath: string; socketDir: string } | { ownNbd: false; socketPath: string };
  /**
   * What the caller has read already and is still true: the access record (`undefined`: none)
   * and, when given, QEMU's block devices and nodes. Absent: read here.
   */
  known?: { state: AccessState | undefined; blockInfo?: BlockInfo };
}

/** Result per device of {@link setupUpstream}. */
export interface UpstreamDeviceResult {
  state: DeviceState;
  size: number;
  action: BitmapAction;
  /** Bitmap attached to the export, if any. */
  exportedBitmap: string | undefined;
}

const ANCHOR_GRANULARITY = 2 ** 31;

/**
 * Throws {@link BackupAccessActiveError} when an access (or its leftovers) is present.
 *
 * @param known - The access record as the caller has just read it (`state: undefined`: none);
 *   absent: read here.
 */
export async function assertNoActiveAccess(qmp: QmpClient, nodes: QmpBlockNodeInfo[], known?: { state: AccessState | undefined }): Promise<void> {
  const state = known ? known.state : await readState(qmp);
  if (state) throw new BackupAccessActiveError(state.targetId);
  const leftover = nodes.find((n) => n['node-name'].startsWith(`${NAME_PREFIX}-`));
  if (leftover) throw new BackupAccessActiveError(undefined, `node ${leftover['node-name']} exists`);
  for (const n of nodes) {
    const bg = (n['dirty-bitmaps'] ?? []).find((b) => b.name.endsWith(BACKGROUND_SUFFIX));
    if (bg) throw new BackupAccessActiveError(bg.name.slice(0, -BACKGROUND_SUFFIX.length), `bitmap ${bg.name} on ${n['node-name']}`);
  }
}

interface BitmapPlan {
  action: BitmapAction;
  /** Whether a bitmap created on the source is stored in its image (a writable qcow2 node). */
  persistent: boolean;
  kind: 'incr' | 'full' | undefined;
  remove: string[];
  createAnchor: boolean;
  main: string | undefined;
  anchor: string | undefined;
}

/** Decides the bitmap action for one device from the bitmaps QEMU has (see the module docs). */
function planBitmap(targetId: string, bitmapId: string | undefined, bitmaps: QmpDirtyBitmapInfo[], source: QmpBlockNodeInfo): BitmapPlan {
  const persistent = source.drv === 'qcow2' && !source.ro;
  const ours = bitmaps.filter((b) => b.name.startsWith(`${targetId}/`) && !b.name.endsWith(BACKGROUND_SUFFIX));
  if (bitmapId === undefined) {
    return {
      action: ours.length > 0 ? 'not-used-removed' : 'not-used',
      persistent,
      kind: undefined,
      remove: ours.map((b) => b.name),
      createAnchor: false,
      main: undefined,
      anchor: undefined,
    };
  }
  const main = mainBitmapName(targetId, bitmapId);
  const anchor = anchorBitmapName(targetId, bitmapId);
  const existing = ours.find((b) => b.name === main);
  const hasAnchor = ours.some((b) => b.name === anchor);
  const others = ours.filter((b) => b.name !== main && b.name !== anchor).map((b) => b.name);
  // A bitmap that does not record (left disabled by a crash) or is inconsistent cannot be trusted.
  const usable = existing && existing.recording !== false && existing.inconsistent !== true && existing.busy !== true;
  if (usable) {
    return { action: 'used', persistent, kind: 'incr', remove: others, createAnchor: !hasAnchor, main, anchor };
  }
  const remove = existing ? [...others, main] : others;
  return { action: hasAnchor || existing ? 'invalid' : 'new', persistent, kind: 'full', remove, createAnchor: !hasAnchor, main, anchor };
}

/** Sets up backup access with standard QMP commands. On failure everything done is undone. */
export async function setupUpstream(qmp: QmpClient, input: UpstreamSetupInput): Promise<{ state: AccessState; devices: UpstreamDeviceResult[] }> {
  const nodes = input.known?.blockInfo?.nodes ?? (await queryNamedBlockNodes(qmp));
  await assertNoActiveAccess(qmp, nodes, input.known);
  const resolved = await resolveDevices(qmp, input.devices, { ...input.known?.blockInfo, nodes });
  for (const r of resolved) {
    if (!r.parent) throw new BackupAccessError(`${r.device}: ${r.why ?? 'no place to insert the filter'}`, { device: r.device });
  }
  const token = randomBytes(4).toString('hex');
  const plans: BitmapPlan[] = [];
  const devStates: DeviceState[] = resolved.map((r, slot) => {
    const n = slotNames(slot);
    const plan = planBitmap(input.targetId, input.bitmap, r.sourceNode['dirty-bitmaps'] ?? [], r.sourceNode);
    plans.push(plan);
    const d: DeviceState = {
      device: r.device,
      slot,
      source: r.source,
      parent: r.parent,
      fleecingPath: fleecingPath(input.fleecingDir, token, r.device, input.fleecingFormat),
      fleecingFormat: input.fleecingFormat,
      fleecingNode: n.fleecing,
      fleecingFileNode: n.fleecingFile,
      exportId: n.exportId,
      exportName: r.device,
    };
    if (plan.main && plan.anchor && plan.kind) {
      d.bitmap = plan.main;
      d.anchor = plan.anchor;
      d.bitmapKind = plan.kind;
      d.createdAnchor = plan.createAnchor;
    }
    return d;
  });
  const state = newAccessState({ targetId: input.targetId, backend: 'upstream', socket: input.socket, devices: devStates });

  await claimState(qmp, state);
  try {
    for (const [i, d] of devStates.entries()) {
      await createFleecingImage(d.device, d.fleecingPath, d.fleecingFormat, resolved[i]!.size);
    }
    for (const d of devStates) await addFleecingNodes(qmp, d.device, d);
    // Old bitmaps of this target that are not to be used any more.
    for (const [i, d] of devStates.entries()) {
      for (const name of plans[i]!.remove) {
        try {
          await qmp.execute('block-dirty-bitmap-remove', { node: d.source, name }, { device: d.device });
        } catch (err) {
          throw deviceError(d.device, `removing old bitmap ${name}`, err);
        }
      }
    }
    await withFrozenFilesystems(input.qga, () => freezePoint(qmp, input.targetId, devStates, plans));
    for (const d of devStates) {
      try {
        await qmp.execute(
          'blockdev-add',
          // discard=unmap: without it QEMU ignores the provider's TRIM and the fleecing image never shrinks
          { driver: 'snapshot-access', 'node-name': slotNames(d.slot).snapshot, file: slotNames(d.slot).cbw, discard: 'unmap' },
          { device: d.device },
        );
      } catch (err) {
        throw deviceError(d.device, 'adding the snapshot-access node', err);
      }
    }
    if (input.socket.ownNbd) {
      await startNbdServer(qmp, input.socket.socketPath);
      state.ownNbd = true;
      await writeState(qmp, state);
    }
    for (const d of devStates) {
      const bitmap = d.bitmap && d.bitmapKind === 'incr' ? { node: d.source, name: d.bitmap } : undefined;
      await addExport(qmp, d.device, {
        exportId: d.exportId,
        exportName: d.exportName,
        node: slotNames(d.slot).snapshot,
        ...(bitmap ? { bitmap } : {}),
      });
    }
  } catch (err) {
    await teardownUpstream(qmp, state, false).catch(() => undefined);
    throw err;
  }
  return {
    state,
    devices: devStates.map((d, i) => ({
      state: d,
      size: resolved[i]!.size,
      action: plans[i]!.action,
      exportedBitmap: d.bitmap && d.bitmapKind === 'incr' ? d.bitmap : undefined,
    })),
  };
}

/**
 * The point in time: with the guest paused (when it runs) and its filesystems frozen (when an
 * agent is given), freeze the bitmaps, start the background bitmaps and insert the filters.
 */
async function freezePoint(qmp: QmpClient, targetId: string, devs: DeviceState[], plans: BitmapPlan[]): Promise<void> {
  let resume = false;
  // A VM has query-status and stop; qemu-storage-daemon has neither (asked directly rather than
  // through query-commands: one round trip, and no list of every command to parse).
  let running = false;
  try {
    running = (await qmp.execute<{ running?: boolean }>('query-status')).running === true;
  } catch (err) {
    if (!(err instanceof QmpError && err.qmpClass === 'CommandNotFound')) throw err;
  }
  if (running) {
    await qmp.execute('stop');
    resume = true;
  }
  try {
    const actions: Array<Record<string, unknown>> = [];
    for (const [i, d] of devs.entries()) {
      const plan = plans[i]!;
      actions.push({ type: 'block-dirty-bitmap-add', data: { node: d.source, name: backgroundBitmapName(targetId) } });
      if (d.bitmap && d.anchor) {
        const persistent = plan.persistent;
        if (plan.kind === 'full') {
          actions.push({ type: 'block-dirty-bitmap-add', data: { node: d.source, name: d.bitmap, persistent, disabled: true } });
        } else {
          actions.push({ type: 'block-dirty-bitmap-disable', data: { node: d.source, name: d.bitmap } });
        }
        if (plan.createAnchor) {
          actions.push({
            type: 'block-dirty-bitmap-add',
            data: { node: d.source, name: d.anchor, persistent, disabled: true, granularity: ANCHOR_GRANULARITY },
          });
        }
      }
    }
    try {
      await qmp.execute('transaction', { actions });
    } catch (err) {
      throw new BackupAccessError(`freezing the dirty bitmaps failed (QMP transaction): ${(err as Error).message}`, { cause: err });
    }
    for (const d of devs) {
      await addCbw(qmp, d);
      // The device reads from its source (the lookup found it so, and no node of ours existed):
      // the filter is a different node, no need to ask QEMU which node the device has now.
      await insertFilter(qmp, d, slotNames(d.slot).cbw, d.source);
    }
  } catch (err) {
    // The guest must run again whatever failed; the first error is the one to report.
    if (resume) await qmp.execute('cont').catch(() => undefined);
    resume = false;
    throw err;
  } finally {
    if (resume) await qmp.execute('cont');
  }
}

async function addCbw(qmp: QmpClient, d: DeviceState): Promise<void> {
  const names = slotNames(d.slot);
  const args: Record<string, unknown> = {
    driver: 'copy-before-write',
    'node-name': names.cbw,
    file: d.source,
    target: names.fleecing,
    'on-cbw-error': 'break-snapshot',
    'cbw-timeout': 45,
  };
  if (d.bitmap && d.bitmapKind === 'incr') args.bitmap = { node: d.source, name: d.bitmap };
  try {
    await qmp.execute('blockdev-add', args, { device: d.device });
  } catch (err) {
    // Older QEMU without the error policy options.
    if (err instanceof QmpError && /cbw-timeout|on-cbw-error/.test(err.desc)) {
      delete args['on-cbw-error'];
      delete args['cbw-timeout'];
      try {
        await qmp.execute('blockdev-add', args, { device: d.device });
        return;
      } catch (err2) {
        throw deviceError(d.device, 'adding the copy-before-write filter', err2);
      }
    }
    throw deviceError(d.device, 'adding the copy-before-write filter', err);
  }
}

/**
 * Points the device (or the raw parent node) at `node`, unless it already is.
 *
 * @param current - The node the guest device reads from now (as `query-block` reports it;
 *   `undefined`: none), when the caller knows it.
 */
async function insertFilter(qmp: QmpClient, d: DeviceState, node: string, current: string | undefined): Promise<void> {
  const parent = d.parent;
  if (!parent) return;
  try {
    if (parent.kind === 'qdev') {
      // Setting the drive to the node it already has trips an assertion in QEMU 7.2.
      if (current === node) return;
      await qmp.execute('qom-set', { path: parent.path, property: 'drive', value: node }, { device: d.device });
    } else {
      await qmp.execute('blockdev-reopen', { options: [{ driver: parent.driver, 'node-name': parent.node, file: node }] }, { device: d.device });
    }
  } catch (err) {
    throw deviceError(d.device, node === d.source ? 'removing the filter from the device' : 'inserting the filter above the device', err);
  }
}

/**
 * Undoes an access (or what exists of it), continuing after errors. With `success` the bitmap is
 * cleared and the background bitmap merged into it; otherwise the background is merged in (or a
 * bitmap created by this access is dropped again). Closed connection: only local files go.
 */
export async function teardownUpstream(qmp: QmpClient, state: AccessState, success: boolean): Promise<void> {
  const run = new StepRunner(qmp);
  await run.qmpStep('removing NBD exports', () => deleteExports(qmp, state.devices.map((d) => d.exportId)));
  if (state.ownNbd) {
    await run.qmpStep('stopping the NBD server', async () => {
      try {
        await qmp.execute('nbd-server-stop');
      } catch (err) {
        if (!(err instanceof QmpError)) throw err;
      }
    });
  }
  // One look at QEMU's nodes (and, for guest devices, at its devices) for the whole teardown, not
  // one per step: what exists now is what is removed, and a node removed here leaves the list.
  let nodes: QmpBlockNodeInfo[] | undefined;
  await run.qmpStep('listing the block nodes', async () => {
    nodes = await queryNamedBlockNodes(qmp);
  });
  const present = new Set((nodes ?? []).map((n) => n['node-name']));
  let blocks: QmpBlockInfo[] | undefined;
  const del = async (d: DeviceState, name: string): Promise<void> => {
    if (!present.has(name)) return;
    try {
      await qmp.execute('blockdev-del', { 'node-name': name }, { device: d.device });
      present.delete(name);
    } catch (err) {
      throw deviceError(d.device, `removing node ${name}`, err);
    }
  };
  for (const d of [...state.devices].reverse()) {
    const names = slotNames(d.slot);
    // The file node goes with the fleecing node that created it inline (blockdev-add): it is
    // removed on its own only when it was left without one.
    const orphanFile = present.has(d.fleecingFileNode) && !present.has(d.fleecingNode);
    await run.qmpStep(`${d.device}: removing the snapshot node`, () => del(d, names.snapshot));
    await run.qmpStep(`${d.device}: removing the filter`, async () => {
      if (!present.has(names.cbw)) return;
      const current = d.parent?.kind === 'qdev' ? nodeOfGuestDeviceIn((blocks ??= await queryBlock(qmp)), d.parent.path) : undefined;
      await insertFilter(qmp, d, d.source, current);
    });
    await run.qmpStep(`${d.device}: removing the filter node`, () => del(d, names.cbw));
    await run.qmpStep(`${d.device}: removing the fleecing node`, () => del(d, d.fleecingNode));
    if (orphanFile) await run.qmpStep(`${d.device}: removing the fleecing file node`, () => del(d, d.fleecingFileNode));
  }
  // bitmaps live on the sources, which the node removals above leave as they were
  await run.qmpStep('merging the dirty bitmaps', () => settleBitmaps(qmp, state, success, nodes));
  await removeLocalFiles(run, state);
  await run.qmpStep('removing the access record', () => deleteState(qmp));
  run.throwIfFailed(`teardown of backup access for target '${state.targetId}'`);
}

async function settleBitmaps(qmp: QmpClient, state: AccessState, success: boolean, known: QmpBlockNodeInfo[] | undefined): Promise<void> {
  const nodes = known ?? (await queryNamedBlockNodes(qmp));
  const bg = backgroundBitmapName(state.targetId);
  for (const d of state.devices) {
    const have = new Set((nodes.find((n) => n['node-name'] === d.source)?.['dirty-bitmaps'] ?? []).map((b) => b.name));
    if (!have.has(bg)) continue;
    const actions: Array<Record<string, unknown>> = [];
    if (d.bitmap && have.has(d.bitmap)) {
      if (d.bitmapKind === 'full' && !success) {
        // The bitmap was created empty by this access: it does not cover what the failed backup missed.
        actions.push({ type: 'block-dirty-bitmap-remove', data: { node: d.source, name: d.bitmap } });
        if (d.createdAnchor && d.anchor && have.has(d.anchor)) {
          actions.push({ type: 'block-dirty-bitmap-remove', data: { node: d.source, name: d.anchor } });
        }
      } else {
        actions.push({ type: 'block-dirty-bitmap-enable', data: { node: d.source, name: d.bitmap } });
        if (success) actions.push({ type: 'block-dirty-bitmap-clear', data: { node: d.source, name: d.bitmap } });
        actions.push({ type: 'block-dirty-bitmap-merge', data: { node: d.source, target: d.bitmap, bitmaps: [bg] } });
      }
    }
    actions.push({ type: 'block-dirty-bitmap-remove', data: { node: d.source, name: bg } });
    try {
      await qmp.execute('transaction', { actions }, { device: d.device });
    } catch (err) {
      throw deviceError(d.device, success ? 'merging the bitmaps after success' : 'merging the bitmaps after failure', err);
    }
  }
}

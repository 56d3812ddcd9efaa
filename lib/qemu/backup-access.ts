/**
 * Backup access: a point-in-time NBD export of a running QEMU's disks, with fleecing, dirty
 * bitmaps and success-aware teardown, on Proxmox QEMU (`backup-access-setup`) or stock QEMU
 * (standard QMP commands).
 *
 * @packageDocumentation
 */
import { rm, statfs } from 'node:fs/promises';
import path from 'node:path';
import type { QmpClient } from '../qmp/client.js';
import { queryBlockExports, queryNamedBlockNodes } from '../qmp/commands.js';
import { QmpClosedError, QmpError } from '../qmp/errors.js';
import { InvalidArgumentError } from '../errors.js';
import { checkFleecingDir } from './fleecing.js';
import { checkExistingNbdSocket, makeSocketDir } from './nbd-exports.js';
import { StepRunner, removeLocalFiles } from './teardown-steps.js';
import { BackupAccessActiveError, BackupAccessError, FleecingFullError } from './errors.js';
import { BACKGROUND_SUFFIX, BITMAP_ID_RE, DEVICE_RE, NAME_PREFIX, TARGET_ID_RE, check, nbdUnixUri } from './names.js';
import { describeOwner, ownerIsDead } from '../owner.js';
import { detectProxmox, setupProxmox, teardownProxmox } from './proxmox.js';
import { deleteState, readState, type AccessState } from './state.js';
import type { BackupAccess, BitmapAction, BitmapMode, SetupBackupAccessOptions } from './types.js';
import { setupUpstream, teardownUpstream } from './upstream.js';

export type { BackupAccess, BackupAccessDevice, BitmapAction, BitmapMode, SetupBackupAccessOptions } from './types.js';
export { BackupAccessActiveError, BackupAccessError, FleecingFullError } from './errors.js';

/** Accesses set up by this process, so teardown can still remove local files when QEMU is gone. */
const local = new WeakMap<QmpClient, Map<string, AccessState>>();

function remember(qmp: QmpClient, state: AccessState): void {
  let m = local.get(qmp);
  if (!m) local.set(qmp, (m = new Map()));
  m.set(state.targetId, state);
}

/**
 * The provider-facing bitmap mode for a setup action, as qemu-server maps it: `not-used*` →
 * `none`, `new` and `invalid` → `new`, `used` → `reuse`.
 *
 * @param action - Action reported by setup.
 */
export function bitmapModeFor(action: BitmapAction): BitmapMode {
  switch (action) {
    case 'not-used':
    case 'not-used-removed':
      return 'none';
    case 'new':
    case 'invalid':
      return 'new';
    case 'used':
      return 'reuse';
    default:
      throw new InvalidArgumentError(`unknown bitmap action ${JSON.stringify(action)}`);
  }
}

/**
 * Removes the backup access a dead process left (see {@link recoverBackupAccess}); an access
 * whose owner is alive, or none, is left as it is. {@link setupBackupAccess} does this first; a
 * caller that looks at the devices' bitmaps before setting up (the job runner drops a bitmap the
 * provider wants new) must do it before that look: while a killed run's filter sits above a disk,
 * the disk's node and its bitmaps are not where a lookup of the device finds them, and the
 * recovery merges the killed run's bitmaps back afterwards.
 *
 * @returns The access record as read (`undefined`: none) and what was removed (empty: nothing).
 */
export async function recoverDeadAccess(qmp: QmpClient): Promise<{ stale: AccessState | undefined; recovered: string[] }> {
  const stale = await readState(qmp);
  const recovered = stale && ownerIsDead(stale.owner) ? await recoverBackupAccess(qmp) : [];
  return { stale, recovered };
}

/**
 * Sets up backup access: per device a fleecing image, a copy-before-write filter, a
 * snapshot-access node exported writable over NBD on a unix socket, and the target's dirty
 * bitmap frozen for the export while a background bitmap records new writes.
 *
 * Only one access per QEMU process at a time. On any failure, everything done is undone (nodes,
 * exports, bitmaps created, fleecing files) before the error is thrown.
 *
 * @param qmp - Connected QMP client.
 * @param opts - Target id, devices, bitmap id, fleecing, optional guest agent and NBD server.
 * @throws {@link InvalidArgumentError} (`ERR_INVALID_ARGUMENT`) for bad names or unknown devices,
 *   {@link BackupAccessActiveError} (`ERR_BACKUP_ACCESS_ACTIVE`) naming the active target,
 *   {@link BackupAccessError} (`ERR_BACKUP_ACCESS`) naming the device and QMP command otherwise.
 */
export async function setupBackupAccess(qmp: QmpClient, opts: SetupBackupAccessOptions): Promise<BackupAccess> {
  if (!opts || typeof opts !== 'object') throw new InvalidArgumentError('options are required');
  const targetId = check(opts.targetId, TARGET_ID_RE, 'target id');
  if (!Array.isArray(opts.devices) || opts.devices.length === 0) throw new InvalidArgumentError('devices must be a non-empty array');
  const devices = opts.devices.map((d) => check(d, DEVICE_RE, 'device name'));
  if (new Set(devices).size !== devices.length) throw new InvalidArgumentError('a device is given twice');
  if (devices.some((d) => d.startsWith(`${NAME_PREFIX}-`))) throw new InvalidArgumentError(`device names starting with ${NAME_PREFIX}- are reserved`);
  const bitmap = opts.bitmap === undefined ? undefined : check(opts.bitmap, BITMAP_ID_RE, 'bitmap id');
  const format = opts.fleecing?.format ?? 'qcow2';
  if (format !== 'qcow2' && format !== 'raw') throw new InvalidArgumentError(`fleecing format must be qcow2 or raw, got ${JSON.stringify(format)}`);
  const backendOpt = opts.backend ?? 'auto';
  if (!['auto', 'proxmox', 'upstream'].includes(backendOpt)) throw new InvalidArgumentError(`unknown backend ${JSON.stringify(backendOpt)}`);
  if (qmp.closed) throw new QmpClosedError('QMP connection is closed; cannot set up backup access');

  const fleecingDir = await checkFleecingDir(opts.fleecing?.dir);
  const existingNbd = opts.nbdServer === undefined ? undefined : await checkExistingNbdSocket(opts.nbdServer.path);
  const backend = backendOpt === 'auto' ? ((await detectProxmox(qmp)) ? 'proxmox' : 'upstream') : backendOpt;
  // An access whose owner died (killed mid-copy) would block every later backup and let its
  // fleecing image grow with each guest write: remove it first. A live owner is left alone
  // (the backend then refuses with ERR_BACKUP_ACCESS_ACTIVE).
  const { stale, recovered } = opts.accessRecord ? { stale: opts.accessRecord.state, recovered: [] } : await recoverDeadAccess(qmp);
  // What the backends would read again: the record just read (gone once recovered), and the
  // caller's block lookup unless the recovery changed the nodes and bitmaps since.
  const known = recovered.length > 0 ? { state: undefined } : { state: stale, ...(opts.blockInfo ? { blockInfo: opts.blockInfo } : {}) };

  const sock = existingNbd ? undefined : await makeSocketDir(opts.socketDir);
  const socket = sock
    ? ({ ownNbd: true, socketPath: sock.socketPath, socketDir: sock.dir } as const)
    : ({ ownNbd: false, socketPath: existingNbd! } as const);
  try {
    const input = { targetId, devices, bitmap, bitmapModes: opts.bitmapModes, fleecingDir, fleecingFormat: format, qga: opts.qga, socket, known };
    // Both backends report the same facts per device, under their own names.
    const reported =
      backend === 'upstream'
        ? await setupUpstream(qmp, input).then(({ state, devices: res }) => ({
            state,
            devices: res.map((r) => ({
              device: r.state.device,
              nodeName: `${NAME_PREFIX}-${r.state.slot}-snap`,
              size: r.size,
              exportName: r.state.exportName,
              bitmapName: r.exportedBitmap,
              bitmapNode: r.exportedBitmap ? r.state.source : undefined,
              action: r.action,
            })),
          }))
        : await setupProxmox(qmp, input);
    remember(qmp, reported.state);
    return {
      targetId,
      backend,
      ...(recovered.length > 0 ? { recovered } : {}),
      socketPath: socket.socketPath,
      devices: reported.devices.map((r) => ({
        device: r.device,
        nodeName: r.nodeName,
        size: r.size,
        exportName: r.exportName,
        nbdUri: nbdUnixUri(r.exportName, socket.socketPath),
        ...(r.bitmapName ? { bitmapName: r.bitmapName } : {}),
        ...(r.bitmapName && r.bitmapNode ? { bitmapNode: r.bitmapNode } : {}),
        bitmapAction: r.action,
        bitmapMode: bitmapModeFor(r.action),
      })),
    };
  } catch (err) {
    if (sock) await rm(sock.dir, { recursive: true, force: true }).catch(() => undefined);
    throw err;
  }
}

/**
 * Tears down the backup access of `targetId`: removes the exports (disconnecting readers), the
 * NBD server if setup started it, the nodes and fleecing images, and settles the bitmap: with
 * `success` it then holds only the writes made since the access was set up; without, it also
 * keeps everything the failed backup should have covered.
 *
 * Idempotent (nothing active: nothing to do). Works after a restart of the calling process (the
 * record is kept in QEMU). When QEMU is gone, only local files known to this process are removed
 * and nothing is thrown.
 *
 * @param qmp - QMP client (may be closed).
 * @param opts - Target id and whether the backup succeeded.
 * @throws {@link BackupAccessError} when the active access belongs to another target or when
 *   QEMU refused a step (after every other step was still tried).
 */
export async function teardownBackupAccess(qmp: QmpClient, opts: { targetId: string; success: boolean }): Promise<void> {
  const targetId = check(opts?.targetId, TARGET_ID_RE, 'target id');
  if (typeof opts.success !== 'boolean') throw new InvalidArgumentError('success must be a boolean');
  const mine = local.get(qmp)?.get(targetId);
  let state: AccessState | undefined;
  if (!qmp.closed) {
    try {
      state = await readState(qmp);
    } catch (err) {
      if (!(err instanceof QmpClosedError)) throw err;
    }
  }
  if (qmp.closed) {
    if (mine) {
      const run = new StepRunner(qmp);
      await removeLocalFiles(run, mine);
      local.get(qmp)?.delete(targetId);
    }
    return;
  }
  if (!state) {
    if (mine) await removeLocalFiles(new StepRunner(qmp), mine);
    local.get(qmp)?.delete(targetId);
    return;
  }
  if (state.targetId !== targetId) {
    throw new BackupAccessError(`cannot tear down backup access for target '${targetId}': the active access is for target '${state.targetId}'`);
  }
  try {
    if (state.backend === 'proxmox') await teardownProxmox(qmp, state, opts.success);
    else await teardownUpstream(qmp, state, opts.success);
  } finally {
    local.get(qmp)?.delete(targetId);
  }
}

/**
 * Finds what a crashed orchestrator left behind and removes it: the access recorded in QEMU (torn
 * down as failed, so no bitmap loses writes), then remaining exports, nodes and background
 * bitmaps whose names carry this library's prefix. Fleecing images and the private NBD socket
 * folder go too when they are on this host.
 *
 * An access whose owner (the process that set it up) still runs is refused, unless `force`.
 *
 * @param qmp - Connected QMP client.
 * @param opts - `force`: also remove an access whose owner is alive (or cannot be checked).
 * @returns Descriptions of what was removed (empty when nothing was left).
 * @throws {@link BackupAccessActiveError} (`ERR_BACKUP_ACCESS_ACTIVE`) when the owner is alive.
 */
export async function recoverBackupAccess(qmp: QmpClient, opts: { force?: boolean } = {}): Promise<string[]> {
  const removed: string[] = [];
  const state = await readState(qmp);
  if (state?.owner && !opts.force && !ownerIsDead(state.owner)) {
    throw new BackupAccessActiveError(state.targetId, `its owner, ${describeOwner(state.owner)}, is still running`);
  }
  if (state) {
    if (state.backend === 'proxmox') await teardownProxmox(qmp, state, false);
    else await teardownUpstream(qmp, state, false);
    const by = state.owner ? ` left by ${describeOwner(state.owner)}` : '';
    removed.push(`access for target '${state.targetId}' (${state.devices.map((d) => d.device).join(', ')})${by}`);
  }
  for (const e of await queryBlockExports(qmp)) {
    if (!e.id.startsWith(`${NAME_PREFIX}-`)) continue;
    await qmp.execute('block-export-del', { id: e.id, mode: 'hard' }).catch(() => undefined);
    removed.push(`export ${e.id}`);
  }
  // Nodes: parents first (snapshot, filter, fleecing format, fleecing file).
  const order = ['-snap', '-cbw', '-fl', '-flf'];
  for (const suffix of order) {
    for (const n of await queryNamedBlockNodes(qmp)) {
      const name = n['node-name'];
      if (!name.startsWith(`${NAME_PREFIX}-`) || !name.endsWith(suffix)) continue;
      try {
        await qmp.execute('blockdev-del', { 'node-name': name });
        removed.push(`node ${name}`);
      } catch (err) {
        if (!(err instanceof QmpError)) throw err;
        removed.push(`node ${name} (could not be removed: ${err.desc})`);
      }
    }
  }
  for (const n of await queryNamedBlockNodes(qmp)) {
    for (const b of n['dirty-bitmaps'] ?? []) {
      if (!b.name.endsWith(BACKGROUND_SUFFIX)) continue;
      const target = b.name.slice(0, -BACKGROUND_SUFFIX.length);
      // Merge what was written meanwhile into the target's bitmaps, then drop the background.
      const mains = (n['dirty-bitmaps'] ?? []).filter((m) => m.name.startsWith(`${target}/`) && !m.name.includes('//'));
      const actions: Array<Record<string, unknown>> = [];
      for (const m of mains) {
        actions.push({ type: 'block-dirty-bitmap-enable', data: { node: n['node-name'], name: m.name } });
        actions.push({ type: 'block-dirty-bitmap-merge', data: { node: n['node-name'], target: m.name, bitmaps: [b.name] } });
      }
      actions.push({ type: 'block-dirty-bitmap-remove', data: { node: n['node-name'], name: b.name } });
      await qmp.execute('transaction', { actions });
      removed.push(`bitmap ${b.name} on ${n['node-name']}`);
    }
  }
  await deleteState(qmp);
  return removed;
}

/**
 * Space that reads in flight when the snapshot broke may still have freed by discarding (16 reads
 * of 4 MiB), plus slack: a filesystem with less free than this is taken as the one that was full.
 */
const FULL_MARGIN = 65 * 2 ** 20;

/** Whether `err` (or an error it wraps) is a read refused by a broken snapshot (EACCES in QEMU). */
function brokenSnapshotRead(err: unknown): boolean {
  for (let e = err, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    if (/Permission denied/.test(e.message)) return true;
  }
  return false;
}

/**
 * Tells why reading a backup access failed when the reason lies with the fleecing image: a read of
 * the snapshot refused because QEMU broke the snapshot (`on-cbw-error=break-snapshot`) and a
 * fleecing image whose filesystem is (nearly) full. Call it with the access still set up.
 *
 * @param qmp - QMP client of the access.
 * @param targetId - Target id of the access.
 * @param err - The error reading the export ended with.
 * @returns A {@link FleecingFullError} (with `err` as cause) naming the image, or `undefined`
 *   when the failure is not that.
 */
export async function explainFleecingFailure(qmp: QmpClient, targetId: string, err: unknown): Promise<FleecingFullError | undefined> {
  if (!brokenSnapshotRead(err)) return undefined;
  const state = local.get(qmp)?.get(targetId) ?? (qmp.closed ? undefined : await readState(qmp).catch(() => undefined));
  if (!state || state.targetId !== targetId) return undefined;
  for (const d of state.devices) {
    const st = await statfs(path.dirname(d.fleecingPath)).catch(() => undefined);
    if (!st) continue;
    const free = st.bavail * st.bsize;
    if (free < FULL_MARGIN) return new FleecingFullError(d.device, d.fleecingPath, free, err);
  }
  return undefined;
}

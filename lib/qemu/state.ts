/**
 * The record of an active backup access, kept inside QEMU (a QOM `secret` object whose `data`
 * is the record's JSON, raw-deflated and base64-encoded after `z:`; plain JSON, as earlier
 * versions wrote it, is read too) so that teardown and recovery work after the orchestrating
 * process restarted. Compressed because QEMU's monitor reads a command about a byte per main loop
 * turn (some 4.5 µs a byte here): the record, written twice per access, was the longest command
 * of a backup (a 1-disk record: 860 bytes as JSON, 520 compressed; 2 disks: 1390 and 550).
 *
 * @packageDocumentation
 */
import { deflateRawSync, inflateRawSync } from 'node:zlib';
import type { QmpClient } from '../qmp/client.js';
import { QmpClosedError, QmpError } from '../qmp/errors.js';
import { BackupAccessActiveError } from './errors.js';
import { STATE_OBJECT_ID } from './names.js';
import { currentOwner, describeOwner, type AccessOwner } from '../owner.js';

/** How the copy-before-write filter is put above the disk. */
export type ParentRef = { kind: 'qdev'; path: string } | { kind: 'node'; node: string; driver: string };

/** One device of an access. */
export interface DeviceState {
  /** Device name as the caller gave it. */
  device: string;
  /** Device number inside the access (names the nodes). */
  slot: number;
  /** Node whose content is snapshotted (and carries the bitmaps). */
  source: string;
  /** Where the filter is inserted (upstream only). */
  parent?: ParentRef;
  /** Fleecing image path. */
  fleecingPath: string;
  /** Fleecing image format. */
  fleecingFormat: 'qcow2' | 'raw';
  /** Fleecing format node name. */
  fleecingNode: string;
  /** Fleecing file node name. */
  fleecingFileNode: string;
  /** Export id. */
  exportId: string;
  /** NBD export name. */
  exportName: string;
  /** Main bitmap name, when incremental. */
  bitmap?: string;
  /** Anchor bitmap name, when incremental. */
  anchor?: string;
  /** Whether this access created the anchor (so a failed first run forgets it again). */
  createdAnchor?: boolean;
  /** `incr`: the main bitmap existed and is used; `full`: it was created empty at setup. */
  bitmapKind?: 'incr' | 'full';
}

/** The whole access. */
export interface AccessState {
  /** Format version. */
  v: 1;
  /** Target id of the caller. */
  targetId: string;
  /** Backend used. */
  backend: 'proxmox' | 'upstream';
  /** Target id passed to Proxmox's `backup-access-setup`. */
  qemuTargetId?: string;
  /** Unix socket of the NBD server. */
  socketPath: string;
  /** Whether this access started the NBD server (and so stops it). */
  ownNbd: boolean;
  /** Private directory holding the socket, when this access created it. */
  socketDir?: string;
  /** Devices. */
  devices: DeviceState[];
  /** The process that set the access up (absent in records of older versions). */
  owner?: AccessOwner;
}

/**
 * The record a setup claims before it changes anything: this process as the owner, and the NBD
 * server not yet its own (set once started, so a rollback never stops a server it did not start).
 */
export function newAccessState(o: {
  targetId: string;
  backend: AccessState['backend'];
  qemuTargetId?: string;
  socket: { ownNbd: true; socketPath: string; socketDir: string } | { ownNbd: false; socketPath: string };
  devices: DeviceState[];
}): AccessState {
  return {
    v: 1,
    targetId: o.targetId,
    backend: o.backend,
    ...(o.qemuTargetId !== undefined ? { qemuTargetId: o.qemuTargetId } : {}),
    socketPath: o.socket.socketPath,
    ownNbd: false,
    ...(o.socket.ownNbd ? { socketDir: o.socket.socketDir } : {}),
    devices: o.devices,
    owner: currentOwner(),
  };
}

/** Prefix of a compressed record. */
const PACKED = 'z:';

/** The record as stored: `z:` and the base64 of its raw-deflated JSON. */
function pack(state: AccessState): string {
  return PACKED + deflateRawSync(JSON.stringify(state)).toString('base64');
}

/** Reads the record (either form), or `undefined` when there is none. */
export async function readState(qmp: QmpClient): Promise<AccessState | undefined> {
  let data: unknown;
  try {
    data = await qmp.execute('qom-get', { path: `/objects/${STATE_OBJECT_ID}`, property: 'data' });
  } catch (err) {
    if (err instanceof QmpError) return undefined;
    throw err;
  }
  if (typeof data !== 'string') return undefined;
  try {
    const json = data.startsWith(PACKED) ? inflateRawSync(Buffer.from(data.slice(PACKED.length), 'base64')).toString('utf8') : data;
    const parsed = JSON.parse(json) as AccessState;
    return parsed && parsed.v === 1 && Array.isArray(parsed.devices) ? parsed : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Creates the record, claiming the QEMU process for this access. `object-add` fails when the
 * object exists, so of two setups racing on one QEMU exactly one wins; the other gets
 * {@link BackupAccessActiveError} naming the winner (never a bare "duplicate property").
 */
export async function claimState(qmp: QmpClient, state: AccessState): Promise<void> {
  try {
    await qmp.execute('object-add', { 'qom-type': 'secret', id: STATE_OBJECT_ID, format: 'raw', data: pack(state) });
  } catch (err) {
    if (!(err instanceof QmpError) || !/duplicate property/.test(err.desc)) throw err;
    const active = await readState(qmp).catch(() => undefined);
    throw new BackupAccessActiveError(active?.targetId, active?.owner ? `set up by ${describeOwner(active.owner)}` : err.desc);
  }
}

/** Updates the record claimed with {@link claimState} in place (never deleting it, so the claim holds). */
export async function writeState(qmp: QmpClient, state: AccessState): Promise<void> {
  await qmp.execute('qom-set', { path: `/objects/${STATE_OBJECT_ID}`, property: 'data', value: pack(state) });
}

/** Removes the record; no error when it does not exist. */
export async function deleteState(qmp: QmpClient): Promise<void> {
  try {
    await qmp.execute('object-del', { id: STATE_OBJECT_ID });
  } catch (err) {
    if (err instanceof QmpClosedError) throw err;
    if (!(err instanceof QmpError)) throw err;
  }
}

/**
 * Public types of backup access.
 *
 * @packageDocumentation
 */
import type { GuestAgentClient } from '../qmp/guest-agent.js';
import type { BlockInfo } from './devices.js';
import type { AccessState } from './state.js';
import type { BitmapAction, BitmapMode } from '../vocabulary.js';

export type { BitmapAction, BitmapMode } from '../vocabulary.js';

/** One device of an active backup access. */
export interface BackupAccessDevice {
  /** Device name as passed to {@link SetupBackupAccessOptions.devices}. */
  device: string;
  /** The exported snapshot-access node. */
  nodeName: string;
  /** Size in bytes. */
  size: number;
  /** NBD export name. */
  exportName: string;
  /** `nbd+unix:///EXPORT?socket=PATH`. */
  nbdUri: string;
  /**
   * Dirty bitmap exported with the snapshot (NBD meta context `qemu:dirty-bitmap:<bitmapName>`),
   * present when the export carries one. Always present in mode `reuse`. In mode `new` it is
   * present on Proxmox QEMU (all dirty) and absent on upstream QEMU (read everything).
   */
  bitmapName?: string;
  /** Node the bitmap lives on (with {@link BackupAccessDevice.bitmapName}): where QEMU counts its dirty bytes. */
  bitmapNode?: string;
  /** Raw action. */
  bitmapAction: BitmapAction;
  /** Provider-facing mode ({@link bitmapModeFor} of the action). */
  bitmapMode: BitmapMode;
}

/** An active backup access. */
export interface BackupAccess {
  /** Target id it was set up for. */
  targetId: string;
  /** Backend used: Proxmox's `backup-access-setup` or standard QMP commands. */
  backend: 'proxmox' | 'upstream';
  /** Unix socket of the NBD server. */
  socketPath: string;
  /** What a stale access of a dead owner had left and setup removed first (the list `recoverBackupAccess` returns), if any. */
  recovered?: string[];
  /** Devices in the order requested. */
  devices: BackupAccessDevice[];
}

/** Options of {@link setupBackupAccess}. */
export interface SetupBackupAccessOptions {
  /** Target id, e.g. `snapshot-access:store1` (`[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}`). Names the bitmap. */
  targetId: string;
  /**
   * Devices. VM: BlockBackend names (`drive-scsi0`) or qdev ids (`virtio0`); qemu-storage-daemon:
   * the top node name (a `raw` node over the disk; the filter goes below it).
   */
  devices: string[];
  /**
   * Bitmap id (`[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}`); absent: no incremental tracking. With a target
   * id `snapshot-access:<storeid>` and the bitmap id `<storeid>`, Proxmox's QEMU (landed form)
   * gets qemu-server's names: target id and bitmap name both `snapshot-access:<storeid>`, so this
   * package and vzdump share one bitmap per storage.
   */
  bitmap?: string;
  /**
   * Per device, what the provider asked for (qemu-server's `bitmap-mode`): `use` (default), `new`
   * (recreate) or `none` (no bitmap; an existing one is removed). Proxmox's landed form passes
   * them to QEMU as they are; on other backends the caller removes the bitmaps of `new` and
   * `none` devices before the setup (`dropDeviceBitmap`).
   */
  bitmapModes?: Record<string, 'use' | 'new' | 'none'>;
  /** Fleecing images: directory (absolute, writable) and format (default `qcow2`). */
  fleecing: { dir: string; format?: 'qcow2' | 'raw' };
  /** Guest agent: filesystems are frozen around the point in time. */
  qga?: GuestAgentClient;
  /**
   * NBD server already running in QEMU (QEMU allows one): its unix socket. Exports are added to
   * it. Absent: a server is started on a private socket and stopped at teardown.
   */
  nbdServer?: { path: string };
  /** Directory in which the private NBD socket directory is created (default: the OS temp dir). */
  socketDir?: string;
  /** Backend: detected from `query-proxmox-support` by default (once per QMP connection). */
  backend?: 'auto' | 'proxmox' | 'upstream';
  /**
   * QEMU's block devices and nodes as the caller has just read them (`resolveDevicesWithInfo`),
   * with nothing changed since but bitmaps removed through `dropDeviceBitmap`: setup then does
   * not query them again. Ignored when setup first removes a stale access.
   */
  blockInfo?: BlockInfo;
  /**
   * The access record as the caller found it with `recoverDeadAccess`, run before its device
   * lookup (`state: undefined`: none, or the dead one removed): setup does not read it again. A
   * live access claimed since is still refused when setup claims the record.
   */
  accessRecord?: { state: AccessState | undefined };
}

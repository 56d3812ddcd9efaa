/**
 * The backup provider API: what a backup product implements so that the job runner
 * ({@link runBackupJob}) and the restore functions can drive it.
 *
 * Two generations of the same API exist, both served by the one runner through one adapter:
 * - {@link BackupProviderV1} (`apiVersion: 1`): the shape of the seed's `PVE::BackupProvider::Plugin`
 *   (`job_start`, `backup_nbd`, `restore_qemu_img_init`, ...).
 * - {@link BackupProviderV2} (`apiVersion: 2`): the shape the API shipped in with Proxmox VE 8.4
 *   (`job_init`, `backup_vm`, `restore_vm_volume_init`, ...).
 *
 * Versioning follows libtool (and the Proxmox storage API): the runner has a current version
 * ({@link PROVIDER_API_VERSION}) and an age ({@link PROVIDER_API_AGE}); a provider declaring
 * `apiVersion` is accepted when `current - age <= apiVersion <= current`, and refused with a
 * {@link ProviderApiVersionError} before any backup starts otherwise. Later versions only add
 * members; every addition is optional or has a default derived from what the provider has.
 *
 * Conventions of every method: async (a plain return value is accepted too), camelCase names of
 * the Perl methods, guest ids as numbers, sizes and limits in bytes (per second). A method that
 * throws fails the operation it belongs to, as a Perl `die` does. Each method's Perl name is given
 * as `Perl:` in its documentation; `docs/provider-api.md` has the full table.
 *
 * @packageDocumentation
 */
import type { BitmapAction, BitmapMode, IdMapEntry } from '../vocabulary.js';

export type { BitmapAction, BitmapMode };

/** The runner's current provider API version. */
export const PROVIDER_API_VERSION = 2;
/** How many versions before {@link PROVIDER_API_VERSION} the runner still serves (1: version 1 too). */
export const PROVIDER_API_AGE = 1;

/** Guest type: `qemu` (VM) or `lxc` (container). */
export type GuestType = 'qemu' | 'lxc';

/** Log level of a task log line. */
export type LogLevel = 'info' | 'warn' | 'err';

/**
 * Writes a line to the task log: `log(level, message)`. Perl: `$log_function->($log_level, $message)`.
 */
export type LogFunction = (level: LogLevel, message: string) => void;

/** One entry of a container's id map (`lxc.idmap = u 0 100000 65536`). */
export type { IdMapEntry };

/**
 * What a provider is constructed with. Perl: the arguments of
 * `new($class, $storage_plugin, $scfg, $storeid, $log_function)`.
 */
export interface ProviderContext {
  /** Storage id of the provider's storage (e.g. `store1`). */
  storeid: string;
  /** Storage configuration (`$scfg`), as the caller passes it; `{}` when none. */
  scfg: Record<string, unknown>;
  /** The associated storage plugin (`$storage_plugin`), opaque to the runner. */
  storagePlugin?: unknown;
  /**
   * Task log. When the runner constructs the provider (a factory passed to {@link runBackupJob}),
   * lines logged during a guest's backup go to that guest's task log, others to the job log.
   */
  log: LogFunction;
}

/** A factory constructing a provider, the equivalent of Perl's `new`. May be async. */
export type ProviderFactory = (context: ProviderContext) => BackupProvider | Promise<BackupProvider>;

/** A storage property the generated Proxmox VE storage plugin declares (pve-common JSON schema). */
export interface PveStorageProperty {
  type: 'string' | 'integer' | 'boolean';
  description: string;
  /** For `string`: the allowed values. */
  enum?: string[];
  /** For `integer`. */
  minimum?: number;
  maximum?: number;
  default?: string | number | boolean;
}

/**
 * What `pve-backup-provider pve-plugin generate` writes into the Proxmox VE storage plugin of a
 * provider module: the module's named export `pveStorage`. Everything is optional.
 */
export interface PveStorageSchema {
  /**
   * The storage's own properties. Names are one namespace across every storage plugin of a
   * node (pve-common `SectionConfig` dies on a duplicate): prefix them with the vendor's name.
   */
  properties?: Record<string, PveStorageProperty>;
  /**
   * Which properties a storage of this type takes, own ones and Proxmox VE's (`path`, `nodes`,
   * `disable`, `prune-backups`, `max-protected-backups`...): `fixed` cannot change after
   * `pvesm add`, `optional` may be left out.
   */
  options?: Record<string, { optional?: boolean; fixed?: boolean }>;
  /** Own properties that hold secrets (`sensitive-properties`): kept out of `storage.cfg`. */
  sensitive?: string[];
  /**
   * Where the vmid stands in the provider's archive names: a regular expression (valid in Perl
   * and JavaScript) with one capture group for the vmid. `parse_volname` applies it in Perl,
   * without starting the provider, since Proxmox VE calls it for every listed backup. Default
   * `^(\d+)/`: the archive name starts with `<vmid>/`.
   */
  archiveNameVmid?: string;
}

/** Result that may be returned directly or as a promise. */
export type Awaitable<T> = T | Promise<T>;

// ---------------------------------------------------------------------------------------------
// Members common to both generations
// ---------------------------------------------------------------------------------------------

/** Options of the retention hook {@link ProviderStorage.prune} (vzdump's `prune-backups`). */
export interface PruneOptions {
  keepAll?: boolean;
  keepLast?: number;
  keepHourly?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
  keepYearly?: number;
}

/** One backup as the storage side lists it (an item of pve-storage's `list_volumes`). */
export interface StoredBackup {
  /** Volume name without the storage id: `backup/<archive-name>` (vzdump's volume id is `<storeid>:<volname>`). */
  volname: string;
  vmid: number;
  /** Guest type: PVE's `subtype`, which the GUI uses to offer a VM or a container restore. */
  vmtype: GuestType;
  /** Creation time, Unix seconds. */
  ctime: number;
  /** Size in bytes (what the backup occupies, or its data size). */
  size: number;
  notes?: string;
  protected?: boolean;
}

/** Space of the storage (pve-storage `status`: total, free and used bytes). */
export interface StorageStatus {
  total: number;
  free: number;
  used: number;
}

/** One backup's retention decision (pve-storage `prune_mark_backup_group`). */
export interface StoragePruneMark {
  volname: string;
  vmid: number;
  vmtype: GuestType;
  ctime: number;
  mark: 'keep' | 'remove' | 'protected';
}

/**
 * The provider's storage side, optional. Two callers use it:
 * - the job: what vzdump does through the storage plugin after a successful guest backup (notes,
 *   protected flag, prune). The runner logs a warning when a job asks for something the provider
 *   cannot do; an error thrown by `setNotes` is a warning, by `setProtected` or `prune` a failure
 *   of the guest (pve-manager `VZDump.pm`).
 * - Proxmox VE's storage plugin (the Perl bridge): class calls made with no job and no
 *   provider object (`status`, `list_volumes`, `free_image`, `get/update_volume_attribute`,
 *   `prune_backups`), each on a fresh provider constructed from the storage configuration. Such a
 *   provider gets no `jobInit`: these methods must work on their own, and find backups written
 *   by another process.
 */
export interface ProviderStorage {
  /** Sets the notes (the expanded notes template) of a backup. Perl: `update_volume_attribute($scfg, $storeid, $volname, 'notes', $notes)`. */
  setNotes?(volname: string, notes: string): Awaitable<void>;
  /** Sets or clears the protected flag of a backup. Perl: `update_volume_attribute(..., 'protected', 1)`. */
  setProtected?(volname: string, value: boolean): Awaitable<void>;
  /**
   * Applies retention to the guest's backups on this storage. Perl: `prune_backups($scfg, $storeid, $keep, $vmid, $type, $dryrun, $logfunc)`.
   * With `dryRun`, decides and removes nothing.
   * @returns Optionally, the volnames removed (logged) and the decision for every backup
   *   considered (what `pvesm prune-backups --dry-run` shows).
   */
  prune?(options: { vmid: number; vmtype: GuestType; keep: PruneOptions; dryRun?: boolean }): Awaitable<{ removed?: string[]; marks?: StoragePruneMark[] } | void>;
  /** Space of the storage. Perl: `status`; pvestatd asks every 10 s (the bridge caches it). */
  status?(): Awaitable<StorageStatus>;
  /** The backups on this storage, of one guest when `vmid` is given. Perl: `list_volumes`. */
  listBackups?(filter: { vmid?: number }): Awaitable<StoredBackup[]>;
  /** Notes of a backup, or undefined. Perl: `get_volume_attribute(..., 'notes')`. */
  getNotes?(volname: string): Awaitable<string | undefined>;
  /** Whether a backup is protected. Perl: `get_volume_attribute(..., 'protected')`. */
  getProtected?(volname: string): Awaitable<boolean>;
  /** Deletes a backup (refused for a protected one). Perl: `free_image`. */
  removeBackup?(volname: string): Awaitable<void>;
}

/** What the optional restore hooks are told. */
export interface RestoreHookInfo {
  /** Storage id the restore reads from. */
  storeid: string;
  /** Guest type of the archive (from `restoreGetMechanism`). */
  vmtype: GuestType;
  /** Restore mechanism (from `restoreGetMechanism`). */
  mechanism: RestoreMechanism;
}

/**
 * Members every provider may have, whatever its generation.
 *
 * The restore hooks answer an open question of the seed: a provider can learn when a restore
 * starts and how it ended. When present, `restoreStart` is called right after
 * `restoreGetMechanism`, and exactly one of `restoreEnd` / `restoreAbort` after everything else
 * (all cleanups done). Errors thrown by `restoreEnd` fail the restore; errors thrown by
 * `restoreAbort` are logged.
 */
export interface ProviderCommon {
  /** Name of the provider, printed in log lines. Perl: `provider_name`. */
  providerName(): Awaitable<string>;
  /** Optional: a restore of `volname` starts. (No Perl counterpart; an answer to the seed's question.) */
  restoreStart?(volname: string, info: RestoreHookInfo): Awaitable<void>;
  /** Optional: the restore of `volname` succeeded. */
  restoreEnd?(volname: string, info: RestoreHookInfo): Awaitable<void>;
  /** Optional: the restore of `volname` failed with `error` (cleanups already ran). */
  restoreAbort?(volname: string, error: Error, info: RestoreHookInfo): Awaitable<void>;
  /** Optional storage-side hooks (notes, protected flag, retention). */
  readonly storage?: ProviderStorage;
}

/** Backup mechanisms: `nbd` and `file-handle` for VMs (`file-handle` only for version 2), `directory` for containers. */
export type BackupMechanism = 'nbd' | 'file-handle' | 'directory';
/** Restore mechanisms: `qemu-img` for VMs, `tar` or `directory` for containers. */
export type RestoreMechanism = 'qemu-img' | 'tar' | 'directory';

/** Size of a VM volume, as reported for backup (query incremental) and restore (device info). */
export interface VolumeSize {
  /** Size in bytes. */
  size: number;
}

/** Answer of `restoreGetMechanism`: Perl's `($mechanism, $vmtype)`. */
export interface RestoreMechanismInfo {
  mechanism: RestoreMechanism;
  vmtype: GuestType;
}

// ---------------------------------------------------------------------------------------------
// Generation 1: the seed's Plugin.pm
// ---------------------------------------------------------------------------------------------

/** Answer of {@link BackupProviderV1.backupGetMechanism}: Perl's `($mechanism, $bitmap_id)`. */
export interface BackupMechanismInfoV1 {
  /** `nbd` for `qemu`, `directory` for `lxc`. */
  mechanism: 'nbd' | 'directory';
  /**
   * Bitmap id for incremental VM backups (`[A-Za-z0-9][A-Za-z0-9_.@-]*`), or absent for none. The
   * runner prefixes it with the storage id (`<storeid>-<bitmapId>`), so providers never clash.
   * Keep it stable between backups of a guest to get incremental ones.
   */
  bitmapId?: string;
}

/** Extra information handed to {@link BackupProviderV1.backupNbd} beside the seed's arguments. */
export interface NbdBackupExtra {
  /** Raw bitmap action, beside the mode (an answer to the seed's open question). */
  bitmapAction: BitmapAction;
  /** Size of the device in bytes. */
  size: number;
  /** `nbd+unix:///<deviceName>?socket=<nbdPath>`, ready for `copyExtents`. */
  nbdUri: string;
  /** Archive name (`backupGetTarget`'s answer). */
  archiveName: string;
  /** Aborted when the job is aborted (signal); stop reading then. */
  signal: AbortSignal;
}

/**
 * A provider of the seed's generation (`apiVersion: 1`). Extend {@link BackupProviderBaseV1} to
 * get "not implemented" defaults and helpers.
 *
 * Backup order, per job: `jobStart`; per guest `backupStart`, `backupGetTarget`,
 * `backupGuestConfig`, `backupFirewallConfig` (only if the guest has one), `backupGetMechanism`;
 * VMs: `backupNbd` per device, then (on success) `backupGetTaskSize`; containers:
 * `backupDirectory`; then `backupEnd` or `backupAbort`; then `backupHandleLogFile`; after all
 * guests `jobEnd`, or `jobAbort` on a fundamental failure.
 */
export interface BackupProviderV1 extends ProviderCommon {
  /** API version targeted: 1. */
  readonly apiVersion: 1;

  /** The job starts; e.g. check that the backup server is reachable. Perl: `job_start($start_time)`. @param startTime - Unix time (s) of the job start. */
  jobStart(startTime: number): Awaitable<void>;
  /** The job ended (some guests may have failed). Perl: `job_end`. */
  jobEnd(): Awaitable<void>;
  /** The job is aborted (signal, fundamental failure); no `jobEnd` follows. Perl: `job_abort($error)`. */
  jobAbort(error: Error): Awaitable<void>;
  /** The backup of a guest starts. Perl: `backup_start($vmid, $vmtype)`. */
  backupStart(vmid: number, vmtype: GuestType): Awaitable<void>;
  /** The guest's backup succeeded. Perl: `backup_end($vmid)`. */
  backupEnd(vmid: number): Awaitable<void>;
  /** The guest's backup failed with `error`; discard what was written. Perl: `backup_abort($vmid, $error)`. */
  backupAbort(vmid: number, error: Error): Awaitable<void>;
  /**
   * Which mechanism to use for the guest, and the bitmap id for incremental VM backups.
   * Returning `undefined` (or throwing) means the guest type is not supported. Perl: `backup_get_mechanism($vmid, $vmtype)`.
   */
  backupGetMechanism(vmid: number, vmtype: GuestType): Awaitable<BackupMechanismInfoV1 | undefined>;
  /**
   * The name of the backup being made (the volume name the storage will list, e.g.
   * `backup/vm-100-2024_01_01-10_00_00`); letters, digits, `_ . - + = / :` only. Perl: `backup_get_target($vmid, $vmtype)`.
   */
  backupGetTarget(vmid: number, vmtype: GuestType): Awaitable<string>;
  /** Size in bytes of the backup just made, for the task log and result (VMs, after success). Perl: `backup_get_task_size($vmid)`. */
  backupGetTaskSize(vmid: number): Awaitable<number | undefined>;
  /** Store the guest configuration found in file `filename`. Perl: `backup_guest_config($vmid, $filename)`. */
  backupGuestConfig(vmid: number, filename: string): Awaitable<void>;
  /** Store the guest's firewall configuration found in `filename`; only called if it has one. Perl: `backup_firewall_config($vmid, $filename)`. */
  backupFirewallConfig(vmid: number, filename: string): Awaitable<void>;
  /** Handle the guest's task log in `filename` (e.g. upload a copy); called after success and failure. Perl: `backup_handle_log_file($vmid, $filename)`. */
  backupHandleLogFile(vmid: number, filename: string): Awaitable<void>;
  /**
   * Back up one VM device from its NBD export `nbd+unix:///<deviceName>?socket=<nbdPath>` (the
   * export name is the device name). With `bitmapMode` `reuse`, only the extents marked dirty in
   * the bitmap `bitmapName` (meta context `qemu:dirty-bitmap:<bitmapName>`) are readable and need
   * reading; with `new` or `none` read everything (`bitmapName`, when given, marks everything
   * dirty). Discard what has been stored on the export to free the fleecing image. Honour
   * `bandwidthLimit` (bytes/s, 0 = none). Perl:
   * `backup_nbd($vmid, $devicename, $nbd_path, $bitmap_mode, $bitmap_name, $bandwidth_limit)`.
   *
   * @param extra - Added in this implementation: raw bitmap action, size, URI, archive name, abort signal.
   */
  backupNbd(
    vmid: number,
    deviceName: string,
    nbdPath: string,
    bitmapMode: BitmapMode,
    bitmapName: string | undefined,
    bandwidthLimit: number,
    extra: NbdBackupExtra,
  ): Awaitable<void>;
  /**
   * Back up a container's file tree under `directory`: the paths in `sources` (relative, `.` for
   * the root, one per mount point), minus `excludePaths` (rsync-style patterns: anchored with a
   * leading `/`, `**` for any depth). Owners are host ids; `idMap` maps them to the container's.
   * Perl: `backup_directory($vmid, $directory, $id_map, $exclude_paths, $sources, $bandwidth_limit)`;
   * `extra` (no Perl counterpart) carries the job's abort signal.
   */
  backupDirectory(
    vmid: number,
    directory: string,
    idMap: IdMapEntry[],
    excludePaths: string[],
    sources: string[],
    bandwidthLimit: number,
    extra?: { signal: AbortSignal },
  ): Awaitable<void>;

  /** Mechanism and guest type of an archive. Perl: `restore_get_mechanism($volname, $storeid)`. */
  restoreGetMechanism(volname: string, storeid: string): Awaitable<RestoreMechanismInfo>;
  /** Raw guest configuration of an archive. Perl: `extract_guest_config($volname, $storeid)`. */
  extractGuestConfig(volname: string, storeid: string): Awaitable<string>;
  /** Raw firewall configuration of an archive, `undefined` when it has none. Perl: `extract_firewall_config($volname, $storeid)`. */
  extractFirewallConfig(volname: string, storeid: string): Awaitable<string | undefined>;
  /** The devices of a VM archive and their sizes. Perl: `restore_qemu_get_device_info($volname, $storeid)`. */
  restoreQemuGetDeviceInfo(volname: string, storeid: string): Awaitable<Record<string, VolumeSize>>;
  /** Make a device's data available: a path or URI `qemu-img` reads as raw. Perl: `restore_qemu_img_init($volname, $storeid, $devicename)`. */
  restoreQemuImgInit(volname: string, storeid: string, deviceName: string): Awaitable<string>;
  /** Always called after `restoreQemuImgInit` was called (also when it or the copy failed). Perl: `restore_qemu_img_cleanup($volname, $storeid, $devicename)`. */
  restoreQemuImgCleanup(volname: string, storeid: string, deviceName: string): Awaitable<void>;
  /** Path of a (possibly compressed) tar archive of the container's tree. Perl: `restore_tar_init($volname, $storeid)`. */
  restoreTarInit(volname: string, storeid: string): Awaitable<string>;
  /** Always called after `restoreTarInit` was called (also when it or the extraction failed). Perl: `restore_tar_cleanup($volname, $storeid)`. */
  restoreTarCleanup(volname: string, storeid: string): Awaitable<void>;
  /** Path of a directory holding the container's tree. Perl: `restore_directory_init($volname, $storeid)`. */
  restoreDirectoryInit(volname: string, storeid: string): Awaitable<string>;
  /** Always called after `restoreDirectoryInit` was called (also when it or the copy failed). Perl: `restore_directory_cleanup($volname, $storeid)`. */
  restoreDirectoryCleanup(volname: string, storeid: string): Awaitable<void>;
}

// ---------------------------------------------------------------------------------------------
// Generation 2: Proxmox VE 8.4
// ---------------------------------------------------------------------------------------------

/** Answer of {@link BackupProviderV2.backupInit}. Perl: `{ 'archive-name' => ... }`. */
export interface BackupInitResult {
  /**
   * Archive name: letters, digits, `_ . - + = / :` only (vzdump's check). vzdump makes the volume
   * id `<storeid>:backup/<archiveName>` of it (pve-manager `VZDump.pm`), and the storage's notes,
   * protected flag and listing must know the backup under `backup/<archiveName>`.
   */
  archiveName: string;
}

/** Answer of {@link BackupProviderV2.backupCleanup}. Perl: `{ stats => { 'archive-size' => ... } }`. */
export interface BackupCleanupResult {
  stats?: { archiveSize?: number };
}

/**
 * What {@link BackupProviderV2.backupVmQueryIncremental} answers per device: `new` (create a new
 * bitmap, or recreate it: read everything), `use` (use the existing bitmap, create it if
 * missing) or `none` (no bitmap, an existing one is discarded: qemu-server `VZDump/QemuServer.pm`
 * `archive_external` accepts it beside the two others). Devices left out use no bitmap too.
 */
export type IncrementalRequest = 'new' | 'use' | 'none';

/** A readable view of a volume's point-in-time data (mechanism `file-handle`). */
export interface VolumeHandle {
  /** Size in bytes. */
  readonly size: number;
  /** Reads `length` bytes at `offset`; with a bitmap, only inside dirty regions. */
  read(offset: number, length: number): Promise<Buffer>;
  /** Discards a range already backed up, freeing fleecing space. Perl: `PVE::Storage::Common::deallocate`. */
  discard(offset: number, length: number): Promise<void>;
}

/** Information on one VM volume handed to {@link BackupProviderV2.backupVm}, keyed by device name. */
export interface BackupVmVolume {
  /** Size in bytes. Perl: `size`. */
  size: number;
  /** How a bitmap is used: `none`, `new` (newly created: read everything), `reuse` (read the dirty parts). Perl: `bitmap-mode`. */
  bitmapMode: BitmapMode;
  /** Raw action behind the mode (`not-used`, `not-used-removed`, `new`, `used`, `invalid`). */
  bitmapAction: BitmapAction;
  /** Mechanism `nbd`: unix socket of the NBD server; the export name is the device name. Perl: `nbd-path`. */
  nbdPath?: string;
  /** Mechanism `nbd`: `nbd+unix:///<device>?socket=<nbdPath>`. */
  nbdUri?: string;
  /** Mechanism `nbd`: name of the bitmap on the export, when one is used. Perl: `bitmap-name`. */
  bitmapName?: string;
  /** Mechanism `file-handle`: the data. Perl: `file-handle`. */
  fileHandle?: VolumeHandle;
  /**
   * Mechanism `file-handle`: the next dirty region as `[offset, length]`, `undefined` after the
   * last; `[0, size]` once without a bitmap. Perl: `next-dirty-region`.
   */
  nextDirtyRegion?: () => Promise<[number, number] | undefined>;
}

/** Optional information for {@link BackupProviderV2.backupVm}. Perl: `$info`. */
export interface BackupVmInfo {
  /** Bytes per second; 0 or absent: no limit. Perl: `bandwidth-limit`. */
  bandwidthLimit?: number;
  /** Raw firewall configuration, present if the guest has one. Perl: `firewall-config`. */
  firewallConfig?: string;
  /** The mechanism the volumes are prepared for. */
  mechanism: 'nbd' | 'file-handle';
  /** Archive name (from `backupInit`). */
  archiveName: string;
  /** Aborted when the job is aborted. */
  signal: AbortSignal;
}

/** Information for container backup. Perl: `$info` of `backup_container(_prepare)`. */
export interface ContainerBackupInfo {
  /** Directory with the container's file tree. Perl: `directory`. */
  directory: string;
  /** Paths inside `directory` to back up (`.` for the root, one per mount point). Perl: `sources`. */
  sources: string[];
  /** Host uid of the container's root (e.g. 100000 unprivileged, 0 privileged). Perl: `backup-user-id`. */
  backupUserId: number;
  /** The container's id map (empty when privileged). */
  idMap: IdMapEntry[];
  /** Bytes per second; 0 or absent: no limit. Perl: `bandwidth-limit`. */
  bandwidthLimit?: number;
  /** Raw firewall configuration, present if the guest has one. Perl: `firewall-config`. */
  firewallConfig?: string;
  /** Archive name (from `backupInit`). */
  archiveName: string;
  /** Aborted when the job is aborted. */
  signal: AbortSignal;
}

/** Answer of {@link BackupProviderV2.restoreVmVolumeInit}. Perl: `{ 'qemu-img-path' => $path }`. */
export interface RestoreVmVolumeInitResult {
  /** Path or URI `qemu-img convert` reads as raw. */
  qemuImgPath: string;
}

/** Where {@link BackupProviderV2.restoreVmVolumeWrite} writes a device. */
export interface RestoreVolumeTarget {
  /** A regular file or a block device, at least `size` bytes. */
  path: string;
  /** The device's size. */
  size: number;
  /** `path` already reads as zeros (a file the runner just created): zero ranges may stay holes. */
  zeroed: boolean;
  /** Bytes per second to read at most; absent: no limit. */
  bandwidthLimit?: number;
  /** Progress in bytes of the device. */
  onProgress?: (progress: { done: number; total: number }) => void;
  signal?: AbortSignal;
}

/** Where {@link BackupProviderV2.restoreContainerWrite} extracts a container backup. */
export interface RestoreContainerTarget {
  /** The container's (empty, mounted) root directory. */
  rootdir: string;
  /** The container's id map: the archive's container ids become host ids. Absent: unchanged. */
  idMap?: IdMapEntry[];
  /** Restore into a root directory that holds files (kept: tar's `--skip-old-files`). */
  allowNonEmpty?: boolean;
  /** Bytes per second to read at most; absent: no limit. */
  bandwidthLimit?: number;
  signal?: AbortSignal;
}

/** Answer of {@link BackupProviderV2.restoreContainerInit}: `tarPath` for `tar`, `archiveDirectory` for `directory`. */
export interface RestoreContainerInitResult {
  /** Perl: `tar-path`. */
  tarPath?: string;
  /** Perl: `archive-directory`. */
  archiveDirectory?: string;
}

/**
 * A provider of the Proxmox VE 8.4 generation (`apiVersion: 2`). Extend {@link BackupProviderBase}
 * to get "not implemented" defaults and helpers.
 *
 * Backup order: `jobInit`; per guest `backupInit`, `backupGetMechanism`; VMs:
 * `backupVmQueryIncremental` then `backupVm`; containers: `backupContainerPrepare` then
 * `backupContainer`; on success the storage hooks (notes, protected, prune), then
 * `backupCleanup(…, true)`; on failure (also of a hook, or of that cleanup: a second call)
 * `backupCleanup(…, false, { error })`; then `backupHandleLogFile`; after all guests (or on abort)
 * `jobCleanup`. Under vzdump, `backupCleanup(…, false)` may come without `backupInit` and with
 * `vmtype` undefined (a guest that failed before its type was known): accept that.
 */
export interface BackupProviderV2 extends ProviderCommon {
  /** API version targeted: 2. */
  readonly apiVersion: 2;

  /** The job starts. Perl: `job_init($start_time)`. */
  jobInit(startTime: number): Awaitable<void>;
  /** The job is over, in success and failure. Perl: `job_cleanup`. */
  jobCleanup(): Awaitable<void>;
  /** A guest's backup starts; returns the archive name. Perl: `backup_init($vmid, $vmtype, $start_time)`. */
  backupInit(vmid: number, vmtype: GuestType, startTime: number): Awaitable<BackupInitResult>;
  /**
   * A guest's backup is over; `info.error` is set on failure. Returns statistics on success.
   * Perl: `backup_cleanup($vmid, $vmtype, $success, $info)`.
   */
  backupCleanup(vmid: number, vmtype: GuestType, success: boolean, info: { error?: string }): Awaitable<BackupCleanupResult | void>;
  /** `nbd` or `file-handle` for `qemu`, `directory` for `lxc`; `undefined` if unsupported. Perl: `backup_get_mechanism($vmid, $vmtype)`. */
  backupGetMechanism(vmid: number, vmtype: GuestType): Awaitable<BackupMechanism | undefined>;
  /** Handle the guest's task log (success and failure). Perl: `backup_handle_log_file($vmid, $filename)`. */
  backupHandleLogFile(vmid: number, filename: string): Awaitable<void>;
  /**
   * Which devices to back up incrementally (see {@link IncrementalRequest}); `undefined`: none.
   * Perl: `backup_vm_query_incremental($vmid, $volumes)`.
   */
  backupVmQueryIncremental(vmid: number, volumes: Record<string, VolumeSize>): Awaitable<Record<string, IncrementalRequest> | undefined>;
  /** Back up a VM: its config and its volumes, keyed by device name. Perl: `backup_vm($vmid, $guest_config, $volumes, $info)`. */
  backupVm(vmid: number, guestConfig: string, volumes: Record<string, BackupVmVolume>, info: BackupVmInfo): Awaitable<void>;
  /** Called (privileged) right before `backupContainer`. Perl: `backup_container_prepare($vmid, $info)`. */
  backupContainerPrepare(vmid: number, info: ContainerBackupInfo): Awaitable<void>;
  /**
   * Back up a container's tree (`info.directory`, `info.sources`) minus `excludePatterns`.
   * Perl: `backup_container($vmid, $guest_config, $exclude_patterns, $info)`.
   */
  backupContainer(vmid: number, guestConfig: string, excludePatterns: string[], info: ContainerBackupInfo): Awaitable<void>;

  /** Mechanism and guest type of an archive. Perl: `restore_get_mechanism($volname)`. */
  restoreGetMechanism(volname: string): Awaitable<RestoreMechanismInfo>;
  /** Raw guest configuration of an archive. Perl: `archive_get_guest_config($volname)`. */
  archiveGetGuestConfig(volname: string): Awaitable<string>;
  /** Raw firewall configuration, `undefined` when none. Perl: `archive_get_firewall_config($volname)`. */
  archiveGetFirewallConfig(volname: string): Awaitable<string | undefined>;
  /** Prepare a VM archive: its devices and sizes. Perl: `restore_vm_init($volname)`. */
  restoreVmInit(volname: string): Awaitable<Record<string, VolumeSize>>;
  /** Always called after `restoreVmInit` was called (also when anything after it failed). Perl: `restore_vm_cleanup($volname)`. */
  restoreVmCleanup(volname: string): Awaitable<void>;
  /** Prepare one volume: a path `qemu-img` reads as raw. Perl: `restore_vm_volume_init($volname, $device_name, $info)`. */
  restoreVmVolumeInit(volname: string, deviceName: string, info: Record<string, never>): Awaitable<RestoreVmVolumeInitResult>;
  /** Always called after `restoreVmVolumeInit` was called (also when it or the copy failed). Perl: `restore_vm_volume_cleanup($volname, $device_name, $info)`. */
  restoreVmVolumeCleanup(volname: string, deviceName: string, info: Record<string, never>): Awaitable<void>;
  /**
   * Package extension, not part of Proxmox VE's API (the Perl bridge never calls it): writes one
   * device of the backup straight into `target`, a local file or block device the runner
   * placed, so that a provider whose store it can read faster or check better than `qemu-img`
   * does (the directory provider: the native core, checking every layer against its content
   * digests as it copies, each stored byte read once) needs no `restoreVmVolumeInit`. Called
   * after `restoreVmInit`. Resolve `false`, before writing anything, to take the standard path
   * for this device (`restoreVmVolumeInit`, `qemu-img convert`, `restoreVmVolumeCleanup`); no
   * volume init or cleanup follows a device written this way. On failure the runner removes a
   * target it created.
   */
  restoreVmVolumeWrite?(volname: string, deviceName: string, target: RestoreVolumeTarget): Awaitable<boolean>;
  /**
   * Prepare a container archive: a tar path or a directory. Perl: `restore_container_init($volname,
   * $storeid, $info)`: pve-container (`src/PVE/LXC/Create.pm` `restore_external_archive`) passes the
   * storage id as well, though Base.pm documents `($volname, $info)`. A provider that does not need
   * `storeid` may declare fewer parameters.
   */
  restoreContainerInit(volname: string, storeid: string, info: Record<string, never>): Awaitable<RestoreContainerInitResult>;
  /**
   * Package extension, not called by Proxmox VE: extracts the container backup into
   * `target.rootdir` itself, with Proxmox's tar flags and id mapping (`lib/container/tar.ts`), so
   * that a provider whose store is not a tar file (the chunk provider: the stream straight from
   * its chunks) needs no `restoreContainerInit`. Called instead of `restoreContainerInit`, with no
   * cleanup after it; resolve `false`, before writing anything, to take the standard path.
   */
  restoreContainerWrite?(volname: string, target: RestoreContainerTarget): Awaitable<boolean>;
  /** Always called after `restoreContainerInit` was called (also when it or the extraction failed). Perl: `restore_container_cleanup($volname, $storeid, $info)`. */
  restoreContainerCleanup(volname: string, storeid: string, info: Record<string, never>): Awaitable<void>;
}

/** A provider of either generation. */
export type BackupProvider = BackupProviderV1 | BackupProviderV2;

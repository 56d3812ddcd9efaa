/**
 * `DirectoryProvider`: the reference backup provider. It keeps each backup in a folder of a
 * {@link DirectoryStore}: VM disks as qcow2 images written by the native core straight from the
 * NBD export (incremental images backed by the previous backup's), containers as a GNU tar archive
 * or a directory copy, the guest's configuration files, the task log, and a manifest written last.
 *
 * It is written in the Proxmox VE 8.4 shape ({@link BackupProviderV2}); `DirectoryProviderV1`
 * (`provider-v1.ts`) serves the seed's shape by delegating to it. Both are meant to be read and
 * copied: each method says what Proxmox expects of it and does only that.
 *
 * Storage configuration (`scfg`, as Proxmox's storage.cfg has it):
 * - `path` (required): the store's folder (created when missing or empty);
 * - `vm-backup-mode`: `incremental` (default; falls back to full when needed) or `full`;
 * - `lxc-backup-mode`: `tar` (default) or `directory`;
 * - `compression`: qcow2 cluster compression, `none` (default), `zstd` or `zlib`.
 *
 * Security: the store's folders are `0700` and its files `0600` (see {@link DirectoryStore}). A
 * `directory`-mode container backup keeps the container's tree as it is, with container ids: a
 * setuid file of the container's root is a setuid-root file on the host, which only those private
 * folders keep other users from running. Never open a store to other users.
 *
 * @packageDocumentation
 */
import { randomBytes } from 'node:crypto';
import { copyFile, readFile, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';

import { normaliseBandwidthLimit } from '../bandwidth.js';
import { copyExtents, type CopyProgress, type CopySummary } from '../nbd/copy.js';
import type {
  BackupCleanupResult,
  BackupInitResult,
  BackupMechanism,
  BackupVmInfo,
  BackupVmVolume,
  BitmapMode,
  ContainerBackupInfo,
  GuestType,
  IncrementalRequest,
  NbdBackupExtra,
  ProviderContext,
  ProviderStorage,
  RestoreContainerInitResult,
  RestoreVolumeTarget,
  RestoreMechanismInfo,
  RestoreVmVolumeInitResult,
  VolumeSize,
} from '../provider/api.js';
import { BackupProviderBase } from '../provider/base.js';
import { pruneAnswer, storedBackup } from '../provider/storage-side.js';
import type { FuseExport } from '../qemu/storage-daemon.js';
import { nbdUriFor } from '../provider/dirty-regions.js';
import { BitmapLedger } from '../provider/bitmap-ledger.js';
import { DirectoryStoreError } from './errors.js';
import { MANIFEST, MANIFEST_VERSION, PREVIOUS_INFO, backingFileOf, hashFile, hashTree, parseVolname, syncFiles, type Manifest, type ManifestDevice, type ManifestFile } from './layout.js';
import { DirectoryStore, type PreviousInfo } from './store.js';

/**
 * How long the job's own changes of a guest's backups (adding the task log, pruning) wait for a
 * delete or prune of them by another process (which may merge a large image) before they are
 * skipped: a job should not stall for long on housekeeping. Well below the 60 s the generated
 * storage plugin gives a storage call such as vzdump's prune (`$CALL_TIMEOUT`,
 * perl/templates/StoragePlugin.pm.in), whose end would fail the prune, and so the guest, anyway.
 */
const GUEST_LOCK_WAIT_MS = 30_000;

/** Progress of one disk's copy, for a progress bar. */
export interface DeviceProgress extends CopyProgress {
  vmid: number;
  device: string;
}

/** Options beyond the storage configuration. */
export interface DirectoryProviderOptions {
  /** The clock (tests): names backups and stamps them. Default `() => new Date()`. */
  now?: () => Date;
  /** Progress of each disk copy. */
  onProgress?: (progress: DeviceProgress) => void;
  /** Called after each disk copy with the native core's summary. */
  onDeviceDone?: (vmid: number, device: string, summary: CopySummary) => void;
  /** The host's state folder, where the {@link BitmapLedger} lives (default: see `defaultStateDir`). */
  stateDir?: string;
  /**
   * How long adding the task log and pruning wait while another process deletes or prunes the
   * same guest's backups, before they are skipped with a warning; default 30 000 ms.
   */
  guestLockWaitMs?: number;
}

/** What the provider knows about a guest's backup while it runs. */
interface GuestBackup {
  vmid: number;
  vmtype: GuestType;
  volname: string;
  dir: string;
  ctime: number;
  /** The last complete backup (incremental images build on it). */
  previous: PreviousInfo | undefined;
  /** The bitmap ledger names this backup: QEMU may be told success for it from now on. */
  claimedBitmap?: boolean;
  /** Seed generation: the bitmap chain id handed to QEMU. */
  bitmapId?: string;
  devices: Record<string, ManifestDevice>;
  mode?: 'tar' | 'directory';
  /**
   * Files already recorded and durable as they were written (disk images with their digest
   * files, the tar archive with the SHA-256 of its stream): the manifest takes them as they are,
   * without reading them again.
   */
  recorded: Record<string, ManifestFile>;
  /** The manifest, once written (the backup is complete). */
  manifest?: Manifest;
  /** The disk copy running now, if any (awaited before a partial backup is removed). */
  copying?: Promise<unknown>;
  /** A disk copy failed (so QEMU's backup access was torn down as failed). */
  copyFailed?: boolean;
}

type VmBackupMode = 'full' | 'incremental';
type LxcBackupMode = 'tar' | 'directory';

/** Every disk of the backup was copied: QEMU may be (or have been) told success for it. */
function dataCopied(g: GuestBackup): boolean {
  return Object.keys(g.devices).length > 0 && !g.copyFailed && !g.copying;
}

function option<T extends string>(scfg: Record<string, unknown>, key: string, allowed: readonly T[], dflt: T): T {
  const v = scfg[key];
  if (v === undefined) return dflt;
  if (typeof v !== 'string' || !allowed.includes(v as T)) {
    throw new DirectoryStoreError('ERR_PROVIDER_STATE', `storage option ${key} must be one of ${allowed.join(', ')}, got ${JSON.stringify(v)}`);
  }
  return v as T;
}

/**
 * Runs one file operation of a backup; a failure (a full disk, an I/O error) becomes an
 * `ERR_STORE_IO` naming the file, so the operator knows which storage filled up.
 */
async function storeIo<T>(g: GuestBackup, what: string, file: string, fn: (file: string) => Promise<T>): Promise<T> {
  try {
    return await fn(file);
  } catch (err) {
    if (err instanceof DirectoryStoreError) throw err;
    throw new DirectoryStoreError('ERR_STORE_IO', `${what} ${file} failed: ${(err as Error).message}`, { volname: g.volname, file, cause: err });
  }
}

/** The reference provider, Proxmox VE 8.4 shape. See the module documentation. */
export class DirectoryProvider extends BackupProviderBase {
  /** The store's folder. */
  readonly root: string;
  readonly vmBackupMode: VmBackupMode;
  readonly lxcBackupMode: LxcBackupMode;
  readonly compression: 'none' | 'zstd' | 'zlib';
  private readonly options: DirectoryProviderOptions;
  private store?: DirectoryStore;
  private readonly running = new Map<number, GuestBackup>();
  /** The FUSE exports of the VM volumes being restored, by `[volname, device]` as JSON. */
  private readonly restoreExports = new Map<string, FuseExport>();
  private readonly ledger: BitmapLedger;

  /**
   * The storage side: what Proxmox VE's storage plugin asks (`status`, `list_volumes`,
   * `get/update_volume_attribute`, `free_image`, `prune_backups`) and vzdump's notes, protected
   * flag and prune after a guest's data. In Proxmox VE these are storage-plugin class calls
   * (pve-manager `VZDump.pm` L1226-1243, docs/pve-bridge-notes.md 5): the bridge serves them from a
   * fresh provider in another process, without `jobInit`, while a job may be writing to the same
   * store. So every hook works on what is on disk only, never on this object's running backups:
   * a backup is complete when its manifest is (written at the end of `backupVm` /
   * `backupContainer`, before vzdump runs these hooks); one being written (its `.lock` names a
   * live process) is neither listed, nor pruned, nor removable, and neither is the backup it
   * builds on removable while it runs (see {@link DirectoryStore.pruneBackups}).
   *
   * Listing: complete backups, and those that are complete but cannot be restored (`broken`: a
   * backup of their chain is gone or damaged; `corrupt`: their manifest does not match), so that
   * an operator sees what takes space and can delete it; restoring one of those is refused with
   * `ERR_CHAIN_BROKEN` / `ERR_BACKUP_CORRUPT` before any target is written. Backups in progress and
   * leftovers of interrupted runs (no manifest) are not listed (prune and the next backup of the
   * guest remove the leftovers).
   */
  readonly storage: ProviderStorage = {
    status: async () => (await this.openStore()).status(),
    listBackups: async (filter = {}) => {
      const list = await (await this.openStore()).listBackups(filter.vmid);
      return list
        .filter((b) => b.status === 'ok' || b.status === 'broken' || b.status === 'corrupt')
        .map(storedBackup);
    },
    getNotes: async (volname) => (await (await this.openStore()).listedAttributes(volname)).notes,
    getProtected: async (volname) => (await (await this.openStore()).listedAttributes(volname)).protected,
    setNotes: async (volname, notes) => (await this.openStore()).setNotes(volname, notes),
    setProtected: async (volname, value) => (await this.openStore()).setProtected(volname, value),
    removeBackup: async (volname) => {
      const { merged } = await (await this.openStore()).deleteBackup(volname);
      if (merged) this.log.info(`merged ${volname} into ${merged}, which builds on it`);
    },
    prune: async ({ vmid, vmtype, keep, dryRun }) => {
      const store = await this.openStore();
      try {
        return pruneAnswer(await store.pruneBackups({ vmid, vmtype, keep, ...(dryRun ? { dryRun } : {}), waitMs: this.options.guestLockWaitMs ?? GUEST_LOCK_WAIT_MS }), dryRun);
      } catch (err) {
        if (!(err instanceof DirectoryStoreError && err.code === 'ERR_STORE_BUSY')) throw err;
        // vzdump prunes after each guest's backup, before backup_cleanup(..., 1), and fails the
        // guest when the prune dies: its complete new backup would be removed over housekeeping
        // (pve-manager PVE/VZDump.pm, exec_backup_task). Skipped, nothing is lost: the next
        // prune removes what this one would have.
        this.log.warn(`prune skipped: ${err.message}`);
        return pruneAnswer([], dryRun);
      }
    },
  };

  /**
   * @param context - Storage id, configuration (`scfg.path` and the options above) and log.
   * @param options - Clock and progress callbacks.
   */
  constructor(context: ProviderContext, options: DirectoryProviderOptions = {}) {
    super(context);
    if (typeof this.scfg.path !== 'string' || this.scfg.path === '') {
      throw new DirectoryStoreError('ERR_NOT_A_STORE', 'the directory provider needs the store folder as storage option path');
    }
    this.root = path.resolve(this.scfg.path);
    this.vmBackupMode = option(this.scfg, 'vm-backup-mode', ['full', 'incremental'] as const, 'incremental');
    this.lxcBackupMode = option(this.scfg, 'lxc-backup-mode', ['tar', 'directory'] as const, 'tar');
    this.compression = option(this.scfg, 'compression', ['none', 'zstd', 'zlib'] as const, 'none');
    this.options = options;
    this.ledger = new BitmapLedger(this.storeid, options.stateDir);
  }

  override providerName(): string {
    return 'directory';
  }

  /** The store (created on first use when the folder is missing or empty). */
  async openStore(): Promise<DirectoryStore> {
    this.store ??= await DirectoryStore.create(this.root, { storeid: this.storeid });
    return this.store;
  }

  private guest(vmid: number): GuestBackup {
    const g = this.running.get(vmid);
    if (!g) throw new DirectoryStoreError('ERR_PROVIDER_STATE', `no backup of guest ${vmid} is running`);
    return g;
  }

  // ----- job ----------------------------------------------------------------------------------

  /** The job starts: open (or create) the store, so a wrong path fails before any guest. */
  override async jobInit(_startTime: number): Promise<void> {
    await this.openStore();
  }

  /**
   * The job is over: a guest backup still open here without its manifest failed without cleanup;
   * remove it (after all its disks were copied, QEMU may have been told success: the next backup
   * is full then). A complete one stays: it is a sound backup.
   */
  override async jobCleanup(): Promise<void> {
    for (const g of [...this.running.values()]) if (!g.manifest) await this.discard(g, { forgetPrevious: dataCopied(g) });
    this.running.clear();
  }

  // ----- backup -------------------------------------------------------------------------------

  /**
   * Creates the backup's folder. The archive name is `<vmid>/<vmtype>-<backup-id>`: vzdump makes the
   * volume name `backup/<archive-name>` of it, which is this store's volume name.
   */
  override async backupInit(vmid: number, vmtype: GuestType, _startTime: number): Promise<BackupInitResult> {
    const store = await this.openStore();
    for (const v of await store.removeIncomplete(vmid)) this.log.info(`removed ${v}, left incomplete by an interrupted run`);
    const now = this.options.now?.() ?? new Date();
    const { volname, dir } = await store.createBackupDir(vmid, vmtype, now);
    const previous = vmtype === 'qemu' && this.vmBackupMode === 'incremental' ? await this.trustedPrevious(store, vmid) : undefined;
    this.running.set(vmid, { vmid, vmtype, volname, dir, ctime: Math.floor(now.getTime() / 1000), previous, devices: {}, recorded: {} });
    this.log.info(`backup folder ${dir}${previous ? `, previous backup ${previous.volname}` : ''}`);
    return { archiveName: volname.slice('backup/'.length) };
  }

  /**
   * The previous backup, if QEMU's bitmap still counts the writes since it: the bitmap ledger must
   * name it as the last backup that may have told QEMU success. Otherwise another store cleared
   * the bitmap, or a run died after telling QEMU success and before recording its backup: the
   * next backup is full.
   */
  private async trustedPrevious(store: DirectoryStore, vmid: number): Promise<PreviousInfo | undefined> {
    const previous = await store.readPreviousInfo(vmid);
    if (!previous) return undefined;
    const owner = await this.ledger.read(vmid);
    if (owner?.store === this.root && owner.volname === previous.volname) return previous;
    const who = !owner ? 'no record of it' : owner.store !== this.root ? `last used by the store at ${owner.store}` : `last used by backup ${owner.volname}, which was not recorded`;
    this.log.warn(`QEMU's bitmap for storage ${this.storeid} may not match ${previous.volname} (${who}): full backup`);
    return undefined;
  }

  /**
   * Records, before the first disk is read, that this backup may tell QEMU success (see
   * {@link BitmapLedger}); durable before QEMU's teardown, so no crash can leave the record behind.
   */
  private async claimBitmap(g: GuestBackup): Promise<void> {
    if (g.claimedBitmap) return;
    await this.ledger.write(g.vmid, { store: this.root, volname: g.volname });
    g.claimedBitmap = true;
  }

  /** `nbd` for VMs (the native core reads the export), `directory` for containers. */
  override backupGetMechanism(_vmid: number, vmtype: GuestType): Promise<BackupMechanism | undefined> {
    return Promise.resolve(vmtype === 'qemu' ? 'nbd' : vmtype === 'lxc' ? 'directory' : undefined);
  }

  /**
   * Incremental where it can be: `use` the bitmap for each disk the previous backup has (QEMU
   * still answers `new` when its bitmap is gone or invalid: then a full image is written), `new`
   * for the others. Nothing in mode `full`.
   */
  override async backupVmQueryIncremental(vmid: number, volumes: Record<string, VolumeSize>): Promise<Record<string, IncrementalRequest> | undefined> {
    if (this.vmBackupMode === 'full') return undefined;
    const previous = this.guest(vmid).previous;
    const out: Record<string, IncrementalRequest> = {};
    for (const device of Object.keys(volumes)) out[device] = previous?.devices.includes(device) ? 'use' : 'new';
    return out;
  }

  /**
   * Stores the configuration files and each disk as a qcow2 image, then completes the backup
   * (manifest): when this returns, the backup is complete on disk for every process, before
   * vzdump's notes, protected flag and prune (storage-plugin calls made from other processes) and
   * before `backup_cleanup`. qemu-server tears the backup access down as successful exactly when
   * `backup_vm` returned (`VZDump/QemuServer.pm` `archive_external` / `cleanup`,
   * docs/pve-bridge-notes.md 3.4), so the backup is recorded before QEMU clears its bitmap.
   */
  override async backupVm(vmid: number, guestConfig: string, volumes: Record<string, BackupVmVolume>, info: BackupVmInfo): Promise<void> {
    const g = this.guest(vmid);
    await this.saveConfigs(g, guestConfig, info.firewallConfig);
    if (info.mechanism !== 'nbd') throw new DirectoryStoreError('ERR_PROVIDER_STATE', `mechanism ${info.mechanism} is not used by the directory provider`);
    for (const [device, v] of Object.entries(volumes)) {
      await this.backupDisk(g, device, { ...v, nbdUri: v.nbdUri ?? nbdUriFor(device, v.nbdPath!) }, normaliseBandwidthLimit(info.bandwidthLimit, 'bandwidthLimit'), info.signal);
    }
    await this.complete(g);
  }

  /**
   * One disk: a full image (bitmap mode `none` / `new`), or an image holding only the dirty
   * clusters and backed by the previous backup's image (mode `reuse`). The native core writes
   * `<device>.qcow2.part` and renames it when complete, and discards what it read on the export.
   */
  protected async backupDisk(
    g: GuestBackup,
    device: string,
    v: { size: number; bitmapMode: BitmapMode; bitmapName?: string | undefined; nbdUri: string },
    bandwidthLimit: number | undefined,
    signal: AbortSignal | undefined,
  ): Promise<void> {
    const file = `${device}.qcow2`;
    const incremental = v.bitmapMode === 'reuse';
    if (incremental && !g.previous?.devices.includes(device)) {
      // QEMU tracked changes since a backup this store no longer has a base for: cannot go incremental.
      throw new DirectoryStoreError('ERR_CHAIN_BROKEN', `disk ${device}: QEMU offers an incremental backup but the previous backup has no image of it; run a full backup (vm-backup-mode full once)`);
    }
    const base = incremental ? g.previous!.volname : undefined;
    await this.claimBitmap(g);
    this.log.info(`${device}: ${incremental ? `incremental over ${base}` : 'full'} backup to ${file}`);
    const copy = copyExtents({
      uri: v.nbdUri,
      target: 'qcow2',
      path: path.join(g.dir, file),
      discard: true, // the snapshot-access export backup access set up: frees fleecing space
      ...(v.bitmapName ? { bitmap: v.bitmapName } : {}),
      ...(base ? { backingFile: backingFileOf(base, file), backingFormat: 'qcow2' as const } : {}),
      compression: this.compression,
      digests: true, // content digests recorded as the image is written (manifest version 2)
      ...(bandwidthLimit !== undefined ? { bandwidthLimit } : {}),
      ...(this.options.onProgress ? { onProgress: (p: CopyProgress) => this.options.onProgress!({ ...p, vmid: g.vmid, device }) } : {}),
      ...(signal ? { signal } : {}),
    });
    g.copying = copy;
    const summary = await copy.catch((err: unknown) => {
      g.copyFailed = true;
      throw err;
    });
    g.copying = undefined;
    this.log.info(`${device}: read ${summary.bytesRead} bytes (${summary.bytesZero} zero, ${summary.bytesSkipped} unchanged) in ${summary.seconds.toFixed(2)} s`);
    g.devices[device] = { file, size: v.size, bitmapMode: v.bitmapMode, ...(base ? { base } : {}), bytesRead: summary.bytesRead };
    if (!summary.digests) throw new DirectoryStoreError('ERR_PROVIDER_STATE', `disk ${device}: the native core recorded no content digests`);
    const digestsName = path.basename(summary.digests.file);
    g.recorded[file] = { size: (await stat(path.join(g.dir, file))).size, digests: digestsName };
    g.recorded[digestsName] = { size: (await stat(summary.digests.file)).size, sha256: summary.digests.sha256 };
    this.options.onDeviceDone?.(g.vmid, device, summary);
  }

  /** Stores the configuration files and the tree: `root.tar` (mode `tar`) or `root/` (mode `directory`). */
  override async backupContainer(vmid: number, guestConfig: string | undefined, excludePatterns: string[], info: ContainerBackupInfo): Promise<void> {
    const g = this.guest(vmid);
    if (guestConfig !== undefined) await this.saveConfigs(g, guestConfig, info.firewallConfig);
    g.mode = this.lxcBackupMode;
    const common = {
      idMap: info.idMap,
      excludePaths: excludePatterns,
      sources: info.sources,
      bandwidthLimit: normaliseBandwidthLimit(info.bandwidthLimit, 'bandwidthLimit'),
      ...(info.signal ? { signal: info.signal } : {}),
    };
    if (g.mode === 'tar') {
      const archive = path.join(g.dir, 'root.tar');
      const { createTarArchive } = await import('../container/tar.js');
      const { bytes, sha256 } = await createTarArchive({ source: info.directory, archive, ...common });
      await storeIo(g, 'flushing', archive, (f) => syncFiles(path.dirname(f), [path.basename(f)]));
      g.recorded['root.tar'] = { size: bytes, sha256 };
    } else {
      const { backupDirectoryTree } = await import('../container/directory.js');
      await backupDirectoryTree({ source: info.directory, target: path.join(g.dir, 'root'), ...common });
    }
    // complete on disk before vzdump's storage calls (other processes), as for VMs
    await this.complete(g);
  }

  /**
   * Completes the running backup of a guest whose data is all written, if not done yet (the seed
   * generation's face, whose API has no end of a VM's data: `backupNbd` comes per disk).
   * @returns The manifest.
   */
  async completeBackup(vmid: number): Promise<Manifest> {
    const g = this.guest(vmid);
    if (g.copying || g.copyFailed) throw new DirectoryStoreError('ERR_PROVIDER_STATE', `the backup of guest ${vmid} has no complete data to record`, { volname: g.volname });
    return g.manifest ?? (await this.complete(g));
  }

  /**
   * Success: the backup was completed by `backupVm` / `backupContainer`; only its size is reported.
   *
   * Failure: the backup is removed, also when it was complete already (vzdump failed the guest
   * afterwards: protected flag or prune failing, `backup_cleanup(..., 1)` dying; it is never listed
   * after this returns). The rule that keeps incremental chains right: QEMU is told success when
   * `backup_vm` returned (qemu-server tears down after `backup_cleanup`, with `success` = "backup_vm
   * returned", docs/pve-bridge-notes.md 3.4 / 7.8), whatever fails after it. So
   * - once every disk was copied (and certainly once the backup was complete), QEMU's bitmap may
   *   count writes since this backup only: the previous-info is forgotten and the next backup is
   *   full. The bitmap ledger keeps naming this (removed) backup, so even a crash before the
   *   previous-info is forgotten leaves nothing an incremental could build on wrongly;
   * - a copy failed or never ran: `backup_vm` died, QEMU keeps its bitmap relative to the previous
   *   backup; the ledger names the previous backup again and the next run can go incremental.
   */
  override async backupCleanup(vmid: number, _vmtype: GuestType, success: boolean, info: { error?: string }): Promise<BackupCleanupResult | void> {
    const g = this.running.get(vmid);
    if (!g) {
      // vzdump calls this after a failure even when backup_init never ran or failed (vmtype may
      // be undef then; pve-manager PVE/VZDump.pm): there is nothing of ours to clean up.
      if (success) throw new DirectoryStoreError('ERR_PROVIDER_STATE', `no backup of guest ${vmid} is running`);
      return;
    }
    if (!success) {
      this.log.warn(`removing the ${g.manifest ? 'failed' : 'incomplete'} backup ${g.volname}${info.error ? ` (${info.error})` : ''}`);
      await this.discard(g, { forgetPrevious: g.manifest !== undefined || dataCopied(g) });
      return;
    }
    if (!g.manifest) throw new DirectoryStoreError('ERR_PROVIDER_STATE', `the backup ${g.volname} of guest ${vmid} is not complete: its data call did not succeed`, { volname: g.volname });
    return { stats: { archiveSize: Object.values(g.manifest.files).reduce((n, f) => n + f.size, 0) } };
  }

  /**
   * Keeps the task log as `backup.log` (its checksum is added to the manifest), then forgets the
   * guest. The manifest is read back from disk, not taken from memory: between the data call and
   * now, other processes may have changed the backup (a merge when the backup it builds on was
   * deleted rewrites its manifest) or removed it (then there is nothing to add the log to); and a
   * delete or prune running now is waited for (see {@link DirectoryProviderOptions.guestLockWaitMs}).
   */
  override async backupHandleLogFile(vmid: number, filename: string): Promise<void> {
    const g = this.running.get(vmid);
    this.running.delete(vmid);
    if (!g?.manifest) return;
    const store = await this.openStore();
    const log = path.join(g.dir, 'backup.log');
    try {
      await store.amendManifest(
        g.volname,
        async (m) => {
          await storeIo(g, 'writing', log, (f) => copyFile(filename, f));
          return { ...m, files: { ...m.files, 'backup.log': await hashFile(log) } };
        },
        { waitMs: this.options.guestLockWaitMs ?? GUEST_LOCK_WAIT_MS },
      );
    } catch (err) {
      // the backup itself is complete and stays as it is: only its task log is missing
      if (err instanceof DirectoryStoreError && err.code === 'ERR_UNKNOWN_VOLUME') this.log.warn(`backup ${g.volname} was removed before its task log could be added`);
      else if (err instanceof DirectoryStoreError && err.code === 'ERR_STORE_BUSY') this.log.warn(`the task log was not added to backup ${g.volname}: ${err.message}`);
      else throw err;
    }
  }

  private async saveConfigs(g: GuestBackup, config: string, firewall: string | undefined): Promise<void> {
    await storeIo(g, 'writing', path.join(g.dir, 'guest.conf'), (f) => writeFile(f, config));
    if (firewall !== undefined) await storeIo(g, 'writing', path.join(g.dir, 'firewall.conf'), (f) => writeFile(f, firewall));
  }

  /**
   * Writes the manifest of a finished backup and the bookkeeping for the next one. On a failure
   * the manifest, if written, is taken back (the backup must not be listed as complete while the
   * data call fails); `backupCleanup(false)` then removes the rest.
   */
  private async complete(g: GuestBackup): Promise<Manifest> {
    try {
      return await this.record(g);
    } catch (err) {
      await rm(path.join(g.dir, MANIFEST), { force: true }).catch(() => undefined);
      throw err;
    }
  }

  private async record(g: GuestBackup): Promise<Manifest> {
    const store = await this.openStore();
    // what the core and the tar stream wrote is durable and recorded already; only the
    // configuration files (small) are synced and hashed here
    const files: Manifest['files'] = { ...g.recorded };
    const configs: string[] = [];
    for (const n of ['guest.conf', 'firewall.conf']) if (await stat(path.join(g.dir, n)).then((s) => s.isFile(), () => false)) configs.push(n);
    if (configs.length > 0) await storeIo(g, 'flushing', g.dir, (d) => syncFiles(d, configs));
    for (const n of configs) files[n] = await storeIo(g, 'reading', path.join(g.dir, n), hashFile);
    if (g.mode === 'directory') files['root'] = await storeIo(g, 'reading', path.join(g.dir, 'root'), hashTree);
    const parent = Object.values(g.devices).find((d) => d.base)?.base;
    const manifest = await storeIo(g, 'writing', path.join(g.dir, MANIFEST), () => store.commitManifest({
      format: 'pve-backup-provider/directory',
      version: MANIFEST_VERSION,
      volname: g.volname,
      vmid: g.vmid,
      vmtype: g.vmtype,
      ctime: g.ctime,
      status: 'ok',
      mode: g.vmtype === 'lxc' ? (g.mode ?? 'tar') : parent ? 'incremental' : 'full',
      ...(parent ? { parent } : {}),
      ...(g.bitmapId ? { bitmapId: g.bitmapId } : {}),
      ...(g.vmtype === 'qemu' ? { devices: g.devices } : {}),
      files,
    }));
    if (g.vmtype === 'qemu') {
      const info = { volname: g.volname, devices: Object.keys(g.devices), ...(g.bitmapId ? { bitmapId: g.bitmapId } : {}) };
      await storeIo(g, 'writing', path.join(store.root, String(g.vmid), PREVIOUS_INFO), () => store.writePreviousInfo(g.vmid, info));
    }
    this.log.info(`backup ${g.volname} complete (${MANIFEST} written)`);
    g.manifest = manifest;
    return manifest;
  }

  /**
   * Removes a partial or failed backup (after its running copy settled). `forgetPrevious`: QEMU may
   * have been told success, so the next backup is full (the ledger keeps naming this backup). Else
   * QEMU was told failure and kept its bitmap: the ledger names the previous backup again.
   * Bookkeeping first, then the manifest (from then on nobody lists it as complete), files last:
   * a crash in between leaves only an incomplete folder, which prune and the next backup remove.
   */
  private async discard(g: GuestBackup, o: { forgetPrevious?: boolean } = {}): Promise<void> {
    this.running.delete(g.vmid);
    await g.copying?.catch(() => undefined);
    if (g.vmtype === 'qemu') {
      if (o.forgetPrevious) await (await this.openStore()).forgetPreviousInfo(g.vmid);
      else if (g.claimedBitmap && g.previous) await this.ledger.write(g.vmid, { store: this.root, volname: g.previous.volname });
    }
    await rm(path.join(g.dir, MANIFEST), { force: true });
    await rm(g.dir, { recursive: true, force: true });
  }

  /** Size of the running backup's files so far (seed generation's `backupGetTaskSize`). */
  async runningSize(vmid: number): Promise<number> {
    const g = this.guest(vmid);
    let n = 0;
    for (const d of Object.values(g.devices)) n += (await stat(path.join(g.dir, d.file))).size;
    return n;
  }

  // ----- restore ------------------------------------------------------------------------------

  /** `qemu-img` for VMs; `tar` or `directory` for containers, as the backup was made. */
  override async restoreGetMechanism(volname: string): Promise<RestoreMechanismInfo> {
    const m = await (await this.openStore()).readManifest(volname);
    if (m.vmtype === 'qemu') return { mechanism: 'qemu-img', vmtype: 'qemu' };
    return { mechanism: m.mode === 'directory' ? 'directory' : 'tar', vmtype: 'lxc' };
  }

  override async archiveGetGuestConfig(volname: string): Promise<string> {
    const store = await this.openStore();
    await store.assertRestorable(volname, 'configs');
    return readFile(path.join(store.backupDir(volname), 'guest.conf'), 'utf8');
  }

  override async archiveGetFirewallConfig(volname: string): Promise<string | undefined> {
    const store = await this.openStore();
    const m = await store.readManifest(volname);
    if (!m.files['firewall.conf']) return undefined;
    return readFile(path.join(store.backupDir(volname), 'firewall.conf'), 'utf8');
  }

  /**
   * The disks and their sizes, after checking what the restore reads: the chain is present, each
   * manifest and digest file is sound, and each image recorded by its SHA-256 (manifest version 1)
   * matches it. A corrupted backup is refused here, before any target is written. Images recorded
   * by content digests are checked as they are read instead: by the native restore as it copies
   * ({@link restoreVmVolumeWrite}), or in {@link restoreVmVolumeInit} before qemu-img reads them.
   */
  override async restoreVmInit(volname: string): Promise<Record<string, VolumeSize>> {
    const m = await (await this.openStore()).assertRestorable(volname, 'vm', { digestImages: false });
    const out: Record<string, VolumeSize> = {};
    for (const [device, d] of Object.entries(m.devices ?? {})) out[device] = { size: d.size };
    return out;
  }

  /**
   * The image as a raw regular file: qemu-storage-daemon's FUSE export of the qcow2 chain. qemu-server
   * checks the path with `file_size_info($path, undef, 'raw', 1)` before `qemu-img convert -f raw`
   * (qemu-server `src/PVE/QemuServer.pm` `restore_external_archive`; docs/pve-bridge-notes.md 4.1):
   * it must `stat()` as a file and show no backing file, so neither a `json:` filename nor an NBD
   * URI passes. The export lives until `restoreVmVolumeCleanup`, or `restoreVmCleanup` (qemu-server
   * skips the volume cleanup when this method or its check dies), or the end of this process.
   */
  override async restoreVmVolumeInit(volname: string, deviceName: string, _info: Record<string, never>): Promise<RestoreVmVolumeInitResult> {
    const store = await this.openStore();
    const d = (await store.readManifest(volname)).devices?.[deviceName];
    if (!d) throw new DirectoryStoreError('ERR_UNKNOWN_VOLUME', `backup ${store.volid(volname)} has no disk ${deviceName}`, { volname });
    // qemu-img checks nothing it reads: the images are checked against their digests first
    await store.assertDeviceImages(volname, deviceName);
    const key = JSON.stringify([volname, deviceName]);
    // a second init of the same volume replaces the first export rather than leaking it
    await this.restoreExports.get(key)?.stop();
    this.restoreExports.delete(key);
    const { startFuseExport } = await import('../qemu/storage-daemon.js');
    const fuse = await startFuseExport(path.join(store.backupDir(volname), d.file), 'qcow2');
    this.restoreExports.set(key, fuse);
    return { qemuImgPath: fuse.path };
  }

  /**
   * Package extension ({@link BackupProviderV2.restoreVmVolumeWrite}): writes a disk straight
   * from its stored chain through the native core ({@link restoreChain}), which checks every layer
   * against its content digests as it reads it: each stored byte is read once, and a corruption
   * fails with `ERR_BACKUP_CORRUPT` naming the image and the byte range. `false` for a backup
   * recorded before content digests (manifest version 1), which takes the qemu-img path.
   */
  async restoreVmVolumeWrite(volname: string, deviceName: string, target: RestoreVolumeTarget): Promise<boolean> {
    const layers = await (await this.openStore()).imageChain(volname, deviceName);
    if (!layers) return false;
    this.log.info(`${deviceName}: ${layers.length} stored image(s), checked against their digests as they are copied`);
    const { restoreChain } = await import('./restore-chain.js');
    await restoreChain({
      layers,
      target: target.path,
      zeroed: target.zeroed,
      ...(target.bandwidthLimit ? { bandwidthLimit: target.bandwidthLimit } : {}),
      ...(target.onProgress ? { onProgress: target.onProgress } : {}),
      ...(target.signal ? { signal: target.signal } : {}),
    });
    return true;
  }

  /** Unmounts the volume's export and ends its daemon. */
  override async restoreVmVolumeCleanup(volname: string, deviceName: string, _info: Record<string, never>): Promise<void> {
    const key = JSON.stringify([volname, deviceName]);
    const fuse = this.restoreExports.get(key);
    this.restoreExports.delete(key);
    await fuse?.stop();
  }

  /** Unmounts what `restoreVmVolumeCleanup` did not (qemu-server skips it when a volume's init or check fails). */
  override async restoreVmCleanup(volname: string): Promise<void> {
    for (const [key, fuse] of [...this.restoreExports]) {
      if ((JSON.parse(key) as string[])[0] !== volname) continue;
      this.restoreExports.delete(key);
      await fuse.stop();
    }
  }

  /** The tar archive or the directory copy, after checking its checksum. */
  override async restoreContainerInit(volname: string, _storeid: string, _info: Record<string, never>): Promise<RestoreContainerInitResult> {
    const store = await this.openStore();
    const m = await store.assertRestorable(volname, 'container');
    const dir = store.backupDir(volname);
    return m.mode === 'directory' ? { archiveDirectory: path.join(dir, 'root') } : { tarPath: path.join(dir, 'root.tar') };
  }

  // ----- for the seed-generation face ----------------------------------------------------------

  /**
   * Seed generation: the bitmap id to hand QEMU. The previous backup's chain id while its chain
   * can be continued; a new id otherwise, which makes QEMU start a new bitmap (a full backup).
   * `undefined` in mode `full`.
   */
  bitmapIdFor(vmid: number): string | undefined {
    const g = this.guest(vmid);
    if (g.vmtype !== 'qemu' || this.vmBackupMode === 'full') return undefined;
    // a new chain gets an id of its own: two stores starting a chain in the same second must not share a bitmap
    g.bitmapId = g.previous?.bitmapId ?? `dir-${parseVolname(g.volname).backupId}-${randomBytes(4).toString('hex')}`;
    return g.bitmapId;
  }

  /** Seed generation: stores a configuration file handed over as a file. */
  async saveConfigFile(vmid: number, which: 'guest.conf' | 'firewall.conf', filename: string): Promise<void> {
    await copyFile(filename, path.join(this.guest(vmid).dir, which));
  }

  /** Seed generation: one disk, from `backupNbd`'s arguments. */
  async backupNbdDevice(vmid: number, device: string, nbdPath: string, bitmapMode: BitmapMode, bitmapName: string | undefined, bandwidthLimit: number, extra: NbdBackupExtra): Promise<void> {
    await this.backupDisk(this.guest(vmid), device, { size: extra.size, bitmapMode, bitmapName, nbdUri: extra.nbdUri ?? nbdUriFor(device, nbdPath) }, normaliseBandwidthLimit(bandwidthLimit, 'bandwidthLimit'), extra.signal);
  }

  /** Whether a backup of the guest is running in this object (from `backupInit` to its log file or removal). */
  isRunning(vmid: number): boolean {
    return this.running.has(vmid);
  }

  /** The guest type of a running backup. */
  guestType(vmid: number): GuestType {
    return this.guest(vmid).vmtype;
  }
}

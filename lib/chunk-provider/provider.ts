/**
 * `ChunkProvider`: the second reference provider. It keeps each backup in a {@link ChunkStore}
 * on S3-compatible object storage: VM disks as fixed 4 MiB content-addressed chunks (shared by
 * every backup and guest that has them) and one index per disk, written by the native core
 * straight from the NBD export; the guest's configuration files and the task log as blobs; and
 * a manifest written last (docs/chunk-store.md).
 *
 * Incremental backups form no chains: a backup's index names every chunk of the disk, the
 * unchanged ones taken from the previous backup's index without reading them. That is right only
 * when QEMU's dirty bitmap counts the writes since exactly that backup, which the host's
 * {@link BitmapLedger} records (as for the directory provider): the previous backup is the one
 * the ledger names for this store, if its manifest is still there.
 *
 * Storage configuration (`scfg`, as Proxmox's storage.cfg has it), unless the store is handed
 * over opened ({@link ChunkProviderOptions.store}):
 * - `store` (required): `s3://bucket/prefix`;
 * - `endpoint`, `region`, `path-style` (default true), `ca-file`, `allow-http`;
 * - `fingerprint`: trust exactly the endpoint's certificate with this SHA-256 (`AB:CD:…`, as
 *   for a Proxmox Backup Server), instead of CAs;
 * - `credentials-file` (AWS shared format), else the environment's `AWS_ACCESS_KEY_ID` and
 *   `AWS_SECRET_ACCESS_KEY`;
 * - `key-file`: the store's key (an encrypted store; a store created with a key is encrypted);
 * - `vm-backup-mode`: `incremental` (default) or `full`.
 *
 * Containers: the tree as a GNU tar stream (the directory provider's tar command and id mapping,
 * `lib/container/tar.ts`) that the core reads from a pipe and cuts into content-defined chunks
 * (FastCDC, about 4 MiB), so an unchanged file keeps its chunks and a second backup uploads only
 * what changed; one `.didx` index per backup. Restored through `restoreContainerInit` as a tar
 * file (Proxmox VE's path: a regular `.tar` read twice) or, in this package's runner, straight from
 * the chunks into tar's stdin (`restoreContainerWrite`).
 *
 * VM disks restore through `restoreVmVolumeWrite` (this package's runner) or, on Proxmox VE's
 * path, through `restoreVmVolumeInit`: a local raw file over the native NBD server that serves the
 * chunks.
 *
 * The task log: `backupHandleLogFile` stores it as `backup.log.blob` after the backup is
 * complete and rewrites the manifest with it (docs/chunk-store.md: "the log after it, then the
 * manifest again"), so the log is covered by the manifest's checksum like every other object.
 *
 * @packageDocumentation
 */
import { closeSync, openSync } from 'node:fs';
import { mkdtemp, readFile, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { normaliseBandwidthLimit } from '../bandwidth.js';
import type {
  BackupCleanupResult,
  BackupInitResult,
  BackupMechanism,
  BackupVmInfo,
  BackupVmVolume,
  ContainerBackupInfo,
  GuestType,
  IncrementalRequest,
  ProviderContext,
  ProviderStorage,
  RestoreContainerInitResult,
  RestoreContainerTarget,
  RestoreMechanismInfo,
  RestoreVmVolumeInitResult,
  RestoreVolumeTarget,
  VolumeSize,
} from '../provider/api.js';
import { BackupProviderBase } from '../provider/base.js';
import { pruneAnswer, storedBackup } from '../provider/storage-side.js';
import { BitmapLedger } from '../provider/bitmap-ledger.js';
import { nbdUriFor } from '../provider/dirty-regions.js';
import { MechanismError } from '../provider/errors.js';
import { nameTagOwnerIsDead, ownerNameTag } from '../owner.js';
import type { FuseExport } from '../qemu/storage-daemon.js';
import { ChunkBackupError } from './errors.js';
import { extractTarStream, writeTarStream } from '../container/tar.js';
import { createPipe, nativeChunkJobs, type ChunkJobs, type ChunkStreamSummary } from './jobs.js';
import type { ChunkNbdServer } from './nbd-server.js';
import { s3StoreOptions } from './s3.js';
import { CHUNK_STORE_FORMAT, CHUNK_STORE_VERSION, ChunkStore, type BackupWriter, type ChunkManifest, type ChunkManifestArchive, type ChunkManifestDevice, type ChunkManifestFile } from './store.js';

/** Progress of one disk's backup. */
export interface ChunkDeviceProgress {
  vmid: number;
  device: string;
  done: number;
  total: number;
  bytesPerSecond: number;
}

/** Options beyond the storage configuration. */
export interface ChunkProviderOptions {
  /** The store, opened (the command line, tests); otherwise opened from `scfg`. */
  store?: ChunkStore;
  /** The data paths (default: the native core's). */
  jobs?: ChunkJobs;
  /** The clock: names backups and stamps them. */
  now?: () => Date;
  onProgress?: (p: ChunkDeviceProgress) => void;
  /** The host's state folder, where the {@link BitmapLedger} lives. */
  stateDir?: string;
}

/** What the provider knows about a guest's backup while it runs. */
interface GuestBackup {
  vmid: number;
  vmtype: GuestType;
  volname: string;
  /** The writer record (`writers/<id>.json`) for garbage collection and deletion. */
  writer: BackupWriter;
  ctime: number;
  /**
   * VMs: the backup QEMU's bitmap counts writes since, with its manifest (incremental only).
   * Containers: the guest's newest backup, whose chunks are taken as stored (deduplication).
   */
  previous: ChunkManifest | undefined;
  claimedBitmap?: boolean;
  devices: Record<string, ChunkManifestDevice>;
  /** A container's tar stream, once stored. */
  archive?: ChunkManifestArchive;
  files: Record<string, ChunkManifestFile>;
  /** A disk's backup is running now. */
  copying?: boolean;
  copyFailed?: boolean;
  manifest?: ChunkManifest;
}

/** Start of the name of the private folder a container restore for Proxmox VE writes its tar into (see {@link ChunkProvider.restoreContainerInit}). */
const CT_RESTORE_PREFIX = 'pbp-ct-restore-';

/** Every disk was read: QEMU may be (or have been) told success for this backup. */
function dataCopied(g: GuestBackup): boolean {
  return Object.keys(g.devices).length > 0 && !g.copyFailed && !g.copying;
}

const str = (scfg: Record<string, unknown>, key: string): string | undefined => {
  const v = scfg[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'string' || v === '') throw new ChunkBackupError('ERR_PROVIDER_STATE', `storage option ${key} must be a non-empty string`);
  return v;
};
const bool = (scfg: Record<string, unknown>, key: string): boolean | undefined => {
  const v = scfg[key];
  if (v === undefined) return undefined;
  return v === true || v === 1 || v === '1' || v === 'true';
};

/** The reference provider on a chunk store, Proxmox VE 8.4 shape. See the module documentation. */
export class ChunkProvider extends BackupProviderBase {
  readonly vmBackupMode: 'full' | 'incremental';
  private readonly options: ChunkProviderOptions;
  private readonly jobs: ChunkJobs;
  private store?: ChunkStore;
  private readonly running = new Map<number, GuestBackup>();
  private readonly ledger: BitmapLedger;
  /** The NBD servers and FUSE files of the VM volumes being restored, by `[volname, device]` as JSON. */
  private readonly restoreExports = new Map<string, { server: ChunkNbdServer; fuse: FuseExport; dir: string }>();
  /** Tar files `restoreContainerInit` wrote, by volume name, until `restoreContainerCleanup`. */
  private readonly restoreTars = new Map<string, string>();

  /**
   * The storage side (Proxmox's storage-plugin calls; see the directory provider for who calls
   * them and when). Works on what the store holds only: a backup exists when its manifest does.
   */
  readonly storage: ProviderStorage = {
    listBackups: async (filter = {}) => (await (await this.openStore()).listBackups(filter.vmid)).map(storedBackup),
    getNotes: async (volname) => (await (await this.openStore()).attributes(volname)).notes,
    getProtected: async (volname) => (await (await this.openStore()).attributes(volname)).protected,
    setNotes: async (volname, notes) => (await this.openStore()).setNotes(volname, notes),
    setProtected: async (volname, value) => (await this.openStore()).setProtected(volname, value),
    removeBackup: async (volname) => (await this.openStore()).deleteBackup(volname),
    prune: async ({ vmid, vmtype, keep, dryRun }) => {
      const entries = await (await this.openStore()).pruneBackups({ vmid, vmtype, keep, ...(dryRun ? { dryRun } : {}) });
      return pruneAnswer(entries, dryRun);
    },
  };

  /**
   * @param context - Storage id, configuration (see the module documentation) and log.
   * @param options - The store opened, the data paths, clock, progress.
   */
  constructor(context: ProviderContext, options: ChunkProviderOptions = {}) {
    super(context);
    const mode = this.scfg['vm-backup-mode'] ?? 'incremental';
    if (mode !== 'full' && mode !== 'incremental') throw new ChunkBackupError('ERR_PROVIDER_STATE', `storage option vm-backup-mode must be full or incremental, got ${JSON.stringify(mode)}`);
    this.vmBackupMode = mode;
    if (!options.store && str(this.scfg, 'store') === undefined) {
      throw new ChunkBackupError('ERR_PROVIDER_STATE', 'the chunk provider needs the store as storage option store (s3://bucket/prefix)');
    }
    this.options = options;
    this.jobs = options.jobs ?? nativeChunkJobs;
    this.ledger = new BitmapLedger(this.storeid, options.stateDir);
  }

  override providerName(): string {
    return 'chunks';
  }

  /** The store, opened from the storage configuration on first use. */
  async openStore(): Promise<ChunkStore> {
    if (this.options.store) return this.options.store;
    if (!this.store) {
      const s = this.scfg;
      const credentialsFile = str(s, 'credentials-file');
      const endpoint = str(s, 'endpoint');
      const region = str(s, 'region');
      const caFile = str(s, 'ca-file');
      const fingerprint = str(s, 'fingerprint');
      const keyFile = str(s, 'key-file');
      const options = await s3StoreOptions(str(s, 'store')!, {
        ...(endpoint ? { endpoint } : {}),
        ...(region ? { region } : {}),
        ...(caFile ? { caFile } : {}),
        ...(fingerprint ? { fingerprint } : {}),
        ...(keyFile ? { keyFile } : {}),
        ...(credentialsFile ? { credentialsFile } : {}),
        ...(bool(s, 'path-style') === false ? { virtualHosted: true } : {}),
        ...(bool(s, 'allow-http') ? { allowHttp: true } : {}),
      });
      this.store = await ChunkStore.open(options, { storeid: this.storeid });
    }
    return this.store;
  }

  private guest(vmid: number): GuestBackup {
    const g = this.running.get(vmid);
    if (!g) throw new ChunkBackupError('ERR_PROVIDER_STATE', `no backup of guest ${vmid} is running`);
    return g;
  }

  // ----- job ----------------------------------------------------------------------------------

  /** Opens the store, so that wrong credentials, a missing bucket or a wrong key fail before any guest. */
  override async jobInit(_startTime: number): Promise<void> {
    await (await this.openStore()).assertKey({ create: true });
  }

  /** A guest backup still open here without its manifest failed without cleanup: remove it. */
  override async jobCleanup(): Promise<void> {
    for (const g of [...this.running.values()]) {
      if (g.manifest) await g.writer.end().catch(() => undefined);
      else await this.discard(g, { forgetPrevious: dataCopied(g) });
    }
    this.running.clear();
  }

  // ----- backup -------------------------------------------------------------------------------

  /** Names the backup (`backup/<vmid>/<vmtype>-<time>`), records it as a writer, finds the previous backup. */
  override async backupInit(vmid: number, vmtype: GuestType, _startTime: number): Promise<BackupInitResult> {
    const store = await this.openStore();
    await store.assertKey({ create: true });
    const now = this.options.now?.() ?? new Date();
    const { volname, writer } = await store.startBackup(vmid, vmtype, now);
    // a VM's: the backup QEMU's bitmap counts from; a container's: its newest (deduplication only)
    const previous = vmtype === 'lxc' ? await this.previousArchive(store, vmid) : this.vmBackupMode === 'incremental' ? await this.trustedPrevious(store, vmid) : undefined;
    this.running.set(vmid, { vmid, vmtype, volname, writer, ctime: Math.floor(now.getTime() / 1000), previous, devices: {}, files: {} });
    this.log.info(`backup ${store.volid(volname)} in ${store}${previous ? `, previous backup ${previous.volname}` : ''}`);
    return { archiveName: volname.slice('backup/'.length) };
  }

  /**
   * The backup QEMU's bitmap counts writes since: the one the ledger names for this store, if
   * its manifest and indexes are still there and sound, none of the chunks they name is a fossil
   * (a collection may delete it: {@link ChunkStore.missingChunks}, one listing, after the writer
   * record `startBackup` wrote) and its last verify (if any) did not fail. Otherwise the next
   * backup reads every chunk. Decided here, before QEMU is asked for an incremental export:
   * such an export can only be read where it is dirty.
   */
  private async trustedPrevious(store: ChunkStore, vmid: number): Promise<ChunkManifest | undefined> {
    const owner = await this.ledger.read(vmid);
    if (!owner) return undefined;
    if (owner.store !== store.identity) {
      this.log.warn(`QEMU's bitmap for storage ${this.storeid} was last used by the store ${owner.store}: full backup`);
      return undefined;
    }
    const volname = owner.volname;
    // the bitmap goes with the guest (live migration), this host's ledger does not
    const recorded = await store.bitmapOwner(vmid);
    if (recorded !== volname) {
      this.log.warn(`QEMU's bitmap for storage ${this.storeid} was last handed to ${recorded ?? 'a backup this store has no record of'} (another host, e.g. before a migration), not to ${volname}: full backup`);
      return undefined;
    }
    let m: ChunkManifest;
    try {
      m = await store.readManifest(volname, { needKey: true });
      await this.assertNotFailedVerify(store, volname);
      // every disk's chunks in one check: one listing of the fossils, however many disks
      const digests: Buffer[] = [];
      for (const device of Object.keys(m.devices ?? {})) digests.push(...(await store.readFixedIndex(m, device)).digests);
      const missing = await store.missingChunks(digests);
      if (missing.length > 0) {
        this.log.warn(`${missing.length} chunk(s) of ${volname} were moved aside by a garbage collection (first: ${missing[0]}): full backup`);
        return undefined;
      }
    } catch (err) {
      this.log.warn(`QEMU's bitmap for storage ${this.storeid} counts writes since ${volname}, which cannot be used (${(err as Error).message}): full backup`);
      return undefined;
    }
    return m;
  }

  /**
   * A backup whose last verify failed names a chunk lost outside the store's operations (the
   * check of the previous index sees only fossils): it is not a base, so the next backup reads
   * everything and uploads the lost chunk again. Proxmox Backup Server does the same with a
   * previous snapshot whose `verify_state` is failed (proxmox-backup `src/api2/backup/mod.rs`).
   */
  private async assertNotFailedVerify(store: ChunkStore, volname: string): Promise<void> {
    const v = await store.readVerifyState(volname);
    if (v?.state === 'failed') {
      throw new ChunkBackupError('ERR_BACKUP_CORRUPT', `its last verify failed (${v.missing} chunk(s) missing, ${v.bad} damaged)`, { volname });
    }
  }

  /** Records, before the first disk is read, that this backup may tell QEMU success. */
  private async claimBitmap(g: GuestBackup): Promise<void> {
    if (g.claimedBitmap) return;
    const store = await this.openStore();
    await this.ledger.write(g.vmid, { store: store.identity, volname: g.volname });
    await store.setBitmapOwner(g.vmid, g.volname);
    g.claimedBitmap = true;
  }

  /** `nbd` for VMs, `directory` for containers (the only mechanism Proxmox VE has for them). */
  override backupGetMechanism(_vmid: number, vmtype: GuestType): Promise<BackupMechanism | undefined> {
    return Promise.resolve(vmtype === 'qemu' ? 'nbd' : vmtype === 'lxc' ? 'directory' : undefined);
  }

  /** `use` for each disk the previous backup has an index of, `new` for the others; nothing in mode `full`. */
  override async backupVmQueryIncremental(vmid: number, volumes: Record<string, VolumeSize>): Promise<Record<string, IncrementalRequest> | undefined> {
    if (this.vmBackupMode === 'full') return undefined;
    const previous = this.guest(vmid).previous;
    const out: Record<string, IncrementalRequest> = {};
    for (const device of Object.keys(volumes)) out[device] = previous?.devices?.[device] ? 'use' : 'new';
    return out;
  }

  /**
   * Stores the configuration files as blobs and each disk as chunks and an index, then the
   * manifest: complete when this returns, before vzdump's storage calls and QEMU's teardown.
   */
  override async backupVm(vmid: number, guestConfig: string, volumes: Record<string, BackupVmVolume>, info: BackupVmInfo): Promise<void> {
    const g = this.guest(vmid);
    if (info.mechanism !== 'nbd') throw new MechanismError(`mechanism ${info.mechanism} is not used by the chunk provider`, { mechanism: info.mechanism, vmtype: 'qemu' });
    const store = await this.openStore();
    g.files['guest.conf.blob'] = await store.putBlob(g.volname, 'guest.conf.blob', Buffer.from(guestConfig, 'utf8'));
    if (info.firewallConfig !== undefined) g.files['firewall.conf.blob'] = await store.putBlob(g.volname, 'firewall.conf.blob', Buffer.from(info.firewallConfig, 'utf8'));
    const bandwidthLimit = normaliseBandwidthLimit(info.bandwidthLimit, 'bandwidthLimit');
    for (const [device, v] of Object.entries(volumes)) {
      await this.backupDisk(g, store, device, { ...v, nbdUri: v.nbdUri ?? nbdUriFor(device, v.nbdPath!) }, bandwidthLimit, info.signal);
    }
    await this.complete(g);
  }

  /** One disk: every chunk read (bitmap `none` / `new`), or only dirty ones with the rest from the previous index (`reuse`). */
  private async backupDisk(g: GuestBackup, store: ChunkStore, device: string, v: BackupVmVolume & { nbdUri: string }, bandwidthLimit: number | undefined, signal: AbortSignal): Promise<void> {
    const index = `${device}.fidx`;
    const incremental = v.bitmapMode === 'reuse';
    const prev = g.previous?.devices?.[device];
    if (incremental && !prev) {
      throw new ChunkBackupError('ERR_PROVIDER_STATE', `disk ${device}: QEMU offers an incremental backup but the previous backup has no index of it; run a full backup (vm-backup-mode full once)`, { volname: g.volname });
    }
    if (incremental && prev!.size !== v.size) {
      throw new ChunkBackupError('ERR_PROVIDER_STATE', `disk ${device}: its size changed since ${g.previous!.volname} (${prev!.size} -> ${v.size} bytes) while QEMU offers an incremental backup; run a full backup`, { volname: g.volname });
    }
    await this.claimBitmap(g);
    this.log.info(`${device}: ${incremental ? `incremental over ${g.previous!.volname}` : 'full'} backup to ${index}`);
    g.copying = true;
    let summary;
    try {
      summary = await this.jobs.backupDisk({
        store: store.options,
        ...(store.fingerprint ? { storeFingerprint: store.fingerprint } : {}),
        nbdUri: v.nbdUri,
        size: v.size,
        indexKey: store.objectKey(g.volname, index),
        chunkSize: store.chunkSize,
        discard: true,
        ...(incremental ? { bitmap: v.bitmapName!, previousIndexKey: store.objectKey(g.previous!.volname, prev!.index) } : {}),
        ...(bandwidthLimit !== undefined ? { bandwidthLimit } : {}),
        ...(this.options.onProgress ? { onProgress: (p: { done: number; total: number; bytesPerSecond: number }) => this.options.onProgress!({ ...p, vmid: g.vmid, device }) } : {}),
        signal,
      });
    } catch (err) {
      g.copyFailed = true;
      throw err;
    } finally {
      g.copying = false;
    }
    this.log.info(`${device}: read ${summary.bytesRead} bytes; ${summary.chunks} chunks: ${summary.uploaded} uploaded, ${summary.reused} already stored, ${summary.zero} zero`);
    g.devices[device] = {
      index,
      size: v.size,
      bitmapMode: v.bitmapMode,
      ...(incremental ? { previous: g.previous!.volname } : {}),
      bytesRead: summary.bytesRead,
      chunksUploaded: summary.uploaded,
      chunksReused: summary.reused,
      chunksZero: summary.zero,
    };
    g.files[index] = { size: summary.indexSize, sha256: summary.indexSha256 };
  }

  /**
   * Stores the configuration files as blobs and the container's tree as a tar stream cut into
   * chunks (`root.didx`), then the manifest: complete when this returns, as for VMs. The tar
   * command, the id mapping (host owners stored as container ids, as vzdump stores them) and the
   * exclusions are the directory provider's (`lib/container/tar.ts`); this process reads the tree
   * as the bridge hands it over (`/proc/<pid>/root<directory>`, docs/pve-bridge-notes.md §7.7 (a)),
   * like the directory provider. Chunks named by the guest's previous backup in this store (those
   * the store still holds) and chunks the store has (`head`) are not uploaded again.
   */
  override async backupContainer(vmid: number, guestConfig: string, excludePatterns: string[], info: ContainerBackupInfo): Promise<void> {
    const g = this.guest(vmid);
    const store = await this.openStore();
    g.files['guest.conf.blob'] = await store.putBlob(g.volname, 'guest.conf.blob', Buffer.from(guestConfig ?? '', 'utf8'));
    if (info.firewallConfig !== undefined) g.files['firewall.conf.blob'] = await store.putBlob(g.volname, 'firewall.conf.blob', Buffer.from(info.firewallConfig, 'utf8'));
    const previous = g.previous;
    const index = 'root.didx';
    this.log.info(`container tree to ${index}${previous ? `, chunks of ${previous.volname} not uploaded again` : ''}`);
    g.copying = true;
    let summary: ChunkStreamSummary;
    try {
      summary = await this.backupTree(store, g, index, previous, excludePatterns, info);
    } catch (err) {
      g.copyFailed = true;
      throw err;
    } finally {
      g.copying = false;
    }
    if (summary.previousMissing > 0) this.log.warn(`${summary.previousMissing} chunk(s) of ${previous?.volname} were moved aside by a garbage collection: uploaded again where needed`);
    this.log.info(`${index}: ${summary.length} bytes of tar stream; ${summary.chunks} chunks: ${summary.uploaded} uploaded, ${summary.reused} already stored`);
    g.archive = {
      index,
      size: summary.length,
      ...(previous ? { previous: previous.volname } : {}),
      chunks: summary.chunks,
      chunksUploaded: summary.uploaded,
      chunksReused: summary.reused,
    };
    g.files[index] = { size: summary.indexSize, sha256: summary.indexSha256 };
    await this.complete(g);
  }

  /**
   * The newest container backup of the guest in this store, if sound: its index names chunks
   * the store most likely holds. Deduplication only: nothing of the new backup depends on it.
   */
  private async previousArchive(store: ChunkStore, vmid: number): Promise<ChunkManifest | undefined> {
    const newest = (await store.listBackups(vmid)).filter((b) => b.subtype === 'lxc' && b.status === 'ok').pop();
    if (!newest) return undefined;
    try {
      const m = await store.readManifest(newest.volname, { needKey: true });
      await store.readArchiveIndex(m);
      await this.assertNotFailedVerify(store, newest.volname);
      return m;
    } catch (err) {
      this.log.warn(`the previous backup ${newest.volname} cannot be used for deduplication (${(err as Error).message}): every chunk is checked with the store`);
      return undefined;
    }
  }

  /**
   * tar writes the tree into a pipe whose other end the core reads. A failure of either ends
   * both: tar's stops the core before it writes an index (a short stream must never look
   * complete); the core's closes the pipe, and tar then fails on it.
   */
  private async backupTree(store: ChunkStore, g: GuestBackup, index: string, previous: ChunkManifest | undefined, excludePatterns: string[], info: ContainerBackupInfo): Promise<ChunkStreamSummary> {
    const [readEnd, writeEnd] = createPipe();
    const stop = new AbortController();
    const signal = info.signal ? AbortSignal.any([info.signal, stop.signal]) : stop.signal;
    const bandwidthLimit = normaliseBandwidthLimit(info.bandwidthLimit, 'bandwidthLimit');
    let upload: Promise<ChunkStreamSummary>;
    try {
      upload = this.jobs.backupStream({
        store: store.options,
        ...(store.fingerprint ? { storeFingerprint: store.fingerprint } : {}),
        fd: readEnd,
        indexKey: store.objectKey(g.volname, index),
        ...(previous?.archive ? { previousIndexKey: store.objectKey(previous.volname, previous.archive.index) } : {}),
        ...(bandwidthLimit !== undefined ? { bandwidthLimit } : {}),
        ...(this.options.onProgress ? { onProgress: (p: { done: number; total: number; bytesPerSecond: number }) => this.options.onProgress!({ ...p, vmid: g.vmid, device: index }) } : {}),
        signal,
      });
    } catch (err) {
      closeQuietly(writeEnd);
      throw err;
    }
    const tar = writeTarStream({
      source: info.directory,
      fd: writeEnd,
      idMap: info.idMap,
      excludePaths: excludePatterns,
      sources: info.sources,
      ...(info.signal ? { signal: info.signal } : {}),
    }).catch((err: unknown) => {
      stop.abort(err);
      throw err;
    });
    return preferCore(await Promise.allSettled([upload, tar]));
  }

  /** Writes the manifest (last); on failure it is taken back, and `backupCleanup(false)` removes the rest. */
  private async complete(g: GuestBackup): Promise<ChunkManifest> {
    const store = await this.openStore();
    try {
      // before and after: a collection that took this backup for dead removes its record before
      // it deletes anything, so a record still there after the write means nothing was deleted
      await g.writer.assertAlive();
      await store.assertDescriptorUnchanged();
      g.manifest = await store.writeManifest({
        format: CHUNK_STORE_FORMAT,
        version: CHUNK_STORE_VERSION,
        volname: g.volname,
        vmid: g.vmid,
        vmtype: g.vmtype,
        ctime: g.ctime,
        status: 'ok',
        keyFingerprint: store.key?.fingerprint ?? null,
        devices: g.vmtype === 'lxc' ? null : g.devices,
        archive: g.archive ?? null,
        files: g.files,
      });
      await g.writer.assertAlive();
    } catch (err) {
      g.manifest = undefined;
      await store.objects.delete(store.objectKey(g.volname, 'manifest.json')).catch(() => undefined);
      throw err;
    }
    this.log.info(`backup ${g.volname} complete (manifest written)`);
    return g.manifest;
  }

  /**
   * Success: the backup was completed by `backupVm`; its writer record goes. Failure: the backup
   * is removed (manifest first, then indexes and blobs; its chunks are garbage for the next
   * collection), and the ledger is set as for the directory provider: once every disk was read
   * QEMU may be told success, so the ledger keeps naming this (removed) backup and the next backup
   * is full; otherwise it names the previous backup again.
   */
  override async backupCleanup(vmid: number, _vmtype: GuestType, success: boolean, info: { error?: string }): Promise<BackupCleanupResult | void> {
    const g = this.running.get(vmid);
    if (!g) {
      if (success) throw new ChunkBackupError('ERR_PROVIDER_STATE', `no backup of guest ${vmid} is running`);
      return;
    }
    if (!success) {
      this.log.warn(`removing the ${g.manifest ? 'failed' : 'incomplete'} backup ${g.volname}${info.error ? ` (${info.error})` : ''}`);
      await this.discard(g, { forgetPrevious: g.manifest !== undefined || dataCopied(g) });
      return;
    }
    if (!g.manifest) throw new ChunkBackupError('ERR_PROVIDER_STATE', `the backup ${g.volname} of guest ${vmid} is not complete: its data call did not succeed`, { volname: g.volname });
    await g.writer.end();
    return { stats: { archiveSize: Object.values(g.manifest.files).reduce((n, f) => n + f.size, 0) } };
  }

  /** Stores the task log as `backup.log.blob`, then rewrites the manifest with it (re-read: another process may have removed the backup). */
  override async backupHandleLogFile(vmid: number, filename: string): Promise<void> {
    const g = this.running.get(vmid);
    this.running.delete(vmid);
    if (!g?.manifest) return;
    const store = await this.openStore();
    let m: ChunkManifest;
    try {
      m = await store.readManifest(g.volname, { needKey: true });
    } catch (err) {
      if (err instanceof ChunkBackupError && err.code === 'ERR_UNKNOWN_VOLUME') {
        this.log.warn(`backup ${g.volname} was removed before its task log could be added`);
        return;
      }
      throw err;
    }
    const log = await store.putBlob(g.volname, 'backup.log.blob', await readFile(filename));
    const { checksum: _c, signature: _s, ...rest } = m;
    await store.writeManifest({ ...rest, files: { ...rest.files, 'backup.log.blob': log } });
  }

  /** Removes a partial or failed backup; see {@link backupCleanup} for the ledger. */
  private async discard(g: GuestBackup, o: { forgetPrevious?: boolean } = {}): Promise<void> {
    this.running.delete(g.vmid);
    const store = await this.openStore();
    if (!o.forgetPrevious && g.claimedBitmap && g.previous) {
      await this.ledger.write(g.vmid, { store: store.identity, volname: g.previous.volname });
      await store.setBitmapOwner(g.vmid, g.previous.volname);
    }
    await store.removeObjects(g.volname);
    await g.writer.end();
  }

  // ----- restore ------------------------------------------------------------------------------

  /**
   * `qemu-img` for VMs (this package's runner writes the disks through `restoreVmVolumeWrite`);
   * `tar` for containers (this package's runner extracts straight from the chunks through
   * `restoreContainerWrite`).
   */
  override async restoreGetMechanism(volname: string): Promise<RestoreMechanismInfo> {
    const m = await (await this.openStore()).readManifest(volname);
    if (m.vmtype === 'lxc') return { mechanism: 'tar', vmtype: 'lxc' };
    return { mechanism: 'qemu-img', vmtype: 'qemu' };
  }

  override async archiveGetGuestConfig(volname: string): Promise<string> {
    const store = await this.openStore();
    await store.assertKey();
    const m = await store.readManifest(volname, { needKey: true });
    return (await store.getBlob(m, 'guest.conf.blob')).toString('utf8');
  }

  override async archiveGetFirewallConfig(volname: string): Promise<string | undefined> {
    const store = await this.openStore();
    await store.assertKey();
    const m = await store.readManifest(volname, { needKey: true });
    if (!m.files['firewall.conf.blob']) return undefined;
    return (await store.getBlob(m, 'firewall.conf.blob')).toString('utf8');
  }

  /**
   * The disks and their sizes, after checking the key (before anything of the backup is read)
   * and every index against the manifest: a damaged backup is refused before a target is written.
   */
  override async restoreVmInit(volname: string): Promise<Record<string, VolumeSize>> {
    const store = await this.openStore();
    await store.assertKey();
    const m = await store.readManifest(volname, { needKey: true });
    const out: Record<string, VolumeSize> = {};
    for (const [device, d] of Object.entries(m.devices ?? {})) {
      await store.readFixedIndex(m, device);
      out[device] = { size: d.size };
    }
    return out;
  }

  /**
   * The disk as a local raw file, for Proxmox VE's restore path: the native core's NBD server
   * serves it from its chunks on a private socket (`serveBackup`: key, manifest and index
   * checked first; every chunk checked against its digest as it is read, a damaged one is a read
   * error, never data), and qemu-storage-daemon's FUSE export puts a raw regular file on it (the
   * directory provider's `startFuseExport`). qemu-server checks the path with
   * `file_size_info($path, undef, 'raw', 1)` before `qemu-img convert -f raw` (qemu-server
   * `src/PVE/QemuServer.pm` `restore_external_archive`): it must `stat()` as a file and show no
   * backing file, so neither an NBD URI nor a `json:` filename passes. Both live until
   * `restoreVmVolumeCleanup`, or `restoreVmCleanup` (qemu-server skips the volume cleanup when
   * this method or its check dies), or the end of this process.
   */
  override async restoreVmVolumeInit(volname: string, deviceName: string, _info: Record<string, never>): Promise<RestoreVmVolumeInitResult> {
    const store = await this.openStore();
    const key = JSON.stringify([volname, deviceName]);
    // a second init of the same volume replaces the first export rather than leaking it
    await this.stopRestoreExport(key);
    const [{ serveBackup }, { startFuseExport }] = await Promise.all([import('./nbd-server.js'), import('../qemu/storage-daemon.js')]);
    const dir = await mkdtemp(path.join(tmpdir(), 'pbp-nbd-')); // 0700
    let server: ChunkNbdServer | undefined;
    try {
      server = await serveBackup(store, volname, { socket: path.join(dir, 'nbd.sock'), devices: [deviceName], onError: (m) => this.log.err(m) });
      const fuse = await startFuseExport({ nbdSocket: server.socket, export: deviceName }, 'raw');
      this.restoreExports.set(key, { server, fuse, dir });
      this.log.info(`${deviceName}: served from its chunks as ${fuse.path} (each chunk checked against its digest as it is read)`);
      return { qemuImgPath: fuse.path };
    } catch (err) {
      await server?.stop().catch(() => undefined);
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /** Unmounts the volume's file, stops its NBD server. */
  override async restoreVmVolumeCleanup(volname: string, deviceName: string, _info: Record<string, never>): Promise<void> {
    await this.stopRestoreExport(JSON.stringify([volname, deviceName]));
  }

  /** Stops what `restoreVmVolumeCleanup` did not (qemu-server skips it when a volume's init or check fails). */
  override async restoreVmCleanup(volname: string): Promise<void> {
    for (const key of [...this.restoreExports.keys()]) {
      if ((JSON.parse(key) as string[])[0] === volname) await this.stopRestoreExport(key);
    }
  }

  private async stopRestoreExport(key: string): Promise<void> {
    const e = this.restoreExports.get(key);
    if (!e) return;
    this.restoreExports.delete(key);
    try {
      await e.fuse.stop();
    } finally {
      await e.server.stop();
      await rm(e.dir, { recursive: true, force: true });
    }
  }

  /**
   * Package extension: writes the disk straight from its chunks through the native core, which
   * checks every chunk against its digest (`ERR_BACKUP_CORRUPT` naming the chunk). The index is
   * checked against the manifest first.
   */
  async restoreVmVolumeWrite(volname: string, deviceName: string, target: RestoreVolumeTarget): Promise<boolean> {
    const store = await this.openStore();
    await store.assertKey();
    const m = await store.readManifest(volname, { needKey: true });
    const d = m.devices?.[deviceName];
    if (!d) throw new ChunkBackupError('ERR_UNKNOWN_VOLUME', `backup ${store.volid(volname)} has no disk ${deviceName}`, { volname });
    const key = store.objectKey(volname, d.index);
    // the index as the manifest records it, whole and sound, before the target is touched
    await store.readFixedIndex(m, deviceName);
    this.log.info(`${deviceName}: restoring from ${d.index} (chunks checked against their digests as they are written)`);
    await this.jobs.restoreDisk({
      store: store.options,
      ...(store.fingerprint ? { storeFingerprint: store.fingerprint } : {}),
      indexKey: key,
      target: target.path,
      zeroed: target.zeroed,
      ...(target.bandwidthLimit ? { bandwidthLimit: target.bandwidthLimit } : {}),
      ...(target.onProgress ? { onProgress: target.onProgress } : {}),
      ...(target.signal ? { signal: target.signal } : {}),
    });
    return true;
  }

  /** A container backup's manifest and index key, the key checked and the index against the manifest. */
  private async containerArchive(volname: string): Promise<{ store: ChunkStore; m: ChunkManifest; indexKey: string }> {
    const store = await this.openStore();
    await store.assertKey();
    const m = await store.readManifest(volname, { needKey: true });
    if (!m.archive) throw new MechanismError(`backup ${store.volid(volname)} is not a container backup`, { mechanism: 'tar', vmtype: m.vmtype });
    return { store, m, indexKey: (await store.readArchiveIndex(m)).key };
  }

  /**
   * Proxmox VE's path (pve-container `src/PVE/LXC/Create.pm` `restore_external_archive`): a
   * regular `*.tar` file, which it reads twice (`tar -tvf` first, then the extract). The core
   * writes the stream from its chunks, each checked against its digest, into `root.tar` (0600) in
   * a private temporary folder (0700, under `TMPDIR`: room for the whole stream is needed
   * there); `restoreContainerCleanup` removes it. A failure removes it here (Proxmox VE skips the
   * cleanup when the init dies). The folder is named after this process: the folders of restores
   * whose process was killed before their cleanup (a whole container's data each) are removed
   * by the next one on this host.
   */
  override async restoreContainerInit(volname: string, _storeid: string, _info: Record<string, never>): Promise<RestoreContainerInitResult> {
    const { store, m, indexKey } = await this.containerArchive(volname);
    await this.restoreContainerCleanup(volname, _storeid, _info);
    for (const name of await readdir(tmpdir()).catch(() => [] as string[])) {
      // mkdtemp appends 6 characters to the prefix
      if (name.startsWith(CT_RESTORE_PREFIX) && nameTagOwnerIsDead(name.slice(CT_RESTORE_PREFIX.length, -7))) await rm(path.join(tmpdir(), name), { recursive: true, force: true });
    }
    const dir = await mkdtemp(path.join(tmpdir(), `${CT_RESTORE_PREFIX}${ownerNameTag()}-`));
    const tarPath = path.join(dir, 'root.tar');
    try {
      this.log.info(`writing ${m.archive!.index} (${m.archive!.size} bytes) to ${tarPath}, chunks checked against their digests`);
      const fd = openSync(tarPath, 'wx', 0o600);
      const r = await this.jobs.restoreStream({ store: store.options, ...(store.fingerprint ? { storeFingerprint: store.fingerprint } : {}), indexKey, fd });
      const size = (await stat(tarPath)).size;
      if (r.readerClosed || size !== m.archive!.size) {
        throw new ChunkBackupError('ERR_BACKUP_CORRUPT', `backup ${store.volid(volname)}: ${tarPath} holds ${size} bytes, its manifest records ${m.archive!.size}`, { volname });
      }
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
    this.restoreTars.set(volname, dir);
    return { tarPath };
  }

  /** Removes the tar file `restoreContainerInit` wrote. */
  override async restoreContainerCleanup(volname: string, _storeid: string, _info: Record<string, never>): Promise<void> {
    const dir = this.restoreTars.get(volname);
    this.restoreTars.delete(volname);
    if (dir) await rm(dir, { recursive: true, force: true });
  }

  /**
   * Package extension: extracts a container backup into `target.rootdir` straight from its
   * chunks, with no tar file between: the core writes the stream (chunks fetched in parallel,
   * each checked against its digest, written in order) into a pipe that tar (the directory
   * provider's extract command and id mapping, `lib/container/tar.ts`) reads. A damaged or
   * missing chunk fails the restore with `ERR_BACKUP_CORRUPT` naming it (tar then sees the stream
   * end early and fails too): what was extracted until then stays, and the restore is an error.
   */
  async restoreContainerWrite(volname: string, target: RestoreContainerTarget): Promise<boolean> {
    const { store, m, indexKey } = await this.containerArchive(volname);
    this.log.info(`extracting ${m.archive!.index} (${m.archive!.size} bytes) into ${target.rootdir}, chunks checked against their digests`);
    const [readEnd, writeEnd] = createPipe();
    const stop = new AbortController();
    const signal = target.signal ? AbortSignal.any([target.signal, stop.signal]) : stop.signal;
    let write: Promise<unknown>;
    try {
      write = this.jobs.restoreStream({
        store: store.options,
        ...(store.fingerprint ? { storeFingerprint: store.fingerprint } : {}),
        indexKey,
        fd: writeEnd,
        ...(target.bandwidthLimit ? { bandwidthLimit: target.bandwidthLimit } : {}),
        signal,
      });
    } catch (err) {
      closeQuietly(readEnd);
      throw err;
    }
    const extract = extractTarStream({
      fd: readEnd,
      rootdir: target.rootdir,
      ...(target.idMap ? { idMap: target.idMap } : {}),
      ...(target.allowNonEmpty ? { allowNonEmpty: true } : {}),
      ...(target.signal ? { signal: target.signal } : {}),
    }).catch((err: unknown) => {
      stop.abort(err);
      throw err;
    });
    preferCore(await Promise.allSettled([write, extract]));
    return true;
  }

  /** Whether a backup of the guest is running in this object. */
  isRunning(vmid: number): boolean {
    return this.running.has(vmid);
  }
}

/**
 * The outcome of the core's stream job (first) and tar's side (second), run together over a
 * pipe: the core's own error names what failed (a chunk, the store) and wins; its cancellation,
 * caused by tar's failure, gives way to tar's error.
 */
function preferCore<T>([core, tar]: [PromiseSettledResult<T>, PromiseSettledResult<unknown>]): T {
  if (core.status === 'rejected' && (core.reason as { code?: string } | undefined)?.code !== 'ERR_CANCELLED') throw core.reason;
  if (tar.status === 'rejected') throw tar.reason;
  if (core.status === 'rejected') throw core.reason;
  return core.value;
}

/** Closes a descriptor that no job took over. */
function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // closed already
  }
}

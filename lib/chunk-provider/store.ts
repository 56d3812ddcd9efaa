/**
 * The storage side of the chunk provider (docs/chunk-store.md): a store of content-addressed
 * chunks on S3-compatible object storage, its descriptor (`store.json`), and the backups in it
 * as manifests, indexes and blobs under `backups/<vmid>/<vmtype>-<backup-id>/`. What Proxmox's
 * storage plugin does for a backup storage: list, notes, protected flag, prune, delete. The
 * chunks themselves are written and read by the native core; nothing here removes a chunk
 * (that is garbage collection's work).
 *
 * Invariants:
 * - a backup exists exactly when its `manifest.json` does (written last; deleted first);
 * - every manifest read is checked: its checksum, with a key its signature, its volume name,
 *   its version (`ERR_BACKUP_CORRUPT`, `ERR_BACKUP_VERSION`);
 * - a key that is not the store's fails with `ERR_KEY_MISMATCH` when the store is opened; an
 *   encrypted store asked for data (backup, restore, configs) without a key fails with
 *   `ERR_KEY_REQUIRED` before anything of the backup is read. Listing, notes, prune and delete
 *   work without the key (manifests are plain; their checksums are checked, their signatures
 *   only when the key is there).
 *
 * @packageDocumentation
 */
import { createHash, randomBytes } from 'node:crypto';
import os from 'node:os';

import type { BitmapMode, GuestType, PruneOptions } from '../provider/api.js';
import { markBackups, type PruneEntry, type PruneMark } from '../provider/prune.js';
import { backupIdOf, ctimeOfBackupId, isBackupDirName, matchVolname, oldestFirst, volnameOf, type ParsedVolname } from '../provider/volname.js';
import { decodeBlob, encodeBlob } from './blob.js';
import { eachLimit } from '../concurrency.js';
import { native } from '../native.js';
import { ChunkBackupError, ChunkStoreError, fromNative } from './errors.js';
import { checkFingerprint, readKeyFile, type StoreKey } from './key.js';
import { S3ObjectStore, type S3StoreOptions } from './s3.js';

/** Format name in `store.json` and in every manifest. */
export const CHUNK_STORE_FORMAT = 'pve-backup-provider/chunks';
/** Store and manifest version written and read; a newer one is refused. */
export const CHUNK_STORE_VERSION = 1;
/** Fixed chunk size of VM disks. */
export const CHUNK_SIZE = 4 << 20;
export const STORE_JSON = 'store.json';
export const MANIFEST = 'manifest.json';
/** A backup's last verify verdict, beside its manifest (docs/chunk-store.md, "Verify"). */
export const VERIFY_STATE = 'verify.json';

/** `store.json`. */
export interface StoreDescriptor {
  format: typeof CHUNK_STORE_FORMAT;
  version: number;
  chunkSize: number;
  created: number;
  encryption: { cipher: 'aes-256-gcm'; fingerprint: string } | null;
}

/** One disk of a VM backup in the manifest. */
export interface ChunkManifestDevice {
  /** Its fixed index, relative to the backup's prefix (`<device>.fidx`). */
  index: string;
  /** The disk's size in bytes. */
  size: number;
  /** How QEMU's bitmap was used: `reuse` = only dirty chunks were read, the rest taken from `previous`. */
  bitmapMode: BitmapMode;
  /** The backup whose index gave the digests of the chunks not read (`reuse` only). */
  previous?: string;
  bytesRead: number;
  chunksUploaded: number;
  chunksReused: number;
  chunksZero: number;
}

/** A container's tar stream in the manifest (a container backup has this and no devices). */
export interface ChunkManifestArchive {
  /** Its dynamic index, relative to the backup's prefix (`root.didx`). */
  index: string;
  /** The stream's length in bytes. */
  size: number;
  /** The backup whose index named chunks not uploaded again (deduplication only: nothing depends on it). */
  previous?: string;
  chunks: number;
  chunksUploaded: number;
  chunksReused: number;
}

/** An object of the backup recorded in the manifest: its size and SHA-256. */
export interface ChunkManifestFile {
  size: number;
  sha256: string;
}

/** `manifest.json` (docs/chunk-store.md): written last, its keys in this order. */
export interface ChunkManifest {
  format: typeof CHUNK_STORE_FORMAT;
  version: number;
  volname: string;
  vmid: number;
  vmtype: GuestType;
  ctime: number;
  status: 'ok';
  keyFingerprint: string | null;
  devices: Record<string, ChunkManifestDevice> | null;
  archive: ChunkManifestArchive | null;
  files: Record<string, ChunkManifestFile>;
  checksum: string;
  /** With a key: HMAC-SHA256 (hex) of the same bytes under the id key. */
  signature?: string;
}

/**
 * `verify.json`: the verdict of the last verify that decided one (a full verify; a sampled one
 * only when it found something). Outside the signed manifest: it only ever makes a backup less
 * trusted (a backup whose last verify failed is not the base of the next one).
 */
export interface ChunkVerifyState {
  state: 'ok' | 'failed';
  /** Unix seconds. */
  time: number;
  /** Chunks missing, and objects found damaged (chunks, manifest, indexes, blobs). */
  missing: number;
  bad: number;
}

/** A manifest before its checksum and signature. */
export type UnsignedManifest = Omit<ChunkManifest, 'checksum' | 'signature'>;

/** A backup as {@link ChunkStore.listBackups} lists it. */
export interface ChunkBackupInfo {
  /** `<storeid>:backup/<vmid>/<vmtype>-<backup-id>`. */
  volid: string;
  volname: string;
  vmid: number;
  /** Guest type (Proxmox: `subtype`). */
  subtype: GuestType;
  ctime: number;
  /** The data's size: the disks' sizes (VM), the archive's (container). */
  size: number;
  /**
   * The backup whose index gave the digests of the chunks this one did not read (an incremental
   * backup; informational: every backup is complete on its own, so nothing depends on it).
   */
  previous?: string;
  /** `ok`, or `corrupt` (its manifest does not match its checksum or signature: listed so an operator sees it; never pruned). */
  status: 'ok' | 'corrupt';
  protected: boolean;
  notes?: string;
}

/** One backup's fate in {@link ChunkStore.pruneBackups}. */
export interface ChunkPruneEntry extends PruneMark {
  volid: string;
  vmid: number;
  subtype: GuestType;
}

/**
 * A running backup's record `writers/<id>.json` (docs/chunk-store.md, "Garbage collection"):
 * what garbage collection and deletion must not pull from under it.
 */
export interface WriterRecord {
  /** The backup it writes. */
  volname: string;
  host: string;
  pid: number;
  /** Unix seconds, the writer's clock. */
  started: number;
}

/** A writer record as listed: its key, content and the store's time of its last rewrite. */
export interface StoredWriter {
  key: string;
  record: WriterRecord;
  /** `LastModified`, Unix seconds, the store's clock. */
  modified: number;
}

/** How often {@link ChunkStore.startBackup} chooses a name again when other backups took it at the same time. */
const START_ATTEMPTS = 8;

/** How often a running backup rewrites its writer record. */
export const WRITER_HEARTBEAT_MS = 60_000;
/** A writer record not rewritten for this long (store time) belongs to a dead backup. */
export const WRITER_STALE_SECONDS = 15 * 60;

/**
 * How long a writer may go without a heartbeat that reached the store before it takes itself for
 * dead: a minute short of {@link WRITER_STALE_SECONDS}, for the time a request takes to arrive
 * (the store stamps a record when it receives it; the writer counts from when it sent it).
 */
const WRITER_SELF_EXPIRY_MS = (WRITER_STALE_SECONDS - 60) * 1000;

/**
 * A running backup's writer record, rewritten every {@link WRITER_HEARTBEAT_MS} so that garbage
 * collection knows the backup is alive. Created by {@link ChunkStore.startBackup}.
 *
 * Once a collection took the backup for dead (its record not rewritten for 15 minutes: the
 * process was stopped, its host suspended, the store out of reach), it may have deleted chunks
 * the backup names, so the backup must never complete: the writer then counts as expired for
 * good. A heartbeat never writes a removed record back (it would hide the removal from
 * {@link BackupWriter.assertAlive}: an overdue timer fires first when a stopped process resumes),
 * and the writer notices by itself when its heartbeats were missing long enough for any
 * collection to take it for dead, whether or not one did.
 */
export class BackupWriter {
  private timer: NodeJS.Timeout | undefined;
  /** The heartbeat in flight, awaited by {@link end} so that it cannot write the record back after it. */
  private beating: Promise<void> | undefined;
  /** Why the writer counts as dead (for good), once it does. */
  private expired: string | undefined;
  /** When the last rewrite that reached the store was sent: `Date.now()` and `performance.now()` (which stops while the host sleeps). */
  private lastBeat = { wall: 0, mono: 0 };

  /** @internal */
  constructor(
    /** The record's key, `writers/<id>.json`. */
    readonly key: string,
    readonly record: WriterRecord,
    private readonly store: ChunkStore,
  ) {}

  private body(): Buffer {
    return Buffer.from(`${JSON.stringify(this.record)}\n`);
  }

  /** Marks the writer dead when no heartbeat reached the store for {@link WRITER_SELF_EXPIRY_MS}, by either clock. */
  private checkGap(): void {
    const gap = Math.max(Date.now() - this.lastBeat.wall, performance.now() - this.lastBeat.mono);
    if (gap > WRITER_SELF_EXPIRY_MS) this.expired ??= `no heartbeat reached the store for ${Math.round(gap / 1000)} s, long enough for a garbage collection to take the backup for dead`;
  }

  /** A rewrite of the record, unless it was removed (then the writer is expired) or the writer is. */
  private async beat(): Promise<void> {
    this.checkGap();
    if (this.expired) return;
    const sent = { wall: Date.now(), mono: performance.now() };
    if ((await this.store.objects.head(this.key)) === null) {
      this.expired ??= 'a garbage collection that took the backup for dead removed it';
      return;
    }
    await this.store.objects.put(this.key, this.body());
    this.lastBeat = sent;
  }

  /** @internal Writes the record and starts the heartbeat. */
  async begin(): Promise<void> {
    const sent = { wall: Date.now(), mono: performance.now() };
    await this.store.objects.put(this.key, this.body());
    this.lastBeat = sent;
    // a failed rewrite is retried by the next beat; the gap between those that succeed decides
    this.timer = setInterval(() => {
      if (this.beating) return; // the previous one still waits for the store
      this.beating = this.beat()
        .catch(() => undefined)
        .finally(() => (this.beating = undefined));
    }, WRITER_HEARTBEAT_MS);
    this.timer.unref();
  }

  /**
   * Checks, before and after the backup's manifest is written, that the writer is alive: its
   * record is still there and was never removed, and its heartbeats never stopped long enough
   * for a garbage collection to take the backup for dead (which may then have deleted chunks
   * it names).
   * @throws {@link ChunkStoreError} `ERR_WRITER_EXPIRED`.
   */
  async assertAlive(): Promise<void> {
    this.checkGap();
    if (!this.expired && (await this.store.objects.head(this.key)) === null) this.expired = 'a garbage collection that took the backup for dead removed it';
    if (this.expired) {
      throw new ChunkStoreError('ERR_WRITER_EXPIRED', `backup ${this.store.volid(this.record.volname)}: its writer record ${this.store}/${this.key} expired (${this.expired}); it is not completed`);
    }
  }

  /** Stops the heartbeat and removes the record (the backup is over, done or not). */
  async end(): Promise<void> {
    clearInterval(this.timer);
    this.timer = undefined;
    await this.beating;
    await this.store.objects.delete(this.key);
  }
}

/** How to open a chunk store. */
export interface ChunkStoreOpenOptions {
  /** Storage id used in volume ids (default `chunks`). */
  storeid?: string;
}

/** The canonical JSON a manifest's checksum and signature cover: keys in the documented order, no white space. */
function canonical(m: UnsignedManifest): string {
  const device = (d: ChunkManifestDevice): ChunkManifestDevice => ({
    index: d.index,
    size: d.size,
    bitmapMode: d.bitmapMode,
    ...(d.previous !== undefined ? { previous: d.previous } : {}),
    bytesRead: d.bytesRead,
    chunksUploaded: d.chunksUploaded,
    chunksReused: d.chunksReused,
    chunksZero: d.chunksZero,
  });
  const ordered: UnsignedManifest = {
    format: m.format,
    version: m.version,
    volname: m.volname,
    vmid: m.vmid,
    vmtype: m.vmtype,
    ctime: m.ctime,
    status: m.status,
    keyFingerprint: m.keyFingerprint,
    devices: m.devices === null ? null : Object.fromEntries(Object.entries(m.devices).map(([k, d]) => [k, device(d)])),
    archive:
      m.archive === null
        ? null
        : {
            index: m.archive.index,
            size: m.archive.size,
            ...(m.archive.previous !== undefined ? { previous: m.archive.previous } : {}),
            chunks: m.archive.chunks,
            chunksUploaded: m.archive.chunksUploaded,
            chunksReused: m.archive.chunksReused,
          },
    files: Object.fromEntries(Object.entries(m.files).map(([k, f]) => [k, { size: f.size, sha256: f.sha256 }])),
  };
  return JSON.stringify(ordered);
}

/** SHA-256 (hex) of the manifest's canonical JSON. */
export function chunkManifestChecksum(m: UnsignedManifest): string {
  return createHash('sha256').update(canonical(m)).digest('hex');
}

const sha256 = (data: Buffer): string => createHash('sha256').update(data).digest('hex');

/** The digest of an all-zero chunk in an index (not stored). */
export const ZERO_DIGEST = Buffer.alloc(32);
const FIDX_MAGIC = Buffer.from('PBPFIDX\x01', 'latin1');

/** A decoded fixed index. */
export interface FixedIndex {
  /** The disk's size. */
  size: number;
  chunkSize: number;
  /** One per chunk; {@link ZERO_DIGEST} for an all-zero chunk. */
  digests: Buffer[];
}

/** The key of a chunk: `chunks/<d[0..2]>/<d[2..4]>/<d>` (hex). */
export function chunkKey(digest: Buffer): string {
  const d = digest.toString('hex');
  return `chunks/${d.slice(0, 2)}/${d.slice(2, 4)}/${d}`;
}

/** The digest (hex) of a chunk's key: `chunks/…/<hex>`, a fossil's `fossils/…/<hex>.<id>`, or a verify report's. */
export function digestOfKey(key: string): string {
  return key.slice(key.lastIndexOf('/') + 1).split('.')[0]!;
}

/** Decodes a `.fidx` object (docs/chunk-store.md, "Fixed index"), checking its magic, length and checksum. */
export function decodeFixedIndex(data: Buffer, corrupt: (why: string) => Error, version: (v: number) => Error): FixedIndex {
  if (data.length < 24 + 32) throw corrupt('is too short for an index');
  if (!data.subarray(0, 7).equals(FIDX_MAGIC.subarray(0, 7))) throw corrupt('is not a fixed index (bad magic)');
  if (data[7]! > FIDX_MAGIC[7]!) throw version(data[7]!);
  if (data[7] !== FIDX_MAGIC[7]) throw corrupt('is not a fixed index (bad magic)');
  const size = Number(data.readBigUInt64LE(8));
  const chunkSize = data.readUInt32LE(16);
  if (chunkSize === 0 || data.readUInt32LE(20) !== 0) throw corrupt('has a bad header');
  const n = Math.ceil(size / chunkSize);
  if (data.length !== 24 + 32 * n + 32) throw corrupt(`holds ${data.length} bytes, ${24 + 32 * n + 32} expected for ${n} chunks`);
  if (!createHash('sha256').update(data.subarray(0, data.length - 32)).digest().equals(data.subarray(data.length - 32))) throw corrupt('does not match its checksum');
  const digests: Buffer[] = [];
  for (let i = 0; i < n; i++) digests.push(data.subarray(24 + 32 * i, 24 + 32 * (i + 1)));
  return { size, chunkSize, digests };
}

/** A chunk store. Open one with {@link ChunkStore.open}. */
export class ChunkStore {
  /** Object access under the store's prefix. */
  readonly objects: S3ObjectStore;
  /** Where the store is, as opened (for the native jobs). */
  readonly options: S3StoreOptions;
  /** Storage id used in volume ids. */
  readonly storeid: string;
  /** The store's key, when one was given (checked against `store.json`). */
  readonly key: StoreKey | undefined;
  private descriptor: StoreDescriptor | null;

  private constructor(options: S3StoreOptions, storeid: string, key: StoreKey | undefined, descriptor: StoreDescriptor | null) {
    this.objects = new S3ObjectStore(options);
    // the prefix as the object access normalised it, so the native jobs see the same keys
    this.options = { ...options, prefix: this.objects.prefix };
    this.storeid = storeid;
    this.key = key;
    this.descriptor = descriptor;
  }

  /**
   * Opens the store (which need not exist yet: the first backup creates `store.json`). Reads the
   * key file when `options.keyFile` is set and checks it against `store.json`.
   * @throws {@link ChunkStoreError} `ERR_KEY_MISMATCH`, a store error; {@link ChunkBackupError}
   *   `ERR_BACKUP_VERSION` for a store of a newer version, `ERR_BACKUP_CORRUPT` for a `store.json` that is not one.
   */
  static async open(options: S3StoreOptions, o: ChunkStoreOpenOptions = {}): Promise<ChunkStore> {
    const key = options.keyFile !== undefined ? await readKeyFile(options.keyFile) : undefined;
    const store = new ChunkStore(options, o.storeid ?? 'chunks', key, null);
    store.descriptor = await store.readDescriptor();
    if (store.descriptor && key) checkFingerprint(store.descriptor.encryption?.fingerprint ?? null, key, `the chunk store ${store}`);
    return store;
  }

  /** `s3://bucket/prefix`. */
  toString(): string {
    return this.objects.toString();
  }

  /**
   * Who the store is for the host's bitmap ledger: its URL and endpoint (two stores with the same
   * bucket and prefix on different endpoints are different stores).
   */
  get identity(): string {
    return `${this.objects.toString()} at ${this.options.endpoint ?? `aws:${this.options.region ?? 'us-east-1'}`}`;
  }

  /** Whether `store.json` exists (a first backup creates it). */
  get exists(): boolean {
    return this.descriptor !== null;
  }

  /** The store's fixed chunk size. */
  get chunkSize(): number {
    return this.descriptor?.chunkSize ?? CHUNK_SIZE;
  }

  /** The fingerprint recorded in `store.json`, `null` for a store without a key (or not created yet). */
  get fingerprint(): string | null {
    return this.descriptor?.encryption?.fingerprint ?? null;
  }

  private async readDescriptor(): Promise<StoreDescriptor | null> {
    const data = await this.objects.get(STORE_JSON);
    if (data === null) return null;
    let d: Partial<StoreDescriptor>;
    try {
      d = JSON.parse(data.toString('utf8')) as Partial<StoreDescriptor>;
    } catch {
      throw new ChunkBackupError('ERR_BACKUP_CORRUPT', `${this}/${STORE_JSON} is not valid JSON`, { file: STORE_JSON });
    }
    if (d?.format !== CHUNK_STORE_FORMAT || typeof d.version !== 'number') {
      throw new ChunkBackupError('ERR_BACKUP_CORRUPT', `${this}/${STORE_JSON} is not a ${CHUNK_STORE_FORMAT} descriptor`, { file: STORE_JSON });
    }
    if (d.version > CHUNK_STORE_VERSION) {
      throw new ChunkBackupError('ERR_BACKUP_VERSION', `${this} is a chunk store of version ${d.version}; this version reads up to ${CHUNK_STORE_VERSION}: upgrade pve-backup-provider`, { file: STORE_JSON });
    }
    if (typeof d.chunkSize !== 'number' || d.chunkSize <= 0 || (d.encryption !== null && typeof d.encryption?.fingerprint !== 'string')) {
      throw new ChunkBackupError('ERR_BACKUP_CORRUPT', `${this}/${STORE_JSON} has no valid chunk size or encryption`, { file: STORE_JSON });
    }
    return d as StoreDescriptor;
  }

  /**
   * Creates `store.json` if the store has none (the first backup, or `key create --store`):
   * encrypted when a key was given. Read back afterwards, so that of two first backups racing
   * with different keys one fails with `ERR_KEY_MISMATCH` instead of writing chunks the store
   * cannot read.
   */
  async ensureCreated(): Promise<void> {
    if (this.descriptor) return;
    // another host may have created it since this store was opened: a plain PUT would replace
    // it, and every backup written with its key would then be refused (ERR_KEY_MISMATCH)
    this.descriptor = await this.readDescriptor();
    if (this.descriptor) {
      checkFingerprint(this.fingerprint, this.key, `the chunk store ${this}`);
      return;
    }
    const d: StoreDescriptor = {
      format: CHUNK_STORE_FORMAT,
      version: CHUNK_STORE_VERSION,
      chunkSize: CHUNK_SIZE,
      created: Math.floor(Date.now() / 1000),
      encryption: this.key ? { cipher: 'aes-256-gcm', fingerprint: this.key.fingerprint } : null,
    };
    await this.objects.put(STORE_JSON, Buffer.from(`${JSON.stringify(d, null, 2)}\n`));
    this.descriptor = await this.readDescriptor();
    checkFingerprint(this.fingerprint, this.key, `the chunk store ${this}`);
  }

  /**
   * Reads `store.json` again, before a backup is completed: two first backups with different
   * keys (or none) can each create it and read back their own before the other's lands (S3
   * has no create-if-absent `PUT` here), and the one whose descriptor was replaced wrote chunks
   * and blobs under a key that is not the store's: its backup must fail now, not be refused
   * at its restore.
   * @throws {@link ChunkStoreError} `ERR_KEY_MISMATCH`, `ERR_KEY_REQUIRED`; {@link ChunkBackupError}
   *   `ERR_BACKUP_CORRUPT` when `store.json` is gone or damaged.
   */
  async assertDescriptorUnchanged(): Promise<void> {
    const now = await this.readDescriptor();
    if (now === null) throw new ChunkBackupError('ERR_BACKUP_CORRUPT', `${this}/${STORE_JSON} is gone since this backup started`, { file: STORE_JSON });
    const recorded = now.encryption?.fingerprint ?? null;
    checkFingerprint(recorded, this.key, `the chunk store ${this} (its ${STORE_JSON} was replaced since this backup started)`);
  }

  /**
   * The check before any backup's data is read or written: the store exists (or is created, for
   * a backup) and the key matches it.
   * @throws {@link ChunkStoreError} `ERR_KEY_REQUIRED`, `ERR_KEY_MISMATCH`.
   */
  async assertKey(o: { create?: boolean } = {}): Promise<void> {
    if (o.create) await this.ensureCreated();
    checkFingerprint(this.fingerprint, this.key, `the chunk store ${this}`);
  }

  // ----- names ---------------------------------------------------------------------------------

  /** `<storeid>:<volname>`. */
  volid(volname: string): string {
    return `${this.storeid}:${volname}`;
  }

  /**
   * Parses a volume name.
   * @throws {@link ChunkBackupError} `ERR_INVALID_VOLID`.
   */
  parseVolname(volname: string): ParsedVolname {
    const p = matchVolname(volname);
    if (!p) throw new ChunkBackupError('ERR_INVALID_VOLID', `invalid backup volume name ${JSON.stringify(volname)}: expected backup/<vmid>/<qemu|lxc>-<YYYY_MM_DD-HH_MM_SS>`);
    return p;
  }

  /**
   * The volume name of a volume id of this store (a bare volume name is accepted too).
   * @throws {@link ChunkBackupError} `ERR_INVALID_VOLID`, or `ERR_UNKNOWN_VOLUME` for another store's id.
   */
  volnameOf(volid: string): string {
    const i = volid.indexOf(':');
    if (i >= 0) {
      const sid = volid.slice(0, i);
      if (sid !== this.storeid) throw new ChunkBackupError('ERR_UNKNOWN_VOLUME', `unknown volume ${volid}: this store is '${this.storeid}', not '${sid}'`);
      volid = volid.slice(i + 1);
    }
    return this.parseVolname(volid).volname;
  }

  /** The key prefix of a backup: `backups/<vmid>/<vmtype>-<backup-id>/`. */
  backupPrefix(volname: string): string {
    const p = this.parseVolname(volname);
    return `backups/${p.vmid}/${p.dirName}/`;
  }

  /** The key of one object of a backup. */
  objectKey(volname: string, name: string): string {
    return `${this.backupPrefix(volname)}${name}`;
  }

  /**
   * A new backup's volume name for `date` (a suffix `-N` when a backup of that second has objects
   * already, or another backup holds that name), and its writer record (for garbage collection),
   * written before anything else of the backup. End it with {@link BackupWriter.end}.
   *
   * The name is the backup's alone. Two hosts that share a store (two clusters given the same
   * bucket and prefix: guest ids repeat, and schedules fire on the minute) can start a backup of
   * the same guest id in the same second, and a backup's folder gets its first object only after
   * QEMU is set up: both would choose the same free name, and the manifest written last would
   * make the other's backup restore a different guest's disks without an error. S3 has no
   * create-if-absent here (Garage ignores `If-None-Match` on a `PUT`), so the writer record
   * claims the name: each backup writes its record, then reads the others; as each reads after
   * its own write, of two backups that chose the same name at least one sees the other, and one
   * that sees another record naming its backup gives the name up and chooses again.
   */
  async startBackup(vmid: number, vmtype: GuestType, date: Date): Promise<{ volname: string; writer: BackupWriter }> {
    const base = `${vmtype}-${backupIdOf(date)}`;
    for (let attempt = 1; ; attempt++) {
      const taken = new Set((await this.objects.list(`backups/${vmid}/`)).map((o) => o.key.split('/')[2]));
      for (const w of await this.writers()) {
        const p = matchVolname(w.record.volname);
        if (p?.vmid === vmid) taken.add(p.dirName);
      }
      let dirName = base;
      for (let n = 1; taken.has(dirName); n++) dirName = `${base}-${n}`;
      const volname = volnameOf(vmid, dirName);
      const record: WriterRecord = { volname, host: os.hostname(), pid: process.pid, started: Math.floor(Date.now() / 1000) };
      const writer = new BackupWriter(`writers/${randomBytes(8).toString('hex')}.json`, record, this);
      await writer.begin();
      const rival = (await this.writers()).find((w) => w.key !== writer.key && w.record.volname === volname);
      if (!rival) return { volname, writer };
      await writer.end();
      if (attempt === START_ATTEMPTS) {
        throw new ChunkBackupError('ERR_PROVIDER_STATE', `backup of guest ${vmid} in ${this}: ${START_ATTEMPTS} names were taken at once by other backups (the last, ${this.volid(volname)}, by ${rival.record.host} pid ${rival.record.pid}); try again`, { volname });
      }
      // both may have given the name up: a random pause keeps them from meeting again
      await new Promise((r) => setTimeout(r, 100 + Math.floor(Math.random() * 900)));
    }
  }

  /**
   * Every writer record (running backups, and dead ones not yet collected). A record that is
   * not valid JSON counts, naming nothing, until it goes stale.
   */
  async writers(): Promise<StoredWriter[]> {
    const out: StoredWriter[] = [];
    await eachLimit(await this.objects.list('writers/'), 8, async (o) => {
      const data = await this.objects.get(o.key);
      if (data === null) return; // ended between the listing and the read
      let record: WriterRecord;
      try {
        const r = JSON.parse(data.toString('utf8')) as Partial<WriterRecord>;
        record = { volname: String(r.volname ?? ''), host: String(r.host ?? ''), pid: Number(r.pid ?? 0), started: Number(r.started ?? 0) };
      } catch {
        record = { volname: '', host: '', pid: 0, started: 0 };
      }
      out.push({ key: o.key, record, modified: o.modified });
    });
    return out;
  }

  // ----- manifests -----------------------------------------------------------------------------

  /**
   * Writes a backup's manifest with its checksum (and signature, with a key). The last object of
   * a backup: from then on it exists.
   */
  async writeManifest(m: UnsignedManifest): Promise<ChunkManifest> {
    const text = canonical(m);
    const full: ChunkManifest = {
      ...(JSON.parse(text) as UnsignedManifest),
      checksum: createHash('sha256').update(text).digest('hex'),
      ...(this.key ? { signature: this.key.sign(text) } : {}),
    };
    await this.objects.put(this.objectKey(m.volname, MANIFEST), Buffer.from(JSON.stringify(full)));
    return full;
  }

  /**
   * A backup's manifest, checked: JSON, checksum, signature (with a key; a keyed manifest read
   * without the key is checked by its checksum alone), volume name, version, and the key's
   * fingerprint against the one it records when `needKey` (what restore and incremental backups
   * read).
   * @throws {@link ChunkBackupError} `ERR_UNKNOWN_VOLUME` (no manifest: the backup does not
   *   exist), `ERR_BACKUP_CORRUPT`, `ERR_BACKUP_VERSION`; {@link ChunkStoreError} `ERR_KEY_REQUIRED`,
   *   `ERR_KEY_MISMATCH` (with `needKey`).
   */
  async readManifest(volname: string, o: { needKey?: boolean } = {}): Promise<ChunkManifest> {
    const key = this.objectKey(volname, MANIFEST);
    const data = await this.objects.get(key);
    if (data === null) throw new ChunkBackupError('ERR_UNKNOWN_VOLUME', `unknown volume ${this.volid(volname)}: no such backup in ${this}`, { volname });
    const corrupt = (why: string): ChunkBackupError =>
      new ChunkBackupError('ERR_BACKUP_CORRUPT', `backup ${this.volid(volname)} is corrupted: ${this}/${key} ${why}`, { volname, file: key });
    let m: ChunkManifest;
    try {
      m = JSON.parse(data.toString('utf8')) as ChunkManifest;
    } catch {
      throw corrupt('is not valid JSON');
    }
    if (!m || typeof m !== 'object' || m.format !== CHUNK_STORE_FORMAT) throw corrupt(`is not a ${CHUNK_STORE_FORMAT} manifest`);
    if (typeof m.version !== 'number' || m.version > CHUNK_STORE_VERSION) {
      throw new ChunkBackupError('ERR_BACKUP_VERSION', `backup ${this.volid(volname)} was written by a newer pve-backup-provider (manifest version ${m.version}; this version reads up to ${CHUNK_STORE_VERSION}): upgrade it`, { volname, file: key });
    }
    let text: string;
    try {
      text = canonical(m);
    } catch {
      throw corrupt('lacks fields');
    }
    if (m.checksum !== createHash('sha256').update(text).digest('hex')) throw corrupt('does not match its checksum');
    if (o.needKey) checkFingerprint(m.keyFingerprint ?? null, this.key, `backup ${this.volid(volname)}`);
    if (this.key && m.keyFingerprint === this.key.fingerprint && m.signature !== this.key.sign(text)) throw corrupt('does not match its signature (it was changed by someone without the key)');
    if (this.fingerprint !== null && m.keyFingerprint !== this.fingerprint) throw corrupt(`names key ${m.keyFingerprint ?? 'none'}, the store's is ${this.fingerprint}`);
    if (m.volname !== volname) throw corrupt(`describes ${m.volname}`);
    return m;
  }

  // ----- indexes -------------------------------------------------------------------------------

  /**
   * A VM disk's fixed index (docs/chunk-store.md), checked against the manifest (size, SHA-256)
   * and its own trailing checksum, and decoded.
   * @throws {@link ChunkBackupError} `ERR_BACKUP_CORRUPT` naming the object, `ERR_BACKUP_VERSION`.
   */
  async readFixedIndex(m: ChunkManifest, device: string): Promise<FixedIndex> {
    const d = m.devices?.[device];
    if (!d) throw new ChunkBackupError('ERR_UNKNOWN_VOLUME', `backup ${this.volid(m.volname)} has no disk ${device}`, { volname: m.volname });
    const key = this.objectKey(m.volname, d.index);
    const corrupt = (why: string): ChunkBackupError => new ChunkBackupError('ERR_BACKUP_CORRUPT', `backup ${this.volid(m.volname)} is corrupted: ${this}/${key} ${why}`, { volname: m.volname, file: key });
    const data = await this.objects.get(key);
    const want = m.files[d.index];
    if (data === null) throw corrupt('is missing');
    if (!want || data.length !== want.size || sha256(data) !== want.sha256) throw corrupt('is not what its manifest records');
    return decodeFixedIndex(data, corrupt, (v) => new ChunkBackupError('ERR_BACKUP_VERSION', `${this}/${key} is of index version ${v}; this version reads 1: upgrade pve-backup-provider`, { volname: m.volname, file: key }));
  }

  /**
   * A container backup's dynamic index, checked against the manifest (present, size, SHA-256)
   * and decoded by the core (its trailing checksum, its entries).
   * @returns Its key, relative to the store's prefix, and the chunks it names in stream order.
   * @throws {@link ChunkBackupError} `ERR_UNKNOWN_VOLUME` (not a container backup), `ERR_BACKUP_CORRUPT` naming the object, `ERR_BACKUP_VERSION`.
   */
  async readArchiveIndex(m: ChunkManifest): Promise<{ key: string; digests: Buffer[] }> {
    const a = m.archive;
    if (!a) throw new ChunkBackupError('ERR_UNKNOWN_VOLUME', `backup ${this.volid(m.volname)} has no container archive`, { volname: m.volname });
    const key = this.objectKey(m.volname, a.index);
    const data = await this.objects.get(key);
    const want = m.files[a.index];
    const corrupt = (why: string): ChunkBackupError => new ChunkBackupError('ERR_BACKUP_CORRUPT', `backup ${this.volid(m.volname)} is corrupted: ${this}/${key} ${why}`, { volname: m.volname, file: key });
    if (data === null) throw corrupt('is missing');
    if (!want || data.length !== want.size || sha256(data) !== want.sha256) throw corrupt('is not what its manifest records');
    let all: Buffer;
    try {
      all = native.chunkIndexDigests(data, key);
    } catch (err) {
      const e = fromNative(err) as Error & { code?: string };
      throw new ChunkBackupError(e.code === 'ERR_BACKUP_VERSION' ? 'ERR_BACKUP_VERSION' : 'ERR_BACKUP_CORRUPT', `backup ${this.volid(m.volname)}: ${this}/${e.message}`, { volname: m.volname, file: key, cause: e });
    }
    const digests: Buffer[] = [];
    for (let i = 0; i < all.length; i += 32) digests.push(all.subarray(i, i + 32));
    return { key, digests };
  }

  /**
   * The chunks of a previous backup's index (`digests`) an incremental backup must not take as
   * stored: those a garbage collection moved aside (fossils, which a later run may delete). One
   * listing of `fossils/`, not a request per chunk (docs/chunk-store.md, "The check of the
   * previous index"); sound only after the backup's writer record is written
   * ({@link ChunkStore.startBackup} does that first). A chunk lost outside the store's
   * operations is not seen here: `verify` finds it (see {@link ChunkStore.readVerifyState}).
   * @returns Their keys, sorted.
   */
  async missingChunks(digests: Buffer[]): Promise<string[]> {
    const missing = await this.objects.missingChunks(Buffer.concat(digests));
    const keys: string[] = [];
    for (let i = 0; i < missing.length; i += 32) keys.push(chunkKey(missing.subarray(i, i + 32)));
    return keys.sort();
  }

  /**
   * Moves a chunk that verify found damaged (twice) out of the readers' and the backups' way:
   * `chunks/…/<d>` and its fossils to `bad/<d[0..2]>/<d[2..4]>/<d>.<unix seconds>`, kept for
   * whoever wants to look at them and never read again. Left where it was, a backup would take
   * it as stored (`HEAD` says present) and name it again, so no backup after the damage could be
   * restored; gone, the next backup that reads its content stores it again, and every backup
   * naming it restores again. Proxmox Backup Server renames a corrupt chunk to `<digest>.0.bad`
   * for the same reason (proxmox-backup `src/backup/verify.rs`, `rename_corrupted_chunk`).
   * @returns The keys moved.
   */
  async setAsideDamagedChunk(digest: Buffer): Promise<string[]> {
    const hex = digest.toString('hex');
    const aside = `bad/${hex.slice(0, 2)}/${hex.slice(2, 4)}/${hex}.${Math.floor(Date.now() / 1000)}`;
    const moved: string[] = [];
    const keys = [chunkKey(digest), ...(await this.objects.list(`fossils/${hex.slice(0, 2)}/${hex.slice(2, 4)}/${hex}.`)).map((o) => o.key)];
    for (const [i, key] of keys.entries()) {
      if (!(await this.objects.copy(key, i === 0 ? aside : `${aside}.${i}`))) continue; // not there
      await this.objects.delete(key);
      moved.push(key);
    }
    return moved;
  }

  // ----- bitmap owner -------------------------------------------------------------------------

  /**
   * The store's side of the bitmap ledger: the backup of guest `vmid` that last may have told
   * QEMU success for its bitmap, from whichever host (`bitmaps/<vmid>.json`). The host's ledger
   * (`BitmapLedger`, lib/provider/bitmap-ledger.ts) stays on its host, but QEMU's bitmap goes
   * with the guest: a live migration carries it (qemu-server enables the `dirty-bitmaps`
   * capability when pve-qemu reports `pbs-dirty-bitmap-migration`: `QemuMigrate/Helpers.pm`).
   * After a backup on another host the bitmap counts writes since that backup, while this
   * host's ledger still names its own older one; an incremental backup over that would miss
   * every write in between, silently. So a backup is incremental only when both name it.
   * @returns The volume name, or `undefined` when none is recorded or the record does not parse.
   */
  async bitmapOwner(vmid: number): Promise<string | undefined> {
    const data = await this.objects.get(`bitmaps/${vmid}.json`);
    if (data === null) return undefined;
    try {
      const v = (JSON.parse(data.toString('utf8')) as { volname?: unknown }).volname;
      return typeof v === 'string' ? v : undefined;
    } catch {
      return undefined;
    }
  }

  /** Records {@link bitmapOwner}: written with the host's ledger, before a backup reads a disk. */
  async setBitmapOwner(vmid: number, volname: string): Promise<void> {
    await this.objects.put(`bitmaps/${vmid}.json`, Buffer.from(`${JSON.stringify({ volname, host: os.hostname(), time: Math.floor(Date.now() / 1000) })}\n`));
  }

  // ----- verify state -------------------------------------------------------------------------

  /** Records a backup's verify verdict (`verify.json`). */
  async writeVerifyState(volname: string, v: ChunkVerifyState): Promise<void> {
    await this.objects.put(this.objectKey(volname, VERIFY_STATE), Buffer.from(JSON.stringify(v), 'utf8'));
  }

  /**
   * A backup's last verify verdict, if one was recorded. One that does not parse counts as
   * `failed`: the object only ever lowers trust, so damage to it must not raise it.
   */
  async readVerifyState(volname: string): Promise<ChunkVerifyState | undefined> {
    const data = await this.objects.get(this.objectKey(volname, VERIFY_STATE));
    if (data === null) return undefined;
    try {
      const v = JSON.parse(data.toString('utf8')) as Partial<ChunkVerifyState>;
      if (v.state === 'ok' || v.state === 'failed') return { state: v.state, time: Number(v.time ?? 0), missing: Number(v.missing ?? 0), bad: Number(v.bad ?? 0) };
    } catch {
      // below
    }
    return { state: 'failed', time: 0, missing: 0, bad: 0 };
  }

  // ----- blobs ---------------------------------------------------------------------------------

  /** Stores a small file of a backup as a blob (encrypted with a key); returns how the manifest records it. */
  async putBlob(volname: string, name: string, data: Buffer): Promise<ChunkManifestFile> {
    const object = encodeBlob(data, this.key);
    await this.objects.put(this.objectKey(volname, name), object);
    return { size: object.length, sha256: sha256(object) };
  }

  /**
   * A blob of a backup, checked against the manifest's record and decoded.
   * @throws {@link ChunkBackupError} `ERR_BACKUP_CORRUPT` (missing, or not what the manifest records).
   */
  async getBlob(m: ChunkManifest, name: string): Promise<Buffer> {
    const key = this.objectKey(m.volname, name);
    const want = m.files[name];
    const data = await this.objects.get(key);
    const corrupt = (why: string): ChunkBackupError => new ChunkBackupError('ERR_BACKUP_CORRUPT', `backup ${this.volid(m.volname)} is corrupted: ${this}/${key} ${why}`, { volname: m.volname, file: key });
    if (!want) throw corrupt('is not in its manifest');
    if (data === null) throw corrupt('is missing');
    if (data.length !== want.size || sha256(data) !== want.sha256) throw corrupt('does not match its manifest');
    return decodeBlob(data, this.key, key, m.volname);
  }

  // ----- listing, attributes -------------------------------------------------------------------

  /** Every backup with a manifest, or those of `vmid`, oldest first. Perl: `list_volumes`. */
  async listBackups(vmid?: number): Promise<ChunkBackupInfo[]> {
    const objects = await this.objects.list(vmid !== undefined ? `backups/${vmid}/` : 'backups/');
    const groups = new Map<string, Set<string>>();
    for (const o of objects) {
      const parts = o.key.split('/');
      if (parts.length !== 4 || !/^[1-9]\d*$/.test(parts[1]!) || !isBackupDirName(parts[2]!)) continue;
      const volname = volnameOf(Number(parts[1]), parts[2]!);
      if (!groups.has(volname)) groups.set(volname, new Set());
      groups.get(volname)!.add(parts[3]!);
    }
    // manifests (and notes) read a few at once: one request each, mostly waiting for the store
    const found = [...groups].filter(([, names]) => names.has(MANIFEST)); // no manifest: the backup does not exist (running, or failed)
    const out: ChunkBackupInfo[] = [];
    await eachLimit(found, 8, async ([volname, names]) => {
      // deleted between the listing and the read (a prune elsewhere; or a store whose
      // listing lags its deletes): it does not exist any more
      const info = await this.describe(volname, names).catch((err: unknown) => {
        if (err instanceof ChunkBackupError && err.code === 'ERR_UNKNOWN_VOLUME') return undefined;
        throw err;
      });
      if (info) out.push(info);
    });
    return out.sort(oldestFirst);
  }

  /**
   * One backup as {@link listBackups} lists it, from one listing of its own objects (not of every
   * backup of its guest).
   * @throws {@link ChunkBackupError} `ERR_UNKNOWN_VOLUME` (no manifest: no such backup), `ERR_BACKUP_VERSION`.
   */
  async backupInfo(volname: string): Promise<ChunkBackupInfo> {
    const prefix = this.backupPrefix(volname);
    const names = new Set((await this.objects.list(prefix)).map((o) => o.key.slice(prefix.length)));
    if (!names.has(MANIFEST)) throw new ChunkBackupError('ERR_UNKNOWN_VOLUME', `unknown volume ${this.volid(volname)}: no such backup in ${this}`, { volname });
    return this.describe(volname, names);
  }

  /** A listed backup: its manifest (`corrupt` when it does not check) and attributes. */
  private async describe(volname: string, names: Set<string>): Promise<ChunkBackupInfo> {
    const p = this.parseVolname(volname);
    const notes = names.has('notes') ? (await this.objects.get(this.objectKey(volname, 'notes')))?.toString('utf8') : undefined;
    const base = { volid: this.volid(volname), volname, vmid: p.vmid, subtype: p.vmtype, protected: names.has('protected'), ...(notes !== undefined ? { notes } : {}) };
    try {
      const m = await this.readManifest(volname);
      const size = m.devices ? Object.values(m.devices).reduce((n, d) => n + d.size, 0) : (m.archive?.size ?? 0);
      const previous = Object.values(m.devices ?? {}).find((d) => d.previous)?.previous ?? m.archive?.previous;
      return { ...base, ctime: m.ctime, size, status: 'ok', ...(previous ? { previous: this.volid(previous) } : {}) };
    } catch (err) {
      if (!(err instanceof ChunkBackupError) || err.code !== 'ERR_BACKUP_CORRUPT') throw err;
      return { ...base, ctime: ctimeOfBackupId(p.backupId), size: 0, status: 'corrupt' };
    }
  }

  /** Notes and protected flag of an existing backup. Perl: `get_volume_attribute`. */
  async attributes(volname: string): Promise<{ protected: boolean; notes?: string }> {
    await this.assertExists(volname);
    const prot = (await this.objects.head(this.objectKey(volname, 'protected'))) !== null;
    const notes = (await this.objects.get(this.objectKey(volname, 'notes')))?.toString('utf8');
    return { protected: prot, ...(notes !== undefined ? { notes } : {}) };
  }

  private async assertExists(volname: string): Promise<void> {
    if ((await this.objects.head(this.objectKey(volname, MANIFEST))) === null) {
      throw new ChunkBackupError('ERR_UNKNOWN_VOLUME', `unknown volume ${this.volid(volname)}: no such backup in ${this}`, { volname });
    }
  }

  /** Sets (or, with an empty string, removes) a backup's notes: an object of its own, so the manifest is never rewritten. */
  async setNotes(volname: string, notes: string): Promise<void> {
    await this.assertExists(volname);
    const key = this.objectKey(volname, 'notes');
    if (notes === '') await this.objects.delete(key);
    else await this.objects.put(key, Buffer.from(notes, 'utf8'));
  }

  /** Sets or clears the protected flag (the object `protected`, present = protected). */
  async setProtected(volname: string, value: boolean): Promise<void> {
    await this.assertExists(volname);
    const key = this.objectKey(volname, 'protected');
    if (value) await this.objects.put(key, Buffer.alloc(0));
    else await this.objects.delete(key);
  }

  // ----- removal -------------------------------------------------------------------------------

  /**
   * Removes a backup's objects: the manifest first (from then on it does not exist), then its
   * indexes, blobs, attributes and verify verdict. Its chunks stay for garbage collection (other backups may
   * name them; a running incremental backup may take chunks from its index: the collector's
   * fossils cover that, docs/chunk-store.md). Also what a failed backup leaves is removed this way.
   */
  async removeObjects(volname: string): Promise<void> {
    const prefix = this.backupPrefix(volname);
    await this.objects.delete(`${prefix}${MANIFEST}`);
    for (const o of await this.objects.list(prefix)) await this.objects.delete(o.key);
  }

  /**
   * Deletes a backup: refused for a protected one without `force`. Perl: `free_image`.
   * @throws {@link ChunkBackupError} `ERR_UNKNOWN_VOLUME`, `ERR_BACKUP_PROTECTED`.
   */
  async deleteBackup(volname: string, o: { force?: boolean } = {}): Promise<void> {
    const attrs = await this.attributes(volname);
    if (attrs.protected && !o.force) {
      throw new ChunkBackupError('ERR_BACKUP_PROTECTED', `backup ${this.volid(volname)} is protected: unprotect it first, or delete with force`, { volname });
    }
    await this.removeObjects(volname);
  }

  /**
   * Applies retention (Proxmox's keep-* rules, `markBackups`) to the backups of one guest or of
   * every guest. Protected backups are kept and do not count; corrupt ones are neither counted
   * nor removed. Removing is deleting manifests and indexes; no chunk is touched.
   * Perl: `prune_backups($scfg, $storeid, $keep, $vmid, $type, $dryrun)`.
   */
  async pruneBackups(o: { keep: PruneOptions; vmid?: number; vmtype?: GuestType; dryRun?: boolean }): Promise<ChunkPruneEntry[]> {
    const all = (await this.listBackups(o.vmid)).filter((b) => b.status === 'ok' && (!o.vmtype || b.subtype === o.vmtype));
    const groups = new Map<string, ChunkBackupInfo[]>();
    for (const b of all) groups.set(`${b.vmid}/${b.subtype}`, [...(groups.get(`${b.vmid}/${b.subtype}`) ?? []), b]);
    const out: ChunkPruneEntry[] = [];
    for (const list of groups.values()) {
      const entries: PruneEntry[] = list.map((b) => ({ volname: b.volname, ctime: b.ctime, protected: b.protected }));
      for (const mk of markBackups(entries, o.keep)) {
        const b = list.find((x) => x.volname === mk.volname)!;
        out.push({ ...mk, volid: b.volid, vmid: b.vmid, subtype: b.subtype });
      }
    }
    if (!o.dryRun) for (const e of out) if (e.mark === 'remove') await this.removeObjects(e.volname);
    return out;
  }
}

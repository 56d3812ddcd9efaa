/**
 * The storage side of the directory provider: a folder of backups that can be listed, sized,
 * pruned, deleted, verified, annotated (notes, protected flag), and the bookkeeping the provider
 * needs for incremental backups. What Proxmox's storage plugin does for a backup storage.
 *
 * Invariants the store keeps:
 * - a backup is complete exactly when its `manifest.json` exists (written last, atomically);
 * - a kept backup's chain (the backups its images are backed by) is never removed: prune keeps
 *   the bases of kept backups, delete merges a base into its child first (after checking what it
 *   merges), and only restorable backups count as kept;
 * - nothing in it is open to other users: folders `0700`, files `0600`, whatever the umask.
 *
 * @packageDocumentation
 */
import { execFile } from 'node:child_process';
import { access, chmod, lstat, mkdir, open, readFile, readdir, rename, rm, stat, statfs } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';

import type { GuestType, PruneOptions } from '../provider/api.js';
import { mapLimit } from '../concurrency.js';
import { currentOwner, ownerIsDead } from '../owner.js';
import { checkImageDigests, digestImage } from './digests.js';
import { requireTool } from '../tools.js';
import { DirectoryStoreError } from './errors.js';
import {
  LOCK,
  MANIFEST,
  PREVIOUS_INFO,
  PRIVATE_DIR_MODE,
  PRIVATE_FILE_MODE,
  STORE_FORMAT,
  STORE_MARKER,
  STORE_VERSION,
  MANIFEST_VERSION,
  backingFileOf,
  backupIdOf,
  hashFile,
  hashTree,
  isBackupDirName,
  manifestChecksum,
  mkdirPrivate,
  parseVolname,
  volnameOf,
  writeFileAtomic,
  type Manifest,
  type ParsedVolname,
} from './layout.js';
import { markBackups, type PruneEntry, type PruneMark } from '../provider/prune.js';
import { ctimeOfBackupId, oldestFirst } from '../provider/volname.js';
import { fsyncPath, isPlainFileName, withFileLock } from '../provider/files.js';

const execFileP = promisify(execFile);

/**
 * A merge into a backup (see {@link DirectoryStore.deleteBackup}) replaces three of its files,
 * image, digest file and manifest, which no single rename can do. The merged files are made under
 * `<file>.merge` names, then the backup's next manifest is written as `manifest.json.next`: the
 * merge is committed from then on, and whoever reads the backup next finishes it (moves the merged
 * files and the next manifest into place; {@link DirectoryStore.finishMerge}). So a crash at any
 * point leaves the backup either as it was or merged, never with a manifest its files do not match.
 */
const NEXT_MANIFEST = `${MANIFEST}.next`;
/**
 * Prefix a backup folder is renamed to before its files are removed ({@link DirectoryStore.removeBackupDir}):
 * one rename takes it out of the listing, so a crash while its files go never leaves it listed as
 * complete with some of them missing.
 */
const REMOVING = '.removing-';
/** The lock of changes to a guest's backups, in its folder (see {@link DirectoryStore.withGuestLocks}). */
const CHANGING = '.changing';
const MERGED = '.merge';

/** A backup as {@link DirectoryStore.listBackups} lists it (Proxmox's `list_volumes` fields, plus chain and status). */
export interface BackupInfo {
  /** `<storeid>:backup/<vmid>/<vmtype>-<backup-id>`. */
  volid: string;
  volname: string;
  vmid: number;
  /** Guest type (Proxmox: `subtype`). */
  subtype: GuestType;
  /** Unix time (s) the backup started. */
  ctime: number;
  /** Bytes the backup's files take. */
  size: number;
  /** `qcow2` (VM images), `tar` or `directory` (containers); absent when incomplete. */
  format?: 'qcow2' | 'tar' | 'directory';
  /** Volume id of the backup this one builds on (incremental VM backups). */
  parent?: string;
  /**
   * `ok`; `incomplete` (no manifest: interrupted; prune removes it); `in-progress` (no manifest,
   * its writer is alive, or its folder is under a minute old and its lock not written yet); `corrupt` (the manifest does not match its checksum; left for an operator);
   * `broken` (its own manifest is fine but a backup its chain builds on is missing, incomplete,
   * corrupt or broken itself, so it cannot be restored; prune neither counts nor removes it).
   */
  status: 'ok' | 'incomplete' | 'in-progress' | 'corrupt' | 'broken';
  protected: boolean;
  notes?: string;
}

/**
 * How a check treats disk images recorded by content digests: `digestImages: false` checks only
 * their digest files (against the manifest), leaving the images to a reader that checks what it
 * reads (the native restore) or to {@link DirectoryStore.assertDeviceImages}.
 */
export interface ImageChecks {
  digestImages?: boolean;
}

/** Result of {@link DirectoryStore.verifyBackup}. */
export interface VerifyResult {
  volid: string;
  ok: boolean;
  /** One line per problem, each naming the file concerned. */
  problems: string[];
}

/** One backup's fate in {@link DirectoryStore.pruneBackups}. */
export interface PruneResultEntry extends PruneMark {
  volid: string;
  vmid: number;
  subtype: GuestType;
}

/** Bookkeeping for incremental backups: the last complete VM backup of a guest. Perl: the seed's `previous-info`. */
export interface PreviousInfo {
  /** Volume name of the last complete backup. */
  volname: string;
  /** Devices it holds. */
  devices: string[];
  /** Bitmap chain id it was taken with (seed-generation providers name QEMU's bitmap by it). */
  bitmapId?: string;
}

interface StoreMarker {
  format: string;
  version: number;
  storeid: string;
  created: number;
}

const pidAlive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
};

/**
 * How long a backup folder without a lock file counts as being created: {@link
 * DirectoryStore.createBackupDir} makes the folder, then writes its lock. Another process (a
 * prune from the GUI, `pvesm`) looking in between must not take the new folder for a leftover.
 */
const LOCKLESS_GRACE_MS = 60_000;

/**
 * Whether the writer named by a backup's lock file may still be writing: an owner record (pid and
 * start time, so a reused pid is not taken for the writer), or a bare pid from older versions. A
 * folder without a lock file is being created while it is younger than {@link LOCKLESS_GRACE_MS}.
 */
async function writerAlive(lockFile: string): Promise<boolean> {
  const text = await readFile(lockFile, 'utf8').catch((err: NodeJS.ErrnoException) => (err.code === 'ENOENT' ? null : undefined));
  if (text === null) {
    const st = await stat(path.dirname(lockFile)).catch(() => undefined);
    return st !== undefined && Date.now() - st.mtimeMs < LOCKLESS_GRACE_MS;
  }
  const owner = text === undefined ? undefined : (() => {
    try {
      return JSON.parse(text) as unknown;
    } catch {
      return undefined;
    }
  })();
  if (typeof owner === 'number') return pidAlive(owner);
  return owner !== undefined && !ownerIsDead(owner);
}

/**
 * The one definition of an unfinished backup (what {@link BackupInfo} calls `incomplete` and
 * `in-progress`): a backup folder without its `manifest.json`, which is written last. It is
 * `in-progress` while its writer may still be writing, `incomplete` once it is gone. A folder
 * with a manifest is neither (`undefined`), whatever the manifest holds: one that does not check
 * is `corrupt`, left for an operator, never removed as a leftover. One `access` of the manifest,
 * and the lock file when there is none: no manifest is read.
 */
async function unfinishedStatus(dir: string): Promise<'in-progress' | 'incomplete' | undefined> {
  const hasManifest = await access(path.join(dir, MANIFEST)).then(
    () => true,
    (err: NodeJS.ErrnoException) => {
      // ENOTDIR: the "folder" is a file (or gone and replaced by one): no manifest there either
      if (err.code === 'ENOENT' || err.code === 'ENOTDIR') return false;
      throw err;
    },
  );
  if (hasManifest) return undefined;
  return (await writerAlive(path.join(dir, LOCK))) ? 'in-progress' : 'incomplete';
}

/** How many backup folders are looked at at once when listing (a few stats and small reads each). */
const DESCRIBE_CONCURRENCY = 8;

/** A directory backup store. Open one with {@link DirectoryStore.open} or {@link DirectoryStore.create}. */
export class DirectoryStore {
  /** Absolute path of the store. */
  readonly root: string;
  /** Storage id used in volume ids. */
  readonly storeid: string;

  private constructor(root: string, storeid: string) {
    this.root = root;
    this.storeid = storeid;
  }

  /**
   * Opens an existing store.
   * @param root - The store's folder.
   * @param options - `storeid` to use in volume ids (default: the one recorded at creation).
   * @throws {@link DirectoryStoreError} `ERR_NOT_A_STORE`.
   */
  static async open(root: string, options: { storeid?: string } = {}): Promise<DirectoryStore> {
    const abs = path.resolve(root);
    let marker: StoreMarker;
    try {
      marker = JSON.parse(await readFile(path.join(abs, STORE_MARKER), 'utf8')) as StoreMarker;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      const why = code === 'ENOENT' || code === 'ENOTDIR' ? `${STORE_MARKER} is missing` : `${STORE_MARKER} is unreadable (${(err as Error).message})`;
      throw new DirectoryStoreError('ERR_NOT_A_STORE', `${abs} is not a backup store: ${why}`, { cause: err });
    }
    if (marker?.format !== STORE_FORMAT || typeof marker.version !== 'number') {
      throw new DirectoryStoreError('ERR_NOT_A_STORE', `${abs} is not a backup store: ${STORE_MARKER} is not a ${STORE_FORMAT} marker`);
    }
    if (marker.version > STORE_VERSION) {
      throw new DirectoryStoreError('ERR_NOT_A_STORE', `${abs} is a store of layout version ${marker.version}; this version reads up to ${STORE_VERSION}: upgrade pve-backup-provider`);
    }
    return new DirectoryStore(abs, options.storeid ?? marker.storeid);
  }

  /**
   * Opens the store at `root`, creating it when the folder is missing or empty.
   * @throws {@link DirectoryStoreError} `ERR_NOT_A_STORE` when the folder has other content.
   */
  static async create(root: string, options: { storeid?: string } = {}): Promise<DirectoryStore> {
    const abs = path.resolve(root);
    const st = await stat(abs).catch(() => undefined);
    if (st && !st.isDirectory()) throw new DirectoryStoreError('ERR_NOT_A_STORE', `${abs} is not a backup store: not a directory`);
    if (st && (await readdir(abs)).includes(STORE_MARKER)) return DirectoryStore.open(abs, options);
    if (st && (await readdir(abs)).length > 0) {
      throw new DirectoryStoreError('ERR_NOT_A_STORE', `${abs} is not a backup store: it has other content (${STORE_MARKER} is missing); use an empty folder`);
    }
    await mkdirPrivate(abs);
    const marker: StoreMarker = { format: STORE_FORMAT, version: STORE_VERSION, storeid: options.storeid ?? 'directory', created: Math.floor(Date.now() / 1000) };
    await writeFileAtomic(path.join(abs, STORE_MARKER), `${JSON.stringify(marker, null, 2)}\n`);
    return new DirectoryStore(abs, marker.storeid);
  }

  // ----- names ---------------------------------------------------------------------------------

  /** `<storeid>:<volname>`. */
  volid(volname: string): string {
    return `${this.storeid}:${volname}`;
  }

  /**
   * The volume name of a volume id of this store (a bare volume name is accepted too).
   * @throws {@link DirectoryStoreError} `ERR_INVALID_VOLID`, or `ERR_UNKNOWN_VOLUME` for another store's id.
   */
  volnameOf(volid: string): string {
    const i = volid.indexOf(':');
    if (i >= 0) {
      const sid = volid.slice(0, i);
      if (sid !== this.storeid) throw new DirectoryStoreError('ERR_UNKNOWN_VOLUME', `unknown volume ${volid}: this store is '${this.storeid}', not '${sid}'`);
      volid = volid.slice(i + 1);
    }
    return parseVolname(volid).volname;
  }

  /** Parses a volume name. Perl: `parse_volname`. */
  parseVolname(volname: string): ParsedVolname {
    return parseVolname(volname);
  }

  /** The folder of a backup. */
  backupDir(volname: string): string {
    const p = parseVolname(volname);
    return path.join(this.root, String(p.vmid), p.dirName);
  }

  // ----- creating backups (used by the provider) ----------------------------------------------

  /**
   * Creates the folder of a new backup, named after `date` (a suffix `-N` when that second is
   * taken), with a lock file naming this process.
   */
  async createBackupDir(vmid: number, vmtype: GuestType, date: Date): Promise<{ volname: string; dir: string }> {
    const parent = path.join(this.root, String(vmid));
    await mkdirPrivate(parent);
    const base = `${vmtype}-${backupIdOf(date)}`;
    for (let n = 0; ; n++) {
      const dirName = n === 0 ? base : `${base}-${n}`;
      const dir = path.join(parent, dirName);
      try {
        await mkdir(dir, { mode: PRIVATE_DIR_MODE });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EEXIST') continue;
        throw err;
      }
      // private before anything is written into it: the umask may have left it open
      await chmod(dir, PRIVATE_DIR_MODE);
      const lock = await open(path.join(dir, LOCK), 'w', PRIVATE_FILE_MODE);
      try {
        await lock.writeFile(`${JSON.stringify(currentOwner())}\n`);
      } finally {
        await lock.close();
      }
      return { volname: volnameOf(vmid, dirName), dir };
    }
  }

  /** Writes a backup's manifest (last step: the backup is complete from then on) and drops its lock. */
  async commitManifest(manifest: Omit<Manifest, 'checksum'>): Promise<Manifest> {
    const full: Manifest = { ...manifest, checksum: manifestChecksum(manifest) };
    const dir = this.backupDir(manifest.volname);
    await privatise(dir);
    await writeFileAtomic(path.join(dir, MANIFEST), `${JSON.stringify(full, null, 2)}\n`);
    await rm(path.join(dir, LOCK), { force: true });
    return full;
  }

  /** The last complete VM backup of a guest, if it still exists and is complete with its whole chain. */
  async readPreviousInfo(vmid: number): Promise<PreviousInfo | undefined> {
    let info: PreviousInfo;
    try {
      info = JSON.parse(await readFile(path.join(this.root, String(vmid), PREVIOUS_INFO), 'utf8')) as PreviousInfo;
      parseVolname(info.volname);
    } catch {
      return undefined;
    }
    // the whole chain: an incremental over a backup whose own chain is broken could not be restored
    const ok = await this.chain(info.volname).then(() => true, () => false);
    return ok ? info : undefined;
  }

  /** Records the last complete VM backup of a guest (atomically). */
  async writePreviousInfo(vmid: number, info: PreviousInfo): Promise<void> {
    await writeFileAtomic(path.join(this.root, String(vmid), PREVIOUS_INFO), `${JSON.stringify(info)}\n`);
  }

  /** Forgets the last complete VM backup of a guest: its next backup is full. */
  async forgetPreviousInfo(vmid: number): Promise<void> {
    await rm(path.join(this.root, String(vmid), PREVIOUS_INFO), { force: true });
  }

  // ----- reading -------------------------------------------------------------------------------

  /**
   * A backup's manifest, checked against its own checksum.
   * @throws {@link DirectoryStoreError} `ERR_UNKNOWN_VOLUME`, `ERR_BACKUP_INCOMPLETE`, `ERR_BACKUP_CORRUPT`.
   */
  async readManifest(volname: string): Promise<Manifest> {
    const dir = this.backupDir(volname);
    await this.finishMerge(volname);
    const file = path.join(dir, MANIFEST);
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      if (!(await stat(dir).then((s) => s.isDirectory(), () => false))) {
        throw new DirectoryStoreError('ERR_UNKNOWN_VOLUME', `unknown volume ${this.volid(volname)}: no such backup in ${this.root}`, { volname });
      }
      throw new DirectoryStoreError('ERR_BACKUP_INCOMPLETE', `backup ${this.volid(volname)} is incomplete (no ${MANIFEST}): it was interrupted or is still being written`, { volname });
    }
    let m: Manifest;
    try {
      m = JSON.parse(text) as Manifest;
    } catch {
      throw new DirectoryStoreError('ERR_BACKUP_CORRUPT', `backup ${this.volid(volname)} is corrupted: ${file} is not valid JSON`, { volname, file });
    }
    if (!m || typeof m !== 'object' || m.checksum !== manifestChecksum(m)) {
      throw new DirectoryStoreError('ERR_BACKUP_CORRUPT', `backup ${this.volid(volname)} is corrupted: ${file} does not match its checksum`, { volname, file });
    }
    if (m.volname !== volname) {
      throw new DirectoryStoreError('ERR_BACKUP_CORRUPT', `backup ${this.volid(volname)} is corrupted: ${file} describes ${m.volname}`, { volname, file });
    }
    const foreign = nameOutsideFolder(m);
    if (foreign !== undefined) {
      throw new DirectoryStoreError('ERR_BACKUP_CORRUPT', `backup ${this.volid(volname)} is corrupted: ${file} names ${JSON.stringify(foreign)}, which is not a file of its folder`, { volname, file });
    }
    if (typeof m.version !== 'number' || m.version > MANIFEST_VERSION) {
      throw new DirectoryStoreError('ERR_BACKUP_VERSION', `backup ${this.volid(volname)} was written by a newer pve-backup-provider (manifest version ${m.version}; this version reads up to ${MANIFEST_VERSION}): upgrade it`, { volname, file });
    }
    return m;
  }

  /**
   * Every backup, or those of `vmid`, oldest first; incomplete ones included (status `incomplete`). Perl: `list_volumes`.
   * @throws {@link DirectoryStoreError} `ERR_BACKUP_VERSION` for a backup written by a newer
   *   version (it is complete: neither listed as unfinished nor pruned as such).
   */
  async listBackups(vmid?: number): Promise<BackupInfo[]> {
    const vmids = await this.guests(vmid);
    const volnames: string[] = [];
    for (const v of vmids) volnames.push(...(await this.backupVolnames(v)));
    // a few at once: each is a handful of small reads, mostly waiting for the file system
    const out = await mapLimit(volnames, DESCRIBE_CONCURRENCY, (v) => this.describe(v));
    out.sort(oldestFirst);
    // A chain is only as good as its oldest link: oldest first, so a parent's status is final
    // when its children are looked at (a parent is always older than what builds on it).
    const byVolid = new Map(out.map((b) => [b.volid, b]));
    for (const b of out) if (b.status === 'ok' && b.parent && byVolid.get(b.parent)?.status !== 'ok') b.status = 'broken';
    return out;
  }

  /**
   * One backup as {@link listBackups} lists it, without listing the others: its `broken` status is
   * judged along its chain ({@link chain}: the manifests of the backups it builds on), which is
   * what the listing's pass over every backup decides for it.
   * @throws {@link DirectoryStoreError} `ERR_UNKNOWN_VOLUME`, `ERR_BACKUP_VERSION`.
   */
  async backupInfo(volname: string): Promise<BackupInfo> {
    if (!(await stat(this.backupDir(volname)).then((s) => s.isDirectory(), () => false))) {
      throw new DirectoryStoreError('ERR_UNKNOWN_VOLUME', `unknown volume ${this.volid(volname)}: no such backup in ${this.root}`, { volname });
    }
    const b = await this.describe(volname);
    if (b.status === 'ok' && b.parent && !(await this.chain(volname).then(() => true, () => false))) b.status = 'broken';
    return b;
  }

  /** `[vmid]`, or every guest with a folder in the store. */
  private async guests(vmid?: number): Promise<number[]> {
    return vmid !== undefined ? [vmid] : (await readdir(this.root).catch(() => [] as string[])).filter((n) => /^[1-9]\d*$/.test(n)).map(Number);
  }

  /**
   * Runs `fn` holding the locks of changes to the backups of `vmids` (`<vmid>/.changing`): a delete
   * merges a backup into its child, replacing the child's files, and two at once (a `delete` while
   * a prune or another `delete` of the same guest runs, from this node or another of a shared
   * store) would each take the other's files for leftovers. Backups being written are guarded by
   * their own lock files, not this one.
   * @param waitMs - How long to wait for a lock another holder has (default: not at all).
   * @throws {@link DirectoryStoreError} `ERR_STORE_BUSY` while another holder keeps one.
   */
  private async withGuestLocks<T>(vmids: number[], fn: () => Promise<T>, waitMs?: number): Promise<T> {
    const [vmid, ...rest] = vmids;
    if (vmid === undefined) return fn();
    const dir = path.join(this.root, String(vmid));
    await mkdirPrivate(dir);
    const busy = (): Error => new DirectoryStoreError('ERR_STORE_BUSY', `backups of guest ${vmid} in ${this.root} are being deleted or pruned by another process: try again when it is done`);
    return withFileLock(path.join(dir, CHANGING), busy, () => this.withGuestLocks(rest, fn, waitMs), { waitMs });
  }

  /**
   * Rewrites the manifest of a complete backup (`change` gets it without its checksum and may
   * write files into the backup first), holding its guest's lock: a delete merging the backup it
   * builds on into it rewrites the same manifest, and a prune may remove the backup; read and
   * written outside the lock, the merge's manifest could be overwritten by the one it replaced.
   * @param waitMs - How long to wait while a delete or prune holds the lock.
   * @throws {@link DirectoryStoreError} `ERR_STORE_BUSY` when the lock stayed taken, `ERR_UNKNOWN_VOLUME`
   *   when the backup is gone, or what {@link readManifest} throws.
   */
  async amendManifest(volname: string, change: (m: Omit<Manifest, 'checksum'>) => Promise<Omit<Manifest, 'checksum'>>, o: { waitMs?: number } = {}): Promise<Manifest> {
    return this.withGuestLocks(
      [parseVolname(volname).vmid],
      async () => {
        const { checksum: _old, ...m } = await this.readManifest(volname);
        return this.commitManifest(await change(m));
      },
      o.waitMs,
    );
  }

  /** The volume names of the backup folders of one guest, in no particular order. */
  private async backupVolnames(vmid: number): Promise<string[]> {
    return (await readdir(path.join(this.root, String(vmid))).catch(() => [] as string[])).filter(isBackupDirName).map((name) => volnameOf(vmid, name));
  }

  /**
   * A backup folder as listed: `ok` with what its manifest says, `corrupt`, or unfinished (see
   * {@link unfinishedStatus}).
   * @throws {@link DirectoryStoreError} `ERR_BACKUP_VERSION` (a manifest this version cannot read
   *   is no unfinished backup), or the error reading a manifest that is there.
   */
  private async describe(volname: string, again = false): Promise<BackupInfo> {
    const p = parseVolname(volname);
    const dir = this.backupDir(volname);
    const attrs = await this.attributes(volname);
    const base = { volid: this.volid(volname), volname, vmid: p.vmid, subtype: p.vmtype, ...attrs };
    try {
      const m = await this.readManifest(volname);
      const size = Object.values(m.files).reduce((n, f) => n + f.size, 0);
      const format = m.vmtype === 'qemu' ? 'qcow2' : (m.mode as 'tar' | 'directory');
      return { ...base, ctime: m.ctime, size, format, ...(m.parent ? { parent: this.volid(m.parent) } : {}), status: 'ok' };
    } catch (err) {
      if (err instanceof DirectoryStoreError && err.code === 'ERR_BACKUP_CORRUPT') {
        return { ...base, ctime: ctimeOfBackupId(p.backupId), size: await duBytes(dir), status: 'corrupt' };
      }
      const status = await unfinishedStatus(dir);
      if (status === undefined) {
        // its writer committed it since the read above: describe it as it is now (once)
        if (!again && err instanceof DirectoryStoreError && err.code === 'ERR_BACKUP_INCOMPLETE') return this.describe(volname, true);
        throw err;
      }
      return { ...base, ctime: ctimeOfBackupId(p.backupId), size: await duBytes(dir), status };
    }
  }

  /**
   * Sizes of a backup. Perl: `volume_size_info` (`$size, $format, $used, $parent`).
   * @returns `size`: sum of the disks' virtual sizes (VM) or bytes stored (container); `used`:
   *   bytes the backup's own files take; `format`; `parent` volume name.
   */
  async volumeSizeInfo(volname: string): Promise<{ size: number; used: number; format: 'qcow2' | 'tar' | 'directory'; parent?: string }> {
    const m = await this.readManifest(volname);
    const used = Object.values(m.files).reduce((n, f) => n + f.size, 0);
    const size = m.devices ? Object.values(m.devices).reduce((n, d) => n + d.size, 0) : used;
    return { size, used, format: m.vmtype === 'qemu' ? 'qcow2' : (m.mode as 'tar' | 'directory'), ...(m.parent ? { parent: m.parent } : {}) };
  }

  /**
   * Space of the file system holding the store (Proxmox `status`: total, free, used bytes).
   * `free` is what an unprivileged writer may still use (`f_bavail`), `used` what is taken.
   */
  async status(): Promise<{ total: number; free: number; used: number }> {
    const s = await statfs(this.root);
    return { total: s.blocks * s.bsize, free: s.bavail * s.bsize, used: (s.blocks - s.bfree) * s.bsize };
  }

  // ----- attributes ----------------------------------------------------------------------------

  /**
   * Notes and protected flag of a backup the storage side lists (complete, or complete but
   * broken or corrupt). Perl: `get_volume_attribute`.
   * @throws {@link DirectoryStoreError} `ERR_UNKNOWN_VOLUME`; `ERR_BACKUP_INCOMPLETE` for a backup
   *   being written or left incomplete (not listed, so not there for Proxmox).
   */
  async listedAttributes(volname: string): Promise<{ protected: boolean; notes?: string }> {
    await this.readManifest(volname).catch((err: unknown) => {
      if (!(err instanceof DirectoryStoreError && err.code === 'ERR_BACKUP_CORRUPT')) throw err;
    });
    return this.attributes(volname);
  }

  private async attributes(volname: string): Promise<{ protected: boolean; notes?: string }> {
    const dir = this.backupDir(volname);
    const prot = await stat(path.join(dir, 'protected')).then(() => true, () => false);
    const notes = await readFile(path.join(dir, 'notes'), 'utf8').catch(() => undefined);
    return { protected: prot, ...(notes !== undefined ? { notes } : {}) };
  }

  /** Sets (or, with an empty string, removes) a backup's notes. Perl: `update_volume_attribute(..., 'notes', ...)`. */
  async setNotes(volname: string, notes: string): Promise<void> {
    await this.readManifest(volname);
    const file = path.join(this.backupDir(volname), 'notes');
    if (notes === '') await rm(file, { force: true });
    else await writeFileAtomic(file, notes);
  }

  /** Sets or clears the protected flag: a protected backup is never pruned, nor deleted without `force`. */
  async setProtected(volname: string, value: boolean): Promise<void> {
    await this.readManifest(volname);
    const file = path.join(this.backupDir(volname), 'protected');
    if (value) await writeFileAtomic(file, '');
    else await rm(file, { force: true });
  }

  // ----- integrity -----------------------------------------------------------------------------

  /**
   * The manifests a backup's restore needs: its own, then each ancestor's (parent first).
   * @throws {@link DirectoryStoreError} `ERR_CHAIN_BROKEN` when an ancestor is missing or incomplete.
   */
  async chain(volname: string): Promise<Manifest[]> {
    const out = [await this.readManifest(volname)];
    for (let parent = out[0]!.parent; parent; parent = out.at(-1)!.parent) {
      try {
        out.push(await this.readManifest(parent));
      } catch (err) {
        if (err instanceof DirectoryStoreError && err.code === 'ERR_BACKUP_CORRUPT') throw err;
        throw new DirectoryStoreError('ERR_CHAIN_BROKEN', `backup ${this.volid(volname)} builds on ${this.volid(parent)}, which is ${(err as DirectoryStoreError).code === 'ERR_BACKUP_INCOMPLETE' ? 'incomplete' : 'missing'}`, {
          volname,
          cause: err,
        });
      }
      if (out.length > 10_000) throw new DirectoryStoreError('ERR_BACKUP_CORRUPT', `backup ${this.volid(volname)}: its chain loops`, { volname });
    }
    return out;
  }

  /**
   * Problems of one backup's files against its manifest (`names`: only these files). Files
   * recorded by SHA-256 are hashed; a disk image recorded by its content digests is checked
   * against them by the native core (one read of the image), after its digest file is checked
   * against the manifest.
   */
  private async checkFiles(m: Manifest, names?: string[], o: ImageChecks = {}): Promise<string[]> {
    const dir = this.backupDir(m.volname);
    const problems: string[] = [];
    // a digest file is checked with its image
    const digestFiles = new Set(Object.values(m.files).flatMap((f) => ('digests' in f ? [f.digests] : [])));
    for (const [name, want] of Object.entries(m.files)) {
      if (names && !names.includes(name)) continue;
      if (digestFiles.has(name) && !names?.includes(name)) continue;
      const file = path.join(dir, name);
      if ('digests' in want) {
        problems.push(...(o.digestImages === false ? await this.checkImageRecord(m, name, want) : await this.checkImage(m, name, want)));
        continue;
      }
      let got = await (name === 'root' ? hashTree(file) : hashFile(file)).catch((err: Error) => err);
      // a tree recorded before its digest covered extended attributes
      if (name === 'root' && !(got instanceof Error) && got.sha256 !== want.sha256) got = await hashTree(file, { xattrs: false }).catch((err: Error) => err);
      if (got instanceof Error) problems.push(`${file}: ${(got as NodeJS.ErrnoException).code === 'ENOENT' ? 'missing' : got.message}`);
      else if (got.sha256 !== want.sha256 || got.size !== want.size) problems.push(`${file}: checksum mismatch (content changed since the backup)`);
    }
    return problems;
  }

  /** The error refusing to restore a backup with `problems` (each `<file>: <what>`), naming the first file. */
  private unrestorable(volname: string, problems: string[]): DirectoryStoreError {
    return new DirectoryStoreError('ERR_BACKUP_CORRUPT', `backup ${this.volid(volname)} is corrupted, refusing to restore it: ${problems.join('; ')}`, { volname, file: problems[0]!.split(': ')[0] });
  }

  /**
   * What can be checked of a disk image recorded by its content digests (manifest version 2)
   * without reading it: its digest file against the manifest, and its size.
   */
  private async checkImageRecord(m: Manifest, name: string, want: { size: number; digests: string }): Promise<string[]> {
    const file = path.join(this.backupDir(m.volname), name);
    if (!m.files[want.digests]) return [`${path.join(this.backupDir(m.volname), want.digests)}: not listed in the manifest`];
    const problems = await this.checkFiles(m, [want.digests]);
    if (problems.length > 0) return problems;
    // a changed size is a changed file, even where no reader would look
    const size = await stat(file).then((s) => s.size, (err: NodeJS.ErrnoException) => err);
    if (size instanceof Error) return [`${file}: ${size.code === 'ENOENT' ? 'missing' : size.message}`];
    if (size !== want.size) return [`${file}: size ${size} differs from the recorded ${want.size} (changed since the backup)`];
    return [];
  }

  /** A disk image recorded by its content digests, checked whole (one read of the image). */
  private async checkImage(m: Manifest, name: string, want: { size: number; digests: string }): Promise<string[]> {
    const problems = await this.checkImageRecord(m, name, want);
    if (problems.length > 0) return problems;
    const dir = this.backupDir(m.volname);
    return checkImageDigests(path.join(dir, name), path.join(dir, want.digests)).catch((err: Error) => [`${path.join(dir, name)}: ${err.message}`]);
  }

  /**
   * The image chain of one device for a restore that checks what it reads as it copies (the
   * native core's {@link restoreChain}), base first: each layer with its digest file, every
   * manifest of the chain and every digest file checked against its manifest (small reads; the
   * images themselves are checked by the restore). `undefined` when a layer was recorded without
   * content digests (manifest version 1): such a chain is checked whole before a restore.
   * @throws {@link DirectoryStoreError} `ERR_BACKUP_CORRUPT` naming the file, `ERR_CHAIN_BROKEN`, ...
   */
  async imageChain(volname: string, device: string): Promise<{ image: string; digestsFile: string }[] | undefined> {
    const layers: { image: string; digestsFile: string }[] = [];
    for (const m of await this.chain(volname)) {
      const d = m.devices?.[device];
      if (!d) break;
      const want = m.files[d.file];
      if (!want || !('digests' in want)) return undefined;
      const image = path.join(this.backupDir(m.volname), d.file);
      const problems = await this.checkImageRecord(m, d.file, want);
      if (problems.length > 0) {
        throw this.unrestorable(volname, problems);
      }
      layers.unshift({ image, digestsFile: path.join(this.backupDir(m.volname), want.digests) });
      if (!d.base) return layers;
    }
    throw new DirectoryStoreError('ERR_CHAIN_BROKEN', `backup ${this.volid(volname)}: the chain of disk ${device} ends without a full image`, { volname });
  }

  /**
   * Checks what restoring `volname` reads: every manifest of its chain, and the checksums of the
   * files it needs (its own data files and the images of each ancestor its disks are backed by).
   * @throws {@link DirectoryStoreError} `ERR_BACKUP_CORRUPT` naming the file, `ERR_CHAIN_BROKEN`, ...
   */
  async assertRestorable(volname: string, what: 'vm' | 'container' | 'configs' = 'vm', o: ImageChecks = {}): Promise<Manifest> {
    // the configuration files need only this backup; disks need the whole chain
    const chain = what === 'vm' ? await this.chain(volname) : [await this.readManifest(volname)];
    const own = chain[0]!;
    const dataFiles = what === 'configs' ? ['guest.conf', 'firewall.conf'] : Object.keys(own.files).filter((f) => f !== 'backup.log');
    const problems = await this.checkFiles(own, dataFiles, o);
    if (what === 'vm') problems.push(...(await this.ancestorProblems(chain, o)));
    if (problems.length > 0) {
      throw this.unrestorable(volname, problems);
    }
    return own;
  }

  /** Problems of the images a chain's ancestors lend to its first backup (`chain` as {@link chain} returns it). */
  private async ancestorProblems(chain: Manifest[], o: ImageChecks = {}): Promise<string[]> {
    const problems: string[] = [];
    for (const m of chain.slice(1)) problems.push(...(await this.checkFiles(m, Object.values(m.devices ?? {}).map((d) => d.file), o)));
    return problems;
  }

  /**
   * Checks the images of one device's chain recorded by content digests (one read of each),
   * before a reader that does not check what it reads (qemu-img through a FUSE export).
   * @throws {@link DirectoryStoreError} `ERR_BACKUP_CORRUPT` naming the first bad file.
   */
  async assertDeviceImages(volname: string, device: string): Promise<void> {
    const problems: string[] = [];
    for (const m of await this.chain(volname)) {
      const d = m.devices?.[device];
      const want = d && m.files[d.file];
      if (!want || !('digests' in want)) continue;
      problems.push(...(await this.checkImage(m, d.file, want)));
      // qemu-img follows each layer's header to its backing file, which no digest covers
      const header = await this.headerProblem(m, device);
      if (header) problems.push(header);
    }
    if (problems.length > 0) {
      throw this.unrestorable(volname, problems);
    }
  }

  /**
   * The problem with what an image's qcow2 header tells a reader to read besides the image's own
   * clusters, if it is not what its manifest records: the backing file (`../<base folder>/<file>`,
   * or none for a full image), the backing file's format (qcow2), and no external data file. The
   * header is outside what the content digests cover (they record the image's own clusters), yet
   * `qemu-img` and the FUSE export follow it: a damaged header that names another backup, no
   * backing file, or reads the base as raw, would restore another content without any error. The
   * native restore reads the chain the manifests name instead and does not depend on it.
   * @returns `<file>: <what>`, or `undefined` when the header is as recorded.
   */
  private async headerProblem(m: Manifest, device: string): Promise<string | undefined> {
    const d = m.devices?.[device];
    if (!d) return undefined;
    const file = path.join(this.backupDir(m.volname), d.file);
    const want = d.base ? backingFileOf(d.base, d.file) : undefined;
    const qemuImg = requireTool('qemu-img', 'qemu-utils');
    let info: { 'backing-filename'?: string; 'backing-filename-format'?: string; 'format-specific'?: { data?: { 'data-file'?: string } } };
    try {
      info = JSON.parse((await execFileP(qemuImg, ['info', '--output=json', '-U', '-f', 'qcow2', file])).stdout) as typeof info;
    } catch (err) {
      const e = err as { stderr?: string; message: string };
      return `${file}: qemu-img info failed: ${(e.stderr || e.message).trim().split('\n')[0]}`;
    }
    const backing = info['backing-filename'];
    if (backing !== want) return `${file}: backing file is ${backing ?? 'none'}, expected ${want ?? 'none'} (device ${device})`;
    if (want && info['backing-filename-format'] !== 'qcow2') return `${file}: backing file format is ${info['backing-filename-format'] ?? 'not recorded'}, expected qcow2 (device ${device})`;
    const dataFile = info['format-specific']?.data?.['data-file'];
    if (dataFile !== undefined) return `${file}: its data is in an external file ${dataFile} (device ${device})`;
    return undefined;
  }

  /**
   * Verifies a backup: manifest checksum, every file's checksum, `qemu-img check` of each image,
   * that the chain it builds on is present and complete with matching backing files and that the
   * images of that chain match their checksums (what a restore reads), and that the store's
   * folders down to the backup are closed to other users.
   */
  async verifyBackup(volname: string): Promise<VerifyResult> {
    const volid = this.volid(volname);
    let m: Manifest;
    try {
      m = await this.readManifest(volname);
    } catch (err) {
      return { volid, ok: false, problems: [(err as Error).message] };
    }
    const dir = this.backupDir(volname);
    const problems = await this.checkFiles(m);
    if (m.devices) {
      const qemuImg = requireTool('qemu-img', 'qemu-utils');
      for (const [device, d] of Object.entries(m.devices)) {
        const file = path.join(dir, d.file);
        try {
          await execFileP(qemuImg, ['check', '-q', '-f', 'qcow2', file]);
        } catch (err) {
          const e = err as { stderr?: string; stdout?: string; message: string };
          problems.push(`${file}: qemu-img check failed: ${(e.stderr || e.stdout || e.message).trim().split('\n')[0]}`);
          continue;
        }
        const header = await this.headerProblem(m, device);
        if (header) problems.push(header);
      }
    }
    try {
      const chain = await this.chain(volname);
      for (const [device, d] of Object.entries(m.devices ?? {})) {
        if (d.base && !chain.some((c) => c.volname === d.base && c.devices?.[device])) problems.push(`${path.join(dir, d.file)}: its base ${this.volid(d.base)} has no disk ${device}`);
      }
      // a restore reads the whole chain: an incremental is only as sound as the images under it
      problems.push(...(await this.ancestorProblems(chain)));
    } catch (err) {
      problems.push((err as Error).message);
    }
    // guest data (and, in a directory-mode tree, setuid files of the container's root) must be
    // out of other users' reach: every folder from the store down to the backup
    for (const folder of [this.root, path.dirname(dir), dir]) {
      const st = await stat(folder).catch(() => undefined);
      if (st && st.mode & 0o077) problems.push(`${folder}: other users can ${st.mode & 0o055 ? 'read or enter' : 'write to'} it (mode ${(st.mode & 0o7777).toString(8).padStart(4, '0')}); chmod 700 it`);
    }
    return { volid, ok: problems.length === 0, problems };
  }

  // ----- removal -------------------------------------------------------------------------------

  /**
   * The backups that backups being written now build on, by guest: while a VM backup is in
   * progress (another process, see {@link BackupInfo} `in-progress`), the backup its guest's
   * previous-info names may be the base of its images, and the running backup has no manifest
   * yet to say so. Such a base is neither pruned nor deleted until the run is over.
   * @param list - The backups to look at (from {@link listBackups}).
   * @returns Base volume name → the running backup's volume name.
   */
  private async runningBases(list: BackupInfo[]): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    for (const b of list) {
      if (b.status !== 'in-progress' || b.subtype !== 'qemu') continue;
      const base = await readFile(path.join(this.root, String(b.vmid), PREVIOUS_INFO), 'utf8').then(
        (t) => (JSON.parse(t) as Partial<PreviousInfo>).volname,
        () => undefined,
      );
      if (typeof base === 'string') out.set(base, b.volname);
    }
    return out;
  }

  /**
   * Applies retention to the backups of one guest, or of every guest. Incomplete backups whose
   * writer is gone are removed too. Perl: `prune_backups($scfg, $storeid, $keep, $vmid, $type, $dryrun)`.
   *
   * @returns Every backup considered with its mark; with `dryRun` nothing is removed.
   */
  async pruneBackups(o: { keep: PruneOptions; vmid?: number; vmtype?: GuestType; dryRun?: boolean; waitMs?: number }): Promise<PruneResultEntry[]> {
    if (o.dryRun) return this.pruneLocked(o);
    const vmids = await this.guests(o.vmid);
    return this.withGuestLocks(
      vmids,
      async () => {
        for (const vmid of vmids) await this.removeLeftovers(vmid);
        return this.pruneLocked(o);
      },
      o.waitMs,
    );
  }

  private async pruneLocked(o: { keep: PruneOptions; vmid?: number; vmtype?: GuestType; dryRun?: boolean }): Promise<PruneResultEntry[]> {
    const all = (await this.listBackups(o.vmid)).filter((b) => !o.vmtype || b.subtype === o.vmtype);
    const out: PruneResultEntry[] = [];
    const groups = new Map<string, BackupInfo[]>();
    for (const b of all) {
      // corrupt and broken backups cannot be restored: they neither count as kept nor are they
      // removed (an operator may still repair them); what a broken one builds on is judged alone
      if (b.status === 'in-progress' || b.status === 'corrupt' || b.status === 'broken') continue;
      if (b.status === 'incomplete') {
        out.push({ volid: b.volid, volname: b.volname, vmid: b.vmid, subtype: b.subtype, ctime: b.ctime, mark: 'remove' });
        continue;
      }
      const key = `${b.vmid}/${b.subtype}`;
      groups.set(key, [...(groups.get(key) ?? []), b]);
    }
    // a running backup counts as a protected one building on its base (the chain rule keeps it)
    const running = await this.runningBases(all);
    for (const list of groups.values()) {
      const entries: PruneEntry[] = list.map((b) => ({ volname: b.volname, ctime: b.ctime, protected: b.protected, ...(b.parent ? { parent: this.volnameOf(b.parent) } : {}) }));
      for (const [base, writer] of running) if (list.some((b) => b.volname === base)) entries.push({ volname: writer, ctime: ctimeOfBackupId(parseVolname(writer).backupId), protected: true, parent: base });
      const marks = markBackups(entries, o.keep);
      for (const mk of marks) {
        const b = list.find((x) => x.volname === mk.volname);
        if (b) out.push({ ...mk, volid: b.volid, vmid: b.vmid, subtype: b.subtype });
      }
    }
    if (!o.dryRun) {
      // newest first: a removed backup's children are removed before it
      for (const e of out.filter((x) => x.mark === 'remove').sort((a, b) => b.ctime - a.ctime)) await this.removeBackupDir(e.volname);
    }
    return out;
  }

  /**
   * Removes the incomplete backups of a guest whose writer is gone (a crashed or killed run), so
   * that they take no space until the next prune. Called when a new backup of the guest starts.
   *
   * @returns The volume names removed.
   */
  async removeIncomplete(vmid: number): Promise<string[]> {
    // the same verdict as the listing's, from the manifest's absence alone: no manifest is read,
    // so the cost grows with the folders, not with what the complete backups hold
    const volnames = await this.backupVolnames(vmid);
    const statuses = await mapLimit(volnames, DESCRIBE_CONCURRENCY, (v) => unfinishedStatus(this.backupDir(v)));
    const stale = volnames
      .filter((_, i) => statuses[i] === 'incomplete')
      .map((volname) => ({ volname, ctime: ctimeOfBackupId(parseVolname(volname).backupId) }))
      .sort(oldestFirst)
      .map((b) => b.volname);
    for (const v of stale) await rm(this.backupDir(v), { recursive: true, force: true });
    return stale;
  }

  /**
   * Deletes a backup, keeping every other backup restorable: a backup other backups build on is
   * merged into its child first (`qemu-img rebase` onto its own base), so the child holds what it
   * needed. Refused for a protected backup without `force`, when two backups build on it, and when
   * an image the merge reads does not match its manifest (the merge would give the child fresh
   * checksums over corrupted data).
   *
   * A backup being written (by any process) is refused, and so is the backup a running VM backup
   * may build on (see {@link runningBases}).
   *
   * @throws {@link DirectoryStoreError} `ERR_BACKUP_PROTECTED`, `ERR_CHAIN_DELETE`, `ERR_BACKUP_CORRUPT` (with `file`), `ERR_UNKNOWN_VOLUME`, `ERR_BACKUP_INCOMPLETE` (in progress).
   */
  async deleteBackup(volname: string, options: { force?: boolean } = {}): Promise<{ merged?: string }> {
    const dir = this.backupDir(volname);
    if (!(await stat(dir).then((s) => s.isDirectory(), () => false))) {
      throw new DirectoryStoreError('ERR_UNKNOWN_VOLUME', `unknown volume ${this.volid(volname)}: no such backup in ${this.root}`, { volname });
    }
    return this.withGuestLocks([parseVolname(volname).vmid], () => this.deleteLocked(volname, options));
  }

  private async deleteLocked(volname: string, options: { force?: boolean }): Promise<{ merged?: string }> {
    const attrs = await this.attributes(volname);
    if (attrs.protected && !options.force) {
      throw new DirectoryStoreError('ERR_BACKUP_PROTECTED', `backup ${this.volid(volname)} is protected: unprotect it first, or delete with force`, { volname });
    }
    const p = parseVolname(volname);
    const all = await this.listBackups(p.vmid);
    if (all.find((b) => b.volname === volname)?.status === 'in-progress') {
      throw new DirectoryStoreError('ERR_BACKUP_INCOMPLETE', `cannot delete ${this.volid(volname)}: it is being written by a running backup`, { volname });
    }
    const writer = (await this.runningBases(all)).get(volname);
    if (writer) {
      throw new DirectoryStoreError('ERR_CHAIN_DELETE', `cannot delete ${this.volid(volname)}: the running backup ${this.volid(writer)} may build on it; try again when it is done`, { volname });
    }
    const children = all.filter((b) => b.parent === this.volid(volname));
    if (children.length > 1) {
      throw new DirectoryStoreError('ERR_CHAIN_DELETE', `cannot delete ${this.volid(volname)}: ${children.length} backups build on it (${children.map((c) => c.volid).join(', ')}); delete them first`, { volname });
    }
    let merged: string | undefined;
    if (children.length === 1) {
      let own: Manifest;
      try {
        own = await this.readManifest(volname);
      } catch (err) {
        throw new DirectoryStoreError('ERR_CHAIN_DELETE', `cannot delete ${this.volid(volname)}: ${children[0]!.volid} builds on it and it cannot be merged: ${(err as Error).message}`, { volname, cause: err });
      }
      merged = children[0]!.volname;
      await this.assertMergeable(own, merged);
      await this.mergeInto(own, merged);
    }
    await this.removeLeftovers(p.vmid);
    await this.removeBackupDir(volname);
    return merged ? { merged } : {};
  }

  /**
   * Removes a backup's folder: renamed to `.removing-<name>` first (durably), which takes it out of
   * the listing in one step, then its files. A crash or error while they go leaves only the hidden
   * folder, which the next prune or delete of the guest removes first ({@link removeLeftovers}).
   */
  private async removeBackupDir(volname: string): Promise<void> {
    const dir = this.backupDir(volname);
    const hidden = path.join(path.dirname(dir), `${REMOVING}${path.basename(dir)}`);
    try {
      await rename(dir, hidden);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
    await fsyncPath(path.dirname(dir));
    await rm(hidden, { recursive: true, force: true });
  }

  /** Removes what crashed removals of a guest's backups left (see {@link removeBackupDir}); called holding its lock. */
  private async removeLeftovers(vmid: number): Promise<void> {
    const dir = path.join(this.root, String(vmid));
    for (const name of await readdir(dir).catch(() => [] as string[])) if (name.startsWith(REMOVING)) await rm(path.join(dir, name), { recursive: true, force: true });
  }

  /**
   * Checks every image a merge of `base` into `child` reads (the child's and those of its whole
   * chain, `base` included) against the manifests: the merge rewrites the child's checksums, so a
   * corrupted image merged in would be taken as sound from then on.
   * @throws {@link DirectoryStoreError} `ERR_BACKUP_CORRUPT` naming the first bad file.
   */
  private async assertMergeable(base: Manifest, child: string): Promise<void> {
    const chain = await this.chain(child);
    const problems = [...(await this.checkFiles(chain[0]!, Object.values(chain[0]!.devices ?? {}).map((d) => d.file))), ...(await this.ancestorProblems(chain))];
    if (problems.length > 0) {
      throw new DirectoryStoreError(
        'ERR_BACKUP_CORRUPT',
        `cannot delete ${this.volid(base.volname)}: merging it into ${this.volid(child)} would carry a corrupted image into it: ${problems.join('; ')}`,
        { volname: base.volname, file: problems[0]!.split(': ')[0] },
      );
    }
  }

  /** Rebases each image of `child` backed by `base` onto base's own base, then rewrites child's manifest. */
  private async mergeInto(base: Manifest, child: string): Promise<void> {
    const qemuImg = requireTool('qemu-img', 'qemu-utils');
    const c = await this.readManifest(child); // finishes a committed merge, if one was left
    const cdir = this.backupDir(child);
    // what is left under merge names now is from a merge that crashed before its commit point
    for (const name of await readdir(cdir)) if (name.endsWith(MERGED) || name.endsWith(`${MERGED}.digests`)) await rm(path.join(cdir, name), { force: true });
    const changed: string[] = [];
    const devices = { ...c.devices };
    for (const [device, d] of Object.entries(c.devices ?? {})) {
      if (d.base !== base.volname) continue;
      const newBase = base.devices?.[device]?.base;
      const backing = newBase ? backingFileOf(newBase, d.file) : '';
      const file = path.join(cdir, d.file);
      const tmp = `${file}${MERGED}`;
      // work on a copy (same folder, so the relative backing path holds): a crash leaves the child intact
      await execFileP('cp', ['--reflink=auto', '--sparse=always', '--', file, tmp]);
      try {
        await execFileP(qemuImg, ['rebase', '-q', '-f', 'qcow2', '-b', backing, ...(backing ? ['-F', 'qcow2'] : []), tmp]);
        await execFileP(qemuImg, ['check', '-q', '-f', 'qcow2', tmp]);
      } catch (err) {
        await rm(tmp, { force: true });
        const e = err as { stderr?: string; message: string };
        throw new DirectoryStoreError('ERR_CHAIN_DELETE', `cannot delete ${this.volid(base.volname)}: merging it into ${file} failed: ${(e.stderr || e.message).trim()}`, { volname: base.volname, cause: err });
      }
      changed.push(d.file);
      devices[device] = { ...d, ...(newBase ? { base: newBase } : {}) };
      if (!newBase) delete devices[device]!.base;
    }
    const files = { ...c.files };
    for (const f of changed) {
      const merged = path.join(cdir, `${f}${MERGED}`);
      // durable before the next manifest names it (the digest file is written durably)
      await fsyncPath(merged);
      // the merged image holds other clusters: its content digests are taken anew (one read)
      const digests = await digestImage(merged);
      files[f] = { size: (await stat(merged)).size, digests: `${f}.digests` };
      files[`${f}.digests`] = { size: (await stat(digests.digestsFile)).size, sha256: digests.digestsSha256 };
    }
    const parent = Object.values(devices).find((d) => d.base)?.base;
    const { checksum: _old, ...rest } = c;
    const next: Omit<Manifest, 'checksum'> = { ...rest, version: MANIFEST_VERSION, devices, files, mode: parent ? 'incremental' : 'full', ...(parent ? { parent } : { parent: undefined }) };
    // the commit point: from here on the child is merged, whoever finishes moving the files
    await writeFileAtomic(path.join(cdir, NEXT_MANIFEST), `${JSON.stringify({ ...next, checksum: manifestChecksum(next) }, null, 2)}\n`);
    await this.finishMerge(child);
  }

  /**
   * Finishes a committed merge into `volname` (see {@link NEXT_MANIFEST}): each merged image and
   * its digest file over the old ones, then the next manifest over the manifest. Nothing to do
   * without a next manifest. Every step may have been done already (by a run that crashed, or by
   * another process finishing it at the same time): a file already moved is skipped.
   */
  private async finishMerge(volname: string): Promise<void> {
    const dir = this.backupDir(volname);
    let text: string;
    try {
      text = await readFile(path.join(dir, NEXT_MANIFEST), 'utf8');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return;
      throw err;
    }
    // written atomically; one that does not parse or check is damage: the backup stays as it was
    let next: Manifest;
    try {
      next = JSON.parse(text) as Manifest;
    } catch {
      return;
    }
    if (!next || typeof next !== 'object' || next.checksum !== manifestChecksum(next) || next.volname !== volname) return;
    const moveIfThere = (from: string, to: string): Promise<void> =>
      rename(path.join(dir, from), path.join(dir, to)).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== 'ENOENT') throw err;
      });
    for (const [name, entry] of Object.entries(next.files)) {
      if (!('digests' in entry)) continue;
      await moveIfThere(`${name}${MERGED}.digests`, entry.digests);
      await moveIfThere(`${name}${MERGED}`, name);
    }
    await fsyncPath(dir);
    await moveIfThere(NEXT_MANIFEST, MANIFEST);
    await fsyncPath(dir);
  }
}

/**
 * The first name in a manifest that is not one plain file name (the files of the backup, their
 * digest files, the disks and their images), if any. Reads, merges and restores join these names
 * to folders: a manifest's checksum guards against damage, not against whoever can write the store
 * (another node of a shared store), and a name like `../x` would have them read or write outside.
 */
function nameOutsideFolder(m: Manifest): string | undefined {
  const names: unknown[] = [...Object.keys(m.files ?? {}), ...Object.values(m.files ?? {}).flatMap((f) => (f && 'digests' in f ? [f.digests] : []))];
  for (const [device, d] of Object.entries(m.devices ?? {})) names.push(device, d?.file);
  const i = names.findIndex((n) => !isPlainFileName(n));
  return i < 0 ? undefined : String(names[i]);
}

/** Bytes the files under `dir` take (apparent sizes). */
async function duBytes(dir: string): Promise<number> {
  let n = 0;
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    const p = path.join(dir, name);
    const st = await lstat(p);
    n += st.isDirectory() ? await duBytes(p) : st.size;
  }
  return n;
}

/**
 * Gives every entry of a backup folder the store's private modes (files {@link PRIVATE_FILE_MODE},
 * folders {@link PRIVATE_DIR_MODE}) whatever wrote them and whatever the umask: configs, images
 * written by the native core, tar archives, logs copied from elsewhere. The `root/` tree of a
 * directory-mode container backup keeps its own mode: it is the container's `/` and is restored
 * as it is; the backup folder around it is private.
 */
async function privatise(dir: string): Promise<void> {
  await chmod(dir, PRIVATE_DIR_MODE);
  for (const name of await readdir(dir)) {
    if (name === 'root') continue;
    const p = path.join(dir, name);
    const st = await lstat(p);
    if (st.isDirectory()) await chmod(p, PRIVATE_DIR_MODE);
    else if (st.isFile()) await chmod(p, PRIVATE_FILE_MODE);
  }
}

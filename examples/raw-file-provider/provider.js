// @ts-check
/**
 * An example third-party backup provider for Proxmox VE, meant to be copied: each backup is one
 * folder holding every VM disk as a sparse raw file (or a container's tree as a GNU tar archive)
 * and an `index.json` that says what the backup is. The index is written last, atomically: a
 * folder without one is a backup that never completed, and nothing lists or restores it.
 *
 * ```
 * <path>/<vmid>/qemu-2026_11_30-22_00_00/index.json   vmid, type, ctime, disks and sizes, configs, notes, protected, parent
 * <path>/<vmid>/qemu-2026_11_30-22_00_00/disk0.raw    the disk, sparse, raw
 * <path>/<vmid>/lxc-2026_11_30-22_05_00/root.tar      a container's tree (container ids)
 * <path>/<vmid>/last-good.json                         the backup QEMU's dirty bitmap counts from
 * ```
 *
 * Every backup stands alone: an incremental VM backup starts from a copy of the previous raw file
 * (a reflink where the file system can, a sparse copy otherwise) and writes only what QEMU's dirty
 * bitmap marks as changed. Restoring or removing one backup never needs another.
 *
 * Loaded by the provider host as `pve-backup-provider provider-host --provider <this file>`: the
 * default export is the provider class, `pveStorage` describes the Proxmox VE storage that
 * `pve-backup-provider pve-plugin install` generates for it (see README.md beside this file).
 *
 * @module
 */
import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import { constants as fsc } from 'node:fs';
import { chmod, copyFile, mkdir, open, readdir, readFile, rename, rm, stat, statfs, unlink } from 'node:fs/promises';
import path from 'node:path';

import { BackupProviderBase, backupNbdToFile, createTarArchive, markBackups, normaliseBandwidthLimit } from 'pve-backup-provider';

/** @typedef {import('pve-backup-provider').GuestType} GuestType */
/** @typedef {import('pve-backup-provider').ProviderContext} ProviderContext */
/** @typedef {import('pve-backup-provider').ProviderStorage} ProviderStorage */
/** @typedef {import('pve-backup-provider').StoredBackup} StoredBackup */
/** @typedef {import('pve-backup-provider').PveStorageSchema} PveStorageSchema */
/** @typedef {import('pve-backup-provider').BackupVmVolume} BackupVmVolume */
/** @typedef {import('pve-backup-provider').BackupVmInfo} BackupVmInfo */
/** @typedef {import('pve-backup-provider').ContainerBackupInfo} ContainerBackupInfo */
/** @typedef {import('pve-backup-provider').VolumeSize} VolumeSize */
/** @typedef {import('pve-backup-provider').IncrementalRequest} IncrementalRequest */

/**
 * One disk of a VM backup, as the index records it.
 * @typedef {object} IndexDisk
 * @property {string} file        The raw file, in the backup's folder.
 * @property {number} size        The disk's size in bytes (the raw file's length).
 * @property {'full' | 'incremental'} kind  How it was written.
 * @property {number} bytesRead   Bytes read from QEMU for it (all data for a full, the dirty regions for an incremental).
 * @property {number} mtimeMs     The raw file's modification time when the backup completed: a later change shows.
 */

/**
 * What `index.json` holds. Its presence makes a backup complete.
 * @typedef {object} Index
 * @property {'pve-rawfile-example'} format
 * @property {1} version
 * @property {string} id          Random id: the last-good record names the backup by it too, so a folder replaced under the same name is not trusted.
 * @property {string} volname     `backup/<vmid>/<type>-<time>`.
 * @property {number} vmid
 * @property {GuestType} vmtype
 * @property {number} ctime       Unix seconds.
 * @property {string} [parent]    Volname of the backup an incremental one started from.
 * @property {Record<string, IndexDisk>} [disks]   VMs.
 * @property {{ file: string, size: number }} [archive]  Containers: the tar archive.
 * @property {{ guest: string, firewall?: string }} configs
 * @property {string} [notes]
 * @property {boolean} protected
 */

/**
 * The per-guest record of the backup QEMU's dirty bitmap counts from. `pending` names a backup
 * that is reading disks: QEMU may be told success for it (it is told success as soon as
 * `backupVm` returns: qemu-server `VZDump/QemuServer.pm` `archive_external`), so until that backup
 * is complete, or known to have told failure, no incremental backup may build on anything.
 * @typedef {object} LastGood
 * @property {string} [volname]
 * @property {string} [id]
 * @property {string} [pending]
 */

/** A backup this provider is writing. @typedef {object} Running
 * @property {number} vmid
 * @property {GuestType} vmtype
 * @property {string} volname
 * @property {string} dir
 * @property {string} id
 * @property {number} ctime
 * @property {Index | undefined} previous   VMs: the complete backup an incremental may start from.
 * @property {Record<string, IndexDisk>} disks
 * @property {Index['configs']} [configs]
 * @property {Index['archive']} [archive]
 * @property {'none' | 'reading' | 'read' | 'failed'} data  VMs: where the disk copy stands.
 * @property {Index} [index]   Once written.
 */

const INDEX = 'index.json';
const LAST_GOOD = 'last-good.json';
/** In a backup's folder until its index is written: who writes it (host, pid, process start time). */
const WRITER = 'writer.json';
/** Volume names this store makes: vzdump's volume id is `<storeid>:backup/<archive-name>` (pve-manager `PVE/VZDump.pm`). */
const VOLNAME = /^backup\/([1-9][0-9]{0,8})\/((qemu|lxc)-[0-9]{4}_[0-9]{2}_[0-9]{2}-[0-9]{2}_[0-9]{2}_[0-9]{2}(-[0-9]+)?)$/;

/**
 * The storage that `pve-backup-provider pve-plugin install --type rawfile` generates: Proxmox VE's
 * own `path` (fixed once the storage is added: moving it would orphan every backup) plus one
 * option of this provider. Property names are one namespace across every storage plugin of a
 * node, hence the `rawfile-` prefix.
 * @type {PveStorageSchema}
 */
export const pveStorage = {
  properties: {
    'rawfile-incremental': {
      type: 'boolean',
      description: 'Back up VM disks incrementally (only what changed since the last backup) when QEMU still tracks the changes.',
      default: true,
    },
  },
  options: {
    path: { fixed: true },
    'rawfile-incremental': { optional: true },
    nodes: { optional: true },
    disable: { optional: true },
    'prune-backups': { optional: true },
    'max-protected-backups': { optional: true },
  },
  // the archive names start with `<vmid>/` (see backupInit)
  archiveNameVmid: '^(\\d+)/',
};

/** An error with a stable code: the bridge hands `code` to Proxmox VE with the message. */
export class RawFileError extends Error {
  /**
   * @param {'ERR_RAWFILE_CONFIG' | 'ERR_RAWFILE_VOLNAME' | 'ERR_RAWFILE_NOT_FOUND' | 'ERR_RAWFILE_PROTECTED' | 'ERR_RAWFILE_STATE' | 'ERR_RAWFILE_LOCKED'} code
   * @param {string} message
   * @param {{ cause?: unknown }} [options]
   */
  constructor(code, message, options) {
    super(message, options);
    this.name = 'RawFileError';
    this.code = code;
  }
}

/** @param {Date} d @returns {string} `YYYY_MM_DD-HH_MM_SS` in UTC. */
function timestamp(d) {
  return d.toISOString().slice(0, 19).replace(/-/g, '_').replace('T', '-').replace(/:/g, '_');
}

/** @param {unknown} v Perl hands booleans as 0/1 or '0'/'1'. @param {boolean} dflt */
function bool(v, dflt) {
  if (v === undefined || v === null || v === '') return dflt;
  return !(v === false || v === 0 || v === '0' || v === 'false');
}

/** Start time of a process (field 22 of `/proc/<pid>/stat`), which tells a reused pid apart. @param {number} pid */
async function processStart(pid) {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  return stat?.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
}

/** This process as the writer of a backup. */
async function thisWriter() {
  return { host: hostname(), pid: process.pid, start: await processStart(process.pid) };
}

/**
 * Whether the process that wrote an incomplete backup folder is gone. Only a writer of this host
 * can be checked; one of another host sharing the storage is left alone (a folder without a
 * writer record a minute old is one whose writer died right after creating it).
 * @param {string} dir
 */
async function writerIsGone(dir) {
  /** @type {{ host?: string, pid?: number, start?: string } | undefined} */
  const w = await readJson(path.join(dir, WRITER)).catch(() => undefined);
  // no record: a run died between creating the folder and recording itself, unless it is doing that now
  if (!w) return Date.now() - (await stat(dir)).mtimeMs > 60_000;
  if (w.host !== hostname() || typeof w.pid !== 'number') return false;
  return (await processStart(w.pid)) !== w.start;
}

/** Creates a folder `0700` whatever the umask (mkdir's mode is masked by it, chmod's is not). @param {string} dir */
async function makeDir(dir) {
  await mkdir(dir, { mode: 0o700 });
  await chmod(dir, 0o700);
}

/** Makes sure a file's data is on disk. @param {string} file */
async function fsyncFile(file) {
  const fh = await open(file, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Writes a file atomically and durably, `0600`: a temporary file, fsync, rename, fsync of the
 * folder. Readers see the old content or the new, never a part.
 * @param {string} file
 * @param {string} text
 */
async function writeAtomic(file, text) {
  const tmp = `${file}.${randomUUID()}.tmp`;
  try {
    const fh = await open(tmp, 'wx', 0o600);
    try {
      await fh.chmod(0o600);
      await fh.writeFile(text);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  await fsyncFile(path.dirname(file));
}

/** @param {string} file @returns {Promise<any>} undefined when the file does not exist. */
async function readJson(file) {
  const text = await readFile(file, 'utf8').catch((/** @type {NodeJS.ErrnoException} */ err) => {
    if (err.code === 'ENOENT') return undefined;
    throw err;
  });
  return text === undefined ? undefined : JSON.parse(text);
}

/**
 * Runs `fn` holding the lock of one backup's index, so two processes changing notes and the
 * protected flag at once (a GUI edit during a prune) do not lose either change. The lock is a
 * file created exclusively; one older than a minute was left by a dead process and is broken.
 * @template T
 * @param {string} dir
 * @param {() => Promise<T>} fn
 * @returns {Promise<T>}
 */
async function withIndexLock(dir, fn) {
  const lock = path.join(dir, 'index.lock');
  for (let tries = 0; ; tries++) {
    try {
      await (await open(lock, 'wx', 0o600)).close();
      break;
    } catch (err) {
      if (/** @type {NodeJS.ErrnoException} */ (err).code !== 'EEXIST') throw err;
      const st = await stat(lock).catch(() => undefined);
      if (st && Date.now() - st.mtimeMs > 60_000) await rm(lock, { force: true });
      else if (tries >= 200) throw new RawFileError('ERR_RAWFILE_LOCKED', `the index of ${dir} stays locked (${lock})`);
      else await new Promise((r) => setTimeout(r, 50));
    }
  }
  try {
    return await fn();
  } finally {
    await rm(lock, { force: true });
  }
}

/**
 * The example provider (Proxmox VE 8.4 API generation). Storage configuration: `path` (the
 * store's folder) and `rawfile-incremental` (default true).
 */
export default class RawFileProvider extends BackupProviderBase {
  /** @param {ProviderContext} context */
  constructor(context) {
    super(context);
    if (typeof this.scfg.path !== 'string' || this.scfg.path === '') {
      throw new RawFileError('ERR_RAWFILE_CONFIG', 'the raw-file provider needs the storage option path');
    }
    /** The store's folder. */
    this.root = path.resolve(this.scfg.path);
    this.incremental = bool(this.scfg['rawfile-incremental'], true);
    /** @type {Map<number, Running>} */
    this.running = new Map();
  }

  providerName() {
    return 'rawfile';
  }

  // ----- paths and indexes -------------------------------------------------------------------

  /** @param {string} volname @returns {{ vmid: number, dir: string }} */
  parse(volname) {
    const m = VOLNAME.exec(volname);
    if (!m) throw new RawFileError('ERR_RAWFILE_VOLNAME', `'${volname}' is not a volume name of this store`);
    return { vmid: Number(m[1]), dir: path.join(this.root, /** @type {string} */ (m[1]), /** @type {string} */ (m[2])) };
  }

  /** The index of a complete backup. @param {string} volname @returns {Promise<Index>} */
  async readIndex(volname) {
    const { dir } = this.parse(volname);
    const index = await readJson(path.join(dir, INDEX));
    if (!index) throw new RawFileError('ERR_RAWFILE_NOT_FOUND', `no complete backup ${volname} in ${this.root}`);
    return index;
  }

  /** Creates the store's folder on first use. */
  async ensureRoot() {
    await mkdir(this.root, { recursive: true, mode: 0o700 });
    await chmod(this.root, 0o700);
  }

  // ----- backup ------------------------------------------------------------------------------

  /** @param {number} _startTime */
  async jobInit(_startTime) {
    await this.ensureRoot();
  }

  /** A backup still open here failed without its cleanup (the job died): remove it. */
  async jobCleanup() {
    for (const g of [...this.running.values()]) if (!g.index) await this.discard(g, 'the job ended before it completed');
    this.running.clear();
  }

  /**
   * Creates the backup's folder. The archive name `<vmid>/<type>-<UTC time>` becomes the volume
   * name `backup/<archive-name>` (pve-manager `PVE/VZDump.pm`), and its `<vmid>/` start is what
   * `pveStorage.archiveNameVmid` tells Proxmox VE.
   * @param {number} vmid @param {GuestType} vmtype @param {number} startTime
   */
  async backupInit(vmid, vmtype, startTime) {
    await this.ensureRoot();
    const guestDir = path.join(this.root, String(vmid));
    await mkdir(guestDir, { recursive: true, mode: 0o700 });
    await chmod(guestDir, 0o700);
    // A folder without an index is a backup being written, or one an interrupted run left: it
    // is removed only when its writer (recorded in it) is a process of this host that is gone.
    for (const name of await readdir(guestDir)) {
      if (!/^(qemu|lxc)-/.test(name)) continue;
      const dir = path.join(guestDir, name);
      if (await stat(path.join(dir, INDEX)).catch(() => undefined)) continue;
      if (!(await writerIsGone(dir))) continue;
      await rm(dir, { recursive: true, force: true });
      this.log.info(`removed ${dir}, left incomplete by an interrupted run`);
    }
    const base = `${vmtype}-${timestamp(new Date(startTime * 1000))}`;
    let name = base;
    for (let n = 1; ; n++) {
      try {
        await makeDir(path.join(guestDir, name)); // fails if it exists: every job gets its own folder
        break;
      } catch (err) {
        if (/** @type {NodeJS.ErrnoException} */ (err).code !== 'EEXIST' || n > 99) throw err;
        name = `${base}-${n}`;
      }
    }
    const volname = `backup/${vmid}/${name}`;
    await writeAtomic(path.join(guestDir, name, WRITER), JSON.stringify(await thisWriter()));
    const previous = vmtype === 'qemu' && this.incremental ? await this.trustedPrevious(vmid) : undefined;
    this.running.set(vmid, { vmid, vmtype, volname, dir: path.join(guestDir, name), id: randomUUID(), ctime: startTime, previous, disks: {}, data: 'none' });
    this.log.info(`writing ${volname}${previous ? `, previous backup ${previous.volname}` : ''}`);
    return { archiveName: volname.slice('backup/'.length) };
  }

  /**
   * The last good backup, if an incremental may start from it: the record names it and no backup
   * since, it is complete, and its raw files are as it left them. Anything else gives a full.
   * @param {number} vmid @returns {Promise<Index | undefined>}
   */
  async trustedPrevious(vmid) {
    /** @type {LastGood | undefined} */
    const rec = await readJson(path.join(this.root, String(vmid), LAST_GOOD)).catch(() => undefined);
    if (!rec?.volname) return undefined;
    const full = (/** @type {string} */ why) => {
      this.log.warn(`the last backup ${why}: full backup`);
      return undefined;
    };
    if (rec.pending) return full(`${rec.pending} may have told QEMU success without completing`);
    const index = /** @type {Index | undefined} */ (await this.readIndex(rec.volname).catch(() => undefined));
    if (!index || index.id !== rec.id) return full(`${rec.volname} is gone or was replaced`);
    const { dir } = this.parse(rec.volname);
    for (const d of Object.values(index.disks ?? {})) {
      const st = await stat(path.join(dir, d.file)).catch(() => undefined);
      if (!st || st.size !== d.size || st.mtimeMs !== d.mtimeMs) return full(`${rec.volname} has a changed or missing ${d.file}`);
    }
    return index;
  }

  /** @param {number} vmid */
  guest(vmid) {
    const g = this.running.get(vmid);
    if (!g) throw new RawFileError('ERR_RAWFILE_STATE', `no backup of guest ${vmid} is running`);
    return g;
  }

  /** The guest's last-good record. @param {number} vmid */
  lastGoodFile(vmid) {
    return path.join(this.root, String(vmid), LAST_GOOD);
  }

  /** `nbd` for VMs (the package's native core reads QEMU's export), `directory` for containers. @param {number} _vmid @param {GuestType} vmtype */
  async backupGetMechanism(_vmid, vmtype) {
    return vmtype === 'qemu' ? 'nbd' : vmtype === 'lxc' ? 'directory' : undefined;
  }

  /**
   * `use` QEMU's bitmap for a disk the last good backup has at the same size, `new` for the others
   * (QEMU then starts a bitmap and the disk is read whole). QEMU answers `new` itself when its
   * bitmap is gone (a VM restart): `backupVm` then gets bitmap mode `new` and copies everything.
   * @param {number} vmid @param {Record<string, VolumeSize>} volumes
   * @returns {Promise<Record<string, IncrementalRequest> | undefined>}
   */
  async backupVmQueryIncremental(vmid, volumes) {
    if (!this.incremental) return undefined;
    const previous = this.guest(vmid).previous;
    /** @type {Record<string, IncrementalRequest>} */
    const out = {};
    for (const [device, { size }] of Object.entries(volumes)) out[device] = previous?.disks?.[device]?.size === Number(size) ? 'use' : 'new';
    return out;
  }

  /**
   * Each disk to `<device>.raw`: bitmap mode `reuse` starts from a copy of the previous raw file
   * and writes the dirty regions (the package's `backupNbdToFile`); `new` and `none` copy the
   * whole export. The configs go into the index.
   * @param {number} vmid @param {string} guestConfig @param {Record<string, BackupVmVolume>} volumes @param {BackupVmInfo} info
   */
  async backupVm(vmid, guestConfig, volumes, info) {
    const g = this.guest(vmid);
    if (info.mechanism !== 'nbd') throw new RawFileError('ERR_RAWFILE_STATE', `mechanism ${info.mechanism} is not used by this provider`);
    g.configs = { guest: guestConfig, ...(info.firewallConfig !== undefined ? { firewall: info.firewallConfig } : {}) };
    // From here on QEMU may be told success for this backup, which resets its bitmap: recorded
    // (durably) first, so a crash before the index is written makes the next backup full.
    const lastGood = this.lastGoodFile(vmid);
    await writeAtomic(lastGood, JSON.stringify({ volname: g.previous?.volname, id: g.previous?.id, pending: g.volname }));
    g.data = 'reading';
    try {
      for (const [device, v] of Object.entries(volumes)) {
        const file = `${device}.raw`;
        const incremental = v.bitmapMode === 'reuse';
        const prev = g.previous?.disks?.[device];
        if (incremental && !prev) {
          // QEMU counts changes since a backup this store does not trust: never a wrong incremental
          throw new RawFileError('ERR_RAWFILE_STATE', `${device}: QEMU offers an incremental backup, but there is no previous raw file to start from`);
        }
        const target = path.join(g.dir, file);
        // In mode reuse the helper copies the previous raw file with `cp --reflink=auto
        // --sparse=always` (a reflink where the file system can, else a copy that keeps the holes,
        // which fs.copyFile's fallback does not promise), writes the dirty regions over the copy,
        // and renames it into place only when complete.
        const summary = await backupNbdToFile({
          nbdPath: v.nbdPath,
          deviceName: device,
          bitmapMode: v.bitmapMode,
          bitmapName: v.bitmapName,
          path: target,
          ...(incremental && g.previous && prev ? { previous: path.join(this.parse(g.previous.volname).dir, prev.file) } : {}),
          bandwidthLimit: normaliseBandwidthLimit(info.bandwidthLimit, 'bandwidthLimit'),
          signal: info.signal,
        });
        // the package's file sink creates and keeps it 0600 whatever the umask
        this.log.info(`${device}: ${incremental ? 'incremental' : 'full'}, read ${summary.bytesRead} of ${Number(v.size)} bytes`);
        g.disks[device] = { file, size: Number(v.size), kind: incremental ? 'incremental' : 'full', bytesRead: summary.bytesRead, mtimeMs: 0 };
      }
    } catch (err) {
      // backupVm fails: qemu-server tells QEMU failure, which keeps the bitmap counting from the previous backup
      g.data = 'failed';
      await writeAtomic(lastGood, JSON.stringify({ volname: g.previous?.volname, id: g.previous?.id }));
      throw err;
    }
    g.data = 'read';
  }

  /**
   * The container's tree as `root.tar`: GNU tar with owners shifted to the container's view (the
   * package's `createTarArchive`), which is what pve-container's `tar` restore expects.
   * @param {number} vmid @param {string} guestConfig @param {string[]} excludePatterns @param {ContainerBackupInfo} info
   */
  async backupContainer(vmid, guestConfig, excludePatterns, info) {
    const g = this.guest(vmid);
    g.configs = { guest: guestConfig, ...(info.firewallConfig ? { firewall: info.firewallConfig } : {}) };
    const archive = path.join(g.dir, 'root.tar');
    const { bytes } = await createTarArchive({
      source: info.directory,
      archive,
      idMap: info.idMap,
      excludePaths: excludePatterns,
      sources: info.sources,
      bandwidthLimit: normaliseBandwidthLimit(info.bandwidthLimit, 'bandwidthLimit'),
      signal: info.signal,
    });
    // createTarArchive opens it with mode 0600, which the umask may still narrow
    await chmod(archive, 0o600);
    g.archive = { file: 'root.tar', size: bytes };
  }

  /**
   * Success: make it complete (data on disk, then the index). Failure: remove the folder; and if
   * the disks were all read, QEMU may have been told success, so the next backup is full.
   * @param {number} vmid @param {GuestType} _vmtype @param {boolean} success @param {{ error?: string }} info
   */
  async backupCleanup(vmid, _vmtype, success, info) {
    const g = this.running.get(vmid);
    if (!g) {
      // vzdump calls this after a failure even when backupInit never ran (pve-manager PVE/VZDump.pm)
      if (success) throw new RawFileError('ERR_RAWFILE_STATE', `no backup of guest ${vmid} is running`);
      return undefined;
    }
    if (!success) {
      await this.discard(g, info.error);
      return undefined;
    }
    const index = g.index ?? (await this.complete(g));
    const size = Object.values(index.disks ?? {}).reduce((n, d) => n + d.size, 0) + (index.archive?.size ?? 0);
    return { stats: { archiveSize: size } };
  }

  /**
   * Writes the index of a backup whose data is all there; the storage hooks call it too, since
   * vzdump sets notes, the protected flag and prunes before `backup_cleanup(..., 1)`.
   * @param {Running} g @returns {Promise<Index>}
   */
  async complete(g) {
    if (g.vmtype === 'qemu' && g.data !== 'read') throw new RawFileError('ERR_RAWFILE_STATE', `${g.volname}: the disks were not all read`);
    if (!g.configs) throw new RawFileError('ERR_RAWFILE_STATE', `${g.volname}: nothing was backed up`);
    // the data first, durably; then the index that makes the backup complete
    for (const d of Object.values(g.disks)) {
      const file = path.join(g.dir, d.file);
      await fsyncFile(file);
      d.mtimeMs = (await stat(file)).mtimeMs;
    }
    if (g.archive) await fsyncFile(path.join(g.dir, g.archive.file));
    const parent = Object.values(g.disks).some((d) => d.kind === 'incremental') ? g.previous?.volname : undefined;
    /** @type {Index} */
    const index = {
      format: 'pve-rawfile-example',
      version: 1,
      id: g.id,
      volname: g.volname,
      vmid: g.vmid,
      vmtype: g.vmtype,
      ctime: g.ctime,
      ...(parent ? { parent } : {}),
      ...(g.vmtype === 'qemu' ? { disks: g.disks } : { archive: g.archive }),
      configs: g.configs,
      protected: false,
    };
    await writeAtomic(path.join(g.dir, INDEX), JSON.stringify(index, null, 1));
    g.index = index;
    await rm(path.join(g.dir, WRITER), { force: true });
    if (g.vmtype === 'qemu') await writeAtomic(this.lastGoodFile(g.vmid), JSON.stringify({ volname: g.volname, id: g.id }));
    this.log.info(`${g.volname} complete`);
    return index;
  }

  /** @param {Running} g @param {string | undefined} why */
  async discard(g, why) {
    this.running.delete(g.vmid);
    this.log.warn(`removing the incomplete backup ${g.volname}${why ? ` (${why.trim()})` : ''}`);
    // disks read in full but the guest failed later: QEMU took the backup as successful, its
    // bitmap no longer counts from the previous backup. Forget it (the record goes first).
    if (g.vmtype === 'qemu' && (g.data === 'read' || g.data === 'reading')) await writeAtomic(this.lastGoodFile(g.vmid), '{}');
    await rm(g.dir, { recursive: true, force: true });
  }

  /** Keeps a copy of the task log beside the backup (after the index: not part of what makes it complete). @param {number} vmid @param {string} filename */
  async backupHandleLogFile(vmid, filename) {
    const g = this.running.get(vmid);
    this.running.delete(vmid);
    if (!g?.index) return;
    const tmp = path.join(g.dir, `backup.log.${randomUUID()}.tmp`);
    await copyFile(filename, tmp, fsc.COPYFILE_EXCL);
    await chmod(tmp, 0o600);
    await rename(tmp, path.join(g.dir, 'backup.log'));
  }

  // ----- restore -----------------------------------------------------------------------------

  /** @param {string} volname */
  async restoreGetMechanism(volname) {
    const index = await this.readIndex(volname);
    return index.vmtype === 'qemu' ? { mechanism: /** @type {const} */ ('qemu-img'), vmtype: index.vmtype } : { mechanism: /** @type {const} */ ('tar'), vmtype: index.vmtype };
  }

  /** @param {string} volname */
  async archiveGetGuestConfig(volname) {
    return (await this.readIndex(volname)).configs.guest;
  }

  /** @param {string} volname */
  async archiveGetFirewallConfig(volname) {
    return (await this.readIndex(volname)).configs.firewall;
  }

  /** The disks and their sizes, after checking each raw file is there at its size. @param {string} volname */
  async restoreVmInit(volname) {
    const index = await this.readIndex(volname);
    const { dir } = this.parse(volname);
    /** @type {Record<string, VolumeSize>} */
    const out = {};
    for (const [device, d] of Object.entries(index.disks ?? {})) {
      const st = await stat(path.join(dir, d.file)).catch(() => undefined);
      if (!st?.isFile() || st.size !== d.size) throw new RawFileError('ERR_RAWFILE_NOT_FOUND', `${volname}: ${d.file} is missing or has the wrong size`);
      out[device] = { size: d.size };
    }
    return out;
  }

  /**
   * The raw file itself: a regular file, raw, without a backing file, which is what qemu-server's
   * `file_size_info($path, undef, 'raw', 1)` check accepts before `qemu-img convert -f raw`
   * (qemu-server `PVE/QemuServer.pm` `restore_external_archive`; docs/pve-bridge-notes.md 4.1).
   * @param {string} volname @param {string} deviceName @param {Record<string, never>} _info
   */
  async restoreVmVolumeInit(volname, deviceName, _info) {
    const d = (await this.readIndex(volname)).disks?.[deviceName];
    if (!d) throw new RawFileError('ERR_RAWFILE_NOT_FOUND', `${volname} has no disk ${deviceName}`);
    return { qemuImgPath: path.join(this.parse(volname).dir, d.file) };
  }

  /**
   * The tar archive: a regular file ending `.tar`, which pve-container reads twice (`tar -tvf`,
   * then the extraction; pve-container `src/PVE/LXC/Create.pm`, docs/pve-bridge-notes.md 4.2).
   * @param {string} volname @param {string} _storeid @param {Record<string, never>} _info
   */
  async restoreContainerInit(volname, _storeid, _info) {
    const index = await this.readIndex(volname);
    if (!index.archive) throw new RawFileError('ERR_RAWFILE_NOT_FOUND', `${volname} is not a container backup`);
    return { tarPath: path.join(this.parse(volname).dir, index.archive.file) };
  }

  // ----- storage side (Proxmox VE's storage plugin calls these on a fresh provider) ----------

  /**
   * Completes a backup this provider is writing and has all data of, before a storage hook reads
   * it: vzdump runs notes, protected and prune before `backup_cleanup(..., 1)`.
   * @param {(g: Running) => boolean} which
   */
  async completeRunning(which) {
    for (const g of this.running.values()) {
      if (!which(g) || g.index || (g.vmtype === 'qemu' && g.data !== 'read') || !g.configs) continue;
      await this.complete(g);
    }
  }

  /**
   * Changes a complete backup's index under its lock.
   * @param {string} volname @param {(index: Index) => void} change
   */
  async updateIndex(volname, change) {
    await this.completeRunning((g) => g.volname === volname);
    const { dir } = this.parse(volname);
    await withIndexLock(dir, async () => {
      const index = await this.readIndex(volname);
      change(index);
      await writeAtomic(path.join(dir, INDEX), JSON.stringify(index, null, 1));
    });
  }

  /** @param {number} [vmid] @returns {Promise<StoredBackup[]>} */
  async listBackups(vmid) {
    /** @type {StoredBackup[]} */
    const out = [];
    const guests = vmid !== undefined ? [String(vmid)] : (await readdir(this.root).catch(() => [])).filter((n) => /^[1-9][0-9]*$/.test(n));
    for (const guest of guests) {
      const names = await readdir(path.join(this.root, guest)).catch(() => []);
      for (const name of names.sort()) {
        const volname = `backup/${guest}/${name}`;
        if (!VOLNAME.test(volname)) continue;
        /** @type {Index | undefined} */
        const index = await readJson(path.join(this.root, guest, name, INDEX)).catch(() => undefined);
        if (!index) continue; // incomplete: not a backup
        const size = Object.values(index.disks ?? {}).reduce((n, d) => n + d.size, 0) + (index.archive?.size ?? 0);
        out.push({ volname, vmid: index.vmid, vmtype: index.vmtype, ctime: index.ctime, size, ...(index.notes !== undefined ? { notes: index.notes } : {}), protected: index.protected });
      }
    }
    return out;
  }

  /** Deletes a backup: the index first, so a crash in between leaves nothing that looks complete. @param {string} volname */
  async removeBackup(volname) {
    const { dir } = this.parse(volname);
    await withIndexLock(dir, async () => {
      const index = await this.readIndex(volname);
      if (index.protected) throw new RawFileError('ERR_RAWFILE_PROTECTED', `${volname} is protected`);
      await unlink(path.join(dir, INDEX));
    });
    await rm(dir, { recursive: true, force: true });
  }

  /** @type {ProviderStorage} */
  get storage() {
    return {
      status: async () => {
        await this.ensureRoot();
        const s = await statfs(this.root);
        const total = s.blocks * s.bsize;
        return { total, free: s.bavail * s.bsize, used: total - s.bfree * s.bsize };
      },
      listBackups: async ({ vmid }) => this.listBackups(vmid),
      getNotes: async (volname) => (await this.readIndex(volname)).notes,
      getProtected: async (volname) => (await this.readIndex(volname)).protected,
      setNotes: (volname, notes) => this.updateIndex(volname, (i) => void (i.notes = notes)),
      setProtected: (volname, value) => this.updateIndex(volname, (i) => void (i.protected = value)),
      removeBackup: (volname) => this.removeBackup(volname),
      // Proxmox VE's retention rules (the package's markBackups); every backup stands alone, so no
      // chain keeps an older one
      prune: async ({ vmid, vmtype, keep, dryRun }) => {
        await this.completeRunning((g) => g.vmid === vmid);
        const backups = (await this.listBackups(vmid)).filter((b) => b.vmtype === vmtype);
        const marks = markBackups(backups.map((b) => ({ volname: b.volname, ctime: b.ctime, protected: b.protected === true })), keep);
        const removed = [];
        if (!dryRun) {
          for (const m of marks) {
            if (m.mark !== 'remove') continue;
            await this.removeBackup(m.volname);
            removed.push(m.volname);
          }
        }
        return { removed, marks: marks.map((m) => ({ volname: m.volname, vmid, vmtype, ctime: m.ctime, mark: m.mark })) };
      },
    };
  }
}

/**
 * The on-disk layout of a directory store, and the small file primitives it is built on.
 *
 * ```
 * <root>/pve-backup-store.json                  marks the folder as a store (format, version, storeid)
 * <root>/<vmid>/previous-info                   last complete VM backup (for incremental backups)
 * <root>/<vmid>/.changing                       lock held by a delete or prune of the guest's backups
 * <root>/<vmid>/.removing-<vmtype>-<backup-id>/ a backup whose removal was cut short (not listed)
 * <root>/<vmid>/<vmtype>-<backup-id>/           one backup, e.g. qemu-2024_05_01-10_00_00
 *     guest.conf  firewall.conf                 the guest's configuration files
 *     <device>.qcow2                            VM: one image per disk (incremental: backed by the parent's)
 *     root.tar | root/                          container: tar archive or directory copy
 *     backup.log                                the task log
 *     manifest.json                             written last: a backup without one is incomplete
 *     notes  protected                          mutable attributes (not covered by checksums)
 *     .lock                                     pid of the process writing the backup
 * ```
 *
 * Volume names are `backup/<vmid>/<vmtype>-<backup-id>`, volume ids `<storeid>:<volname>`.
 * Every folder is `0700` and every file `0600` (but inside `root/`, which is the container's tree).
 *
 * @packageDocumentation
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { execFile } from 'node:child_process';
import { lstat, readdir, readlink } from 'node:fs/promises';
import path from 'node:path';

import type { BitmapMode, GuestType } from '../provider/api.js';
import { fsyncPath } from '../provider/files.js';
import { matchVolname, type ParsedVolname } from '../provider/volname.js';
import { requireTool } from '../tools.js';
import { DirectoryStoreError } from './errors.js';

export { PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, mkdirPrivate, writeFileAtomic } from '../provider/files.js';
export { backupIdOf, isBackupDirName, volnameOf, type ParsedVolname } from '../provider/volname.js';

/** File marking a folder as a store. */
export const STORE_MARKER = 'pve-backup-store.json';
/** Format name in the marker and in every manifest. */
export const STORE_FORMAT = 'pve-backup-provider/directory';
/** Layout version; a store of a newer version is refused. */
export const STORE_VERSION = 1;
export const MANIFEST = 'manifest.json';
/**
 * Manifest version written. 1: every file recorded by its SHA-256 (read back after writing).
 * 2: disk images recorded by their content digests instead (`<image>.digests`, written by the
 * native core while it writes the image: docs/directory-store.md), so no file is read twice;
 * every other file still by its SHA-256. Both are read; a newer version is refused.
 */
export const MANIFEST_VERSION = 2;
export const LOCK = '.lock';
export const PREVIOUS_INFO = 'previous-info';

/**
 * Parses `backup/<vmid>/<vmtype>-<backup-id>`.
 * @throws {@link DirectoryStoreError} `ERR_INVALID_VOLID`.
 */
export function parseVolname(volname: string): ParsedVolname {
  const p = matchVolname(volname);
  if (!p) throw new DirectoryStoreError('ERR_INVALID_VOLID', `invalid backup volume name ${JSON.stringify(volname)}: expected backup/<vmid>/<qemu|lxc>-<YYYY_MM_DD-HH_MM_SS>`);
  return p;
}

/**
 * The backing file an incremental image records for its layer of `base` (the backup it builds
 * on): `../<base folder>/<file>`, relative, so a store can be moved whole. Written into the image
 * on backup and merge, and checked against its header.
 */
export function backingFileOf(base: string, file: string): string {
  return `../${parseVolname(base).dirName}/${file}`;
}

/** One disk of a VM backup, as the manifest records it. */
export interface ManifestDevice {
  /** Image file in the backup folder, `<device>.qcow2`. */
  file: string;
  /** Virtual size in bytes. */
  size: number;
  /** How QEMU's bitmap was used: `reuse` means the image holds only what changed since `base`. */
  bitmapMode: BitmapMode;
  /** Volume name of the backup whose image backs this one (incremental images only). */
  base?: string;
  /** Bytes read from the snapshot. */
  bytesRead: number;
}

/** How the manifest records one file: by its SHA-256, or (a disk image) by its content digests. */
export type ManifestFile = { size: number; sha256: string } | { size: number; digests: string };

/** `manifest.json`: what a complete backup holds. Written last, atomically. */
export interface Manifest {
  format: typeof STORE_FORMAT;
  version: number;
  volname: string;
  vmid: number;
  vmtype: GuestType;
  /** Unix time (s) the backup started. */
  ctime: number;
  status: 'ok';
  /** VM: `full` or `incremental` (some device backed by the parent); container: `tar` or `directory`. */
  mode: 'full' | 'incremental' | 'tar' | 'directory';
  /** Volume name of the backup this one builds on (incremental only). */
  parent?: string;
  /** The provider's bitmap chain id (seed generation) the images were taken with. */
  bitmapId?: string;
  /** VM disks by device name. */
  devices?: Record<string, ManifestDevice>;
  /**
   * Every file of the backup (relative path) with its size and how it is checked: its SHA-256
   * (`root/` as one tree digest), or for a disk image (version 2) its digest file, itself listed
   * with its SHA-256.
   */
  files: Record<string, ManifestFile>;
  /** SHA-256 of this manifest's JSON without this field. */
  checksum: string;
}

/** SHA-256 of the manifest's canonical JSON without `checksum`. */
export function manifestChecksum(m: Omit<Manifest, 'checksum'> & { checksum?: string }): string {
  const { checksum: _ignored, ...rest } = m;
  return createHash('sha256').update(JSON.stringify(rest)).digest('hex');
}

/** SHA-256 and size of a file. */
export async function hashFile(file: string | Buffer): Promise<{ size: number; sha256: string }> {
  const h = createHash('sha256');
  let size = 0;
  for await (const chunk of createReadStream(file, { highWaterMark: 4 << 20 })) {
    h.update(chunk as Buffer);
    size += (chunk as Buffer).length;
  }
  return { size, sha256: h.digest('hex') };
}

/**
 * A digest of a directory tree (the `directory` container mode): every entry's relative path,
 * type, mode, owner, size and symlink target, every regular file's content, in sorted order, and
 * (unless `xattrs: false`) every extended attribute of every entry: ACLs, file capabilities,
 * `trusted.*`, `user.*`, `security.*`, which a restore writes back and a change of which changes
 * what the container gets.
 *
 * `xattrs: false` is the digest of manifests written before extended attributes were covered;
 * the two can never be equal (the attributes' part is always there, even when empty).
 */
export async function hashTree(root: string, options: { xattrs?: boolean } = {}): Promise<{ size: number; sha256: string }> {
  const h = createHash('sha256');
  let size = 0;
  // names as bytes: a container's file names need not be UTF-8
  const walk = async (abs: Buffer, rel: Buffer): Promise<void> => {
    const st = await lstat(abs);
    h.update(Buffer.concat([rel, Buffer.from(`\0${st.mode}\0${st.uid}\0${st.gid}\0`)]));
    if (st.isSymbolicLink()) h.update(Buffer.concat([await readlink(abs, { encoding: 'buffer' }), Buffer.from('\0')]));
    else if (st.isFile()) {
      const f = await hashFile(abs);
      size += f.size;
      h.update(`${f.size}\0${f.sha256}\0`);
    } else if (st.isDirectory()) {
      const names = (await readdir(abs, { encoding: 'buffer' })).sort(Buffer.compare);
      for (const name of names) await walk(Buffer.concat([abs, Buffer.from('/'), name]), rel.length === 0 ? name : Buffer.concat([rel, Buffer.from('/'), name]));
    }
  };
  await walk(Buffer.from(root), Buffer.alloc(0));
  if (options.xattrs !== false) h.update(Buffer.concat([Buffer.from('\0xattrs\0'), await xattrDump(root)]));
  return { size, sha256: h.digest('hex') };
}

/**
 * Every extended attribute under `root` (symlinks not followed) in a canonical form: getfattr's
 * hex dump, one block per entry sorted by name, each block's attributes sorted. getfattr walks in
 * directory order and lists attributes in the file system's order; sorting makes the digest
 * depend on the attributes alone.
 */
async function xattrDump(root: string): Promise<Buffer> {
  const getfattr = requireTool('getfattr', 'attr');
  const out = await new Promise<Buffer>((resolve, reject) => {
    execFile(getfattr, ['-R', '-P', '-h', '-d', '-m', '-', '-e', 'hex', '.'], { cwd: root, encoding: 'buffer', maxBuffer: 1 << 30 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`getfattr of ${root} failed: ${stderr.toString().trim() || err.message}`, { cause: err }));
      else resolve(stdout);
    });
  });
  // names are quoted by getfattr (octal escapes), so a block never holds a raw newline of a name
  const blocks = out
    .toString('latin1')
    .split('\n\n')
    .map((b) => b.trim())
    .filter((b) => b !== '')
    .map((b) => {
      const [head, ...attrs] = b.split('\n');
      return [head!, ...attrs.sort()].join('\n');
    })
    .sort();
  return Buffer.from(blocks.join('\n\n'), 'latin1');
}

/** Fsyncs every file given and then their folder (what an image writer left in the page cache). */
export async function syncFiles(dir: string, files: string[]): Promise<void> {
  for (const f of files) await fsyncPath(path.join(dir, f));
  await fsyncPath(dir);
}

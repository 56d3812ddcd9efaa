/**
 * Container backups as plain directory copies with rsync, for the `directory` backup and restore
 * mechanisms, with owners shifted by the container's id map and no user namespace.
 *
 * Backup (vzdump `PVE::VZDump::LXC` `$rsync_vm`): `rsync --stats -h -X -A --filter='-x btrfs.*'
 * --numeric-ids -aH --delete --no-whole-file --sparse --one-file-system --relative
 * [--bwlimit=KiB] [--exclude=PATTERN...] SOURCE/./PATH... TARGET`. The `/./` in each source
 * makes `--relative` keep paths relative to the container's root, so exclusions anchored with `/`
 * and several mount points on their own file systems work together. With an id map, the copy is
 * then shifted to container ids in place (see `remap.ts`), so the target holds container ids as an
 * archive does; `lost+found` is excluded as vzdump does for unprivileged containers.
 *
 * Restore with rsync ({@link restoreDirectoryTree}) is the seed's pve-container
 * `restore_external_archive` `directory` mechanism; pve-container as released restores with a tar
 * pipe instead, and so does `restoreContainer` (`extractDirectoryWithTar` in `tar.ts`). The rsync
 * restore, kept for callers of this module: `rsync
 * --stats -h -X -A --numeric-ids -aH --delete --no-whole-file --sparse --one-file-system
 * --relative [--bwlimit=KiB] SOURCE/./ ROOTDIR`, then, with an id map, the restored tree is
 * shifted to host ids in place. `--delete` makes the restored tree exactly the backup's, so the
 * whole tree is shifted.
 *
 * Bandwidth limits are given in bytes/s and passed to rsync as whole KiB/s (rounded down, at
 * least 1), rsync's unit.
 *
 * @packageDocumentation
 */
import { mkdir, stat } from 'node:fs/promises';

import { InvalidArgumentError } from '../errors.js';
import { normaliseBandwidthLimit } from '../bandwidth.js';
import { normaliseSources } from './backup-sources.js';
import { rsyncExcludeArgs } from './exclude.js';
import { checkIdMap, containerToHost, hostToContainer, isIdentityMap, type IdMapEntry } from './idmap.js';
import { checkAborted, startTool } from './proc.js';
import { remapTree } from './remap.js';
import { checkRestoreTarget } from './restore-target.js';

/** Options of {@link backupDirectoryTree}. */
export interface BackupDirectoryTreeOptions {
  /** The container's root file system (mount points below it, mounted). */
  source: string;
  /** Directory receiving the copy (created if missing; an earlier copy there is updated, extra files deleted). */
  target: string;
  /** The container's id map: host ids on disk become container ids in the copy. Empty/absent: unchanged. */
  idMap?: IdMapEntry[];
  /** rsync exclusion patterns (see `exclude.ts`). */
  excludePaths?: string[];
  /** What to copy, relative to `source`: `.` (default) or mount point paths `./mnt/data`. */
  sources?: string[];
  /** Bytes per second (passed to rsync in KiB/s); 0/absent: unlimited. */
  bandwidthLimit?: number;
  /** Cancels: kills rsync, rejects with `ERR_CANCELLED` (the partial copy stays). */
  signal?: AbortSignal;
}

/** Options of {@link restoreDirectoryTree}. */
export interface RestoreDirectoryTreeOptions {
  /** A copy made by {@link backupDirectoryTree}. */
  source: string;
  /** Target directory (the container's mounted root file system). */
  rootdir: string;
  /** The container's id map: the copy's container ids become host ids. Empty/absent: unchanged. */
  idMap?: IdMapEntry[];
  /** Bytes per second (passed to rsync in KiB/s); 0/absent: unlimited. */
  bandwidthLimit?: number;
  /** Cancels: kills rsync, rejects with `ERR_CANCELLED`. */
  signal?: AbortSignal;
  /** Restore into a `rootdir` that already has content (rsync `--delete` then removes what the copy lacks). */
  allowNonEmpty?: boolean;
}

/** rsync flags common to backup and restore, from vzdump's `$rsync_vm`. */
const RSYNC_FLAGS = ['--stats', '-h', '-X', '-A', '--numeric-ids', '-aH', '--delete', '--no-whole-file', '--sparse', '--one-file-system', '--relative'];

function bwlimitArgs(limit: number | undefined): string[] {
  return limit === undefined ? [] : [`--bwlimit=${Math.max(1, Math.floor(limit / 1024))}`];
}

function stripSlash(p: string): string {
  return p.length > 1 ? p.replace(/\/+$/, '') : p;
}

/**
 * Copies `source` to `target` with rsync (see the module documentation for the exact command).
 *
 * @throws `ERR_INVALID_ARGUMENT`; `ERR_IDMAP` (bad map, or an owner or ACL entry outside it, naming
 * the file); `ERR_RSYNC` with rsync's stderr; `ERR_ACL`; `ERR_CANCELLED`; `ERR_TOOL_MISSING`.
 */
export async function backupDirectoryTree(o: BackupDirectoryTreeOptions): Promise<void> {
  const what = `rsync backup of ${o.source}`;
  checkAborted(o.signal, what);
  const idMap = checkIdMap(o.idMap);
  const limit = normaliseBandwidthLimit(o.bandwidthLimit, 'bandwidthLimit');
  const sources = normaliseSources(o.sources);
  const mapped = !isIdentityMap(idMap);
  const excludes = rsyncExcludeArgs(o.excludePaths ?? [], { skipLostAndFound: mapped });
  const st = await stat(o.source).catch(() => undefined);
  if (!st?.isDirectory()) throw new InvalidArgumentError(`backup source ${o.source} is not a directory`);
  if (typeof o.target !== 'string' || o.target === '') throw new InvalidArgumentError('target must be a directory path');
  await mkdir(o.target, { recursive: true });
  const src = stripSlash(o.source);
  const args = [
    ...RSYNC_FLAGS.slice(0, 4),
    '--filter=-x btrfs.*',
    ...RSYNC_FLAGS.slice(4),
    ...bwlimitArgs(limit),
    ...excludes,
    '--',
    ...sources.map((s) => (s === '.' ? `${src}/./` : `${src}/${s}`)),
    `${stripSlash(o.target)}/`,
  ];
  await startTool({ tool: 'rsync', code: 'ERR_RSYNC', what, args, signal: o.signal }).done;
  if (mapped) await remapTree(o.target, hostToContainer(idMap, 'owner'), hostToContainer(idMap, 'ACL entry'), o.signal);
}

/**
 * Copies a directory backup into `rootdir` with rsync (see the module documentation for the exact
 * command).
 *
 * @throws `ERR_INVALID_ARGUMENT`; `ERR_ROOTDIR_NOT_EMPTY`; `ERR_IDMAP` (naming the file);
 * `ERR_RSYNC` with rsync's stderr; `ERR_ACL`; `ERR_CANCELLED`; `ERR_TOOL_MISSING`.
 */
export async function restoreDirectoryTree(o: RestoreDirectoryTreeOptions): Promise<void> {
  const what = `rsync restore of ${o.source}`;
  checkAborted(o.signal, what);
  const idMap = checkIdMap(o.idMap);
  const limit = normaliseBandwidthLimit(o.bandwidthLimit, 'bandwidthLimit');
  const st = await stat(o.source).catch(() => undefined);
  if (!st?.isDirectory()) throw new InvalidArgumentError(`directory backup ${o.source} is not a directory`);
  await checkRestoreTarget(o.rootdir, o.allowNonEmpty);
  const args = [...RSYNC_FLAGS, ...bwlimitArgs(limit), '--', `${stripSlash(o.source)}/./`, `${stripSlash(o.rootdir)}/`];
  await startTool({ tool: 'rsync', code: 'ERR_RSYNC', what, args, signal: o.signal }).done;
  if (!isIdentityMap(idMap)) {
    await remapTree(o.rootdir, containerToHost(idMap, 'owner'), containerToHost(idMap, 'ACL entry'), o.signal);
  }
}

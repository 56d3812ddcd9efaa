/**
 * Helpers shared by the tar and directory tools: argument checks, the empty-target rule, id map
 * adapters that name the file.
 *
 * @packageDocumentation
 */
import { lstat, readdir } from 'node:fs/promises';
import { join } from 'node:path';

import { InvalidArgumentError } from '../errors.js';
import { ContainerAbortError, IdMapError, RootdirNotEmptyError } from './errors.js';
import { isIdentityMap, toContainer, toHost, validateIdMap, type IdMapEntry } from './idmap.js';

/**
 * GNU tar flags Proxmox uses for container archives, create and extract alike
 * (`@PVE::Storage::Plugin::COMMON_TAR_FLAGS`): one file system, preserve permissions, sparse files,
 * numeric owners, POSIX ACLs, xattrs limited to `user.*` and `security.capability`, and quiet about
 * sockets and xattrs the target cannot take.
 */
export const COMMON_TAR_FLAGS: readonly string[] = [
  '--one-file-system',
  '-p',
  '--sparse',
  '--numeric-owner',
  '--acls',
  '--xattrs',
  '--xattrs-include=user.*',
  '--xattrs-include=security.capability',
  '--warning=no-file-ignored',
  '--warning=no-xattr-write',
];

/** Throws a {@link ContainerAbortError} when `signal` is aborted. */
export function checkAborted(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted) throw new ContainerAbortError(what, signal.reason);
}

/** Validates an optional id map; returns it, or `[]`. */
export function checkIdMap(map: IdMapEntry[] | undefined): IdMapEntry[] {
  if (map === undefined) return [];
  if (!Array.isArray(map)) throw new InvalidArgumentError('idMap must be an array of id map entries');
  validateIdMap(map);
  return map;
}

/** Validates a bandwidth limit in bytes/s (0 or absent: none). */
export function checkBandwidth(limit: number | undefined): number {
  if (limit === undefined || limit === 0) return 0;
  if (typeof limit !== 'number' || !Number.isFinite(limit) || limit < 0) {
    throw new InvalidArgumentError(`bandwidthLimit must be a non-negative number of bytes/s, got ${String(limit)}`);
  }
  return limit;
}

/**
 * Normalises backup sources (paths relative to the source directory, as vzdump's `.` and
 * `./mnt/data`) to `./PATH` form. Absolute paths are taken relative to the source (`/mnt/data`),
 * as mount point paths are. `..` components are refused. Default: `['.']`.
 */
export function normaliseSources(sources: string[] | undefined): string[] {
  if (sources === undefined || sources.length === 0) return ['.'];
  return sources.map((s) => {
    if (typeof s !== 'string' || s === '' || /[\0\n]/.test(s)) throw new InvalidArgumentError(`bad backup source ${JSON.stringify(s)}`);
    const parts = s.split('/').filter((p) => p !== '' && p !== '.');
    if (parts.includes('..')) throw new InvalidArgumentError(`backup source '${s}' must not contain '..'`);
    return parts.length === 0 ? '.' : `./${parts.join('/')}`;
  });
}

/**
 * Refuses a restore target that holds anything but `lost+found` and empty directories (mount
 * point skeletons), unless `allowNonEmpty`.
 */
export async function checkRestoreTarget(rootdir: string, allowNonEmpty: boolean | undefined): Promise<void> {
  const st = await lstat(rootdir).catch((err: NodeJS.ErrnoException) => {
    throw new InvalidArgumentError(`restore target ${rootdir}: ${err.code === 'ENOENT' ? 'does not exist' : err.message}`, { cause: err });
  });
  if (!st.isDirectory()) throw new InvalidArgumentError(`restore target ${rootdir} is not a directory`);
  if (allowNonEmpty) return;
  const visit = async (dir: string, rel: string): Promise<void> => {
    for (const e of await readdir(dir, { withFileTypes: true })) {
      if (e.name === 'lost+found' && e.isDirectory()) continue;
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (!e.isDirectory()) throw new RootdirNotEmptyError(rootdir, r);
      await visit(join(dir, e.name), r);
    }
  };
  await visit(rootdir, '');
}

/** Host id to container id, naming the file on error. */
export function hostToContainer(map: IdMapEntry[], what: 'owner' | 'ACL entry') {
  return (type: 'u' | 'g', id: number, path: string): number => {
    if (isIdentityMap(map)) return id;
    try {
      return toContainer(map, type, id);
    } catch {
      throw new IdMapError(`${path}: ${what} host ${type === 'u' ? 'uid' : 'gid'} ${id} is not covered by the id map`, {
        idType: type,
        id,
        path,
      });
    }
  };
}

/** Container id to host id, naming the file on error. */
export function containerToHost(map: IdMapEntry[], what: 'owner' | 'ACL entry') {
  return (type: 'u' | 'g', id: number, path: string): number => {
    if (isIdentityMap(map)) return id;
    try {
      return toHost(map, type, id);
    } catch {
      throw new IdMapError(`${path}: ${what} container ${type === 'u' ? 'uid' : 'gid'} ${id} is not covered by the id map`, {
        idType: type,
        id,
        path,
      });
    }
  };
}

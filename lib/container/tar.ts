/**
 * Container archives with GNU tar, as Proxmox's vzdump writes them and pve-container restores them,
 * with owners shifted by the container's id map and no user namespace.
 *
 * Create (vzdump `PVE::VZDump::LXC::archive`): `tar -c -f - --totals` with Proxmox's common flags
 * (`--one-file-system -p --sparse --numeric-owner --acls --xattrs --xattrs-include=user.*
 * --xattrs-include=security.capability --warning=no-file-ignored --warning=no-xattr-write`) and
 * `--xattrs-include=trusted.*` (on extract too),
 * `--directory=SOURCE`, the exclusions (see `exclude.ts`) and the sources (`.` or `./mnt/...`).
 * With an id map, GNU tar (>= 1.29) rewrites owners itself: `--owner-map`/`--group-map` files list
 * every mapped host id with its container id, and `--owner`/`--group` give every other id a
 * sentinel that can never be a container id. The archive stream then passes through
 * {@link TarIdRewriter}, which refuses a member carrying the sentinel (a file whose owner the map
 * does not cover: error naming the file) and maps the ids named in ACL entries, which tar copies
 * verbatim. So the archive holds container ids only, as one made by vzdump inside the container's
 * user namespace does.
 *
 * Extract (pve-container `PVE::LXC::Create::restore_tar_archive`): `tar -x -f - --totals`, the same
 * common flags, `-C ROOTDIR --anchored --exclude ./dev/*` (the container's `/dev` is populated at
 * start); `--skip-old-files` as Proxmox passes it only with `allowNonEmpty`, because it also keeps
 * tar from giving the root directory (and any other directory already there) its owner and mode. With an id map the archive stream passes through
 * {@link TarIdRewriter} first, which turns every owner and ACL qualifier into its host id (an id
 * the map does not cover: error naming the member) — so tar creates each file with its final
 * owner: nothing is chowned afterwards, which would clear setuid/setgid bits and file
 * capabilities.
 *
 * Safety: member names are never taken as absolute and `..` members are refused: GNU tar strips
 * a leading `/` and refuses names with `..` by default, and `--absolute-names` is never passed;
 * symlinks to outside are created after the files (tar's own delayed symlink handling). A restore
 * target must be empty (but for `lost+found` and empty directories) unless `allowNonEmpty`.
 *
 * Bandwidth: the archive bytes pass through a {@link ThrottleStream} (vzdump uses `cstream -t`).
 *
 * @packageDocumentation
 */
import { createHash } from 'node:crypto';
import { closeSync, createReadStream, createWriteStream } from 'node:fs';
import { chmod, lstat, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { Transform, type Readable, type Writable } from 'node:stream';

import { InvalidArgumentError } from '../errors.js';
import { normaliseBandwidthLimit, ThrottleStream } from '../bandwidth.js';
import { normaliseSources } from './backup-sources.js';
import { ContainerAbortError, ContainerToolError, IdMapError } from './errors.js';
import { tarExcludeArgs } from './exclude.js';
import { MAX_ID, checkIdMap, containerToHost, hostToContainer, isIdentityMap, type IdMapEntry } from './idmap.js';
import { checkAborted, startTool } from './proc.js';
import { checkRestoreTarget } from './restore-target.js';
import { TarIdRewriter } from './tarstream.js';

/** Options of {@link createTarArchive}. */
export interface CreateTarArchiveOptions {
  /** Directory to archive: the container's root file system (mount points below it, mounted). */
  source: string;
  /** Archive file to write (created or truncated; removed again on failure). Uncompressed tar. */
  archive: string;
  /** The container's id map; owners on disk are host ids and are stored as container ids. Empty/absent: ids unchanged. */
  idMap?: IdMapEntry[];
  /** rsync-style exclusion patterns (see `exclude.ts`), e.g. `/tmp/?*`, `*.log`, `cache/`. */
  excludePaths?: string[];
  /** What to archive, relative to `source`: `.` (default) or mount point paths `./mnt/data`, each on its own file system. */
  sources?: string[];
  /** Bytes per second written to the archive; 0/absent: unlimited. */
  bandwidthLimit?: number;
  /** Cancels: kills tar, removes the partial archive, rejects with `ERR_CANCELLED`. */
  signal?: AbortSignal;
}

/** Options of {@link extractTarArchive}. */
export interface ExtractTarArchiveOptions {
  /** Archive to extract (`.tar`, or `.tar.gz`/`.tgz`; other compressions only without an id map: `.tar.zst`, `.tar.bz2`, `.tar.xz`, `.tar.lzo`). */
  archive: string;
  /** Target directory (the container's mounted root file system). */
  rootdir: string;
  /** The container's id map; the archive's container ids become host ids. Empty/absent: ids unchanged. */
  idMap?: IdMapEntry[];
  /** Bytes per second read from the archive; 0/absent: unlimited. */
  bandwidthLimit?: number;
  /** Cancels: kills tar, rejects with `ERR_CANCELLED` (what was extracted stays). */
  signal?: AbortSignal;
  /** Restore into a `rootdir` that already has content (existing files are kept: `--skip-old-files`). */
  allowNonEmpty?: boolean;
}

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

/**
 * Extended attributes kept beyond Proxmox's `user.*` and `security.capability`, on create and
 * extract alike (tar stores and restores only what an include pattern names): `trusted.*`, which
 * file systems and tools in a container (overlayfs layers, glusterfs, some daemons) rely on and
 * which a directory-mode backup (rsync `-X` as root) keeps too.
 */
const EXTRA_XATTR_FLAGS: readonly string[] = ['--xattrs-include=trusted.*'];

/** Largest number of ids per type written into a `--owner-map`/`--group-map` file. */
const MAX_MAPPED_IDS = 1 << 24;

/** A container id no range of `type` covers, stored for host ids outside the map. */
function sentinelFor(map: IdMapEntry[], type: 'u' | 'g'): number {
  let candidate = MAX_ID;
  for (;;) {
    const hit = map.find((e) => e.type === type && candidate >= e.container && candidate < e.container + e.length);
    if (!hit) return candidate;
    candidate = hit.container - 1;
    if (candidate < 0) throw new IdMapError(`the id map covers every ${type === 'u' ? 'uid' : 'gid'}; nothing is left to mark unmapped owners`);
  }
}

async function writeMapFile(path: string, map: IdMapEntry[], type: 'u' | 'g'): Promise<void> {
  const ranges = map.filter((e) => e.type === type);
  const total = ranges.reduce((n, e) => n + e.length, 0);
  if (total > MAX_MAPPED_IDS) {
    throw new IdMapError(`the id map has ${total} ${type === 'u' ? 'uids' : 'gids'}; at most ${MAX_MAPPED_IDS} are supported for tar archives`);
  }
  const lines: string[] = [];
  for (const e of ranges) for (let i = 0; i < e.length; i++) lines.push(`+${e.host + i} +${e.container + i}\n`);
  await writeFile(path, lines.join(''), { mode: 0o600 });
}

/** Prefers the most telling of several errors: cancellation, then id map, then tool, then others. */
function pickError(signal: AbortSignal | undefined, what: string, errors: unknown[]): unknown {
  if (signal?.aborted) return new ContainerAbortError(what, signal.reason);
  const real = errors.filter((e) => e !== undefined);
  return (
    real.find((e) => e instanceof ContainerAbortError) ??
    real.find((e) => e instanceof IdMapError) ??
    real.find((e) => e instanceof ContainerToolError && e.exitCode !== null) ??
    real.find((e) => e instanceof ContainerToolError) ??
    real[0]
  );
}

async function settle(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
    return undefined;
  } catch (err) {
    return err ?? new Error('unknown failure');
  }
}

/** What {@link planTarCreate} prepared: tar's arguments and, with an id map, the filter its output passes. */
interface TarCreatePlan {
  args: string[];
  /** Refuses owners the map does not cover and maps ACL qualifiers (absent without an id map). */
  rewriter?: TarIdRewriter;
  /** Removes the map files. */
  cleanup(): Promise<void>;
}

/** Checks the options and builds the tar command of a container archive (see the module documentation). */
async function planTarCreate(o: Omit<CreateTarArchiveOptions, 'archive' | 'bandwidthLimit'>, what: string): Promise<TarCreatePlan> {
  checkAborted(o.signal, what);
  const idMap = checkIdMap(o.idMap);
  const sources = normaliseSources(o.sources);
  const mapped = !isIdentityMap(idMap);
  const excludes = tarExcludeArgs(o.excludePaths ?? [], { skipLostAndFound: mapped });
  const st = await stat(o.source).catch(() => undefined);
  if (!st?.isDirectory()) throw new InvalidArgumentError(`backup source ${o.source} is not a directory`);
  if (!mapped) {
    return { args: ['-c', '-f', '-', '--totals', ...COMMON_TAR_FLAGS, ...EXTRA_XATTR_FLAGS, `--directory=${o.source}`, ...excludes, '--', ...sources], cleanup: async () => {} };
  }
  const mapDir = await mkdtemp(join(tmpdir(), 'pve-tar-map-'));
  const cleanup = (): Promise<void> => rm(mapDir, { recursive: true, force: true });
  try {
    await writeMapFile(join(mapDir, 'owner-map'), idMap, 'u');
    await writeMapFile(join(mapDir, 'group-map'), idMap, 'g');
    const sentinel = { u: sentinelFor(idMap, 'u'), g: sentinelFor(idMap, 'g') };
    // `--owner=N` (not `+N`: tar 1.34 ignores the `+` form here) is tar's fallback for ids
    // missing from the map file.
    const mapArgs = [`--owner-map=${join(mapDir, 'owner-map')}`, `--group-map=${join(mapDir, 'group-map')}`, `--owner=${sentinel.u}`, `--group=${sentinel.g}`];
    const toContainer = hostToContainer(idMap, 'ACL entry');
    const rewriter = new TarIdRewriter({
      mapOwner: (type, id, path) => {
        if (id !== sentinel[type]) return id;
        throw new IdMapError(`${path}: owner ${type === 'u' ? 'uid' : 'gid'} is not covered by the id map`, { idType: type, path });
      },
      mapAcl: toContainer,
    });
    return { args: ['-c', '-f', '-', '--totals', ...COMMON_TAR_FLAGS, ...EXTRA_XATTR_FLAGS, ...mapArgs, `--directory=${o.source}`, ...excludes, '--', ...sources], rewriter, cleanup };
  } catch (err) {
    await cleanup();
    throw err;
  }
}

/**
 * Writes a container archive of `source` to `archive` (see the module documentation for the exact
 * tar command). Returns the archive's size in bytes and its SHA-256, computed as it is written.
 *
 * @throws `ERR_INVALID_ARGUMENT` for bad options; `ERR_IDMAP` for a bad map or an owner or ACL
 * entry the map does not cover (naming the file); `ERR_TAR` with tar's stderr; `ERR_CANCELLED`;
 * `ERR_TOOL_MISSING` when tar is not installed.
 */
export async function createTarArchive(o: CreateTarArchiveOptions): Promise<{ bytes: number; sha256: string }> {
  const what = `tar archive of ${o.source}`;
  checkAborted(o.signal, what);
  if (typeof o.archive !== 'string' || o.archive === '') throw new InvalidArgumentError('archive must be a file path');
  const limit = normaliseBandwidthLimit(o.bandwidthLimit, 'bandwidthLimit');
  const plan = await planTarCreate(o, what);
  try {
    const tar = startTool({ tool: 'tar', code: 'ERR_TAR', what, args: plan.args, stdio: ['ignore', 'pipe', 'pipe'], signal: o.signal });
    const throttle = new ThrottleStream(limit);
    const stages: (Readable | Writable)[] = [tar.child.stdout!];
    if (plan.rewriter) stages.push(plan.rewriter);
    // the archive's SHA-256 as it is written: no second read of it to record its checksum
    const sha256 = createHash('sha256');
    const digest = new Transform({
      transform(chunk: Buffer, _enc, done) {
        sha256.update(chunk);
        done(null, chunk);
      },
    });
    // only its owner may read an archive of a container's files, whatever the umask
    stages.push(throttle, digest, createWriteStream(o.archive, { mode: 0o600 }));
    const piped = pipeline(stages as unknown as [Readable, Writable]).catch((err: unknown) => {
      tar.kill();
      throw err;
    });
    const [pipeErr, tarErr] = await Promise.all([settle(piped), settle(tar.done)]);
    if (pipeErr !== undefined || tarErr !== undefined) {
      const err = pickError(o.signal, what, [pipeErr, tarErr]);
      await rm(o.archive, { force: true });
      throw await withHostId(err, o.source);
    }
    // the creation mode is filtered by the umask (0400 under 0277): make it exactly 0600
    await chmod(o.archive, 0o600);
    return { bytes: throttle.bytes, sha256: sha256.digest('hex') };
  } finally {
    await plan.cleanup();
  }
}

/**
 * Left out of a stream's pax headers: GNU tar writes `atime` and `ctime` records for every
 * member once `--acls`/`--xattrs` make the archive pax, and reading a file for a backup changes
 * its atime, so every header, and every chunk holding one, would change from one backup to the
 * next. Without them an unchanged file gives the same bytes (the reproducible-builds recipe);
 * a restore sets the mtime as from any archive, and Proxmox VE's containers need no atime back.
 */
const STABLE_HEADER_FLAGS: readonly string[] = ['--pax-option=delete=atime,delete=ctime'];

/** Options of {@link writeTarStream}. */
export interface WriteTarStreamOptions extends Omit<CreateTarArchiveOptions, 'archive' | 'bandwidthLimit'> {
  /**
   * Where the archive stream goes: a file descriptor (a pipe's write end) this call takes over
   * and closes when tar is done, so that the reader sees the stream's end. No bandwidth limit
   * here: the reader applies one.
   */
  fd: number;
}

/**
 * Writes the container archive of `source` that {@link createTarArchive} would write (the same
 * tar command and id mapping, but no atime and ctime records: {@link STABLE_HEADER_FLAGS}, so
 * that an unchanged file streams the same bytes each time) into a file descriptor: without an id map tar writes into it
 * itself (no byte passes through JavaScript); with one, tar's output passes
 * {@link TarIdRewriter} on its way. The chunk store's container backup reads the other end.
 *
 * @throws As {@link createTarArchive}; the descriptor is closed whatever happens (a failure
 * before the end closes it early, so the reader sees a short stream: the caller must fail the
 * backup on this call's error whatever the reader says).
 */
export async function writeTarStream(o: WriteTarStreamOptions): Promise<void> {
  const what = `tar archive of ${o.source}`;
  let fdOpen = true;
  const closeFd = (): void => {
    if (!fdOpen) return;
    fdOpen = false;
    closeSync(o.fd);
  };
  try {
    const plan = await planTarCreate(o, what);
    try {
      plan.args.splice(plan.args.indexOf('--totals') + 1, 0, ...STABLE_HEADER_FLAGS);
      if (!plan.rewriter) {
        const tar = startTool({ tool: 'tar', code: 'ERR_TAR', what, args: plan.args, stdio: ['ignore', o.fd, 'pipe'], signal: o.signal });
        closeFd(); // tar holds its own copy: the reader sees the end when tar exits
        const tarErr = await settle(tar.done);
        if (tarErr !== undefined) throw await withHostId(pickError(o.signal, what, [tarErr]), o.source);
        return;
      }
      const tar = startTool({ tool: 'tar', code: 'ERR_TAR', what, args: plan.args, stdio: ['ignore', 'pipe', 'pipe'], signal: o.signal });
      fdOpen = false; // the write stream closes it
      const out = createWriteStream('', { fd: o.fd, autoClose: true });
      const piped = pipeline(tar.child.stdout!, plan.rewriter, out).catch((err: unknown) => {
        tar.kill();
        throw err;
      });
      const [pipeErr, tarErr] = await Promise.all([settle(piped), settle(tar.done)]);
      if (pipeErr !== undefined || tarErr !== undefined) throw await withHostId(pickError(o.signal, what, [pipeErr, tarErr]), o.source);
    } finally {
      await plan.cleanup();
    }
  } finally {
    closeFd();
  }
}

/** Adds the actual host id to an "owner not covered" error, looking the file up (best effort). */
async function withHostId(err: unknown, source: string): Promise<unknown> {
  if (!(err instanceof IdMapError) || err.path === undefined || err.id !== undefined || err.idType === undefined) return err;
  if (/\\/.test(err.path)) return err; // escaped name: cannot look it up reliably
  const st = await lstat(join(source, err.path)).catch(() => undefined);
  if (!st) return err;
  const id = err.idType === 'u' ? st.uid : st.gid;
  return new IdMapError(`${err.path}: owner host ${err.idType === 'u' ? 'uid' : 'gid'} ${id} is not covered by the id map`, {
    idType: err.idType,
    id,
    path: err.path,
  });
}

const COMPRESSION: Record<string, string> = {
  '.gz': '-z',
  '.tgz': '-z',
  '.bz2': '-j',
  '.xz': '-J',
  '.lzo': '--lzop',
  '.zst': '--zstd',
};

/**
 * Extracts a container archive into `rootdir` (see the module documentation for the exact tar
 * command), turning container ids into host ids with `idMap`.
 *
 * @throws `ERR_INVALID_ARGUMENT`; `ERR_ROOTDIR_NOT_EMPTY`; `ERR_IDMAP` (bad map, or an owner or ACL
 * entry outside it, naming the member); `ERR_TAR` with tar's stderr (also for `..` members);
 * `ERR_CANCELLED`; `ERR_TOOL_MISSING`.
 */
export async function extractTarArchive(o: ExtractTarArchiveOptions): Promise<void> {
  const what = `tar extract of ${o.archive}`;
  checkAborted(o.signal, what);
  const idMap = checkIdMap(o.idMap);
  const limit = normaliseBandwidthLimit(o.bandwidthLimit, 'bandwidthLimit');
  const mapped = !isIdentityMap(idMap);
  const ast = await stat(o.archive).catch(() => undefined);
  if (!ast?.isFile()) throw new InvalidArgumentError(`archive ${o.archive} is not a file`);
  await checkRestoreTarget(o.rootdir, o.allowNonEmpty);

  const ext = /(\.tgz|\.tar\.([^./]+))$/.exec(o.archive);
  const suffix = ext ? (ext[1] === '.tgz' ? '.tgz' : `.${ext[2]!}`) : '';
  if (suffix !== '' && suffix !== '.tar' && COMPRESSION[suffix] === undefined) {
    throw new InvalidArgumentError(`archive ${o.archive}: unknown compression '${suffix}'`);
  }
  const compression = suffix === '' ? undefined : COMPRESSION[suffix];
  const gunzipInNode = mapped && compression === '-z';
  if (mapped && compression !== undefined && !gunzipInNode) {
    throw new InvalidArgumentError(`archive ${o.archive}: with an id map only uncompressed or gzip archives can be restored`);
  }

  const stages: Readable[] = [createReadStream(o.archive), new ThrottleStream(limit)];
  if (gunzipInNode) stages.push(createGunzip());
  await extractStream(what, stages, compression && !gunzipInNode ? [compression] : [], idMap, o);
}

/** Options of {@link extractDirectoryWithTar}. */
export interface ExtractDirectoryOptions {
  /** A directory-mode backup: the container's tree with container ids. */
  source: string;
  /** Target directory (the container's mounted root file system). */
  rootdir: string;
  /** The container's id map; the copy's container ids become host ids. Empty/absent: ids unchanged. */
  idMap?: IdMapEntry[];
  /** Bytes per second through the pipe; 0/absent: unlimited. */
  bandwidthLimit?: number;
  /** Cancels: kills both tars, rejects with `ERR_CANCELLED` (what was extracted stays). */
  signal?: AbortSignal;
  /** Restore into a `rootdir` that already has content (existing files are kept: `--skip-old-files`). */
  allowNonEmpty?: boolean;
}

/**
 * Restores a directory-mode backup as pve-container does (`src/PVE/LXC/Create.pm`
 * `restore_external_archive`, mechanism `directory`; docs/pve-bridge-notes.md 4.2): not rsync but
 * `tar cpf - <common flags without --one-file-system> --directory=SOURCE .` piped into the extract
 * of {@link extractTarArchive} (`--totals`, the common flags, `-C ROOTDIR --anchored --exclude
 * ./dev/*`). pve-container runs the extracting tar in the container's user namespace; here the
 * stream passes through {@link TarIdRewriter} instead, as for an archive. So the restored tree
 * matches what a tar-mode restore gives: `/dev` contents are left out, files already in the
 * target are kept (with `allowNonEmpty`) rather than deleted.
 *
 * @throws `ERR_INVALID_ARGUMENT`; `ERR_ROOTDIR_NOT_EMPTY`; `ERR_IDMAP` (naming the member);
 * `ERR_TAR` with the failing tar's stderr; `ERR_CANCELLED`; `ERR_TOOL_MISSING`.
 */
export async function extractDirectoryWithTar(o: ExtractDirectoryOptions): Promise<void> {
  const what = `tar restore of directory ${o.source}`;
  checkAborted(o.signal, what);
  const idMap = checkIdMap(o.idMap);
  const limit = normaliseBandwidthLimit(o.bandwidthLimit, 'bandwidthLimit');
  const st = await stat(o.source).catch(() => undefined);
  if (!st?.isDirectory()) throw new InvalidArgumentError(`directory backup ${o.source} is not a directory`);
  await checkRestoreTarget(o.rootdir, o.allowNonEmpty);
  // pve-container: grep { $_ ne '--one-file-system' } @COMMON_TAR_FLAGS (the copy may span mount points)
  const createArgs = ['-c', '-f', '-', ...COMMON_TAR_FLAGS.filter((f) => f !== '--one-file-system'), ...EXTRA_XATTR_FLAGS, `--directory=${o.source}`, '.'];
  const create = startTool({ tool: 'tar', code: 'ERR_TAR', what: `${what} (tar create)`, args: createArgs, stdio: ['ignore', 'pipe', 'pipe'], signal: o.signal });
  try {
    await extractStream(what, [create.child.stdout!, new ThrottleStream(limit)], [], idMap, o, create);
  } finally {
    create.kill();
  }
}

/** Options of {@link extractTarStream}. */
export interface ExtractTarStreamOptions extends Omit<ExtractTarArchiveOptions, 'archive' | 'bandwidthLimit'> {
  /**
   * The uncompressed archive stream: a file descriptor (a pipe's read end) this call takes over
   * and closes. No bandwidth limit here: the writer applies one.
   */
  fd: number;
}

/**
 * Extracts an archive stream as {@link extractTarArchive} extracts a file (the same tar command,
 * ids shifted by `idMap`): without an id map tar reads the descriptor itself; with one the
 * stream passes {@link TarIdRewriter} first. The chunk store's container restore writes the
 * other end.
 *
 * @throws As {@link extractTarArchive}; the descriptor is closed whatever happens.
 */
export async function extractTarStream(o: ExtractTarStreamOptions): Promise<void> {
  const what = `tar extract of a stream into ${o.rootdir}`;
  let handedOver = false;
  try {
    checkAborted(o.signal, what);
    const idMap = checkIdMap(o.idMap);
    await checkRestoreTarget(o.rootdir, o.allowNonEmpty);
    handedOver = true;
    await extractStream(what, { fd: o.fd }, [], idMap, o);
  } finally {
    if (!handedOver) closeSync(o.fd);
  }
}

/**
 * Pipes `stages` (the archive bytes) into `tar -x` under `o.rootdir`, through the id rewriter when
 * `idMap` is not the identity; `producer` is a tar writing the stream, whose failure counts too.
 */
async function extractStream(
  what: string,
  input: Readable[] | { fd: number },
  extraArgs: string[],
  idMap: IdMapEntry[],
  o: { rootdir: string; allowNonEmpty?: boolean; signal?: AbortSignal },
  producer?: ReturnType<typeof startTool>,
): Promise<void> {
  const args = ['-x', '-f', '-', '--totals', ...COMMON_TAR_FLAGS, ...EXTRA_XATTR_FLAGS, ...extraArgs];
  // pve-container passes --skip-old-files; it also keeps tar from setting the owner and mode of
  // directories that exist already, the root first. A target checked empty gets them from the
  // archive instead; one restored into with allowNonEmpty keeps Proxmox's behaviour.
  args.push('-C', o.rootdir);
  if (o.allowNonEmpty) args.push('--skip-old-files');
  args.push('--anchored', '--exclude', './dev/*');
  if (!Array.isArray(input)) {
    if (!isIdentityMap(idMap)) {
      const source = createReadStream('', { fd: input.fd, autoClose: true });
      try {
        return await extractStream(what, [source], extraArgs, idMap, o);
      } finally {
        source.destroy(); // closes the descriptor (if the pipeline did not)
      }
    }
    let tar: ReturnType<typeof startTool>;
    try {
      // nothing to rewrite: tar reads the descriptor itself
      tar = startTool({ tool: 'tar', code: 'ERR_TAR', what, args, stdio: [input.fd, 'ignore', 'pipe'], signal: o.signal });
    } finally {
      closeSync(input.fd); // tar holds its own copy
    }
    const tarErr = await settle(tar.done);
    if (tarErr !== undefined) throw pickError(o.signal, what, [tarErr]);
    return;
  }
  const stages = input;
  const tar = startTool({ tool: 'tar', code: 'ERR_TAR', what, args, stdio: ['pipe', 'ignore', 'pipe'], signal: o.signal });
  const all: (Readable | Writable)[] = [...stages];
  if (!isIdentityMap(idMap)) {
    all.push(new TarIdRewriter({ mapOwner: containerToHost(idMap, 'owner'), mapAcl: containerToHost(idMap, 'ACL entry') }));
  }
  all.push(tar.child.stdin!);
  // tar stops reading at the end-of-archive blocks and exits; what follows (record padding) then
  // meets a closed pipe. That is no error of its own: tar's exit status decides.
  const closedPipe = (err: unknown): boolean => {
    const code = (err as NodeJS.ErrnoException | undefined)?.code;
    return code === 'EPIPE' || code === 'ERR_STREAM_PREMATURE_CLOSE' || code === 'ERR_STREAM_DESTROYED';
  };
  const piped = pipeline(all as unknown as [Readable, Writable]).catch((err: unknown) => {
    if (closedPipe(err)) return;
    tar.kill();
    producer?.kill();
    throw err;
  });
  const [pipeErr, tarErr, producerErr] = await Promise.all([settle(piped), settle(tar.done), producer ? settle(producer.done) : undefined]);
  if (pipeErr === undefined && tarErr === undefined && producerErr === undefined) return;
  throw pickError(o.signal, what, [pipeErr, tarErr, producerErr]);
}

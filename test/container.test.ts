/**
 * Container backup and restore against real GNU tar and rsync, as root, on real trees (see
 * helpers/tree.ts): round trips with and without an id map, exclusions, bandwidth limits,
 * cancellation, bad maps, ids outside the map, unsafe archives.
 */
import { execFileSync } from 'node:child_process';
import { chownSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';

import { afterEach, beforeAll, beforeEach, describe, expect, test } from 'vitest';

import { backupDirectoryTree, restoreDirectoryTree } from '../lib/container/directory.js';
import { parseIdMap, type IdMapEntry } from '../lib/container/idmap.js';
import { createTarArchive, extractTarArchive } from '../lib/container/tar.js';
import { buildTree, requireContainerTools, shiftSnapshot, snapshotTree, TEST_MAP_LINES, type TreeEntry } from './helpers/tree.js';

let dir = '';
const MAP: IdMapEntry[] = parseIdMap(TEST_MAP_LINES);
const BASE = 100000;

beforeAll(() => {
  requireContainerTools();
});

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'pve-ct-test-'));
});

afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

function mk(name: string): string {
  const p = join(dir, name);
  mkdirSync(p, { recursive: true });
  return p;
}

/** A source tree: owners 0/33/1000 plus `base`. */
function sourceTree(base: number): string {
  const src = mk('src');
  buildTree(src, { idBase: base });
  return src;
}

/** The source snapshot without the given entries (and everything under them). */
function without(snap: Record<string, TreeEntry>, paths: string[]): Record<string, TreeEntry> {
  const out: Record<string, TreeEntry> = {};
  for (const [k, v] of Object.entries(snap)) {
    if (paths.some((p) => k === p || k.startsWith(`${p}/`))) continue;
    out[k] = v;
  }
  return out;
}

/**
 * The live children of this process with command name `name`, read from /proc (never guessed: a
 * failure to read /proc fails the test instead of reporting no children). Zombies count: a child
 * that was killed but not waited for is still there.
 */
function childrenNamed(name: string): string[] {
  const found: string[] = [];
  for (const pid of readdirSync('/proc').filter((e) => /^\d+$/.test(e))) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
    } catch (err) {
      // A process that exited between the listing and the read is not a child any more.
      if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ESRCH') continue;
      throw err;
    }
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split at the last ')'.
    const close = stat.lastIndexOf(')');
    const comm = stat.slice(stat.indexOf('(') + 1, close);
    const ppid = Number(stat.slice(close + 2).split(' ')[1]);
    if (ppid === process.pid && comm === name) found.push(pid);
  }
  return found;
}

async function rejection(p: Promise<unknown>): Promise<Error & { code?: string; path?: string; id?: number; stderr?: string }> {
  try {
    await p;
  } catch (err) {
    return err as Error & { code?: string };
  }
  throw new Error('expected a rejection');
}

describe('tar round trips', () => {
  test('privileged (no id map): the restored tree equals the source', async () => {
    const src = sourceTree(0);
    const before = snapshotTree(src);
    const archive = join(dir, 'ct.tar');
    const { bytes } = await createTarArchive({ source: src, archive });
    expect(bytes).toBe(statSync(archive).size);
    // Sparse: 64 MiB of holes are not in the archive.
    expect(bytes).toBeLessThan(8 * 1024 * 1024);
    const dst = mk('dst');
    await extractTarArchive({ archive, rootdir: dst });
    const after = snapshotTree(dst);
    expect(after).toEqual(before);
    expect(after['sparse.img']!.sparse).toBe(true);
    expect(after['usr-bin-su']!.mode).toBe('4755');
    expect(after['ping']!.xattrs!['security.capability']).toBe('0x0100000200200000000000000000000000000000'); // cap_net_raw+ep, as helpers/tree.ts sets it
    expect(after['hello.txt']!.links).toEqual(['etc/hello-again', 'hardlink', 'hello.txt']);
  });

  test('the archive is 0600 whatever the umask (0277 would make it 0400)', async () => {
    const src = sourceTree(0);
    const archive = join(dir, 'ct-umask.tar');
    const old = process.umask(0o277);
    try {
      await createTarArchive({ source: src, archive });
    } finally {
      process.umask(old);
    }
    expect(statSync(archive).mode & 0o777).toBe(0o600);
  });

  test('unprivileged: the archive holds container ids (owners and ACLs), the restore host ids', async () => {
    const src = sourceTree(BASE);
    const before = snapshotTree(src);
    const archive = join(dir, 'ct.tar');
    await createTarArchive({ source: src, archive, idMap: MAP });

    const listing = execFileSync('tar', ['-tvv', '--numeric-owner', '-f', archive], { encoding: 'latin1' });
    expect(listing).toMatch(/ 1000\/1000 .* \.\/home\/user\/notes\.txt\n/);
    expect(listing).toMatch(/ 0\/33 .* \.\/usr-bin-wall\n/);
    expect(listing).not.toMatch(/ 1\d{5}\//);

    // Without a map, the archive's ids come out as they are stored: container ids everywhere.
    const raw = mk('raw');
    await extractTarArchive({ archive, rootdir: raw });
    expect(snapshotTree(raw)).toEqual(shiftSnapshot(before, -BASE));

    // With the map: the source again.
    const dst = mk('dst');
    await extractTarArchive({ archive, rootdir: dst, idMap: MAP });
    expect(snapshotTree(dst)).toEqual(before);
  });

  test('a gzip archive restores with an id map', async () => {
    const src = sourceTree(BASE);
    const before = snapshotTree(src);
    await createTarArchive({ source: src, archive: join(dir, 'ct.tar'), idMap: MAP });
    writeFileSync(join(dir, 'ct.tar.gz'), gzipSync(readFileSync(join(dir, 'ct.tar'))));
    const dst = mk('dst');
    await extractTarArchive({ archive: join(dir, 'ct.tar.gz'), rootdir: dst, idMap: MAP });
    expect(snapshotTree(dst)).toEqual(before);
  });

  test('sources: only the listed mount point paths', async () => {
    const src = sourceTree(0);
    const archive = join(dir, 'ct.tar');
    await createTarArchive({ source: src, archive, sources: ['./srv', '/home/user'] });
    const names = execFileSync('tar', ['-tf', archive], { encoding: 'latin1' }).trim().split('\n').sort();
    expect(names).toEqual(['./home/user/', './home/user/notes.txt', './srv/', './srv/data.bin']);
    await expect(createTarArchive({ source: src, archive, sources: ['../etc'] })).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
  });
});

describe('directory round trips', () => {
  test('privileged (no id map): copy and restore equal the source', async () => {
    const src = sourceTree(0);
    const before = snapshotTree(src);
    const copy = join(dir, 'copy');
    await backupDirectoryTree({ source: src, target: copy });
    expect(snapshotTree(copy)).toEqual(before);
    const dst = mk('dst');
    await restoreDirectoryTree({ source: copy, rootdir: dst });
    const after = snapshotTree(dst);
    expect(after).toEqual(before);
    expect(after['sparse.img']!.sparse).toBe(true);
  });

  test('unprivileged: the copy holds container ids (owners and ACLs), the restore host ids', async () => {
    const src = sourceTree(BASE);
    const before = snapshotTree(src);
    const copy = join(dir, 'copy');
    await backupDirectoryTree({ source: src, target: copy, idMap: MAP });
    expect(snapshotTree(copy)).toEqual(shiftSnapshot(before, -BASE));
    // A second run into the same target updates it (rsync sees host ids again) and maps again.
    writeFileSync(join(src, 'added'), 'new\n');
    chownSync(join(src, 'added'), BASE + 5, BASE + 5);
    await backupDirectoryTree({ source: src, target: copy, idMap: MAP });
    const before2 = snapshotTree(src);
    expect(snapshotTree(copy)).toEqual(shiftSnapshot(before2, -BASE));
    const dst = mk('dst');
    await restoreDirectoryTree({ source: copy, rootdir: dst, idMap: MAP });
    expect(snapshotTree(dst)).toEqual(before2);
  });
});

describe('exclusions', () => {
  const patterns = ['/anchored-dir', 'app.log', 'cache/', '*.tmp', '/deep/**/skip-me'];
  const gone = ['anchored-dir', 'app.log', 'var/log/app.log', 'var/tmp/junk.tmp', 'deep/a/b/skip-me'];

  test('tar: anchored and unanchored patterns, directories kept empty', async () => {
    const src = sourceTree(0);
    const before = snapshotTree(src);
    const archive = join(dir, 'ct.tar');
    await createTarArchive({ source: src, archive, excludePaths: patterns });
    const dst = mk('dst');
    await extractTarArchive({ archive, rootdir: dst });
    const after = snapshotTree(dst);
    // `cache/`: tar keeps the directories, empty; the file called cache stays.
    expect(after).toEqual(without(before, [...gone, 'cache/c1', 'deep/a/cache/c2']));
    expect(after['deep/anchored-dir/y']?.type).toBe('file');
    expect(after['other/cache']!.type).toBe('file');
  });

  test('rsync: the same patterns', async () => {
    const src = sourceTree(0);
    const before = snapshotTree(src);
    const copy = join(dir, 'copy');
    await backupDirectoryTree({ source: src, target: copy, excludePaths: patterns });
    const after = snapshotTree(copy);
    expect(after).toEqual(without(before, [...gone, 'cache', 'deep/a/cache']));
    expect(after['deep/anchored-dir/y']?.type).toBe('file');
    expect(after['other/cache']!.type).toBe('file');
  });

  test('an unprivileged container skips lost+found (owned by host root) as vzdump does', async () => {
    const src = sourceTree(BASE);
    mkdirSync(join(src, 'lost+found'), { mode: 0o700 });
    const before = without(snapshotTree(src), ['lost+found']);
    await createTarArchive({ source: src, archive: join(dir, 'ct.tar'), idMap: MAP });
    await backupDirectoryTree({ source: src, target: join(dir, 'copy'), idMap: MAP });
    const dst = mk('dst');
    await extractTarArchive({ archive: join(dir, 'ct.tar'), rootdir: dst, idMap: MAP });
    expect(snapshotTree(dst)).toEqual(before);
    expect(existsSync(join(dir, 'copy', 'lost+found'))).toBe(false);
  });
});

describe('bandwidth limits', () => {
  function bigTree(mib: number): string {
    const src = mk('big');
    // Random data: no compression anywhere can cheat the limit.
    for (let i = 0; i < mib; i++) writeFileSync(join(src, `f${i}`), execFileSync('head', ['-c', String(1024 * 1024), '/dev/urandom']));
    return src;
  }

  test('tar create and extract stay under the limit', async () => {
    const src = bigTree(4);
    const limit = 2 * 1024 * 1024;
    const archive = join(dir, 'big.tar');
    let t = performance.now();
    const { bytes } = await createTarArchive({ source: src, archive, bandwidthLimit: limit });
    let seconds = (performance.now() - t) / 1000;
    expect(bytes).toBeGreaterThan(4 * 1024 * 1024);
    expect(bytes / seconds).toBeLessThanOrEqual(limit * 1.1);
    expect(bytes / seconds).toBeGreaterThan(limit * 0.5);

    t = performance.now();
    await extractTarArchive({ archive, rootdir: mk('dst'), bandwidthLimit: limit });
    seconds = (performance.now() - t) / 1000;
    expect(bytes / seconds).toBeLessThanOrEqual(limit * 1.1);
    expect(seconds).toBeLessThan((3 * bytes) / limit); // paced, not stalled (generous: the machine is shared)
  });

  test('rsync stays under the limit (whole KiB/s)', async () => {
    const src = bigTree(3);
    const limit = 1024 * 1024;
    const t = performance.now();
    await backupDirectoryTree({ source: src, target: join(dir, 'copy'), bandwidthLimit: limit });
    const seconds = (performance.now() - t) / 1000;
    expect((3 * 1024 * 1024) / seconds).toBeLessThanOrEqual(limit * 1.1);
    expect(seconds).toBeLessThan(9); // 3 s expected: paced, not stalled

    const t2 = performance.now();
    await restoreDirectoryTree({ source: join(dir, 'copy'), rootdir: mk('dst'), bandwidthLimit: limit });
    const seconds2 = (performance.now() - t2) / 1000;
    expect((3 * 1024 * 1024) / seconds2).toBeLessThanOrEqual(limit * 1.1);
    expect(seconds2).toBeLessThan(9);
  });
});

describe('cancellation', () => {
  function bigTree(): string {
    const src = mk('big');
    for (let i = 0; i < 4; i++) writeFileSync(join(src, `f${i}`), execFileSync('head', ['-c', String(1024 * 1024), '/dev/urandom']));
    return src;
  }

  /**
   * Aborts `ac` after `ms` and resolves with the children named `name` running just before: the
   * proof that the check after the cancellation looks at a process that was there.
   */
  function abortLater(ac: AbortController, ms: number, name: string, reason?: Error): Promise<string[]> {
    return new Promise((resolve) =>
      setTimeout(() => {
        const running = childrenNamed(name);
        ac.abort(reason);
        resolve(running);
      }, ms),
    );
  }

  test('tar create: the child is killed, the partial archive removed', async () => {
    const src = bigTree();
    const ac = new AbortController();
    const archive = join(dir, 'big.tar');
    const run = createTarArchive({ source: src, archive, bandwidthLimit: 256 * 1024, signal: ac.signal });
    const running = abortLater(ac, 300, 'tar', new Error('stop'));
    const t = performance.now();
    const err = await rejection(run);
    expect(err).toMatchObject({ code: 'ERR_CANCELLED', name: 'AbortError' });
    expect(performance.now() - t).toBeLessThan(3000);
    expect(existsSync(archive)).toBe(false);
    expect(await running).toHaveLength(1);
    expect(childrenNamed('tar')).toEqual([]);
  });

  test('tar extract and rsync: cancelled, the child killed', async () => {
    const src = bigTree();
    const archive = join(dir, 'big.tar');
    await createTarArchive({ source: src, archive });
    const ac = new AbortController();
    const tarRunning = abortLater(ac, 300, 'tar');
    expect(await rejection(extractTarArchive({ archive, rootdir: mk('dst'), bandwidthLimit: 256 * 1024, signal: ac.signal }))).toMatchObject({
      code: 'ERR_CANCELLED',
    });
    expect(await tarRunning).toHaveLength(1);
    expect(childrenNamed('tar')).toEqual([]);
    const ac2 = new AbortController();
    const rsyncRunning = abortLater(ac2, 300, 'rsync');
    expect(await rejection(backupDirectoryTree({ source: src, target: join(dir, 'copy'), bandwidthLimit: 256 * 1024, signal: ac2.signal }))).toMatchObject({
      code: 'ERR_CANCELLED',
    });
    expect(await rsyncRunning).toHaveLength(1);
    expect(childrenNamed('rsync')).toEqual([]);
    // Already aborted: nothing starts.
    await expect(createTarArchive({ source: src, archive: join(dir, 'x.tar'), signal: AbortSignal.abort() })).rejects.toMatchObject({ code: 'ERR_CANCELLED' });
    expect(existsSync(join(dir, 'x.tar'))).toBe(false);
  });
});

describe('id map errors', () => {
  test('a bad map is refused before anything runs', async () => {
    const src = mk('src');
    const bad: IdMapEntry[] = [
      { type: 'u', container: 0, host: 100000, length: 65536 },
      { type: 'u', container: 100, host: 300000, length: 10 },
    ];
    await expect(createTarArchive({ source: src, archive: join(dir, 'a.tar'), idMap: bad })).rejects.toMatchObject({ code: 'ERR_IDMAP' });
    await expect(backupDirectoryTree({ source: src, target: join(dir, 'c'), idMap: bad })).rejects.toMatchObject({ code: 'ERR_IDMAP' });
    await expect(extractTarArchive({ archive: join(dir, 'a.tar'), rootdir: mk('dst'), idMap: bad })).rejects.toMatchObject({ code: 'ERR_IDMAP' });
    expect(existsSync(join(dir, 'a.tar'))).toBe(false);
  });

  test('backup: an owner outside the map is an error naming the file and the id', async () => {
    const src = sourceTree(BASE);
    writeFileSync(join(src, 'etc', 'host owned'), 'x');
    chownSync(join(src, 'etc', 'host owned'), BASE + 1, 5);
    const tarErr = await rejection(createTarArchive({ source: src, archive: join(dir, 'a.tar'), idMap: MAP }));
    expect(tarErr).toMatchObject({ code: 'ERR_IDMAP', path: './etc/host owned', id: 5 });
    expect(tarErr.message).toBe('./etc/host owned: owner host gid 5 is not covered by the id map');
    expect(existsSync(join(dir, 'a.tar'))).toBe(false);
    const rsyncErr = await rejection(backupDirectoryTree({ source: src, target: join(dir, 'c'), idMap: MAP }));
    expect(rsyncErr).toMatchObject({ code: 'ERR_IDMAP', path: './etc/host owned', id: 5 });
  });

  test('backup: an ACL entry outside the map is an error naming the file', async () => {
    const src = sourceTree(BASE);
    execFileSync('setfacl', ['-m', 'u:7:r', join(src, 'hello.txt')]);
    const tarErr = await rejection(createTarArchive({ source: src, archive: join(dir, 'a.tar'), idMap: MAP }));
    expect(tarErr).toMatchObject({ code: 'ERR_IDMAP', id: 7 });
    expect(tarErr.message).toMatch(/^\.\/(hello\.txt|hardlink|etc\/hello-again): ACL entry host uid 7 is not covered/);
    const rsyncErr = await rejection(backupDirectoryTree({ source: src, target: join(dir, 'c'), idMap: MAP }));
    expect(rsyncErr).toMatchObject({ code: 'ERR_IDMAP', id: 7 });
  });

  test('restore: a container id outside the map is an error naming the member', async () => {
    const src = mk('src');
    writeFileSync(join(src, 'big-id'), 'x');
    chownSync(join(src, 'big-id'), 70000, 0);
    await createTarArchive({ source: src, archive: join(dir, 'a.tar') });
    const err = await rejection(extractTarArchive({ archive: join(dir, 'a.tar'), rootdir: mk('dst'), idMap: MAP }));
    expect(err).toMatchObject({ code: 'ERR_IDMAP', path: './big-id', id: 70000 });
    expect(err.message).toBe('./big-id: owner container uid 70000 is not covered by the id map');
    const err2 = await rejection(restoreDirectoryTree({ source: src, rootdir: mk('dst2'), idMap: MAP }));
    expect(err2).toMatchObject({ code: 'ERR_IDMAP', path: './big-id', id: 70000 });
  });
});

describe('restore safety', () => {
  test('a non-empty rootdir is refused unless allowed; lost+found and empty directories are fine', async () => {
    const src = sourceTree(0);
    const archive = join(dir, 'a.tar');
    await createTarArchive({ source: src, archive });
    const dst = mk('dst');
    mkdirSync(join(dst, 'lost+found'));
    mkdirSync(join(dst, 'mnt', 'data', 'lost+found'), { recursive: true });
    writeFileSync(join(dst, 'mnt', 'data', 'stray'), 'x');
    const err = await rejection(extractTarArchive({ archive, rootdir: dst }));
    expect(err).toMatchObject({ code: 'ERR_ROOTDIR_NOT_EMPTY', entry: 'mnt/data/stray' });
    await expect(restoreDirectoryTree({ source: src, rootdir: dst })).rejects.toMatchObject({ code: 'ERR_ROOTDIR_NOT_EMPTY' });
    rmSync(join(dst, 'mnt', 'data', 'stray'));
    await extractTarArchive({ archive, rootdir: dst });
    expect(readFileSync(join(dst, 'hello.txt'), 'utf8')).toBe('hello world\n');
    // allowNonEmpty: existing files are kept (--skip-old-files).
    writeFileSync(join(dst, 'hello.txt'), 'changed\n');
    await extractTarArchive({ archive, rootdir: dst, allowNonEmpty: true });
    expect(readFileSync(join(dst, 'hello.txt'), 'utf8')).toBe('changed\n');
  });

  test('members with .., absolute names and symlink tricks never write outside rootdir', async () => {
    const script = `
import tarfile, io, sys
def add(t, name, data=b'x', kind=tarfile.REGTYPE, link=''):
    i = tarfile.TarInfo(name); i.type = kind; i.linkname = link; i.size = len(data) if kind == tarfile.REGTYPE else 0
    t.addfile(i, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
with tarfile.open(sys.argv[1] + '/dotdot.tar', 'w', format=tarfile.GNU_FORMAT) as t:
    add(t, './ok'); add(t, '../escaped-dotdot'); add(t, './a/../../escaped-dotdot2')
with tarfile.open(sys.argv[1] + '/abs.tar', 'w', format=tarfile.GNU_FORMAT) as t:
    add(t, sys.argv[1] + '/escaped-abs')
with tarfile.open(sys.argv[1] + '/symlink.tar', 'w', format=tarfile.GNU_FORMAT) as t:
    add(t, './esc', kind=tarfile.SYMTYPE, link=sys.argv[1]); add(t, './esc/escaped-symlink')
    add(t, './rel', kind=tarfile.SYMTYPE, link='..'); add(t, './rel/escaped-rel')
`;
    execFileSync('python3', ['-c', script, dir]);
    // GNU tar strips the leading '/' of abs.tar's member: it extracts fine, inside rootdir. The
    // others are refused by tar.
    for (const [name, mapped, refused] of [
      ['dotdot.tar', false, true],
      ['abs.tar', false, false],
      ['symlink.tar', false, true],
      ['dotdot.tar', true, true],
      ['symlink.tar', true, true],
    ] as const) {
      const dst = mkdtempSync(join(dir, 'dst-'));
      const run = extractTarArchive({ archive: join(dir, name), rootdir: dst, ...(mapped ? { idMap: MAP } : {}) });
      const err = await run.then(
        () => undefined,
        (e: Error & { code?: string }) => e,
      );
      expect(err?.code, `${name}: ${String(err)}`).toBe(refused ? 'ERR_TAR' : undefined);
      for (const leaked of ['escaped-dotdot', 'escaped-dotdot2', 'escaped-abs', 'escaped-symlink', 'escaped-rel']) {
        expect(existsSync(join(dir, leaked)), `${name}: ${leaked}`).toBe(false);
      }
      expect(existsSync(join(dst, dir.slice(1), 'escaped-abs')), name).toBe(name === 'abs.tar');
    }
  });

  test('tar failures carry tar\'s message', async () => {
    writeFileSync(join(dir, 'junk.tar'), Buffer.alloc(10000, 0x42));
    const err = await rejection(extractTarArchive({ archive: join(dir, 'junk.tar'), rootdir: mk('dst') }));
    expect(err).toMatchObject({ code: 'ERR_TAR' });
    expect(err.message).toMatch(/does not look like a tar archive/);
    expect(err.stderr).toMatch(/does not look like a tar archive/);
    const err2 = await rejection(createTarArchive({ source: join(dir, 'missing'), archive: join(dir, 'x.tar') }));
    expect(err2).toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
  });
});

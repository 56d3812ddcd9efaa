/**
 * Real directory trees for container backup tests, and a tree walk that captures everything a
 * backup must keep, for comparing a restored tree with its source.
 *
 * Needs root (mknod, chown, security.capability) and the tools of Debian's `attr` and `acl`
 * packages; a missing tool fails the test with the package to install.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, lchownSync, linkSync, lstatSync, mkdirSync, readFileSync, readdirSync, readlinkSync, symlinkSync, writeFileSync, openSync, writeSync, closeSync, ftruncateSync, type Stats } from 'node:fs';
import { join } from 'node:path';

import { printableName } from '../../lib/container/tarstream.js';
import { requireTool } from './tools.js';

function run(cmd: string, args: string[], input?: string): string {
  return execFileSync(cmd, args, { encoding: 'latin1', input, stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
}

/** Checks every tool the tree helpers and the container code need; fails naming the Debian package. */
export function requireContainerTools(): void {
  requireTool('tar', 'tar');
  requireTool('rsync', 'rsync');
  requireTool('getfattr', 'attr');
  requireTool('setfattr', 'attr');
  requireTool('setfacl', 'acl');
  requireTool('getfacl', 'acl');
  requireTool('mknod', 'coreutils');
  requireTool('mkfifo', 'coreutils');
  if (process.getuid?.() !== 0) throw new Error('container tests need root (chown, mknod, security.capability)');
}

/** The map of the test trees: container ids 0..65535 are host ids 100000..165535. */
export const TEST_MAP_LINES = ['u 0 100000 65536', 'g 0 100000 65536'];

/** Size of the sparse file of the tree: 64 MiB with 8 KiB of data. */
export const SPARSE_SIZE = 64 * 1024 * 1024;

/** A file capability (`cap_net_raw+ep`, VFS caps revision 2) as the raw xattr. */
const CAPABILITY = '0x0100000200200000000000000000000000000000';

/** Options of {@link buildTree}. */
export interface BuildTreeOptions {
  /** Added to every owner: 0 for a privileged container, 100000 for the test map. */
  idBase?: number;
}

/**
 * Builds the test tree under `root` (which must exist and be empty): regular files, a hard link
 * group of three, symlinks (relative, absolute, dangling), `user.*` xattrs, a file capability, POSIX
 * access and default ACLs naming users and groups, a 64 MiB sparse file, setuid/setgid files, a
 * setgid and a sticky directory, a fifo, a character and a block device, owners 0, 33 and 1000 (plus
 * `idBase`), empty directories, odd names (space, newline, backslash, non-UTF-8 bytes), and the
 * files the exclusion tests aim at.
 */
export function buildTree(root: string, o: BuildTreeOptions = {}): void {
  requireContainerTools();
  const base = o.idBase ?? 0;
  const p = (...parts: string[]): string => join(root, ...parts);
  const own = (path: string | Buffer, uid: number, gid = uid): void => lchownSync(path, base + uid, base + gid);
  const file = (rel: string, content: string | Buffer, mode = 0o644, uid = 0, gid = uid): string => {
    const path = p(rel);
    writeFileSync(path, content);
    own(path, uid, gid);
    chmodSync(path, mode); // after chown, which clears setuid/setgid
    return path;
  };
  const dir = (rel: string, mode = 0o755, uid = 0, gid = uid): string => {
    const path = p(rel);
    mkdirSync(path, { recursive: true });
    own(path, uid, gid);
    chmodSync(path, mode);
    return path;
  };

  own(root, 0);
  chmodSync(root, 0o755);
  dir('etc');
  dir('home');
  dir('home/user', 0o750, 1000);
  dir('var');
  dir('var/log');
  dir('var/tmp', 0o1777);
  dir('tmp', 0o1777);
  dir('srv', 0o2775, 0, 33);
  dir('empty');
  dir('deep');
  dir('deep/a');
  dir('deep/a/b');
  dir('deep/empty');
  dir('deep/empty/dir');

  file('etc/passwd', 'root:x:0:0:root:/root:/bin/bash\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\nuser:x:1000:1000::/home/user:/bin/bash\n');
  file('etc/shadow', 'root:*:19000:0:99999:7:::\n', 0o640, 0, 42);
  file('home/user/notes.txt', 'user notes\n', 0o600, 1000);
  file('srv/data.bin', Buffer.alloc(300_000, 0xa5), 0o664, 33);
  file('hello.txt', 'hello world\n');
  linkSync(p('hello.txt'), p('hardlink'));
  linkSync(p('hello.txt'), p('etc/hello-again'));
  symlinkSync('hello.txt', p('link-relative'));
  symlinkSync('/etc/passwd', p('link-absolute'));
  symlinkSync('does/not/exist', p('link-dangling'));
  own(p('link-absolute'), 0);
  own(p('link-relative'), 1000);
  own(p('link-dangling'), 33);

  file('usr-bin-su', '#!/bin/sh\n', 0o4755);
  file('usr-bin-wall', '#!/bin/sh\n', 0o2755, 0, 33);
  file('ping', '#!/bin/sh\n', 0o755);
  run('setfattr', ['-n', 'security.capability', '-v', CAPABILITY, p('ping')]);

  run('setfattr', ['-n', 'user.comment', '-v', 'a comment', p('hello.txt')]);
  run('setfattr', ['-n', 'user.binary', '-v', '0x00ff10', p('etc/passwd')]);
  run('setfattr', ['-n', 'user.dir', '-v', 'on a directory', p('srv')]);

  file('acl-file', 'acl\n', 0o640, 0);
  run('setfacl', ['-m', `u:${base + 1000}:rw,g:${base + 33}:r`, p('acl-file')]);
  dir('acl-dir', 0o750, 0);
  run('setfacl', ['-m', `u:${base + 1000}:rwx`, '-d', '-m', `u:${base + 1000}:rx,g:${base + 33}:rx`, p('acl-dir')]);

  const fd = openSync(p('sparse.img'), 'w');
  writeSync(fd, Buffer.alloc(4096, 0x11), 0, 4096, 1024 * 1024);
  writeSync(fd, Buffer.alloc(4096, 0x22), 0, 4096, SPARSE_SIZE - 4096);
  ftruncateSync(fd, SPARSE_SIZE);
  closeSync(fd);
  own(p('sparse.img'), 1000);

  run('mkfifo', ['-m', '0620', p('fifo')]);
  own(p('fifo'), 1000, 33);
  run('mknod', ['-m', '0666', p('char-null'), 'c', '1', '3']);
  own(p('char-null'), 0);
  run('mknod', ['-m', '0660', p('block-loop'), 'b', '7', '0']);
  own(p('block-loop'), 0, 6);

  file('with space', 'space\n');
  file('new\nline', 'newline\n', 0o644, 1000);
  file('back\\slash', 'backslash\n');
  const odd = Buffer.concat([Buffer.from(root), Buffer.from('/latin1-\xe9t\xe9-\xff', 'latin1')]);
  writeFileSync(odd, 'not utf-8\n');
  own(odd, 33);

  // What the exclusion tests aim at.
  dir('anchored-dir');
  file('anchored-dir/x', 'x\n');
  dir('deep/anchored-dir');
  file('deep/anchored-dir/y', 'y\n');
  file('app.log', 'log\n');
  file('var/log/app.log', 'log\n');
  file('var/log/keep.txt', 'keep\n');
  dir('cache');
  file('cache/c1', 'c\n');
  dir('deep/a/cache');
  file('deep/a/cache/c2', 'c\n');
  dir('other');
  file('other/cache', 'a file called cache\n');
  file('var/tmp/junk.tmp', 'tmp\n');
  file('deep/a/b/skip-me', 'skip\n');
}

/** What the comparator records about one entry. */
export interface TreeEntry {
  type: 'file' | 'dir' | 'symlink' | 'fifo' | 'char' | 'block' | 'socket';
  /** Permission bits including setuid, setgid and sticky. */
  mode: string;
  uid: number;
  gid: number;
  /** Regular files: size and SHA-256 of the content; sparse files: whether mostly unallocated. */
  size?: number;
  sha256?: string;
  sparse?: boolean;
  /** Regular files, whole seconds. */
  mtime?: number;
  target?: string;
  rdev?: string;
  /** Hard link group: every path sharing the inode, sorted (only when there are several). */
  links?: string[];
  /** All xattrs, hex, including ACLs (`system.posix_acl_*`, raw with ids) and `security.capability`. */
  xattrs?: Record<string, string>;
}

function typeOf(st: Stats): TreeEntry['type'] {
  if (st.isFile()) return 'file';
  if (st.isDirectory()) return 'dir';
  if (st.isSymbolicLink()) return 'symlink';
  if (st.isFIFO()) return 'fifo';
  if (st.isCharacterDevice()) return 'char';
  if (st.isBlockDevice()) return 'block';
  return 'socket';
}

function unquote(name: string): Buffer {
  const bytes: number[] = [];
  for (let i = 0; i < name.length; i++) {
    if (name[i] === '\\' && /^[0-7]{3}$/.test(name.slice(i + 1, i + 4))) {
      bytes.push(parseInt(name.slice(i + 1, i + 4), 8));
      i += 3;
    } else bytes.push(name.charCodeAt(i) & 0xff);
  }
  return Buffer.from(bytes);
}

/** Every xattr of every entry under root, keyed by printable relative path (`.` for the root). */
function allXattrs(root: string): Map<string, Record<string, string>> {
  const out = new Map<string, Record<string, string>>();
  const text = execFileSync('getfattr', ['-R', '-P', '-h', '-d', '-m', '-', '-e', 'hex', '.'], { cwd: root, encoding: 'latin1' });
  let cur: Record<string, string> | undefined;
  for (const line of text.split('\n')) {
    if (line.startsWith('# file: ')) {
      const raw = unquote(line.slice(8));
      const key = raw.equals(Buffer.from('.')) ? '.' : printableName(raw);
      cur = {};
      out.set(key, cur);
    } else if (cur && /^[^=]+=/.test(line)) {
      const eq = line.indexOf('=');
      cur[line.slice(0, eq)] = line.slice(eq + 1);
    }
  }
  return out;
}

/**
 * Walks `root` (never following symlinks) and describes every entry, keyed by printable path
 * relative to root (`.` for root itself). Compare two snapshots with `toEqual`.
 */
export function snapshotTree(root: string): Record<string, TreeEntry> {
  const entries: Record<string, TreeEntry> = {};
  const inodes = new Map<string, string[]>();
  const xattrs = allXattrs(root);
  const visit = (abs: Buffer, rel: string): void => {
    const st = lstatSync(abs);
    const type = typeOf(st);
    const e: TreeEntry = { type, mode: (st.mode & 0o7777).toString(8).padStart(4, '0'), uid: st.uid, gid: st.gid };
    if (type === 'file') {
      const content = readFileSync(abs);
      e.size = st.size;
      e.sha256 = createHash('sha256').update(content).digest('hex');
      e.mtime = Math.floor(st.mtimeMs / 1000);
      if (st.size >= 1024 * 1024) e.sparse = st.blocks * 512 < st.size / 2;
      if (st.nlink > 1) {
        const key = `${st.ino}`;
        inodes.set(key, [...(inodes.get(key) ?? []), rel]);
        (e as TreeEntry & { ino?: string }).ino = key;
      }
    }
    if (type === 'symlink') e.target = printableName(readlinkSync(abs, { encoding: 'buffer' }));
    if (type === 'char' || type === 'block') e.rdev = `${Math.floor(st.rdev / 256)},${st.rdev % 256}`;
    const x = xattrs.get(rel);
    if (x && Object.keys(x).length) e.xattrs = x;
    entries[rel] = e;
    if (type === 'dir') {
      for (const name of readdirSync(abs, { encoding: 'buffer' })) {
        const childRel = rel === '.' ? printableName(name) : `${rel}/${printableName(name)}`;
        visit(Buffer.concat([abs, Buffer.from('/'), name]), childRel);
      }
    }
  };
  visit(Buffer.from(root), '.');
  for (const e of Object.values(entries) as (TreeEntry & { ino?: string })[]) {
    if (e.ino !== undefined) {
      e.links = [...inodes.get(e.ino)!].sort();
      delete e.ino;
    }
  }
  return Object.fromEntries(Object.entries(entries).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

/** `snapshot` with every owner shifted by `delta` (also inside raw ACL xattrs), for comparing a host tree with a container-id copy. */
export function shiftSnapshot(snapshot: Record<string, TreeEntry>, delta: number): Record<string, TreeEntry> {
  const out: Record<string, TreeEntry> = {};
  for (const [k, e] of Object.entries(snapshot)) {
    const c: TreeEntry = { ...e, uid: e.uid + delta, gid: e.gid + delta };
    if (e.xattrs) {
      c.xattrs = { ...e.xattrs };
      for (const key of ['system.posix_acl_access', 'system.posix_acl_default']) {
        const v = c.xattrs[key];
        if (!v) continue;
        const buf = Buffer.from(v.slice(2), 'hex');
        for (let pos = 4; pos < buf.length; pos += 8) {
          const tag = buf.readUInt16LE(pos);
          if (tag === 0x02 || tag === 0x08) buf.writeUInt32LE(buf.readUInt32LE(pos + 4) + delta, pos + 4);
        }
        c.xattrs[key] = `0x${buf.toString('hex')}`;
      }
    }
    out[k] = c;
  }
  return out;
}

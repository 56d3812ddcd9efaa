/**
 * Containers end to end: a real tree (hard links, symlinks, xattrs, ACLs, a sparse file, a setuid
 * binary, a device node, owners under a uid/gid map) backed up by the job runner through
 * providers of both generations (which store it with lib/container's GNU tar and rsync), with
 * rsync-style exclusions (anchored and not), then restored with restoreContainer: tar for the
 * seed-generation provider, directory for the 8.4 one. Compared by a tree walk of content, modes,
 * owners, links, device numbers and all extended attributes (ACLs included).
 *
 * Needs lib/container (GNU tar / rsync tools), merged from its own branch.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, lchownSync, linkSync, lstatSync, mkdirSync, openSync, readdirSync, readFileSync, readlinkSync, symlinkSync, writeFileSync, writeSync, closeSync } from 'node:fs';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { restoreContainer, runBackupJob } from '../lib/index.js';
import { requireTool } from './helpers/tools.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { RecordingProviderV1, RecordingProviderV2 } from './helpers/recording-provider.js';

const ctx = { storeid: 'store1', scfg: {}, log: () => {} };
const IDMAP = ['u 0 100000 65536', 'g 0 100000 65536'];
const EXCLUDES = ['/tmp/**', '*.log'];

afterEach(async () => {
  await stopAll();
});

function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8' });
}

/** A container root file system with host ids 100000+ (container ids 0+). */
function buildTree(root: string): void {
  requireTool('setfacl', 'acl');
  requireTool('setfattr', 'attr');
  const own = (p: string, uid: number, gid = uid): void => lchownSync(path.join(root, p), uid, gid);
  own('.', 100000);
  for (const d of ['etc', 'home/user', 'usr/bin', 'data', 'dev', 'tmp/cache', 'var/log']) mkdirSync(path.join(root, d), { recursive: true });
  for (const d of ['etc', 'home', 'usr', 'usr/bin', 'data', 'dev', 'tmp', 'tmp/cache', 'var', 'var/log']) own(d, 100000);
  own('home/user', 101000);
  writeFileSync(path.join(root, 'etc/hostname'), 'ct200\n');
  own('etc/hostname', 100000);
  writeFileSync(path.join(root, 'home/user/file.txt'), 'hello from the container\n'.repeat(100));
  chmodSync(path.join(root, 'home/user/file.txt'), 0o640);
  own('home/user/file.txt', 101000, 101001);
  linkSync(path.join(root, 'home/user/file.txt'), path.join(root, 'home/user/hard.txt'));
  sh('setfattr', ['-n', 'user.note', '-v', 'kept', path.join(root, 'home/user/file.txt')]);
  sh('setfacl', ['-m', 'u:101002:r,g:101003:rw', path.join(root, 'home/user/file.txt')]);
  sh('setfacl', ['-d', '-m', 'u:101002:rx', path.join(root, 'home/user')]);
  symlinkSync('../etc/hostname', path.join(root, 'data/hostname-link'));
  own('data/hostname-link', 100000);
  writeFileSync(path.join(root, 'usr/bin/tool'), '#!/bin/sh\necho hi\n');
  own('usr/bin/tool', 100000);
  chmodSync(path.join(root, 'usr/bin/tool'), 0o4755);
  const fd = openSync(path.join(root, 'data/sparse.img'), 'w');
  writeSync(fd, Buffer.from('middle'), 0, 6, 3 * 1024 * 1024);
  writeSync(fd, Buffer.from('end'), 0, 3, 8 * 1024 * 1024 - 3);
  closeSync(fd);
  own('data/sparse.img', 100033);
  // (not below /dev: a tar restore excludes ./dev/*, as pct does; /dev is populated at start)
  sh('mknod', [path.join(root, 'data/mynull'), 'c', '1', '3']);
  own('data/mynull', 100000);
  writeFileSync(path.join(root, 'tmp/cache/junk'), 'excluded');
  writeFileSync(path.join(root, 'var/log/app.log'), 'excluded');
  writeFileSync(path.join(root, 'var/log/keep.txt'), 'kept');
  for (const f of ['tmp/cache/junk', 'var/log/app.log', 'var/log/keep.txt']) own(f, 100000);
}

/** Everything that must survive, by relative path. */
function walk(root: string): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const inodes = new Map<number, string>();
  const visit = (rel: string): void => {
    const abs = path.join(root, rel);
    const st = lstatSync(abs);
    const e: Record<string, unknown> = { mode: st.mode.toString(8), uid: st.uid, gid: st.gid };
    if (st.isFile()) {
      e.size = st.size;
      e.sha = createHash('sha256').update(readFileSync(abs)).digest('hex');
      const first = inodes.get(st.ino);
      if (first) e.hardlinkOf = first;
      else inodes.set(st.ino, rel);
    }
    if (st.isSymbolicLink()) e.target = readlinkSync(abs);
    if (st.isCharacterDevice() || st.isBlockDevice()) e.rdev = st.rdev;
    if (rel !== '.') out[rel] = e;
    if (st.isDirectory()) for (const c of readdirSync(abs).sort()) visit(rel === '.' ? c : `${rel}/${c}`);
  };
  visit('.');
  return out;
}

/** All extended attributes, ACLs (system.posix_acl_*) included, with numeric ids. */
function xattrs(root: string): string {
  return execFileSync('getfattr', ['-R', '-h', '-d', '-m', '-', '-e', 'hex', '.'], { cwd: root, encoding: 'utf8' });
}

function expected(tree: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(tree).filter(([p]) => !p.startsWith('tmp/') && !p.endsWith('.log')));
}

describe('container backup and restore through the job runner', () => {
  it.each([
    ['seed-generation provider, tar restore', 'v1', 'tar'],
    ['8.4 provider, directory restore', 'v2', 'directory'],
  ] as const)('%s: the restored tree equals the original minus exclusions', async (_name, gen, mech) => {
    const dir = await tempDir();
    const rootfs = path.join(dir, 'rootfs');
    mkdirSync(rootfs);
    buildTree(rootfs);
    const opts = { storeDir: path.join(dir, 'store'), containerRestore: mech };
    const p = gen === 'v1' ? new RecordingProviderV1(ctx, opts) : new RecordingProviderV2(ctx, opts);
    const res = await runBackupJob({
      provider: p,
      storeid: 'store1',
      tmpdir: dir,
      guests: [{ vmid: 200, type: 'lxc', rootdir: rootfs, config: 'hostname: ct200\n', firewallConfig: '[OPTIONS]\n', idMap: IDMAP, excludePaths: EXCLUDES }],
    });
    expect(res.guests[0]!.error).toBeUndefined();
    const volname = res.guests[0]!.volname!;
    p.calls.length = 0;

    const target = path.join(dir, 'restored');
    mkdirSync(target);
    lchownSync(target, 100000, 100000);
    const r = await restoreContainer({ provider: p, volname, storeid: 'store1', rootdir: target, idMap: IDMAP, configDir: dir });
    expect(r).toMatchObject({ mechanism: mech, config: 'hostname: ct200\n', firewallConfig: '[OPTIONS]\n' });
    expect(readFileSync(path.join(dir, 'pct.conf'), 'utf8')).toBe('hostname: ct200\n');
    const info = { storeid: 'store1', vmtype: 'lxc', mechanism: mech };
    expect(p.calls).toEqual(
      gen === 'v1'
        ? [
            ['restoreGetMechanism', volname, 'store1'],
            ['restoreStart', volname, info],
            ['extractGuestConfig', volname, 'store1'],
            ['extractFirewallConfig', volname, 'store1'],
            [mech === 'tar' ? 'restoreTarInit' : 'restoreDirectoryInit', volname, 'store1'],
            [mech === 'tar' ? 'restoreTarCleanup' : 'restoreDirectoryCleanup', volname, 'store1'],
            ['restoreEnd', volname, info],
          ]
        : [
            ['restoreGetMechanism', volname],
            ['restoreStart', volname, info],
            ['archiveGetGuestConfig', volname],
            ['archiveGetFirewallConfig', volname],
            // pve-container passes the storage id too (Base.pm documents two arguments)
            ['restoreContainerInit', volname, 'store1', {}],
            ['restoreContainerCleanup', volname, 'store1', {}],
            ['restoreEnd', volname, info],
          ],
    );
    const before = walk(rootfs);
    const after = walk(target);
    expect(after).toEqual(expected(before));
    expect(after['tmp']).toBeDefined(); // '/tmp/**' keeps the directory, drops its content
    expect(lstatSync(path.join(target, 'data/sparse.img')).blocks * 512).toBeLessThan(1024 * 1024); // still sparse
    const strip = (s: string): string =>
      s
        .split('\n\n')
        .filter((b) => !/# file: \.\/(tmp\/|.*\.log)/.test(b))
        .join('\n\n');
    expect(strip(xattrs(target))).toBe(strip(xattrs(rootfs)));
  });

  it('a failing extraction still runs the cleanup, then restoreAbort', async () => {
    const dir = await tempDir();
    const rootfs = path.join(dir, 'rootfs');
    mkdirSync(path.join(rootfs, 'etc'), { recursive: true });
    writeFileSync(path.join(rootfs, 'etc/hostname'), 'x\n');
    const p = new RecordingProviderV2(ctx, { storeDir: path.join(dir, 'store'), containerRestore: 'tar' });
    const res = await runBackupJob({ provider: p, storeid: 'store1', tmpdir: dir, guests: [{ vmid: 200, type: 'lxc', rootdir: rootfs, config: '' }] });
    const volname = res.guests[0]!.volname!;
    p.calls.length = 0;
    // restoring into a non-empty root is refused by the tools
    const err = await restoreContainer({ provider: p, volname, storeid: 'store1', rootdir: rootfs }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_RESTORE' });
    expect(p.calls.map((c) => c[0])).toEqual(['restoreGetMechanism', 'restoreStart', 'archiveGetGuestConfig', 'archiveGetFirewallConfig', 'restoreContainerInit', 'restoreContainerCleanup', 'restoreAbort']);
  });

  it('an init that dies gets no cleanup, as pve-container runs the init outside its eval', async () => {
    const dir = await tempDir();
    const rootfs = path.join(dir, 'rootfs');
    mkdirSync(path.join(rootfs, 'etc'), { recursive: true });
    writeFileSync(path.join(rootfs, 'etc/hostname'), 'x\n');
    const p = new RecordingProviderV2(ctx, { storeDir: path.join(dir, 'store'), containerRestore: 'tar', fail: { restoreContainerInit: { message: 'archive unreachable' } } });
    const res = await runBackupJob({ provider: p, storeid: 'store1', tmpdir: dir, guests: [{ vmid: 200, type: 'lxc', rootdir: rootfs, config: '' }] });
    p.calls.length = 0;
    const err = await restoreContainer({ provider: p, volname: res.guests[0]!.volname!, storeid: 'store1', rootdir: path.join(dir, 'target') }).catch((e: unknown) => e);
    expect((err as Error).message).toMatch(/archive unreachable/);
    expect(p.calls.map((c) => c[0])).toEqual(['restoreGetMechanism', 'restoreStart', 'archiveGetGuestConfig', 'archiveGetFirewallConfig', 'restoreContainerInit', 'restoreAbort']);
  });
});

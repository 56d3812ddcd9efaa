/**
 * Containers through the DirectoryProvider, the job runner and restore: tar and directory modes,
 * privileged and with an id map, both API generations; the restored tree equals the source (tree
 * walk of content, modes, owners, xattrs, ACLs, links); a changed archive is refused.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { appendFileSync, chmodSync, copyFileSync, lchownSync, lstatSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { DirectoryProvider, DirectoryProviderV1, DirectoryStore, restoreContainer, runBackupJob, type BackupProvider } from '../lib/index.js';
import { hashTree } from '../lib/directory-provider/layout.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { buildTree, snapshotTree, TEST_MAP_LINES } from './helpers/tree.js';

afterEach(async () => {
  await stopAll();
});

const cases = [
  ['tar', 2, false],
  ['tar', 1, true],
  ['directory', 2, true],
  ['directory', 1, false],
] as const;

describe('containers round trip through the provider', () => {
  it.each(cases)('lxc-backup-mode %s, API generation %i, id map %s', async (mode, generation, mapped) => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    mkdirSync(src);
    buildTree(src, { idBase: mapped ? 100000 : 0 });
    const before = snapshotTree(src);
    const root = path.join(work, 'store');
    const context = { storeid: 'dir1', scfg: { path: root, 'lxc-backup-mode': mode }, log: () => {} };
    const provider: BackupProvider = generation === 2 ? new DirectoryProvider(context) : new DirectoryProviderV1(context);
    const r = await runBackupJob({
      provider,
      storeid: 'dir1',
      tmpdir: work,
      bandwidthLimit: 1 << 30, // the throttled path, at no cost here; test/bandwidth.test.ts checks the rate
      guests: [{ vmid: 200, type: 'lxc', rootdir: src, config: 'hostname: ct200\n', ...(mapped ? { idMap: TEST_MAP_LINES } : {}) }],
    });
    expect(r.guests[0]!.error).toBeUndefined();
    const volname = r.guests[0]!.volname!;
    const store = await DirectoryStore.open(root);
    const [info] = await store.listBackups(200);
    expect(info).toMatchObject({ volname, subtype: 'lxc', format: mode, status: 'ok' });
    expect((await store.verifyBackup(volname)).ok).toBe(true);

    const dst = path.join(work, 'dst');
    mkdirSync(dst);
    const res = await restoreContainer({ provider, volname, storeid: 'dir1', rootdir: dst, configDir: work, ...(mapped ? { idMap: TEST_MAP_LINES } : {}) });
    expect(res).toMatchObject({ mechanism: mode, config: 'hostname: ct200\n' });
    expect(snapshotTree(dst)).toEqual(before);

    // a changed archive: verify finds it, restore refuses it
    const changed = mode === 'tar' ? path.join(store.backupDir(volname), 'root.tar') : path.join(store.backupDir(volname), 'root', 'hello.txt');
    appendFileSync(changed, 'x');
    expect((await store.verifyBackup(volname)).problems[0]).toMatch(/checksum mismatch/);
    const dst2 = path.join(work, 'dst2');
    mkdirSync(dst2);
    await expect(restoreContainer({ provider, volname, storeid: 'dir1', rootdir: dst2 })).rejects.toThrow(/is corrupted, refusing to restore it/);
  });
});

/** Backs up `src` (a container tree with the test id map) in `mode` into a fresh store under `work`. */
async function backupCt(work: string, src: string, mode: 'tar' | 'directory'): Promise<{ provider: DirectoryProvider; store: DirectoryStore; volname: string; root: string }> {
  const root = path.join(work, `store-${mode}`);
  const provider = new DirectoryProvider({ storeid: 'dir1', scfg: { path: root, 'lxc-backup-mode': mode }, log: () => {} });
  const r = await runBackupJob({ provider, storeid: 'dir1', tmpdir: work, guests: [{ vmid: 200, type: 'lxc', rootdir: src, config: 'hostname: ct200\n', idMap: TEST_MAP_LINES }] });
  expect(r.guests[0]!.error).toBeUndefined();
  return { provider, store: await DirectoryStore.open(root), volname: r.guests[0]!.volname!, root };
}

/** A container tree owned by the container's root (host uid 100000) with one file `f`. */
function smallTree(work: string): string {
  const src = path.join(work, 'src');
  mkdirSync(src);
  writeFileSync(path.join(src, 'f'), 'data\n');
  lchownSync(src, 100000, 100000);
  lchownSync(path.join(src, 'f'), 100000, 100000);
  return src;
}

describe('container backups are private and keep every extended attribute', () => {
  it.each(['tar', 'directory'] as const)('lxc-backup-mode %s with umask 0: folders 0700, files 0600 (the tree inside root/ as the container has it)', async (mode) => {
    const old = process.umask(0);
    try {
      const work = await tempDir();
      const { store, volname, root } = await backupCt(work, smallTree(work), mode);
      await store.setNotes(volname, 'n');
      await store.setProtected(volname, true);
      const bad: string[] = [];
      const walk = (p: string): void => {
        const st = lstatSync(p);
        const want = st.isDirectory() ? 0o700 : 0o600;
        if ((st.mode & 0o7777) !== want) bad.push(`${p} ${(st.mode & 0o7777).toString(8)}`);
        if (st.isDirectory()) for (const n of readdirSync(p)) if (n !== 'root') walk(path.join(p, n));
      };
      walk(root);
      expect(bad).toEqual([]);
      expect(readdirSync(store.backupDir(volname)).sort()).toEqual(['backup.log', 'guest.conf', 'manifest.json', 'notes', 'protected', mode === 'tar' ? 'root.tar' : 'root'].sort());
      expect((await store.verifyBackup(volname)).ok).toBe(true);
    } finally {
      process.umask(old);
    }
  });

  it('a setuid-root binary in a directory-mode backup cannot be run by another user from the store', async () => {
    const work = await tempDir();
    chmodSync(work, 0o755); // only the store's own modes may keep others out
    const src = smallTree(work);
    mkdirSync(path.join(src, 'bin'));
    lchownSync(path.join(src, 'bin'), 100000, 100000);
    const id = path.join(src, 'bin', 'id');
    copyFileSync('/usr/bin/id', id);
    lchownSync(id, 100000, 100000); // the container's root
    chmodSync(id, 0o4755);
    const { store, volname } = await backupCt(work, src, 'directory');
    const stored = path.join(store.backupDir(volname), 'root', 'bin', 'id');
    // what the store holds is a setuid-root binary on the host (container uid 0 is host uid 0 there)
    expect(lstatSync(stored)).toMatchObject({ uid: 0, mode: expect.any(Number) });
    expect(lstatSync(stored).mode & 0o7777).toBe(0o4755);
    expect(execFileSync('runuser', ['-u', 'nobody', '--', 'id', '-u'], { encoding: 'utf8' }).trim()).toBe('65534');
    const r = spawnSync('runuser', ['-u', 'nobody', '--', stored, '-u'], { encoding: 'utf8' });
    expect(r.stdout).not.toMatch(/^0$/m);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/Permission denied/);
  });

  it('directory mode: verify and restore see a changed extended attribute of the tree', async () => {
    const work = await tempDir();
    const { provider, store, volname } = await backupCt(work, smallTree(work), 'directory');
    const f = path.join(store.backupDir(volname), 'root', 'f');
    execFileSync('setfattr', ['-n', 'trusted.x', '-v', 'injected', f]);
    expect((await store.verifyBackup(volname)).problems).toEqual([`${path.join(store.backupDir(volname), 'root')}: checksum mismatch (content changed since the backup)`]);
    const dst = path.join(work, 'dst');
    mkdirSync(dst);
    await expect(restoreContainer({ provider, volname, storeid: 'dir1', rootdir: dst, idMap: TEST_MAP_LINES })).rejects.toThrow(/is corrupted, refusing to restore it/);
  });

  it('a tree digest recorded before xattrs were covered still verifies; it never equals a digest with xattrs', async () => {
    const work = await tempDir();
    const { store, volname } = await backupCt(work, smallTree(work), 'directory');
    const tree = path.join(store.backupDir(volname), 'root');
    const legacy = await hashTree(tree, { xattrs: false });
    expect(legacy.sha256).not.toBe((await hashTree(tree)).sha256); // no xattrs at all, still different
    const { checksum: _c, ...m } = await store.readManifest(volname);
    await store.commitManifest({ ...m, files: { ...m.files, root: legacy } });
    expect(await store.verifyBackup(volname)).toMatchObject({ ok: true, problems: [] });
    appendFileSync(path.join(tree, 'f'), 'x');
    expect((await store.verifyBackup(volname)).problems).toEqual([`${tree}: checksum mismatch (content changed since the backup)`]);
  });

  it.each(['tar', 'directory'] as const)('lxc-backup-mode %s keeps trusted.* xattrs through backup and restore', async (mode) => {
    const work = await tempDir();
    const src = smallTree(work);
    execFileSync('setfattr', ['-n', 'trusted.x', '-v', 'y', path.join(src, 'f')]);
    execFileSync('setfattr', ['-n', 'trusted.overlay.opaque', '-v', 'y', src]);
    const { provider, store, volname } = await backupCt(work, src, mode);
    expect((await store.verifyBackup(volname)).ok).toBe(true);
    const dst = path.join(work, 'dst');
    mkdirSync(dst);
    await restoreContainer({ provider, volname, storeid: 'dir1', rootdir: dst, idMap: TEST_MAP_LINES });
    const get = (p: string, name: string): string => execFileSync('getfattr', ['--absolute-names', '--only-values', '-n', name, p], { encoding: 'utf8' });
    expect(get(path.join(dst, 'f'), 'trusted.x')).toBe('y');
    expect(get(dst, 'trusted.overlay.opaque')).toBe('y');
  });
});

describe('cancelling a container backup', () => {
  it.each([['tar', 2], ['tar', 1], ['directory', 2], ['directory', 1]] as const)('lxc-backup-mode %s, API generation %i: the job signal stops the copy and no backup is left', async (mode, generation) => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    mkdirSync(src);
    writeFileSync(path.join(src, 'big'), Buffer.alloc(16 << 20, 1)); // 16 s at 1 MiB/s
    const root = path.join(work, 'store');
    const context = { storeid: 'dir1', scfg: { path: root, 'lxc-backup-mode': mode }, log: () => {} };
    const provider: BackupProvider = generation === 2 ? new DirectoryProvider(context) : new DirectoryProviderV1(context);
    const controller = new AbortController();
    setTimeout(() => controller.abort(new Error('cancelled by the test')), 500);
    const t0 = performance.now();
    const job = runBackupJob({ provider, storeid: 'dir1', tmpdir: work, bandwidthLimit: 1 << 20, signal: controller.signal, guests: [{ vmid: 200, type: 'lxc', rootdir: src, config: 'hostname: ct200\n' }] });
    await expect(job).rejects.toMatchObject({ code: 'ERR_JOB_ABORTED' });
    expect((performance.now() - t0) / 1000).toBeLessThan(8); // stopped, not run to its end
    expect(await (await DirectoryStore.open(root)).listBackups(200)).toEqual([]);
  });
});

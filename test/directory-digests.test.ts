/**
 * The directory store with content digests (manifest version 2, docs/directory-store.md): images
 * recorded while they are written, no second read of what a backup wrote, restores that check
 * what they read as they copy (one read), older manifests still verified and restored, newer
 * ones refused.
 */
import { readFileSync, readdirSync, statSync, writeFileSync, existsSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { DirectoryProvider, DirectoryStore, restoreVm, runBackupJob, type BackupProvider } from '../lib/index.js';
import { hashFile, manifestChecksum, type Manifest } from '../lib/directory-provider/layout.js';
import { asManifestVersion1, damageImageData, expectRestores, startDisk, vmGuest, type Disk } from './helpers/directory.js';
import { expectSameBytes } from './helpers/images.js';
import { requireTool } from './helpers/tools.js';
import { stopAll, tempDir } from './helpers/qemu.js';

const MiB = 2 ** 20;

afterEach(async () => {
  await stopAll();
});

/** Bytes this process has read from files so far (`rchar`: the core's socket reads do not count). */
function bytesRead(): number {
  const m = /^rchar: (\d+)$/m.exec(readFileSync('/proc/self/io', 'utf8'));
  if (!m) throw new Error('no rchar in /proc/self/io');
  return Number(m[1]);
}

interface Rig {
  disk: Disk;
  root: string;
  scratch: string;
  provider: DirectoryProvider;
  backup: (write: [pattern: number, offset: number, length: number][]) => Promise<{ volname: string; content: Buffer; read: number }>;
}

async function rig(size: number): Promise<Rig> {
  const disk = await startDisk(size);
  const root = path.join(await tempDir(), 'store');
  const scratch = await tempDir();
  let t = Date.UTC(2026, 0, 1, 2);
  const provider = new DirectoryProvider({ storeid: 'dir1', scfg: { path: root }, log: () => {} }, { now: () => new Date((t += 86_400_000)) });
  const backup: Rig['backup'] = async (writes) => {
    for (const [p, o, l] of writes) await disk.write(p, o, l);
    const content = disk.snapshot();
    const before = bytesRead();
    const r = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: scratch });
    const read = bytesRead() - before;
    expect(r.guests[0]!.error).toBeUndefined();
    return { volname: r.guests[0]!.volname!, content, read };
  };
  return { disk, root, scratch, provider, backup };
}

/** Records every method called on a provider. */
function spied(provider: BackupProvider): { provider: BackupProvider; calls: string[] } {
  const calls: string[] = [];
  const proxy = new Proxy(provider, {
    get(target, prop, receiver) {
      const v = Reflect.get(target, prop, receiver) as unknown;
      if (typeof v !== 'function' || typeof prop !== 'string') return v;
      return (...args: unknown[]) => {
        calls.push(prop);
        return (v as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  return { provider: proxy, calls };
}

describe('a backup records its images as it writes them', () => {
  it('manifest version 2: each image by its digest file (0600), no second read of what was written', async () => {
    const { root, backup } = await rig(64 * MiB);
    const full = await backup([[0x11, 0, 40 * MiB]]);
    // the disk's 40 MiB came over NBD; reading the image back to hash it would read 40 MiB of files
    expect(full.read).toBeLessThan(1 * MiB);
    const incr = await backup([[0x22, 8 * MiB, 4 * MiB]]);
    expect(incr.read).toBeLessThan(1 * MiB);
    const store = await DirectoryStore.open(root);
    for (const b of [full, incr]) {
      const m = await store.readManifest(b.volname);
      const dir = store.backupDir(b.volname);
      expect(m.version).toBe(2);
      expect(m.files['disk0.qcow2']).toEqual({ size: statSync(path.join(dir, 'disk0.qcow2')).size, digests: 'disk0.qcow2.digests' });
      expect(m.files['disk0.qcow2.digests']).toEqual(await hashFile(path.join(dir, 'disk0.qcow2.digests')));
      for (const f of readdirSync(dir)) expect(statSync(path.join(dir, f)).mode & 0o777, f).toBe(0o600);
      expect((await store.verifyBackup(b.volname)).problems).toEqual([]);
    }
  });
});

describe('restore checks what it reads as it copies', () => {
  it('a chain restores byte-exact through the core, reading each stored byte once, with no volume init', async () => {
    const { root, scratch, provider, backup } = await rig(64 * MiB);
    const x = [await backup([[0x11, 0, 24 * MiB]]), await backup([[0x22, 4 * MiB, 4 * MiB]]), await backup([[0x33, 30 * MiB, 2 * MiB]])];
    const store = await DirectoryStore.open(root);
    let stored = 0;
    for (const b of x) stored += statSync(path.join(store.backupDir(b.volname), 'disk0.qcow2')).size;
    const { provider: p, calls } = spied(provider);
    const target = path.join(scratch, 'r.raw');
    const before = bytesRead();
    await restoreVm({ provider: p, volname: x[2]!.volname, storeid: 'dir1', targets: { disk0: target } });
    const read = bytesRead() - before;
    expectSameBytes(readFileSync(target), x[2]!.content, 'restored');
    expect(calls).toContain('restoreVmVolumeWrite');
    expect(calls).not.toContain('restoreVmVolumeInit');
    // checking the chain first and copying it after would read it twice
    expect(read).toBeLessThan(stored * 1.2);
    // sparse: the 36 MiB never written are holes
    expect(statSync(target).blocks * 512).toBeLessThan(34 * MiB);
  });

  it('a chain restores onto a block device holding old data (an LVM volume at 3 a.m.): in place, byte-exact', async (ctx) => {
    requireTool('losetup', 'mount');
    const { scratch, provider, backup } = await rig(16 * MiB);
    const x = [await backup([[0x11, 0, 8 * MiB]]), await backup([[0x22, 1 * MiB, 1 * MiB]]), await backup([[0x33, 12 * MiB, 1 * MiB]])];
    const backing = path.join(scratch, 'lv.img');
    writeFileSync(backing, Buffer.alloc(16 * MiB, 0xab));
    const device = execFileSync('losetup', ['--find', '--show', backing], { encoding: 'utf8' }).trim();
    ctx.onTestFinished(() => void execFileSync('losetup', ['--detach', device]));
    const { provider: p, calls } = spied(provider);
    await restoreVm({ provider: p, volname: x[2]!.volname, storeid: 'dir1', targets: { disk0: device } });
    expect(calls).toContain('restoreVmVolumeWrite');
    // the 0xab the device held where the backup has zeros reads as zeros now
    expectSameBytes(readFileSync(device), x[2]!.content, 'restored onto the device');
    expect(readdirSync(path.dirname(device)).filter((f) => f.startsWith(`${path.basename(device)}.partial`))).toEqual([]);
  });

  it('corrupted data in a middle layer: the restore fails naming the image, and no partial target is left', async () => {
    const { root, scratch, provider, backup } = await rig(16 * MiB);
    const x = [await backup([[0x11, 0, 8 * MiB]]), await backup([[0x22, 1 * MiB, 1 * MiB]]), await backup([[0x33, 12 * MiB, 1 * MiB]])];
    const store = await DirectoryStore.open(root);
    const image = path.join(store.backupDir(x[1]!.volname), 'disk0.qcow2');
    damageImageData(image);
    const target = path.join(scratch, 'r.raw');
    const err = await restoreVm({ provider, volname: x[2]!.volname, storeid: 'dir1', targets: { disk0: target } }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_RESTORE', cause: { code: 'ERR_BACKUP_CORRUPT', file: image } });
    expect((err as Error).message).toContain(`${image}: bytes `);
    expect(existsSync(target)).toBe(false);
    expect(readdirSync(path.dirname(target)).filter((f) => f.startsWith(`${path.basename(target)}.partial`))).toEqual([]);
    // what Proxmox VE's restore path reads (qemu-img through a FUSE export) is checked before
    await expect(provider.restoreVmInit(x[2]!.volname)).resolves.toEqual({ disk0: { size: 16 * MiB } });
    await expect(provider.restoreVmVolumeInit(x[2]!.volname, 'disk0', {})).rejects.toMatchObject({ code: 'ERR_BACKUP_CORRUPT', file: image });
    await provider.restoreVmCleanup(x[2]!.volname);
    // the backup under it is sound
    await expectRestores(provider, x[0]!.volname, x[0]!.content, scratch);
  });
});

describe('manifests of other versions', () => {
  it('version 1 (images by SHA-256) still verifies and restores; a merge gives the child digests', async () => {
    const { root, scratch, provider, backup } = await rig(16 * MiB);
    const x = [await backup([[0x11, 0, 8 * MiB]]), await backup([[0x22, 1 * MiB, 1 * MiB]])];
    const store = await DirectoryStore.open(root);
    for (const b of x) await asManifestVersion1(store, b.volname);
    for (const b of x) expect((await store.verifyBackup(b.volname)).problems).toEqual([]);
    const { provider: p, calls } = spied(provider);
    await expectRestores(p, x[1]!.volname, x[1]!.content, scratch);
    expect(calls).toContain('restoreVmVolumeInit'); // qemu-img, after the whole chain was hashed
    // a changed version-1 image is refused before anything is written, as before
    const image = path.join(store.backupDir(x[0]!.volname), 'disk0.qcow2');
    const saved = readFileSync(image);
    damageImageData(image);
    const err = await restoreVm({ provider, volname: x[1]!.volname, storeid: 'dir1', targets: { disk0: path.join(scratch, 'bad.raw') } }).catch((e: unknown) => e);
    expect(err).toMatchObject({ cause: { code: 'ERR_BACKUP_CORRUPT', file: image } });
    expect((err as Error).message).toContain(`${image}: checksum mismatch`);
    writeFileSync(image, saved);
    // deleting the base merges it into the child, which is recorded anew with content digests
    await store.deleteBackup(x[0]!.volname);
    const m = await store.readManifest(x[1]!.volname);
    expect(m.version).toBe(2);
    expect(m.files['disk0.qcow2']).toMatchObject({ digests: 'disk0.qcow2.digests' });
    expect((await store.verifyBackup(x[1]!.volname)).problems).toEqual([]);
    await expectRestores(provider, x[1]!.volname, x[1]!.content, scratch);
  });

  it('a manifest of a newer version is refused with ERR_BACKUP_VERSION', async () => {
    const { root, backup } = await rig(4 * MiB);
    const b = await backup([[0x11, 0, 1 * MiB]]);
    const store = await DirectoryStore.open(root);
    const file = path.join(store.backupDir(b.volname), 'manifest.json');
    const { checksum: _c, ...rest } = JSON.parse(readFileSync(file, 'utf8')) as Manifest;
    const v3 = { ...rest, version: 3 };
    writeFileSync(file, JSON.stringify({ ...v3, checksum: manifestChecksum(v3) }));
    await expect(store.readManifest(b.volname)).rejects.toMatchObject({ code: 'ERR_BACKUP_VERSION', message: expect.stringContaining('upgrade') });
  });
});

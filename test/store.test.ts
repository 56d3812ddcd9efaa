/**
 * The directory store's storage side: retention rules (pure), prune and delete keeping every
 * remaining backup restorable, protected flag and notes, aborts at each stage, corruption found by
 * verify and refused by restore, and clear errors for bad store paths and volume ids.
 */
import { spawnSync } from 'node:child_process';
import { open } from 'node:fs/promises';
import { chmodSync, lstatSync, readFileSync, readdirSync, rmSync, utimesSync, writeFileSync, mkdirSync, existsSync } from 'node:fs';
import path from 'node:path';

import { afterEach, describe, expect, it, vi } from 'vitest';

import {
  DirectoryProvider,
  DirectoryStore,
  DirectoryStoreError,
  JobAbortedError,
  markBackups,
  restoreVm,
  runBackupJob,
  type PruneEntry,
} from '../lib/index.js';
import { MANIFEST_VERSION, STORE_FORMAT, manifestChecksum, type Manifest } from '../lib/directory-provider/layout.js';
import { currentOwner } from '../lib/owner.js';
import { BitmapLedger, defaultStateDir, hasPveClusterFs } from '../lib/provider/bitmap-ledger.js';
import { damageImageData, expectRestores, startDisk, vmGuest, type Disk } from './helpers/directory.js';
import { stopAll, tempDir } from './helpers/qemu.js';

const MiB = 2 ** 20;
const KiB = 1024;
const DAY = 86_400;

afterEach(async () => {
  await stopAll();
});



describe('retention rules (markBackups)', () => {
  const T0 = new Date(2024, 0, 10, 1).getTime() / 1000; // a Wednesday, 1 am local time
  const entries = (n: number, step: number): PruneEntry[] => Array.from({ length: n }, (_, i) => ({ volname: `b${i}`, ctime: T0 + i * step }));
  const kept = (marks: ReturnType<typeof markBackups>): string[] => marks.filter((m) => m.mark !== 'remove').map((m) => m.volname);

  it('keep-last keeps the newest; no option keeps everything; keep-all too', () => {
    expect(kept(markBackups(entries(5, 60), { keepLast: 2 }))).toEqual(['b4', 'b3']);
    expect(kept(markBackups(entries(3, 60), {}))).toEqual(['b2', 'b1', 'b0']);
    expect(kept(markBackups(entries(3, 60), { keepAll: true, keepLast: 1 }))).toEqual(['b2', 'b1', 'b0']);
  });

  it('keep-daily keeps the newest of each day; options add up as in Proxmox', () => {
    const e = entries(6, DAY / 2); // two a day for three days
    expect(kept(markBackups(e, { keepDaily: 2 }))).toEqual(['b5', 'b3']);
    expect(kept(markBackups(e, { keepLast: 1, keepDaily: 2 }))).toEqual(['b5', 'b3', 'b1']); // a day already kept does not count
    expect(kept(markBackups(entries(30, DAY), { keepWeekly: 2, keepMonthly: 1 })).length).toBe(3);
    expect(kept(markBackups(entries(3, 366 * DAY), { keepYearly: 5 }))).toEqual(['b2', 'b1', 'b0']);
  });

  it('protected backups are kept and do not count; the bases of kept backups are kept', () => {
    const e: PruneEntry[] = [
      { volname: 'full1', ctime: T0 },
      { volname: 'inc1', ctime: T0 + 10, parent: 'full1' },
      { volname: 'inc2', ctime: T0 + 20, parent: 'inc1' },
      { volname: 'full2', ctime: T0 + 30, protected: true },
      { volname: 'inc3', ctime: T0 + 40, parent: 'full2' },
      { volname: 'old', ctime: T0 - 10 },
    ];
    const marks = markBackups(e, { keepLast: 2 });
    expect(marks.map((m) => [m.volname, m.mark, m.neededBy])).toEqual([
      ['inc3', 'keep', undefined],
      ['full2', 'protected', undefined],
      ['inc2', 'keep', undefined],
      ['inc1', 'keep', 'inc2'],
      ['full1', 'keep', 'inc1'],
      ['old', 'remove', undefined],
    ]);
  });
});

/** A store with a provider whose clock the test sets. */
async function rig(size = 4 * MiB): Promise<{ disk: Disk; root: string; scratch: string; provider: DirectoryProvider; store: () => Promise<DirectoryStore>; clock: { t: number }; backup: (mode?: 'full' | 'new-chain') => Promise<{ volname: string; content: Buffer }> }> {
  const disk = await startDisk(size);
  const root = path.join(await tempDir(), 'store');
  const scratch = await tempDir();
  const clock = { t: Date.UTC(2024, 0, 1, 10) };
  const make = (full?: boolean): DirectoryProvider =>
    new DirectoryProvider({ storeid: 'dir1', scfg: { path: root, ...(full ? { 'vm-backup-mode': 'full' } : {}) }, log: () => {} }, { now: () => new Date(clock.t) });
  const provider = make();
  let n = 0;
  const backup = async (mode?: 'full' | 'new-chain'): Promise<{ volname: string; content: Buffer }> => {
    n++;
    if (mode === 'new-chain') await (await DirectoryStore.open(root)).forgetPreviousInfo(100);
    await disk.write(0x10 + n, ((n * 448 * KiB) % (size - 256 * KiB)) + 4 * KiB, 100 * KiB);
    const content = disk.snapshot();
    const r = await runBackupJob({ provider: mode === 'full' ? make(true) : provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: scratch });
    expect(r.guests[0]!.error).toBeUndefined();
    clock.t += DAY * 1000;
    return { volname: r.guests[0]!.volname!, content };
  };
  return { disk, root, scratch, provider, store: () => DirectoryStore.open(root), clock, backup };
}

describe('prune and delete keep every remaining backup restorable', () => {
  it('prune removes whole old chains, keeps the bases of kept incrementals, dry run changes nothing', async () => {
    const { backup, store, provider, scratch } = await rig();
    const a = [await backup(), await backup(), await backup()]; // days 1-3: one chain
    const b = [await backup('new-chain'), await backup()]; // days 4-5: a new chain
    const s = await store();
    const dry = await s.pruneBackups({ vmid: 100, keep: { keepLast: 1 }, dryRun: true });
    expect(dry.map((m) => [m.volname, m.mark, m.neededBy])).toEqual([
      [b[1]!.volname, 'keep', undefined],
      [b[0]!.volname, 'keep', b[1]!.volname],
      [a[2]!.volname, 'remove', undefined],
      [a[1]!.volname, 'remove', undefined],
      [a[0]!.volname, 'remove', undefined],
    ]);
    expect((await s.listBackups()).length).toBe(5);
    // keep-daily 3 keeps a[2] (day 3), so its whole chain stays
    const marks = await s.pruneBackups({ vmid: 100, keep: { keepDaily: 3 } });
    expect(marks.filter((m) => m.mark === 'remove')).toEqual([]);
    expect(marks.find((m) => m.volname === a[0]!.volname)).toMatchObject({ mark: 'keep', neededBy: a[1]!.volname });
    await s.pruneBackups({ vmid: 100, keep: { keepLast: 1 } });
    expect((await s.listBackups()).map((x) => x.volname)).toEqual(b.map((x) => x.volname));
    for (const x of b) await expectRestores(provider, x.volname, x.content, scratch);
    for (const x of b) expect((await s.verifyBackup(x.volname)).ok).toBe(true);
    // and the next backup still goes incremental on the kept chain
    const c = await backup();
    expect((await s.readManifest(c.volname)).parent).toBe(b[1]!.volname);
  });

  it('delete merges a base into its child (middle and full), refuses protected backups without force', async () => {
    const { backup, store, provider, scratch } = await rig();
    const x = [await backup(), await backup(), await backup(), await backup()];
    const s = await store();
    // the middle of the chain
    expect(await s.deleteBackup(x[1]!.volname)).toEqual({ merged: x[2]!.volname });
    expect((await s.readManifest(x[2]!.volname)).parent).toBe(x[0]!.volname);
    // the full base: its child becomes a full image
    await s.setProtected(x[0]!.volname, true);
    const err = await s.deleteBackup(x[0]!.volname).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_BACKUP_PROTECTED', message: expect.stringMatching(/is protected/) });
    expect(await s.deleteBackup(x[0]!.volname, { force: true })).toEqual({ merged: x[2]!.volname });
    expect(await s.readManifest(x[2]!.volname)).toMatchObject({ mode: 'full' });
    expect((await s.readManifest(x[2]!.volname)).parent).toBeUndefined();
    expect((await s.listBackups()).map((b) => b.volname)).toEqual([x[2]!.volname, x[3]!.volname]);
    for (const b of [x[2]!, x[3]!]) {
      expect(await s.verifyBackup(b.volname)).toEqual({ volid: `dir1:${b.volname}`, ok: true, problems: [] });
      await expectRestores(provider, b.volname, b.content, scratch);
    }
    // the newest: nothing builds on it; the next backup is full (the bookkeeping points at it)
    await s.deleteBackup(x[3]!.volname);
    const y = await backup();
    expect((await s.readManifest(y.volname)).mode).toBe('full');
    await expectRestores(provider, y.volname, y.content, scratch);
  });

  it('notes, the protected flag and retention through the job runner', async () => {
    const { disk, root, scratch } = await rig();
    const provider = new DirectoryProvider({ storeid: 'dir1', scfg: { path: root }, log: () => {} });
    const opts = { provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: scratch };
    const r1 = await runBackupJob({ ...opts, notesTemplate: '{{guestname}} nightly', protected: true });
    const r2 = await runBackupJob({ ...opts, prune: { keepLast: 1 } });
    const r3 = await runBackupJob({ ...opts, prune: { keepLast: 1 } });
    expect([r1, r2, r3].map((r) => r.guests[0]!.warnings)).toEqual([[], [], []]);
    const list = await (await DirectoryStore.open(root)).listBackups(100);
    // the protected full is kept; r2 is needed by r3
    expect(list.map((b) => [b.volname, b.protected, b.notes])).toEqual([
      [r1.guests[0]!.volname, true, 'vm100 nightly'],
      [r2.guests[0]!.volname, false, undefined],
      [r3.guests[0]!.volname, false, undefined],
    ]);
  });
});

describe('abort at each stage leaves a store that lists, prunes and backs up correctly', () => {
  const stages = ['backupVmQueryIncremental', 'backupVm', 'during the copy', 'after the copy'] as const;
  it.each(stages)('abort %s', async (stage) => {
    const { disk, root, scratch, backup, provider } = await rig();
    const first = await backup();
    const controller = new AbortController();
    class Failing extends DirectoryProvider {
      override async backupVmQueryIncremental(...a: Parameters<DirectoryProvider['backupVmQueryIncremental']>) {
        if (stage === 'backupVmQueryIncremental') throw new Error('injected');
        return super.backupVmQueryIncremental(...a);
      }
      override async backupVm(...a: Parameters<DirectoryProvider['backupVm']>) {
        if (stage === 'backupVm') throw new Error('injected');
        if (stage === 'during the copy') setTimeout(() => controller.abort(), 5);
        await super.backupVm(...a);
        if (stage === 'after the copy') throw new Error('injected');
      }
    }
    const failing = new Failing({ storeid: 'dir1', scfg: { path: root }, log: () => {} }, { onProgress: () => {} });
    if (stage === 'during the copy') await disk.write(0x77, 0, 3 * MiB); // enough to copy that the abort lands mid-copy
    const r = await runBackupJob({ provider: failing, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: scratch, signal: controller.signal }).catch((e: unknown) => e);
    if (stage === 'during the copy') expect(r).toBeInstanceOf(JobAbortedError);
    else expect((r as { guests: Array<{ status: string }> }).guests[0]!.status).toBe('failed');
    const s = await DirectoryStore.open(root);
    expect((await s.listBackups()).map((b) => [b.volname, b.status])).toEqual([[first.volname, 'ok']]);
    expect(await s.pruneBackups({ keep: { keepLast: 5 } })).toHaveLength(1);
    const next = await backup();
    // the bookkeeping survived: still incremental, unless the disks had all been copied
    expect((await s.readManifest(next.volname)).mode).toBe(stage === 'after the copy' ? 'full' : 'incremental');
    await expectRestores(provider, first.volname, first.content, scratch);
    await expectRestores(provider, next.volname, next.content, scratch);
  });

  it('a crashed writer leaves an incomplete backup: listed as such, refused by restore, removed by prune', async () => {
    const { root, backup, provider, scratch } = await rig();
    const first = await backup();
    const dir = path.join(root, '100', 'qemu-2023_12_31-23_00_00');
    mkdirSync(dir);
    writeFileSync(path.join(dir, '.lock'), '999999999\n');
    writeFileSync(path.join(dir, 'disk0.qcow2.part'), 'partial');
    const s = await DirectoryStore.open(root);
    expect((await s.listBackups()).map((b) => b.status)).toEqual(['incomplete', 'ok']);
    const err = await restoreVm({ provider, volname: 'backup/100/qemu-2023_12_31-23_00_00', storeid: 'dir1', targets: { disk0: path.join(scratch, 'x.raw') } }).catch((e: unknown) => e);
    expect((err as Error).message).toMatch(/is incomplete \(no manifest.json\)/);
    expect(existsSync(path.join(scratch, 'x.raw'))).toBe(false);
    expect((await s.pruneBackups({ keep: { keepLast: 3 } })).map((m) => m.mark)).toEqual(['remove', 'keep']);
    expect(existsSync(dir)).toBe(false);
    const next = await backup();
    expect((await s.readManifest(next.volname)).parent).toBe(first.volname);
  });
});

describe('corruption is found by verify and refused by restore', () => {
  it('a changed image: verify names it; restoring it or a backup built on it is refused naming it', async () => {
    const { backup, store, provider, scratch } = await rig();
    const x = [await backup(), await backup(), await backup()];
    const s = await store();
    const image = path.join(s.backupDir(x[1]!.volname), 'disk0.qcow2');
    damageImageData(image);
    const v = await s.verifyBackup(x[1]!.volname);
    expect(v.ok).toBe(false);
    expect(v.problems).toEqual([contentMismatch(image)]);
    expect((await s.verifyBackup(x[0]!.volname)).ok).toBe(true);
    for (const b of [x[1]!, x[2]!]) {
      const err = await restoreVm({ provider, volname: b.volname, storeid: 'dir1', targets: { disk0: path.join(scratch, 'r.raw') } }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'ERR_RESTORE', cause: { code: 'ERR_BACKUP_CORRUPT', file: image } });
      expect((err as Error).message).toContain(image);
    }
    expect(existsSync(path.join(scratch, 'r.raw'))).toBe(false);
    await expectRestores(provider, x[0]!.volname, x[0]!.content, scratch);
  });

  it('a changed or broken manifest: verify and restore name manifest.json', async () => {
    const { backup, store, provider, scratch } = await rig();
    const x = [await backup(), await backup()];
    const s = await store();
    const manifest = path.join(s.backupDir(x[0]!.volname), 'manifest.json');
    writeFileSync(manifest, readFileSync(manifest, 'utf8').replace(/"size": 4194304/, '"size": 4194305'));
    expect(await s.verifyBackup(x[0]!.volname)).toMatchObject({ ok: false, problems: [expect.stringContaining(`${manifest} does not match its checksum`)] });
    const err = await restoreVm({ provider, volname: x[1]!.volname, storeid: 'dir1', targets: { disk0: path.join(scratch, 'r.raw') } }).catch((e: unknown) => e);
    expect((err as Error).message).toContain(`${manifest} does not match its checksum`);
    writeFileSync(manifest, '{"truncated');
    expect((await s.verifyBackup(x[0]!.volname)).problems).toEqual([`backup dir1:${x[0]!.volname} is corrupted: ${manifest} is not valid JSON`]);
    // the incremental built on it cannot be restored any more: broken
    expect((await s.listBackups()).map((b) => b.status)).toEqual(['corrupt', 'broken']);
    expect(await s.pruneBackups({ keep: { keepLast: 1 } })).toEqual([]); // both left alone for an operator
    expect((await s.listBackups()).length).toBe(2);
  });

  it('a broken image structure fails qemu-img check', async () => {
    const { backup, store } = await rig();
    const x = await backup();
    const s = await store();
    const image = path.join(s.backupDir(x.volname), 'disk0.qcow2');
    const fh = await open(image, 'r+');
    await fh.write(Buffer.alloc(8, 0xff), 0, 8, 0x30); // the L1 table offset
    await fh.close();
    const v = await s.verifyBackup(x.volname);
    expect(v.problems.some((p) => p.startsWith(`${image}: qemu-img check failed`))).toBe(true);
  });
});

describe('bad store paths and volume ids get one clear error with a stable code', () => {
  it('not a store; unknown, malformed and foreign volume ids', async () => {
    const dir = await tempDir();
    writeFileSync(path.join(dir, 'something'), 'x');
    await expect(DirectoryStore.open(dir)).rejects.toMatchObject({ code: 'ERR_NOT_A_STORE', message: `${dir} is not a backup store: pve-backup-store.json is missing` });
    await expect(DirectoryStore.create(dir)).rejects.toMatchObject({ code: 'ERR_NOT_A_STORE' });
    await expect(DirectoryStore.open(path.join(dir, 'something'))).rejects.toBeInstanceOf(DirectoryStoreError);
    const s = await DirectoryStore.create(path.join(dir, 'store'), { storeid: 'dir1' });
    expect(await DirectoryStore.create(path.join(dir, 'store'))).toMatchObject({ storeid: 'dir1' });
    expect(() => s.volnameOf('dir1:backup/100/qemu-x')).toThrow(expect.objectContaining({ code: 'ERR_INVALID_VOLID' }));
    expect(() => s.volnameOf('other:backup/100/qemu-2024_01_01-00_00_00')).toThrow(expect.objectContaining({ code: 'ERR_UNKNOWN_VOLUME' }));
    expect(s.volnameOf('dir1:backup/100/qemu-2024_01_01-00_00_00')).toBe('backup/100/qemu-2024_01_01-00_00_00');
    await expect(s.readManifest('backup/100/qemu-2024_01_01-00_00_00')).rejects.toMatchObject({ code: 'ERR_UNKNOWN_VOLUME' });
    await expect(s.deleteBackup('backup/100/qemu-2024_01_01-00_00_00')).rejects.toMatchObject({ code: 'ERR_UNKNOWN_VOLUME' });
    expect(s.parseVolname('backup/100/lxc-2024_01_01-00_00_00-2')).toMatchObject({ vmid: 100, vmtype: 'lxc', backupId: '2024_01_01-00_00_00-2' });
  });
});

/** Changes two bytes near the end of a file (inside an image's data, so qemu-img check still passes). */
/** The problem a check reports for an image whose content no longer matches its digests. */
function contentMismatch(image: string): unknown {
  return expect.stringMatching(new RegExp(`^${image.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: bytes \\d+\\.\\.\\d+: content does not match its digest$`));
}

describe('a broken or corrupted chain is never taken for a sound one', () => {
  it('delete refuses to merge a corrupted base (or into a corrupted child), naming the image; nothing changes', async () => {
    const { backup, store, provider, scratch } = await rig();
    const x = [await backup(), await backup(), await backup()];
    const s = await store();
    const baseImage = path.join(s.backupDir(x[0]!.volname), 'disk0.qcow2');
    const childManifest = readFileSync(path.join(s.backupDir(x[1]!.volname), 'manifest.json'), 'utf8');
    damageImageData(baseImage);
    const err = await s.deleteBackup(x[0]!.volname).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_BACKUP_CORRUPT', file: baseImage, message: expect.stringContaining(`${baseImage}: bytes `) });
    expect(existsSync(baseImage)).toBe(true);
    expect(readFileSync(path.join(s.backupDir(x[1]!.volname), 'manifest.json'), 'utf8')).toBe(childManifest);
    // the child still says what it is: not restorable, and verify says so
    expect((await s.verifyBackup(x[1]!.volname)).ok).toBe(false);
    // a corrupted child: merging into it would bless its image with fresh checksums
    const y = [await backup('new-chain'), await backup()];
    const childImage = path.join(s.backupDir(y[1]!.volname), 'disk0.qcow2');
    damageImageData(childImage);
    await expect(s.deleteBackup(y[0]!.volname)).rejects.toMatchObject({ code: 'ERR_BACKUP_CORRUPT', file: childImage });
    expect((await s.verifyBackup(y[1]!.volname)).problems).toEqual([contentMismatch(childImage)]);
    await expectRestores(provider, y[0]!.volname, y[0]!.content, scratch);
  });

  it('verify of an incremental checks the images of its whole chain', async () => {
    const { backup, store } = await rig();
    const x = [await backup(), await backup(), await backup()];
    const s = await store();
    const image = path.join(s.backupDir(x[0]!.volname), 'disk0.qcow2');
    damageImageData(image);
    for (const b of [x[1]!, x[2]!]) {
      expect(await s.verifyBackup(b.volname)).toEqual({ volid: `dir1:${b.volname}`, ok: false, problems: [contentMismatch(image)] });
    }
  });

  it.each(['removed', 'corrupt manifest'] as const)('a middle backup %s: list says broken, prune keeps the full, the next backup is full', async (how) => {
    const { backup, store, provider, scratch } = await rig();
    const x = [await backup(), await backup(), await backup()];
    const s = await store();
    if (how === 'removed') rmSync(s.backupDir(x[1]!.volname), { recursive: true });
    else writeFileSync(path.join(s.backupDir(x[1]!.volname), 'manifest.json'), '{"truncated');
    const statuses = (await s.listBackups()).map((b) => [b.volname, b.status]);
    expect(statuses).toEqual([[x[0]!.volname, 'ok'], ...(how === 'removed' ? [] : [[x[1]!.volname, 'corrupt']]), [x[2]!.volname, 'broken']]);
    const marks = await s.pruneBackups({ vmid: 100, keep: { keepLast: 1 } });
    expect(marks.map((m) => [m.volname, m.mark])).toEqual([[x[0]!.volname, 'keep']]);
    expect(existsSync(s.backupDir(x[0]!.volname))).toBe(true);
    expect(existsSync(s.backupDir(x[2]!.volname))).toBe(true); // left for an operator
    await expectRestores(provider, x[0]!.volname, x[0]!.content, scratch);
    // previous-info names the broken x[2]: building on it would make another unrestorable backup
    const next = await backup();
    expect((await s.readManifest(next.volname)).mode).toBe('full');
    await expectRestores(provider, next.volname, next.content, scratch);
  });

  it('delete refuses a backup two others build on (ERR_CHAIN_DELETE), and changes nothing', async () => {
    const { backup, store } = await rig();
    const x = [await backup(), await backup()];
    const s = await store();
    // a second incremental on the full backup (as after restoring the bookkeeping to it; the
    // bitmap ledger too, or the provider would rightly refuse: QEMU's bitmap belongs to x[1])
    await s.writePreviousInfo(100, { volname: x[0]!.volname, devices: ['disk0'] });
    await new BitmapLedger('dir1').write(100, { store: s.root, volname: x[0]!.volname });
    const y = await backup();
    expect((await s.readManifest(y.volname)).parent).toBe(x[0]!.volname);
    const err = await s.deleteBackup(x[0]!.volname).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DirectoryStoreError);
    expect(err).toMatchObject({ code: 'ERR_CHAIN_DELETE', volname: x[0]!.volname, message: `cannot delete dir1:${x[0]!.volname}: 2 backups build on it (dir1:${x[1]!.volname}, dir1:${y.volname}); delete them first` });
    expect((await s.listBackups()).map((b) => [b.volname, b.status])).toEqual([x[0]!, x[1]!, y].map((b) => [b.volname, 'ok']));
  });
});

/** Every path under `dir` (itself included) with its permission bits, symlinks not followed. */
function modes(dir: string, skip: (p: string) => boolean = () => false): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  const walk = (p: string): void => {
    const st = lstatSync(p);
    out.push([p, (st.mode & 0o7777).toString(8)]);
    if (st.isDirectory() && !skip(p)) for (const n of readdirSync(p)) walk(path.join(p, n));
  };
  walk(dir);
  return out;
}

describe('the bitmap ledger is seen wherever the bitmap goes', () => {
  it('on a Proxmox VE node (pmxcfs at /etc/pve) it lives in the cluster file system, the same on every node; elsewhere on the host', () => {
    const pmxcfs = '/dev/fuse /etc/pve fuse rw,nosuid,nodev,relatime,user_id=0,group_id=0,default_permissions,allow_other 0 0';
    const plain = 'proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n/dev/vda1 / ext4 rw,relatime 0 0';
    expect(hasPveClusterFs(`${plain}\n${pmxcfs}\n`)).toBe(true);
    expect(hasPveClusterFs(plain)).toBe(false);
    expect(hasPveClusterFs('/dev/fuse /etc/pve/sub fuse rw 0 0\n/dev/vda2 /etc/pve ext4 rw 0 0')).toBe(false);
    const env = process.env['PVE_BACKUP_PROVIDER_STATE_DIR'];
    delete process.env['PVE_BACKUP_PROVIDER_STATE_DIR'];
    try {
      if (process.getuid?.() === 0) {
        expect(defaultStateDir(pmxcfs)).toBe('/etc/pve/priv/pve-backup-provider');
        expect(defaultStateDir(plain)).toBe('/var/lib/pve-backup-provider');
      } else {
        expect(defaultStateDir(pmxcfs)).toMatch(/\/pve-backup-provider$/);
      }
    } finally {
      process.env['PVE_BACKUP_PROVIDER_STATE_DIR'] = env;
    }
    expect(defaultStateDir(pmxcfs)).toBe(path.resolve(env!));
  });
});

describe('a store is private to its owner', () => {
  it('with umask 0, every folder is 0700 and every file 0600; nobody cannot read an image; verify reports an open store', async () => {
    const old = process.umask(0);
    try {
      const { backup, root, store } = await rig();
      chmodSync(path.dirname(root), 0o755); // only the store's own modes may keep others out
      const x = [await backup(), await backup()];
      const s = await store();
      await s.setNotes(x[0]!.volname, 'notes');
      await s.setProtected(x[0]!.volname, true);
      const all = modes(root);
      expect(all.length).toBeGreaterThan(12);
      expect(all.filter(([p, m]) => m !== (lstatSync(p).isDirectory() ? '700' : '600'))).toEqual([]);
      const image = path.join(s.backupDir(x[0]!.volname), 'disk0.qcow2');
      for (const cmd of [['qemu-io', '-r', '-U', '-f', 'qcow2', '-c', 'read 0 4k', image], ['cat', image]]) {
        const r = spawnSync('runuser', ['-u', 'nobody', '--', ...cmd], { encoding: 'utf8' });
        expect(r.status, cmd[0]).not.toBe(0);
        expect(r.stdout + r.stderr, cmd[0]).toMatch(/Permission denied/);
      }
      expect((await s.verifyBackup(x[1]!.volname)).ok).toBe(true);
      chmodSync(root, 0o755);
      expect((await s.verifyBackup(x[1]!.volname)).problems).toEqual([`${root}: other users can read or enter it (mode 0755); chmod 700 it`]);
    } finally {
      process.umask(old);
    }
  });
});

describe('who is writing a backup', () => {
  it('a lock naming a live writer is in-progress; a dead one (also a reused pid) or a legacy dead pid is incomplete, and removed by the next backup', async () => {
    const root = path.join(await tempDir(), 'store');
    const s = await DirectoryStore.create(root, { storeid: 'dir1' });
    const lock = async (when: string, owner: unknown): Promise<string> => {
      const { volname, dir } = await s.createBackupDir(100, 'qemu', new Date(when));
      writeFileSync(path.join(dir, '.lock'), `${JSON.stringify(owner)}\n`);
      return volname;
    };
    const live = await lock('2024-01-01T00:00:00Z', currentOwner());
    // our own pid, but not our start time: the writer died and its pid came back to another process
    const reused = await lock('2024-01-02T00:00:00Z', { ...currentOwner(), start: '1' });
    const legacyDead = await lock('2024-01-03T00:00:00Z', 2 ** 22 + 1); // above pid_max: no such process
    const statuses = Object.fromEntries((await s.listBackups(100)).map((b) => [b.volname, b.status]));
    expect(statuses).toEqual({ [live]: 'in-progress', [reused]: 'incomplete', [legacyDead]: 'incomplete' });
    expect((await s.removeIncomplete(100)).sort()).toEqual([reused, legacyDead].sort());
    expect((await s.listBackups(100)).map((b) => b.volname)).toEqual([live]);
  });
});

describe('work per backup does not grow with the backups a guest has', () => {
  /** A store of one guest with `n` complete backups (a chain), without QEMU: manifests written through the store. */
  const storeWith = async (n: number): Promise<{ s: DirectoryStore; complete: string[] }> => {
    const s = await DirectoryStore.create(path.join(await tempDir(), 'store'), { storeid: 'dir1' });
    const complete: string[] = [];
    for (let i = 0; i < n; i++) {
      const date = new Date(Date.UTC(2024, 0, 1 + i));
      const { volname } = await s.createBackupDir(100, 'qemu', date);
      const parent = complete.at(-1);
      await s.commitManifest({
        format: STORE_FORMAT,
        version: MANIFEST_VERSION,
        volname,
        vmid: 100,
        vmtype: 'qemu',
        ctime: date.getTime() / 1000,
        status: 'ok',
        mode: parent ? 'incremental' : 'full',
        ...(parent ? { parent } : {}),
        files: {},
      });
      complete.push(volname);
    }
    return { s, complete };
  };
  /** A backup folder of guest `vmid` whose writer died before its manifest (a lock naming no live process). */
  const leftover = async (s: DirectoryStore, vmid: number, when: string): Promise<string> => {
    const { volname, dir } = await s.createBackupDir(vmid, 'qemu', new Date(when));
    writeFileSync(path.join(dir, '.lock'), `${JSON.stringify(2 ** 22 + 1)}\n`); // above pid_max: no such process
    writeFileSync(path.join(dir, 'disk0.qcow2'), 'partial');
    return volname;
  };

  it('removeIncomplete removes exactly the incomplete backups the listing names, without reading a manifest', async () => {
    const { s, complete } = await storeWith(6);
    const incomplete = await leftover(s, 100, '2024-02-01T00:00:00Z');
    const otherGuest = await leftover(s, 101, '2024-02-01T00:00:00Z');
    const running = (await s.createBackupDir(100, 'qemu', new Date('2024-02-03T00:00:00Z'))).volname; // its lock names this process
    // a manifest that does not match its checksum: corrupt, left for an operator, never a leftover
    const corrupt = complete[2]!;
    const file = path.join(s.backupDir(corrupt), 'manifest.json');
    writeFileSync(file, readFileSync(file, 'utf8').replace('"ctime": ', '"ctime": 1'));
    const before = Object.fromEntries((await s.listBackups(100)).map((b) => [b.volname, b.status]));
    expect(before).toEqual({
      ...Object.fromEntries(complete.map((v, i) => [v, i < 2 ? 'ok' : i === 2 ? 'corrupt' : 'broken'])),
      [incomplete]: 'incomplete',
      [running]: 'in-progress',
    });

    const reads = vi.spyOn(s, 'readManifest');
    expect(await s.removeIncomplete(100)).toEqual([incomplete]);
    // the point: one look at each folder for its manifest, not a description of every backup
    expect(reads).not.toHaveBeenCalled();
    reads.mockRestore();

    const { [incomplete]: _gone, ...after } = before;
    expect(Object.fromEntries((await s.listBackups(100)).map((b) => [b.volname, b.status]))).toEqual(after);
    expect(existsSync(s.backupDir(incomplete))).toBe(false);
    expect((await s.listBackups(101)).map((b) => [b.volname, b.status])).toEqual([[otherGuest, 'incomplete']]); // another guest's: not this run's business
  });

  it('a manifest of a newer version is neither incomplete nor removed: listing it is an error saying to upgrade', async () => {
    const { s, complete } = await storeWith(2);
    const file = path.join(s.backupDir(complete[1]!), 'manifest.json');
    const { checksum: _c, ...rest } = JSON.parse(readFileSync(file, 'utf8')) as Manifest;
    const newer = { ...rest, version: MANIFEST_VERSION + 1 };
    writeFileSync(file, JSON.stringify({ ...newer, checksum: manifestChecksum(newer) }));
    const hourAgo = new Date(Date.now() - 3_600_000);
    utimesSync(s.backupDir(complete[1]!), hourAgo, hourAgo); // written a while ago: its lock is long gone
    expect(await s.removeIncomplete(100)).toEqual([]);
    await expect(s.listBackups(100)).rejects.toMatchObject({ code: 'ERR_BACKUP_VERSION', message: expect.stringContaining('upgrade') });
    await expect(s.pruneBackups({ keep: { keepLast: 1 } })).rejects.toMatchObject({ code: 'ERR_BACKUP_VERSION' });
    expect(existsSync(file)).toBe(true);
  });

  it('backupInfo of one backup is what the listing says of it, broken chains included', async () => {
    const { s, complete } = await storeWith(4);
    await leftover(s, 100, '2024-02-01T00:00:00Z');
    await s.setNotes(complete[3]!, 'last');
    await s.setProtected(complete[0]!, true);
    const check = async (): Promise<void> => {
      const listed = await s.listBackups(100);
      for (const b of listed) expect(await s.backupInfo(b.volname)).toStrictEqual(b);
    };
    await check();
    rmSync(s.backupDir(complete[1]!), { recursive: true }); // the rest of the chain is broken now
    await check();
    expect((await s.backupInfo(complete[3]!)).status).toBe('broken');
    await expect(s.backupInfo(complete[1]!)).rejects.toMatchObject({ code: 'ERR_UNKNOWN_VOLUME' });
  });
});

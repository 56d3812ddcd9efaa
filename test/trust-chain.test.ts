/**
 * An incremental backup is right only when QEMU's bitmap was cleared last by the backup it builds
 * on. These tests break that the two ways a hostile run found, on qemu-storage-daemon, and check
 * that every restore is byte-exact: two stores sharing a storage id (so QEMU's bitmap name), and
 * a backup killed (SIGKILL) at every step of its sequence, with the guest writing between steps.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import {
  DirectoryProvider,
  DirectoryProviderV1,
  DirectoryStore,
  DirectoryStoreError,
  QmpClient,
  recoverBackupAccess,
  restoreVm,
  runBackupJob,
  type BackupProvider,
  type VmGuest,
} from '../lib/index.js';
import { expectSameBytes } from './helpers/images.js';
import { startDisk, vmGuest, type Disk } from './helpers/directory.js';
import { stopAll, tempDir } from './helpers/qemu.js';

const MiB = 2 ** 20;
const KiB = 1024;
const DIST = path.join(import.meta.dirname, '..', 'dist', 'index.js');

afterEach(async () => {
  await stopAll();
});

async function backup(provider: BackupProvider, storeid: string, disk: Disk, scratch: string, guest: VmGuest = vmGuest(disk)): Promise<{ volname: string; content: Buffer }> {
  const content = disk.snapshot();
  const r = await runBackupJob({ provider, storeid, guests: [guest], tmpdir: scratch });
  expect(r.guests[0]!.error).toBeUndefined();
  return { volname: r.guests[0]!.volname!, content };
}

async function expectRestore(provider: BackupProvider, storeid: string, volname: string, expected: Buffer, scratch: string): Promise<void> {
  const target = path.join(scratch, 'restored.raw');
  await rm(target, { force: true });
  await restoreVm({ provider, volname, storeid, targets: { disk0: target } });
  expectSameBytes(await readFile(target), expected, volname);
  await rm(target, { force: true });
}

describe('two stores with one storage id back up the same guest', () => {
  it.each([2, 1] as const)('API generation %i: each store restores its latest backup exactly (a store whose bitmap another store cleared goes full)', async (generation) => {
    const disk = await startDisk(4 * MiB);
    const scratch = await tempDir();
    // both stores created without a storage id of their own: both are 'directory'
    const make = (root: string): BackupProvider => {
      const context = { storeid: 'directory', scfg: { path: root }, log: () => {} };
      // the same clock: seed-generation chains started in the same second must not share a bitmap
      const options = { now: () => new Date('2026-01-01T00:00:00Z') };
      return generation === 2 ? new DirectoryProvider(context, options) : new DirectoryProviderV1(context, options);
    };
    const rootA = path.join(scratch, 'a');
    const rootB = path.join(scratch, 'b');
    const a = make(rootA);
    const b = make(rootB);
    await disk.write(0x11, 0, MiB);
    await backup(a, 'directory', disk, scratch);
    await disk.write(0x12, MiB, 512 * KiB); // only in a's bitmap until b clears it
    await backup(b, 'directory', disk, scratch);
    await disk.write(0x13, 2 * MiB, 64 * KiB);
    const a2 = await backup(a, 'directory', disk, scratch);
    await expectRestore(a, 'directory', a2.volname, a2.content, scratch);
    await disk.write(0x14, 3 * MiB, 64 * KiB);
    const b2 = await backup(b, 'directory', disk, scratch);
    await expectRestore(b, 'directory', b2.volname, b2.content, scratch);
    const storeA = await DirectoryStore.open(rootA);
    expect((await storeA.readManifest(a2.volname)).mode).toBe('full');
    // a store left alone continues its chain incrementally
    await disk.write(0x15, 0, 64 * KiB);
    const b3 = await backup(b, 'directory', disk, scratch);
    expect((await (await DirectoryStore.open(rootB)).readManifest(b3.volname)).mode).toBe('incremental');
    await expectRestore(b, 'directory', b3.volname, b3.content, scratch);
  });
});

/**
 * The child that is killed: a backup through the library (dist/) with a hook at each step that
 * SIGKILLs its own process, as a crash, OOM kill or power cut would at that moment.
 */
const CRASHING_BACKUP = `
import { DirectoryProvider, DirectoryProviderV1, DirectoryStore, runBackupJob } from ${JSON.stringify(DIST)};
const [root, step, generation, qmp, nbdServer, tmpdir] = process.argv.slice(2);
const die = (at) => { if (at === step) process.kill(process.pid, 'SIGKILL'); };
for (const [method, at] of [['commitManifest', 'manifest'], ['writePreviousInfo', 'previous-info'], ['forgetPreviousInfo', 'failed-after-success']]) {
  const original = DirectoryStore.prototype[method];
  DirectoryStore.prototype[method] = async function (...args) { const r = await original.apply(this, args); die(at); return r; };
}
class Crashing extends DirectoryProvider {
  async backupVm(...args) { die('setup'); await super.backupVm(...args); die('copied'); }
  async backupCleanup(...args) {
    die('teardown');
    // vzdump fails the guest after backup_vm returned (QEMU is told success): backup_cleanup(..., 0) follows
    if (step === 'failed-after-success' && args[2]) throw new Error('injected: protected flag refused');
    return super.backupCleanup(...args);
  }
  async backupHandleLogFile(...args) { await super.backupHandleLogFile(...args); die('log'); }
}
const context = { storeid: 'dir1', scfg: { path: root }, log: () => {} };
const inner = new Crashing(context, { onProgress: (p) => { if (p.done > 0) die('mid-copy'); } });
const provider = generation === '1' ? new DirectoryProviderV1(context, {}, inner) : inner;
await runBackupJob({ provider, storeid: 'dir1', guests: [{ vmid: 100, type: 'qemu', qmp, nbdServer, devices: ['disk0'], config: 'name: vm100\\n' }], tmpdir, bandwidthLimit: 4 * 2 ** 20 });
process.exit(3); // not killed: the step was never reached
`;

/**
 * `failed-after-success`: the guest fails after `backupVm` returned (QEMU takes the backup as
 * successful), and the run dies inside `backupCleanup(false)` right after it forgot the
 * previous-info, with the complete backup still on disk.
 */
const STEPS = ['setup', 'mid-copy', 'copied', 'manifest', 'previous-info', 'teardown', 'log', 'failed-after-success'] as const;

describe('a backup killed at every step of its sequence', () => {
  const cases = [...STEPS.map((s) => [2, s] as const), [1, 'teardown'] as const, [1, 'previous-info'] as const, [1, 'failed-after-success'] as const];
  it.each(cases)('API generation %i, SIGKILL at %s: the next backup restores exactly the disk at its point in time', async (generation, step) => {
    const disk = await startDisk(8 * MiB);
    const scratch = await tempDir();
    const root = path.join(scratch, 'store');
    const context = { storeid: 'dir1', scfg: { path: root }, log: () => {} };
    const v2 = new DirectoryProvider(context);
    const provider: BackupProvider = generation === 2 ? v2 : new DirectoryProviderV1(context, {}, v2);
    await disk.write(0x21, 0, 4 * MiB);
    const first = await backup(provider, 'dir1', disk, scratch);

    // the guest writes, then the backup that dies
    await disk.write(0x22, 4 * MiB, 2 * MiB);
    const script = path.join(scratch, 'crashing-backup.mjs');
    await writeFile(script, CRASHING_BACKUP);
    await disk.q.qmp.close(); // the monitor serves one client at a time: the child's turn
    const code = await new Promise<NodeJS.Signals | number | null>((resolve, reject) => {
      const child = spawn(process.execPath, [script, root, step, String(generation), disk.q.qmpPath, disk.q.nbdPath!, scratch], { stdio: ['ignore', 'ignore', 'inherit'] });
      child.on('error', reject);
      child.on('exit', (c, sig) => resolve(sig ?? c));
    });
    expect(code).toBe('SIGKILL');
    const qmp = await QmpClient.connect(disk.q.qmpPath);
    const guest = { ...vmGuest(disk), qmp };
    // what a crashed orchestrator left in QEMU is removed (the recover command does the same)
    await recoverBackupAccess(qmp);

    // the guest writes again; the next backup must hold every write, whatever the crash left
    await disk.write(0x23, 6 * MiB + 64 * KiB, 512 * KiB);
    await disk.write(0x24, 64 * KiB, 64 * KiB);
    const next = await backup(provider, 'dir1', disk, scratch, guest);
    // what the killed run left in the store is gone too
    expect((await (await DirectoryStore.open(root)).listBackups(100)).filter((b) => b.status !== 'ok')).toEqual([]);
    await expectRestore(provider, 'dir1', next.volname, next.content, scratch);
    await expectRestore(provider, 'dir1', first.volname, first.content, scratch);
    // and the chain goes on from there
    await disk.write(0x25, 7 * MiB, 64 * KiB);
    const after = await backup(provider, 'dir1', disk, scratch, guest);
    const store = await DirectoryStore.open(root);
    expect((await store.readManifest(after.volname)).parent).toBe(next.volname);
    await expectRestore(provider, 'dir1', after.volname, after.content, scratch);
    await qmp.close();
  });
});

describe('the end of a backup', () => {
  it('a signal that comes after the last guest finished cancels nothing: the job succeeds and the backup stays', async () => {
    const disk = await startDisk(4 * MiB);
    const scratch = await tempDir();
    const root = path.join(scratch, 'store');
    const controller = new AbortController();
    class SignalledLate extends DirectoryProvider {
      override async backupCleanup(...args: Parameters<DirectoryProvider['backupCleanup']>): ReturnType<DirectoryProvider['backupCleanup']> {
        controller.abort(new Error('SIGTERM')); // after QEMU's teardown, while the backup is being recorded
        return super.backupCleanup(...args);
      }
    }
    const provider = new SignalledLate({ storeid: 'dir1', scfg: { path: root }, log: () => {} });
    await disk.write(0x31, 0, MiB);
    const content = disk.snapshot();
    const r = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: scratch, signal: controller.signal });
    expect(r.ok).toBe(true);
    const store = await DirectoryStore.open(root);
    expect((await store.listBackups(100)).map((b) => [b.volid, b.status])).toEqual([[`dir1:${r.guests[0]!.volname!}`, 'ok']]);
    await expectRestore(provider, 'dir1', r.guests[0]!.volname!, content, scratch);
  });

  it('a full disk while the backup is recorded fails with ERR_STORE_IO naming the file, and the next backup is whole', async () => {
    const disk = await startDisk(4 * MiB);
    const scratch = await tempDir();
    const root = path.join(scratch, 'store');
    await mkdir(root);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', root]);
    try {
      class FillsTheDisk extends DirectoryProvider {
        fill = true;
        protected override async backupDisk(...args: Parameters<DirectoryProvider['backupDisk']>): Promise<void> {
          await super.backupDisk(...args);
          // the store's file system fills up after the disks were copied, before the manifest
          // (written at the end of backupVm)
          if (this.fill) await writeFile(path.join(root, 'filler'), Buffer.alloc(8 * MiB)).catch(() => undefined);
        }
      }
      const provider = new FillsTheDisk({ storeid: 'dir1', scfg: { path: root }, log: () => {} });
      await disk.write(0x41, 0, MiB);
      const r = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: scratch });
      const error = r.guests[0]!.error as DirectoryStoreError;
      expect(error).toBeInstanceOf(DirectoryStoreError);
      expect(error.code).toBe('ERR_STORE_IO');
      expect(error.file).toMatch(new RegExp(`^${root}/100/qemu-[0-9_-]+/(manifest\\.json|[a-z.]+)$`));
      expect(error.message).toContain(error.file!);
      expect(error.message).toMatch(/ENOSPC|no space/i);
      // space freed: the failed backup is gone and the next one is complete and exact
      await rm(path.join(root, 'filler'));
      provider.fill = false;
      const next = await backup(provider, 'dir1', disk, scratch);
      expect((await (await DirectoryStore.open(root)).listBackups(100)).map((b) => b.status)).toEqual(['ok']);
      await expectRestore(provider, 'dir1', next.volname, next.content, scratch);
    } finally {
      execFileSync('umount', ['-l', root]);
    }
  });
});

describe('cleanup calls vzdump makes without a backup', () => {
  it('backupCleanup after a failure without backupInit (vmtype unknown) does nothing and does not throw; with success it is refused', async () => {
    const root = path.join(await tempDir(), 'store');
    const provider = new DirectoryProvider({ storeid: 'dir1', scfg: { path: root }, log: () => {} });
    await expect(provider.backupCleanup(100, undefined as unknown as 'qemu', false, { error: 'backup_init failed' })).resolves.toBeUndefined();
    await expect(provider.backupCleanup(100, 'qemu', true, {})).rejects.toMatchObject({ code: 'ERR_PROVIDER_STATE' });
  });
});

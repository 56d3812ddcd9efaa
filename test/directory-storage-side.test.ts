/**
 * The DirectoryProvider's storage side as Proxmox VE's storage plugin uses it: `status`,
 * `list_volumes`, `get/update_volume_attribute`, `free_image` and `prune_backups` are class calls
 * made without the job's provider object (pve-manager `VZDump.pm` L1226-1243 for notes, protected
 * and prune after a guest backup; docs/pve-bridge-notes.md 5), which the bridge serves from a fresh
 * provider in a fresh Node process. So each check here runs in a separate Node process that loads
 * the library from dist/ (build first), constructs `new DirectoryProvider({storeid, scfg, log})`
 * and calls `provider.storage` with no `jobInit`, while the job's own process is between
 * `backupVm` and `backupCleanup` (vzdump's order), or in the middle of another backup.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdir, open, utimes, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { afterEach, describe, expect, it } from 'vitest';

import { DirectoryProvider, DirectoryProviderV1, DirectoryStore, runBackupJob, type BackupProvider, type GuestType, type StoredBackup } from '../lib/index.js';
import { native } from '../lib/native.js';
import { expectRestores, startDisk, vmGuest, type Disk } from './helpers/directory.js';
import { stopAll, tempDir } from './helpers/qemu.js';

const MiB = 2 ** 20;
const KiB = 1024;
const DIST = path.join(import.meta.dirname, '..', 'dist', 'index.js');

afterEach(async () => {
  await stopAll();
});

/** One call on `provider.storage` in the fresh process, and what came back. */
type Op = [method: string, ...args: unknown[]];
type Answer = { ok: unknown } | { error: { code?: string; message: string } };

/** The fresh process: a new provider from the storage configuration alone, then each call in order. */
const FRESH = `
import { DirectoryProvider } from ${JSON.stringify(DIST)};
const [root, storeid, ops] = process.argv.slice(2);
const provider = new DirectoryProvider({ storeid, scfg: { path: root }, log: () => {} });
const out = [];
for (const [method, ...args] of JSON.parse(ops)) {
  try {
    out.push({ ok: (await provider.storage[method](...args)) ?? null });
  } catch (err) {
    out.push({ error: { code: err.code, message: err.message } });
  }
}
process.stdout.write(JSON.stringify(out));
`;

/** Runs `ops` in a fresh Node process on the store at `root`. */
async function fresh(scratch: string, root: string, ops: Op[]): Promise<Answer[]> {
  const script = path.join(scratch, 'fresh-provider.mjs');
  await writeFile(script, FRESH);
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script, root, 'dir1', JSON.stringify(ops)], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('exit', (code) => (code === 0 ? resolve(JSON.parse(out) as Answer[]) : reject(new Error(`fresh provider process exited with ${String(code)}`))));
  });
}

const ok = (a: Answer | undefined): unknown => {
  if (!a || !('ok' in a)) throw new Error(`expected an answer, got ${JSON.stringify(a)}`);
  return a.ok;
};

async function backup(provider: BackupProvider, disk: Disk, scratch: string, guest = vmGuest(disk)): Promise<{ volname: string; content: Buffer }> {
  const content = disk.snapshot();
  const r = await runBackupJob({ provider, storeid: 'dir1', guests: [guest], tmpdir: scratch });
  expect(r.guests[0]!.error).toBeUndefined();
  return { volname: r.guests[0]!.volname!, content };
}

const context = (root: string, scfg: Record<string, unknown> = {}) => ({ storeid: 'dir1', scfg: { path: root, ...scfg }, log: () => {} });

describe('the storage side from a fresh provider in another process', () => {
  it('between backupVm and backupCleanup (vzdump order), another process lists the new backup, annotates, protects, prunes (dry run, then real) and removes its base (merged), and the job ends intact', async () => {
    const disk = await startDisk(4 * MiB);
    const scratch = await tempDir();
    const root = path.join(scratch, 'store');
    // b0 and b1 without a bitmap (mode full), b2 full (QEMU has no bitmap yet), b3 incremental over b2
    const full = new DirectoryProvider(context(root, { 'vm-backup-mode': 'full' }));
    await disk.write(0x51, 0, MiB);
    const b0 = await backup(full, disk, scratch);
    await disk.write(0x52, MiB, 64 * KiB);
    const b1 = await backup(full, disk, scratch);
    const incremental = new DirectoryProvider(context(root));
    await disk.write(0x53, 2 * MiB, 64 * KiB);
    const b2 = await backup(incremental, disk, scratch);

    let seen: Answer[] = [];
    let b3name = '';
    class HooksBeforeCleanup extends DirectoryProvider {
      override async backupCleanup(...args: Parameters<DirectoryProvider['backupCleanup']>): ReturnType<DirectoryProvider['backupCleanup']> {
        if (args[2] && !b3name) {
          // what vzdump's storage calls do from other processes before backup_cleanup(..., 1)
          const list = ok((await fresh(scratch, root, [['listBackups', { vmid: 100 }]]))[0]) as StoredBackup[];
          b3name = list.at(-1)!.volname;
          seen = await fresh(scratch, root, [
            ['listBackups', { vmid: 100 }],
            ['setNotes', b3name, 'vm100 from another process'],
            ['setProtected', b3name, true],
            ['getNotes', b3name],
            ['getProtected', b3name],
            ['prune', { vmid: 100, vmtype: 'qemu', keep: { keepLast: 1 }, dryRun: true }],
            ['listBackups', { vmid: 100 }],
            ['prune', { vmid: 100, vmtype: 'qemu', keep: { keepLast: 1 } }],
            ['removeBackup', b3name],
            ['removeBackup', b2.volname],
            ['listBackups', {}],
          ]);
        }
        return super.backupCleanup(...args);
      }
    }
    const provider = new HooksBeforeCleanup(context(root));
    await disk.write(0x54, 3 * MiB, 64 * KiB);
    const b3 = await backup(provider, disk, scratch);
    expect(b3.volname).toBe(b3name);
    const [list, notes, prot, getNotes, getProt, dry, afterDry, prune, removeProtected, removeBase, listAll] = seen;

    // listed: complete, with the fields Proxmox's list_volumes needs
    const l = ok(list) as StoredBackup[];
    expect(l.map((b) => b.volname)).toEqual([b0.volname, b1.volname, b2.volname, b3.volname]);
    for (const b of l) {
      expect(b).toMatchObject({ vmid: 100, vmtype: 'qemu' as GuestType, protected: false });
      expect(b.size).toBeGreaterThan(0);
      expect(Math.abs(b.ctime - Date.now() / 1000)).toBeLessThan(600);
    }
    expect(ok(notes)).toBeNull();
    expect(ok(prot)).toBeNull();
    expect(ok(getNotes)).toBe('vm100 from another process');
    expect(ok(getProt)).toBe(true);

    // the dry run decides without removing; the real prune removes what it marked
    const marks = (ok(dry) as { marks: Array<{ volname: string; mark: string; vmtype: string; vmid: number }>; removed?: string[] });
    expect(marks.removed).toBeUndefined();
    expect(marks.marks.map((m) => [m.volname, m.mark])).toEqual([
      [b3.volname, 'protected'],
      [b2.volname, 'keep'],
      [b1.volname, 'remove'],
      [b0.volname, 'remove'],
    ]);
    expect(marks.marks.every((m) => m.vmid === 100 && m.vmtype === 'qemu')).toBe(true);
    expect((ok(afterDry) as StoredBackup[]).length).toBe(4);
    expect((ok(prune) as { removed: string[] }).removed).toEqual([b1.volname, b0.volname]);

    // free_image: a protected backup is refused; the base of the new one is merged into it
    expect(removeProtected).toEqual({ error: expect.objectContaining({ code: 'ERR_BACKUP_PROTECTED' }) as unknown });
    expect(ok(removeBase)).toBeNull();
    expect((ok(listAll) as StoredBackup[]).map((b) => [b.volname, b.notes, b.protected])).toEqual([[b3.volname, 'vm100 from another process', true]]);

    // the job's end (backupCleanup, the log file) did not undo the merge another process made
    const store = await DirectoryStore.open(root);
    const m = await store.readManifest(b3.volname);
    expect(m.parent).toBeUndefined();
    expect(Object.keys(m.files)).toContain('backup.log');
    expect(await store.verifyBackup(b3.volname)).toMatchObject({ ok: true, problems: [] });
    await expectRestores(provider, b3.volname, b3.content, scratch);

    // and the chain goes on from it
    await disk.write(0x55, 0, 64 * KiB);
    const b4 = await backup(provider, disk, scratch);
    expect((await store.readManifest(b4.volname)).parent).toBe(b3.volname);
    await expectRestores(provider, b4.volname, b4.content, scratch);
  });

  it('the task log waits for a delete or prune of the guest (the merge rewrites the same manifest), then is added; a lock that stays taken refuses', async () => {
    const disk = await startDisk(4 * MiB);
    const scratch = await tempDir();
    const root = path.join(scratch, 'store');
    const seen: { whileHeld?: string[]; refused?: unknown } = {};
    class HeldAtLog extends DirectoryProvider {
      override async backupHandleLogFile(vmid: number, filename: string): Promise<void> {
        // a delete of another process holds the guest's lock while the job adds its log
        const held = await open(path.join(root, String(vmid), '.changing'), 'a');
        try {
          expect(native.tryLockFile(held.fd)).toBe(true);
          const adding = super.backupHandleLogFile(vmid, filename);
          await sleep(500);
          const store = await DirectoryStore.open(root);
          const [volname] = (await store.listBackups(vmid)).map((b) => b.volname);
          seen.whileHeld = Object.keys((await store.readManifest(volname!)).files);
          seen.refused = await store.amendManifest(volname!, async (m) => m, { waitMs: 200 }).catch((err: unknown) => err);
          await held.close();
          await adding;
        } finally {
          await held.close().catch(() => undefined);
        }
      }
    }
    await disk.write(0x41, 0, MiB);
    const b = await backup(new HeldAtLog(context(root)), disk, scratch);
    expect(seen.whileHeld).not.toContain('backup.log');
    expect(seen.refused).toMatchObject({ code: 'ERR_STORE_BUSY' });
    const store = await DirectoryStore.open(root);
    expect(Object.keys((await store.readManifest(b.volname)).files)).toContain('backup.log');
    expect(await store.verifyBackup(b.volname)).toMatchObject({ ok: true, problems: [] });
  });

  it("the job's prune while another process deletes or prunes the guest waits, then is skipped with a warning: the new backup stays (vzdump fails a guest whose prune dies)", async () => {
    const disk = await startDisk(4 * MiB);
    const scratch = await tempDir();
    const root = path.join(scratch, 'store');
    const warnings: string[] = [];
    // full backups: no chain keeps the older ones from a prune
    const provider = new DirectoryProvider({ ...context(root, { 'vm-backup-mode': 'full' }), log: (level, message) => void (level === 'warn' && warnings.push(message)) }, { guestLockWaitMs: 300 });
    await disk.write(0x51, 0, MiB);
    const first = await backup(provider, disk, scratch);
    await disk.write(0x52, MiB, 64 * KiB);
    const content = disk.snapshot();
    const held = await open(path.join(root, '100', '.changing'), 'a');
    let r: Awaited<ReturnType<typeof runBackupJob>>;
    try {
      expect(native.tryLockFile(held.fd)).toBe(true);
      r = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: scratch, prune: { keepLast: 1 } });
    } finally {
      await held.close();
    }
    expect(r.guests[0]!.error).toBeUndefined();
    expect(r.guests[0]!.status).toBe('ok');
    const second = r.guests[0]!.volname!;
    const store = await DirectoryStore.open(root);
    expect((await store.listBackups(100)).map((b) => [b.volname, b.status])).toEqual([[first.volname, 'ok'], [second, 'ok']]);
    expect(warnings.join('\n')).toMatch(/prune skipped: backups of guest 100 .* are being deleted or pruned by another process/);
    expect(warnings.join('\n')).toMatch(/the task log was not added to backup/);
    await expectRestores(provider, second, content, scratch);
    // the lock released, the next job's prune removes what this one skipped
    await disk.write(0x53, 2 * MiB, 64 * KiB);
    const third = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: scratch, prune: { keepLast: 1 } });
    expect(third.guests[0]!.status).toBe('ok');
    expect((await store.listBackups(100)).map((b) => b.volname)).toEqual([third.guests[0]!.volname]);
  });

  it.each([2, 1] as const)('API generation %i: backupCleanup(false) after a completed backup removes it (no longer listed) and the next backup is full', async (generation) => {
    const disk = await startDisk(4 * MiB);
    const scratch = await tempDir();
    const root = path.join(scratch, 'store');
    let during: Answer[] = [];
    let duringStatus: string[] = [];
    class FailsAtCleanup extends DirectoryProvider {
      fail = true;
      override async backupCleanup(...args: Parameters<DirectoryProvider['backupCleanup']>): ReturnType<DirectoryProvider['backupCleanup']> {
        if (args[2] && this.fail) {
          during = await fresh(scratch, root, [['listBackups', { vmid: 100 }]]);
          duringStatus = (await (await DirectoryStore.open(root)).listBackups(100)).map((b) => b.status);
          throw new Error('injected: backup_cleanup(..., 1) died'); // vzdump then calls backup_cleanup(..., 0)
        }
        return super.backupCleanup(...args);
      }
    }
    const inner = new FailsAtCleanup(context(root));
    const provider: BackupProvider = generation === 2 ? inner : new DirectoryProviderV1(context(root), {}, inner);
    inner.fail = false;
    await disk.write(0x61, 0, MiB);
    const first = await backup(provider, disk, scratch);
    inner.fail = true;
    await disk.write(0x62, MiB, 512 * KiB);
    const r = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: scratch });
    expect(r.guests[0]!.status).toBe('failed');
    const failed = r.guests[0]!.volname!;
    // complete on disk before backup_cleanup: another process saw it
    expect(duringStatus).toEqual(['ok', 'ok']);
    expect((ok(during[0]) as StoredBackup[]).map((b) => b.volname)).toEqual([first.volname, failed]);
    // after backupCleanup(false) nobody sees it, and nothing of it is left
    expect((ok((await fresh(scratch, root, [['listBackups', { vmid: 100 }]]))[0]) as StoredBackup[]).map((b) => b.volname)).toEqual([first.volname]);
    expect((await (await DirectoryStore.open(root)).listBackups(100)).map((b) => b.volname)).toEqual([first.volname]);
    // QEMU took it as a success and cleared its bitmap: the next backup may not build on the first
    inner.fail = false;
    await disk.write(0x63, 3 * MiB, 64 * KiB);
    const next = await backup(provider, disk, scratch);
    const store = await DirectoryStore.open(root);
    expect((await store.readManifest(next.volname)).mode).toBe('full');
    await expectRestores(provider, next.volname, next.content, scratch);
    await expectRestores(provider, first.volname, first.content, scratch);
  });

  it('a backup another process is writing is neither listed, nor pruned, nor removable, nor is its base; once done it is complete and exact', async () => {
    const disk = await startDisk(8 * MiB);
    const scratch = await tempDir();
    const root = path.join(scratch, 'store');
    const provider = new DirectoryProvider(context(root));
    await disk.write(0x71, 0, MiB);
    const b0 = await backup(provider, disk, scratch);
    await disk.write(0x72, MiB, 64 * KiB);
    const b1 = await backup(provider, disk, scratch);
    // the guest writes 6 MiB; the other process copies at 2 MiB/s
    await disk.write(0x73, 2 * MiB, 6 * MiB);
    const content = disk.snapshot();
    const job = `
import { DirectoryProvider, runBackupJob } from ${JSON.stringify(DIST)};
const [root, qmp, nbdServer, tmpdir] = process.argv.slice(2);
const provider = new DirectoryProvider({ storeid: 'dir1', scfg: { path: root }, log: () => {} });
const r = await runBackupJob({ provider, storeid: 'dir1', guests: [{ vmid: 100, type: 'qemu', qmp, nbdServer, devices: ['disk0'], config: 'name: vm100\\n' }], tmpdir, bandwidthLimit: 2 * 2 ** 20 });
process.stdout.write(JSON.stringify({ volname: r.guests[0].volname, error: r.guests[0].error?.message }));
`;
    const script = path.join(scratch, 'slow-backup.mjs');
    await writeFile(script, job);
    await disk.q.qmp.close(); // the monitor serves one client at a time: the other process's turn
    const child = spawn(process.execPath, [script, root, disk.q.qmpPath, disk.q.nbdPath!, scratch], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    const done = new Promise<number | null>((resolve) => child.on('exit', resolve));

    const store = await DirectoryStore.open(root);
    let running: string | undefined;
    for (let i = 0; i < 200 && !running; i++) {
      running = (await store.listBackups(100)).find((b) => b.status === 'in-progress')?.volname;
      if (!running) await sleep(25);
    }
    expect(running).toBeDefined();
    const answers = await fresh(scratch, root, [
      ['listBackups', { vmid: 100 }],
      ['listBackups', {}],
      ['prune', { vmid: 100, vmtype: 'qemu', keep: { keepLast: 1 } }],
      ['removeBackup', running],
      ['removeBackup', b1.volname],
      ['getNotes', running],
      ['setProtected', running, true],
    ]);
    // the store's own API (the CLI's) refuses the same
    await expect(store.deleteBackup(running!)).rejects.toMatchObject({ code: 'ERR_BACKUP_INCOMPLETE' });
    await expect(store.deleteBackup(b1.volname)).rejects.toMatchObject({ code: 'ERR_CHAIN_DELETE' });
    // still running when the checks ended: they saw the backup mid-copy
    expect((await store.listBackups(100)).find((b) => b.volname === running)?.status).toBe('in-progress');
    const [list, listAll, prune, removeRunning, removeBase, notes, protect] = answers;
    expect((ok(list) as StoredBackup[]).map((b) => b.volname)).toEqual([b0.volname, b1.volname]);
    expect((ok(listAll) as StoredBackup[]).map((b) => b.volname)).toEqual([b0.volname, b1.volname]);
    // keep-last 1: the running backup is not counted (it is not complete) nor touched, and the
    // backup it builds on stays, with what that builds on
    const p = ok(prune) as { removed: string[]; marks: Array<{ volname: string; mark: string }> };
    expect(p.marks.map((m) => m.volname)).not.toContain(running);
    expect(p.removed).toEqual([]);
    expect(removeRunning).toEqual({ error: expect.objectContaining({ code: 'ERR_BACKUP_INCOMPLETE' }) as unknown });
    expect(removeBase).toEqual({ error: expect.objectContaining({ code: 'ERR_CHAIN_DELETE', message: expect.stringContaining('running backup') as unknown }) as unknown });
    expect(notes).toEqual({ error: expect.objectContaining({ code: 'ERR_BACKUP_INCOMPLETE' }) as unknown });
    expect(protect).toEqual({ error: expect.objectContaining({ code: 'ERR_BACKUP_INCOMPLETE' }) as unknown });

    expect(await done).toBe(0);
    const r = JSON.parse(out) as { volname: string; error?: string };
    expect(r).toEqual({ volname: running });
    expect((await store.listBackups(100)).map((b) => [b.volname, b.status])).toEqual([
      [b0.volname, 'ok'],
      [b1.volname, 'ok'],
      [running, 'ok'],
    ]);
    expect((await store.readManifest(running!)).parent).toBe(b1.volname);
    await expectRestores(provider, running!, content, scratch);
  });

  it.each([2, 1] as const)("API generation %i: the job's own notes, protected flag and prune (in-process, vzdump's order) find the backup complete; a fresh process sees them", async (generation) => {
    const disk = await startDisk(4 * MiB);
    const scratch = await tempDir();
    const root = path.join(scratch, 'store');
    const provider: BackupProvider = generation === 2 ? new DirectoryProvider(context(root, { 'vm-backup-mode': 'full' })) : new DirectoryProviderV1(context(root, { 'vm-backup-mode': 'full' }));
    await disk.write(0x81, 0, MiB);
    const first = await backup(provider, disk, scratch);
    const second = await backup(provider, disk, scratch);
    await disk.write(0x82, MiB, 64 * KiB);
    const content = disk.snapshot();
    const r = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: scratch, notesTemplate: '{{guestname}} nightly', protected: true, prune: { keepLast: 1 } });
    expect(r.guests[0]).toMatchObject({ status: 'ok', warnings: [] });
    const volname = r.guests[0]!.volname!;
    expect(r.guests[0]!.log.join('\n')).toContain(`removing backup '${first.volname}'`);
    const [list] = await fresh(scratch, root, [['listBackups', {}]]);
    // protected backups do not count (Proxmox): keep-last 1 keeps the one before, removes the first
    expect(ok(list)).toEqual([
      expect.objectContaining({ volname: second.volname, protected: false }),
      expect.objectContaining({ volname, vmid: 100, vmtype: 'qemu', notes: 'vm100 nightly', protected: true }),
    ]);
    await expectRestores(provider, volname, content, scratch);
  });

  it('a backup folder whose lock is not written yet is being created (in progress) for a minute, then a leftover', async () => {
    const scratch = await tempDir();
    const root = path.join(scratch, 'store');
    const store = await DirectoryStore.create(root, { storeid: 'dir1' });
    const dir = path.join(root, '100', 'qemu-2026_11_30-10_00_00');
    await mkdir(dir, { recursive: true });
    // createBackupDir makes the folder, then writes its lock: a prune looking in between must not remove it
    expect((await store.listBackups(100)).map((b) => b.status)).toEqual(['in-progress']);
    expect(await store.pruneBackups({ vmid: 100, keep: { keepLast: 1 } })).toEqual([]);
    const old = new Date(Date.now() - 120_000);
    await utimes(dir, old, old);
    expect((await store.listBackups(100)).map((b) => b.status)).toEqual(['incomplete']);
    expect((await store.pruneBackups({ vmid: 100, keep: { keepLast: 1 } })).map((m) => m.mark)).toEqual(['remove']);
  });

  it('status: total, free and used of the store file system from a fresh object (no jobInit, the store created on first use), as df sees them', async () => {
    const scratch = await tempDir();
    const root = path.join(scratch, 'store');
    const [a] = await fresh(scratch, root, [['status']]);
    const s = ok(a) as { total: number; free: number; used: number };
    const [size, used, avail] = execFileSync('df', ['-B1', '--output=size,used,avail', root], { encoding: 'utf8' }).trim().split('\n')[1]!.trim().split(/\s+/).map(Number) as [number, number, number];
    expect(s.total).toBe(size);
    expect(s.total).toBeGreaterThan(0);
    expect(s.free).toBeGreaterThan(0);
    expect(s.used + s.free).toBeLessThanOrEqual(s.total);
    // other writers on the machine may move these a little between the two looks
    expect(Math.abs(s.used - used)).toBeLessThan(64 * MiB);
    expect(Math.abs(s.free - avail)).toBeLessThan(64 * MiB);
    // the folder became a store: a later backup finds it
    await expect(DirectoryStore.open(root)).resolves.toBeInstanceOf(DirectoryStore);
  });
});

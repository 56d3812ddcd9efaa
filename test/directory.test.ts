/**
 * DirectoryProvider end to end on qemu-storage-daemon, through the job runner and restore: a chain
 * of five backups (full + four incremental, guest writes between and during each) restores at
 * every point to exactly the content of that point, in both API generations; fallbacks to full.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import {
  DirectoryProvider,
  DirectoryProviderV1,
  DirectoryStore,
  runBackupJob,
  type BackupProvider,
} from '../lib/index.js';
import { expectRestores, startDisk, vmGuest } from './helpers/directory.js';
import { stopAll, tempDir } from './helpers/qemu.js';

const MiB = 2 ** 20;
const KiB = 1024;

afterEach(async () => {
  await stopAll();
});


/** A provider that lets the guest write while each disk is copied (after the point in time). */
function withWritesDuring<T extends typeof DirectoryProvider>(Base: T, during: () => Promise<void>): T {
  return class extends (Base as typeof DirectoryProvider) {
    protected override async backupDisk(...args: Parameters<DirectoryProvider['backupDisk']>): Promise<void> {
      const writes = during();
      try {
        await super.backupDisk(...args);
      } finally {
        await writes;
      }
    }
  } as unknown as T;
}

describe('DirectoryProvider: a chain of five', () => {
  it.each([2, 1] as const)('API generation %i: full + 4 incremental with writes between and during restore at every point exactly', async (generation) => {
    const disk = await startDisk(8 * MiB);
    const root = path.join(await tempDir(), 'store');
    const scratch = await tempDir();
    await disk.write(0x10, 0, 3 * MiB);
    await disk.write(0x11, 6 * MiB, MiB);
    let round = 0;
    const during = async (): Promise<void> => {
      // the guest keeps writing while the disk is copied: copy-before-write keeps the snapshot exact
      await disk.write(0x80 + round, (round * 1300 * KiB) % (7 * MiB), 200 * KiB);
    };
    const Cls = withWritesDuring(DirectoryProvider, during);
    const context = { storeid: 'dir1', scfg: { path: root }, log: () => {} };
    const v2 = new Cls(context);
    const provider: BackupProvider = generation === 2 ? v2 : new DirectoryProviderV1(context, {}, v2);
    const points: Array<{ volname: string; content: Buffer }> = [];
    for (round = 0; round < 5; round++) {
      if (round > 0) {
        // between: small and sub-cluster writes, somewhere else each time
        await disk.write(0x20 + round, round * MiB + 4 * KiB, 8 * KiB);
        await disk.write(0x30 + round, 5 * MiB + round * 64 * KiB, 192 * KiB);
      }
      const content = disk.snapshot();
      const r = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: scratch });
      expect(r.guests[0]!.error).toBeUndefined();
      points.push({ volname: r.guests[0]!.volname!, content });
    }
    const store = await DirectoryStore.open(root);
    const list = await store.listBackups(100);
    expect(list.map((b) => [b.volname, b.status, b.format, b.parent])).toEqual(
      points.map((p, i) => [p.volname, 'ok', 'qcow2', i === 0 ? undefined : `dir1:${points[i - 1]!.volname}`]),
    );
    for (const b of list.slice(1)) expect(b.size).toBeLessThan(list[0]!.size / 4); // increments hold only what changed
    const first = await store.readManifest(points[0]!.volname);
    expect(first).toMatchObject({ mode: 'full', vmtype: 'qemu', devices: { disk0: { size: 8 * MiB, file: 'disk0.qcow2' } } });
    expect(Object.keys(first.files).sort()).toEqual(['backup.log', 'disk0.qcow2', 'disk0.qcow2.digests', 'firewall.conf', 'guest.conf']);
    expect(await store.readManifest(points[4]!.volname)).toMatchObject({ mode: 'incremental', parent: points[3]!.volname, devices: { disk0: { bitmapMode: 'reuse', base: points[3]!.volname } } });
    expect(readFileSync(path.join(store.backupDir(points[2]!.volname), 'backup.log'), 'utf8')).toMatch(/dirty-bitmap status: OK/);
    for (const p of points) expect(await store.verifyBackup(p.volname)).toMatchObject({ ok: true, problems: [] });
    for (const p of points) await expectRestores(provider, p.volname, p.content, scratch);
    // and the disk moved on after the last backup
    expect(disk.content.equals(points[4]!.content)).toBe(false);
  });
});

describe('DirectoryProvider: falling back to a full backup', () => {
  it.each([2, 1] as const)('API generation %i: when the previous backup is gone, and when QEMU lost the bitmap', async (generation) => {
    const disk = await startDisk(4 * MiB);
    const root = path.join(await tempDir(), 'store');
    const scratch = await tempDir();
    const context = { storeid: 'dir1', scfg: { path: root }, log: () => {} };
    const provider: BackupProvider = generation === 2 ? new DirectoryProvider(context) : new DirectoryProviderV1(context);
    const run = async (): Promise<{ volname: string; content: Buffer }> => {
      const content = disk.snapshot();
      const r = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: scratch });
      expect(r.guests[0]!.error).toBeUndefined();
      return { volname: r.guests[0]!.volname!, content };
    };
    await disk.write(0x41, 0, MiB);
    const a = await run();
    await disk.write(0x42, MiB, 64 * KiB);
    const b = await run();
    const store = await DirectoryStore.open(root);
    expect((await store.readManifest(b.volname)).mode).toBe('incremental');
    // the previous backup is deleted: the next one is full although QEMU still has its bitmap
    await store.deleteBackup(b.volname);
    await disk.write(0x43, 2 * MiB, 64 * KiB);
    const c = await run();
    expect(await store.readManifest(c.volname)).toMatchObject({ mode: 'full', devices: { disk0: { bitmapMode: 'new' } } });
    // QEMU lost the bitmap (e.g. the VM restarted): QEMU answers new, a full image is written
    const nodes = await disk.q.qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string }> }>>('query-named-block-nodes', { flat: true });
    for (const n of nodes) for (const bm of n['dirty-bitmaps'] ?? []) await disk.q.qmp.execute('block-dirty-bitmap-remove', { node: n['node-name'], name: bm.name });
    await disk.write(0x44, 3 * MiB, 64 * KiB);
    const d = await run();
    expect((await store.readManifest(d.volname)).mode).toBe('full');
    await disk.write(0x45, 0, 64 * KiB);
    const e = await run();
    expect((await store.readManifest(e.volname)).parent).toBe(d.volname);
    for (const p of [a, c, d, e]) await expectRestores(provider, p.volname, p.content, scratch);
  });

  it('vm-backup-mode full writes full images every time', async () => {
    const disk = await startDisk(4 * MiB);
    const root = path.join(await tempDir(), 'store');
    const provider = new DirectoryProvider({ storeid: 'dir1', scfg: { path: root, 'vm-backup-mode': 'full' }, log: () => {} });
    await disk.write(0x51, 0, MiB);
    for (let i = 0; i < 2; i++) {
      const r = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: root });
      expect(r.guests[0]!.error).toBeUndefined();
    }
    const list = await (await DirectoryStore.open(root)).listBackups();
    expect(list.map((b) => b.parent)).toEqual([undefined, undefined]);
  });
});

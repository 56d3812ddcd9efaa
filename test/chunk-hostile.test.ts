/**
 * The chunk store under hostile conditions, from an operator's side, against a real distributed
 * S3 store (Garage, three nodes) and real qemu-storage-daemon disks. Each test is a way a backup
 * was lost or restored wrong without an error: a backup a garbage collection took for dead
 * completing when it woke up (its heartbeat wrote its removed record back); two hosts sharing a
 * store naming two backups alike in the same second; two first backups with different keys each
 * creating `store.json`; a damaged fossil copied over a sound chunk; a damaged chunk taken as
 * present by every later backup; a guest backed up on another host (QEMU's bitmap migrates with
 * it, the host's ledger does not).
 */
import { readFile, rm } from 'node:fs/promises';
import path from 'node:path';

import { afterEach, describe, expect, it, vi } from 'vitest';

import { collectGarbage } from '../lib/chunk-provider/gc.js';
import { ChunkProvider } from '../lib/chunk-provider/provider.js';
import { createKeyFile, readKeyFile } from '../lib/chunk-provider/key.js';
import { ChunkStore, chunkKey, STORE_JSON, WRITER_HEARTBEAT_MS } from '../lib/chunk-provider/store.js';
import { verifyChunkStore } from '../lib/chunk-provider/verify.js';
import { restoreVm, runBackupJob } from '../lib/index.js';
import { startDisk, vmGuest, type Disk } from './helpers/directory.js';
import { expectSameBytes } from './helpers/images.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { listedNow, useS3Cluster } from './helpers/use-s3-cluster.js';

const MiB = 2 ** 20;
/** S3 times have whole seconds: a chunk is older than a run only in an earlier second. */
const nextSecond = (): Promise<void> => new Promise((r) => setTimeout(r, 1100));

describe('chunk store, hostile runs (Garage, 3 nodes)', { timeout: 300_000 }, () => {
  const garage = useS3Cluster('hostile');
  afterEach(async () => {
    vi.useRealTimers();
    await stopAll();
  });

  const provider = (store: ChunkStore, stateDir: string, onProgress?: (p: { done: number }) => void, now?: () => Date): ChunkProvider =>
    new ChunkProvider({ storeid: 'chunks', scfg: {}, log: () => undefined }, { store, stateDir, ...(onProgress ? { onProgress } : {}), ...(now ? { now } : {}) });

  async function backup(p: ChunkProvider, disk: Disk, scratch: string, bandwidthLimit?: number): Promise<{ volname?: string; error?: { code?: string }; content: Buffer }> {
    const content = disk.snapshot();
    const r = await runBackupJob({ provider: p, storeid: 'chunks', guests: [vmGuest(disk)], tmpdir: scratch, ...(bandwidthLimit ? { bandwidthLimit } : {}) }).catch(
      (e: { result?: Awaited<ReturnType<typeof runBackupJob>> }) => e.result!,
    );
    const g = r.guests[0]!;
    return { ...(g.volname ? { volname: g.volname } : {}), ...(g.error ? { error: g.error as { code?: string } } : {}), content };
  }

  it('a backup taken for dead (its record stale, removed) whose heartbeat comes back later fails with ERR_WRITER_EXPIRED, not as a backup naming deleted chunks', async () => {
    // The scenario: an incremental backup is paused (host suspended, network cut, process
    // stopped) for longer than the 15 minutes a writer record lives without a heartbeat. Two
    // collections run meanwhile: the first takes the backup for dead (its record removed),
    // and with the previous backup pruned, moves the chunks the backup took from the previous
    // index aside; the second deletes them. Then the backup wakes up: its heartbeat timer fires
    // first. It must not write its record back and complete: its index names deleted chunks.
    const disk = await startDisk(32 * MiB);
    for (let i = 0; i < 8; i++) await disk.write(0x40 + i, i * 4 * MiB, 4 * MiB);
    const scratch = await tempDir();
    const store = await ChunkStore.open(garage.fresh());
    const first = await backup(provider(store, scratch), disk, scratch);
    expect(first.error).toBeUndefined();
    await disk.write(0x99, 0, 16 * MiB); // four chunks change: the incremental reads 16 MiB, at 1 MiB/s
    await nextSecond();

    // only the heartbeat's timer is faked: the test decides when the backup "wakes up"
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval'] });
    let paused: Promise<void> | undefined;
    const whilePaused = async (): Promise<void> => {
      await store.deleteBackup(first.volname!); // pruned: nothing else names its chunks
      const run1 = await collectGarbage(store, { cutoffMarginSeconds: 0, staleAfterSeconds: -1 });
      expect(run1.staleWriters).toHaveLength(1);
      expect(run1.fossilized.chunks).toBeGreaterThan(0);
      const run2 = await collectGarbage(store, { cutoffMarginSeconds: 0, staleAfterSeconds: -1 });
      expect(run2.finalized[0]!.deleted).toBeGreaterThan(0);
      // the backup wakes up: its overdue heartbeat fires before anything else
      vi.advanceTimersByTime(WRITER_HEARTBEAT_MS);
      await new Promise((r) => setTimeout(r, 1000));
    };
    const second = await backup(
      provider(store, scratch, () => void (paused ??= whilePaused())),
      disk,
      scratch,
      1 * MiB,
    );
    await paused;
    vi.useRealTimers();

    if (second.error === undefined) {
      // what main did: a backup listed as complete whose unchanged chunks are gone
      const target = path.join(scratch, 'second.raw');
      const restored = await restoreVm({ provider: provider(store, scratch), volname: second.volname!, storeid: 'chunks', targets: { disk0: target } })
        .then(async () => expectSameBytes(await readFile(target), second.content, 'second'))
        .catch((e: Error) => e);
      await rm(target, { force: true });
      expect.fail(`the backup completed although a collection took it for dead; its restore: ${restored instanceof Error ? restored.message : 'byte-exact'}`);
    }
    expect(second.error).toMatchObject({ code: 'ERR_WRITER_EXPIRED' });
    expect(await store.listBackups()).toEqual([]);
    expect(await listedNow(store.objects, 'writers/')).toEqual([]);
  });

  it('a writer whose heartbeats did not reach the store for 15 minutes (host asleep, store out of reach) takes itself for dead, whether or not a collection did', async () => {
    const store = await ChunkStore.open(garage.fresh());
    await store.ensureCreated();
    const { writer } = await store.startBackup(100, 'qemu', new Date());
    await writer.assertAlive();
    // only the wall clock is faked: it jumps as it does when a suspended host wakes up
    vi.useFakeTimers({ toFake: ['Date'] });
    vi.setSystemTime(Date.now() + 15 * 60_000);
    await expect(writer.assertAlive()).rejects.toMatchObject({ code: 'ERR_WRITER_EXPIRED', message: expect.stringMatching(/no heartbeat reached the store for 900 s/) });
    vi.useRealTimers();
    await expect(writer.assertAlive()).rejects.toMatchObject({ code: 'ERR_WRITER_EXPIRED' }); // for good
    await writer.end();
    expect(await listedNow(store.objects, 'writers/')).toEqual([]);
  });

  it('two hosts sharing a store back up a guest of the same id in the same second: two backups, each restoring its own disk', async () => {
    // Two clusters (or a cluster and the command line) given the same bucket and prefix: VM 100
    // is the first id of every cluster, and schedules fire on the minute. The name of a backup
    // is chosen from a listing of backups/100/, and its folder gets its first object only
    // after QEMU is set up: two backups starting in the same second must not share it.
    const disks = await Promise.all([startDisk(16 * MiB), startDisk(16 * MiB)]);
    for (const [h, d] of disks.entries()) for (let i = 0; i < 4; i++) await d.write(0x10 * (h + 1) + i, i * 4 * MiB, 4 * MiB);
    const store = await ChunkStore.open(garage.fresh());
    await store.ensureCreated();
    const at = new Date();
    const hosts = await Promise.all([tempDir(), tempDir()]);
    const runs = await Promise.all(disks.map((d, h) => backup(provider(store, hosts[h]!, undefined, () => at), d, hosts[h]!)));
    for (const r of runs) expect(r.error).toBeUndefined();
    for (const [h, r] of runs.entries()) {
      const target = path.join(hosts[h]!, 'restored.raw');
      await restoreVm({ provider: provider(store, hosts[h]!), volname: r.volname!, storeid: 'chunks', targets: { disk0: target } });
      expectSameBytes(await readFile(target), r.content, `host ${h}: ${r.volname}`);
      await rm(target, { force: true });
    }
    expect(new Set(runs.map((r) => r.volname)).size).toBe(2);
  });

  it('two first backups with different keys: neither replaces the store.json the other created; one that lost the race fails, not at its restore', async () => {
    const dir = await tempDir();
    const [keyA, keyB] = [path.join(dir, 'a.key'), path.join(dir, 'b.key')];
    await createKeyFile(keyA);
    await createKeyFile(keyB);
    const o = garage.fresh();
    // both opened before either created the store (two hosts' first jobs)
    const a = await ChunkStore.open({ ...o, keyFile: keyA });
    const b = await ChunkStore.open({ ...o, keyFile: keyB });
    await a.ensureCreated();
    await expect(b.ensureCreated()).rejects.toMatchObject({ code: 'ERR_KEY_MISMATCH' });
    expect(JSON.parse((await a.objects.get(STORE_JSON))!.toString('utf8'))).toMatchObject({ encryption: { fingerprint: a.fingerprint } });

    // the race S3 cannot prevent: each read back its own store.json before the other's landed;
    // B's lands while A's backup runs
    const disk = await startDisk(8 * MiB);
    await disk.write(0x5a, 0, 8 * MiB);
    const bDescriptor = JSON.stringify({ format: 'pve-backup-provider/chunks', version: 1, chunkSize: 4 * MiB, created: 0, encryption: { cipher: 'aes-256-gcm', fingerprint: (await readKeyFile(keyB)).fingerprint } });
    let replaced: Promise<void> | undefined;
    const r = await backup(
      provider(a, dir, () => void (replaced ??= a.objects.put(STORE_JSON, Buffer.from(bDescriptor)))),
      disk,
      dir,
      4 * MiB,
    );
    await replaced;
    expect(r.error).toMatchObject({ code: 'ERR_KEY_MISMATCH' });
    expect(await a.listBackups()).toEqual([]);
  });

  it('a damaged fossil of a chunk stored again meanwhile is never copied over the sound chunk when a collection brings it back', async () => {
    const disk = await startDisk(8 * MiB);
    await disk.write(0x61, 0, 8 * MiB);
    const scratch = await tempDir();
    const store = await ChunkStore.open(garage.fresh());
    const first = await backup(provider(store, scratch), disk, scratch);
    const digests = (await store.readFixedIndex(await store.readManifest(first.volname!), 'disk0')).digests;
    await store.deleteBackup(first.volname!);
    await nextSecond();
    const run1 = await collectGarbage(store, { cutoffMarginSeconds: 0 });
    expect(run1.fossilized.chunks).toBe(1); // both 4 MiB halves are the same chunk
    // the next backup of the same content does not see the fossil: it stores the chunk again
    const again = await backup(provider(store, await tempDir()), disk, scratch);
    expect(await store.objects.head(chunkKey(digests[0]!))).not.toBeNull();
    // the fossil rots (a damaged disk of a storage node, a stray write)
    const [fossil] = await store.objects.list('fossils/');
    const bytes = (await store.objects.get(fossil!.key))!;
    bytes[bytes.length - 1]! ^= 0xff;
    await store.objects.put(fossil!.key, bytes);

    const run2 = await collectGarbage(store, { cutoffMarginSeconds: 0 });
    expect(run2.finalized).toMatchObject([{ collection: run1.fossilized.collection, deleted: 0 }]);
    expect(await listedNow(store.objects, 'fossils/')).toEqual([]);
    expect((await verifyChunkStore(store)).map((r) => r.ok)).toEqual([true]);
    const target = path.join(scratch, 'again.raw');
    await restoreVm({ provider: provider(store, scratch), volname: again.volname!, storeid: 'chunks', targets: { disk0: target } });
    expectSameBytes(await readFile(target), again.content, 'again');
  });

  it('a damaged chunk that verify found is stored again by the next backup (not taken as present), which restores byte-exact, and so does the older one', async () => {
    const disk = await startDisk(16 * MiB);
    for (let i = 0; i < 4; i++) await disk.write(0x70 + i, i * 4 * MiB, 4 * MiB);
    const scratch = await tempDir();
    const store = await ChunkStore.open(garage.fresh());
    const first = await backup(provider(store, scratch), disk, scratch);
    const digests = (await store.readFixedIndex(await store.readManifest(first.volname!), 'disk0')).digests;
    const victim = chunkKey(digests[2]!);
    const object = (await store.objects.get(victim))!;
    object[object.length - 1]! ^= 0x01; // bit rot on a storage node
    await store.objects.put(victim, object);
    const [found] = await verifyChunkStore(store);
    expect(found!.problems.join('\n')).toContain(`chunk ${store}/${victim} is corrupt`);

    // the operator does what the failed verify asks for: another backup (the failed one is no
    // base: every chunk is read)
    await disk.write(0x11, 0, 64 * 1024);
    const next = await backup(provider(store, scratch), disk, scratch);
    expect(next.error).toBeUndefined();
    const restore = async (volname: string, content: Buffer): Promise<void> => {
      const target = path.join(scratch, 'restored.raw');
      await rm(target, { force: true });
      await restoreVm({ provider: provider(store, scratch), volname, storeid: 'chunks', targets: { disk0: target } });
      expectSameBytes(await readFile(target), content, volname);
      await rm(target, { force: true });
    };
    await restore(next.volname!, next.content);
    await restore(first.volname!, first.content); // its chunk is sound again
    expect((await verifyChunkStore(store)).map((r) => r.ok)).toEqual([true, true]);
  });

  it('a guest backed up from another host meanwhile (live migration carries QEMU\'s bitmap): the next backup on the first host is not incremental over its own older backup', async () => {
    // QEMU migrates named dirty bitmaps (qemu-server enables the dirty-bitmaps capability when
    // pve-qemu reports pbs-dirty-bitmap-migration: QemuMigrate/Helpers.pm), so the bitmap
    // `snapshot-access:<storeid>` goes with the guest; each host's ledger stays behind. Here one
    // qemu-storage-daemon is the guest, and two state folders are the two hosts.
    const disk = await startDisk(16 * MiB);
    for (let i = 0; i < 4; i++) await disk.write(0x30 + i, i * 4 * MiB, 4 * MiB);
    const store = await ChunkStore.open(garage.fresh());
    const [hostA, hostB] = await Promise.all([tempDir(), tempDir()]);
    const p1 = await backup(provider(store, hostA), disk, hostA); // on A
    await disk.write(0x41, 0, 4 * MiB);
    const p2 = await backup(provider(store, hostB), disk, hostB); // migrated to B: a full backup there; the bitmap now counts since p2
    expect(p2.error).toBeUndefined();
    await disk.write(0x42, 4 * MiB, 4 * MiB);
    const p3 = await backup(provider(store, hostA), disk, hostA); // migrated back to A
    expect(p3.error).toBeUndefined();
    const target = path.join(hostA, 'p3.raw');
    await restoreVm({ provider: provider(store, hostA), volname: p3.volname!, storeid: 'chunks', targets: { disk0: target } });
    expectSameBytes(await readFile(target), p3.content, `${p3.volname} (after ${p1.volname} on A, ${p2.volname} on B)`);
  });
});

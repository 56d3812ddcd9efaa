/**
 * Garbage collection of the chunk store (docs/chunk-store.md, "Garbage collection") against a
 * real distributed S3 store (Garage, three nodes, replication factor 3) and real backups of
 * qemu-storage-daemon disks through the job runner: unused chunks become fossils and are
 * deleted one run later; a backup that found a chunk by its existence just before the chunk
 * became a fossil restores byte-exact (from the fossil) and the next run brings the chunk back,
 * and the guest's next backup, with fossils among its previous index's chunks, is a full one;
 * collections, prunes and backups of three guests (two of them clones) running at once leave
 * every finished backup restorable byte-exact; a failed backup's folder goes once it is not
 * running; a collected writer record fails its backup; a damaged index stops a run before it
 * moves anything; one run at a time; the command line.
 */
import { spawnSync } from 'node:child_process';
import { readFile, rm } from 'node:fs/promises';
import path from 'node:path';

import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { collectGarbage, type GcReport } from '../lib/chunk-provider/gc.js';
import { ChunkProvider } from '../lib/chunk-provider/provider.js';
import { ChunkStore, chunkKey } from '../lib/chunk-provider/store.js';
import { verifyChunkStore } from '../lib/chunk-provider/verify.js';
import { DirectoryStore } from '../lib/directory-provider/store.js';
import { restoreVm, runBackupJob } from '../lib/index.js';
import { startDisk, vmGuest, type Disk } from './helpers/directory.js';
import { expectSameBytes } from './helpers/images.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { listedNow, useS3Cluster } from './helpers/use-s3-cluster.js';

const MiB = 2 ** 20;
const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');
/** S3 times have whole seconds: a chunk is older than a run only in an earlier second. */
const nextSecond = (): Promise<void> => new Promise((r) => setTimeout(r, 1100));

describe('chunk store garbage collection (Garage, 3 nodes)', { timeout: 300_000 }, () => {
  const garage = useS3Cluster('gc');
  const fresh = garage.fresh;
  /** Tests make fossils of chunks seconds old; the default margin (10 minutes) is for writers' clocks. */
  const gc = (store: ChunkStore, o: { dryRun?: boolean } = {}): Promise<GcReport> => collectGarbage(store, { cutoffMarginSeconds: 0, ...o });

  beforeAll(async () => {
  }, 120_000);
  afterEach(async () => {
    await stopAll();
  });
  afterAll(async () => {
  });

  const provider = (store: ChunkStore, stateDir: string, o: { onProgress?: (p: { done: number }) => void; log?: (l: string, m: string) => void } = {}): ChunkProvider =>
    new ChunkProvider({ storeid: 'chunks', scfg: {}, log: o.log ?? (() => {}) }, { store, stateDir, ...(o.onProgress ? { onProgress: o.onProgress } : {}) });

  async function backup(p: ChunkProvider, disk: Disk, scratch: string, vmid = 100, bandwidthLimit?: number): Promise<{ volname: string; content: Buffer }> {
    const content = disk.snapshot();
    const r = await runBackupJob({ provider: p, storeid: 'chunks', guests: [vmGuest(disk, vmid)], tmpdir: scratch, ...(bandwidthLimit ? { bandwidthLimit } : {}) });
    expect(r.guests[0]!.error).toBeUndefined();
    return { volname: r.guests[0]!.volname!, content };
  }

  async function expectRestores(p: ChunkProvider, volname: string, expected: Buffer, scratch: string): Promise<void> {
    const target = path.join(scratch, `${volname.replace(/\//g, '_')}.raw`);
    await rm(target, { force: true });
    await restoreVm({ provider: p, volname, storeid: 'chunks', targets: { disk0: target } });
    expectSameBytes(await readFile(target), expected, volname);
    await rm(target, { force: true });
  }

  const keys = async (store: ChunkStore, prefix: string): Promise<string[]> => (await listedNow(store.objects, prefix)).map((o) => o.key).sort();

  it('moves unused chunks aside, deletes them one run later, never touches a chunk a backup names; --dry-run changes nothing', async () => {
    const disk = await startDisk(16 * MiB);
    for (let i = 0; i < 4; i++) await disk.write(0x10 + i, i * 4 * MiB, 4 * MiB);
    const scratch = await tempDir();
    const store = await ChunkStore.open(fresh());
    const p = provider(store, scratch);
    const first = await backup(p, disk, scratch);
    await disk.write(0x77, 0, 4 * MiB); // chunk 0 changes
    const second = await backup(p, disk, scratch);
    await store.deleteBackup(first.volname); // its chunk 0 is named by nothing now
    expect(await keys(store, 'chunks/')).toHaveLength(5);
    // a verdict beside a manifest (verify.json) is neither an index nor garbage
    expect((await verifyChunkStore(store)).map((r) => r.ok)).toEqual([true]);
    await nextSecond();

    const dry = await gc(store, { dryRun: true });
    expect(dry).toMatchObject({ dryRun: true, indexes: 1, chunksMarked: 4, chunks: 5, fossilized: { collection: null, chunks: 1, bytes: expect.any(Number) } });
    expect(await keys(store, 'chunks/')).toHaveLength(5);
    expect(await keys(store, 'fossils/')).toEqual([]);

    const run1 = await gc(store);
    expect(run1).toMatchObject({ dryRun: false, chunksMarked: 4, chunks: 5, fossilized: { chunks: 1 }, finalized: [], pending: [] });
    expect(await keys(store, 'chunks/')).toHaveLength(4);
    const fossils = await keys(store, 'fossils/');
    expect(fossils).toHaveLength(1);
    expect(fossils[0]).toMatch(new RegExp(`^fossils/[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}\\.${run1.fossilized.collection}$`));
    expect(await keys(store, 'gc/')).toEqual([`gc/${run1.fossilized.collection}.json`]); // no running.json left
    await expectRestores(p, second.volname, second.content, scratch);

    const run2 = await gc(store);
    expect(run2.finalized).toEqual([{ collection: run1.fossilized.collection, restored: 0, deleted: 1, bytes: run1.fossilized.bytes }]);
    expect(run2.fossilized.chunks).toBe(0);
    expect(await keys(store, 'fossils/')).toEqual([]);
    expect(await keys(store, 'gc/')).toEqual([]);
    expect(await keys(store, 'chunks/')).toHaveLength(4);
    await expectRestores(p, second.volname, second.content, scratch);
    expect(await store.readVerifyState(second.volname)).toMatchObject({ state: 'ok' });

    // the last backup gone: two runs empty the store; a verdict a verify wrote after the delete
    // (it raced it) is a folder without a manifest, removed
    await store.deleteBackup(second.volname);
    await store.writeVerifyState(second.volname, { state: 'ok', time: 0, missing: 0, bad: 0 });
    await nextSecond();
    await gc(store);
    await gc(store);
    expect(await keys(store, 'chunks/')).toEqual([]);
    expect(await keys(store, 'fossils/')).toEqual([]);
    expect(await keys(store, 'backups/')).toEqual([]);
  });

  it('a backup that found chunks by their existence just before they became fossils restores byte-exact; the next run brings them back', async () => {
    const disk = await startDisk(32 * MiB);
    for (let i = 0; i < 8; i++) await disk.write(0x40 + i, i * 4 * MiB, 4 * MiB);
    const scratch = await tempDir();
    const store = await ChunkStore.open(fresh());
    const old = await backup(provider(store, scratch), disk, scratch, 100);
    await store.deleteBackup(old.volname); // its 8 chunks are named by nothing
    await nextSecond();

    // guest 200, a clone of the same disk: a full backup that finds each chunk stored (HEAD) and
    // uploads nothing, slowed down; half-way a collection moves every chunk aside
    let collecting: Promise<GcReport> | undefined;
    // (early and slow enough that the run moves chunks while the backup reads, even on a busy machine)
    const p = provider(store, scratch, { onProgress: (x) => void (x.done >= 4 * MiB && (collecting ??= gc(store))) });
    const clone = await backup(p, disk, scratch, 200, 4 * MiB);
    const run1 = await collecting!;
    expect(run1).toMatchObject({ chunksMarked: 0, fossilized: { chunks: 8 } });
    const m = await store.readManifest(clone.volname);
    // some chunks were taken by their existence before the move, the rest uploaded again after it
    expect(m.devices!['disk0']!.chunksReused).toBeGreaterThan(0);
    expect(m.devices!['disk0']!.chunksUploaded).toBeGreaterThan(0);
    expect((await keys(store, 'chunks/')).length).toBe(m.devices!['disk0']!.chunksUploaded);
    // what the backup took by existence is only a fossil now: restore reads it from there
    await expectRestores(p, clone.volname, clone.content, scratch);

    // the next backup of the clone, while chunks its index names are fossils: the check of the
    // previous index (one listing of fossils/) finds them, so it is not incremental over it:
    // every chunk is read and the fossils' content is in chunks/ again, a key no collection
    // deletes in its second step
    const lines: string[] = [];
    await disk.write(0x99, 0, 64 * 1024);
    const incr = await backup(provider(store, scratch, { log: (_l, m) => lines.push(m) }), disk, scratch, 200);
    const mi = await store.readManifest(incr.volname);
    expect(mi.devices!['disk0']).toMatchObject({ bitmapMode: 'new', bytesRead: 32 * MiB });
    expect(mi.devices!['disk0']!.previous).toBeUndefined();
    expect(lines.join('\n')).toMatch(new RegExp(`\\d chunk\\(s\\) of ${clone.volname} were moved aside by a garbage collection \\(first: chunks/.*: full backup`));
    const named = (await store.readFixedIndex(mi, 'disk0')).digests;
    for (const d of named) expect(await store.objects.head(chunkKey(d)), chunkKey(d)).not.toBeNull();
    await expectRestores(p, incr.volname, incr.content, scratch);

    const run2 = await gc(store);
    expect(run2.finalized).toEqual([{ collection: run1.fossilized.collection, restored: 8, deleted: 0, bytes: 0 }]);
    expect(await keys(store, 'fossils/')).toEqual([]);
    expect(await keys(store, 'chunks/')).toHaveLength(9);
    await expectRestores(p, clone.volname, clone.content, scratch);
    await expectRestores(p, incr.volname, incr.content, scratch);
  });

  it('collections, prunes and backups of three guests running at once: every backup that finishes restores byte-exact', async () => {
    const disks = await Promise.all([startDisk(32 * MiB), startDisk(32 * MiB), startDisk(32 * MiB)]);
    // 101 and 102 are clones of one image; 100 is its own
    for (let i = 0; i < 8; i++) {
      await disks[0]!.write(0x80 + i, i * 4 * MiB, 4 * MiB);
      for (const d of disks.slice(1)) await d.write(0xa0 + i, i * 4 * MiB, 4 * MiB);
    }
    const scratch = await tempDir();
    const store = await ChunkStore.open(fresh());
    const finished: Array<{ volname: string; content: Buffer }> = [];
    let runs = 0;
    for (let round = 0; round < 4; round++) {
      // each guest writes ~10% (one chunk, not the same in every guest)
      for (const [g, d] of disks.entries()) await d.write(0x10 * round + g + 1, ((round + g) % 8) * 4 * MiB, 4 * MiB);
      let busy = true;
      // one provider per job, as Proxmox VE makes them
      const jobs = Promise.all(disks.map((d, g) => backup(provider(store, scratch), d, scratch, 100 + g, 12 * MiB))).finally(() => (busy = false));
      const collector = (async () => {
        while (busy) {
          await gc(store);
          runs++;
          // the previous backups go while the new ones read their indexes
          await store.pruneBackups({ keep: { keepLast: 1 } });
        }
      })();
      finished.push(...(await jobs));
      await collector;
      await nextSecond();
    }
    expect(runs).toBeGreaterThan(4);
    await gc(store);
    await gc(store);
    const kept = (await store.listBackups()).map((b) => b.volname);
    expect(kept.length).toBeGreaterThanOrEqual(3);
    for (const b of finished.filter((f) => kept.includes(f.volname))) await expectRestores(provider(store, scratch), b.volname, b.content, scratch);
    // two runs after the last backup: nothing a backup names is a fossil, nothing else is stored
    await gc(store);
    expect(await keys(store, 'fossils/')).toEqual([]);
    const named = new Set<string>();
    for (const v of kept) {
      const m = await store.readManifest(v);
      for (const d of (await store.readFixedIndex(m, 'disk0')).digests) if (!d.equals(Buffer.alloc(32))) named.add(d.toString('hex'));
    }
    expect((await keys(store, 'chunks/')).map((k) => k.slice(k.lastIndexOf('/') + 1)).sort()).toEqual([...named].sort());
  });

  it('removes a folder without manifest once its backup is not running (failed, or dead: its record stale), not before', async () => {
    const store = await ChunkStore.open(fresh());
    await store.ensureCreated();
    const { volname, writer } = await store.startBackup(100, 'qemu', new Date());
    await store.objects.put(store.objectKey(volname, 'guest.conf.blob'), Buffer.from('written first')); // no manifest yet
    const r1 = await gc(store);
    expect(r1.removedBackups).toEqual([]);
    expect(await keys(store, 'backups/')).toHaveLength(1);
    await writer.end(); // it ended without its manifest
    const r2 = await gc(store);
    expect(r2.removedBackups).toEqual([volname]);
    expect(await keys(store, 'backups/')).toEqual([]);

    // a backup that died (its record no longer rewritten): its record and folder go
    const dead = await store.startBackup(101, 'qemu', new Date());
    await store.objects.put(store.objectKey(dead.volname, 'guest.conf.blob'), Buffer.from('written first'));
    await dead.writer.end();
    await store.objects.put(dead.writer.key, Buffer.from(JSON.stringify(dead.writer.record))); // as it was when its process died
    await nextSecond();
    expect((await gc(store)).removedBackups).toEqual([]); // fresh: alive as far as anyone can tell
    const r3 = await collectGarbage(store, { cutoffMarginSeconds: 0, staleAfterSeconds: 0 });
    expect(r3).toMatchObject({ staleWriters: [dead.writer.key], removedBackups: [dead.volname] });
    expect(await keys(store, 'writers/')).toEqual([]);
    expect(await keys(store, 'backups/')).toEqual([]);
  });

  it('a backup whose writer record a collection removed fails with ERR_WRITER_EXPIRED and leaves no manifest', async () => {
    const disk = await startDisk(8 * MiB);
    await disk.write(0x21, 0, 8 * MiB);
    const scratch = await tempDir();
    const store = await ChunkStore.open(fresh());
    let removed: Promise<void> | undefined;
    const p = provider(store, scratch, { onProgress: () => void (removed ??= store.objects.list('writers/').then(async (w) => void (await Promise.all(w.map((o) => store.objects.delete(o.key)))))) });
    const r = await runBackupJob({ provider: p, storeid: 'chunks', guests: [vmGuest(disk)], tmpdir: scratch, bandwidthLimit: 4 * MiB }).catch((e: { result?: unknown }) => e.result as Awaited<ReturnType<typeof runBackupJob>>);
    await removed;
    expect(r.guests[0]!.error).toMatchObject({ code: 'ERR_WRITER_EXPIRED' });
    expect(await store.listBackups()).toEqual([]);
    expect((await keys(store, 'backups/')).filter((k) => k.endsWith('manifest.json'))).toEqual([]);
  });

  it('a damaged index stops a run before anything moves; one run at a time', async () => {
    const disk = await startDisk(8 * MiB);
    await disk.write(0x31, 0, 8 * MiB);
    const scratch = await tempDir();
    const store = await ChunkStore.open(fresh());
    const b = await backup(provider(store, scratch), disk, scratch);
    await store.objects.put('chunks/00/00/' + '00'.repeat(32), Buffer.from('unused')); // garbage
    await store.objects.put(store.objectKey(b.volname, 'disk0.fidx'), Buffer.from('not an index'));
    await nextSecond();
    const err = (await gc(store).catch((e: unknown) => e)) as { code?: string; message?: string };
    expect(err.code).toBe('ERR_BACKUP_CORRUPT');
    expect(err.message).toContain('disk0.fidx');
    expect(await keys(store, 'fossils/')).toEqual([]);
    expect(await keys(store, 'chunks/')).toHaveLength(2);
    expect(await keys(store, 'gc/')).toEqual([]); // the run let go

    await store.objects.put('gc/running.json', Buffer.from('{"host":"other"}\n'));
    expect(((await gc(store).catch((e: unknown) => e)) as { code?: string }).code).toBe('ERR_GC_RUNNING');
  });

  it('the command line: gc --dry-run and --json on an s3:// URL; a directory store is a usage error', async () => {
    const store = await ChunkStore.open(fresh());
    await store.ensureCreated();
    await store.objects.put('chunks/11/11/' + '11'.repeat(32), Buffer.from('unused'));
    await nextSecond();
    const env = { ...process.env, AWS_ACCESS_KEY_ID: garage.cluster.accessKeyId, AWS_SECRET_ACCESS_KEY: garage.cluster.secretAccessKey };
    const url = `s3://${garage.cluster.bucket}/${store.options.prefix}`;
    const run = (...args: string[]) => spawnSync('node', [CLI, ...args], { env, encoding: 'utf8' });
    const dry = run('gc', '--store', url, '--endpoint', garage.cluster.endpoint, '--region', garage.cluster.region, '--dry-run');
    expect(dry.status, dry.stderr).toBe(0);
    // the CLI's cutoff has the default margin of 10 minutes: a chunk seconds old stays
    expect(dry.stdout).toMatch(/0 chunks in use \(named by 0 indexes\) of 1 stored/);
    expect(dry.stdout).toMatch(/0 unused chunks .* would be moved aside/);
    const real = run('gc', '--store', url, '--endpoint', garage.cluster.endpoint, '--region', garage.cluster.region, '--json');
    expect(real.status, real.stderr).toBe(0);
    expect(JSON.parse(real.stdout)).toMatchObject({ dryRun: false, chunks: 1, fossilized: { chunks: 0 } });
    const dir = run('gc', '--store', (await DirectoryStore.create(await tempDir())).root);
    expect(dir.status).toBe(2);
    expect(dir.stderr).toMatch(/gc is for chunk stores/);
  });
});

/**
 * `verify` of a chunk store against a real distributed S3 store (a three-node Garage cluster):
 * a sound store verifies (backups written directly, and by the provider from a
 * qemu-storage-daemon disk); a chunk with one flipped byte is corrupt and a deleted one missing,
 * each named with every backup that needs it; a chunk present only as a fossil is sound; a
 * sample checks its share of each backup's chunks; a damaged index, manifest or blob fails its
 * backup by name; an encrypted store is verified with its key and refused without it; the
 * command line's exit codes, `--json` and `--sample`.
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { ChunkBackupError, ChunkStoreError } from '../lib/chunk-provider/errors.js';
import { createKeyFile } from '../lib/chunk-provider/key.js';
import { ChunkStore, chunkKey } from '../lib/chunk-provider/store.js';
import { verifyChunkStore, type ChunkVerifyResult } from '../lib/chunk-provider/verify.js';
import { DirectoryStore } from '../lib/directory-provider/store.js';
import { ChunkProvider } from '../lib/chunk-provider/provider.js';
import { runBackupJob } from '../lib/index.js';
import { putBackup, putChunks } from './helpers/chunk-store.js';
import { startDisk, vmGuest } from './helpers/directory.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { listedNow, useS3Cluster } from './helpers/use-s3-cluster.js';

const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');
const MiB = 2 ** 20;

const A = 'backup/100/qemu-2026_11_01-02_00_00';
const B = 'backup/100/qemu-2026_11_02-02_00_00';
const C = 'backup/101/qemu-2026_11_02-03_00_00';

/** The rejection of `p`, failing the test if it resolves. */
async function rejection(p: Promise<unknown>): Promise<{ code?: string; message: string }> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, 'the call should have failed').toBeInstanceOf(Error);
  return err as { code?: string; message: string };
}

/** Distinct chunk contents. */
const contents = (n: number, size = 8192): Buffer[] => Array.from({ length: n }, () => randomBytes(size));

/** The results by volume name. */
const byVolname = (results: ChunkVerifyResult[]): Record<string, ChunkVerifyResult> => Object.fromEntries(results.map((r) => [r.volid.slice(r.volid.indexOf(':') + 1), r]));

describe('chunk store verify on S3 (Garage, 3 nodes, replication factor 3)', { timeout: 180_000 }, () => {
  let dir: string;
  const garage = useS3Cluster('v');
  const fresh = garage.fresh;

  beforeAll(async () => {
    dir = mkdtempSync(path.join(tmpdir(), 'pbp-chunk-verify-'));
  }, 120_000);
  afterEach(async () => {
    await stopAll();
  });
  afterAll(async () => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('a sound store verifies; a fossil is present; a flipped byte fails every backup needing the chunk, a deleted chunk the one needing it', async () => {
    const store = await ChunkStore.open(fresh(), { storeid: 's3v' });
    await store.ensureCreated();
    const c = await putChunks(store, contents(6));
    // a and b share chunks 2 and 3 (as deduplication shares them); c needs chunk 0 only
    await putBackup(store, A, 1_793_500_000, [c[0]!, c[1]!, c[2]!, c[3]!]);
    await putBackup(store, B, 1_793_586_400, [c[2]!, c[3]!, c[4]!, c[5]!, c[2]!]);
    await putBackup(store, C, 1_793_590_000, [c[0]!]);

    const sound = await verifyChunkStore(store);
    expect(sound).toEqual([
      { volid: `s3v:${A}`, ok: true, problems: [], chunks: { total: 4, checked: 4 } },
      { volid: `s3v:${B}`, ok: true, problems: [], chunks: { total: 4, checked: 4 } },
      { volid: `s3v:${C}`, ok: true, problems: [], chunks: { total: 1, checked: 1 } },
    ]);

    // chunk 0 moved aside by a garbage collection (docs/chunk-store.md): present, not missing
    const fossil = `fossils/${chunkKey(c[0]!).slice('chunks/'.length)}.0123456789abcdef`;
    expect(await store.objects.copy(chunkKey(c[0]!), fossil)).toBe(true);
    await store.objects.delete(chunkKey(c[0]!));
    expect((await verifyChunkStore(store)).every((r) => r.ok)).toBe(true);

    // one flipped byte in shared chunk 2; chunk 5 (b only) deleted
    const object = (await store.objects.get(chunkKey(c[2]!)))!;
    object[object.length - 1]! ^= 0x01;
    await store.objects.put(chunkKey(c[2]!), object);
    await store.objects.delete(chunkKey(c[5]!));
    const r = byVolname(await verifyChunkStore(store));
    const corrupt = `chunk ${store}/${chunkKey(c[2]!)} is corrupt: ${chunkKey(c[2]!)}: content does not match its digest; needed by s3v:${A}, s3v:${B}`;
    const missing = `chunk ${store}/${chunkKey(c[5]!)} is missing; needed by s3v:${B}`;
    expect(r[A]).toMatchObject({ ok: false, problems: [corrupt] });
    expect(r[B]).toMatchObject({ ok: false, problems: [missing, corrupt] });
    expect(r[C]).toMatchObject({ ok: true, problems: [] });

    // one backup by name: only its chunks; a backup that does not exist is an error
    expect(await verifyChunkStore(store, { volnames: [C] })).toEqual([{ volid: `s3v:${C}`, ok: true, problems: [], chunks: { total: 1, checked: 1 } }]);
    expect((await verifyChunkStore(store, { vmid: 101 })).map((x) => x.volid)).toEqual([`s3v:${C}`]);
    const unknown = await rejection(verifyChunkStore(store, { volnames: ['backup/102/qemu-2026_11_02-03_00_00'] }));
    expect(unknown).toBeInstanceOf(ChunkBackupError);
    expect(unknown.code).toBe('ERR_UNKNOWN_VOLUME');
  });

  it('backups made by the provider: a full and an incremental share their unchanged chunks; one lost fails both, one damaged chunk of the incremental fails it alone', async () => {
    const store = await ChunkStore.open(fresh());
    const stateDir = mkdtempSync(path.join(dir, 'state-'));
    const scratch = await tempDir();
    let clock = Date.UTC(2026, 10, 1, 2, 0, 0);
    const provider = (): ChunkProvider => new ChunkProvider({ storeid: 'chunks', scfg: {}, log: () => undefined }, { store, stateDir, now: () => new Date(clock) });
    const disk = await startDisk(8 * MiB); // 2 chunks of 4 MiB
    await disk.write(0x41, 0, 4 * MiB);
    await disk.write(0x42, 4 * MiB, 4 * MiB);
    const backup = async (): Promise<string> => {
      const g = (await runBackupJob({ provider: provider(), storeid: 'chunks', guests: [vmGuest(disk)], tmpdir: scratch })).guests[0]!;
      expect(g.error).toBeUndefined();
      return g.volname!;
    };
    const full = await backup();
    await disk.write(0x43, 4 * MiB, 4096); // the second chunk changes
    clock += 86_400_000;
    const incr = await backup();
    const digests = async (v: string): Promise<Buffer[]> => (await store.readFixedIndex(await store.readManifest(v), 'disk0')).digests;
    const [shared, before] = await digests(full);
    const [same, after] = await digests(incr);
    expect(same!.equals(shared!)).toBe(true);
    expect(after!.equals(before!)).toBe(false);
    expect(await verifyChunkStore(store)).toEqual([
      { volid: `chunks:${full}`, ok: true, problems: [], chunks: { total: 2, checked: 2 } },
      { volid: `chunks:${incr}`, ok: true, problems: [], chunks: { total: 2, checked: 2 } },
    ]);
    await store.objects.delete(chunkKey(shared!));
    const object = (await store.objects.get(chunkKey(after!)))!;
    object[object.length - 1]! ^= 0x01;
    await store.objects.put(chunkKey(after!), object);
    const r = byVolname(await verifyChunkStore(store));
    const lost = `chunk ${store}/${chunkKey(shared!)} is missing; needed by chunks:${full}, chunks:${incr}`;
    expect(r[full]).toMatchObject({ ok: false, problems: [lost] });
    expect(r[incr]!.ok).toBe(false);
    expect(r[incr]!.problems).toEqual([lost, expect.stringMatching(new RegExp(`^chunk .*${chunkKey(after!)} is corrupt: .*; needed by chunks:${incr.replace(/[/]/g, '\\/')}$`))]);
  });

  it('credentials that may only read: verify answers, and warns that the store refused to record its verdicts', async () => {
    const o = fresh();
    const store = await ChunkStore.open(o, { storeid: 's3v' });
    await store.ensureCreated();
    const c = await putChunks(store, contents(2));
    await putBackup(store, A, 1_793_500_000, c);
    await putBackup(store, B, 1_793_586_400, [c[1]!]);
    const readOnly = await ChunkStore.open({ ...o, ...(await garage.cluster.createReadOnlyKey(o.bucket)) }, { storeid: 's3v' });
    const warnings: string[] = [];
    const log = (level: string, message: string): number => warnings.push(`${level}: ${message}`);
    expect((await verifyChunkStore(readOnly, { log })).map((r) => r.ok)).toEqual([true, true]);
    expect(warnings).toEqual([
      expect.stringMatching(new RegExp(`^warn: s3v:${A.replace(/[/]/g, '\\/')}: the store refused to record the verdict .*: nothing changes for the next backup$`)),
      expect.stringMatching(/: nothing changes for the next backup$/),
    ]);
    await store.objects.delete(chunkKey(c[0]!));
    warnings.length = 0;
    expect(byVolname(await verifyChunkStore(readOnly, { log }))[A]!.ok).toBe(false);
    expect(warnings[0]).toMatch(/: the next backup may still build on it$/);
    expect(await store.readVerifyState(A)).toBeUndefined();
    // with credentials that may write, the verdict is recorded
    await verifyChunkStore(store);
    expect(await store.readVerifyState(A)).toMatchObject({ state: 'failed', missing: 1 });
  });

  it('a damaged index, manifest or blob fails that backup with the object named', async () => {
    const store = await ChunkStore.open(fresh(), { storeid: 's3v' });
    await store.ensureCreated();
    const c = await putChunks(store, contents(2));
    const D = 'backup/102/qemu-2026_11_03-02_00_00';
    for (const [i, v] of [A, B, C, D].entries()) await putBackup(store, v, 1_793_500_000 + i, c);
    const flip = async (key: string, at: number): Promise<void> => {
      const data = (await store.objects.get(key))!;
      data[at]! ^= 0x01;
      await store.objects.put(key, data);
    };
    await flip(store.objectKey(A, 'drive-scsi0.fidx'), 100);
    const manifest = store.objectKey(B, 'manifest.json');
    await store.objects.put(manifest, Buffer.from((await store.objects.get(manifest))!.toString().replace('"ctime":1793500001', '"ctime":1793500009')));
    await flip(store.objectKey(C, 'guest.conf.blob'), 20);
    const r = byVolname(await verifyChunkStore(store));
    expect(r[A]!.ok).toBe(false);
    expect(r[A]!.problems).toEqual([`backup s3v:${A} is corrupted: ${store}/${store.objectKey(A, 'drive-scsi0.fidx')} is not what its manifest records`]);
    expect(r[A]!.chunks).toEqual({ total: 0, checked: 0 }); // its index unread: no chunks known
    expect(r[B]).toMatchObject({ ok: false, problems: [`backup s3v:${B} is corrupted: ${store}/${manifest} does not match its checksum`] });
    expect(r[C]).toMatchObject({ ok: false, problems: [`backup s3v:${C} is corrupted: ${store}/${store.objectKey(C, 'guest.conf.blob')} does not match its manifest`] });
    expect(r[D]).toMatchObject({ ok: true, chunks: { total: 2, checked: 2 } });
  });

  it("a sample checks its share of each backup's distinct chunks", async () => {
    const store = await ChunkStore.open(fresh(), { storeid: 's3v' });
    await store.ensureCreated();
    const c = await putChunks(store, contents(47, 1024));
    await putBackup(store, A, 1_793_500_000, c.slice(0, 40));
    await putBackup(store, C, 1_793_500_001, c.slice(40));
    for (let run = 0; run < 2; run++) {
      const r = byVolname(await verifyChunkStore(store, { samplePercent: 10 }));
      // 10% of 40; 10% of 7 rounded up: every backup gets a chunk checked
      expect(r[A]).toMatchObject({ ok: true, chunks: { total: 40, checked: 4 } });
      expect(r[C]).toMatchObject({ ok: true, chunks: { total: 7, checked: 1 } });
    }
    // a sample that found nothing proves little: no verdict recorded
    expect(await store.readVerifyState(A)).toBeUndefined();
    expect(await store.readVerifyState(C)).toBeUndefined();
    // a corrupt chunk is found by a sample that picks it: at 100% always
    const original = (await store.objects.get(chunkKey(c[45]!)))!;
    await store.objects.put(chunkKey(c[45]!), randomBytes(100));
    const all = byVolname(await verifyChunkStore(store, { samplePercent: 100 }));
    expect(all[C]!.problems).toEqual([expect.stringMatching(new RegExp(`^chunk .*${chunkKey(c[45]!)} is corrupt: .*bad magic; needed by s3v:${C}$`))]);
    // a full verify records its verdicts (verify.json beside the manifest)
    expect(await store.readVerifyState(A)).toEqual({ state: 'ok', time: expect.any(Number), missing: 0, bad: 0 });
    expect(await store.readVerifyState(C)).toEqual({ state: 'failed', time: expect.any(Number), missing: 0, bad: 1 });
    // repaired: a sample that finds nothing leaves the failed verdict, a full verify clears it
    await store.objects.put(chunkKey(c[45]!), original);
    expect(byVolname(await verifyChunkStore(store, { volnames: [C], samplePercent: 10 }))[C]!.ok).toBe(true);
    expect(await store.readVerifyState(C)).toMatchObject({ state: 'failed' });
    await verifyChunkStore(store, { volnames: [C] });
    expect(await store.readVerifyState(C)).toMatchObject({ state: 'ok' });
    // a sample that finds something records it
    for (const d of c.slice(40)) await store.objects.delete(chunkKey(d));
    expect(byVolname(await verifyChunkStore(store, { volnames: [C], samplePercent: 10 }))[C]!.ok).toBe(false);
    expect(await store.readVerifyState(C)).toMatchObject({ state: 'failed', missing: 1, bad: 0 });
    // the verdict goes with its backup
    await store.deleteBackup(C);
    expect(await listedNow(store.objects, `backups/101/`)).toEqual([]);
    expect((await rejection(verifyChunkStore(store, { samplePercent: 0 }))).code).toBe('ERR_INVALID_ARGUMENT');
  });

  it('an encrypted store: verified with its key (a flipped byte found by the tag); without it ERR_KEY_REQUIRED before anything is read', async () => {
    const keyFile = path.join(dir, 'v.key');
    await createKeyFile(keyFile);
    const o = fresh();
    const store = await ChunkStore.open({ ...o, keyFile }, { storeid: 's3v' });
    await store.ensureCreated();
    const c = await putChunks(store, contents(3));
    await putBackup(store, A, 1_793_500_000, c);
    expect(await verifyChunkStore(store)).toEqual([{ volid: `s3v:${A}`, ok: true, problems: [], chunks: { total: 3, checked: 3 } }]);
    const object = (await store.objects.get(chunkKey(c[1]!)))!;
    object[70]! ^= 0x01; // in the ciphertext
    await store.objects.put(chunkKey(c[1]!), object);
    const [r] = await verifyChunkStore(store);
    expect(r!.ok).toBe(false);
    expect(r!.problems).toEqual([expect.stringMatching(/is corrupt: .*authentication failed.*; needed by s3v:backup\/100/)]);

    const keyless = await ChunkStore.open(o);
    const err = await rejection(verifyChunkStore(keyless));
    expect(err).toBeInstanceOf(ChunkStoreError);
    expect(err.code).toBe('ERR_KEY_REQUIRED');
  });

  it('the command line: exit code 0 when sound, 1 with problems; --json in the shape of the directory store; --sample', async () => {
    const env = { ...process.env, AWS_ACCESS_KEY_ID: garage.cluster.accessKeyId, AWS_SECRET_ACCESS_KEY: garage.cluster.secretAccessKey };
    const cli = (...args: string[]): { status: number | null; stdout: string; stderr: string } => {
      const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env });
      return { status: r.status, stdout: r.stdout, stderr: r.stderr };
    };
    const readOnlyCli = async (...args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> => {
      const key = await garage.cluster.createReadOnlyKey(o.bucket);
      const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env: { ...env, AWS_ACCESS_KEY_ID: key.accessKeyId, AWS_SECRET_ACCESS_KEY: key.secretAccessKey } });
      return { status: r.status, stdout: r.stdout, stderr: r.stderr };
    };
    const o = fresh();
    const store = await ChunkStore.open(o);
    await store.ensureCreated();
    const c = await putChunks(store, contents(20, 1024));
    await putBackup(store, A, 1_793_500_000, c.slice(0, 10));
    await putBackup(store, B, 1_793_586_400, c.slice(5));
    const s3 = ['--store', `s3://${o.bucket}/${o.prefix}`, '--endpoint', garage.cluster.endpoint, '--region', garage.cluster.region];

    const ok = cli('verify', ...s3);
    expect(ok.status, ok.stderr).toBe(0);
    expect(ok.stdout).toBe(`chunks:${A}: ok (10 of 10 chunks checked)\nchunks:${B}: ok (15 of 15 chunks checked)\n`);
    const json = cli('verify', `chunks:${A}`, ...s3, '--json', '--bwlimit', '10M');
    expect(json.status, json.stderr).toBe(0);
    expect(JSON.parse(json.stdout)).toEqual([{ volid: `chunks:${A}`, ok: true, problems: [], chunks: { total: 10, checked: 10 } }]);
    // with --json, stdout is the JSON alone and a warning still reaches stderr: here that
    // credentials that may only read could not record the verdict
    const readOnly = await readOnlyCli('verify', `chunks:${A}`, ...s3, '--json');
    expect(readOnly.status, readOnly.stderr).toBe(0);
    expect(JSON.parse(readOnly.stdout)).toEqual([{ volid: `chunks:${A}`, ok: true, problems: [], chunks: { total: 10, checked: 10 } }]);
    expect(readOnly.stderr).toMatch(/^WARN: chunks:backup\/.*: the store refused to record the verdict .*: nothing changes for the next backup\n$/);
    const sampled = JSON.parse(cli('verify', ...s3, '--sample', '10', '--json').stdout) as ChunkVerifyResult[];
    expect(sampled.map((r) => r.chunks.total)).toEqual([10, 15]);
    // 1 of A's 10 and 2 of B's 15 chosen (10%, rounded up); a chosen chunk both need counts for both
    expect(sampled[0]!.chunks.checked).toBeGreaterThanOrEqual(1);
    expect(sampled[0]!.chunks.checked).toBeLessThanOrEqual(3);
    expect(sampled[1]!.chunks.checked).toBeGreaterThanOrEqual(2);
    expect(sampled[1]!.chunks.checked).toBeLessThanOrEqual(3);

    await store.objects.delete(chunkKey(c[7]!)); // needed by both
    const bad = cli('verify', ...s3, '--json');
    expect(bad.status).toBe(1);
    const results = JSON.parse(bad.stdout) as ChunkVerifyResult[];
    const line = `chunk s3://${o.bucket}/${o.prefix}/${chunkKey(c[7]!)} is missing; needed by chunks:${A}, chunks:${B}`;
    expect(results).toEqual([
      { volid: `chunks:${A}`, ok: false, problems: [line], chunks: { total: 10, checked: 10 } },
      { volid: `chunks:${B}`, ok: false, problems: [line], chunks: { total: 15, checked: 15 } },
    ]);
    expect(bad.stderr).toMatch(/\[ERR_VERIFY_FAILED\]/);
    const text = cli('verify', `chunks:${B}`, ...s3);
    expect(text.status).toBe(1);
    // verified alone, B is the one backup known to need it
    expect(text.stdout).toBe(`chunks:${B}: FAILED (15 of 15 chunks checked)\n  chunk s3://${o.bucket}/${o.prefix}/${chunkKey(c[7]!)} is missing; needed by chunks:${B}\n`);

    for (const v of ['0', '101', 'ten', '-5']) {
      const u = cli('verify', ...s3, '--sample', v);
      expect(u.status, v).toBe(2);
      expect(u.stderr).toMatch(/not a share in percent/);
    }
    const folder = path.join(dir, 'folder-store');
    await DirectoryStore.create(folder);
    const onFolder = cli('verify', '--store', folder, '--sample', '10');
    expect(onFolder.status).toBe(2);
    expect(onFolder.stderr).toMatch(/--sample is for s3:\/\/ stores/);
    expect(cli('verify', '--store', folder, '--bwlimit', '1M').stderr).toMatch(/--bwlimit is for s3:\/\/ stores/);
    expect(cli('verify', '--store', folder, '--json').stdout.trim()).toBe('[]');
  });
});

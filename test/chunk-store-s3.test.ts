/**
 * The chunk store on a real distributed S3 store (a three-node Garage cluster, replication
 * factor 3) through the native binding. Objects: they round-trip under the store's prefix,
 * listings page past 1000 keys, and every failure is a typed `ChunkStoreError` naming endpoint,
 * bucket and key: wrong credentials (which one), a missing bucket, a bucket quota, a gateway
 * that is down (retries, then ERR_STORE_UNAVAILABLE within the bounded time) or comes back during
 * the retries (the request succeeds), a killed storage node (replication: no error). TLS (a CA
 * file, a pinned fingerprint) is in chunk-store-tls.test.ts. Jobs: a qemu-storage-daemon
 * export backed up full and incrementally (dirty bitmap) and restored byte-exact, a lost chunk
 * healed by the next backup, an encrypted store (right key, another key, none), a cancelled
 * backup (no index), a backup through a node kill and a gateway restart. The `s3://` URL and
 * credential parsing is tested without the cluster.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { ChunkStoreError, fromNative } from '../lib/chunk-provider/errors.js';
import { S3ObjectStore, parseS3Url, readCredentialsFile, s3StoreOptions, type S3StoreOptions } from '../lib/chunk-provider/s3.js';
import { InvalidArgumentError } from '../lib/errors.js';
import { native, type Binding } from '../lib/native.js';
import { execFileP, nbdRead, nbdWrite, startStorageDaemon, stopAll } from './helpers/qemu.js';
import { clusterStoreOptions, startS3Cluster, type S3Cluster } from './helpers/s3-cluster.js';
import { listedKeys, s3Request } from './helpers/s3.js';

/** The rejection of `p`, failing the test if it resolves. */
async function rejection(p: Promise<unknown>): Promise<ChunkStoreError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, 'the call should have failed').toBeInstanceOf(ChunkStoreError);
  return err as ChunkStoreError;
}

const MiB = 2 ** 20;

/** Runs a native chunk job to its end; its errors typed as the package throws them. */
async function runJob<T>(start: () => { wait(): Promise<T> }): Promise<T> {
  try {
    return await start().wait();
  } catch (err) {
    throw fromNative(err);
  }
}

/** Runs `fn` on every item with at most `limit` at once. */
async function pool<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: limit }, async () => {
      while (next < items.length) await fn(items[next++]!);
    }),
  );
}

describe('chunk store on S3 (Garage, 3 nodes, replication factor 3)', { timeout: 180_000 }, () => {
  let cluster: S3Cluster;
  let base: S3StoreOptions;
  let store: S3ObjectStore;

  beforeAll(async () => {
    cluster = await startS3Cluster();
    base = clusterStoreOptions(cluster, 'stores/one');
    store = new S3ObjectStore(base);
  }, 120_000);
  afterAll(async () => {
    await cluster?.stop();
  });

  it('puts, gets, heads, lists and deletes objects under the prefix', async () => {
    const chunk = randomBytes(5 * 2 ** 20 + 7); // several Garage blocks
    const key = 'chunks/ab/cd/abcd0123';
    const t0 = Math.floor(Date.now() / 1000);
    await store.put(key, chunk);
    await store.put('store.json', Buffer.from('{"version":1}'));
    expect((await store.get(key))?.equals(chunk)).toBe(true);
    expect((await store.get('store.json'))?.toString()).toBe('{"version":1}');
    const head = await store.head(key);
    expect(head).toMatchObject({ key, size: chunk.length });
    expect(Math.abs(head!.modified - t0)).toBeLessThan(120);
    expect(await store.get('chunks/ab/cd/missing')).toBeNull();
    expect(await store.head('chunks/ab/cd/missing')).toBeNull();

    // the objects are really under the prefix in the bucket, and nothing outside it is listed
    const raw = await s3Request(cluster, 'GET', `/${cluster.bucket}/stores/one/store.json`);
    expect(raw.body.toString()).toBe('{"version":1}');
    expect((await s3Request(cluster, 'PUT', `/${cluster.bucket}/stores/other/x`, { body: Buffer.from('x') })).status).toBe(200);
    expect((await store.list('')).map((o) => o.key).sort()).toEqual([key, 'store.json']);
    // a plain string prefix, not a folder
    expect((await store.list('chunks/a')).map((o) => o.key)).toEqual([key]);
    expect(await store.list('chunks/b')).toEqual([]);
    expect((await store.list('chunks/')).map((o) => o.size)).toEqual([chunk.length]);

    // replacing an object
    await store.put('store.json', Buffer.from('{"version":2}'));
    expect((await store.get('store.json'))?.toString()).toBe('{"version":2}');

    await store.delete(key);
    expect(await store.get(key)).toBeNull();
    await store.delete(key); // a missing object is no error
    expect(listedKeys(await s3Request(cluster, 'GET', `/${cluster.bucket}`, { query: { 'list-type': '2', prefix: 'stores/' } })).sort()).toEqual([
      'stores/one/store.json',
      'stores/other/x',
    ]);
  });

  it('lists more than 1000 keys under a prefix (every page)', async () => {
    const keys = Array.from({ length: 1234 }, (_, i) => `many/${(i % 16).toString(16)}/${String(i).padStart(5, '0')}`);
    await pool(keys, 32, (k) => store.put(k, Buffer.from(k)));
    const listed = await store.list('many/');
    expect(listed.length).toBe(keys.length);
    expect(listed.map((o) => o.key).sort()).toEqual([...keys].sort());
    expect(listed.every((o) => o.size === o.key.length)).toBe(true);
    expect((await store.list('many/3/')).length).toBe(keys.filter((k) => k.startsWith('many/3/')).length);
  });

  it('the check of a previous index: its fossils by one listing; with more fossils than its pages, a HEAD per chunk instead', async () => {
    const s = new S3ObjectStore({ ...base, prefix: 'stores/fossil-check' });
    const digest = (i: number): Buffer => createHash('sha256').update(`chunk ${i}`).digest();
    const key = (d: Buffer, dir = 'chunks'): string => `${dir}/${d.toString('hex').slice(0, 2)}/${d.toString('hex').slice(2, 4)}/${d.toString('hex')}`;
    const [a, b, c] = [digest(1), digest(2), digest(3)];
    await s.put(key(b), Buffer.from('b'));
    await s.put(`${key(a, 'fossils')}.c1`, Buffer.from('a')); // moved aside by a collection
    // c is lost outside the store's operations: not a fossil, so the listing does not name it
    const missing = async (): Promise<string[]> => {
      const m = await s.missingChunks(Buffer.concat([a, b, c, a, Buffer.alloc(32)]));
      return Array.from({ length: m.length / 32 }, (_, i) => m.subarray(i * 32, i * 32 + 32).toString('hex'));
    };
    expect(await missing()).toEqual([a.toString('hex')]);
    // 3 distinct chunks: a budget of 2 pages (2000 keys); 2001 more fossils of other chunks
    const others = Array.from({ length: 2001 }, (_, i) => `${key(digest(100 + i), 'fossils')}.c1`);
    await pool(others, 32, (k) => s.put(k, Buffer.alloc(0)));
    expect(await missing()).toEqual([a, c].map((d) => d.toString('hex')).sort());
  });

  it('refuses wrong credentials with ERR_STORE_ACCESS, saying which', async () => {
    const unknownId = new S3ObjectStore({ ...base, accessKeyId: `GK${'0'.repeat(24)}` });
    const e1 = await rejection(unknownId.get('store.json'));
    expect(e1.code).toBe('ERR_STORE_ACCESS');
    expect(e1.message).toMatch(/access key id is not known/);
    expect(e1.message).toContain(`${cluster.endpoint} bucket ${cluster.bucket}`);
    expect(e1.message).toContain('stores/one/store.json');

    const wrongSecret = new S3ObjectStore({ ...base, secretAccessKey: 'f'.repeat(64) });
    const e2 = await rejection(wrongSecret.put('chunks/00/00/x', Buffer.from('x')));
    expect(e2.code).toBe('ERR_STORE_ACCESS');
    expect(e2.message).toMatch(/signature was refused: wrong secret key/);
    expect(e2.message).toContain('stores/one/chunks/00/00/x');
    expect((await rejection(wrongSecret.list(''))).code).toBe('ERR_STORE_ACCESS');
    expect((await rejection(wrongSecret.head('store.json'))).code).toBe('ERR_STORE_ACCESS');
  });

  it('reports a missing bucket as ERR_STORE_NOT_FOUND for every operation', async () => {
    const missing = new S3ObjectStore({ ...base, bucket: 'pbp-no-such-bucket' });
    const calls: Array<[string, () => Promise<unknown>]> = [
      ['put', () => missing.put('store.json', Buffer.from('x'))],
      ['get', () => missing.get('store.json')],
      ['head', () => missing.head('store.json')], // a HEAD answer has no body: the bucket is asked
      ['list', () => missing.list('')],
      ['delete', () => missing.delete('store.json')],
    ];
    for (const [op, call] of calls) {
      const err = await rejection(call());
      expect(err.code, op).toBe('ERR_STORE_NOT_FOUND');
      expect(err.message, op).toContain(`bucket pbp-no-such-bucket`);
      expect(err.message, op).toMatch(/no such bucket/);
    }
  });

  it('refuses a put beyond the bucket quota with ERR_STORE_FULL', async () => {
    await cluster.createBucket('pbp-quota-s3');
    await cluster.setQuota('pbp-quota-s3', 2 ** 20);
    const quota = new S3ObjectStore({ ...base, bucket: 'pbp-quota-s3' });
    await quota.put('chunks/00/00/small', randomBytes(512 * 1024));
    const err = await rejection(quota.put('chunks/00/01/big', randomBytes(2 * 2 ** 20)));
    expect(err.code).toBe('ERR_STORE_FULL');
    expect(err.message).toMatch(/quota/);
    expect(err.message).toContain('bucket pbp-quota-s3');
    expect(err.message).toContain('stores/one/chunks/00/01/big');
    expect(await quota.get('chunks/00/01/big')).toBeNull();
  });

  it('backs up a qemu-storage-daemon export in full and incrementally (bitmap), and restores both byte-exact', async () => {
    try {
      const q = await startStorageDaemon({ size: 40 * MiB }); // 10 chunks of 4 MiB
      const live = `nbd+unix:///live0?socket=${q.nbdPath}`;
      await nbdWrite(live, 0x11, 0, 6 * MiB); // chunks 0, 1
      await nbdWrite(live, 0x22, 20 * MiB + 4096, 64 * 1024); // chunk 5
      await q.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'b0', granularity: 65536 });
      const opts = { ...base, prefix: 'stores/vm' } as Binding.ChunkStoreOptions;
      const progress: number[] = [];
      const full = await runJob(() =>
        native.startChunkBackup({ store: opts, uri: live, indexKey: 'backups/100/vm-1/drive-scsi0.fidx' }, (p: Binding.NativeProgress) => progress.push(p.done)),
      );
      expect(full).toMatchObject({ bytesTotal: 40 * MiB, chunks: 10, uploaded: 3, zero: 7, unchanged: 0 });
      expect(progress.at(-1)).toBe(40 * MiB);
      const image1 = await nbdRead(live, q.dir);

      // the guest writes: chunk 8 (was zero), and across the border of chunks 0 and 1
      await nbdWrite(live, 0x33, 33 * MiB, 100 * 1024);
      await nbdWrite(live, 0x44, 4 * MiB - 512, 1024);
      const image2 = await nbdRead(live, q.dir);
      await q.qmp.execute('block-export-add', {
        type: 'nbd',
        id: 'bk',
        'node-name': 'disk0',
        name: 'bk',
        writable: false,
        bitmaps: [{ node: 'disk0', name: 'b0' }],
      });
      const incr = await runJob(() =>
        native.startChunkBackup({
          store: opts,
          uri: `nbd+unix:///bk?socket=${q.nbdPath}`,
          bitmap: 'b0',
          previousIndexKey: full.indexKey,
          indexKey: 'backups/100/vm-2/drive-scsi0.fidx',
        }),
      );
      // only the chunks holding dirty bytes were read and uploaded; the rest came from the index
      expect(incr).toMatchObject({ chunks: 10, uploaded: 3, unchanged: 7 });
      expect(incr.bytesRead).toBeGreaterThan(0);
      expect(incr.bytesRead).toBeLessThanOrEqual(3 * 4 * MiB); // holes inside them are not read
      const vmStore = new S3ObjectStore({ ...base, prefix: 'stores/vm' });
      const chunks = await vmStore.list('chunks/');
      expect(chunks.length).toBe(6); // 3 of the full backup, 3 new

      for (const [indexKey, image] of [
        [full.indexKey, image1],
        [incr.indexKey, image2],
      ] as const) {
        const target = join(q.dir, `${indexKey.split('/')[2]}.raw`);
        const restored = await runJob(() => native.startChunkRestore({ store: opts, indexKey, target, zeroed: true }));
        expect(restored.bytes).toBe(40 * MiB);
        expect(readFileSync(target).equals(image), `restore of ${indexKey}`).toBe(true);
      }

      // a collection moved chunk 5 aside (a fossil, which a later run may delete): the check of
      // the previous index (one listing of fossils/) names it, so the caller asks for no
      // incremental; a chunk lost outside the store's operations is not named (verify finds it)
      const digest5 = createHash('sha256').update(image2.subarray(20 * MiB, 24 * MiB)).digest('hex');
      const key5 = `chunks/${digest5.slice(0, 2)}/${digest5.slice(2, 4)}/${digest5}`;
      expect(chunks.map((c) => c.key)).toContain(key5);
      const previous = native.chunkIndexDigests((await vmStore.get(incr.indexKey))!, incr.indexKey);
      expect(await vmStore.missingChunks(previous)).toEqual(Buffer.alloc(0));
      // Garage's listing may show an object for a moment after its DELETE (listedNow): each
      // answer is awaited for a few seconds. A late one is safe for the product either way: a
      // fossil still listed makes a full backup, and one not listed yet is a fossil made after the
      // listing, which the collection's protocol covers (docs/chunk-store.md).
      const missingAfter = async (expected: string): Promise<string> => {
        let hex = '';
        for (let i = 0; i < 50 && (hex = (await vmStore.missingChunks(previous)).toString('hex')) !== expected; i++) await new Promise((r) => setTimeout(r, 100));
        return hex;
      };
      expect(await vmStore.copy(key5, `fossils/${key5.slice('chunks/'.length)}.c1`)).toBe(true);
      await vmStore.delete(key5);
      expect(await missingAfter(digest5)).toBe(digest5);
      await vmStore.delete(`fossils/${key5.slice('chunks/'.length)}.c1`); // and then deleted
      expect(await missingAfter('')).toBe('');
      await expect(vmStore.missingChunks(Buffer.alloc(33))).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
      await expect(runJob(() => native.startChunkRestore({ store: opts, indexKey: incr.indexKey, target: join(q.dir, 'lost.raw') }))).rejects.toMatchObject({
        code: 'ERR_BACKUP_CORRUPT',
        message: expect.stringContaining(digest5),
      });
      // a full backup with dedup by hash uploads only what the store lacks
      const healed = await runJob(() =>
        native.startChunkBackup({ store: opts, uri: live, dedupByHead: true, indexKey: 'backups/100/vm-3/drive-scsi0.fidx' }),
      );
      expect(healed).toMatchObject({ uploaded: 1, reused: 3, zero: 6, unchanged: 0 });
      const again = join(q.dir, 'healed.raw');
      await runJob(() => native.startChunkRestore({ store: opts, indexKey: incr.indexKey, target: again, zeroed: true }));
      expect(readFileSync(again).equals(image2)).toBe(true);

      // a missing index is a typed error naming it
      const target = join(q.dir, 'none.raw');
      await expect(runJob(() => native.startChunkRestore({ store: opts, indexKey: 'backups/100/vm-9/x.fidx', target }))).rejects.toMatchObject({
        code: 'ERR_BACKUP_CORRUPT',
        message: expect.stringContaining('backups/100/vm-9/x.fidx'),
      });
    } finally {
      await stopAll();
    }
  });

  it('encrypts with a key file; restores with it, refuses another key or none', async () => {
    try {
      const q = await startStorageDaemon({ size: 8 * MiB });
      const live = `nbd+unix:///live0?socket=${q.nbdPath}`;
      await nbdWrite(live, 0x5a, 1 * MiB, 3 * MiB);
      const image = await nbdRead(live, q.dir);
      const keyFile = join(q.dir, 'store.key');
      const fingerprint = native.createKeyFile(keyFile);
      expect(fingerprint).toMatch(/^[0-9a-f]{16}$/);
      expect(native.keyFingerprint(keyFile)).toBe(fingerprint);
      expect(statSync(keyFile).mode & 0o777).toBe(0o600);
      expect(() => native.createKeyFile(keyFile)).toThrow(); // never overwrites
      const otherKey = join(q.dir, 'other.key');
      native.createKeyFile(otherKey);

      const opts = { ...base, prefix: 'stores/enc', keyFile } as Binding.ChunkStoreOptions;
      const full = await runJob(() =>
        native.startChunkBackup({ store: opts, storeFingerprint: fingerprint, uri: live, indexKey: 'backups/101/vm-1/drive-scsi0.fidx' }),
      );
      expect(full.uploaded).toBe(1);
      // the object's name is not the SHA-256 of the content (keyed digest)
      const plainDigest = createHash('sha256').update(image.subarray(0, 4 * MiB)).digest('hex');
      const names = (await new S3ObjectStore({ ...base, prefix: 'stores/enc' }).list('chunks/')).map((o) => o.key);
      expect(names.length).toBe(1);
      expect(names[0]).not.toContain(plainDigest);

      const target = join(q.dir, 'enc.raw');
      await runJob(() => native.startChunkRestore({ store: opts, storeFingerprint: fingerprint, indexKey: full.indexKey, target, zeroed: true }));
      expect(readFileSync(target).equals(image)).toBe(true);

      const other = { ...opts, keyFile: otherKey };
      await expect(
        runJob(() => native.startChunkRestore({ store: other, storeFingerprint: fingerprint, indexKey: full.indexKey, target: `${target}.2` })),
      ).rejects.toMatchObject({ code: 'ERR_KEY_MISMATCH' });
      const none = { ...base, prefix: 'stores/enc' } as Binding.ChunkStoreOptions;
      await expect(
        runJob(() => native.startChunkRestore({ store: none, storeFingerprint: fingerprint, indexKey: full.indexKey, target: `${target}.3` })),
      ).rejects.toMatchObject({ code: 'ERR_KEY_REQUIRED' });
      // without the fingerprint check, the other key still never yields data
      await expect(runJob(() => native.startChunkRestore({ store: other, indexKey: full.indexKey, target: `${target}.4` }))).rejects.toMatchObject({
        code: 'ERR_BACKUP_CORRUPT',
      });
    } finally {
      await stopAll();
    }
  });

  it('cancels a chunk backup: ERR_CANCELLED, and no index is written', async () => {
    try {
      const q = await startStorageDaemon({ size: 32 * MiB });
      const live = `nbd+unix:///live0?socket=${q.nbdPath}`;
      await nbdWrite(live, 0x77, 0, 32 * MiB);
      const opts = { ...base, prefix: 'stores/cancel' } as Binding.ChunkStoreOptions;
      let cancelled = false;
      const job = native.startChunkBackup({ store: opts, uri: live, indexKey: 'backups/103/vm-1/drive-scsi0.fidx', bandwidthLimit: 8 * MiB }, () => {
        if (!cancelled) {
          cancelled = true;
          job.cancel();
        }
      });
      await expect(runJob(() => job)).rejects.toMatchObject({ code: 'ERR_CANCELLED' });
      expect(cancelled).toBe(true);
      expect(await new S3ObjectStore({ ...base, prefix: 'stores/cancel' }).head('backups/103/vm-1/drive-scsi0.fidx')).toBeNull();
      await expect(job.wait()).rejects.toThrow(/already called/);
    } finally {
      await stopAll();
    }
  });

  it('keeps working with one storage node killed (replication)', async () => {
    const before = randomBytes(3 * 2 ** 20);
    await store.put('chunks/11/11/before', before);
    await cluster.stopNode(2); // SIGKILL
    try {
      const during = randomBytes(3 * 2 ** 20);
      await store.put('chunks/22/22/during', during);
      expect((await store.get('chunks/11/11/before'))?.equals(before)).toBe(true);
      expect((await store.get('chunks/22/22/during'))?.equals(during)).toBe(true);
      expect((await store.list('chunks/')).map((o) => o.key).sort()).toEqual(['chunks/11/11/before', 'chunks/22/22/during']);
    } finally {
      await cluster.startNode(2);
    }
  });

  it('a chunk backup survives a storage node killed and the gateway restarted during it; the restore is byte-exact', async () => {
    try {
      const q = await startStorageDaemon({ size: 64 * MiB });
      const live = `nbd+unix:///live0?socket=${q.nbdPath}`;
      const data = join(q.dir, 'random.raw');
      writeFileSync(data, randomBytes(64 * MiB));
      await execFileP('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', data, live]);
      const image = await nbdRead(live, q.dir);
      const opts = { ...base, prefix: 'stores/faults' } as Binding.ChunkStoreOptions;

      // a storage node dies a few chunks in
      let killed: Promise<void> | undefined;
      const one = await runJob(() =>
        native.startChunkBackup({ store: opts, uri: live, indexKey: 'backups/102/vm-1/drive-scsi0.fidx', uploads: 2, bandwidthLimit: 32 * MiB }, (p: Binding.NativeProgress) => {
          if (!killed && p.done >= 16 * MiB) killed = cluster.stopNode(2);
        }),
      );
      expect(killed, 'the node was killed during the backup').toBeDefined();
      await killed;
      expect(one).toMatchObject({ chunks: 16, uploaded: 16 });

      // the gateway goes down a few chunks in and comes back: the uploads retry and finish
      await cluster.startNode(2);
      let restarted: Promise<void> | undefined;
      const two = await runJob(() =>
        native.startChunkBackup(
          { store: { ...opts, prefix: 'stores/faults2' }, uri: live, indexKey: 'backups/102/vm-2/drive-scsi0.fidx', uploads: 2, bandwidthLimit: 32 * MiB },
          (p: Binding.NativeProgress) => {
            if (!restarted && p.done >= 16 * MiB) restarted = cluster.restartGateway(() => sleep(1000));
          },
        ),
      );
      expect(restarted, 'the gateway was restarted during the backup').toBeDefined();
      await restarted;
      expect(two).toMatchObject({ chunks: 16, uploaded: 16 });

      for (const [prefix, indexKey] of [
        ['stores/faults', one.indexKey],
        ['stores/faults2', two.indexKey],
      ] as const) {
        const target = join(q.dir, `${prefix.replace('/', '-')}.raw`);
        await runJob(() => native.startChunkRestore({ store: { ...opts, prefix }, indexKey, target, zeroed: true }));
        expect(readFileSync(target).equals(image), `restore of ${prefix}`).toBe(true);
      }
    } finally {
      await cluster.startNode(2);
      await stopAll();
    }
  });

  it('retries while the gateway is down, then fails with ERR_STORE_UNAVAILABLE within the bounded time', async () => {
    const bounded = new S3ObjectStore({ ...base, retryTimeoutMs: 2000, initBackoffMs: 100, maxBackoffMs: 400, connectTimeoutMs: 1000 });
    await bounded.put('g/before', Buffer.from('before')); // a pooled connection to the gateway, too
    await cluster.stopNode(0, 'SIGTERM');
    try {
      const t0 = performance.now();
      const err = await rejection(bounded.put('g/down', Buffer.from('down')));
      const elapsed = performance.now() - t0;
      expect(err.code).toBe('ERR_STORE_UNAVAILABLE');
      expect(err.message).toContain(`${cluster.endpoint} bucket ${cluster.bucket}`);
      expect(err.message).toContain('stores/one/g/down');
      expect(err.message).toMatch(/retries/);
      // it retried for the retry time, and stopped within one backoff and one connect after it
      expect(elapsed).toBeGreaterThanOrEqual(2000);
      expect(elapsed).toBeLessThan(2000 + 400 + 1000 + 1500);
      expect((await rejection(bounded.get('g/before'))).code).toBe('ERR_STORE_UNAVAILABLE');
    } finally {
      await cluster.startNode(0);
    }
    expect((await bounded.get('g/before'))?.toString()).toBe('before');
  });

  it('succeeds when the gateway comes back during the retries', async () => {
    const patient = new S3ObjectStore({ ...base, retryTimeoutMs: 60_000, initBackoffMs: 100, maxBackoffMs: 1000 });
    const data = randomBytes(2 * 2 ** 20);
    await cluster.stopNode(0, 'SIGTERM');
    let settled = false;
    // settled results, so that nothing rejects unhandled while the test waits
    const put = patient.put('g/restarted', data).then(
      () => ({ ok: true as const }),
      (err: unknown) => ({ ok: false as const, err }),
    );
    void put.finally(() => (settled = true));
    const get = patient.get('g/before').then(
      (b) => b?.toString(),
      (err: unknown) => err,
    );
    await sleep(3000);
    expect(settled).toBe(false); // still retrying (past what 10 retries of a refused connection take)
    await cluster.startNode(0);
    expect(await put).toEqual({ ok: true });
    expect(await get).toBe('before');
    expect((await patient.get('g/restarted'))?.equals(data)).toBe(true);
  });
});

describe('s3:// store URLs and credentials', () => {
  it('parses bucket and prefix', () => {
    expect(parseS3Url('s3://my-bucket')).toEqual({ bucket: 'my-bucket', prefix: '' });
    expect(parseS3Url('s3://my-bucket/')).toEqual({ bucket: 'my-bucket', prefix: '' });
    expect(parseS3Url('s3://my.bucket/pve/backups/')).toEqual({ bucket: 'my.bucket', prefix: 'pve/backups' });
    for (const bad of ['http://b/p', 's3://', 's3://B/p', 's3://ab', 's3://b-ucket/a//b', 's3://bucket/../x', 's3://bucket/p?x=1']) {
      expect(() => parseS3Url(bad), bad).toThrow(InvalidArgumentError);
    }
  });

  it('takes credentials from the environment, or from a file given by path', async () => {
    const env = { AWS_ACCESS_KEY_ID: 'GKenv', AWS_SECRET_ACCESS_KEY: 'envsecret', AWS_SESSION_TOKEN: 'tok' };
    expect(await s3StoreOptions('s3://bucket/p', { endpoint: 'https://s3.example', region: 'garage', env })).toEqual({
      endpoint: 'https://s3.example',
      region: 'garage',
      bucket: 'bucket',
      prefix: 'p',
      accessKeyId: 'GKenv',
      secretAccessKey: 'envsecret',
      sessionToken: 'tok',
    });
    await expect(s3StoreOptions('s3://bucket/p', { env: {} })).rejects.toThrow(/AWS_ACCESS_KEY_ID/);
    // endpoint and region from the environment as the AWS tools read them, the options first
    const awsEnv = { ...env, AWS_ENDPOINT_URL: 'https://any.example', AWS_ENDPOINT_URL_S3: 'https://s3.example:3900', AWS_REGION: 'garage' };
    expect(await s3StoreOptions('s3://bucket', { env: awsEnv })).toMatchObject({ endpoint: 'https://s3.example:3900', region: 'garage' });
    expect(await s3StoreOptions('s3://bucket', { env: awsEnv, endpoint: 'https://mine', region: 'r' })).toMatchObject({ endpoint: 'https://mine', region: 'r' });

    const dir = mkdtempSync(join(tmpdir(), 'pbp-cred-'));
    try {
      const file = join(dir, 'credentials');
      writeFileSync(
        file,
        '# comment\n[default]\naws_access_key_id = GKfile\naws_secret_access_key=filesecret\n\n[other]\naws_access_key_id = GKother\naws_secret_access_key = othersecret\naws_session_token = t2\n',
        { mode: 0o600 },
      );
      // the file wins over the environment
      expect(await s3StoreOptions('s3://bucket', { credentialsFile: file, env })).toMatchObject({ accessKeyId: 'GKfile', secretAccessKey: 'filesecret' });
      expect(await readCredentialsFile(file, 'other')).toEqual({ accessKeyId: 'GKother', secretAccessKey: 'othersecret', sessionToken: 't2' });
      expect(await s3StoreOptions('s3://bucket', { credentialsFile: file, env: { AWS_PROFILE: 'other' } })).toMatchObject({ accessKeyId: 'GKother' });
      await expect(readCredentialsFile(file, 'none')).rejects.toThrow(/profile \[none\]/);
      await expect(readCredentialsFile(join(dir, 'missing'))).rejects.toThrow(InvalidArgumentError);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses plain http unless allowed, and a CA file that is not PEM, naming it', async () => {
    const options = { bucket: 'bucket', accessKeyId: 'a', secretAccessKey: 's' };
    await expect(new S3ObjectStore({ ...options, endpoint: 'http://127.0.0.1:1' }).get('k')).rejects.toThrow(/plain http/);
    const dir = mkdtempSync(join(tmpdir(), 'pbp-ca-'));
    try {
      const ca = join(dir, 'ca.pem');
      writeFileSync(ca, 'not a certificate');
      const err = await new S3ObjectStore({ ...options, endpoint: 'https://127.0.0.1:1', caFile: ca }).get('k').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(InvalidArgumentError);
      expect((err as Error).message).toContain(ca);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

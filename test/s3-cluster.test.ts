/**
 * The object-store harness is real: a three-node Garage cluster with replication serves S3, keeps
 * serving with a storage node down, refuses bad credentials, missing buckets and puts beyond a
 * quota as S3 does, and a client sees its gateway restart as a connection error.
 */
import { randomBytes } from 'node:crypto';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { startS3Cluster, type S3Cluster } from './helpers/s3-cluster.js';
import { listedKeys, s3Request } from './helpers/s3.js';

describe('S3 test cluster (Garage, 3 nodes, replication factor 3)', { timeout: 120_000 }, () => {
  let cluster: S3Cluster;
  beforeAll(async () => {
    const t0 = performance.now();
    cluster = await startS3Cluster();
    console.log(`garage cluster up in ${Math.round(performance.now() - t0)} ms`);
  }, 120_000);
  afterAll(async () => {
    await cluster?.stop();
  });

  const put = (key: string, body: Uint8Array<ArrayBuffer>, bucket = cluster.bucket) => s3Request(cluster, 'PUT', `/${bucket}/${key}`, { body });
  const get = (key: string, bucket = cluster.bucket) => s3Request(cluster, 'GET', `/${bucket}/${key}`);
  const list = (prefix: string) => s3Request(cluster, 'GET', `/${cluster.bucket}`, { query: { 'list-type': '2', prefix } });

  it('puts, gets, lists and deletes objects', async () => {
    const data = randomBytes(3 * 2 ** 20 + 123); // more than Garage's 1 MiB block: several blocks
    expect((await put('a/one', data)).status).toBe(200);
    expect((await put('a/two words+&=', Buffer.from('two'))).status).toBe(200);
    const got = await get('a/one');
    expect(got.status).toBe(200);
    expect(got.body.equals(data)).toBe(true);
    expect(listedKeys(await list('a/'))).toEqual(['a/one', 'a/two words+&amp;=']);
    expect((await s3Request(cluster, 'DELETE', `/${cluster.bucket}/a/one`)).status).toBe(204);
    expect((await get('a/one')).code).toBe('NoSuchKey');
    expect(listedKeys(await list('a/'))).toEqual(['a/two words+&amp;=']);
  });

  it('keeps reading and writing with one storage node killed, and the node rejoins', async () => {
    const before = randomBytes(2 * 2 ** 20);
    expect((await put('n/before', before)).status).toBe(200);
    await cluster.stopNode(2); // SIGKILL
    expect(cluster.nodes[2]!.process).toBeNull();

    const during = randomBytes(2 * 2 ** 20);
    expect((await put('n/during', during)).status).toBe(200);
    expect((await get('n/before')).body.equals(before)).toBe(true);
    expect((await get('n/during')).body.equals(during)).toBe(true);

    await cluster.startNode(2);
    // with node 1 down instead, node 2 must hold what was written without it (resynced or read-repaired)
    await cluster.stopNode(1);
    expect((await get('n/during')).body.equals(during)).toBe(true);
    await cluster.startNode(1);
  });

  it('loses two nodes: no quorum, a write fails with 5xx; back with both', async () => {
    await cluster.stopNode(1);
    await cluster.stopNode(2);
    const res = await put('q/none', Buffer.from('x'), cluster.bucket);
    expect(res.status).toBeGreaterThanOrEqual(500);
    await cluster.startNode(1);
    await cluster.startNode(2);
    expect((await put('q/back', Buffer.from('y'))).status).toBe(200);
  });

  it('a gateway restart is a connection error for the client, then requests succeed', async () => {
    expect((await put('g/before', Buffer.from('before'))).status).toBe(200);
    await cluster.restartGateway(async () => {
      const err = await put('g/down', Buffer.from('down')).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(TypeError); // fetch failed
      expect(((err as Error).cause as NodeJS.ErrnoException).code).toBe('ECONNREFUSED');
    });
    expect((await put('g/after', Buffer.from('after'))).status).toBe(200);
    expect((await get('g/before')).body.toString()).toBe('before');
  });

  it('refuses wrong credentials with 403 AccessDenied (Garage uses no InvalidAccessKeyId)', async () => {
    const unknownKey = { ...cluster, accessKeyId: `GK${'0'.repeat(24)}` };
    const r1 = await s3Request(unknownKey, 'GET', `/${cluster.bucket}/a/two`);
    expect([r1.status, r1.code]).toEqual([403, 'AccessDenied']);
    expect(r1.body.toString()).toMatch(/No such key/);
    const wrongSecret = { ...cluster, secretAccessKey: 'f'.repeat(64) };
    const r2 = await s3Request(wrongSecret, 'PUT', `/${cluster.bucket}/c/x`, { body: Buffer.from('x') });
    expect([r2.status, r2.code]).toEqual([403, 'AccessDenied']);
    expect(r2.body.toString()).toMatch(/Invalid signature/);
  });

  it('answers NoSuchBucket for a bucket that does not exist', async () => {
    const res = await put('x', Buffer.from('x'), 'pbp-missing');
    expect([res.status, res.code]).toEqual([404, 'NoSuchBucket']);
    expect((await get('x', 'pbp-missing')).code).toBe('NoSuchBucket');
  });

  it('refuses a put beyond the bucket quota, and accepts it once the quota is lifted', async () => {
    await cluster.createBucket('pbp-quota');
    await cluster.setQuota('pbp-quota', 2 ** 20);
    expect((await put('small', randomBytes(512 * 1024), 'pbp-quota')).status).toBe(200);
    const big = randomBytes(2 * 2 ** 20);
    const refused = await put('big', big, 'pbp-quota');
    expect([refused.status, refused.code]).toEqual([403, 'AccessDenied']);
    expect(refused.body.toString()).toMatch(/quota/i);
    expect((await get('big', 'pbp-quota')).code).toBe('NoSuchKey');
    await cluster.setQuota('pbp-quota', null);
    expect((await put('big', big, 'pbp-quota')).status).toBe(200);
  });
});

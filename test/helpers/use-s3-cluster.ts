/**
 * A describe block's Garage cluster (`startS3Cluster`): started before its first test, stopped
 * after its last. Each test takes a store under a prefix of its own (`fresh()`), so no two tests
 * of the block share a store. (Apart from s3-cluster.ts, which benchmarks import outside vitest.)
 */
import { afterAll, beforeAll } from 'vitest';

import type { S3StoreOptions, StoredObject } from '../../lib/chunk-provider/s3.js';
import { clusterStoreOptions, startS3Cluster, type S3Cluster } from './s3-cluster.js';

/** What {@link useS3Cluster} gives a describe block; read inside its tests and hooks only. */
export interface UsedS3Cluster {
  /** The running cluster. */
  readonly cluster: S3Cluster;
  /** The chunk store's options for the cluster's bucket, with `extra`, under a prefix no test of the block used before (`<tag><n>/store`). */
  fresh(extra?: Partial<S3StoreOptions>): S3StoreOptions;
}

/** Starts a cluster for the calling describe block (2 minutes allowed) and stops it after. */
export function useS3Cluster(tag: string): UsedS3Cluster {
  let cluster: S3Cluster | undefined;
  let n = 0;
  const started = (): S3Cluster => {
    if (!cluster) throw new Error('the S3 cluster is not running: read it inside a test or a hook of its describe block');
    return cluster;
  };
  beforeAll(async () => {
    cluster = await startS3Cluster();
  }, 120_000);
  afterAll(async () => {
    await cluster?.stop();
  });
  return {
    get cluster() {
      return started();
    },
    fresh: (extra = {}) => ({ ...clusterStoreOptions(started()), prefix: `${tag}${++n}/store`, ...extra }),
  };
}

/**
 * The objects under `prefix` that exist now: a listing, less what a HEAD no longer finds. Garage's
 * listing may show an object for a moment after its DELETE (19 of 300 right after a delete, under
 * load), while a HEAD is read-after-delete consistent; the store itself already takes a listed
 * manifest that is gone for a deleted backup. For tests that check what a delete left.
 */
export async function listedNow(objects: { list(prefix: string): Promise<StoredObject[]>; head(key: string): Promise<StoredObject | null> }, prefix: string): Promise<StoredObject[]> {
  const listed = await objects.list(prefix);
  const there = await Promise.all(listed.map(async (o) => (await objects.head(o.key)) !== null));
  return listed.filter((_, i) => there[i]);
}

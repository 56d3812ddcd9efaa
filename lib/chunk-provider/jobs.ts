/**
 * The two data paths of the chunk provider, one disk each, as the provider calls them: a backup
 * (the native core reads the NBD export, cuts fixed chunks, hashes, compresses, encrypts and
 * uploads them, and writes the `.fidx` index) and a restore (the core fetches the chunks an index
 * names, checks each against its digest and writes the target). The provider only says what to
 * do; all data flows through the core. {@link nativeChunkJobs} binds them to the native core;
 * tests may hand the provider others.
 *
 * @packageDocumentation
 */
import { native } from '../native.js';
import { NotImplementedError } from '../provider/errors.js';
import { fromNative } from './errors.js';
import type { S3StoreOptions } from './s3.js';

/** One disk to back up. */
export interface ChunkDiskBackup {
  /** The store (with its key file, when it has a key). */
  store: S3StoreOptions;
  /** The key fingerprint `store.json` records (the core checks the key file against it too). */
  storeFingerprint?: string;
  /** The snapshot's NBD export. */
  nbdUri: string;
  /** The disk's size. */
  size: number;
  /** Key of the `.fidx` object to write, relative to the store's prefix. */
  indexKey: string;
  /** Fixed chunk size (from `store.json`). */
  chunkSize: number;
  /**
   * The dirty bitmap on the export: only chunks holding dirty data are read, every other digest
   * comes from `previousIndexKey` (both or neither). Chunks dirty in part are completed from the
   * previous backup's chunk (a bitmap finer than a chunk on a restricted snapshot export).
   */
  bitmap?: string;
  /** Key of the previous backup's index of this disk (incremental; its chunks checked to exist). */
  previousIndexKey?: string;
  /** TRIM what was taken on the export (the fleecing snapshot). */
  discard: boolean;
  /** Bytes per second read at most. */
  bandwidthLimit?: number;
  onProgress?: (p: { done: number; total: number; bytesPerSecond: number }) => void;
  signal?: AbortSignal;
}

/** What one disk's backup did (the manifest's counters). */
export interface ChunkDiskSummary {
  bytesRead: number;
  /** Chunks of the disk. */
  chunks: number;
  /** Chunks uploaded. */
  uploaded: number;
  /** Chunks not uploaded because the store had them (read and found, or taken unread from the previous index). */
  reused: number;
  /** All-zero chunks (not stored). */
  zero: number;
  /** The index object written: its size and SHA-256 (for the manifest). */
  indexSize: number;
  indexSha256: string;
}

/** One disk to restore. */
export interface ChunkDiskRestore {
  store: S3StoreOptions;
  /** As for a backup. */
  storeFingerprint?: string;
  /** Key of the disk's `.fidx` object (its size and SHA-256 checked by the caller). */
  indexKey: string;
  /** A regular file or a block device. */
  target: string;
  /** The target reads as zeros already. */
  zeroed: boolean;
  bandwidthLimit?: number;
  onProgress?: (p: { done: number; total: number }) => void;
  signal?: AbortSignal;
}

/** The data paths the provider runs. */
export interface ChunkJobs {
  backupDisk(o: ChunkDiskBackup): Promise<ChunkDiskSummary>;
  restoreDisk(o: ChunkDiskRestore): Promise<void>;
}

/** A job of the binding: started, then awaited or cancelled. */
interface NativeJob<T> {
  wait(): Promise<T>;
  cancel(): void;
}

/**
 * Runs a native job, cancelling it on `signal`; the binding's errors become typed ones. The
 * progress callback runs on the JavaScript thread, where an exception would crash the process:
 * one that throws cancels the job instead, which then fails with what it threw.
 */
async function runJob<T, P>(start: (progress: ((p: P) => void) | undefined) => NativeJob<T>, onProgress: ((p: P) => void) | undefined, signal: AbortSignal | undefined): Promise<T> {
  let job: NativeJob<T> | undefined;
  let thrown: { error: unknown } | undefined;
  const progress =
    onProgress &&
    ((p: P): void => {
      if (thrown) return;
      try {
        onProgress(p);
      } catch (error) {
        thrown = { error };
        job?.cancel();
      }
    });
  try {
    job = start(progress);
  } catch (err) {
    throw fromNative(err);
  }
  const started = job;
  const onAbort = (): void => started.cancel();
  signal?.addEventListener('abort', onAbort, { once: true });
  if (signal?.aborted) started.cancel();
  try {
    const r = await started.wait();
    if (thrown) throw thrown.error;
    return r;
  } catch (err) {
    throw thrown ? thrown.error : fromNative(err);
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
}

/** The binding's job starters, when this build has them. */
type Starters = {
  startChunkBackup?: (options: unknown, progress?: (p: unknown) => void) => NativeJob<Record<string, number | string>>;
  startChunkRestore?: (options: unknown, progress?: (p: unknown) => void) => NativeJob<unknown>;
};

/**
 * The native core's chunk backup and restore. Until the binding has them, each call fails with
 * `ERR_NOT_IMPLEMENTED` naming the missing job.
 */
export const nativeChunkJobs: ChunkJobs = {
  async backupDisk(o) {
    const start = (native as unknown as Starters).startChunkBackup;
    if (!start) throw new NotImplementedError('startChunkBackup (the native chunk backup job is not in this build)', 'chunks');
    const s = await runJob(
      (progress) =>
        start(
          {
            store: o.store,
            ...(o.storeFingerprint ? { storeFingerprint: o.storeFingerprint } : {}),
            uri: o.nbdUri,
            indexKey: o.indexKey,
            chunkSize: o.chunkSize,
            discard: o.discard,
            // a chunk another backup or guest stored already is not uploaded again
            dedupByHead: true,
            ...(o.previousIndexKey !== undefined ? { previousIndexKey: o.previousIndexKey, bitmap: o.bitmap, fillFromPrevious: true } : {}),
            ...(o.bandwidthLimit !== undefined ? { bandwidthLimit: o.bandwidthLimit } : {}),
          },
          progress as ((p: unknown) => void) | undefined,
        ),
      o.onProgress,
      o.signal,
    );
    return {
      bytesRead: Number(s['bytesRead'] ?? 0),
      chunks: Number(s['chunks'] ?? 0),
      uploaded: Number(s['uploaded'] ?? 0),
      reused: Number(s['reused'] ?? 0) + Number(s['unchanged'] ?? 0),
      zero: Number(s['zero'] ?? 0),
      indexSize: Number(s['indexSize'] ?? 0),
      indexSha256: String(s['indexSha256'] ?? ''),
    };
  },
  async restoreDisk(o) {
    const start = (native as unknown as Starters).startChunkRestore;
    if (!start) throw new NotImplementedError('startChunkRestore (the native chunk restore job is not in this build)', 'chunks');
    await runJob(
      (progress) =>
        start(
          {
            store: o.store,
            ...(o.storeFingerprint ? { storeFingerprint: o.storeFingerprint } : {}),
            indexKey: o.indexKey,
            target: o.target,
            zeroed: o.zeroed,
            ...(o.bandwidthLimit !== undefined ? { bandwidthLimit: o.bandwidthLimit } : {}),
          },
          progress as ((p: unknown) => void) | undefined,
        ),
      o.onProgress,
      o.signal,
    );
  },
};

/**
 * The data paths of the chunk provider as the provider calls them. A VM disk's backup (the
 * native core reads the NBD export, cuts fixed chunks, hashes, compresses, encrypts and uploads
 * them, and writes the `.fidx` index) and restore (the core fetches the chunks an index names,
 * checks each against its digest and writes the target); a container's tar stream's backup (the
 * core reads a pipe, cuts content-defined chunks, uploads what the store lacks, writes the
 * `.didx`) and restore (the chunks, checked, written in order into a pipe or a file). The
 * provider only says what to
 * do; all data flows through the core. {@link nativeChunkJobs} binds them to the native core;
 * tests may hand the provider others.
 *
 * @packageDocumentation
 */
import { native, type Binding } from '../native.js';
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
  /** Key of the previous backup's index of this disk (incremental): its chunks are taken as stored, checked by the caller (`ChunkStore.missingChunks`). */
  previousIndexKey?: string;
  /** TRIM on the export (the fleecing snapshot) what the store holds: each range once its chunk is uploaded. */
  discard: boolean;
  /** Bytes per second read at most. */
  bandwidthLimit?: number;
  onProgress?: (p: Binding.NativeProgress) => void;
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

/** A stream (a container's tar stream) to back up. */
export interface ChunkStreamBackup {
  store: S3StoreOptions;
  /** As for a disk. */
  storeFingerprint?: string;
  /**
   * The stream: a pipe's read end, read by the core until its end. The job owns it from the
   * call on (it is closed whatever happens): the caller must not close it.
   */
  fd: number;
  /** Key of the `.didx` object to write, relative to the store's prefix. */
  indexKey: string;
  /** Key of the previous backup's `.didx`: its chunks are not uploaded again, less those that are fossils (the core checks, one listing). */
  previousIndexKey?: string;
  /** Bytes per second read from the stream at most. */
  bandwidthLimit?: number;
  onProgress?: (p: Binding.NativeProgress) => void;
  signal?: AbortSignal;
}

/** What a stream's backup did (the manifest's counters). */
export interface ChunkStreamSummary {
  /** The stream's length in bytes. */
  length: number;
  chunks: number;
  uploaded: number;
  /** Chunks the store had already (the previous index's, found by `head`, or repeated in the stream). */
  reused: number;
  indexSize: number;
  indexSha256: string;
  /** Chunks of the previous index that are fossils (a garbage collection moved them aside): not taken as known. */
  previousMissing: number;
}

/** A stream to restore. */
export interface ChunkStreamRestore {
  store: S3StoreOptions;
  storeFingerprint?: string;
  /** Key of the `.didx` (its size and SHA-256 checked by the caller). */
  indexKey: string;
  /**
   * Where the stream goes: a pipe's write end (the tar extractor's stdin) or a file opened for
   * writing. The job owns it from the call on and closes it at the end (the reader sees the
   * stream's end), also on failure (the reader sees it end early).
   */
  fd: number;
  bandwidthLimit?: number;
  onProgress?: (p: { done: number; total: number }) => void;
  signal?: AbortSignal;
}

/** What a stream's restore did. */
export interface ChunkStreamRestoreSummary {
  length: number;
  written: number;
  /** The reader closed its end before the stream's end (tar stops at the end-of-archive blocks). */
  readerClosed: boolean;
}

/** The data paths the provider runs. */
export interface ChunkJobs {
  backupDisk(o: ChunkDiskBackup): Promise<ChunkDiskSummary>;
  restoreDisk(o: ChunkDiskRestore): Promise<void>;
  backupStream(o: ChunkStreamBackup): Promise<ChunkStreamSummary>;
  restoreStream(o: ChunkStreamRestore): Promise<ChunkStreamRestoreSummary>;
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

/** A pipe `[readEnd, writeEnd]` (both close-on-exec) for {@link ChunkJobs.backupStream} and {@link ChunkJobs.restoreStream}. */
export function createPipe(): [number, number] {
  const [r, w] = native.createPipe();
  return [r!, w!];
}

/** The native core's chunk jobs (`startChunkBackup`, `startChunkRestore`, `startChunkStreamBackup`, `startChunkStreamRestore`). */
export const nativeChunkJobs: ChunkJobs = {
  async backupDisk(o) {
    const s = await runJob<Binding.ChunkBackupSummary, Binding.NativeProgress>(
      (progress) =>
        native.startChunkBackup(
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
          progress,
        ),
      o.onProgress,
      o.signal,
    );
    return {
      bytesRead: s.bytesRead,
      chunks: s.chunks,
      uploaded: s.uploaded,
      // read and found in the store, or taken unread from the previous index
      reused: s.reused + s.unchanged,
      zero: s.zero,
      indexSize: s.indexSize,
      indexSha256: s.indexSha256,
    };
  },
  async restoreDisk(o) {
    await runJob<Binding.ChunkRestoreSummary, Binding.NativeProgress>(
      (progress) =>
        native.startChunkRestore(
          {
            store: o.store,
            ...(o.storeFingerprint ? { storeFingerprint: o.storeFingerprint } : {}),
            indexKey: o.indexKey,
            target: o.target,
            zeroed: o.zeroed,
            ...(o.bandwidthLimit !== undefined ? { bandwidthLimit: o.bandwidthLimit } : {}),
          },
          progress,
        ),
      o.onProgress,
      o.signal,
    );
  },
  async backupStream(o) {
    const s = await runJob<Binding.ChunkStreamBackupSummary, Binding.NativeProgress>(
      (progress) =>
        native.startChunkStreamBackup(
          {
            store: o.store,
            ...(o.storeFingerprint ? { storeFingerprint: o.storeFingerprint } : {}),
            fd: o.fd,
            indexKey: o.indexKey,
            ...(o.previousIndexKey !== undefined ? { previousIndexKey: o.previousIndexKey } : {}),
            ...(o.bandwidthLimit !== undefined ? { bandwidthLimit: o.bandwidthLimit } : {}),
          },
          progress,
        ),
      o.onProgress,
      o.signal,
    );
    return {
      length: s.length,
      chunks: s.chunks,
      uploaded: s.uploaded,
      reused: s.reused,
      indexSize: s.indexSize,
      indexSha256: s.indexSha256,
      previousMissing: s.previousMissing,
    };
  },
  async restoreStream(o) {
    const s = await runJob<Binding.ChunkStreamRestoreSummary, Binding.NativeProgress>(
      (progress) =>
        native.startChunkStreamRestore(
          {
            store: o.store,
            ...(o.storeFingerprint ? { storeFingerprint: o.storeFingerprint } : {}),
            indexKey: o.indexKey,
            fd: o.fd,
            ...(o.bandwidthLimit !== undefined ? { bandwidthLimit: o.bandwidthLimit } : {}),
          },
          progress,
        ),
      o.onProgress,
      o.signal,
    );
    return { length: s.length, written: s.written, readerClosed: s.readerClosed };
  },
};

/** The chunks of some backups to verify (`verify` of a chunk store; see verify.ts). */
export interface ChunkVerify {
  store: S3StoreOptions;
  /** As for a backup. */
  storeFingerprint?: string;
  /** Who needs which chunks: a name (the backup's volume name) and the digests of its indexes. */
  sources: Array<{ name: string; digests: Buffer[] }>;
  /** Share of each source's distinct chunks to check, in (0, 100] (default 100: all), chosen at random per run. */
  samplePercent?: number;
  /** Bytes per second fetched at most. */
  bandwidthLimit?: number;
  onProgress?: (p: Binding.NativeVerifyProgress) => void;
  signal?: AbortSignal;
}

/**
 * Verifies chunks with the native core (`startChunkVerify`): each distinct chunk fetched once
 * (a fossil counts as present), decoded and checked against its digest. Missing and corrupt
 * chunks are results, each naming the sources that need it; the promise rejects only when the
 * store fails or the verify is cancelled.
 */
export async function nativeVerifyChunks(o: ChunkVerify): Promise<Binding.ChunkVerifySummary> {
  return runJob<Binding.ChunkVerifySummary, Binding.NativeVerifyProgress>(
    (progress) =>
      native.startChunkVerify(
        {
          store: o.store,
          ...(o.storeFingerprint ? { storeFingerprint: o.storeFingerprint } : {}),
          sources: o.sources.map((s) => ({ name: s.name, digests: Buffer.concat(s.digests) })),
          ...(o.samplePercent !== undefined ? { samplePercent: o.samplePercent } : {}),
          ...(o.bandwidthLimit !== undefined ? { bandwidthLimit: o.bandwidthLimit } : {}),
        },
        progress,
      ),
    o.onProgress,
    o.signal,
  );
}

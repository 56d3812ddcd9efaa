import { native, type Binding } from '../native.js';
import { NbdError, callNative, fromNative } from './errors.js';

/** What to read from an export and how. */
export interface ExtentReadOptions {
  /** The export, e.g. `nbd+unix:///drive-scsi0?socket=/run/backup.sock`. */
  uri: string;
  /** Dirty bitmap to read (incremental): only its dirty extents are read. Absent: the whole disk. */
  bitmap?: string;
  /** Intersect with `base:allocation` so holes stay holes; default true (falls back when refused). */
  useAllocation?: boolean;
  /** Largest single read in bytes; default 4 MiB, clamped to the server's maximum. */
  maxRequest?: number;
  /**
   * Units read at once across all connections; default 16. Their read buffers stay within 16
   * full-size units (64 MiB by default) whatever this says, so more requests only let more
   * small units (the runs of an incremental backup) in flight.
   */
  requests?: number;
  /** Connections to open when the server allows several (CAN_MULTI_CONN); default 2. */
  connections?: number;
  /** Copy-before-write cluster size that reads and discards align to; default 64 KiB. */
  clusterSize?: number;
  /**
   * TRIM each range on the export once the target has taken it; default false. TRIM destroys
   * the export's data: ask for it only on a fleecing snapshot (the snapshot-access export of
   * backup access), where it frees fleecing space, never on a disk served as it is. Fails with
   * `ERR_NBD_UNSUPPORTED` when the export does not accept TRIM.
   */
  discard?: boolean;
  /** Bandwidth limit in bytes per second; absent or 0 = unlimited. */
  bandwidthLimit?: number;
  /** Write all-zero blocks as holes; default true. */
  detectZeroes?: boolean;
  /**
   * Longest wait for the server's reply to a request, in milliseconds; default 300 000 (5
   * minutes), 0 waits forever. A server that leaves a request unanswered this long fails the
   * copy with an `NbdError` of code `ERR_NBD_TIMEOUT` naming the request (`command`, `offset`,
   * `length`) instead of hanging.
   */
  requestTimeoutMs?: number;
  /** Called at most about 10 times a second. */
  onProgress?: (progress: CopyProgress) => void;
  /** Cancels the copy: it then rejects with a `CancelledError` (code `ERR_CANCELLED`, name `AbortError`). */
  signal?: AbortSignal;
}

/** Options of {@link copyExtents}. */
export interface CopyExtentsOptions extends ExtentReadOptions {
  /**
   * `raw`: a sparse raw image at `path`; `qcow2`: a qcow2 v3 image at `path`. Both are written
   * under `<path>.part` and renamed into place only on success (except with `existing`), mode
   * 0600. `null`: read and throw away (verification, benchmarks). Default `raw`.
   */
  target?: 'raw' | 'qcow2' | 'null';
  /** Path of the image. */
  path?: string;
  /** qcow2: the previous backup this image is an increment of (stored as given, relative to the image's folder). */
  backingFile?: string;
  /** qcow2: format of the backing file; default `qcow2`. */
  backingFormat?: 'qcow2' | 'raw';
  /** qcow2: compress clusters; default `none`. `zstd` is fast; `zlib` is for old readers. */
  compression?: 'none' | 'zstd' | 'zlib';
  /** qcow2: cluster size in bytes; default 64 KiB. */
  qcow2ClusterSize?: number;
  /**
   * qcow2: record the content digests of the image while it is written; default false. For
   * every 64 clusters (4 MiB with 64 KiB clusters) that hold anything, the file records which
   * clusters hold data and which are zero clusters, and the SHA-256 of the data clusters' plain
   * content (before compression). They are written to `<path>.digests` (mode 0600, its own
   * checksum inside; format: `native/src/digests.rs`) before the image is renamed into place,
   * and the summary's `digests` names it. Hashing happens as the clusters go out, so no second
   * read of the image is needed; `checkImageDigests` (`lib/digests.ts`) checks the image later.
   * Any other target refuses it (`ERR_INVALID_ARGUMENT`).
   */
  digests?: boolean;
  /**
   * Write into an existing image at the same offsets (incremental over a copy of the last full
   * image). The image is written in place: a failed or killed copy leaves it half updated, so
   * write into a copy and keep the original until the copy succeeded (as `backupNbdToFile`
   * does). Without it, a raw target is written as `<path>.part` and renamed into place only on
   * success. Images the copy creates are readable by their owner only (mode 0600).
   */
  existing?: boolean;
}

/** Progress of a copy, reported at most about 10 times a second. */
export interface CopyProgress {
  /** Bytes the target has taken (data and zeros). */
  done: number;
  /** Bytes the copy will hand to the target (clean areas excluded). */
  total: number;
  /** Read rate since the start. */
  bytesPerSecond: number;
}

/** What a copy did. */
export interface CopySummary {
  /** Export size (the summary's numbers are exact below 2^53 bytes, 8 PiB). */
  bytesTotal: number;
  /** Bytes read over NBD. */
  bytesRead: number;
  /** Bytes that block status reported as zero: never read, written as holes. */
  bytesZero: number;
  /** Bytes read that turned out all zero (64 KiB blocks), written as holes; part of `bytesRead`. */
  bytesZeroDetected: number;
  /** Bytes not needed (clean in the bitmap). */
  bytesSkipped: number;
  /** Bytes discarded on the export after the target took them. */
  bytesTrimmed: number;
  /** Dirty (or allocated) extents handled. */
  extents: number;
  seconds: number;
  connections: number;
  /** The server refused `base:allocation` inside the dirty areas: planned from the bitmap alone. */
  allocationFallback: boolean;
  /** qcow2 with `digests`: the digest file written beside the image and the SHA-256 (hex) of its bytes. */
  digests?: { file: string; sha256: string };
}

/** A chunk of a {@link readChunks} stream: data, or a range that reads as zeros. */
export interface Chunk {
  offset: number;
  length: number;
  data?: Buffer;
  zero: boolean;
}

function toNative(o: CopyExtentsOptions): Binding.NativeCopyOptions {
  return {
    uri: o.uri,
    target: o.target,
    path: o.path,
    existing: o.existing,
    backingFile: o.backingFile,
    backingFormat: o.backingFormat,
    compression: o.compression,
    qcow2ClusterSize: o.qcow2ClusterSize,
    digests: o.digests,
    bitmap: o.bitmap,
    useAllocation: o.useAllocation,
    maxRequest: o.maxRequest,
    requests: o.requests,
    connections: o.connections,
    clusterSize: o.clusterSize,
    discard: o.discard,
    bandwidthLimit: o.bandwidthLimit,
    detectZeroes: o.detectZeroes,
    requestTimeoutMs: o.requestTimeoutMs,
  };
}

function toSummary(n: Binding.NativeSummary): CopySummary {
  const { digestsFile, digestsSha256, ...rest } = n;
  return digestsFile !== undefined && digestsFile !== null && typeof digestsSha256 === 'string'
    ? { ...rest, digests: { file: digestsFile, sha256: digestsSha256 } }
    : rest;
}

/**
 * A caller's progress callback, guarded: the native core calls it on the JavaScript thread, where
 * an exception would crash the process. One that throws cancels the copy instead, and the copy
 * then fails with what it threw.
 */
class GuardedProgress {
  /** What the callback threw, if it did. */
  thrown: { error: unknown } | undefined;
  job: Binding.NativeCopyJob | undefined;
  readonly callback: ((p: CopyProgress) => void) | undefined;

  constructor(onProgress: ((p: CopyProgress) => void) | undefined) {
    this.callback = onProgress && ((p) => {
      if (this.thrown) return;
      try {
        onProgress(p);
      } catch (error) {
        this.thrown = { error };
        this.job?.cancel();
      }
    });
  }

  /** The copy's result, unless the callback threw: then what it threw. */
  async settle<T>(result: Promise<T>): Promise<T> {
    try {
      const r = await result;
      if (this.thrown) throw this.thrown.error;
      return r;
    } catch (err) {
      throw this.thrown ? this.thrown.error : err;
    }
  }
}

/** Cancels `job` when `signal` fires; returns the function that stops listening. */
function linkSignal(job: Binding.NativeCopyJob, signal: AbortSignal | undefined): () => void {
  if (!signal) return () => {};
  const onAbort = (): void => job.cancel();
  if (signal.aborted) job.cancel();
  signal.addEventListener('abort', onAbort, { once: true });
  return () => signal.removeEventListener('abort', onAbort);
}

/**
 * Copies an export's dirty extents (or the whole disk) to a sparse raw or qcow2 image,
 * pipelined; with `discard: true`, each range is trimmed on the export once written.
 */
export async function copyExtents(options: CopyExtentsOptions): Promise<CopySummary> {
  const progress = new GuardedProgress(options.onProgress);
  const job = (() => {
    try {
      return native.startCopy(toNative(options), progress.callback);
    } catch (err) {
      throw fromNative(err);
    }
  })();
  progress.job = job;
  const unlink = linkSignal(job, options.signal);
  try {
    return toSummary(await progress.settle(callNative(() => job.wait())));
  } finally {
    unlink();
  }
}

/**
 * An export's extents as an async iterator of {@link Chunk}s, in ascending offset order, with
 * backpressure. With `discard: true`, a chunk's range is discarded on the export only once the
 * consumer asks for the next chunk (or the iteration ends), so data a consumer has not stored is
 * never lost.
 * `summary` resolves when the stream has ended.
 */
export interface ChunkStream extends AsyncIterable<Chunk> {
  readonly summary: Promise<CopySummary>;
  /** Stops the stream; pending reads end with `ERR_CANCELLED`. */
  cancel(): void;
}

/** Streams an export's extents to JavaScript; see {@link ChunkStream}. */
export function readChunks(options: ExtentReadOptions): ChunkStream {
  let job: Binding.NativeCopyJob;
  const progress = new GuardedProgress(options.onProgress);
  try {
    job = native.startChunkStream(toNative(options), progress.callback);
  } catch (err) {
    throw fromNative(err);
  }
  progress.job = job;
  const unlink = linkSignal(job, options.signal);
  const summary = progress.settle(callNative(() => job.wait())).then(toSummary).finally(unlink);
  // A consumer that never awaits `summary` must not see an unhandled rejection; errors also
  // surface through the iterator.
  summary.catch(() => {});
  return {
    summary,
    cancel: () => job.cancel(),
    async *[Symbol.asyncIterator](): AsyncIterator<Chunk> {
      let finished = false;
      try {
        for (;;) {
          let chunk: Binding.NativeChunk | null | undefined;
          try {
            chunk = await callNative(() => job.next());
          } catch (err) {
            // The stream only says that the copy stopped; the copy's own error says why
            // (the server's errno, the offset, a missing bitmap).
            await summary;
            throw err;
          }
          if (chunk === null || chunk === undefined) {
            finished = true;
            await summary; // the copy's own error, if any, wins over a clean end
            return;
          }
          yield { offset: chunk.offset, length: chunk.length, data: chunk.data ?? undefined, zero: chunk.zero };
        }
      } finally {
        // A consumer leaving the loop early (break, throw) must not leave the copy running.
        if (!finished) job.cancel();
      }
    },
  };
}

export { NbdError };

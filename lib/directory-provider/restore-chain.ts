/**
 * Restore of a backup chain of qcow2 layers to a raw target by the native core, checking what it
 * reads against each layer's digest file as it copies: every stored byte is read once (no
 * verify pass before the copy).
 *
 * @packageDocumentation
 */
import { InvalidArgumentError } from '../errors.js';
import { DirectoryStoreError } from './errors.js';
import { native, type Binding } from '../native.js';
import { fromNative } from '../nbd/errors.js';

/** One layer of a chain: a qcow2 image and its digest file (format v1, `<image>.digests`). */
export interface ChainLayer {
  /** Path of the qcow2 image. */
  image: string;
  /** Path of its digest file. */
  digestsFile: string;
}

/** Progress of a restore, about every 250 ms. */
export interface RestoreChainProgress {
  /** Bytes of the disk written or zeroed so far. */
  done: number;
  /** The disk's size. */
  total: number;
  bytesPerSecond: number;
}

/** Options of {@link restoreChain}. */
export interface RestoreChainOptions {
  /** The chain, base (the full backup) first; the top layer's size is the disk's size. */
  layers: readonly ChainLayer[];
  /**
   * A regular file (created with mode 0600 if missing, and sized to the disk) or a block device
   * (at least the disk's size).
   */
  target: string;
  /**
   * The target already reads as zeros (a file just created, a fresh thin volume): zero ranges
   * are left as holes. Otherwise they are zeroed (holes punched in a file, `BLKZEROOUT` on a
   * block device, zeros written where neither works).
   */
  zeroed: boolean;
  /** Worker threads (default 4). */
  threads?: number;
  /** Bytes per second read from the layers; 0 or absent: no limit. */
  bandwidthLimit?: number;
  /** Called on the JavaScript thread; one that throws stops the restore, which rejects with it. */
  onProgress?: (p: RestoreChainProgress) => void;
  /** Stops the restore; it then rejects with a `CancelledError`. */
  signal?: AbortSignal;
}

/** The outcome of {@link restoreChain}. */
export interface RestoreChainSummary {
  /** The disk's size. */
  bytes: number;
  /** Bytes written with data. */
  bytesData: number;
  /** Bytes left as holes or zeroed. */
  bytesZero: number;
  /** Bytes read from the layers, each stored byte once, and checked. */
  bytesRead: number;
  seconds: number;
}

/**
 * Restores a chain of qcow2 layers to a raw file or block device, sparse and in parallel,
 * verifying every layer against its digests while it reads it; the target is fdatasync-ed
 * before this resolves.
 *
 * On failure the target is left as it is, partly written: **the caller removes it** (or, for a
 * block device, knows it holds no valid disk): the blocks before the failure, and part of a
 * corrupt block, may have been written.
 *
 * @throws {@link DirectoryStoreError} `ERR_BACKUP_CORRUPT` when a layer or a digest file does not
 *   match: the message names the file (and for a layer the byte range), `file` holds its path.
 * @throws {@link InvalidArgumentError} for a chain the core does not restore (layers of
 *   different cluster sizes, a target that is neither a file nor a block device, or too small):
 *   restore it with `qemu-img convert` instead.
 * @throws `CancelledError` when `signal` fired; `NbdError` `ERR_SINK` when reading a layer or
 *   writing the target failed.
 */
export async function restoreChain(options: RestoreChainOptions): Promise<RestoreChainSummary> {
  if (options.layers.length === 0) throw new InvalidArgumentError('restoreChain needs at least one layer');
  const { threads, bandwidthLimit } = options;
  if (threads !== undefined && !(Number.isInteger(threads) && threads >= 1 && threads <= 64)) {
    throw new InvalidArgumentError(`threads must be an integer from 1 to 64, got ${threads}`);
  }
  if (bandwidthLimit !== undefined && !(Number.isSafeInteger(bandwidthLimit) && bandwidthLimit >= 0)) {
    throw new InvalidArgumentError(`bandwidthLimit must be a non-negative integer, got ${bandwidthLimit}`);
  }
  let thrown: { error: unknown } | undefined;
  let job: Binding.NativeRestoreJob | undefined;
  const onProgress = options.onProgress;
  const progress =
    onProgress &&
    ((p: Binding.NativeRestoreProgress): void => {
      if (thrown) return;
      try {
        onProgress({ done: p.done, total: p.total, bytesPerSecond: p.bytesPerSecond });
      } catch (error) {
        thrown = { error };
        job?.cancel();
      }
    });
  try {
    job = native.startRestore(
      {
        layers: options.layers.map((l) => ({ image: l.image, digestsFile: l.digestsFile })),
        target: options.target,
        zeroed: options.zeroed,
        threads,
        bandwidthLimit,
      },
      progress,
    );
  } catch (err) {
    throw translate(err, options.layers);
  }
  const started = job;
  const onAbort = (): void => started.cancel();
  if (options.signal?.aborted) started.cancel();
  options.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    const s = await started.wait();
    if (thrown) throw thrown.error;
    return { bytes: s.bytes, bytesData: s.bytesData, bytesZero: s.bytesZero, bytesRead: s.bytesRead, seconds: s.seconds };
  } catch (err) {
    if (thrown) throw thrown.error;
    throw translate(err, options.layers);
  } finally {
    options.signal?.removeEventListener('abort', onAbort);
  }
}

/**
 * The native error as a typed one: corruption becomes a {@link DirectoryStoreError} whose `file`
 * is the image or digest file the message starts with.
 */
function translate(err: unknown, layers: readonly ChainLayer[]): unknown {
  const e = fromNative(err);
  if (!(e instanceof Error) || (e as { code?: unknown }).code !== 'ERR_BACKUP_CORRUPT') return e;
  const file = layers.flatMap((l) => [l.image, l.digestsFile]).find((f) => e.message.startsWith(`${f}:`) || e.message.startsWith(`${f} `));
  return new DirectoryStoreError('ERR_BACKUP_CORRUPT', e.message, { file, cause: e });
}

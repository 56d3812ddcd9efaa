/**
 * Helpers for provider authors: a leveled logger over the job's log function, a bandwidth
 * limiter, NBD URIs and dirty regions, and {@link backupNbdToFile}, which stores a device's
 * snapshot as a sparse raw image with the native core.
 *
 * @packageDocumentation
 */
import { execFile } from 'node:child_process';
import { rename, rm } from 'node:fs/promises';
import { Transform, type TransformCallback } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';

import { InvalidArgumentError } from '../errors.js';
import { NbdClient, NBD_STATE_DIRTY } from '../nbd/client.js';
import { copyExtents, type CopyProgress, type CopySummary } from '../nbd/copy.js';
import { NbdError } from '../nbd/errors.js';
import { isSnapshotExport } from '../nbd/snapshot-exports.js';
import { nbdUnixUri } from '../qemu/names.js';
import type { BitmapMode } from '../qemu/types.js';
import type { LogFunction, LogLevel } from './api.js';

const execFileP = promisify(execFile);

/**
 * A logger writing through a {@link LogFunction}: call it as the log function itself,
 * `log('info', message)`, or with one method per level, `log.info(message)`.
 */
export interface ProviderLogger {
  (level: LogLevel, message: string): void;
  info(message: string): void;
  warn(message: string): void;
  err(message: string): void;
  /** Any level. */
  log(level: LogLevel, message: string): void;
}

/**
 * Binds a logger to the job's log function. A log function that throws never breaks the caller:
 * the error is dropped (a log line is not worth failing a backup).
 *
 * @param log - The log function the provider was constructed with.
 * @param prefix - Optional prefix for each message (e.g. the provider name and `': '`).
 */
export function createLogger(log: LogFunction | undefined, prefix = ''): ProviderLogger {
  const write = (level: LogLevel, message: string): void => {
    try {
      log?.(level, prefix + message);
    } catch {
      /* a throwing sink must not fail the backup */
    }
  };
  return Object.assign((level: LogLevel, message: string) => write(level, message), {
    info: (m: string) => write('info', m),
    warn: (m: string) => write('warn', m),
    err: (m: string) => write('err', m),
    log: write,
  });
}

/**
 * A token-bucket bandwidth limiter: `await limiter.consume(n)` before (or after) moving `n`
 * bytes keeps the average rate at `bytesPerSecond`, with bursts of at most one second's worth.
 * A limit of 0, `undefined` or `Infinity` means no limit.
 */
export class BandwidthLimiter {
  /** Bytes per second; 0 means unlimited. */
  readonly bytesPerSecond: number;
  private tokens: number;
  private last: number;

  /** @param bytesPerSecond - Limit in bytes per second (0 or absent: none). */
  constructor(bytesPerSecond?: number) {
    const bps = bytesPerSecond ?? 0;
    if (typeof bps !== 'number' || Number.isNaN(bps) || bps < 0) throw new InvalidArgumentError(`bandwidth limit must be a number >= 0, got ${String(bytesPerSecond)}`);
    this.bytesPerSecond = Number.isFinite(bps) ? bps : 0;
    this.tokens = this.bytesPerSecond;
    this.last = performance.now();
  }

  /** Whether a limit is set. */
  get limited(): boolean {
    return this.bytesPerSecond > 0;
  }

  /**
   * Waits until `bytes` may pass.
   * @param bytes - Amount about to be (or just) transferred.
   * @param signal - Stops waiting (rejects with the signal's reason).
   */
  async consume(bytes: number, signal?: AbortSignal): Promise<void> {
    if (!this.limited || bytes <= 0) return;
    const now = performance.now();
    this.tokens = Math.min(this.bytesPerSecond, this.tokens + ((now - this.last) / 1000) * this.bytesPerSecond);
    this.last = now;
    this.tokens -= bytes;
    if (this.tokens >= 0) return;
    const waitMs = (-this.tokens / this.bytesPerSecond) * 1000;
    await sleep(waitMs, undefined, signal ? { signal } : undefined);
  }

  /** A pass-through stream that paces the bytes flowing through it. */
  transform(signal?: AbortSignal): Transform {
    return new Transform({
      transform: (chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) => {
        this.consume(chunk.length, signal).then(
          () => cb(null, chunk),
          (err: Error) => cb(err),
        );
      },
    });
  }
}

/**
 * The URI of a device's export as the runner sets it up: the export name is the device name.
 * @param deviceName - Device name (as handed to `backupNbd`).
 * @param nbdPath - Unix socket of the NBD server.
 */
export function nbdUriFor(deviceName: string, nbdPath: string): string {
  return nbdUnixUri(deviceName, nbdPath);
}

/**
 * Iterates a bitmap's dirty regions on an export, ascending, adjacent regions merged. Without a
 * bitmap, yields `[0, size]` once.
 *
 * @param uri - The export.
 * @param bitmapName - Bitmap (meta context `qemu:dirty-bitmap:<name>`), or `undefined`.
 */
export async function* dirtyRegions(uri: string, bitmapName: string | undefined): AsyncGenerator<[number, number]> {
  const context = bitmapName === undefined ? undefined : `qemu:dirty-bitmap:${bitmapName}`;
  const nbd = await NbdClient.connect(uri, { metaContexts: context ? [context] : [] });
  try {
    if (!context) {
      if (nbd.size > 0) yield [0, nbd.size];
      return;
    }
    const step = 1024 * 1024 * 1024;
    let pending: [number, number] | undefined;
    for (let off = 0; off < nbd.size; ) {
      const len = Math.min(step, nbd.size - off);
      const extents = await nbd.blockStatus(off, len, context);
      let covered = 0;
      for (const e of extents) {
        covered += e.length;
        if (!(e.flags & NBD_STATE_DIRTY)) continue;
        if (pending && pending[0] + pending[1] === e.offset) pending[1] += e.length;
        else {
          if (pending) yield pending;
          pending = [e.offset, e.length];
        }
      }
      if (covered === 0) break;
      off += covered;
    }
    if (pending) yield pending;
  } finally {
    await nbd.close().catch(() => undefined);
  }
}

/** Sum of the dirty bytes of a bitmap on an export (the whole size without a bitmap). */
export async function dirtyBytes(uri: string, bitmapName: string | undefined): Promise<number> {
  let n = 0;
  for await (const [, len] of dirtyRegions(uri, bitmapName)) n += len;
  return n;
}

/** Options of {@link backupNbdToFile}. */
export interface BackupNbdToFileOptions {
  /** The export URI; or give `nbdPath` and `deviceName`. */
  uri?: string;
  /** NBD server socket (as handed to `backupNbd`). */
  nbdPath?: string;
  /** Device name = export name (as handed to `backupNbd`). */
  deviceName?: string;
  /** Bitmap mode handed to `backupNbd`. */
  bitmapMode: BitmapMode;
  /** Bitmap name handed to `backupNbd` (used in mode `reuse`). */
  bitmapName?: string;
  /** The raw image to write (sparse). */
  path: string;
  /**
   * Mode `reuse`: the image of the previous backup of this device. It is copied (reflink when
   * the filesystem can, sparse otherwise) to `<path>.part`, the dirty extents are written over
   * the copy, and the copy is renamed to `path` only on success: a failed run never leaves a mix
   * of two points in time, and `previous` is never written (it may equal `path`).
   */
  previous?: string;
  /** Bytes per second (0 or absent: none). */
  bandwidthLimit?: number;
  /**
   * Discard on the export what has been written. Default: only when the export is the snapshot
   * export of a running backup that the job runner handed the provider (a fleecing snapshot,
   * where discard frees fleecing space); never on any other export, where TRIM destroys data.
   */
  discard?: boolean;
  onProgress?: (progress: CopyProgress) => void;
  signal?: AbortSignal;
}

/**
 * Stores a device's point-in-time data as a sparse raw image, for providers that keep raw images:
 * full in modes `none` and `new`, incremental over the previous image in mode `reuse`.
 *
 * @returns The copy summary of the native core.
 * @throws InvalidArgumentError when mode `reuse` comes without `previous` or a bitmap name.
 */
export async function backupNbdToFile(o: BackupNbdToFileOptions): Promise<CopySummary> {
  const uri = o.uri ?? (o.nbdPath && o.deviceName ? nbdUriFor(o.deviceName, o.nbdPath) : undefined);
  if (!uri) throw new InvalidArgumentError('backupNbdToFile needs uri, or nbdPath and deviceName');
  const common = {
    uri,
    path: o.path,
    // by default only on the snapshot export of a running backup: TRIM elsewhere destroys data
    discard: o.discard ?? isSnapshotExport(uri),
    ...(o.bandwidthLimit ? { bandwidthLimit: o.bandwidthLimit } : {}),
    ...(o.onProgress ? { onProgress: o.onProgress } : {}),
    ...(o.signal ? { signal: o.signal } : {}),
  };
  if (o.bitmapMode !== 'reuse') return copyExtents(common);
  if (!o.bitmapName) throw new InvalidArgumentError('bitmap mode reuse needs the bitmap name');
  if (!o.previous) throw new InvalidArgumentError('bitmap mode reuse needs the previous image (option previous)');
  const part = `${o.path}.part`;
  try {
    await execFileP('cp', ['--reflink=auto', '--sparse=always', '--', o.previous, part]).catch((err: { stderr?: string; message: string }) => {
      throw new NbdError(`copying the previous image ${o.previous} failed: ${(err.stderr || err.message).trim()}`, { code: 'ERR_SINK', cause: err });
    });
    const summary = await copyExtents({ ...common, path: part, existing: true, bitmap: o.bitmapName });
    await rename(part, o.path);
    return summary;
  } catch (err) {
    await rm(part, { force: true });
    throw err;
  }
}

/**
 * Bandwidth limits in TypeScript, one behaviour for all: {@link BandwidthLimiter}, a token bucket
 * with a bounded burst, and {@link ThrottleStream}, the same bucket as a pass-through stream (what
 * vzdump does with `cstream -t` for container archives). The native core keeps its own bucket
 * (`native/src/ratelimit.rs`, 50 ms of burst) for the bytes it moves.
 *
 * "0 or absent means no limit" is decided once, by {@link normaliseBandwidthLimit}, where a limit
 * enters the package (the CLI, the job runner, the restore functions, the container tools); the
 * layers below take `number | undefined`.
 *
 * @packageDocumentation
 */
import { Transform, type TransformCallback } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';

import { InvalidArgumentError } from './errors.js';

/**
 * A bandwidth limit as the package passes it on: bytes per second, or `undefined` for none.
 *
 * `undefined`, `0` and `Infinity` mean no limit (`undefined`); any other number of bytes per
 * second above 0 is the limit.
 *
 * @param value - A limit as a caller gives it.
 * @param what - The argument's name, for the error message.
 * @throws InvalidArgumentError for a negative number, NaN or anything but a number.
 */
export function normaliseBandwidthLimit(value: unknown, what = 'bandwidth limit'): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'number' || Number.isNaN(value) || value < 0) {
    throw new InvalidArgumentError(`${what} must be a number of bytes per second >= 0, got ${String(value)}`);
  }
  return value === 0 || value === Infinity ? undefined : value;
}

/** Options of {@link BandwidthLimiter}. */
export interface BandwidthLimiterOptions {
  /**
   * How many seconds' worth of bytes the bucket holds at most, and holds at the start: the
   * largest burst, after any pause however long. Default 1.
   */
  burstSeconds?: number;
}

/**
 * A token-bucket bandwidth limiter: `await limiter.consume(n)` before (or after) moving `n`
 * bytes keeps the average rate at `bytesPerSecond`.
 *
 * The bucket fills at `bytesPerSecond` and holds at most `burstSeconds` worth of bytes (default
 * one second's worth; it starts full). So over any window of `w` seconds at most
 * `bytesPerSecond * (w + burstSeconds)` bytes pass, however long the transfer stalled before: idle
 * time does not pile up into a larger burst. A request larger than the bucket waits off its
 * debt, so any size works at any rate. A limit of 0, `undefined` or `Infinity` means no limit.
 */
export class BandwidthLimiter {
  /** Bytes per second; 0 means unlimited. */
  readonly bytesPerSecond: number;
  /** The most the bucket holds, in bytes. */
  private readonly burst: number;
  private tokens: number;
  private last: number;

  /**
   * @param bytesPerSecond - Limit in bytes per second (0 or absent: none).
   * @param options - The burst.
   * @throws InvalidArgumentError for a negative or non-number limit or burst.
   */
  constructor(bytesPerSecond?: number, options: BandwidthLimiterOptions = {}) {
    const burstSeconds = options.burstSeconds ?? 1;
    if (typeof burstSeconds !== 'number' || !Number.isFinite(burstSeconds) || burstSeconds < 0) {
      throw new InvalidArgumentError(`burstSeconds must be a finite number >= 0, got ${String(options.burstSeconds)}`);
    }
    this.bytesPerSecond = normaliseBandwidthLimit(bytesPerSecond) ?? 0;
    this.burst = this.bytesPerSecond * burstSeconds;
    this.tokens = this.burst;
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
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.bytesPerSecond);
    this.last = now;
    this.tokens -= bytes;
    if (this.tokens >= 0) return;
    const waitMs = (-this.tokens / this.bytesPerSecond) * 1000;
    await sleep(waitMs, undefined, signal ? { signal } : undefined);
  }

  /** A pass-through stream that paces the bytes flowing through it with this limiter. */
  transform(signal?: AbortSignal): Transform {
    return new ThrottleStream(this, signal);
  }
}

/** Largest piece passed on at once, so the rate is smooth even for large input chunks. */
const SLICE = 64 * 1024;

/**
 * Burst of a {@link ThrottleStream} given a number: 20 ms worth. An archive stream is paced
 * finely (as `cstream -t` does), so a pause of the reader or writer never turns into a flood
 * afterwards; 20 ms still absorbs the lateness of timers, so the rate holds.
 */
export const STREAM_BURST_SECONDS = 0.02;

/**
 * A pass-through stream that paces the bytes flowing through it with a {@link BandwidthLimiter},
 * in slices of at most 64 KiB: a slice is passed on once the bucket has paid for it. Counts the
 * bytes in `bytes`.
 *
 * Given a number, the stream has its own limiter with a burst of {@link STREAM_BURST_SECONDS}:
 * `n` bytes take at least `(n / bytesPerSecond) - 0.02` seconds, and after a stall the stream
 * goes on at the rate, without passing the stalled time's worth at once.
 */
export class ThrottleStream extends Transform {
  /** Bytes passed on so far. */
  bytes = 0;
  private readonly limiter: BandwidthLimiter;
  /** Aborted when the stream is destroyed (ends a pending wait) or when the caller's signal is. */
  private readonly stop = new AbortController();
  private readonly unlisten: () => void = () => undefined;

  /**
   * @param limit - The limit in bytes per second (0, less or absent: unthrottled, counting only),
   *   or a limiter to share.
   * @param signal - Stops a pending wait; the stream then fails with the signal's reason.
   */
  constructor(limit: number | BandwidthLimiter | undefined, signal?: AbortSignal) {
    super();
    this.limiter =
      limit instanceof BandwidthLimiter
        ? limit
        : new BandwidthLimiter(limit !== undefined && limit > 0 ? limit : 0, { burstSeconds: STREAM_BURST_SECONDS });
    if (signal?.aborted) this.stop.abort(signal.reason);
    else if (signal) {
      const onAbort = (): void => this.stop.abort(signal.reason);
      signal.addEventListener('abort', onAbort, { once: true });
      this.unlisten = () => signal.removeEventListener('abort', onAbort);
    }
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    if (!this.limiter.limited) {
      this.bytes += chunk.length;
      done(null, chunk);
      return;
    }
    // Once destroyed, the stream takes no more callbacks: a wait ended by destroy() is no error of its own.
    this.pace(chunk).then(
      () => {
        if (!this.destroyed) done();
      },
      (err: unknown) => {
        if (!this.destroyed) done(err as Error);
      },
    );
  }

  private async pace(chunk: Buffer): Promise<void> {
    for (let offset = 0; offset < chunk.length; offset += SLICE) {
      const piece = chunk.subarray(offset, offset + SLICE);
      await this.limiter.consume(piece.length, this.stop.signal);
      if (this.destroyed) return;
      this.push(piece);
      this.bytes += piece.length;
    }
  }

  override _destroy(err: Error | null, done: (error?: Error | null) => void): void {
    this.unlisten();
    this.stop.abort();
    done(err);
  }
}

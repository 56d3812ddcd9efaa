/**
 * Bandwidth limits in TypeScript: {@link BandwidthLimiter}, a token bucket.
 *
 * @packageDocumentation
 */
import { Transform, type TransformCallback } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';

import { InvalidArgumentError } from './errors.js';

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

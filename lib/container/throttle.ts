/**
 * A byte-rate limiter for archive streams (what vzdump does with `cstream -t`).
 *
 * @packageDocumentation
 */
import { Transform, type TransformCallback } from 'node:stream';

/** Largest piece passed on at once, so the rate is smooth even for large input chunks. */
const SLICE = 64 * 1024;

/**
 * A pass-through stream that lets at most `bytesPerSecond` bytes through per second, measured from
 * the first byte: after `n` bytes have passed, at least `n / bytesPerSecond` seconds have elapsed
 * (a slice of up to 64 KiB may go early, at the very start only). Counts the bytes in `bytes`.
 */
export class ThrottleStream extends Transform {
  /** Bytes passed on so far. */
  bytes = 0;
  private readonly rate: number;
  private start = 0;
  private timer: NodeJS.Timeout | undefined;

  /** @param bytesPerSecond - The limit; 0 or less passes data on unthrottled (counting only). */
  constructor(bytesPerSecond: number) {
    super();
    this.rate = bytesPerSecond > 0 ? bytesPerSecond : 0;
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    if (this.rate === 0) {
      this.bytes += chunk.length;
      done(null, chunk);
      return;
    }
    if (this.start === 0) this.start = performance.now();
    let offset = 0;
    const step = (): void => {
      while (offset < chunk.length) {
        const n = Math.min(SLICE, chunk.length - offset);
        // Earliest moment this slice may be passed on: the previous bytes must have "used" their time.
        const due = this.start + (this.bytes / this.rate) * 1000;
        const wait = due - performance.now();
        if (wait > 1) {
          this.timer = setTimeout(() => {
            this.timer = undefined;
            step();
          }, wait);
          return;
        }
        this.push(chunk.subarray(offset, offset + n));
        this.bytes += n;
        offset += n;
      }
      // The last slice also has to wait for its share of time before more input is accepted.
      const wait = this.start + (this.bytes / this.rate) * 1000 - performance.now();
      if (wait > 1) {
        this.timer = setTimeout(() => {
          this.timer = undefined;
          done();
        }, wait);
      } else {
        done();
      }
    };
    step();
  }

  override _flush(done: TransformCallback): void {
    done();
  }

  override _destroy(err: Error | null, done: (error?: Error | null) => void): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    done(err);
  }
}

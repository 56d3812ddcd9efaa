import { native, type Binding } from '../native.js';
import { callNative } from './errors.js';

/** Options for {@link NbdClient.connect}. */
export interface NbdConnectOptions {
  /** Meta contexts to negotiate; default `['base:allocation']`. */
  metaContexts?: string[];
  /** Use extended (64-bit) headers when the server offers them (QEMU >= 8.2); default true. */
  extendedHeaders?: boolean;
  /** Requests in flight on this connection; default 16 (QEMU serves at most 16 per client). */
  maxInFlight?: number;
  /**
   * Limit on connecting plus the NBD handshake, in milliseconds; default 30 000. A socket that
   * stays silent this long (not an NBD server, or a server that takes no more clients) fails
   * with an `NbdError` of code `ERR_NBD_IO` instead of hanging.
   */
  handshakeTimeoutMs?: number;
  /**
   * Longest wait for the reply to a request, in milliseconds; default 300 000 (5 minutes), 0
   * waits forever. A request left unanswered this long fails with an `NbdError` of code
   * `ERR_NBD_TIMEOUT` naming it, as does every request then pending: the connection is closed
   * (an NBD request cannot be withdrawn).
   */
  requestTimeoutMs?: number;
}

/** What the server told us about the export during the handshake. */
export interface ExportInfo {
  name: string;
  /**
   * Export size in bytes. Exact up to 2^53 (8 PiB); above, rounded to the nearest JS number:
   * use {@link ExportInfo.sizeExact} where that matters.
   */
  size: number;
  /** Export size in bytes, in decimal: exact for every size. */
  sizeExact: string;
  /** Raw NBD transmission flags. */
  flags: number;
  readOnly: boolean;
  canFlush: boolean;
  canTrim: boolean;
  canWriteZeroes: boolean;
  canFastZero: boolean;
  canMultiConn: boolean;
  blockSizes: { minimum: number; preferred: number; maximum: number };
  /** Meta contexts the server agreed to. */
  metaContexts: string[];
  structuredReplies: boolean;
  extendedHeaders: boolean;
}

/** One extent of a block status reply. For `base:allocation`, flag 1 = hole, 2 = reads as zero; for a dirty bitmap, 1 = dirty. */
export interface Extent {
  offset: number;
  length: number;
  flags: number;
}

/** `base:allocation` flag: the range is not allocated. */
export const NBD_STATE_HOLE = 1;
/** `base:allocation` flag: the range reads as zeros. */
export const NBD_STATE_ZERO = 2;
/** `qemu:dirty-bitmap:NAME` flag: the range is dirty. */
export const NBD_STATE_DIRTY = 1;

/**
 * A client of one NBD export, backed by the native core. Requests are pipelined: calls may be
 * issued concurrently and complete in any order.
 *
 * @example
 * ```ts
 * const nbd = await NbdClient.connect('nbd+unix:///drive0?socket=/run/backup.sock');
 * const head = await nbd.read(0, 65536);
 * await nbd.close();
 * ```
 */
export class NbdClient {
  private readonly inner: Binding.NativeNbdClient;
  /** Handshake results; see {@link ExportInfo}. */
  readonly info: ExportInfo;

  private constructor(inner: Binding.NativeNbdClient) {
    this.inner = inner;
    this.info = inner.info();
  }

  /** Connects to `uri` (`nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT`). */
  static async connect(uri: string, options: NbdConnectOptions = {}): Promise<NbdClient> {
    const inner = await callNative(() =>
      native.nbdConnect(uri, {
        metaContexts: options.metaContexts ?? ['base:allocation'],
        extendedHeaders: options.extendedHeaders,
        maxInFlight: options.maxInFlight,
        handshakeTimeoutMs: options.handshakeTimeoutMs,
        requestTimeoutMs: options.requestTimeoutMs,
      }),
    );
    return new NbdClient(inner);
  }

  /** Lists the meta contexts the server offers for `queries` (default: all). */
  static listMetaContexts(uri: string, queries: string[] = []): Promise<string[]> {
    return callNative(() => native.nbdListMetaContexts(uri, queries));
  }

  /** Export size in bytes. */
  get size(): number {
    return this.info.size;
  }

  /** Reads `length` bytes at `offset`; holes read as zeros. */
  read(offset: number, length: number): Promise<Buffer> {
    return callNative(() => this.inner.read(offset, length));
  }

  /** Writes `data` at `offset`; `fua` forces it to stable storage before the reply. */
  write(offset: number, data: Buffer, options: { fua?: boolean } = {}): Promise<void> {
    return callNative(() => this.inner.write(offset, data, options.fua));
  }

  /** Writes zeros; `mayTrim` lets the server punch a hole. */
  writeZeroes(offset: number, length: number, options: { mayTrim?: boolean } = {}): Promise<void> {
    return callNative(() => this.inner.writeZeroes(offset, length, options.mayTrim));
  }

  /** Discards a range (NBD TRIM). */
  trim(offset: number, length: number): Promise<void> {
    return callNative(() => this.inner.trim(offset, length));
  }

  flush(): Promise<void> {
    return callNative(() => this.inner.flush());
  }

  /** Block status of a whole range for one negotiated context (default `base:allocation`). */
  blockStatus(offset: number, length: number, context = 'base:allocation'): Promise<Extent[]> {
    return callNative(() => this.inner.blockStatus(offset, length, context));
  }

  /** Sends NBD_CMD_DISC and closes the connection. */
  close(): Promise<void> {
    return callNative(() => this.inner.disconnect());
  }
}

const BITMAP_PREFIX = 'qemu:dirty-bitmap:';

/** Names of the dirty bitmaps an export offers (QEMU's `qemu:dirty-bitmap:NAME` contexts). */
export async function listBitmaps(uri: string): Promise<string[]> {
  const contexts = await NbdClient.listMetaContexts(uri, [BITMAP_PREFIX]);
  return contexts.filter((c) => c.startsWith(BITMAP_PREFIX)).map((c) => c.slice(BITMAP_PREFIX.length));
}

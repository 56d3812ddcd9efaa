/**
 * Errors of the NBD client and the copy engine, and the translation of the native core's errors
 * into them.
 *
 * @packageDocumentation
 */
import { CancelledError, InvalidArgumentError, PveBackupError, type NbdErrorCode } from '../errors.js';

// The codes live in the package's error table; the native core also reports `ERR_CANCELLED` and
// `ERR_INVALID_ARGUMENT`, which become a CancelledError and an InvalidArgumentError (fromNative).
export type { NbdErrorCode } from '../errors.js';

/**
 * An error from the NBD client or the copy engine.
 *
 * `code` tells what kind of failure it is; a server error (`ERR_NBD_SERVER`) also carries the
 * errno name the server sent (`EIO`, `EINVAL`, ...), the command, and the offset and length of
 * the failing request. A timeout (`ERR_NBD_TIMEOUT`: the server left a request unanswered for
 * the request timeout) carries the command, offset and length of that request.
 */
export class NbdError extends PveBackupError {
  declare readonly code: NbdErrorCode;
  /** Errno name from the server, e.g. `EIO` (server errors only). */
  readonly errno?: string;
  /** The NBD command that failed or timed out, e.g. `READ` (server errors and timeouts). */
  readonly command?: string;
  /** Offset of the failing request or the offset the server named. */
  readonly offset?: number;
  /** Length of the failing request. */
  readonly length?: number;

  /**
   * @param message - What failed.
   * @param details - Code, and the server's errno, command, offset and length where known.
   */
  constructor(
    message: string,
    details: { code: NbdErrorCode; errno?: string; command?: string; offset?: number; length?: number; cause?: unknown },
  ) {
    super(message, { code: details.code, cause: details.cause });
    this.errno = details.errno;
    this.command = details.command;
    this.offset = details.offset;
    this.length = details.length;
  }
}

interface NativeErrorDetails {
  code: NbdErrorCode | 'ERR_CANCELLED' | 'ERR_INVALID_ARGUMENT';
  message: string;
  errno?: string;
  command?: string;
  offset?: number;
  length?: number;
}

/**
 * Turns an error thrown by the native binding into an {@link NbdError} (a {@link CancelledError}
 * or an {@link InvalidArgumentError} for those two codes, whose classes own them). The binding puts a JSON
 * object with the stable code and details into the message (see native/src/napi/error.rs).
 * @internal
 */
export function fromNative(err: unknown): unknown {
  if (!(err instanceof Error)) return err;
  let details: NativeErrorDetails;
  try {
    details = JSON.parse(err.message) as NativeErrorDetails;
  } catch {
    return err; // not ours (e.g. a type conversion error from napi itself)
  }
  if (typeof details?.code !== 'string' || typeof details.message !== 'string') return err;
  const { code, message, ...rest } = details;
  if (code === 'ERR_CANCELLED') return new CancelledError(message);
  if (code === 'ERR_INVALID_ARGUMENT') return new InvalidArgumentError(message);
  return new NbdError(message, { code, ...rest });
}

/** Runs a native call and translates its errors. @internal */
export async function callNative<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw fromNative(err);
  }
}

/**
 * Errors of the chunk store: its object storage (S3) and its key. One class,
 * {@link ChunkStoreError}, with a stable `code` per kind of problem, and the translation of the
 * native core's store errors into it.
 *
 * @packageDocumentation
 */
import { PveBackupError, type ChunkStoreErrorCode } from '../errors.js';
import { fromNative as nbdFromNative } from '../nbd/errors.js';

export type { ChunkStoreErrorCode } from '../errors.js';

const CODES: ReadonlySet<string> = new Set<ChunkStoreErrorCode>([
  'ERR_STORE_UNAVAILABLE',
  'ERR_STORE_ACCESS',
  'ERR_STORE_NOT_FOUND',
  'ERR_STORE_FULL',
  'ERR_KEY_REQUIRED',
  'ERR_KEY_MISMATCH',
]);

/**
 * An error of the chunk store (see {@link ChunkStoreErrorCode}). Match on `code`. The message
 * names the endpoint, the bucket and the object concerned.
 */
export class ChunkStoreError extends PveBackupError {
  declare readonly code: ChunkStoreErrorCode;

  /**
   * @param code - Stable code.
   * @param message - What failed, naming the endpoint, bucket and object.
   * @param options - Optional `cause`.
   */
  constructor(code: ChunkStoreErrorCode, message: string, options: { cause?: unknown } = {}) {
    super(message, { code, cause: options.cause });
  }
}

/**
 * Turns an error thrown by the native binding into a {@link ChunkStoreError} for the store's
 * codes, and otherwise as the NBD layer does (`InvalidArgumentError`, `CancelledError`,
 * `NbdError`). The binding puts a JSON object with the stable code into the message (see
 * native/src/napi/error.rs).
 * @internal
 */
export function fromNative(err: unknown): unknown {
  if (err instanceof Error) {
    let details: { code?: unknown; message?: unknown } | undefined;
    try {
      details = JSON.parse(err.message) as { code?: unknown; message?: unknown };
    } catch {
      details = undefined;
    }
    if (typeof details?.code === 'string' && typeof details.message === 'string' && CODES.has(details.code)) {
      return new ChunkStoreError(details.code as ChunkStoreErrorCode, details.message);
    }
  }
  return nbdFromNative(err);
}

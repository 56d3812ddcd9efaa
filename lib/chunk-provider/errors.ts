/**
 * Errors of the chunk store: its object storage (S3) and its key. One class,
 * {@link ChunkStoreError}, with a stable `code` per kind of problem, and the translation of the
 * native core's store errors into it.
 *
 * @packageDocumentation
 */
import { PveBackupError, type ChunkStoreErrorCode, type DirectoryStoreErrorCode } from '../errors.js';
import { DirectoryStoreError } from '../directory-provider/errors.js';
import { fromNative as nbdFromNative } from '../nbd/errors.js';

export type { ChunkStoreErrorCode } from '../errors.js';

const CODES: ReadonlySet<string> = new Set<ChunkStoreErrorCode>([
  'ERR_STORE_UNAVAILABLE',
  'ERR_STORE_ACCESS',
  'ERR_STORE_NOT_FOUND',
  'ERR_STORE_FULL',
  'ERR_KEY_REQUIRED',
  'ERR_KEY_MISMATCH',
  'ERR_WRITER_EXPIRED',
  'ERR_GC_RUNNING',
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
 * An error of a backup in the chunk store: the codes both reference stores share
 * (`ERR_BACKUP_CORRUPT`: a manifest, index, blob or chunk that does not match its checksum,
 * signature or digest; `ERR_BACKUP_VERSION`, `ERR_UNKNOWN_VOLUME`, `ERR_INVALID_VOLID`,
 * `ERR_BACKUP_PROTECTED`, `ERR_PROVIDER_STATE`). A `DirectoryStoreError`, the family that owns
 * those codes, so one `catch` handles both stores; `file` is the object's key under the
 * store's prefix.
 */
export class ChunkBackupError extends DirectoryStoreError {}

/** The backup codes the native core's chunk restore and index reader throw. */
const BACKUP_CODES: ReadonlySet<string> = new Set<DirectoryStoreErrorCode>(['ERR_BACKUP_CORRUPT', 'ERR_BACKUP_VERSION']);

/**
 * Turns an error thrown by the native binding into a {@link ChunkStoreError} for the store's
 * codes, a {@link ChunkBackupError} for a corrupt or too new backup, and otherwise as the NBD layer does (`InvalidArgumentError`, `CancelledError`,
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
    if (typeof details?.code === 'string' && typeof details.message === 'string' && BACKUP_CODES.has(details.code)) {
      return new ChunkBackupError(details.code as DirectoryStoreErrorCode, details.message);
    }
  }
  return nbdFromNative(err);
}

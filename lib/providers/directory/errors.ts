/**
 * Errors of the directory store and provider. One class, {@link DirectoryStoreError}, with a
 * stable `code` per kind of problem, the volume concerned and (for corruption) the file.
 *
 * @packageDocumentation
 */
import { PveBackupError } from '../../errors.js';

/** Stable codes of {@link DirectoryStoreError} (each described in `ErrorCode`, lib/errors.ts). */
export type DirectoryStoreErrorCode =
  | 'ERR_NOT_A_STORE'
  | 'ERR_INVALID_VOLID'
  | 'ERR_UNKNOWN_VOLUME'
  | 'ERR_BACKUP_INCOMPLETE'
  | 'ERR_BACKUP_CORRUPT'
  | 'ERR_CHAIN_BROKEN'
  | 'ERR_CHAIN_DELETE'
  | 'ERR_BACKUP_PROTECTED'
  | 'ERR_STORE_IO'
  | 'ERR_PROVIDER_STATE';

/** An error of the directory store (see {@link DirectoryStoreErrorCode}). Match on `code`. */
export class DirectoryStoreError extends PveBackupError {
  declare readonly code: DirectoryStoreErrorCode;
  /** Volume name concerned, when there is one. */
  readonly volname: string | undefined;
  /** File concerned (corruption), when there is one. */
  readonly file: string | undefined;

  /**
   * @param code - Stable code.
   * @param message - One line naming what is wrong.
   * @param options - Volume, file, cause.
   */
  constructor(code: DirectoryStoreErrorCode, message: string, options: { volname?: string; file?: string; cause?: unknown } = {}) {
    super(message, { code, cause: options.cause });
    this.volname = options.volname;
    this.file = options.file;
  }
}

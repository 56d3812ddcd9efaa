/**
 * Errors of the directory store and provider. One class, {@link DirectoryStoreError}, with a
 * stable `code` per kind of problem, the volume concerned and (for corruption) the file.
 *
 * @packageDocumentation
 */
import { PveBackupError, type DirectoryStoreErrorCode } from '../errors.js';

export type { DirectoryStoreErrorCode } from '../errors.js';

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

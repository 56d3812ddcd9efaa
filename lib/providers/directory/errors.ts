/**
 * Errors of the directory store and provider. One class, {@link DirectoryStoreError}, with a
 * stable `code` per kind of problem, the volume concerned and (for corruption) the file.
 *
 * @packageDocumentation
 */
import { PveBackupError } from '../../errors.js';

/** Stable codes of {@link DirectoryStoreError}. */
export type DirectoryStoreErrorCode =
  /** The path is not a directory store (no `pve-backup-store.json`, or not a directory). */
  | 'ERR_NOT_A_STORE'
  /** A volume id / name that is malformed. */
  | 'ERR_INVALID_VOLID'
  /** A well-formed volume id naming no backup of this store (or one of another store). */
  | 'ERR_UNKNOWN_VOLUME'
  /** A backup without a manifest: interrupted or still being written. */
  | 'ERR_BACKUP_INCOMPLETE'
  /** A manifest or file that does not match its checksum, or an image `qemu-img check` refuses (restore, and delete before a merge). */
  | 'ERR_BACKUP_CORRUPT'
  /** The backup an incremental backup builds on is missing or incomplete. */
  | 'ERR_CHAIN_BROKEN'
  /** Deleting would break a chain and the backup cannot be merged into its child. */
  | 'ERR_CHAIN_DELETE'
  /** The backup is protected (pass `force` to delete it anyway). */
  | 'ERR_BACKUP_PROTECTED'
  /** Reading or writing a file of the store failed (a full disk, an I/O error); `file` names it. */
  | 'ERR_STORE_IO'
  /** The provider was asked for something its state does not allow (e.g. no backup started). */
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

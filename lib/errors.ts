/**
 * Error base class of the package.
 *
 * Every error thrown by pve-backup-provider extends {@link PveBackupError}: it has a `name` (the
 * class name), a stable machine-readable `code` (such as `ERR_QMP_CLOSED`) and, where it wraps
 * another error, a `cause`. Subclasses add typed fields (for example QEMU's error class).
 *
 * @packageDocumentation
 */

/** Options accepted by {@link PveBackupError} and its subclasses. */
export interface PveBackupErrorOptions {
  /** Stable code, `ERR_` followed by upper-case words (for example `ERR_QMP_TIMEOUT`). */
  code: string;
  /** The error this one wraps, if any. */
  cause?: unknown;
}

/**
 * Base class of every error of the package.
 *
 * Match on `code` (stable across releases) rather than on the message. `name` is set to the
 * concrete class name, so `String(err)` and stack traces say what kind of error it is.
 */
export class PveBackupError extends Error {
  /** Stable error code, for example `ERR_INVALID_ARGUMENT`. */
  readonly code: string;

  /**
   * @param message - Human readable description.
   * @param options - The stable `code` and an optional `cause`.
   */
  constructor(message: string, options: PveBackupErrorOptions) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = options.code;
  }
}

/** A caller passed a value that is not acceptable (code `ERR_INVALID_ARGUMENT`). */
export class InvalidArgumentError extends PveBackupError {
  /**
   * @param message - What is wrong with which argument.
   * @param options - Optional `cause`.
   */
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { code: 'ERR_INVALID_ARGUMENT', cause: options.cause });
  }
}

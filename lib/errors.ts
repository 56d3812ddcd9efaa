/**
 * The error table of the package: every stable code ({@link ErrorCode}) and the base classes.
 *
 * Every error thrown by pve-backup-provider extends {@link PveBackupError}: it has a `name` (the
 * class name), a stable machine-readable `code` (one of {@link ErrorCode}) and, where it wraps
 * another error, a `cause`. Each code belongs to one family of errors, a class that adds typed
 * fields (for example QEMU's error class); the families live beside the code that throws them
 * (`lib/nbd/errors.ts`, `lib/qmp/errors.ts`, `lib/qemu/errors.ts`, `lib/provider/errors.ts`,
 * `lib/container/errors.ts`, `lib/directory-provider/errors.ts`, `lib/chunk-provider/errors.ts`,
 * `lib/cli/errors.ts`), the
 * families every layer uses ({@link InvalidArgumentError}, {@link CancelledError}) here, and so
 * do the code unions of the families with several codes (those modules re-export them). A
 * family that needs one of those codes subclasses it or wraps it as `cause`, so `instanceof`
 * and `code` always agree.
 *
 * @packageDocumentation
 */

/** Codes of `NbdError`: the NBD client and the copy engine. */
export type NbdErrorCode =
  /** A socket error talking to the NBD server. */
  | 'ERR_NBD_IO'
  /** The NBD server broke the protocol. */
  | 'ERR_NBD_PROTOCOL'
  /** The NBD server answered a request with an error (`errno` names it). */
  | 'ERR_NBD_SERVER'
  /** The NBD connection is closed. */
  | 'ERR_NBD_CLOSED'
  /** The NBD export does not support what was asked (a command, a meta context, TRIM). */
  | 'ERR_NBD_UNSUPPORTED'
  /** The NBD server left a request unanswered for the request timeout. */
  | 'ERR_NBD_TIMEOUT'
  /** The copy's destination (file, image, consumer) failed. */
  | 'ERR_SINK';

/** Codes of `ContainerToolError`: which external program failed. */
export type ContainerToolErrorCode =
  /** GNU tar failed (`ContainerToolError`). */
  | 'ERR_TAR'
  /** rsync failed (`ContainerToolError`). */
  | 'ERR_RSYNC'
  /** getfattr/setfattr failed reading or writing ACLs and capabilities (`ContainerToolError`). */
  | 'ERR_ACL';

/** Codes of `DirectoryStoreError`: the directory store and provider. */
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
  /** A backup whose manifest was written by a newer version of this package (a version this one does not read). */
  | 'ERR_BACKUP_VERSION'
  /** The backup an incremental backup builds on is missing or incomplete. */
  | 'ERR_CHAIN_BROKEN'
  /** Deleting would break a chain and the backup cannot be merged into its child. */
  | 'ERR_CHAIN_DELETE'
  /** The backup is protected (pass `force` to delete it anyway). */
  | 'ERR_BACKUP_PROTECTED'
  /** Reading or writing a file of the store failed (a full disk, an I/O error); `file` names it. */
  | 'ERR_STORE_IO'
  /** Another process is deleting or pruning backups of the same guest: try again when it is done. */
  | 'ERR_STORE_BUSY'
  /** The provider was asked for something its state does not allow (e.g. no backup started). */
  | 'ERR_PROVIDER_STATE';

/** Codes of `ChunkStoreError`: the chunk store on object storage and its key. */
export type ChunkStoreErrorCode =
  /** The object store does not answer, or kept failing (5xx, throttling) until the retries ran out. */
  | 'ERR_STORE_UNAVAILABLE'
  /** The object store refused the credentials (an unknown access key id, a wrong secret key) or the request. */
  | 'ERR_STORE_ACCESS'
  /** The bucket does not exist. */
  | 'ERR_STORE_NOT_FOUND'
  /** The object store refused a write for lack of space (a bucket quota). */
  | 'ERR_STORE_FULL'
  /**
   * TLS refused the object store's certificate: it is not the pinned one (a `fingerprint` was
   * given: the message names the fingerprint the server presented; never retried), or no CA
   * trusted here signed it.
   */
  | 'ERR_STORE_CERTIFICATE'
  /** The store is encrypted and no key was given. */
  | 'ERR_KEY_REQUIRED'
  /** The key given is not the store's key. */
  | 'ERR_KEY_MISMATCH'
  /**
   * A running backup's writer record was removed by a garbage collection that took the backup
   * for dead (no heartbeat for 15 minutes): the backup is not completed, as the collection may
   * have moved chunks it names.
   */
  | 'ERR_WRITER_EXPIRED'
  /** Another garbage collection of the store is running. */
  | 'ERR_GC_RUNNING';

/** Codes of `DemoError`: the command line's demo. */
export type DemoErrorCode =
  /** The demo could not run a phase (`DemoError`). */
  | 'ERR_DEMO'
  /** The demo's restored disk differs from the original (`DemoError`). */
  | 'ERR_DEMO_MISMATCH';

/**
 * Every stable code the package throws. Match on these (they are stable across releases), not on
 * messages. The class that owns each code is named after it; the codes of the families with
 * several are the unions above.
 */
export type ErrorCode =
  /** A caller passed a value that is not acceptable ({@link InvalidArgumentError}). */
  | 'ERR_INVALID_ARGUMENT'
  /** The operation was cancelled through its `AbortSignal`, or the CLI by a signal ({@link CancelledError}). */
  | 'ERR_CANCELLED'
  /** A program the library runs is not installed (`ToolMissingError`). */
  | 'ERR_TOOL_MISSING'
  /** QEMU answered a command with an error (`QmpError`). */
  | 'ERR_QMP'
  /** The QMP connection closed, or could not be opened (`QmpClosedError`). */
  | 'ERR_QMP_CLOSED'
  /** A QMP command or the greeting did not complete in time (`QmpTimeoutError`). */
  | 'ERR_QMP_TIMEOUT'
  /** The socket does not speak QMP (`QmpProtocolError`). */
  | 'ERR_QMP_NOT_QMP'
  /** The QMP socket accepted but sent no greeting: another client holds the monitor (`QmpBusyError`). */
  | 'ERR_QMP_BUSY'
  /** Setting up or tearing down backup access failed (`BackupAccessError`). */
  | 'ERR_BACKUP_ACCESS'
  /** Another backup access is active on the QEMU process (`BackupAccessActiveError`). */
  | 'ERR_BACKUP_ACCESS_ACTIVE'
  /** The fleecing image ran out of space during the backup (`FleecingFullError`). */
  | 'ERR_FLEECING_FULL'
  /** qemu-storage-daemon (or QEMU) exited or did not open its QMP socket while starting (`QemuStartError`). */
  | 'ERR_QEMU_START'
  /** `qemu-img` failed (`QemuImgError`). */
  | 'ERR_QEMU_IMG'
  /** The provider declares an API version the runner cannot serve (`ProviderApiVersionError`). */
  | 'ERR_PROVIDER_API_VERSION'
  /** A provider method that was called is not implemented (`NotImplementedError`). */
  | 'ERR_NOT_IMPLEMENTED'
  /** The provider asked for a mechanism the runner does not support, or none (`MechanismError`). */
  | 'ERR_MECHANISM'
  /** A provider method returned something that breaks its contract (`ProviderResultError`). */
  | 'ERR_PROVIDER_RESULT'
  /** The backup job was aborted (`JobAbortedError`). */
  | 'ERR_JOB_ABORTED'
  /** A restore failed (`RestoreError`). */
  | 'ERR_RESTORE'
  /** Setting the protected flag or pruning after a guest's backup failed, which fails the guest as in vzdump (`StorageHookError`). */
  | 'ERR_STORAGE_HOOK'
  /** An id map is malformed or does not cover an id (`IdMapError`). */
  | 'ERR_IDMAP'
  /** A restore target is not empty (`RootdirNotEmptyError`). */
  | 'ERR_ROOTDIR_NOT_EMPTY'
  /** Bad command line usage found inside a command (`UsageError`, exit code 2). */
  | 'ERR_USAGE'
  /** A restore target file exists and `--force` was not given (`TargetExistsError`). */
  | 'ERR_TARGET_EXISTS'
  /** `verify` found backups that failed verification (`VerifyFailedError`). */
  | 'ERR_VERIFY_FAILED'
  /** A guest's backup failed (`BackupFailedError`; the CLI's line shows the cause's code when it has one). */
  | 'ERR_BACKUP_FAILED'
  /** The Perl bridge's protocol was broken or asked for what the provider host cannot serve (`BridgeError`). */
  | 'ERR_BRIDGE'
  /** `pve-plugin generate|install` would replace a file another plugin wrote; `--force` not given (`PluginFileExistsError`). */
  | 'ERR_PLUGIN_FILE_EXISTS'
  | NbdErrorCode
  | ContainerToolErrorCode
  | DirectoryStoreErrorCode
  | ChunkStoreErrorCode
  | DemoErrorCode;

/** Options accepted by {@link PveBackupError}. */
export interface PveBackupErrorOptions {
  /** Stable code (one of {@link ErrorCode}). */
  code: ErrorCode;
  /** The error this one wraps, if any. */
  cause?: unknown;
}

/**
 * Base class of every error of the package.
 *
 * Match on `code` (stable across releases) rather than on the message, or on the family class
 * with `instanceof`. `name` is set to the concrete class name, so `String(err)` and stack traces
 * say what kind of error it is. Throw a family class, never this one directly: each code has
 * one.
 */
export class PveBackupError extends Error {
  /** Stable error code, for example `ERR_INVALID_ARGUMENT`. */
  readonly code: ErrorCode;

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
  declare readonly code: 'ERR_INVALID_ARGUMENT';

  /**
   * @param message - What is wrong with which argument.
   * @param options - Optional `cause`.
   */
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { code: 'ERR_INVALID_ARGUMENT', cause: options.cause });
  }
}

/**
 * The operation was cancelled through its `AbortSignal` (code `ERR_CANCELLED`); `cause` is the
 * signal's reason (or the error the cancellation interrupted).
 *
 * Its `name` is `AbortError`, as the Web platform's and Node's own cancellations, for every
 * cancellation of the package (NBD copies, container tools, `qemu-img`, the CLI), so code
 * that checks `err.name === 'AbortError'` works on all of them. Families with a cancellation
 * of their own subclass it (`ContainerAbortError`).
 */
export class CancelledError extends PveBackupError {
  declare readonly code: 'ERR_CANCELLED';

  /**
   * @param message - What was cancelled (default `cancelled`).
   * @param options - Optional `cause`.
   */
  constructor(message = 'cancelled', options: { cause?: unknown } = {}) {
    super(message, { code: 'ERR_CANCELLED', cause: options.cause });
    this.name = 'AbortError';
  }
}

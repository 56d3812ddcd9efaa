/**
 * Errors of the command line. `main` (program.ts) turns each into one line on stderr ending with
 * its code, and an exit code.
 *
 * @packageDocumentation
 */
import { PveBackupError, type DemoErrorCode } from '../errors.js';

/** Bad usage found inside a command's action (code `ERR_USAGE`): one line, exit code 2. */
export class UsageError extends PveBackupError {
  declare readonly code: 'ERR_USAGE';

  /** @param message - What is wrong with the command line. */
  constructor(message: string) {
    super(message, { code: 'ERR_USAGE' });
  }
}

/** A restore target file exists and `--force` was not given (code `ERR_TARGET_EXISTS`). */
export class TargetExistsError extends PveBackupError {
  declare readonly code: 'ERR_TARGET_EXISTS';
  /** The file that exists. */
  readonly target: string;

  /** @param target - The file that exists (absolute). */
  constructor(target: string) {
    super(`restore target ${target} exists; give --force to replace it`, { code: 'ERR_TARGET_EXISTS' });
    this.target = target;
  }
}

/** `verify` found backups that failed verification (code `ERR_VERIFY_FAILED`). */
export class VerifyFailedError extends PveBackupError {
  declare readonly code: 'ERR_VERIFY_FAILED';
  /** How many backups failed. */
  readonly failed: number;
  /** How many backups were verified. */
  readonly total: number;

  /**
   * @param failed - How many backups failed.
   * @param total - How many were verified.
   */
  constructor(failed: number, total: number) {
    super(`${failed} of ${total} backup(s) failed verification`, { code: 'ERR_VERIFY_FAILED' });
    this.failed = failed;
    this.total = total;
  }
}

/**
 * The backup of a guest failed (code `ERR_BACKUP_FAILED`); `cause` is the guest's error.
 *
 * `causeCode` is the cause's own `code`, if it has one: the CLI reports that one (`main` prints
 * `[ERR_FLEECING_FULL]`, not `[ERR_BACKUP_FAILED]`), since it tells the operator what to do.
 */
export class BackupFailedError extends PveBackupError {
  declare readonly code: 'ERR_BACKUP_FAILED';
  /** The guest whose backup failed. */
  readonly vmid: number;
  /** Its type. */
  readonly vmtype: 'qemu' | 'lxc';
  /** The `code` of the cause (any string a provider's error may carry), when it has one. */
  readonly causeCode: string | undefined;

  /**
   * @param vmid - The guest.
   * @param vmtype - Its type.
   * @param cause - The guest's error, if any.
   */
  constructor(vmid: number, vmtype: 'qemu' | 'lxc', cause?: unknown) {
    const message = (cause as { message?: unknown } | undefined)?.message;
    super(`backup of ${vmtype === 'qemu' ? 'VM' : 'CT'} ${vmid} failed: ${message ?? 'unknown error'}`, { code: 'ERR_BACKUP_FAILED', cause });
    this.vmid = vmid;
    this.vmtype = vmtype;
    const code = (cause as { code?: unknown } | undefined)?.code;
    this.causeCode = typeof code === 'string' ? code : undefined;
  }
}

export type { DemoErrorCode } from '../errors.js';

/**
 * The demo failed: a phase's backup failed (code `ERR_DEMO`), or what it restored differs from
 * the disk at its point in time (code `ERR_DEMO_MISMATCH`).
 */
export class DemoError extends PveBackupError {
  declare readonly code: DemoErrorCode;

  /**
   * @param code - Which failure.
   * @param message - What failed.
   */
  constructor(code: DemoErrorCode, message: string) {
    super(message, { code });
  }
}

/**
 * Errors of backup access and of the QEMU programs the library runs (qemu-storage-daemon,
 * qemu-img).
 *
 * @packageDocumentation
 */
import { PveBackupError } from '../errors.js';
import { QmpError } from '../qmp/errors.js';

/**
 * Setting up or tearing down backup access failed (code `ERR_BACKUP_ACCESS`). The message names
 * the device and, when QEMU refused, the QMP command; `cause` is the underlying error.
 */
export class BackupAccessError extends PveBackupError {
  declare readonly code: 'ERR_BACKUP_ACCESS';
  /** Device concerned, when the failure concerns one. */
  readonly device: string | undefined;
  /** QMP command that failed, when QEMU refused. */
  readonly command: string | undefined;

  /**
   * @param message - What failed.
   * @param options - Device, command and cause.
   */
  constructor(message: string, options: { device?: string; command?: string; cause?: unknown } = {}) {
    const cmd = options.command ?? (options.cause instanceof QmpError ? options.cause.command : undefined);
    super(message, { code: 'ERR_BACKUP_ACCESS', cause: options.cause });
    this.device = options.device;
    this.command = cmd;
  }
}

/** Another backup access is active on this QEMU process (code `ERR_BACKUP_ACCESS_ACTIVE`). */
export class BackupAccessActiveError extends PveBackupError {
  declare readonly code: 'ERR_BACKUP_ACCESS_ACTIVE';
  /** Target id of the active access (`undefined` when only leftovers without a record were found). */
  readonly activeTargetId: string | undefined;

  /**
   * @param activeTargetId - Target id of the access already active.
   * @param detail - What was found.
   */
  constructor(activeTargetId: string | undefined, detail = '') {
    const who = activeTargetId === undefined ? 'an unknown target' : `target '${activeTargetId}'`;
    super(`a backup access for ${who} is already active${detail ? ` (${detail})` : ''}; tear it down or recover first`, {
      code: 'ERR_BACKUP_ACCESS_ACTIVE',
    });
    this.activeTargetId = activeTargetId;
  }
}

/**
 * The fleecing image ran out of space during the backup (code `ERR_FLEECING_FULL`): the
 * copy-before-write filter could not save old data before a guest write, so (with
 * `on-cbw-error=break-snapshot`) QEMU kept the guest running and gave up the point in time, and
 * the backup read failed. Give the fleecing images a folder with more room (`fleecing.dir`,
 * `backup --fleecing-dir`); the image needs up to the size of what the guest overwrites during
 * the backup.
 */
export class FleecingFullError extends PveBackupError {
  declare readonly code: 'ERR_FLEECING_FULL';
  /** Device whose fleecing image is on the full filesystem. */
  readonly device: string;
  /** The fleecing image. */
  readonly fleecingPath: string;
  /** Bytes still free on its filesystem when the failure was examined. */
  readonly freeBytes: number;

  /**
   * @param device - Device concerned.
   * @param fleecingPath - Its fleecing image.
   * @param freeBytes - Free bytes on the image's filesystem.
   * @param cause - The read error the broken snapshot caused.
   */
  constructor(device: string, fleecingPath: string, freeBytes: number, cause?: unknown) {
    super(
      `${device}: fleecing image ${fleecingPath} ran out of space (${freeBytes} bytes free on its filesystem): QEMU gave up the ` +
        'backup snapshot to keep the guest writing; put the fleecing images where there is more room (--fleecing-dir)',
      { code: 'ERR_FLEECING_FULL', cause },
    );
    this.device = device;
    this.fleecingPath = fleecingPath;
    this.freeBytes = freeBytes;
  }
}

/**
 * Wraps an error of a step concerning `device` into a {@link BackupAccessError} whose message
 * names the device and the QMP command.
 */
export function deviceError(device: string, what: string, err: unknown): BackupAccessError {
  const cmd = err instanceof QmpError ? err.command : undefined;
  const reason = err instanceof QmpError ? err.desc : err instanceof Error ? err.message : String(err);
  return new BackupAccessError(`${device}: ${what} failed${cmd ? ` (QMP ${cmd})` : ''}: ${reason}`, {
    device,
    ...(cmd ? { command: cmd } : {}),
    cause: err,
  });
}

/**
 * qemu-storage-daemon (or another QEMU process the library starts) exited before it opened its QMP
 * socket, or did not open it in time (code `ERR_QEMU_START`). The message holds its log.
 */
export class QemuStartError extends PveBackupError {
  declare readonly code: 'ERR_QEMU_START';
  /** The program that failed to start, e.g. `qemu-storage-daemon`. */
  readonly program: string;

  /**
   * @param program - The program that failed to start.
   * @param message - What happened (its log, or the timeout).
   */
  constructor(program: string, message: string) {
    super(message, { code: 'ERR_QEMU_START' });
    this.program = program;
  }
}

/**
 * `qemu-img` failed (code `ERR_QEMU_IMG`): the message names the device, how it ended and its
 * stderr.
 */
export class QemuImgError extends PveBackupError {
  declare readonly code: 'ERR_QEMU_IMG';
  /** Device whose image qemu-img was working on. */
  readonly device: string;
  /** Its exit status, or `null` when a signal ended it. */
  readonly exitCode: number | null;
  /** The signal that ended it, or `null`. */
  readonly signal: NodeJS.Signals | null;
  /** Its stderr, trimmed. */
  readonly stderr: string;

  /**
   * @param message - What failed (one line, with the stderr).
   * @param details - Device, exit status, signal and stderr.
   */
  constructor(message: string, details: { device: string; exitCode?: number | null; signal?: NodeJS.Signals | null; stderr?: string }) {
    super(message, { code: 'ERR_QEMU_IMG' });
    this.device = details.device;
    this.exitCode = details.exitCode ?? null;
    this.signal = details.signal ?? null;
    this.stderr = details.stderr ?? '';
  }
}

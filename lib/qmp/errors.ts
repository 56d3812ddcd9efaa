/**
 * Errors of the QMP and guest agent clients.
 *
 * @packageDocumentation
 */
import { PveBackupError } from '../errors.js';

/** Where a {@link QmpError} came from: the command, its device and QEMU's error class. */
export interface QmpErrorDetails {
  /** QEMU's error class, for example `GenericError` or `DeviceNotFound`. */
  qmpClass: string;
  /** QEMU's description of the error. */
  desc: string;
  /** The QMP command that failed. */
  command: string;
  /** The device or node the command concerned, where known. */
  device?: string;
  /** The error this one wraps, if any. */
  cause?: unknown;
}

/**
 * QEMU answered a command with an error (code `ERR_QMP`).
 *
 * The message names the command, the device (where known) and QEMU's description.
 */
export class QmpError extends PveBackupError {
  declare readonly code: 'ERR_QMP';
  /** QEMU's error class (`GenericError`, `DeviceNotFound`, `CommandNotFound`, ...). */
  readonly qmpClass: string;
  /** QEMU's description, unchanged. */
  readonly desc: string;
  /** The QMP command that failed. */
  readonly command: string;
  /** The device or node the command concerned, where known. */
  readonly device: string | undefined;

  /** @param details - Command, class, description and device. */
  constructor(details: QmpErrorDetails) {
    const where = details.device === undefined ? '' : ` (device ${details.device})`;
    super(`QMP command ${details.command}${where} failed: ${details.desc} [${details.qmpClass}]`, {
      code: 'ERR_QMP',
      cause: details.cause,
    });
    this.qmpClass = details.qmpClass;
    this.desc = details.desc;
    this.command = details.command;
    this.device = details.device;
  }

  /**
   * The same error, naming a device. Used by higher layers that know which device a command
   * concerned; returns `this` when a device is already set.
   *
   * @param device - Device or node name.
   */
  withDevice(device: string): QmpError {
    if (this.device !== undefined) return this;
    return new QmpError({ qmpClass: this.qmpClass, desc: this.desc, command: this.command, device, cause: this.cause });
  }
}

/**
 * The connection closed (or could not be opened) while a command was pending, or a command was sent
 * on a closed client (code `ERR_QMP_CLOSED`).
 */
export class QmpClosedError extends PveBackupError {
  declare readonly code: 'ERR_QMP_CLOSED';
  /** The command that was pending, if any. */
  readonly command: string | undefined;

  /**
   * @param message - What closed and when.
   * @param options - The pending command and the socket error, if any.
   */
  constructor(message: string, options: { command?: string; cause?: unknown } = {}) {
    super(message, { code: 'ERR_QMP_CLOSED', cause: options.cause });
    this.command = options.command;
  }
}

/** A command (or the greeting) did not complete in time (code `ERR_QMP_TIMEOUT`). */
export class QmpTimeoutError extends PveBackupError {
  declare readonly code: 'ERR_QMP_TIMEOUT';
  /** The command that timed out (`greeting` for the connection handshake). */
  readonly command: string;
  /** The timeout that expired, in milliseconds. */
  readonly timeoutMs: number;

  /**
   * @param command - The command that timed out.
   * @param timeoutMs - The timeout in milliseconds.
   */
  constructor(command: string, timeoutMs: number) {
    super(`QMP command ${command} timed out after ${timeoutMs} ms`, { code: 'ERR_QMP_TIMEOUT' });
    this.command = command;
    this.timeoutMs = timeoutMs;
  }
}

/** The socket answered, but not with a QMP greeting or with a malformed message (code `ERR_QMP_NOT_QMP`). */
export class QmpProtocolError extends PveBackupError {
  declare readonly code: 'ERR_QMP_NOT_QMP';
  /** @param message - What was received instead. */
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { code: 'ERR_QMP_NOT_QMP', cause: options.cause });
  }
}

/**
 * The socket accepted the connection but sent no QMP greeting in time (code `ERR_QMP_BUSY`).
 * QEMU serves one client per QMP monitor socket and leaves further connections waiting in
 * silence: another tool or backup is most likely connected to the monitor.
 */
export class QmpBusyError extends PveBackupError {
  declare readonly code: 'ERR_QMP_BUSY';
  /** The socket (or host:port) connected to. */
  readonly address: string;
  /** How long the greeting was waited for, in milliseconds. */
  readonly timeoutMs: number;

  /**
   * @param address - The socket.
   * @param timeoutMs - How long the greeting was waited for.
   */
  constructor(address: string, timeoutMs: number) {
    super(
      `QMP socket ${address} accepted the connection but sent no greeting within ${timeoutMs} ms: the monitor is busy with ` +
        'another client (QEMU serves one client per QMP socket; is another backup or tool connected?), or it is not a QMP socket',
      { code: 'ERR_QMP_BUSY' },
    );
    this.address = address;
    this.timeoutMs = timeoutMs;
  }
}

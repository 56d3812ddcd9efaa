/**
 * Errors of the container backup and restore tools.
 *
 * Every class extends {@link PveBackupError}: match on `code`, which is stable.
 *
 * @packageDocumentation
 */
import { CancelledError, PveBackupError, type ContainerToolErrorCode } from '../errors.js';

export type { ContainerToolErrorCode } from '../errors.js';

/**
 * GNU tar, rsync or getfacl/setfacl failed (codes `ERR_TAR`, `ERR_RSYNC`, `ERR_ACL`). The message
 * is one line naming the program, how it ended and the last lines of its stderr; `stderr` holds
 * the stderr tail in full.
 */
export class ContainerToolError extends PveBackupError {
  declare readonly code: ContainerToolErrorCode;
  /** The program that failed (`tar`, `rsync`, `getfacl`, `setfacl`). */
  readonly tool: string;
  /** Its exit status, or `null` when a signal ended it. */
  readonly exitCode: number | null;
  /** The signal that ended it, or `null`. */
  readonly signal: NodeJS.Signals | null;
  /** The end of its stderr (at most 64 KiB), trimmed. */
  readonly stderr: string;

  /**
   * @param message - What failed (one line).
   * @param details - Code, tool, exit status, signal, stderr and cause.
   */
  constructor(
    message: string,
    details: {
      code: ContainerToolErrorCode;
      tool: string;
      exitCode?: number | null;
      signal?: NodeJS.Signals | null;
      stderr?: string;
      cause?: unknown;
    },
  ) {
    super(message, { code: details.code, cause: details.cause });
    this.tool = details.tool;
    this.exitCode = details.exitCode ?? null;
    this.signal = details.signal ?? null;
    this.stderr = details.stderr ?? '';
  }
}

/**
 * An id map is malformed, or an owner (or an ACL entry) has an id the map does not cover (code
 * `ERR_IDMAP`). `path` names the file concerned, relative to the tree, when there is one.
 */
export class IdMapError extends PveBackupError {
  declare readonly code: 'ERR_IDMAP';
  /** `u` or `g` when a particular id is concerned. */
  readonly idType: 'u' | 'g' | undefined;
  /** The id that is not mapped, when one is concerned. */
  readonly id: number | undefined;
  /** The file concerned, relative to the tree root (as printable text), when one is concerned. */
  readonly path: string | undefined;

  /**
   * @param message - What is wrong.
   * @param details - The id type, id, path and cause.
   */
  constructor(message: string, details: { idType?: 'u' | 'g'; id?: number; path?: string; cause?: unknown } = {}) {
    super(message, { code: 'ERR_IDMAP', cause: details.cause });
    this.idType = details.idType;
    this.id = details.id;
    this.path = details.path;
  }
}

/**
 * A restore target is not empty (code `ERR_ROOTDIR_NOT_EMPTY`). Only `lost+found` and empty
 * directories are allowed, unless the caller passes `allowNonEmpty`.
 */
export class RootdirNotEmptyError extends PveBackupError {
  declare readonly code: 'ERR_ROOTDIR_NOT_EMPTY';
  /** The directory that was refused. */
  readonly rootdir: string;
  /** The first entry found in it. */
  readonly entry: string;

  /**
   * @param rootdir - The restore target.
   * @param entry - An entry found in it.
   * @param options - `remedy`: what the reader can do, in the words of their interface (default
   *   `pass allowNonEmpty to restore into it anyway`; the CLI names its option); `cause`.
   */
  constructor(rootdir: string, entry: string, options: { remedy?: string; cause?: unknown } = {}) {
    super(`restore target ${rootdir} is not empty (found ${entry}); ${options.remedy ?? 'pass allowNonEmpty to restore into it anyway'}`, {
      code: 'ERR_ROOTDIR_NOT_EMPTY',
      cause: options.cause,
    });
    this.rootdir = rootdir;
    this.entry = entry;
  }
}

/**
 * A container tool was cancelled through its `AbortSignal`: a {@link CancelledError} (code
 * `ERR_CANCELLED`, name `AbortError`, as every cancellation of the package). The child process
 * has been killed; `cause` is the signal's reason.
 */
export class ContainerAbortError extends CancelledError {
  /**
   * @param what - The operation that was cancelled.
   * @param reason - The abort signal's reason.
   */
  constructor(what: string, reason?: unknown) {
    super(`${what} cancelled`, { cause: reason });
  }
}

/**
 * Errors of the Perl bridge's provider host.
 *
 * @packageDocumentation
 */
import { PveBackupError } from '../errors.js';

/**
 * The bridge protocol was broken or asked for something the host cannot serve (code
 * `ERR_BRIDGE`): a request that is not JSON, an unknown method, a provider module without a
 * factory, arguments of the wrong shape, or the `file-handle` mechanism (not bridged).
 */
export class BridgeError extends PveBackupError {
  declare readonly code: 'ERR_BRIDGE';
  /** The Perl method of the request, when one was named. */
  readonly method: string | undefined;

  /**
   * @param message - What is wrong.
   * @param options - The Perl method concerned and an optional `cause`.
   */
  constructor(message: string, options: { method?: string; cause?: unknown } = {}) {
    super(message, { code: 'ERR_BRIDGE', cause: options.cause });
    this.method = options.method;
  }
}

/**
 * `pve-plugin generate|install` found a file it would replace that another vendor's plugin (or
 * no generated plugin) wrote, and `--force` was not given (code `ERR_PLUGIN_FILE_EXISTS`).
 */
export class PluginFileExistsError extends PveBackupError {
  declare readonly code: 'ERR_PLUGIN_FILE_EXISTS';
  /** The file that exists. */
  readonly target: string;

  /**
   * @param target - The file that exists (absolute).
   * @param owner - Who wrote it, as its header says (or that it is not a generated plugin).
   */
  constructor(target: string, owner: string) {
    super(`${target} exists and belongs to ${owner}; give --force to replace it`, { code: 'ERR_PLUGIN_FILE_EXISTS' });
    this.target = target;
  }
}

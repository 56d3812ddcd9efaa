/**
 * The job's options before the job loop starts: validation, and the provider they name (an
 * object, or a factory to construct it with).
 *
 * @packageDocumentation
 */
import { InvalidArgumentError } from '../errors.js';
import type { BackupProvider, LogFunction, ProviderContext } from '../provider/api.js';
import { JobAbortedError } from '../provider/errors.js';
import { toError } from './abort.js';
import type { BackupJobResult, Guest, RunBackupJobOptions } from './types.js';

/**
 * Checks the options of a backup job (`runBackupJob`) before anything runs.
 *
 * @throws {@link InvalidArgumentError} naming the first bad option.
 */
export function validateJobOptions(o: RunBackupJobOptions): void {
  if (!o || typeof o !== 'object') throw new InvalidArgumentError('options are required');
  if (!o.provider) throw new InvalidArgumentError('provider is required');
  if (typeof o.storeid !== 'string' || !/^[A-Za-z][A-Za-z0-9_.-]*$/.test(o.storeid)) throw new InvalidArgumentError(`invalid storeid ${JSON.stringify(o.storeid)}`);
  if (!Array.isArray(o.guests)) throw new InvalidArgumentError('guests must be an array');
  const seen = new Set<number>();
  for (const g of o.guests) {
    if (!g || !Number.isInteger(g.vmid) || g.vmid <= 0) throw new InvalidArgumentError(`invalid vmid ${JSON.stringify(g?.vmid)}`);
    if (seen.has(g.vmid)) throw new InvalidArgumentError(`guest ${g.vmid} is given twice`);
    seen.add(g.vmid);
    if (g.type !== 'qemu' && g.type !== 'lxc') throw new InvalidArgumentError(`guest ${(g as Guest).vmid}: type must be qemu or lxc`);
    if (typeof g.config !== 'string') throw new InvalidArgumentError(`guest ${g.vmid}: config (the raw configuration) is required`);
    if (g.type === 'lxc' && typeof g.rootdir !== 'string') throw new InvalidArgumentError(`guest ${g.vmid}: rootdir is required`);
  }
}

function isClass(fn: unknown): boolean {
  return typeof fn === 'function' && /^class[\s{]/.test(Function.prototype.toString.call(fn));
}

/**
 * The job's provider: the one given, or what a factory (a class or a function, possibly async)
 * makes of the job's context.
 *
 * @throws {@link JobAbortedError} (with `result`) when the factory fails; the failure is logged to `log` first.
 */
export async function constructProvider(opts: RunBackupJobOptions, context: ProviderContext, log: LogFunction, result: BackupJobResult): Promise<BackupProvider> {
  if (typeof opts.provider !== 'function') return opts.provider;
  try {
    return isClass(opts.provider)
      ? new (opts.provider as new (c: ProviderContext) => BackupProvider)(context)
      : await (opts.provider as (c: ProviderContext) => BackupProvider | Promise<BackupProvider>)(context);
  } catch (err) {
    log('err', `creating the backup provider failed: ${toError(err).message}`);
    throw new JobAbortedError(`backup job aborted: creating the backup provider failed: ${toError(err).message}`, { cause: err, result });
  }
}

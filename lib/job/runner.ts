/**
 * The backup job runner: drives a provider through a job of VMs and containers in vzdump's order
 * (job start, each guest's frame and task log, job end or the abort path on signals). What a
 * guest's backup does is in backup-vm.ts and backup-container.ts, the hooks after it in
 * storage-hooks.ts, option checks in options.ts.
 *
 * @packageDocumentation
 */
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { normaliseBandwidthLimit } from '../bandwidth.js';
import { currentOwner, ownerIsDead } from '../owner.js';
import { adaptProvider } from '../provider/adapter.js';
import type { GuestType, LogFunction, LogLevel, ProviderContext } from '../provider/api.js';
import { JobAbortedError } from '../provider/errors.js';
import { createLogger } from '../provider/logger.js';
import { formatBytes } from '../format.js';
import { raceAbort, toError } from './abort.js';
import { backupVmGuest } from './backup-vm.js';
import type { JobContext } from './context.js';
import { constructProvider, validateJobOptions } from './options.js';
import { StepTimer } from './steps.js';
import { applyStorageHooks } from './storage-hooks.js';
import { TaskLog } from './task-log.js';
import type { BackupJobResult, Guest, GuestOutcome, RunBackupJobOptions } from './types.js';

const unix = (): number => Math.floor(Date.now() / 1000);

/**
 * Runs a backup job: `jobStart` (`jobInit`), each guest in order, then `jobEnd` (`jobCleanup`),
 * or `jobAbort` on a fundamental failure. One guest failing does not stop the others; a failing
 * `backupHandleLogFile` does, as in vzdump: the job is aborted there.
 *
 * @returns Each guest's outcome.
 * @throws {@link ProviderApiVersionError} when the provider's API version is refused (nothing is
 *   called then); {@link JobAbortedError} (`ERR_JOB_ABORTED`, with `result` and `cause`) when the
 *   job was aborted (signal, provider factory, `jobStart` or `backupHandleLogFile` failing); {@link InvalidArgumentError}
 *   for bad options.
 */
export async function runBackupJob(opts: RunBackupJobOptions): Promise<BackupJobResult> {
  validateJobOptions(opts);
  // The one place the job decides "0 or absent means no limit"; below, undefined is no limit.
  opts = { ...opts, bandwidthLimit: normaliseBandwidthLimit(opts.bandwidthLimit, 'bandwidthLimit') };
  const startTime = unix();
  const outer = createLogger(opts.log);
  const result: BackupJobResult = {
    ok: false,
    startTime,
    guests: opts.guests.map((g) => ({ vmid: g.vmid, type: g.type, status: 'skipped', warnings: [], log: [] })),
  };
  const controller = new AbortController();
  const onOuterAbort = (): void => controller.abort(new JobAbortedError('backup job aborted', { cause: opts.signal?.reason }));
  if (opts.signal?.aborted) onOuterAbort();
  opts.signal?.addEventListener('abort', onOuterAbort, { once: true });
  const onSignal = (sig: NodeJS.Signals): void => {
    outer.err(`received signal ${sig}`);
    controller.abort(new JobAbortedError(`interrupted by signal ${sig}`));
  };
  if (opts.handleSignals) {
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  }
  let current: TaskLog | undefined;
  const providerLog: LogFunction = (level: LogLevel, message: string) => {
    if (current) current.write(level, message);
    else outer.log(level, message);
  };
  try {
    const context: ProviderContext = { storeid: opts.storeid, scfg: opts.scfg ?? {}, log: providerLog };
    const provider = await constructProvider(opts, context, outer.log, result);
    const driver = adaptProvider(provider); // refuses an unsupported API version before anything runs
    const providerName = await driver.name();
    const ctx: JobContext = {
      opts,
      driver,
      providerName,
      signal: controller.signal,
      jobLog: outer.log,
      tmpdir: opts.tmpdir ?? os.tmpdir(),
      startTime,
      setCurrent: (l) => (current = l),
    };
    outer.info(`starting new backup job: ${opts.guests.length} guest(s) to backup provider '${providerName}' (storage ${opts.storeid}, API version ${driver.apiVersion})`);
    try {
      await raceAbort(driver.jobStart(startTime), controller.signal);
    } catch (err) {
      return await abortJob(ctx, result, toError(err), 'job start failed');
    }
    for (const [i, guest] of opts.guests.entries()) {
      if (controller.signal.aborted) break;
      const { outcome, logFileError } = await backupGuest(ctx, guest);
      result.guests[i] = outcome;
      // pve-manager VZDump.pm exec_backup_task calls backup_handle_log_file outside any eval: its
      // die escapes the guest and aborts the job (the remaining guests are not backed up, the
      // job's cleanup runs through the error path; docs/pve-bridge-notes.md 3.3 step 7).
      if (logFileError) return await abortJob(ctx, result, logFileError, `aborted: handling the task log of ${guest.type === 'qemu' ? 'VM' : 'CT'} ${guest.vmid} failed`);
    }
    if (controller.signal.aborted) {
      // A signal that came after every guest was done cancelled nothing: the exit must say so.
      const cancelled = result.guests.length < opts.guests.length || result.guests.some((g) => g.status !== 'ok');
      if (cancelled) return await abortJob(ctx, result, toError(controller.signal.reason), 'aborted');
      outer.warn('signal received after the last backup had finished: nothing was cancelled');
    }
    try {
      await driver.jobEnd();
    } catch (err) {
      result.jobEndError = toError(err);
      outer.err(`job end failed: ${toError(err).message}`);
    }
    result.ok = !result.jobEndError && result.guests.every((g) => g.status === 'ok');
    const failed = result.guests.filter((g) => g.status !== 'ok').map((g) => g.vmid);
    if (failed.length) outer.err(`Backup job finished with errors (failed: ${failed.join(', ')})`);
    else outer.info('Backup job finished successfully');
    return result;
  } finally {
    opts.signal?.removeEventListener('abort', onOuterAbort);
    if (opts.handleSignals) {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
  }
}

async function abortJob(ctx: JobContext, result: BackupJobResult, error: Error, what: string): Promise<never> {
  ctx.jobLog('err', `backup job ${what}: ${error.message}`);
  try {
    await ctx.driver.jobAbort(error);
  } catch (err) {
    ctx.jobLog('err', `job abort hook failed: ${toError(err).message}`);
  }
  throw error instanceof JobAbortedError && error.result === undefined
    ? new JobAbortedError(error.message, { cause: error.cause ?? error, result })
    : new JobAbortedError(`backup job aborted: ${error.message}`, { cause: error, result });
}

/** File in a guest's temporary folder naming the process that uses it. */
const OWNER_FILE = 'owner.json';

/**
 * Removes the `vzdump-*` temporary folders (config copies, task log, default fleecing images) that
 * runs killed before their cleanup left in `tmpdir`: those whose owner file names a process that
 * is gone. Folders of running jobs, and folders without an owner file, are kept.
 *
 * @param tmpdir - Folder the runner creates guest folders in (default: the OS temp dir).
 * @returns The folders removed.
 */
export async function removeStaleGuestDirs(tmpdir: string = os.tmpdir()): Promise<string[]> {
  const removed: string[] = [];
  const names = await readdir(tmpdir).catch(() => [] as string[]);
  for (const name of names) {
    if (!/^vzdump-(qemu|lxc)-\d+-/.test(name)) continue;
    const dir = path.join(tmpdir, name);
    let owner: unknown;
    try {
      owner = JSON.parse(await readFile(path.join(dir, OWNER_FILE), 'utf8'));
    } catch {
      continue;
    }
    if (!ownerIsDead(owner)) continue;
    await rm(dir, { recursive: true, force: true });
    removed.push(dir);
  }
  return removed;
}

/**
 * One guest's backup, in vzdump's order. `logFileError`: `backupHandleLogFile` failed, which
 * aborts the job (it is the one call of the guest upstream runs outside an eval).
 */
async function backupGuest(ctx: JobContext, guest: Guest): Promise<{ outcome: GuestOutcome; logFileError?: Error }> {
  const { driver, opts } = ctx;
  const vmtype: GuestType = guest.type;
  const started = unix();
  const t0 = Date.now();
  const timer = new StepTimer();
  const gdir = await timer.time('prepare', async () => {
    for (const dir of await removeStaleGuestDirs(ctx.tmpdir)) ctx.jobLog('info', `removed ${dir}, left by a backup that was killed`);
    const dir = await mkdtemp(path.join(ctx.tmpdir, `vzdump-${vmtype}-${guest.vmid}-`));
    // So that a later run can remove this folder should this process be killed before its cleanup.
    await writeFile(path.join(dir, OWNER_FILE), JSON.stringify(currentOwner()));
    return dir;
  });
  const logPath = opts.logDir ? path.join(opts.logDir, `task-${vmtype}-${guest.vmid}-${started}.log`) : path.join(gdir, 'task.log');
  const tlog = new TaskLog(logPath, ctx.jobLog);
  ctx.setCurrent(tlog);
  const outcome: GuestOutcome = { vmid: guest.vmid, type: vmtype, status: 'failed', warnings: [], log: [], startTime: started };
  let error: Error | undefined;
  try {
    tlog.info(`Starting Backup of ${vmtype === 'qemu' ? 'VM' : 'CT'} ${guest.vmid} (${vmtype})`);
    tlog.info(`Backup started at ${new Date(started * 1000).toISOString()}`);
    const archiveName = await timer.time('prepare', () => raceAbort(driver.backupStart(guest.vmid, vmtype, ctx.startTime), ctx.signal));
    outcome.archiveName = archiveName;
    outcome.volname = driver.volname(archiveName);
    tlog.info(`creating backup '${archiveName}' with provider '${ctx.providerName}'`);
    const { mechanism, bitmapId } = await timer.time('prepare', async () => {
      const base = vmtype === 'qemu' ? 'qemu-server' : 'pct';
      const configFile = path.join(gdir, `${base}.conf`);
      await writeFile(configFile, guest.config);
      let firewallFile: string | undefined;
      if (guest.firewallConfig !== undefined) {
        firewallFile = path.join(gdir, `${base}.fw`);
        await writeFile(firewallFile, guest.firewallConfig);
      }
      await raceAbort(driver.backupConfigs(guest.vmid, { configFile, firewallFile }), ctx.signal);
      return raceAbort(driver.backupMechanism(guest.vmid, vmtype), ctx.signal);
    });
    if (guest.type === 'qemu') await backupVmGuest(ctx, guest, tlog, gdir, mechanism as 'nbd' | 'file-handle', bitmapId, archiveName, timer);
    else {
      const { backupContainerGuest } = await import('./backup-container.js');
      await timer.time('provider', () => backupContainerGuest(ctx, guest, tlog, archiveName));
    }
  } catch (err) {
    error = toError(err);
  }
  const what = `${vmtype === 'qemu' ? 'VM' : 'CT'} ${guest.vmid}`;
  // vzdump's order (pve-manager VZDump.pm exec_backup_task): inside the guest's eval, after the
  // archive: notes, protected, prune, then backup_cleanup(..., 1, {}); any of these dying (notes
  // only warn) fails the guest, and the error path then calls backup_cleanup(..., 0, { error }),
  // a second call when the first one died.
  const { volname } = outcome;
  if (!error && volname) {
    try {
      // the storage plugin gets "backup/<archive-name>" (update_volume_attribute, prune_backups)
      await timer.time('finish', () => applyStorageHooks(ctx, guest, tlog, volname));
    } catch (err) {
      error = toError(err);
    }
  }
  if (!error) {
    try {
      const { size } = await timer.time('finish', () => driver.backupFinish(guest.vmid, vmtype, {}));
      if (size !== undefined) {
        outcome.size = size;
        tlog.info(`backup size: ${formatBytes(size)}`);
      }
    } catch (err) {
      error = toError(err);
    }
  }
  if (error) {
    tlog.err(`Backup of ${what} failed - ${error.message}`);
    try {
      await timer.time('finish', () => driver.backupFinish(guest.vmid, vmtype, { error }));
    } catch (err) {
      // upstream: eval { backup_cleanup(..., 0, ...) }; debugmsg('warn', ...)
      tlog.warn(`backup cleanup for external provider failed - ${toError(err).message}`);
    }
  }
  if (!error) tlog.info(`Finished Backup of ${what} (${formatDuration(Date.now() - t0)})`);
  tlog.info(timer.line());
  let logFileError: Error | undefined;
  try {
    await timer.time('task-log', () => driver.handleLogFile(guest.vmid, logPath));
  } catch (err) {
    logFileError = toError(err);
    tlog.err(`handling the task log file failed: ${logFileError.message}`);
  }
  ctx.setCurrent(undefined);
  await rm(gdir, { recursive: true, force: true }).catch(() => undefined);
  outcome.status = error ? 'failed' : 'ok';
  if (error) outcome.error = error;
  outcome.warnings = [...tlog.warnings];
  outcome.log = [...tlog.lines];
  if (opts.logDir) outcome.logFile = logPath;
  outcome.endTime = unix();
  outcome.steps = timer.times();
  return logFileError ? { outcome, logFileError } : { outcome };
}

function formatDuration(ms: number): string {
  const s = Math.round(ms / 1000);
  const p = (n: number): string => String(n).padStart(2, '0');
  return `${p(Math.floor(s / 3600))}:${p(Math.floor(s / 60) % 60)}:${p(s % 60)}`;
}

/**
 * The backup job runner: drives a provider through a job of VMs and containers in vzdump's order,
 * sets up and tears down QEMU backup access, keeps a task log per guest, and takes the abort path
 * on signals.
 *
 * @packageDocumentation
 */
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { normaliseBandwidthLimit } from '../bandwidth.js';
import { InvalidArgumentError } from '../errors.js';
import { NbdClient } from '../nbd/client.js';
import { markSnapshotExport } from '../nbd/snapshot-exports.js';
import { explainFleecingFailure, setupBackupAccess, teardownBackupAccess } from '../qemu/backup-access.js';
import type { BackupAccessDevice } from '../qemu/types.js';
import { currentOwner, ownerIsDead } from '../owner.js';
import { GuestAgentClient } from '../qmp/guest-agent.js';
import { adaptProvider, type DriverVolume, type ProviderDriver } from '../provider/adapter.js';
import type { BackupProvider, GuestType, IdMapEntry, LogFunction, LogLevel, ProviderContext } from '../provider/api.js';
import { dirtyBytes, dirtyRegions } from '../provider/dirty-regions.js';
import { JobAbortedError } from '../provider/errors.js';
import { createLogger } from '../provider/logger.js';
import { parseIdMap } from '../container/idmap.js';
import { dropDeviceBitmap, openQemuTarget, resolveDeviceSources } from './qemu-target.js';
import { TaskLog } from './task-log.js';
import { formatBytes } from '../format.js';
import type { BackupJobResult, ContainerGuest, Guest, GuestOutcome, RunBackupJobOptions, VmGuest } from './types.js';

const toError = (e: unknown): Error => (e instanceof Error ? e : new Error(String(e)));
const unix = (): number => Math.floor(Date.now() / 1000);

/**
 * Resolves with `promise`, or rejects with the signal's reason as soon as `signal` aborts (the
 * promise is left to settle on its own; its rejection is swallowed).
 */
export function raceAbort<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  promise.catch(() => undefined);
  if (signal.aborted) return Promise.reject(toError(signal.reason));
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(toError(signal.reason));
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(toError(e));
      },
    );
  });
}

/**
 * {@link raceAbort} for the provider's data calls (`backupVm`, `backupContainer`): on abort, the
 * provider (which got the signal) has up to `graceMs` to stop before this rejects, so that
 * teardown and cleanup never run while it still reads the export or writes its target.
 */
export async function settleOnAbort<T>(promise: Promise<T>, signal: AbortSignal, graceMs = 30_000): Promise<T> {
  try {
    return await raceAbort(promise, signal);
  } catch (err) {
    if (!signal.aborted) throw err;
    const timer = new AbortController();
    await Promise.race([promise.then(() => undefined, () => undefined), sleep(graceMs, undefined, { signal: timer.signal }).catch(() => undefined)]);
    timer.abort();
    throw err;
  }
}

/** The vzdump notes template: `{{guestname}}`, `{{vmid}}`, `{{node}}`, `{{cluster}}`, `\n`, `\\`. */
export function expandNotesTemplate(template: string, vars: { guestname: string; vmid: number; node: string; cluster: string }): string {
  return template
    .replace(/\\(\\|n)/g, (_m, c: string) => (c === 'n' ? '\n' : '\\'))
    .replace(/\{\{(guestname|vmid|node|cluster)\}\}/g, (_m, k: keyof typeof vars) => String(vars[k]));
}

function guestName(guest: Guest): string {
  const key = guest.type === 'qemu' ? 'name' : 'hostname';
  const m = new RegExp(`^${key}:\\s*(\\S+)\\s*$`, 'm').exec(guest.config);
  return m?.[1] ?? `${guest.type === 'qemu' ? 'VM' : 'CT'} ${guest.vmid}`;
}

function isClass(fn: unknown): boolean {
  return typeof fn === 'function' && /^class[\s{]/.test(Function.prototype.toString.call(fn));
}

function validate(o: RunBackupJobOptions): void {
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

interface JobContext {
  opts: RunBackupJobOptions;
  driver: ProviderDriver;
  providerName: string;
  signal: AbortSignal;
  jobLog: LogFunction;
  tmpdir: string;
  startTime: number;
  /** Where provider log lines go while a guest runs. */
  setCurrent(log: TaskLog | undefined): void;
}

/**
 * Runs a backup job: `jobStart` (`jobInit`), each guest in order, then `jobEnd` (`jobCleanup`),
 * or `jobAbort` on a fundamental failure. One guest failing does not stop the others.
 *
 * @returns Each guest's outcome.
 * @throws {@link ProviderApiVersionError} when the provider's API version is refused (nothing is
 *   called then); {@link JobAbortedError} (`ERR_JOB_ABORTED`, with `result` and `cause`) when the
 *   job was aborted (signal, provider factory or `jobStart` failing); {@link InvalidArgumentError}
 *   for bad options.
 */
export async function runBackupJob(opts: RunBackupJobOptions): Promise<BackupJobResult> {
  validate(opts);
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
    let provider: BackupProvider;
    if (typeof opts.provider === 'function') {
      const context: ProviderContext = { storeid: opts.storeid, scfg: opts.scfg ?? {}, log: providerLog };
      try {
        provider = isClass(opts.provider)
          ? new (opts.provider as new (c: ProviderContext) => BackupProvider)(context)
          : await (opts.provider as (c: ProviderContext) => BackupProvider | Promise<BackupProvider>)(context);
      } catch (err) {
        outer.err(`creating the backup provider failed: ${toError(err).message}`);
        throw new JobAbortedError(`backup job aborted: creating the backup provider failed: ${toError(err).message}`, { cause: err, result });
      }
    } else {
      provider = opts.provider;
    }
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
      result.guests[i] = await backupGuest(ctx, guest);
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

async function backupGuest(ctx: JobContext, guest: Guest): Promise<GuestOutcome> {
  const { driver, opts } = ctx;
  const vmtype: GuestType = guest.type;
  const started = unix();
  const t0 = Date.now();
  for (const dir of await removeStaleGuestDirs(ctx.tmpdir)) ctx.jobLog('info', `removed ${dir}, left by a backup that was killed`);
  const gdir = await mkdtemp(path.join(ctx.tmpdir, `vzdump-${vmtype}-${guest.vmid}-`));
  // So that a later run can remove this folder should this process be killed before its cleanup.
  await writeFile(path.join(gdir, OWNER_FILE), JSON.stringify(currentOwner()));
  const logPath = opts.logDir ? path.join(opts.logDir, `task-${vmtype}-${guest.vmid}-${started}.log`) : path.join(gdir, 'task.log');
  const tlog = new TaskLog(logPath, ctx.jobLog);
  ctx.setCurrent(tlog);
  const outcome: GuestOutcome = { vmid: guest.vmid, type: vmtype, status: 'failed', warnings: [], log: [], startTime: started };
  let error: Error | undefined;
  try {
    tlog.info(`Starting Backup of ${vmtype === 'qemu' ? 'VM' : 'CT'} ${guest.vmid} (${vmtype})`);
    tlog.info(`Backup started at ${new Date(started * 1000).toISOString()}`);
    outcome.archiveName = await raceAbort(driver.backupStart(guest.vmid, vmtype, ctx.startTime), ctx.signal);
    tlog.info(`creating backup '${outcome.archiveName}' with provider '${ctx.providerName}'`);
    const base = vmtype === 'qemu' ? 'qemu-server' : 'pct';
    const configFile = path.join(gdir, `${base}.conf`);
    await writeFile(configFile, guest.config);
    let firewallFile: string | undefined;
    if (guest.firewallConfig !== undefined) {
      firewallFile = path.join(gdir, `${base}.fw`);
      await writeFile(firewallFile, guest.firewallConfig);
    }
    await raceAbort(driver.backupConfigs(guest.vmid, { configFile, firewallFile }), ctx.signal);
    const { mechanism, bitmapId } = await raceAbort(driver.backupMechanism(guest.vmid, vmtype), ctx.signal);
    if (guest.type === 'qemu') await backupVmGuest(ctx, guest, tlog, gdir, mechanism as 'nbd' | 'file-handle', bitmapId, outcome.archiveName);
    else await backupContainerGuest(ctx, guest, tlog, outcome.archiveName);
  } catch (err) {
    error = toError(err);
  }
  if (error) tlog.err(`Backup of ${vmtype === 'qemu' ? 'VM' : 'CT'} ${guest.vmid} failed - ${error.message}`);
  try {
    const { size } = await driver.backupFinish(guest.vmid, vmtype, error ? { error } : {});
    if (size !== undefined) {
      outcome.size = size;
      tlog.info(`backup size: ${formatBytes(size)}`);
    }
  } catch (err) {
    if (!error) {
      error = toError(err);
      tlog.err(`Backup of ${vmtype === 'qemu' ? 'VM' : 'CT'} ${guest.vmid} failed - ${error.message}`);
    } else tlog.err(`backup abort failed: ${toError(err).message}`);
  }
  if (!error && outcome.archiveName) await applyStorageHooks(ctx, guest, tlog, outcome.archiveName);
  if (!error) tlog.info(`Finished Backup of ${vmtype === 'qemu' ? 'VM' : 'CT'} ${guest.vmid} (${formatDuration(Date.now() - t0)})`);
  try {
    await driver.handleLogFile(guest.vmid, logPath);
  } catch (err) {
    tlog.warn(`unable to handle the task log file: ${toError(err).message}`);
  }
  ctx.setCurrent(undefined);
  await rm(gdir, { recursive: true, force: true }).catch(() => undefined);
  outcome.status = error ? 'failed' : 'ok';
  if (error) outcome.error = error;
  outcome.warnings = [...tlog.warnings];
  outcome.log = [...tlog.lines];
  if (opts.logDir) outcome.logFile = logPath;
  outcome.endTime = unix();
  return outcome;
}

function formatDuration(ms: number): string {
  const s = Math.round(ms / 1000);
  const p = (n: number): string => String(n).padStart(2, '0');
  return `${p(Math.floor(s / 3600))}:${p(Math.floor(s / 60) % 60)}:${p(s % 60)}`;
}

async function applyStorageHooks(ctx: JobContext, guest: Guest, tlog: TaskLog, volname: string): Promise<void> {
  const { opts } = ctx;
  const storage = ctx.driver.storage;
  const hook = async (what: string, present: boolean, fn: () => Promise<void>): Promise<void> => {
    if (!present) {
      tlog.warn(`backup provider '${ctx.providerName}' cannot ${what}: skipped`);
      return;
    }
    try {
      await fn();
    } catch (err) {
      tlog.warn(`unable to ${what}: ${toError(err).message}`);
    }
  };
  if (opts.notesTemplate !== undefined && opts.notesTemplate !== '') {
    const notes = expandNotesTemplate(opts.notesTemplate, { guestname: guestName(guest), vmid: guest.vmid, node: opts.node ?? os.hostname(), cluster: opts.cluster ?? '' });
    await hook('set notes', typeof storage?.setNotes === 'function', async () => {
      await storage!.setNotes!(volname, notes);
      tlog.info('adding notes to backup');
    });
  }
  if (opts.protected) {
    await hook('set the protected flag', typeof storage?.setProtected === 'function', async () => {
      await storage!.setProtected!(volname, true);
      tlog.info('marked backup as protected');
    });
  }
  if (opts.prune && Object.keys(opts.prune).length > 0) {
    await hook('prune older backups', typeof storage?.prune === 'function', async () => {
      tlog.info(`prune older backups with retention: ${Object.entries(opts.prune!).map(([k, v]) => `${k}=${String(v)}`).join(', ')}`);
      const r = await storage!.prune!({ vmid: guest.vmid, vmtype: guest.type, keep: opts.prune! });
      const removed = r && Array.isArray(r.removed) ? r.removed : [];
      for (const v of removed) tlog.info(`removing backup '${v}'`);
      tlog.info(`pruned ${removed.length} backup(s)`);
    });
  }
}

function bitmapStatus(d: BackupAccessDevice, forced: 'new' | 'none' | undefined, dirty: number | undefined): string | undefined {
  const prefix = `${d.device}: dirty-bitmap status:`;
  if (forced === 'none') return undefined;
  switch (d.bitmapAction) {
    case 'not-used':
      return undefined;
    case 'not-used-removed':
      return `${prefix} not used, existing bitmap removed`;
    case 'new':
      return `${prefix} created new`;
    case 'invalid':
      return forced === 'new' ? `${prefix} created new (requested by the provider)` : `${prefix} existing bitmap was invalid and has been cleared`;
    case 'used':
      return dirty === undefined ? `${prefix} OK` : `${prefix} OK (${formatBytes(dirty)} of ${formatBytes(d.size)} dirty)`;
    default:
      return undefined;
  }
}

async function backupVmGuest(
  ctx: JobContext,
  guest: VmGuest,
  tlog: TaskLog,
  gdir: string,
  mechanism: 'nbd' | 'file-handle',
  providerBitmapId: string | undefined,
  archiveName: string,
): Promise<void> {
  const { opts, driver } = ctx;
  const target = await openQemuTarget(guest, gdir);
  let qga: GuestAgentClient | undefined;
  try {
    if (target.started) tlog.info(`VM ${guest.vmid} is not running: serving its disks with qemu-storage-daemon for the backup`);
    const sources = await resolveDeviceSources(target.qmp, target.devices);
    const sizes: Record<string, number> = {};
    for (const s of sources) {
      sizes[s.device] = s.size;
      tlog.info(`include disk '${s.device}' ${formatBytes(s.size)}`);
    }
    const plan = await raceAbort(driver.vmBitmapPlan(guest.vmid, providerBitmapId, sizes, opts.storeid), ctx.signal);
    const targetId = `snapshot-access:${opts.storeid}`;
    const forced: Record<string, 'new' | 'none' | undefined> = {};
    if (plan.bitmapId) {
      for (const s of sources) {
        const want = plan.devices[s.device];
        if (want === 'use') continue;
        forced[s.device] = want === 'new' ? 'new' : 'none';
        await dropDeviceBitmap(target.qmp, s, targetId, plan.bitmapId);
      }
    }
    if (guest.qga) {
      try {
        qga = await GuestAgentClient.connect(guest.qga, { timeoutMs: 5000 });
        tlog.info("issuing guest-agent 'fs-freeze' command");
      } catch (err) {
        tlog.warn(`skipping guest-agent 'fs-freeze', agent configured but not running? (${toError(err).message})`);
      }
    }
    ctx.signal.throwIfAborted();
    const access = await setupBackupAccess(target.qmp, {
      targetId,
      devices: target.devices,
      ...(plan.bitmapId ? { bitmap: plan.bitmapId } : {}),
      fleecing: { dir: opts.fleecing?.dir ?? gdir, format: opts.fleecing?.format ?? 'qcow2' },
      ...(qga ? { qga } : {}),
      ...(target.nbdServer ? { nbdServer: target.nbdServer } : {}),
      ...(opts.backend ? { backend: opts.backend } : {}),
    });
    if (qga) tlog.info("issuing guest-agent 'fs-thaw' command");
    for (const r of access.recovered ?? []) tlog.warn(`removed a stale backup access: ${r}`);
    tlog.info(`started backup access (${access.backend} QEMU), NBD socket ${access.socketPath}`);
    let success = false;
    const clients: NbdClient[] = [];
    const iterators: Array<AsyncGenerator<[number, number]>> = [];
    // while the provider reads them, these exports are known fleecing snapshots (helpers discard there)
    const unmark = access.devices.map((d) => markSnapshotExport(d.nbdUri));
    try {
      const volumes: DriverVolume[] = [];
      for (const d of access.devices) {
        const f = forced[d.device];
        let dirty: number | undefined;
        if (d.bitmapAction === 'used' && d.bitmapName) dirty = await dirtyBytes(d.nbdUri, d.bitmapName).catch(() => undefined);
        const status = bitmapStatus(d, f, dirty);
        if (status) tlog.info(status);
        const noBitmap = f === 'none';
        const v: DriverVolume = {
          device: d.device,
          size: d.size,
          bitmapMode: noBitmap ? 'none' : d.bitmapMode,
          bitmapAction: noBitmap ? 'not-used' : d.bitmapAction,
          bitmapName: noBitmap ? undefined : d.bitmapName,
          nbdPath: access.socketPath,
          nbdUri: d.nbdUri,
        };
        if (mechanism === 'file-handle') {
          const nbd = await NbdClient.connect(d.nbdUri, { metaContexts: [] });
          clients.push(nbd);
          v.fileHandle = { size: nbd.size, read: (o, l) => nbd.read(o, l), discard: (o, l) => nbd.trim(o, l) };
          const it = dirtyRegions(d.nbdUri, v.bitmapName);
          iterators.push(it);
          v.nextDirtyRegion = async () => {
            const n = await it.next();
            return n.done ? undefined : n.value;
          };
        }
        volumes.push(v);
      }
      try {
        await settleOnAbort(
          driver.backupVm(guest.vmid, {
            config: guest.config,
            firewallConfig: guest.firewallConfig,
            mechanism,
            volumes,
            bandwidthLimit: opts.bandwidthLimit,
            archiveName,
            signal: ctx.signal,
          }),
          ctx.signal,
        );
      } catch (err) {
        // A full fleecing image shows only as refused reads: say so (before teardown removes the image).
        throw (await explainFleecingFailure(target.qmp, targetId, err)) ?? err;
      }
      success = true;
    } finally {
      for (const u of unmark) u();
      // close what the provider did not finish (file-handle): region iterators and connections
      for (const it of iterators) await it.return(undefined).catch(() => undefined);
      for (const c of clients) await c.close().catch(() => undefined);
      try {
        await teardownBackupAccess(target.qmp, { targetId, success });
        tlog.info(`backup access torn down (${success ? 'success' : 'failure'})`);
      } catch (err) {
        if (success) throw err;
        tlog.err(`tearing down backup access failed: ${toError(err).message}`);
      }
    }
  } finally {
    await qga?.close().catch(() => undefined);
    await target.close();
  }
}

/** Host uid of the container's root user under `idMap` (0 without a map). */
export function backupUserId(idMap: IdMapEntry[]): number {
  const e = idMap.find((m) => m.type === 'u' && m.container <= 0 && 0 < m.container + m.length);
  return e ? e.host - e.container : 0;
}

async function backupContainerGuest(ctx: JobContext, guest: ContainerGuest, tlog: TaskLog, archiveName: string): Promise<void> {
  let idMap: IdMapEntry[] = [];
  if (guest.idMap && guest.idMap.length > 0) {
    idMap = typeof guest.idMap[0] === 'string' ? parseIdMap(guest.idMap as string[]) : (guest.idMap as IdMapEntry[]);
  }
  const sources = guest.sources ?? ['.'];
  const excludePaths = guest.excludePaths ?? [];
  for (const s of sources) tlog.info(`including mount point '${s}' in backup`);
  for (const e of excludePaths) tlog.info(`excluding '${e}'`);
  const info = {
    directory: guest.rootdir,
    sources,
    backupUserId: backupUserId(idMap),
    idMap,
    ...(ctx.opts.bandwidthLimit !== undefined ? { bandwidthLimit: ctx.opts.bandwidthLimit } : {}),
    ...(guest.firewallConfig !== undefined ? { firewallConfig: guest.firewallConfig } : {}),
    archiveName,
    signal: ctx.signal,
  };
  await settleOnAbort(ctx.driver.backupContainer(guest.vmid, { config: guest.config, excludePaths, info }), ctx.signal);
}

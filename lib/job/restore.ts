/**
 * Restore through a provider: VMs with `qemu-img convert` (or the provider itself, for a
 * provider that writes a device into its target: {@link BackupProviderV2.restoreVmVolumeWrite}), containers
 * with GNU tar or rsync, and the guest configuration of a backup ({@link extractConfig}).
 *
 * VM restore follows qemu-server's call order (see {@link restoreVm}): a volume cleanup follows a
 * volume init that succeeded, `restoreVmCleanup` always runs. Error precedence is the seed's: the first error wins; a cleanup error is thrown only when nothing failed before it, and
 * logged otherwise.
 *
 * @packageDocumentation
 */
import { constants } from 'node:fs';
import { open, readdir, rename, stat, unlink } from 'node:fs/promises';
import path from 'node:path';

import { normaliseBandwidthLimit } from '../bandwidth.js';
import { InvalidArgumentError } from '../errors.js';
import { adaptProvider, type ProviderDriver } from '../provider/adapter.js';
import type { BackupProvider, GuestType, IdMapEntry, LogFunction, RestoreHookInfo } from '../provider/api.js';
import { MechanismError, RestoreError } from '../provider/errors.js';
import { createLogger, type ProviderLogger } from '../provider/logger.js';
import { parseIdMap } from '../container/idmap.js';
import { nameTagOwnerIsDead, ownerNameTag } from '../owner.js';
import { extractDirectoryWithTar, extractTarArchive } from '../container/tar.js';
import { isUri, qemuImgConvert, type ConvertProgress } from './qemu-img.js';

export type { ConvertProgress } from './qemu-img.js';

const toError = (e: unknown): Error => (e instanceof Error ? e : new Error(String(e)));

/** Options of {@link restoreVm}. */
export interface RestoreVmOptions {
  provider: BackupProvider;
  /** Volume name of the backup (the archive name). */
  volname: string;
  /** Storage id of the provider's storage. */
  storeid: string;
  /**
   * Where each device goes: a map from device name to a path (file or block device) or an NBD
   * URI, or a callback allocating a target of the given size (called for every device before any
   * data is copied). A map naming a device the backup does not have is refused. URIs and
   * existing targets other than regular files (block devices) are written in place; a missing
   * file is written under a temporary name of this process (`<target>.partial-<host>-<pid>-<start>`,
   * mode 0600) and renamed when complete; an existing regular file as `overwrite` says.
   */
  targets: Record<string, string> | ((device: string, size: number) => string | Promise<string>);
  /**
   * An existing regular file as a target: `'in-place'` (default) writes into it (`qemu-img -n`; a
   * larger file keeps its tail beyond the restored size), `'replace'` writes a new file as for a
   * missing target and renames it over the old one on success.
   */
  overwrite?: 'in-place' | 'replace';
  /** Writes `qemu-server.conf` (and `qemu-server.fw` if the backup has one) here, mode 0600. */
  configDir?: string;
  /** Bytes per second for `qemu-img convert` (0, `Infinity` or absent: none; negative: `ERR_INVALID_ARGUMENT`). */
  bandwidthLimit?: number;
  /** Progress of each device's convert. */
  onProgress?: (progress: ConvertProgress) => void;
  signal?: AbortSignal;
  /** Restore task log. */
  log?: LogFunction;
}

/** Result of {@link restoreVm}. */
export interface RestoreVmResult {
  /** Each device, its size and where it was restored, in the provider's order. */
  devices: Array<{ device: string; size: number; target: string }>;
  /** The backup's guest configuration. */
  config: string;
  /** The backup's firewall configuration, if any. */
  firewallConfig?: string;
  /** Files written under `configDir`. */
  configFile?: string;
  firewallFile?: string;
}

/** Options of {@link restoreContainer}. */
export interface RestoreContainerOptions {
  provider: BackupProvider;
  volname: string;
  storeid: string;
  /** The container's (empty, mounted) root directory. */
  rootdir: string;
  /**
   * Restore into a root directory that already holds files (Proxmox's behaviour then: existing
   * files are kept, GNU tar's `--skip-old-files`). Default: such a directory is refused.
   */
  allowNonEmpty?: boolean;
  /** Id map to shift owners into (entries or `lxc.idmap` values); absent: privileged. */
  idMap?: IdMapEntry[] | string[];
  /** Writes `pct.conf` (and `pct.fw`) here, mode 0600. */
  configDir?: string;
  /** Bytes per second for tar or rsync (0, `Infinity` or absent: none; negative: `ERR_INVALID_ARGUMENT`). */
  bandwidthLimit?: number;
  signal?: AbortSignal;
  log?: LogFunction;
}

/** Result of {@link restoreContainer}. */
export interface RestoreContainerResult {
  mechanism: 'tar' | 'directory';
  config: string;
  firewallConfig?: string;
  configFile?: string;
  firewallFile?: string;
}

/** Wraps `err` into a {@link RestoreError} naming the volume (unless it is one already). */
function restoreError(volname: string, err: unknown, device?: string): RestoreError {
  if (err instanceof RestoreError) return err;
  const e = toError(err);
  return new RestoreError(`restore of '${volname}' failed${device ? ` (device ${device})` : ''}: ${e.message}`, { cause: e, ...(device ? { device } : {}) });
}

/**
 * Runs `body` bracketed by the provider's optional restore hooks: `restoreStart` before,
 * `restoreEnd` after success, `restoreAbort` after failure (its own errors are logged).
 */
async function withRestoreHooks<T>(driver: ProviderDriver, volname: string, info: RestoreHookInfo, log: ProviderLogger, body: () => Promise<T>): Promise<T> {
  let result: T;
  try {
    await driver.restoreStart(volname, info);
    result = await body();
  } catch (err) {
    const e = restoreError(volname, err, (err as RestoreError)?.device);
    log.err(e.message);
    try {
      await driver.restoreAbort(volname, e, info);
    } catch (abortErr) {
      log.err(`restore abort hook failed: ${toError(abortErr).message}`);
    }
    throw e;
  }
  try {
    await driver.restoreEnd(volname, info);
  } catch (err) {
    throw restoreError(volname, err);
  }
  return result;
}

/**
 * Runs `fn`, then `cleanup` whatever happened. The first error wins: a cleanup error is thrown
 * only when `fn` succeeded, and logged otherwise (the seed's rule).
 */
async function withCleanup<T>(fn: () => Promise<T>, cleanup: () => Promise<void>, log: ProviderLogger, what: string): Promise<T> {
  let result: T;
  try {
    result = await fn();
  } catch (err) {
    try {
      await cleanup();
    } catch (cleanupErr) {
      log.warn(`${what} failed: ${toError(cleanupErr).message}`);
    }
    throw err;
  }
  await cleanup();
  return result;
}

/**
 * Writes a restored configuration file, mode 0600 whatever the umask and whatever mode a file of
 * that name had: a guest's configuration may hold secrets (cloud-init passwords, keys), and
 * `writeFile`'s default (0666 less the umask) left it readable by others, or writable under
 * umask 000.
 */
async function writePrivateFile(file: string, data: string): Promise<void> {
  const fh = await open(file, 'w', 0o600);
  try {
    await fh.chmod(0o600);
    await fh.writeFile(data);
  } finally {
    await fh.close();
  }
}

async function writeConfigs(dir: string | undefined, base: string, config: string, firewall: string | undefined): Promise<{ configFile?: string; firewallFile?: string }> {
  if (!dir) return {};
  const configFile = path.join(dir, `${base}.conf`);
  await writePrivateFile(configFile, config);
  if (firewall === undefined) return { configFile };
  const firewallFile = path.join(dir, `${base}.fw`);
  await writePrivateFile(firewallFile, firewall);
  return { configFile, firewallFile };
}

function checkCommon(o: { provider?: unknown; volname?: unknown; storeid?: unknown }): void {
  if (!o || typeof o !== 'object') throw new InvalidArgumentError('options are required');
  if (!o.provider) throw new InvalidArgumentError('provider is required');
  if (typeof o.volname !== 'string' || o.volname === '') throw new InvalidArgumentError('volname is required');
  if (typeof o.storeid !== 'string' || o.storeid === '') throw new InvalidArgumentError('storeid is required');
}

/** Where `qemu-img` writes a device, and how that becomes the target. */
interface PlacedTarget {
  /** The path or URI `qemu-img` writes. */
  writePath: string;
  /** `writePath` is a fresh all-zero file of the device's size. */
  zeroed: boolean;
  /** Makes the written data the target (renames a temporary file over it). */
  commit(): Promise<void>;
  /** Removes what a failed or cancelled restore wrote, when it is not the target itself. */
  discard(): Promise<void>;
}

/** The temporary name of a restore into `target` by this process: see {@link placeTarget}. */
const partialName = (target: string): string => `${target}.partial-${ownerNameTag()}`;

/**
 * Removes the temporary files that restores into `target` left when they were killed (SIGKILL
 * leaves no chance to remove them): those named after a process of this host that no longer runs.
 * A file of a restore still running, or of another host (a shared folder), is left alone, and so
 * is anything else in the folder.
 */
async function removeDeadPartials(target: string): Promise<void> {
  const base = path.basename(target);
  for (const name of await readdir(path.dirname(target)).catch(() => [] as string[])) {
    if (name.startsWith(`${base}.partial-`) && nameTagOwnerIsDead(name.slice(base.length + '.partial-'.length))) await unlink(path.join(path.dirname(target), name)).catch(() => undefined);
  }
}

/**
 * A restore into a file goes to `<target>.partial-<host>-<pid>-<start>` and is renamed only once
 * complete, so an interrupted restore never leaves a full-size file that looks restored. The name
 * is this process's own: a second restore into the same target at the same time writes a file of
 * its own instead of taking over (or removing) this one, so each restore renames exactly what it
 * wrote and the target is always one whole backup (the last to complete). The file is created
 * 0600 whatever the umask: it holds a guest's disk. Block devices, other special files, URIs and
 * (with `overwrite: 'in-place'`) existing regular files are written in place.
 */
async function placeTarget(target: string, size: number, overwrite: 'in-place' | 'replace'): Promise<PlacedTarget> {
  const inPlace: PlacedTarget = { writePath: target, zeroed: false, commit: async () => {}, discard: async () => {} };
  if (isUri(target)) return inPlace;
  const st = await stat(target).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return undefined;
    throw err;
  });
  if (st && (!st.isFile() || overwrite === 'in-place')) return inPlace;
  await removeDeadPartials(target);
  const partial = partialName(target);
  const fh = await open(partial, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
  try {
    await fh.chmod(0o600); // the umask may have taken bits off the mode passed to open
    await fh.truncate(size);
    await fh.close();
  } catch (err) {
    await fh.close().catch(() => undefined);
    await unlink(partial).catch(() => undefined);
    throw err;
  }
  return {
    writePath: partial,
    zeroed: true,
    commit: async () => {
      // the data must be on disk before the name says the restore is complete
      const f = await open(partial, 'r+');
      try {
        await f.sync();
      } finally {
        await f.close();
      }
      await rename(partial, target);
      const dir = await open(path.dirname(target), 'r');
      try {
        await dir.sync();
      } finally {
        await dir.close();
      }
    },
    discard: () => unlink(partial).catch(() => undefined),
  };
}

/**
 * One device written by the provider itself ({@link BackupProviderV2.restoreVmVolumeWrite}) into
 * the placed target. `false` when the provider has no such method or declines this device: the
 * standard path follows, and a target file created here is removed first.
 */
async function writeVolume(driver: ProviderDriver, volname: string, d: { device: string; size: number; target: string }, o: RestoreVmOptions, bandwidthLimit: number | undefined): Promise<boolean> {
  if (!driver.hasVolumeWrite) return false;
  const placed = await placeTarget(d.target, d.size, o.overwrite ?? 'in-place');
  try {
    const written = await driver.vmVolumeWrite(volname, d.device, {
      path: placed.writePath,
      size: d.size,
      zeroed: placed.zeroed,
      ...(bandwidthLimit ? { bandwidthLimit } : {}),
      ...(o.onProgress ? { onProgress: (p: { done: number; total: number }) => o.onProgress!({ device: d.device, bytes: p.done, total: p.total, percent: p.total > 0 ? (100 * p.done) / p.total : 100 }) } : {}),
      ...(o.signal ? { signal: o.signal } : {}),
    });
    if (written) await placed.commit();
    else await placed.discard();
    return written;
  } catch (err) {
    await placed.discard();
    throw err;
  }
}

async function restoreMechanism(driver: ProviderDriver, volname: string, storeid: string, expected: GuestType): Promise<RestoreHookInfo> {
  let m;
  try {
    m = await driver.restoreMechanism(volname, storeid);
  } catch (err) {
    throw restoreError(volname, err);
  }
  const what = expected === 'qemu' ? 'VMs' : 'containers';
  if (m.vmtype !== expected) {
    throw restoreError(volname, new MechanismError(`cannot restore a guest of type '${m.vmtype}' as ${expected === 'qemu' ? 'a VM' : 'a container'}`, { mechanism: m.mechanism, vmtype: m.vmtype }));
  }
  const ok = expected === 'qemu' ? m.mechanism === 'qemu-img' : m.mechanism === 'tar' || m.mechanism === 'directory';
  if (!ok) {
    throw restoreError(volname, new MechanismError(`restore mechanism '${m.mechanism}' requested by the backup provider is not supported for ${what}`, { mechanism: m.mechanism, vmtype: m.vmtype }));
  }
  return { storeid, vmtype: m.vmtype, mechanism: m.mechanism };
}

/**
 * Restores a VM backup in qemu-server's order (`QemuServer.pm` `restore_external_archive`):
 * mechanism (must be `qemu-img` for `qemu`), device info (V1 `restoreQemuGetDeviceInfo`, V2
 * `restoreVmInit`; a missing size fails before anything is written), guest and firewall config,
 * targets, then per device `restoreQemuImgInit` (V2 `restoreVmVolumeInit`), `qemu-img convert`
 * to raw and the matching volume cleanup; V2 `restoreVmCleanup` last, always, even when the
 * mechanism could not be had. A volume cleanup follows only a volume init that succeeded, as
 * upstream's (its init is outside the per-volume `eval`): a failing init cleans up after itself.
 *
 * @throws {@link RestoreError} (`ERR_RESTORE`, `cause` the original error, `device` when known).
 */
export async function restoreVm(o: RestoreVmOptions): Promise<RestoreVmResult> {
  checkCommon(o);
  const bandwidthLimit = normaliseBandwidthLimit(o.bandwidthLimit, 'bandwidthLimit');
  if (!o.targets || (typeof o.targets !== 'object' && typeof o.targets !== 'function')) throw new InvalidArgumentError('targets must be a map or a function');
  const driver = adaptProvider(o.provider);
  const log = createLogger(o.log);
  const { volname, storeid } = o;
  let info: RestoreHookInfo;
  try {
    info = await restoreMechanism(driver, volname, storeid, 'qemu');
  } catch (err) {
    // upstream runs restore_vm_cleanup after its eval whatever died in it, restore_get_mechanism included
    if (driver.hasVmCleanup) {
      try {
        await driver.vmCleanup(volname, storeid);
      } catch (cleanupErr) {
        log.warn(`restore cleanup failed: ${toError(cleanupErr).message}`);
      }
    }
    throw err;
  }
  return withRestoreHooks(driver, volname, info, log, async () => {
    const run = async (): Promise<RestoreVmResult> => {
      // restore_vm_init comes before the configs: a provider may open its session there
      const sizes = await driver.vmInit(volname, storeid);
      const config = await driver.guestConfig(volname, storeid);
      const firewallConfig = await driver.firewallConfig(volname, storeid);
      const files = await writeConfigs(o.configDir, 'qemu-server', config, firewallConfig);
      const devices: RestoreVmResult['devices'] = [];
      // a target for a device the backup lacks is a typo or the wrong backup, never to be ignored
      if (typeof o.targets === 'object') {
        const unknown = Object.keys(o.targets).filter((d) => !Object.hasOwn(sizes, d));
        if (unknown.length > 0) {
          throw new RestoreError(
            `restore of '${volname}' failed: the backup has no device ${unknown.join(', ')} (it has ${Object.keys(sizes).join(', ') || 'none'})`,
            { device: unknown[0]! },
          );
        }
      }
      for (const [device, { size }] of Object.entries(sizes)) {
        let target: string | undefined;
        try {
          target = typeof o.targets === 'function' ? await o.targets(device, size) : o.targets[device];
        } catch (err) {
          throw restoreError(volname, err, device);
        }
        if (typeof target !== 'string' || target === '') throw new RestoreError(`restore of '${volname}' failed: no target for device ${device}`, { device });
        devices.push({ device, size, target });
      }
      for (const d of devices) {
        log.info(`restoring device ${d.device} (${d.size} bytes) to ${d.target}`);
        o.signal?.throwIfAborted();
        // a provider may write a file or block device itself (package extension); URIs go through qemu-img
        let written: boolean;
        try {
          written = !isUri(d.target) && (await writeVolume(driver, volname, d, o, bandwidthLimit));
        } catch (err) {
          throw restoreError(volname, err, d.device);
        }
        if (written) continue;
        // qemu-server calls restore_vm_volume_init outside the eval around convert and cleanup:
        // when the init dies, no volume cleanup follows.
        let source: string;
        try {
          source = await driver.vmVolumeInit(volname, storeid, d.device);
        } catch (err) {
          throw restoreError(volname, err, d.device);
        }
        await withCleanup(
          async () => {
            const placed = await placeTarget(d.target, d.size, o.overwrite ?? 'in-place');
            try {
              await qemuImgConvert({
                source,
                target: placed.writePath,
                device: d.device,
                size: d.size,
                ...(placed.zeroed ? { targetIsZero: true } : {}),
                bandwidthLimit,
                ...(o.onProgress ? { onProgress: o.onProgress } : {}),
                ...(o.signal ? { signal: o.signal } : {}),
              });
              await placed.commit();
            } catch (err) {
              await placed.discard();
              throw err;
            }
          },
          () => driver.vmVolumeCleanup(volname, storeid, d.device),
          log,
          `cleanup of device ${d.device}`,
        ).catch((err: unknown) => {
          throw restoreError(volname, err, d.device);
        });
      }
      return { devices, config, ...(firewallConfig !== undefined ? { firewallConfig } : {}), ...files };
    };
    // restoreVmCleanup (V2) runs whatever happened in `run`; V1 has none.
    if (!driver.hasVmCleanup) return run();
    return withCleanup(run, () => driver.vmCleanup(volname, storeid), log, 'restore cleanup');
  });
}

/**
 * Restores a container backup into `rootdir`: mechanism `tar` (GNU tar: numeric owners, xattrs,
 * ACLs, sparse files, ids shifted by `idMap`) or `directory` (`tar cpf - | tar xpf -` as
 * pve-container does, ids shifted the same way), with the matching cleanup always called.
 *
 * @throws {@link RestoreError} (`ERR_RESTORE`).
 */
export async function restoreContainer(o: RestoreContainerOptions): Promise<RestoreContainerResult> {
  checkCommon(o);
  const bandwidthLimit = normaliseBandwidthLimit(o.bandwidthLimit, 'bandwidthLimit');
  if (typeof o.rootdir !== 'string' || o.rootdir === '') throw new InvalidArgumentError('rootdir is required');
  const driver = adaptProvider(o.provider);
  const log = createLogger(o.log);
  const { volname, storeid } = o;
  const info = await restoreMechanism(driver, volname, storeid, 'lxc');
  const mechanism = info.mechanism as 'tar' | 'directory';
  let idMap: IdMapEntry[] | undefined;
  if (o.idMap && o.idMap.length > 0) idMap = typeof o.idMap[0] === 'string' ? parseIdMap(o.idMap as string[]) : (o.idMap as IdMapEntry[]);
  return withRestoreHooks(driver, volname, info, log, async () => {
    const config = await driver.guestConfig(volname, storeid);
    const firewallConfig = await driver.firewallConfig(volname, storeid);
    const files = await writeConfigs(o.configDir, 'pct', config, firewallConfig);
    // a provider that extracts the backup itself (package extension): no archive, no cleanup
    const target = { rootdir: o.rootdir, ...(idMap ? { idMap } : {}), ...(o.allowNonEmpty ? { allowNonEmpty: true } : {}), ...(bandwidthLimit ? { bandwidthLimit } : {}), ...(o.signal ? { signal: o.signal } : {}) };
    if (await driver.containerWrite(volname, target)) {
      return { mechanism, config, ...(firewallConfig !== undefined ? { firewallConfig } : {}), ...files };
    }
    // As pve-container (src/PVE/LXC/Create.pm restore_external_archive): the init runs outside
    // the eval, so an init that dies gets no cleanup; after a good init the cleanup always runs.
    const source = await driver.containerInit(volname, storeid, mechanism);
    await withCleanup(
      async () => {
        const common = {
          rootdir: o.rootdir,
          ...(o.allowNonEmpty ? { allowNonEmpty: true } : {}),
          ...(idMap ? { idMap } : {}),
          bandwidthLimit,
          ...(o.signal ? { signal: o.signal } : {}),
        };
        log.info(`restoring ${mechanism === 'tar' ? `archive ${source}` : `directory ${source}`} into ${o.rootdir}`);
        if (mechanism === 'tar') await extractTarArchive({ archive: source, ...common });
        // pve-container restores a directory with a tar pipe, not rsync (docs/pve-bridge-notes.md 4.2)
        else await extractDirectoryWithTar({ source, ...common });
      },
      () => driver.containerCleanup(volname, storeid, mechanism),
      log,
      'restore cleanup',
    );
    return { mechanism, config, ...(firewallConfig !== undefined ? { firewallConfig } : {}), ...files };
  });
}

/**
 * The guest configuration stored in a backup, delegated to the provider (V1
 * `extractGuestConfig`, V2 `archiveGetGuestConfig`). Perl: `PVE::Storage::extract_vzdump_config`
 * for external providers (seed storage patch 11).
 *
 * @param provider - The provider.
 * @param volid - `<storeid>:<volname>`.
 */
export async function extractConfig(provider: BackupProvider, volid: string): Promise<string> {
  const i = typeof volid === 'string' ? volid.indexOf(':') : -1;
  if (i <= 0 || i === volid.length - 1) throw new InvalidArgumentError(`invalid volume id ${JSON.stringify(volid)}: expected <storeid>:<volname>`);
  const storeid = volid.slice(0, i);
  const volname = volid.slice(i + 1);
  return adaptProvider(provider).guestConfig(volname, storeid);
}

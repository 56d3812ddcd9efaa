/**
 * The one place where the two API generations meet: {@link adaptProvider} checks a provider's
 * API version and wraps it in a {@link ProviderDriver}, the single internal shape the job runner
 * and the restore functions drive. Everything generation-specific (which Perl-era method maps to
 * which phase, result shapes, defaults) lives here.
 *
 * @packageDocumentation
 */
import { BITMAP_ID_RE, type BitmapAction, type BitmapMode } from '../vocabulary.js';
import {
  PROVIDER_API_AGE,
  PROVIDER_API_VERSION,
  type BackupMechanism,
  type BackupProvider,
  type BackupProviderV1,
  type BackupProviderV2,
  type BackupVmVolume,
  type ContainerBackupInfo,
  type ProviderCommon,
  type GuestType,
  type IncrementalRequest,
  type ProviderStorage,
  type RestoreHookInfo,
  type RestoreContainerTarget,
  type RestoreVolumeTarget,
  type RestoreMechanism,
  type RestoreMechanismInfo,
  type VolumeSize,
} from './api.js';
import { MechanismError, NotImplementedError, ProviderApiVersionError, ProviderResultError } from './errors.js';

/** Archive names: `PVE::Storage::SAFE_CHAR_CLASS_RE` plus `/` and `:`. */
const ARCHIVE_NAME_RE = /^[A-Za-z0-9\-.+=_/:]+$/;

/** What the runner decided about bitmaps for a VM, per device. */
export interface BitmapPlan {
  /** Bitmap id for backup access (`undefined`: none for any device). */
  bitmapId: string | undefined;
  /** Per device: `use` the bitmap, force `new` (recreate), or `none`. */
  devices: Record<string, 'use' | 'new' | 'none'>;
}

/** One VM volume as the runner prepared it (backup access set up). */
export interface DriverVolume {
  device: string;
  size: number;
  bitmapMode: BitmapMode;
  bitmapAction: BitmapAction;
  bitmapName: string | undefined;
  nbdPath: string;
  nbdUri: string;
  /** Mechanism `file-handle`: handle and region iterator built by the runner. */
  fileHandle?: BackupVmVolume['fileHandle'];
  nextDirtyRegion?: BackupVmVolume['nextDirtyRegion'];
}

/** The internal shape of a provider, whatever its generation. */
export interface ProviderDriver {
  /** 1: seed shape; 2: Proxmox VE 8.4 shape. */
  readonly generation: 1 | 2;
  /** The declared API version. */
  readonly apiVersion: number;
  /** The wrapped provider. */
  readonly provider: BackupProvider;
  /** Storage-side hooks, if the provider has them. */
  readonly storage: ProviderStorage | undefined;
  /** `providerName()`, cached (falls back to `'unnamed'` when it fails). */
  name(): Promise<string>;

  jobStart(startTime: number): Promise<void>;
  jobEnd(): Promise<void>;
  jobAbort(error: Error): Promise<void>;

  /**
   * The volume name of an archive: V2 `backup/<archiveName>`, as vzdump builds the volume id
   * (pve-manager `VZDump.pm`: `"${storeid}:backup/${archive_name}"`); V1 the target as it is (the
   * seed's `backup_get_target` names the volume).
   */
  volname(archiveName: string): string;
  /** Starts a guest's backup; returns the archive name. V1: `backupStart` + `backupGetTarget`; V2: `backupInit`. */
  backupStart(vmid: number, vmtype: GuestType, startTime: number): Promise<string>;
  /** Hands over the configuration files. V1: `backupGuestConfig` / `backupFirewallConfig`; V2: nothing (passed with the data). */
  backupConfigs(vmid: number, files: { configFile: string; firewallFile: string | undefined }): Promise<void>;
  /** The mechanism, validated for the guest type, and (V1) the provider's bitmap id. */
  backupMechanism(vmid: number, vmtype: GuestType): Promise<{ mechanism: BackupMechanism; bitmapId: string | undefined }>;
  /** Which devices use a bitmap. V1: all, with `<storeid>-<bitmapId>`; V2: `backupVmQueryIncremental`, bitmap id `<storeid>`. */
  vmBitmapPlan(vmid: number, providerBitmapId: string | undefined, sizes: Record<string, number>, storeid: string): Promise<BitmapPlan>;
  /** Backs up the VM's volumes. V1: `backupNbd` per device, in order; V2: `backupVm`. */
  backupVm(
    vmid: number,
    o: { config: string; firewallConfig: string | undefined; mechanism: 'nbd' | 'file-handle'; volumes: DriverVolume[]; bandwidthLimit: number | undefined; archiveName: string; signal: AbortSignal },
  ): Promise<void>;
  /** Backs up a container. V1: `backupDirectory`; V2: `backupContainerPrepare` + `backupContainer`. */
  backupContainer(vmid: number, o: { config: string; excludePaths: string[]; info: ContainerBackupInfo }): Promise<void>;
  /**
   * Ends a guest's backup. Success: V1 `backupGetTaskSize` (VMs) + `backupEnd`; V2 `backupCleanup(true)`.
   * Failure: V1 `backupAbort`; V2 `backupCleanup(false, { error })`.
   */
  backupFinish(vmid: number, vmtype: GuestType, outcome: { error?: Error }): Promise<{ size: number | undefined }>;
  handleLogFile(vmid: number, filename: string): Promise<void>;

  restoreMechanism(volname: string, storeid: string): Promise<RestoreMechanismInfo>;
  guestConfig(volname: string, storeid: string): Promise<string>;
  firewallConfig(volname: string, storeid: string): Promise<string | undefined>;
  /** V1: `restoreQemuGetDeviceInfo`; V2: `restoreVmInit`. */
  vmInit(volname: string, storeid: string): Promise<Record<string, VolumeSize>>;
  /** V1: nothing; V2: `restoreVmCleanup`. */
  vmCleanup(volname: string, storeid: string): Promise<void>;
  /** `hasCleanup`: whether `vmCleanup` calls the provider (V2). */
  readonly hasVmCleanup: boolean;
  vmVolumeInit(volname: string, storeid: string, device: string): Promise<string>;
  /** Whether the provider has the V2 package extension `restoreVmVolumeWrite`. */
  readonly hasVolumeWrite: boolean;
  /** V2 package extension `restoreVmVolumeWrite`: `false` when the provider declines the device. */
  vmVolumeWrite(volname: string, device: string, target: RestoreVolumeTarget): Promise<boolean>;
  vmVolumeCleanup(volname: string, storeid: string, device: string): Promise<void>;
  containerInit(volname: string, storeid: string, mechanism: 'tar' | 'directory'): Promise<string>;
  /** V2 package extension `restoreContainerWrite`: `false` when the provider declines (or lacks it). */
  containerWrite(volname: string, target: RestoreContainerTarget): Promise<boolean>;
  containerCleanup(volname: string, storeid: string, mechanism: 'tar' | 'directory'): Promise<void>;
  restoreStart(volname: string, info: RestoreHookInfo): Promise<void>;
  restoreEnd(volname: string, info: RestoreHookInfo): Promise<void>;
  restoreAbort(volname: string, error: Error, info: RestoreHookInfo): Promise<void>;
}

/**
 * Checks a provider's declared `apiVersion` against the runner's version and age.
 * @throws {@link ProviderApiVersionError} when it cannot be served.
 */
export function checkApiVersion(provider: unknown): number {
  const v = provider && typeof provider === 'object' ? (provider as { apiVersion?: unknown }).apiVersion : undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v > PROVIDER_API_VERSION || v < PROVIDER_API_VERSION - PROVIDER_API_AGE) {
    throw new ProviderApiVersionError(v, PROVIDER_API_VERSION, PROVIDER_API_AGE);
  }
  return v;
}

function toError(e: unknown): Error {
  return e instanceof Error ? e : new Error(String(e));
}

function checkArchiveName(method: string, name: unknown): string {
  if (typeof name !== 'string' || !ARCHIVE_NAME_RE.test(name) || name.split('/').some((s) => s === '..' || s === '.')) {
    throw new ProviderResultError(method, `invalid archive name ${JSON.stringify(name)}: only letters, digits and - . + = _ / : are allowed`);
  }
  return name;
}

function checkSizes(method: string, info: unknown): Record<string, VolumeSize> {
  if (!info || typeof info !== 'object') throw new ProviderResultError(method, 'returned no device information');
  const out: Record<string, VolumeSize> = {};
  for (const [device, v] of Object.entries(info as Record<string, unknown>)) {
    const size = v && typeof v === 'object' ? (v as { size?: unknown }).size : undefined;
    if (typeof size !== 'number' || !Number.isSafeInteger(size) || size <= 0) {
      throw new ProviderResultError(method, `missing or invalid size for device '${device}' (${JSON.stringify(size)})`);
    }
    out[device] = { size };
  }
  return out;
}

const guestWord = (t: GuestType): string => (t === 'qemu' ? 'VMs' : 'containers');

/** The names of the methods of API `P`. */
type MethodOf<P> = { [K in keyof P & string]-?: NonNullable<P[K]> extends (...args: never[]) => unknown ? K : never }[keyof P & string];
/** The arguments of method `M` of API `P`, as the API declares them. */
type ArgsOf<P, M extends keyof P> = NonNullable<P[M]> extends (...args: infer A) => unknown ? A : never;
/** Calls a method of API `P` by name; the compiler checks the name and the arguments. */
type Caller<P> = <M extends MethodOf<P>>(method: M, ...args: ArgsOf<P, M>) => Promise<unknown>;

/**
 * Wraps a provider of either generation in the runner's internal shape, after checking its API
 * version. Methods the provider lacks fail with {@link NotImplementedError} when called.
 *
 * @throws {@link ProviderApiVersionError} before anything is called when the version is refused.
 */
export function adaptProvider(provider: BackupProvider): ProviderDriver {
  const apiVersion = checkApiVersion(provider);
  let cachedName: string | undefined;
  const name = async (): Promise<string> => {
    if (cachedName !== undefined) return cachedName;
    try {
      const n = typeof provider.providerName === 'function' ? await provider.providerName() : undefined;
      cachedName = typeof n === 'string' && n !== '' ? n : provider.constructor?.name || 'unnamed';
    } catch {
      cachedName = provider.constructor?.name || 'unnamed';
    }
    return cachedName;
  };
  /**
   * Calls `method` on the provider, or throws NotImplementedError when it has none. The name and
   * the arguments are checked against the API by the compiler; the result is the provider's word
   * (it may be plain JavaScript), so callers that use it check it.
   */
  const callAny = async (method: string, args: unknown[]): Promise<unknown> => {
    const fn = (provider as unknown as Record<string, unknown>)[method];
    if (typeof fn !== 'function') throw new NotImplementedError(method, await name());
    return await (fn as (...a: unknown[]) => unknown).apply(provider, args);
  };
  const call1: Caller<BackupProviderV1> = (method, ...args) => callAny(method, args);
  const call2: Caller<BackupProviderV2> = (method, ...args) => callAny(method, args);
  /** Calls a hook every provider may have, when it has it. */
  const optional = async <M extends MethodOf<ProviderCommon>>(method: M, ...args: ArgsOf<ProviderCommon, M>): Promise<void> => {
    const fn = (provider as unknown as Record<string, unknown>)[method];
    if (typeof fn === 'function') await (fn as (...a: unknown[]) => unknown).apply(provider, args);
  };
  /** Runs a method whose result is not used. */
  const run = async (result: Promise<unknown>): Promise<void> => {
    await result;
  };
  const mechanismFor = async (vmtype: GuestType, mech: unknown, allowed: readonly string[]): Promise<BackupMechanism> => {
    if (mech === undefined || mech === null || mech === '') {
      throw new MechanismError(`backup provider '${await name()}' returned no backup mechanism for ${guestWord(vmtype)}`, { mechanism: undefined, vmtype });
    }
    if (typeof mech !== 'string' || !allowed.includes(mech)) {
      throw new MechanismError(`mechanism '${String(mech)}' requested by backup provider '${await name()}' is not supported for ${guestWord(vmtype)}`, {
        mechanism: String(mech),
        vmtype,
      });
    }
    return mech as BackupMechanism;
  };
  const storage = (provider as { storage?: ProviderStorage }).storage;
  const common = {
    apiVersion,
    provider,
    storage: storage && typeof storage === 'object' ? storage : undefined,
    name,
    handleLogFile: (vmid: number, filename: string) => run(callAny('backupHandleLogFile', [vmid, filename])),
    restoreStart: (volname: string, info: RestoreHookInfo) => optional('restoreStart', volname, info),
    restoreEnd: (volname: string, info: RestoreHookInfo) => optional('restoreEnd', volname, info),
    restoreAbort: (volname: string, error: Error, info: RestoreHookInfo) => optional('restoreAbort', volname, error, info),
  };
  const checkRestoreMechanism = (method: string, r: unknown): RestoreMechanismInfo => {
    const m = r as Partial<RestoreMechanismInfo> | undefined;
    const mechanisms: RestoreMechanism[] = ['qemu-img', 'tar', 'directory'];
    if (!m || !mechanisms.includes(m.mechanism as RestoreMechanism) || (m.vmtype !== 'qemu' && m.vmtype !== 'lxc')) {
      throw new ProviderResultError(method, `expected { mechanism: 'qemu-img' | 'tar' | 'directory', vmtype: 'qemu' | 'lxc' }, got ${JSON.stringify(r)}`);
    }
    return { mechanism: m.mechanism!, vmtype: m.vmtype };
  };

  if (apiVersion === 1) {
    const driver: ProviderDriver = {
      ...common,
      generation: 1,
      volname: (archiveName) => archiveName,
      jobStart: (t) => run(call1('jobStart', t)),
      jobEnd: () => run(call1('jobEnd')),
      jobAbort: (e) => run(call1('jobAbort', e)),
      backupStart: async (vmid, vmtype) => {
        await call1('backupStart', vmid, vmtype);
        return checkArchiveName('backupGetTarget', await call1('backupGetTarget', vmid, vmtype));
      },
      backupConfigs: async (vmid, files) => {
        await call1('backupGuestConfig', vmid, files.configFile);
        if (files.firewallFile !== undefined) await call1('backupFirewallConfig', vmid, files.firewallFile);
      },
      backupMechanism: async (vmid, vmtype) => {
        const r = (await call1('backupGetMechanism', vmid, vmtype)) as { mechanism?: unknown; bitmapId?: unknown } | undefined;
        const mechanism = await mechanismFor(vmtype, r?.mechanism, vmtype === 'qemu' ? ['nbd'] : ['directory']);
        const bitmapId = r?.bitmapId;
        if (bitmapId !== undefined && bitmapId !== null && (typeof bitmapId !== 'string' || !BITMAP_ID_RE.test(bitmapId))) {
          throw new ProviderResultError('backupGetMechanism', `invalid bitmap id ${JSON.stringify(bitmapId)}: must match ${String(BITMAP_ID_RE)}`);
        }
        return { mechanism, bitmapId: typeof bitmapId === 'string' ? bitmapId : undefined };
      },
      vmBitmapPlan: async (_vmid, providerBitmapId, sizes, storeid) => {
        const devices: BitmapPlan['devices'] = {};
        for (const d of Object.keys(sizes)) devices[d] = providerBitmapId ? 'use' : 'none';
        return { bitmapId: providerBitmapId ? `${storeid}-${providerBitmapId}` : undefined, devices };
      },
      backupVm: async (vmid, o) => {
        for (const v of o.volumes) {
          // the seed's API takes a number, 0 for no limit
          await call1('backupNbd', vmid, v.device, v.nbdPath, v.bitmapMode, v.bitmapName, o.bandwidthLimit ?? 0, {
            bitmapAction: v.bitmapAction,
            size: v.size,
            nbdUri: v.nbdUri,
            archiveName: o.archiveName,
            signal: o.signal,
          });
        }
      },
      backupContainer: (vmid, o) =>
        run(call1('backupDirectory', vmid, o.info.directory, o.info.idMap, o.excludePaths, o.info.sources, o.info.bandwidthLimit ?? 0, { signal: o.info.signal })),
      backupFinish: async (vmid, vmtype, outcome) => {
        if (outcome.error) {
          await call1('backupAbort', vmid, outcome.error);
          return { size: undefined };
        }
        let size: number | undefined;
        if (vmtype === 'qemu') {
          const s = await call1('backupGetTaskSize', vmid);
          size = typeof s === 'number' && Number.isFinite(s) ? s : undefined;
        }
        await call1('backupEnd', vmid);
        return { size };
      },
      restoreMechanism: async (volname, storeid) => checkRestoreMechanism('restoreGetMechanism', await call1('restoreGetMechanism', volname, storeid)),
      guestConfig: async (volname, storeid) => {
        const c = await call1('extractGuestConfig', volname, storeid);
        if (typeof c !== 'string') throw new ProviderResultError('extractGuestConfig', 'returned no configuration');
        return c;
      },
      firewallConfig: async (volname, storeid) => {
        const c = await call1('extractFirewallConfig', volname, storeid);
        return typeof c === 'string' ? c : undefined;
      },
      vmInit: async (volname, storeid) => checkSizes('restoreQemuGetDeviceInfo', await call1('restoreQemuGetDeviceInfo', volname, storeid)),
      vmCleanup: async () => {},
      hasVmCleanup: false,
      vmVolumeInit: async (volname, storeid, device) => {
        const path = await call1('restoreQemuImgInit', volname, storeid, device);
        if (typeof path !== 'string' || path === '') throw new ProviderResultError('restoreQemuImgInit', `returned no path for device '${device}'`);
        return path;
      },
      vmVolumeCleanup: (volname, storeid, device) => run(call1('restoreQemuImgCleanup', volname, storeid, device)),
      hasVolumeWrite: false,
      vmVolumeWrite: async () => false,
      containerInit: async (volname, storeid, mechanism) => {
        const method = mechanism === 'tar' ? 'restoreTarInit' : 'restoreDirectoryInit';
        const path = await call1(method, volname, storeid);
        if (typeof path !== 'string' || path === '') throw new ProviderResultError(method, 'returned no path');
        return path;
      },
      containerCleanup: (volname, storeid, mechanism) => run(call1(mechanism === 'tar' ? 'restoreTarCleanup' : 'restoreDirectoryCleanup', volname, storeid)),
      containerWrite: async () => false,
    };
    return driver;
  }

  const driver: ProviderDriver = {
    ...common,
    generation: 2,
    volname: (archiveName) => `backup/${archiveName}`,
    jobStart: (t) => run(call2('jobInit', t)),
    jobEnd: () => run(call2('jobCleanup')),
    jobAbort: () => run(call2('jobCleanup')),
    backupStart: async (vmid, vmtype, startTime) => {
      const r = (await call2('backupInit', vmid, vmtype, startTime)) as { archiveName?: unknown } | undefined;
      return checkArchiveName('backupInit', r?.archiveName);
    },
    backupConfigs: async () => {},
    backupMechanism: async (vmid, vmtype) => {
      const r = await call2('backupGetMechanism', vmid, vmtype);
      return { mechanism: await mechanismFor(vmtype, r, vmtype === 'qemu' ? ['nbd', 'file-handle'] : ['directory']), bitmapId: undefined };
    },
    vmBitmapPlan: async (vmid, _id, sizes, storeid) => {
      const volumes: Record<string, VolumeSize> = {};
      for (const [d, size] of Object.entries(sizes)) volumes[d] = { size };
      const r = (await call2('backupVmQueryIncremental', vmid, volumes)) as Record<string, unknown> | undefined | null;
      const devices: BitmapPlan['devices'] = {};
      for (const d of Object.keys(sizes)) devices[d] = 'none';
      if (r !== undefined && r !== null) {
        if (typeof r !== 'object') throw new ProviderResultError('backupVmQueryIncremental', 'expected an object mapping device names to new, use or none');
        for (const [d, req] of Object.entries(r)) {
          if (!(d in sizes)) throw new ProviderResultError('backupVmQueryIncremental', `unknown device '${d}'`);
          // qemu-server accepts exactly these three ("invalid incremental mode" otherwise)
          if (req !== 'new' && req !== 'use' && req !== 'none') throw new ProviderResultError('backupVmQueryIncremental', `device '${d}': expected 'new', 'use' or 'none', got ${JSON.stringify(req)}`);
          devices[d] = req as IncrementalRequest;
        }
      }
      const any = Object.values(devices).some((m) => m !== 'none');
      return { bitmapId: any ? storeid : undefined, devices };
    },
    backupVm: async (vmid, o) => {
      const volumes: Record<string, BackupVmVolume> = {};
      for (const v of o.volumes) {
        const base = { size: v.size, bitmapMode: v.bitmapMode, bitmapAction: v.bitmapAction };
        volumes[v.device] =
          o.mechanism === 'nbd'
            ? { ...base, nbdPath: v.nbdPath, nbdUri: v.nbdUri, ...(v.bitmapName !== undefined ? { bitmapName: v.bitmapName } : {}) }
            : { ...base, fileHandle: v.fileHandle!, nextDirtyRegion: v.nextDirtyRegion! };
      }
      await call2('backupVm', vmid, o.config, volumes, {
        mechanism: o.mechanism,
        archiveName: o.archiveName,
        signal: o.signal,
        ...(o.bandwidthLimit !== undefined ? { bandwidthLimit: o.bandwidthLimit } : {}),
        ...(o.firewallConfig !== undefined ? { firewallConfig: o.firewallConfig } : {}),
      });
    },
    backupContainer: async (vmid, o) => {
      await call2('backupContainerPrepare', vmid, o.info);
      await call2('backupContainer', vmid, o.config, o.excludePaths, o.info);
    },
    backupFinish: async (vmid, vmtype, outcome) => {
      const success = !outcome.error;
      const r = (await call2('backupCleanup', vmid, vmtype, success, outcome.error ? { error: toError(outcome.error).message } : {})) as { stats?: { archiveSize?: unknown } } | undefined;
      const size = r?.stats?.archiveSize;
      return { size: success && typeof size === 'number' && Number.isFinite(size) ? size : undefined };
    },
    restoreMechanism: async (volname) => checkRestoreMechanism('restoreGetMechanism', await call2('restoreGetMechanism', volname)),
    guestConfig: async (volname) => {
      const c = await call2('archiveGetGuestConfig', volname);
      if (typeof c !== 'string') throw new ProviderResultError('archiveGetGuestConfig', 'returned no configuration');
      return c;
    },
    firewallConfig: async (volname) => {
      const c = await call2('archiveGetFirewallConfig', volname);
      return typeof c === 'string' ? c : undefined;
    },
    vmInit: async (volname) => checkSizes('restoreVmInit', await call2('restoreVmInit', volname)),
    vmCleanup: (volname) => run(call2('restoreVmCleanup', volname)),
    hasVmCleanup: true,
    vmVolumeInit: async (volname, _storeid, device) => {
      const r = (await call2('restoreVmVolumeInit', volname, device, {})) as { qemuImgPath?: unknown } | undefined;
      const path = r?.qemuImgPath;
      if (typeof path !== 'string' || path === '') throw new ProviderResultError('restoreVmVolumeInit', `returned no qemuImgPath for device '${device}'`);
      return path;
    },
    vmVolumeCleanup: (volname, _storeid, device) => run(call2('restoreVmVolumeCleanup', volname, device, {})),
    hasVolumeWrite: typeof (provider as Partial<BackupProviderV2>).restoreVmVolumeWrite === 'function',
    vmVolumeWrite: async (volname, device, target) => {
      return (await callAny('restoreVmVolumeWrite', [volname, device, target])) === true;
    },
    // pve-container passes three arguments where Base.pm documents two (docs/pve-bridge-notes.md 4.2)
    containerInit: async (volname, storeid, mechanism) => {
      const r = (await call2('restoreContainerInit', volname, storeid, {})) as { tarPath?: unknown; archiveDirectory?: unknown } | undefined;
      const path = mechanism === 'tar' ? r?.tarPath : r?.archiveDirectory;
      if (typeof path !== 'string' || path === '') {
        throw new ProviderResultError('restoreContainerInit', `mechanism ${mechanism} needs ${mechanism === 'tar' ? 'tarPath' : 'archiveDirectory'}, got ${JSON.stringify(r)}`);
      }
      return path;
    },
    containerCleanup: (volname, storeid) => run(call2('restoreContainerCleanup', volname, storeid, {})),
    containerWrite: async (volname, target) => {
      if (typeof (provider as Partial<BackupProviderV2>).restoreContainerWrite !== 'function') return false;
      return (await callAny('restoreContainerWrite', [volname, target])) === true;
    },
  };
  return driver;
}

/**
 * Base classes for providers: every API method that must produce something throws
 * {@link NotImplementedError} naming itself, so a provider overrides what it supports and a call
 * to anything else fails clearly; prepare and cleanup hooks default to doing nothing, so a
 * provider overrides them only when it has something to prepare or clean up. They also keep the
 * construction context and the logger.
 *
 * @packageDocumentation
 */
import type {
  BackupCleanupResult,
  BackupInitResult,
  BackupMechanism,
  BackupMechanismInfoV1,
  BackupProviderV1,
  BackupProviderV2,
  BackupVmInfo,
  BackupVmVolume,
  BitmapMode,
  ContainerBackupInfo,
  GuestType,
  IdMapEntry,
  IncrementalRequest,
  NbdBackupExtra,
  ProviderContext,
  RestoreContainerInitResult,
  RestoreMechanismInfo,
  RestoreVmVolumeInitResult,
  VolumeSize,
} from './api.js';
import { NotImplementedError } from './errors.js';
import { createLogger, type ProviderLogger } from './logger.js';

/** What both base classes share: the context, the storage id, the configuration and the logger. */
abstract class ProviderBaseCommon {
  /** The construction context. */
  protected readonly context: ProviderContext;
  /** Storage id. */
  readonly storeid: string;
  /** Storage configuration. */
  protected readonly scfg: Record<string, unknown>;
  /** Logger bound to the job's log function (levels info, warn, err). */
  protected readonly log: ProviderLogger;

  /** @param context - What the runner (or your code) constructs the provider with. */
  constructor(context: ProviderContext) {
    this.context = context;
    this.storeid = context.storeid;
    this.scfg = context.scfg ?? {};
    this.log = createLogger(context.log);
  }

  /** Default: the class name. Perl: `provider_name`. */
  providerName(): string | Promise<string> {
    return this.constructor.name;
  }

  /** Throws {@link NotImplementedError} naming `method`. */
  protected notImplemented(method: string): never {
    throw new NotImplementedError(method, this.constructor.name);
  }
}

/**
 * Base class of a provider in the Proxmox VE 8.4 shape ({@link BackupProviderV2}, `apiVersion` 2).
 *
 * @example
 * ```ts
 * class MyProvider extends BackupProviderBase {
 *   override async backupGetMechanism() { return 'nbd' as const; }
 *   override async backupVm(vmid, config, volumes, info) { ... }
 * }
 * ```
 */
export class BackupProviderBase extends ProviderBaseCommon implements BackupProviderV2 {
  readonly apiVersion = 2 as const;

  async jobInit(_startTime: number): Promise<void> {
    this.notImplemented('jobInit');
  }
  /** Default: nothing to do. */
  async jobCleanup(): Promise<void> {}
  async backupInit(_vmid: number, _vmtype: GuestType, _startTime: number): Promise<BackupInitResult> {
    this.notImplemented('backupInit');
  }
  /** Default: nothing to do. */
  async backupCleanup(_vmid: number, _vmtype: GuestType, _success: boolean, _info: { error?: string }): Promise<BackupCleanupResult | void> {}
  async backupGetMechanism(_vmid: number, _vmtype: GuestType): Promise<BackupMechanism | undefined> {
    this.notImplemented('backupGetMechanism');
  }
  async backupHandleLogFile(_vmid: number, _filename: string): Promise<void> {
    this.notImplemented('backupHandleLogFile');
  }
  async backupVmQueryIncremental(_vmid: number, _volumes: Record<string, VolumeSize>): Promise<Record<string, IncrementalRequest> | undefined> {
    this.notImplemented('backupVmQueryIncremental');
  }
  async backupVm(_vmid: number, _guestConfig: string, _volumes: Record<string, BackupVmVolume>, _info: BackupVmInfo): Promise<void> {
    this.notImplemented('backupVm');
  }
  /** Default: nothing to do. */
  async backupContainerPrepare(_vmid: number, _info: ContainerBackupInfo): Promise<void> {}
  async backupContainer(_vmid: number, _guestConfig: string, _excludePatterns: string[], _info: ContainerBackupInfo): Promise<void> {
    this.notImplemented('backupContainer');
  }
  async restoreGetMechanism(_volname: string): Promise<RestoreMechanismInfo> {
    this.notImplemented('restoreGetMechanism');
  }
  async archiveGetGuestConfig(_volname: string): Promise<string> {
    this.notImplemented('archiveGetGuestConfig');
  }
  async archiveGetFirewallConfig(_volname: string): Promise<string | undefined> {
    this.notImplemented('archiveGetFirewallConfig');
  }
  async restoreVmInit(_volname: string): Promise<Record<string, VolumeSize>> {
    this.notImplemented('restoreVmInit');
  }
  /** Default: nothing to do. */
  async restoreVmCleanup(_volname: string): Promise<void> {}
  async restoreVmVolumeInit(_volname: string, _deviceName: string, _info: Record<string, never>): Promise<RestoreVmVolumeInitResult> {
    this.notImplemented('restoreVmVolumeInit');
  }
  /** Default: nothing to do. */
  async restoreVmVolumeCleanup(_volname: string, _deviceName: string, _info: Record<string, never>): Promise<void> {}
  async restoreContainerInit(_volname: string, _storeid: string, _info: Record<string, never>): Promise<RestoreContainerInitResult> {
    this.notImplemented('restoreContainerInit');
  }
  /** Default: nothing to do. */
  async restoreContainerCleanup(_volname: string, _storeid: string, _info: Record<string, never>): Promise<void> {}
}

/** Base class of a provider in the seed's shape ({@link BackupProviderV1}, `apiVersion` 1). */
export class BackupProviderBaseV1 extends ProviderBaseCommon implements BackupProviderV1 {
  readonly apiVersion = 1 as const;

  async jobStart(_startTime: number): Promise<void> {
    this.notImplemented('jobStart');
  }
  async jobEnd(): Promise<void> {
    this.notImplemented('jobEnd');
  }
  async jobAbort(_error: Error): Promise<void> {
    this.notImplemented('jobAbort');
  }
  async backupStart(_vmid: number, _vmtype: GuestType): Promise<void> {
    this.notImplemented('backupStart');
  }
  async backupEnd(_vmid: number): Promise<void> {
    this.notImplemented('backupEnd');
  }
  async backupAbort(_vmid: number, _error: Error): Promise<void> {
    this.notImplemented('backupAbort');
  }
  async backupGetMechanism(_vmid: number, _vmtype: GuestType): Promise<BackupMechanismInfoV1 | undefined> {
    this.notImplemented('backupGetMechanism');
  }
  async backupGetTarget(_vmid: number, _vmtype: GuestType): Promise<string> {
    this.notImplemented('backupGetTarget');
  }
  async backupGetTaskSize(_vmid: number): Promise<number | undefined> {
    this.notImplemented('backupGetTaskSize');
  }
  async backupGuestConfig(_vmid: number, _filename: string): Promise<void> {
    this.notImplemented('backupGuestConfig');
  }
  async backupFirewallConfig(_vmid: number, _filename: string): Promise<void> {
    this.notImplemented('backupFirewallConfig');
  }
  async backupHandleLogFile(_vmid: number, _filename: string): Promise<void> {
    this.notImplemented('backupHandleLogFile');
  }
  async backupNbd(
    _vmid: number,
    _deviceName: string,
    _nbdPath: string,
    _bitmapMode: BitmapMode,
    _bitmapName: string | undefined,
    _bandwidthLimit: number,
    _extra: NbdBackupExtra,
  ): Promise<void> {
    this.notImplemented('backupNbd');
  }
  async backupDirectory(_vmid: number, _directory: string, _idMap: IdMapEntry[], _excludePaths: string[], _sources: string[], _bandwidthLimit: number, _extra?: { signal: AbortSignal }): Promise<void> {
    this.notImplemented('backupDirectory');
  }
  async restoreGetMechanism(_volname: string, _storeid: string): Promise<RestoreMechanismInfo> {
    this.notImplemented('restoreGetMechanism');
  }
  async extractGuestConfig(_volname: string, _storeid: string): Promise<string> {
    this.notImplemented('extractGuestConfig');
  }
  async extractFirewallConfig(_volname: string, _storeid: string): Promise<string | undefined> {
    this.notImplemented('extractFirewallConfig');
  }
  async restoreQemuGetDeviceInfo(_volname: string, _storeid: string): Promise<Record<string, VolumeSize>> {
    this.notImplemented('restoreQemuGetDeviceInfo');
  }
  async restoreQemuImgInit(_volname: string, _storeid: string, _deviceName: string): Promise<string> {
    this.notImplemented('restoreQemuImgInit');
  }
  /** Default: nothing to do. */
  async restoreQemuImgCleanup(_volname: string, _storeid: string, _deviceName: string): Promise<void> {}
  async restoreTarInit(_volname: string, _storeid: string): Promise<string> {
    this.notImplemented('restoreTarInit');
  }
  /** Default: nothing to do. */
  async restoreTarCleanup(_volname: string, _storeid: string): Promise<void> {}
  async restoreDirectoryInit(_volname: string, _storeid: string): Promise<string> {
    this.notImplemented('restoreDirectoryInit');
  }
  /** Default: nothing to do. */
  async restoreDirectoryCleanup(_volname: string, _storeid: string): Promise<void> {}
}

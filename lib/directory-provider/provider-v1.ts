/**
 * `DirectoryProviderV1`: the reference provider in the seed's shape ({@link BackupProviderV1},
 * `apiVersion` 1), a face over {@link DirectoryProvider} that does the work.
 *
 * @packageDocumentation
 */
import type {
  BackupMechanismInfoV1,
  BitmapMode,
  GuestType,
  IdMapEntry,
  NbdBackupExtra,
  ProviderContext,
  ProviderStorage,
  RestoreMechanismInfo,
  VolumeSize,
} from '../provider/api.js';
import { BackupProviderBaseV1 } from '../provider/base.js';
import { DirectoryStoreError } from './errors.js';
import { DirectoryProvider, type DirectoryProviderOptions } from './provider.js';

/**
 * The same provider in the seed's shape ({@link BackupProviderV1}, `apiVersion` 1): every method
 * delegates to a {@link DirectoryProvider}. QEMU's bitmap is named by a chain id kept in the
 * store's bookkeeping (see {@link DirectoryProvider.bitmapIdFor}).
 */
export class DirectoryProviderV1 extends BackupProviderBaseV1 {
  /** The provider doing the work. */
  readonly inner: DirectoryProvider;
  private readonly targets = new Map<number, string>();

  /**
   * The inner provider's storage side (disk state only), each hook first completing this face's
   * own running backup of the guest concerned, if its data is all written. The seed's API has no
   * call ending a VM's data (`backupNbd` comes per disk; the runner tears QEMU's backup access
   * down as successful after the last one), so the face completes a backup on the first call of
   * the success path that follows: a storage hook, `backupGetTaskSize` or `backupEnd`. The seed
   * generation runs only in-process (the Perl bridge serves apiVersion 2), so those hooks always
   * reach this object. Should completing fail, QEMU has cleared its bitmap already: the runner's
   * `backupAbort` removes the backup and the next one is full (see
   * {@link DirectoryProvider.backupCleanup}); the bitmap ledger covers a crash in between.
   */
  readonly storage: ProviderStorage;

  /**
   * @param context - As for {@link DirectoryProvider}.
   * @param options - As for {@link DirectoryProvider}.
   * @param inner - The provider to delegate to (default: a new one from `context` and `options`).
   */
  constructor(context: ProviderContext, options: DirectoryProviderOptions = {}, inner?: DirectoryProvider) {
    super(context);
    this.inner = inner ?? new DirectoryProvider(context, options);
    this.storage = this.faceStorage();
  }

  private faceStorage(): ProviderStorage {
    return {
      ...this.inner.storage,
      setNotes: async (volname, notes) => {
        await this.completeOwn(volname);
        await this.inner.storage.setNotes!(volname, notes);
      },
      setProtected: async (volname, value) => {
        await this.completeOwn(volname);
        await this.inner.storage.setProtected!(volname, value);
      },
      prune: async (o) => {
        if (this.targets.has(o.vmid) && this.inner.isRunning(o.vmid)) await this.inner.completeBackup(o.vmid);
        return this.inner.storage.prune!(o);
      },
    };
  }

  /** Completes this face's running backup named `volname`, if it is one. */
  private async completeOwn(volname: string): Promise<void> {
    for (const [vmid, v] of this.targets) if (v === volname && this.inner.isRunning(vmid)) await this.inner.completeBackup(vmid);
  }

  override providerName(): string {
    return 'directory';
  }
  override jobStart(startTime: number): Promise<void> {
    return this.inner.jobInit(startTime);
  }
  override jobEnd(): Promise<void> {
    return this.inner.jobCleanup();
  }
  override jobAbort(_error: Error): Promise<void> {
    return this.inner.jobCleanup();
  }
  override async backupStart(vmid: number, vmtype: GuestType): Promise<void> {
    // the seed's backup_get_target names the volume: backup/<archive name>
    this.targets.set(vmid, `backup/${(await this.inner.backupInit(vmid, vmtype, Math.floor(Date.now() / 1000))).archiveName}`);
  }
  override async backupGetTarget(vmid: number, _vmtype: GuestType): Promise<string> {
    return this.targets.get(vmid)!;
  }
  override async backupGuestConfig(vmid: number, filename: string): Promise<void> {
    await this.inner.saveConfigFile(vmid, 'guest.conf', filename);
  }
  override async backupFirewallConfig(vmid: number, filename: string): Promise<void> {
    await this.inner.saveConfigFile(vmid, 'firewall.conf', filename);
  }
  override async backupGetMechanism(vmid: number, vmtype: GuestType): Promise<BackupMechanismInfoV1 | undefined> {
    if (vmtype === 'lxc') return { mechanism: 'directory' };
    const bitmapId = this.inner.bitmapIdFor(vmid);
    return bitmapId ? { mechanism: 'nbd', bitmapId } : { mechanism: 'nbd' };
  }
  override backupNbd(vmid: number, deviceName: string, nbdPath: string, bitmapMode: BitmapMode, bitmapName: string | undefined, bandwidthLimit: number, extra: NbdBackupExtra): Promise<void> {
    return this.inner.backupNbdDevice(vmid, deviceName, nbdPath, bitmapMode, bitmapName, bandwidthLimit, extra);
  }
  override async backupDirectory(vmid: number, directory: string, idMap: IdMapEntry[], excludePaths: string[], sources: string[], bandwidthLimit: number, extra?: { signal: AbortSignal }): Promise<void> {
    await this.inner.backupContainer(vmid, undefined, excludePaths, {
      directory,
      sources,
      idMap,
      backupUserId: 0,
      bandwidthLimit,
      archiveName: this.targets.get(vmid)!,
      signal: extra?.signal ?? new AbortController().signal,
    });
  }
  override async backupGetTaskSize(vmid: number): Promise<number> {
    await this.inner.completeBackup(vmid);
    return this.inner.runningSize(vmid);
  }
  override async backupEnd(vmid: number): Promise<void> {
    await this.inner.completeBackup(vmid);
    await this.inner.backupCleanup(vmid, this.inner.guestType(vmid), true, {});
  }
  override async backupAbort(vmid: number, error: Error): Promise<void> {
    await this.inner.backupCleanup(vmid, this.inner.guestType(vmid), false, { error: error.message });
  }
  override backupHandleLogFile(vmid: number, filename: string): Promise<void> {
    this.targets.delete(vmid);
    return this.inner.backupHandleLogFile(vmid, filename);
  }
  override restoreGetMechanism(volname: string, _storeid: string): Promise<RestoreMechanismInfo> {
    return this.inner.restoreGetMechanism(volname);
  }
  override extractGuestConfig(volname: string, _storeid: string): Promise<string> {
    return this.inner.archiveGetGuestConfig(volname);
  }
  override extractFirewallConfig(volname: string, _storeid: string): Promise<string | undefined> {
    return this.inner.archiveGetFirewallConfig(volname);
  }
  override restoreQemuGetDeviceInfo(volname: string, _storeid: string): Promise<Record<string, VolumeSize>> {
    return this.inner.restoreVmInit(volname);
  }
  override async restoreQemuImgInit(volname: string, _storeid: string, deviceName: string): Promise<string> {
    return (await this.inner.restoreVmVolumeInit(volname, deviceName, {})).qemuImgPath;
  }
  override restoreQemuImgCleanup(volname: string, _storeid: string, deviceName: string): Promise<void> {
    return this.inner.restoreVmVolumeCleanup(volname, deviceName, {});
  }
  override async restoreTarInit(volname: string, storeid: string): Promise<string> {
    const r = await this.inner.restoreContainerInit(volname, storeid, {});
    if (!r.tarPath) throw new DirectoryStoreError('ERR_PROVIDER_STATE', `backup ${volname} is a directory copy, not a tar archive`, { volname });
    return r.tarPath;
  }
  override async restoreDirectoryInit(volname: string, storeid: string): Promise<string> {
    const r = await this.inner.restoreContainerInit(volname, storeid, {});
    if (!r.archiveDirectory) throw new DirectoryStoreError('ERR_PROVIDER_STATE', `backup ${volname} is a tar archive, not a directory copy`, { volname });
    return r.archiveDirectory;
  }
}

/**
 * Recording providers, one per API generation: every method records its call (arguments
 * simplified so traces compare exactly) and, unless told otherwise, really stores what it gets in
 * a directory (raw images via the native core, configs, logs), so it can be restored from.
 * Failures are injected per method.
 */
import { copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import path from 'node:path';

import { BackupProviderBase, BackupProviderBaseV1, backupNbdToFile } from '../../lib/index.js';
import type {
  BackupCleanupResult,
  BackupInitResult,
  BackupMechanism,
  BackupMechanismInfoV1,
  BackupVmInfo,
  BackupVmVolume,
  BitmapMode,
  ContainerBackupInfo,
  GuestType,

  IncrementalRequest,
  NbdBackupExtra,
  ProviderCommon,
  ProviderContext,
  ProviderStorage,
  RestoreContainerInitResult,
  RestoreHookInfo,
  RestoreMechanismInfo,
  RestoreVmVolumeInitResult,
  VolumeSize,
} from '../../lib/index.js';
import type { IdMapEntry } from '../../lib/provider/api.js';

/** A recorded call: method name then simplified arguments. */
export type Call = [string, ...unknown[]];

/** Failure injection: throw `message` when `when(args)` holds (default: always). */
export interface Failure {
  message: string;
  when?: (...args: unknown[]) => boolean;
}

export interface RecordingOptions {
  /** Where archives are stored; absent: nothing is stored (pure recording). */
  storeDir?: string;
  /** V1: bitmap id returned by backupGetMechanism for VMs (absent: none). */
  bitmapId?: string;
  /** V2: mechanism for VMs (default nbd). */
  vmMechanism?: 'nbd' | 'file-handle';
  /** Mechanism answers override (e.g. `undefined` or `'rsync'` to test refusals). */
  mechanismOverride?: { qemu?: unknown; lxc?: unknown };
  /** V2: answer of backupVmQueryIncremental (default: `use` for devices with a previous image, else `new`). */
  incremental?: Record<string, IncrementalRequest> | null;
  /** Container restore mechanism (default tar). */
  containerRestore?: 'tar' | 'directory';
  /** Failures by method name. */
  fail?: Record<string, Failure>;
  /** Called on every call (before failing); may await (e.g. to abort the job). */
  onCall?: (method: string, args: unknown[]) => void | Promise<void>;
  /** Give the provider storage hooks (default true). */
  storage?: boolean;
  /** Restore hooks (default true). */
  restoreHooks?: boolean;
}

/** Simplifies arguments: absolute paths to base names, NBD URIs to `nbd:<export>`, signals dropped. */
export function simplify(v: unknown): unknown {
  if (typeof v === 'string') {
    if (v.startsWith('nbd+unix:///')) return `nbd:${decodeURIComponent(v.slice(12).split('?')[0]!)}`;
    if (v.startsWith('/') && !v.includes('*')) return `<${path.basename(v)}>`;
    return v;
  }
  if (v instanceof Error) return `Error(${v.message})`;
  if (typeof v === 'function') return '<fn>';
  if (Array.isArray(v)) return v.map(simplify);
  if (v && typeof v === 'object') {
    if (typeof (v as { aborted?: unknown }).aborted === 'boolean' && typeof (v as AbortSignal).addEventListener === 'function') return '<signal>';
    if (typeof (v as { read?: unknown }).read === 'function' && typeof (v as { discard?: unknown }).discard === 'function') return '<handle>';
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) {
      if (k === 'signal') continue;
      out[k] = simplify(x);
    }
    return out;
  }
  return v;
}

interface Meta {
  vmid: number;
  vmtype: GuestType;
  devices: Record<string, VolumeSize>;
}

/** The storage side both recording providers share. */
class Store {
  readonly calls: Call[] = [];
  /** Raw task log contents by vmid. */
  readonly logs = new Map<number, string>();
  /** The last image of each VM device, for incremental backups. */
  readonly previous = new Map<string, string>();
  private seq = 0;
  private archive = new Map<number, string>();

  constructor(readonly opts: RecordingOptions) {}

  async rec(method: string, args: unknown[]): Promise<void> {
    this.calls.push([method, ...args.map(simplify)]);
    await this.opts.onCall?.(method, args);
    const f = this.opts.fail?.[method];
    if (f && (!f.when || f.when(...args))) throw new Error(f.message);
  }

  newArchive(vmid: number, vmtype: GuestType): string {
    this.seq++;
    const name = `backup/${vmtype}-${vmid}-${this.seq}`;
    this.archive.set(vmid, name);
    if (this.opts.storeDir) {
      mkdirSync(this.dir(name), { recursive: true });
      this.writeMeta(name, { vmid, vmtype, devices: {} });
    }
    return name;
  }

  archiveOf(vmid: number): string {
    return this.archive.get(vmid)!;
  }

  dir(volname: string): string {
    return path.join(this.opts.storeDir!, volname);
  }

  meta(volname: string): Meta {
    return JSON.parse(readFileSync(path.join(this.dir(volname), 'meta.json'), 'utf8')) as Meta;
  }

  writeMeta(volname: string, meta: Meta): void {
    writeFileSync(path.join(this.dir(volname), 'meta.json'), JSON.stringify(meta));
  }

  addDevice(vmid: number, device: string, size: number): string {
    const name = this.archiveOf(vmid);
    const m = this.meta(name);
    m.devices[device] = { size };
    this.writeMeta(name, m);
    return path.join(this.dir(name), `${device}.raw`);
  }

  async storeNbd(vmid: number, device: string, nbdPath: string, mode: BitmapMode, bitmapName: string | undefined, size: number, bandwidthLimit: number, signal: AbortSignal): Promise<void> {
    if (!this.opts.storeDir) return;
    const file = this.addDevice(vmid, device, size);
    const key = `${vmid}/${device}`;
    await backupNbdToFile({ nbdPath, deviceName: device, bitmapMode: mode, bitmapName, path: file, previous: this.previous.get(key), bandwidthLimit, signal });
    this.previous.set(key, file);
  }

  async storeHandle(vmid: number, device: string, v: BackupVmVolume): Promise<void> {
    if (!this.opts.storeDir) return;
    const file = this.addDevice(vmid, device, v.size);
    const key = `${vmid}/${device}`;
    const prev = this.previous.get(key);
    if (v.bitmapMode === 'reuse') {
      if (!prev) throw new Error(`no previous image of ${key}`);
      copyFileSync(prev, file);
    }
    const fh = await open(file, v.bitmapMode === 'reuse' ? 'r+' : 'w');
    try {
      await fh.truncate(v.size);
      for (let r = await v.nextDirtyRegion!(); r; r = await v.nextDirtyRegion!()) {
        const [off, len] = r;
        for (let o = off; o < off + len; o += 1 << 20) {
          const n = Math.min(1 << 20, off + len - o);
          const data = await v.fileHandle!.read(o, n);
          await fh.write(data, 0, n, o);
        }
        await v.fileHandle!.discard(off, len);
      }
    } finally {
      await fh.close();
    }
    this.previous.set(key, file);
  }

  saveFile(vmid: number, from: string, as: string): void {
    if (this.opts.storeDir) copyFileSync(from, path.join(this.dir(this.archiveOf(vmid)), as));
  }

  saveText(vmid: number, text: string, as: string): void {
    if (this.opts.storeDir) writeFileSync(path.join(this.dir(this.archiveOf(vmid)), as), text);
  }

  /**
   * Stores a container tree both ways, as a tar archive and as a directory copy, with the
   * container tools of `lib/container`. Owners are
   * stored as container ids.
   */
  async storeTree(vmid: number, directory: string, sources: string[], excludes: string[], idMap: IdMapEntry[]): Promise<void> {
    if (!this.opts.storeDir) return;
    const tarModule = '../../lib/container/tar.js';
    const dirModule = '../../lib/container/directory.js';
    const { createTarArchive } = (await import(tarModule)) as { createTarArchive: (o: Record<string, unknown>) => Promise<unknown> };
    const { backupDirectoryTree } = (await import(dirModule)) as { backupDirectoryTree: (o: Record<string, unknown>) => Promise<unknown> };
    const base = this.dir(this.archiveOf(vmid));
    const common = { idMap, excludePaths: excludes, sources };
    await createTarArchive({ source: directory, archive: path.join(base, 'root.tar'), ...common });
    await backupDirectoryTree({ source: directory, target: path.join(base, 'root'), ...common });
  }

  size(vmid: number): number {
    if (!this.opts.storeDir) return 4096;
    const m = this.meta(this.archiveOf(vmid));
    return Object.keys(m.devices).reduce((n, d) => n + statSync(path.join(this.dir(this.archiveOf(vmid)), `${d}.raw`)).blocks * 512, 0);
  }

  drop(vmid: number): void {
    if (this.opts.storeDir && this.archive.has(vmid)) rmSync(this.dir(this.archiveOf(vmid)), { recursive: true, force: true });
  }

  text(volname: string, file: string): string | undefined {
    if (!this.opts.storeDir) return file === 'guest.conf' ? 'name: recorded\n' : undefined;
    const p = path.join(this.dir(volname), file);
    return existsSync(p) ? readFileSync(p, 'utf8') : undefined;
  }

  restoreMechanism(volname: string): RestoreMechanismInfo {
    const vmtype = this.opts.storeDir ? this.meta(volname).vmtype : volname.includes('lxc') ? 'lxc' : 'qemu';
    return { mechanism: vmtype === 'qemu' ? 'qemu-img' : (this.opts.containerRestore ?? 'tar'), vmtype };
  }

  devices(volname: string): Record<string, VolumeSize> {
    if (!this.opts.storeDir) return { disk0: { size: 1048576 } };
    return this.meta(volname).devices;
  }

  imagePath(volname: string, device: string): string {
    return this.opts.storeDir ? path.join(this.dir(volname), `${device}.raw`) : '/nonexistent.raw';
  }

  /** The optional restore hooks, recorded (none with `restoreHooks: false`). */
  restoreHooks(): Pick<ProviderCommon, 'restoreStart' | 'restoreEnd' | 'restoreAbort'> {
    if (this.opts.restoreHooks === false) return {};
    return {
      restoreStart: (v, i) => this.rec('restoreStart', [v, i]),
      restoreEnd: (v, i) => this.rec('restoreEnd', [v, i]),
      restoreAbort: (v, e, i) => this.rec('restoreAbort', [v, e, i]),
    };
  }

  storageHooks(): ProviderStorage | undefined {
    if (this.opts.storage === false) return undefined;
    return {
      setNotes: (volname, notes) => this.rec('storage.setNotes', [volname, notes]),
      setProtected: (volname, value) => this.rec('storage.setProtected', [volname, value]),
      prune: async (o) => {
        await this.rec('storage.prune', [o]);
        return { removed: [] };
      },
    };
  }
}

function mechanismAnswer(store: Store, vmtype: GuestType, dflt: unknown): unknown {
  const o = store.opts.mechanismOverride;
  if (o && vmtype in o) return o[vmtype];
  return dflt;
}

/** A provider of the seed's generation recording every call. */
export class RecordingProviderV1 extends BackupProviderBaseV1 {
  readonly store: Store;
  readonly storage: ProviderStorage | undefined;
  declare restoreStart?: (volname: string, info: RestoreHookInfo) => Promise<void>;
  declare restoreEnd?: (volname: string, info: RestoreHookInfo) => Promise<void>;
  declare restoreAbort?: (volname: string, error: Error, info: RestoreHookInfo) => Promise<void>;

  constructor(context: ProviderContext, opts: RecordingOptions = {}) {
    super(context);
    this.store = new Store(opts);
    this.storage = this.store.storageHooks();
    Object.assign(this, this.store.restoreHooks());
  }

  get calls(): Call[] {
    return this.store.calls;
  }

  override providerName(): string {
    return 'recording-v1';
  }
  override async jobStart(startTime: number): Promise<void> {
    await this.store.rec('jobStart', [typeof startTime]);
  }
  override async jobEnd(): Promise<void> {
    await this.store.rec('jobEnd', []);
  }
  override async jobAbort(error: Error): Promise<void> {
    await this.store.rec('jobAbort', [error]);
  }
  override async backupStart(vmid: number, vmtype: GuestType): Promise<void> {
    await this.store.rec('backupStart', [vmid, vmtype]);
  }
  override async backupGetTarget(vmid: number, vmtype: GuestType): Promise<string> {
    await this.store.rec('backupGetTarget', [vmid, vmtype]);
    return this.store.newArchive(vmid, vmtype);
  }
  override async backupGuestConfig(vmid: number, filename: string): Promise<void> {
    await this.store.rec('backupGuestConfig', [vmid, filename]);
    this.store.saveFile(vmid, filename, 'guest.conf');
  }
  override async backupFirewallConfig(vmid: number, filename: string): Promise<void> {
    await this.store.rec('backupFirewallConfig', [vmid, filename]);
    this.store.saveFile(vmid, filename, 'firewall.fw');
  }
  override async backupGetMechanism(vmid: number, vmtype: GuestType): Promise<BackupMechanismInfoV1 | undefined> {
    await this.store.rec('backupGetMechanism', [vmid, vmtype]);
    const dflt = vmtype === 'qemu' ? 'nbd' : 'directory';
    const mechanism = mechanismAnswer(this.store, vmtype, dflt);
    if (mechanism === undefined) return undefined;
    return { mechanism: mechanism as 'nbd', ...(vmtype === 'qemu' && this.store.opts.bitmapId ? { bitmapId: this.store.opts.bitmapId } : {}) };
  }
  override async backupNbd(
    vmid: number,
    deviceName: string,
    nbdPath: string,
    bitmapMode: BitmapMode,
    bitmapName: string | undefined,
    bandwidthLimit: number,
    extra: NbdBackupExtra,
  ): Promise<void> {
    await this.store.rec('backupNbd', [vmid, deviceName, nbdPath, bitmapMode, bitmapName, bandwidthLimit, { bitmapAction: extra.bitmapAction, size: extra.size, nbdUri: extra.nbdUri }]);
    await this.store.storeNbd(vmid, deviceName, nbdPath, bitmapMode, bitmapName, extra.size, bandwidthLimit, extra.signal);
  }
  override async backupDirectory(vmid: number, directory: string, idMap: IdMapEntry[], excludePaths: string[], sources: string[], bandwidthLimit: number): Promise<void> {
    await this.store.rec('backupDirectory', [vmid, directory, idMap, excludePaths, sources, bandwidthLimit]);
    await this.store.storeTree(vmid, directory, sources, excludePaths, idMap);
  }
  override async backupGetTaskSize(vmid: number): Promise<number | undefined> {
    await this.store.rec('backupGetTaskSize', [vmid]);
    return this.store.size(vmid);
  }
  override async backupEnd(vmid: number): Promise<void> {
    await this.store.rec('backupEnd', [vmid]);
  }
  override async backupAbort(vmid: number, error: Error): Promise<void> {
    await this.store.rec('backupAbort', [vmid, error]);
    this.store.drop(vmid);
  }
  override async backupHandleLogFile(vmid: number, filename: string): Promise<void> {
    await this.store.rec('backupHandleLogFile', [vmid, filename]);
    this.store.logs.set(vmid, readFileSync(filename, 'utf8'));
  }
  override async restoreGetMechanism(volname: string, storeid: string): Promise<RestoreMechanismInfo> {
    await this.store.rec('restoreGetMechanism', [volname, storeid]);
    return this.store.restoreMechanism(volname);
  }
  override async extractGuestConfig(volname: string, storeid: string): Promise<string> {
    await this.store.rec('extractGuestConfig', [volname, storeid]);
    return this.store.text(volname, 'guest.conf')!;
  }
  override async extractFirewallConfig(volname: string, storeid: string): Promise<string | undefined> {
    await this.store.rec('extractFirewallConfig', [volname, storeid]);
    return this.store.text(volname, 'firewall.fw');
  }
  override async restoreQemuGetDeviceInfo(volname: string, storeid: string): Promise<Record<string, VolumeSize>> {
    await this.store.rec('restoreQemuGetDeviceInfo', [volname, storeid]);
    return this.store.devices(volname);
  }
  override async restoreQemuImgInit(volname: string, storeid: string, deviceName: string): Promise<string> {
    await this.store.rec('restoreQemuImgInit', [volname, storeid, deviceName]);
    return this.store.imagePath(volname, deviceName);
  }
  override async restoreQemuImgCleanup(volname: string, storeid: string, deviceName: string): Promise<void> {
    await this.store.rec('restoreQemuImgCleanup', [volname, storeid, deviceName]);
  }
  override async restoreTarInit(volname: string, storeid: string): Promise<string> {
    await this.store.rec('restoreTarInit', [volname, storeid]);
    return path.join(this.store.dir(volname), 'root.tar');
  }
  override async restoreTarCleanup(volname: string, storeid: string): Promise<void> {
    await this.store.rec('restoreTarCleanup', [volname, storeid]);
  }
  override async restoreDirectoryInit(volname: string, storeid: string): Promise<string> {
    await this.store.rec('restoreDirectoryInit', [volname, storeid]);
    return path.join(this.store.dir(volname), 'root');
  }
  override async restoreDirectoryCleanup(volname: string, storeid: string): Promise<void> {
    await this.store.rec('restoreDirectoryCleanup', [volname, storeid]);
  }
}

/** A provider of the Proxmox VE 8.4 generation recording every call. */
export class RecordingProviderV2 extends BackupProviderBase {
  readonly store: Store;
  readonly storage: ProviderStorage | undefined;
  declare restoreStart?: (volname: string, info: RestoreHookInfo) => Promise<void>;
  declare restoreEnd?: (volname: string, info: RestoreHookInfo) => Promise<void>;
  declare restoreAbort?: (volname: string, error: Error, info: RestoreHookInfo) => Promise<void>;

  constructor(context: ProviderContext, opts: RecordingOptions = {}) {
    super(context);
    this.store = new Store(opts);
    this.storage = this.store.storageHooks();
    Object.assign(this, this.store.restoreHooks());
  }

  get calls(): Call[] {
    return this.store.calls;
  }

  override providerName(): string {
    return 'recording-v2';
  }
  override async jobInit(startTime: number): Promise<void> {
    await this.store.rec('jobInit', [typeof startTime]);
  }
  override async jobCleanup(): Promise<void> {
    await this.store.rec('jobCleanup', []);
  }
  override async backupInit(vmid: number, vmtype: GuestType, startTime: number): Promise<BackupInitResult> {
    await this.store.rec('backupInit', [vmid, vmtype, typeof startTime]);
    // the archive name; vzdump's volume name is backup/<archive name>, the name this store keys on
    return { archiveName: this.store.newArchive(vmid, vmtype).slice('backup/'.length) };
  }
  override async backupCleanup(vmid: number, vmtype: GuestType, success: boolean, info: { error?: string }): Promise<BackupCleanupResult | void> {
    await this.store.rec('backupCleanup', [vmid, vmtype, success, info]);
    if (!success) {
      this.store.drop(vmid);
      return;
    }
    return { stats: { archiveSize: vmtype === 'qemu' ? this.store.size(vmid) : 4096 } };
  }
  override async backupGetMechanism(vmid: number, vmtype: GuestType): Promise<BackupMechanism | undefined> {
    await this.store.rec('backupGetMechanism', [vmid, vmtype]);
    return mechanismAnswer(this.store, vmtype, vmtype === 'qemu' ? (this.store.opts.vmMechanism ?? 'nbd') : 'directory') as BackupMechanism | undefined;
  }
  override async backupHandleLogFile(vmid: number, filename: string): Promise<void> {
    await this.store.rec('backupHandleLogFile', [vmid, filename]);
    this.store.logs.set(vmid, readFileSync(filename, 'utf8'));
  }
  override async backupVmQueryIncremental(vmid: number, volumes: Record<string, VolumeSize>): Promise<Record<string, IncrementalRequest> | undefined> {
    await this.store.rec('backupVmQueryIncremental', [vmid, volumes]);
    if (this.store.opts.incremental !== undefined) return this.store.opts.incremental ?? undefined;
    const out: Record<string, IncrementalRequest> = {};
    for (const d of Object.keys(volumes)) out[d] = this.store.previous.has(`${vmid}/${d}`) ? 'use' : 'new';
    return out;
  }
  override async backupVm(vmid: number, guestConfig: string, volumes: Record<string, BackupVmVolume>, info: BackupVmInfo): Promise<void> {
    await this.store.rec('backupVm', [vmid, guestConfig, volumes, info]);
    this.store.saveText(vmid, guestConfig, 'guest.conf');
    if (info.firewallConfig !== undefined) this.store.saveText(vmid, info.firewallConfig, 'firewall.fw');
    for (const [device, v] of Object.entries(volumes)) {
      if (info.mechanism === 'nbd') await this.store.storeNbd(vmid, device, v.nbdPath!, v.bitmapMode, v.bitmapName, v.size, info.bandwidthLimit ?? 0, info.signal);
      else await this.store.storeHandle(vmid, device, v);
    }
  }
  override async backupContainerPrepare(vmid: number, info: ContainerBackupInfo): Promise<void> {
    await this.store.rec('backupContainerPrepare', [vmid, info]);
  }
  override async backupContainer(vmid: number, guestConfig: string, excludePatterns: string[], info: ContainerBackupInfo): Promise<void> {
    await this.store.rec('backupContainer', [vmid, guestConfig, excludePatterns, info]);
    this.store.saveText(vmid, guestConfig, 'guest.conf');
    if (info.firewallConfig !== undefined) this.store.saveText(vmid, info.firewallConfig, 'firewall.fw');
    await this.store.storeTree(vmid, info.directory, info.sources, excludePatterns, info.idMap);
  }
  override async restoreGetMechanism(volname: string): Promise<RestoreMechanismInfo> {
    await this.store.rec('restoreGetMechanism', [volname]);
    return this.store.restoreMechanism(volname);
  }
  override async archiveGetGuestConfig(volname: string): Promise<string> {
    await this.store.rec('archiveGetGuestConfig', [volname]);
    return this.store.text(volname, 'guest.conf')!;
  }
  override async archiveGetFirewallConfig(volname: string): Promise<string | undefined> {
    await this.store.rec('archiveGetFirewallConfig', [volname]);
    return this.store.text(volname, 'firewall.fw');
  }
  override async restoreVmInit(volname: string): Promise<Record<string, VolumeSize>> {
    await this.store.rec('restoreVmInit', [volname]);
    return this.store.devices(volname);
  }
  override async restoreVmCleanup(volname: string): Promise<void> {
    await this.store.rec('restoreVmCleanup', [volname]);
  }
  override async restoreVmVolumeInit(volname: string, deviceName: string, info: Record<string, never>): Promise<RestoreVmVolumeInitResult> {
    await this.store.rec('restoreVmVolumeInit', [volname, deviceName, info]);
    return { qemuImgPath: this.store.imagePath(volname, deviceName) };
  }
  override async restoreVmVolumeCleanup(volname: string, deviceName: string, info: Record<string, never>): Promise<void> {
    await this.store.rec('restoreVmVolumeCleanup', [volname, deviceName, info]);
  }
  override async restoreContainerInit(volname: string, storeid: string, info: Record<string, never>): Promise<RestoreContainerInitResult> {
    await this.store.rec('restoreContainerInit', [volname, storeid, info]);
    const m = this.store.restoreMechanism(volname).mechanism;
    return m === 'tar' ? { tarPath: path.join(this.store.dir(volname), 'root.tar') } : { archiveDirectory: path.join(this.store.dir(volname), 'root') };
  }
  override async restoreContainerCleanup(volname: string, storeid: string, info: Record<string, never>): Promise<void> {
    await this.store.rec('restoreContainerCleanup', [volname, storeid, info]);
  }
}

/**
 * The one place where the store commands learn which kind of store `--store` names: a folder
 * (the directory store) or an `s3://bucket/prefix` URL (the chunk store, with `--endpoint`,
 * `--region`, `--path-style`, `--ca-file`, `--fingerprint`, `--key-file`, `--credentials-file`,
 * credentials otherwise from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`). Both are opened into a
 * {@link CliStore}, which the commands use without asking which it is. Each store's modules are
 * loaded only when it is used.
 */
import { Command } from 'commander';

import type { BackupProvider, GuestType, LogFunction, PruneOptions } from '../provider/api.js';
import type { GcReport } from '../chunk-provider/gc.js';
import type { S3StoreOptions } from '../chunk-provider/s3.js';
import { UsageError } from './errors.js';

/** A backup as `list` shows it (both stores). */
export interface ListedBackup {
  volid: string;
  volname: string;
  vmid: number;
  subtype: GuestType;
  ctime: number;
  size: number;
  /** `qcow2`, `tar`, `directory` (directory store), `chunks` (chunk store). */
  format?: string;
  /** The backup it builds on (incremental directory-store backups). */
  parent?: string;
  /** The backup whose index gave the unchanged chunks' digests (incremental chunk-store backups; nothing depends on it). */
  previous?: string;
  status: string;
  protected: boolean;
  notes?: string;
}

/** One backup's fate in `prune`. */
export interface PrunedBackup {
  volid: string;
  volname: string;
  ctime: number;
  mark: 'keep' | 'remove' | 'protected';
  neededBy?: string;
}

/** One backup's verdict in `verify` (both stores). */
export interface VerifiedBackup {
  volid: string;
  ok: boolean;
  problems: string[];
  /** Chunk stores: the backup's distinct chunks, and how many were checked (`--sample`). */
  chunks?: { total: number; checked: number };
}

/** How `verify` checks (chunk stores). */
export interface VerifyRequest {
  /** Share of each backup's distinct chunks to check, in (0, 100]; 100 (the default) = all. */
  samplePercent?: number;
  /** Bytes per second fetched at most. */
  bandwidthLimit?: number;
  signal?: AbortSignal;
  /** Warnings (chunk stores: a verdict the store refused to record). */
  log?: LogFunction;
}

/** What `backup` asks of a store for its provider. */
export interface BackupProviderRequest {
  log: LogFunction;
  /** Command-line options (`mode`, `lxcMode`, `compression`, `api`). */
  options: Record<string, unknown>;
  onProgress: (p: { device: string; done: number; total: number; bytesPerSecond: number }) => void;
  /** Each disk's copy summary (directory store). */
  onDeviceDone?: (device: string, summary: { bytesRead: number; bytesZero: number; bytesSkipped: number; bytesTrimmed: number; extents: number; seconds: number }) => void;
}

/** A store as the commands use it. */
export interface CliStore {
  readonly storeid: string;
  /** What `--store` named, for messages. */
  readonly name: string;
  volid(volname: string): string;
  volnameOf(volid: string): string;
  list(vmid?: number): Promise<ListedBackup[]>;
  /** One backup as `list` shows it, looked up alone (not by listing its guest's backups). */
  info(volname: string): Promise<ListedBackup>;
  /** Guest type and disks of a backup (checks it exists; restore uses it to place targets). */
  describe(volname: string): Promise<{ vmtype: GuestType; devices: string[] }>;
  prune(o: { keep: PruneOptions; vmid?: number; dryRun: boolean }): Promise<PrunedBackup[]>;
  delete(volname: string, force: boolean): Promise<{ merged?: string }>;
  setProtected(volname: string, value: boolean): Promise<void>;
  setNotes(volname: string, notes: string): Promise<void>;
  /** `verify`: one backup, or every backup (of `vmid`); a problem is a result, not an error. */
  verify(volid: string | undefined, vmid: number | undefined, o?: VerifyRequest): Promise<VerifiedBackup[]>;
  /** `gc`: chunk stores only (a directory store's deletions free their space at once). */
  gc(o: { dryRun: boolean; log: LogFunction; signal: AbortSignal }): Promise<GcReport>;
  /** The provider a backup runs. */
  backupProvider(r: BackupProviderRequest): Promise<BackupProvider>;
  /** The provider a restore reads through. */
  restoreProvider(log: LogFunction): Promise<BackupProvider>;
}

/** The options naming an S3 store, added to every store command. */
export function addStoreOptions(c: Command, what = 'the store'): Command {
  return c
    .requiredOption('--store <dir|url>', `${what}: a folder, or s3://bucket/prefix`)
    .option('--endpoint <url>', 's3:// stores: the S3 endpoint, e.g. https://s3.example.com:3900 (default: AWS S3)')
    .option('--region <name>', 's3:// stores: the region requests are signed for (default us-east-1)')
    .option('--path-style', 's3:// stores: path-style requests, host/bucket (the default)')
    .option('--no-path-style', 's3:// stores: virtual-hosted requests, bucket.host')
    .option('--ca-file <pem>', 's3:// stores: certificate authorities to trust besides the system\'s')
    .option('--fingerprint <sha256>', 's3:// stores: trust exactly the endpoint certificate with this SHA-256 fingerprint (AB:CD:…), instead of CAs')
    .option('--key-file <file>', 's3:// stores: the store\'s key file (encrypted stores; a store created with a key is encrypted)')
    .option('--credentials-file <file>', 's3:// stores: credentials in the AWS shared format (default: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)');
}

const S3_ONLY = ['endpoint', 'region', 'caFile', 'fingerprint', 'keyFile', 'credentialsFile'] as const;

/**
 * Opens the store `--store` names.
 * @param o - The command's options.
 * @param mode - `create`: a backup (a missing directory store is created; a chunk store creates
 *   its `store.json` on the first backup); `open`: the store must exist.
 */
export async function openCliStore(o: Record<string, unknown>, mode: 'open' | 'create'): Promise<CliStore> {
  const name = o.store as string;
  const { isS3Url } = await import('../chunk-provider/s3.js');
  if (isS3Url(name)) return openChunkStore(name, o);
  const given = S3_ONLY.filter((k) => o[k] !== undefined);
  if (given.length > 0 || o.pathStyle !== undefined) {
    throw new UsageError(`--${(given[0] ?? 'pathStyle').replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} is for s3:// stores; ${name} is a folder`);
  }
  return openDirectoryStore(name, o, mode);
}

async function openDirectoryStore(name: string, o: Record<string, unknown>, mode: 'open' | 'create'): Promise<CliStore> {
  const { DirectoryStore } = await import('../directory-provider/store.js');
  const store = mode === 'create' ? await DirectoryStore.create(name, o.storeid ? { storeid: o.storeid as string } : {}) : await DirectoryStore.open(name);
  return {
    storeid: store.storeid,
    name: store.root,
    volid: (v) => store.volid(v),
    volnameOf: (v) => store.volnameOf(v),
    list: async (vmid) => store.listBackups(vmid),
    info: async (volname) => store.backupInfo(volname),
    describe: async (volname) => {
      const m = await store.readManifest(volname);
      return { vmtype: m.vmtype, devices: Object.keys(m.devices ?? {}) };
    },
    prune: async (p) => store.pruneBackups({ keep: p.keep, ...(p.vmid ? { vmid: p.vmid } : {}), dryRun: p.dryRun }),
    delete: async (volname, force) => store.deleteBackup(volname, { force }),
    setProtected: (v, value) => store.setProtected(v, value),
    setNotes: (v, notes) => store.setNotes(v, notes),
    verify: async (volid, vmid, v = {}) => {
      // a directory store's backup is one qcow2 chain checked whole by qemu-img: nothing to sample
      if (v.samplePercent !== undefined && v.samplePercent !== 100) throw new UsageError(`--sample is for s3:// stores; ${name} is a folder`);
      if (v.bandwidthLimit !== undefined) throw new UsageError(`--bwlimit is for s3:// stores; ${name} is a folder`);
      const volnames = volid ? [store.volnameOf(volid)] : (await store.listBackups(vmid)).filter((b) => b.status !== 'in-progress').map((b) => b.volname);
      if (volid) {
        await store.readManifest(volnames[0]!).catch((err: unknown) => {
          if ((err as { code?: string }).code === 'ERR_UNKNOWN_VOLUME') throw err;
        });
      }
      const results = [];
      for (const v of volnames) results.push(await store.verifyBackup(v));
      return results;
    },
    gc: () => Promise.reject(new UsageError(`gc is for chunk stores: ${store.root} is a directory store, where deleting a backup frees its space`)),
    backupProvider: async (r) => {
      const [{ DirectoryProvider }, { DirectoryProviderV1 }] = await Promise.all([import('../directory-provider/provider.js'), import('../directory-provider/provider-v1.js')]);
      const scfg = {
        path: store.root,
        ...(r.options.mode ? { 'vm-backup-mode': r.options.mode } : {}),
        ...(r.options.lxcMode ? { 'lxc-backup-mode': r.options.lxcMode } : {}),
        ...(r.options.compression ? { compression: r.options.compression } : {}),
      };
      const context = { storeid: store.storeid, scfg, log: r.log };
      const inner = new DirectoryProvider(context, {
        onProgress: r.onProgress,
        onDeviceDone: (_vmid, device, summary) => r.onDeviceDone?.(device, summary),
      });
      return r.options.api === '1' ? new DirectoryProviderV1(context, {}, inner) : inner;
    },
    restoreProvider: async (log) => {
      const { DirectoryProvider } = await import('../directory-provider/provider.js');
      return new DirectoryProvider({ storeid: store.storeid, scfg: { path: store.root }, log });
    },
  } satisfies CliStore;
}

/** The S3 options of an `s3://` store from the command line's options (`http://` endpoints allowed: the user wrote them). */
export async function s3OptionsFromCli(url: string, o: Record<string, unknown>): Promise<S3StoreOptions> {
  const { s3StoreOptions } = await import('../chunk-provider/s3.js');
  const endpoint = o.endpoint as string | undefined;
  return s3StoreOptions(url, {
    ...(endpoint ? { endpoint } : {}),
    ...(endpoint?.startsWith('http://') ? { allowHttp: true } : {}),
    ...(o.region ? { region: o.region as string } : {}),
    ...(o.pathStyle === false ? { virtualHosted: true } : {}),
    ...(o.caFile ? { caFile: o.caFile as string } : {}),
    ...(o.fingerprint ? { fingerprint: o.fingerprint as string } : {}),
    ...(o.keyFile ? { keyFile: o.keyFile as string } : {}),
    ...(o.credentialsFile ? { credentialsFile: o.credentialsFile as string } : {}),
  });
}

async function openChunkStore(url: string, o: Record<string, unknown>): Promise<CliStore> {
  const dirOnly = (['lxcMode', 'compression'] as const).find((k) => o[k] !== undefined) ?? (o.api === '1' ? 'api' : undefined);
  if (dirOnly) throw new UsageError(`--${dirOnly.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} is for directory stores; ${url} is a chunk store`);
  const [{ ChunkStore }, { ChunkProvider }] = await Promise.all([import('../chunk-provider/store.js'), import('../chunk-provider/provider.js')]);
  const options = await s3OptionsFromCli(url, o);
  const store = await ChunkStore.open(options, o.storeid ? { storeid: o.storeid as string } : {});
  const provider = async (log: LogFunction, extra: Record<string, unknown> = {}, onProgress?: BackupProviderRequest['onProgress']): Promise<BackupProvider> =>
    new ChunkProvider({ storeid: store.storeid, scfg: extra, log }, { store, ...(onProgress ? { onProgress } : {}) });
  return {
    storeid: store.storeid,
    name: url,
    volid: (v) => store.volid(v),
    // the URL names the store; a chunk store records no storage id, so any prefix is taken
    volnameOf: (v) => store.parseVolname(v.includes(':') ? v.slice(v.indexOf(':') + 1) : v).volname,
    list: async (vmid) => (await store.listBackups(vmid)).map((b) => ({ ...b, format: 'chunks' })),
    info: async (volname) => ({ ...(await store.backupInfo(volname)), format: 'chunks' }),
    describe: async (volname) => {
      const m = await store.readManifest(volname);
      return { vmtype: m.vmtype, devices: Object.keys(m.devices ?? {}) };
    },
    prune: async (p) => store.pruneBackups({ keep: p.keep, ...(p.vmid ? { vmid: p.vmid } : {}), dryRun: p.dryRun }),
    delete: async (volname, force) => {
      await store.deleteBackup(volname, { force });
      return {};
    },
    setProtected: (v, value) => store.setProtected(v, value),
    setNotes: (v, notes) => store.setNotes(v, notes),
    verify: async (volid, vmid, v = {}) => {
      const { verifyChunkStore } = await import('../chunk-provider/verify.js');
      return verifyChunkStore(store, {
        ...(volid !== undefined ? { volnames: [store.parseVolname(volid.includes(':') ? volid.slice(volid.indexOf(':') + 1) : volid).volname] } : {}),
        ...(vmid !== undefined ? { vmid } : {}),
        ...(v.samplePercent !== undefined ? { samplePercent: v.samplePercent } : {}),
        ...(v.bandwidthLimit !== undefined ? { bandwidthLimit: v.bandwidthLimit } : {}),
        ...(v.signal ? { signal: v.signal } : {}),
        ...(v.log ? { log: v.log } : {}),
      });
    },
    gc: async (g) => (await import('../chunk-provider/gc.js')).collectGarbage(store, g),
    backupProvider: (r) => provider(r.log, r.options.mode ? { 'vm-backup-mode': r.options.mode } : {}, r.onProgress),
    restoreProvider: (log) => provider(log),
  } satisfies CliStore;
}

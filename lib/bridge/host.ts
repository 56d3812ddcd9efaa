/**
 * The provider host: the Node half of the Perl bridge. It loads a vendor's provider module and
 * serves the bridge protocol to `perl/PVE/BackupProvider/Plugin/NodeBridge.pm` over a pair of
 * streams (stdin/stdout of `pve-backup-provider provider-host`).
 *
 * Protocol (version {@link BRIDGE_PROTOCOL_VERSION}), newline-delimited JSON, one object a line:
 * - request `{id, method, params}`: `method` is the Perl method name (`backup_vm`,
 *   `restore_vm_volume_init`...), `params` its arguments after `$self`, as Perl has them
 *   (hashes with dashed keys, every scalar possibly a string, `undef` as `null`). The first
 *   request is `hello` with `[{storeid, scfg}]`: it constructs the
 *   provider with `{storeid, scfg, log}` and answers `{protocol, apiVersion}`.
 * - response `{id, result}` (the Perl return value, in Perl's shape: `restore_get_mechanism`
 *   answers a two-element array, the Perl side returns it as a list) or
 *   `{id, error: {message, code}}`.
 * - event `{log: {level, message}}`: a line of the provider's log, written when it is logged.
 *
 * Containers: the `$info` of `backup_container_prepare` and `backup_container` carries
 * `bridge-ns-pid`, a process in the mount namespace where vzdump mounted the tree; the provider
 * gets `directory` as `/proc/<pid>/root<directory>` and the id map from the config's
 * `lxc.idmap` lines or `backup-user-id` (docs/pve-bridge-notes.md §6.4, §7.7 (a)).
 *
 * Requests are served one after the other, in order (the Perl side makes one call at a time).
 * Cancelling ({@link ProviderHost.cancel}, SIGTERM/SIGINT in the command) aborts the running
 * call's `AbortSignal` and nothing else: the host keeps serving, because after a task stop
 * vzdump still calls `backup_cleanup` and `job_cleanup` (docs/pve-bridge-notes.md §6.3, §7.2).
 * It ends when its input ends.
 *
 * Only `apiVersion: 2` providers (the Proxmox VE 8.4 shape, which the Perl API is) are served,
 * and of the VM mechanisms only `nbd`: `file-handle` hands the provider a Perl file handle and
 * a Perl closure, which cannot cross a pipe.
 *
 * @packageDocumentation
 */
import { existsSync } from 'node:fs';
import { createInterface } from 'node:readline';
import type { Readable, Writable } from 'node:stream';
import { pathToFileURL } from 'node:url';
import path from 'node:path';

import { CancelledError, PveBackupError } from '../errors.js';
import type {
  BackupProvider,
  BackupProviderV2,
  BackupVmVolume,
  ContainerBackupInfo,
  GuestType,
  IdMapEntry,
  LogLevel,
  ProviderContext,
  VolumeSize,
} from '../provider/api.js';
import type { BitmapAction, BitmapMode } from '../vocabulary.js';
import { BridgeError } from './errors.js';
import { isStorageCall, serveStorageCall } from './storage-calls.js';

/** Version of the line protocol; `hello` answers it, the Perl side refuses another. */
export const BRIDGE_PROTOCOL_VERSION = 1;

/** What a provider module's default export may be: a factory or a class taking the context. */
export type ProviderModuleExport =
  | ((context: ProviderContext) => BackupProvider | Promise<BackupProvider>)
  | (new (context: ProviderContext) => BackupProvider);

/** Options of {@link ProviderHost}. */
export interface ProviderHostOptions {
  /** Makes the provider from its context (see {@link loadProviderModule}). */
  factory: (context: ProviderContext) => BackupProvider | Promise<BackupProvider>;
  /** Where requests come from. */
  input: Readable;
  /** Where responses and log events go. Nothing else may write there. */
  output: Writable;
}

interface Request {
  id: number | string;
  method: string;
  params: unknown[];
}

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

/** Whether `fn` is a class (called with `new`) rather than a factory function. */
function isClass(fn: unknown): fn is new (context: ProviderContext) => BackupProvider {
  return typeof fn === 'function' && /^class[\s{]/.test(Function.prototype.toString.call(fn));
}

/**
 * Loads a provider module (ESM; a path or a package name) and returns its factory. The default
 * export is a factory `(context) => provider` or a provider class; either may be async.
 */
export async function loadProviderModule(spec: string): Promise<ProviderHostOptions['factory']> {
  // an existing file is a path (against the working directory); anything else a package specifier
  const url = spec.startsWith('/') || spec.startsWith('.') || existsSync(spec) ? pathToFileURL(path.resolve(spec)).href : spec;
  let mod: { default?: unknown };
  try {
    mod = (await import(url)) as { default?: unknown };
  } catch (err) {
    throw new BridgeError(`cannot load the provider module '${spec}': ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
  const exported = mod.default;
  if (typeof exported !== 'function') {
    throw new BridgeError(`the provider module '${spec}' has no default export that is a factory (context) => provider or a provider class`);
  }
  if (isClass(exported)) return (context) => new exported(context);
  return exported as (context: ProviderContext) => BackupProvider | Promise<BackupProvider>;
}

// ---- argument shapes: Perl sends hashes with dashed keys and strings for numbers ----

function num(v: unknown, what: string, method: string): number {
  const n = typeof v === 'number' ? v : typeof v === 'string' && /^-?\d+(\.\d+)?$/.test(v.trim()) ? Number(v) : NaN;
  if (!Number.isFinite(n)) throw new BridgeError(`${method}: ${what} is not a number: ${JSON.stringify(v)}`, { method });
  return n;
}

function optNum(v: unknown, what: string, method: string): number | undefined {
  return v === undefined || v === null || v === '' ? undefined : num(v, what, method);
}

function str(v: unknown, what: string, method: string): string {
  if (typeof v === 'number') return String(v);
  if (typeof v !== 'string') throw new BridgeError(`${method}: ${what} is not a string: ${JSON.stringify(v)}`, { method });
  return v;
}

function optStr(v: unknown, what: string, method: string): string | undefined {
  return v === undefined || v === null ? undefined : str(v, what, method);
}

function hash(v: unknown, what: string, method: string): Record<string, unknown> {
  if (v === undefined || v === null) return {};
  if (typeof v !== 'object' || Array.isArray(v)) throw new BridgeError(`${method}: ${what} is not a hash`, { method });
  return v as Record<string, unknown>;
}

/** Perl truth: undef, '', '0' and 0 are false. */
function perlTrue(v: unknown): boolean {
  return !(v === undefined || v === null || v === '' || v === '0' || v === 0 || v === false);
}

function guestType(v: unknown, method: string): GuestType {
  // backup_cleanup may get an undef vmtype for early failures (pve-manager VZDump.pm exec_backup_task)
  if (v === 'qemu' || v === 'lxc') return v;
  if (v === undefined || v === null) return undefined as unknown as GuestType;
  throw new BridgeError(`${method}: unknown guest type ${JSON.stringify(v)}`, { method });
}

/** qemu-server's bitmap-mode is derived from QEMU's action; give the provider a matching action back. */
function bitmapActionFor(mode: BitmapMode): BitmapAction {
  return mode === 'none' ? 'not-used' : mode === 'new' ? 'new' : 'used';
}

/** `lxc.idmap: u 0 100000 65536` lines of a container config, or the default map from the backup user id. */
function idMapOf(config: string, backupUserId: number): IdMapEntry[] {
  const map: IdMapEntry[] = [];
  for (const m of config.matchAll(/^lxc\.idmap\s*[:=]\s*([ug])\s+(\d+)\s+(\d+)\s+(\d+)\s*$/gm)) {
    map.push({ type: m[1] as 'u' | 'g', container: Number(m[2]), host: Number(m[3]), length: Number(m[4]) });
  }
  if (map.length > 0 || backupUserId === 0) return map;
  // pve-container's default unprivileged map (PVE::LXC::parse_id_maps)
  return [
    { type: 'u', container: 0, host: backupUserId, length: 65536 },
    { type: 'g', container: 0, host: backupUserId, length: 65536 },
  ];
}

/**
 * Where the host finds a container's tree. vzdump mounts it at `directory` (`/mnt/vzsnap0`) in a
 * mount namespace it made after this host started (pve-container `src/PVE/VZDump/LXC.pm`
 * `prepare`: `unshare(CLONE_NEWNS)`), so the path shows the host an empty folder; the Perl side
 * sends `bridge-ns-pid`, a process in that namespace, and the host, root, reads the tree through
 * that process's root: `/proc/<pid>/root<directory>` (docs/pve-bridge-notes.md §6.4, §7.7 (a)).
 * The owners the provider sees there are host ids; `idMap` maps them to the container's view.
 */
function containerDirectory(info: Record<string, unknown>, method: string): string {
  const directory = str(info.directory, 'directory', method);
  const raw = info['bridge-ns-pid'];
  if (raw === undefined || raw === null) return directory;
  const pid = num(raw, 'bridge-ns-pid', method);
  if (!Number.isSafeInteger(pid) || pid <= 0) throw new BridgeError(`${method}: bridge-ns-pid is not a process id: ${JSON.stringify(raw)}`, { method });
  if (!path.isAbsolute(directory)) throw new BridgeError(`${method}: directory is not an absolute path: ${JSON.stringify(directory)}`, { method });
  return `/proc/${pid}/root${path.normalize(directory)}`;
}

/**
 * Serves the bridge protocol for one provider. Construct, then {@link ProviderHost.serve};
 * resolves when the input ends and the last call finished.
 */
export class ProviderHost {
  private readonly opts: ProviderHostOptions;
  private provider: BackupProviderV2 | undefined;
  private storeid = '';
  /** Controllers of the call that runs (one at a time, but cancel must find it). */
  private readonly running = new Set<AbortController>();
  /** Archive names from `backup_init`, per vmid: `backupVm` and `backupContainer` want them, Perl does not pass them. */
  private readonly archiveNames = new Map<number, string>();

  constructor(opts: ProviderHostOptions) {
    this.opts = opts;
  }

  /** Aborts the running call's signal (a task stop); the host keeps serving. */
  cancel(reason: unknown = new CancelledError('cancelled by a signal to the provider host')): void {
    for (const c of this.running) c.abort(reason);
  }

  private send(message: Record<string, Json>): void {
    this.opts.output.write(`${JSON.stringify(message, wellFormed)}\n`);
  }

  private log = (level: LogLevel, message: string): void => {
    // vzdump's debugmsg maps unknown levels to err; keep to the three it knows
    const l = level === 'info' || level === 'warn' || level === 'err' ? level : 'err';
    this.send({ log: { level: l, message: String(message) } });
  };

  /** Reads requests until the input ends, answering each in order. */
  async serve(): Promise<void> {
    const lines = createInterface({ input: this.opts.input, crlfDelay: Infinity });
    let chain = Promise.resolve();
    for await (const line of lines) {
      if (line.trim() === '') continue;
      let req: Request;
      try {
        req = this.parse(line);
      } catch (err) {
        this.send({ id: null, error: errorJson(err) });
        continue;
      }
      // served in order, one at a time; reading goes on meanwhile, so the end of the input is
      // seen while a call runs
      chain = chain.then(() => this.answer(req));
    }
    // the input ended (the Perl side is gone, or read its last reply): nobody will read an answer
    this.cancel(new CancelledError('the bridge closed the provider host\'s input'));
    await chain;
  }

  private parse(line: string): Request {
    let v: unknown;
    try {
      v = JSON.parse(line);
    } catch (err) {
      throw new BridgeError(`a request is not JSON: ${line.slice(0, 80)}`, { cause: err });
    }
    const r = v as Partial<Request>;
    if (typeof r !== 'object' || r === null || (typeof r.id !== 'number' && typeof r.id !== 'string') || typeof r.method !== 'string') {
      throw new BridgeError(`a request lacks id or method: ${line.slice(0, 80)}`);
    }
    return { id: r.id, method: r.method, params: Array.isArray(r.params) ? r.params : [] };
  }

  private async answer(req: Request): Promise<void> {
    const controller = new AbortController();
    this.running.add(controller);
    try {
      const result = await this.dispatch(req.method, req.params, controller.signal);
      this.send({ id: req.id, result: (result ?? null) as Json });
    } catch (err) {
      this.send({ id: req.id, error: errorJson(err) });
    } finally {
      this.running.delete(controller);
    }
  }

  private need(method: string): BackupProviderV2 {
    if (!this.provider) throw new BridgeError(`${method}: called before hello`, { method });
    return this.provider;
  }

  /** One Perl call: arguments from Perl's shape, the provider's answer to Perl's shape. */
  private async dispatch(method: string, p: unknown[], signal: AbortSignal): Promise<unknown> {
    if (method === 'hello') return this.hello(p[0]);
    const pr = this.need(method);
    // the storage plugin's calls (status, list_volumes...): served on a fresh host, no job
    if (isStorageCall(method)) return serveStorageCall(pr, this.storeid, method, p, this.log);
    switch (method) {
      case 'provider_name':
        return String(await pr.providerName());
      case 'job_init':
        await pr.jobInit(num(p[0], 'start time', method));
        return null;
      case 'job_cleanup':
        await pr.jobCleanup();
        return null;
      case 'backup_init': {
        const vmid = num(p[0], 'vmid', method);
        const r = await pr.backupInit(vmid, guestType(p[1], method), num(p[2], 'start time', method));
        if (!r || typeof r.archiveName !== 'string') throw new BridgeError(`${method}: the provider returned no archiveName`, { method });
        this.archiveNames.set(vmid, r.archiveName);
        return { 'archive-name': r.archiveName };
      }
      case 'backup_cleanup': {
        const info = hash(p[3], 'info', method);
        const error = optStr(info.error, 'info error', method);
        const r = await pr.backupCleanup(num(p[0], 'vmid', method), guestType(p[1], method), perlTrue(p[2]), error !== undefined ? { error } : {});
        const size: unknown = r ? r.stats?.archiveSize : undefined;
        if (size === undefined || size === null) return {};
        // vzdump only shows the size (pve-manager VZDump.pm exec_backup_task); a size Perl refuses
        // would fail backup_cleanup(..., 1), the guest, and so remove a complete backup
        if (typeof size !== 'number' || !Number.isFinite(size) || size < 0 || size > Number.MAX_SAFE_INTEGER) {
          this.log('warn', `${method}: the provider reported an invalid archive size ${JSON.stringify(size)}; left out`);
          return {};
        }
        return { stats: { 'archive-size': Math.floor(size) } };
      }
      case 'backup_get_mechanism': {
        const r = await pr.backupGetMechanism(num(p[0], 'vmid', method), guestType(p[1], method));
        if (r === 'file-handle') {
          throw new BridgeError(`${method}: the provider asks for 'file-handle', which the Perl bridge does not carry (a Perl file handle and closure cannot cross the pipe); use 'nbd'`, { method });
        }
        return r ?? null;
      }
      case 'backup_handle_log_file':
        await pr.backupHandleLogFile(num(p[0], 'vmid', method), str(p[1], 'filename', method));
        return null;
      case 'backup_vm_query_incremental': {
        const volumes: Record<string, VolumeSize> = {};
        for (const [dev, v] of Object.entries(hash(p[1], 'volumes', method))) volumes[dev] = { size: num(hash(v, dev, method).size, `${dev} size`, method) };
        return (await pr.backupVmQueryIncremental(num(p[0], 'vmid', method), volumes)) ?? null;
      }
      case 'backup_vm':
        return this.backupVm(pr, p, signal);
      case 'backup_container_prepare': {
        const vmid = num(p[0], 'vmid', method);
        await pr.backupContainerPrepare(vmid, this.containerInfo(vmid, '', p[1], method, signal));
        return null;
      }
      case 'backup_container': {
        const vmid = num(p[0], 'vmid', method);
        const config = str(p[1] ?? '', 'guest config', method);
        const exclude = Array.isArray(p[2]) ? p[2].map((e) => str(e, 'exclude pattern', method)) : [];
        await pr.backupContainer(vmid, config, exclude, this.containerInfo(vmid, config, p[3], method, signal));
        return null;
      }
      case 'restore_get_mechanism': {
        const r = await pr.restoreGetMechanism(str(p[0], 'volname', method));
        return [r.mechanism, r.vmtype];
      }
      case 'archive_get_guest_config':
        return await pr.archiveGetGuestConfig(str(p[0], 'volname', method));
      case 'archive_get_firewall_config':
        return (await pr.archiveGetFirewallConfig(str(p[0], 'volname', method))) ?? null;
      case 'restore_vm_init':
        return await pr.restoreVmInit(str(p[0], 'volname', method));
      case 'restore_vm_cleanup':
        await pr.restoreVmCleanup(str(p[0], 'volname', method));
        return null;
      case 'restore_vm_volume_init': {
        const r = await pr.restoreVmVolumeInit(str(p[0], 'volname', method), str(p[1], 'device name', method), {});
        return { 'qemu-img-path': r.qemuImgPath };
      }
      case 'restore_vm_volume_cleanup':
        await pr.restoreVmVolumeCleanup(str(p[0], 'volname', method), str(p[1], 'device name', method), {});
        return null;
      case 'restore_container_init': {
        // upstream passes ($volname, $storeid, {}) though Base.pm documents ($volname, $info) (pve-container LXC/Create.pm)
        const r = await pr.restoreContainerInit(str(p[0], 'volname', method), typeof p[1] === 'string' ? p[1] : this.storeid, {});
        return r.tarPath !== undefined ? { 'tar-path': r.tarPath } : { 'archive-directory': r.archiveDirectory ?? null };
      }
      case 'restore_container_cleanup':
        await pr.restoreContainerCleanup(str(p[0], 'volname', method), typeof p[1] === 'string' ? p[1] : this.storeid, {});
        return null;
      default:
        throw new BridgeError(`unknown method '${method}'`, { method });
    }
  }

  private async hello(arg: unknown): Promise<unknown> {
    const a = hash(arg, 'hello', 'hello');
    if (this.provider) throw new BridgeError('hello: the provider is already constructed', { method: 'hello' });
    this.storeid = str(a.storeid, 'storeid', 'hello');
    const scfg = hash(a.scfg, 'scfg', 'hello');
    const provider = await this.opts.factory({ storeid: this.storeid, scfg, log: this.log });
    if (!provider || typeof provider !== 'object') throw new BridgeError('hello: the provider factory returned no provider', { method: 'hello' });
    if (provider.apiVersion !== 2) {
      throw new BridgeError(`hello: the provider declares apiVersion ${String(provider.apiVersion)}; the Perl bridge serves apiVersion 2 (the Proxmox VE 8.4 API)`, { method: 'hello' });
    }
    this.provider = provider;
    return { protocol: BRIDGE_PROTOCOL_VERSION, apiVersion: provider.apiVersion };
  }

  private async backupVm(pr: BackupProviderV2, p: unknown[], signal: AbortSignal): Promise<null> {
    const method = 'backup_vm';
    const vmid = num(p[0], 'vmid', method);
    const volumes: Record<string, BackupVmVolume> = {};
    for (const [dev, raw] of Object.entries(hash(p[2], 'volumes', method))) {
      const v = hash(raw, dev, method);
      const nbdPath = optStr(v['nbd-path'], `${dev} nbd-path`, method);
      if (nbdPath === undefined) {
        throw new BridgeError(`${method}: volume '${dev}' has no nbd-path: only the nbd mechanism is bridged (file-handle is not)`, { method });
      }
      const mode = str(v['bitmap-mode'] ?? 'none', `${dev} bitmap-mode`, method);
      if (mode !== 'none' && mode !== 'new' && mode !== 'reuse') throw new BridgeError(`${method}: volume '${dev}': unknown bitmap-mode '${mode}'`, { method });
      const bitmapName = optStr(v['bitmap-name'], `${dev} bitmap-name`, method);
      volumes[dev] = {
        size: num(v.size, `${dev} size`, method),
        bitmapMode: mode,
        bitmapAction: bitmapActionFor(mode),
        nbdPath,
        // qemu-server names each export after its device (QemuServer.pm archive_external)
        nbdUri: `nbd+unix:///${dev}?socket=${nbdPath}`,
        ...(bitmapName !== undefined ? { bitmapName } : {}),
      };
    }
    const info = hash(p[3], 'info', method);
    const bandwidthLimit = optNum(info['bandwidth-limit'], 'bandwidth-limit', method);
    const firewallConfig = optStr(info['firewall-config'], 'firewall-config', method);
    await pr.backupVm(vmid, str(p[1] ?? '', 'guest config', method), volumes, {
      mechanism: 'nbd',
      archiveName: this.archiveName(vmid, method),
      signal,
      ...(bandwidthLimit ? { bandwidthLimit } : {}),
      ...(firewallConfig !== undefined ? { firewallConfig } : {}),
    });
    return null;
  }

  private containerInfo(vmid: number, config: string, raw: unknown, method: string, signal: AbortSignal): ContainerBackupInfo {
    const info = hash(raw, 'info', method);
    const backupUserId = num(info['backup-user-id'] ?? 0, 'backup-user-id', method);
    const bandwidthLimit = optNum(info['bandwidth-limit'], 'bandwidth-limit', method);
    const firewallConfig = optStr(info['firewall-config'], 'firewall-config', method);
    return {
      directory: containerDirectory(info, method),
      sources: Array.isArray(info.sources) ? info.sources.map((s) => str(s, 'source', method)) : ['.'],
      backupUserId,
      idMap: idMapOf(config, backupUserId),
      archiveName: this.archiveName(vmid, method),
      signal,
      ...(bandwidthLimit ? { bandwidthLimit } : {}),
      ...(firewallConfig !== undefined ? { firewallConfig } : {}),
    };
  }

  private archiveName(vmid: number, method: string): string {
    const name = this.archiveNames.get(vmid);
    if (name === undefined) throw new BridgeError(`${method}: no backup_init for VM ${vmid} in this job`, { method });
    return name;
  }
}

/** Half of a surrogate pair, alone (code units, no `u` flag). */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;

/**
 * `JSON.stringify` replacer: strings with a lone surrogate get U+FFFD in its place. JSON.stringify
 * writes a lone surrogate as a `\ud83d` escape, which the Perl side's JSON::PP refuses, failing
 * the running call: a provider's `message.slice(0, n)` that cuts a character outside the BMP in
 * half would have failed a backup over a log line.
 */
function wellFormed(_key: string, value: unknown): unknown {
  return typeof value === 'string' ? value.replace(LONE_SURROGATE, '\uFFFD') : value;
}

/** An error as the protocol carries it: message and a stable code (`ERR_PROVIDER` for a plain Error). */
function errorJson(err: unknown): Json {
  const message = err instanceof Error ? err.message : String(err);
  const code =
    err instanceof PveBackupError
      ? err.code
      : err && typeof err === 'object' && typeof (err as { code?: unknown }).code === 'string'
        ? (err as { code: string }).code
        : 'ERR_PROVIDER';
  return { message, code };
}

/**
 * The storage plugin's calls as the provider host serves them: what the generated Proxmox VE
 * storage plugin (`PVE::Storage::Custom::<Name>Plugin`, see {@link ./pve-plugin.ts}) forwards to
 * a fresh host right after `hello`, with no job (`status`, `list_volumes`,
 * `get_volume_attribute`, `update_volume_attribute`, `free_image`, `prune_backups`,
 * `volume_size_info`). Each goes to the provider's {@link ProviderStorage} hooks; a provider
 * without the hook a call needs gets a {@link NotImplementedError} (`ERR_NOT_IMPLEMENTED`) naming
 * it, which the Perl side dies with.
 *
 * Arguments come as the Perl side sends them (after `$class`, `$scfg` and `$storeid`, which the
 * host has from `hello`); answers have pve-storage's shapes (docs/pve-bridge-notes.md §1.4, §5).
 *
 * Retention (`prune_backups`), one rule: the provider's own `storage.prune` decides when it has
 * one (it knows what its backups build on); it is called once per guest, for the guest given or,
 * when Proxmox VE gives none (`pvesm prune-backups` without `--vmid`), for every guest
 * `listBackups` finds. Without `prune`, the host marks each guest's backups with
 * {@link markBackups} (pve-storage `prune_mark_backup_group`) over `listBackups` and deletes
 * those marked `remove` with `removeBackup`. Anything else is `ERR_NOT_IMPLEMENTED`.
 *
 * @packageDocumentation
 */
import type { BackupProviderV2, GuestType, LogFunction, PruneOptions, StoredBackup, StoragePruneMark } from '../provider/api.js';
import { NotImplementedError } from '../provider/errors.js';
import { markBackups } from '../provider/prune.js';
import { BridgeError } from './errors.js';

/** The methods of the storage plugin the host serves. */
export const STORAGE_CALLS = [
  'status',
  'list_volumes',
  'get_volume_attribute',
  'update_volume_attribute',
  'free_image',
  'prune_backups',
  'volume_size_info',
] as const;

/** One of {@link STORAGE_CALLS}. */
export type StorageCall = (typeof STORAGE_CALLS)[number];

/** Whether `method` is a storage call (the host's dispatch hands it to {@link serveStorageCall}). */
export function isStorageCall(method: string): method is StorageCall {
  return (STORAGE_CALLS as readonly string[]).includes(method);
}

/** pve-storage's `list_volumes` item. */
export interface PveVolumeItem {
  volid: string;
  vmid: number;
  format: string;
  size: number;
  ctime: number;
  content: 'backup';
  subtype: GuestType;
  notes?: string;
  protected?: 1;
}

/** pve-storage's `prune_backups` item. */
export interface PvePruneItem {
  volid: string;
  type: GuestType;
  ctime: number;
  mark: 'keep' | 'remove' | 'protected';
  vmid: number;
}

/**
 * The volume format the generated plugin reports for a backup (`parse_volname`, `list_volumes`):
 * not a disk format, since a provider's backup is none (PBS reports `pbs-vm`/`pbs-ct` likewise).
 */
export const BACKUP_VOLUME_FORMAT = 'backup-provider';

/** The volname pattern vzdump builds (`backup/<archive-name>`, pve-manager `VZDump.pm` L1218-1224). */
const VOLNAME_RE = /^backup\/(?:[a-zA-Z0-9\-.+=_]|\/|:)+$/;

/**
 * A volume name as the generated plugin's `parse_volname` accepts it: {@link VOLNAME_RE}, and no
 * `.`, `..` or empty segment (a provider may make paths of names; Proxmox VE hands a user's name
 * over with only VM.Backup on its vmid checked, pve-storage `Storage.pm` `check_volume_access`).
 */
function isVolname(v: unknown): v is string {
  return typeof v === 'string' && VOLNAME_RE.test(v) && !v.slice('backup/'.length).split('/').some((s) => s === '' || s === '.' || s === '..');
}

/** Perl's `keep-last`... hash to {@link PruneOptions}. */
const KEEP_KEYS: Record<string, keyof PruneOptions> = {
  'keep-all': 'keepAll',
  'keep-last': 'keepLast',
  'keep-hourly': 'keepHourly',
  'keep-daily': 'keepDaily',
  'keep-weekly': 'keepWeekly',
  'keep-monthly': 'keepMonthly',
  'keep-yearly': 'keepYearly',
};

function volnameArg(v: unknown, method: string): string {
  if (!isVolname(v)) throw new BridgeError(`${method}: not a backup volume name: ${JSON.stringify(v)}`, { method });
  return v;
}

function optVmid(v: unknown, method: string): number | undefined {
  if (v === undefined || v === null || v === '') return undefined;
  const n = typeof v === 'number' ? v : typeof v === 'string' && /^\d+$/.test(v) ? Number(v) : NaN;
  if (!Number.isInteger(n) || n < 0) throw new BridgeError(`${method}: vmid is not a number: ${JSON.stringify(v)}`, { method });
  return n;
}

function optType(v: unknown, method: string): GuestType | undefined {
  if (v === undefined || v === null || v === '') return undefined;
  if (v === 'qemu' || v === 'lxc') return v;
  throw new BridgeError(`${method}: unknown guest type ${JSON.stringify(v)}`, { method });
}

/** Perl truth: undef, '', '0' and 0 are false. */
function perlTrue(v: unknown): boolean {
  return !(v === undefined || v === null || v === '' || v === '0' || v === 0 || v === false);
}

/** Perl's keep hash (`{'keep-last' => 3}`, values possibly strings) to {@link PruneOptions}. */
export function keepFromPerl(raw: unknown, method = 'prune_backups'): PruneOptions {
  if (raw === undefined || raw === null) return {};
  if (typeof raw !== 'object' || Array.isArray(raw)) throw new BridgeError(`${method}: the keep options are not a hash`, { method });
  const keep: PruneOptions = {};
  for (const [k, v] of Object.entries(raw as Record<string, unknown>)) {
    const key = KEEP_KEYS[k];
    if (!key) throw new BridgeError(`${method}: unknown keep option '${k}'`, { method });
    if (key === 'keepAll') keep.keepAll = perlTrue(v);
    else {
      const n = typeof v === 'number' ? v : typeof v === 'string' && /^\d+$/.test(v) ? Number(v) : NaN;
      if (!Number.isInteger(n) || n < 0) throw new BridgeError(`${method}: ${k} is not a count: ${JSON.stringify(v)}`, { method });
      keep[key] = n;
    }
  }
  return keep;
}

function hook<K extends keyof NonNullable<BackupProviderV2['storage']>>(pr: BackupProviderV2, name: K): NonNullable<NonNullable<BackupProviderV2['storage']>[K]> {
  const fn = pr.storage?.[name];
  if (typeof fn !== 'function') {
    throw new NotImplementedError(`storage.${String(name)}`);
  }
  return fn.bind(pr.storage) as NonNullable<NonNullable<BackupProviderV2['storage']>[K]>;
}

/** What is wrong with a listed backup, or `undefined` when it is one Proxmox VE can take. */
function backupProblem(b: StoredBackup): string | undefined {
  if (!b || typeof b !== 'object' || !isVolname(b.volname)) return `without a valid volume name backup/<archive-name>: ${JSON.stringify(b)}`;
  if (!Number.isInteger(b.vmid) || (b.vmtype !== 'qemu' && b.vmtype !== 'lxc') || !Number.isFinite(b.ctime) || !Number.isFinite(b.size)) return `${b.volname} without vmid, vmtype, ctime and size`;
  return undefined;
}

/**
 * The provider's backups (of `vmid`), each checked. One it lists malformed is left out with a
 * warning, as upstream's own listings skip what they cannot parse (pve-storage `Plugin.pm`
 * `list_volumes`): failing the whole call would break the GUI's listing of every backup, and the
 * prune vzdump runs after each backup of the guest, which then fails and removes that backup.
 */
async function listed(pr: BackupProviderV2, vmid: number | undefined, method: string, log: LogFunction): Promise<StoredBackup[]> {
  const list = await hook(pr, 'listBackups')(vmid !== undefined ? { vmid } : {});
  if (!Array.isArray(list)) throw new BridgeError(`${method}: listBackups returned no list`, { method });
  return list.filter((b: StoredBackup) => {
    const problem = backupProblem(b);
    if (problem) log('warn', `${method}: skipped a backup it lists ${problem}`);
    return !problem && (vmid === undefined || b.vmid === vmid);
  });
}

function item(storeid: string, b: StoredBackup): PveVolumeItem {
  return {
    volid: `${storeid}:${b.volname}`,
    vmid: b.vmid,
    format: BACKUP_VOLUME_FORMAT,
    size: Math.max(0, Math.floor(b.size)),
    ctime: Math.floor(b.ctime),
    content: 'backup',
    subtype: b.vmtype,
    ...(b.notes !== undefined && b.notes !== '' ? { notes: String(b.notes) } : {}),
    ...(b.protected ? { protected: 1 as const } : {}),
  };
}

/** Groups backups per guest (`<vmtype>/<vmid>`, as upstream's prune groups them). */
function groups(list: StoredBackup[]): Map<string, StoredBackup[]> {
  const g = new Map<string, StoredBackup[]>();
  for (const b of list) {
    const k = `${b.vmtype}/${b.vmid}`;
    g.set(k, [...(g.get(k) ?? []), b]);
  }
  return g;
}

async function pruneBackups(pr: BackupProviderV2, storeid: string, p: unknown[], log: LogFunction): Promise<PvePruneItem[]> {
  const method = 'prune_backups';
  const keep = keepFromPerl(p[0], method);
  const vmid = optVmid(p[1], method);
  const vmtype = optType(p[2], method);
  const dryRun = perlTrue(p[3]);
  const out: PvePruneItem[] = [];
  const toItem = (m: StoragePruneMark | { volname: string; vmid: number; vmtype: GuestType; ctime: number; mark: PvePruneItem['mark'] }): PvePruneItem => ({
    volid: `${storeid}:${m.volname}`,
    type: m.vmtype,
    ctime: Math.floor(m.ctime),
    mark: m.mark,
    vmid: m.vmid,
  });

  const prune = pr.storage?.prune;
  if (typeof prune === 'function') {
    // the provider decides, once per guest
    let guests: Array<{ vmid: number; vmtype: GuestType }>;
    if (vmid !== undefined && vmtype !== undefined) guests = [{ vmid, vmtype }];
    else {
      const all = await listed(pr, vmid, method, log);
      guests = [...groups(all.filter((b) => vmtype === undefined || b.vmtype === vmtype)).values()].map((g) => ({ vmid: g[0]!.vmid, vmtype: g[0]!.vmtype }));
    }
    for (const g of guests) {
      const before = typeof pr.storage?.listBackups === 'function' ? await listed(pr, g.vmid, method, log) : [];
      const r = await prune.call(pr.storage, { vmid: g.vmid, vmtype: g.vmtype, keep, dryRun });
      if (r && Array.isArray(r.marks)) {
        for (const m of r.marks) out.push(toItem(m));
        continue;
      }
      // no marks: what was listed before, marked by what the provider says it removed
      const removed = new Set(r && Array.isArray(r.removed) ? r.removed : []);
      for (const b of before.filter((x) => x.vmtype === g.vmtype)) {
        out.push(toItem({ ...b, mark: removed.has(b.volname) ? 'remove' : b.protected ? 'protected' : 'keep' }));
        removed.delete(b.volname);
      }
      for (const v of removed) out.push(toItem({ volname: v, vmid: g.vmid, vmtype: g.vmtype, ctime: 0, mark: 'remove' }));
    }
    return out;
  }

  // no prune hook: mark with Proxmox VE's rules, remove with removeBackup
  if (typeof pr.storage?.listBackups !== 'function' || typeof pr.storage?.removeBackup !== 'function') {
    throw new NotImplementedError('storage.prune (or storage.listBackups and storage.removeBackup)');
  }
  const all = (await listed(pr, vmid, method, log)).filter((b) => vmtype === undefined || b.vmtype === vmtype);
  const remove: string[] = [];
  for (const group of groups(all).values()) {
    const byName = new Map(group.map((b) => [b.volname, b]));
    for (const m of markBackups(group.map((b) => ({ volname: b.volname, ctime: b.ctime, protected: b.protected === true })), keep)) {
      const b = byName.get(m.volname)!;
      out.push(toItem({ ...b, mark: m.mark }));
      if (m.mark === 'remove') remove.push(b.volname);
    }
  }
  if (!dryRun) {
    const removeBackup = hook(pr, 'removeBackup');
    for (const v of remove) await removeBackup(v);
  }
  return out;
}

/**
 * Serves one storage call on the provider `pr` of storage `storeid`.
 *
 * @param pr - The provider the host constructed at `hello`.
 * @param storeid - The storage id from `hello`.
 * @param method - A {@link StorageCall}.
 * @param p - The Perl arguments after `$class, $scfg, $storeid`.
 * @param log - Where warnings go, the host's log events (a backup the provider lists malformed is skipped with one).
 * @throws {@link NotImplementedError} when the provider lacks the hook; {@link BridgeError} on
 *   arguments or answers of the wrong shape; whatever the provider's hook throws.
 */
export async function serveStorageCall(pr: BackupProviderV2, storeid: string, method: StorageCall, p: unknown[], log: LogFunction = () => undefined): Promise<unknown> {
  switch (method) {
    case 'status': {
      const s = await hook(pr, 'status')();
      const n = (v: unknown, what: string): number => {
        if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new BridgeError(`${method}: the provider returned no ${what}`, { method });
        return Math.floor(v);
      };
      return { total: n(s?.total, 'total'), free: n(s?.free, 'free'), used: n(s?.used, 'used') };
    }
    case 'list_volumes': {
      // content types: only backups live here (the Perl side already answers [] otherwise)
      const content = Array.isArray(p[1]) ? p[1] : undefined;
      if (content && !content.includes('backup')) return [];
      return (await listed(pr, optVmid(p[0], method), method, log)).map((b) => item(storeid, b));
    }
    case 'get_volume_attribute': {
      const volname = volnameArg(p[0], method);
      if (p[1] === 'notes') return (await hook(pr, 'getNotes')(volname)) ?? null;
      if (p[1] === 'protected') return (await hook(pr, 'getProtected')(volname)) ? 1 : 0;
      return null; // upstream's base answers undef for other attributes (Plugin.pm get_volume_attribute)
    }
    case 'update_volume_attribute': {
      const volname = volnameArg(p[0], method);
      if (p[1] === 'notes') await hook(pr, 'setNotes')(volname, typeof p[2] === 'string' ? p[2] : p[2] == null ? '' : String(p[2]));
      else if (p[1] === 'protected') await hook(pr, 'setProtected')(volname, perlTrue(p[2]));
      // as upstream's base dies for attributes it does not know (Plugin.pm update_volume_attribute)
      else throw new BridgeError(`attribute '${String(p[1])}' is not supported for this storage type`, { method });
      return null;
    }
    case 'free_image':
      await hook(pr, 'removeBackup')(volnameArg(p[0], method));
      return null;
    case 'prune_backups':
      return pruneBackups(pr, storeid, p, log);
    case 'volume_size_info': {
      // the Perl side passes the vmid parse_volname found, to list one guest only
      const volname = volnameArg(p[0], method);
      const found = (await listed(pr, optVmid(p[1], method), method, log)).find((b) => b.volname === volname);
      if (!found) throw new BridgeError(`${method}: no backup ${volname} on this storage`, { method });
      return Math.floor(found.size);
    }
  }
}

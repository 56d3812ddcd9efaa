/**
 * Volume names of backups as the reference stores name them: `backup/<vmid>/<vmtype>-<backup-id>`
 * (the backup id `YYYY_MM_DD-HH_MM_SS[-N]` in UTC), volume ids `<storeid>:<volname>`. Shared by
 * the directory store (a folder per backup) and the chunk store (a key prefix per backup); each
 * throws its own error for a name that does not parse.
 *
 * @packageDocumentation
 */
import type { GuestType } from './api.js';

/** `<vmtype>-YYYY_MM_DD-HH_MM_SS[-N]`: the folder (or key prefix) name of a backup. */
const BACKUP_DIR_RE = /^(qemu|lxc)-(\d{4}_\d\d_\d\d-\d\d_\d\d_\d\d(?:-\d+)?)$/;
const VOLNAME_RE = /^backup\/([1-9]\d{0,8})\/((?:qemu|lxc)-\d{4}_\d\d_\d\d-\d\d_\d\d_\d\d(?:-\d+)?)$/;

/** What a volume name says. */
export interface ParsedVolname {
  /** Always `backup`. */
  vtype: 'backup';
  volname: string;
  vmid: number;
  vmtype: GuestType;
  /** `YYYY_MM_DD-HH_MM_SS[-N]`. */
  backupId: string;
  /** Folder name, `<vmtype>-<backupId>`. */
  dirName: string;
}

/** Parses `backup/<vmid>/<vmtype>-<backup-id>`; `undefined` when it is not one. */
export function matchVolname(volname: string): ParsedVolname | undefined {
  const m = typeof volname === 'string' ? VOLNAME_RE.exec(volname) : null;
  if (!m) return undefined;
  const dirName = m[2]!;
  const d = BACKUP_DIR_RE.exec(dirName)!;
  return { vtype: 'backup', volname, vmid: Number(m[1]), vmtype: d[1] as GuestType, backupId: d[2]!, dirName };
}

/** Whether a folder name is a backup folder. */
export function isBackupDirName(name: string): boolean {
  return BACKUP_DIR_RE.test(name);
}

/** `backup/<vmid>/<dirName>`. */
export function volnameOf(vmid: number, dirName: string): string {
  return `backup/${vmid}/${dirName}`;
}

/** Backup id of a time: `YYYY_MM_DD-HH_MM_SS` in UTC. */
export function backupIdOf(date: Date): string {
  const p = (n: number): string => String(n).padStart(2, '0');
  return `${date.getUTCFullYear()}_${p(date.getUTCMonth() + 1)}_${p(date.getUTCDate())}-${p(date.getUTCHours())}_${p(date.getUTCMinutes())}_${p(date.getUTCSeconds())}`;
}

/** Unix time of a backup id (`YYYY_MM_DD-HH_MM_SS[-N]`, UTC): the ctime of a backup without manifest. */
export function ctimeOfBackupId(backupId: string): number {
  const [y, mo, d, h, mi, s] = backupId.split(/[_-]/).map(Number) as [number, number, number, number, number, number];
  return Date.UTC(y, mo - 1, d, h, mi, s) / 1000;
}

/** The order both stores list (and remove) backups in: oldest first, then by volume name. */
export function oldestFirst(a: { ctime: number; volname: string }, b: { ctime: number; volname: string }): number {
  return a.ctime - b.ctime || (a.volname < b.volname ? -1 : 1);
}

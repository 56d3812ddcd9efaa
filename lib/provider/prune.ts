/**
 * Proxmox VE's retention rules (`PVE::Storage::prune_mark_backup_group`), as a pure function, plus
 * the one rule a store of incremental chains adds: a backup that a kept backup builds on is kept.
 *
 * @packageDocumentation
 */
import type { PruneOptions } from './api.js';

/** A backup as the retention rules see it. */
export interface PruneEntry {
  volname: string;
  /** Unix time (s). */
  ctime: number;
  /** Protected backups are always kept and do not count towards the keep options. */
  protected?: boolean;
  /** Volume name of the backup this one builds on. */
  parent?: string;
}

/** The decision for one backup. */
export interface PruneMark {
  volname: string;
  ctime: number;
  /** `keep`, `remove`, or `protected`. */
  mark: 'keep' | 'remove' | 'protected';
  /** Why it is kept when no keep option selected it: the kept backup that builds on it. */
  neededBy?: string;
}

const p2 = (n: number): string => String(n).padStart(2, '0');

/** ISO 8601 week-numbering year and week (`%G/%V`) of a local date. */
function isoWeek(d: Date): string {
  const t = new Date(Date.UTC(d.getFullYear(), d.getMonth(), d.getDate()));
  t.setUTCDate(t.getUTCDate() + 4 - (t.getUTCDay() || 7)); // the Thursday of this week decides the year
  const week = Math.ceil(((t.getTime() - Date.UTC(t.getUTCFullYear(), 0, 1)) / 86_400_000 + 1) / 7);
  return `${t.getUTCFullYear()}/${p2(week)}`;
}

/** Local-time bucket of each keep option, as Proxmox's `strftime` formats. */
const BUCKETS: Array<[keyof PruneOptions, (d: Date) => string]> = [
  ['keepHourly', (d) => `${d.getFullYear()}/${p2(d.getMonth() + 1)}/${p2(d.getDate())}/${p2(d.getHours())}`],
  ['keepDaily', (d) => `${d.getFullYear()}/${p2(d.getMonth() + 1)}/${p2(d.getDate())}`],
  ['keepWeekly', isoWeek],
  ['keepMonthly', (d) => `${d.getFullYear()}/${p2(d.getMonth() + 1)}`],
  ['keepYearly', (d) => `${d.getFullYear()}`],
];

/** Whether any keep option is set (none set means keep everything, as in Proxmox). */
export function hasKeepOptions(keep: PruneOptions): boolean {
  return Object.entries(keep).some(([k, v]) => (k === 'keepAll' ? v === true : typeof v === 'number' && v > 0));
}

/**
 * Marks one group of backups (one guest) for retention: Proxmox's rules, then every backup a kept
 * (or protected) backup builds on is kept too, so no chain that is kept is broken.
 *
 * @returns One mark per entry, newest first.
 */
export function markBackups(entries: PruneEntry[], keep: PruneOptions): PruneMark[] {
  const list = [...entries].sort((a, b) => b.ctime - a.ctime || (a.volname < b.volname ? 1 : -1));
  const marks = new Map<string, PruneMark>();
  for (const e of list) if (e.protected) marks.set(e.volname, { volname: e.volname, ctime: e.ctime, mark: 'protected' });
  if (keep.keepAll || !hasKeepOptions(keep)) {
    for (const e of list) if (!marks.has(e.volname)) marks.set(e.volname, { volname: e.volname, ctime: e.ctime, mark: 'keep' });
  } else {
    const markFirst = (n: number | undefined, bucket: (e: PruneEntry) => string): void => {
      if (!n || n <= 0) return;
      const already = new Set(list.filter((e) => marks.get(e.volname)?.mark === 'keep').map(bucket));
      const included = new Set<string>();
      for (const e of list) {
        if (marks.has(e.volname)) continue;
        const id = bucket(e);
        if (already.has(id)) continue;
        if (!included.has(id)) {
          if (included.size >= n) break;
          included.add(id);
          marks.set(e.volname, { volname: e.volname, ctime: e.ctime, mark: 'keep' });
        } else marks.set(e.volname, { volname: e.volname, ctime: e.ctime, mark: 'remove' });
      }
    };
    markFirst(keep.keepLast, (e) => `${e.ctime}/${e.volname}`);
    for (const [option, fmt] of BUCKETS) markFirst(keep[option] as number | undefined, (e) => fmt(new Date(e.ctime * 1000)));
    for (const e of list) if (!marks.has(e.volname)) marks.set(e.volname, { volname: e.volname, ctime: e.ctime, mark: 'remove' });
  }
  // Chains: what a kept backup builds on stays.
  const byName = new Map(list.map((e) => [e.volname, e]));
  for (const e of list) {
    if (marks.get(e.volname)!.mark === 'remove') continue;
    for (let child = e; child.parent; ) {
      const m = marks.get(child.parent);
      const parent = byName.get(child.parent);
      if (!m || !parent || m.mark !== 'remove') break;
      m.mark = 'keep';
      m.neededBy = child.volname;
      child = parent;
    }
  }
  return list.map((e) => marks.get(e.volname)!);
}

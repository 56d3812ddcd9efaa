/**
 * Who owns something a run leaves while it works (a backup access in QEMU, a job's temporary
 * folder, a backup being written into a store): the process, recorded so that a later run can
 * tell a crashed (SIGKILLed, OOM-killed) one from one that is still working.
 *
 * A process is named by its pid and its start time (field 22 of `/proc/<pid>/stat`, in clock
 * ticks since boot), because pids are reused; the host name and boot id say whether that pid can
 * be looked up here at all.
 *
 * @packageDocumentation
 */
import { readFileSync } from 'node:fs';
import os from 'node:os';

/** The process owning an access, a job's temporary folder or a backup being written. */
export interface AccessOwner {
  /** Process id. */
  pid: number;
  /** Start time of the process (`/proc/<pid>/stat` field 22), or `undefined` without `/proc`. */
  start: string | undefined;
  /** Host name of the machine the process runs on. */
  host: string;
  /** Linux boot id of that machine (`/proc/sys/kernel/random/boot_id`), when readable. */
  boot: string | undefined;
}

function readOrUndefined(file: string): string | undefined {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}

/** Start time of `pid` (field 22 of its stat line), or `undefined` when no such process exists. */
export function processStartTime(pid: number): string | undefined {
  const stat = readOrUndefined(`/proc/${pid}/stat`);
  if (stat === undefined) return undefined;
  // The command name (field 2) is in parentheses and may itself contain spaces and ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return fields[22 - 3];
}

/** The current process as an owner. */
export function currentOwner(): AccessOwner {
  return {
    pid: process.pid,
    start: processStartTime(process.pid),
    host: os.hostname(),
    boot: readOrUndefined('/proc/sys/kernel/random/boot_id')?.trim(),
  };
}

/**
 * Whether `owner` is known to be gone: it ran on this machine since its last boot, and no process
 * with its pid and start time exists any more (or the machine rebooted since). An owner on another
 * host, or one that cannot be checked, counts as alive.
 */
export function ownerIsDead(owner: unknown): boolean {
  if (!owner || typeof owner !== 'object') return false;
  const o = owner as Partial<AccessOwner>;
  if (typeof o.pid !== 'number' || !Number.isInteger(o.pid) || o.pid <= 0 || typeof o.start !== 'string') return false;
  const me = currentOwner();
  if (o.host !== me.host) return false;
  if (o.boot !== undefined && me.boot !== undefined && o.boot !== me.boot) return true;
  const start = processStartTime(o.pid);
  return start === undefined || start !== o.start;
}

/**
 * `<host>-<pid>-<start>` of the current process: a file or folder it leaves while it works is
 * named with it, so that a later run can remove the ones a killed process left
 * ({@link nameTagOwnerIsDead}).
 */
export function ownerNameTag(): string {
  const me = currentOwner();
  return `${me.host}-${me.pid}-${me.start ?? 0}`;
}

/** Whether `tag` (as {@link ownerNameTag} made it) names a process of this host that is gone. */
export function nameTagOwnerIsDead(tag: string): boolean {
  const m = /^(.+)-(\d+)-(\d+)$/.exec(tag);
  const me = currentOwner();
  return m !== null && m[1] === me.host && ownerIsDead({ ...me, pid: Number(m[2]), start: m[3] });
}

/** `pid N on HOST` for messages. */
export function describeOwner(owner: unknown): string {
  const o = (owner ?? {}) as Partial<AccessOwner>;
  return `pid ${String(o.pid)} on ${String(o.host)}`;
}

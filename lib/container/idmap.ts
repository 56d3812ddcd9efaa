/**
 * Container uid/gid maps, as LXC's `lxc.idmap` lines (`u 0 100000 65536`: container uids
 * 0..65535 are host uids 100000..165535).
 *
 * Archives and directory copies made by this package store container ids; the host ids they
 * correspond to come from the map. An empty map is the identity (a privileged container).
 * Besides parsing and validating maps, this module holds what the tar and rsync tools do with
 * one: the option check ({@link checkIdMap}) and the id shifts that name the file on error
 * ({@link hostToContainer}, {@link containerToHost}).
 *
 * @packageDocumentation
 */
import { InvalidArgumentError } from '../errors.js';
import type { IdMapEntry } from '../vocabulary.js';
import { IdMapError } from './errors.js';

/** One range of a container id map (defined with the provider API's vocabulary, which passes it to providers). */
export type { IdMapEntry };

/** Largest valid uid/gid: `(uid_t)-1` (4294967295) means "no id" to the kernel. */
export const MAX_ID = 0xffff_fffe;

const LINE_RE = /^(?:lxc\.idmap\s*[:=]\s*)?([ug])\s+(\S+)\s+(\S+)\s+(\S+)$/;

function parseNumber(text: string, what: string, line: string): number {
  if (!/^\d+$/.test(text)) throw new IdMapError(`id map line '${line}': ${what} '${text}' is not a non-negative integer`);
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n > MAX_ID + 1) throw new IdMapError(`id map line '${line}': ${what} ${text} is too large`);
  return n;
}

/**
 * Parses and validates id map lines.
 *
 * Accepts `u 0 100000 65536`, `lxc.idmap: u 0 100000 65536` (Proxmox's `lxc.idmap:` config
 * key) and `lxc.idmap = u 0 100000 65536` (LXC's). Blank lines and `#` comments are skipped.
 * Validation: the type is `u` or `g`; the numbers are integers; the length is at least 1; no
 * range goes past id 4294967294; per type, no two container ranges overlap and no two host
 * ranges overlap (the kernel refuses such maps too).
 *
 * @throws {@link IdMapError} (`ERR_IDMAP`) naming the offending line.
 */
export function parseIdMap(lines: string[]): IdMapEntry[] {
  const map: IdMapEntry[] = [];
  for (const raw of lines) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const m = LINE_RE.exec(line);
    if (!m) throw new IdMapError(`id map line '${line}' is not of the form 'u|g <container> <host> <length>'`);
    const entry: IdMapEntry = {
      type: m[1] as 'u' | 'g',
      container: parseNumber(m[2]!, 'container id', line),
      host: parseNumber(m[3]!, 'host id', line),
      length: parseNumber(m[4]!, 'length', line),
    };
    map.push(entry);
  }
  validateIdMap(map);
  return map;
}

/**
 * Checks an id map built elsewhere (for example received from a caller) with the rules of
 * {@link parseIdMap}.
 *
 * @throws {@link IdMapError} (`ERR_IDMAP`) naming the offending entry.
 */
export function validateIdMap(map: readonly IdMapEntry[]): void {
  for (const e of map) {
    const text = formatIdMapEntry(e);
    if (e.type !== 'u' && e.type !== 'g') throw new IdMapError(`id map entry '${text}': type must be 'u' or 'g'`);
    for (const [k, v] of [
      ['container id', e.container],
      ['host id', e.host],
      ['length', e.length],
    ] as const) {
      if (!Number.isSafeInteger(v) || v < 0) throw new IdMapError(`id map entry '${text}': ${k} must be a non-negative integer`);
    }
    if (e.length < 1) throw new IdMapError(`id map entry '${text}': length must be at least 1`);
    if (e.container + e.length - 1 > MAX_ID || e.host + e.length - 1 > MAX_ID) {
      throw new IdMapError(`id map entry '${text}': range goes past id ${MAX_ID}`);
    }
  }
  for (const type of ['u', 'g'] as const) {
    const ranges = map.filter((e) => e.type === type);
    for (const side of ['container', 'host'] as const) {
      const sorted = [...ranges].sort((a, b) => a[side] - b[side]);
      for (let i = 1; i < sorted.length; i++) {
        const prev = sorted[i - 1]!;
        const cur = sorted[i]!;
        if (prev[side] + prev.length > cur[side]) {
          throw new IdMapError(
            `id map entries '${formatIdMapEntry(prev)}' and '${formatIdMapEntry(cur)}' overlap in their ${side} ids`,
          );
        }
      }
    }
  }
}

/** The entry as an `lxc.idmap` value: `u 0 100000 65536`. */
export function formatIdMapEntry(e: IdMapEntry): string {
  return `${e.type} ${e.container} ${e.host} ${e.length}`;
}

function translate(map: readonly IdMapEntry[], type: 'u' | 'g', id: number, from: 'container' | 'host'): number {
  if (map.length === 0) return id;
  const to = from === 'container' ? 'host' : 'container';
  for (const e of map) {
    if (e.type === type && id >= e[from] && id < e[from] + e.length) return e[to] + (id - e[from]);
  }
  const kind = type === 'u' ? 'uid' : 'gid';
  throw new IdMapError(`${from} ${kind} ${id} is not covered by the id map`, { idType: type, id });
}

/**
 * The host id of container id `id`. Identity when `map` is empty (a privileged container); with a
 * non-empty map an id outside every range of its type is an error (never silently `nobody`: a
 * backup or restore that cannot represent an owner must not pretend it did).
 *
 * @throws {@link IdMapError} (`ERR_IDMAP`) when the id is not mapped; the caller adds the path.
 */
export function toHost(map: readonly IdMapEntry[], type: 'u' | 'g', id: number): number {
  return translate(map, type, id, 'container');
}

/**
 * The container id of host id `id`; the inverse of {@link toHost}, with the same rules.
 *
 * @throws {@link IdMapError} (`ERR_IDMAP`) when the id is not mapped.
 */
export function toContainer(map: readonly IdMapEntry[], type: 'u' | 'g', id: number): number {
  return translate(map, type, id, 'host');
}

/** Whether the map is the identity (empty: a privileged container). */
export function isIdentityMap(map: readonly IdMapEntry[] | undefined): boolean {
  return map === undefined || map.length === 0;
}

/**
 * Host uid and gid of the container's root (container id 0), as Proxmox's `parse_id_maps`
 * returns them (`$rootuid`, `$rootgid`); 0/0 for an empty map.
 *
 * @throws {@link IdMapError} when the map does not map container id 0.
 */
export function rootIds(map: readonly IdMapEntry[]): { uid: number; gid: number } {
  return { uid: toHost(map, 'u', 0), gid: toHost(map, 'g', 0) };
}

/** Validates an optional id map; returns it, or `[]`. */
export function checkIdMap(map: IdMapEntry[] | undefined): IdMapEntry[] {
  if (map === undefined) return [];
  if (!Array.isArray(map)) throw new InvalidArgumentError('idMap must be an array of id map entries');
  validateIdMap(map);
  return map;
}

/** A function shifting the ids of files by `map` one way; an id outside the map fails naming the file. */
export type IdShift = (type: 'u' | 'g', id: number, path: string) => number;

/** Shifts ids by `map` with `shift` (`from`: the side the ids come from), naming the file on error. */
function namingShift(map: IdMapEntry[], what: 'owner' | 'ACL entry', from: 'host' | 'container', shift: typeof toHost): IdShift {
  return (type, id, path) => {
    if (isIdentityMap(map)) return id;
    try {
      return shift(map, type, id);
    } catch {
      throw new IdMapError(`${path}: ${what} ${from} ${type === 'u' ? 'uid' : 'gid'} ${id} is not covered by the id map`, { idType: type, id, path });
    }
  };
}

/** Host id to container id (what a backup stores), naming the file on error. */
export function hostToContainer(map: IdMapEntry[], what: 'owner' | 'ACL entry'): IdShift {
  return namingShift(map, what, 'host', toContainer);
}

/** Container id to host id (what a restore writes), naming the file on error. */
export function containerToHost(map: IdMapEntry[], what: 'owner' | 'ACL entry'): IdShift {
  return namingShift(map, what, 'container', toHost);
}

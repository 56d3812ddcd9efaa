/**
 * Validation of caller-supplied names and generation of the names used in QEMU and on disk.
 *
 * Nothing a caller passes reaches QMP or the filesystem before it has matched one of these
 * patterns (and, for devices, has been found in what QEMU reports).
 *
 * @packageDocumentation
 */
import path from 'node:path';
import { InvalidArgumentError } from '../errors.js';

/** Prefix of every node, export and QOM object id this library creates. */
export const NAME_PREFIX = 'pvebp';

/** Target ids: e.g. `snapshot-access:store1` (letters, digits, `_ . : @ -`; up to 128). */
export const TARGET_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$/;
/** Bitmap ids chosen by the provider: the pattern lives with the provider API's vocabulary. */
export { BITMAP_ID_RE } from '../vocabulary.js';
/** Device ids, qdev ids and node names as QEMU accepts them (letter first; up to 31). */
export const DEVICE_RE = /^[A-Za-z][A-Za-z0-9_.-]{0,30}$/;

/** Throws {@link InvalidArgumentError} unless `value` is a string matching `re`. */
export function check(value: unknown, re: RegExp, what: string): string {
  if (typeof value !== 'string' || !re.test(value)) {
    throw new InvalidArgumentError(`invalid ${what} ${JSON.stringify(value)}: must match ${String(re)}`);
  }
  return value;
}

/** Node names of one device's backup access (all within QEMU's 31 character limit). */
export interface SlotNames {
  /** Fleecing image protocol (file) node. */
  fleecingFile: string;
  /** Fleecing image format node. */
  fleecing: string;
  /** copy-before-write filter. */
  cbw: string;
  /** snapshot-access node (exported). */
  snapshot: string;
  /** Block export id. */
  exportId: string;
}

/** Node names for device number `slot` of an access. */
export function slotNames(slot: number): SlotNames {
  const base = `${NAME_PREFIX}-${slot}`;
  return {
    fleecingFile: `${base}-flf`,
    fleecing: `${base}-fl`,
    cbw: `${base}-cbw`,
    snapshot: `${base}-snap`,
    exportId: base,
  };
}

/** QOM id of the object recording the active access inside QEMU. */
export const STATE_OBJECT_ID = `${NAME_PREFIX}-access`;

/**
 * The target id of backups to a storage, as qemu-server names it (`snapshot-access:<storeid>`):
 * it names the dirty bitmap, so backups to one storage build on each other's bitmap.
 */
export function storageTargetId(storeid: string): string {
  return `snapshot-access:${storeid}`;
}

/** Name of the provider's dirty bitmap for a target: `<targetId>/<bitmapId>`. */
export function mainBitmapName(targetId: string, bitmapId: string): string {
  return `${targetId}/${bitmapId}`;
}

/** Marker that a bitmap was handed out for a target, so its loss can be told (`invalid`). */
export function anchorBitmapName(targetId: string, bitmapId: string): string {
  return `${targetId}//anchor/${bitmapId}`;
}

/** Bitmap recording writes while an access is active (also marks the access as active). */
export function backgroundBitmapName(targetId: string): string {
  return `${targetId}//background`;
}

/** Suffix of background bitmap names, to find active (or crashed) accesses. */
export const BACKGROUND_SUFFIX = '//background';

/** Path of a fleecing image: inside `dir`, prefixed, with a random token against clashes. */
export function fleecingPath(dir: string, token: string, device: string, format: 'qcow2' | 'raw'): string {
  return path.join(dir, `${NAME_PREFIX}-${token}-${device}-fleecing.${format}`);
}

/** `nbd+unix:///EXPORT?socket=PATH`: shared with `lib/provider/dirty-regions.ts`, so it lives in the vocabulary. */
export { nbdUnixUri } from '../vocabulary.js';

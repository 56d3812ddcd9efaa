/**
 * The words the provider API, backup access (`lib/qemu`) and the container tools
 * (`lib/container`) share: bitmap actions and modes, the bitmap id pattern, the NBD URI of an
 * export, a container id map entry.
 *
 * This is the ground floor: it imports nothing of the package, so the provider API can speak
 * these words without depending on the layers that implement them (`test/layering.test.ts`
 * holds that line).
 *
 * @packageDocumentation
 */

/**
 * What happened to the target's dirty bitmap at setup, as Proxmox's `backup-access-setup` reports it:
 * - `not-used`: no bitmap requested and none existed;
 * - `not-used-removed`: no bitmap requested; the target's old bitmap was removed;
 * - `new`: a new bitmap was created (first run, or the bitmap id changed);
 * - `used`: the bitmap from the last successful backup is used (incremental);
 * - `invalid`: a bitmap was expected but is gone or unusable; a new one was created.
 */
export type BitmapAction = 'not-used' | 'not-used-removed' | 'new' | 'used' | 'invalid';

/** The provider-facing mode: `none` (no bitmap), `new` (read everything, bitmap starts now), `reuse` (read the dirty parts). */
export type BitmapMode = 'none' | 'new' | 'reuse';

/** Bitmap ids chosen by the provider (no `/` and no `:`; up to 64). */
export const BITMAP_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$/;

/** `nbd+unix:///EXPORT?socket=PATH`. */
export function nbdUnixUri(exportName: string, socketPath: string): string {
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${encodeURIComponent(socketPath).replace(/%2F/g, '/')}`;
}

/** One range of a container id map, as an `lxc.idmap` line: `u 0 100000 65536`. */
export interface IdMapEntry {
  /** `u` for user ids, `g` for group ids. */
  type: 'u' | 'g';
  /** First container id of the range. */
  container: number;
  /** First host id of the range. */
  host: number;
  /** Number of ids in the range (at least 1). */
  length: number;
}

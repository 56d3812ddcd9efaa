/**
 * Where a device's export is and what of it is dirty, for provider authors: the NBD URI of a
 * device's export ({@link nbdUriFor}) and the dirty regions of a bitmap on it
 * ({@link dirtyRegions}, {@link dirtyBytes}).
 *
 * @packageDocumentation
 */
import { NbdClient, NBD_STATE_DIRTY } from '../nbd/client.js';
import { nbdUnixUri } from '../vocabulary.js';

/**
 * The URI of a device's export as the runner sets it up: the export name is the device name.
 * @param deviceName - Device name (as handed to `backupNbd`).
 * @param nbdPath - Unix socket of the NBD server.
 */
export function nbdUriFor(deviceName: string, nbdPath: string): string {
  return nbdUnixUri(deviceName, nbdPath);
}

/**
 * Iterates a bitmap's dirty regions on an export, ascending, adjacent regions merged. Without a
 * bitmap, yields `[0, size]` once.
 *
 * @param uri - The export.
 * @param bitmapName - Bitmap (meta context `qemu:dirty-bitmap:<name>`), or `undefined`.
 */
export async function* dirtyRegions(uri: string, bitmapName: string | undefined): AsyncGenerator<[number, number]> {
  const context = bitmapName === undefined ? undefined : `qemu:dirty-bitmap:${bitmapName}`;
  const nbd = await NbdClient.connect(uri, { metaContexts: context ? [context] : [] });
  try {
    if (!context) {
      if (nbd.size > 0) yield [0, nbd.size];
      return;
    }
    const step = 1024 * 1024 * 1024;
    let pending: [number, number] | undefined;
    for (let off = 0; off < nbd.size; ) {
      const len = Math.min(step, nbd.size - off);
      const extents = await nbd.blockStatus(off, len, context);
      let covered = 0;
      for (const e of extents) {
        covered += e.length;
        if (!(e.flags & NBD_STATE_DIRTY)) continue;
        if (pending && pending[0] + pending[1] === e.offset) pending[1] += e.length;
        else {
          if (pending) yield pending;
          pending = [e.offset, e.length];
        }
      }
      if (covered === 0) break;
      off += covered;
    }
    if (pending) yield pending;
  } finally {
    await nbd.close().catch(() => undefined);
  }
}

/** Sum of the dirty bytes of a bitmap on an export (the whole size without a bitmap). */
export async function dirtyBytes(uri: string, bitmapName: string | undefined): Promise<number> {
  let n = 0;
  for await (const [, len] of dirtyRegions(uri, bitmapName)) n += len;
  return n;
}

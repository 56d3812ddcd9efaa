/**
 * The copy helper for provider authors: {@link backupNbdToFile} stores a device's snapshot as a
 * sparse raw image with the native core, incremental over the previous image in mode `reuse`.
 *
 * @packageDocumentation
 */
import { execFile } from 'node:child_process';
import { rename, rm } from 'node:fs/promises';
import { promisify } from 'node:util';

import { InvalidArgumentError } from '../errors.js';
import { copyExtents, type CopyProgress, type CopySummary } from '../nbd/copy.js';
import { NbdError } from '../nbd/errors.js';
import { isSnapshotExport } from '../nbd/snapshot-exports.js';
import type { BitmapMode } from '../vocabulary.js';
import { nbdUriFor } from './dirty-regions.js';

const execFileP = promisify(execFile);

/** Options of {@link backupNbdToFile}. */
export interface BackupNbdToFileOptions {
  /** The export URI; or give `nbdPath` and `deviceName`. */
  uri?: string;
  /** NBD server socket (as handed to `backupNbd`). */
  nbdPath?: string;
  /** Device name = export name (as handed to `backupNbd`). */
  deviceName?: string;
  /** Bitmap mode handed to `backupNbd`. */
  bitmapMode: BitmapMode;
  /** Bitmap name handed to `backupNbd` (used in mode `reuse`). */
  bitmapName?: string;
  /** The raw image to write (sparse). */
  path: string;
  /**
   * Mode `reuse`: the image of the previous backup of this device. It is copied (reflink when
   * the filesystem can, sparse otherwise) to `<path>.part`, the dirty extents are written over
   * the copy, and the copy is renamed to `path` only on success: a failed run never leaves a mix
   * of two points in time, and `previous` is never written (it may equal `path`).
   */
  previous?: string;
  /** Bytes per second (0 or absent: none). */
  bandwidthLimit?: number;
  /**
   * Discard on the export what has been written. Default: only when the export is the snapshot
   * export of a running backup that the job runner handed the provider (a fleecing snapshot,
   * where discard frees fleecing space); never on any other export, where TRIM destroys data.
   */
  discard?: boolean;
  onProgress?: (progress: CopyProgress) => void;
  signal?: AbortSignal;
}

/**
 * Stores a device's point-in-time data as a sparse raw image, for providers that keep raw images:
 * full in modes `none` and `new`, incremental over the previous image in mode `reuse`.
 *
 * @returns The copy summary of the native core.
 * @throws InvalidArgumentError when mode `reuse` comes without `previous` or a bitmap name.
 */
export async function backupNbdToFile(o: BackupNbdToFileOptions): Promise<CopySummary> {
  const uri = o.uri ?? (o.nbdPath && o.deviceName ? nbdUriFor(o.deviceName, o.nbdPath) : undefined);
  if (!uri) throw new InvalidArgumentError('backupNbdToFile needs uri, or nbdPath and deviceName');
  const common = {
    uri,
    path: o.path,
    // by default only on the snapshot export of a running backup: TRIM elsewhere destroys data
    discard: o.discard ?? isSnapshotExport(uri),
    // 0 or absent: no limit, as copyExtents takes it
    bandwidthLimit: o.bandwidthLimit,
    ...(o.onProgress ? { onProgress: o.onProgress } : {}),
    ...(o.signal ? { signal: o.signal } : {}),
  };
  if (o.bitmapMode !== 'reuse') return copyExtents(common);
  if (!o.bitmapName) throw new InvalidArgumentError('bitmap mode reuse needs the bitmap name');
  if (!o.previous) throw new InvalidArgumentError('bitmap mode reuse needs the previous image (option previous)');
  const part = `${o.path}.part`;
  try {
    await execFileP('cp', ['--reflink=auto', '--sparse=always', '--', o.previous, part]).catch((err: { stderr?: string; message: string }) => {
      throw new NbdError(`copying the previous image ${o.previous} failed: ${(err.stderr || err.message).trim()}`, { code: 'ERR_SINK', cause: err });
    });
    const summary = await copyExtents({ ...common, path: part, existing: true, bitmap: o.bitmapName });
    await rename(part, o.path);
    return summary;
  } catch (err) {
    await rm(part, { force: true });
    throw err;
  }
}

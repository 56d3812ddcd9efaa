/**
 * Content digests of a qcow2 image (one layer of a chain): computing them for an image written
 * without them, and checking an image against them. The qcow2 target of `copyExtents` records
 * them while it writes (option `digests`); format: `native/src/digests.rs`.
 *
 * For every 64 guest clusters that the image itself stores anything in, the digest file records
 * which clusters hold data and which are zero clusters, and the SHA-256 of the data clusters'
 * plain content. A check therefore catches corrupted data, a lost cluster and a cluster that
 * appeared, and names the image and the guest range of each.
 *
 * @packageDocumentation
 */
import { DirectoryStoreError } from './errors.js';
import { native } from '../native.js';
import { fromNative } from '../nbd/errors.js';

/** The digest file written for an image. */
export interface ImageDigests {
  /** `<image>.digests`. */
  digestsFile: string;
  /** SHA-256 (hex) of the digest file's bytes, for a manifest. */
  digestsSha256: string;
  /** Records in the file: blocks of 64 clusters the image stores anything in. */
  records: number;
}

/**
 * Translates a native error: a damaged digest file (`ERR_BACKUP_CORRUPT`) becomes a
 * {@link DirectoryStoreError} naming the file; the rest as for a copy (I/O errors are an
 * `NbdError` of code `ERR_SINK`, bad arguments an `InvalidArgumentError`).
 */
function translate(err: unknown, file: string): unknown {
  const e = fromNative(err);
  if (e instanceof Error && 'code' in e && e.code === 'ERR_BACKUP_CORRUPT') {
    return new DirectoryStoreError('ERR_BACKUP_CORRUPT', e.message, { file, cause: e });
  }
  return e;
}

/**
 * Reads a qcow2 image once (the image alone, not its backing chain) and writes its digests to
 * `<image>.digests` (mode 0600; `.part`, fsync, rename, folder fsync), replacing one there.
 * For images written without digests (or merged by `qemu-img rebase`/`commit`).
 *
 * @param image - Path of a qcow2 image.
 * @returns The digest file, its SHA-256 and its record count.
 * @throws `NbdError` `ERR_SINK` when the image cannot be read or is not a qcow2 image the core reads, or the file cannot be written.
 */
export async function digestImage(image: string): Promise<ImageDigests> {
  try {
    const r = await native.digestImage(image);
    return { digestsFile: r.digestsFile, digestsSha256: r.digestsSha256, records: r.records };
  } catch (err) {
    throw translate(err, image);
  }
}

/**
 * Checks a qcow2 image (the image alone, not its backing chain) against a digest file, reading
 * the image once.
 *
 * @param image - Path of a qcow2 image.
 * @param digestsFile - Its digest file (usually `<image>.digests`).
 * @returns The problems found, each naming the image and the guest byte range (`<image>: bytes
 *   A..B: content does not match its digest`); empty when the image matches.
 * @throws {@link DirectoryStoreError} `ERR_BACKUP_CORRUPT` (`file` = `digestsFile`) when the digest file itself is damaged or not one.
 * @throws `NbdError` `ERR_SINK` when a file cannot be read.
 */
export async function checkImageDigests(image: string, digestsFile: string): Promise<string[]> {
  try {
    return await native.checkImageDigests(image, digestsFile);
  } catch (err) {
    throw translate(err, digestsFile);
  }
}

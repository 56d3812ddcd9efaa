/**
 * Small files of a backup (`guest.conf.blob`, `firewall.conf.blob`, `backup.log.blob`) as chunk
 * objects (docs/chunk-store.md, "Chunk object"), encoded and checked by the native core (one
 * implementation of the format for chunks and blobs): compressed where that saves space,
 * encrypted with AES-256-GCM when the store has a key.
 *
 * @packageDocumentation
 */
import { native } from '../native.js';
import { ChunkBackupError, fromNative } from './errors.js';
import type { StoreKey } from './key.js';

/** Encodes `data` as a chunk object (encrypted when `key` is given). */
export function encodeBlob(data: Buffer, key: StoreKey | undefined): Buffer {
  try {
    return native.encodeBlob(data, key?.file);
  } catch (err) {
    throw fromNative(err);
  }
}

/**
 * Decodes and checks a blob: magic, flags, decryption (its tag), length and the digest of the
 * content. `name` (its key) and `volname` name it in errors.
 * @throws {@link ChunkBackupError} `ERR_BACKUP_CORRUPT`; {@link ChunkStoreError} `ERR_KEY_REQUIRED`.
 */
export function decodeBlob(object: Buffer, key: StoreKey | undefined, name: string, volname?: string): Buffer {
  try {
    return native.decodeBlob(object, key?.file, name);
  } catch (err) {
    const e = fromNative(err);
    if (e instanceof ChunkBackupError) throw new ChunkBackupError(e.code, e.message, { file: name, ...(volname ? { volname } : {}), cause: e });
    throw e;
  }
}

/**
 * Small files of a backup (`guest.conf.blob`, `firewall.conf.blob`, `backup.log.blob`) as chunk
 * objects (docs/chunk-store.md, "Chunk object"): the digest of the content in the header,
 * encrypted with AES-256-GCM (the 48 header bytes as additional data) when the store has a key.
 * Written uncompressed (the format compresses only where it saves space, and these are a few
 * KiB); a compressed blob, which this package does not write, is refused as unreadable.
 *
 * @packageDocumentation
 */
import { createCipheriv, createDecipheriv, createHash, createHmac, randomBytes } from 'node:crypto';

import { ChunkBackupError, ChunkStoreError } from './errors.js';
import type { StoreKey } from './key.js';

const MAGIC = Buffer.from('PBPCHK\x01\x00', 'latin1');
const HEADER = 48;
const NONCE = 12;
const TAG = 16;
const FLAG_COMPRESSED = 1;
const FLAG_ENCRYPTED = 2;
/** Largest plain length a chunk object holds (the format's u32; blobs are far smaller). */
const MAX_LENGTH = 0xffff_ffff;

/** The digest of plain content: SHA-256, or HMAC-SHA256 under the id key with a key. */
export function contentDigest(data: Buffer, key: StoreKey | undefined): Buffer {
  return key ? createHmac('sha256', key.idKey).update(data).digest() : createHash('sha256').update(data).digest();
}

/** Encodes `data` as a chunk object (encrypted when `key` is given). */
export function encodeBlob(data: Buffer, key: StoreKey | undefined): Buffer {
  if (data.length > MAX_LENGTH) throw new ChunkBackupError('ERR_PROVIDER_STATE', `a blob of ${data.length} bytes is too large`);
  const header = Buffer.alloc(HEADER);
  MAGIC.copy(header, 0);
  header[8] = key ? FLAG_ENCRYPTED : 0;
  header.writeUInt32LE(data.length, 12);
  contentDigest(data, key).copy(header, 16);
  if (!key) return Buffer.concat([header, data]);
  const nonce = randomBytes(NONCE);
  const cipher = createCipheriv('aes-256-gcm', key.encryptionKey, nonce);
  cipher.setAAD(header);
  const body = Buffer.concat([cipher.update(data), cipher.final()]);
  return Buffer.concat([header, nonce, body, cipher.getAuthTag()]);
}

/**
 * Decodes and checks a blob: magic, flags, decryption (its tag), length and the digest of the
 * content. `name` (its key) and `volname` name it in errors.
 * @throws {@link ChunkBackupError} `ERR_BACKUP_CORRUPT`; {@link ChunkStoreError} `ERR_KEY_REQUIRED`.
 */
export function decodeBlob(object: Buffer, key: StoreKey | undefined, name: string, volname?: string): Buffer {
  const corrupt = (why: string): ChunkBackupError => new ChunkBackupError('ERR_BACKUP_CORRUPT', `${name} is corrupted: ${why}`, { file: name, ...(volname ? { volname } : {}) });
  if (object.length < HEADER || !object.subarray(0, 8).equals(MAGIC)) throw corrupt('bad magic');
  const flags = object[8]!;
  if ((flags & ~(FLAG_COMPRESSED | FLAG_ENCRYPTED)) !== 0 || object[9] !== 0 || object[10] !== 0 || object[11] !== 0) throw corrupt('unknown flags');
  if (flags & FLAG_COMPRESSED) throw corrupt('compressed blobs are not read by this version');
  const length = object.readUInt32LE(12);
  const encrypted = (flags & FLAG_ENCRYPTED) !== 0;
  let plain: Buffer;
  if (encrypted && !key) throw new ChunkStoreError('ERR_KEY_REQUIRED', `${name} is encrypted: give the store's key file`);
  if (!encrypted && key) throw corrupt('not encrypted in a store with a key');
  if (encrypted) {
    if (object.length < HEADER + NONCE + TAG) throw corrupt('truncated');
    const nonce = object.subarray(HEADER, HEADER + NONCE);
    const decipher = createDecipheriv('aes-256-gcm', key!.encryptionKey, nonce);
    decipher.setAAD(object.subarray(0, HEADER));
    decipher.setAuthTag(object.subarray(object.length - TAG));
    try {
      plain = Buffer.concat([decipher.update(object.subarray(HEADER + NONCE, object.length - TAG)), decipher.final()]);
    } catch {
      throw corrupt('its authentication tag does not match (damaged, or written with another key)');
    }
  } else plain = object.subarray(HEADER);
  if (plain.length !== length) throw corrupt(`${plain.length} bytes, its header says ${length}`);
  if (!contentDigest(plain, key).equals(object.subarray(16, 48))) throw corrupt('its content does not match its digest');
  return plain;
}

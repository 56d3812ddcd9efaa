/**
 * A chunk store's key as the TypeScript side needs it (docs/chunk-store.md, "Digests and keys"):
 * the fingerprint checked against `store.json` and every manifest, the id key that signs
 * manifests, the encryption key of the small blobs (configs, log). The native core derives the
 * same keys from the same file for chunks and indexes.
 *
 * @packageDocumentation
 */
import { InvalidArgumentError } from '../errors.js';
import { native } from '../native.js';
import { ChunkStoreError, fromNative } from './errors.js';

/**
 * A store's key file, as the TypeScript side holds it: its path and fingerprint. Reading the
 * file, deriving its keys and every use of them (chunk and blob encryption, digests, manifest
 * signatures) is the native core's (`native/src/chunkstore/key.rs`), so that the format has one
 * implementation; no key material is held in JavaScript.
 */
export class StoreKey {
  /**
   * @param file - The key file.
   * @param fingerprint - Its key's fingerprint (first 16 hex digits of HMAC-SHA256(master, "pbp key fingerprint v1")).
   */
  constructor(
    readonly file: string,
    readonly fingerprint: string,
  ) {}

  /** HMAC-SHA256 of `data` under the id key, lower-case hex (a manifest's signature). */
  sign(data: string | Buffer): string {
    try {
      return native.keySign(this.file, Buffer.from(data));
    } catch (err) {
      throw fromNative(err);
    }
  }

  /** Never prints more than the fingerprint. */
  toJSON(): { fingerprint: string } {
    return { fingerprint: this.fingerprint };
  }
}

/**
 * Reads a key file (`{ "version": 1, "created": …, "key": "<base64 of 32 bytes>" }`).
 * @throws InvalidArgumentError when it cannot be read or is not a key file of version 1.
 */
export async function readKeyFile(file: string): Promise<StoreKey> {
  try {
    return new StoreKey(file, native.keyFingerprint(file));
  } catch (err) {
    const e = fromNative(err);
    throw e instanceof InvalidArgumentError ? e : new InvalidArgumentError(`cannot read key file ${file}: ${(e as Error).message}`, { cause: e });
  }
}

/**
 * Checks a key against a recorded fingerprint (`null`: not encrypted), before anything else is
 * read. `what` names the store or backup in the message.
 * @throws {@link ChunkStoreError} `ERR_KEY_REQUIRED`, `ERR_KEY_MISMATCH`.
 */
export function checkFingerprint(recorded: string | null, key: StoreKey | undefined, what: string): void {
  if (recorded === null && key === undefined) return;
  if (recorded !== null && key === undefined) throw new ChunkStoreError('ERR_KEY_REQUIRED', `${what} is encrypted (key fingerprint ${recorded}): give its key file`);
  if (recorded === null) throw new ChunkStoreError('ERR_KEY_MISMATCH', `${what} is not encrypted, but a key (fingerprint ${key!.fingerprint}) was given`);
  if (recorded !== key!.fingerprint) throw new ChunkStoreError('ERR_KEY_MISMATCH', `the key given (fingerprint ${key!.fingerprint}) is not the key of ${what} (fingerprint ${recorded})`);
}

/**
 * Creates a key file through the native core: 32 random bytes, mode 0600 whatever the umask,
 * never over an existing file (losing a key loses every backup made with it). Keep a copy
 * somewhere safe: it is never uploaded.
 * @returns The new key.
 * @throws InvalidArgumentError when the file exists or cannot be written.
 */
export async function createKeyFile(file: string): Promise<StoreKey> {
  try {
    return new StoreKey(file, native.createKeyFile(file));
  } catch (err) {
    throw fromNative(err);
  }
}

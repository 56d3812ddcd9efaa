/**
 * A chunk store's key as the TypeScript side needs it (docs/chunk-store.md, "Digests and keys"):
 * the fingerprint checked against `store.json` and every manifest, the id key that signs
 * manifests, the encryption key of the small blobs (configs, log). The native core derives the
 * same keys from the same file for chunks and indexes.
 *
 * @packageDocumentation
 */
import { createHmac } from 'node:crypto';
import { readFile } from 'node:fs/promises';

import { InvalidArgumentError } from '../errors.js';
import { native } from '../native.js';
import { ChunkStoreError, fromNative } from './errors.js';

/** Labels of the derivations (format v1; never change). */
const LABEL_ID = 'pbp chunk id v1';
const LABEL_ENCRYPTION = 'pbp chunk encryption v1';
const LABEL_FINGERPRINT = 'pbp key fingerprint v1';

const hmac = (key: Buffer, data: string | Buffer): Buffer => createHmac('sha256', key).update(data).digest();

/** The keys derived from a key file's master key. Never printed. */
export class StoreKey {
  /** First 16 hex digits of HMAC-SHA256(master, "pbp key fingerprint v1"). */
  readonly fingerprint: string;
  /** HMAC key of chunk digests and manifest signatures. */
  readonly idKey: Buffer;
  /** AES-256-GCM key of chunk and blob payloads. */
  readonly encryptionKey: Buffer;

  /** @param master - The 32-byte master key. */
  constructor(master: Buffer) {
    if (master.length !== 32) throw new InvalidArgumentError(`a store key is 32 bytes, not ${master.length}`);
    this.fingerprint = hmac(master, LABEL_FINGERPRINT).subarray(0, 8).toString('hex');
    this.idKey = hmac(master, LABEL_ID);
    this.encryptionKey = hmac(master, LABEL_ENCRYPTION);
  }

  /** HMAC-SHA256 under the id key, lower-case hex (a manifest's signature). */
  sign(data: string | Buffer): string {
    return hmac(this.idKey, data).toString('hex');
  }

  /** Never prints key material. */
  toJSON(): { fingerprint: string } {
    return { fingerprint: this.fingerprint };
  }
}

/**
 * Reads a key file (`{ "version": 1, "created": …, "key": "<base64 of 32 bytes>" }`).
 * @throws InvalidArgumentError when it cannot be read or is not a key file of version 1.
 */
export async function readKeyFile(file: string): Promise<StoreKey> {
  let o: { version?: unknown; key?: unknown };
  try {
    o = JSON.parse(await readFile(file, 'utf8')) as typeof o;
  } catch (err) {
    throw new InvalidArgumentError(`cannot read key file ${file}: ${(err as Error).message}`, { cause: err });
  }
  if (o?.version !== 1 || typeof o.key !== 'string') throw new InvalidArgumentError(`${file} is not a key file of version 1`);
  const master = Buffer.from(o.key, 'base64');
  if (master.length !== 32) throw new InvalidArgumentError(`${file}: its key is ${master.length} bytes, not 32`);
  return new StoreKey(master);
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
  let fingerprint: string;
  try {
    fingerprint = native.createKeyFile(file);
  } catch (err) {
    throw fromNative(err);
  }
  const key = await readKeyFile(file);
  if (key.fingerprint !== fingerprint) throw new InvalidArgumentError(`key file ${file}: the core and this module derive different fingerprints (${fingerprint}, ${key.fingerprint})`);
  return key;
}

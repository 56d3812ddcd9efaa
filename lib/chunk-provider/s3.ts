/**
 * The chunk store's object storage: an S3-compatible bucket under a prefix, through the native
 * core's S3 client (retries with backoff, typed errors), and how a store named by an
 * `s3://bucket/prefix` URL plus options becomes the client's options.
 *
 * @packageDocumentation
 */
import { readFile } from 'node:fs/promises';

import { InvalidArgumentError } from '../errors.js';
import { native, type Binding } from '../native.js';
import { fromNative } from './errors.js';

/** Where an S3 store is and how to reach it. */
export interface S3StoreOptions {
  /** `https://host[:port]`, or `http://…` with {@link S3StoreOptions.allowHttp}; absent: AWS S3 of `region`. */
  endpoint?: string;
  /** Region the requests are signed for (default `us-east-1`; Garage's default is `garage`). */
  region?: string;
  bucket: string;
  /** The store's objects live under `prefix/` (default: the bucket's root). */
  prefix?: string;
  /** `bucket.host` addressing instead of path-style `host/bucket` (the default, what self-hosted stores serve). */
  virtualHosted?: boolean;
  accessKeyId: string;
  secretAccessKey: string;
  /** Temporary credentials' session token. */
  sessionToken?: string;
  /** PEM file of certificate authorities to trust besides the system's (a self-signed endpoint). */
  caFile?: string;
  /**
   * Trust exactly the server certificate whose SHA-256 fingerprint this is, and nothing else
   * (not the system's CAs; not with {@link S3StoreOptions.caFile}): 32 hex bytes separated by
   * colons, as Proxmox VE pins a Proxmox Backup Server (storage option `fingerprint`) and as
   * `openssl x509 -noout -fingerprint -sha256 -in cert.pem` prints it. A self-signed
   * certificate with any name works. Another certificate fails with `ERR_STORE_CERTIFICATE`
   * naming the fingerprint the server presented, before any request is sent. Needs `https://`.
   */
  fingerprint?: string;
  /** Plain HTTP: required for an `http://` endpoint (requests are signed, but data travels in clear). */
  allowHttp?: boolean;
  /** No retry of a failing request starts after this long (ms, default 60 000); the error follows within one backoff and one request. */
  retryTimeoutMs?: number;
  /** Retries of one request at most (default 100: a backstop; {@link S3StoreOptions.retryTimeoutMs} is the bound that matters). */
  maxRetries?: number;
  /** First backoff between retries (ms, default 100), doubling with jitter up to {@link S3StoreOptions.maxBackoffMs}. */
  initBackoffMs?: number;
  /** Longest backoff between retries (ms, default 5000). */
  maxBackoffMs?: number;
  /** Longest one request may take (ms, default 120 000). */
  requestTimeoutMs?: number;
  /** Longest wait for a connection (ms, default 5000). */
  connectTimeoutMs?: number;
  /** The store's key file (encrypted stores), for backup and restore. */
  keyFile?: string;
}

/** One stored object. */
export interface StoredObject {
  /** Key relative to the store's prefix. */
  key: string;
  size: number;
  /** Last modification, Unix seconds, as the server reports it. */
  modified: number;
}

async function call<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw fromNative(err);
  }
}

/**
 * An S3 bucket under a prefix, object by object: what manifests, `store.json`, listing, pruning
 * and deletion use. Every key is relative to the prefix. Connection errors, 5xx and throttling
 * are retried with exponential backoff; then a `ChunkStoreError`: `ERR_STORE_UNAVAILABLE`,
 * `ERR_STORE_ACCESS` (credentials refused: the message says whether the key id is unknown or
 * the secret wrong), `ERR_STORE_NOT_FOUND` (no such bucket), `ERR_STORE_FULL` (quota),
 * `ERR_STORE_CERTIFICATE` (TLS refused the server's certificate: not the pinned one, or not
 * trusted), each naming the endpoint, the bucket and the key.
 */
export class S3ObjectStore {
  /** The options as the binding takes them (one native client per distinct options, cached). */
  private readonly inner: Binding.ChunkStoreOptions;

  /** @param options - Where the store is and how to reach it. */
  constructor(options: S3StoreOptions) {
    checkBucket(options.bucket);
    if (options.fingerprint !== undefined) checkFingerprint(options.fingerprint, options.caFile);
    this.inner = { ...options, prefix: normalisePrefix(options.prefix ?? '') };
  }

  /** The bucket. */
  get bucket(): string {
    return this.inner.bucket;
  }

  /** The prefix every key is under (no leading or trailing slash; may be empty). */
  get prefix(): string {
    return this.inner.prefix ?? '';
  }

  /** `s3://bucket/prefix`, for messages. */
  toString(): string {
    return `s3://${this.bucket}${this.prefix ? `/${this.prefix}` : ''}`;
  }

  /** Stores `data` under `key`, replacing what was there; resolves once the store acknowledged it. */
  put(key: string, data: Uint8Array): Promise<void> {
    const buffer = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    return call(() => native.chunkStorePut(this.inner, key, buffer));
  }

  /** The object's bytes, or null when there is no such object. */
  async get(key: string): Promise<Buffer | null> {
    return (await call(() => native.chunkStoreGet(this.inner, key))) ?? null;
  }

  /** The object's size and time, or null when there is no such object. */
  async head(key: string): Promise<StoredObject | null> {
    return (await call(() => native.chunkStoreHead(this.inner, key))) ?? null;
  }

  /** Every object whose key starts with `prefix` (a plain string prefix), in any order; all pages. */
  list(prefix: string): Promise<StoredObject[]> {
    return call(() => native.chunkStoreList(this.inner, prefix));
  }

  /**
   * Of the chunks a previous backup's index names (`digests`: 32 bytes each, concatenated), those
   * an incremental backup must not take as stored, concatenated the same way: the fossils among
   * them, by one listing of `fossils/` in the core (docs/chunk-store.md, "The check of the
   * previous index"). Call it after the backup's writer record is written.
   */
  missingChunks(digests: Buffer): Promise<Buffer> {
    return call(() => native.chunkStoreMissingChunks(this.inner, digests));
  }

  /** Removes the object; a missing object is not an error. */
  delete(key: string): Promise<void> {
    return call(() => native.chunkStoreDelete(this.inner, key));
  }

  /** Copies `from` to `to` on the store's side (S3 CopyObject), replacing `to`; false when there is no `from`. */
  copy(from: string, to: string): Promise<boolean> {
    return call(() => native.chunkStoreCopy(this.inner, from, to));
  }
}

/** Bucket names as S3 allows them (3 to 63 of lower-case letters, digits, dots, hyphens). */
function checkBucket(bucket: string): void {
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket) || bucket.includes('..')) {
    throw new InvalidArgumentError(`invalid S3 bucket name ${JSON.stringify(bucket)}: 3 to 63 lower-case letters, digits, dots and hyphens`);
  }
}

/** A certificate's SHA-256 as Proxmox VE writes it (pve-common `fingerprint-sha256`). */
const FINGERPRINT = /^(?:[0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}$/;

function checkFingerprint(fingerprint: string, caFile: string | undefined): void {
  if (!FINGERPRINT.test(fingerprint)) {
    throw new InvalidArgumentError(`invalid certificate fingerprint ${JSON.stringify(fingerprint)}: a SHA-256 fingerprint is 32 hex bytes separated by colons (AB:CD:…)`);
  }
  if (caFile !== undefined) {
    throw new InvalidArgumentError('give a CA file or a certificate fingerprint, not both: a fingerprint trusts exactly one certificate');
  }
}

function normalisePrefix(prefix: string): string {
  const trimmed = prefix.replace(/^\/+|\/+$/g, '');
  if (trimmed === '') return '';
  for (const segment of trimmed.split('/')) {
    if (segment === '' || segment === '.' || segment === '..') {
      throw new InvalidArgumentError(`invalid S3 prefix ${JSON.stringify(prefix)}: empty, "." or ".." segment`);
    }
  }
  return trimmed;
}

/** Bucket and prefix of an `s3://bucket/prefix` URL. */
export interface S3Location {
  bucket: string;
  /** No leading or trailing slash; empty for the bucket's root. */
  prefix: string;
}

/** True for a store named by an `s3://` URL rather than by a folder. */
export function isS3Url(store: string): boolean {
  return store.startsWith('s3://');
}

/**
 * Parses `s3://bucket[/prefix…]`.
 * @throws InvalidArgumentError for another scheme, a bad bucket name or a bad prefix.
 */
export function parseS3Url(url: string): S3Location {
  const match = /^s3:\/\/([^/?#]+)(?:\/([^?#]*))?$/.exec(url);
  if (!match) throw new InvalidArgumentError(`not an S3 store URL: ${JSON.stringify(url)} (expected s3://bucket/prefix)`);
  const bucket = match[1]!;
  checkBucket(bucket);
  return { bucket, prefix: normalisePrefix(match[2] ?? '') };
}

/** Credentials of an S3 store. */
export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

/**
 * Reads credentials from a file in the AWS shared credentials format (`[profile]` sections of
 * `aws_access_key_id`, `aws_secret_access_key`, optional `aws_session_token`).
 * @param path - The file.
 * @param profile - Its section (default `default`).
 * @throws InvalidArgumentError when the file cannot be read or lacks the profile's keys.
 */
export async function readCredentialsFile(path: string, profile = 'default'): Promise<S3Credentials> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new InvalidArgumentError(`cannot read S3 credentials file ${path}: ${(err as Error).message}`, { cause: err });
  }
  let section: string | null = null;
  const values = new Map<string, string>();
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const header = /^\[\s*(?:profile\s+)?([^\]]+?)\s*\]$/.exec(line);
    if (header) {
      section = header[1]!;
      continue;
    }
    const kv = /^([A-Za-z0-9_]+)\s*=\s*(.*)$/.exec(line);
    if (kv && section === profile) values.set(kv[1]!.toLowerCase(), kv[2]!.trim());
  }
  const accessKeyId = values.get('aws_access_key_id');
  const secretAccessKey = values.get('aws_secret_access_key');
  if (!accessKeyId || !secretAccessKey) {
    throw new InvalidArgumentError(`S3 credentials file ${path} has no aws_access_key_id and aws_secret_access_key in profile [${profile}]`);
  }
  const sessionToken = values.get('aws_session_token');
  return { accessKeyId, secretAccessKey, ...(sessionToken ? { sessionToken } : {}) };
}

/** How to reach a store named by an `s3://` URL (the command line's options). */
export interface S3UrlOptions extends Omit<S3StoreOptions, 'bucket' | 'prefix' | 'accessKeyId' | 'secretAccessKey' | 'sessionToken'> {
  /** A credentials file (AWS shared format); without it, the environment's `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`. */
  credentialsFile?: string;
  /** Profile of the credentials file (default `AWS_PROFILE`, else `default`). */
  profile?: string;
  /** The environment to read credentials from (default `process.env`). */
  env?: NodeJS.ProcessEnv;
}

/**
 * The options of the store an `s3://bucket/prefix` URL names: bucket and prefix from the URL,
 * credentials from the file given, else from the environment; endpoint and region as given, else
 * from the environment as the AWS tools read them (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`,
 * `AWS_REGION`, `AWS_DEFAULT_REGION`).
 * @throws InvalidArgumentError for a bad URL, or when no credentials are found.
 */
export async function s3StoreOptions(url: string, options: S3UrlOptions = {}): Promise<S3StoreOptions> {
  const { credentialsFile, profile, env = process.env, ...rest } = options;
  const location = parseS3Url(url);
  let credentials: S3Credentials;
  if (credentialsFile !== undefined) {
    credentials = await readCredentialsFile(credentialsFile, profile ?? env['AWS_PROFILE'] ?? 'default');
  } else {
    const accessKeyId = env['AWS_ACCESS_KEY_ID'];
    const secretAccessKey = env['AWS_SECRET_ACCESS_KEY'];
    if (!accessKeyId || !secretAccessKey) {
      throw new InvalidArgumentError(
        `no credentials for ${url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give a credentials file`,
      );
    }
    const sessionToken = env['AWS_SESSION_TOKEN'];
    credentials = { accessKeyId, secretAccessKey, ...(sessionToken ? { sessionToken } : {}) };
  }
  const endpoint = rest.endpoint ?? env['AWS_ENDPOINT_URL_S3'] ?? env['AWS_ENDPOINT_URL'];
  const region = rest.region ?? env['AWS_REGION'] ?? env['AWS_DEFAULT_REGION'];
  return {
    ...rest,
    ...(endpoint !== undefined && endpoint !== '' ? { endpoint } : {}),
    ...(region !== undefined && region !== '' ? { region } : {}),
    ...location,
    ...credentials,
  };
}

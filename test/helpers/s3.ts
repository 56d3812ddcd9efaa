/**
 * A minimal S3 client for tests: one signed request (AWS Signature Version 4, path-style URLs)
 * over Node's fetch, with the error code of an S3 error body read out. Enough to check that a
 * store answers as S3 does; the chunk store itself uses its own client library.
 */
import { createHash, createHmac } from 'node:crypto';

/** Where and as whom to send requests. */
export interface S3Target {
  /** `http://HOST:PORT`, no trailing slash */
  endpoint: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
}

/** One S3 answer; `code` is the `<Code>` of an error body (`NoSuchBucket`, `AccessDenied`...). */
export interface S3Response {
  status: number;
  headers: Headers;
  body: Buffer;
  code?: string;
}

export interface S3RequestOptions {
  query?: Record<string, string>;
  body?: Uint8Array<ArrayBuffer>;
  signal?: AbortSignal;
}

/** RFC 3986 encoding, as SigV4 wants it (encodeURIComponent leaves `!'()*` alone). */
function encode(s: string): string {
  return encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}

const sha256 = (data: Uint8Array | string): string => createHash('sha256').update(data).digest('hex');
const hmac = (key: Uint8Array | string, data: string): Buffer => createHmac('sha256', key).update(data).digest();

/**
 * Sends one signed request. `path` is `/bucket` or `/bucket/key` (the key unencoded); the payload
 * is signed with its SHA-256. A connection failure rejects (fetch's `TypeError`, with the
 * socket error as `cause`); any HTTP answer resolves, errors included.
 */
export async function s3Request(target: S3Target, method: string, path: string, options: S3RequestOptions = {}): Promise<S3Response> {
  const url = new URL(target.endpoint);
  const canonicalUri = path.split('/').map(encode).join('/');
  const query = Object.entries(options.query ?? {})
    .map(([k, v]) => `${encode(k)}=${encode(v)}`)
    .sort()
    .join('&');
  const body = options.body ?? new Uint8Array();
  const payloadHash = sha256(body);
  const amzDate = new Date().toISOString().replace(/[-:]/g, '').replace(/\.\d{3}/, '');
  const day = amzDate.slice(0, 8);
  const headers: Record<string, string> = { host: url.host, 'x-amz-content-sha256': payloadHash, 'x-amz-date': amzDate };
  const signedHeaders = Object.keys(headers).sort();
  const canonicalRequest = [
    method,
    canonicalUri,
    query,
    ...signedHeaders.map((h) => `${h}:${headers[h]}`),
    '',
    signedHeaders.join(';'),
    payloadHash,
  ].join('\n');
  const scope = `${day}/${target.region}/s3/aws4_request`;
  const stringToSign = ['AWS4-HMAC-SHA256', amzDate, scope, sha256(canonicalRequest)].join('\n');
  let key = hmac(`AWS4${target.secretAccessKey}`, day);
  for (const part of [target.region, 's3', 'aws4_request']) key = hmac(key, part);
  const signature = createHmac('sha256', key).update(stringToSign).digest('hex');
  headers['authorization'] =
    `AWS4-HMAC-SHA256 Credential=${target.accessKeyId}/${scope}, SignedHeaders=${signedHeaders.join(';')}, Signature=${signature}`;
  delete headers['host']; // fetch sets it from the URL, to the same value

  const res = await fetch(`${target.endpoint}${canonicalUri}${query ? `?${query}` : ''}`, {
    method,
    headers,
    body: method === 'GET' || method === 'HEAD' ? undefined : body,
    signal: options.signal ?? AbortSignal.timeout(30_000),
  });
  const data = Buffer.from(await res.arrayBuffer());
  const code = res.ok ? undefined : /<Code>([^<]*)<\/Code>/.exec(data.toString('utf8'))?.[1];
  return { status: res.status, headers: res.headers, body: data, ...(code === undefined ? {} : { code }) };
}

/** The keys of a ListObjectsV2 answer body (one page). */
export function listedKeys(res: S3Response): string[] {
  return [...res.body.toString('utf8').matchAll(/<Key>([^<]*)<\/Key>/g)].map((m) => m[1]!);
}

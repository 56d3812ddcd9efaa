/**
 * The chunk store over TLS with a pinned certificate fingerprint (Proxmox VE's `fingerprint`, as
 * for a Proxmox Backup Server), against a real Garage cluster behind a real TLS endpoint
 * (helpers/tls-proxy.ts: a self-signed certificate made by openssl, under another name than the
 * endpoint's). The right fingerprint: objects round-trip, and a VM backup through the provider's
 * storage option restores byte-exact. A wrong one: `ERR_STORE_CERTIFICATE` naming the endpoint
 * and the fingerprint the server presented, after one refused handshake (no retry) and before
 * any request reached the store. Without pin or CA the self-signed certificate is refused; a CA
 * file still works. The command line's `--fingerprint` end to end (`key create`, `backup`,
 * `list`, `restore`). Option checks without the cluster.
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { ChunkStoreError } from '../lib/chunk-provider/errors.js';
import { ChunkProvider } from '../lib/chunk-provider/provider.js';
import { S3ObjectStore, type S3StoreOptions } from '../lib/chunk-provider/s3.js';
import { InvalidArgumentError } from '../lib/errors.js';
import { restoreVm, runBackupJob } from '../lib/index.js';
import { startDisk, vmGuest } from './helpers/directory.js';
import { createImage, expectSameBytes, qemuIo, rawContent } from './helpers/images.js';
import { stopAll } from './helpers/qemu.js';
import { startS3Cluster, type S3Cluster } from './helpers/s3-cluster.js';
import { startTlsProxy, type TlsProxy } from './helpers/tls-proxy.js';

const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');
const MiB = 2 ** 20;
/** A well-formed fingerprint no certificate here has. */
const WRONG = Array.from({ length: 32 }, (_, i) => (i * 7 + 1).toString(16).padStart(2, '0').toUpperCase()).join(':');

async function rejection(p: Promise<unknown>): Promise<ChunkStoreError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, 'the call should have failed').toBeInstanceOf(ChunkStoreError);
  return err as ChunkStoreError;
}

describe('chunk store over TLS with a pinned certificate (Garage behind a TLS endpoint)', { timeout: 180_000 }, () => {
  let cluster: S3Cluster;
  let selfSigned: TlsProxy;
  let caSigned: TlsProxy;
  /** Options of the store behind the self-signed endpoint, without pin or CA. */
  let base: S3StoreOptions;
  let scratch: string;

  beforeAll(async () => {
    cluster = await startS3Cluster();
    // not tempDir(): stopAll() after each test removes those
    scratch = await mkdtemp(path.join(tmpdir(), 'pbp-tls-'));
    await mkdir(path.join(scratch, 'self'));
    await mkdir(path.join(scratch, 'ca'));
    selfSigned = await startTlsProxy(cluster.endpoint, path.join(scratch, 'self'), 'self-signed');
    caSigned = await startTlsProxy(cluster.endpoint, path.join(scratch, 'ca'), 'ca');
    base = {
      endpoint: selfSigned.endpoint,
      region: cluster.region,
      bucket: cluster.bucket,
      accessKeyId: cluster.accessKeyId,
      secretAccessKey: cluster.secretAccessKey,
    };
  }, 120_000);
  afterEach(async () => {
    await stopAll();
  });
  afterAll(async () => {
    await selfSigned?.close();
    await caSigned?.close();
    await cluster?.stop();
    if (scratch) await rm(scratch, { recursive: true, force: true });
  });

  it('the right fingerprint: put, get, head, list, delete over TLS to a self-signed certificate of another name', async () => {
    const store = new S3ObjectStore({ ...base, prefix: 'pinned', fingerprint: selfSigned.fingerprint });
    await store.put('a/x', Buffer.from('over pinned tls'));
    expect((await store.get('a/x'))?.toString()).toBe('over pinned tls');
    expect(await store.head('a/x')).toMatchObject({ key: 'a/x', size: 15 });
    expect((await store.list('a/')).map((o) => o.key)).toEqual(['a/x']);
    // PVE accepts either case
    const lower = new S3ObjectStore({ ...base, prefix: 'pinned', fingerprint: selfSigned.fingerprint.toLowerCase() });
    expect((await lower.get('a/x'))?.toString()).toBe('over pinned tls');
    await store.delete('a/x');
    expect(await store.get('a/x')).toBeNull();
  });

  it('a wrong fingerprint: ERR_STORE_CERTIFICATE naming the endpoint and the presented fingerprint, one handshake, nothing reaches the store', async () => {
    const connections = selfSigned.connections;
    const forwarded = selfSigned.forwarded;
    // a long retry window: the mismatch must not be retried
    const store = new S3ObjectStore({ ...base, prefix: 'pinned', fingerprint: WRONG, retryTimeoutMs: 120_000 });
    const err = await rejection(store.put('b/x', Buffer.from('must not arrive')));
    expect(err.code).toBe('ERR_STORE_CERTIFICATE');
    expect(err.message).toContain(`${selfSigned.endpoint} bucket ${cluster.bucket}`);
    expect(err.message).toContain(selfSigned.fingerprint);
    expect(err.message).toContain(WRONG);
    expect(selfSigned.connections - connections).toBe(1);
    expect(selfSigned.forwarded - forwarded).toBe(0);
    // the certificate of another endpoint (CA-signed) is not the pinned one either
    const other = new S3ObjectStore({ ...base, endpoint: caSigned.endpoint, prefix: 'pinned', fingerprint: selfSigned.fingerprint });
    expect((await rejection(other.get('b/x'))).message).toContain(caSigned.fingerprint);
    expect(await new S3ObjectStore({ ...base, prefix: 'pinned', fingerprint: selfSigned.fingerprint }).get('b/x')).toBeNull();
  });

  it('without a pin or a CA the self-signed certificate is refused; a CA file still works', async () => {
    const err = await rejection(new S3ObjectStore({ ...base, prefix: 'pinned', retryTimeoutMs: 500 }).get('c/x'));
    expect(err.code).toBe('ERR_STORE_CERTIFICATE');
    expect(err.message).toMatch(/certificate is not trusted/);
    expect(err.message).toContain(`${selfSigned.endpoint} bucket ${cluster.bucket}`);
    const trusted = new S3ObjectStore({ ...base, endpoint: caSigned.endpoint, prefix: 'pinned', caFile: caSigned.caFile! });
    await trusted.put('c/x', Buffer.from('over tls'));
    expect((await trusted.get('c/x'))?.toString()).toBe('over tls');
  });

  it('a VM backup through the storage option fingerprint, restored byte-exact; a wrong one fails the job before any guest', async () => {
    const credentials = path.join(scratch, 'credentials');
    await writeFile(credentials, `[default]\naws_access_key_id = ${cluster.accessKeyId}\naws_secret_access_key = ${cluster.secretAccessKey}\n`, { mode: 0o600 });
    const scfg = (fingerprint: string) => ({
      store: `s3://${cluster.bucket}/provider`,
      endpoint: selfSigned.endpoint,
      region: cluster.region,
      'credentials-file': credentials,
      fingerprint,
    });
    const stateDir = path.join(scratch, 'state');
    const provider = (fingerprint: string) => new ChunkProvider({ storeid: 'chunks', scfg: scfg(fingerprint), log: () => {} }, { stateDir });

    const disk = await startDisk(16 * MiB);
    await disk.write(0x5a, 0, 4 * MiB);
    await disk.write(0xa5, 12 * MiB, 1 * MiB);
    const content = disk.snapshot();
    const r = await runBackupJob({ provider: provider(selfSigned.fingerprint), storeid: 'chunks', guests: [vmGuest(disk)], tmpdir: scratch });
    expect(r.guests[0]!.error).toBeUndefined();
    const volname = r.guests[0]!.volname!;
    const target = path.join(scratch, 'restored.raw');
    await restoreVm({ provider: provider(selfSigned.fingerprint), volname, storeid: 'chunks', targets: { disk0: target } });
    expectSameBytes(await readFile(target), content, volname);

    const failed = await runBackupJob({ provider: provider(WRONG), storeid: 'chunks', guests: [vmGuest(disk)], tmpdir: scratch }).then(
      () => undefined,
      (e: unknown) => e,
    );
    // jobInit opens the store: the job is aborted before any guest, with the store's error as cause
    expect(failed).toMatchObject({ code: 'ERR_JOB_ABORTED', cause: { code: 'ERR_STORE_CERTIFICATE' } });
    expect((failed as Error).message).toContain(selfSigned.fingerprint);
  });

  it('the command line: --fingerprint for key create, backup, list and restore; a wrong one fails naming the presented one; not for a folder', async () => {
    const env = { ...process.env, AWS_ACCESS_KEY_ID: cluster.accessKeyId, AWS_SECRET_ACCESS_KEY: cluster.secretAccessKey };
    // not spawnSync: the TLS endpoint runs in this process
    const run = (...args: string[]) =>
      new Promise<{ status: number; stdout: string; stderr: string }>((resolve) => {
        execFile('node', [CLI, ...args], { env, encoding: 'utf8' }, (err, stdout, stderr) => {
          resolve({ status: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr });
        });
      });
    const url = `s3://${cluster.bucket}/cli`;
    const s3 = ['--store', url, '--endpoint', selfSigned.endpoint, '--region', cluster.region];
    const pin = ['--fingerprint', selfSigned.fingerprint];
    const keyFile = path.join(scratch, 'cli.key');

    const created = await run('key', 'create', keyFile, ...s3, ...pin, '--json');
    expect(created.status, created.stderr).toBe(0);
    expect(JSON.parse(created.stdout)).toMatchObject({ keyFile, store: url });

    const image = path.join(scratch, 'cli-disk0.qcow2');
    createImage(image, '8M', 'qcow2');
    qemuIo(image, 'qcow2', ['write -P 0x42 2M 2M']);
    const content = rawContent(image, 'qcow2', path.join(scratch, 'cli-disk0.raw'));
    const backup = await run('backup', ...s3, ...pin, '--key-file', keyFile, '--vmid', '100', '--disk', `disk0=${image}`, '--json');
    expect(backup.status, backup.stderr).toBe(0);
    const list = await run('list', ...s3, ...pin, '--json');
    expect(list.status, list.stderr).toBe(0);
    const [listed] = JSON.parse(list.stdout) as { volid: string }[];
    expect(listed?.volid).toMatch(/^chunks:backup\/100\/qemu-\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}$/);
    const to = path.join(scratch, 'cli-restore');
    const restore = await run('restore', listed!.volid, ...s3, ...pin, '--key-file', keyFile, '--to', to);
    expect(restore.status, restore.stderr).toBe(0);
    expectSameBytes(await readFile(path.join(to, 'disk0.raw')), content, listed!.volid);

    const wrong = await run('list', ...s3, '--fingerprint', WRONG);
    expect(wrong.status).not.toBe(0);
    expect(wrong.stderr).toContain('[ERR_STORE_CERTIFICATE]');
    expect(wrong.stderr).toContain(selfSigned.fingerprint);
    const malformed = await run('list', ...s3, '--fingerprint', 'AB:CD');
    expect(malformed.status).not.toBe(0);
    expect(malformed.stderr).toContain('[ERR_INVALID_ARGUMENT]');
    const folder = await run('list', '--store', scratch, '--fingerprint', selfSigned.fingerprint);
    expect(folder.status).toBe(2);
    expect(folder.stderr).toMatch(/--fingerprint is for s3:\/\/ stores/);
  });
});

describe('pinned fingerprint options (no cluster)', () => {
  const options = { bucket: 'bucket', accessKeyId: 'a', secretAccessKey: 's', endpoint: 'https://127.0.0.1:1' };

  it('refuses a fingerprint not in the PVE format, with a CA file, or with plain http', async () => {
    for (const bad of ['', 'AB:CD', WRONG.replace(/:/g, ''), `${WRONG}:00`, WRONG.replace(/^../, 'GG'), WRONG.replace(/:/, '-')]) {
      expect(() => new S3ObjectStore({ ...options, fingerprint: bad }), bad).toThrow(InvalidArgumentError);
    }
    expect(() => new S3ObjectStore({ ...options, fingerprint: WRONG, caFile: '/etc/ssl/certs/ca-certificates.crt' })).toThrow(/not both/);
    const http = await new S3ObjectStore({ ...options, endpoint: 'http://127.0.0.1:1', allowHttp: true, fingerprint: WRONG })
      .get('k')
      .catch((e: unknown) => e);
    expect(http).toBeInstanceOf(InvalidArgumentError);
    expect((http as Error).message).toMatch(/needs https/);
  });
});

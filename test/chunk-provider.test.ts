/**
 * The chunk provider and its store against a real distributed S3 store (a three-node Garage
 * cluster, replication factor 3): `store.json` and its version, manifests checked on every read
 * (checksum; signature with a key), list (a backup without manifest does not exist), notes and
 * protected objects, prune (keep-last; protected kept; manifests and indexes go, chunks stay),
 * delete, keys (the right key reads, another fails with ERR_KEY_MISMATCH, none with
 * ERR_KEY_REQUIRED, before anything of the backup is read; blobs are encrypted), the provider's
 * backup flow (manifest last, counters, the task log, incremental through the bitmap ledger,
 * cleanup of a failed backup) with a stand-in for the native chunk job, and the command line
 * on an s3:// URL.
 */
import { spawnSync } from 'node:child_process';
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { ChunkBackupError, ChunkStoreError } from '../lib/chunk-provider/errors.js';
import type { ChunkDiskBackup, ChunkDiskRestore, ChunkJobs } from '../lib/chunk-provider/jobs.js';
import { decodeBlob, encodeBlob } from '../lib/chunk-provider/blob.js';
import { createKeyFile, readKeyFile } from '../lib/chunk-provider/key.js';
import { ChunkProvider } from '../lib/chunk-provider/provider.js';
import { S3ObjectStore, type S3StoreOptions } from '../lib/chunk-provider/s3.js';
import { ChunkStore, chunkKey, type UnsignedManifest } from '../lib/chunk-provider/store.js';
import { DirectoryStoreError } from '../lib/directory-provider/errors.js';
import type { LogFunction } from '../lib/provider/api.js';
import { startS3Cluster, type S3Cluster } from './helpers/s3-cluster.js';

const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');

/** The rejection of `p`, failing the test if it resolves. */
async function rejection(p: Promise<unknown>): Promise<{ code?: string; message: string; file?: string }> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, 'the call should have failed').toBeInstanceOf(Error);
  return err as { code?: string; message: string; file?: string };
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** A fixed index (docs/chunk-store.md) of a disk of `size` bytes naming `digests`. */
function encodeFidx(size: number, chunkSize: number, digests: Buffer[]): Buffer {
  const head = Buffer.alloc(24);
  head.write('PBPFIDX\x01', 0, 'latin1');
  head.writeBigUInt64LE(BigInt(size), 8);
  head.writeUInt32LE(chunkSize, 16);
  const body = Buffer.concat([head, ...digests]);
  return Buffer.concat([body, createHash('sha256').update(body).digest()]);
}

describe('chunk store keys and blobs (no store)', () => {
  /** A key file holding `master`, as `key create` writes it. */
  function keyFile(master: Buffer): string {
    const dir = mkdtempSync(path.join(tmpdir(), 'pbp-key-'));
    const file = path.join(dir, 'key.json');
    writeFileSync(file, JSON.stringify({ version: 1, created: 0, key: master.toString('base64') }), { mode: 0o600 });
    return file;
  }

  it('uses the keys docs/chunk-store.md derives (the core\'s fixed vector: master = bytes 0x00..0x1f)', async () => {
    const k = await readKeyFile(keyFile(Buffer.from(Array.from({ length: 32 }, (_, i) => i))));
    expect(k.fingerprint).toBe('c35d8e65bdf05594');
    // a manifest's signature: HMAC-SHA256 under the id key (HMAC-SHA256(master, "pbp chunk id v1"))
    const idKey = Buffer.from('1930f83cefd3d702a8c33befd748edf1c7768ed07ce7244c07d75181ae33068c', 'hex');
    expect(k.sign('hello')).toBe(createHmac('sha256', idKey).update('hello').digest('hex'));
    expect(JSON.stringify(k)).toBe('{"fingerprint":"c35d8e65bdf05594"}'); // never key material
  });

  it('blobs round-trip, encrypted with a key; any flipped byte, another key or none is a typed error, never data', async () => {
    const key = await readKeyFile(keyFile(randomBytes(32)));
    const data = Buffer.from('name: vm100\nmemory: 2048\n');
    expect(decodeBlob(encodeBlob(data, undefined), undefined, 'b').equals(data)).toBe(true);
    const sealed = encodeBlob(data, key);
    expect(sealed.includes(data)).toBe(false);
    expect(decodeBlob(sealed, key, 'b').equals(data)).toBe(true);
    for (let i = 0; i < sealed.length; i += 7) {
      const bad = Buffer.from(sealed);
      bad[i]! ^= 0x01;
      expect(() => decodeBlob(bad, key, 'backups/1/x/guest.conf.blob'), `byte ${i}`).toThrow(ChunkBackupError);
    }
    const other = await readKeyFile(keyFile(randomBytes(32)));
    expect(() => decodeBlob(sealed, other, 'b')).toThrow(/authentication failed/);
    expect(() => decodeBlob(sealed, undefined, 'b')).toThrow(ChunkStoreError);
    expect(() => decodeBlob(encodeBlob(data, undefined), key, 'b')).toThrow(/not encrypted in a store with a key/);
    const plain = encodeBlob(data, undefined);
    plain[plain.length - 1]! ^= 1;
    expect(() => decodeBlob(plain, undefined, 'b')).toThrow(/does not match its digest/);
    // a large log compresses: the one encoder of chunks and blobs compresses where it saves space
    const log = Buffer.from('INFO: a task log line\n'.repeat(10_000));
    expect(encodeBlob(log, undefined).length).toBeLessThan(log.length / 10);
    expect(decodeBlob(encodeBlob(log, key), key, 'l').equals(log)).toBe(true);
  });
});

describe('chunk provider on S3 (Garage, 3 nodes, replication factor 3)', { timeout: 180_000 }, () => {
  let cluster: S3Cluster;
  let base: S3StoreOptions;
  let dir: string;
  let n = 0;
  /** A store under a fresh prefix. */
  const fresh = (extra: Partial<S3StoreOptions> = {}): S3StoreOptions => ({ ...base, prefix: `t${++n}/store`, ...extra });

  beforeAll(async () => {
    cluster = await startS3Cluster();
    base = {
      endpoint: cluster.endpoint,
      region: cluster.region,
      bucket: cluster.bucket,
      accessKeyId: cluster.accessKeyId,
      secretAccessKey: cluster.secretAccessKey,
      allowHttp: true,
    };
    dir = mkdtempSync(path.join(tmpdir(), 'pbp-chunk-provider-'));
  }, 120_000);
  afterAll(async () => {
    await cluster?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** A manifest of one VM disk whose index object is `index`. */
  async function putBackup(store: ChunkStore, volname: string, ctime: number, index = encodeFidx(1 << 30, 4 << 20, Array.from({ length: 256 }, () => Buffer.alloc(32)))): Promise<void> {
    await store.objects.put(store.objectKey(volname, 'drive-scsi0.fidx'), index);
    const conf = await store.putBlob(volname, 'guest.conf.blob', Buffer.from(`name: ${volname}\n`));
    const p = store.parseVolname(volname);
    const m: UnsignedManifest = {
      format: 'pve-backup-provider/chunks',
      version: 1,
      volname,
      vmid: p.vmid,
      vmtype: p.vmtype,
      ctime,
      status: 'ok',
      keyFingerprint: store.key?.fingerprint ?? null,
      devices: { 'drive-scsi0': { index: 'drive-scsi0.fidx', size: 1 << 30, bitmapMode: 'new', bytesRead: 0, chunksUploaded: 1, chunksReused: 0, chunksZero: 255 } },
      archive: null,
      files: { 'drive-scsi0.fidx': { size: index.length, sha256: sha(index) }, 'guest.conf.blob': conf },
    };
    await store.writeManifest(m);
  }

  it('creates store.json on first use and refuses a store of a newer version', async () => {
    const o = fresh();
    const store = await ChunkStore.open(o);
    expect(store.exists).toBe(false);
    expect(await store.listBackups()).toEqual([]);
    await store.ensureCreated();
    const objects = new S3ObjectStore(o);
    const d = JSON.parse((await objects.get('store.json'))!.toString()) as Record<string, unknown>;
    expect(d).toMatchObject({ format: 'pve-backup-provider/chunks', version: 1, chunkSize: 4194304, encryption: null });
    expect((await ChunkStore.open(o)).exists).toBe(true);
    await objects.put('store.json', Buffer.from(JSON.stringify({ ...d, version: 2 })));
    const err = await rejection(ChunkStore.open(o));
    expect(err).toBeInstanceOf(ChunkBackupError);
    expect(err).toBeInstanceOf(DirectoryStoreError); // one catch for both stores' backup codes
    expect(err.code).toBe('ERR_BACKUP_VERSION');
    expect(err.message).toMatch(/version 2; this version reads up to 1/);
  });

  it('lists backups with a manifest only; checks every manifest read; notes, protected, delete', async () => {
    const store = await ChunkStore.open(fresh(), { storeid: 's3store' });
    await store.ensureCreated();
    const a = 'backup/100/qemu-2026_11_01-02_00_00';
    const b = 'backup/100/qemu-2026_11_02-02_00_00';
    const c = 'backup/101/qemu-2026_11_02-03_00_00';
    await putBackup(store, a, 1_793_500_000);
    await putBackup(store, b, 1_793_600_000);
    await putBackup(store, c, 1_793_610_000);
    // a backup whose manifest was never written (failed, or running) does not exist
    await store.objects.put('backups/100/qemu-2026_11_03-02_00_00/drive-scsi0.fidx', randomBytes(10));
    const list = await store.listBackups();
    expect(list.map((x) => x.volid)).toEqual([`s3store:${a}`, `s3store:${b}`, `s3store:${c}`]);
    expect(list[0]).toMatchObject({ vmid: 100, subtype: 'qemu', ctime: 1_793_500_000, size: 1 << 30, status: 'ok', protected: false });
    expect((await store.listBackups(101)).map((x) => x.volname)).toEqual([c]);
    expect((await rejection(store.readManifest('backup/100/qemu-2026_11_03-02_00_00'))).code).toBe('ERR_UNKNOWN_VOLUME');

    await store.setNotes(b, 'before the upgrade');
    await store.setProtected(b, true);
    expect(await store.attributes(b)).toEqual({ protected: true, notes: 'before the upgrade' });
    expect((await store.listBackups(100))[1]).toMatchObject({ protected: true, notes: 'before the upgrade' });
    // the manifest is not rewritten by attributes
    expect((await store.readManifest(b)).volname).toBe(b);
    expect((await rejection(store.deleteBackup(b))).code).toBe('ERR_BACKUP_PROTECTED');
    await store.setProtected(b, false);
    await store.setNotes(b, '');
    expect(await store.attributes(b)).toEqual({ protected: false });

    // a flipped byte in a manifest: ERR_BACKUP_CORRUPT naming it; listed as corrupt
    const key = store.objectKey(a, 'manifest.json');
    const text = (await store.objects.get(key))!.toString();
    await store.objects.put(key, Buffer.from(text.replace('"ctime":1793500000', '"ctime":1793500001')));
    const err = await rejection(store.readManifest(a));
    expect(err.code).toBe('ERR_BACKUP_CORRUPT');
    expect(err.message).toContain(`${key} does not match its checksum`);
    expect(err.file).toBe(key);
    expect((await store.listBackups(100))[0]).toMatchObject({ volname: a, status: 'corrupt' });

    // delete: the manifest first, then everything of the backup
    await store.deleteBackup(b);
    expect(await store.objects.list(store.backupPrefix(b))).toEqual([]);
    expect((await store.listBackups(100)).map((x) => x.volname)).toEqual([a]);
    expect((await rejection(store.deleteBackup(b))).code).toBe('ERR_UNKNOWN_VOLUME');
    expect((await rejection(store.setNotes(b, 'x'))).code).toBe('ERR_UNKNOWN_VOLUME');
  });

  it('prunes by keep-last: manifests and indexes go, chunks stay, protected backups are kept', async () => {
    const store = await ChunkStore.open(fresh());
    await store.ensureCreated();
    const names = [1, 2, 3, 4].map((d) => `backup/100/qemu-2026_11_0${d}-02_00_00`);
    for (const [i, v] of names.entries()) await putBackup(store, v, 1_793_500_000 + i * 86_400);
    await store.setProtected(names[0]!, true);
    const chunk = 'chunks/ab/cd/abcd' + '0'.repeat(60);
    await store.objects.put(chunk, randomBytes(64));
    const dry = await store.pruneBackups({ keep: { keepLast: 2 }, vmid: 100, dryRun: true });
    expect(dry.map((e) => [e.volname, e.mark])).toEqual([
      [names[3], 'keep'],
      [names[2], 'keep'],
      [names[1], 'remove'],
      [names[0], 'protected'],
    ]);
    expect((await store.listBackups(100)).length).toBe(4); // dry run: nothing removed
    await store.pruneBackups({ keep: { keepLast: 2 }, vmid: 100 });
    expect((await store.listBackups(100)).map((x) => x.volname)).toEqual([names[0], names[2], names[3]]);
    expect(await store.objects.list(store.backupPrefix(names[1]!))).toEqual([]);
    expect(await store.objects.head(chunk)).not.toBeNull();
  });

  it('an encrypted store: the right key reads (blobs encrypted, manifests signed), another fails ERR_KEY_MISMATCH, none ERR_KEY_REQUIRED', async () => {
    const keyA = path.join(dir, 'a.key');
    const keyB = path.join(dir, 'b.key');
    const ka = await createKeyFile(keyA);
    await createKeyFile(keyB);
    expect(statSync(keyA).mode & 0o777).toBe(0o600);
    const exists = await rejection(createKeyFile(keyA)); // never overwritten: every backup made with it needs it
    expect(exists.code).toBe('ERR_INVALID_ARGUMENT');
    expect(exists.message).toMatch(/cannot create key file .*a\.key/);
    expect((await readKeyFile(keyA)).fingerprint).toBe(ka.fingerprint);
    expect((await readKeyFile(keyA)).fingerprint).toBe(ka.fingerprint);

    const o = fresh();
    const store = await ChunkStore.open({ ...o, keyFile: keyA });
    await store.ensureCreated();
    const volname = 'backup/100/qemu-2026_11_01-02_00_00';
    await putBackup(store, volname, 1_793_500_000);
    // the configuration is encrypted at rest
    const raw = (await store.objects.get(store.objectKey(volname, 'guest.conf.blob')))!;
    expect(raw.includes(Buffer.from('name: backup/100'))).toBe(false);
    const log: LogFunction = () => undefined;
    const provider = (s: ChunkStore): ChunkProvider => new ChunkProvider({ storeid: 'chunks', scfg: {}, log }, { store: s, stateDir: dir });
    expect(await provider(store).archiveGetGuestConfig(volname)).toBe(`name: ${volname}\n`);
    expect(await provider(store).restoreVmInit(volname)).toEqual({ 'drive-scsi0': { size: 1 << 30 } });

    // another key: refused when the store is opened, before anything of a backup is read
    const wrong = await rejection(ChunkStore.open({ ...o, keyFile: keyB }));
    expect(wrong).toBeInstanceOf(ChunkStoreError);
    expect(wrong.code).toBe('ERR_KEY_MISMATCH');
    expect(wrong.message).toContain(ka.fingerprint);

    // no key: listing works (checksums checked), data does not
    const keyless = await ChunkStore.open(o);
    expect((await keyless.listBackups()).map((b) => b.volname)).toEqual([volname]);
    for (const p of [provider(keyless).archiveGetGuestConfig(volname), provider(keyless).restoreVmInit(volname), keyless.assertKey({ create: true })]) {
      const e = await rejection(p);
      expect(e).toBeInstanceOf(ChunkStoreError);
      expect(e.code).toBe('ERR_KEY_REQUIRED');
    }

    // a manifest changed by someone without the key, checksum recomputed: the signature fails
    const key = store.objectKey(volname, 'manifest.json');
    const m = JSON.parse((await store.objects.get(key))!.toString()) as Record<string, unknown>;
    const { checksum: _c, signature: _s, ...rest } = m;
    const forged = { ...rest, ctime: 1 };
    await keyless.objects.put(key, Buffer.from(JSON.stringify({ ...forged, checksum: sha(Buffer.from(JSON.stringify(forged))), signature: m.signature })));
    expect((await keyless.readManifest(volname)).ctime).toBe(1); // without the key only the checksum can be checked
    const forgedErr = await rejection(store.readManifest(volname));
    expect(forgedErr.code).toBe('ERR_BACKUP_CORRUPT');
    expect(forgedErr.message).toMatch(/does not match its signature/);

    // a store without a key given a key: mismatch too
    const plain = fresh();
    await (await ChunkStore.open(plain)).ensureCreated();
    expect((await rejection(ChunkStore.open({ ...plain, keyFile: keyA }))).code).toBe('ERR_KEY_MISMATCH');
  });

  /** A stand-in for the native chunk job: writes an index object and reports counters; records its calls. */
  function standInJobs(): ChunkJobs & { backups: ChunkDiskBackup[]; restores: ChunkDiskRestore[]; fail?: Error; lastDigests?: Buffer[] } {
    const jobs: ChunkJobs & { backups: ChunkDiskBackup[]; restores: ChunkDiskRestore[]; fail?: Error; lastDigests?: Buffer[] } = {
      backups: [],
      restores: [],
      async backupDisk(o) {
        jobs.backups.push(o);
        // a stored chunk per disk chunk (content-addressed names; the content does not matter here)
        const objects = new S3ObjectStore(o.store);
        const digests = Array.from({ length: Math.ceil(o.size / o.chunkSize) }, () => randomBytes(32));
        for (const d of digests) await objects.put(chunkKey(d), randomBytes(16));
        const index = encodeFidx(o.size, o.chunkSize, digests);
        await objects.put(o.indexKey, index);
        jobs.lastDigests = digests;
        if (jobs.fail) throw jobs.fail;
        const chunks = Math.ceil(o.size / o.chunkSize);
        const uploaded = o.previousIndexKey ? 1 : chunks;
        return { bytesRead: uploaded * o.chunkSize, chunks, uploaded, reused: chunks - uploaded, zero: 0, indexSize: index.length, indexSha256: sha(index) };
      },
      async restoreDisk(o) {
        jobs.restores.push(o);
      },
    };
    return jobs;
  }

  it('backs up a VM (stand-in data path): manifest last with counters, the log, incremental through the bitmap ledger, a failed backup removed', async () => {
    const store = await ChunkStore.open(fresh());
    const jobs = standInJobs();
    const stateDir = mkdtempSync(path.join(dir, 'state-'));
    let clock = Date.UTC(2026, 10, 1, 2, 0, 0);
    const lines: string[] = [];
    const log: LogFunction = (_l, m) => lines.push(m);
    const make = (): ChunkProvider => new ChunkProvider({ storeid: 'chunks', scfg: {}, log }, { store, jobs, stateDir, now: () => new Date(clock) });
    const size = 64 << 20;
    const signal = new AbortController().signal;
    const logFile = path.join(dir, 'task.log');
    writeFileSync(logFile, 'INFO: the task log\n');

    const run = async (p: ChunkProvider, bitmapMode: 'new' | 'reuse'): Promise<string> => {
      await p.jobInit(0);
      const { archiveName } = await p.backupInit(100, 'qemu', 0);
      expect(await p.backupGetMechanism(100, 'qemu')).toBe('nbd');
      const query = await p.backupVmQueryIncremental(100, { 'drive-scsi0': { size } });
      expect(query).toEqual({ 'drive-scsi0': bitmapMode === 'reuse' ? 'use' : 'new' });
      await p.backupVm(100, 'name: vm100\n', { 'drive-scsi0': { size, bitmapMode, bitmapAction: bitmapMode === 'reuse' ? 'used' : 'new', nbdUri: 'nbd+unix:///drive-scsi0?socket=/x', bitmapName: 'b' } }, { mechanism: 'nbd', archiveName, signal, firewallConfig: '[OPTIONS]\n' });
      await p.backupCleanup(100, 'qemu', true, {});
      await p.backupHandleLogFile(100, logFile);
      await p.jobCleanup();
      return `backup/${archiveName}`;
    };

    const full = await run(make(), 'new');
    expect(jobs.backups[0]).toMatchObject({ size, chunkSize: 4 << 20, indexKey: `${full.replace('backup/', 'backups/')}/drive-scsi0.fidx`, discard: true });
    expect(jobs.backups[0]!.previousIndexKey).toBeUndefined();
    const m1 = await store.readManifest(full, { needKey: true });
    expect(m1.devices!['drive-scsi0']).toMatchObject({ bitmapMode: 'new', chunksUploaded: 16, chunksReused: 0 });
    expect(Object.keys(m1.files).sort()).toEqual(['backup.log.blob', 'drive-scsi0.fidx', 'firewall.conf.blob', 'guest.conf.blob']);
    const logBlob = await store.getBlob(m1, 'backup.log.blob');
    expect(logBlob.toString()).toBe('INFO: the task log\n');
    expect(await store.objects.list('writers/')).toEqual([]); // the writer record is gone
    expect(await make().archiveGetFirewallConfig(full)).toBe('[OPTIONS]\n');

    clock += 86_400_000;
    const incr = await run(make(), 'reuse');
    expect(jobs.backups[1]).toMatchObject({ bitmap: 'b', previousIndexKey: `${full.replace('backup/', 'backups/')}/drive-scsi0.fidx` });
    expect((await store.readManifest(incr)).devices!['drive-scsi0']).toMatchObject({ bitmapMode: 'reuse', previous: full, chunksUploaded: 1, chunksReused: 15 });

    // a failed backup: no manifest, no index, no writer; QEMU was told failure, so the ledger
    // names the last good backup again and the next backup is incremental over it
    clock += 86_400_000;
    const p = make();
    await p.jobInit(0);
    const { archiveName } = await p.backupInit(100, 'qemu', 0);
    await p.backupVmQueryIncremental(100, { 'drive-scsi0': { size } });
    jobs.fail = new Error('upload failed');
    await expect(p.backupVm(100, 'name: vm100\n', { 'drive-scsi0': { size, bitmapMode: 'reuse', bitmapAction: 'used', nbdUri: 'nbd+unix:///drive-scsi0?socket=/x', bitmapName: 'b' } }, { mechanism: 'nbd', archiveName, signal })).rejects.toThrow('upload failed');
    await p.backupCleanup(100, 'qemu', false, { error: 'upload failed' });
    await p.jobCleanup();
    delete jobs.fail;
    expect(await store.objects.list(`backups/${archiveName}/`)).toEqual([]);
    expect(await store.objects.list('writers/')).toEqual([]);
    expect((await store.listBackups(100)).map((b) => b.volname)).toEqual([full, incr]);
    clock += 86_400_000;
    const third = await run(make(), 'reuse');
    expect(jobs.backups.at(-1)!.previousIndexKey).toBe(`${incr.replace('backup/', 'backups/')}/drive-scsi0.fidx`);

    // a chunk the last backup's index names is gone (a collection, a lost object): the next
    // backup does not reference it: it asks QEMU for no incremental and reads every chunk
    await store.objects.delete(chunkKey(jobs.lastDigests![5]!));
    clock += 86_400_000;
    lines.length = 0;
    await run(make(), 'new');
    expect(jobs.backups.at(-1)!.previousIndexKey).toBeUndefined();
    expect(lines.join('\n')).toMatch(new RegExp(`1 chunk\\(s\\) of ${third} drive-scsi0 are missing from the store \\(first: chunks/`));

    // restore goes through the core's job with the index checked against the manifest first
    const target = { path: path.join(dir, 'restored.raw'), size, zeroed: true };
    expect(await make().restoreVmVolumeWrite(incr, 'drive-scsi0', target)).toBe(true);
    expect(jobs.restores.at(-1)).toMatchObject({ indexKey: `${incr.replace('backup/', 'backups/')}/drive-scsi0.fidx`, target: target.path, zeroed: true });
    await store.objects.put(`${incr.replace('backup/', 'backups/')}/drive-scsi0.fidx`, randomBytes(10));
    const bad = await rejection(make().restoreVmVolumeWrite(incr, 'drive-scsi0', target));
    expect(bad.code).toBe('ERR_BACKUP_CORRUPT');
    expect(bad.message).toContain('drive-scsi0.fidx is not what its manifest records');
    expect(bad.file).toBe(`${incr.replace('backup/', 'backups/')}/drive-scsi0.fidx`);
    expect((await rejection(make().restoreVmInit(incr))).code).toBe('ERR_BACKUP_CORRUPT'); // before any target is written
    expect(jobs.restores.length).toBe(1);

    // what is not here yet fails with a typed error saying so
    expect((await rejection(make().restoreVmVolumeInit(incr, 'drive-scsi0', {}))).code).toBe('ERR_NOT_IMPLEMENTED');
    expect((await rejection(make().backupGetMechanism(200, 'lxc'))).code).toBe('ERR_MECHANISM');
  });

  it('another store that used the bitmap of QEMU (same storage id) makes the next backup full (stand-in data path)', async () => {
    const a = await ChunkStore.open(fresh());
    const b = await ChunkStore.open(fresh());
    const jobs = standInJobs();
    const stateDir = mkdtempSync(path.join(dir, 'state-'));
    let clock = Date.UTC(2026, 10, 1, 2, 0, 0);
    const lines: string[] = [];
    const size = 8 << 20;
    const signal = new AbortController().signal;
    const once = async (store: ChunkStore): Promise<Record<string, string> | undefined> => {
      clock += 3_600_000;
      const p = new ChunkProvider({ storeid: 'same', scfg: {}, log: (_l, m) => lines.push(m) }, { store, jobs, stateDir, now: () => new Date(clock) });
      await p.jobInit(0);
      const { archiveName } = await p.backupInit(100, 'qemu', 0);
      const query = await p.backupVmQueryIncremental(100, { 'drive-scsi0': { size } });
      const mode = query?.['drive-scsi0'] === 'use' ? 'reuse' : 'new';
      await p.backupVm(100, 'name: vm100\n', { 'drive-scsi0': { size, bitmapMode: mode, bitmapAction: mode === 'reuse' ? 'used' : 'new', nbdUri: 'nbd+unix:///drive-scsi0?socket=/x', bitmapName: 'b' } }, { mechanism: 'nbd', archiveName, signal });
      await p.backupCleanup(100, 'qemu', true, {});
      await p.jobCleanup();
      return query as Record<string, string> | undefined;
    };
    expect(await once(a)).toEqual({ 'drive-scsi0': 'new' });
    expect(await once(a)).toEqual({ 'drive-scsi0': 'use' });
    expect(await once(b)).toEqual({ 'drive-scsi0': 'new' }); // b has no backup QEMU's bitmap counts from
    lines.length = 0;
    expect(await once(a)).toEqual({ 'drive-scsi0': 'new' }); // b cleared the bitmap since a's last backup
    expect(lines.join('\n')).toMatch(/was last used by the store s3:\/\/.* at http:\/\/.*: full backup/);
    expect(await once(a)).toEqual({ 'drive-scsi0': 'use' });
  });

  it('opens its store from the storage configuration (as Proxmox VE passes it): URL, endpoint, region, credentials file, key file', async () => {
    const o = fresh();
    const keyFile = path.join(dir, 'scfg.key');
    await createKeyFile(keyFile);
    const creds = path.join(dir, 'credentials');
    writeFileSync(creds, `[default]\naws_access_key_id = ${cluster.accessKeyId}\naws_secret_access_key = ${cluster.secretAccessKey}\n`, { mode: 0o600 });
    const scfg = { store: `s3://${o.bucket}/${o.prefix}`, endpoint: cluster.endpoint, region: cluster.region, 'allow-http': 1, 'credentials-file': creds, 'key-file': keyFile };
    const p = new ChunkProvider({ storeid: 'pbs3', scfg, log: () => undefined }, { stateDir: dir });
    await p.jobInit(0); // creates store.json with the key's fingerprint
    const store = await p.openStore();
    expect(store.fingerprint).toBe((await readKeyFile(keyFile)).fingerprint);
    await putBackup(store, 'backup/100/qemu-2026_11_01-02_00_00', 1_793_500_000);
    expect(await p.storage.listBackups!({})).toEqual([{ volname: 'backup/100/qemu-2026_11_01-02_00_00', vmid: 100, vmtype: 'qemu', ctime: 1_793_500_000, size: 1 << 30, protected: false }]);
    await p.storage.setProtected!('backup/100/qemu-2026_11_01-02_00_00', true);
    expect(await p.storage.getProtected!('backup/100/qemu-2026_11_01-02_00_00')).toBe(true);
    expect(() => new ChunkProvider({ storeid: 'x', scfg: {}, log: () => undefined })).toThrow(/needs the store as storage option store/);
    expect(() => new ChunkProvider({ storeid: 'x', scfg: { store: scfg.store, 'vm-backup-mode': 'sometimes' }, log: () => undefined })).toThrow(/vm-backup-mode must be full or incremental/);
  });

  it('the command line on an s3:// URL: key create, list, protect, notes, prune, delete; one line on errors', async () => {
    const env = { ...process.env, AWS_ACCESS_KEY_ID: cluster.accessKeyId, AWS_SECRET_ACCESS_KEY: cluster.secretAccessKey };
    const cli = (...args: string[]): { status: number | null; stdout: string; stderr: string } => {
      const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env });
      return { status: r.status, stdout: r.stdout, stderr: r.stderr };
    };
    const o = fresh();
    const url = `s3://${o.bucket}/${o.prefix}`;
    const s3 = ['--store', url, '--endpoint', cluster.endpoint, '--region', cluster.region];
    const keyFile = path.join(dir, 'cli.key');
    const k = cli('key', 'create', keyFile, ...s3, '--json');
    expect(k.status, k.stderr).toBe(0);
    const { fingerprint } = JSON.parse(k.stdout) as { fingerprint: string };
    expect(fingerprint).toMatch(/^[0-9a-f]{16}$/);
    const store = await ChunkStore.open({ ...o, keyFile });
    expect(store.fingerprint).toBe(fingerprint);
    // the store exists now: a second key for it is refused, and no key file is left behind
    const again = cli('key', 'create', path.join(dir, 'cli2.key'), ...s3);
    expect(again.status).toBe(2);
    expect(again.stderr).toMatch(/exists already/);
    expect(() => statSync(path.join(dir, 'cli2.key'))).toThrow();

    const v1 = 'backup/100/qemu-2026_11_01-02_00_00';
    const v2 = 'backup/100/qemu-2026_11_02-02_00_00';
    await putBackup(store, v1, 1_793_500_000);
    await putBackup(store, v2, 1_793_586_400);
    const list = JSON.parse(cli('list', ...s3, '--json').stdout) as Array<{ volid: string; format: string; status: string }>;
    expect(list.map((b) => [b.volid, b.format, b.status])).toEqual([
      [`chunks:${v1}`, 'chunks', 'ok'],
      [`chunks:${v2}`, 'chunks', 'ok'],
    ]);
    expect(cli('list', ...s3).stdout).toMatch(/^volid\s+type\s+created\s+size/);
    expect(cli('protect', `chunks:${v1}`, ...s3).status).toBe(0);
    expect(cli('notes', `chunks:${v1}`, 'keep me', ...s3).status).toBe(0);
    const prune = JSON.parse(cli('prune', ...s3, '--keep-last', '1', '--json').stdout) as Array<{ volname: string; mark: string }>;
    expect(prune.map((p) => [p.volname, p.mark])).toEqual([
      [v2, 'keep'],
      [v1, 'protected'],
    ]);
    const del = cli('delete', `chunks:${v1}`, ...s3);
    expect(del.status).toBe(1);
    expect(del.stderr.trim().split('\n')).toHaveLength(1);
    expect(del.stderr).toMatch(/is protected.*\[ERR_BACKUP_PROTECTED\]/);
    expect(cli('delete', `chunks:${v1}`, ...s3, '--force').status).toBe(0);
    expect((await store.listBackups()).map((b) => b.volname)).toEqual([v2]);

    // wrong key: one line with the code; directory-store options on an s3:// store: usage
    const wrongKey = path.join(dir, 'cli-wrong.key');
    await createKeyFile(wrongKey);
    const w = cli('list', ...s3, '--key-file', wrongKey);
    expect(w.status).toBe(1);
    expect(w.stderr).toMatch(/\[ERR_KEY_MISMATCH\]/);
    expect(w.stderr).not.toMatch(/\n\s+at /);
    // restore checks the key before anything of the backup is read or any target written
    const out = path.join(dir, 'cli-restore');
    const r1 = cli('restore', `chunks:${v2}`, ...s3, '--key-file', wrongKey, '--to', out);
    expect(r1.stderr).toMatch(/\[ERR_KEY_MISMATCH\]/);
    const r2 = cli('restore', `chunks:${v2}`, ...s3, '--to', out);
    expect(r2.status).toBe(1);
    expect(r2.stderr.trim().split('\n')).toHaveLength(1);
    // (the restore runner reports ERR_RESTORE with its cause's message, as for the directory store)
    expect(r2.stderr).toMatch(/is encrypted \(key fingerprint [0-9a-f]{16}\): give its key file \[ERR_RESTORE\]/);
    expect(() => statSync(out)).toThrow();
    const u = cli('backup', ...s3, '--vmid', '100', '--disk', '/nonexistent.raw', '--compression', 'zstd');
    expect(u.status).toBe(2);
    expect(u.stderr).toMatch(/--compression is for directory stores/);
    const noCreds = spawnSync(process.execPath, [CLI, 'list', ...s3], { encoding: 'utf8', env: { ...process.env, AWS_ACCESS_KEY_ID: '', AWS_SECRET_ACCESS_KEY: '' } });
    expect(noCreds.status).not.toBe(0);
    expect(noCreds.stderr).toMatch(/no credentials for s3:\/\//);
  });
});

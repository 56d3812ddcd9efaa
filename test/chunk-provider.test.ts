/**
 * The chunk provider and its store against a real distributed S3 store (a three-node Garage
 * cluster, replication factor 3): `store.json` and its version, manifests checked on every read
 * (checksum; signature with a key), list (a backup without manifest does not exist), notes and
 * protected objects, prune (keep-last; protected kept; manifests and indexes go, chunks stay),
 * delete, keys (the right key reads, another fails with ERR_KEY_MISMATCH, none with
 * ERR_KEY_REQUIRED, before anything of the backup is read; blobs are encrypted), the provider's
 * backup flow through the native chunk jobs on a qemu-storage-daemon disk (manifest last,
 * counters, the task log, incremental through the bitmap ledger, cleanup of a failed backup,
 * a chunk lost by hand: verify records the failure and the next backup is full, restore
 * byte-exact, a damaged index refused), and the command line on an s3:// URL.
 */
import { spawnSync } from 'node:child_process';
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { ChunkBackupError, ChunkStoreError } from '../lib/chunk-provider/errors.js';
import { decodeBlob, encodeBlob } from '../lib/chunk-provider/blob.js';
import { createKeyFile, readKeyFile } from '../lib/chunk-provider/key.js';
import { ChunkProvider } from '../lib/chunk-provider/provider.js';
import { S3ObjectStore } from '../lib/chunk-provider/s3.js';
import { ChunkStore, chunkKey } from '../lib/chunk-provider/store.js';
import { verifyChunkStore } from '../lib/chunk-provider/verify.js';
import { DirectoryStoreError } from '../lib/directory-provider/errors.js';
import { runBackupJob } from '../lib/index.js';
import type { LogFunction } from '../lib/provider/api.js';
import { putBackup } from './helpers/chunk-store.js';
import { startDisk, vmGuest } from './helpers/directory.js';
import { expectSameBytes } from './helpers/images.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { listedNow, useS3Cluster } from './helpers/use-s3-cluster.js';

const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');
const MiB = 2 ** 20;

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
  let dir: string;
  const garage = useS3Cluster('t');
  const fresh = garage.fresh;

  beforeAll(async () => {
    dir = mkdtempSync(path.join(tmpdir(), 'pbp-chunk-provider-'));
  }, 120_000);
  afterEach(async () => {
    await stopAll();
  });
  afterAll(async () => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

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
    expect(await listedNow(store.objects, store.backupPrefix(b))).toEqual([]);
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
    expect(await listedNow(store.objects, store.backupPrefix(names[1]!))).toEqual([]);
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

  /** A provider on `store` with the native chunk jobs (the default); its log lines go to `lines`. */
  function realProvider(store: ChunkStore, storeid: string, stateDir: string, lines: string[], clock: () => number, onProgress?: (p: { done: number }) => void): ChunkProvider {
    return new ChunkProvider({ storeid, scfg: {}, log: (_l, m) => lines.push(m) }, { store, stateDir, now: () => new Date(clock()), ...(onProgress ? { onProgress } : {}) });
  }

  it('backs up a VM through the native chunk jobs: manifest last with counters, the log, incremental through the bitmap ledger, a failed backup removed, restore byte-exact', async () => {
    const store = await ChunkStore.open(fresh());
    const scratch = await tempDir();
    const stateDir = mkdtempSync(path.join(dir, 'state-'));
    let clock = Date.UTC(2026, 10, 1, 2, 0, 0);
    const lines: string[] = [];
    const size = 32 * MiB; // 8 chunks of 4 MiB
    const disk = await startDisk(size);
    for (let i = 0; i < 8; i++) await disk.write(0x40 + i, i * 4 * MiB, 4 * MiB); // 8 different chunks
    /** When set, the progress callback throws it: the native job is cancelled and fails with it. */
    let failAt: { done: number; error: Error } | undefined;
    const make = (): ChunkProvider =>
      realProvider(store, 'chunks', stateDir, lines, () => clock, (p) => {
        if (failAt && p.done >= failAt.done) throw failAt.error;
      });
    const run = async (p: ChunkProvider, bandwidthLimit?: number): Promise<{ volname?: string; archiveName?: string; error?: Error; content: Buffer }> => {
      const content = disk.snapshot();
      const r = await runBackupJob({ provider: p, storeid: 'chunks', guests: [vmGuest(disk)], tmpdir: scratch, ...(bandwidthLimit ? { bandwidthLimit } : {}) });
      const g = r.guests[0]!;
      return { ...(g.volname ? { volname: g.volname } : {}), ...(g.archiveName ? { archiveName: g.archiveName } : {}), ...(g.error ? { error: g.error } : {}), content };
    };
    const indexKey = (volname: string): string => `${volname.replace('backup/', 'backups/')}/disk0.fidx`;

    // full: every chunk read and uploaded; the manifest last, with the configs and the task log
    const full = await run(make());
    expect(full.error).toBeUndefined();
    const m1 = await store.readManifest(full.volname!, { needKey: true });
    expect(m1.devices!['disk0']).toMatchObject({ index: 'disk0.fidx', size, bitmapMode: 'new', bytesRead: size, chunksUploaded: 8, chunksReused: 0, chunksZero: 0 });
    expect(m1.devices!['disk0']!.previous).toBeUndefined();
    expect(Object.keys(m1.files).sort()).toEqual(['backup.log.blob', 'disk0.fidx', 'firewall.conf.blob', 'guest.conf.blob']);
    expect(m1.files['disk0.fidx']).toEqual({ size: (await store.objects.get(indexKey(full.volname!)))!.length, sha256: sha((await store.objects.get(indexKey(full.volname!)))!) });
    expect((await store.readFixedIndex(m1, 'disk0')).digests).toHaveLength(8);
    expect((await store.getBlob(m1, 'backup.log.blob')).toString()).toMatch(/disk0/); // the runner's task log
    expect(await listedNow(store.objects, 'writers/')).toEqual([]); // the writer record is gone
    expect(await make().archiveGetGuestConfig(full.volname!)).toBe('name: vm100\n');
    expect(await make().archiveGetFirewallConfig(full.volname!)).toBe('[OPTIONS]\nenable: 1\n');
    expect(lines.join('\n')).toMatch(/disk0: full backup to disk0\.fidx/);

    // incremental: QEMU's bitmap (the ledger names the full backup) has one dirty chunk; the rest from the previous index
    clock += 86_400_000;
    lines.length = 0;
    await disk.write(0x51, 9 * MiB, 64 * 1024); // chunk 2
    const incr = await run(make());
    expect(incr.error).toBeUndefined();
    expect(lines.join('\n')).toContain(`disk0: incremental over ${full.volname}`);
    const m2 = await store.readManifest(incr.volname!);
    expect(m2.devices!['disk0']).toMatchObject({ bitmapMode: 'reuse', previous: full.volname, chunksUploaded: 1, chunksReused: 7, chunksZero: 0 });
    expect(m2.devices!['disk0']!.bytesRead).toBeLessThanOrEqual(4 * MiB);

    // a failed backup: the native job fails in the middle of its copy (its progress callback
    // throws, which cancels it and makes it fail with that error); no manifest, no index, no
    // writer; QEMU was told failure, so the ledger names the last good backup again and the next
    // backup is incremental over it. Deterministic: the cancel is made on the first progress report
    // past 4 of the 16 MiB to read, while the bandwidth limit leaves seconds of copying; a quota or
    // stopped nodes would also refuse the provider's own writes (blobs, writer record, cleanup).
    clock += 86_400_000;
    for (let i = 4; i < 8; i++) await disk.write(0x60 + i, i * 4 * MiB, 4 * MiB); // chunks 4..7
    lines.length = 0;
    failAt = { done: 4 * MiB, error: new Error('upload failed') };
    const failed = await run(make(), 2 * MiB); // 16 MiB to read at 2 MiB/s: seconds of copying left when it fails
    failAt = undefined;
    expect(failed.error?.message).toMatch(/upload failed/);
    expect(failed.archiveName).toBeDefined();
    // it failed in the native job's copy, after the provider had started it
    expect(lines.join('\n')).toContain(`disk0: incremental over ${incr.volname}`);
    expect(lines.join('\n')).toMatch(/removing the incomplete backup backup\/100\/qemu-.* \(.*upload failed/);
    expect(lines.join('\n')).not.toMatch(/disk0: read \d+ bytes/);
    expect(await listedNow(store.objects, `backups/${failed.archiveName}/`)).toEqual([]);
    expect(await listedNow(store.objects, 'writers/')).toEqual([]);
    expect((await store.listBackups(100)).map((b) => b.volname)).toEqual([full.volname, incr.volname]);
    clock += 86_400_000;
    lines.length = 0;
    const third = await run(make());
    expect(third.error).toBeUndefined();
    expect(lines.join('\n')).toContain(`disk0: incremental over ${incr.volname}`);
    const m3 = await store.readManifest(third.volname!);
    expect(m3.devices!['disk0']).toMatchObject({ bitmapMode: 'reuse', previous: incr.volname });
    expect(m3.devices!['disk0']!.chunksUploaded + m3.devices!['disk0']!.chunksReused).toBe(8);
    expect(m3.devices!['disk0']!.bytesRead).toBeLessThanOrEqual(16 * MiB); // the four chunks written since incr, not the whole disk

    // a chunk the last backup's index names is lost outside the store's operations (deleted by
    // hand): the check of the previous index lists fossils and does not see it; verify does, and
    // records it; the next backup does not take the failed backup as its base: it asks QEMU for
    // no incremental, reads every chunk and uploads the lost one again
    const digests = (await store.readFixedIndex(m3, 'disk0')).digests;
    await store.objects.delete(chunkKey(digests[5]!));
    const [verdict] = await verifyChunkStore(store, { volnames: [third.volname!] });
    expect(verdict).toMatchObject({ ok: false, problems: [expect.stringContaining(`${chunkKey(digests[5]!)} is missing`)] });
    expect(await store.readVerifyState(third.volname!)).toEqual({ state: 'failed', time: expect.any(Number), missing: 1, bad: 0 });
    clock += 86_400_000;
    lines.length = 0;
    const after = await run(make());
    expect(after.error).toBeUndefined();
    expect(lines.join('\n')).toContain(`counts writes since ${third.volname}, which cannot be used (its last verify failed (1 chunk(s) missing, 0 damaged)): full backup`);
    const m4 = await store.readManifest(after.volname!);
    expect(m4.devices!['disk0']).toMatchObject({ bitmapMode: 'new', bytesRead: size });
    expect(m4.devices!['disk0']!.previous).toBeUndefined();
    expect(await store.objects.head(chunkKey(digests[5]!))).not.toBeNull(); // read and stored again
    const healed = path.join(scratch, 'healed.raw');
    writeFileSync(healed, Buffer.alloc(0));
    truncateSync(healed, size);
    expect(await make().restoreVmVolumeWrite(after.volname!, 'disk0', { path: healed, size, zeroed: true })).toBe(true);
    expectSameBytes(readFileSync(healed), after.content, after.volname!);
    // the verdict goes with its backup
    await store.deleteBackup(third.volname!);
    expect(await listedNow(store.objects, `backups/${third.volname!.slice('backup/'.length)}/`)).toEqual([]);

    // restore goes through the core's job with the index checked against the manifest first
    const target = { path: path.join(scratch, 'restored.raw'), size, zeroed: true };
    writeFileSync(target.path, Buffer.alloc(0));
    truncateSync(target.path, size);
    expect(await make().restoreVmVolumeWrite(incr.volname!, 'disk0', target)).toBe(true);
    expectSameBytes(readFileSync(target.path), incr.content, incr.volname!);
    const damaged = path.join(scratch, 'damaged.raw');
    writeFileSync(damaged, Buffer.alloc(size, 0xee));
    await store.objects.put(indexKey(incr.volname!), randomBytes(10));
    const bad = await rejection(make().restoreVmVolumeWrite(incr.volname!, 'disk0', { path: damaged, size, zeroed: false }));
    expect(bad.code).toBe('ERR_BACKUP_CORRUPT');
    expect(bad.message).toContain('disk0.fidx is not what its manifest records');
    expect(bad.file).toBe(indexKey(incr.volname!));
    expect((await rejection(make().restoreVmInit(incr.volname!))).code).toBe('ERR_BACKUP_CORRUPT');
    expect(readFileSync(damaged).equals(Buffer.alloc(size, 0xee))).toBe(true); // refused before the target was written

    // Proxmox VE's path refuses the damaged index too, before any server or file is started
    expect((await rejection(make().restoreVmVolumeInit(incr.volname!, 'disk0', {}))).code).toBe('ERR_BACKUP_CORRUPT');
    // what is not here yet fails with a typed error saying so
    expect(await make().backupGetMechanism(200, 'lxc')).toBe('directory'); // test/chunk-provider-container.test.ts
  });

  it('another store that used the bitmap of QEMU (same storage id) makes the next backup full', async () => {
    const a = await ChunkStore.open(fresh());
    const b = await ChunkStore.open(fresh());
    const scratch = await tempDir();
    const stateDir = mkdtempSync(path.join(dir, 'state-'));
    let clock = Date.UTC(2026, 10, 1, 2, 0, 0);
    const lines: string[] = [];
    const disk = await startDisk(8 * MiB);
    await disk.write(0x21, 0, 8 * MiB);
    /** One backup job into `store`; the disk's mode as the manifest records it, checked by a restore. */
    const once = async (store: ChunkStore): Promise<string | undefined> => {
      clock += 3_600_000;
      await disk.write(0x22 + Math.floor(clock / 3_600_000) % 64, 5 * MiB, 64 * 1024);
      const content = disk.snapshot();
      const p = realProvider(store, 'same', stateDir, lines, () => clock);
      const r = await runBackupJob({ provider: p, storeid: 'same', guests: [vmGuest(disk)], tmpdir: scratch });
      expect(r.guests[0]!.error).toBeUndefined();
      const volname = r.guests[0]!.volname!;
      const target = { path: path.join(scratch, 'two-stores.raw'), size: 8 * MiB, zeroed: true };
      rmSync(target.path, { force: true });
      writeFileSync(target.path, Buffer.alloc(0));
      truncateSync(target.path, 8 * MiB);
      await p.restoreVmVolumeWrite(volname, 'disk0', target);
      expectSameBytes(readFileSync(target.path), content, volname);
      return (await store.readManifest(volname)).devices!['disk0']!.bitmapMode;
    };
    expect(await once(a)).toBe('new');
    expect(await once(a)).toBe('reuse');
    expect(await once(b)).toBe('new'); // b has no backup QEMU's bitmap counts from
    lines.length = 0;
    expect(await once(a)).toBe('new'); // b cleared the bitmap since a's last backup
    expect(lines.join('\n')).toMatch(/was last used by the store s3:\/\/.* at http:\/\/.*: full backup/);
    expect(await once(a)).toBe('reuse');
  });

  it('opens its store from the storage configuration (as Proxmox VE passes it): URL, endpoint, region, credentials file, key file', async () => {
    const o = fresh();
    const keyFile = path.join(dir, 'scfg.key');
    await createKeyFile(keyFile);
    const creds = path.join(dir, 'credentials');
    writeFileSync(creds, `[default]\naws_access_key_id = ${garage.cluster.accessKeyId}\naws_secret_access_key = ${garage.cluster.secretAccessKey}\n`, { mode: 0o600 });
    const scfg = { store: `s3://${o.bucket}/${o.prefix}`, endpoint: garage.cluster.endpoint, region: garage.cluster.region, 'allow-http': 1, 'credentials-file': creds, 'key-file': keyFile };
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
    const env = { ...process.env, AWS_ACCESS_KEY_ID: garage.cluster.accessKeyId, AWS_SECRET_ACCESS_KEY: garage.cluster.secretAccessKey };
    const cli = (...args: string[]): { status: number | null; stdout: string; stderr: string } => {
      const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env });
      return { status: r.status, stdout: r.stdout, stderr: r.stderr };
    };
    const o = fresh();
    const url = `s3://${o.bucket}/${o.prefix}`;
    const s3 = ['--store', url, '--endpoint', garage.cluster.endpoint, '--region', garage.cluster.region];
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

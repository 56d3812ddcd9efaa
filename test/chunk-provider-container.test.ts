/**
 * Containers through the chunk provider against a real distributed S3 store (a three-node Garage
 * cluster) and real GNU tar: the test tree (modes, owners, xattrs, ACLs, a file capability,
 * links, devices, a sparse file, odd names) backed up through the job runner, privileged and
 * with an id map, and restored byte-exact both ways (straight from the chunks into tar, and as
 * the tar file Proxmox VE reads); the manifest (archive, no devices) and the listing; a second
 * backup of a big tree after one file changed uploads only the chunks around it; a damaged
 * chunk fails the restore naming it and leaves no tar file behind (verify names it too); garbage
 * collection keeps what a container index names; the command line; an encrypted store.
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, lchownSync, mkdirSync, mkdtempSync, openSync, readdirSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import path from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { extractTarArchive } from '../lib/container/tar.js';
import { collectGarbage } from '../lib/chunk-provider/gc.js';
import { createKeyFile } from '../lib/chunk-provider/key.js';
import { verifyChunkStore } from '../lib/chunk-provider/verify.js';
import { ChunkProvider } from '../lib/chunk-provider/provider.js';
import { ChunkStore, chunkKey } from '../lib/chunk-provider/store.js';
import { parseIdMap } from '../lib/container/idmap.js';
import { ownerNameTag } from '../lib/owner.js';
import { restoreContainer, runBackupJob } from '../lib/index.js';
import { tempDir } from './helpers/qemu.js';
import { listedNow, useS3Cluster } from './helpers/use-s3-cluster.js';
import { buildTree, requireContainerTools, snapshotTree, TEST_MAP_LINES } from './helpers/tree.js';

const MiB = 2 ** 20;
const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');

/** The rejection of `p`, failing the test if it resolves. */
async function rejection(p: Promise<unknown>): Promise<{ code?: string; message: string; cause?: unknown }> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, 'the call should have failed').toBeInstanceOf(Error);
  return err as { code?: string; message: string };
}

/** The chunks a `.didx` names (docs/chunk-store.md: 24-byte header, 40-byte entries, 32-byte checksum). */
function didxDigests(data: Buffer): Buffer[] {
  expect(data.subarray(0, 8).toString('latin1')).toBe('PBPDIDX\x01');
  const out: Buffer[] = [];
  for (let at = 24; at + 40 <= data.length - 32; at += 40) out.push(data.subarray(at + 8, at + 40));
  return out;
}

describe('containers in the chunk store (Garage, 3 nodes; real tar)', { timeout: 300_000 }, () => {
  let dir: string;
  const garage = useS3Cluster('ct');
  const fresh = garage.fresh;

  beforeAll(async () => {
    requireContainerTools();
    dir = mkdtempSync(path.join(tmpdir(), 'pbp-chunk-ct-'));
  }, 120_000);
  afterAll(async () => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  function provider(store: ChunkStore, lines: string[] = [], clock?: () => number): ChunkProvider {
    return new ChunkProvider({ storeid: 'chunks', scfg: {}, log: (_l, m) => lines.push(m) }, { store, stateDir: dir, ...(clock ? { now: () => new Date(clock()) } : {}) });
  }

  /** One container backup job of `rootdir`; its volume name. */
  async function backup(p: ChunkProvider, rootdir: string, mapped: boolean, work: string): Promise<string> {
    const r = await runBackupJob({
      provider: p,
      storeid: 'chunks',
      tmpdir: work,
      guests: [{ vmid: 200, type: 'lxc', rootdir, config: 'hostname: ct200\n', firewallConfig: '[OPTIONS]\nenable: 1\n', ...(mapped ? { idMap: TEST_MAP_LINES } : {}) }],
    });
    expect(r.guests[0]!.error).toBeUndefined();
    return r.guests[0]!.volname!;
  }

  it.each([false, true])('the test tree restores byte-exact both ways (id map %s): straight from the chunks, and as the tar file Proxmox VE reads', async (mapped) => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    mkdirSync(src);
    buildTree(src, { idBase: mapped ? 100000 : 0 });
    const before = snapshotTree(src);
    const store = await ChunkStore.open(fresh(), { storeid: 'chunks' });
    const lines: string[] = [];
    const p = provider(store, lines);
    expect(await p.backupGetMechanism(200, 'lxc')).toBe('directory');
    const volname = await backup(p, src, mapped, work);

    // the manifest: the archive and no devices; the configuration as blobs; listed with its size
    const m = await store.readManifest(volname);
    expect(m.vmtype).toBe('lxc');
    expect(m.devices).toBeNull();
    expect(m.archive).toMatchObject({ index: 'root.didx', chunksUploaded: m.archive!.chunks, chunksReused: 0 });
    expect(m.archive!.size).toBeGreaterThan(SPARSE_DATA);
    expect(Object.keys(m.files).sort()).toEqual(['backup.log.blob', 'firewall.conf.blob', 'guest.conf.blob', 'root.didx']);
    const [listed] = await store.listBackups(200);
    expect(listed).toMatchObject({ volname, subtype: 'lxc', size: m.archive!.size, status: 'ok' });
    expect(await p.archiveGetGuestConfig(volname)).toBe('hostname: ct200\n');
    expect(await p.restoreGetMechanism(volname)).toEqual({ mechanism: 'tar', vmtype: 'lxc' });

    // this package's runner: the stream straight from the chunks into tar
    const dst = path.join(work, 'dst');
    mkdirSync(dst);
    const res = await restoreContainer({ provider: p, volname, storeid: 'chunks', rootdir: dst, configDir: work, ...(mapped ? { idMap: TEST_MAP_LINES } : {}) });
    expect(res).toMatchObject({ mechanism: 'tar', config: 'hostname: ct200\n' });
    expect(snapshotTree(dst)).toEqual(before);

    // Proxmox VE's path: a regular .tar file (read twice), extracted with Proxmox's flags, then removed.
    // What restores killed before their cleanup left goes first: only a dead process's of this host
    const gone = spawnSync('true').pid!;
    const left = {
      dead: path.join(tmpdir(), `pbp-ct-restore-${hostname()}-${gone}-1-aaaaaa`),
      alive: path.join(tmpdir(), `pbp-ct-restore-${ownerNameTag()}-bbbbbb`),
      otherHost: path.join(tmpdir(), `pbp-ct-restore-${hostname()}x-${gone}-1-cccccc`),
    };
    for (const d of Object.values(left)) {
      mkdirSync(d, { mode: 0o700 });
      writeFileSync(path.join(d, 'root.tar'), 'left behind');
    }
    const { tarPath } = await p.restoreContainerInit(volname, 'chunks', {});
    try {
      expect(Object.fromEntries(Object.entries(left).map(([k, d]) => [k, existsSync(d)]))).toEqual({ dead: false, alive: true, otherHost: true });
    } finally {
      for (const d of Object.values(left)) rmSync(d, { recursive: true, force: true });
    }
    expect(tarPath).toMatch(/\/root\.tar$/);
    expect({ mode: statSync(tarPath!).mode & 0o777, size: statSync(tarPath!).size }).toEqual({ mode: 0o600, size: m.archive!.size });
    expect(statSync(path.dirname(tarPath!)).mode & 0o777).toBe(0o700);
    const dst2 = path.join(work, 'dst2');
    mkdirSync(dst2);
    await extractTarArchive({ archive: tarPath!, rootdir: dst2, ...(mapped ? { idMap: parseIdMap(TEST_MAP_LINES) } : {}) });
    expect(snapshotTree(dst2)).toEqual(before);
    await p.restoreContainerCleanup(volname, 'chunks', {});
    expect(existsSync(path.dirname(tarPath!))).toBe(false);

    // prune and delete are unchanged: the manifest and index go, the chunks stay for GC
    const chunk = chunkKey(didxDigests((await store.objects.get(store.objectKey(volname, 'root.didx')))!)[0]!);
    await p.storage.removeBackup!(volname);
    expect(await store.listBackups(200)).toEqual([]);
    expect(await store.objects.get(store.objectKey(volname, 'root.didx'))).toBeNull();
    expect(await store.objects.head(chunk)).not.toBeNull();
  });

  it('a second backup of a big tree after one file changed uploads only the chunks around it', async () => {
    const work = await tempDir();
    const src = path.join(work, 'big');
    mkdirSync(src);
    // 48 MiB of incompressible files, owned by the container's root (host uid 100000)
    for (let i = 0; i < 12; i++) {
      const f = path.join(src, `file-${String(i).padStart(2, '0')}.bin`);
      writeFileSync(f, randomBytes(4 * MiB));
      lchownSync(f, 100000, 100000);
    }
    // and 2000 small files between them (headers all through the stream, as in a real tree)
    const etc = path.join(src, 'etc');
    mkdirSync(etc);
    for (let i = 0; i < 2000; i++) {
      writeFileSync(path.join(etc, `conf-${i}`), randomBytes(700));
      lchownSync(path.join(etc, `conf-${i}`), 100000, 100000);
    }
    lchownSync(etc, 100000, 100000);
    lchownSync(src, 100000, 100000);
    const store = await ChunkStore.open(fresh(), { storeid: 'chunks' });
    let clock = Date.UTC(2026, 11, 1, 2, 0, 0);
    const lines: string[] = [];
    const first = await backup(provider(store, lines, () => clock), src, true, work);
    const m1 = (await store.readManifest(first)).archive!;
    expect(m1.chunks).toBeGreaterThanOrEqual(4); // 55 MB in chunks of at most 16 MiB
    expect(m1.chunksUploaded).toBe(m1.chunks);

    // 4 KiB in the middle of one big file, and one small file rewritten (every file was read
    // by the first backup, so its atime changed too: not part of the stream)
    const fd = openSync(path.join(src, 'file-05.bin'), 'r+');
    writeSync(fd, randomBytes(4096), 0, 4096, 2 * MiB);
    closeSync(fd);
    writeFileSync(path.join(etc, 'conf-1234'), randomBytes(700));
    clock += 86_400_000;
    lines.length = 0;
    const second = await backup(provider(store, lines, () => clock), src, true, work);
    const m2 = (await store.readManifest(second)).archive!;
    expect(m2.previous).toBe(first);
    // each edit changes the chunk it is in, and maybe the next one when a cut point moved (two
    // edits may share a chunk)
    expect(m2.chunksUploaded).toBeGreaterThanOrEqual(1);
    expect(m2.chunksUploaded).toBeLessThanOrEqual(4);
    expect(m2.chunksReused).toBe(m2.chunks - m2.chunksUploaded);
    expect(lines.join('\n')).toMatch(new RegExp(`root.didx: ${m2.size} bytes of tar stream; ${m2.chunks} chunks: ${m2.chunksUploaded} uploaded, ${m2.chunksReused} already stored`));
    // the two indexes share all but the new chunks
    const d1 = new Set(didxDigests((await store.objects.get(store.objectKey(first, 'root.didx')))!).map((d) => d.toString('hex')));
    const d2 = didxDigests((await store.objects.get(store.objectKey(second, 'root.didx')))!).map((d) => d.toString('hex'));
    expect(d2.filter((d) => !d1.has(d)).length).toBe(m2.chunksUploaded);

    const before = snapshotTree(src);
    const dst = path.join(work, 'dst');
    mkdirSync(dst);
    await restoreContainer({ provider: provider(store), volname: second, storeid: 'chunks', rootdir: dst, idMap: TEST_MAP_LINES });
    expect(snapshotTree(dst)).toEqual(before);
  });

  it('a damaged chunk fails the restore naming it; the tar file of the Proxmox VE path is not left behind; after a failed verify the next backup does not take its chunks as known', async () => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    mkdirSync(src);
    // more than the largest chunk (16 MiB): at least two chunks, whatever the content
    for (let i = 0; i < 5; i++) writeFileSync(path.join(src, `f${i}`), randomBytes(4 * MiB));
    const store = await ChunkStore.open(fresh(), { storeid: 'chunks' });
    const p = provider(store);
    const volname = await backup(p, src, false, work);
    const digests = didxDigests((await store.objects.get(store.objectKey(volname, 'root.didx')))!);
    expect(digests.length).toBeGreaterThanOrEqual(2);
    // verify reads the dynamic index and checks every chunk it names
    expect(await verifyChunkStore(store)).toEqual([{ volid: store.volid(volname), ok: true, problems: [], chunks: { total: new Set(digests.map((d) => d.toString('hex'))).size, checked: new Set(digests.map((d) => d.toString('hex'))).size } }]);
    const victim = chunkKey(digests[1]!);
    const object = (await store.objects.get(victim))!;
    object[object.length - 1]! ^= 1;
    await store.objects.put(victim, object);

    const [found] = await verifyChunkStore(store);
    expect(found!.ok).toBe(false);
    expect(found!.problems.join('\n')).toContain(victim);
    const dst = path.join(work, 'dst');
    mkdirSync(dst);
    const err = await rejection(restoreContainer({ provider: p, volname, storeid: 'chunks', rootdir: dst }));
    expect(err.code).toBe('ERR_RESTORE');
    expect(err.message).toContain(victim);
    expect((err.cause as { code?: string }).code).toBe('ERR_BACKUP_CORRUPT');

    const tmp = mkdtempSync(path.join(work, 'tmp-'));
    const saved = process.env.TMPDIR;
    process.env.TMPDIR = tmp;
    try {
      const init = await rejection(p.restoreContainerInit(volname, 'chunks', {}));
      expect(init.code).toBe('ERR_BACKUP_CORRUPT');
      expect(init.message).toContain(victim);
      expect(readdirSync(tmp)).toEqual([]);
    } finally {
      if (saved === undefined) delete process.env.TMPDIR;
      else process.env.TMPDIR = saved;
    }

    // repaired; then a chunk lost by hand: a full verify records the failure, and the next backup
    // does not take that backup's chunks as known: it asks the store for each (HEAD) and uploads
    // the lost one again
    object[object.length - 1]! ^= 1;
    await store.objects.put(victim, object);
    const lost = chunkKey(digests[0]!);
    await store.objects.delete(lost);
    expect((await verifyChunkStore(store))[0]!.ok).toBe(false);
    expect(await store.readVerifyState(volname)).toMatchObject({ state: 'failed', missing: 1, bad: 0 });
    const lines: string[] = [];
    const next = await backup(provider(store, lines, () => Date.now() + 3_600_000), src, false, work);
    expect(lines.join('\n')).toContain(`the previous backup ${volname} cannot be used for deduplication (its last verify failed (1 chunk(s) missing, 0 damaged))`);
    expect((await store.readManifest(next)).archive!.previous).toBeUndefined();
    expect(await store.objects.head(lost)).not.toBeNull();
    const healed = path.join(work, 'healed');
    mkdirSync(healed);
    await restoreContainer({ provider: p, volname: next, storeid: 'chunks', rootdir: healed });
    expect(snapshotTree(healed)).toEqual(snapshotTree(src));
  });

  it('the job signal stops a container backup (bandwidth-limited): no backup, no index, no writer record is left', async () => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    mkdirSync(src);
    writeFileSync(path.join(src, 'big'), randomBytes(16 * MiB)); // 16 s at 1 MiB/s
    const store = await ChunkStore.open(fresh(), { storeid: 'chunks' });
    const controller = new AbortController();
    setTimeout(() => controller.abort(new Error('cancelled by the test')), 1000);
    const t0 = performance.now();
    const job = runBackupJob({ provider: provider(store), storeid: 'chunks', tmpdir: work, bandwidthLimit: 1 * MiB, signal: controller.signal, guests: [{ vmid: 200, type: 'lxc', rootdir: src, config: 'hostname: ct200\n' }] });
    await expect(job).rejects.toMatchObject({ code: 'ERR_JOB_ABORTED' });
    expect((performance.now() - t0) / 1000).toBeLessThan(10); // stopped, not run to its end
    expect(await store.listBackups(200)).toEqual([]);
    expect((await listedNow(store.objects, 'backups/')).map((o) => o.key)).toEqual([]);
    expect(await listedNow(store.objects, 'writers/')).toEqual([]);
  });

  it('garbage collection keeps the chunks a container index names and deletes the others one run later', async () => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    mkdirSync(src);
    // more than the largest chunk (16 MiB): the changed first file leaves later chunks shared
    for (let i = 0; i < 6; i++) writeFileSync(path.join(src, `f${i}`), randomBytes(4 * MiB));
    const store = await ChunkStore.open(fresh(), { storeid: 'chunks' });
    let clock = Date.UTC(2026, 11, 1, 2, 0, 0);
    const first = await backup(provider(store, [], () => clock), src, false, work);
    writeFileSync(path.join(src, 'f0'), randomBytes(3 * MiB));
    clock += 3_600_000;
    const second = await backup(provider(store, [], () => clock), src, false, work);
    await store.deleteBackup(first);
    const named = new Set(didxDigests((await store.objects.get(store.objectKey(second, 'root.didx')))!).map((d) => chunkKey(d)));
    const chunks = async (): Promise<string[]> => (await store.objects.list('chunks/')).map((o) => o.key).sort();
    expect((await chunks()).length).toBeGreaterThan(named.size);
    await new Promise((r) => setTimeout(r, 1100)); // LastModified has whole seconds
    const quiet = { cutoffMarginSeconds: 0, log: () => undefined };
    const run1 = await collectGarbage(store, quiet);
    expect(run1.indexes).toBe(1);
    await collectGarbage(store, quiet);
    expect(await chunks()).toEqual([...named].sort());
    const dst = path.join(work, 'dst');
    mkdirSync(dst);
    const before = snapshotTree(src);
    await restoreContainer({ provider: provider(store), volname: second, storeid: 'chunks', rootdir: dst });
    expect(snapshotTree(dst)).toEqual(before);
  });

  it('the command line: a container backed up to and restored from an s3:// URL', async () => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    mkdirSync(src);
    buildTree(src, { idBase: 100000 });
    const before = snapshotTree(src);
    const o = fresh();
    const env = { ...process.env, AWS_ACCESS_KEY_ID: garage.cluster.accessKeyId, AWS_SECRET_ACCESS_KEY: garage.cluster.secretAccessKey, PVE_BACKUP_PROVIDER_STATE_DIR: work };
    const cli = (...args: string[]): ReturnType<typeof spawnSync> => spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env });
    const s3 = ['--store', `s3://${o.bucket}/${o.prefix}`, '--endpoint', garage.cluster.endpoint, '--region', garage.cluster.region];
    const idmap = TEST_MAP_LINES.flatMap((l) => ['--idmap', l]);
    const b = cli('backup', ...s3, '--vmid', '200', '--rootdir', src, ...idmap, '--json');
    expect(b.status, String(b.stderr)).toBe(0);
    const { volid } = JSON.parse(String(b.stdout)) as { volid: string };
    expect(volid).toMatch(/:backup\/200\/lxc-/);
    const dst = path.join(work, 'dst');
    mkdirSync(dst);
    const r = cli('restore', volid, ...s3, '--to', dst, ...idmap);
    expect(r.status, String(r.stderr)).toBe(0);
    expect(snapshotTree(dst)).toEqual(before);
  });

  it('an encrypted store: chunks encrypted and keyed, restore byte-exact; without the key nothing is read', async () => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    mkdirSync(src);
    buildTree(src, { idBase: 100000 });
    const marker = Buffer.from('plain text that must not be stored as such '.repeat(1000));
    writeFileSync(path.join(src, 'marker.txt'), marker);
    lchownSync(path.join(src, 'marker.txt'), 100000, 100000);
    const before = snapshotTree(src);
    const keyFile = path.join(work, 'store.key');
    await createKeyFile(keyFile);
    const o = fresh({ keyFile });
    const store = await ChunkStore.open(o, { storeid: 'chunks' });
    const p = provider(store);
    const volname = await backup(p, src, true, work);
    const m = await store.readManifest(volname);
    expect(m.keyFingerprint).toBe(store.key!.fingerprint);
    for (const d of didxDigests((await store.objects.get(store.objectKey(volname, 'root.didx')))!)) {
      const object = (await store.objects.get(chunkKey(d)))!;
      expect(object[8]! & 2).toBe(2); // encrypted (docs/chunk-store.md, chunk object flags)
      expect(object.includes(marker.subarray(0, 64))).toBe(false);
    }
    const dst = path.join(work, 'dst');
    mkdirSync(dst);
    await restoreContainer({ provider: p, volname, storeid: 'chunks', rootdir: dst, idMap: TEST_MAP_LINES });
    expect(snapshotTree(dst)).toEqual(before);

    const { keyFile: _k, ...plain } = o;
    const keyless = provider(await ChunkStore.open(plain, { storeid: 'chunks' }));
    const dst2 = path.join(work, 'dst2');
    mkdirSync(dst2);
    const err = await rejection(restoreContainer({ provider: keyless, volname, storeid: 'chunks', rootdir: dst2 }));
    expect((err.cause as { code?: string }).code).toBe('ERR_KEY_REQUIRED');
    expect(readdirSync(dst2)).toEqual([]);
  });
});

/** Bytes of data in the test tree's sparse file (the stream holds at least these). */
const SPARSE_DATA = 8192;

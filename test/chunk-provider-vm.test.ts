/**
 * The chunk provider end to end through the native chunk jobs: a VM disk on qemu-storage-daemon
 * backed up by the job runner into a chunk store on the Garage cluster (three nodes,
 * replication factor 3), full, then incremental after the guest writes (only the changed chunks
 * uploaded: the manifest's counters), both restored byte-exact; an encrypted store restores with
 * its key and refuses another key or none; the command line backs up, lists and restores with an
 * s3:// URL.
 */
import { spawnSync } from 'node:child_process';
import { readFile, rm } from 'node:fs/promises';
import path from 'node:path';

import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { createKeyFile } from '../lib/chunk-provider/key.js';
import { ChunkProvider } from '../lib/chunk-provider/provider.js';
import { ChunkStore } from '../lib/chunk-provider/store.js';
import { restoreVm, runBackupJob } from '../lib/index.js';
import { startDisk, vmGuest, type Disk } from './helpers/directory.js';
import { expectSameBytes, qemuIo, rawContent } from './helpers/images.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { listedNow, useS3Cluster } from './helpers/use-s3-cluster.js';

const MiB = 2 ** 20;
const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');

describe('chunk provider: VM backup and restore through the native chunk jobs (Garage, 3 nodes)', { timeout: 300_000 }, () => {
  const garage = useS3Cluster('vm');
  const fresh = garage.fresh;

  beforeAll(async () => {
  }, 120_000);
  afterEach(async () => {
    await stopAll();
  });
  afterAll(async () => {
  });

  async function backup(provider: ChunkProvider, disk: Disk, scratch: string, extra: { notesTemplate?: string; protected?: boolean } = {}): Promise<{ volname: string; content: Buffer }> {
    const content = disk.snapshot();
    const r = await runBackupJob({ provider, storeid: 'chunks', guests: [vmGuest(disk)], tmpdir: scratch, ...extra });
    expect(r.guests[0]!.error).toBeUndefined();
    return { volname: r.guests[0]!.volname!, content };
  }

  async function expectRestores(provider: ChunkProvider, volname: string, expected: Buffer, scratch: string): Promise<void> {
    const target = path.join(scratch, `${volname.replace(/\//g, '_')}.raw`);
    await rm(target, { force: true });
    const r = await restoreVm({ provider, volname, storeid: 'chunks', targets: { disk0: target } });
    expect(r.devices).toEqual([{ device: 'disk0', size: expected.length, target }]);
    expectSameBytes(await readFile(target), expected, volname);
    await rm(target, { force: true });
  }

  it('full, then incremental uploading only the changed chunks; both restore byte-exact; a backup without manifest is not listed', async () => {
    const disk = await startDisk(24 * MiB); // 6 chunks of 4 MiB
    await disk.write(0x11, 0, 8 * MiB); // chunks 0, 1
    await disk.write(0x22, 12 * MiB + 4096, MiB); // chunk 3
    const scratch = await tempDir();
    const store = await ChunkStore.open(fresh());
    const provider = new ChunkProvider({ storeid: 'chunks', scfg: {}, log: () => {} }, { store, stateDir: scratch });
    const full = await backup(provider, disk, scratch);
    const m1 = await store.readManifest(full.volname);
    // chunks 0 and 1 hold the same bytes: stored once (dedup by content)
    expect(m1.devices!['disk0']).toMatchObject({ size: 24 * MiB, chunksUploaded: 2, chunksReused: 1, chunksZero: 3 });
    expect((await store.objects.list('chunks/')).length).toBe(2);

    await disk.write(0x33, 5 * MiB, 64 * 1024); // chunk 1 only
    const incr = await backup(provider, disk, scratch, { notesTemplate: 'after {{vmid}} wrote' });
    const m2 = await store.readManifest(incr.volname);
    expect(m2.devices!['disk0']).toMatchObject({ bitmapMode: 'reuse', previous: full.volname, chunksUploaded: 1 });
    expect((await store.objects.list('chunks/')).length).toBe(3);
    expect(m2.devices!['disk0']!.bytesRead).toBeLessThanOrEqual(4 * MiB);

    await expectRestores(provider, full.volname, full.content, scratch);
    await expectRestores(provider, incr.volname, incr.content, scratch);

    const listed = await store.listBackups();
    expect(listed.map((b) => [b.volname, b.notes, b.previous])).toEqual([
      [full.volname, undefined, undefined],
      [incr.volname, 'after 100 wrote', `chunks:${full.volname}`],
    ]);
    // configuration and task log are in the backup
    expect(await provider.archiveGetGuestConfig(incr.volname)).toBe('name: vm100\n');
    expect((await store.getBlob(m2, 'backup.log.blob')).toString()).toMatch(/disk0/); // the runner's task log

    // pruning the full backup leaves the incremental whole: no chains; chunks stay for GC
    await store.pruneBackups({ keep: { keepLast: 1 }, vmid: 100 });
    expect((await store.listBackups()).map((b) => b.volname)).toEqual([incr.volname]);
    expect((await store.objects.list('chunks/')).length).toBe(3);
    await expectRestores(provider, incr.volname, incr.content, scratch);
    // a backup whose manifest is gone does not exist
    await store.objects.delete(store.objectKey(incr.volname, 'manifest.json'));
    expect(await store.listBackups()).toEqual([]);
  });

  it('a cancelled backup leaves no manifest, no index and no writer record; the next one is complete', async () => {
    const disk = await startDisk(32 * MiB);
    for (let i = 0; i < 8; i++) await disk.write(0x40 + i, i * 4 * MiB, 4 * MiB); // 8 different chunks
    const scratch = await tempDir();
    const store = await ChunkStore.open(fresh());
    const abort = new AbortController();
    // aborted in the middle of the copy: after a quarter of the disk was read
    const provider = new ChunkProvider({ storeid: 'chunks', scfg: {}, log: () => {} }, { store, stateDir: scratch, onProgress: (p) => p.done >= 8 * MiB && abort.abort() });
    const running = runBackupJob({ provider, storeid: 'chunks', guests: [vmGuest(disk)], tmpdir: scratch, bandwidthLimit: 8 * MiB, signal: abort.signal });
    const err = await running.then(
      () => undefined,
      (e: unknown) => e as { code?: string; result?: { guests: Array<{ status: string }> } },
    );
    expect(err?.code).toBe('ERR_JOB_ABORTED');
    expect(err?.result?.guests[0]?.status).toBe('failed');
    expect((await store.objects.list('chunks/')).length).toBeGreaterThan(0); // it was uploading: those are garbage for GC
    expect(await store.listBackups()).toEqual([]);
    expect((await listedNow(store.objects, 'backups/')).map((o) => o.key)).toEqual([]);
    expect(await listedNow(store.objects, 'writers/')).toEqual([]);
    const b = await backup(new ChunkProvider({ storeid: 'chunks', scfg: {}, log: () => {} }, { store, stateDir: scratch }), disk, scratch);
    await expectRestores(provider, b.volname, b.content, scratch);
  });

  it('an encrypted store: restores with its key; another key is ERR_KEY_MISMATCH, none ERR_KEY_REQUIRED', async () => {
    const disk = await startDisk(8 * MiB);
    await disk.write(0x5a, MiB, 2 * MiB);
    const scratch = await tempDir();
    const keyFile = path.join(scratch, 'store.key');
    const otherKey = path.join(scratch, 'other.key');
    await createKeyFile(keyFile);
    await createKeyFile(otherKey);
    const o = fresh();
    const store = await ChunkStore.open({ ...o, keyFile });
    const provider = new ChunkProvider({ storeid: 'chunks', scfg: {}, log: () => {} }, { store, stateDir: scratch });
    const b = await backup(provider, disk, scratch);
    await expectRestores(provider, b.volname, b.content, scratch);
    // no chunk object holds the plain data
    const chunks = await store.objects.list('chunks/');
    expect(chunks.length).toBeGreaterThan(0);
    for (const c of chunks) expect((await store.objects.get(c.key))!.includes(Buffer.alloc(4096, 0x5a))).toBe(false);
    await expect(ChunkStore.open({ ...o, keyFile: otherKey })).rejects.toMatchObject({ code: 'ERR_KEY_MISMATCH' });
    const keyless = new ChunkProvider({ storeid: 'chunks', scfg: {}, log: () => {} }, { store: await ChunkStore.open(o), stateDir: scratch });
    const target = path.join(scratch, 'nokey.raw');
    const err = await restoreVm({ provider: keyless, volname: b.volname, storeid: 'chunks', targets: { disk0: target } }).catch((e: unknown) => e);
    expect((err as { cause?: { code?: string } }).cause?.code).toBe('ERR_KEY_REQUIRED');
  });

  it('the command line: backup, list and restore with an s3:// URL', async () => {
    const disk = await startDisk(8 * MiB);
    await disk.write(0x77, 0, 3 * MiB);
    await disk.q.kill(); // the CLI serves the image itself
    const image = disk.q.images['disk0']!;
    const scratch = await tempDir();
    const o = fresh();
    const env = { ...process.env, AWS_ACCESS_KEY_ID: garage.cluster.accessKeyId, AWS_SECRET_ACCESS_KEY: garage.cluster.secretAccessKey, PVE_BACKUP_PROVIDER_STATE_DIR: scratch };
    const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env });
    const s3 = ['--store', `s3://${o.bucket}/${o.prefix}`, '--endpoint', garage.cluster.endpoint, '--region', garage.cluster.region];
    const b = cli('backup', ...s3, '--vmid', '100', '--disk', `disk0=${image}`, '--json');
    expect(b.status, b.stderr).toBe(0);
    const { volid } = JSON.parse(b.stdout) as { volid: string };
    const list = JSON.parse(cli('list', ...s3, '--json').stdout) as Array<{ volid: string }>;
    expect(list.map((x) => x.volid)).toEqual([volid]);
    // what backup --json reported (one backup looked up alone) is what list says of it, field by field in order
    const { warnings: _w, steps: _s, copies: _c, ...reported } = JSON.parse(b.stdout) as Record<string, unknown>;
    expect(JSON.stringify(reported)).toBe(JSON.stringify(list[0]));
    const out = path.join(scratch, 'out');
    const r = cli('restore', volid, ...s3, '--to', out);
    expect(r.status, r.stderr).toBe(0);
    expectSameBytes(await readFile(path.join(out, 'disk0.raw')), disk.content, volid);

    // the stopped VM's disk changes; the next backup is incremental over the first (QEMU's bitmap persists in the qcow2 image)
    qemuIo(image, 'qcow2', ['write -P 0x78 6M 64k']);
    const b2 = cli('backup', ...s3, '--vmid', '100', '--disk', `disk0=${image}`);
    expect(b2.status, b2.stderr).toBe(0);
    expect(b2.stdout).toMatch(new RegExp(`: chunks, 8.00 MiB, incremental \\(unchanged chunks from ${volid.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\)`));
    const list2 = JSON.parse(cli('list', ...s3, '--json').stdout) as Array<{ volid: string }>;
    expect(list2).toHaveLength(2);
    const out2 = path.join(scratch, 'out2');
    expect(cli('restore', list2[1]!.volid, ...s3, '--to', out2).status).toBe(0);
    expectSameBytes(await readFile(path.join(out2, 'disk0.raw')), rawContent(image, 'qcow2', path.join(scratch, 'now.raw')), list2[1]!.volid);
  });
});

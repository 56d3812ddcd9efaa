/**
 * The native NBD server over a chunk store on a real distributed S3 store (Garage, three nodes,
 * replication factor 3), read by real clients: `qemu-img convert` and `nbdcopy` of an export
 * equal the backed-up disk byte for byte, `nbdinfo` sees a read-only multi-conn export whose
 * all-zero chunks are holes that read as zeros; Proxmox VE's restore path
 * (`restoreVmVolumeInit`) gives a local raw file (qemu-storage-daemon's FUSE export over the
 * server) that `qemu-img info` calls raw without backing file, byte-exact, unmounted by the
 * cleanup; a damaged chunk is a read error (EIO) naming the chunk, never data; an encrypted
 * store is served with its key only; and
 * `pve-backup-provider serve` end to end with nbdinfo, stopped by SIGTERM, on a chunk store and
 * on a directory store (its qcow2 chain through qemu-storage-daemon).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, statSync, watch } from 'node:fs';
import { mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';

import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { createKeyFile } from '../lib/chunk-provider/key.js';
import { ChunkProvider } from '../lib/chunk-provider/provider.js';
import { DirectoryProvider } from '../lib/directory-provider/provider.js';
import { serveBackup } from '../lib/chunk-provider/nbd-server.js';
import type { S3StoreOptions } from '../lib/chunk-provider/s3.js';
import { ChunkStore, chunkKey } from '../lib/chunk-provider/store.js';
import { isMountPoint } from '../lib/qemu/storage-daemon.js';
import { runBackupJob } from '../lib/index.js';
import { startDisk, vmGuest } from './helpers/directory.js';
import { expectSameBytes } from './helpers/images.js';
import { execFileP, stopAll, tempDir } from './helpers/qemu.js';
import { useS3Cluster } from './helpers/use-s3-cluster.js';
import { requireTool } from './helpers/tools.js';
import { FILE_SIZE_INFO } from './helpers/pve-checks.js';

const MiB = 2 ** 20;
const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');

/** Runs a tool without blocking the event loop (the server reports read errors on it); its exit status and output. */
async function run(cmd: string, args: string[]): Promise<{ status: number; out: string }> {
  return execFileP(cmd, args).then(
    (r) => ({ status: 0, out: `${r.stdout}${r.stderr}` }),
    (e: { code?: number; stdout?: string; stderr?: string }) => ({ status: typeof e.code === 'number' ? e.code : 1, out: `${e.stdout ?? ''}${e.stderr ?? ''}` }),
  );
}

/** `nbdinfo --map` as [offset, length, type] (type 3 = hole,zero; 0 = data). */
async function allocationMap(uri: string): Promise<Array<[number, number, number]>> {
  requireTool('nbdinfo', 'libnbd-bin');
  const { stdout } = await execFileP('nbdinfo', ['--map', uri]);
  return stdout
    .trim()
    .split('\n')
    .map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number) as [number, number, number]);
}


/** `pve-backup-provider serve ARGS` in a child: its exit code, and the first line it prints (it fails if serve exits first). */
function serve(args: string[], env?: NodeJS.ProcessEnv): { child: ChildProcess; exited: Promise<number | null>; firstLine: Promise<string> } {
  const child = spawn(process.execPath, [CLI, 'serve', ...args], { ...(env ? { env } : {}), stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const firstLine = new Promise<string>((resolve, reject) => {
    createInterface({ input: child.stdout! }).once('line', resolve);
    void exited.then((code) => reject(new Error(`serve exited with ${code}: ${stderr}`)));
  });
  return { child, exited, firstLine };
}
describe('NBD server over the chunk store (Garage, 3 nodes)', { timeout: 300_000 }, () => {
  const garage = useS3Cluster('nbd');
  const fresh = garage.fresh;

  beforeAll(async () => {
  }, 120_000);
  afterEach(async () => {
    await stopAll();
  });
  afterAll(async () => {
  });

  /** A 24 MiB disk backed up: chunks 0, 1, 4 hold data; 2, 3, 5 are all zero. */
  async function backedUp(): Promise<{ store: ChunkStore; o: S3StoreOptions; volname: string; content: Buffer; scratch: string }> {
    const disk = await startDisk(24 * MiB);
    await disk.write(0x11, 0, 4 * MiB);
    await disk.write(0x22, 5 * MiB, MiB);
    await disk.write(0x33, 16 * MiB + 4096, 64 * 1024);
    const scratch = await tempDir();
    const o = fresh();
    const store = await ChunkStore.open(o);
    const provider = new ChunkProvider({ storeid: 'chunks', scfg: {}, log: () => {} }, { store, stateDir: scratch });
    const content = disk.snapshot();
    const r = await runBackupJob({ provider, storeid: 'chunks', guests: [vmGuest(disk)], tmpdir: scratch });
    expect(r.guests[0]!.error).toBeUndefined();
    await stopAll(); // the disk (and its folders) are gone: everything below reads the store
    return { store, o, volname: r.guests[0]!.volname!, content, scratch: await tempDir() };
  }

  it('qemu-img convert and nbdcopy of the export equal the disk; nbdinfo: read-only, multi-conn, zero chunks as holes', async () => {
    const { store, volname, content, scratch } = await backedUp();
    const errors: string[] = [];
    const server = await serveBackup(store, volname, { socket: path.join(scratch, 'nbd.sock'), onError: (m) => errors.push(m) });
    try {
      expect(server.exports).toEqual(['disk0']);
      const uri = server.uri('disk0');
      expect((statSync(server.socket).mode & 0o777).toString(8)).toBe('600');

      const info = JSON.parse((await execFileP(requireTool('nbdinfo', 'libnbd-bin'), ['--json', uri])).stdout) as { exports: Array<Record<string, unknown>> };
      expect(info.exports[0]).toMatchObject({ 'export-name': 'disk0', 'export-size': 24 * MiB, is_read_only: true, can_multi_conn: true });

      const converted = path.join(scratch, 'converted.raw');
      await execFileP(requireTool('qemu-img', 'qemu-utils'), ['convert', '-f', 'raw', '-O', 'raw', uri, converted]);
      expectSameBytes(await readFile(converted), content, 'qemu-img convert');
      // qemu-img skipped the zero chunks (block status): they are holes in its output
      const { stdout } = await execFileP('qemu-img', ['map', '--output=json', '-f', 'raw', uri]);
      const zeroes = (JSON.parse(stdout) as Array<{ start: number; length: number; zero: boolean; data: boolean }>).filter((e) => e.zero && !e.data).map((e) => [e.start, e.length]);
      expect(zeroes).toEqual([
        [8 * MiB, 8 * MiB],
        [20 * MiB, 4 * MiB],
      ]);

      const copied = path.join(scratch, 'copied.raw');
      await execFileP(requireTool('nbdcopy', 'libnbd-bin'), [uri, copied]); // several connections (multi-conn)
      expectSameBytes(await readFile(copied), content, 'nbdcopy');

      expect(await allocationMap(uri)).toEqual([
        [0, 8 * MiB, 0],
        [8 * MiB, 8 * MiB, 3],
        [16 * MiB, 4 * MiB, 0],
        [20 * MiB, 4 * MiB, 3],
      ]);
      // writes are refused by the server (qemu-io opens it read-only: nothing else can)
      const w = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 0 4096', uri], { encoding: 'utf8' });
      expect(`${w.stdout}${w.stderr}`).toMatch(/read.only|Permission|Operation not permitted/i);
      expect(errors).toEqual([]);
    } finally {
      await server.stop();
    }
    expect(existsSync(server.socket)).toBe(false);
  });

  it("restoreVmVolumeInit: a raw file without backing file per qemu-img info, byte-exact; cleanup unmounts it; an unknown disk is refused", async () => {
    const { store, volname, content, scratch } = await backedUp();
    const log: string[] = [];
    const provider = new ChunkProvider({ storeid: 'chunks', scfg: {}, log: (level, m) => log.push(`${level}: ${m}`) }, { store, stateDir: scratch });
    expect(await provider.restoreVmInit(volname)).toEqual({ disk0: { size: 24 * MiB } });
    const { qemuImgPath } = await provider.restoreVmVolumeInit(volname, 'disk0', {});
    try {
      // what qemu-server's file_size_info($path, undef, 'raw', 1) needs: a file, raw, no backing file
      const st = statSync(qemuImgPath);
      expect(st.isFile()).toBe(true);
      expect(st.size).toBe(24 * MiB);
      expect((await execFileP(requireTool('perl', 'perl'), ['-e', FILE_SIZE_INFO, qemuImgPath])).stdout.trim()).toBe(`${24 * MiB} raw ${24 * MiB}`);
      const info = JSON.parse((await execFileP('qemu-img', ['info', '--output=json', '-f', 'raw', qemuImgPath])).stdout) as Record<string, unknown>;
      expect(info['format']).toBe('raw');
      expect(info['virtual-size']).toBe(24 * MiB);
      expect(info['backing-filename']).toBeUndefined();
      // what qemu-server then runs
      const out = path.join(scratch, 'restored.raw');
      await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', qemuImgPath, out]);
      expectSameBytes(await readFile(out), content, 'restored through the FUSE file');
    } finally {
      await provider.restoreVmVolumeCleanup(volname, 'disk0', {});
    }
    expect(await isMountPoint(qemuImgPath)).toBe(false);
    expect(existsSync(path.dirname(qemuImgPath))).toBe(false);
    expect(log.filter((l) => !l.startsWith('info: '))).toEqual([]); // no read failed, no connection broke
    const err = await provider.restoreVmVolumeInit(volname, 'disk9', {}).then(
      () => undefined,
      (e: unknown) => e as { code?: string },
    );
    expect(err?.code).toBe('ERR_UNKNOWN_VOLUME');
    // restoreVmCleanup stops what a skipped volume cleanup left
    const again = await provider.restoreVmVolumeInit(volname, 'disk0', {});
    await provider.restoreVmCleanup(volname);
    expect(await isMountPoint(again.qemuImgPath)).toBe(false);
  });

  it('a damaged chunk is a read error naming the chunk, never data; the other chunks still read', async () => {
    const { store, volname, content, scratch } = await backedUp();
    const m = await store.readManifest(volname);
    const digest = (await store.readFixedIndex(m, 'disk0')).digests[4]!;
    const key = chunkKey(digest);
    const object = (await store.objects.get(key))!;
    object[object.length - 1]! ^= 0x01;
    await store.objects.put(key, object);
    const errors: string[] = [];
    const server = await serveBackup(store, volname, { socket: path.join(scratch, 'nbd.sock'), onError: (e) => errors.push(e) });
    try {
      const uri = server.uri('disk0');
      const convert = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, path.join(scratch, 'bad.raw')]);
      expect(convert.status).not.toBe(0);
      expect(convert.out).toMatch(/Input\/output error/);
      expect(errors.length).toBeGreaterThan(0);
      expect(errors[0]).toContain(key);
      expect(errors[0]).toMatch(/READ at \d+ length \d+ of export disk0 failed/);
      // chunk 0 reads (and equals the disk); a read touching chunk 4 fails
      const ok = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x11 0 4M', uri]);
      expect(ok.status, ok.out).toBe(0);
      expect(ok.out).not.toMatch(/Pattern verification failed|error/i);
      const bad = await run('qemu-io', ['-r', '-f', 'raw', '-c', `read ${16 * MiB} 4096`, uri]);
      expect(bad.out).toMatch(/Input\/output error/);
    } finally {
      await server.stop();
    }
    // Proxmox VE's path: qemu-img reading the FUSE file fails the same way; the task log names the chunk
    const log: string[] = [];
    const provider = new ChunkProvider({ storeid: 'chunks', scfg: {}, log: (level, m) => log.push(`${level}: ${m}`) }, { store, stateDir: scratch });
    const { qemuImgPath } = await provider.restoreVmVolumeInit(volname, 'disk0', {});
    try {
      const convert = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', qemuImgPath, path.join(scratch, 'bad2.raw')]);
      expect(convert.status).not.toBe(0);
      expect(convert.out).toMatch(/Input\/output error/);
      expect(log.filter((l) => l.startsWith('err: ') && l.includes(key)).length).toBeGreaterThan(0);
      // the data before the damaged chunk is what was backed up
      const head = Buffer.alloc(4 * MiB);
      const fd = await open(qemuImgPath, 'r');
      await fd.read(head, 0, head.length, 0).finally(() => fd.close());
      expectSameBytes(head, content.subarray(0, 4 * MiB), 'chunk 0 through the FUSE file');
    } finally {
      await provider.restoreVmVolumeCleanup(volname, 'disk0', {});
    }
  });

  it('an encrypted store is served with its key; without it serveBackup fails with ERR_KEY_REQUIRED before a socket exists', async () => {
    const disk = await startDisk(8 * MiB);
    await disk.write(0x66, 0, 3 * MiB);
    const scratch = await tempDir();
    const keyDir = await mkdtemp(path.join(tmpdir(), 'pbp-key-')); // outlives stopAll, which removes the test folders
    const keyFile = path.join(keyDir, 'store.key');
    await createKeyFile(keyFile);
    const o = fresh();
    const store = await ChunkStore.open({ ...o, keyFile });
    const provider = new ChunkProvider({ storeid: 'chunks', scfg: {}, log: () => {} }, { store, stateDir: scratch });
    const content = disk.snapshot();
    const r = await runBackupJob({ provider, storeid: 'chunks', guests: [vmGuest(disk)], tmpdir: scratch });
    const volname = r.guests[0]!.volname!;
    await stopAll();
    const work = await tempDir();
    const socket = path.join(work, 'k.sock');
    const keyless = await ChunkStore.open(o);
    const err = await serveBackup(keyless, volname, { socket }).then(
      () => undefined,
      (e: unknown) => e as { code?: string },
    );
    expect(err?.code).toBe('ERR_KEY_REQUIRED');
    expect(existsSync(socket)).toBe(false);
    const server = await serveBackup(store, volname, { socket });
    try {
      const out = path.join(work, 'k.raw');
      await execFileP('nbdcopy', [server.uri('disk0'), out]);
      expectSameBytes(await readFile(out), content, 'encrypted store served');
    } finally {
      await server.stop();
      await rm(keyDir, { recursive: true, force: true });
    }
  });

  it('pve-backup-provider serve: prints the URI, serves it to nbdinfo, stops on SIGTERM; an unknown disk is refused', async () => {
    const { o, volname, content, scratch } = await backedUp();
    const env = { ...process.env, AWS_ACCESS_KEY_ID: garage.cluster.accessKeyId, AWS_SECRET_ACCESS_KEY: garage.cluster.secretAccessKey };
    const socket = path.join(scratch, 'serve.sock');
    const s3 = ['--store', `s3://${o.bucket}/${o.prefix}`, '--endpoint', garage.cluster.endpoint, '--region', garage.cluster.region];
    const { child, exited, firstLine } = serve([`chunks:${volname}`, ...s3, '--socket', socket, '--json'], env);
    try {
      const line = await firstLine;
      const printed = JSON.parse(line) as { volid: string; socket: string; exports: Array<{ name: string; uri: string }> };
      const uri = `nbd+unix:///disk0?socket=${socket}`;
      expect(printed).toEqual({ volid: `chunks:${volname}`, socket, exports: [{ name: 'disk0', uri }] });
      const { stdout } = await execFileP('nbdinfo', ['--size', uri]);
      expect(Number(stdout.trim())).toBe(24 * MiB);
      const out = path.join(scratch, 'served.raw');
      await execFileP('nbdcopy', [uri, out]);
      expectSameBytes(await readFile(out), content, 'served');
      await rm(out);
    } finally {
      child.kill('SIGTERM');
    }
    expect(await exited).toBe(0);
    expect(existsSync(socket)).toBe(false);

    const noDisk = spawnSync(process.execPath, [CLI, 'serve', `chunks:${volname}`, ...s3, '--socket', socket, '--device', 'disk9'], { encoding: 'utf8', env });
    expect(noDisk.status).toBe(1);
    expect(noDisk.stderr).toMatch(/has no disk disk9 .*\[ERR_UNKNOWN_VOLUME\]/);
    expect(existsSync(socket)).toBe(false);

  });

});

describe('serve on a directory store', { timeout: 120_000 }, () => {
  afterEach(async () => {
    await stopAll();
  });

  it('pve-backup-provider serve on a directory store: its qcow2 chain over qemu-storage-daemon, byte-exact', async () => {
    const disk = await startDisk(8 * MiB);
    await disk.write(0x44, MiB, 2 * MiB);
    const root = await tempDir();
    const provider = new DirectoryProvider({ storeid: 'dir1', scfg: { path: root }, log: () => {} });
    await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: root });
    await disk.write(0x55, 6 * MiB, MiB);
    const r = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: root }); // incremental: a chain of two
    const volname = r.guests[0]!.volname!;
    const content = disk.snapshot();
    const scratch = await tempDir('pbp-serve-');
    const socket = path.join(scratch, 'dir.sock');
    // what happens to the socket's name in its folder (inotify): it must appear private, never be
    // chmod-ed there ('change'), so no other user can connect before its mode is 0600
    const seen: string[] = [];
    const watcher = watch(scratch, (event, name) => seen.push(`${event} ${name}`));
    const { child, exited, firstLine } = serve([`dir1:${volname}`, '--store', root, '--socket', socket]);
    try {
      const line = await firstLine;
      const uri = `nbd+unix:///disk0?socket=${socket}`;
      expect(line).toBe(`disk0: ${uri}`);
      expect((statSync(socket).mode & 0o777).toString(8)).toBe('600');
      await new Promise((r) => setTimeout(r, 200)); // the watcher's events of the start-up, delivered
      watcher.close();
      expect(seen).toContain('rename dir.sock');
      expect(seen).not.toContain('change dir.sock');
      expect(readdirSync(scratch)).toEqual(['dir.sock']); // the private folder it was made in is gone
      const info = JSON.parse((await execFileP('nbdinfo', ['--json', uri])).stdout) as { exports: Array<Record<string, unknown>> };
      expect(info.exports[0]).toMatchObject({ 'export-size': 8 * MiB, is_read_only: true });
      const out = path.join(scratch, 'served.raw');
      await execFileP('nbdcopy', [uri, out]);
      expectSameBytes(await readFile(out), content, 'served from the directory store');
    } finally {
      child.kill('SIGTERM');
    }
    expect(await exited).toBe(0);
    expect(existsSync(socket)).toBe(false);
  });
});

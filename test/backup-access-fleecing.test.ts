/**
 * Fleecing space the operator chooses (`backup --fleecing-dir`), and a fleecing image that runs
 * out of space: the guest keeps writing, the backup fails with ERR_FLEECING_FULL naming the image,
 * and nothing is left behind. The small filesystem is a 2 MiB tmpfs (the tests run as root).
 */
import { execFileSync, spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { QmpClient } from '../lib/qmp/client.js';
import { createFleecingImage } from '../lib/qemu/fleecing.js';
import { nbdRead, nbdWrite, startStorageDaemon, stopAll, tempDir } from './helpers/qemu.js';

const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');
const MiB = 1024 * 1024;
const mounts: string[] = [];

afterEach(async () => {
  for (const m of mounts.splice(0)) execFileSync('umount', [m]);
  await stopAll();
});

/** A 2 MiB tmpfs: room for the fleecing image's metadata and a few clusters, not for 8 MiB of old data. */
async function smallFilesystem(): Promise<string> {
  const dir = await tempDir();
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m,mode=0700', 'tmpfs', dir]);
  mounts.push(dir);
  return dir;
}

describe('backup --fleecing-dir (qemu-storage-daemon, command line)', () => {
  it('puts the fleecing image there; when it fills up the guest keeps writing and the backup fails with ERR_FLEECING_FULL', async () => {
    const q = await startStorageDaemon({ size: 32 * MiB });
    const live = `nbd+unix:///live0?socket=${q.nbdPath!}`;
    await nbdWrite(live, 0x11, 0, 32 * MiB);
    await q.qmp.close(); // the CLI needs the monitor
    const dir = await tempDir();
    const fleece = await smallFilesystem();
    const store = path.join(dir, 'store');

    const child = spawn(
      process.execPath,
      [CLI, 'backup', '--store', store, '--vmid', '100', '--qmp', q.qmpPath, '--nbd-server', q.nbdPath!, '--devices', 'disk0', '--bwlimit', '1M', '--fleecing-dir', fleece],
      { env: { ...process.env, TMPDIR: dir } },
    );
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const status = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    await new Promise<void>((resolve, reject) => {
      const poll = setInterval(() => {
        if (/started backup access/.test(stderr)) {
          clearInterval(poll);
          resolve();
        }
      }, 20);
      void status.then(() => {
        clearInterval(poll);
        reject(new Error(`backup exited before the copy: ${stderr}`));
      });
    });
    const images = await fs.readdir(fleece);
    expect(images).toEqual([expect.stringMatching(/^pvebp-[0-9a-f]+-disk0-fleecing\.qcow2$/)]);

    // The guest overwrites 8 MiB the backup has not read yet: more old data than the tmpfs holds.
    await nbdWrite(live, 0x22, 16 * MiB, 8 * MiB);
    expect(await status).toBe(1);
    const last = stderr.trim().split('\n').at(-1)!;
    expect(last).toMatch(
      new RegExp(`^pve-backup-provider: backup of VM 100 failed: disk0: fleecing image ${fleece}/${images[0]!} ran out of space .*\\[ERR_FLEECING_FULL\\]$`),
    );

    // The guest's writes went through, and the access is gone with its image.
    const disk = await nbdRead(live, dir);
    expect(disk.subarray(16 * MiB, 24 * MiB).equals(Buffer.alloc(8 * MiB, 0x22))).toBe(true);
    expect(disk.subarray(0, 16 * MiB).equals(Buffer.alloc(16 * MiB, 0x11))).toBe(true);
    expect(await fs.readdir(fleece)).toEqual([]);
    const qmp = await QmpClient.connect(q.qmpPath);
    const nodes = await qmp.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true });
    const exports = await qmp.execute<Array<{ id: string }>>('query-block-exports');
    await qmp.close();
    expect(nodes.map((n) => n['node-name']).filter((n) => n.startsWith('pvebp-'))).toEqual([]);
    expect(exports.map((e) => e.id)).toEqual(['live0']);
  }, 120_000);

  it('a backup with room in --fleecing-dir succeeds and leaves the folder empty', async () => {
    const q = await startStorageDaemon({ size: 8 * MiB });
    await nbdWrite(`nbd+unix:///live0?socket=${q.nbdPath!}`, 0x33, 0, 8 * MiB);
    await q.qmp.close();
    const dir = await tempDir();
    const fleece = await tempDir();
    const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
      const c = spawn(process.execPath, [CLI, 'backup', '--store', path.join(dir, 'store'), '--vmid', '100', '--qmp', q.qmpPath, '--nbd-server', q.nbdPath!, '--devices', 'disk0', '--fleecing-dir', fleece]);
      let err = '';
      c.stderr.on('data', (d: Buffer) => (err += d.toString()));
      c.once('exit', (code) => resolve({ code, stderr: err }));
    });
    expect(r.code, r.stderr).toBe(0);
    expect(await fs.readdir(fleece)).toEqual([]);
  }, 60_000);
});

describe('fleecing images written without qemu-img', () => {
  it('are qcow2 images qemu-img checks clean at any disk size, which QEMU writes and reads back', async () => {
    const dir = await tempDir();
    for (const size of [MiB + 512, 8 * MiB, 2 ** 30 + 512, 2 ** 40, 8 * 2 ** 40 + 64 * 1024]) {
      const file = path.join(dir, `fl-${size}.qcow2`);
      await createFleecingImage('disk0', file, 'qcow2', size);
      expect((await fs.stat(file)).mode & 0o777).toBe(0o600);
      const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', file], { encoding: 'utf8' })) as Record<string, unknown>;
      expect(info).toMatchObject({ format: 'qcow2', 'virtual-size': size, 'cluster-size': 65536, 'format-specific': { data: { compat: '1.1', 'refcount-bits': 16 } } });
      expect(execFileSync('qemu-img', ['check', file], { encoding: 'utf8' })).toMatch(/No errors were found on the image/);
      // QEMU allocates in it (first and last cluster), reads back, and leaves it consistent
      const last = size - 512;
      execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 512', '-c', `write -P 0xa5 ${last} 512`, file]);
      const out = execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x5a 0 512', '-c', `read -P 0xa5 ${last} 512`, '-c', 'read -P 0 65536 512', file], { encoding: 'utf8' });
      expect(out).not.toMatch(/Pattern verification failed/);
      expect(execFileSync('qemu-img', ['check', file], { encoding: 'utf8' })).toMatch(/No errors were found on the image/);
    }
    await expect(createFleecingImage('disk0', path.join(dir, 'odd.qcow2'), 'qcow2', 1000)).rejects.toMatchObject({ code: 'ERR_BACKUP_ACCESS', device: 'disk0' });
    expect((await fs.readdir(dir)).filter((f) => f.startsWith('odd'))).toEqual([]);
  });
});

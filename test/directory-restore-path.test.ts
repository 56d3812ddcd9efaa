/**
 * The DirectoryProvider's VM restore path passes qemu-server's check: `restore_vm_volume_init`
 * answers a raw regular file (qemu-storage-daemon's FUSE export of the qcow2 chain) that a Perl
 * copy of pve-storage's `file_size_info($path, undef, 'raw', 1)` accepts, that `qemu-img convert
 * -f raw` restores byte-exact (a full and an incremental over it), and that leaves no mount and no
 * daemon behind: after the volume cleanup, after the VM cleanup alone (qemu-server skips the
 * volume cleanup when the check dies), after a restore that fails mid-way, and after the restoring
 * process is SIGKILLed.
 */
import { spawn } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { open, readFile, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

import { afterEach, beforeAll, describe, expect, it } from 'vitest';

import { DirectoryProvider, restoreVm, runBackupJob } from '../lib/index.js';
import { startDisk, vmGuest } from './helpers/directory.js';
import { expectSameBytes, run } from './helpers/images.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { requireTool } from './helpers/tools.js';
import { FILE_SIZE_INFO } from './helpers/pve-checks.js';

const MiB = 2 ** 20;
const DIST = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../dist/index.js');


afterEach(async () => {
  await stopAll();
});

beforeAll(() => {
  requireTool('perl', 'perl');
  requireTool('qemu-img', 'qemu-utils');
  requireTool('qemu-storage-daemon', 'qemu-system-common');
});

function mountsUnder(dir: string): string[] {
  return readFileSync('/proc/self/mountinfo', 'utf8').split('\n').filter((l) => l.split(' ')[4]?.startsWith(dir));
}

/** Live processes whose command line mentions `text` (a FUSE daemon names its mount point). */
function processesMentioning(text: string): number[] {
  const out: number[] = [];
  for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    let cmd = '';
    try {
      cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    } catch {
      continue;
    }
    if (cmd.includes(text) && Number(pid) !== process.pid) out.push(Number(pid));
  }
  return out;
}

async function eventually(check: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/** A store with a full and an incremental backup of one 8 MiB disk, with their contents. */
async function twoBackups(): Promise<{ provider: DirectoryProvider; points: Array<{ volname: string; content: Buffer }>; root: string }> {
  const disk = await startDisk(8 * MiB);
  const root = path.join(await tempDir(), 'store');
  const scratch = await tempDir();
  const provider = new DirectoryProvider({ storeid: 'dir1', scfg: { path: root }, log: () => {} });
  const points: Array<{ volname: string; content: Buffer }> = [];
  await disk.write(0x41, 0, 3 * MiB);
  for (let round = 0; round < 2; round++) {
    if (round > 0) await disk.write(0x52, 2 * MiB + 4096, 1 * MiB);
    const content = disk.snapshot();
    const r = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: scratch });
    expect(r.guests[0]!.error).toBeUndefined();
    points.push({ volname: r.guests[0]!.volname!, content });
  }
  return { provider, points, root };
}

/** Runs `fn` with new temporary folders (the FUSE exports' private folders) created under `dir`. */
async function withTmpdir<T>(dir: string, fn: () => Promise<T>): Promise<T> {
  const before = process.env.TMPDIR;
  process.env.TMPDIR = dir;
  try {
    return await fn();
  } finally {
    if (before === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = before;
  }
}

describe('DirectoryProvider: a restore path qemu-server accepts', () => {
  it('restore_vm_volume_init answers a raw regular file that file_size_info accepts and qemu-img convert -f raw restores exactly; cleanup leaves nothing', async () => {
    const { provider, points } = await twoBackups();
    const scratch = await tempDir();
    expect(points[1]!.content.equals(points[0]!.content)).toBe(false);
    for (const p of points) {
      expect(await provider.restoreVmInit(p.volname)).toEqual({ disk0: { size: 8 * MiB } });
      const { qemuImgPath } = await provider.restoreVmVolumeInit(p.volname, 'disk0', {});
      expect(path.isAbsolute(qemuImgPath)).toBe(true);
      const folder = path.dirname(qemuImgPath);
      expect((await stat(folder)).mode & 0o777).toBe(0o700);
      expect(run('perl', ['-e', FILE_SIZE_INFO, qemuImgPath]).trim()).toBe(`${8 * MiB} raw ${8 * MiB}`);
      expect(mountsUnder(qemuImgPath)).toHaveLength(1);
      const target = path.join(scratch, 'target.raw');
      run('qemu-img', ['convert', '-p', '-f', 'raw', '-O', 'raw', qemuImgPath, target]);
      expectSameBytes(await readFile(target), p.content, p.volname);
      await rm(target);
      expect(processesMentioning(qemuImgPath)).not.toEqual([]);
      await provider.restoreVmVolumeCleanup(p.volname, 'disk0', {});
      expect(mountsUnder(folder)).toEqual([]);
      expect(processesMentioning(qemuImgPath)).toEqual([]);
      await expect(stat(folder)).rejects.toMatchObject({ code: 'ENOENT' });
      await provider.restoreVmCleanup(p.volname);
    }
  });

  it('restore_vm_cleanup ends the exports whose volume cleanup qemu-server skipped', async () => {
    const { provider, points } = await twoBackups();
    const a = (await provider.restoreVmVolumeInit(points[1]!.volname, 'disk0', {})).qemuImgPath;
    // a second init of the same volume replaces the first export
    const b = (await provider.restoreVmVolumeInit(points[1]!.volname, 'disk0', {})).qemuImgPath;
    expect(mountsUnder(path.dirname(a))).toEqual([]);
    expect(processesMentioning(a)).toEqual([]);
    expect(mountsUnder(b)).toHaveLength(1);
    await provider.restoreVmCleanup(points[1]!.volname);
    expect(mountsUnder(path.dirname(b))).toEqual([]);
    expect(processesMentioning(b)).toEqual([]);
  });

  it('restoreVm through the FUSE export (the provider declining to write the disk itself); a restore that fails mid-way leaves no mount and no daemon', async () => {
    const { provider, points } = await twoBackups();
    // the path Proxmox VE takes: restoreVmVolumeInit and qemu-img
    provider.restoreVmVolumeWrite = async () => false;
    const scratch = await tempDir();
    const tmp = await tempDir();
    const target = path.join(scratch, 'ok.raw');
    const seen: string[] = [];
    const init = provider.restoreVmVolumeInit.bind(provider);
    provider.restoreVmVolumeInit = async (...args) => {
      const answer = await init(...args);
      seen.push(answer.qemuImgPath);
      return answer;
    };
    const r = await withTmpdir(tmp, () => restoreVm({ provider, volname: points[1]!.volname, storeid: 'dir1', targets: { disk0: target } }));
    expect(r.devices).toEqual([{ device: 'disk0', size: 8 * MiB, target }]);
    expectSameBytes(await readFile(target), points[1]!.content, 'restoreVm');
    expect(seen).toHaveLength(1);
    expect(seen[0]!.startsWith(`${tmp}/pve-restore-`)).toBe(true);
    // a folder as the target (written in place): the copy fails after the export is up
    const failing = withTmpdir(tmp, () => restoreVm({ provider, volname: points[1]!.volname, storeid: 'dir1', targets: { disk0: scratch } }));
    await expect(failing).rejects.toMatchObject({ code: 'ERR_RESTORE' });
    expect(mountsUnder(tmp)).toEqual([]);
    expect(processesMentioning(tmp)).toEqual([]);
    expect(seen).toHaveLength(2);
    expect(readdirSync(tmp)).toEqual([]);
  });

  // The header is outside the content digests (they cover the image's own clusters), yet
  // qemu-img follows it: each damage below restores another content through the FUSE export
  // without any error unless the header is checked against the manifest.
  it.each([
    // backing_file_offset (bytes 8..16) zeroed: the incremental reads as if nothing were below it
    ['lost its backing file', /backing file is none, expected \.\.\/qemu-/, (header: Buffer): number => header.fill(0, 8, 16) && 8],
    // the backing format extension's "qcow2" made "raw": the base image is read as raw bytes
    ['reads its backing file as raw', /backing file format is raw, expected qcow2/, (header: Buffer): number => header.write('raw\0\0', header.indexOf('qcow2', header.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]))), 'latin1')],
  ] as const)('restore_vm_volume_init refuses a layer whose qcow2 header %s', async (_what, message, damage) => {
    const { provider, points } = await twoBackups();
    const tmp = await tempDir();
    const image = path.join((await provider.openStore()).backupDir(points[1]!.volname), 'disk0.qcow2');
    const fh = await open(image, 'r+');
    const header = Buffer.alloc(4096);
    await fh.read(header, 0, header.length, 0);
    expect(damage(header)).toBeGreaterThan(0);
    await fh.write(header, 0, header.length, 0);
    await fh.close();
    const init = withTmpdir(tmp, () => provider.restoreVmVolumeInit(points[1]!.volname, 'disk0', {}));
    await expect(init).rejects.toMatchObject({ code: 'ERR_BACKUP_CORRUPT', file: image });
    await expect(init).rejects.toThrow(message);
    expect(mountsUnder(tmp)).toEqual([]);
    expect(readdirSync(tmp)).toEqual([]);
    // verify names it too
    const v = await (await provider.openStore()).verifyBackup(points[1]!.volname);
    expect(v.problems.join('\n')).toMatch(message);
    await provider.restoreVmCleanup(points[1]!.volname);
  });

  it('a restoring process that is SIGKILLed leaves no mount and no daemon', async () => {
    requireTool('setpriv', 'util-linux');
    await stat(DIST).catch(() => {
      throw new Error(`${DIST} is missing: run npm run build:ts`);
    });
    const { points, root } = await twoBackups();
    const tmp = await tempDir();
    const script = `
      import { DirectoryProvider } from ${JSON.stringify(DIST)};
      const p = new DirectoryProvider({ storeid: 'dir1', scfg: { path: ${JSON.stringify(root)} }, log: () => {} });
      const r = await p.restoreVmVolumeInit(${JSON.stringify(points[1]!.volname)}, 'disk0', {});
      process.stdout.write(r.qemuImgPath + '\\n');
      setInterval(() => {}, 1000);
    `;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { env: { ...process.env, TMPDIR: tmp }, stdio: ['ignore', 'pipe', 'inherit'] });
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    const fusePath = await new Promise<string>((resolve, reject) => {
      let out = '';
      child.stdout!.on('data', (b: Buffer) => {
        out += b.toString();
        if (out.includes('\n')) resolve(out.trim());
      });
      child.once('exit', (code) => reject(new Error(`child exited ${code} before answering`)));
    });
    expect(mountsUnder(fusePath)).toHaveLength(1);
    expect(processesMentioning(fusePath)).not.toEqual([]);
    child.kill('SIGKILL');
    await exited;
    await eventually(() => mountsUnder(tmp).length === 0, 'the mount to go');
    await eventually(() => processesMentioning(fusePath).length === 0, 'the daemon to exit');
    // the dead process's private folder stays until the next export in the same place sweeps it
    const dead = path.basename(path.dirname(fusePath));
    expect(readdirSync(tmp)).toEqual([dead]);
    const provider = new DirectoryProvider({ storeid: 'dir1', scfg: { path: root }, log: () => {} });
    const next = await withTmpdir(tmp, () => provider.restoreVmVolumeInit(points[1]!.volname, 'disk0', {}));
    expect(readdirSync(tmp)).toEqual([path.basename(path.dirname(next.qemuImgPath))]);
    await provider.restoreVmCleanup(points[1]!.volname);
    expect(readdirSync(tmp)).toEqual([]);
  });
});

/**
 * The `copy` and `info` commands against real servers, where the command line itself matters: a
 * process killed mid-copy, the umask it runs under, its exit codes and the exact numbers it prints.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { describe, expect, it } from 'vitest';

import { NbdClient } from '../lib/index.js';
import { setupBackupAccess, teardownBackupAccess } from '../lib/qemu/backup-access.js';
import { startStorageDaemon } from '../lib/qemu/storage-daemon.js';
import { allocatedBytes, createImage, expectSameBytes, qemuIo } from './helpers/images.js';
import { startNbdkit, startQemuNbd, useCleanups } from './helpers/nbd-servers.js';

const CLI = join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');
const MiB = 2 ** 20;
const { track, scratch, defer } = useCleanups();

/** Runs the CLI under `umask 000` (so only the modes the CLI asks for decide). */
function cli(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync('sh', ['-c', 'umask 000 && exec "$0" "$@"', process.execPath, CLI, ...args], { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function mode(path: string): number {
  return statSync(path).mode & 0o777;
}

describe('copy', () => {
  it('leaves the source byte-identical (nbdkit file and qemu-nbd --discard=unmap); --discard trims', async () => {
    const dir = scratch();
    const src = join(dir, 'src.raw');
    createImage(src, '8M', 'raw');
    qemuIo(src, 'raw', ['write -P 0x11 0 3M', 'write -P 0x22 5M 2M']);
    const before = readFileSync(src);
    for (const server of [track(await startNbdkit(['file', src])), track(await startQemuNbd(src, { extra: ['--discard=unmap'] }))]) {
      const target = join(dir, `copy-${readdirSync(dir).length}.raw`);
      const r = cli('copy', server.uri, target, '--json');
      expect(r.status, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toMatchObject({ bytesTrimmed: 0 });
      expectSameBytes(readFileSync(target), before, 'target');
      expectSameBytes(readFileSync(src), before, 'source');
      await server.stop();
    }
    // asked for explicitly (a fleecing snapshot stands in here as a memory export): everything taken is trimmed
    const memory = track(await startNbdkit(['memory', 'size=4M']));
    const nbd = await NbdClient.connect(memory.uri);
    await nbd.write(0, Buffer.alloc(MiB, 0x5a));
    const r = cli('copy', memory.uri, join(dir, 'snap.raw'), '--discard', '--json');
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ bytesTrimmed: 4 * MiB });
    expect((await nbd.read(0, MiB)).equals(Buffer.alloc(MiB))).toBe(true);
    expect(readFileSync(join(dir, 'snap.raw')).subarray(0, MiB).equals(Buffer.alloc(MiB, 0x5a))).toBe(true);
    await nbd.close();
  });

  it('--discard on a backup-access snapshot trims what it copied: the fleecing image shrinks', async () => {
    const dir = scratch();
    const image = join(dir, 'disk0.qcow2');
    createImage(image, '16M', 'qcow2');
    qemuIo(image, 'qcow2', ['write -P 0x11 0 16M']);
    const qsd = await startStorageDaemon({ dir, disks: [{ id: 'disk0', file: image, format: 'qcow2' }], liveExports: true });
    defer(() => qsd.stop());
    const fleecing = join(dir, 'fleecing');
    mkdirSync(fleecing);
    const access = await setupBackupAccess(qsd.qmp, { targetId: 'cli', devices: ['disk0'], fleecing: { dir: fleecing }, nbdServer: { path: qsd.nbdSocket } });
    defer(() => teardownBackupAccess(qsd.qmp, { targetId: 'cli', success: false }));
    // the guest overwrites half the disk after the point in time: copy-before-write fills the fleecing image
    const live = await NbdClient.connect(qsd.liveUri('disk0'));
    await live.write(0, Buffer.alloc(8 * MiB, 0x22));
    await live.close();
    const fleecingUse = (): number => readdirSync(fleecing).reduce((n, f) => n + allocatedBytes(join(fleecing, f)), 0);
    const before = fleecingUse();
    expect(before).toBeGreaterThanOrEqual(8 * MiB);
    const target = join(dir, 'point-in-time.raw');
    const r = cli('copy', access.devices[0]!.nbdUri, target, '--discard', '--json');
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ bytesTrimmed: 16 * MiB });
    expect(fleecingUse()).toBeLessThan(before - 4 * MiB);
    expect(readFileSync(target).equals(Buffer.alloc(16 * MiB, 0x11))).toBe(true);
  });

  it('fails with ERR_NBD_TIMEOUT naming the request when the server stops answering, and leaves no target', async () => {
    const dir = scratch();
    const server = track(await startNbdkit(['--filter=delay', 'pattern', 'size=8M', 'delay-read=300']));
    const target = join(dir, 'copy.raw');
    const r = cli('copy', server.uri, target, '--timeout', '1');
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^pve-backup-provider: no reply to READ at offset \d+ length \d+ within 1 s \[ERR_NBD_TIMEOUT\]$/m);
    expect(readdirSync(dir)).toEqual([]);
  });

  it('killed mid-copy, leaves nothing at the target path (the data went to a private .part)', async () => {
    const dir = scratch();
    const server = track(await startNbdkit(['--filter=delay', 'pattern', 'size=256M', 'delay-read=200ms']));
    const target = join(dir, 'copy.raw');
    const child = spawn('sh', ['-c', 'umask 000 && exec "$0" "$@"', process.execPath, CLI, 'copy', server.uri, target, '--requests', '2'], {
      stdio: 'ignore',
    });
    const exited = new Promise<NodeJS.Signals | null>((resolve) => child.once('exit', (_code, signal) => resolve(signal)));
    defer(() => void child.kill('SIGKILL'));
    // wait until the copy has written for a while
    for (let i = 0; i < 200 && !existsSync(`${target}.part`); i++) await sleep(25);
    expect(existsSync(`${target}.part`)).toBe(true);
    await sleep(500);
    child.kill('SIGKILL');
    expect(await exited).toBe('SIGKILL');
    expect(existsSync(target)).toBe(false);
    // the partial data lies aside, readable by its owner only
    expect(readdirSync(dir)).toEqual(['copy.raw.part']);
    expect(mode(`${target}.part`)).toBe(0o600);
  });

  it('creates raw and qcow2 targets readable by their owner only, whatever the umask', async () => {
    const dir = scratch();
    const server = track(await startNbdkit(['pattern', 'size=2M']));
    for (const format of ['raw', 'qcow2']) {
      const target = join(dir, `copy.${format}`);
      const r = cli('copy', server.uri, target, '--format', format);
      expect(r.status, r.stderr).toBe(0);
      expect(mode(target)).toBe(0o600);
    }
  });
});

describe('info', () => {
  it('prints sizes above 2^53 exactly, plain and --json', async () => {
    const server = track(await startNbdkit(['null', 'size=9223372036854775296']));
    const plain = cli('info', server.uri);
    expect(plain.status, plain.stderr).toBe(0);
    expect(plain.stdout).toMatch(/^size\s+9223372036854775296 \(/m);
    const json = cli('info', server.uri, '--json');
    expect(json.status, json.stderr).toBe(0);
    expect(json.stdout).toMatch(/"size": 9223372036854775296,/);
    expect(JSON.parse(json.stdout)).toMatchObject({ name: '', readOnly: false });
    const nbd = await NbdClient.connect(server.uri, { metaContexts: [] });
    expect(nbd.info.sizeExact).toBe('9223372036854775296');
    await nbd.close();
  });
});

/**
 * Bandwidth limits, each checked from both sides: a limited transfer must take at least 80% of
 * `bytes / limit` (a limiter running 2x too fast, or missing, fails) and at most a generous bound
 * (a limiter that stalls fails). The data sizes make the expected time about 2 s, so that noise
 * cannot hide a 2x error; the upper bounds allow for a loaded machine. Real tools throughout:
 * qemu-storage-daemon and the job runner for VMs, GNU tar and rsync for containers, nbdkit for the
 * core's `copy --bwlimit`.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';

import { afterEach, describe, expect, it } from 'vitest';

import { ThrottleStream } from '../lib/bandwidth.js';
import {
  backupNbdToFile,
  BandwidthLimiter,
  DirectoryProvider,
  DirectoryProviderV1,
  normaliseBandwidthLimit,
  restoreContainer,
  restoreVm,
  runBackupJob,
  type BackupProvider,
  type CopySummary,
} from '../lib/index.js';
import { expectRestores, startDisk, vmGuest } from './helpers/directory.js';
import { startNbdkit, useCleanups } from './helpers/nbd-servers.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { requireContainerTools } from './helpers/tree.js';

const KiB = 1024;
const MiB = 2 ** 20;
/** The limit of every test: 4 MiB/s. */
const LIMIT = 4 * MiB;
/** Lower bound on a limited transfer, as a share of `bytes / limit`: 2x too fast is 0.5. */
const AT_LEAST = 0.8;
/** Upper bound on a transfer expected to take about 2 s, for a machine shared by many jobs. */
const AT_MOST_SECONDS = 6;

const { track, scratch } = useCleanups();

afterEach(async () => {
  await stopAll();
});

/** Seconds `fn` takes. */
async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return (performance.now() - t0) / 1000;
}

describe('normaliseBandwidthLimit: "0 or absent means no limit", decided once', () => {
  it('gives undefined for no limit and the number otherwise', () => {
    expect(normaliseBandwidthLimit(undefined)).toBeUndefined();
    expect(normaliseBandwidthLimit(0)).toBeUndefined();
    expect(normaliseBandwidthLimit(Infinity)).toBeUndefined();
    expect(normaliseBandwidthLimit(LIMIT)).toBe(LIMIT);
    expect(normaliseBandwidthLimit(0.5)).toBe(0.5);
  });

  it.each([-1, Number.NaN, '4M', null])('refuses %s', (value) => {
    expect(() => normaliseBandwidthLimit(value, 'bandwidthLimit')).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT', message: expect.stringMatching(/^bandwidthLimit must be/) }));
  });

  it('every entry point refuses a negative limit before doing anything', async () => {
    const provider = {} as BackupProvider; // never reached
    const refused = { code: 'ERR_INVALID_ARGUMENT', message: expect.stringMatching(/^bandwidthLimit must be/) };
    const common = { provider, volname: 'backup/100/qemu-x', storeid: 'dir1', bandwidthLimit: -1 };
    await expect(restoreVm({ ...common, targets: {} })).rejects.toMatchObject(refused);
    await expect(restoreContainer({ ...common, rootdir: '/nonexistent' })).rejects.toMatchObject(refused);
    await expect(runBackupJob({ provider, storeid: 'dir1', guests: [], bandwidthLimit: -1 })).rejects.toMatchObject(refused);
  });
});

describe('BandwidthLimiter (provider helper)', () => {
  it('passes one second of burst, then keeps to the rate', async () => {
    const limiter = new BandwidthLimiter(LIMIT);
    // 12 MiB: the first 4 MiB are the burst, the other 8 MiB take 2 s.
    const seconds = await timed(async () => {
      for (let i = 0; i < 48; i++) await limiter.consume(256 * KiB);
    });
    expect(seconds).toBeGreaterThanOrEqual(AT_LEAST * 2);
    expect(seconds).toBeLessThan(AT_MOST_SECONDS);
  });

  it('after an idle period lets through at most one second of burst, however long the pause', async () => {
    const limiter = new BandwidthLimiter(LIMIT);
    await limiter.consume(LIMIT); // the initial burst, used up
    await sleep(2500); // 2.5 s idle: 10 MiB of refill, of which the bucket may keep 4 MiB
    // 8 MiB: 4 MiB of burst, the other 4 MiB take 1 s. A bucket keeping 2.5x more lets all through at once.
    const seconds = await timed(async () => {
      for (let i = 0; i < 128; i++) await limiter.consume(64 * KiB);
    });
    expect(seconds).toBeGreaterThanOrEqual(AT_LEAST * 1);
    expect(seconds).toBeLessThan(AT_MOST_SECONDS);
  });

  it('transform() paces a stream', async () => {
    const limiter = new BandwidthLimiter(LIMIT);
    // 12 MiB: 4 MiB of burst, then 2 s.
    const seconds = await timed(() =>
      pipeline(
        Readable.from(Array.from({ length: 48 }, () => Buffer.alloc(256 * KiB))),
        limiter.transform(),
        new Writable({ write: (_c: Buffer, _e, cb) => cb() }),
      ),
    );
    expect(seconds).toBeGreaterThanOrEqual(AT_LEAST * 2);
    expect(seconds).toBeLessThan(AT_MOST_SECONDS);
  });
});

describe('backupNbdToFile (provider helper)', () => {
  it('8 MiB at 4 MiB/s take about 2 s', async () => {
    const server = track(await startNbdkit(['pattern', 'size=8M']));
    const target = path.join(scratch(), 'disk.raw');
    let summary: CopySummary | undefined;
    const seconds = await timed(async () => {
      summary = await backupNbdToFile({ uri: server.uri, bitmapMode: 'none', path: target, bandwidthLimit: LIMIT });
    });
    expect(summary!.bytesRead).toBe(8 * MiB);
    expect(statSync(target).size).toBe(8 * MiB);
    expect(seconds).toBeGreaterThanOrEqual(AT_LEAST * 2);
    expect(seconds).toBeLessThan(AT_MOST_SECONDS);
  });
});

describe('ThrottleStream (container archives)', () => {
  it('8 MiB at 4 MiB/s take about 2 s', async () => {
    const t = new ThrottleStream(LIMIT);
    let got = 0;
    const seconds = await timed(() =>
      pipeline(
        Readable.from(Array.from({ length: 8 }, () => Buffer.alloc(MiB))),
        t,
        new Writable({
          write(c: Buffer, _e, cb) {
            got += c.length;
            cb();
          },
        }),
      ),
    );
    expect(got).toBe(8 * MiB);
    expect(t.bytes).toBe(8 * MiB);
    expect(seconds).toBeGreaterThanOrEqual(AT_LEAST * 2);
    expect(seconds).toBeLessThan(AT_MOST_SECONDS);
  });

  it('does not burst after a stall: 8 MiB after a 2 s pause still take about 2 s', async () => {
    const t = new ThrottleStream(LIMIT);
    let resumed = 0;
    // 1 MiB, a 2 s pause of the source, then 8 MiB. Measured from the first byte (the old
    // behaviour), the pause would be credited and 7 MiB of the 8 pass at once.
    async function* source(): AsyncGenerator<Buffer> {
      yield Buffer.alloc(MiB);
      await sleep(2000);
      resumed = performance.now();
      for (let i = 0; i < 8; i++) yield Buffer.alloc(MiB);
    }
    await pipeline(Readable.from(source()), t, new Writable({ write: (_c: Buffer, _e, cb) => cb() }));
    const seconds = (performance.now() - resumed) / 1000;
    expect(t.bytes).toBe(9 * MiB);
    expect(seconds).toBeGreaterThanOrEqual(AT_LEAST * 2);
    expect(seconds).toBeLessThan(AT_MOST_SECONDS);
  });
});

describe('DirectoryProvider: container backup with a bandwidth limit', () => {
  /** A DirectoryProvider that records how long `backupContainer` took (both generations call it). */
  class TimedProvider extends DirectoryProvider {
    seconds = -1;
    override async backupContainer(...args: Parameters<DirectoryProvider['backupContainer']>): Promise<void> {
      this.seconds = await timed(() => super.backupContainer(...args));
    }
  }

  it.each([
    ['tar', 2],
    ['directory', 2],
    ['tar', 1],
    ['directory', 1],
  ] as const)('lxc-backup-mode %s, API generation %i: 8 MiB at 4 MiB/s take about 2 s', async (mode, generation) => {
    requireContainerTools();
    const work = scratch();
    const src = path.join(work, 'src');
    mkdirSync(src);
    // Random data: nothing on the way can compress it.
    for (let i = 0; i < 8; i++) writeFileSync(path.join(src, `f${i}`), randomBytes(MiB));
    const root = path.join(work, 'store');
    const context = { storeid: 'dir1', scfg: { path: root, 'lxc-backup-mode': mode }, log: () => {} };
    const timedProvider = new TimedProvider(context);
    const provider: BackupProvider = generation === 2 ? timedProvider : new DirectoryProviderV1(context, {}, timedProvider);
    const r = await runBackupJob({
      provider,
      storeid: 'dir1',
      tmpdir: work,
      bandwidthLimit: LIMIT,
      guests: [{ vmid: 200, type: 'lxc', rootdir: src, config: 'hostname: ct200\n' }],
    });
    expect(r.guests[0]!.error).toBeUndefined();
    const dir = path.join(root, '200', r.guests[0]!.volname!.split('/').at(-1)!);
    // The data really went through: the archive or the copy holds the 8 MiB.
    const stored = mode === 'tar' ? statSync(path.join(dir, 'root.tar')).size : statSync(path.join(dir, 'root', 'f7')).size * 8;
    expect(stored).toBeGreaterThanOrEqual(8 * MiB);
    expect(timedProvider.seconds).toBeGreaterThanOrEqual(AT_LEAST * 2);
    expect(timedProvider.seconds).toBeLessThan(AT_MOST_SECONDS);
  });
});

describe('DirectoryProvider: VM backup with a bandwidth limit, through the job runner', () => {
  it.each([2, 1] as const)('API generation %i: 8 MiB of data at 4 MiB/s take about 2 s', async (generation) => {
    const disk = await startDisk(16 * MiB);
    await disk.write(0x61, 0, 8 * MiB);
    const root = path.join(await tempDir(), 'store');
    const summaries: CopySummary[] = [];
    const context = { storeid: 'dir1', scfg: { path: root, 'vm-backup-mode': 'full' }, log: () => {} };
    const options = { onDeviceDone: (_vmid: number, _device: string, s: CopySummary) => void summaries.push(s) };
    const provider: BackupProvider = generation === 2 ? new DirectoryProvider(context, options) : new DirectoryProviderV1(context, options);
    let r: Awaited<ReturnType<typeof runBackupJob>> | undefined;
    const wall = await timed(async () => {
      r = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk)], tmpdir: root, bandwidthLimit: LIMIT });
    });
    expect(r!.guests[0]!.error).toBeUndefined();
    expect(summaries).toHaveLength(1);
    expect(summaries[0]!.bytesRead).toBe(8 * MiB); // only the written half is read
    expect(wall).toBeGreaterThanOrEqual(AT_LEAST * 2);
    expect(summaries[0]!.seconds).toBeGreaterThanOrEqual(AT_LEAST * 2);
    expect(summaries[0]!.seconds).toBeLessThan(AT_MOST_SECONDS);
    await expectRestores(provider, r!.guests[0]!.volname!, disk.snapshot(), root);
  });
});

describe('the core: copy --bwlimit', () => {
  const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');

  it('copy --bwlimit 4M copies 8 MiB in about 2 s', async () => {
    const server = track(await startNbdkit(['pattern', 'size=8M']));
    const target = path.join(scratch(), 'out.raw');
    let stdout = '';
    let stderr = '';
    const seconds = await timed(
      () =>
        new Promise<void>((resolve, reject) => {
          const child = spawn(process.execPath, [CLI, 'copy', server.uri, target, '--bwlimit', '4M', '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
          child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
          child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
          child.on('error', reject);
          child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`copy exited with ${code}: ${stderr}`))));
        }),
    );
    const summary = JSON.parse(stdout) as CopySummary;
    expect(summary.bytesRead).toBe(8 * MiB);
    expect(statSync(target).size).toBe(8 * MiB);
    expect(summary.seconds).toBeGreaterThanOrEqual(AT_LEAST * 2);
    expect(seconds).toBeGreaterThanOrEqual(AT_LEAST * 2);
    expect(seconds).toBeLessThan(AT_MOST_SECONDS);
  });
});

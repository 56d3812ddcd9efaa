/**
 * restoreChain: a 5-deep chain made by qemu-img and qemu-io (one layer compressed by
 * `qemu-img convert -c`), with digest files computed from each layer alone (`digestImage`: the
 * images were not written by the core), restored by the core and compared with
 * `qemu-img convert -O raw` of the same chain.
 */
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { CancelledError } from '../lib/errors.js';
import { DirectoryStoreError } from '../lib/directory-provider/errors.js';
import { digestImage } from '../lib/directory-provider/digests.js';
import { restoreChain, type ChainLayer } from '../lib/directory-provider/restore-chain.js';
import { allocatedBytes, expectSameBytes, layerAlone, layerMap, run } from './helpers/images.js';
import { useCleanups } from './helpers/nbd-servers.js';
import { requireTool } from './helpers/tools.js';

const MiB = 2 ** 20;
const KiB = 1024;
const SIZE = 48 * MiB;
const CLUSTER = 64 * KiB;
const BLOCK = 64 * CLUSTER;
const { scratch } = useCleanups();

/** Deterministic pseudo-random numbers. */
function rng(seed: number): (n: number) => number {
  let s = seed >>> 0;
  return (n) => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s % n;
  };
}

/**
 * Five layers: a full image and four incrementals, each with random writes (many covering
 * clusters in part), zero writes, and layer 2 rewritten compressed.
 */
async function buildChain(dir: string, disk = SIZE, writes = 40): Promise<ChainLayer[]> {
  requireTool('qemu-img', 'qemu-utils');
  requireTool('qemu-io', 'qemu-utils');
  const random = rng(disk / MiB + writes);
  const layers: ChainLayer[] = [];
  for (let i = 0; i < 5; i++) {
    const image = join(dir, `layer${i}.qcow2`);
    const made = i === 2 ? join(dir, 'layer2-plain.qcow2') : image;
    if (i === 0) run('qemu-img', ['create', '-q', '-f', 'qcow2', made, String(disk)]);
    else run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', layers[i - 1]!.image, '-F', 'qcow2', made]);
    const cmds: string[] = [];
    for (let w = 0; w < writes; w++) {
      const len = (1 + random(96)) * 4 * KiB;
      // block 3 is never written: it must stay a hole
      let off = random(disk / (4 * KiB)) * 4 * KiB;
      if (off + len > disk) off = disk - len;
      if (off < 4 * BLOCK && off + len > 3 * BLOCK) continue;
      cmds.push(i > 0 && random(4) === 0 ? `write -z ${off} ${len}` : `write -P ${1 + random(250)} ${off} ${len}`);
    }
    if (i === 0) cmds.push(`write -P 7 ${disk - 3 * CLUSTER} ${3 * CLUSTER}`);
    const args = cmds.flatMap((c) => ['-c', c]);
    run('qemu-io', ['-f', 'qcow2', ...args, made]);
    if (i === 2) {
      run('qemu-img', ['convert', '-c', '-f', 'qcow2', '-O', 'qcow2', '-B', layers[1]!.image, '-F', 'qcow2', made, image]);
    }
    layers.push({ image, digestsFile: (await digestImage(image)).digestsFile });
  }
  return layers;
}

/** What `qemu-img convert` makes of the chain. */
function reference(top: string, dir: string): Buffer {
  const out = join(dir, 'reference.raw');
  run('qemu-img', ['convert', '-O', 'raw', top, out]);
  return readFileSync(out);
}

describe('restoreChain', () => {
  it('restores a 5-deep chain exactly as qemu-img convert does, sparse, reading each stored byte once', async () => {
    const dir = scratch();
    const layers = await buildChain(dir, SIZE, 24);
    const check = JSON.parse(run('qemu-img', ['check', '--output=json', layers[2]!.image])) as { 'compressed-clusters'?: number };
    expect(check['compressed-clusters'], 'layer 2 holds compressed clusters').toBeGreaterThan(0);
    const target = join(dir, 'disk.raw');
    const seen: number[] = [];
    const summary = await restoreChain({ layers, target, zeroed: true, onProgress: (p) => seen.push(p.done) });
    expectSameBytes(readFileSync(target), reference(layers[4]!.image, dir));
    expect(summary.bytes).toBe(SIZE);
    expect(summary.bytesData + summary.bytesZero).toBe(SIZE);
    expect(statSync(target).mode & 0o777).toBe(0o600);
    expect(seen.at(-1)).toBe(SIZE);
    // every layer's data read once: the sum of what `qemu-img map` says each layer stores
    const stored = layers
      .map((l) => layerMap(l.image).filter((e) => e.data).reduce((a, e) => a + e.length, 0))
      .reduce((a, b) => a + b, 0);
    expect(summary.bytesRead).toBe(stored);
    // sparse: no more allocated than the data written, and the block never written is a hole
    expect(allocatedBytes(target)).toBeLessThanOrEqual(summary.bytesData + 64 * KiB);
    expect(summary.bytesData).toBeLessThan(SIZE / 2);
  });

  it('rewrites an old non-zeroed target to exactly the chain', async () => {
    const dir = scratch();
    const layers = await buildChain(dir, 16 * MiB, 20);
    const target = join(dir, 'old.raw');
    writeFileSync(target, Buffer.alloc(20 * MiB, 0xab));
    await restoreChain({ layers, target, zeroed: false, threads: 2 });
    expectSameBytes(readFileSync(target), reference(layers[4]!.image, dir));
  });

  it('restores onto a block device holding old data: written in place, its zero areas zeroed (BLKZEROOUT)', async (ctx) => {
    requireTool('losetup', 'mount');
    const dir = scratch();
    const layers = await buildChain(dir, 16 * MiB, 20);
    const backing = join(dir, 'device.img');
    writeFileSync(backing, Buffer.alloc(20 * MiB, 0xab));
    const device = run('losetup', ['--find', '--show', backing]).trim();
    ctx.onTestFinished(() => void run('losetup', ['--detach', device]));
    const summary = await restoreChain({ layers, target: device, zeroed: false, threads: 2 });
    expect(summary.bytesZero).toBeGreaterThan(0);
    // the device reads as the chain; past the disk's end it is left as it was
    const written = readFileSync(device);
    expectSameBytes(written.subarray(0, 16 * MiB), reference(layers[4]!.image, dir));
    expect(written.subarray(16 * MiB).every((b) => b === 0xab)).toBe(true);
  });

  it('rejects corruption in a middle layer naming the file and range, and leaves the partial target to the caller', async () => {
    const dir = scratch();
    const layers = await buildChain(dir);
    const victim = layers[3]!.image;
    const map = layerMap(victim);
    const data = map.find((e) => e.data && e.start >= 4 * BLOCK);
    expect(data, 'a data extent in layer 3').toBeDefined();
    // overwrite stored data in place, the layer opened alone so nothing else changes
    run('qemu-io', ['-c', `write -P 0x55 ${data!.start} 4k`, layerAlone(victim)]);
    const target = join(dir, 'disk.raw');
    const err = await restoreChain({ layers, target, zeroed: true }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DirectoryStoreError);
    expect(err).toMatchObject({ code: 'ERR_BACKUP_CORRUPT', file: victim });
    const block = Math.floor(data!.start / BLOCK);
    expect((err as Error).message).toContain(`${victim}: bytes ${block * BLOCK}..${(block + 1) * BLOCK}`);
    expect(existsSync(target), 'the partial target is the caller\'s to remove').toBe(true);
  });

  it('rejects a damaged digest file naming it', async () => {
    const dir = scratch();
    const layers = await buildChain(dir, 8 * MiB, 10);
    const file = layers[1]!.digestsFile;
    const bytes = readFileSync(file);
    bytes[45]! ^= 1;
    writeFileSync(file, bytes);
    const err = await restoreChain({ layers, target: join(dir, 't.raw'), zeroed: true }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_BACKUP_CORRUPT', file });
    expect((err as Error).message).toContain(file);
  });

  it('stops on abort with a CancelledError, and a progress callback that throws stops it with what it threw', async () => {
    const dir = scratch();
    const layers = await buildChain(dir);
    const controller = new AbortController();
    const started = Date.now();
    const err = await restoreChain({
      layers,
      target: join(dir, 't.raw'),
      zeroed: true,
      bandwidthLimit: 2 * MiB, // ~10 s for this chain
      onProgress: () => controller.abort(),
      signal: controller.signal,
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CancelledError);
    expect(err).toMatchObject({ code: 'ERR_CANCELLED' });
    expect(Date.now() - started).toBeLessThan(3000);

    const boom = new Error('boom');
    const thrown = await restoreChain({
      layers,
      target: join(dir, 't2.raw'),
      zeroed: true,
      bandwidthLimit: 2 * MiB,
      onProgress: () => {
        throw boom;
      },
    }).catch((e: unknown) => e);
    expect(thrown).toBe(boom);
  });
});

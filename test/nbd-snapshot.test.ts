/**
 * The core against a real copy-before-write snapshot: qemu-storage-daemon serves a disk, backup
 * access exports its point-in-time snapshot (fleecing image, dirty bitmap), and a "guest" keeps
 * writing to the live disk over a writable NBD export while the core copies.
 */
import { copyFileSync, mkdirSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { NbdClient, copyExtents, readChunks } from '../lib/index.js';
import { setupBackupAccess, teardownBackupAccess } from '../lib/qemu/backup-access.js';
import { startStorageDaemon, type StorageDaemon } from '../lib/qemu/storage-daemon.js';
import { allocatedBytes, createImage, expectSameBytes, qemuIo } from './helpers/images.js';
import { tempDir } from './helpers/nbd-servers.js';

const MiB = 2 ** 20;
const SIZE = 64 * MiB;
const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

interface Rig {
  dir: string;
  qsd: StorageDaemon;
  live: NbdClient;
  fleecingDir: string;
}

async function rig(): Promise<Rig> {
  const { dir, remove } = tempDir('pbp-snap-');
  cleanups.push(remove);
  const image = join(dir, 'disk0.qcow2');
  createImage(image, SIZE, 'qcow2');
  // 60% data in runs, the rest holes
  const writes: string[] = [];
  for (let off = 0; off < SIZE; off += 5 * MiB) writes.push(`write -P ${(off / MiB) % 250 + 1} ${off} ${3 * MiB}`);
  qemuIo(image, 'qcow2', writes);
  const qsd = await startStorageDaemon({ dir, disks: [{ id: 'disk0', file: image, format: 'qcow2' }], liveExports: true });
  cleanups.push(() => qsd.stop());
  const live = await NbdClient.connect(qsd.liveUri('disk0'));
  cleanups.push(() => live.close());
  const fleecingDir = join(dir, 'fleecing');
  mkdirSync(fleecingDir);
  return { dir, qsd, live, fleecingDir };
}

/** Keeps writing 64 KiB blocks at pseudo-random offsets until stopped: the guest. */
function startGuestWriter(live: NbdClient, blocks = new Set<number>()): { stop: () => Promise<number>; blocks: Set<number> } {
  let running = true;
  let seed = 12345 + blocks.size;
  let written = 0;
  const loop = (async () => {
    while (running) {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      const offset = (seed % (SIZE / 65536)) * 65536;
      await live.write(offset, Buffer.alloc(65536, 0xee));
      blocks.add(offset);
      written += 65536;
      await new Promise((r) => setImmediate(r));
    }
  })();
  return {
    blocks,
    stop: async () => {
      running = false;
      await loop;
      return written;
    },
  };
}

function fleecingAllocated(dir: string): number {
  return readdirSync(dir).reduce((n, f) => n + allocatedBytes(join(dir, f)), 0);
}

describe('copy from a copy-before-write snapshot (qemu-storage-daemon)', () => {
  it('full then incremental copies equal the point-in-time content while the guest writes; discard shrinks the fleecing image', async () => {
    const { dir, qsd, live, fleecingDir } = await rig();
    const access = { targetId: 'test-store', devices: ['disk0'], bitmap: 'b1', fleecing: { dir: fleecingDir, format: 'qcow2' as const }, nbdServer: { path: qsd.nbdSocket } };

    // full backup: the first use of the bitmap id creates it
    const expectedFull = await readWhole(live);
    const full = await setupBackupAccess(qsd.qmp, access);
    const dev = full.devices[0]!;
    expect(dev.bitmapAction).toBe('new');
    // the guest writes before and during the copy: copy-before-write fills the fleecing image
    let guest = startGuestWriter(live);
    while (guest.blocks.size < 16) await new Promise((r) => setTimeout(r, 10));
    const fleecingBefore = fleecingAllocated(fleecingDir);
    const fullPath = join(dir, 'full.raw');
    const fullSummary = await copyExtents({ uri: dev.nbdUri, path: fullPath, discard: true, maxRequest: MiB });
    await guest.stop();
    const fleecingAfter = fleecingAllocated(fleecingDir);
    // the guest's copied-before-write clusters were freed once the copy discarded them
    expect(fleecingAfter).toBeLessThan(fleecingBefore - 4 * 65536);
    await teardownBackupAccess(qsd.qmp, { targetId: 'test-store', success: true });
    expectSameBytes(readFileSync(fullPath), expectedFull, 'full backup');
    expect(fullSummary.bytesRead + fullSummary.bytesZero).toBe(SIZE);

    // changes between the backups, then the incremental point in time
    await live.write(3 * MiB, Buffer.alloc(MiB, 0x42)); // was a hole
    await live.write(20 * MiB + 65536, Buffer.alloc(65536, 0x43)); // inside data
    await live.writeZeroes(40 * MiB, 2 * MiB); // data becomes zero
    // dirty since the full backup's point in time: these changes and the guest's writes during it
    const dirty = new Set(guest.blocks);
    for (const [off, len] of [[3 * MiB, MiB], [20 * MiB + 65536, 65536], [40 * MiB, 2 * MiB]] as const) {
      for (let b = off; b < off + len; b += 65536) dirty.add(b);
    }
    const dirtyBytes = dirty.size * 65536;
    const expectedInc = await readWhole(live);
    const inc = await setupBackupAccess(qsd.qmp, access);
    const incDev = inc.devices[0]!;
    expect(incDev.bitmapAction).toBe('used');
    expect(incDev.bitmapName).toBeDefined();

    guest = startGuestWriter(live);

    const incPath = join(dir, 'incremental.raw');
    copyFileSync(fullPath, incPath);
    const incSummary = await copyExtents({ uri: incDev.nbdUri, path: incPath, existing: true, bitmap: incDev.bitmapName, discard: true });
    await guest.stop();
    await teardownBackupAccess(qsd.qmp, { targetId: 'test-store', success: true });

    expectSameBytes(readFileSync(incPath), expectedInc, 'incremental backup');
    // exactly the dirty regions were needed, nothing else
    expect(incSummary.bytesRead + incSummary.bytesZero).toBe(dirtyBytes);
    expect(incSummary.bytesSkipped).toBe(SIZE - dirtyBytes);
    expect(incSummary.bytesTrimmed).toBe(dirtyBytes);
  });

  it('streams a snapshot to a JS consumer that equals the point-in-time content', async () => {
    const { qsd, live, fleecingDir } = await rig();
    const expected = await readWhole(live);
    const access = await setupBackupAccess(qsd.qmp, { targetId: 'stream', devices: ['disk0'], fleecing: { dir: fleecingDir }, nbdServer: { path: qsd.nbdSocket } });
    const guest = startGuestWriter(live);
    const got = Buffer.alloc(SIZE);
    const stream = readChunks({ uri: access.devices[0]!.nbdUri });
    for await (const chunk of stream) {
      if (chunk.data) chunk.data.copy(got, chunk.offset);
    }
    await guest.stop();
    await teardownBackupAccess(qsd.qmp, { targetId: 'stream', success: true });
    expectSameBytes(got, expected, 'streamed snapshot');
  });
});

/** The whole live disk, in reads the server accepts. */
async function readWhole(nbd: NbdClient): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let off = 0; off < nbd.size; off += 4 * MiB) parts.push(await nbd.read(off, Math.min(4 * MiB, nbd.size - off)));
  return Buffer.concat(parts);
}

/**
 * `pve-backup-provider demo`: the whole data path on a real QEMU, with nothing but the README's
 * first command installed. qemu-storage-daemon serves a disk; a "guest" keeps writing to it over a
 * writable NBD export; a full and then an incremental backup are taken from copy-before-write
 * snapshots with discard, and each is checked byte for byte against the disk at its point in time.
 */
import { copyFile, mkdir, mkdtemp, readFile, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

import { PveBackupError } from '../errors.js';
import { NbdClient } from '../nbd/client.js';
import { copyExtents, type CopySummary } from '../nbd/copy.js';
import { setupBackupAccess, teardownBackupAccess } from '../qemu/backup-access.js';
import { startStorageDaemon, type StorageDaemon } from '../qemu/storage-daemon.js';
import { requireTool } from '../tools.js';
import { formatBytes, printTable, progressView } from './output.js';

const execFileP = promisify(execFile);
const MiB = 2 ** 20;
const BLOCK = 64 * 1024;

export interface DemoOptions {
  /** Disk size in bytes (default 512 MiB). */
  size?: number;
  /** Print JSON instead of a table, no progress bars. */
  json?: boolean;
  /** Keep the demo's folder (its path is printed). */
  keep?: boolean;
  /** Progress and narration lines go here (stderr by default). */
  say?: (line: string) => void;
}

/** One backup of the demo and what it cost. */
export interface DemoPhase {
  phase: 'full' | 'incremental';
  bitmapMode: string;
  summary: CopySummary;
  /** Fleecing image space on the hypervisor before and after the copy's discards. */
  fleecingBefore: number;
  fleecingAfter: number;
  /** Blocks the guest wrote while this backup ran. */
  guestWrites: number;
  verified: true;
}

/**
 * A guest stand-in: writes 64 KiB blocks at pseudo-random offsets of a live disk until stopped.
 * `blocks` collects the offsets written.
 */
export function startGuestWriter(live: NbdClient, options: { seed?: number; blocks?: Set<number> } = {}): { blocks: Set<number>; stop: () => Promise<void> } {
  const blocks = options.blocks ?? new Set<number>();
  const count = Math.floor(live.size / BLOCK);
  let state = (options.seed ?? 1) >>> 0 || 1;
  let running = true;
  const loop = (async () => {
    while (running) {
      // xorshift32: a full-period sequence in exact 32-bit integer arithmetic
      state ^= state << 13;
      state ^= state >>> 17;
      state ^= state << 5;
      state >>>= 0;
      const offset = (state % count) * BLOCK;
      await live.write(offset, Buffer.alloc(BLOCK, (state >>> 8) & 0xff));
      blocks.add(offset);
      await new Promise((r) => setImmediate(r));
    }
  })();
  return {
    blocks,
    stop: async () => {
      running = false;
      await loop;
    },
  };
}

/** The whole disk as it is now, read over NBD. */
async function readWhole(nbd: NbdClient): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let off = 0; off < nbd.size; off += 4 * MiB) parts.push(await nbd.read(off, Math.min(4 * MiB, nbd.size - off)));
  return Buffer.concat(parts);
}

async function allocatedIn(dir: string): Promise<number> {
  let n = 0;
  for (const f of await readdir(dir)) n += (await stat(join(dir, f))).blocks * 512;
  return n;
}

async function verify(path: string, expected: Buffer, what: string): Promise<void> {
  const actual = await readFile(path);
  if (actual.equals(expected)) return;
  const at = actual.findIndex((b, i) => b !== expected[i]);
  throw new PveBackupError(`${what} differs from the disk at its point in time, first at offset ${at}`, { code: 'ERR_DEMO_MISMATCH' });
}

/** Runs the demo; resolves with both phases. */
export async function runDemo(options: DemoOptions = {}): Promise<DemoPhase[]> {
  const size = options.size ?? 512 * MiB;
  const say = options.say ?? ((line: string) => process.stderr.write(`${line}\n`));
  requireTool('qemu-img', 'qemu-utils');
  requireTool('qemu-io', 'qemu-utils');
  const dir = await mkdtemp(join(tmpdir(), 'pve-backup-provider-demo-'));
  let qsd: StorageDaemon | undefined;
  let live: NbdClient | undefined;
  try {
    const image = join(dir, 'disk0.qcow2');
    const fleecing = join(dir, 'fleecing');
    await mkdir(fleecing);
    await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(size)]);
    // 60% data in runs of 3 MiB every 5 MiB; the rest stays holes
    const writes: string[] = [];
    for (let off = 0; off + 3 * MiB <= size; off += 5 * MiB) writes.push('-c', `write -P ${((off / MiB) % 250) + 1} ${off} ${3 * MiB}`);
    await execFileP('qemu-io', ['-f', 'qcow2', ...writes, image]);
    say(`demo: ${formatBytes(size)} disk with 60% data at ${image}; starting qemu-storage-daemon`);

    qsd = await startStorageDaemon({ dir, disks: [{ id: 'disk0', file: image, format: 'qcow2' }], liveExports: true });
    live = await NbdClient.connect(qsd.liveUri('disk0'));
    const access = { targetId: 'demo', devices: ['disk0'], bitmap: 'demo', fleecing: { dir: fleecing }, nbdServer: { path: qsd.nbdSocket } };
    const fullPath = join(dir, 'full.raw');
    const incrementalPath = join(dir, 'incremental.raw');
    const phases: DemoPhase[] = [];

    for (const phase of ['full', 'incremental'] as const) {
      if (phase === 'incremental') {
        say('demo: the guest changes 10% of the disk between the backups');
        const between = startGuestWriter(live, { seed: 99 });
        while (between.blocks.size * BLOCK < size / 10) await new Promise((r) => setTimeout(r, 5));
        await between.stop();
        await copyFile(fullPath, incrementalPath);
      }
      const expected = await readWhole(live);
      const started = await setupBackupAccess(qsd.qmp, access);
      const dev = started.devices[0]!;
      let success = false;
      // the guest keeps writing while the backup runs: copy-before-write keeps the snapshot exact
      const guest = startGuestWriter(live, { seed: phase === 'full' ? 7 : 13 });
      try {
        while (guest.blocks.size < 32) await new Promise((r) => setTimeout(r, 5));
        const fleecingBefore = await allocatedIn(fleecing);
        const view = progressView(phase.padEnd(11), !options.json);
        const summary = await copyExtents({
          uri: dev.nbdUri,
          path: phase === 'full' ? fullPath : incrementalPath,
          existing: phase === 'incremental',
          bitmap: dev.bitmapName,
          discard: true,
          onProgress: (p) => view.update(p.done, p.total, p.bytesPerSecond),
        }).finally(() => view.stop());
        const fleecingAfter = await allocatedIn(fleecing);
        await guest.stop();
        await verify(phase === 'full' ? fullPath : incrementalPath, expected, `the ${phase} backup`);
        phases.push({ phase, bitmapMode: dev.bitmapMode, summary, fleecingBefore, fleecingAfter, guestWrites: guest.blocks.size, verified: true });
        say(`demo: ${phase} backup equals the disk at its point in time (bitmap ${dev.bitmapMode}, guest wrote ${guest.blocks.size} blocks meanwhile)`);
        success = true;
      } finally {
        await guest.stop();
        await teardownBackupAccess(qsd.qmp, { targetId: 'demo', success });
      }
    }
    return phases;
  } finally {
    await live?.close().catch(() => undefined);
    await qsd?.stop();
    if (options.keep) say(`demo: kept ${dir}`);
    else await rm(dir, { recursive: true, force: true });
  }
}

/** The demo's closing table. */
export function printDemo(phases: DemoPhase[], out: (line: string) => void = console.log): void {
  const rows = [['backup', 'bitmap', 'read', 'zero', 'skipped', 'seconds', 'throughput', 'fleecing before', 'after discard', 'check']];
  for (const p of phases) {
    const s = p.summary;
    rows.push([
      p.phase,
      p.bitmapMode,
      formatBytes(s.bytesRead),
      formatBytes(s.bytesZero),
      formatBytes(s.bytesSkipped),
      s.seconds.toFixed(2),
      `${formatBytes(s.seconds > 0 ? s.bytesRead / s.seconds : 0)}/s`,
      formatBytes(p.fleecingBefore),
      formatBytes(p.fleecingAfter),
      'byte-exact',
    ]);
  }
  printTable(rows, out);
}

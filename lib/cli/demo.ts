/**
 * `pve-backup-provider demo`: the whole stack on a real QEMU, with nothing but the README's first
 * command installed. qemu-storage-daemon serves a disk; the job runner backs it up into a
 * {@link DirectoryProvider} store, full and then incremental, while a "guest" keeps writing to it;
 * both points in time are restored with `qemu-img convert` and checked byte for byte.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

import { restoreVm } from '../job/restore.js';
import { runBackupJob } from '../job/runner.js';
import { NbdClient } from '../nbd/client.js';
import type { CopyProgress, CopySummary } from '../nbd/copy.js';
import { DirectoryProvider } from '../directory-provider/provider.js';
import { DirectoryStore } from '../directory-provider/store.js';
import { startStorageDaemon, type StorageDaemon } from '../qemu/storage-daemon.js';
import { requireTool } from '../tools.js';
import { DemoError } from './errors.js';
import { formatBytes, printTable, progressView } from './output.js';

const execFileP = promisify(execFile);
const MiB = 2 ** 20;
const BLOCK = 64 * 1024;
/** The disk's content is remembered as one SHA-256 per 4 MiB, not as a copy. */
const CHUNK = 4 * MiB;

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
  /** The backup's volume id in the demo's store. */
  volid: string;
  bitmapMode: string;
  /** The native core's copy summary. */
  summary: CopySummary;
  /** Bytes of the backup's qcow2 image. */
  stored: number;
  /** Fleecing image space on the hypervisor before and after the copy's discards. */
  fleecingBefore: number;
  fleecingAfter: number;
  /** Blocks the guest wrote while this backup ran. */
  guestWrites: number;
  /** Seconds of the whole guest backup (QMP setup, copy, qcow2, manifest, teardown). */
  backupSeconds: number;
  /** Seconds of the restore (`qemu-img convert` of the chain to raw). */
  restoreSeconds: number;
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

/** SHA-256 of each 4 MiB of the disk as it is now, read over NBD. */
async function fingerprint(nbd: NbdClient): Promise<string[]> {
  const out: string[] = [];
  for (let off = 0; off < nbd.size; off += CHUNK) out.push(createHash('sha256').update(await nbd.read(off, Math.min(CHUNK, nbd.size - off))).digest('hex'));
  return out;
}

/** Checks a restored raw image against a fingerprint; names the first differing 4 MiB. */
async function verify(file: string, expected: string[], what: string): Promise<void> {
  let i = 0;
  for await (const chunk of createReadStream(file, { highWaterMark: CHUNK })) {
    if (createHash('sha256').update(chunk as Buffer).digest('hex') !== expected[i]) {
      throw new DemoError('ERR_DEMO_MISMATCH', `${what} differs from the disk at its point in time, in the 4 MiB at offset ${i * CHUNK}`);
    }
    i++;
  }
  if (i !== expected.length) throw new DemoError('ERR_DEMO_MISMATCH', `${what} has ${i} chunks of 4 MiB, the disk ${expected.length}`);
}

async function allocatedIn(dir: string): Promise<number> {
  let n = 0;
  for (const f of await readdir(dir)) n += (await stat(join(dir, f))).blocks * 512;
  return n;
}

/** What the demo measures around each disk copy. */
interface Around {
  before?: () => Promise<void>;
  after?: () => Promise<void>;
}

/**
 * The reference provider, plus the demo's guest: it keeps writing while each disk is copied (after
 * the point in time, so copy-before-write must keep the snapshot exact).
 */
class DemoProvider extends DirectoryProvider {
  around: Around = {};
  protected override async backupDisk(...args: Parameters<DirectoryProvider['backupDisk']>): Promise<void> {
    await this.around.before?.();
    try {
      await super.backupDisk(...args);
    } finally {
      await this.around.after?.();
    }
  }
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
    const storeDir = join(dir, 'store');
    await mkdir(fleecing);
    await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(size)]);
    // 60% data in runs of 3 MiB every 5 MiB; the rest stays holes
    const writes: string[] = [];
    for (let off = 0; off + 3 * MiB <= size; off += 5 * MiB) writes.push('-c', `write -P ${((off / MiB) % 250) + 1} ${off} ${3 * MiB}`);
    await execFileP('qemu-io', ['-f', 'qcow2', ...writes, image]);
    say(`demo: ${formatBytes(size)} disk with 60% data at ${image}; starting qemu-storage-daemon`);

    qsd = await startStorageDaemon({ dir, disks: [{ id: 'disk0', file: image, format: 'qcow2' }], liveExports: true });
    live = await NbdClient.connect(qsd.liveUri('disk0'));
    const guestLive = live;
    const hooks: { progress?: (p: CopyProgress) => void; done?: (s: CopySummary) => void } = {};
    const provider = new DemoProvider(
      { storeid: 'demo', scfg: { path: storeDir }, log: () => {} },
      { onProgress: (p) => hooks.progress?.(p), onDeviceDone: (_vmid, _device, s) => hooks.done?.(s) },
    );
    const guest = { vmid: 100, type: 'qemu' as const, qmp: qsd.qmp, nbdServer: qsd.nbdSocket, devices: ['disk0'], config: 'name: demo\n' };
    const phases: DemoPhase[] = [];

    for (const phase of ['full', 'incremental'] as const) {
      if (phase === 'incremental') {
        say('demo: the guest changes 10% of the disk between the backups');
        const between = startGuestWriter(live, { seed: 99 });
        while (between.blocks.size * BLOCK < size / 10) await new Promise((r) => setTimeout(r, 5));
        await between.stop();
      }
      const expected = await fingerprint(live);
      let writer: ReturnType<typeof startGuestWriter> | undefined;
      let fleecingBefore = 0;
      let fleecingAfter = 0;
      let summary: CopySummary | undefined;
      const view = progressView(phase.padEnd(11), !options.json);
      provider.around = {
        before: async () => {
          writer = startGuestWriter(guestLive, { seed: phase === 'full' ? 7 : 13 });
          while (writer.blocks.size < 32) await new Promise((r) => setTimeout(r, 5));
          fleecingBefore = await allocatedIn(fleecing);
        },
        after: async () => {
          view.stop();
          fleecingAfter = await allocatedIn(fleecing);
          await writer?.stop();
        },
      };
      hooks.progress = (p) => view.update(p.done, p.total, p.bytesPerSecond);
      hooks.done = (s) => (summary = s);
      const t0 = performance.now();
      const result = await runBackupJob({ provider, storeid: 'demo', guests: [guest], fleecing: { dir: fleecing }, tmpdir: dir });
      const backupSeconds = (performance.now() - t0) / 1000;
      const outcome = result.guests[0]!;
      if (outcome.status !== 'ok') throw outcome.error ?? new DemoError('ERR_DEMO', `the ${phase} backup failed`);
      const volname = outcome.volname!;
      const store = await DirectoryStore.open(storeDir);
      const manifest = await store.readManifest(volname);
      const device = manifest.devices!['disk0']!;

      const restored = join(dir, `${phase}.raw`);
      const rview = progressView(`restore ${phase}`.padEnd(11), !options.json);
      const t1 = performance.now();
      await restoreVm({ provider, volname, storeid: 'demo', targets: { disk0: restored }, onProgress: (p) => rview.update(p.bytes, p.total, 0) }).finally(() => rview.stop());
      const restoreSeconds = (performance.now() - t1) / 1000;
      await verify(restored, expected, `the ${phase} backup, restored`);
      await rm(restored, { force: true });
      phases.push({
        phase,
        volid: store.volid(volname),
        bitmapMode: device.bitmapMode,
        summary: summary!,
        stored: manifest.files[device.file]!.size,
        fleecingBefore,
        fleecingAfter,
        guestWrites: writer?.blocks.size ?? 0,
        backupSeconds,
        restoreSeconds,
        verified: true,
      });
      say(`demo: ${phase} backup ${store.volid(volname)} restored equals the disk at its point in time (bitmap ${device.bitmapMode}, guest wrote ${writer?.blocks.size ?? 0} blocks meanwhile)`);
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
  const rows = [['backup', 'bitmap', 'read', 'stored (qcow2)', 'backup s', 'copy throughput', 'fleecing before', 'after discard', 'restore s', 'check']];
  for (const p of phases) {
    const s = p.summary;
    rows.push([
      p.phase,
      p.bitmapMode,
      formatBytes(s.bytesRead),
      formatBytes(p.stored),
      p.backupSeconds.toFixed(2),
      `${formatBytes(s.seconds > 0 ? s.bytesRead / s.seconds : 0)}/s`,
      formatBytes(p.fleecingBefore),
      formatBytes(p.fleecingAfter),
      p.restoreSeconds.toFixed(2),
      'byte-exact',
    ]);
  }
  printTable(rows, out);
}

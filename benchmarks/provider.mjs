#!/usr/bin/env node
/**
 * Whole-stack VM backup benchmark: the DirectoryProvider through the job runner (QMP backup access,
 * native copy straight into qcow2, manifest with checksums, teardown) against the seed POC's
 * algorithm on the same backup access.
 *
 * Baseline ("seed POC"): the seed's DirectoryExample read the export with libnbd, one 4 MiB request
 * at a time over one connection (benchmarks/seed_baseline.py: its dirty_extents and CHUNK are used
 * as they are), and wrote into a qcow2 image through qemu-nbd (an overlay over the previous backup
 * for incremental backups). Emulated here without a kernel NBD device: the same loop writes to the
 * qcow2 through a second libnbd handle connected to `qemu-nbd -f qcow2` on a unix socket; for full
 * backups (no bitmap on the export) it reads the whole disk and skips writing all-zero 4 MiB chunks
 * (generous to the baseline: the disk is built of whole 4 MiB chunks, 40% of them never written, so
 * the skip applies to all of those; the report prints how much it skipped); it discards each range
 * read, as the seed did. Backup access setup and teardown are this project's (lib/qemu) for both, so
 * the difference is the data path and the provider's own work.
 *
 * Both sides are timed alike, over everything a user waits for (issue 15, "fair numbers first"):
 * from the first step to the end of backup access teardown and whatever the job does after it.
 * - seed POC: backup access setup, qemu-img create, qemu-nbd, the python process (its interpreter
 *   start-up included), qemu-nbd's exit, teardown;
 * - provider: node's start-up (measured in a separate `node` process loading the same modules, as a
 *   CLI or the Perl bridge starts one per job, and added: this process is already running) plus
 *   `runBackupJob` from call to return (job start, setup, copy, fsync, checksums, manifest,
 *   teardown, cleanup, task log, job end).
 * The provider's per-step times come from the timestamps of its task log lines (the job has no
 * other instrumentation); fsync, checksums and the manifest have no log line between them, so they
 * are one step.
 *
 * A/B alternating: in odd rounds the provider runs first, in even rounds the baseline. The guest
 * writes the same blocks between the full and the incremental backups; nothing writes during them,
 * so both sides copy the same data. Medians over the rounds; ratio = baseline time / provider time.
 *
 * usage: node benchmarks/provider.mjs --help   (after npm run build)
 * Writes only its own section of benchmarks/RESULTS.md (`<!-- begin provider -->` ... `<!-- end provider -->`).
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';

import { writeSection } from './results-file.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const dist = path.join(here, '..', 'dist');
const { runBackupJob, DirectoryProvider, DirectoryStore, NbdClient } = await import(path.join(dist, 'index.js'));
const { setupBackupAccess, teardownBackupAccess } = await import(path.join(dist, 'qemu', 'backup-access.js'));
const { startStorageDaemon } = await import(path.join(dist, 'qemu', 'storage-daemon.js'));

const execFileP = promisify(execFile);
const MiB = 2 ** 20;
const CHUNK = 4 * MiB; // seed_baseline.CHUNK: the layout is built of these so the seed's zero skip lines up
const USAGE = `usage: node benchmarks/provider.mjs [options]   (npm run bench:provider -- [options]; after npm run build)
  --size BYTES      disk size (default ${1024 * MiB}, a multiple of ${CHUNK})
  --rounds N        A/B rounds (default 5)
  --no-write        no guest writes between the full and the incremental backup
  --results PATH    the report's file: rewrites only its section between <!-- begin provider --> and
                    <!-- end provider --> (default benchmarks/RESULTS.md; give another path for trial runs)`;
const args = process.argv.slice(2);
if (args.includes('--help') || args.includes('-h')) {
  console.log(USAGE);
  process.exit(0);
}
const arg = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const SIZE = Number(arg('--size', 1024 * MiB));
const ROUNDS = Number(arg('--rounds', 5));
const WRITE = !args.includes('--no-write');
const RESULTS = path.resolve(arg('--results', path.join(here, 'RESULTS.md')));
if (!(SIZE > 0 && SIZE % CHUNK === 0) || !(ROUNDS >= 1)) {
  console.error(USAGE);
  process.exit(2);
}
const PYTHON = '/usr/bin/python3'; // Debian's, where python3-libnbd lives

/** The seed loop, writing to an NBD target (qemu-nbd serving the qcow2). */
const SEED_PY = String.raw`
import importlib.util, sys
import nbd
spec = importlib.util.spec_from_file_location("seed_baseline", sys.argv[1])
seed = importlib.util.module_from_spec(spec); spec.loader.exec_module(seed)
src, dst, bitmap = sys.argv[2], sys.argv[3], sys.argv[4]
h = nbd.NBD()
context = None
if bitmap != "-":
    context = "qemu:dirty-bitmap:" + bitmap
    h.add_meta_context(context)
h.connect_uri(src)
size = h.get_size()
out = nbd.NBD()
out.connect_uri(dst)
extents = seed.dirty_extents(h, context, size) if context else [(0, size)]
zero = bytes(seed.CHUNK)
done = 0
skipped = 0
for off, length in extents:
    end = min(off + length, size)
    while off < end:
        n = min(seed.CHUNK, end - off)
        buf = h.pread(n, off)
        if context or buf != zero[:n]:
            out.pwrite(buf, off)
        else:
            skipped += n
        h.trim(n, off)
        off += n
        done += n
out.flush()
out.shutdown()
h.shutdown()
print(done, skipped)
`;

async function waitForSocket(p, child) {
  for (let i = 0; i < 400; i++) {
    if (child.exitCode !== null) throw new Error(`qemu-nbd exited early (${child.exitCode})`);
    if (existsSync(p)) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`qemu-nbd did not open ${p}`);
}

/**
 * The seed POC's backup of one disk: qcow2 (overlay over `previous`) through qemu-nbd, filled by the
 * seed loop. A new `bitmapId` per chain makes QEMU start a new bitmap (a full backup).
 */
async function seedBackup(qsd, work, fleecing, image, previous, bitmapId) {
  // outside the clock: python's start-up is inside the copy step already; this only shows its share
  const pythonStartup = await startupSeconds(...PYTHON_STARTUP);
  const t0 = performance.now();
  const marks = {}; // step name -> seconds since t0 at its end
  const mark = (name) => (marks[name] = (performance.now() - t0) / 1000);
  const access = await setupBackupAccess(qsd.qmp, { targetId: 'seed', devices: ['disk0'], bitmap: bitmapId, fleecing: { dir: fleecing }, nbdServer: { path: qsd.nbdSocket } });
  mark('setup');
  let success = false;
  let result;
  try {
    const dev = access.devices[0];
    const create = ['create', '-q', '-f', 'qcow2'];
    if (previous) create.push('-b', path.basename(previous), '-F', 'qcow2');
    await execFileP('qemu-img', [...create, image, String(SIZE)]);
    const sock = path.join(work, `seed-${process.pid}.sock`);
    await rm(sock, { force: true });
    const nbdSrv = spawn('qemu-nbd', ['-k', sock, '-f', 'qcow2', image], { stdio: 'ignore' });
    const exited = new Promise((r) => nbdSrv.once('exit', r));
    await waitForSocket(sock, nbdSrv);
    mark('target');
    const bitmap = dev.bitmapMode === 'reuse' ? dev.bitmapName : '-';
    const { stdout } = await execFileP(PYTHON, ['-c', SEED_PY, path.join(here, 'seed_baseline.py'), dev.nbdUri, `nbd+unix:///?socket=${sock}`, bitmap], { maxBuffer: 1 << 20 });
    const [bytes, skipped] = stdout.trim().split(/\s+/).map(Number);
    await exited; // qemu-nbd exits once its client disconnected
    mark('copy');
    success = true;
    result = { bytes, skipped, mode: dev.bitmapMode };
  } finally {
    // inside the clock, as the provider's teardown is inside its job
    await teardownBackupAccess(qsd.qmp, { targetId: 'seed', success });
  }
  mark('teardown');
  const steps = { setup: marks.setup, target: marks.target - marks.setup, copy: marks.copy - marks.target, teardown: marks.teardown - marks.copy };
  return { ...result, seconds: marks.teardown, steps, pythonStartup, stored: (await stat(image)).size };
}

/** Seconds from spawning `cmd args` to its exit (a process start-up with its imports). */
async function startupSeconds(cmd, cmdArgs) {
  const t0 = performance.now();
  await execFileP(cmd, cmdArgs);
  return (performance.now() - t0) / 1000;
}
// what a job process loads before it can start: the same modules this script imports
const NODE_STARTUP = [process.execPath, ['--input-type=module', '-e', ['index.js', 'qemu/backup-access.js', 'qemu/storage-daemon.js'].map((f) => `await import(${JSON.stringify(pathToFileURL(path.join(dist, f)).href)});`).join('')]];
const PYTHON_STARTUP = [PYTHON, ['-c', 'import importlib.util, sys, os; import nbd']];

/**
 * The provider's steps, from the timestamps of the job's log lines: each step ends at the first
 * line matching its pattern (the last step ends when the job returns).
 */
const PROVIDER_STEPS = [
  ['job start, provider init, QMP device query', /^include disk /],
  ['bitmap plan, QMP backup access setup', /^started backup access/],
  ['bitmap query, provider copy set-up', /: (full|incremental over \S+) backup to /],
  ['copy (native core)', /: read \d+ bytes/],
  ['fsync, SHA-256 of the files, manifest', /complete \(.* written\)$/],
  ['QMP teardown', /^backup access torn down/],
  ['storage hooks, backup cleanup', /^Finished Backup/],
  ['task log into the store, job end', null],
];
const SEED_STEPS = [
  ['setup', 'QMP backup access setup'],
  ['target', 'qemu-img create, qemu-nbd start'],
  ['copy', 'python process (start-up, map, reads, writes, flush), qemu-nbd exit'],
  ['teardown', 'QMP teardown'],
];

function providerSteps(events, total) {
  const steps = {};
  let prev = 0;
  let from = 0;
  for (const [name, re] of PROVIDER_STEPS) {
    const i = re ? events.findIndex((e, k) => k >= from && re.test(e.message)) : -1;
    const at = re ? (i >= 0 ? events[i].at : NaN) : total;
    steps[name] = at - prev;
    if (i >= 0) from = i + 1;
    if (!Number.isNaN(at)) prev = at;
  }
  return steps;
}

/** The provider's backup of the VM through the job runner. */
async function providerBackup(qsd, work, fleecing, storeDir) {
  let summary;
  const nodeStartup = await startupSeconds(...NODE_STARTUP);
  const events = [];
  let t0;
  // a factory, as the CLI builds it: the provider's log lines then reach the task log and `log`, timestamped
  const provider = (context) => new DirectoryProvider(context, { onDeviceDone: (_v, _d, s) => (summary = s) });
  const log = (_level, message) => events.push({ at: (performance.now() - t0) / 1000, message });
  t0 = performance.now();
  const r = await runBackupJob({ provider, storeid: 'bench', scfg: { path: storeDir }, log, tmpdir: work, fleecing: { dir: fleecing }, guests: [{ vmid: 100, type: 'qemu', qmp: qsd.qmp, nbdServer: qsd.nbdSocket, devices: ['disk0'], config: 'name: bench\n' }] });
  const job = (performance.now() - t0) / 1000;
  const g = r.guests[0];
  if (g.status !== 'ok') throw g.error;
  const m = await (await DirectoryStore.open(storeDir)).readManifest(g.volname);
  const steps = { 'node start-up': nodeStartup, ...providerSteps(events, job) };
  return { seconds: nodeStartup + job, job, steps, bytes: summary.bytesRead, mode: m.devices.disk0.bitmapMode, stored: m.files['disk0.qcow2'].size, volname: g.volname, copySeconds: summary.seconds };
}

/** The guest changes 10% of the disk: 64 KiB blocks at pseudo-random offsets (same sequence each round). */
async function guestWrites(live, round) {
  const blocks = Math.floor(SIZE / (64 * 1024));
  let state = 12345 + round;
  const touched = new Set();
  while (touched.size < blocks / 10) {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0;
    const b = state % blocks;
    if (touched.has(b)) continue;
    touched.add(b);
    await live.write(b * 64 * 1024, Buffer.alloc(64 * 1024, (state >>> 16) & 0xff || 1));
  }
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const fmtMiB = (b) => `${(b / MiB).toFixed(0)} MiB`;
const fmtS = (x) => (Number.isNaN(x) ? '?' : x.toFixed(3));

async function main() {
  const startLoad = os.loadavg().map((x) => x.toFixed(2)).join(' ');
  const work = await mkdtemp(path.join(os.tmpdir(), 'pvebp-bench-provider-'));
  let qsd;
  let live;
  try {
    const disk = path.join(work, 'disk0.qcow2');
    await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', disk, String(SIZE)]);
    // 60% data in whole 4 MiB chunks at the seed's chunk offsets (chunks 0, 2 and 4 of every five;
    // 1 and 3 never written), so the seed's skip of all-zero chunks in full backups has 40% to skip
    const writes = [];
    for (let i = 0; (i + 1) * CHUNK <= SIZE; i++) if (i % 5 !== 1 && i % 5 !== 3) writes.push('-c', `write -P ${(i % 250) + 1} ${i * CHUNK} ${CHUNK}`);
    await execFileP('qemu-io', ['-f', 'qcow2', ...writes, disk], { maxBuffer: 64 << 20 });
    const fleecing = path.join(work, 'fleecing');
    await mkdir(fleecing);
    qsd = await startStorageDaemon({ dir: work, disks: [{ id: 'disk0', file: disk, format: 'qcow2' }], liveExports: true });
    live = await NbdClient.connect(qsd.liveUri('disk0'));
    const rows = { provider: { full: [], incremental: [] }, seed: { full: [], incremental: [] } };
    const samples = [];
    for (let round = 1; round <= ROUNDS; round++) {
      const rdir = path.join(work, `round${round}`);
      await mkdir(rdir);
      const storeDir = path.join(rdir, 'store');
      const order = round % 2 ? ['provider', 'seed'] : ['seed', 'provider'];
      const got = {};
      for (const phase of ['full', 'incremental']) {
        if (phase === 'incremental' && WRITE) await guestWrites(live, round);
        for (const who of order) {
          const r =
            who === 'provider'
              ? await providerBackup(qsd, rdir, fleecing, storeDir)
              : await seedBackup(qsd, rdir, fleecing, path.join(rdir, `seed-${phase}.qcow2`), phase === 'incremental' ? path.join(rdir, 'seed-full.qcow2') : undefined, `seed${round}`);
          const want = phase === 'full' ? 'new' : 'reuse';
          if (r.mode !== want) throw new Error(`${who} ${phase}: bitmap mode ${r.mode}, expected ${want}`);
          rows[who][phase].push(r);
          got[`${who}-${phase}`] = r;
          const steps = Object.entries(r.steps).map(([k, v]) => `${k.split(/[ ,(]+/).slice(0, 2).join(' ')} ${fmtS(v)}`).join(', ');
          process.stderr.write(`round ${round} ${phase.padEnd(11)} ${who.padEnd(8)} ${r.seconds.toFixed(2)} s  read ${fmtMiB(r.bytes)}  stored ${fmtMiB(r.stored)}${r.skipped ? `  skipped zero ${fmtMiB(r.skipped)}` : ''}  [${steps}]\n`);
        }
      }
      if (round === 1) {
        // both chains hold the same point in time
        const ours = path.join(storeDir, '100', got['provider-incremental'].volname.split('/').pop(), 'disk0.qcow2');
        await execFileP('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'qcow2', ours, path.join(rdir, 'seed-incremental.qcow2')]);
        process.stderr.write('round 1: the provider\'s and the baseline\'s incremental chains are identical (qemu-img compare)\n');
      }
      samples.push({ round, order: order.join(' then ') });
      await rm(rdir, { recursive: true, force: true });
    }
    const line = (phase) => {
      const p = rows.provider[phase];
      const sd = rows.seed[phase];
      const pt = median(p.map((x) => x.seconds));
      const st = median(sd.map((x) => x.seconds));
      const bytes = median(p.map((x) => x.bytes));
      const sbytes = median(sd.map((x) => x.bytes));
      return `| ${phase} | ${fmtMiB(bytes)} / ${fmtMiB(sbytes)} | ${pt.toFixed(2)} s (${(bytes / MiB / pt).toFixed(0)} MiB/s) | ${st.toFixed(2)} s (${(bytes / MiB / st).toFixed(0)} MiB/s) | **${(st / pt).toFixed(2)}x** | ${fmtMiB(median(p.map((x) => x.stored)))} / ${fmtMiB(median(sd.map((x) => x.stored)))} |`;
    };
    const stepMedian = (who, phase, name) => median(rows[who][phase].map((x) => x.steps[name]));
    const providerStepNames = Object.keys(rows.provider.full[0].steps);
    const stepTable = [
      '| step | full | incremental |',
      '|---|---|---|',
      ...providerStepNames.map((n) => `| provider: ${n} | ${fmtS(stepMedian('provider', 'full', n))} s | ${fmtS(stepMedian('provider', 'incremental', n))} s |`),
      `| **provider total** | **${fmtS(median(rows.provider.full.map((x) => x.seconds)))} s** | **${fmtS(median(rows.provider.incremental.map((x) => x.seconds)))} s** |`,
      ...SEED_STEPS.map(([k, n]) => `| seed POC: ${n} | ${fmtS(stepMedian('seed', 'full', k))} s | ${fmtS(stepMedian('seed', 'incremental', k))} s |`),
      `| **seed POC total** | **${fmtS(median(rows.seed.full.map((x) => x.seconds)))} s** | **${fmtS(median(rows.seed.incremental.map((x) => x.seconds)))} s** |`,
    ];
    const copyTimes = (phase) => median(rows.provider[phase].map((x) => x.copySeconds)).toFixed(2);
    const rawTimes = (who, phase) => rows[who][phase].map((x) => x.seconds.toFixed(2)).join(', ');
    const pyStartup = median([...rows.seed.full, ...rows.seed.incremental].map((x) => x.pythonStartup));
    const nodeStartup = median([...rows.provider.full, ...rows.provider.incremental].map((x) => x.steps['node start-up']));
    const skipped = median(rows.seed.full.map((x) => x.skipped));
    const section = [
      '## Whole-stack VM backup (DirectoryProvider)',
      '',
      `\`npm run bench:provider\` (benchmarks/provider.mjs), ${new Date().toISOString().slice(0, 10)}, ${os.cpus().length} cores (${os.cpus()[0]?.model ?? 'unknown CPU'}), ` +
        `QEMU ${(await execFileP('qemu-img', ['--version'])).stdout.split('\n')[0].replace(/^qemu-img version /, '')}, Node ${process.version}.`,
      `A ${fmtMiB(SIZE)} qcow2 disk (60% data: whole 4 MiB chunks, 3 of every 5 written, the others never) served by qemu-storage-daemon; the guest then changes 10% of it in 64 KiB blocks ` +
        `between the full and the incremental backup. ${ROUNDS} round${ROUNDS === 1 ? "" : "s"}, A/B alternating (odd rounds provider first); medians.`,
      '',
      '**Both sides are timed alike**: from their first step through backup access teardown and whatever the job does after it, start-up included. ' +
        "The provider's time is node's start-up (a separate `node` process loading the same modules, timed from spawn to exit) plus `runBackupJob` from call to return; " +
        "the seed POC's runs from backup access setup to the end of its teardown and includes its python process (interpreter start-up too).",
      '',
      '- **provider**: `runBackupJob` with `DirectoryProvider` (API 2): QMP backup access (fleecing qcow2, copy-before-write, snapshot-access, NBD export with the bitmap), ' +
        'the native core writing qcow2 directly (incremental: backed by the previous image), fsync, SHA-256 of every file, manifest, teardown, task log.',
      "- **seed POC**: the seed's algorithm (`seed_baseline.py`'s `dirty_extents` and 4 MiB sequential reads with libnbd, one request at a time, discard after each) " +
        'writing into a qcow2 through `qemu-nbd` (incremental: a qcow2 overlay over the previous image), flushed at the end; full backups read the whole disk and skip writing ' +
        `all-zero 4 MiB chunks (generous to the baseline: here it skipped ${fmtMiB(skipped)} per full backup). Same backup access setup and teardown (lib/qemu) as the provider. No kernel NBD device (the seed used /dev/nbd).`,
      '',
      '| backup | read over NBD (provider / seed) | provider, start-up to job end (point-in-time data/s) | seed POC, setup to teardown (same data/s) | seed / provider time | qcow2 stored (provider / seed) |',
      '|---|---|---|---|---|---|',
      line('full'),
      line('incremental'),
      '',
      "Where the time goes (medians per step; the provider's steps end at its task log lines, so fsync, checksums and manifest, which log nothing between them, are one step):",
      '',
      ...stepTable,
      '',
      `Node start-up: ${fmtS(nodeStartup)} s (median); python with libnbd: ${fmtS(pyStartup)} s (measured apart, already inside the seed's python step). ` +
        `The core's own copy time (extent planning, reads, writes, discards) was ${copyTimes('full')} s (full) and ${copyTimes('incremental')} s (incremental).`,
      `Load average at the start: ${startLoad} (other work on the machine shares the cores; the A/B alternation spreads it over both sides).`,
      `Per-round seconds: provider full ${rawTimes('provider', 'full')}; seed full ${rawTimes('seed', 'full')}; provider incremental ${rawTimes('provider', 'incremental')}; seed incremental ${rawTimes('seed', 'incremental')}.`,
      `Round 1 checked: both incremental chains are identical (\`qemu-img compare\`). Throughput is the data the provider had to copy (allocated data for full, dirty data for incremental) over the wall time, for both sides.`,
      `The provider's full backup reads only allocated data (base:allocation) and stores no zero clusters; the seed POC reads the whole disk. Local storage in the page cache: what is measured is mostly the per-backup work (QMP, processes, fsync, checksums) and the copy loop, not the disk.`,
      '',
    ].join('\n');
    console.log(section);
    await writeSection(RESULTS, 'provider', section);
    process.stderr.write(`written to the provider section of ${RESULTS}\n`);
  } finally {
    await live?.close().catch(() => undefined);
    await qsd?.stop();
    await rm(work, { recursive: true, force: true });
  }
}

await main();

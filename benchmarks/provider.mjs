#!/usr/bin/env node
/**
 * Whole-stack VM backup benchmark, at scale (issue 15): the DirectoryProvider through the CLI
 * (`node dist/cli/main.js backup --qmp ...`: node start-up, QMP backup access, native copy straight
 * into qcow2, checksums, manifest, teardown, task log, process exit) against the seed POC's
 * algorithm on the same backup access, for several disk sizes and shares of changed data.
 *
 * Baseline ("seed POC"): the seed's DirectoryExample read the export with libnbd, one 4 MiB request
 * at a time over one connection (benchmarks/seed_baseline.py: its dirty_extents and CHUNK are used
 * as they are), and wrote into a qcow2 image through qemu-nbd (an overlay over the previous backup
 * for incremental backups). Emulated here without a kernel NBD device: the same loop writes to the
 * qcow2 through a second libnbd handle connected to `qemu-nbd -f qcow2` on a unix socket; for full
 * backups (no bitmap on the export) it reads the whole disk and skips writing all-zero 4 MiB chunks
 * (the disk is built of whole 4 MiB chunks, 40% of them never written, so the skip applies to all of
 * those; the report prints how much it skipped); it discards each range read, as the seed did.
 * Backup access setup and teardown are this project's (lib/qemu) for the baseline.
 *
 * Both sides are timed alike, over everything a user waits for (issue 15, "fair numbers first"):
 * - provider: the CLI process from spawn to exit (node's start-up included), under /usr/bin/time;
 * - seed POC: backup access setup, qemu-img create, qemu-nbd, the python process (under
 *   /usr/bin/time, its interpreter start-up included), qemu-nbd's exit, teardown.
 * Peak RSS (`/usr/bin/time -f %M`): the CLI process (and what it waited for); for the seed, its
 * python process and its qemu-nbd, each apart.
 * Per-step times of the provider: the job's own `steps` in its `--json` result when it has them
 * (feature-detected once per run), otherwise the arrival times of its task log lines on stderr.
 *
 * The CLI talks to qemu-storage-daemon on a second QMP monitor (a QMP socket takes one client; the
 * harness keeps the first for the baseline's backup access and the guest's writes go through a live
 * NBD export). A/B alternating: in odd rounds the provider runs first, in even rounds the baseline.
 * The guest writes the same blocks before each incremental backup; nothing writes during them, so
 * both sides copy the same data. Medians over the rounds; ratio = baseline time / provider time.
 *
 * usage: node benchmarks/provider.mjs --help   (after npm run build)
 * Writes only its own section of benchmarks/RESULTS.md (`<!-- begin provider -->` ... `<!-- end provider -->`).
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';

import { CLI, GiB, MiB, NODE, dist, f2, f3, fmtMiB, fmtSize, guestWrites, makeChunkDisk, median, parseSize, pkg, requireTime, rmf, startDaemonWithJobMonitor, timed, tool } from './common.mjs';
import { writeSection } from './results-file.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const { NbdClient, setupBackupAccess, teardownBackupAccess } = pkg;

const execFileP = promisify(execFile);
const CHUNK = 4 * MiB; // seed_baseline.CHUNK: the layout is built of these so the seed's zero skip lines up
const USAGE = `usage: node benchmarks/provider.mjs [options]   (npm run bench:provider -- [options]; after npm run build)
  --sizes LIST      disk sizes, comma list (a bare number is GiB: 1,8; or 256M); with --changed:
                    every size gets a full backup and one incremental per --changed value
  --changed LIST    percent of the disk the guest changes before each incremental, comma list
                    default (neither given): the issue's goals: full 1 GiB, incremental 10% of 1 GiB,
                    full 8 GiB, incremental 1% of 8 GiB
  --size SIZE       shorthand for --sizes SIZE (smoke runs: --size 256M --rounds 1)
  --rounds N        A/B rounds (default 5)
  --no-verify       skip comparing round 1's chains (provider against baseline, qemu-img compare)
  --results PATH    the report's file: rewrites only its section between <!-- begin provider --> and
                    <!-- end provider --> (default benchmarks/RESULTS.md; give another path for trial runs)
  --work DIR        scratch folder (default: a new folder under the system's temporary folder)
  -h, --help        this text`;

function parseArgs(argv) {
  const o = { sizes: undefined, changed: undefined, rounds: 5, verify: true, results: path.join(here, 'RESULTS.md'), work: undefined };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    switch (a) {
      case '--sizes': case '--size': o.sizes = val().split(',').filter(Boolean).map((s) => parseSize(s)); break;
      case '--changed': o.changed = val().split(',').filter(Boolean).map(Number); break;
      case '--rounds': o.rounds = Number(val()); break;
      case '--no-verify': o.verify = false; break;
      case '--results': o.results = path.resolve(val()); break;
      case '--work': o.work = path.resolve(val()); break;
      case '-h': case '--help': console.log(USAGE); process.exit(0); break;
      default: throw new Error(`unknown option ${a}\n${USAGE}`);
    }
  }
  if (o.sizes === undefined && o.changed === undefined) {
    o.cases = [{ size: GiB, changed: [10] }, { size: 8 * GiB, changed: [1] }];
  } else {
    const changed = o.changed ?? [10];
    o.cases = (o.sizes ?? [GiB]).map((size) => ({ size, changed }));
  }
  for (const c of o.cases) {
    if (!(c.size > 0 && c.size % CHUNK === 0)) throw new Error(`size ${c.size}: must be a positive multiple of 4 MiB`);
    for (const p of c.changed) if (!(p > 0 && p <= 100)) throw new Error(`--changed ${p}: must be in (0, 100]`);
  }
  if (!(Number.isInteger(o.rounds) && o.rounds >= 1)) throw new Error('--rounds must be a positive integer');
  return o;
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

const maxRssMiB = async (file) => Number((await readFile(file, 'utf8')).trim().split('\n').pop()) / 1024;

/**
 * The seed POC's backup of one disk: qcow2 (overlay over `previous`) through qemu-nbd, filled by the
 * seed loop. A new `bitmapId` per chain makes QEMU start a new bitmap (a full backup).
 */
async function seedBackup(qsd, work, fleecing, image, previous, bitmapId, size) {
  const TIME = requireTime();
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
    await execFileP('qemu-img', [...create, image, String(size)]);
    const sock = path.join(work, `seed-${process.pid}.sock`);
    await rm(sock, { force: true });
    const nbdTime = path.join(work, 'time-qemu-nbd.txt');
    const nbdSrv = spawn(TIME, ['-f', '%M', '-o', nbdTime, 'qemu-nbd', '-k', sock, '-f', 'qcow2', image], { stdio: 'ignore' });
    const exited = new Promise((r) => nbdSrv.once('exit', r));
    await waitForSocket(sock, nbdSrv);
    mark('target');
    const bitmap = dev.bitmapMode === 'reuse' ? dev.bitmapName : '-';
    const pyTime = path.join(work, 'time-python.txt');
    const { stdout } = await execFileP(TIME, ['-f', '%M', '-o', pyTime, PYTHON, '-c', SEED_PY, path.join(here, 'seed_baseline.py'), dev.nbdUri, `nbd+unix:///?socket=${sock}`, bitmap], { maxBuffer: 1 << 20 });
    const [bytes, skipped] = stdout.trim().split(/\s+/).map(Number);
    await exited; // qemu-nbd exits once its client disconnected
    mark('copy');
    success = true;
    result = { bytes, skipped, mode: dev.bitmapMode, rss: { python: await maxRssMiB(pyTime), 'qemu-nbd': await maxRssMiB(nbdTime) } };
  } finally {
    // inside the clock, as the provider's teardown is inside its job
    await teardownBackupAccess(qsd.qmp, { targetId: 'seed', success });
  }
  mark('teardown');
  const steps = {
    'QMP backup access setup': marks.setup,
    'qemu-img create, qemu-nbd start': marks.target - marks.setup,
    'python process (start-up, map, reads, writes, flush), qemu-nbd exit': marks.copy - marks.target,
    'QMP teardown': marks.teardown - marks.copy,
  };
  return { ...result, seconds: marks.teardown, steps, rssMiB: Math.max(result.rss.python, result.rss['qemu-nbd']), stored: (await stat(image)).size };
}

/**
 * The floor of a one-process Node provider on this machine: backup access (the seed's bitmap, so
 * the same dirty data), then one node process that loads only the core's copy and reads what the
 * backup must read and TRIMs it, storing nothing (`copyExtents` to `null` with the bitmap and
 * discard), then teardown without success, so that the bitmap keeps its dirty data for the two
 * contenders that follow. A provider that starts node once per backup and reads through this core
 * cannot finish sooner, whatever it does with the data; so seed / floor bounds the ratio such a
 * provider can reach here (issue 15: a goal beyond the ceiling is shown, not chased).
 */
const FLOOR_SCRIPT = `const { copyExtents } = await import(${JSON.stringify(pathToFileURL(path.join(dist, 'nbd', 'copy.js')).href)});
const [uri, bitmap] = process.argv.slice(1);
console.log(JSON.stringify(await copyExtents({ uri, target: 'null', bitmap, discard: true })));`;
async function floorBackup(qsd, work, fleecing, bitmapId) {
  const t0 = performance.now();
  const marks = {};
  const mark = (name) => (marks[name] = (performance.now() - t0) / 1000);
  // the seed's target id: QEMU's bitmaps are named per target (`<target>/<bitmap>`)
  const access = await setupBackupAccess(qsd.qmp, { targetId: 'seed', devices: ['disk0'], bitmap: bitmapId, fleecing: { dir: fleecing }, nbdServer: { path: qsd.nbdSocket } });
  mark('setup');
  let result;
  try {
    const dev = access.devices[0];
    if (dev.bitmapMode !== 'reuse') throw new Error(`floor: bitmap mode ${dev.bitmapMode}, expected reuse`);
    const r = await timed(NODE, ['--input-type=module', '-e', FLOOR_SCRIPT, dev.nbdUri, dev.bitmapName], path.join(work, 'time-floor.txt'));
    mark('copy');
    const summary = JSON.parse(r.stdout);
    result = { bytes: summary.bytesRead, copySeconds: summary.seconds };
  } finally {
    await teardownBackupAccess(qsd.qmp, { targetId: 'seed', success: false });
  }
  mark('teardown');
  const steps = {
    'QMP backup access setup': marks.setup,
    'node process: start-up, reads and TRIMs, exit': marks.copy - marks.setup,
    'QMP teardown': marks.teardown - marks.copy,
  };
  return { ...result, seconds: marks.teardown, steps };
}

/** Seconds from spawning `cmd args` to its exit (a process start-up with its imports). */
async function startupSeconds(cmd, cmdArgs) {
  const t0 = performance.now();
  await execFileP(cmd, cmdArgs);
  return (performance.now() - t0) / 1000;
}
// node's start-up alone: the process loads the package as the CLI does, and exits
const NODE_STARTUP = [NODE, ['--input-type=module', '-e', `await import(${JSON.stringify(pathToFileURL(path.join(dist, 'index.js')).href)});`]];
const PYTHON_STARTUP = [PYTHON, ['-c', 'import importlib.util, sys, os; import nbd']];

/**
 * The provider's steps from its task log lines on stderr (arrival times since spawn): each step ends
 * at the first line matching its pattern; the last ends when the process exits. A pattern that no
 * longer matches leaves its step unknown ('?') and its time in the next step.
 */
const PROVIDER_STEPS = [
  ['node start-up, CLI, store open', /INFO: starting new backup job/],
  ['job start, provider init, QMP device query', /include disk /],
  ['bitmap plan, QMP backup access setup', /started backup access/],
  ['bitmap query, provider copy set-up', /: (full|incremental over \S+) backup to /],
  ['copy (native core)', /: read \d+ bytes/],
  ['fsync, checksums, manifest', /complete \(.* written\)$/],
  ['QMP teardown', /backup access torn down/],
  ['storage hooks, backup cleanup', /Finished Backup/],
  ['task log, job end, process exit', null],
];

function stepsFromLog(lines, total) {
  const steps = {};
  let prev = 0;
  let from = 0;
  for (const [name, re] of PROVIDER_STEPS) {
    const i = re ? lines.findIndex((e, k) => k >= from && re.test(e.line)) : -1;
    const at = re ? (i >= 0 ? lines[i].at : NaN) : total;
    steps[name] = at - prev;
    if (i >= 0) from = i + 1;
    if (!Number.isNaN(at)) prev = at;
  }
  return steps;
}

/**
 * Steps the job reports itself: the `steps` field of the CLI's --json result, the job's
 * `GuestStepTimes` (lib/job/steps.ts: milliseconds per step, and `total`, the guest from start to
 * end). What the job's clock does not cover (node start-up, the CLI around the job, exit) is a
 * step of its own; so is what the guest's total holds beyond its named steps.
 */
const OUTSIDE = 'outside the job (node start-up, CLI, exit)';
function stepsFromJson(s, total) {
  const steps = {};
  for (const [k, v] of Object.entries(s ?? {})) if (k !== 'total' && typeof v === 'number') steps[k] = v / 1000;
  const named = Object.values(steps).reduce((a, b) => a + b, 0);
  const job = typeof s?.total === 'number' ? s.total / 1000 : named;
  return { [OUTSIDE]: total - job, ...steps, 'in the job, between steps': job - named };
}

/** Does the CLI's `backup --json` result carry the job's own `steps`? Decided on a warm-up backup. */
let jsonSteps;
/** What the provider's manifest records (its fields, and the fields of a file and a device entry): which checksum path ran. */
let manifestShape;
function shapeOf(text) {
  const m = JSON.parse(text);
  const keysOf = (o) => (o && typeof o === 'object' ? Object.keys(o).join(', ') : '-');
  const file = Object.values(m.files ?? {})[0];
  const device = Object.values(m.devices ?? {})[0];
  return `manifest fields: ${keysOf(m)}${m.version !== undefined ? ` (version ${JSON.stringify(m.version)})` : ''}; a file's: ${keysOf(file)}; a device's: ${keysOf(device)}`;
}

/** The provider's backup through the CLI, in a child process under /usr/bin/time. */
async function providerBackup(qsd, work, fleecing, storeDir, { json = jsonSteps === true } = {}) {
  const args = [CLI, 'backup', '--store', storeDir, '--vmid', '100', '--qmp', qsd.jobQmpSocket, '--devices', 'disk0', '--nbd-server', qsd.nbdSocket, '--fleecing-dir', fleecing, ...(json ? ['--json'] : [])];
  const r = await timed(NODE, args, path.join(work, 'time-provider.txt'));
  let volid;
  let parent;
  let steps;
  let jsonResult;
  if (json) {
    jsonResult = JSON.parse(r.stdout);
    volid = jsonResult.volid;
    parent = jsonResult.parent;
    steps = jsonResult.steps !== undefined ? stepsFromJson(jsonResult.steps, r.seconds) : undefined;
  } else {
    // "directory:backup/100/qemu-...: qcow2, 40.3 MiB, full" or "..., incremental over VOLID"
    const m = /^(\S+): .*?, (full|incremental over (\S+))$/m.exec(r.stdout);
    if (!m) throw new Error(`unexpected output of the backup command: ${r.stdout}`);
    volid = m[1];
    parent = m[3];
    steps = stepsFromLog(r.stderrLines, r.seconds);
  }
  const dir = path.join(storeDir, '100', volid.split('/').pop());
  // the core's summary line: on stderr without --json, always in the task log the store keeps
  const summaryOf = (lines) => lines.map((l) => /: read (\d+) bytes.* in ([\d.]+) s/.exec(l)).find(Boolean);
  const readLine = summaryOf(r.stderrLines.map((l) => l.line)) ?? summaryOf((await readFile(path.join(dir, 'backup.log'), 'utf8').catch(() => '')).split('\n'));
  manifestShape ??= await readFile(path.join(dir, 'manifest.json'), 'utf8').then(shapeOf, () => undefined);
  // `backup --json` reports the core's summary per disk (copies); older builds only logged it
  const copy = jsonResult?.copies?.disk0;
  return {
    seconds: r.seconds,
    steps: steps ?? { 'whole job (no steps reported)': r.seconds },
    bytes: copy ? copy.bytesRead : readLine ? Number(readLine[1]) : NaN,
    copySeconds: copy ? copy.seconds : readLine ? Number(readLine[2]) : NaN,
    mode: parent ? 'reuse' : 'new',
    image: path.join(dir, 'disk0.qcow2'),
    stored: (await stat(path.join(dir, 'disk0.qcow2'))).size,
    rssMiB: r.rssKiB / 1024,
    cpu: r.cpu,
    jsonResult,
  };
}

/** Bytes of data makeChunkDisk writes: chunks 0, 2 and 4 of every five. */
const dataBytes = (size) => Array.from({ length: Math.floor(size / CHUNK) }, (_, i) => i % 5 !== 1 && i % 5 !== 3).filter(Boolean).length * CHUNK;
const caseName = (k) => (k.phase === 'full' ? `full ${fmtSize(k.size)}` : `incr ${k.changed}% of ${fmtSize(k.size)}`);
/** The issue's goals (seed / provider time). */
function goalOf(k) {
  if (k.phase === 'full') return 2;
  if (k.size === GiB && k.changed === 10) return 1.5;
  if (k.size === 8 * GiB && k.changed === 1) return 3;
  return undefined;
}

async function runCase(opts, work, c, all) {
  const { size } = c;
  const cdir = path.join(work, `disk-${size}`);
  await rmf(cdir);
  await mkdir(cdir, { recursive: true });
  const disk = path.join(cdir, 'disk0.qcow2');
  const t0 = performance.now();
  await makeChunkDisk(disk, size, (cmd, args) => execFileP(cmd, args, { maxBuffer: 64 << 20 }));
  process.stderr.write(`${fmtSize(size)} disk written in ${((performance.now() - t0) / 1000).toFixed(1)} s\n`);
  const fleecing = path.join(cdir, 'fleecing');
  await mkdir(fleecing);
  const qsdDir = path.join(cdir, 'qsd');
  await mkdir(qsdDir);
  const qsd = await startDaemonWithJobMonitor(qsdDir, disk, 'qcow2');
  let live;
  try {
    live = await NbdClient.connect(qsd.liveUri());
    // warm-up, untimed: loads the image's metadata, and decides whether the CLI reports steps
    {
      const wdir = path.join(cdir, 'warmup');
      await mkdir(wdir);
      const w = await providerBackup(qsd, wdir, fleecing, path.join(wdir, 'store'), { json: true });
      jsonSteps ??= w.jsonResult?.steps !== undefined;
      await rmf(wdir);
    }
    for (let round = 1; round <= opts.rounds; round++) {
      const rdir = path.join(cdir, `round${round}`);
      await mkdir(rdir);
      const storeDir = path.join(rdir, 'store');
      const order = round % 2 ? ['provider', 'seed'] : ['seed', 'provider'];
      const phases = [{ phase: 'full' }, ...c.changed.map((p) => ({ phase: 'incremental', changed: p }))];
      let seedPrevious;
      const tops = {};
      for (const [n, ph] of phases.entries()) {
        const key = caseName({ ...ph, size });
        let written;
        if (ph.phase === 'incremental') {
          written = await guestWrites(live, size, ph.changed, 100 * round + n);
          const f = await floorBackup(qsd, rdir, fleecing, `seed${round}`);
          (all[key] ??= { size, ...ph, provider: [], seed: [] }).floor ??= [];
          all[key].floor.push(f);
          process.stderr.write(`round ${round} ${key.padEnd(18)} floor    ${f.seconds.toFixed(2)} s  read ${fmtMiB(f.bytes)}  [copy ${f3(f.copySeconds)}]\n`);
        }
        for (const who of order) {
          const r =
            who === 'provider'
              ? await providerBackup(qsd, rdir, fleecing, storeDir)
              : await seedBackup(qsd, rdir, fleecing, path.join(rdir, `seed-${n}.qcow2`), seedPrevious, `seed${round}`, size);
          if (who === 'seed') seedPrevious = path.join(rdir, `seed-${n}.qcow2`);
          tops[who] = who === 'seed' ? seedPrevious : r.image;
          const want = ph.phase === 'full' ? 'new' : 'reuse';
          if (r.mode !== want) throw new Error(`${who} ${key}: bitmap mode ${r.mode}, expected ${want}`);
          const row = (all[key] ??= { size, ...ph, provider: [], seed: [] });
          row.changedBytes ??= ph.phase === 'full' ? dataBytes(size) : written;
          row[who].push(r);
          const steps = Object.entries(r.steps).map(([k, v]) => `${k.split(/[ ,(]+/).slice(0, 2).join(' ')} ${f3(v)}`).join(', ');
          process.stderr.write(
            `round ${round} ${key.padEnd(18)} ${who.padEnd(8)} ${r.seconds.toFixed(2)} s  rss ${r.rssMiB.toFixed(0)} MiB  read ${Number.isFinite(r.bytes) ? fmtMiB(r.bytes) : '?'}  stored ${fmtMiB(r.stored)}` +
              `${r.skipped ? `  skipped zero ${fmtMiB(r.skipped)}` : ''}  [${steps}]\n`,
          );
        }
        const floor = all[key].floor?.at(-1);
        if (floor && floor.bytes !== all[key].provider.at(-1).bytes) throw new Error(`${key}: the floor read ${floor.bytes} bytes, the provider ${all[key].provider.at(-1).bytes}: not the same dirty data`);
      }
      if (round === 1 && opts.verify) {
        // both chains hold the same point in time
        await execFileP('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'qcow2', tops.provider, tops.seed]);
        process.stderr.write(`round 1: the provider's and the baseline's chains of the ${fmtSize(size)} disk are identical (qemu-img compare)\n`);
        all[caseName({ phase: 'full', size })].verified = true;
      }
      await rm(rdir, { recursive: true, force: true });
    }
  } finally {
    await live?.close().catch(() => undefined);
    await qsd.stop();
    await rmf(cdir);
  }
}

function render(opts, all, meta) {
  const keys = Object.keys(all);
  const med = (xs) => median(xs);
  const t = (k, who) => med(all[k][who].map((x) => x.seconds));
  const rss = (k, who) => med(all[k][who].map((x) => x.rssMiB));
  const L = [];
  L.push('## Whole-stack VM backup (DirectoryProvider), at scale', '');
  L.push(
    `\`npm run bench:provider\` (benchmarks/provider.mjs), ${meta.date}, ${os.cpus().length} cores (${os.cpus()[0]?.model ?? 'unknown CPU'}), QEMU ${meta.qemu}, Node ${process.version}. ` +
      `Command: \`${meta.commandLine}\`.`,
    '',
    `Disks: sparse qcow2, 60% data (whole 4 MiB chunks, 3 of every 5 written, the others never), served by qemu-storage-daemon. Per round and disk: a full backup, then for each share of changed data ` +
      `the guest writes that share of the disk in 64 KiB blocks (through a live NBD export) and both sides take an incremental backup. ${opts.rounds} round${opts.rounds === 1 ? '' : 's'}, ` +
      'A/B alternating (odd rounds provider first); medians. Local storage in the page cache: what is measured is mostly the per-backup work and the copy loop, not the disk.',
    '',
    '- **provider**: `node dist/cli/main.js backup --store S --vmid 100 --qmp SOCK --devices disk0 --nbd-server SOCK --fleecing-dir DIR` (DirectoryProvider, API 2), a child process from spawn to exit under `/usr/bin/time`: ' +
      "node's start-up, QMP backup access, the native core writing qcow2 (incremental: backed by the previous image), checksums, manifest, teardown, task log.",
    "- **seed POC**: the seed's algorithm (`seed_baseline.py`'s `dirty_extents` and 4 MiB sequential reads with libnbd, one request at a time, discard after each) writing into a qcow2 through `qemu-nbd` " +
      '(incremental: a qcow2 overlay over the previous image), flushed at the end; full backups read the whole disk and skip writing all-zero 4 MiB chunks (here: all 40% of holes). ' +
      'Timed from backup access setup (lib/qemu) to the end of its teardown, python start-up included.',
    `- What the provider's backups recorded (feature detection: digests computed while writing show up here): ${meta.manifestShape ?? 'unknown'}.`,
    `- Per-step times of the provider: ${meta.jsonSteps ? "the job's own `steps` (the `steps` field of `backup --json`)" : "arrival times of its task log lines on stderr (the job's `--json` result has no `steps` field yet); fsync, checksums and manifest log nothing between them, so they are one step"}.`,
    '',
    '| backup | provider s | seed POC s | seed / provider | goal | floor s | seed / floor | provider in the job s | seed / in the job | provider s per GiB of disk | provider s per GiB copied | seed s per GiB of disk | seed s per GiB copied | provider peak RSS | seed peak RSS (python / qemu-nbd) | read over NBD (provider / seed) |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  );
  for (const k of keys) {
    const a = all[k];
    const p = t(k, 'provider');
    const s = t(k, 'seed');
    const goal = goalOf(a);
    const ratio = s / p;
    const gib = a.size / GiB;
    const copied = a.changedBytes / GiB;
    const floor = a.floor ? med(a.floor.map((x) => x.seconds)) : NaN;
    const inJob = med(a.provider.map((x) => x.seconds - (x.steps[OUTSIDE] ?? 0)));
    const verdict = !goal ? '' : ratio >= goal ? 'met' : s / floor < goal ? `**not met**: beyond the floor (${f2(s / floor)}x)` : '**not met**';
    L.push(
      `| ${k} | ${f2(p)} | ${f2(s)} | **${f2(ratio)}x** | ${goal ? `>= ${goal}x: ${verdict}` : ''} | ${a.floor ? f2(floor) : ''} | ${a.floor ? `${f2(s / floor)}x` : ''} | ${f2(inJob)} | ${f2(s / inJob)}x | ${f3(p / gib)} | ${f3(p / copied)} | ${f3(s / gib)} | ${f3(s / copied)} | ` +
        `${f2(rss(k, 'provider'))} MiB | ${f2(med(a.seed.map((x) => x.rss.python)))} / ${f2(med(a.seed.map((x) => x.rss['qemu-nbd'])))} MiB | ` +
        `${Number.isFinite(med(a.provider.map((x) => x.bytes))) ? fmtMiB(med(a.provider.map((x) => x.bytes))) : '?'} / ${fmtMiB(med(a.seed.map((x) => x.bytes)))} |`,
    );
  }
  L.push(
    '',
    '- **floor** (incrementals): the least a provider that starts node once per backup and reads through this core can take here. Backup access on the seed\'s bitmap, then a `node` process that loads only the core\'s copy ' +
      '(`copyExtents` to `null`, the bitmap, discard on: node\'s start-up, the core reading exactly the dirty data and trimming it, nothing stored, nothing fsynced), then teardown; it runs first in each incremental phase and its teardown ' +
      'reports failure, so the bitmap keeps its data for both contenders. When seed / floor is below a goal, the goal is beyond a one-process Node provider on this machine, whatever it does with the data.',
    "- **provider in the job**: the provider's time without what lies outside the job's clock (node start-up, the CLI, store open, exit): what each further guest of a job costs where the process is already running, as in Proxmox VE, whose Perl bridge starts the provider host once per vzdump job.",
    '',
    '"Copied" is the data each backup had to copy: the allocated 60% for full backups, the changed blocks for incrementals (the bitmap\'s dirty data). ' +
      "Time that grows with the disk's size at the same changed data is per-backup work that scales with the disk, not with the change (issue 15, \"Scale\").",
    '',
    '### Where the time goes (medians per step)',
    '',
  );
  const stepNames = (who) => [...new Set(keys.flatMap((k) => (all[k][who] ?? []).flatMap((x) => Object.keys(x.steps))))];
  L.push(`| step | ${keys.join(' | ')} |`, `|---|${keys.map(() => '---').join('|')}|`);
  for (const who of ['provider', 'seed', 'floor']) {
    if (who === 'floor' && !keys.some((k) => all[k].floor)) continue;
    const runs = (k) => all[k][who] ?? [];
    const label = who === 'seed' ? 'seed POC' : who;
    const cell = (k, f) => (runs(k).length ? `${f3(med(runs(k).map(f)))} s` : '');
    for (const n of stepNames(who)) L.push(`| ${label}: ${n} | ${keys.map((k) => cell(k, (x) => x.steps[n])).join(' | ')} |`);
    L.push(`| **${label} total** | ${keys.map((k) => (runs(k).length ? `**${cell(k, (x) => x.seconds)}**` : '')).join(' | ')} |`);
  }
  L.push(
    '',
    `Node start-up alone (a \`node\` process importing the package, then exiting; inside the provider's first step): ${f3(meta.nodeStartup)} s, of which node itself (\`node -e 0\`, what no Node program escapes) ${f3(meta.bareNodeStartup)} s; python with libnbd: ${f3(meta.pythonStartup)} s (inside the seed's python step). ` +
      `The core's own copy time (from its log line): ${keys.map((k) => `${k} ${f2(med(all[k].provider.map((x) => x.copySeconds)))} s`).join(', ')}.`,
    '',
    `Per-round seconds: ${keys.map((k) => `${k}: provider ${all[k].provider.map((x) => x.seconds.toFixed(2)).join(', ')}; seed ${all[k].seed.map((x) => x.seconds.toFixed(2)).join(', ')}${all[k].floor ? `; floor ${all[k].floor.map((x) => x.seconds.toFixed(2)).join(', ')}` : ''}`).join('. ')}.`,
    '',
    `${opts.verify ? 'Round 1 checked: for every disk, the provider\'s and the seed POC\'s last images hold the same data (`qemu-img compare` of the two chains).' : 'Chains not compared (--no-verify).'} ` +
      `Load average at the start: ${meta.startLoad}; the run took ${meta.took} s.`,
    '',
  );
  return L.join('\n');
}

async function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`bench: ${e.message}`);
    return 2;
  }
  requireTime();
  for (const [n, p] of [['qemu-storage-daemon', 'qemu-system-common'], ['qemu-img', 'qemu-utils'], ['qemu-io', 'qemu-utils'], ['qemu-nbd', 'qemu-utils']]) tool(n, p);
  if (!existsSync(PYTHON)) throw new Error(`${PYTHON} not found: apt-get install python3 python3-libnbd`);
  const startLoad = os.loadavg().map((x) => x.toFixed(2)).join(' ');
  const started = Date.now();
  const work = opts.work ?? (await mkdtemp(path.join(os.tmpdir(), 'pvebp-bench-provider-')));
  await mkdir(work, { recursive: true });
  const all = {};
  try {
    for (const c of opts.cases) await runCase(opts, work, c, all);
  } finally {
    if (!opts.work) await rmf(work);
  }
  const nodeStartup = median([await startupSeconds(...NODE_STARTUP), await startupSeconds(...NODE_STARTUP), await startupSeconds(...NODE_STARTUP)]);
  const bareNodeStartup = median([await startupSeconds(NODE, ['-e', '0']), await startupSeconds(NODE, ['-e', '0']), await startupSeconds(NODE, ['-e', '0'])]);
  const pythonStartup = median([await startupSeconds(...PYTHON_STARTUP), await startupSeconds(...PYTHON_STARTUP), await startupSeconds(...PYTHON_STARTUP)]);
  const meta = {
    date: new Date().toISOString().slice(0, 16).replace('T', ' ') + ' UTC',
    qemu: (await execFileP('qemu-img', ['--version'])).stdout.split('\n')[0].replace(/^qemu-img version /, ''),
    commandLine: ['node benchmarks/provider.mjs', ...process.argv.slice(2)].join(' '),
    jsonSteps,
    manifestShape,
    nodeStartup,
    bareNodeStartup,
    pythonStartup,
    startLoad,
    took: ((Date.now() - started) / 1000).toFixed(0),
  };
  const section = render(opts, all, meta);
  console.log(section);
  await writeSection(opts.results, 'provider', section);
  process.stderr.write(`written to the provider section of ${opts.results}\n`);
  return 0;
}

process.exitCode = await main().catch((e) => {
  console.error(`bench: ${e.stack ?? e}`);
  return 1;
});

#!/usr/bin/env node
// Benchmarks of the native core (issue 2, "Benchmarks"): full copy, incremental copy, memory;
// and (issue 15) a raw disk with discard on against nbdcopy --flush (--only raw, section core-raw).
//
//   npm run bench                      # full size (2 GiB full, 4 GiB incremental), 5 rounds
//   npm run bench -- --quick           # smoke run (< 1 min): small disks, 2 rounds
//   npm run bench -- --only full --rounds 7 --settings 1x16,2x16,4x8
//
// Every contender runs in a child process under /usr/bin/time (max RSS, CPU), against a fresh
// snapshot-access export of the same qemu-storage-daemon disk; the order of contenders rotates
// each round; medians and ratios go to benchmarks/RESULTS.md (or --results PATH).
// Needs `npm run build` first (uses dist/), qemu-storage-daemon, qemu-img, nbdkit, nbdcopy and
// python3-libnbd (for the seed baseline).
import { execFile, spawn, spawnSync } from 'node:child_process';
import { existsSync, promises as fs, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { pkg, pseudoRandomBytes, sparseRandomDisk, withBackupAccess } from './common.mjs';
import { writeSection } from './results-file.mjs';

const execFileP = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..');
const dist = (p) => path.join(root, 'dist', p);

const { NbdClient, startStorageDaemon } = pkg;

// ---------------------------------------------------------------------------------------------
// Options

const MiB = 2 ** 20;
const GiB = 2 ** 30;

function parseSize(v) {
  const m = /^(\d+(?:\.\d+)?)([KMGT])?$/i.exec(String(v).trim());
  if (!m) throw new Error(`not a size: ${v}`);
  return Math.round(Number(m[1]) * ({ K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[(m[2] ?? '').toUpperCase()] ?? 1));
}

const USAGE = `usage: node benchmarks/run.mjs [options]
  --quick               smoke run: --full-size 256M --inc-size 512M --rounds 2 --settings 1x16
  --only LIST           comma list of: full, incremental, raw (memory comes from the full runs); default all three
                          raw: a raw sparse disk (60% data in 4 MiB runs) with our defaults, discard on, against
                          nbdcopy --flush, and where the time goes (discard, request size, connections);
                          its own section of the report (<!-- begin core-raw -->)
  --raw-size SIZE       raw disk size (default 2G; --quick: 256M)
  --raw-storage LIST    storage setups of the raw benchmark (default cached; same names as --storage)
  --rounds N            rounds per benchmark (default 5)
  --full-size SIZE      full-backup disk size (default 2G)
  --inc-size SIZE       incremental disk size (default 4G)
  --data-percent N      data share of the disks (default 60; the rest are holes)
  --dirty-percent N     dirty share of the incremental disk (default 10)
  --settings LIST       extra connections x requests [x request size] settings of ours in the full run
                        (default 1x16,4x8,2x8; ours = 2x16x4M; e.g. 4x16x256K)
  --no-verify           skip the byte comparison of round 1's outputs with the disk
  --results PATH        the report's file: rewrites only its section between <!-- begin core --> and <!-- end core --> (default benchmarks/RESULTS.md; --quick: benchmarks/work/RESULTS-quick.md)
  --work DIR            scratch folder (default benchmarks/work, git-ignored); images are cached there
  --storage LIST        where the disk image lives, comma list (default cached,direct,remote; --quick: cached):
                          cached  read through the page cache (startStorageDaemon as is)
                          direct  opened with O_DIRECT (cache.direct=on, like Proxmox's default cache=none)
                          remote  over NBD from nbdkit with a delay filter, like network storage
                        each benchmark runs once per storage
  --remote-latency LIST per-request latencies of the remote storage, each a storage setup of its own (default 1ms,5ms)
  --candidate DIR       also run the CLI of another checkout (DIR/dist/cli/main.js, built) as contender
                        "candidate", to A/B a change of the core against this tree
  --candidate-note TEXT what the candidate is, for the report
  --clean               also remove the cached disk images at the end
  --render JSON         only write the report again from a run's saved .json (with --results PATH)`;

function parseArgs(argv) {
  const o = {
    quick: false,
    only: ['full', 'incremental', 'raw'],
    rawSize: 2 * GiB,
    rawCaches: ['cached'],
    rounds: 5,
    fullSize: 2 * GiB,
    incSize: 4 * GiB,
    dataPercent: 60,
    dirtyPercent: 10,
    settings: ['1x16', '4x8', '2x8'],
    verify: true,
    results: undefined,
    work: path.join(here, 'work'),
    clean: false,
    caches: ['cached', 'direct', 'remote'],
    latencies: ['1ms', '5ms'],
    candidate: undefined,
  };
  const explicit = new Set();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    switch (a) {
      case '--quick': o.quick = true; break;
      case '--only': o.only = val().split(',').map((s) => s.trim()).filter(Boolean); break;
      case '--rounds': o.rounds = Number(val()); explicit.add('rounds'); break;
      case '--full-size': o.fullSize = parseSize(val()); explicit.add('fullSize'); break;
      case '--inc-size': o.incSize = parseSize(val()); explicit.add('incSize'); break;
      case '--raw-size': o.rawSize = parseSize(val()); explicit.add('rawSize'); break;
      case '--raw-storage': o.rawCaches = val().split(',').map((x) => x.trim()).filter(Boolean); break;
      case '--data-percent': o.dataPercent = Number(val()); break;
      case '--dirty-percent': o.dirtyPercent = Number(val()); break;
      case '--settings': o.settings = val().split(',').map((s) => s.trim()).filter(Boolean); explicit.add('settings'); break;
      case '--no-verify': o.verify = false; break;
      case '--results': o.results = path.resolve(val()); break;
      case '--work': o.work = path.resolve(val()); break;
      case '--clean': o.clean = true; break;
      case '--candidate': o.candidate = path.resolve(val()); break;
      case '--candidate-note': o.candidateNote = val(); break;
      case '--storage': o.caches = val().split(',').map((x) => x.trim()).filter(Boolean); explicit.add('caches'); break;
      case '--remote-latency': o.latencies = val().split(',').map((x) => x.trim()).filter(Boolean); break;
      case '-h': case '--help': console.log(USAGE); process.exit(0); break;
      default: throw new Error(`unknown option ${a}\n${USAGE}`);
    }
  }
  if (o.quick) {
    if (!explicit.has('rounds')) o.rounds = 2;
    if (!explicit.has('fullSize')) o.fullSize = 256 * MiB;
    if (!explicit.has('incSize')) o.incSize = 512 * MiB;
    if (!explicit.has('rawSize')) o.rawSize = 256 * MiB;
    if (!explicit.has('settings')) o.settings = ['1x16'];
    if (!explicit.has('caches')) o.caches = ['cached'];
  }
  for (const b of o.only) if (!['full', 'incremental', 'raw'].includes(b)) throw new Error(`unknown benchmark ${b}`);
  for (const c of [...o.caches, ...o.rawCaches]) if (!['cached', 'direct', 'remote'].includes(c)) throw new Error(`unknown storage ${c} (cached, direct or remote)`);
  for (const l of o.latencies) if (!/^\d+(ms)?$/.test(l)) throw new Error(`--remote-latency ${l}: expected e.g. 1ms`);
  // one storage setup per mode, and per latency for remote
  const setups = (caches) => caches.flatMap((c) => (c === 'remote' ? o.latencies.map((l) => ({ key: `remote ${l}`, storage: c, latency: l })) : [{ key: c, storage: c }]));
  o.storages = setups(o.caches);
  o.rawStorages = setups(o.rawCaches);
  for (const s of o.settings) if (!/^\d+x\d+(x\d+[KM]?)?$/.test(s)) throw new Error(`setting ${s}: expected CONNECTIONSxREQUESTS[xREQUEST-SIZE], e.g. 2x16 or 4x16x256K`);
  if (!Number.isInteger(o.rounds) || o.rounds < 1) throw new Error('--rounds must be a positive integer');
  if (o.candidate && !existsSync(path.join(o.candidate, 'dist', 'cli', 'main.js'))) throw new Error(`--candidate ${o.candidate}: no dist/cli/main.js (build it first)`);
  o.results ??= o.quick ? path.join(o.work, 'RESULTS-quick.md') : path.join(here, 'RESULTS.md');
  return o;
}

// ---------------------------------------------------------------------------------------------
// Small helpers

const log = (...a) => console.log(...a);
const fmtMiB = (b) => `${(b / MiB).toFixed(0)} MiB`;
const fmtSize = (b) => (b >= GiB && b % GiB === 0 ? `${b / GiB} GiB` : `${(b / MiB).toFixed(0)} MiB`);

function median(xs) {
  const v = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return NaN;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

function tool(name, pkg) {
  const r = spawnSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' });
  const p = r.stdout.trim();
  if (r.status !== 0 || !p) throw new Error(`${name} not found: apt-get install ${pkg}`);
  return p;
}

async function firstLine(cmd, args) {
  try {
    const { stdout, stderr } = await execFileP(cmd, args);
    return (stdout || stderr).split('\n').find((l) => l.trim()) ?? '';
  } catch (e) {
    return `unavailable (${e.message.split('\n')[0]})`;
  }
}

/** Allocated bytes of a file (sparse files: less than the size). */
const allocated = (p) => statSync(p).blocks * 512;

async function rmf(p) {
  await fs.rm(p, { force: true, recursive: true });
}

async function syncAll() {
  await execFileP('sync');
}

async function fsyncFile(p) {
  const fh = await fs.open(p, 'r+');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Loads a file into the page cache, so that round 1 does not pay for cold reads. */
async function warm(p) {
  await execFileP('sh', ['-c', 'cat "$1" > /dev/null', 'sh', p], { maxBuffer: 1 << 20 });
}

const TIME = existsSync('/usr/bin/time') ? '/usr/bin/time' : undefined;

/**
 * Runs a contender's command under /usr/bin/time; wall time is measured here (spawn to exit).
 * Returns { seconds, rssKiB, user, sys, stdout }.
 */
async function timed(cmd, args, timeFile) {
  const argv = TIME ? [TIME, ['-f', '%e %M %U %S', '-o', timeFile, cmd, ...args]] : [cmd, args];
  const t0 = process.hrtime.bigint();
  const { code, stdout, stderr } = await new Promise((resolve, reject) => {
    const child = spawn(argv[0], argv[1], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    child.on('error', reject);
    child.on('close', (c) => resolve({ code: c, stdout: out, stderr: err }));
  });
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  if (code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited with ${code}: ${stderr.trim() || stdout.trim()}`);
  let rssKiB = NaN;
  let user = NaN;
  let sys = NaN;
  if (TIME) {
    const lines = (await fs.readFile(timeFile, 'utf8')).trim().split('\n');
    const [, m, u, s] = lines[lines.length - 1].split(' ').map(Number);
    [rssKiB, user, sys] = [m, u, s];
  }
  return { seconds, rssKiB, user, sys, stdout };
}

/** Deterministic PRNG (mulberry32). */
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Order of the contenders in round `r`: rotated, so each takes each position equally often. */
function rotate(list, r) {
  const k = r % list.length;
  return [...list.slice(k), ...list.slice(0, k)];
}

// ---------------------------------------------------------------------------------------------
// Disks

/** A qcow2 disk of `size` bytes, `percent`% random data in runs of 1 MiB on average, holes elsewhere (cached in `dir`). */
const makeDisk = (dir, size, percent, seed) => sparseRandomDisk(dir, { size, percent, seed, runlength: MiB, format: 'qcow2' });

/** A raw sparse disk of `size` bytes, `percent`% random data in runs of 4 MiB on average (cached in `dir`). */
const makeRawDisk = (dir, size, percent, seed) => sparseRandomDisk(dir, { size, percent, seed, runlength: 4 * MiB, format: 'raw' });

/**
 * One qemu-storage-daemon serving `file` (qcow2, or `format` raw) as node `disk0`; stopped by `stop()` (and on exit).
 * Storage modes:
 * - `cached`: startStorageDaemon as is (the image is read through the host page cache);
 * - `direct`: the image is opened with O_DIRECT (`cache.direct=on`, like Proxmox's default
 *   cache=none), so reads hit the disk;
 * - `remote`: the image is reached over NBD from nbdkit's file plugin behind the delay filter
 *   (`--remote-latency` per request), like network storage (Ceph, iSCSI, NFS).
 */
const daemons = new Set();
async function startDaemon(dir, file, { liveExports = false, storage = 'cached', latency = '1ms', format = 'qcow2' } = {}) {
  await rmf(dir);
  await fs.mkdir(dir, { recursive: true });
  const remote = storage === 'remote' ? await startRemoteStorage(dir, file, latency) : undefined;
  const disk = { id: 'disk0', file, format, direct: storage === 'direct', ...(remote ? { nbdSocket: remote.sock } : {}) };
  const d = await startStorageDaemon({ dir, disks: [disk], liveExports }).catch(async (e) => {
    await remote?.stop();
    throw e;
  });
  if (remote) {
    const stopDaemon = d.stop;
    d.stop = async () => {
      await stopDaemon();
      await remote.stop();
    };
  }
  d.dir = dir;
  daemons.add(d);
  const stop = d.stop;
  d.stop = async () => {
    daemons.delete(d);
    await stop();
  };
  return d;
}

/** Waits until `p` exists, failing early when `child` exits. */
async function waitForPath(p, child, what, log) {
  for (let i = 0; !existsSync(p); i++) {
    if (child.exitCode !== null || child.signalCode !== null || i > 800) {
      throw new Error(`${what} did not start: ${await fs.readFile(log, 'utf8').catch(() => '')}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** nbdkit serving `file` on a unix socket with `latency` added to every read and write: storage elsewhere. */
async function startRemoteStorage(dir, file, latency) {
  const sock = path.join(dir, 'storage.sock');
  const log = path.join(dir, 'nbdkit.log');
  const out = await fs.open(log, 'w');
  const nbdkit = spawn(
    tool('nbdkit', 'nbdkit'),
    ['-f', '--exit-with-parent', '-U', sock, '--filter=delay', 'file', `file=${file}`, `delay-read=${latency}`, `delay-write=${latency}`],
    { stdio: ['ignore', out.fd, out.fd] },
  );
  await out.close();
  const exited = new Promise((resolve) => (nbdkit.exitCode !== null ? resolve() : nbdkit.once('exit', resolve)));
  await waitForPath(sock, nbdkit, 'nbdkit', log);
  return {
    sock,
    stop: async () => {
      if (nbdkit.exitCode === null && nbdkit.signalCode === null) nbdkit.kill('SIGTERM');
      await exited;
    },
  };
}

/** Pids of qemu-storage-daemon processes serving from `dir` (ours: the folder is private to this run). */
async function daemonPids(dir) {
  const pids = [];
  for (const p of await fs.readdir('/proc').catch(() => [])) {
    if (!/^\d+$/.test(p)) continue;
    const cmd = await fs.readFile(`/proc/${p}/cmdline`, 'utf8').catch(() => '');
    if (cmd.startsWith(tool('qemu-storage-daemon', 'qemu-system-common')) && cmd.includes(`${dir}/qmp.sock`)) pids.push(Number(p));
  }
  return pids;
}

async function stopDaemon(d) {
  await d.stop().catch(() => undefined);
  // belt and braces: a daemon that survived quit is killed by its pid
  for (const pid of await daemonPids(d.dir)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
}

async function stopDaemons() {
  for (const d of [...daemons]) await stopDaemon(d);
}

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, () => {
    console.error(`bench: ${sig}, stopping QEMU`);
    void stopDaemons().finally(() => process.exit(130));
  });
}

const TARGET_ID = 'bench';

async function withAccess(daemon, fleeceDir, bitmap, fn, success = true) {
  return withBackupAccess(daemon.qmp, { targetId: TARGET_ID, ...(bitmap ? { bitmap } : {}), fleecing: { dir: fleeceDir, format: 'qcow2' }, nbdServer: { path: daemon.nbdSocket } }, fn, success);
}

/** Byte comparison of an output (raw, or qcow2 by its magic) with the daemon's disk (read-only, shared). */
async function verify(out, disk, diskFormat = 'qcow2') {
  const qemuImg = tool('qemu-img', 'qemu-utils');
  const fh = await fs.open(out, 'r');
  const magic = Buffer.alloc(4);
  await fh.read(magic, 0, 4, 0).finally(() => fh.close());
  const format = magic.toString('latin1') === 'QFI\xfb' ? 'qcow2' : 'raw';
  try {
    await execFileP(qemuImg, ['compare', '-U', '-q', '-f', format, '-F', diskFormat, out, disk]);
    return 'identical';
  } catch (e) {
    return `DIFFERENT (${(e.stdout || e.stderr || e.message).trim().split('\n')[0]})`;
  }
}

// ---------------------------------------------------------------------------------------------
// Contenders

const NODE = process.execPath;
const CLI = dist('cli/main.js');
/** Name of the contender that only writes (see `writingAlone`). */
const WRITE_ALONE = 'dd writing alone';

/** Our CLI from this checkout, or from `--candidate DIR` (another checkout with dist/ built). */
function cliOf(checkout) {
  return checkout ? path.join(checkout, 'dist', 'cli', 'main.js') : CLI;
}

function oursFull(name, extra, checkout) {
  return {
    name,
    command: (uri, out) => [NODE, [cliOf(checkout), 'copy', uri, out, '--json', '--no-discard', ...extra]],
    json: true,
  };
}

/**
 * Bytes any exact copy of `disk` to a sparse raw file must write: the allocation of
 * `qemu-img convert`'s output, which skips zeros at 4 KiB (computed once, kept next to the image).
 */
async function minimalOutputBytes(disk, format = 'qcow2') {
  const note = `${disk}.output-bytes`;
  if (existsSync(note)) return Number(await fs.readFile(note, 'utf8'));
  const tmp = `${disk}.raw.tmp`;
  await rmf(tmp);
  await execFileP(tool('qemu-img', 'qemu-utils'), ['convert', '-f', format, '-O', 'raw', disk, tmp]);
  const bytes = allocated(tmp);
  await rmf(tmp);
  await fs.writeFile(note, String(bytes));
  return bytes;
}

/**
 * Writing alone: dd writes `bytes` of zeros to OUT (in place when OUT exists, as over the copy of
 * the full image in the incremental run) with O_DIRECT in 4 MiB blocks and fsyncs: the disk's own
 * speed for what the output needs, with nothing to read. (fio with 1-16 writes in flight of 1 or
 * 4 MiB took the same time here; dd has no start-up cost; reading its zeros costs ~30 ms per GiB.)
 * Every copy writes at least these bytes, so none can be faster than this.
 */
function writingAlone(bytes) {
  return {
    name: WRITE_ALONE,
    writeOnly: true,
    command: (_uri, out) => ['dd', ['if=/dev/zero', `of=${out}`, 'bs=4M', `count=${bytes}`, 'iflag=count_bytes', 'oflag=direct', 'conv=notrunc,fsync', 'status=none']],
  };
}

/**
 * CPU seconds the whole machine has spent busy so far (all cores, all processes: the contender,
 * QEMU, nbdkit, kernel writeback), from /proc/stat.
 */
async function machineBusySeconds() {
  const [, ...ticks] = (await fs.readFile('/proc/stat', 'utf8')).split('\n', 1)[0].trim().split(/\s+/).map(Number);
  const [user, nice, system, , , irq, softirq, steal] = ticks;
  return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS;
}
const CLOCK_TICKS = 100; // USER_HZ: 100 on every Linux architecture Proxmox runs on

/** Runs one contender against a fresh access and measures it; returns the row. */
async function measure(c, run, round, position, dev, out, extraArgs) {
  const [cmd, args] = c.command(dev.nbdUri, out, extraArgs);
  const busy0 = await machineBusySeconds();
  const res = await timed(cmd, args, path.join(run, 'time.txt'));
  const t0 = process.hrtime.bigint();
  if (!c.toNull) await fsyncFile(out);
  const syncSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const machineBusy = (await machineBusySeconds()) - busy0;
  const last = res.stdout.trim().split('\n').pop() ?? '';
  const summary = c.json ? JSON.parse(last) : c.bytesOnStdout ? { bytesRead: Number(last) } : undefined;
  delete res.stdout;
  return { round, position, name: c.name, toNull: c.toNull === true, writeOnly: c.writeOnly === true, ...res, syncSeconds, total: res.seconds + syncSeconds, machineBusy, summary };
}

// ---------------------------------------------------------------------------------------------
// Full backup

async function benchFull(opts, report, st) {
  const cache = st.key;
  log(`\n== full (storage=${cache}): ${fmtSize(opts.fullSize)} disk, ${opts.dataPercent}% data, ${opts.rounds} round${opts.rounds === 1 ? "" : "s"}`);
  const images = path.join(opts.work, 'images');
  await fs.mkdir(images, { recursive: true });
  const disk = await makeDisk(images, opts.fullSize, opts.dataPercent, 1);
  const run = path.join(opts.work, 'full');
  await rmf(run);
  await fs.mkdir(path.join(run, 'fleece'), { recursive: true });
  const nbdcopy = tool('nbdcopy', 'libnbd-bin');
  const qemuImg = tool('qemu-img', 'qemu-utils');
  const contenders = [
    oursFull('ours', []),
    oursFull('ours qcow2', ['--format', 'qcow2']),
    { name: 'nbdcopy', command: (uri, out) => [nbdcopy, [uri, out]] },
    { name: 'qemu-img', command: (uri, out) => [qemuImg, ['convert', '-f', 'raw', '-O', 'raw', uri, out]] },
    // issue 15: our defaults with discard on (as the provider runs it) against nbdcopy --flush
    { ...oursFull('ours --discard', []), command: (uri, out) => [NODE, [CLI, 'copy', uri, out, '--json', '--discard']] },
    { name: 'nbdcopy --flush', command: (uri, out) => [nbdcopy, ['--flush', uri, out]] },
    ...opts.settings.map((s) => {
      const [c, r, size] = s.split('x');
      return oursFull(`ours ${s}`, ['--connections', c, '--requests', r, ...(size ? ['--max-request', size] : [])]);
    }),
    ...(opts.candidate ? [oursFull('candidate', [], opts.candidate)] : []),
    // reading alone, no output: how fast any copy to a file could be on this machine
    { ...oursFull('ours → null', []), command: (uri) => [NODE, [CLI, 'copy', uri, '-', '--json', '--no-discard']], toNull: true },
    { name: 'nbdcopy → null', command: (uri) => [nbdcopy, [uri, 'null:']], toNull: true },
    writingAlone(await minimalOutputBytes(disk)),
  ];
  const daemon = await startDaemon(path.join(run, 'qsd'), disk, { storage: st.storage, latency: st.latency });
  const rows = [];
  const size = opts.fullSize;
  try {
    await warm(disk);
    // One untimed read of the whole export first: the daemon's first backup access also loads the
    // image's metadata (with O_DIRECT, from the disk), which cost the first contender of round 1
    // up to 7 s more than the rest in earlier runs.
    await withAccess(daemon, path.join(run, 'fleece'), undefined, (dev) => execFileP(NODE, [CLI, 'copy', dev.nbdUri, '-', '--no-discard']));
    for (let r = 0; r < opts.rounds; r++) {
      const order = rotate(contenders, r);
      for (const [i, c] of order.entries()) {
        const out = path.join(run, 'out.raw');
        await rmf(out);
        await syncAll();
        const row = await withAccess(daemon, path.join(run, 'fleece'), undefined, (dev) => measure(c, run, r + 1, i + 1, dev, out));
        if (!c.toNull) row.allocated = allocated(out);
        if (opts.verify && r === 0 && !c.toNull && !c.writeOnly) row.verify = await verify(out, disk);
        rows.push(row);
        log(
          `  round ${row.round} ${c.name.padEnd(10)} ${row.total.toFixed(2)} s (${(size / MiB / row.total).toFixed(0)} MiB/s)` +
            ` rss ${(row.rssKiB / 1024).toFixed(0)} MiB cpu ${(row.user + row.sys).toFixed(2)} s` +
            (row.summary ? ` [engine ${row.summary.seconds.toFixed(2)} s, ${row.summary.connections} conn]` : '') +
            (row.verify ? ` ${row.verify}` : ''),
        );
        await rmf(out);
      }
    }
  } finally {
    await stopDaemon(daemon);
  }
  await rmf(run);
  (report.full ??= {})[cache] = { storage: st, size, rows, contenders: contenders.map((c) => c.name) };
}

// ---------------------------------------------------------------------------------------------
// Raw disk (issue 15, "the core on raw disks too")

/** Our copy of the raw benchmark: our defaults with discard on, as the provider runs it, plus `extra`. */
function oursRaw(name, extra, { discard = true, toNull = false, checkout } = {}) {
  return {
    name,
    command: (uri, out) => [NODE, [cliOf(checkout), 'copy', uri, toNull ? '-' : out, '--json', discard ? '--discard' : '--no-discard', ...extra]],
    json: true,
    toNull,
    discard,
  };
}

/**
 * Full copy of a raw sparse disk (Proxmox's disks are mostly raw) through a fresh snapshot-access
 * export each run: ours with its defaults and discard on (as users run it) against
 * `nbdcopy --flush`, and, to find where the time goes, ours without discard, with 1 MiB requests,
 * with 1 and 4 connections, and reading alone with and without discard (the TRIMs hit an empty
 * fleecing image: nothing writes the disk during the copy).
 */
async function benchRaw(opts, report, st) {
  const cache = st.key;
  log(`\n== raw (storage=${cache}): ${fmtSize(opts.rawSize)} raw disk, ${opts.dataPercent}% data in 4 MiB runs, ${opts.rounds} round${opts.rounds === 1 ? '' : 's'}`);
  const images = path.join(opts.work, 'images');
  await fs.mkdir(images, { recursive: true });
  const disk = await makeRawDisk(images, opts.rawSize, opts.dataPercent, 3);
  const run = path.join(opts.work, 'raw');
  await rmf(run);
  await fs.mkdir(path.join(run, 'fleece'), { recursive: true });
  const nbdcopy = tool('nbdcopy', 'libnbd-bin');
  const contenders = [
    oursRaw('ours', []),
    { name: 'nbdcopy --flush', command: (uri, out) => [nbdcopy, ['--flush', uri, out]] },
    oursRaw('ours --no-discard', [], { discard: false }),
    // explicit, so the comparison holds when the defaults change
    oursRaw('ours 1 MiB requests', ['--max-request', '1M']),
    oursRaw('ours 4 MiB requests', ['--max-request', '4M']),
    oursRaw('ours 1 connection', ['--connections', '1']),
    oursRaw('ours 2 connections', ['--connections', '2']),
    oursRaw('ours 4 connections', ['--connections', '4']),
    ...(opts.candidate ? [oursRaw('candidate', [], { checkout: opts.candidate })] : []),
    oursRaw('ours → null', [], { toNull: true }),
    oursRaw('ours → null --no-discard', [], { toNull: true, discard: false }),
    { name: 'nbdcopy → null', command: (uri) => [nbdcopy, [uri, 'null:']], toNull: true },
    writingAlone(await minimalOutputBytes(disk, 'raw')),
  ];
  const daemon = await startDaemon(path.join(run, 'qsd'), disk, { storage: st.storage, latency: st.latency, format: 'raw' });
  const rows = [];
  const size = opts.rawSize;
  try {
    await warm(disk);
    // one untimed read of the whole export first (see benchFull)
    await withAccess(daemon, path.join(run, 'fleece'), undefined, (dev) => execFileP(NODE, [CLI, 'copy', dev.nbdUri, '-', '--no-discard']));
    for (let r = 0; r < opts.rounds; r++) {
      for (const [i, c] of rotate(contenders, r).entries()) {
        const out = path.join(run, 'out.raw');
        await rmf(out);
        await syncAll();
        const row = await withAccess(daemon, path.join(run, 'fleece'), undefined, (dev) => measure(c, run, r + 1, i + 1, dev, out));
        if (!c.toNull) row.allocated = allocated(out);
        if (opts.verify && r === 0 && !c.toNull && !c.writeOnly) row.verify = await verify(out, disk, 'raw');
        rows.push(row);
        log(
          `  round ${row.round} ${c.name.padEnd(24)} ${row.total.toFixed(2)} s (${(size / MiB / row.total).toFixed(0)} MiB/s)` +
            ` rss ${(row.rssKiB / 1024).toFixed(0)} MiB cpu ${(row.user + row.sys).toFixed(2)} s` +
            (row.summary?.seconds !== undefined ? ` [engine ${row.summary.seconds.toFixed(2)} s, ${row.summary.connections} conn, trimmed ${fmtMiB(row.summary.bytesTrimmed ?? 0)}]` : '') +
            (row.verify ? ` ${row.verify}` : ''),
        );
        await rmf(out);
      }
    }
  } finally {
    await stopDaemon(daemon);
  }
  await rmf(run);
  (report.raw ??= {})[cache] = { storage: st, size, rows, contenders: contenders.map((c) => c.name) };
}

/** The raw benchmark's section of the report (`core-raw`). */
function renderRaw(opts, m, report, commandLine) {
  const L = [];
  const any = Object.values(report.raw)[0];
  L.push('# The core on a raw disk', '');
  L.push(`Generated by \`benchmarks/run.mjs\` on ${m.date}: \`${commandLine}\`. Machine, method and storage setups: as in the core's section above (same harness, same \`measure\`).`, '');
  L.push(
    `Disk: ${fmtSize(any.size)} raw sparse file from \`nbdkit sparse-random size=${any.size} percent=${opts.dataPercent} seed=3 runlength=4194304 random-content=true\` with \`qemu-img convert -O raw\` ` +
      `(${opts.dataPercent}% random data in runs of ~4 MiB, holes unallocated), served by qemu-storage-daemon (\`driver=raw\` over \`driver=file\`) as node \`disk0\`. ` +
      'Each run: a fresh snapshot-access export (`setupBackupAccess`: copy-before-write filter, qcow2 fleecing image), the contender copies it to a new sparse raw file, teardown. ' +
      'Nothing writes the disk during a copy, so the fleecing image stays empty: the TRIMs of a copy with discard free nothing there. Throughput = disk size / time.',
    '',
  );
  L.push('```');
  L.push('ours:                node dist/cli/main.js copy URI OUT --json --discard           # our defaults (2 connections, 16 requests, 4 MiB reads) with discard on, as the provider runs it');
  L.push('nbdcopy --flush:     nbdcopy --flush URI OUT');
  L.push('ours --no-discard:   node dist/cli/main.js copy URI OUT --json --no-discard');
  L.push('ours 1 MiB requests: ... --discard --max-request 1M          (ours 4 MiB requests: --max-request 4M)');
  L.push('ours 1 connection:   ... --discard --connections 1           (2, 4 connections: --connections 2, 4)');
  if (opts.candidate) L.push(`candidate:           node ${path.join(opts.candidate, 'dist/cli/main.js')} copy URI OUT --json --discard`);
  L.push('ours → null:         node dist/cli/main.js copy URI - --json --discard       # reading and trimming alone, no output');
  L.push('ours → null --no-discard: node dist/cli/main.js copy URI - --json --no-discard   # reading alone');
  L.push('nbdcopy → null:      nbdcopy URI null:');
  L.push(`${WRITE_ALONE}:    dd if=/dev/zero of=OUT bs=4M count=BYTES iflag=count_bytes oflag=direct conv=notrunc,fsync   # BYTES = what qemu-img convert's output allocates`);
  L.push('```', '');
  L.push('| storage | ours (discard) | nbdcopy --flush | ours / nbdcopy (goal >= 1.0x) | ours --no-discard | cost of discard (copy) | cost of discard (reading alone) | 1 MiB vs 4 MiB requests | connections 1 / 2 / 4 |', '|---|---|---|---|---|---|---|---|---|');
  const t = (R, c) => stats(R.rows, c, (r) => r.total).median;
  for (const [cache, R] of Object.entries(report.raw)) {
    const ratio = t(R, 'nbdcopy --flush') / t(R, 'ours');
    L.push(
      `| ${cache} | ${f2(t(R, 'ours'))} s | ${f2(t(R, 'nbdcopy --flush'))} s | **${f2(ratio)}x** (per-round ${f2(pairedRatio(R.rows, 'nbdcopy --flush', 'ours', (r) => r.total))}x): ${ratio >= 1 ? 'met' : '**not met**'} | ` +
        `${f2(t(R, 'ours --no-discard'))} s (${f2(t(R, 'nbdcopy --flush') / t(R, 'ours --no-discard'))}x nbdcopy) | ${f2(t(R, 'ours') - t(R, 'ours --no-discard'))} s (${f2(t(R, 'ours') / t(R, 'ours --no-discard'))}x) | ` +
        `${f2(t(R, 'ours → null') - t(R, 'ours → null --no-discard'))} s (${f2(t(R, 'ours → null') / t(R, 'ours → null --no-discard'))}x) | ${f2(t(R, 'ours 1 MiB requests'))} / ${f2(t(R, 'ours 4 MiB requests'))} s | ` +
        `${f2(t(R, 'ours 1 connection'))} / ${f2(t(R, 'ours 2 connections'))} / ${f2(t(R, 'ours 4 connections'))} s |`,
    );
  }
  L.push('', '"Cost of discard" = the median with discard minus the median without (and their ratio); "reading alone" compares the two "→ null" contenders, which write nothing, so only the TRIMs differ.', '');
  for (const [index, [cache, R]] of Object.entries(report.raw).entries()) {
    L.push(`## R${'abcdefgh'[index]}. ${CACHE_TITLE[R.storage.storage]}${R.storage.latency ? ` (${R.storage.latency} per read and write)` : ''}`, '');
    L.push('Seconds to a durable copy, per round:', '');
    roundTable(L, R.rows, R.contenders);
    L.push('| contender | median s | min–max s | median MiB/s | in engine (median s) | median CPU s | machine busy | median max RSS | trimmed | output allocated | round-1 check |');
    L.push('|---|---|---|---|---|---|---|---|---|---|---|');
    for (const c of R.contenders) {
      const tt = stats(R.rows, c, (r) => r.total);
      const first = R.rows.find((r) => r.name === c);
      L.push(
        `| ${c} | ${f2(tt.median)} | ${f2(tt.min)}–${f2(tt.max)} | ${f0(R.size / MiB / tt.median)} | ${first.summary?.seconds !== undefined ? f2(stats(R.rows, c, (r) => r.summary.seconds).median) : ''} | ` +
          `${f2(stats(R.rows, c, (r) => r.user + r.sys).median)} | ${busyShare(R.rows, c, m.nproc)} | ${f0(stats(R.rows, c, (r) => r.rssKiB / 1024).median)} MiB | ` +
          `${first.summary?.bytesTrimmed !== undefined ? fmtMiB(first.summary.bytesTrimmed) : ''} | ${first.toNull ? 'no output' : fmtMiB(first.allocated)} | ${first.verify ?? (first.toNull ? '' : first.writeOnly ? 'no input' : 'not checked')} |`,
      );
    }
    L.push('');
    const ceil = ceiling(R.rows, R.contenders, 'nbdcopy --flush');
    L.push(ceilingLine(ceil, 1.0, 'nbdcopy --flush'));
    if (R.storage.storage === 'direct') L.push(SHARED_DISK_NOTE);
    const fastest = R.contenders.filter((c) => c.startsWith('ours') && !c.includes('null')).map((c) => [c, t(R, c)]).sort((a, b) => a[1] - b[1]);
    L.push(`- our variants, fastest first (median s): ${fastest.map(([c, x]) => `${c} ${f2(x)}`).join(', ')}.`);
    if (opts.candidate) L.push(`- candidate vs nbdcopy --flush: ${f2(t(R, 'nbdcopy --flush') / t(R, 'candidate'))}x; candidate vs ours: ${f2(t(R, 'ours') / t(R, 'candidate'))}x.`);
    L.push('');
  }
  return L.join('\n') + '\n';
}

// ---------------------------------------------------------------------------------------------
// Incremental backup

/** Non-overlapping runs of 64 KiB .. 4 MiB (log-uniform, 4 KiB-aligned) covering `percent`% of `size`. */
function dirtyRuns(size, percent, seed) {
  const rand = prng(seed);
  const want = Math.floor((size * percent) / 100);
  const K4 = 4096;
  const runs = [];
  let total = 0;
  let attempts = 0;
  while (total < want && attempts++ < 1e6) {
    const lenRaw = Math.exp(Math.log(64 * 1024) + rand() * (Math.log(4 * MiB) - Math.log(64 * 1024)));
    const len = Math.min(Math.max(64 * 1024, Math.round(lenRaw / K4) * K4), want - total + 64 * 1024);
    const off = Math.floor((rand() * (size - len)) / K4) * K4;
    // keep a 64 KiB gap so that runs stay separate extents in the bitmap (its granularity)
    const clash = runs.some((x) => off < x.offset + x.length + 65536 && x.offset < off + len + 65536);
    if (clash) continue;
    runs.push({ offset: off, length: len });
    total += len;
  }
  runs.sort((a, b) => a.offset - b.offset);
  return { runs, total };
}

async function benchIncremental(opts, report, st) {
  const cache = st.key;
  log(`\n== incremental (storage=${cache}): ${fmtSize(opts.incSize)} disk, ${opts.dirtyPercent}% dirty, ${opts.rounds} round${opts.rounds === 1 ? "" : "s"}`);
  const images = path.join(opts.work, 'images');
  await fs.mkdir(images, { recursive: true });
  const base = await makeDisk(images, opts.incSize, opts.dataPercent, 2);
  const run = path.join(opts.work, 'incremental');
  await rmf(run);
  await fs.mkdir(path.join(run, 'fleece'), { recursive: true });
  const disk = path.join(run, 'disk.qcow2');
  await execFileP('cp', ['--sparse=always', base, disk]);
  if (st.storage === 'remote') {
    // Over NBD the image file cannot grow: leave sparse room for the clusters the guest writes allocate.
    await fs.truncate(disk, statSync(disk).size + opts.incSize);
  }
  const full = path.join(run, 'full.raw');
  const python = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : tool('python3', 'python3');
  const bitmap = 'bench-inc';
  const { runs, total: dirtyWritten } = dirtyRuns(opts.incSize, opts.dirtyPercent, 42);
  const oursInc = (name, checkout) => ({
    name,
    command: (uri, out, bm) => [NODE, [cliOf(checkout), 'copy', uri, out, '--json', '--bitmap', bm, '--existing', '--discard']],
    json: true,
  });
  const contenders = [
    oursInc('ours'),
    { name: 'seed', command: (uri, out, bm) => [python, [path.join(here, 'seed_baseline.py'), uri, out, bm]], bytesOnStdout: true },
    ...(opts.candidate ? [oursInc('candidate', opts.candidate)] : []),
    // reading (and trimming) alone, no output: how fast any incremental backup could be here
    { ...oursInc('ours → null'), command: (uri, out, bm) => [NODE, [CLI, 'copy', uri, '-', '--json', '--bitmap', bm, '--discard']], toNull: true },
  ];
  const daemon = await startDaemon(path.join(run, 'qsd'), disk, { liveExports: true, storage: st.storage, latency: st.latency });
  const rows = [];
  let dirtyBytes = NaN;
  let firstAction;
  let nextAction;
  try {
    // 1. the full backup that starts the bitmap
    const t0 = Date.now();
    firstAction = await withAccess(daemon, path.join(run, 'fleece'), bitmap, async (dev) => {
      const args = [CLI, 'copy', dev.nbdUri, full, '--json', '--discard', ...(dev.bitmapName ? ['--bitmap', dev.bitmapName] : [])];
      await execFileP(NODE, args);
      return dev.bitmapAction;
    });
    log(`  full backup (bitmap ${firstAction}) in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    // 2. guest writes through the live export
    const live = await NbdClient.connect(daemon.liveUri('disk0'));
    try {
      let i = 0;
      const worker = async () => {
        while (i < runs.length) {
          const { offset, length } = runs[i++];
          await live.write(offset, pseudoRandomBytes(7, offset, length));
        }
      };
      await Promise.all(Array.from({ length: 8 }, worker));
      await live.flush();
    } finally {
      await live.close();
    }
    log(`  wrote ${runs.length} runs, ${fmtMiB(dirtyWritten)} (${((100 * dirtyWritten) / opts.incSize).toFixed(1)}%) through the live export`);
    // 3. what the bitmap says (kept: teardown without success)
    nextAction = await withAccess(
      daemon,
      path.join(run, 'fleece'),
      bitmap,
      async (dev) => {
        const ctx = `qemu:dirty-bitmap:${dev.bitmapName}`;
        const c = await NbdClient.connect(dev.nbdUri, { metaContexts: [ctx] });
        try {
          const ext = await c.blockStatus(0, dev.size, ctx);
          dirtyBytes = ext.filter((e) => e.flags & 1).reduce((s, e) => s + e.length, 0);
        } finally {
          await c.close();
        }
        return dev.bitmapAction;
      },
      false,
    );
    log(`  bitmap (${nextAction}): ${fmtMiB(dirtyBytes)} dirty`);
    contenders.push(writingAlone(dirtyBytes));
    await warm(disk);
    // 4. rounds: each contender writes into a fresh copy of the full image
    for (let r = 0; r < opts.rounds; r++) {
      for (const [i, c] of rotate(contenders, r).entries()) {
        const out = path.join(run, 'target.raw');
        await rmf(out);
        if (!c.toNull) await execFileP('cp', ['--sparse=always', full, out]);
        await syncAll();
        const row = await withAccess(
          daemon,
          path.join(run, 'fleece'),
          bitmap,
          async (dev) => {
            if (dev.bitmapAction !== 'used' || !dev.bitmapName) throw new Error(`expected an incremental access, got bitmap action ${dev.bitmapAction}`);
            return measure(c, run, r + 1, i + 1, dev, out, dev.bitmapName);
          },
          false, // keep the dirty bits for the next contender
        );
        if (opts.verify && r === 0 && !c.toNull && !c.writeOnly) row.verify = await verify(out, disk);
        rows.push(row);
        log(
          `  round ${row.round} ${c.name.padEnd(9)} ${row.total.toFixed(2)} s (${(dirtyBytes / MiB / row.total).toFixed(0)} MiB/s)` +
            ` rss ${(row.rssKiB / 1024).toFixed(0)} MiB cpu ${(row.user + row.sys).toFixed(2)} s` + (row.summary ? ` read ${fmtMiB(row.summary.bytesRead)}` : '') +
            (row.summary?.bytesTrimmed !== undefined ? ` trimmed ${fmtMiB(row.summary.bytesTrimmed)} [engine ${row.summary.seconds.toFixed(2)} s]` : '') +
            (row.verify ? ` ${row.verify}` : ''),
        );
        await rmf(out);
      }
    }
  } finally {
    await stopDaemon(daemon);
  }
  await rmf(run);
  (report.incremental ??= {})[cache] = { storage: st, size: opts.incSize, runs: runs.length, dirtyWritten, dirtyBytes, firstAction, nextAction, rows, contenders: contenders.map((c) => c.name) };
}

// ---------------------------------------------------------------------------------------------
// Report

async function machine() {
  const cpuinfo = await fs.readFile('/proc/cpuinfo', 'utf8').catch(() => '');
  const model = /model name\s*:\s*(.*)/.exec(cpuinfo)?.[1] ?? 'unknown';
  const mem = /MemTotal:\s*(\d+)/.exec(await fs.readFile('/proc/meminfo', 'utf8').catch(() => ''))?.[1];
  return {
    date: new Date().toISOString(),
    nproc: os.cpus().length,
    cpu: model,
    memory: mem ? `${(Number(mem) / 1024 / 1024).toFixed(1)} GiB` : 'unknown',
    kernel: `${os.type()} ${os.release()} ${os.arch()}`,
    qemu: await firstLine('qemu-storage-daemon', ['--version']),
    qemuImg: await firstLine('qemu-img', ['--version']),
    nbdkit: await firstLine('nbdkit', ['--version']),
    nbdcopy: (await execFileP('nbdcopy', ['--version']).then((r) => r.stdout.trim().replace(/\n/g, ', '), (e) => e.message)),
    node: process.version,
    python: await firstLine('/usr/bin/python3', ['--version']),
    fs: await firstLine('sh', ['-c', `df -T ${JSON.stringify(root)} | tail -1 | awk '{print $2}'`]),
    load: os.loadavg().map((x) => x.toFixed(2)).join(' '),
  };
}

function stats(rows, name, value) {
  const v = rows.filter((r) => r.name === name).map(value);
  return { median: median(v), min: Math.min(...v), max: Math.max(...v), values: v };
}

/** Per-round ratio a/b of `value`, then its median (paired by round). */
function pairedRatio(rows, a, b, value) {
  const rounds = [...new Set(rows.map((r) => r.round))];
  const ratios = rounds.map((n) => {
    const ra = rows.find((r) => r.round === n && r.name === a);
    const rb = rows.find((r) => r.round === n && r.name === b);
    return ra && rb ? value(ra) / value(rb) : NaN;
  });
  return median(ratios);
}

const f2 = (x) => (Number.isFinite(x) ? x.toFixed(2) : '-');
const f0 = (x) => (Number.isFinite(x) ? x.toFixed(0) : '-');
/** Median share of the machine's CPU (all cores) that was busy while contender `c` ran. */
function busyShare(rows, c, nproc) {
  const share = stats(rows, c, (r) => (r.machineBusy ?? NaN) / (nproc * r.total)).median;
  return Number.isFinite(share) ? `${(share * 100).toFixed(0)}%` : '-';
}
const CACHE_TITLE = {
  cached: 'storage "cached": image read through the page cache (startStorageDaemon as is)',
  direct: 'storage "direct": image opened with O_DIRECT (cache.direct=on, like Proxmox\'s default cache=none)',
  remote: 'storage "remote": image over NBD from nbdkit with the delay filter, like network storage',
};
/** Heading of a storage setup's section. */
function storageTitle(number, index, st) {
  return `### ${number}${'abcdefgh'[index]}. ${CACHE_TITLE[st.storage]}${st.latency ? ` (${st.latency} per read and write)` : ''}`;
}
const MEMORY_LIMIT_MIB = 64 + 16 * 4;

function roundTable(L, rows, contenders) {
  L.push(`| round | order | ${contenders.join(' | ')} |`, `|---|---|${contenders.map(() => '---').join('|')}|`);
  for (const n of [...new Set(rows.map((r) => r.round))]) {
    const inRound = rows.filter((x) => x.round === n).sort((a, b) => a.position - b.position);
    const cells = contenders.map((c) => f2(inRound.find((x) => x.name === c)?.total));
    L.push(`| ${n} | ${inRound.map((x) => x.name).join(' → ')} | ${cells.join(' | ')} |`);
  }
  L.push('');
}

/**
 * The most any contender could gain over `reference` here: its time over the longer of reading
 * alone (the fastest contender "→ null": the same reads, no output) and writing alone (the
 * output's bytes, nothing read). A copy does both, so it cannot be faster than either.
 */
function ceiling(rows, contenders, reference) {
  const t = (c) => stats(rows, c, (r) => r.total).median;
  const nulls = contenders.filter((c) => c.endsWith('→ null'));
  const read = nulls.length ? Math.min(...nulls.map(t)) : NaN;
  const write = contenders.includes(WRITE_ALONE) ? t(WRITE_ALONE) : NaN;
  return { read: t(reference) / read, write: t(reference) / write, both: t(reference) / Math.max(read, Number.isFinite(write) ? write : 0) };
}

function fullFacts(F) {
  const t = (c) => stats(F.rows, c, (r) => r.total).median;
  const ratio = t('nbdcopy') / t('ours');
  return {
    ratio,
    paired: pairedRatio(F.rows, 'nbdcopy', 'ours', (r) => r.total),
    ours: F.size / MiB / t('ours'),
    nbdcopy: F.size / MiB / t('nbdcopy'),
    ceiling: ceiling(F.rows, F.contenders, 'nbdcopy'),
  };
}

function incFacts(I) {
  const t = (c) => stats(I.rows, c, (r) => r.total).median;
  return {
    ratio: t('seed') / t('ours'),
    paired: pairedRatio(I.rows, 'seed', 'ours', (r) => r.total),
    ours: I.dirtyBytes / MiB / t('ours'),
    seed: I.dirtyBytes / MiB / t('seed'),
    ceiling: ceiling(I.rows, I.contenders, 'seed'),
  };
}

/** Said under the ceiling where the image is read from the disk the output is written to. */
const SHARED_DISK_NOTE =
  '- on this storage QEMU reads the image from the same disk the output goes to: reading and writing compete for it, so a copy may take up to the sum of the two (README.md, finding G), and the ceiling above overstates what any client can gain.';

function ceilingLine(ceil, goal, reference) {
  const parts = [`reading alone (contenders "→ null": the same reads and TRIMs, no output) is ${f2(ceil.read)}x as fast as ${reference}`];
  if (Number.isFinite(ceil.write)) parts.push(`writing alone ("${WRITE_ALONE}": the output's bytes, nothing read) is ${f2(ceil.write)}x as fast`);
  return (
    `- ceiling: ${parts.join('; ')}. A copy does both, so none can gain more than ${f2(ceil.both)}x here: ` +
    `the ${goal}x goal is ${ceil.both >= goal ? 'within reach of this machine' : '**out of reach of this machine**'}.`
  );
}

function render(opts, m, report, loadAfter, commandLine) {
  const L = [];
  L.push('# Benchmark results', '');
  L.push(`Generated by \`benchmarks/run.mjs\` on ${m.date}: \`${commandLine}\`. Raw data: the \`.json\` file next to this one. Analysis and findings: [README.md](README.md).`, '');

  L.push('## Summary', '');
  L.push(
    '| benchmark | storage | ours | reference | ratio (medians) | per-round ratio (median) | ceiling (reading alone / writing alone / both) | goal | met |',
    '|---|---|---|---|---|---|---|---|---|',
  );
  for (const [cache, F] of Object.entries(report.full ?? {})) {
    const x = fullFacts(F);
    L.push(`| 1. full ${fmtSize(F.size)} | ${cache} | ${f0(x.ours)} MiB/s | nbdcopy ${f0(x.nbdcopy)} MiB/s | ${f2(x.ratio)}x | ${f2(x.paired)}x | ${f2(x.ceiling.read)}x / ${f2(x.ceiling.write)}x / ${f2(x.ceiling.both)}x | >= 1.2x | ${x.ratio >= 1.2 ? 'yes' : '**no**'} |`);
  }
  for (const [cache, I] of Object.entries(report.incremental ?? {})) {
    const x = incFacts(I);
    L.push(`| 2. incremental ${fmtSize(I.size)}, ${opts.dirtyPercent}% dirty | ${cache} | ${f0(x.ours)} MiB/s | seed ${f0(x.seed)} MiB/s | ${f2(x.ratio)}x | ${f2(x.paired)}x | ${f2(x.ceiling.read)}x / ${f2(x.ceiling.write)}x / ${f2(x.ceiling.both)}x | >= 5x | ${x.ratio >= 5 ? 'yes' : '**no**'} |`);
  }
  for (const [cache, F] of Object.entries(report.full ?? {})) {
    if (!F.contenders.includes('ours --discard')) continue;
    // issue 15: the core with its defaults, discard on, >= 1.0x nbdcopy --flush
    const t = (c) => stats(F.rows, c, (r) => r.total).median;
    const d = t('nbdcopy --flush') / t('ours --discard');
    L.push(`| 5. full ${fmtSize(F.size)} qcow2 disk, discard on, vs nbdcopy --flush | ${cache} | ${f0(F.size / MiB / t('ours --discard'))} MiB/s | nbdcopy --flush ${f0(F.size / MiB / t('nbdcopy --flush'))} MiB/s | ${f2(d)}x | ${f2(pairedRatio(F.rows, 'nbdcopy --flush', 'ours --discard', (r) => r.total))}x | | >= 1.0x | ${d >= 1 ? 'yes' : '**no**'} |`);
  }
  for (const [cache, F] of Object.entries(report.full ?? {})) {
    if (!F.contenders.includes('ours qcow2')) continue;
    // issue 5: writing qcow2 costs at most 10% throughput against the raw sink
    const t = (c) => stats(F.rows, c, (r) => r.total).median;
    const share = t('ours') / t('ours qcow2');
    L.push(`| 4. qcow2 target vs raw target (ours) | ${cache} | ${f0(F.size / MiB / t('ours qcow2'))} MiB/s | raw ${f0(F.size / MiB / t('ours'))} MiB/s | ${f2(share)}x | ${f2(pairedRatio(F.rows, 'ours', 'ours qcow2', (r) => r.total))}x | | >= 0.9x | ${share >= 0.9 ? 'yes' : '**no**'} |`);
  }
  for (const [cache, F] of Object.entries(report.full ?? {})) {
    const rss = stats(F.rows, 'ours', (r) => r.rssKiB / 1024);
    L.push(`| 3. memory (peak RSS, full copy) | ${cache} | max ${f0(rss.max)} MiB | limit ${MEMORY_LIMIT_MIB} MiB | | | | < ${MEMORY_LIMIT_MIB} MiB | ${rss.max < MEMORY_LIMIT_MIB ? 'yes' : '**no**'} |`);
  }
  L.push('');

  L.push('## Machine', '');
  L.push('| | |', '|---|---|');
  L.push(`| date | ${m.date} |`, `| nproc | ${m.nproc} |`, `| CPU | ${m.cpu} |`, `| memory | ${m.memory} |`, `| kernel | ${m.kernel} |`);
  L.push(`| file system (outputs, images) | ${m.fs} |`);
  L.push(`| QEMU | ${m.qemu} |`, `| qemu-img | ${m.qemuImg} |`, `| nbdkit | ${m.nbdkit} |`, `| nbdcopy / libnbd | ${m.nbdcopy} |`);
  L.push(`| node | ${m.node} |`, `| python (seed baseline) | ${m.python} |`);
  L.push(`| load average (1, 5, 15 min) before / after | ${m.load} / ${loadAfter} |`, '');

  if (opts.candidate) L.push(`Candidate: \`${opts.candidate}\`${opts.candidateNote ? ` — ${opts.candidateNote}` : ''}.`, '');
  L.push('## Method', '');
  L.push(
    '- One machine, one run. The machine is shared (2 cores; other engineers compile and run tests on it), so the numbers are noisy: ' +
      'the order of contenders rotates every round, every contender runs in its own child process, and medians are compared. The per-round tables show the spread.',
    '- Time = wall clock from spawn to exit of the contender, plus an fsync of the output by the harness: "time to a durable copy". ' +
      'Ours and the seed script fsync themselves (the harness fsync then costs ~0); nbdcopy does not flush; qemu-img flushes on close.',
    '- Every run gets a fresh snapshot-access export (`setupBackupAccess`: copy-before-write filter, qcow2 fleecing image, NBD export on the daemon\'s server); setup and teardown are not timed. Outputs are deleted and `sync` is run before every run.',
    '- CPU = user + system seconds of the contender process, max RSS = `/usr/bin/time -f %M` of it (for ours: node + the native core).',
    `- Machine busy = the share of all ${m.nproc} cores' time that was busy while the contender ran (from /proc/stat: the contender, QEMU, nbdkit and the kernel's writeback together). Near 100%, the copy is bound by CPU, and a contender is faster only by using less of it.`,
    `- Round 1's outputs are compared byte for byte with the disk (\`qemu-img compare -U\`)${opts.verify ? '' : ' (skipped in this run: --no-verify)'}.`,
    '',
  );

  if (report.full) {
    L.push('## 1. Full backup', '');
    const any = Object.values(report.full)[0];
    L.push(
      `Disk: ${fmtSize(any.size)} qcow2 filled from \`nbdkit sparse-random size=${any.size} percent=${opts.dataPercent} seed=1 runlength=1048576 random-content=true\` with \`qemu-img convert -O qcow2\` ` +
        `(${opts.dataPercent}% random data in runs of ~1 MiB, holes elsewhere), served by qemu-storage-daemon as node \`disk0\`. Each contender copies the snapshot-access export to a new sparse raw file. Throughput = disk size / time.`,
      '',
    );
    L.push('```');
    L.push('ours:        node dist/cli/main.js copy URI OUT --json --no-discard        # defaults: 2 connections (multi-conn), 16 requests, 4 MiB reads');
    L.push('ours CxR:    node dist/cli/main.js copy URI OUT --json --no-discard --connections C --requests R   # R = requests in flight over all C connections');
    if (opts.candidate) L.push(`candidate:   node ${path.join(opts.candidate, 'dist/cli/main.js')} copy URI OUT --json --no-discard`);
    L.push('nbdcopy:     nbdcopy URI OUT                                             # defaults: 4 connections (multi-conn), 64 requests x 256 KiB');
    L.push('qemu-img:    qemu-img convert -f raw -O raw URI OUT');
    L.push('ours --discard:  node dist/cli/main.js copy URI OUT --json --discard   # our defaults with discard on, as the provider runs it (issue 15)');
    L.push('nbdcopy --flush: nbdcopy --flush URI OUT');
    L.push('ours → null: node dist/cli/main.js copy URI - --json --no-discard        # reading alone: the same reads, no output');
    L.push('nbdcopy → null: nbdcopy URI null:');
    L.push(`${WRITE_ALONE}: dd if=/dev/zero of=OUT bs=4M count=BYTES iflag=count_bytes oflag=direct conv=notrunc,fsync   # BYTES = what qemu-img convert's output allocates`);
    L.push('```', '');
    for (const [index, F] of Object.values(report.full).entries()) {
      L.push(storageTitle(1, index, F.storage), '');
      L.push('Seconds to a durable copy, per round:', '');
      roundTable(L, F.rows, F.contenders);
      L.push('| contender | median s | min–max s | median MiB/s | in engine (median s) | median CPU s | machine busy | median max RSS | output allocated | round-1 check |');
      L.push('|---|---|---|---|---|---|---|---|---|---|');
      for (const c of F.contenders) {
        const t = stats(F.rows, c, (r) => r.total);
        const first = F.rows.find((r) => r.name === c);
        L.push(
          `| ${c} | ${f2(t.median)} | ${f2(t.min)}–${f2(t.max)} | ${f0(F.size / MiB / t.median)} | ${first.summary ? f2(stats(F.rows, c, (r) => r.summary.seconds).median) : ''} | ` +
            `${f2(stats(F.rows, c, (r) => r.user + r.sys).median)} | ${busyShare(F.rows, c, m.nproc)} | ${f0(stats(F.rows, c, (r) => r.rssKiB / 1024).median)} MiB | ${first.toNull ? 'no output' : fmtMiB(first.allocated)} | ${first.verify ?? (first.toNull ? '' : first.writeOnly ? 'no input' : 'not checked')} |`,
        );
      }
      L.push('');
      const x = fullFacts(F);
      L.push(`- ours vs nbdcopy: **${f2(x.ratio)}x** nbdcopy's throughput (median of per-round ratios ${f2(x.paired)}x). Goal >= 1.2x: **${x.ratio >= 1.2 ? 'met' : 'not met'}**.`);
      if (F.contenders.includes('ours --discard')) {
        const d = stats(F.rows, 'nbdcopy --flush', (r) => r.total).median / stats(F.rows, 'ours --discard', (r) => r.total).median;
        L.push(`- ours with discard on vs nbdcopy --flush (issue 15): **${f2(d)}x** (per-round ${f2(pairedRatio(F.rows, 'nbdcopy --flush', 'ours --discard', (r) => r.total))}x). Goal >= 1.0x: **${d >= 1 ? 'met' : 'not met'}**.`);
      }
      L.push(`- ours vs qemu-img convert: ${f2(stats(F.rows, 'qemu-img', (r) => r.total).median / stats(F.rows, 'ours', (r) => r.total).median)}x (per-round ${f2(pairedRatio(F.rows, 'qemu-img', 'ours', (r) => r.total))}x).`);
      const settings = F.contenders.filter((c) => /^ours( \d+x\d+(x\d+[KM]?)?)?$/.test(c));
      const best = settings.map((c) => [c, stats(F.rows, c, (r) => r.total).median]).sort((a, b) => a[1] - b[1]);
      L.push(`- our connections x requests, fastest first (median s): ${best.map(([c, t]) => `${c === 'ours' ? 'default' : c.slice(5)} ${f2(t)}`).join(', ')}.`);
      L.push(ceilingLine(x.ceiling, 1.2, 'nbdcopy'));
      if (F.storage.storage === 'direct') L.push(SHARED_DISK_NOTE);
      if (opts.candidate) L.push(`- candidate vs ours: ${f2(stats(F.rows, 'ours', (r) => r.total).median / stats(F.rows, 'candidate', (r) => r.total).median)}x (per-round ${f2(pairedRatio(F.rows, 'ours', 'candidate', (r) => r.total))}x).`);
      L.push('- "in engine" is the copy as the core measures it (`summary.seconds`); the rest of our time is node start-up, connecting, and the final fsync of the raw file (`sink.finish`).');
      L.push('');
    }
  }

  if (report.incremental) {
    L.push('## 2. Incremental backup', '');
    const I0 = Object.values(report.incremental)[0];
    L.push(
      `Disk: ${fmtSize(I0.size)} qcow2 from \`nbdkit sparse-random size=${I0.size} percent=${opts.dataPercent} seed=2 runlength=1048576 random-content=true\`. ` +
        `A first backup access with bitmap id \`bench-inc\` (action \`${I0.firstAction}\`) takes the full image with ours; then ${I0.runs} runs of 64 KiB – 4 MiB ` +
        `(log-uniform lengths, random 4 KiB-aligned offsets, non-overlapping, PRNG seed 42), ${fmtMiB(I0.dirtyWritten)} in total, are written through a live NBD export of the disk; ` +
        `the bitmap then holds ${fmtMiB(I0.dirtyBytes)} dirty (64 KiB granularity). Each run: \`cp --sparse=always\` of the full image, a fresh backup access (action \`${I0.nextAction}\`), the contender, ` +
        'teardown with success=false (the dirty bits stay for the next run). Both contenders TRIM what they copied. Throughput = dirty bytes / time.',
      '',
    );
    L.push('```');
    L.push('ours:  node dist/cli/main.js copy URI OUT --json --bitmap BITMAP --existing --discard');
    if (opts.candidate) L.push(`candidate: node ${path.join(opts.candidate, 'dist/cli/main.js')} copy URI OUT --json --bitmap BITMAP --existing --discard`);
    L.push('seed:  /usr/bin/python3 benchmarks/seed_baseline.py URI OUT BITMAP      # map the bitmap, then synchronous 4 MiB reads, write, trim');
    L.push('ours → null: node dist/cli/main.js copy URI - --json --bitmap BITMAP --discard   # reading and trimming alone, no output');
    L.push(`${WRITE_ALONE}: dd if=/dev/zero of=OUT bs=4M count=DIRTY iflag=count_bytes oflag=direct conv=notrunc,fsync   # the dirty bytes, in place over the start of the copied full image`);
    L.push('```', '');
    for (const [index, I] of Object.values(report.incremental).entries()) {
      L.push(storageTitle(2, index, I.storage), '');
      L.push('Seconds to a durable image, per round:', '');
      roundTable(L, I.rows, I.contenders);
      L.push('| contender | median s | min–max s | median MiB/s (dirty) | in engine (median s) | median CPU s | machine busy | median max RSS | bytes read | round-1 check |');
      L.push('|---|---|---|---|---|---|---|---|---|---|');
      for (const c of I.contenders) {
        const t = stats(I.rows, c, (r) => r.total);
        const first = I.rows.find((r) => r.name === c);
        L.push(
          `| ${c} | ${f2(t.median)} | ${f2(t.min)}–${f2(t.max)} | ${f0(I.dirtyBytes / MiB / t.median)} | ${first.summary?.seconds !== undefined ? f2(stats(I.rows, c, (r) => r.summary.seconds).median) : ''} | ` +
            `${f2(stats(I.rows, c, (r) => r.user + r.sys).median)} | ${busyShare(I.rows, c, m.nproc)} | ${f0(stats(I.rows, c, (r) => r.rssKiB / 1024).median)} MiB | ${first.summary ? fmtMiB(first.summary.bytesRead) : 'nothing'} | ${first.verify ?? (first.toNull ? 'no output' : first.writeOnly ? 'no input' : 'not checked')} |`,
        );
      }
      L.push('');
      const x = incFacts(I);
      L.push(`- ours vs the seed's algorithm: **${f2(x.ratio)}x** (median of per-round ratios ${f2(x.paired)}x). Goal >= 5x: **${x.ratio >= 5 ? 'met' : 'not met'}**.`);
      L.push(ceilingLine(x.ceiling, 5, 'the seed'));
      if (I.storage.storage === 'direct') L.push(SHARED_DISK_NOTE);
      if (opts.candidate) L.push(`- candidate vs the seed: ${f2(stats(I.rows, 'seed', (r) => r.total).median / stats(I.rows, 'candidate', (r) => r.total).median)}x.`);
      L.push('');
    }
  }

  if (report.full) {
    L.push('## 3. Memory: peak RSS of our full copy', '');
    L.push(
      `Max RSS of the child process (\`/usr/bin/time -f %M\`) running \`node dist/cli/main.js copy\` of the ${fmtSize(Object.values(report.full)[0].size)} disk. ` +
        `Limit: 64 MiB + in-flight buffers (16 x 4 MiB) = ${MEMORY_LIMIT_MIB} MiB. Node alone with the package loaded and nothing copied: ${f0(report.nodeBaseline)} MiB.`,
      '',
    );
    L.push('| storage | contender | per round (MiB) | median | max | goal met |', '|---|---|---|---|---|---|');
    for (const [cache, F] of Object.entries(report.full)) {
      for (const c of F.contenders) {
        const rss = stats(F.rows, c, (r) => r.rssKiB / 1024);
        const ours = c === 'ours' || c.startsWith('ours ') || c === 'candidate';
        L.push(`| ${cache} | ${c} | ${rss.values.map(f0).join(', ')} | ${f0(rss.median)} | ${f0(rss.max)} | ${ours ? (rss.max < MEMORY_LIMIT_MIB ? 'yes' : '**no**') : '(reference)'} |`);
      }
    }
    L.push('');
  }

  L.push('## How to run', '');
  L.push('```');
  L.push('npm run build                         # native addon + dist/');
  L.push('npm run bench                         # everything at full size (2 GiB / 4 GiB / 2 GiB raw, 5 rounds, storages cached, direct, remote 1ms and 5ms; raw: cached), writes benchmarks/RESULTS.md');
  L.push('npm run bench -- --only raw           # the raw disk alone (section core-raw)');
  L.push('npm run bench -- --quick              # smoke run, < 1 min, writes benchmarks/work/RESULTS-quick.md');
  L.push('npm run bench -- --only full --storage cached --rounds 7 --settings 1x8,1x16,4x8');
  L.push('npm run bench -- --candidate ../other-checkout   # A/B another build of the core');
  L.push('node benchmarks/run.mjs --help');
  L.push('```', '');
  L.push('Needs qemu-storage-daemon (qemu-system-common), qemu-img (qemu-utils), nbdkit, nbdcopy (libnbd-bin), python3-libnbd and /usr/bin/time (package `time`). Scratch files and cached disk images live in `benchmarks/work/` (git-ignored; `--clean` removes the images too).');
  return L.join('\n') + '\n';
}

// ---------------------------------------------------------------------------------------------

/** `--render JSON [--results PATH]`: writes the report again from a run's saved data. */
async function renderOnly(argv) {
  const file = argv[argv.indexOf('--render') + 1];
  const saved = JSON.parse(await fs.readFile(file, 'utf8'));
  const i = argv.indexOf('--results');
  const out = i >= 0 ? path.resolve(argv[i + 1]) : file.replace(/\.json$/, '.md');
  await writeSection(out, 'core', render(saved.opts, saved.machine, saved.report, saved.loadAfter, saved.commandLine));
  log(`bench: wrote ${out}`);
  return 0;
}

async function main() {
  if (process.argv.includes('--render')) return renderOnly(process.argv);
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`bench: ${e.message}`);
    return 2;
  }
  for (const [t, p] of [['qemu-storage-daemon', 'qemu-system-common'], ['qemu-img', 'qemu-utils'], ['nbdkit', 'nbdkit'], ['nbdcopy', 'libnbd-bin']]) tool(t, p);
  if (!TIME) log('bench: /usr/bin/time not found (apt-get install time): RSS and CPU will be missing');
  await fs.mkdir(opts.work, { recursive: true });
  const m = await machine();
  log(`bench: ${m.cpu}, ${m.nproc} cpus, load ${m.load}`);
  const report = {};
  const started = Date.now();
  try {
    if (TIME) {
      const { stderr } = await execFileP(TIME, ['-f', '%M', NODE, '-e', `await import(${JSON.stringify(dist('index.js'))})`, '--input-type=module']);
      report.nodeBaseline = Number(stderr.trim().split('\n').pop()) / 1024;
    }
    for (const st of opts.storages) {
      if (opts.only.includes('full')) await benchFull(opts, report, st);
      if (opts.only.includes('incremental')) await benchIncremental(opts, report, st);
    }
    if (opts.only.includes('raw')) for (const st of opts.rawStorages) await benchRaw(opts, report, st);
  } finally {
    await stopDaemons();
    if (opts.clean) await rmf(path.join(opts.work, 'images'));
  }
  const commandLine = ['node benchmarks/run.mjs', ...process.argv.slice(2).map((a) => (/[\s"'$]/.test(a) ? JSON.stringify(a) : a))].join(' ');
  const loadAfter = os.loadavg().map((x) => x.toFixed(2)).join(' ');
  await fs.mkdir(path.dirname(opts.results), { recursive: true });
  // only this benchmark's sections: the whole-stack reports (provider.mjs, restore.mjs) live in the same file
  const { raw, ...core } = report;
  if (core.full || core.incremental) {
    await writeSection(opts.results, 'core', render(opts, m, core, loadAfter, commandLine));
    await fs.writeFile(opts.results.replace(/\.md$/, '') + '.json', JSON.stringify({ opts, machine: m, report: core, loadAfter, commandLine }, null, 1));
  }
  if (raw) {
    await writeSection(opts.results, 'core-raw', renderRaw(opts, m, { raw }, commandLine));
    await fs.writeFile(opts.results.replace(/\.md$/, '') + '-raw.json', JSON.stringify({ opts, machine: m, report: { raw }, loadAfter, commandLine }, null, 1));
  }
  log(`\nbench: done in ${((Date.now() - started) / 1000).toFixed(0)} s; wrote ${path.relative(process.cwd(), opts.results)}`);
  return 0;
}

process.exitCode = await main().catch(async (e) => {
  console.error(`bench: ${e.stack ?? e}`);
  await stopDaemons();
  return 1;
});

#!/usr/bin/env node
// Benchmarks of the native core (issue 2, "Benchmarks"): full copy, incremental copy, memory.
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
import { createCipheriv, createHash } from 'node:crypto';
import { existsSync, promises as fs, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..');
const dist = (p) => path.join(root, 'dist', p);

const { startStorageDaemon } = await import(dist('qemu/storage-daemon.js')).catch((e) => {
  console.error(`bench: cannot load dist/ (run \`npm run build\` first): ${e.message}`);
  process.exit(2);
});
const { setupBackupAccess, teardownBackupAccess } = await import(dist('qemu/index.js'));
const { NbdClient } = await import(dist('nbd/client.js'));

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
  --quick               smoke run: --full-size 256M --inc-size 512M --rounds 2 --settings 2x16
  --only LIST           comma list of: full, incremental (memory comes from the full runs); default both
  --rounds N            rounds per benchmark (default 5)
  --full-size SIZE      full-backup disk size (default 2G)
  --inc-size SIZE       incremental disk size (default 4G)
  --data-percent N      data share of the disks (default 60; the rest are holes)
  --dirty-percent N     dirty share of the incremental disk (default 10)
  --settings LIST       extra connections x requests settings of ours in the full run (default 2x16,4x8,2x8)
  --no-verify           skip the byte comparison of round 1's outputs with the disk
  --results PATH        where to write the report (default benchmarks/RESULTS.md; --quick: benchmarks/work/RESULTS-quick.md)
  --work DIR            scratch folder (default benchmarks/work, git-ignored); images are cached there
  --clean               also remove the cached disk images at the end`;

function parseArgs(argv) {
  const o = {
    quick: false,
    only: ['full', 'incremental'],
    rounds: 5,
    fullSize: 2 * GiB,
    incSize: 4 * GiB,
    dataPercent: 60,
    dirtyPercent: 10,
    settings: ['2x16', '4x8', '2x8'],
    verify: true,
    results: undefined,
    work: path.join(here, 'work'),
    clean: false,
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
      case '--data-percent': o.dataPercent = Number(val()); break;
      case '--dirty-percent': o.dirtyPercent = Number(val()); break;
      case '--settings': o.settings = val().split(',').map((s) => s.trim()).filter(Boolean); explicit.add('settings'); break;
      case '--no-verify': o.verify = false; break;
      case '--results': o.results = path.resolve(val()); break;
      case '--work': o.work = path.resolve(val()); break;
      case '--clean': o.clean = true; break;
      case '-h': case '--help': console.log(USAGE); process.exit(0); break;
      default: throw new Error(`unknown option ${a}\n${USAGE}`);
    }
  }
  if (o.quick) {
    if (!explicit.has('rounds')) o.rounds = 2;
    if (!explicit.has('fullSize')) o.fullSize = 256 * MiB;
    if (!explicit.has('incSize')) o.incSize = 512 * MiB;
    if (!explicit.has('settings')) o.settings = ['2x16'];
  }
  for (const b of o.only) if (!['full', 'incremental'].includes(b)) throw new Error(`unknown benchmark ${b}`);
  for (const s of o.settings) if (!/^\d+x\d+$/.test(s)) throw new Error(`setting ${s}: expected CONNECTIONSxREQUESTS, e.g. 2x16`);
  if (!Number.isInteger(o.rounds) || o.rounds < 1) throw new Error('--rounds must be a positive integer');
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

/** Deterministic incompressible bytes for `offset` (AES-CTR keystream). */
function pseudoRandomBytes(seed, offset, length) {
  const key = createHash('sha256').update(`bench-${seed}`).digest().subarray(0, 16);
  const iv = Buffer.alloc(16);
  iv.writeBigUInt64BE(BigInt(offset), 0);
  return createCipheriv('aes-128-ctr', key, iv).update(Buffer.alloc(length));
}

/** Order of the contenders in round `r`: rotated, so each takes each position equally often. */
function rotate(list, r) {
  const k = r % list.length;
  return [...list.slice(k), ...list.slice(0, k)];
}

// ---------------------------------------------------------------------------------------------
// Disks

/**
 * A qcow2 disk of `size` bytes with `percent`% random data in runs (nbdkit sparse-random,
 * fixed seed, runs of 1 MiB on average) and holes elsewhere. Cached in `dir`.
 */
async function makeDisk(dir, size, percent, seed) {
  const file = path.join(dir, `disk-${size}-${percent}-${seed}.qcow2`);
  if (existsSync(file)) return file;
  const nbdkit = tool('nbdkit', 'nbdkit');
  const qemuImg = tool('qemu-img', 'qemu-utils');
  const tmp = `${file}.tmp`;
  await rmf(tmp);
  log(`  generating ${path.basename(file)} (${fmtSize(size)}, ${percent}% data) ...`);
  await execFileP(nbdkit, [
    '-U', '-', 'sparse-random', `size=${size}`, `percent=${percent}`, `seed=${seed}`, 'runlength=1048576', 'random-content=true',
    '--run', `${qemuImg} convert -f raw -O qcow2 "$uri" ${JSON.stringify(tmp)}`,
  ]);
  await fs.rename(tmp, file);
  return file;
}

/** One qemu-storage-daemon serving `file` as node `disk0`; stopped by `stop()` (and on exit). */
const daemons = new Set();
async function startDaemon(dir, file, liveExports = false) {
  await rmf(dir);
  await fs.mkdir(dir, { recursive: true });
  const d = await startStorageDaemon({ dir, disks: [{ id: 'disk0', file, format: 'qcow2' }], liveExports });
  daemons.add(d);
  const stop = d.stop;
  d.stop = async () => {
    daemons.delete(d);
    await stop();
  };
  return d;
}

async function stopDaemons() {
  for (const d of [...daemons]) await d.stop().catch(() => undefined);
}

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, () => {
    console.error(`bench: ${sig}, stopping QEMU`);
    void stopDaemons().finally(() => process.exit(130));
  });
}

const TARGET_ID = 'bench';

async function withAccess(daemon, fleeceDir, bitmap, fn, success = true) {
  const access = await setupBackupAccess(daemon.qmp, {
    targetId: TARGET_ID,
    devices: ['disk0'],
    ...(bitmap ? { bitmap } : {}),
    fleecing: { dir: fleeceDir, format: 'qcow2' },
    nbdServer: { path: daemon.nbdSocket },
  });
  let ok = false;
  try {
    const r = await fn(access.devices[0]);
    ok = true;
    return r;
  } finally {
    await teardownBackupAccess(daemon.qmp, { targetId: TARGET_ID, success: ok && success });
  }
}

/** Byte comparison of a raw output with the daemon's disk (read-only, shared). */
async function verify(out, disk) {
  const qemuImg = tool('qemu-img', 'qemu-utils');
  try {
    await execFileP(qemuImg, ['compare', '-U', '-q', '-f', 'raw', '-F', 'qcow2', out, disk]);
    return 'identical';
  } catch (e) {
    return `DIFFERENT (${(e.stdout || e.stderr || e.message).trim().split('\n')[0]})`;
  }
}

// ---------------------------------------------------------------------------------------------
// Contenders

const NODE = process.execPath;
const CLI = dist('cli/main.js');

function oursFull(name, extra) {
  return {
    name,
    command: (uri, out) => [NODE, [CLI, 'copy', uri, out, '--json', '--no-discard', ...extra]],
    durableInside: true,
  };
}

// ---------------------------------------------------------------------------------------------
// Full backup

async function benchFull(opts, report) {
  log(`\n== full: ${fmtSize(opts.fullSize)} disk, ${opts.dataPercent}% data, ${opts.rounds} rounds`);
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
    { name: 'nbdcopy', command: (uri, out) => [nbdcopy, [uri, out]] },
    { name: 'qemu-img', command: (uri, out) => [qemuImg, ['convert', '-f', 'raw', '-O', 'raw', uri, out]] },
    ...opts.settings.map((s) => {
      const [c, r] = s.split('x');
      return oursFull(`ours ${s}`, ['--connections', c, '--requests', r]);
    }),
  ];
  const daemon = await startDaemon(path.join(run, 'qsd'), disk);
  const rows = [];
  try {
    await warm(disk);
    for (let r = 0; r < opts.rounds; r++) {
      const order = rotate(contenders, r);
      for (const c of order) {
        const out = path.join(run, 'out.raw');
        await rmf(out);
        await syncAll();
        const row = await withAccess(daemon, path.join(run, 'fleece'), undefined, async (dev) => {
          const [cmd, args] = c.command(dev.nbdUri, out);
          const res = await timed(cmd, args, path.join(run, 'time.txt'));
          const t0 = process.hrtime.bigint();
          await fsyncFile(out);
          const syncSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
          const summary = c.durableInside ? JSON.parse(res.stdout.trim().split('\n').pop()) : undefined;
          return { round: r + 1, name: c.name, ...res, syncSeconds, total: res.seconds + syncSeconds, summary, size: dev.size };
        });
        row.allocated = allocated(out);
        if (opts.verify && r === 0) row.verify = await verify(out, disk);
        delete row.stdout;
        rows.push(row);
        log(
          `  round ${row.round} ${c.name.padEnd(10)} ${row.total.toFixed(2)} s (${(row.size / MiB / row.total).toFixed(0)} MiB/s)` +
            ` rss ${(row.rssKiB / 1024).toFixed(0)} MiB cpu ${(row.user + row.sys).toFixed(2)} s` +
            (row.summary ? ` [engine ${row.summary.seconds.toFixed(2)} s, ${row.summary.connections} conn]` : '') +
            (row.verify ? ` ${row.verify}` : ''),
        );
        await rmf(out);
      }
    }
  } finally {
    await daemon.stop();
  }
  await rmf(run);
  report.full = { disk, size: opts.fullSize, rows, contenders: contenders.map((c) => c.name) };
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

async function benchIncremental(opts, report) {
  log(`\n== incremental: ${fmtSize(opts.incSize)} disk, ${opts.dirtyPercent}% dirty, ${opts.rounds} rounds`);
  const images = path.join(opts.work, 'images');
  await fs.mkdir(images, { recursive: true });
  const base = await makeDisk(images, opts.incSize, opts.dataPercent, 2);
  const run = path.join(opts.work, 'incremental');
  await rmf(run);
  await fs.mkdir(path.join(run, 'fleece'), { recursive: true });
  const disk = path.join(run, 'disk.qcow2');
  await execFileP('cp', ['--sparse=always', base, disk]);
  const full = path.join(run, 'full.raw');
  const python = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : tool('python3', 'python3');
  const bitmap = 'bench-inc';
  const { runs, total: dirtyWritten } = dirtyRuns(opts.incSize, opts.dirtyPercent, 42);
  const contenders = [
    {
      name: 'ours',
      command: (uri, out, bm) => [NODE, [CLI, 'copy', uri, out, '--json', '--bitmap', bm, '--existing', '--discard']],
      json: true,
    },
    { name: 'seed', command: (uri, out, bm) => [python, [path.join(here, 'seed_baseline.py'), uri, out, bm]] },
  ];
  const daemon = await startDaemon(path.join(run, 'qsd'), disk, true);
  const rows = [];
  let dirtyBytes = NaN;
  let firstAction;
  let nextAction;
  try {
    // 1. the full backup that starts the bitmap
    const t0 = Date.now();
    firstAction = await withAccess(daemon, path.join(run, 'fleece'), bitmap, async (dev) => {
      const args = [CLI, 'copy', dev.nbdUri, full, '--json', ...(dev.bitmapName ? ['--bitmap', dev.bitmapName] : [])];
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
    await warm(disk);
    await warm(full);
    // 4. rounds: each contender writes into a fresh copy of the full image
    for (let r = 0; r < opts.rounds; r++) {
      for (const c of rotate(contenders, r)) {
        const out = path.join(run, 'target.raw');
        await rmf(out);
        await execFileP('cp', ['--sparse=always', full, out]);
        await syncAll();
        const row = await withAccess(
          daemon,
          path.join(run, 'fleece'),
          bitmap,
          async (dev) => {
            if (dev.bitmapAction !== 'used' || !dev.bitmapName) throw new Error(`expected an incremental access, got bitmap action ${dev.bitmapAction}`);
            const [cmd, args] = c.command(dev.nbdUri, out, dev.bitmapName);
            const res = await timed(cmd, args, path.join(run, 'time.txt'));
            const t1 = process.hrtime.bigint();
            await fsyncFile(out);
            const syncSeconds = Number(process.hrtime.bigint() - t1) / 1e9;
            const summary = c.json ? JSON.parse(res.stdout.trim().split('\n').pop()) : { bytesRead: Number(res.stdout.trim()) };
            return { round: r + 1, name: c.name, ...res, syncSeconds, total: res.seconds + syncSeconds, summary };
          },
          false, // keep the dirty bits for the next contender
        );
        if (opts.verify && r === 0) row.verify = await verify(out, disk);
        delete row.stdout;
        rows.push(row);
        log(
          `  round ${row.round} ${c.name.padEnd(6)} ${row.total.toFixed(2)} s (${(dirtyBytes / MiB / row.total).toFixed(0)} MiB/s)` +
            ` rss ${(row.rssKiB / 1024).toFixed(0)} MiB cpu ${(row.user + row.sys).toFixed(2)} s read ${fmtMiB(row.summary.bytesRead)}` +
            (row.summary.bytesTrimmed !== undefined ? ` trimmed ${fmtMiB(row.summary.bytesTrimmed)}` : '') +
            (row.verify ? ` ${row.verify}` : ''),
        );
        await rmf(out);
      }
    }
  } finally {
    await daemon.stop();
  }
  await rmf(run);
  report.incremental = { size: opts.incSize, runs: runs.length, dirtyWritten, dirtyBytes, firstAction, nextAction, rows, contenders: contenders.map((c) => c.name) };
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

function render(opts, m, report, loadAfter, commandLine) {
  const L = [];
  const f2 = (x) => (Number.isFinite(x) ? x.toFixed(2) : '-');
  const f0 = (x) => (Number.isFinite(x) ? x.toFixed(0) : '-');
  L.push('# Benchmark results', '');
  L.push(`Written by \`benchmarks/run.mjs\` (\`${commandLine}\`). See the bottom for how to run it.`, '');
  L.push('## Machine', '');
  L.push('| | |', '|---|---|');
  L.push(`| date | ${m.date} |`, `| nproc | ${m.nproc} |`, `| CPU | ${m.cpu} |`, `| memory | ${m.memory} |`, `| kernel | ${m.kernel} |`);
  L.push(`| file system (outputs, images) | ${m.fs} |`);
  L.push(`| QEMU | ${m.qemu} |`, `| qemu-img | ${m.qemuImg} |`, `| nbdkit | ${m.nbdkit} |`, `| nbdcopy / libnbd | ${m.nbdcopy} |`);
  L.push(`| node | ${m.node} |`, `| python (seed baseline) | ${m.python} |`);
  L.push(`| load average before / after | ${m.load} / ${loadAfter} |`, '');
  L.push(
    'Shared machine (2 cores, other engineers compile on it): each contender runs in its own child process, the order of contenders rotates every round, and medians are reported. ' +
      'Times are wall-clock from spawn to exit plus an fsync of the output done by the harness (ours and the seed script fsync themselves; nbdcopy does not, qemu-img flushes on close), so every number is "time to a durable copy". ' +
      'Every run gets a fresh snapshot-access export (copy-before-write + qcow2 fleecing) from `setupBackupAccess`; setup and teardown are not timed.',
    '',
  );

  if (report.full) {
    const F = report.full;
    const size = F.size;
    L.push(`## 1. Full backup: ${fmtSize(size)} disk, ${opts.dataPercent}% data`, '');
    L.push(
      `Disk: qcow2 filled from \`nbdkit sparse-random size=${size} percent=${opts.dataPercent} seed=1 runlength=1M random-content=true\` with \`qemu-img convert -O qcow2\`, ` +
        'served by qemu-storage-daemon (node `disk0`); each contender copies the snapshot-access export to a new sparse raw file. Throughput = disk size / time.',
      '',
    );
    L.push('Commands (URI = the fresh export, OUT = the output file):', '');
    L.push('```');
    L.push('ours:        node dist/cli/main.js copy URI OUT --json --no-discard        # defaults: 1 connection x 16 requests, 4 MiB reads');
    L.push('ours CxR:    node dist/cli/main.js copy URI OUT --json --no-discard --connections C --requests R');
    L.push('nbdcopy:     nbdcopy URI OUT');
    L.push('qemu-img:    qemu-img convert -f raw -O raw URI OUT');
    L.push('```', '');
    L.push('Per round (seconds to a durable copy; order rotated each round):', '');
    L.push(`| round | ${F.contenders.join(' | ')} |`, `|---|${F.contenders.map(() => '---').join('|')}|`);
    for (const n of [...new Set(F.rows.map((r) => r.round))]) {
      const cells = F.contenders.map((c) => {
        const r = F.rows.find((x) => x.round === n && x.name === c);
        return r ? f2(r.total) : '-';
      });
      const order = F.rows.filter((x) => x.round === n).map((x) => x.name).join(' → ');
      L.push(`| ${n} | ${cells.join(' | ')} |`);
      void order;
    }
    L.push('');
    L.push('| contender | median s | min–max s | median MiB/s | median CPU s (user+sys) | median max RSS | output allocated | round-1 check |');
    L.push('|---|---|---|---|---|---|---|---|');
    for (const c of F.contenders) {
      const t = stats(F.rows, c, (r) => r.total);
      const cpu = stats(F.rows, c, (r) => r.user + r.sys);
      const rss = stats(F.rows, c, (r) => r.rssKiB / 1024);
      const first = F.rows.find((r) => r.name === c);
      L.push(
        `| ${c} | ${f2(t.median)} | ${f2(t.min)}–${f2(t.max)} | ${f0(size / MiB / t.median)} | ${f2(cpu.median)} | ${f0(rss.median)} MiB | ${fmtMiB(first.allocated)} | ${first.verify ?? 'not checked'} |`,
      );
    }
    L.push('');
    const ours = stats(F.rows, 'ours', (r) => r.total).median;
    const nbd = stats(F.rows, 'nbdcopy', (r) => r.total).median;
    const qi = stats(F.rows, 'qemu-img', (r) => r.total).median;
    const ratioNbd = nbd / ours;
    const ratioQi = qi / ours;
    const paired = pairedRatio(F.rows, 'nbdcopy', 'ours', (r) => r.total);
    L.push(`- ours vs nbdcopy: **${f2(ratioNbd)}x** nbdcopy's throughput (ratio of medians; median of per-round ratios ${f2(paired)}x). Goal >= 1.2x: **${ratioNbd >= 1.2 ? 'met' : 'not met'}**.`);
    L.push(`- ours vs qemu-img convert: ${f2(ratioQi)}x (median of per-round ratios ${f2(pairedRatio(F.rows, 'qemu-img', 'ours', (r) => r.total))}x).`);
    const settings = F.contenders.filter((c) => c.startsWith('ours'));
    const best = settings.map((c) => [c, stats(F.rows, c, (r) => r.total).median]).sort((a, b) => a[1] - b[1]);
    L.push(`- connections x requests of ours, fastest first (median s): ${best.map(([c, t]) => `${c === 'ours' ? 'default 1x16' : c.slice(5)} ${f2(t)}`).join(', ')}.`);
    const engine = settings.map((c) => `${c === 'ours' ? 'default' : c.slice(5)} ${f2(stats(F.rows, c, (r) => r.summary?.seconds).median)} s`);
    L.push(`- time inside the engine (summary.seconds, median): ${engine.join(', ')}; the rest is node start-up, connecting, and the final fsync.`);
    L.push('');

    L.push('## 3. Memory: peak RSS of our full copy', '');
    const rss = stats(F.rows, 'ours', (r) => r.rssKiB / 1024);
    const limit = 64 + 16 * 4;
    L.push(
      `Max RSS of the child process (\`/usr/bin/time -f %M\`) running \`node dist/cli/main.js copy\` of the ${fmtSize(size)} disk, default settings (16 requests x 4 MiB in flight): ` +
        `median ${f0(rss.median)} MiB, max ${f0(rss.max)} MiB over ${rss.values.length} rounds (${rss.values.map(f0).join(', ')}).`,
    );
    L.push(`Node itself with the package loaded and no copy: ${f0(report.nodeBaseline)} MiB.`);
    L.push(`Limit: 64 MiB + in-flight buffers (16 x 4 MiB) = ${limit} MiB. Goal: **${rss.max < limit ? 'met' : 'not met'}**.`);
    const other = settings.filter((c) => c !== 'ours').map((c) => `${c.slice(5)} ${f0(stats(F.rows, c, (r) => r.rssKiB / 1024).max)} MiB`);
    if (other.length) L.push(`Other settings (max): ${other.join(', ')}. For comparison nbdcopy ${f0(stats(F.rows, 'nbdcopy', (r) => r.rssKiB / 1024).max)} MiB, qemu-img ${f0(stats(F.rows, 'qemu-img', (r) => r.rssKiB / 1024).max)} MiB.`);
    L.push('');
  }

  if (report.incremental) {
    const I = report.incremental;
    L.push(`## 2. Incremental backup: ${fmtSize(I.size)} disk, ${opts.dirtyPercent}% dirty`, '');
    L.push(
      `Disk: qcow2 from \`nbdkit sparse-random size=${I.size} percent=${opts.dataPercent} seed=2 runlength=1M random-content=true\`. ` +
        `A first backup access with bitmap id \`bench-inc\` (action \`${I.firstAction}\`) takes the full image with ours; then ${I.runs} runs of 64 KiB – 4 MiB ` +
        `(log-uniform lengths, random 4 KiB-aligned offsets, non-overlapping, PRNG seed 42), ${fmtMiB(I.dirtyWritten)} in total, are written through a live NBD export of the disk. ` +
        `The bitmap then holds ${fmtMiB(I.dirtyBytes)} dirty (64 KiB granularity). Each run: a fresh copy of the full image, backup access (action \`${I.nextAction}\`), the contender, ` +
        'teardown with success=false (keeps the dirty bits for the next run). Both contenders TRIM what they copied. Throughput = dirty bytes / time.',
      '',
    );
    L.push('```');
    L.push('ours:  node dist/cli/main.js copy URI OUT --json --bitmap BITMAP --existing --discard');
    L.push('seed:  /usr/bin/python3 benchmarks/seed_baseline.py URI OUT BITMAP      # 4 MiB synchronous reads, write, trim');
    L.push('```', '');
    L.push(`| round | ${I.contenders.join(' | ')} |`, `|---|${I.contenders.map(() => '---').join('|')}|`);
    for (const n of [...new Set(I.rows.map((r) => r.round))]) {
      L.push(`| ${n} | ${I.contenders.map((c) => f2(I.rows.find((x) => x.round === n && x.name === c)?.total)).join(' | ')} |`);
    }
    L.push('');
    L.push('| contender | median s | min–max s | median MiB/s (dirty) | median CPU s | median max RSS | bytes read | round-1 check |');
    L.push('|---|---|---|---|---|---|---|---|');
    for (const c of I.contenders) {
      const t = stats(I.rows, c, (r) => r.total);
      const cpu = stats(I.rows, c, (r) => r.user + r.sys);
      const rss = stats(I.rows, c, (r) => r.rssKiB / 1024);
      const first = I.rows.find((r) => r.name === c);
      L.push(
        `| ${c} | ${f2(t.median)} | ${f2(t.min)}–${f2(t.max)} | ${f0(I.dirtyBytes / MiB / t.median)} | ${f2(cpu.median)} | ${f0(rss.median)} MiB | ${fmtMiB(first.summary.bytesRead)} | ${first.verify ?? 'not checked'} |`,
      );
    }
    L.push('');
    const ratio = stats(I.rows, 'seed', (r) => r.total).median / stats(I.rows, 'ours', (r) => r.total).median;
    L.push(`- ours vs the seed's algorithm: **${f2(ratio)}x** (ratio of medians; median of per-round ratios ${f2(pairedRatio(I.rows, 'seed', 'ours', (r) => r.total))}x). Goal >= 5x: **${ratio >= 5 ? 'met' : 'not met'}**.`);
    L.push('');
  }

  L.push('## How to run', '');
  L.push('```');
  L.push('npm run build                         # native addon + dist/');
  L.push('npm run bench                         # everything at full size (2 GiB / 4 GiB, 5 rounds), writes benchmarks/RESULTS.md');
  L.push('npm run bench -- --quick              # smoke run, < 1 min, writes benchmarks/work/RESULTS-quick.md');
  L.push('npm run bench -- --only full --rounds 7 --settings 1x8,2x16,4x8');
  L.push('node benchmarks/run.mjs --help');
  L.push('```', '');
  L.push('Needs qemu-storage-daemon (qemu-system-common), qemu-img (qemu-utils), nbdkit, nbdcopy (libnbd-bin), python3-libnbd and /usr/bin/time (package `time`). Scratch files and cached disk images live in `benchmarks/work/` (git-ignored; `--clean` removes the images too).');
  return L.join('\n') + '\n';
}

// ---------------------------------------------------------------------------------------------

async function main() {
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
    if (opts.only.includes('full')) await benchFull(opts, report);
    if (opts.only.includes('incremental')) await benchIncremental(opts, report);
  } finally {
    await stopDaemons();
    if (opts.clean) await rmf(path.join(opts.work, 'images'));
  }
  const commandLine = ['node benchmarks/run.mjs', ...process.argv.slice(2)].join(' ');
  const text = render(opts, m, report, os.loadavg().map((x) => x.toFixed(2)).join(' '), commandLine);
  await fs.mkdir(path.dirname(opts.results), { recursive: true });
  await fs.writeFile(opts.results, text);
  await fs.writeFile(opts.results.replace(/\.md$/, '') + '.json', JSON.stringify({ opts, machine: m, report }, null, 1));
  log(`\nbench: done in ${((Date.now() - started) / 1000).toFixed(0)} s; wrote ${path.relative(process.cwd(), opts.results)}`);
  return 0;
}

process.exitCode = await main().catch(async (e) => {
  console.error(`bench: ${e.stack ?? e}`);
  await stopDaemons();
  return 1;
});

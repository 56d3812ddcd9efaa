// Helpers shared by the whole-stack benchmarks (provider.mjs, restore.mjs): a qemu-storage-daemon
// with a second QMP monitor for the job's CLI, a timed child process under /usr/bin/time, the
// guest's writes, medians. Plain Node ESM over dist/ (npm run build first).
import { execFile, spawn, spawnSync } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';

const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, '..');
export const dist = path.join(root, 'dist');
export const CLI = path.join(dist, 'cli', 'main.js');
export const NODE = process.execPath;
export const MiB = 2 ** 20;
export const GiB = 2 ** 30;

/**
 * The package as its users import it (dist/index.js, over the bundle dist/bundle.js). Every
 * benchmark takes the library from here and never from dist/'s internal modules as well: those
 * are other copies of the same classes, and an object of one copy fails the `instanceof` checks
 * of the other.
 */
export const pkg = await import(path.join(dist, 'index.js')).catch((e) => {
  console.error(`bench: cannot load dist/ (run \`npm run build\` first): ${e.message}`);
  process.exit(2);
});
const { QmpClient } = pkg;

/**
 * `fn` on the export of a backup access the harness sets up for disk0 (`options`: those of
 * setupBackupAccess, devices aside); its teardown reports success when `fn` returned and `success`.
 */
export async function withBackupAccess(qmp, options, fn, success = true) {
  const access = await pkg.setupBackupAccess(qmp, { devices: ['disk0'], ...options });
  let ok = false;
  try {
    const r = await fn(access.devices[0]);
    ok = true;
    return r;
  } finally {
    await pkg.teardownBackupAccess(qmp, { targetId: options.targetId, success: ok && success });
  }
}

/** `/usr/bin/time` (Debian package `time`), required: peak RSS is part of every report here. */
export function requireTime() {
  if (!existsSync('/usr/bin/time')) throw new Error('/usr/bin/time not found: apt-get install time');
  return '/usr/bin/time';
}

/** A program on PATH, or an error naming its Debian package. */
export function tool(name, pkg) {
  const r = spawnSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' });
  const p = r.stdout.trim();
  if (r.status !== 0 || !p) throw new Error(`${name} not found: apt-get install ${pkg}`);
  return p;
}

/** Size with an optional K/M/G/T suffix; a bare number is in `unit` bytes (default GiB). */
export function parseSize(v, unit = GiB) {
  const m = /^(\d+(?:\.\d+)?)([KMGT])?(i?B)?$/i.exec(String(v).trim());
  if (!m) throw new Error(`not a size: ${v}`);
  const mult = m[2] ? { K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[m[2].toUpperCase()] : unit;
  return Math.round(Number(m[1]) * mult);
}

export const fmtSize = (b) => (b >= GiB && b % GiB === 0 ? `${b / GiB} GiB` : `${(b / MiB).toFixed(0)} MiB`);
export const fmtMiB = (b) => `${(b / MiB).toFixed(0)} MiB`;
/** A block size: KiB below 1 MiB. */
export const fmtBlock = (b) => (b < MiB ? `${b / 1024} KiB` : fmtMiB(b));
export const f2 = (x) => (Number.isFinite(x) ? x.toFixed(2) : '-');
export const f3 = (x) => (Number.isFinite(x) ? x.toFixed(3) : '-');
export const f0 = (x) => (Number.isFinite(x) ? x.toFixed(0) : '-');

const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;

/** CPU seconds (user + system) the processes `pids` have used so far (/proc/PID/stat; a process gone counts 0). */
export async function cpuSeconds(pids) {
  let ticks = 0;
  for (const pid of pids) {
    const s = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
    if (!s) continue;
    const f = s.slice(s.lastIndexOf(')') + 2).split(' '); // fields from the 3rd (state) on
    ticks += Number(f[11]) + Number(f[12]); // utime, stime
  }
  return ticks / CLK_TCK;
}

export function median(xs) {
  const v = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return NaN;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

/**
 * Runs `cmd args` under /usr/bin/time; wall time is measured here, from spawn to exit. Each line
 * of stderr is kept with the second (since spawn) it arrived at, so a child's log lines time its
 * steps. Returns { seconds, rssKiB, cpu, stdout, stderrLines: [{ at, line }] }; throws on a
 * non-zero exit.
 */
export async function timed(cmd, args, timeFile, { env } = {}) {
  const t0 = performance.now();
  const { code, stdout, lines } = await new Promise((resolve, reject) => {
    const child = spawn(requireTime(), ['-f', '%e %M %U %S', '-o', timeFile, cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'], ...(env ? { env } : {}) });
    let out = '';
    let partial = '';
    const got = [];
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => {
      const at = (performance.now() - t0) / 1000;
      partial += d;
      const parts = partial.split('\n');
      partial = parts.pop();
      for (const line of parts) got.push({ at, line });
    });
    child.on('error', reject);
    child.on('close', (c) => {
      if (partial) got.push({ at: (performance.now() - t0) / 1000, line: partial });
      resolve({ code: c, stdout: out, lines: got });
    });
  });
  const seconds = (performance.now() - t0) / 1000;
  if (code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited with ${code}: ${lines.map((l) => l.line).join('\n').trim() || stdout.trim()}`);
  const last = (await readFile(timeFile, 'utf8')).trim().split('\n').pop();
  const [, rssKiB, user, sys] = last.split(' ').map(Number);
  return { seconds, rssKiB, cpu: user + sys, stdout, stderrLines: lines };
}

/**
 * qemu-storage-daemon serving `disk` (qcow2 or raw) as node `disk0`, like lib/qemu's
 * startStorageDaemon, with a second QMP monitor (`jobQmpSocket`) for a job run by the CLI in a
 * child process (a QMP socket takes one client at a time; the harness keeps the first).
 */
export async function startDaemonWithJobMonitor(dir, disk, format = 'qcow2', { liveExports = true } = {}) {
  const qmpSocket = path.join(dir, 'qmp.sock');
  const jobQmpSocket = path.join(dir, 'qmp-job.sock');
  const nbdSocket = path.join(dir, 'nbd.sock');
  const q = (p) => p.replaceAll(',', ',,');
  const args = [
    '--blockdev', `driver=file,filename=${q(disk)},aio=threads,node-name=disk0-file`,
    '--blockdev', `driver=${format},file=disk0-file,node-name=disk0-fmt`,
    '--blockdev', 'driver=raw,file=disk0-fmt,node-name=disk0',
    '--chardev', `socket,path=${q(qmpSocket)},server=on,wait=off,id=qmp0`, '--monitor', 'chardev=qmp0',
    '--chardev', `socket,path=${q(jobQmpSocket)},server=on,wait=off,id=qmp1`, '--monitor', 'chardev=qmp1',
    '--nbd-server', `addr.type=unix,addr.path=${q(nbdSocket)},max-connections=0`,
    ...(liveExports ? ['--export', 'type=nbd,id=live-disk0,node-name=disk0,name=live-disk0,writable=on'] : []),
  ];
  const log = path.join(dir, 'qemu-storage-daemon.log');
  const out = await open(log, 'w');
  const child = spawn(tool('qemu-storage-daemon', 'qemu-system-common'), args, { stdio: ['ignore', out.fd, out.fd] });
  await out.close();
  const exited = new Promise((resolve) => child.once('exit', resolve));
  const kill = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  };
  // stopped with this process, also on Ctrl-C
  const onExit = () => child.kill('SIGKILL');
  process.once('exit', onExit);
  let qmp;
  try {
    for (let i = 0; ; i++) {
      if (child.exitCode !== null) throw new Error(`qemu-storage-daemon exited: ${await readFile(log, 'utf8').catch(() => '')}`);
      if (existsSync(qmpSocket)) {
        try {
          qmp = await QmpClient.connect(qmpSocket);
          break;
        } catch (e) {
          if (i > 400) throw e;
        }
      }
      if (i > 800) throw new Error('qemu-storage-daemon did not open its QMP socket');
      await new Promise((r) => setTimeout(r, 25));
    }
  } catch (e) {
    await kill();
    throw e;
  }
  return {
    qmp,
    /** the daemon's process id (for its CPU time) */
    pid: child.pid,
    qmpSocket,
    jobQmpSocket,
    nbdSocket,
    liveUri: () => `nbd+unix:///live-disk0?socket=${nbdSocket}`,
    stop: async () => {
      await qmp.execute('quit').catch(() => undefined);
      await qmp.close().catch(() => undefined);
      const timer = setTimeout(() => void kill(), 5000);
      await exited;
      clearTimeout(timer);
      process.removeListener('exit', onExit);
    },
  };
}

/**
 * A sparse qcow2 disk of `size` bytes, 60% data: whole 4 MiB chunks, chunks 0, 2 and 4 of every
 * five written (a pattern byte per chunk), 1 and 3 never. The seed POC's zero skip (4 MiB chunks)
 * lines up with the holes.
 */
export async function makeChunkDisk(file, size, run) {
  const CHUNK = 4 * MiB;
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(size)]);
  // qemu-io in batches: 8 GiB is 1229 writes, and one command line holds them all, but keep it small
  let batch = [];
  const flush = async () => {
    if (batch.length) await run('qemu-io', ['-f', 'qcow2', ...batch, file]);
    batch = [];
  };
  for (let i = 0; (i + 1) * CHUNK <= size; i++) {
    if (i % 5 === 1 || i % 5 === 3) continue;
    batch.push('-c', `write -P ${(i % 250) + 1} ${i * CHUNK} ${CHUNK}`);
    if (batch.length >= 512) await flush();
  }
  await flush();
}

/**
 * The guest changes `percent`% of the disk: distinct blocks of `block` bytes (default 64 KiB) at
 * pseudo-random block-aligned offsets (the same sequence for the same `seed`), written through the
 * live NBD export `live`. Each block is one repeated byte, or with `random` pseudo-random bytes
 * (incompressible and unique: what a store that compresses and deduplicates has to keep).
 * Returns the bytes written.
 */
export async function guestWrites(live, size, percent, seed, { block = 64 * 1024, random = false } = {}) {
  const B = block;
  const blocks = Math.floor(size / B);
  const want = Math.max(1, Math.round((blocks * percent) / 100));
  let state = (12345 + seed) >>> 0;
  const touched = new Set();
  const pending = [];
  while (touched.size < want) {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0;
    const b = ((state ^ (state >>> 13)) >>> 0) % blocks;
    if (touched.has(b)) continue;
    touched.add(b);
    pending.push(live.write(b * B, random ? pseudoRandomBytes(`guest-${seed}`, b * B, B) : Buffer.alloc(B, ((state >>> 16) & 0xff) || 1)));
    if (pending.length >= 16) await Promise.all(pending.splice(0));
  }
  await Promise.all(pending);
  await live.flush();
  return want * B;
}

/**
 * `length` pseudo-random bytes, a function of (`seed`, `offset`): AES-128-CTR of zeros, keyed by
 * the seed, the offset as the counter's start. Incompressible, and different at every offset.
 */
export function pseudoRandomBytes(seed, offset, length) {
  const key = createHash('sha256').update(`bench-${seed}`).digest().subarray(0, 16);
  const iv = Buffer.alloc(16);
  iv.writeBigUInt64BE(BigInt(offset), 0);
  return createCipheriv('aes-128-ctr', key, iv).update(Buffer.alloc(length));
}

/**
 * A sparse disk image of `size` bytes in `dir` (cached there by its parameters): `percent`% random
 * data in runs of `runlength` bytes on average, holes elsewhere (`nbdkit sparse-random ...
 * random-content=true` converted by `qemu-img convert`, which leaves zeros unallocated), the same
 * bytes for the same `seed`. `format` qcow2 or raw. Returns its path.
 */
export async function sparseRandomDisk(dir, { size, percent, seed, runlength = MiB, format = 'qcow2' }) {
  const suffix = runlength === MiB ? '' : runlength === 4 * MiB ? '-4m' : `-r${runlength}`;
  const file = path.join(dir, `disk-${size}-${percent}-${seed}${suffix}.${format}`);
  if (existsSync(file)) return file;
  await mkdir(dir, { recursive: true });
  const tmp = `${file}.tmp`;
  await rmf(tmp);
  console.error(`  generating ${path.basename(file)} (${fmtSize(size)}, ${percent}% data in runs of ${fmtMiB(runlength)}) ...`);
  await promisify(execFile)(tool('nbdkit', 'nbdkit'), [
    '-U', '-', 'sparse-random', `size=${size}`, `percent=${percent}`, `seed=${seed}`, `runlength=${runlength}`, 'random-content=true',
    '--run', `${tool('qemu-img', 'qemu-utils')} convert -f raw -O ${format} "$uri" ${JSON.stringify(tmp)}`,
  ]);
  await rename(tmp, file);
  return file;
}

/**
 * Imports a helper of the tests (`test/helpers/NAME.ts`: TypeScript, where it lives, e.g. the
 * Garage cluster) into a benchmark: compiles it and what it imports with the project's
 * TypeScript under `benchmarks/work/test-helpers/` (git-ignored; ~2 s), then imports the output.
 */
export async function importTestHelper(name) {
  const out = path.join(here, 'work', 'test-helpers');
  await rmf(out);
  const tsc = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc');
  const src = path.join(root, 'test', 'helpers', `${name}.ts`);
  await promisify(execFile)(NODE, [tsc, '--outDir', out, '--rootDir', root, '--module', 'NodeNext', '--moduleResolution', 'NodeNext', '--target', 'ES2022', '--types', 'node', '--skipLibCheck', '--strict', src]).catch((e) => {
    throw new Error(`compiling ${src} for the benchmark failed: ${(e.stdout || e.stderr || e.message).trim()}`);
  });
  return import(pathToFileURL(path.join(out, 'test', 'helpers', `${name}.js`)).href);
}

export async function rmf(p) {
  await rm(p, { recursive: true, force: true });
}

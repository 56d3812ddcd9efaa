#!/usr/bin/env node
/**
 * The chunk store's benchmark (issue 16): VM backups through the CLI into a chunk store on a real
 * three-node Garage cluster (`backup --store s3://...`), against the directory store (`backup
 * --store DIR`) and against the ceiling, in one run on one machine:
 *
 * 1. Backup, A/B alternating rounds (odd rounds the chunk store first), medians. Per round a fresh
 *    copy of the disk and a fresh Garage cluster (Garage keeps content-addressed blocks and skips
 *    writing a block it holds: the same bytes a second time would cost it less; and it frees the
 *    blocks of deleted objects only minutes later), a full backup into a fresh store of each
 *    kind, then the guest writes `--changed`% of the disk and both take an incremental backup.
 *    The ceiling of each chunk backup, measured after it on the same machine:
 *    - reading alone: the core (`copy URI - --discard`, the same snapshot export, for the
 *      incremental the same dirty bitmap, a harness-owned one) with no output;
 *    - uploading alone: PUT of as many objects of the same keys and sizes as the backup uploaded,
 *      with the chunk sink's concurrency (4), through the core's S3 client (`chunkStorePut`).
 *      Their bytes are fresh random ones: the backup's own objects are already in Garage, which
 *      would skip writing their blocks;
 *    - incremental only, fetching alone: GET of the previous backup's chunks that the
 *      incremental completes (QEMU's dirty bitmap here is finer than a chunk: a chunk dirty in
 *      part is completed from the previous backup's chunk), same concurrency.
 *    No backup can be faster than the slowest of these; how close the core's copy step comes to
 *    it says how well the pipeline overlaps them.
 * 2. Dedup: a chain of 1 full + `--chain` incremental backups, the guest writing `--changed`%
 *    between them, once per `--dedup-blocks` write size (scattered small writes dirty every
 *    chunk they touch; whole-chunk writes are the best case); then `--clones` guests cloned from
 *    one image (qcow2 overlays over it) backed up one after the other. Stored bytes (the sum of
 *    the object sizes under the store's prefix; the directory store's file sizes) against
 *    logical bytes (disk size times backups).
 * 3. Restore of the chain's last backup to a raw file (`restore VOLID --to disk0=OUT`), chunk
 *    store against directory store, A/B alternating, fsync'd, round 1 compared with the disk;
 *    the ceiling: GET of every distinct chunk of the index with the restore's concurrency (4).
 * Every CLI run is a child process under /usr/bin/time (wall from spawn to exit, peak RSS, CPU).
 *
 * usage: node benchmarks/chunks.mjs --help   (npm run bench:chunks; after npm run build)
 * Writes only its own section of benchmarks/RESULTS.md (`<!-- begin chunks -->` ... `<!-- end chunks -->`).
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, open, readdir, stat, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { CLI, GiB, MiB, NODE, cpuSeconds, f0, f2, fmtBlock, fmtMiB, fmtSize, guestWrites, importTestHelper, median, parseSize, pkg, requireTime, rmf, root, sparseRandomDisk, startDaemonWithJobMonitor, timed, tool, withBackupAccess } from './common.mjs';
import { writeSection } from './results-file.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const execFileP = promisify(execFile);
const { NbdClient } = pkg;
// the core's binding itself (no part of the package's API): the one instance Node's require cache
// holds for native/index.cjs, which the package uses too
const native = createRequire(import.meta.url)(path.join(root, 'native', 'index.cjs'));

const CHUNK = 4 * MiB; // the chunk store's chunk size (store.json's default)
const SINK_UPLOADS = 4; // native/src/chunkstore/sink.rs DEFAULT_UPLOADS: chunks hashed, encoded or uploaded at once
const RESTORE_FETCHES = 4; // native chunk restore's default `fetches`
const DATA_PERCENT = 60;

const USAGE = `usage: node benchmarks/chunks.mjs [options]   (npm run bench:chunks -- [options]; after npm run build)
  --size SIZE          disk size (default 1G; a bare number is GiB; a multiple of 4 MiB)
  --rounds N           A/B rounds of full + incremental backups (default 3)
  --changed PCT        percent of the disk the guest writes before each incremental (default 10)
  --write-block SIZE   size of the guest's writes in the A/B rounds (default 64K: scattered blocks)
  --upload-concurrency LIST   PUTs at once for "uploading alone" (default 4,16: the sink's 4, and more)
  --chain N            incremental backups in each dedup chain (default 5; 0: no chains, no restore)
  --dedup-blocks LIST  the guest's write size in each dedup chain (default 64K,4M)
  --clones N           guests cloned from one image (default 3; 0: none)
  --restore-rounds N   A/B restore rounds (default 3)
  --results PATH       the report's file: rewrites only its section between <!-- begin chunks --> and
                       <!-- end chunks --> (default benchmarks/RESULTS.md; give another path for trial runs)
  --work DIR           scratch folder (default: a new folder under the system's temporary folder);
                       generated disks are cached in benchmarks/work/images
  -h, --help           this text
Smoke run (~2 min): --size 256M --rounds 1 --chain 2 --dedup-blocks 64K --clones 2 --restore-rounds 1 --results benchmarks/work/R.md`;

function parseArgs(argv) {
  const o = {
    size: GiB, rounds: 3, changed: 10, writeBlock: 64 * 1024, uploadConcurrency: [SINK_UPLOADS, 16], chain: 5, dedupBlocks: [64 * 1024, CHUNK],
    clones: 3, restoreRounds: 3, results: path.join(here, 'RESULTS.md'), work: undefined,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    const count = (v, min) => {
      const n = Number(v);
      if (!(Number.isInteger(n) && n >= min)) throw new Error(`${a} ${v}: must be an integer >= ${min}`);
      return n;
    };
    switch (a) {
      case '--size': o.size = parseSize(val()); break;
      case '--rounds': o.rounds = count(val(), 1); break;
      case '--changed': o.changed = Number(val()); break;
      case '--write-block': o.writeBlock = parseSize(val(), 1); break;
      case '--upload-concurrency': o.uploadConcurrency = val().split(',').filter(Boolean).map((v) => count(v, 1)); break;
      case '--chain': o.chain = count(val(), 0); break;
      case '--dedup-blocks': o.dedupBlocks = val().split(',').filter(Boolean).map((v) => parseSize(v, 1)); break;
      case '--clones': o.clones = count(val(), 0); break;
      case '--restore-rounds': o.restoreRounds = count(val(), 1); break;
      case '--results': o.results = path.resolve(val()); break;
      case '--work': o.work = path.resolve(val()); break;
      case '-h': case '--help': console.log(USAGE); process.exit(0); break;
      default: throw new Error(`unknown option ${a}\n${USAGE}`);
    }
  }
  if (!(o.size > 0 && o.size % CHUNK === 0)) throw new Error('--size must be a positive multiple of 4 MiB');
  if (!(o.changed > 0 && o.changed <= 100)) throw new Error('--changed must be in (0, 100]');
  for (const b of [o.writeBlock, ...o.dedupBlocks]) if (!(b >= 4096 && b % 4096 === 0 && o.size % b === 0)) throw new Error(`write size ${b}: must be a multiple of 4 KiB dividing the disk size`);
  if (!o.uploadConcurrency.includes(SINK_UPLOADS)) o.uploadConcurrency.unshift(SINK_UPLOADS);
  return o;
}

const log = (...a) => console.error(...a);
/** From test/helpers/s3-cluster.ts (compiled at start-up: importTestHelper). */
let startS3Cluster;
let garageBinary;
const secs = (t0) => (performance.now() - t0) / 1000;

/** Runs `fn` over `items`, `n` at once. */
async function pool(items, n, fn) {
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      await fn(items[i], i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, worker));
}

/** Sum of the sizes of every file under `dir`. */
async function treeBytes(dir) {
  let total = 0;
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) total += (await stat(path.join(e.parentPath ?? e.path, e.name))).size;
  }
  return total;
}

/** Sum of the object sizes under the store's prefix, and their count. */
async function bucketBytes(store, prefix = '') {
  const objects = await native.chunkStoreList(store, prefix);
  return { bytes: objects.reduce((s, o) => s + o.size, 0), objects: objects.length };
}

/** The digests of a `.fidx` object (docs/chunk-store.md: 24-byte header, 32 bytes per chunk, checksum). */
function fidxDigests(buf) {
  if (buf.subarray(0, 8).toString('latin1') !== 'PBPFIDX\x01') throw new Error('not a fixed index');
  const size = Number(buf.readBigUInt64LE(8));
  const cs = buf.readUInt32LE(16);
  const n = Math.ceil(size / cs);
  return Array.from({ length: n }, (_, i) => buf.subarray(24 + 32 * i, 56 + 32 * i).toString('hex'));
}
const ZERO = '0'.repeat(64);
const chunkKey = (d) => `chunks/${d.slice(0, 2)}/${d.slice(2, 4)}/${d}`;

/** The stores one benchmark run uses: the Garage cluster, and CLI arguments and environment for both kinds. */
function stores(cluster, work) {
  const base = { endpoint: cluster.endpoint, region: cluster.region, bucket: cluster.bucket, accessKeyId: cluster.accessKeyId, secretAccessKey: cluster.secretAccessKey, allowHttp: true };
  // the bitmap ledger (which backup QEMU's bitmap counts from) lives outside the stores: keep it in the scratch folder
  const env = { ...process.env, AWS_ACCESS_KEY_ID: cluster.accessKeyId, AWS_SECRET_ACCESS_KEY: cluster.secretAccessKey, PVE_BACKUP_PROVIDER_STATE_DIR: path.join(work, 'state') };
  return {
    chunk: (prefix, storeid) => ({
      kind: 'chunk',
      options: { ...base, prefix },
      args: ['--store', `s3://${cluster.bucket}/${prefix}`, '--endpoint', cluster.endpoint, '--region', cluster.region, '--storeid', storeid],
      env,
    }),
    dir: (folder, storeid) => ({ kind: 'dir', folder, args: ['--store', folder, '--storeid', storeid], env }),
    options: (prefix) => ({ ...base, prefix }),
    garagePids: () => cluster.nodes.map((n) => n.process?.pid).filter(Boolean),
  };
}

/**
 * Runs `fn` and adds to its result the CPU seconds the Garage nodes (`cpuGarage`), QEMU
 * (`cpuQemu`, when `qsd` is given) and this harness process (`cpuHarness`) used meanwhile.
 */
async function metered(st, qsd, fn) {
  const garage = st.garagePids();
  const qemu = qsd ? [qsd.pid] : [];
  const g0 = await cpuSeconds(garage);
  const q0 = await cpuSeconds(qemu);
  const h0 = process.cpuUsage();
  const r = await fn();
  const h = process.cpuUsage(h0);
  return { ...r, cpuGarage: (await cpuSeconds(garage)) - g0, cpuQemu: qsd ? (await cpuSeconds(qemu)) - q0 : NaN, cpuHarness: (h.user + h.system) / 1e6 };
}

/**
 * One backup of disk0 through the CLI, as a user runs it (`backup --qmp ... --json`), timed under
 * /usr/bin/time. For the chunk store, the manifest's counters (chunks uploaded, reused, zero;
 * bytes read; bitmap mode); for the directory store, the core's copy summary.
 */
async function backup(st, store, qsd, work, vmid) {
  return metered(st, qsd, () => backupOnce(store, qsd, work, vmid));
}

async function backupOnce(store, qsd, work, vmid) {
  const fleecing = path.join(work, 'fleecing');
  await mkdir(fleecing, { recursive: true });
  const args = [CLI, 'backup', ...store.args, '--vmid', String(vmid), '--qmp', qsd.jobQmpSocket, '--devices', 'disk0', '--nbd-server', qsd.nbdSocket, '--fleecing-dir', fleecing, '--json'];
  const r = await timed(NODE, args, path.join(work, 'time-backup.txt'), { env: store.env });
  const info = JSON.parse(r.stdout);
  const steps = Object.fromEntries(Object.entries(info.steps ?? {}).map(([k, v]) => [k, v / 1000]));
  const name = info.volname.split('/').pop();
  const out = { seconds: r.seconds, rssMiB: r.rssKiB / 1024, cpu: r.cpu, steps, volid: info.volid, volname: info.volname };
  if (store.kind === 'chunk') {
    const m = JSON.parse((await native.chunkStoreGet(store.options, `backups/${vmid}/${name}/manifest.json`)).toString('utf8'));
    const d = m.devices.disk0;
    return { ...out, name, incremental: d.bitmapMode === 'reuse', bytesRead: d.bytesRead, uploaded: d.chunksUploaded, reused: d.chunksReused, zero: d.chunksZero, index: `backups/${vmid}/${name}/${d.index}` };
  }
  const c = info.copies?.disk0 ?? {};
  return { ...out, incremental: Boolean(info.parent), bytesRead: c.bytesRead, copySeconds: c.seconds };
}

/** Backup access set up by the harness (its own target id and bitmap, on the first QMP monitor), `fn` run on its export. */
async function withAccess(qsd, work, targetId, bitmap, fn, success = true) {
  const fleecing = path.join(work, 'fleecing-harness');
  await mkdir(fleecing, { recursive: true });
  return withBackupAccess(qsd.qmp, { targetId, ...(bitmap ? { bitmap } : {}), fleecing: { dir: fleecing }, nbdServer: { path: qsd.nbdSocket } }, fn, success);
}

/** Reading alone: the core copies the export (the bitmap's dirty areas) to nowhere, TRIMming as the backup does. */
async function readAlone(st, qsd, dev, work, bitmap) {
  return metered(st, qsd, () => readAloneOnce(dev, work, bitmap));
}

async function readAloneOnce(dev, work, bitmap) {
  const args = [CLI, 'copy', dev.nbdUri, '-', '--json', '--discard', ...(bitmap ? ['--bitmap', bitmap] : [])];
  const r = await timed(NODE, args, path.join(work, 'time-read.txt'));
  const s = JSON.parse(r.stdout);
  return { seconds: r.seconds, engineSeconds: s.seconds, bytesRead: s.bytesRead, rssMiB: r.rssKiB / 1024, cpu: r.cpu };
}

/** Dirty bytes of the export's bitmap, as extents. */
async function dirtyExtents(dev) {
  const ctx = `qemu:dirty-bitmap:${dev.bitmapName}`;
  const c = await NbdClient.connect(dev.nbdUri, { metaContexts: [ctx] });
  try {
    return (await c.blockStatus(0, dev.size, ctx)).filter((e) => e.flags & 1);
  } finally {
    await c.close();
  }
}

/**
 * Uploading alone: PUTs objects of the given keys and sizes (fresh random bytes, made before the
 * clock starts) under `prefix`, `concurrency` at once; the objects are removed afterwards.
 */
async function uploadAlone(st, prefix, objects, concurrency) {
  const options = st.options(prefix);
  const data = objects.map((o) => randomBytes(o.size));
  const r = await metered(st, undefined, async () => {
    const t0 = performance.now();
    await pool(objects, concurrency, (o, i) => native.chunkStorePut(options, o.key, data[i]));
    return { seconds: secs(t0) };
  });
  await pool(objects, 16, (o) => native.chunkStoreDelete(options, o.key));
  return { ...r, bytes: objects.reduce((s, o) => s + o.size, 0), objects: objects.length };
}

/** Fetching alone: GETs the objects, `concurrency` at once, and drops them. */
async function fetchAlone(st, options, keys, concurrency) {
  let bytes = 0;
  return metered(st, undefined, async () => {
    const t0 = performance.now();
    await pool(keys, concurrency, async (k) => {
      const b = await native.chunkStoreGet(options, k);
      if (!b) throw new Error(`${k}: missing`);
      bytes += b.length;
    });
    return { seconds: secs(t0), bytes, objects: keys.length };
  });
}

/**
 * Runs `fn` with a fresh three-node Garage cluster (test/helpers/s3-cluster.ts) and the stores on
 * it, then stops the cluster and removes its folders. One per round and per dedup case: Garage
 * deletes the blocks of deleted objects only minutes later, and a cluster that held the same
 * bytes before would skip writing their blocks.
 */
async function withCluster(work, fn) {
  const t0 = performance.now();
  const cluster = await startS3Cluster();
  log(`Garage cluster (3 nodes) up in ${secs(t0).toFixed(1)} s at ${cluster.endpoint}`);
  try {
    return await fn(stores(cluster, work));
  } finally {
    await cluster.stop();
  }
}

/** A fresh copy of a cached generated disk (the cache stays pristine), served by qemu-storage-daemon. */
async function startDisk(cacheDir, dir, size, seed) {
  const base = await sparseRandomDisk(cacheDir, { size, percent: DATA_PERCENT, seed, runlength: CHUNK, format: 'qcow2' });
  await rmf(dir);
  await mkdir(path.join(dir, 'qsd'), { recursive: true });
  const disk = path.join(dir, 'disk0.qcow2');
  await execFileP('cp', ['--sparse=always', base, disk]);
  const qsd = await startDaemonWithJobMonitor(path.join(dir, 'qsd'), disk, 'qcow2');
  const live = await NbdClient.connect(qsd.liveUri());
  return {
    disk,
    qsd,
    live,
    stop: async () => {
      await live.close().catch(() => undefined);
      await qsd.stop();
    },
  };
}

const fmtRow = (r) =>
  `${r.seconds.toFixed(2)} s  rss ${r.rssMiB.toFixed(0)} MiB  cpu ${r.cpu.toFixed(2)} s` +
  (r.uploaded !== undefined ? `  read ${fmtMiB(r.bytesRead)}  chunks up ${r.uploaded} reused ${r.reused} zero ${r.zero}` : r.bytesRead !== undefined ? `  read ${fmtMiB(r.bytesRead)}` : '') +
  (r.steps?.provider !== undefined ? `  [provider step ${r.steps.provider.toFixed(2)} s]` : '');

// ---------------------------------------------------------------------------------------------
// 1. backups against the directory store and the ceilings

async function benchBackups(opts, work, cacheDir, all) {
  for (let round = 1; round <= opts.rounds; round++) await withCluster(work, (st) => benchRound(opts, st, work, cacheDir, all, round));
}

async function benchRound(opts, st, work, cacheDir, all, round) {
  const rdir = path.join(work, `round${round}`);
  const d = await startDisk(cacheDir, rdir, opts.size, 101);
  const prefix = `r${round}/store`;
  const chunkStore = st.chunk(prefix, 'chunkbench');
  const dirStore = st.dir(path.join(rdir, 'dirstore'), 'dirbench');
  const order = round % 2 ? [chunkStore, dirStore] : [dirStore, chunkStore];
  try {
    // untimed: the first read of the image after its copy (the warm-up of every round)
    await withAccess(d.qsd, rdir, 'bench-read', undefined, (dev) => readAlone(st, d.qsd, dev, rdir));
    let previousIndex;
    for (const phase of ['full', 'incremental']) {
      const row = (all.backup[phase] ??= { chunk: [], dir: [], read: [], upload: {}, fetch: [], written: [] });
      let before = [];
      if (phase === 'incremental') {
        // the harness's own bitmap (a target of its own) starts here: it sees the same writes as the stores' bitmaps
        await withAccess(d.qsd, rdir, 'bench-incr', 'ceiling', async () => undefined);
        row.written.push(await guestWrites(d.live, opts.size, opts.changed, round, { block: opts.writeBlock, random: true }));
        before = await native.chunkStoreList(chunkStore.options, 'chunks/');
      }
      let chunkResult;
      for (const store of order) {
        const r = await backup(st, store, d.qsd, rdir, 100);
        if (r.incremental !== (phase === 'incremental')) throw new Error(`round ${round} ${store.kind} ${phase}: the backup was ${r.incremental ? 'incremental' : 'full'}`);
        row[store.kind].push(r);
        if (store.kind === 'chunk') chunkResult = r;
        log(`round ${round} ${phase.padEnd(11)} ${store.kind === 'chunk' ? 'chunk store' : 'dir store  '}  ${fmtRow(r)}`);
      }
      // the ceilings of the chunk backup just taken
      const known = new Set(before.map((o) => o.key));
      const uploaded = (await native.chunkStoreList(chunkStore.options, 'chunks/')).filter((o) => !known.has(o.key));
      let read;
      let fetch;
      if (phase === 'full') {
        read = await withAccess(d.qsd, rdir, 'bench-read', undefined, (dev) => readAlone(st, d.qsd, dev, rdir));
      } else {
        // the same dirty areas, on a snapshot export of the same disk; the bitmap keeps them (teardown without success)
        ({ read, fetch } = await withAccess(
          d.qsd,
          rdir,
          'bench-incr',
          'ceiling',
          async (dev) => {
            if (dev.bitmapAction !== 'used') throw new Error(`the harness's bitmap: ${dev.bitmapAction}, expected used`);
            const dirty = await dirtyExtents(dev);
            const touched = new Set();
            for (const e of dirty) for (let c = Math.floor(e.offset / CHUNK); c * CHUNK < e.offset + e.length; c++) touched.add(c);
            // chunks dirty in part are completed from the previous backup's chunk (fill_from_previous)
            const partial = [...touched].filter((c) => !dirty.some((e) => e.offset <= c * CHUNK && e.offset + e.length >= Math.min((c + 1) * CHUNK, opts.size)));
            const digests = fidxDigests(await native.chunkStoreGet(chunkStore.options, previousIndex));
            const keys = [...new Set(partial.map((c) => digests[c]).filter((x) => x !== ZERO))].map(chunkKey);
            const readR = await readAlone(st, d.qsd, dev, rdir, dev.bitmapName);
            const fetchR = await fetchAlone(st, chunkStore.options, keys, SINK_UPLOADS);
            return { read: { ...readR, dirtyBytes: dirty.reduce((s, e) => s + e.length, 0), touched: touched.size, partial: partial.length }, fetch: fetchR };
          },
          false,
        ));
        row.fetch.push(fetch);
      }
      row.read.push(read);
      for (const c of opts.uploadConcurrency) (row.upload[c] ??= []).push(await uploadAlone(st, `r${round}/ceiling-${phase}-${c}`, uploaded, c));
      log(
        `round ${round} ${phase.padEnd(11)} ceiling: read alone ${read.seconds.toFixed(2)} s (${fmtMiB(read.bytesRead)}), ` +
          opts.uploadConcurrency.map((c) => `upload alone x${c} ${row.upload[c].at(-1).seconds.toFixed(2)} s`).join(', ') +
          ` (${uploaded.length} objects, ${fmtMiB(uploaded.reduce((s, o) => s + o.size, 0))})` +
          (fetch ? `, fetch alone ${fetch.seconds.toFixed(2)} s (${fetch.objects} previous chunks, ${fmtMiB(fetch.bytes)}; ${read.partial} of ${read.touched} touched chunks dirty in part)` : ''),
      );
      previousIndex = chunkResult.index;
    }
  } finally {
    await d.stop();
  }
  await rmf(rdir);
}

// ---------------------------------------------------------------------------------------------
// 2. dedup, 3. restore

async function benchChain(opts, st, work, cacheDir, block, k, all, restore) {
  const cdir = path.join(work, `chain${k}`);
  const d = await startDisk(cacheDir, cdir, opts.size, 200 + k);
  const chunkStore = st.chunk(`chain${k}`, `chunkchain${k}`);
  const dirStore = st.dir(path.join(cdir, 'dirstore'), `dirchain${k}`);
  const rows = [];
  let last;
  try {
    for (let i = 0; i <= opts.chain; i++) {
      const written = i === 0 ? 0 : await guestWrites(d.live, opts.size, opts.changed, 1000 * k + i, { block, random: true });
      const c = await backup(st, chunkStore, d.qsd, cdir, 100);
      const r = await backup(st, dirStore, d.qsd, cdir, 100);
      if (c.incremental !== i > 0 || r.incremental !== i > 0) throw new Error(`chain ${k} backup ${i}: expected ${i ? 'incremental' : 'full'} backups`);
      const stored = await bucketBytes(chunkStore.options);
      const row = { backups: i + 1, written, chunk: c, dir: r, chunkStored: stored.bytes, objects: stored.objects, dirStored: await treeBytes(dirStore.folder) };
      rows.push(row);
      log(`chain ${fmtBlock(block)} writes, backup ${i + 1}: chunk ${fmtRow(c)}; dir ${r.seconds.toFixed(2)} s; stored chunk ${fmtMiB(row.chunkStored)} (${row.objects} objects), dir ${fmtMiB(row.dirStored)}`);
      last = { chunk: c, dir: r };
    }
  } finally {
    await d.stop();
  }
  all.chains.push({ block, rows });
  if (restore) await benchRestore(opts, st, cdir, d.disk, chunkStore, dirStore, last, all);
  await rmf(cdir);
}

async function benchClones(opts, st, work, cacheDir, all) {
  const cdir = path.join(work, 'clones');
  await rmf(cdir);
  await mkdir(cdir, { recursive: true });
  const base = await sparseRandomDisk(cacheDir, { size: opts.size, percent: DATA_PERCENT, seed: 300, runlength: CHUNK, format: 'qcow2' });
  const chunkStore = st.chunk('clones', 'chunkclones');
  const dirStore = st.dir(path.join(cdir, 'dirstore'), 'dirclones');
  const rows = [];
  for (let i = 0; i < opts.clones; i++) {
    // a linked clone, as Proxmox VE makes from a template: an overlay over the (read-only) image
    const gdir = path.join(cdir, `guest${i}`);
    await mkdir(path.join(gdir, 'qsd'), { recursive: true });
    const disk = path.join(gdir, 'disk0.qcow2');
    await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', disk]);
    const qsd = await startDaemonWithJobMonitor(path.join(gdir, 'qsd'), disk, 'qcow2', { liveExports: false });
    try {
      const vmid = 201 + i;
      const c = await backup(st, chunkStore, qsd, gdir, vmid);
      const r = await backup(st, dirStore, qsd, gdir, vmid);
      const stored = await bucketBytes(chunkStore.options);
      rows.push({ guests: i + 1, chunk: c, dir: r, chunkStored: stored.bytes, objects: stored.objects, dirStored: await treeBytes(dirStore.folder) });
      log(`clone ${i + 1}: chunk ${fmtRow(c)}; dir ${r.seconds.toFixed(2)} s; stored chunk ${fmtMiB(rows.at(-1).chunkStored)}, dir ${fmtMiB(rows.at(-1).dirStored)}`);
    } finally {
      await qsd.stop();
    }
  }
  all.clones = rows;
  await rmf(cdir);
}

async function fsyncFile(p) {
  const fh = await open(p, 'r+');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function benchRestore(opts, st, cdir, disk, chunkStore, dirStore, last, all) {
  const out = path.join(cdir, 'restored.raw');
  const contenders = [
    { name: 'chunk', store: chunkStore, volid: last.chunk.volid },
    { name: 'dir', store: dirStore, volid: last.dir.volid },
  ];
  const rows = [];
  for (let round = 1; round <= opts.restoreRounds; round++) {
    const order = round % 2 ? contenders : [...contenders].reverse();
    for (const c of order) {
      await rmf(out);
      await execFileP('sync');
      const r = await metered(st, undefined, () => timed(NODE, [CLI, 'restore', c.volid, ...c.store.args.filter((a, i, l) => a !== '--storeid' && l[i - 1] !== '--storeid'), '--to', `disk0=${out}`, '--json'], path.join(cdir, 'time-restore.txt'), { env: c.store.env }));
      const t1 = performance.now();
      await fsyncFile(out); // time to a durable image, for both
      const row = { round, name: c.name, seconds: r.seconds + secs(t1), rssMiB: r.rssKiB / 1024, cpu: r.cpu, cpuGarage: r.cpuGarage };
      if (round === 1) {
        row.verify = await execFileP('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', out, disk]).then(
          () => 'identical',
          (e) => `DIFFERENT (${(e.stdout || e.stderr || e.message).trim().split('\n')[0]})`,
        );
      }
      rows.push(row);
      log(`restore round ${round} ${c.name.padEnd(5)} ${row.seconds.toFixed(2)} s  rss ${row.rssMiB.toFixed(0)} MiB  cpu ${row.cpu.toFixed(2)} s${row.verify ? `  ${row.verify}` : ''}`);
    }
  }
  await rmf(out);
  // the ceiling: every distinct chunk of the index fetched, with the restore's concurrency
  const digests = fidxDigests(await native.chunkStoreGet(chunkStore.options, last.chunk.index));
  const keys = [...new Set(digests.filter((x) => x !== ZERO))].map(chunkKey);
  const fetches = [];
  for (let round = 1; round <= opts.restoreRounds; round++) fetches.push(await fetchAlone(st, chunkStore.options, keys, RESTORE_FETCHES));
  log(`restore ceiling: fetch alone ${median(fetches.map((f) => f.seconds)).toFixed(2)} s (${keys.length} chunks, ${fmtMiB(fetches[0].bytes)})`);
  all.restore = { rows, fetches, chunks: keys.length, zeroChunks: digests.filter((x) => x === ZERO).length, backups: opts.chain + 1 };
}

// ---------------------------------------------------------------------------------------------
// report

function render(opts, all, meta) {
  const L = [];
  const med = (xs) => median(xs);
  const mib = (b, s) => f0(b / MiB / s);
  L.push('## Chunk store (S3, Garage): backup, dedup, restore', '');
  L.push(
    `\`npm run bench:chunks\` (benchmarks/chunks.mjs), ${meta.date}, ${os.cpus().length} cores (${os.cpus()[0]?.model ?? 'unknown CPU'}), ${Math.round(os.totalmem() / GiB)} GiB RAM, QEMU ${meta.qemu}, Garage ${meta.garage}, Node ${process.version}. ` +
      `Command: \`${meta.commandLine}\`. The run took ${meta.took} s.`,
    '',
    `**Machine load**: load average ${meta.loadStart} at the start, ${meta.loadEnd} at the end; ${meta.busyStart} at the start. ` +
      'Everything shares the two cores: QEMU, the three Garage nodes (replication factor 3: every object is written to the one local disk three times), the CLI and the kernel.',
    '',
    `Disk: ${fmtSize(opts.size)} qcow2, ${DATA_PERCENT}% random (incompressible) data in runs of 4 MiB on average, holes elsewhere (\`nbdkit sparse-random runlength=4194304 random-content=true\`), ` +
      'a fresh copy per round and a fresh Garage cluster per round and per dedup case (Garage skips writing blocks it already holds), served by qemu-storage-daemon (stock QEMU: the dirty bitmap has its default granularity, finer than a chunk). ' +
      `Backups through the CLI as users run them: \`node dist/cli/main.js backup --store s3://BUCKET/PREFIX --endpoint URL --qmp SOCK --devices disk0 --nbd-server SOCK --fleecing-dir DIR --json\` (chunk store, chunks of 4 MiB, no key) ` +
      'and the same with `--store DIR` (directory store: qcow2 images), each a child process from spawn to exit under `/usr/bin/time`.',
    '',
  );

  // 1. backups
  const B = all.backup;
  if (B.full) {
    L.push('### Backup: chunk store vs directory store vs the ceiling', '');
    L.push(
      `${opts.rounds} round${opts.rounds === 1 ? '' : 's'}, A/B alternating (odd rounds the chunk store first), medians. Incremental: the guest wrote ${opts.changed}% of the disk in ${fmtBlock(opts.writeBlock)} blocks ` +
        '(random offsets and bytes) through a live export before it. "Copy step" is the job\'s `provider` step (the core\'s copy, index, manifest); the rest of a backup is node\'s start-up, QMP backup access set-up and teardown, and the task log.',
      '',
      '| backup | chunk store s | directory store s | chunk / dir | chunk copy step s | dir copy step s | read by the chunk backup | uploaded (objects) | chunk MiB/s uploaded | chunks uploaded / reused / zero | peak RSS chunk / dir | CPU s chunk / dir |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|',
    );
    for (const phase of ['full', 'incremental']) {
      const p = B[phase];
      if (!p) continue;
      const c = med(p.chunk.map((x) => x.seconds));
      const r = med(p.dir.map((x) => x.seconds));
      const read = med(p.chunk.map((x) => x.bytesRead));
      const up = med(p.upload[SINK_UPLOADS].map((x) => x.bytes));
      L.push(
        `| ${phase} | ${f2(c)} | ${f2(r)} | **${f2(c / r)}x** | ${f2(med(p.chunk.map((x) => x.steps.provider)))} | ${f2(med(p.dir.map((x) => x.steps.provider)))} | ${fmtMiB(read)} | ${fmtMiB(up)} | ${mib(up, c)} | ` +
          `${f0(med(p.chunk.map((x) => x.uploaded)))} / ${f0(med(p.chunk.map((x) => x.reused)))} / ${f0(med(p.chunk.map((x) => x.zero)))} | ` +
          `${f0(med(p.chunk.map((x) => x.rssMiB)))} / ${f0(med(p.dir.map((x) => x.rssMiB)))} MiB | ${f2(med(p.chunk.map((x) => x.cpu)))} / ${f2(med(p.dir.map((x) => x.cpu)))} |`,
      );
    }
    L.push('', '**The ceiling** (what the chunk backup must do at least, each part measured alone on the same machine right after it):', '');
    L.push(`| backup | reading alone s (MiB) | ${opts.uploadConcurrency.map((c) => `uploading alone x${c} s`).join(' | ')} | objects uploaded (MiB) | fetching previous chunks alone x${SINK_UPLOADS} s (chunks) | ceiling s | chunk copy step / ceiling | chunk backup / ceiling | uploading + fetching s | chunk copy step / that |`);
    L.push(`|---|---|${opts.uploadConcurrency.map(() => '---').join('|')}|---|---|---|---|---|---|---|`);
    for (const phase of ['full', 'incremental']) {
      const p = B[phase];
      if (!p) continue;
      const read = med(p.read.map((x) => x.seconds));
      const up = med(p.upload[SINK_UPLOADS].map((x) => x.seconds));
      const fetch = p.fetch.length ? med(p.fetch.map((x) => x.seconds)) : NaN;
      const ceiling = Math.max(read, up, Number.isFinite(fetch) ? fetch : 0);
      const serverBound = up + (Number.isFinite(fetch) ? fetch : 0);
      const step = med(p.chunk.map((x) => x.steps.provider));
      L.push(
        `| ${phase} | ${f2(read)} (${fmtMiB(med(p.read.map((x) => x.bytesRead)))}) | ${opts.uploadConcurrency.map((c) => f2(med(p.upload[c].map((x) => x.seconds)))).join(' | ')} | ` +
          `${f0(med(p.upload[SINK_UPLOADS].map((x) => x.objects)))} (${fmtMiB(med(p.upload[SINK_UPLOADS].map((x) => x.bytes)))}) | ${p.fetch.length ? `${f2(fetch)} (${f0(med(p.fetch.map((x) => x.objects)))})` : '-'} | ` +
          `${f2(ceiling)} | **${f2(step / ceiling)}x** | ${f2(med(p.chunk.map((x) => x.seconds)) / ceiling)}x | ${p.fetch.length ? `${f2(serverBound)} | ${f2(step / serverBound)}x` : '- | -'} |`,
      );
    }
    const inc = B.incremental;
    L.push(
      '',
      `- Reading alone: \`node dist/cli/main.js copy URI - --json --discard\` on a snapshot export of the same disk set up by the harness (incremental: \`--bitmap\`, the harness's own bitmap started with the stores' ones, so the same dirty areas), node's start-up included. ` +
        `Uploading alone: PUT of as many objects as the backup uploaded, the same keys and sizes, fresh random bytes, through the core's S3 client (\`chunkStorePut\`), x4 = the chunk sink's uploads at once; in the harness process (no start-up). ` +
        `Fetching alone (incremental): GET of the previous backup's chunks that the incremental completes, x4. Ceiling = the slowest of them: a backup that overlapped them perfectly would take that long. ` +
        'Uploading and fetching both load the same Garage nodes, whose CPU is the bottleneck here (below): when the server is the limit, their sum is the bound that counts.',
      ...(inc
        ? [
            `- Incremental: the guest wrote ${fmtMiB(med(inc.written))}; the bitmap marked ${fmtMiB(med(inc.read.map((x) => x.dirtyBytes)))} dirty in ${f0(med(inc.read.map((x) => x.touched)))} of ${opts.size / CHUNK} chunks, ` +
              `${f0(med(inc.read.map((x) => x.partial)))} of them dirty in part (completed from the previous backup's chunk). The chunk store reads only the dirty areas, but stores every touched chunk anew.`,
          ]
        : []),
      '',
    );
    // CPU
    L.push(`Where the CPU goes (medians; core-seconds; ${os.cpus().length} cores, so "busy" = the sum / (wall x ${os.cpus().length}); the rest of the machine's load is not counted):`, '');
    L.push('| run | wall s | client CPU s (CLI, or the harness) | Garage CPU s (3 nodes) | QEMU CPU s | busy |', '|---|---|---|---|---|---|');
    const cpuRow = (name, xs, client) => {
      if (!xs?.length) return;
      const w = med(xs.map((x) => x.seconds));
      const c = med(xs.map(client));
      const g = med(xs.map((x) => x.cpuGarage));
      const q = med(xs.map((x) => x.cpuQemu));
      L.push(`| ${name} | ${f2(w)} | ${f2(c)} | ${f2(g)} | ${f2(q)} | ${f0((100 * (c + g + (Number.isFinite(q) ? q : 0))) / (w * os.cpus().length))}% |`);
    };
    for (const phase of ['full', 'incremental']) {
      const p = B[phase];
      if (!p) continue;
      cpuRow(`${phase}: chunk backup`, p.chunk, (x) => x.cpu);
      cpuRow(`${phase}: uploading alone x${SINK_UPLOADS}`, p.upload[SINK_UPLOADS], (x) => x.cpuHarness);
      cpuRow(`${phase}: fetching alone x${SINK_UPLOADS}`, p.fetch, (x) => x.cpuHarness);
      cpuRow(`${phase}: reading alone`, p.read, (x) => x.cpu);
      cpuRow(`${phase}: directory backup`, p.dir, (x) => x.cpu);
    }
    L.push('');
    // steps
    const stepNames = [...new Set(['full', 'incremental'].flatMap((ph) => (B[ph] ? [...B[ph].chunk, ...B[ph].dir].flatMap((x) => Object.keys(x.steps)) : [])))].filter((s) => s !== 'total');
    L.push('Where the time goes (the job\'s own steps, medians, s):', '', `| step | ${['full', 'incremental'].filter((p) => B[p]).flatMap((p) => [`${p} chunk`, `${p} dir`]).join(' | ')} |`, `|---|${['full', 'incremental'].filter((p) => B[p]).flatMap(() => ['---', '---']).join('|')}|`);
    for (const s of [...stepNames, 'outside the job (node start-up, CLI, exit)']) {
      const v = (x) => (s.startsWith('outside') ? x.seconds - (x.steps.total ?? NaN) : x.steps[s]);
      L.push(`| ${s} | ${['full', 'incremental'].filter((p) => B[p]).flatMap((p) => [f2(med(B[p].chunk.map(v))), f2(med(B[p].dir.map(v)))]).join(' | ')} |`);
    }
    L.push('', `Per round (s): ${['full', 'incremental'].filter((p) => B[p]).map((p) => `${p}: chunk ${B[p].chunk.map((x) => x.seconds.toFixed(2)).join(', ')}; dir ${B[p].dir.map((x) => x.seconds.toFixed(2)).join(', ')}; read alone ${B[p].read.map((x) => x.seconds.toFixed(2)).join(', ')}; upload alone x${SINK_UPLOADS} ${B[p].upload[SINK_UPLOADS].map((x) => x.seconds.toFixed(2)).join(', ')}`).join('. ')}.`, '');
  }

  // 2. dedup
  if (all.chains.length || all.clones) {
    L.push('### Dedup: stored bytes against logical bytes', '');
    L.push(
      `Stored: the chunk store's objects under its prefix (chunks, indexes, manifests, blobs: the sum of the sizes a listing gives), the directory store's files. Logical: the disk's size times the backups (each backup restores a whole ${fmtSize(opts.size)} disk); ` +
        `the guest's data is ${DATA_PERCENT}% of it (${fmtMiB((opts.size * DATA_PERCENT) / 100)} after the first backup).`,
      '',
    );
    for (const ch of all.chains) {
      L.push(`**A chain: 1 full + ${opts.chain} incremental backups, the guest writing ${opts.changed}% of the disk in ${fmtBlock(ch.block)} blocks (random offsets, block-aligned, random bytes) before each.**`, '');
      L.push('| backups | guest wrote | chunk store: stored | stored / logical | chunks uploaded | backup s | directory store: stored | stored / logical | backup s |', '|---|---|---|---|---|---|---|---|---|');
      for (const r of ch.rows) {
        const logical = opts.size * r.backups;
        L.push(`| ${r.backups} | ${fmtMiB(r.written)} | ${fmtMiB(r.chunkStored)} (${r.objects} objects) | ${f2(r.chunkStored / logical)} | ${r.chunk.uploaded} | ${f2(r.chunk.seconds)} | ${fmtMiB(r.dirStored)} | ${f2(r.dirStored / logical)} | ${f2(r.dir.seconds)} |`);
      }
      const first = ch.rows[0];
      const lastRow = ch.rows.at(-1);
      L.push('', `Each incremental added ${fmtMiB((lastRow.chunkStored - first.chunkStored) / Math.max(1, ch.rows.length - 1))} to the chunk store and ${fmtMiB((lastRow.dirStored - first.dirStored) / Math.max(1, ch.rows.length - 1))} to the directory store on average, for ${fmtMiB(lastRow.written)} written by the guest.`, '');
    }
    if (all.clones) {
      const one = all.clones[0];
      const lastRow = all.clones.at(-1);
      L.push(`**${all.clones.length} guests cloned from one image** (linked clones: qcow2 overlays over it, unchanged), backed up one after the other into one store of each kind (vmids ${all.clones.map((_, i) => 201 + i).join(', ')}).`, '');
      L.push('| guests | chunk store: stored | stored / one guest | chunks uploaded / reused | backup s | directory store: stored | stored / one guest | backup s |', '|---|---|---|---|---|---|---|---|');
      for (const r of all.clones) L.push(`| ${r.guests} | ${fmtMiB(r.chunkStored)} | ${f2(r.chunkStored / one.chunkStored)} | ${r.chunk.uploaded} / ${r.chunk.reused} | ${f2(r.chunk.seconds)} | ${fmtMiB(r.dirStored)} | ${f2(r.dirStored / one.dirStored)} | ${f2(r.dir.seconds)} |`);
      L.push('', `Goal "the clones cost about one guest": ${all.clones.length} clones take **${f2(lastRow.chunkStored / one.chunkStored)}x** one guest in the chunk store (${f2(lastRow.dirStored / one.dirStored)}x in the directory store).`, '');
    }
  }

  // 3. restore
  if (all.restore) {
    const R = all.restore;
    const t = (n) => med(R.rows.filter((x) => x.name === n).map((x) => x.seconds));
    const fetch = med(R.fetches.map((f) => f.seconds));
    L.push('### Restore to a raw file', '');
    L.push(
      `The last backup of the first chain (backup ${R.backups}: the chunk store reads one index; the directory store a chain of ${R.backups} qcow2 layers), restored by the CLI (\`node dist/cli/main.js restore VOLID --store ... --to disk0=OUT --json\`) into a new raw file, fsync'd after (time to a durable image). ` +
        `${opts.restoreRounds} round${opts.restoreRounds === 1 ? '' : 's'}, A/B alternating, medians; round 1 compared byte for byte with the disk (\`qemu-img compare\`). The index names ${R.chunks} distinct data chunks and ${R.zeroChunks} zero chunks.`,
      '',
      '| restore | median s | MiB/s (disk size) | MiB/s (data) | peak RSS | CPU s: client / Garage | round 1 |',
      '|---|---|---|---|---|---|---|',
    );
    for (const n of ['chunk', 'dir']) {
      const v = R.rows.filter((x) => x.name === n);
      L.push(`| ${n === 'chunk' ? 'chunk store' : 'directory store'} | ${f2(t(n))} | ${mib(opts.size, t(n))} | ${mib(R.fetches[0].bytes, t(n))} | ${f0(med(v.map((x) => x.rssMiB)))} MiB | ${f2(med(v.map((x) => x.cpu)))} / ${f2(med(v.map((x) => x.cpuGarage)))} | ${v.find((x) => x.round === 1)?.verify ?? '-'} |`);
    }
    L.push(
      `| ceiling: fetching alone (GET of the ${R.chunks} chunks, x${RESTORE_FETCHES}, in the harness) | ${f2(fetch)} | ${mib(opts.size, fetch)} | ${mib(R.fetches[0].bytes, fetch)} | | ${f2(med(R.fetches.map((x) => x.cpuHarness)))} / ${f2(med(R.fetches.map((x) => x.cpuGarage)))} | |`,
      '',
      `Chunk store / directory store: **${f2(t('chunk') / t('dir'))}x** the time; chunk restore / fetching alone: ${f2(t('chunk') / fetch)}x. Per round (s): ${R.rows.map((x) => `${x.name} ${x.seconds.toFixed(2)}`).join(', ')}.`,
      '',
    );
  }
  return L.join('\n');
}

async function busyNow() {
  // what else runs: compilers of the other engineers, mostly
  const { stdout } = await execFileP('ps', ['-eo', 'comm=']);
  const counts = {};
  for (const c of stdout.split('\n').map((s) => s.trim())) if (['rustc', 'cargo', 'node', 'tsc', 'qemu-storage-d', 'garage', 'cc1', 'ld'].includes(c)) counts[c] = (counts[c] ?? 0) + 1;
  return `processes ${Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(', ') || 'none of note'}`;
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
  for (const [n, p] of [['qemu-storage-daemon', 'qemu-system-common'], ['qemu-img', 'qemu-utils'], ['nbdkit', 'nbdkit']]) tool(n, p);
  const started = Date.now();
  const loadStart = os.loadavg().map((x) => x.toFixed(2)).join(' ');
  const busyStart = await busyNow();
  ({ startS3Cluster, garageBinary } = await importTestHelper('s3-cluster'));
  const garage = (await execFileP(garageBinary(), ['--version']).catch((e) => ({ stdout: e.message }))).stdout.trim().split('\n')[0];
  const work = opts.work ?? (await mkdtemp(path.join(os.tmpdir(), 'pvebp-bench-chunks-')));
  await mkdir(work, { recursive: true });
  const cacheDir = path.join(here, 'work', 'images');
  log(`chunks bench: ${fmtSize(opts.size)} disk, ${opts.rounds} rounds, work ${work}; load ${loadStart}; ${busyStart}`);
  const all = { backup: {}, chains: [], clones: undefined, restore: undefined };
  try {
    await benchBackups(opts, work, cacheDir, all);
    if (opts.chain > 0) for (const [k, block] of opts.dedupBlocks.entries()) await withCluster(work, (st) => benchChain(opts, st, work, cacheDir, block, k, all, k === 0));
    if (opts.clones > 0) await withCluster(work, (st) => benchClones(opts, st, work, cacheDir, all));
  } finally {
    if (!opts.work) await rmf(work);
  }
  const meta = {
    date: new Date().toISOString().slice(0, 16).replace('T', ' ') + ' UTC',
    qemu: (await execFileP('qemu-img', ['--version'])).stdout.split('\n')[0].replace(/^qemu-img version /, ''),
    garage,
    commandLine: ['node benchmarks/chunks.mjs', ...process.argv.slice(2)].join(' '),
    loadStart,
    loadEnd: os.loadavg().map((x) => x.toFixed(2)).join(' '),
    busyStart,
    took: ((Date.now() - started) / 1000).toFixed(0),
  };
  await mkdir(path.join(here, 'work'), { recursive: true });
  await writeFile(path.join(here, 'work', 'chunks-last.json'), JSON.stringify({ opts, meta, all }, null, 1)); // every sample, for a closer look
  const section = render(opts, all, meta);
  console.log(section);
  await writeSection(opts.results, 'chunks', section);
  log(`written to the chunks section of ${opts.results}`);
  return 0;
}

process.exitCode = await main().catch((e) => {
  console.error(`bench: ${e.stack ?? e}`);
  return 1;
});

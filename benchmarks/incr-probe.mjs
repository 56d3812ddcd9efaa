#!/usr/bin/env node
// Probe (not a benchmark): where an incremental copy of many small dirty extents spends its time.
// 8 GiB sparse disk, 1% changed in random 64 KiB blocks; the same bitmap copied with and without
// discard, to a qcow2 over the full, and to null; alternating, medians.
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { CLI, GiB, NODE, guestWrites, makeChunkDisk, median, pkg, startDaemonWithJobMonitor } from './common.mjs';
const { NbdClient, setupBackupAccess, teardownBackupAccess } = pkg;
const run = promisify(execFile);
const size = Number(process.argv[2] ?? 8) * GiB;
const percent = Number(process.argv[3] ?? 1);
const dir = await mkdtemp(path.join(os.tmpdir(), 'incr-probe-'));
const disk = path.join(dir, 'disk.qcow2');
await makeChunkDisk(disk, size, (c, a) => run(c, a));
const d = await startDaemonWithJobMonitor(dir, disk);
const access = async (fn, success) => {
  const a = await setupBackupAccess(d.qmp, { targetId: 'p', devices: ['disk0'], bitmap: 'probe', fleecing: { dir, format: 'qcow2' }, nbdServer: { path: d.nbdSocket } });
  let ok = false;
  try { const r = await fn(a.devices[0]); ok = true; return r; } finally { await teardownBackupAccess(d.qmp, { targetId: 'p', success: ok && success }); }
};
const full = path.join(dir, 'full.qcow2');
await access((dev) => run(NODE, [CLI, 'copy', dev.nbdUri, full, '--format', 'qcow2', '--json', '--discard']), true);
const live = await NbdClient.connect(d.liveUri());
await guestWrites(live, size, percent, 1);
await live.close();
const contenders = {
  'qcow2 discard': (dev, out) => [CLI, 'copy', dev.nbdUri, out, '--format', 'qcow2', '--backing', full, '--json', '--discard', '--bitmap', dev.bitmapName],
  'qcow2 no discard': (dev, out) => [CLI, 'copy', dev.nbdUri, out, '--format', 'qcow2', '--backing', full, '--json', '--no-discard', '--bitmap', dev.bitmapName],
  'null discard': (dev) => [CLI, 'copy', dev.nbdUri, '-', '--json', '--discard', '--bitmap', dev.bitmapName],
  'null no discard': (dev) => [CLI, 'copy', dev.nbdUri, '-', '--json', '--no-discard', '--bitmap', dev.bitmapName],
};
const times = Object.fromEntries(Object.keys(contenders).map((k) => [k, []]));
for (let round = 0; round < 3; round++) {
  for (const [name, args] of Object.entries(contenders)) {
    const out = path.join(dir, 'incr.qcow2');
    await rm(out, { force: true });
    const r = await access(async (dev) => {
      const t = process.hrtime.bigint();
      const perf = process.env.PROBE_PERF && name === 'qcow2 no discard' && round === 0;
      const { stdout } = perf ? await run('perf', ['record', '-F', '4999', '-g', '-o', process.env.PROBE_PERF, '--', NODE, ...args(dev, out)]) : await run(NODE, args(dev, out));
      return { wall: Number(process.hrtime.bigint() - t) / 1e9, engine: JSON.parse(stdout.trim().split('\n').pop()).seconds };
    }, false);
    times[name].push(r);
    console.log(round, name, r.wall.toFixed(3), r.engine?.toFixed?.(3));
  }
}
for (const [k, v] of Object.entries(times)) console.log(k, 'wall', median(v.map((x) => x.wall)).toFixed(3), 'engine', median(v.map((x) => x.engine)).toFixed(3));
await d.stop();
await rm(dir, { recursive: true, force: true });

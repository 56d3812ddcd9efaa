#!/usr/bin/env node
/**
 * Restore benchmark (issue 15, "restores that verify while they copy"): a 5-deep chain made by the
 * DirectoryProvider through the CLI (1 full + 4 incrementals of a 1 GiB disk, 10% changed between
 * them), then restored to a raw file, A/B alternating, medians:
 *   (a) ours:            node dist/cli/main.js restore VOLID --store S --to disk0=OUT --json
 *   (b) qemu-img:        qemu-img convert -f qcow2 -O raw TOP OUT          (no verification)
 *   (c) verify+convert:  sha256sum of every layer file, then (b)           (today's verify-then-convert)
 * Goals: (a) within 1.15x of (b); (a) >= 1.5x faster than (c). Peak RSS of each beside its time.
 *
 * usage: node benchmarks/restore.mjs --help   (npm run bench:restore; after npm run build)
 * Writes only its own section of benchmarks/RESULTS.md (`<!-- begin restore -->` ... `<!-- end restore -->`).
 */
import { execFile } from 'node:child_process';
import { chmod, mkdir, mkdtemp, open, readFile, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { CLI, GiB, MiB, NODE, f0, f2, fmtMiB, fmtSize, guestWrites, makeChunkDisk, median, parseSize, pkg, requireTime, rmf, startDaemonWithJobMonitor, timed, tool } from './common.mjs';
import { writeSection } from './results-file.mjs';

const execFileP = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
const { NbdClient } = pkg;

const USAGE = `usage: node benchmarks/restore.mjs [options]   (npm run bench:restore -- [options]; after npm run build)
  --size SIZE       disk size (default 1G; a bare number is GiB; a multiple of 4 MiB)
  --depth N         backups in the chain: 1 full + N-1 incrementals (default 5)
  --changed PCT     percent of the disk the guest changes before each incremental (default 10)
  --rounds N        A/B rounds, the order rotating each round (default 5)
  --no-verify       skip the byte comparison of round 1's outputs with the chain's top image
  --results PATH    the report's file: rewrites only its section between <!-- begin restore --> and
                    <!-- end restore --> (default benchmarks/RESULTS.md; give another path for trial runs)
  --work DIR        scratch folder (default: a new folder under the system's temporary folder)
  -h, --help        this text`;

function parseArgs(argv) {
  const o = { size: GiB, depth: 5, changed: 10, rounds: 5, verify: true, results: path.join(here, 'RESULTS.md'), work: undefined };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    switch (a) {
      case '--size': o.size = parseSize(val()); break;
      case '--depth': o.depth = Number(val()); break;
      case '--changed': o.changed = Number(val()); break;
      case '--rounds': o.rounds = Number(val()); break;
      case '--no-verify': o.verify = false; break;
      case '--results': o.results = path.resolve(val()); break;
      case '--work': o.work = path.resolve(val()); break;
      case '-h': case '--help': console.log(USAGE); process.exit(0); break;
      default: throw new Error(`unknown option ${a}\n${USAGE}`);
    }
  }
  if (!(o.size > 0 && o.size % (4 * MiB) === 0)) throw new Error('--size must be a positive multiple of 4 MiB');
  if (!(Number.isInteger(o.depth) && o.depth >= 1)) throw new Error('--depth must be a positive integer');
  if (!(o.changed > 0 && o.changed <= 100)) throw new Error('--changed must be in (0, 100]');
  if (!(Number.isInteger(o.rounds) && o.rounds >= 1)) throw new Error('--rounds must be a positive integer');
  return o;
}

const log = (...a) => console.error(...a);

async function fsyncFile(p) {
  const fh = await open(p, 'r+');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Every layer file of the chain under `top`, top first (qemu-img info --backing-chain). */
async function chainFiles(top) {
  const { stdout } = await execFileP('qemu-img', ['info', '-U', '--backing-chain', '--output=json', top], { maxBuffer: 16 << 20 });
  return JSON.parse(stdout).map((x) => x.filename);
}

/**
 * What our restore ran, from its --json result (feature detection: today's result lists device,
 * size and target only; a native verified restore says so in fields of its own).
 */
function restoreFields(result) {
  const d = result.devices?.[0] ?? {};
  const extra = Object.fromEntries(Object.entries(d).filter(([k]) => !['device', 'size', 'target'].includes(k)));
  const top = Object.fromEntries(Object.entries(result).filter(([k]) => !['volid', 'devices', 'config', 'firewallConfig', 'configFile', 'firewallFile'].includes(k)));
  const fields = { ...top, ...extra };
  return Object.keys(fields).length === 0 ? 'none beyond device, size and target (as today)' : JSON.stringify(fields);
}

/**
 * Runs our restore once (untimed) with a `qemu-img` on PATH that logs its arguments before it
 * runs the real one (the library finds its tools on PATH): says whether our restore converted
 * with qemu-img or wrote the target itself.
 */
async function spyQemuImg(work, command) {
  const spy = path.join(work, 'spy');
  await mkdir(spy, { recursive: true });
  const logFile = path.join(spy, 'calls.log');
  await writeFile(path.join(spy, 'qemu-img'), `#!/bin/sh\nprintf '%s\\n' "$*" >> ${JSON.stringify(logFile)}\nexec ${JSON.stringify(tool('qemu-img', 'qemu-utils'))} "$@"\n`);
  await chmod(path.join(spy, 'qemu-img'), 0o700);
  const [cmd, args] = command;
  const { stdout } = await execFileP(cmd, args, { maxBuffer: 16 << 20, env: { ...process.env, PATH: `${spy}:${process.env.PATH}` } });
  const calls = (await readFile(logFile, 'utf8').catch(() => '')).split('\n').filter(Boolean);
  const subcommands = [...new Set(calls.map((c) => c.split(' ')[0]))];
  return { result: JSON.parse(stdout), calls, usedConvert: subcommands.includes('convert'), subcommands };
}

/** Options of `restore --help` that today's CLI does not have (a new path may come with a flag). */
async function newRestoreOptions() {
  const known = new Set(['--store', '--to', '--config-dir', '--idmap', '--bwlimit', '--force', '--allow-non-empty', '--json', '--help']);
  const { stdout } = await execFileP(NODE, [CLI, 'restore', '--help']);
  return [...new Set(stdout.match(/--[a-z][a-z-]*/g) ?? [])].filter((o) => !known.has(o));
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
  for (const [t, p] of [['qemu-storage-daemon', 'qemu-system-common'], ['qemu-img', 'qemu-utils'], ['qemu-io', 'qemu-utils'], ['sha256sum', 'coreutils']]) tool(t, p);
  const startLoad = os.loadavg().map((x) => x.toFixed(2)).join(' ');
  const work = opts.work ?? (await mkdtemp(path.join(os.tmpdir(), 'pvebp-bench-restore-')));
  await mkdir(work, { recursive: true });
  const started = Date.now();
  let qsd;
  let live;
  try {
    // 1. the chain, made by the provider through the CLI
    const disk = path.join(work, 'disk0.qcow2');
    await rmf(disk);
    const run = (cmd, args) => execFileP(cmd, args, { maxBuffer: 64 << 20 });
    log(`restore bench: ${fmtSize(opts.size)} disk, chain of ${opts.depth}, ${opts.changed}% changed between backups, ${opts.rounds} rounds; work ${work}`);
    await makeChunkDisk(disk, opts.size, run);
    const qsdDir = path.join(work, 'qsd');
    await rmf(qsdDir);
    await mkdir(qsdDir);
    qsd = await startDaemonWithJobMonitor(qsdDir, disk, 'qcow2');
    live = await NbdClient.connect(qsd.liveUri());
    const store = path.join(work, 'store');
    const fleece = path.join(work, 'fleece');
    await rmf(store);
    await mkdir(fleece, { recursive: true });
    const backups = [];
    for (let i = 0; i < opts.depth; i++) {
      if (i > 0) await guestWrites(live, opts.size, opts.changed, 1000 + i);
      const t0 = performance.now();
      const { stdout } = await execFileP(NODE, [CLI, 'backup', '--store', store, '--vmid', '100', '--qmp', qsd.jobQmpSocket, '--devices', 'disk0', '--nbd-server', qsd.nbdSocket, '--fleecing-dir', fleece, '--json'], { maxBuffer: 16 << 20 });
      const info = JSON.parse(stdout);
      if ((i === 0) !== !info.parent) throw new Error(`backup ${i + 1}: expected ${i === 0 ? 'a full backup' : 'an incremental backup'}, got ${JSON.stringify(info)}`);
      backups.push(info);
      log(`  backup ${i + 1}/${opts.depth}: ${info.volid} (${info.parent ? 'incremental' : 'full'}, ${fmtMiB(info.size ?? 0)}) in ${((performance.now() - t0) / 1000).toFixed(2)} s`);
    }
    await live.close();
    live = undefined;
    await qsd.stop();
    qsd = undefined;
    const top = backups[backups.length - 1];
    const topDir = path.join(store, '100', top.volid.split('/').pop());
    const topImage = path.join(topDir, 'disk0.qcow2');
    const layers = await chainFiles(topImage);
    if (layers.length !== opts.depth) throw new Error(`the chain under ${topImage} has ${layers.length} layers, expected ${opts.depth}`);
    let stored = 0;
    for (const l of layers) stored += (await stat(l)).size;
    log(`  chain: ${layers.length} layers, ${fmtMiB(stored)} stored`);

    // 2. the contenders
    const out = path.join(work, 'out.raw');
    const qemuImg = tool('qemu-img', 'qemu-utils');
    const contenders = [
      { name: 'ours', command: () => [NODE, [CLI, 'restore', top.volid, '--store', store, '--to', `disk0=${out}`, '--json']], json: true },
      { name: 'qemu-img convert', command: () => [qemuImg, ['convert', '-f', 'qcow2', '-O', 'raw', topImage, out]] },
      {
        name: 'sha256sum + convert',
        command: () => ['sh', ['-c', 'out="$1"; top="$2"; shift 2; sha256sum -- "$@" > /dev/null && exec qemu-img convert -f qcow2 -O raw "$top" "$out"', 'sh', out, topImage, ...layers]],
      },
    ];
    const rows = [];
    // one untimed restore first (the first run after the backups pays for cold metadata), which
    // also finds out which path our restore takes
    await rmf(out);
    const spied = await spyQemuImg(work, contenders[0].command());
    const newOptions = await newRestoreOptions();
    const ourPath =
      `${spied.usedConvert ? '**qemu-img convert** (the library ran `qemu-img ' + spied.subcommands.join('`, `qemu-img ') + '`)' : `**its own writer**, no \`qemu-img convert\`${spied.calls.length ? ` (qemu-img ${spied.subcommands.join(', ')})` : ''}`}; ` +
      `result fields: ${restoreFields(spied.result)}; restore options beyond today's: ${newOptions.length ? newOptions.join(', ') : 'none'}`;
    log(`  our restore: ${ourPath}`);
    for (let r = 0; r < opts.rounds; r++) {
      const k = r % contenders.length;
      const order = [...contenders.slice(k), ...contenders.slice(0, k)];
      for (const [pos, c] of order.entries()) {
        await rmf(out);
        await execFileP('sync');
        const res = await timed(...c.command(), path.join(work, 'time.txt'));
        const t1 = performance.now();
        await fsyncFile(out); // time to a durable image, for every contender
        const total = res.seconds + (performance.now() - t1) / 1000;
        const row = { round: r + 1, position: pos + 1, name: c.name, total, rssKiB: res.rssKiB, cpu: res.cpu };
        if (opts.verify && r === 0) {
          row.verify = await execFileP(qemuImg, ['compare', '-q', '-f', 'raw', '-F', 'qcow2', out, topImage]).then(
            () => 'identical',
            (e) => `DIFFERENT (${(e.stdout || e.stderr || e.message).trim().split('\n')[0]})`,
          );
        }
        rows.push(row);
        log(`  round ${row.round} ${c.name.padEnd(20)} ${total.toFixed(2)} s  rss ${(row.rssKiB / 1024).toFixed(0)} MiB  cpu ${row.cpu.toFixed(2)} s${row.verify ? `  ${row.verify}` : ''}`);
      }
    }
    await rmf(out);

    // 3. the report
    const names = contenders.map((c) => c.name);
    const st = (name, f) => median(rows.filter((x) => x.name === name).map(f));
    const t = (name) => st(name, (x) => x.total);
    const paired = (a, b) =>
      median([...new Set(rows.map((x) => x.round))].map((n) => rows.find((x) => x.round === n && x.name === a).total / rows.find((x) => x.round === n && x.name === b).total));
    const vsConvert = t('ours') / t('qemu-img convert');
    const vsVerify = t('sha256sum + convert') / t('ours');
    const L = [];
    L.push('## Restore of a backup chain to a raw file', '');
    L.push(
      `\`npm run bench:restore\` (benchmarks/restore.mjs), ${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC, ${os.cpus().length} cores (${os.cpus()[0]?.model ?? 'unknown CPU'}), ` +
        `${(await execFileP('qemu-img', ['--version'])).stdout.split('\n')[0]}, Node ${process.version}. Command: \`node benchmarks/restore.mjs ${process.argv.slice(2).join(' ')}\`.`,
      '',
      `Chain: a ${fmtSize(opts.size)} qcow2 disk (60% data: 4 MiB chunks, 3 of every 5 written) served by qemu-storage-daemon, backed up by the DirectoryProvider through the CLI ` +
        `(\`node dist/cli/main.js backup --qmp ... --json\`) ${opts.depth} times: 1 full + ${opts.depth - 1} incrementals, the guest changing ${opts.changed}% of the disk ` +
        `(64 KiB blocks) before each. ${opts.depth} layer files, ${fmtMiB(stored)} stored. ${opts.rounds} rounds, the order rotating each round; medians. ` +
        'Each run writes a new raw file; the harness fsyncs it afterwards (time to a durable image, for every contender). The store is in the page cache for all three.',
      '',
      '```',
      `ours:                node dist/cli/main.js restore VOLID --store STORE --to disk0=OUT --json`,
      'qemu-img convert:    qemu-img convert -f qcow2 -O raw TOP OUT                   # no verification',
      'sha256sum + convert: sha256sum LAYER1 ... LAYER5 && qemu-img convert -f qcow2 -O raw TOP OUT   # verify, then convert',
      '```',
      '',
      `Our restore (found out on an untimed run with a \`qemu-img\` on PATH that logs its calls): ${ourPath}.`,
      '',
      `| round | order | ${names.join(' | ')} |`,
      `|---|---|${names.map(() => '---').join('|')}|`,
    );
    for (const n of [...new Set(rows.map((x) => x.round))]) {
      const inRound = rows.filter((x) => x.round === n).sort((a, b) => a.position - b.position);
      L.push(`| ${n} | ${inRound.map((x) => x.name).join(' → ')} | ${names.map((c) => f2(inRound.find((x) => x.name === c)?.total)).join(' | ')} |`);
    }
    L.push('', '| contender | median s | min–max s | MiB/s (disk size) | median CPU s | peak RSS (median / max) | round-1 check |', '|---|---|---|---|---|---|---|');
    for (const c of names) {
      const v = rows.filter((x) => x.name === c);
      const rss = v.map((x) => x.rssKiB / 1024);
      L.push(
        `| ${c} | ${f2(t(c))} | ${f2(Math.min(...v.map((x) => x.total)))}–${f2(Math.max(...v.map((x) => x.total)))} | ${f0(opts.size / MiB / t(c))} | ${f2(st(c, (x) => x.cpu))} | ${f0(median(rss))} / ${f0(Math.max(...rss))} MiB | ${v.find((x) => x.round === 1)?.verify ?? 'not checked'} |`,
      );
    }
    L.push(
      '',
      `- ours / qemu-img convert: **${f2(vsConvert)}x** the time (per-round ${f2(paired('ours', 'qemu-img convert'))}x). Goal <= 1.15x: **${vsConvert <= 1.15 ? 'met' : 'not met'}**.`,
      `- sha256sum + convert / ours: **${f2(vsVerify)}x** (per-round ${f2(paired('sha256sum + convert', 'ours'))}x). Goal >= 1.5x: **${vsVerify >= 1.5 ? 'met' : 'not met'}**.`,
      `- peak RSS of our restore: ${f0(st('ours', (x) => x.rssKiB / 1024))} MiB (\`/usr/bin/time -f %M\`: the largest process of its tree, node or a child it waited for, such as qemu-img or the FUSE export's qemu-storage-daemon).`,
      `- load average at the start: ${startLoad}; the run took ${((Date.now() - started) / 1000).toFixed(0)} s.`,
      '',
    );
    const section = L.join('\n');
    console.log(section);
    await writeSection(opts.results, 'restore', section);
    log(`written to the restore section of ${opts.results}`);
  } finally {
    await live?.close().catch(() => undefined);
    await qsd?.stop();
    if (!opts.work) await rmf(work);
  }
  return 0;
}

process.exitCode = await main().catch((e) => {
  console.error(`bench: ${e.stack ?? e}`);
  return 1;
});

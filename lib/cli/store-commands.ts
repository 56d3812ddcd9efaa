/**
 * The store commands: `backup`, `restore`, `list`, `prune`, `delete`, `verify`, `protect`,
 * `notes`, `key create`, on a directory store (`--store DIR`) or a chunk store (`--store
 * s3://bucket/prefix`; which one is decided in one place, `openCliStore` in stores.ts). Each prints a table or lines for a person, JSON with `--json`, progress
 * bars on a TTY only, and fails with one line (see `main` in program.ts).
 */
import { execFile } from 'node:child_process';
import { mkdir, readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';

import { Command, InvalidArgumentError } from 'commander';

import { CancelledError, InvalidArgumentError as PveInvalidArgumentError } from '../errors.js';
import { RootdirNotEmptyError } from '../container/errors.js';
import { BackupFailedError, TargetExistsError, UsageError, VerifyFailedError } from './errors.js';
import type { Guest } from '../job/types.js';
import type { LogFunction, PruneOptions } from '../provider/api.js';
import { isPlainFileName } from '../provider/files.js';
import type { QmpClient } from '../qmp/client.js';
import { requireTool } from '../tools.js';
import { formatBytes, printTable, progressView, type ProgressView } from './output.js';
import { addStoreOptions, openCliStore, s3OptionsFromCli } from './stores.js';
import type { ChunkStore } from '../chunk-provider/store.js';

const execFileP = promisify(execFile);

/**
 * The job runner and the QMP client, loaded when a backup runs (lazily: every module costs
 * start-up time, ~1 ms each here); the store's modules are loaded by `openCliStore`.
 */
async function backupMachinery() {
  const [runner, qmp] = await Promise.all([import('../job/runner.js'), import('../qmp/client.js')]);
  return { ...runner, ...qmp };
}

/** Option parsers shared with program.ts. */
export interface Parsers {
  size: (v: string) => number;
  /** A bandwidth limit: a size, `undefined` for none (0). */
  bandwidth: (v: string) => number | undefined;
  count: (v: string) => number;
  signal: () => AbortSignal;
}

/** Bad usage found inside an action: one line, exit code 2 (see `main`). */
export const usage = (message: string): UsageError => new UsageError(message);

/** The operation stopped because of Ctrl-C or SIGTERM: exit code 130 (see `main`). */
const cancelled = (cause: unknown): CancelledError => new CancelledError('cancelled', { cause });

const collect = (v: string, prev: string[] = []): string[] => [...prev, v];
/**
 * A guest id as Proxmox writes them (pve-common's `pve-vmid` format, `^[1-9][0-9]{2,8}$`: 100 to
 * 999999999): plain decimal digits only. `Number()` would take `1e3`, `0x64`, `+100` or ` 100`.
 */
const vmidArg = (v: string): number => {
  if (!/^[1-9][0-9]{2,8}$/.test(v)) throw new InvalidArgumentError(`not a guest id: ${JSON.stringify(v)} (a whole number from 100 to 999999999)`);
  return Number(v);
};
/** A share in percent: a number in (0, 100]. */
const percentArg = (v: string): number => {
  const n = Number(v);
  if (!/^\d+(\.\d+)?$/.test(v) || !(n > 0 && n <= 100)) throw new InvalidArgumentError(`not a share in percent: ${JSON.stringify(v)} (a number above 0, at most 100)`);
  return n;
};
const keepArg = (v: string): number => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`not a whole number >= 0: ${v}`);
  return n;
};
const choice =
  (...allowed: string[]) =>
  (v: string): string => {
    if (!allowed.includes(v)) throw new InvalidArgumentError(`expected one of ${allowed.join(', ')}`);
    return v;
  };
const date = (t: number): string => new Date(t * 1000).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');

/**
 * Task log lines on stderr for a person. With `--json` only warnings and errors: stdout is the
 * JSON alone, and what a machine reading it cannot see there (a verdict the store refused to
 * record, a damaged chunk moved aside) must not vanish.
 */
function logTo(json: boolean): LogFunction {
  return (level, message) => {
    if (!json || level !== 'info') process.stderr.write(`${level === 'info' ? 'INFO' : level === 'warn' ? 'WARN' : 'ERROR'}: ${message}\n`);
  };
}

/** A device name for a disk image path: `NAME=PATH`, or the file's base name. */
function diskSpec(spec: string): { device: string; file: string } {
  const m = /^([A-Za-z][A-Za-z0-9_-]{0,30})=(.+)$/.exec(spec);
  if (m) return { device: m[1]!, file: path.resolve(m[2]!) };
  let device = path.basename(spec).replace(/\.[^.]*$/, '').replace(/[^A-Za-z0-9_-]/g, '-').slice(0, 31);
  if (!/^[A-Za-z]/.test(device)) device = `d${device}`.slice(0, 31);
  return { device, file: path.resolve(spec) };
}

async function imageFormat(file: string): Promise<'raw' | 'qcow2'> {
  const qemuImg = requireTool('qemu-img', 'qemu-utils');
  let format: string;
  try {
    format = (JSON.parse((await execFileP(qemuImg, ['info', '-U', '--output=json', file])).stdout) as { format: string }).format;
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new PveInvalidArgumentError(`cannot read disk image ${file}: ${(e.stderr || e.message).trim().split('\n')[0]}`);
  }
  if (format !== 'raw' && format !== 'qcow2') throw new PveInvalidArgumentError(`disk image ${file} is ${format}; raw and qcow2 are supported`);
  return format;
}

/** Progress bars of a backup, one per disk, on a TTY. */
function diskProgress(enabled: boolean): { onProgress: (p: { device: string; done: number; total: number; bytesPerSecond: number }) => void; stop: () => void } {
  const views = new Map<string, ProgressView>();
  return {
    onProgress: (p) => {
      let v = views.get(p.device);
      if (!v) {
        for (const other of views.values()) other.stop();
        v = progressView(p.device.padEnd(10), enabled);
        views.set(p.device, v);
      }
      v.update(p.done, p.total, p.bytesPerSecond);
    },
    stop: () => {
      for (const v of views.values()) v.stop();
    },
  };
}

export function addStoreCommands(program: Command, parse: Parsers): void {
  addStoreOptions(
    program
      .command('backup')
      .description('back up a VM (by its QMP socket, or disk images through qemu-storage-daemon) or a container directory into a store (a folder or s3://bucket/prefix)'),
    'the store (a folder is created when missing or empty)',
  )
    .requiredOption('--vmid <n>', 'guest id', vmidArg)
    .option('--qmp <socket>', "a running VM's (or qemu-storage-daemon's) QMP socket")
    .option('--devices <list>', 'with --qmp: devices to back up, comma-separated (default: every writable disk)')
    .option('--nbd-server <socket>', "with --qmp: the NBD server socket the QEMU process already runs, if any")
    .option('--disk <[name=]path>', 'a disk image of a stopped VM (repeatable); served by qemu-storage-daemon for the backup', collect)
    .option('--rootdir <dir>', "a container's root file system")
    .option('--idmap <entry>', "with --rootdir: an id map entry like 'u 0 100000 65536' (repeatable)", collect)
    .option('--exclude <pattern>', 'with --rootdir: rsync-style exclusion (repeatable)', collect)
    .option('--config <file>', "the guest's configuration file (default: a minimal one)")
    .option('--firewall <file>', "the guest's firewall configuration file")
    .option('--mode <mode>', 'VM backups: incremental (default) or full', choice('incremental', 'full'))
    .option('--lxc-mode <mode>', 'container backups: tar (default) or directory', choice('tar', 'directory'))
    .option('--compression <c>', 'qcow2 cluster compression: none (default), zstd, zlib', choice('none', 'zstd', 'zlib'))
    .option('--storeid <id>', 'storage id of the store in volume ids (when creating it; default directory)')
    .option('--bwlimit <bytes>', 'bandwidth limit in bytes/s (K, M, G suffixes)', parse.bandwidth)
    .option('--fleecing-dir <dir>', 'VM backups: folder for the fleecing images (default: the job\'s temporary folder, often RAM)')
    .option('--api <n>', 'provider API generation to run the provider in: 2 (default) or 1', choice('1', '2'))
    .option('--notes <text>', 'notes for the backup ({{guestname}}, {{vmid}} expanded)')
    .option('--protected', 'mark the backup protected')
    .option('--json', 'print the result as JSON; no log lines, no progress bars')
    .action(async (o: Record<string, unknown>) => {
      const { runBackupJob, QmpClient } = await backupMachinery();
      const json = o.json === true;
      const sources = ['qmp', 'disk', 'rootdir'].filter((k) => o[k] !== undefined);
      if (sources.length !== 1) throw usage('give exactly one of --qmp, --disk, --rootdir');
      const vmid = o.vmid as number;
      // The QMP socket first: a busy monitor or a socket that is not QMP fails before the store is touched.
      let qmp: QmpClient | undefined;
      if (o.qmp !== undefined && o.rootdir === undefined) qmp = await QmpClient.connect(o.qmp as string, { timeoutMs: 10_000 });
      // An open QMP connection would keep the process alive after a failure below.
      const closing = async <T>(p: Promise<T>): Promise<T> =>
        p.catch(async (err: unknown) => {
          await qmp?.close().catch(() => undefined);
          throw err;
        });
      const store = await closing(openCliStore(o, 'create'));
      const readText = async (f: unknown): Promise<string | undefined> => (typeof f === 'string' ? closing(readFile(f, 'utf8')) : undefined);
      const firewallConfig = await readText(o.firewall);
      let guest: Guest;
      if (o.rootdir !== undefined) {
        guest = {
          vmid,
          type: 'lxc',
          rootdir: path.resolve(o.rootdir as string),
          config: (await readText(o.config)) ?? `hostname: ct${vmid}\n`,
          ...(o.idmap ? { idMap: o.idmap as string[] } : {}),
          ...(o.exclude ? { excludePaths: o.exclude as string[] } : {}),
          ...(firewallConfig !== undefined ? { firewallConfig } : {}),
        };
      } else {
        const config = (await readText(o.config)) ?? `name: vm${vmid}\n`;
        let target: Extract<Guest, { type: 'qemu' }>['qmp'];
        if (qmp !== undefined) {
          target = qmp;
        } else {
          const disks = [];
          for (const spec of o.disk as string[]) {
            const d = diskSpec(spec);
            disks.push({ ...d, format: await imageFormat(d.file) });
          }
          target = { disks };
        }
        guest = {
          vmid,
          type: 'qemu',
          qmp: target,
          config,
          ...(o.devices ? { devices: (o.devices as string).split(',').filter(Boolean) } : {}),
          ...(o.nbdServer ? { nbdServer: o.nbdServer as string } : {}),
          ...(firewallConfig !== undefined ? { firewallConfig } : {}),
        };
      }
      const progress = diskProgress(!json);
      const log = logTo(json);
      // --json reports each disk's copy (the core's own summary) beside the job's step times
      const copies: Record<string, { bytesRead: number; bytesZero: number; bytesSkipped: number; bytesTrimmed: number; extents: number; seconds: number }> = {};
      const provider = await closing(
        store.backupProvider({
          log,
          options: o,
          onProgress: progress.onProgress,
          onDeviceDone: (device, s) => (copies[device] = { bytesRead: s.bytesRead, bytesZero: s.bytesZero, bytesSkipped: s.bytesSkipped, bytesTrimmed: s.bytesTrimmed, extents: s.extents, seconds: s.seconds }),
        }),
      );
      let result;
      const signal = parse.signal();
      try {
        result = await runBackupJob({
          provider,
          storeid: store.storeid,
          guests: [guest],
          log,
          signal,
          bandwidthLimit: o.bwlimit as number | undefined,
          ...(o.fleecingDir ? { fleecing: { dir: path.resolve(o.fleecingDir as string) } } : {}),
          ...(o.notes ? { notesTemplate: o.notes as string } : {}),
          ...(o.protected ? { protected: true } : {}),
        });
      } catch (err) {
        // Ctrl-C / SIGTERM: the runner took the abort path (partial backup removed); exit 130
        if (signal.aborted) throw new CancelledError('backup cancelled', { cause: err });
        throw err;
      } finally {
        progress.stop();
        await qmp?.close().catch(() => undefined);
      }
      const g = result.guests[0]!;
      if (g.status !== 'ok') {
        throw new BackupFailedError(vmid, guest.type, g.error);
      }
      // the one new backup, looked up alone: listing the guest's backups grows with how many it has
      const info = await store.info(g.volname!); // an `ok` guest has its volume name
      if (json) console.log(JSON.stringify({ ...info, warnings: g.warnings, steps: g.steps, copies }, null, 2)); // steps: ms per step (GuestStepTimes); copies: per disk, seconds
      else console.log(`${info.volid}: ${info.format}, ${formatBytes(info.size)}${info.parent ? `, incremental over ${info.parent}` : info.previous ? `, incremental (unchanged chunks from ${info.previous})` : ', full'}`);
    });

  addStoreOptions(
    program
      .command('restore')
      .description('restore a backup: VM disks to raw images (or any qemu-img target), a container into a directory')
      .argument('<volid>', 'the backup, e.g. directory:backup/100/qemu-2024_05_01-10_00_00'),
  )
    .requiredOption('--to <target>', 'VM: a folder for <device>.raw files, or device=PATH|URI (repeatable); container: the (empty) root directory', collect)
    .option('--config-dir <dir>', 'write the guest (and firewall) configuration here')
    .option('--idmap <entry>', "container: id map entry like 'u 0 100000 65536' (repeatable)", collect)
    .option('--bwlimit <bytes>', 'bandwidth limit in bytes/s (K, M, G suffixes)', parse.bandwidth)
    .option('--force', 'VM: replace existing image files (each is written anew, then renamed over the old one)')
    .option('--allow-non-empty', 'container: restore into a directory that holds files (existing files are kept)')
    .option('--json', 'print the result as JSON, no progress bars')
    .action(async (volid: string, o: Record<string, unknown>) => {
      const { restoreContainer, restoreVm } = await import('../job/restore.js');
      const json = o.json === true;
      const store = await openCliStore(o, 'open');
      const volname = store.volnameOf(volid);
      const backup = await store.describe(volname);
      // the restore's own error is what main prints: no ERROR line before it
      const log: LogFunction = (level, message) => level !== 'err' && logTo(json)(level, message);
      const provider = await store.restoreProvider(log);
      const to = o.to as string[];
      // folders this command creates hold a guest's disks and configuration: 0700 (the umask can
      // only take bits off it), never 0777 less the umask; an existing folder keeps its mode
      if (o.configDir) await mkdir(o.configDir as string, { recursive: true, mode: 0o700 });
      const signal = parse.signal();
      const common = {
        provider,
        volname,
        storeid: store.storeid,
        signal,
        log,
        ...(o.configDir ? { configDir: o.configDir as string } : {}),
        bandwidthLimit: o.bwlimit as number | undefined,
      };
      if (backup.vmtype === 'lxc') {
        if (to.length !== 1) throw usage('a container is restored into one --to directory');
        const r = await restoreContainer({
          ...common,
          rootdir: path.resolve(to[0]!),
          ...(o.allowNonEmpty ? { allowNonEmpty: true } : {}),
          ...(o.idmap ? { idMap: o.idmap as string[] } : {}),
        }).catch((err: unknown) => {
          if (signal.aborted) throw cancelled(err);
          const cause = (err as { cause?: { code?: string; rootdir?: string; entry?: string } } | undefined)?.cause;
          // the library's message names its option; say what the command line user can do
          if (cause?.code === 'ERR_ROOTDIR_NOT_EMPTY') {
            throw new RootdirNotEmptyError(cause.rootdir!, cause.entry!, { remedy: 'give --allow-non-empty to restore into it anyway (existing files are kept)', cause: err });
          }
          throw err;
        });
        if (json) console.log(JSON.stringify({ volid: store.volid(volname), rootdir: path.resolve(to[0]!), ...r }, null, 2));
        else console.log(`restored ${store.volid(volname)} (${r.mechanism}) into ${path.resolve(to[0]!)}`);
        return;
      }
      let targets: Record<string, string> | ((device: string) => Promise<string>);
      let files: string[];
      if (to.every((t) => /^[A-Za-z][A-Za-z0-9_.-]*=/.test(t))) {
        targets = Object.fromEntries(to.map((t) => [t.slice(0, t.indexOf('=')), t.slice(t.indexOf('=') + 1)]));
        files = Object.values(targets);
      } else if (to.length === 1) {
        const dir = path.resolve(to[0]!);
        // a device name becomes a file name in the folder: one that is not a plain name (a
        // damaged or crafted manifest, e.g. on shared storage) would write outside the folder
        const unsafe = backup.devices.find((device) => !isPlainFileName(device));
        if (unsafe !== undefined) {
          throw new PveInvalidArgumentError(`backup ${store.volid(volname)} has a disk named ${JSON.stringify(unsafe)}, which cannot be a file name in ${dir}; restore it with --to DEVICE=PATH`);
        }
        targets = async (device) => {
          await mkdir(dir, { recursive: true, mode: 0o700 });
          return path.join(dir, `${device}.raw`);
        };
        files = backup.devices.map((device) => path.join(dir, `${device}.raw`));
      } else throw usage('--to is one folder, or device=PATH for each device');
      // An existing image is never written into: a smaller backup would leave the old tail
      // behind it. Refused before anything is written, or replaced whole with --force.
      if (!o.force) {
        for (const f of files) {
          const st = await stat(f).catch(() => undefined);
          if (st?.isFile()) throw new TargetExistsError(path.resolve(f));
        }
      }
      const views = new Map<string, ProgressView>();
      try {
        const r = await restoreVm({
          ...common,
          overwrite: 'replace',
          targets,
          onProgress: (p) => {
            let v = views.get(p.device);
            if (!v) views.set(p.device, (v = progressView(p.device.padEnd(10), !json)));
            v.update(p.bytes, p.total, 0);
          },
        });
        if (json) console.log(JSON.stringify({ volid: store.volid(volname), ...r }, null, 2));
        else for (const d of r.devices) console.log(`restored ${d.device} (${formatBytes(d.size)}) to ${d.target}`);
      } catch (err) {
        // Ctrl-C / SIGTERM: the partial image is removed; exit 130
        if (signal.aborted) throw cancelled(err);
        throw err;
      } finally {
        for (const v of views.values()) v.stop();
      }
    });

  addStoreOptions(
    program
      .command('list')
      .description("list a store's backups, oldest first; status ok, incomplete, in-progress, corrupt (its manifest), or broken (a backup it builds on is missing or unusable: it cannot be restored)"),
  )
    .option('--vmid <n>', 'only this guest', vmidArg)
    .option('--json', 'print JSON')
    .action(async (o: { store: string; vmid?: number; json?: boolean }) => {
      const store = await openCliStore(o, 'open');
      const list = await store.list(o.vmid);
      if (o.json) {
        console.log(JSON.stringify(list, null, 2));
        return;
      }
      const rows = [['volid', 'type', 'created', 'size', 'format', 'parent', 'status', 'protected', 'notes']];
      for (const b of list) {
        rows.push([b.volid, b.subtype, date(b.ctime), formatBytes(b.size), b.format ?? '-', b.parent ? (b.parent.split('/').pop() ?? '') : '-', b.status, b.protected ? 'yes' : '', (b.notes ?? '').split('\n')[0]!]);
      }
      printTable(rows);
    });

  const keepOptions = (c: Command): Command =>
    c
      .option('--keep-all', 'keep everything')
      .option('--keep-last <n>', 'keep the last n backups', keepArg)
      .option('--keep-hourly <n>', 'keep the newest backup of each of the last n hours', keepArg)
      .option('--keep-daily <n>', 'keep the newest backup of each of the last n days', keepArg)
      .option('--keep-weekly <n>', 'keep the newest backup of each of the last n weeks', keepArg)
      .option('--keep-monthly <n>', 'keep the newest backup of each of the last n months', keepArg)
      .option('--keep-yearly <n>', 'keep the newest backup of each of the last n years', keepArg);
  keepOptions(
    addStoreOptions(
      program
        .command('prune')
        .description('remove backups by retention rules (Proxmox keep-* semantics); bases of kept incremental backups are kept; chunk stores: manifests and indexes go, chunks stay for garbage collection'),
    )
      .option('--vmid <n>', 'only this guest', vmidArg)
      .option('--dry-run', 'only show what would be removed'),
  )
    .option('--json', 'print JSON')
    .action(async (o: Record<string, unknown>) => {
      const keep: PruneOptions = {};
      for (const k of ['keepAll', 'keepLast', 'keepHourly', 'keepDaily', 'keepWeekly', 'keepMonthly', 'keepYearly'] as const) {
        if (o[k] !== undefined) (keep as Record<string, unknown>)[k] = o[k];
      }
      if (Object.keys(keep).length === 0) throw usage('give at least one --keep-* option');
      const store = await openCliStore(o, 'open');
      const marks = await store.prune({ keep, ...(o.vmid ? { vmid: o.vmid as number } : {}), dryRun: o.dryRun === true });
      if (o.json) {
        console.log(JSON.stringify(marks, null, 2));
        return;
      }
      const rows = [['volid', 'created', o.dryRun ? 'would' : 'done', 'why']];
      for (const m of marks) rows.push([m.volid, date(m.ctime), m.mark, m.neededBy ? `needed by ${m.neededBy.split('/').pop()}` : '']);
      printTable(rows);
    });

  addStoreOptions(
    program
      .command('delete')
      .description('delete a backup; directory stores: a backup others build on is merged into its child first; chunk stores: its chunks stay for garbage collection')
      .argument('<volid>', 'the backup'),
  )
    .option('--force', 'delete even when protected')
    .option('--json', 'print JSON')
    .action(async (volid: string, o: { store: string; force?: boolean; json?: boolean }) => {
      const store = await openCliStore(o, 'open');
      const volname = store.volnameOf(volid);
      const r = await store.delete(volname, o.force === true);
      if (o.json) console.log(JSON.stringify({ volid: store.volid(volname), deleted: true, ...(r.merged ? { mergedInto: store.volid(r.merged) } : {}) }));
      else console.log(`deleted ${store.volid(volname)}${r.merged ? ` (merged into ${store.volid(r.merged)})` : ''}`);
    });

  addStoreOptions(
    program
      .command('verify')
      .description('verify backups: manifest and file checksums; directory stores: qemu-img check, chain present; chunk stores: indexes, blobs, and every chunk fetched and checked against its digest (exit code 1 when a problem is found)')
      .argument('[volid]', 'one backup (default: every backup of the store)'),
  )
    .option('--vmid <n>', 'only this guest', vmidArg)
    .option('--sample <percent>', "s3:// stores: check this share of each backup's chunks, chosen at random per run (default 100: all)", percentArg)
    .option('--bwlimit <bytes>', 's3:// stores: bandwidth limit in bytes/s (K, M, G suffixes)', parse.bandwidth)
    .option('--json', 'print JSON')
    .action(async (volid: string | undefined, o: { store: string; vmid?: number; sample?: number; bwlimit?: number; json?: boolean }) => {
      const store = await openCliStore(o, 'open');
      const signal = parse.signal();
      const results = await store
        .verify(volid, o.vmid, {
          ...(o.sample !== undefined ? { samplePercent: o.sample } : {}),
          ...(o.bwlimit !== undefined ? { bandwidthLimit: o.bwlimit } : {}),
          signal,
          log: logTo(o.json === true),
        })
        .catch((err: unknown) => {
          if (signal.aborted) throw cancelled(err);
          throw err;
        });
      if (o.json) console.log(JSON.stringify(results, null, 2));
      // chunk stores: how much of the backup's data was read (all of it unless --sample)
      const read = (r: (typeof results)[number]): string => (r.chunks ? ` (${r.chunks.checked} of ${r.chunks.total} chunks checked)` : '');
      if (!o.json) for (const r of results) console.log(r.ok ? `${r.volid}: ok${read(r)}` : `${r.volid}: FAILED${read(r)}\n${r.problems.map((p) => `  ${p}`).join('\n')}`);
      const bad = results.filter((r) => !r.ok).length;
      if (bad > 0) throw new VerifyFailedError(bad, results.length);
    });

  addStoreOptions(
    program
      .command('gc')
      .description('chunk stores: collect garbage, safe while backups run; unused chunks are moved aside first and deleted by a later run once the backups running meanwhile have finished (docs/chunk-store.md)'),
  )
    .option('--dry-run', 'report what would be done; change nothing')
    .option('--json', 'print JSON')
    .action(async (o: { store: string; dryRun?: boolean; json?: boolean }) => {
      const store = await openCliStore(o, 'open');
      const r = await store.gc({ dryRun: o.dryRun === true, log: logTo(o.json === true), signal: parse.signal() });
      if (o.json) {
        console.log(JSON.stringify(r, null, 2));
        return;
      }
      const verb = r.dryRun ? 'would be' : 'were';
      const deleted = r.finalized.reduce((n, c) => n + c.deleted, 0);
      const bytes = r.finalized.reduce((n, c) => n + c.bytes, 0);
      console.log(`${r.chunksMarked} chunks in use (named by ${r.indexes} indexes) of ${r.chunks} stored`);
      console.log(`${deleted} unused chunks (${formatBytes(bytes)}) ${verb} deleted; ${r.finalized.reduce((n, c) => n + c.restored, 0)} ${verb} brought back for backups that named them`);
      console.log(`${r.fossilized.chunks} unused chunks (${formatBytes(r.fossilized.bytes)}) ${verb} moved aside, to be deleted by a later run`);
      for (const p of r.pending) console.log(`collection ${p.collection} waits for ${p.waitingFor} running backup(s) before its chunks are deleted`);
      if (r.removedBackups.length > 0) console.log(`${r.removedBackups.length} incomplete backup folder(s) ${verb} removed: ${r.removedBackups.join(', ')}`);
      if (r.staleWriters.length > 0) console.log(`${r.staleWriters.length} record(s) of dead backups ${verb} removed`);
    });

  addStoreOptions(
    program
      .command('protect')
      .description('protect a backup from prune and delete (or lift that with --off)')
      .argument('<volid>', 'the backup'),
  )
    .option('--off', 'remove the protection')
    .action(async (volid: string, o: { store: string; off?: boolean }) => {
      const store = await openCliStore(o, 'open');
      await store.setProtected(store.volnameOf(volid), !o.off);
      console.log(`${store.volid(store.volnameOf(volid))}: ${o.off ? 'not protected' : 'protected'}`);
    });

  addStoreOptions(
    program
      .command('notes')
      .description("set a backup's notes (an empty text removes them)")
      .argument('<volid>', 'the backup')
      .argument('<text>', 'the notes'),
  ).action(async (volid: string, text: string, o: { store: string }) => {
      const store = await openCliStore(o, 'open');
      await store.setNotes(store.volnameOf(volid), text);
    });

  const key = program.command('key').description('keys of encrypted chunk stores');
  key
    .command('create')
    .description('create a key file (0600; never uploaded: keep a copy, every backup made with it needs it); with --store, create that chunk store encrypted with it')
    .argument('<path>', 'the new key file (an existing file is never overwritten)')
    .option('--store <url>', 's3://bucket/prefix: create this (new) store with the key')
    .option('--endpoint <url>', 'the S3 endpoint')
    .option('--region <name>', 'the region requests are signed for')
    .option('--path-style', 'path-style requests (the default)')
    .option('--no-path-style', 'virtual-hosted requests')
    .option('--ca-file <pem>', "certificate authorities to trust besides the system's")
    .option('--fingerprint <sha256>', 'trust exactly the endpoint certificate with this SHA-256 fingerprint (AB:CD:…), instead of CAs')
    .option('--credentials-file <file>', 'credentials in the AWS shared format (default: the environment)')
    .option('--json', 'print JSON')
    .action(async (file: string, o: Record<string, unknown>) => {
      const { createKeyFile } = await import('../chunk-provider/key.js');
      const keyFile = path.resolve(file);
      let open: ((withKey: boolean) => Promise<ChunkStore>) | undefined;
      if (o.store !== undefined) {
        if (!(o.store as string).startsWith('s3://')) throw usage('key create --store takes an s3:// store: directory stores are not encrypted');
        const { ChunkStore } = await import('../chunk-provider/store.js');
        open = async (withKey) => ChunkStore.open(await s3OptionsFromCli(o.store as string, { ...o, ...(withKey ? { keyFile } : {}) }));
        // a store's key is chosen when it is created: checked before a key file is made
        if ((await open(false)).exists) throw usage(`${o.store as string} exists already (it has a store.json): a store's key is chosen when it is created`);
      }
      const k = await createKeyFile(keyFile);
      if (open) await (await open(true)).ensureCreated();
      const created = open !== undefined;
      if (o.json) console.log(JSON.stringify({ keyFile, fingerprint: k.fingerprint, ...(created ? { store: o.store } : {}) }));
      else console.log(`created key ${keyFile} (fingerprint ${k.fingerprint})${created ? `; store ${o.store as string} is encrypted with it` : ''}: keep a copy in a safe place`);
    });
}

/**
 * The `pve-backup-provider` command line. Each command prints one clear line on failure (never a
 * stack trace) and exits with a documented code: 0 ok, 1 failed, 2 bad usage, 130 cancelled.
 */
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';

import { normaliseBandwidthLimit } from '../bandwidth.js';
import { PveBackupError } from '../errors.js';
import { packageVersion } from '../package-root.js';
import { BackupFailedError } from './errors.js';
import { NbdClient, listBitmaps } from '../nbd/client.js';
import { copyExtents } from '../nbd/copy.js';
import { addStoreCommands } from './store-commands.js';
import { addServeCommand } from './serve-command.js';
import { addProviderHostCommand } from './provider-host.js';
import { addPvePluginCommands } from './pve-plugin.js';
import { EXIT, formatBytes, printTable, progressView } from './output.js';

function parseSize(value: string): number {
  const m = /^(\d+(?:\.\d+)?)([KMGT]i?)?B?(?:\/s)?$/i.exec(value.trim());
  if (!m) throw new InvalidArgumentError(`not a size: ${value} (e.g. 1048576, 64K, 100M)`);
  const scale = { K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[(m[2] ?? '').charAt(0).toUpperCase()] ?? 1;
  return Math.round(Number(m[1]) * scale);
}

/** `--bwlimit`: a size; 0 means no limit, decided here once ({@link normaliseBandwidthLimit}). */
function parseBandwidth(value: string): number | undefined {
  return normaliseBandwidthLimit(parseSize(value), '--bwlimit');
}

function parseCount(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError(`not a positive whole number: ${value}`);
  return n;
}

function parseSeconds(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || n < 0) throw new InvalidArgumentError(`not a number of seconds: ${value} (0: no limit)`);
  return n;
}

/** Ctrl-C cancels the running operation instead of killing the process mid-write. */
function interruptSignal(): AbortSignal {
  const controller = new AbortController();
  const onSignal = (): void => controller.abort();
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  return controller.signal;
}

export function buildProgram(): Command {
  const program = new Command()
    .name('pve-backup-provider')
    .description('Proxmox VE backup provider toolkit: NBD backup access, copies, a directory backup store')
    .version(packageVersion(), '-V, --version')
    .showHelpAfterError()
    // set before the subcommands are added so that they inherit it
    .exitOverride();

  program
    .command('info')
    .description('show an NBD export: size, flags, block sizes, meta contexts, dirty bitmaps')
    .argument('<uri>', 'NBD URI, e.g. nbd+unix:///drive0?socket=/run/qsd.sock')
    .option('--json', 'print JSON')
    .action(async (uri: string, opts: { json?: boolean }) => {
      // Connect first: a bad socket fails here with its own error, not as empty lists below.
      const client = await NbdClient.connect(uri);
      const info = client.info;
      await client.close();
      const [contexts, bitmaps] = await Promise.all([NbdClient.listMetaContexts(uri, []).catch(() => []), listBitmaps(uri).catch(() => [])]);
      if (opts.json) {
        // `size` must print exactly, also above 2^53 where a JS number is rounded: stringify a
        // placeholder and put the decimal digits in its place.
        const { sizeExact, ...rest } = info;
        const placeholder = '\u0000size\u0000';
        const text = JSON.stringify({ ...rest, size: placeholder, availableMetaContexts: contexts, bitmaps }, null, 2);
        console.log(text.replace(JSON.stringify(placeholder), sizeExact));
        return;
      }
      const flags = ['readOnly', 'canFlush', 'canTrim', 'canWriteZeroes', 'canFastZero', 'canMultiConn', 'structuredReplies', 'extendedHeaders'] as const;
      printTable([
        ['export', info.name || '(default)'],
        ['size', `${info.sizeExact} (${formatBytes(info.size)})`],
        ['flags', flags.filter((f) => info[f]).join(' ') || '-'],
        ['block sizes', `min ${info.blockSizes.minimum}, preferred ${info.blockSizes.preferred}, max ${info.blockSizes.maximum}`],
        ['meta contexts', contexts.join(' ') || '-'],
        ['dirty bitmaps', bitmaps.join(' ') || '-'],
      ]);
    });

  program
    .command('copy')
    .description("copy an export's dirty extents (or the whole disk) to a sparse raw or qcow2 image")
    .argument('<uri>', 'NBD URI of the export')
    .argument('<target>', "image to write ('-' or /dev/null: read and discard)")
    .addOption(new Option('--format <format>', 'image format of the target').choices(['raw', 'qcow2']).default('raw'))
    .option('--backing <file>', 'qcow2: the image this one is an increment of (relative to the target\'s folder)')
    .addOption(new Option('--compression <kind>', 'qcow2: compress clusters').choices(['none', 'zstd', 'zlib']))
    .option('--bitmap <name>', 'read only the dirty extents of this bitmap')
    .option('--existing', 'write into an existing image at the same offsets (incremental), in place: a failed copy leaves it half updated')
    .option('--discard', 'TRIM each range on the export once written: only for a fleecing snapshot, it destroys the data')
    .option('--no-discard', 'never TRIM the export (the default)')
    .option('--bwlimit <bytes>', 'bandwidth limit in bytes/s (K, M, G suffixes)', parseBandwidth)
    .option('--connections <n>', 'connections when the server allows several', parseCount)
    .option('--requests <n>', 'requests in flight', parseCount)
    .option('--max-request <bytes>', 'largest single read', parseSize)
    .option('--cluster-size <bytes>', 'copy-before-write cluster size for alignment', parseSize)
    .option('--timeout <seconds>', 'fail when the server leaves a request unanswered this long (0: never)', parseSeconds, 300)
    .option('--json', 'print the summary as JSON, no progress bar')
    .action(async (uri: string, target: string, opts: Record<string, unknown>) => {
      const json = opts.json === true;
      const view = progressView('copy', !json);
      const toNull = target === '-' || target === '/dev/null';
      const summary = await copyExtents({
        uri,
        target: toNull ? 'null' : (opts.format as 'raw' | 'qcow2'),
        path: toNull ? undefined : target,
        backingFile: opts.backing as string | undefined,
        compression: opts.compression as 'none' | 'zstd' | 'zlib' | undefined,
        existing: opts.existing === true,
        bitmap: opts.bitmap as string | undefined,
        discard: opts.discard === true,
        bandwidthLimit: opts.bwlimit as number | undefined,
        connections: opts.connections as number | undefined,
        requests: opts.requests as number | undefined,
        maxRequest: opts.maxRequest as number | undefined,
        clusterSize: opts.clusterSize as number | undefined,
        requestTimeoutMs: Math.round((opts.timeout as number) * 1000),
        onProgress: (p) => view.update(p.done, p.total, p.bytesPerSecond),
        signal: interruptSignal(),
      }).finally(() => view.stop());
      if (json) {
        console.log(JSON.stringify(summary));
        return;
      }
      const rate = summary.seconds > 0 ? summary.bytesRead / summary.seconds : 0;
      console.log(
        `copied ${formatBytes(summary.bytesRead)} of ${formatBytes(summary.bytesTotal)} in ${summary.seconds.toFixed(2)} s ` +
          `(${formatBytes(rate)}/s): ${summary.extents} extents, ${formatBytes(summary.bytesZero)} zero, ` +
          `${formatBytes(summary.bytesSkipped)} skipped, ${formatBytes(summary.bytesTrimmed)} discarded`,
      );
    });

  addStoreCommands(program, { size: parseSize, bandwidth: parseBandwidth, count: parseCount, signal: interruptSignal });
  addServeCommand(program, { size: parseSize, bandwidth: parseBandwidth, count: parseCount, signal: interruptSignal });

  program
    .command('recover')
    .description('remove the backup access (nodes, exports, bitmaps, fleecing images) and temporary folders a killed backup left')
    .requiredOption('--qmp <socket>', "the VM's (or qemu-storage-daemon's) QMP socket")
    .option('--force', 'also remove an access whose owner process still runs')
    .option('--json', 'print what was removed as JSON')
    .action(async (opts: { qmp: string; force?: boolean; json?: boolean }) => {
      const [{ QmpClient }, { recoverBackupAccess }, { removeStaleGuestDirs }] = await Promise.all([
        import('../qmp/client.js'),
        import('../qemu/backup-access.js'),
        import('../job/runner.js'),
      ]);
      const qmp = await QmpClient.connect(opts.qmp, { timeoutMs: 10_000 });
      let removed: string[];
      try {
        removed = await recoverBackupAccess(qmp, { force: opts.force === true });
      } finally {
        await qmp.close().catch(() => undefined);
      }
      removed.push(...(await removeStaleGuestDirs()).map((d) => `folder ${d}`));
      if (opts.json) console.log(JSON.stringify({ removed }));
      else console.log(removed.length === 0 ? 'nothing to recover' : removed.map((r) => `removed ${r}`).join('\n'));
    });

  addProviderHostCommand(program);
  addPvePluginCommands(program);

  program
    .command('demo')
    .description('back up a qemu-storage-daemon disk while a guest writes: full, then incremental, each checked byte for byte')
    .option('--size <bytes>', 'disk size (K, M, G suffixes)', parseSize, 512 * 2 ** 20)
    .option('--keep', "keep the demo's folder")
    .option('--json', 'print JSON, no progress bars')
    .action(async (opts: { size: number; keep?: boolean; json?: boolean }) => {
      const { printDemo, runDemo } = await import('./demo.js'); // loaded only for the demo
      const phases = await runDemo({ size: opts.size, keep: opts.keep, json: opts.json });
      if (opts.json) console.log(JSON.stringify(phases, null, 2));
      else printDemo(phases);
    });

  return program;
}

/** Runs the command line; resolves to the exit code. */
export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return EXIT.ok;
  } catch (err) {
    if (err instanceof CommanderError) {
      // commander already printed the problem (or the help text)
      return err.exitCode === 0 ? EXIT.ok : EXIT.usage;
    }
    // a failed guest backup reports its cause's code: that one tells the operator what to do
    const code = err instanceof BackupFailedError ? (err.causeCode ?? err.code) : err instanceof PveBackupError ? err.code : undefined;
    if (code === 'ERR_USAGE') {
      console.error(`pve-backup-provider: ${(err as Error).message}`);
      return EXIT.usage;
    }
    if (code === 'ERR_CANCELLED') {
      console.error('pve-backup-provider: cancelled');
      return EXIT.cancelled;
    }
    const message = err instanceof Error ? err.message : String(err);
    console.error(`pve-backup-provider: ${message}${code ? ` [${code}]` : ''}`);
    return EXIT.failed;
  }
}

/**
 * `pve-backup-provider serve VOLID --socket PATH --store s3://…`: the disks of a chunk-store
 * backup as read-only NBD exports (one per disk, named by its device) until SIGINT or SIGTERM,
 * for mounting (`nbdfuse`, `qemu-nbd --connect` where a kernel NBD device exists), file-level
 * restore (`guestfish --ro -a URI`) or a live restore (QEMU reading the export as a backing
 * image). Prints each export's URI, or one JSON line with `--json`.
 */
import path from 'node:path';

import type { Command } from 'commander';

import type { Parsers } from './store-commands.js';
import { UsageError } from './errors.js';
import { addStoreOptions, s3OptionsFromCli } from './stores.js';

export function addServeCommand(program: Command, parse: Parsers): void {
  addStoreOptions(
    program
      .command('serve')
      .description('serve the disks of a backup read-only over NBD (one export per disk) until SIGINT/SIGTERM: chunk stores (s3://)')
      .argument('<volid>', 'the backup, e.g. chunks:backup/100/qemu-2026_12_01-02_00_00'),
  )
    .requiredOption('--socket <path>', 'the unix socket to listen on (created 0600; an existing file is refused)')
    .option('--device <name>', 'only this disk (default: every disk of the backup)')
    .option('--json', 'print the exports as one JSON line')
    .action(async (volid: string, o: Record<string, unknown>) => {
      const url = o.store as string;
      const { isS3Url } = await import('../chunk-provider/s3.js');
      if (!isS3Url(url)) {
        throw new UsageError(
          `serve needs a chunk store (s3://bucket/prefix); ${url} is a directory store, whose disks are qcow2 images: serve one with qemu-nbd --read-only --socket PATH <its image in the backup's folder>`,
        );
      }
      const [{ ChunkStore }, { serveBackup }] = await Promise.all([import('../chunk-provider/store.js'), import('../chunk-provider/nbd-server.js')]);
      const store = await ChunkStore.open(await s3OptionsFromCli(url, o));
      // the URL names the store; a chunk store records no storage id, so any prefix is taken
      const volname = store.parseVolname(volid.includes(':') ? volid.slice(volid.indexOf(':') + 1) : volid).volname;
      const socket = path.resolve(o.socket as string);
      const signal = parse.signal();
      const server = await serveBackup(store, volname, {
        socket,
        ...(o.device ? { devices: [o.device as string] } : {}),
        // a failed read: the client got EIO; the operator learns which chunk
        onError: (message) => process.stderr.write(`ERROR: ${message}\n`),
      });
      const exports = server.exports.map((name) => ({ name, uri: server.uri(name) }));
      if (o.json) console.log(JSON.stringify({ volid: store.volid(volname), socket, exports }));
      else {
        for (const e of exports) console.log(`${e.name}: ${e.uri}`);
        process.stderr.write('serving read-only until SIGINT (Ctrl-C) or SIGTERM\n');
      }
      // nothing else keeps the event loop alive while the core serves
      const alive = setInterval(() => undefined, 1 << 30);
      try {
        if (!signal.aborted) await new Promise((resolve) => signal.addEventListener('abort', resolve, { once: true }));
      } finally {
        clearInterval(alive);
        await server.stop();
      }
    });
}

/**
 * `pve-backup-provider serve VOLID --socket PATH --store …`: the disks of a VM backup as
 * read-only NBD exports (one per disk, named by its device) until SIGINT or SIGTERM, for
 * mounting (`nbdfuse`), file-level restore (`guestfish --ro -a URI`) or a live restore (QEMU
 * reading the export as a backing image). A chunk store's disks are served by the native core
 * from their chunks; a directory store's qcow2 chains by qemu-storage-daemon's NBD server, after
 * their images are checked against the manifest. Prints each export's URI, or one JSON line
 * with `--json`.
 */
import path from 'node:path';

import type { Command } from 'commander';

import type { Parsers } from './store-commands.js';
import { UsageError } from './errors.js';
import { addStoreOptions, s3OptionsFromCli } from './stores.js';

/** A backup's disks being served. */
interface Served {
  volid: string;
  exports: Array<{ name: string; uri: string }>;
  stop(): Promise<void>;
}

export function addServeCommand(program: Command, parse: Parsers): void {
  addStoreOptions(
    program
      .command('serve')
      .description('serve the disks of a VM backup read-only over NBD (one export per disk) until SIGINT/SIGTERM')
      .argument('<volid>', 'the backup, e.g. chunks:backup/100/qemu-2026_12_01-02_00_00'),
  )
    .requiredOption('--socket <path>', 'the unix socket to listen on (created 0600; an existing file is refused)')
    .option('--device <name>', 'only this disk (default: every disk of the backup)')
    .option('--json', 'print the exports as one JSON line')
    .action(async (volid: string, o: Record<string, unknown>) => {
      const { isS3Url } = await import('../chunk-provider/s3.js');
      const socket = path.resolve(o.socket as string);
      const devices = o.device ? [o.device as string] : undefined;
      const signal = parse.signal();
      const served = isS3Url(o.store as string) ? await serveChunks(volid, o, socket, devices) : await serveDirectory(volid, o, socket, devices);
      if (o.json) console.log(JSON.stringify({ volid: served.volid, socket, exports: served.exports }));
      else {
        for (const e of served.exports) console.log(`${e.name}: ${e.uri}`);
        process.stderr.write('serving read-only until SIGINT (Ctrl-C) or SIGTERM\n');
      }
      // nothing else keeps the event loop alive while the server runs
      const alive = setInterval(() => undefined, 1 << 30);
      try {
        if (!signal.aborted) await new Promise((resolve) => signal.addEventListener('abort', resolve, { once: true }));
      } finally {
        clearInterval(alive);
        await served.stop();
      }
    });
}

/** A chunk store's backup, from its chunks (the native server). */
async function serveChunks(volid: string, o: Record<string, unknown>, socket: string, devices: string[] | undefined): Promise<Served> {
  const [{ ChunkStore }, { serveBackup }] = await Promise.all([import('../chunk-provider/store.js'), import('../chunk-provider/nbd-server.js')]);
  const store = await ChunkStore.open(await s3OptionsFromCli(o.store as string, o));
  // the URL names the store; a chunk store records no storage id, so any prefix is taken
  const volname = store.parseVolname(volid.includes(':') ? volid.slice(volid.indexOf(':') + 1) : volid).volname;
  const server = await serveBackup(store, volname, {
    socket,
    ...(devices ? { devices } : {}),
    // a failed read: the client got EIO; the operator learns which chunk
    onError: (message) => process.stderr.write(`ERROR: ${message}\n`),
  });
  return { volid: store.volid(volname), exports: server.exports.map((name) => ({ name, uri: server.uri(name) })), stop: () => server.stop() };
}

/** A directory store's backup: its qcow2 chains, checked first, through qemu-storage-daemon. */
async function serveDirectory(volid: string, o: Record<string, unknown>, socket: string, devices: string[] | undefined): Promise<Served> {
  const s3Only = ['endpoint', 'region', 'caFile', 'keyFile', 'credentialsFile'].find((k) => o[k] !== undefined);
  if (s3Only) throw new UsageError(`--${s3Only.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} is for s3:// stores; ${o.store as string} is a folder`);
  const [{ DirectoryStore }, { DirectoryStoreError }, { startNbdImageExports }, { nbdUnixUri }] = await Promise.all([
    import('../directory-provider/store.js'),
    import('../directory-provider/errors.js'),
    import('../qemu/storage-daemon.js'),
    import('../vocabulary.js'),
  ]);
  const store = await DirectoryStore.open(o.store as string);
  const volname = store.volnameOf(volid);
  const disks = (await store.readManifest(volname)).devices ?? {};
  if (Object.keys(disks).length === 0) throw new DirectoryStoreError('ERR_UNKNOWN_VOLUME', `backup ${store.volid(volname)} is a container backup: it has no disks to serve`, { volname });
  const names = devices ?? Object.keys(disks);
  for (const device of names) {
    if (!disks[device]) throw new DirectoryStoreError('ERR_UNKNOWN_VOLUME', `backup ${store.volid(volname)} has no disk ${device} (it has ${Object.keys(disks).join(', ')})`, { volname });
    // qemu-storage-daemon checks nothing it reads: the chain is checked against its digests first
    await store.assertDeviceImages(volname, device);
  }
  const server = await startNbdImageExports(
    names.map((name) => ({ name, image: path.join(store.backupDir(volname), disks[name]!.file), format: 'qcow2' as const })),
    socket,
  );
  return { volid: store.volid(volname), exports: names.map((name) => ({ name, uri: nbdUnixUri(name, socket) })), stop: () => server.stop() };
}

/**
 * The disks of one chunk-store backup as read-only NBD exports, served by the native core from
 * their chunks (docs/chunk-store.md, "The NBD server"): one export per disk, named by its device
 * (`drive-scsi0`), on a private unix socket. What `pve-backup-provider serve` runs, and what
 * Proxmox VE's restore path reads through (the chunk provider's `restoreVmVolumeInit` puts a
 * FUSE file on top). Reads are checked chunk by chunk against their digests: a damaged or missing
 * chunk is an I/O error (EIO) for the reads touching it, reported through `onError` naming the
 * chunk, never wrong bytes.
 *
 * @packageDocumentation
 */
import { native, type Binding } from '../native.js';
import { nbdUnixUri } from '../vocabulary.js';
import { ChunkBackupError, fromNative } from './errors.js';
import type { ChunkStore } from './store.js';

/** Options of {@link serveBackup}. */
export interface ServeBackupOptions {
  /** The unix socket to create (mode 0600); an existing file there is an error, never replaced. */
  socket: string;
  /** The disks to serve (default: every disk of the backup). */
  devices?: string[];
  /** Told what failed each time a read fails (the client gets EIO): the message names the chunk. */
  onError?: (message: string) => void;
  /** Decoded chunks (4 MiB each) cached per disk; default 8. */
  cacheChunks?: number;
  /** Chunks fetched at once per disk; default 4. */
  fetches?: number;
}

/** A running NBD server of a backup's disks. */
export interface ChunkNbdServer {
  readonly socket: string;
  /** The exports, one per disk: the device names. */
  readonly exports: readonly string[];
  /** `nbd+unix:///<export>?socket=<socket>` of one export. */
  uri(exportName: string): string;
  /** Ends every connection and removes the socket; safe to call twice. */
  stop(): Promise<void>;
}

/**
 * Serves the disks of the VM backup `volname`. Checks first what a restore checks: the key
 * (before anything of the backup is read), the manifest, and each disk's index against it
 * (`ERR_BACKUP_CORRUPT`), so that a damaged backup fails here rather than on the first read.
 * @throws {@link ChunkBackupError} `ERR_UNKNOWN_VOLUME` for an unknown backup or disk, or a
 *   container backup (no disks).
 */
export async function serveBackup(store: ChunkStore, volname: string, o: ServeBackupOptions): Promise<ChunkNbdServer> {
  await store.assertKey();
  const m = await store.readManifest(volname, { needKey: true });
  const disks = m.devices ?? {};
  if (m.vmtype !== 'qemu' || Object.keys(disks).length === 0) {
    throw new ChunkBackupError('ERR_UNKNOWN_VOLUME', `backup ${store.volid(volname)} is a container backup: it has no disks to serve`, { volname });
  }
  const devices = o.devices ?? Object.keys(disks);
  for (const device of devices) {
    if (!disks[device]) throw new ChunkBackupError('ERR_UNKNOWN_VOLUME', `backup ${store.volid(volname)} has no disk ${device} (it has ${Object.keys(disks).join(', ')})`, { volname });
    // the index as the manifest records it, whole and sound
    await store.readFixedIndex(m, device);
  }
  const onError = o.onError;
  let inner: Binding.NativeNbdServer;
  try {
    inner = await native.startChunkNbdServer(
      {
        store: store.options,
        ...(store.fingerprint ? { storeFingerprint: store.fingerprint } : {}),
        socket: o.socket,
        exports: devices.map((name) => ({ name, indexKey: store.objectKey(volname, disks[name]!.index) })),
        ...(o.cacheChunks !== undefined ? { cacheChunks: o.cacheChunks } : {}),
        ...(o.fetches !== undefined ? { fetches: o.fetches } : {}),
      },
      // called on the JavaScript thread, where a throw would end the process: it is swallowed
      onError
        ? (message: string): void => {
            try {
              onError(message);
            } catch {
              /* the log failed: the client still got its EIO */
            }
          }
        : undefined,
    );
  } catch (err) {
    throw fromNative(err);
  }
  let stopped: Promise<void> | undefined;
  return {
    socket: o.socket,
    exports: devices,
    uri: (exportName) => nbdUnixUri(exportName, o.socket),
    stop: () => (stopped ??= inner.stop().catch((err: unknown) => Promise.reject(fromNative(err)))),
  };
}

/**
 * The host's record of which backup last handed QEMU's dirty bitmap a success.
 *
 * QEMU keeps one bitmap per guest and storage id (`snapshot-access:<storeid>`, qemu-server's
 * naming) and clears it whenever a backup that used it is torn down as successful. An incremental
 * backup is right only if the bitmap was cleared last by the backup it builds on. Two things can
 * break that without the store noticing: another store with the same storage id backing up the
 * same guest, and a crash after QEMU was told success but before the store recorded the new backup.
 * Both are caught by writing, before any backup that may tell QEMU success, which backup that is,
 * here: outside every store, so that all stores of the host see it. The next backup is incremental
 * only when this record names exactly the store and backup it builds on.
 *
 * The record must be seen wherever the bitmap goes. QEMU's bitmap goes with the guest: a live
 * migration carries it (qemu-server enables the `dirty-bitmaps` migration capability when pve-qemu
 * reports `pbs-dirty-bitmap-migration`, `QemuMigrate/Helpers.pm`), and a backup on the other node
 * clears it. With a record on each node, a guest backed up on node A, then on node B, then on A
 * again would get an incremental over A's own older backup holding only the writes since B's:
 * a restore without the writes in between, and no error (when each node has its own store under
 * one storage id; a shared store shows B's backup as the newest and catches it). So on a Proxmox
 * VE node the records live in the cluster file system, the same files on every node.
 *
 * Layout: `<stateDir>/bitmaps/<storeid>/<vmid>.json` = `{ store, volname }`; folders 0700, files 0600.
 * `stateDir` is `$PVE_BACKUP_PROVIDER_STATE_DIR`, else, as root, `/etc/pve/priv/pve-backup-provider`
 * where `/etc/pve` is Proxmox VE's cluster file system (pmxcfs; `priv/` is root's alone there, and
 * it takes a 0600 file's `fchmod`, an atomic rename and `fsync`) or `/var/lib/pve-backup-provider`;
 * as another user `$XDG_STATE_HOME/pve-backup-provider` (`~/.local/state`). A persistent place on
 * purpose: QEMU keeps bitmaps of qcow2 disks across restarts.
 *
 * @packageDocumentation
 */
import { readFileSync } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { writeFileAtomic } from './files.js';

/** Who last may have told QEMU success for a guest's bitmap: a store and a backup in it. */
export interface BitmapOwner {
  /** The store: a directory store's absolute path, a chunk store's `s3://bucket/prefix` URL with its endpoint. */
  store: string;
  /** Volume name of the backup. */
  volname: string;
}

/** Where Proxmox VE's cluster file system is mounted. */
const PVE_CLUSTER_FS = '/etc/pve';

/** Whether the mount table `mounts` (`/proc/self/mounts`) has Proxmox VE's cluster file system (pmxcfs, a FUSE mount) at `/etc/pve`. */
export function hasPveClusterFs(mounts: string): boolean {
  return mounts.split('\n').some((line) => {
    const [, mountPoint, type] = line.split(' ');
    return mountPoint === PVE_CLUSTER_FS && type === 'fuse';
  });
}

/** `/proc/self/mounts`, or nothing where it cannot be read. */
function readMountTable(): string {
  try {
    return readFileSync('/proc/self/mounts', 'utf8');
  } catch {
    return '';
  }
}

/**
 * The default state folder (see the module documentation).
 * @param mounts - The mount table (default: `/proc/self/mounts`).
 */
export function defaultStateDir(mounts?: string): string {
  const env = process.env['PVE_BACKUP_PROVIDER_STATE_DIR'];
  if (env) return path.resolve(env);
  if (process.getuid?.() === 0) {
    const table = mounts ?? readMountTable();
    return hasPveClusterFs(table) ? path.join(PVE_CLUSTER_FS, 'priv', 'pve-backup-provider') : '/var/lib/pve-backup-provider';
  }
  return path.join(process.env['XDG_STATE_HOME'] ?? path.join(os.homedir(), '.local', 'state'), 'pve-backup-provider');
}

/** Reads and writes the records of one storage id. */
export class BitmapLedger {
  private readonly dir: string;

  /**
   * @param storeid - Storage id: QEMU's bitmap is named after it.
   * @param stateDir - State folder (default {@link defaultStateDir}).
   */
  constructor(storeid: string, stateDir: string = defaultStateDir()) {
    this.dir = path.join(stateDir, 'bitmaps', storeid);
  }

  private file(vmid: number): string {
    return path.join(this.dir, `${vmid}.json`);
  }

  /** The record of a guest; `undefined` when there is none or it cannot be read (then nothing is trusted). */
  async read(vmid: number): Promise<BitmapOwner | undefined> {
    try {
      const o = JSON.parse(await readFile(this.file(vmid), 'utf8')) as Partial<BitmapOwner>;
      return typeof o.store === 'string' && typeof o.volname === 'string' ? { store: o.store, volname: o.volname } : undefined;
    } catch {
      return undefined;
    }
  }

  /** Records (durably) that `owner` may tell QEMU success for the guest's bitmap. */
  async write(vmid: number, owner: BitmapOwner): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    await writeFileAtomic(this.file(vmid), `${JSON.stringify(owner)}\n`);
  }
}

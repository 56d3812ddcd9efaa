/**
 * Runs qemu-storage-daemon on disk images: the QEMU that backs up a disk when no VM runs it (a
 * stopped guest, the demo, benchmarks). Each disk becomes a node stack `<id>-file` -> `<id>-fmt`
 * -> `<id>` (raw on top, the node to back up); QMP and an NBD server listen on private sockets.
 * It also serves stored images read-only for restores: as a raw FUSE file (`startFuseExport`,
 * Proxmox VE's restore path) or as NBD exports (`startNbdImageExports`, `serve`).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { chmod, link, mkdtemp, open, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';

import { InvalidArgumentError } from '../errors.js';
import { QemuStartError } from './errors.js';
import { QmpClient } from '../qmp/client.js';
import { QmpClosedError } from '../qmp/errors.js';
import { currentOwner, ownerIsDead } from '../owner.js';
import { requireTool, tiedToParent } from '../tools.js';
import { nbdUnixUri } from '../vocabulary.js';

/** One disk image served by the daemon. */
export interface StorageDaemonDisk {
  /** Node name of the disk's top node; `[A-Za-z][A-Za-z0-9_-]*`. */
  id: string;
  /** The image file (with `nbdSocket`: only its name in messages). */
  file: string;
  format: 'qcow2' | 'raw';
  /** Bypass the host page cache (O_DIRECT), as Proxmox's default `cache=none` does; default false. */
  direct?: boolean;
  /** Read the image over NBD from this unix socket instead of opening `file` (storage elsewhere). */
  nbdSocket?: string;
}

export interface StorageDaemonOptions {
  /** Folder for the sockets and the log; must exist. */
  dir: string;
  disks: StorageDaemonDisk[];
  /** Export each disk writable over NBD as `live-<id>` (to write "guest" data); default false. */
  liveExports?: boolean;
}

/** A running qemu-storage-daemon. */
export interface StorageDaemon {
  qmp: QmpClient;
  qmpSocket: string;
  /** The daemon's NBD server socket (backup access adds its exports to this server). */
  nbdSocket: string;
  /** URI of a disk's writable live export (with `liveExports`). */
  liveUri(id: string): string;
  /** Quits the daemon (QMP `quit`, then SIGKILL after 5 s). */
  stop(): Promise<void>;
}

const ID_RE = /^[A-Za-z][A-Za-z0-9_-]{0,30}$/;

/**
 * Connects to the QMP socket of a QEMU process that is starting: waits for the socket to appear
 * and to accept (QEMU binds it before it listens, so a connect in between is refused), failing
 * with QEMU's log when the process exits first.
 */
export async function connectStartingQemu(path: string, child: ChildProcess, log: string, what = 'qemu-storage-daemon'): Promise<QmpClient> {
  const deadline = Date.now() + 20_000;
  // QEMU tells nothing when its socket listens: look again soon (a start-up takes tens of ms, so
  // a fixed 25 ms step cost half a step on average), then less and less often.
  let step = 1;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      const text = await readFile(log, 'utf8').catch(() => '');
      throw new QemuStartError(what, `${what} exited early: ${text.trim()}`);
    }
    if (await stat(path).then((s) => s.isSocket(), () => false)) {
      try {
        return await QmpClient.connect(path);
      } catch (err) {
        if (!(err instanceof QmpClosedError) || Date.now() > deadline) throw err;
      }
    }
    if (Date.now() > deadline) throw new QemuStartError(what, `${what} did not open ${path} within 20 s`);
    await sleep(step);
    step = Math.min(25, step * 1.5);
  }
}

/** Starts qemu-storage-daemon with QMP and an NBD server on unix sockets in `dir`. */
export async function startStorageDaemon(options: StorageDaemonOptions): Promise<StorageDaemon> {
  const binary = requireTool('qemu-storage-daemon', 'qemu-system-common');
  const qmpSocket = join(options.dir, 'qmp.sock');
  const nbdSocket = join(options.dir, 'nbd.sock');
  const args: string[] = [];
  for (const disk of options.disks) {
    if (!ID_RE.test(disk.id)) throw new InvalidArgumentError(`invalid disk id ${JSON.stringify(disk.id)}`);
    // QEMU's option syntax separates keys with commas: a comma in a path is written twice
    const quote = (path: string): string => path.replaceAll(',', ',,');
    const fileNode = disk.nbdSocket
      ? `driver=nbd,server.type=unix,server.path=${quote(disk.nbdSocket)}`
      : `driver=file,filename=${quote(disk.file)},aio=threads`;
    args.push('--blockdev', `${fileNode},node-name=${disk.id}-file${disk.direct ? ',cache.direct=on' : ''}`);
    args.push('--blockdev', `driver=${disk.format},file=${disk.id}-file,node-name=${disk.id}-fmt`);
    args.push('--blockdev', `driver=raw,file=${disk.id}-fmt,node-name=${disk.id}`);
  }
  args.push('--chardev', `socket,path=${qmpSocket},server=on,wait=off,id=qmp0`, '--monitor', 'chardev=qmp0');
  args.push('--nbd-server', `addr.type=unix,addr.path=${nbdSocket},max-connections=0`);
  if (options.liveExports) {
    for (const disk of options.disks) {
      args.push('--export', `type=nbd,id=live-${disk.id},node-name=${disk.id},name=live-${disk.id},writable=on`);
    }
  }
  const log = join(options.dir, 'qemu-storage-daemon.log');
  const out = await open(log, 'w');
  // dies with this process, even by SIGKILL: an orphan would keep the stopped VM's images locked
  const cmd = tiedToParent(binary, args);
  const child = spawn(cmd.file, cmd.args, { stdio: ['ignore', out.fd, out.fd] });
  await out.close();
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const kill = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  };
  try {
    const qmp = await connectStartingQemu(qmpSocket, child, log);
    return {
      qmp,
      qmpSocket,
      nbdSocket,
      liveUri: (id) => `nbd+unix:///live-${id}?socket=${nbdSocket}`,
      stop: async () => {
        await qmp.execute('quit').catch(() => undefined);
        await qmp.close().catch(() => undefined);
        const timer = setTimeout(() => void kill(), 5000);
        await exited;
        clearTimeout(timer);
      },
    };
  } catch (err) {
    await kill();
    throw err;
  }
}

/** A disk image served read-only as a raw regular file by qemu-storage-daemon's FUSE export. */
export interface FuseExport {
  /** The raw file: `stat()`s as a regular file of the image's virtual size; `qemu-img info -f raw` shows no backing file. */
  path: string;
  /** Unmounts, ends the daemon and removes the private folder; safe to call twice. */
  stop(): Promise<void>;
}

const FUSE_PREFIX = 'pve-restore-';
const FUSE_OWNER = 'owner.json';

/**
 * Removes the folders of FUSE exports whose process died without cleaning up (SIGKILL: the
 * daemon unmounts on its way out, but the folder stays). A folder without an owner file is being
 * set up, and one still mounted is still being torn down: both are left alone.
 */
async function sweepDeadExports(base: string): Promise<void> {
  const names = await readdir(base).catch(() => [] as string[]);
  for (const name of names.filter((n) => n.startsWith(FUSE_PREFIX))) {
    const dir = join(base, name);
    const owner = await readFile(join(dir, FUSE_OWNER), 'utf8').then(
      (t) => {
        try {
          return JSON.parse(t) as unknown;
        } catch {
          return undefined;
        }
      },
      () => undefined,
    );
    if (owner === undefined || !ownerIsDead(owner) || (await isMountPoint(join(dir, 'disk.raw')))) continue;
    await rm(dir, { recursive: true, force: true }).catch(() => undefined);
  }
}

/** Whether `path` is a mount point of this mount namespace (`/proc/self/mountinfo`, field 5). */
export async function isMountPoint(path: string): Promise<boolean> {
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  // mountinfo escapes space, tab, newline and backslash as octal
  const escaped = path.replace(/[ \t\n\\]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, '0')}`);
  return text.split('\n').some((line) => line.split(' ')[4] === escaped);
}

/** What a FUSE export serves: an image file (with its backing chain), or an export of an NBD server on a unix socket. */
export type FuseImage = string | { nbdSocket: string; export: string };

/**
 * Serves `image` (with its backing chain, or an NBD export) as a raw regular file, for a consumer that accepts only
 * a local file: qemu-server's `restore_vm_volume_init` check `file_size_info($path, undef, 'raw', 1)`
 * (pve-storage `src/PVE/Storage/Plugin.pm` `file_size_info`: stat, no directory, `qemu-img info -f raw`
 * without a backing file) rejects `json:` and NBD paths. The mount point is a file in a private
 * (0700) folder. The daemon gets SIGTERM when this process dies, even by SIGKILL
 * (`PR_SET_PDEATHSIG`): on SIGTERM qemu-storage-daemon unmounts before it exits (a SIGKILLed FUSE
 * daemon would leave a dead mount behind). The folder of an export whose process died that way is
 * removed by the next export started in the same place (its `owner.json` names the dead process).
 */
export async function startFuseExport(image: FuseImage, format: 'qcow2' | 'raw', options: { dir?: string } = {}): Promise<FuseExport> {
  const binary = requireTool('qemu-storage-daemon', 'qemu-system-common');
  if (!(await stat('/dev/fuse').then(() => true, () => false))) {
    throw new QemuStartError('qemu-storage-daemon', 'no /dev/fuse: load the fuse module (modprobe fuse) or give the container the device; apt-get install fuse3');
  }
  const base = options.dir ?? tmpdir();
  await sweepDeadExports(base);
  const dir = await mkdtemp(join(base, FUSE_PREFIX)); // mkdtemp makes it 0700
  await writeFile(join(dir, FUSE_OWNER), JSON.stringify(currentOwner()), { mode: 0o600 });
  const path = join(dir, 'disk.raw');
  const log = join(dir, 'qemu-storage-daemon.log');
  await writeFile(path, '', { mode: 0o600 });
  const quote = (p: string): string => p.replaceAll(',', ',,');
  const source =
    typeof image === 'string'
      ? `driver=file,filename=${quote(image)},aio=threads`
      : `driver=nbd,server.type=unix,server.path=${quote(image.nbdSocket)},export=${quote(image.export)}`;
  const what = typeof image === 'string' ? image : nbdUnixUri(image.export, image.nbdSocket);
  const args = [
    '--blockdev', `${source},read-only=on,node-name=f`,
    '--blockdev', `driver=${format},file=f,read-only=on,node-name=fmt`,
    '--export', `type=fuse,id=e,node-name=fmt,mountpoint=${quote(path)},writable=off`,
  ];
  const cleanUp = async (): Promise<void> => {
    // a daemon that died without unmounting leaves a dead mount: detach it (we are root here)
    if (await isMountPoint(path)) await promisify(execFile)('umount', ['-l', path]).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  };
  let daemon: ServingDaemon;
  try {
    daemon = await startServingDaemon(binary, args, log, `mount ${what}`, () => isMountPoint(path));
  } catch (err) {
    await cleanUp();
    throw err;
  }
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> => (stopped ??= daemon.stop().then(cleanUp));
  return { path, stop };
}

/** A qemu-storage-daemon that serves something (a FUSE file, NBD exports). */
interface ServingDaemon {
  /** SIGTERM (the daemon unmounts and closes its sockets), SIGKILL after 5 s; waits for the exit. */
  stop(): Promise<void>;
}

/**
 * Starts qemu-storage-daemon with `args`, tied to this process (SIGTERM when it dies, even by
 * SIGKILL), its output in `log`, and waits until `ready()` (polled soon, then less and less
 * often, as {@link connectStartingQemu}); fails with the log when the daemon exits first, or
 * after 20 s.
 */
async function startServingDaemon(binary: string, args: string[], log: string, what: string, ready: () => Promise<boolean>): Promise<ServingDaemon> {
  const out = await open(log, 'w');
  const cmd = tiedToParent(binary, args, 'TERM');
  const child = spawn(cmd.file, cmd.args, { stdio: ['ignore', out.fd, out.fd] });
  await out.close();
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const stop = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    }
  };
  try {
    const deadline = Date.now() + 20_000;
    let step = 1;
    while (!(await ready())) {
      if (child.exitCode !== null || child.signalCode !== null) {
        const text = await readFile(log, 'utf8').catch(() => '');
        throw new QemuStartError('qemu-storage-daemon', `qemu-storage-daemon exited before it could ${what}: ${text.trim()}`);
      }
      if (Date.now() > deadline) throw new QemuStartError('qemu-storage-daemon', `qemu-storage-daemon did not ${what} within 20 s`);
      await sleep(step);
      step = Math.min(20, step * 1.5);
    }
    return { stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** One image served as a read-only NBD export by {@link startNbdImageExports}. */
export interface NbdImageExport {
  /** The export's name. */
  name: string;
  /** The image file (with its backing chain). */
  image: string;
  format: 'qcow2' | 'raw';
}

/** Read-only NBD exports of image files on a unix socket. */
export interface NbdImageServer {
  readonly socket: string;
  /** Ends the daemon (its socket goes with it); safe to call twice. */
  stop(): Promise<void>;
}

/**
 * Serves image files (qcow2 chains, raw) as read-only NBD exports on a new unix socket, with
 * qemu-storage-daemon's NBD server: a directory store's backups for `pve-backup-provider serve`.
 * An existing file at `socket` is refused (QEMU would unlink it). The daemon dies with this process.
 *
 * QEMU creates its socket with the umask's mode, and a chmod afterwards leaves a moment in which
 * another user may connect and read the guest's disks. So QEMU listens in a private (0700) folder
 * beside `socket`; the socket is made 0600 there and only then linked to `socket` (a link never
 * replaces a file), as the core's own NBD server does (native/src/nbd/server/mod.rs `bind`).
 */
export async function startNbdImageExports(exports: NbdImageExport[], socket: string): Promise<NbdImageServer> {
  const binary = requireTool('qemu-storage-daemon', 'qemu-system-common');
  if (exports.length === 0) throw new InvalidArgumentError('no image to export');
  if (await stat(socket).then(() => true, () => false)) throw new InvalidArgumentError(`${socket} exists: give a path where the socket can be created`);
  const quote = (p: string): string => p.replaceAll(',', ',,');
  const args: string[] = [];
  exports.forEach((e, i) => {
    args.push('--blockdev', `driver=file,filename=${quote(e.image)},aio=threads,read-only=on,node-name=f${i}`);
    args.push('--blockdev', `driver=${e.format},file=f${i},read-only=on,node-name=fmt${i}`);
  });
  // beside `socket`: the same file system, so the socket made inside can be linked to it
  const privateDir = await mkdtemp(join(dirname(socket), `.${basename(socket)}.`)); // 0700
  const inside = join(privateDir, 'socket');
  args.push('--nbd-server', `addr.type=unix,addr.path=${quote(inside)},max-connections=0`);
  exports.forEach((e, i) => args.push('--export', `type=nbd,id=e${i},node-name=fmt${i},name=${quote(e.name)},writable=off`));
  const dir = await mkdtemp(join(tmpdir(), 'pbp-nbd-')); // 0700, for the log
  let daemon: ServingDaemon;
  try {
    daemon = await startServingDaemon(binary, args, join(dir, 'qemu-storage-daemon.log'), `listen on ${socket}`, () => stat(inside).then((st) => st.isSocket(), () => false));
  } catch (err) {
    await rm(privateDir, { recursive: true, force: true });
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
  let stopped: Promise<void> | undefined;
  // QEMU leaves its socket behind: it was made for this server (nothing was there), so it goes
  const stop = (): Promise<void> =>
    (stopped ??= daemon.stop().then(async () => {
      await rm(socket, { force: true });
      await rm(dir, { recursive: true, force: true });
    }));
  try {
    await chmod(inside, 0o600);
    await link(inside, socket).catch((err: NodeJS.ErrnoException) => {
      throw err.code === 'EEXIST' ? new InvalidArgumentError(`${socket} exists: give a path where the socket can be created`) : err;
    });
  } catch (err) {
    // the socket at `socket` is not ours unless the link made it: only the daemon and the folder go
    stopped ??= daemon.stop().then(() => rm(dir, { recursive: true, force: true }));
    await stopped;
    throw err;
  } finally {
    await rm(privateDir, { recursive: true, force: true });
  }
  return { socket, stop };
}

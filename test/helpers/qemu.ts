/**
 * Test helper: starts qemu-storage-daemon or a paused tiny VM on private sockets in a fresh
 * temporary folder; {@link stopAll} kills whatever was started (call it in afterEach).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { QmpClient } from '../../lib/qmp/client.js';
import { connectStartingQemu } from '../../lib/qemu/storage-daemon.js';
import { tiedToParent } from '../../lib/tools.js';
import { requireTool } from './tools.js';

export const execFileP = promisify(execFile);

/** A started QEMU process. */
export interface QemuInstance {
  /** Temporary folder holding images and sockets. */
  dir: string;
  /** QMP socket. */
  qmpPath: string;
  /** Connected QMP client. */
  qmp: QmpClient;
  /** The process. */
  proc: ChildProcess;
  /** Disk images by role. */
  images: Record<string, string>;
  /** NBD server socket when one was started with the process. */
  nbdPath?: string;
  /** Kills the process (SIGKILL) and waits for it. */
  kill(): Promise<void>;
}

const started: QemuInstance[] = [];
const dirs: string[] = [];

/** A fresh temporary folder, removed by {@link stopAll}. */
export async function tempDir(prefix = 'pvebp-test-'): Promise<string> {
  const d = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
  dirs.push(d);
  return d;
}

async function launch(cmd: string, args: string[], dir: string, images: Record<string, string>, nbdPath?: string): Promise<QemuInstance> {
  const qmpPath = path.join(dir, 'qmp.sock');
  const log = path.join(dir, 'qemu.log');
  const out = await fs.open(log, 'w');
  // dies with the test process, even when vitest is killed
  const tied = tiedToParent(cmd, args);
  const proc = spawn(tied.file, tied.args, { cwd: dir, stdio: ['ignore', out.fd, out.fd] });
  await out.close();
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  const kill = async (): Promise<void> => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    await exited;
  };
  try {
    const qmp = await connectStartingQemu(qmpPath, proc, log, cmd);
    const inst: QemuInstance = { dir, qmpPath, qmp, proc, images, kill, ...(nbdPath ? { nbdPath } : {}) };
    started.push(inst);
    return inst;
  } catch (err) {
    await kill();
    throw err;
  }
}

/** Options of {@link startStorageDaemon}. */
export interface StorageDaemonOptions {
  /** Disk size in bytes (default 8 MiB). */
  size?: number;
  /** Start an NBD server with a writable export `live0` of the disk (default true). */
  nbd?: boolean;
}

/**
 * qemu-storage-daemon with a qcow2 disk: file node `disk0-file`, qcow2 node `disk0-fmt`, raw node
 * `disk0` on top (the node to back up), QMP on a private socket, and optionally an NBD server with
 * a writable export `live0` of `disk0` (to write "guest" data).
 */
export async function startStorageDaemon(opts: StorageDaemonOptions = {}): Promise<QemuInstance> {
  const qsd = requireTool('qemu-storage-daemon', 'qemu-system-common');
  requireTool('qemu-img', 'qemu-utils');
  const dir = await tempDir();
  const disk = path.join(dir, 'disk0.qcow2');
  await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', disk, String(opts.size ?? 8 * 1024 * 1024)]);
  const args = [
    '--blockdev', `driver=file,filename=${disk},node-name=disk0-file`,
    '--blockdev', 'driver=qcow2,file=disk0-file,node-name=disk0-fmt',
    '--blockdev', 'driver=raw,file=disk0-fmt,node-name=disk0',
    '--chardev', `socket,path=${path.join(dir, 'qmp.sock')},server=on,wait=off,id=qmp0`,
    '--monitor', 'chardev=qmp0',
  ];
  let nbdPath: string | undefined;
  if (opts.nbd ?? true) {
    nbdPath = path.join(dir, 'live.sock');
    args.push('--nbd-server', `addr.type=unix,addr.path=${nbdPath}`);
    args.push('--export', 'type=nbd,id=live0,node-name=disk0,name=live0,writable=on');
  }
  return launch(qsd, args, dir, { disk0: disk }, nbdPath);
}

/**
 * `qemu-system-x86_64 -S` (TCG, 64 MiB, no defaults) with a virtio-blk data disk (qcow2 node
 * `drive-virtio0`, device id `virtio0`) and a small raw disk standing in for EFI vars, attached
 * the old way (`-drive`, BlockBackend `drive-efidisk0`, device id `efidisk0`).
 */
export async function startVm(opts: { size?: number } = {}): Promise<QemuInstance> {
  const qemu = requireTool('qemu-system-x86_64', 'qemu-system-x86');
  requireTool('qemu-img', 'qemu-utils');
  const dir = await tempDir();
  const disk = path.join(dir, 'vm.qcow2');
  const efi = path.join(dir, 'efivars.raw');
  await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', disk, String(opts.size ?? 8 * 1024 * 1024)]);
  await execFileP('qemu-img', ['create', '-q', '-f', 'raw', efi, String(256 * 1024)]);
  const args = [
    '-S', '-machine', 'accel=tcg', '-m', '64', '-nodefaults', '-display', 'none',
    '-blockdev', `driver=file,filename=${disk},node-name=vmdisk-file`,
    '-blockdev', 'driver=qcow2,file=vmdisk-file,node-name=drive-virtio0',
    '-device', 'virtio-blk-pci,drive=drive-virtio0,id=virtio0',
    '-drive', `if=none,id=drive-efidisk0,file=${efi},format=raw`,
    '-device', 'virtio-blk-pci,drive=drive-efidisk0,id=efidisk0',
    '-chardev', `socket,path=${path.join(dir, 'qmp.sock')},server=on,wait=off,id=qmp0`,
    '-mon', 'chardev=qmp0,mode=control',
  ];
  return launch(qemu, args, dir, { virtio0: disk, efidisk0: efi });
}

/** Kills every started QEMU and removes temporary folders. */
export async function stopAll(): Promise<void> {
  for (const q of started.splice(0)) {
    await q.qmp.close().catch(() => undefined);
    await q.kill();
  }
  for (const d of dirs.splice(0)) await fs.rm(d, { recursive: true, force: true });
}

/** Writes a pattern through the guest device (VM, HMP qemu-io on the device). */
export async function vmWrite(q: QemuInstance, qdevId: string, pattern: number, offset: number, length: number): Promise<void> {
  const out = await q.qmp.execute<string>('human-monitor-command', {
    'command-line': `qemu-io -d /machine/peripheral/${qdevId}/virtio-backend "write -P 0x${pattern.toString(16)} ${offset} ${length}"`,
  });
  if (out.trim() !== '' && !/wrote/.test(out)) throw new Error(`qemu-io failed: ${out}`);
}

/** Writes a pattern through the live NBD export of qemu-storage-daemon (qemu-io over NBD). */
export async function nbdWrite(uri: string, pattern: number, offset: number, length: number): Promise<void> {
  requireTool('qemu-io', 'qemu-utils');
  await execFileP('qemu-io', ['-f', 'raw', '-c', `write -P 0x${pattern.toString(16)} ${offset} ${length}`, uri]);
}

/** Reads a whole NBD export into a buffer (nbdcopy to a file). */
export async function nbdRead(uri: string, dir: string): Promise<Buffer> {
  requireTool('nbdcopy', 'libnbd-bin');
  const out = path.join(dir, `read-${Date.now()}-${Math.random().toString(16).slice(2)}.raw`);
  await execFileP('nbdcopy', [uri, out]);
  const buf = await fs.readFile(out);
  await fs.rm(out, { force: true });
  return buf;
}

/** Reads a disk image as raw bytes (qemu-img convert). */
export async function imageRead(file: string, format: string, dir: string): Promise<Buffer> {
  const out = path.join(dir, `img-${Date.now()}-${Math.random().toString(16).slice(2)}.raw`);
  await execFileP('qemu-img', ['convert', '-U', '-f', format, '-O', 'raw', file, out]);
  const buf = await fs.readFile(out);
  await fs.rm(out, { force: true });
  return buf;
}


/**
 * Steps shared by both backends: fleecing images, the NBD server and exports, teardown helpers.
 *
 * @packageDocumentation
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { constants as fsc, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import type { QmpClient } from '../qmp/client.js';
import { queryBlockExports } from '../qmp/commands.js';
import { QmpClosedError, QmpError } from '../qmp/errors.js';
import { BackupAccessError, deviceError } from './errors.js';
import { NAME_PREFIX } from './names.js';
import type { AccessState } from './state.js';

const execFileP = promisify(execFile);

/** Checks that `dir` is an absolute, existing, writable directory (by creating a probe file). */
export async function checkFleecingDir(dir: unknown): Promise<string> {
  if (typeof dir !== 'string' || !path.isAbsolute(dir) || dir.includes('\0')) {
    throw new BackupAccessError(`fleecing dir must be an absolute path, got ${JSON.stringify(dir)}`);
  }
  const resolved = path.resolve(dir);
  let st;
  try {
    st = await fs.stat(resolved);
  } catch (err) {
    throw new BackupAccessError(`fleecing dir ${resolved} cannot be used: ${(err as Error).message}`, { cause: err });
  }
  if (!st.isDirectory()) throw new BackupAccessError(`fleecing dir ${resolved} is not a directory`);
  // Random, so that setups checking the same folder at once do not collide on the probe's name.
  const probe = path.join(resolved, `.${NAME_PREFIX}-probe-${process.pid}-${randomBytes(6).toString('hex')}`);
  try {
    const fh = await fs.open(probe, fsc.O_CREAT | fsc.O_EXCL | fsc.O_WRONLY, 0o600);
    await fh.close();
    await fs.rm(probe, { force: true });
  } catch (err) {
    throw new BackupAccessError(`fleecing dir ${resolved} is not writable: ${(err as Error).message}`, { cause: err });
  }
  return resolved;
}

/** Creates a fleecing image of `size` bytes (claiming the name exclusively first). */
export async function createFleecingImage(device: string, file: string, format: 'qcow2' | 'raw', size: number): Promise<void> {
  try {
    const fh = await fs.open(file, fsc.O_CREAT | fsc.O_EXCL | fsc.O_WRONLY, 0o600);
    try {
      if (format === 'raw') await fh.truncate(size);
    } finally {
      await fh.close();
    }
    if (format === 'qcow2') {
      await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(size)], { timeout: 60_000 });
    }
  } catch (err) {
    await fs.rm(file, { force: true }).catch(() => undefined);
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    const reason = e.code === 'ENOENT' && format === 'qcow2' && !e.path ? 'qemu-img not found (apt-get install qemu-utils)' : (e.stderr?.trim() || e.message);
    throw new BackupAccessError(`${device}: creating fleecing image ${file} failed: ${reason}`, { device, cause: err });
  }
}

/** `blockdev-add` of a fleecing image (file node below a format node). */
export async function addFleecingNodes(
  qmp: QmpClient,
  device: string,
  d: { fleecingPath: string; fleecingFormat: 'qcow2' | 'raw'; fleecingNode: string; fleecingFileNode: string },
): Promise<void> {
  try {
    await qmp.execute(
      'blockdev-add',
      {
        driver: d.fleecingFormat,
        'node-name': d.fleecingNode,
        discard: 'unmap',
        file: { driver: 'file', filename: d.fleecingPath, 'node-name': d.fleecingFileNode, discard: 'unmap' },
      },
      { device },
    );
  } catch (err) {
    throw deviceError(device, 'attaching the fleecing image', err);
  }
}

/** A private directory for the NBD socket (mode 0700) and the socket path inside it. */
export async function makeSocketDir(base?: string): Promise<{ dir: string; socketPath: string }> {
  const dir = await fs.mkdtemp(path.join(base ?? os.tmpdir(), `${NAME_PREFIX}-nbd-`));
  await fs.chmod(dir, 0o700);
  const socketPath = path.join(dir, 'nbd.sock');
  if (Buffer.byteLength(socketPath) > 107) {
    await fs.rm(dir, { recursive: true, force: true });
    throw new BackupAccessError(`NBD socket path ${socketPath} is too long for a unix socket`);
  }
  return { dir, socketPath };
}

/** Checks that an existing NBD server's address is a unix socket. */
export async function checkExistingNbdSocket(p: unknown): Promise<string> {
  if (typeof p !== 'string' || !path.isAbsolute(p)) {
    throw new BackupAccessError(`the running NBD server must be given as an absolute unix socket path, got ${JSON.stringify(p)}`);
  }
  let st;
  try {
    st = await fs.stat(p);
  } catch (err) {
    throw new BackupAccessError(`the running NBD server is not on unix socket ${p}: ${(err as Error).message}`, { cause: err });
  }
  if (!st.isSocket()) throw new BackupAccessError(`the running NBD server address ${p} is not a unix socket`);
  return p;
}

/** Starts QEMU's NBD server on a unix socket, with a clear error when one is already running. */
export async function startNbdServer(qmp: QmpClient, socketPath: string): Promise<void> {
  try {
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socketPath } } });
  } catch (err) {
    if (err instanceof QmpError && /already running/i.test(err.desc)) {
      throw new BackupAccessError(
        'QEMU already runs an NBD server (QEMU allows one); pass nbdServer: { path } with its unix socket so the exports are added to it',
        { cause: err },
      );
    }
    throw new BackupAccessError(`starting the NBD server on ${socketPath} failed: ${(err as Error).message}`, { cause: err });
  }
}

/** `block-export-add` of one snapshot node over NBD, writable (so the reader can discard). */
export async function addExport(
  qmp: QmpClient,
  device: string,
  e: { exportId: string; exportName: string; node: string; bitmap?: { node: string; name: string } },
): Promise<void> {
  const args: Record<string, unknown> = {
    type: 'nbd',
    id: e.exportId,
    'node-name': e.node,
    name: e.exportName,
    writable: true,
  };
  if (e.bitmap) args.bitmaps = [{ node: e.bitmap.node, name: e.bitmap.name }];
  try {
    await qmp.execute('block-export-add', args, { device });
  } catch (err) {
    throw deviceError(device, 'exporting the snapshot over NBD', err);
  }
}

/** Deletes exports (disconnecting clients) and waits until QEMU has dropped them. */
export async function deleteExports(qmp: QmpClient, ids: string[], timeoutMs = 15_000): Promise<void> {
  const present = new Set((await queryBlockExports(qmp)).map((e) => e.id));
  const ours = ids.filter((id) => present.has(id));
  for (const id of ours) {
    try {
      await qmp.execute('block-export-del', { id, mode: 'hard' });
    } catch (err) {
      // Already shutting down is fine; anything else is reported after waiting.
      if (!(err instanceof QmpError)) throw err;
    }
  }
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const left = (await queryBlockExports(qmp)).filter((e) => ours.includes(e.id));
    if (left.length === 0) return;
    if (Date.now() > deadline) {
      throw new BackupAccessError(`NBD exports ${left.map((e) => e.id).join(', ')} did not go away`, { command: 'block-export-del' });
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Runs teardown steps, continuing after failures: errors are collected; a closed connection
 * makes the remaining QMP steps moot (they are skipped) but local cleanup still runs.
 */
export class StepRunner {
  /** Errors of failed steps. */
  readonly errors: Error[] = [];
  /** True once the QMP connection was found closed. */
  qemuGone = false;

  constructor(private readonly qmp: QmpClient) {
    if (qmp.closed) this.qemuGone = true;
  }

  /** Runs a QMP step unless QEMU is gone. */
  async qmpStep(what: string, fn: () => Promise<unknown>): Promise<void> {
    if (this.qemuGone || this.qmp.closed) {
      this.qemuGone = true;
      return;
    }
    try {
      await fn();
    } catch (err) {
      if (err instanceof QmpClosedError || this.qmp.closed) {
        this.qemuGone = true;
        return;
      }
      this.errors.push(err instanceof BackupAccessError ? err : new BackupAccessError(`${what} failed: ${(err as Error).message}`, { cause: err }));
    }
  }

  /** Runs a local step (files). */
  async localStep(what: string, fn: () => Promise<unknown>): Promise<void> {
    try {
      await fn();
    } catch (err) {
      this.errors.push(new BackupAccessError(`${what} failed: ${(err as Error).message}`, { cause: err }));
    }
  }

  /** Throws the collected errors as one {@link BackupAccessError}, if any. */
  throwIfFailed(context: string): void {
    const first = this.errors[0];
    if (!first) return;
    if (this.errors.length === 1) throw first;
    throw new BackupAccessError(`${context}: ${this.errors.map((e) => e.message).join('; ')}`, { cause: new AggregateError(this.errors) });
  }
}

/** Removes local files of an access (fleecing images, socket dir). */
export async function removeLocalFiles(runner: StepRunner, state: AccessState): Promise<void> {
  for (const d of state.devices) {
    await runner.localStep(`${d.device}: removing fleecing image ${d.fleecingPath}`, () => fs.rm(d.fleecingPath, { force: true }));
  }
  if (state.socketDir) {
    const dir = state.socketDir;
    await runner.localStep(`removing NBD socket dir ${dir}`, () => fs.rm(dir, { recursive: true, force: true }));
  }
}

/**
 * Fleecing images: checking the folder they go in, creating an image of a disk's size, and
 * attaching it to QEMU as the copy-before-write filter's target. Both backends use these.
 *
 * @packageDocumentation
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { constants as fsc, promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import type { QmpClient } from '../qmp/client.js';
import { BackupAccessError, deviceError } from './errors.js';
import { NAME_PREFIX } from './names.js';

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

/**
 * Small file primitives for what a provider keeps on the host's disk (stores, the bitmap
 * ledger): private modes whatever the umask, and writes a crash cannot leave half done.
 *
 * @packageDocumentation
 */
import { chmod, mkdir, open, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout } from 'node:timers/promises';

import { native } from '../native.js';

/**
 * Mode of every folder of a store (the store itself, each guest's, each backup's): backups hold
 * guest data, and a directory-mode container tree may hold setuid files owned by root, so no
 * other user may enter any of them. Set with `chmod`, never left to the umask.
 */
export const PRIVATE_DIR_MODE = 0o700;
/** Mode of every file a store writes (manifests, images, archives, configs, logs, attributes). */
export const PRIVATE_FILE_MODE = 0o600;

/** Creates a folder (and missing parents) and gives it {@link PRIVATE_DIR_MODE} whatever the umask. */
export async function mkdirPrivate(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: PRIVATE_DIR_MODE });
  await chmod(dir, PRIVATE_DIR_MODE);
}

/**
 * Whether `name` is one plain file name, which joined to a folder stays in it (not empty, `.`,
 * `..`, and without `/` or NUL). Names read from a backup (a manifest's files, its disks) are
 * joined to folders: a damaged or crafted one (whoever can write a shared store) must not reach
 * outside.
 */
export function isPlainFileName(name: unknown): name is string {
  return typeof name === 'string' && name !== '' && name !== '.' && name !== '..' && !name.includes('/') && !name.includes('\0');
}

/** Fsyncs a file or directory. */
export async function fsyncPath(p: string): Promise<void> {
  const fh = await open(p, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Writes `data` to `file` so that a crash leaves either the old or the new content: write to a
 * temporary name, fsync, rename, fsync the folder. The file is {@link PRIVATE_FILE_MODE}.
 */
export async function writeFileAtomic(file: string, data: string | Buffer): Promise<void> {
  const tmp = `${file}.tmp-${process.pid}`;
  const fh = await open(tmp, 'w', PRIVATE_FILE_MODE);
  try {
    // explicitly: the umask may have removed bits of the mode, and an existing tmp keeps its own
    await fh.chmod(PRIVATE_FILE_MODE);
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  try {
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  await fsyncPath(path.dirname(file));
}

/** How often a lock that is waited for is tried again. */
const LOCK_RETRY_MS = 100;

/**
 * Runs `fn` holding an exclusive lock on `file` (created 0600 if missing, never removed): a
 * `flock` through the core, which the kernel drops when this process exits however it exits, so
 * a crash never leaves the lock behind and none has to be judged stale. While another holder has
 * it, waits up to `waitMs` (default 0: not at all), then throws `busy()`. The core only tries
 * (a blocking `flock` would stall the event loop), so waiting is trying again.
 */
export async function withFileLock<T>(file: string, busy: () => Error, fn: () => Promise<T>, o: { waitMs?: number } = {}): Promise<T> {
  const fh = await open(file, 'a', PRIVATE_FILE_MODE);
  try {
    await fh.chmod(PRIVATE_FILE_MODE);
    const giveUp = Date.now() + (o.waitMs ?? 0);
    while (!native.tryLockFile(fh.fd)) {
      if (Date.now() >= giveUp) throw busy();
      await setTimeout(LOCK_RETRY_MS);
    }
    return await fn();
  } finally {
    await fh.close();
  }
}

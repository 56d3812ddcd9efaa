/**
 * QEMU's NBD server and the snapshot exports on it: the private socket folder, checking a server
 * that already runs, starting one, adding a writable export and deleting exports. Both backends
 * use these.
 *
 * @packageDocumentation
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { QmpClient, QmpEvent } from '../qmp/client.js';
import { queryBlockExports } from '../qmp/commands.js';
import { QmpError } from '../qmp/errors.js';
import { BackupAccessError, deviceError } from './errors.js';
import { NAME_PREFIX } from './names.js';

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

/**
 * Deletes exports (disconnecting clients) and waits until QEMU has dropped them: one listing
 * after the deletions, then QEMU's `BLOCK_EXPORT_DELETED` events for those still shutting down
 * (no polling; a listing every second only in case a peer sends no events). Ids that do not
 * exist are passed over.
 */
export async function deleteExports(qmp: QmpClient, ids: string[], timeoutMs = 15_000): Promise<void> {
  if (ids.length === 0) return;
  const gone = new Set<string>();
  let wake: (() => void) | undefined;
  const onEvent = (ev: QmpEvent): void => {
    if (ev.event !== 'BLOCK_EXPORT_DELETED' || typeof ev.data.id !== 'string') return;
    gone.add(ev.data.id);
    wake?.();
  };
  qmp.on('event', onEvent); // before the deletions, so no event is missed
  try {
    for (const id of ids) {
      try {
        await qmp.execute('block-export-del', { id, mode: 'hard' });
      } catch (err) {
        // Not there, or already shutting down, is fine; what is left is told after waiting.
        if (!(err instanceof QmpError)) throw err;
      }
    }
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const left = (await queryBlockExports(qmp)).filter((e) => ids.includes(e.id) && !gone.has(e.id)).map((e) => e.id);
      if (left.length === 0) return;
      const wait = deadline - Date.now();
      if (wait <= 0) {
        throw new BackupAccessError(`NBD exports ${left.join(', ')} did not go away`, { command: 'block-export-del' });
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(wait, 1000));
        wake = (): void => {
          if (!left.every((id) => gone.has(id))) return;
          clearTimeout(timer);
          resolve();
        };
        wake();
      });
      wake = undefined;
      if (left.every((id) => gone.has(id))) return;
    }
  } finally {
    qmp.off('event', onEvent);
  }
}

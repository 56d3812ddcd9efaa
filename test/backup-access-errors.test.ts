/**
 * Errors that say what is wrong: a busy QMP monitor, a socket that is not QMP (the command line
 * fails in one line before it creates anything in the store), and two backup accesses set up at
 * once on one QEMU (one wins, the other gets ERR_BACKUP_ACCESS_ACTIVE). Real qemu-storage-daemon.
 */
import { spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { setupBackupAccess, teardownBackupAccess } from '../lib/qemu/backup-access.js';
import { startStorageDaemon, stopAll, tempDir } from './helpers/qemu.js';

const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');

afterEach(async () => {
  await stopAll();
});

function cli(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('errors that say what is wrong', () => {
  it('backup --qmp on a busy monitor or on an NBD socket: one line naming the problem, and no store created', async () => {
    const q = await startStorageDaemon(); // the test's client holds the monitor
    const dir = await tempDir();
    const store = path.join(dir, 'store');

    const busy = cli('backup', '--store', store, '--vmid', '100', '--qmp', q.qmpPath, '--devices', 'disk0');
    expect(busy.status).toBe(1);
    expect(busy.stderr.trim().split('\n')).toHaveLength(1);
    expect(busy.stderr.trim()).toMatch(/accepted the connection but sent no greeting .* busy with another client .*\[ERR_QMP_BUSY\]$/);
    await expect(fs.stat(store)).rejects.toMatchObject({ code: 'ENOENT' });

    const nbd = cli('backup', '--store', store, '--vmid', '100', '--qmp', q.nbdPath!, '--devices', 'disk0');
    expect(nbd.status).toBe(1);
    expect(nbd.stderr.trim()).toBe(`pve-backup-provider: ${q.nbdPath!} is not a QMP socket: it is an NBD server [ERR_QMP_NOT_QMP]`);
    await expect(fs.stat(store)).rejects.toMatchObject({ code: 'ENOENT' });
  }, 30_000);

  it('two setups started at once on one QEMU: one succeeds, the other gets ERR_BACKUP_ACCESS_ACTIVE', async () => {
    const q = await startStorageDaemon();
    const fleece = await tempDir();
    const opts = (t: string) => ({ targetId: t, devices: ['disk0'], fleecing: { dir: fleece }, nbdServer: { path: q.nbdPath! } });
    // Pipelined on one connection, both read "no access" before either records one.
    const results = await Promise.allSettled([setupBackupAccess(q.qmp, opts('target-a')), setupBackupAccess(q.qmp, opts('target-b'))]);
    const won = results.filter((r) => r.status === 'fulfilled');
    const lost = results.filter((r) => r.status === 'rejected');
    expect(won).toHaveLength(1);
    expect(lost).toHaveLength(1);
    const winner = (won[0] as PromiseFulfilledResult<{ targetId: string }>).value.targetId;
    expect((lost[0] as PromiseRejectedResult).reason).toMatchObject({ code: 'ERR_BACKUP_ACCESS_ACTIVE', activeTargetId: winner });
    // The loser undid nothing of the winner's: its access is whole and tears down cleanly.
    const exports = await q.qmp.execute<Array<{ id: string }>>('query-block-exports');
    expect(exports.map((e) => e.id).sort()).toEqual(['live0', 'pvebp-0']);
    expect(await fs.readdir(fleece)).toHaveLength(1);
    await teardownBackupAccess(q.qmp, { targetId: winner, success: true });
    expect(await fs.readdir(fleece)).toEqual([]);
  });
});

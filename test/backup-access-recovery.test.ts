/**
 * A backup whose orchestrator is SIGKILLed mid-copy leaves the copy-before-write filter, the
 * fleecing image, the export and the busy bitmaps in QEMU, and its temporary folder on the host.
 * The next `backup` removes them by itself when their owner is dead; `recover` does it by hand;
 * an access whose owner still runs is refused (ERR_BACKUP_ACCESS_ACTIVE). Real
 * qemu-storage-daemon, the real command line.
 */
import { spawn, spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { QmpClient } from '../lib/qmp/client.js';
import { setupBackupAccess, teardownBackupAccess } from '../lib/qemu/backup-access.js';
import { currentOwner, ownerIsDead } from '../lib/owner.js';
import { nbdWrite, startStorageDaemon, stopAll, tempDir, type QemuInstance } from './helpers/qemu.js';

const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');
const MiB = 1024 * 1024;

afterEach(async () => {
  await stopAll();
});

function cli(env: NodeJS.ProcessEnv, ...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env: { ...process.env, ...env } });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** What of a backup access QEMU holds: our nodes, exports other than the live one, background bitmaps. */
async function leftovers(qmpPath: string): Promise<{ nodes: string[]; exports: string[]; bitmaps: string[]; record: boolean }> {
  const qmp = await QmpClient.connect(qmpPath);
  try {
    const nodes = await qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name?: string; busy?: boolean }> }>>(
      'query-named-block-nodes',
      { flat: true },
    );
    const exports = await qmp.execute<Array<{ id: string }>>('query-block-exports');
    const record = await qmp.execute('qom-get', { path: '/objects/pvebp-access', property: 'data' }).then(
      () => true,
      () => false,
    );
    return {
      nodes: nodes.map((n) => n['node-name']).filter((n) => n.startsWith('pvebp-')),
      exports: exports.map((e) => e.id).filter((id) => id !== 'live0'),
      // busy or anonymous bitmaps belong to a running access too
      bitmaps: nodes.flatMap((n) =>
        (n['dirty-bitmaps'] ?? []).filter((b) => !b.name || b.name.endsWith('//background') || b.busy).map((b) => `${n['node-name']}:${b.name ?? ''}`),
      ),
      record,
    };
  } finally {
    await qmp.close();
  }
}

/** Files under `dir`, recursively. */
async function filesUnder(dir: string): Promise<string[]> {
  const entries = await fs.readdir(dir, { recursive: true, withFileTypes: true });
  return entries.filter((e) => e.isFile()).map((e) => path.join(e.parentPath, e.name));
}

/**
 * Starts a slow CLI backup of the daemon's disk and SIGKILLs it once the backup access is set up
 * and the copy runs; then the guest writes, so that the fleecing image grows.
 */
async function killedBackup(q: QemuInstance, store: string, tmp: string): Promise<void> {
  await q.qmp.close(); // QEMU serves one client per monitor socket: the CLI needs it
  const child = spawn(process.execPath, [CLI, 'backup', '--store', store, '--vmid', '100', '--qmp', q.qmpPath, '--nbd-server', q.nbdPath!, '--devices', 'disk0', '--bwlimit', '1M'], {
    env: { ...process.env, TMPDIR: tmp },
  });
  let stderr = '';
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  await new Promise<void>((resolve, reject) => {
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
      if (/started backup access/.test(stderr)) resolve();
    });
    child.once('exit', () => reject(new Error(`backup exited before the copy: ${stderr}`)));
  });
  await new Promise((r) => setTimeout(r, 1000)); // mid-copy (32 MiB at 1 MiB/s)
  child.kill('SIGKILL');
  await exited;
  await nbdWrite(`nbd+unix:///live0?socket=${q.nbdPath!}`, 0x22, 0, 8 * MiB);
}

describe('owners', () => {
  it('an owner is dead only when its pid no longer runs with its start time on this host', async () => {
    const me = currentOwner();
    expect(me.start).toMatch(/^\d+$/);
    expect(ownerIsDead(me)).toBe(false);
    expect(ownerIsDead({ ...me, start: String(Number(me.start) + 1) })).toBe(true); // the pid was reused
    const gone = spawn('true');
    await new Promise((r) => gone.once('exit', r));
    expect(ownerIsDead({ ...me, pid: gone.pid! })).toBe(true);
    expect(ownerIsDead({ ...me, boot: 'another-boot' })).toBe(true); // the host rebooted since
    expect(ownerIsDead({ ...me, pid: gone.pid!, host: `not-${me.host}` })).toBe(false); // cannot be checked from here
    expect(ownerIsDead(undefined)).toBe(false); // a record of an older version
  });
});

describe('a backup killed mid-copy (qemu-storage-daemon, command line)', () => {
  it('the next backup removes the stale access, the fleecing image and the temporary folder, and succeeds', async () => {
    const q = await startStorageDaemon({ size: 32 * MiB });
    await nbdWrite(`nbd+unix:///live0?socket=${q.nbdPath!}`, 0x11, 0, 32 * MiB);
    const dir = await tempDir();
    const tmp = path.join(dir, 'tmp');
    await fs.mkdir(tmp);
    const store = path.join(dir, 'store');

    await killedBackup(q, store, tmp);
    const stale = await leftovers(q.qmpPath);
    expect(stale.nodes.length).toBeGreaterThan(0);
    expect(stale.exports).toEqual(['pvebp-0']);
    expect(stale.record).toBe(true);
    expect(stale.bitmaps.length).toBeGreaterThan(0);
    const fleecing = (await filesUnder(tmp)).filter((f) => f.endsWith('-fleecing.qcow2'));
    expect(fleecing).toHaveLength(1);
    expect((await fs.readdir(tmp)).filter((n) => n.startsWith('vzdump-qemu-100-'))).toHaveLength(1);

    const r = cli({ TMPDIR: tmp }, 'backup', '--store', store, '--vmid', '100', '--qmp', q.qmpPath, '--nbd-server', q.nbdPath!, '--devices', 'disk0');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/removed a stale backup access: access for target 'snapshot-access:directory' \(disk0\) left by pid \d+/);
    expect(await leftovers(q.qmpPath)).toEqual({ nodes: [], exports: [], bitmaps: [], record: false });
    expect(await fs.readdir(tmp)).toEqual([]);
    await expect(fs.stat(fleecing[0]!)).rejects.toMatchObject({ code: 'ENOENT' });
  }, 120_000);

  it('after a killed incremental backup, the next backup (full: the provider cannot trust the bitmap) succeeds and restores exactly', async () => {
    const q = await startStorageDaemon({ size: 32 * MiB });
    const live = `nbd+unix:///live0?socket=${q.nbdPath!}`;
    await nbdWrite(live, 0x11, 0, 32 * MiB);
    const dir = await tempDir();
    const tmp = path.join(dir, 'tmp');
    await fs.mkdir(tmp);
    const store = path.join(dir, 'store');
    const backup = ['backup', '--store', store, '--vmid', '100', '--qmp', q.qmpPath, '--nbd-server', q.nbdPath!, '--devices', 'disk0'];
    await q.qmp.close(); // QEMU serves one client per monitor socket: the CLI needs it
    const first = cli({ TMPDIR: tmp }, ...backup);
    expect(first.status, first.stderr).toBe(0);
    await new Promise((r) => setTimeout(r, 1100)); // a later backup id
    // 16 MiB dirty: the incremental copies at 1 MiB/s, so it is mid-copy when killed
    await nbdWrite(live, 0x33, 16 * MiB, 16 * MiB);
    await killedBackup(q, store, tmp);
    // the killed run's backup access is still in QEMU: its filter sits above the disk, so the
    // provider's "new" bitmap must be applied to the disk as it is once that access is removed
    const next = cli({ TMPDIR: tmp }, ...backup, '--json');
    expect(next.status, next.stderr).toBe(0);
    const { volid, parent } = JSON.parse(next.stdout) as { volid: string; parent?: string };
    expect(parent).toBeUndefined();
    const expected = path.join(dir, 'expected.raw');
    expect(spawnSync('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', live, expected]).status).toBe(0);
    const r = cli({}, 'restore', volid, '--store', store, '--to', `disk0=${path.join(dir, 'restored.raw')}`);
    expect(r.status, r.stderr).toBe(0);
    expect((await fs.readFile(path.join(dir, 'restored.raw'))).equals(await fs.readFile(expected))).toBe(true);
  }, 120_000);

  it('recover removes it by hand; a backup then succeeds', async () => {
    const q = await startStorageDaemon({ size: 32 * MiB });
    await nbdWrite(`nbd+unix:///live0?socket=${q.nbdPath!}`, 0x11, 0, 32 * MiB);
    const dir = await tempDir();
    const tmp = path.join(dir, 'tmp');
    await fs.mkdir(tmp);
    const store = path.join(dir, 'store');

    await killedBackup(q, store, tmp);
    const r = cli({ TMPDIR: tmp }, 'recover', '--qmp', q.qmpPath, '--json');
    expect(r.status, r.stderr).toBe(0);
    const { removed } = JSON.parse(r.stdout) as { removed: string[] };
    expect(removed[0]).toMatch(/^access for target 'snapshot-access:directory' \(disk0\) left by pid \d+/);
    expect(removed.at(-1)).toMatch(new RegExp(`^folder ${tmp}/vzdump-qemu-100-`));
    expect(await leftovers(q.qmpPath)).toEqual({ nodes: [], exports: [], bitmaps: [], record: false });
    expect(await fs.readdir(tmp)).toEqual([]);
    expect(cli({ TMPDIR: tmp }, 'recover', '--qmp', q.qmpPath).stdout.trim()).toBe('nothing to recover');

    const b = cli({ TMPDIR: tmp }, 'backup', '--store', store, '--vmid', '100', '--qmp', q.qmpPath, '--nbd-server', q.nbdPath!, '--devices', 'disk0');
    expect(b.status, b.stderr).toBe(0);
    expect(b.stderr).not.toMatch(/stale/);
  }, 120_000);

  it('an access whose owner still runs is refused by backup and by recover (without --force)', async () => {
    const q = await startStorageDaemon();
    const dir = await tempDir();
    const store = path.join(dir, 'store');
    // Owned by this (live) test process; the connection is closed so that the CLI can connect.
    await setupBackupAccess(q.qmp, { targetId: 'snapshot-access:other', devices: ['disk0'], fleecing: { dir }, nbdServer: { path: q.nbdPath! } });
    await q.qmp.close();

    const b = cli({}, 'backup', '--store', store, '--vmid', '100', '--qmp', q.qmpPath, '--nbd-server', q.nbdPath!, '--devices', 'disk0');
    expect(b.status).toBe(1);
    expect(b.stderr.trim()).toMatch(/a backup access for target 'snapshot-access:other' is already active.*\[ERR_BACKUP_ACCESS_ACTIVE\]$/);
    const r = cli({}, 'recover', '--qmp', q.qmpPath);
    expect(r.status).toBe(1);
    expect(r.stderr.trim()).toMatch(new RegExp(`its owner, pid ${process.pid} on .*, is still running.*\\[ERR_BACKUP_ACCESS_ACTIVE\\]$`));
    expect((await leftovers(q.qmpPath)).nodes.length).toBeGreaterThan(0);

    const forced = cli({}, 'recover', '--qmp', q.qmpPath, '--force');
    expect(forced.status, forced.stderr).toBe(0);
    expect(await leftovers(q.qmpPath)).toEqual({ nodes: [], exports: [], bitmaps: [], record: false });
    const qmp = await QmpClient.connect(q.qmpPath);
    await teardownBackupAccess(qmp, { targetId: 'snapshot-access:other', success: false }); // nothing left: no error
    await qmp.close();
    expect(await fs.readdir(dir)).toEqual(['store']); // the fleecing image is gone
  }, 60_000);
});

/**
 * The Perl bridge end to end: `perl -T` runs the stand-in for vzdump's and qmrestore's call
 * order (test/pve/driver.pl) against `PVE::BackupProvider::Plugin::NodeBridge` (perl/), which
 * starts `provider-host` (dist/cli/main.js) on a provider module (test/pve/providers/). QEMU's
 * part of a VM backup (backup access, NBD export) is done here, with this package's
 * `setupBackupAccess` on a real qemu-storage-daemon, and handed over as qemu-server does.
 * Needs `npm run build:ts` (the host runs from dist/).
 */
import { spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import type { Manifest } from '../lib/directory-provider/layout.js';
import { bridgeOptions as bridge, drive, qemuPart, ROOT, type Msg, type Run } from './helpers/bridge-driver.js';
import { gone, requireTool } from './helpers/tools.js';
import { nbdRead, nbdWrite, startStorageDaemon, stopAll, tempDir, type QemuInstance } from './helpers/qemu.js';

const MiB = 1024 * 1024;
const KiB = 1024;
const STOREID = 'dir1';
const CONFIG = 'memory: 512\nvirtio0: local:100/vm-100-disk-0.qcow2,size=8M\n#qmdump#map:virtio0:disk0:local:qcow2:\n';

afterEach(async () => {
  await stopAll();
});

async function backupJob(q: QemuInstance, dir: string, provider: string, onMessage?: (m: Msg) => Promise<object | undefined> | object | undefined): Promise<Run> {
  const fleece = path.join(dir, 'fleece');
  await fs.mkdir(fleece, { recursive: true });
  const part = qemuPart(q, STOREID, fleece);
  return drive(
    {
      mode: 'backup',
      storeid: STOREID,
      scfg: { path: path.join(dir, 'store'), type: 'stand-in' },
      bridge: bridge(provider, path.join(dir, 'state')),
      vmid: '100',
      config: CONFIG,
      devices: { disk0: 8 * MiB },
      logfile: path.join(dir, 'qemu-100.log'),
    },
    async (m) => (await onMessage?.(m)) ?? part(m),
  );
}

async function restore(dir: string, volname: string, target: string): Promise<Run> {
  return drive({
    mode: 'restore',
    storeid: STOREID,
    scfg: { path: path.join(dir, 'store') },
    bridge: bridge('directory.mjs', path.join(dir, 'state')),
    volname,
    targets: { disk0: target },
  });
}

/** A VM backup of the DirectoryProvider through the bridge, with what it must hold. */
interface VmBackup extends Run {
  /** The disk as it was when backup access was set up: what the backup must restore to. */
  expected: Buffer;
  /** The driver's `setup` line: the mechanism and the provider's per-device bitmap answer. */
  setup: Msg;
  /** `backup/<archive>`, as vzdump names the volume. */
  volname: string;
}

/**
 * One vzdump-style VM backup of the DirectoryProvider. `during` runs at the `backup_vm` phase,
 * for which the driver does not wait: the guest's writes race with the provider's reads (after
 * the snapshot: they belong in the next backup, not this one).
 */
async function vmBackup(q: QemuInstance, dir: string, during?: () => Promise<void>): Promise<VmBackup> {
  const live = `nbd+unix:///live0?socket=${q.nbdPath!}`;
  let expected: Buffer | undefined;
  const run = await backupJob(q, dir, 'directory.mjs', async (m) => {
    // read before qemuPart sets up the snapshot; nothing writes in between
    if (m.phase === 'setup') expected = await nbdRead(live, dir);
    if (m.phase === 'backup_vm') await during?.();
    return undefined;
  });
  expect(run.stderr).not.toMatch(/Insecure|tainted/);
  expect(run.done.error ?? null).toBeNull();
  expect(run.done.job_error ?? null).toBeNull();
  return { ...run, expected: expected!, setup: run.messages.find((m) => m.phase === 'setup')!, volname: `backup/${run.done.archive!}` };
}

/** The manifest of a backup in the store (`<store>/<vmid>/<dir>/manifest.json`). */
async function manifestOf(dir: string, volname: string): Promise<Manifest> {
  return JSON.parse(await fs.readFile(path.join(dir, 'store', volname.slice('backup/'.length), 'manifest.json'), 'utf8')) as Manifest;
}

describe('the Perl bridge under perl -T (stand-ins for vzdump and qmrestore)', () => {
  it('backs up a VM full, then twice incremental, the guest writing between and during each; restores each byte for byte', async () => {
    const q = await startStorageDaemon({ size: 8 * MiB });
    const dir = await tempDir();
    await fs.writeFile(path.join(dir, 'qemu-100.log'), 'INFO: vzdump log\n');
    const live = `nbd+unix:///live0?socket=${q.nbdPath!}`;
    await nbdWrite(live, 0x11, 0, 3 * MiB);
    await nbdWrite(live, 0x5a, 6 * MiB, 512 * KiB);

    // full; the guest writes 256 KiB while backup_vm reads (not in this backup: in the next one)
    const full = await vmBackup(q, dir, () => nbdWrite(live, 0x44, 2 * MiB, 256 * KiB));
    expect(full.exitCode).toBe(0);
    expect(full.done.archive).toMatch(/^[a-zA-Z0-9\-.+=_/:]+$/);
    expect(Number(full.done.size)).toBeGreaterThan(0);
    expect(full.setup.mechanism).toBe('nbd');
    expect(full.setup.incremental).toEqual({ disk0: 'new' });
    const m1 = await manifestOf(dir, full.volname);
    expect(m1.mode).toBe('full');
    expect(m1.parent).toBeUndefined();
    expect(m1.devices!.disk0!.base).toBeUndefined();
    // the provider's log lines reach $log_function with their levels
    expect(full.logs.some(([l, msg]) => l === 'info' && msg.startsWith('creating '))).toBe(true);
    expect(full.logs.filter(([l]) => l === 'info').length).toBeGreaterThan(1);
    const hostPid = full.messages.find((m) => m.phase === 'backup_vm')!.host_pid as number;
    expect(gone(hostPid)).toBe(true); // the host ends with its job

    // incremental 1: the write made during the full, one between, one during
    await new Promise((r) => setTimeout(r, 1100)); // a new backup id (one per second)
    await nbdWrite(live, 0x22, 5 * MiB, 1 * MiB);
    const incr1 = await vmBackup(q, dir, () => nbdWrite(live, 0x66, 7 * MiB, 128 * KiB));
    expect(incr1.setup.incremental).toEqual({ disk0: 'use' });
    expect(incr1.volname).not.toBe(full.volname);
    const m2 = await manifestOf(dir, incr1.volname);
    expect(m2).toMatchObject({ mode: 'incremental', parent: full.volname });
    expect(m2.devices!.disk0!).toMatchObject({ bitmapMode: 'reuse', base: full.volname });
    // only the dirty clusters were read and stored, on top of the full image
    expect(m2.devices!.disk0!.bytesRead).toBe(256 * KiB + 1 * MiB);
    expect(m1.devices!.disk0!.bytesRead).toBeGreaterThanOrEqual(3 * MiB + 512 * KiB);
    expect(Number(incr1.done.size)).toBeLessThan(Number(full.done.size));

    // incremental 2: the write made during incremental 1, and one between
    await new Promise((r) => setTimeout(r, 1100));
    await nbdWrite(live, 0x33, 64 * KiB, 64 * KiB);
    const incr2 = await vmBackup(q, dir, () => nbdWrite(live, 0x77, 1 * MiB, 64 * KiB));
    expect(incr2.setup.incremental).toEqual({ disk0: 'use' });
    const m3 = await manifestOf(dir, incr2.volname);
    expect(m3).toMatchObject({ mode: 'incremental', parent: incr1.volname });
    expect(m3.devices!.disk0!).toMatchObject({ bitmapMode: 'reuse', base: incr1.volname });
    expect(m3.devices!.disk0!.bytesRead).toBe(128 * KiB + 64 * KiB);
    expect(Number(incr2.done.size)).toBeLessThan(Number(full.done.size));

    // the host's bitmap record is lost (a reinstalled node): the provider cannot trust QEMU's
    // bitmap and answers `new` while QEMU still holds it; qemuPart drops it as qemu-server's QEMU
    // recreates it, so this backup is a full image again and still holds the whole disk
    await new Promise((r) => setTimeout(r, 1100));
    await fs.rm(path.join(dir, 'state'), { recursive: true, force: true });
    await nbdWrite(live, 0x55, 4 * MiB, 64 * KiB);
    const again = await vmBackup(q, dir);
    expect(again.setup.incremental).toEqual({ disk0: 'new' });
    expect(again.logs.some(([l, msg]) => l === 'warn' && /may not match .*: full backup/.test(msg))).toBe(true);
    const m4 = await manifestOf(dir, again.volname);
    expect(m4.mode).toBe('full');
    expect(m4.devices!.disk0!.base).toBeUndefined();
    expect(m4.devices!.disk0!.bytesRead).toBeGreaterThanOrEqual(m1.devices!.disk0!.bytesRead);

    // four different disk states, each restored exactly as it was when its backup access was set up
    const states = [full.expected, incr1.expected, incr2.expected, again.expected];
    expect(new Set(states.map((b) => b.toString('base64'))).size).toBe(4);
    for (const [i, b] of [full, incr1, incr2, again].entries()) {
      const target = path.join(dir, `restored-${i}.raw`);
      const r = await restore(dir, b.volname, target);
      expect(r.stderr).not.toMatch(/Insecure|tainted/);
      expect(r.done.error ?? null).toBeNull();
      const configs = r.messages.find((m) => m.phase === 'configs')!;
      expect(configs.config).toBe(CONFIG);
      expect(configs.devices).toEqual({ disk0: { size: 8 * MiB } });
      expect((await fs.readFile(target)).equals(b.expected)).toBe(true);
    }
    // the write made during incremental 2 (0x77 at 1 MiB) is in the fourth backup, not in the third
    expect([incr2.expected[1 * MiB], again.expected[1 * MiB]]).toEqual([0x11, 0x77]);
  }, 180_000);

  it('leaves no FUSE export and no host when the restore worker vanishes after restore_vm_volume_init', async () => {
    // the qmrestore worker killed alone (OOM, kill -9): no cleanup call comes, the host's input ends
    const q = await startStorageDaemon({ size: 8 * MiB });
    const dir = await tempDir();
    await nbdWrite(`nbd+unix:///live0?socket=${q.nbdPath!}`, 0x11, 0, 1 * MiB);
    const backup = await vmBackup(q, dir);
    const script = path.join(dir, 'vanish.pl');
    await fs.writeFile(script, `
use strict; use warnings; use POSIX ();
use PVE::BackupProvider::Plugin::NodeBridge;
$ENV{PATH} = '/sbin:/bin:/usr/sbin:/usr/bin';
$| = 1;
open(STDERR, '>', '/dev/null');    # the host's stderr: one left behind must not hold the test's pipe
my ($node, $cli, $mod, $store, $state, $vol) = map { /^(.*)$/ ? $1 : die } @ARGV;
my $p = PVE::BackupProvider::Plugin::NodeBridge->new(undef, { path => $store }, '${STOREID}', sub { },
    provider => $mod, node => $node, cli => $cli, env => { PVE_BACKUP_PROVIDER_STATE_DIR => $state });
$p->restore_get_mechanism($vol);
$p->restore_vm_init($vol);
print "path=", $p->restore_vm_volume_init($vol, 'disk0', {})->{'qemu-img-path'}, "\n";
print "host=", $p->host_pid, "\n";
POSIX::_exit(0);    # gone without a word, as a killed worker
`);
    const r = spawnSync(
      requireTool('perl', 'perl'),
      ['-T', '-I', path.join(ROOT, 'test/pve'), '-I', path.join(ROOT, 'perl'), script, process.execPath, path.join(ROOT, 'dist/cli/main.js'), path.join(ROOT, 'test/pve/providers/directory.mjs'), path.join(dir, 'store'), path.join(dir, 'state'), backup.volname],
      { encoding: 'utf8', timeout: 30_000 },
    );
    const file = /^path=(\/.+)$/m.exec(r.stdout)?.[1];
    const host = Number(/^host=(\d+)$/m.exec(r.stdout)?.[1]);
    expect(file, r.stdout).toBeDefined();
    const mounted = async (): Promise<boolean> => (await fs.readFile('/proc/mounts', 'utf8')).split('\n').some((l) => l.split(' ')[1] === file);
    const until = Date.now() + 5000;
    while ((!gone(host) || (await mounted())) && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 100));
    const left = { host: !gone(host), mounted: await mounted() };
    if (left.host) process.kill(host, 'SIGKILL');
    expect(left).toEqual({ host: false, mounted: false });
  });

  it("makes a provider's error in a hook a die of the matching Perl call, with its message and code", async () => {
    const dir = await tempDir();
    const run = await drive({
      mode: 'backup',
      storeid: STOREID,
      scfg: { path: path.join(dir, 'store') },
      bridge: bridge('failing.mjs', path.join(dir, 'state')),
      vmid: '100',
      config: CONFIG,
      devices: { disk0: 8 * MiB },
    });
    expect(run.done.error).toBe("the vendor's quota for VM 100 is exhausted [ERR_VENDOR_QUOTA]\n");
    expect(run.messages.some((m) => m.phase === 'setup')).toBe(false); // backup_init died: nothing after it
    expect(run.logs).toContainEqual(['warn', 'refusing VM 100']);
    // backup_cleanup(0) and job_cleanup still went through the same host (the DirectoryProvider
    // answers a cleanup without backup_init with its own error, which vzdump only warns about)
    expect(run.logs.some(([, msg]) => /host is not running/.test(msg))).toBe(false);
    expect(run.done.job_error ?? null).toBeNull();
    expect(run.exitCode).toBe(0);
  });

  it("makes a provider's error in a restore call a die with its code; restore_vm_cleanup still runs", async () => {
    const dir = await tempDir();
    const r = await restore(dir, 'backup/100/qemu-2020_01_01-00_00_00', path.join(dir, 'never.raw'));
    expect(r.done.error).toMatch(/ \[ERR_[A-Z_]+\]\n$/);
    expect(r.done.error).not.toMatch(/ERR_BRIDGE|ERR_PROVIDER\]/);
    expect(r.messages.some((m) => m.phase === 'configs')).toBe(false);
    expect(r.stderr).not.toMatch(/backup provider cleanup after restore failed - .*not running/);
    expect(r.exitCode).toBe(0);
    await expect(fs.access(path.join(dir, 'never.raw'))).rejects.toThrow();
  });

  it('fails backup_vm within seconds when the host is killed mid-backup, and leaves no process', async () => {
    const q = await startStorageDaemon({ size: 8 * MiB });
    const dir = await tempDir();
    let hostPid = 0;
    let killedAt = 0;
    const run = await backupJob(q, dir, 'slow.mjs', (m) => {
      if (m.phase === 'backup_vm') hostPid = m.host_pid as number;
      // the provider's line arrives while backup_vm runs: then the host dies
      if (m.log?.[1] === 'backup_vm of VM 100 started') {
        process.kill(hostPid, 'SIGKILL');
        killedAt = Date.now();
      }
      return undefined;
    });
    expect(killedAt).toBeGreaterThan(0);
    const failedAt = run.messages.findIndex((m) => m.phase === 'teardown');
    expect(failedAt).toBeGreaterThan(0);
    expect(Date.now() - killedAt).toBeLessThan(10_000);
    expect(run.done.error).toMatch(/backup provider host is not running \(killed by signal 9\): cannot finish backup_vm/);
    expect(run.messages.find((m) => m.phase === 'teardown')!.success).toBe(false);
    // cleanup calls die with a clear message instead of hanging or respawning the host
    expect(run.logs.some(([l, msg]) => l === 'warn' && /backup cleanup for external provider failed - backup provider host is not running/.test(msg))).toBe(true);
    expect(run.done.job_error).toMatch(/backup provider host is not running/);
    expect(run.stderr).not.toMatch(/interrupted by signal|Insecure/);
    expect(gone(hostPid)).toBe(true);
    expect(run.exitCode).toBe(0);
  });

  it.each(['SIGHUP', 'SIGQUIT'] as const)('takes %s as a task stop too: the running call is cancelled, the cleanup calls served', async (signal) => {
    // qemu-server's archive_external dies "interrupted by signal" on INT, TERM, QUIT, HUP and
    // PIPE; a terminal hangup sends HUP to a CLI vzdump's process group, the host included
    const q = await startStorageDaemon({ size: 8 * MiB });
    const dir = await tempDir();
    let hostPid = 0;
    const run = await backupJob(q, dir, 'slow.mjs', (m) => {
      if (m.phase === 'backup_vm') hostPid = m.host_pid as number;
      if (m.log?.[1] === 'backup_vm of VM 100 started') process.kill(hostPid, signal);
      return undefined;
    });
    expect(run.done.error).toMatch(/^backup cancelled \[ERR_CANCELLED\]/);
    expect(run.logs.some(([, msg]) => /backup cleanup for external provider failed/.test(msg))).toBe(false);
    expect(run.done.job_error ?? null).toBeNull();
  });

  it('cancels the running call on SIGTERM to the host, which keeps serving the cleanup calls', async () => {
    const q = await startStorageDaemon({ size: 8 * MiB });
    const dir = await tempDir();
    let hostPid = 0;
    const run = await backupJob(q, dir, 'slow.mjs', (m) => {
      if (m.phase === 'backup_vm') hostPid = m.host_pid as number;
      if (m.log?.[1] === 'backup_vm of VM 100 started') process.kill(hostPid, 'SIGTERM'); // a task stop
      return undefined;
    });
    expect(run.done.error).toMatch(/^backup cancelled \[ERR_CANCELLED\]/);
    // the host's reason is the CancelledError the provider module imports: one copy of the classes
    expect(run.logs).toContainEqual(['info', "backup_vm saw the cancellation (the package's CancelledError: true)"]);
    expect(run.logs.some(([, msg]) => /backup cleanup for external provider failed/.test(msg))).toBe(false);
    expect(run.done.job_error ?? null).toBeNull();
    expect(gone(hostPid)).toBe(true); // it ended when the driver closed its input
  });
});

/**
 * The Perl bridge end to end: `perl -T` runs the stand-in for vzdump's and qmrestore's call
 * order (test/pve/driver.pl) against `PVE::BackupProvider::Plugin::NodeBridge` (perl/), which
 * starts `provider-host` (dist/cli/main.js) on a provider module (test/pve/providers/). QEMU's
 * part of a VM backup (backup access, NBD export) is done here, with this package's
 * `setupBackupAccess` on a real qemu-storage-daemon, and handed over as qemu-server does.
 * Needs `npm run build:ts` (the host runs from dist/).
 */
import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { afterEach, describe, expect, it } from 'vitest';

import { setupBackupAccess, teardownBackupAccess } from '../lib/qemu/backup-access.js';
import { gone, requireTool } from './helpers/tools.js';
import { nbdRead, nbdWrite, startStorageDaemon, stopAll, tempDir, type QemuInstance } from './helpers/qemu.js';

const MiB = 1024 * 1024;
const ROOT = path.resolve(import.meta.dirname, '..');
const STOREID = 'dir1';
const TARGET_ID = `snapshot-access:${STOREID}`;
const CONFIG = 'memory: 512\nvirtio0: local:100/vm-100-disk-0.qcow2,size=8M\n#qmdump#map:virtio0:disk0:local:qcow2:\n';

afterEach(async () => {
  await stopAll();
});

type Msg = {
  log?: [string, string];
  phase?: string;
  done?: { archive?: string; size?: number; error?: string | null; job_error?: string | null };
  [k: string]: unknown;
};

interface Run {
  messages: Msg[];
  logs: Array<[string, string]>;
  done: NonNullable<Msg['done']>;
  stderr: string;
  exitCode: number | null;
}

/** Runs the driver under `perl -T`; `onMessage` answers the phases that wait for the test (its return value is sent back as a line). */
async function drive(job: Record<string, unknown>, onMessage: (m: Msg) => Promise<object | undefined> | object | undefined = () => undefined): Promise<Run> {
  const perl = requireTool('perl', 'perl');
  requireTool('qemu-img', 'qemu-utils');
  await fs.access(path.join(ROOT, 'dist/cli/main.js')).catch(() => {
    throw new Error('dist/cli/main.js is missing: run npm run build:ts');
  });
  const child = spawn(perl, ['-T', '-I', path.join(ROOT, 'test/pve'), '-I', path.join(ROOT, 'perl'), path.join(ROOT, 'test/pve/driver.pl')], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  child.stdin.write(`${JSON.stringify(job)}\n`);
  const messages: Msg[] = [];
  for await (const line of createInterface({ input: child.stdout })) {
    const m = JSON.parse(line) as Msg;
    messages.push(m);
    const reply = await onMessage(m);
    if (reply !== undefined) child.stdin.write(`${JSON.stringify(reply)}\n`);
  }
  child.stdin.end();
  const exitCode = await exited;
  const done = messages.find((m) => m.done)?.done;
  if (!done) throw new Error(`the driver ended without a result (exit ${String(exitCode)}): ${stderr}`);
  return { messages, logs: messages.filter((m) => m.log).map((m) => m.log!), done, stderr, exitCode };
}

function bridge(provider: string, stateDir: string): Record<string, unknown> {
  return {
    provider: path.join(ROOT, 'test/pve/providers', provider),
    node: process.execPath,
    cli: path.join(ROOT, 'dist/cli/main.js'),
    env: { PVE_BACKUP_PROVIDER_STATE_DIR: stateDir },
  };
}

/** QEMU's part of a VM backup, as qemu-server's archive_external does it, for the driver's phases. */
function qemuPart(q: QemuInstance, fleece: string): (m: Msg) => Promise<object | undefined> {
  return async (m) => {
    if (m.phase === 'setup') {
      const incremental = (m.incremental ?? {}) as Record<string, string>;
      const any = Object.values(incremental).some((v) => v === 'new' || v === 'use');
      const access = await setupBackupAccess(q.qmp, {
        targetId: TARGET_ID,
        devices: ['disk0'],
        ...(any ? { bitmap: STOREID } : {}),
        fleecing: { dir: fleece },
        nbdServer: { path: q.nbdPath! },
      });
      const volumes: Record<string, object> = {};
      for (const d of access.devices) {
        volumes[d.device] = {
          size: String(d.size), // Perl scalars may be strings
          'nbd-path': access.socketPath,
          'bitmap-mode': d.bitmapMode,
          ...(d.bitmapName !== undefined && d.bitmapMode !== 'none' ? { 'bitmap-name': d.bitmapName } : {}),
        };
      }
      return { volumes };
    }
    if (m.phase === 'teardown') {
      await teardownBackupAccess(q.qmp, { targetId: TARGET_ID, success: m.success === true });
      return {};
    }
    return undefined;
  };
}

async function backupJob(q: QemuInstance, dir: string, provider: string, onMessage?: (m: Msg) => Promise<object | undefined> | object | undefined): Promise<Run> {
  const fleece = path.join(dir, 'fleece');
  await fs.mkdir(fleece, { recursive: true });
  const part = qemuPart(q, fleece);
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

describe('the Perl bridge under perl -T (stand-ins for vzdump and qmrestore)', () => {
  it('backs up a VM full, then incremental after guest writes, and restores both byte for byte', async () => {
    const q = await startStorageDaemon({ size: 8 * MiB });
    const dir = await tempDir();
    await fs.writeFile(path.join(dir, 'qemu-100.log'), 'INFO: vzdump log\n');
    const live = `nbd+unix:///live0?socket=${q.nbdPath!}`;
    await nbdWrite(live, 0x11, 0, 3 * MiB);
    await nbdWrite(live, 0x5a, 6 * MiB, 512 * 1024);
    const first = await nbdRead(live, dir);

    const full = await backupJob(q, dir, 'directory.mjs');
    expect(full.stderr).not.toMatch(/Insecure|tainted/);
    expect(full.done.error ?? null).toBeNull();
    expect(full.done.job_error ?? null).toBeNull();
    expect(full.exitCode).toBe(0);
    expect(full.done.archive).toMatch(/^[a-zA-Z0-9\-.+=_/:]+$/);
    expect(Number(full.done.size)).toBeGreaterThan(0);
    const setup1 = full.messages.find((m) => m.phase === 'setup')!;
    expect(setup1.mechanism).toBe('nbd');
    // the provider's log lines reach $log_function with their levels
    expect(full.logs.some(([l, msg]) => l === 'info' && msg.startsWith('creating '))).toBe(true);
    expect(full.logs.filter(([l]) => l === 'info').length).toBeGreaterThan(1);
    const hostPid = full.messages.find((m) => m.phase === 'backup_vm')!.host_pid as number;
    expect(gone(hostPid)).toBe(true); // the host ends with its job

    await new Promise((r) => setTimeout(r, 1100)); // a new backup id (one per second)
    await nbdWrite(live, 0x22, 1 * MiB, 1 * MiB);
    await nbdWrite(live, 0x33, 7 * MiB, 64 * 1024);
    const second = await nbdRead(live, dir);
    expect(second.equals(first)).toBe(false);

    const incr = await backupJob(q, dir, 'directory.mjs');
    expect(incr.done.error ?? null).toBeNull();
    expect(incr.done.job_error ?? null).toBeNull();
    const setup2 = incr.messages.find((m) => m.phase === 'setup')!;
    expect(setup2.incremental).toEqual({ disk0: 'use' });
    expect(incr.done.archive).not.toBe(full.done.archive);
    // the incremental image holds only the dirty clusters, on top of the full one
    expect(Number(incr.done.size)).toBeLessThan(Number(full.done.size));

    for (const [run, expected] of [
      [full, first],
      [incr, second],
    ] as const) {
      const target = path.join(dir, `restored-${expected === first ? 1 : 2}.raw`);
      // vzdump names the volume backup/<archive-name> (PVE::VZDump, the volid <storeid>:backup/<archive-name>)
      const r = await restore(dir, `backup/${run.done.archive!}`, target);
      expect(r.stderr).not.toMatch(/Insecure|tainted/);
      expect(r.done.error ?? null).toBeNull();
      const configs = r.messages.find((m) => m.phase === 'configs')!;
      expect(configs.config).toBe(CONFIG);
      expect(configs.devices).toEqual({ disk0: { size: 8 * MiB } });
      const restored = await fs.readFile(target);
      expect(restored.equals(expected)).toBe(true);
    }
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
    expect(run.logs).toContainEqual(['info', 'backup_vm saw the cancellation']);
    expect(run.logs.some(([, msg]) => /backup cleanup for external provider failed/.test(msg))).toBe(false);
    expect(run.done.job_error ?? null).toBeNull();
    expect(gone(hostPid)).toBe(true); // it ended when the driver closed its input
  });
});

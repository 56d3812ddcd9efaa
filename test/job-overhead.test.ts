/**
 * The fixed cost of a whole VM backup job: how many QMP commands one backup of a one-disk VM sends
 * (full, then incremental), on stock QEMU (`qemu-system-x86_64 -S`, standard commands) and on a
 * scripted Proxmox QMP peer (`backup-access-setup`), and the per-guest step times the job result
 * carries.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { runBackupJob, type VmGuest } from '../lib/index.js';
import { QmpClient } from '../lib/qmp/client.js';
import { GUEST_STEPS } from '../lib/job/steps.js';
import { setupBackupAccess, teardownBackupAccess } from '../lib/qemu/backup-access.js';
import { currentOwner } from '../lib/owner.js';
import { closePeers, proxmoxPeer } from './helpers/proxmox-peer.js';
import { startStorageDaemon, startVm, stopAll, tempDir, vmWrite } from './helpers/qemu.js';
import { RecordingProviderV2 } from './helpers/recording-provider.js';

const MiB = 2 ** 20;

afterEach(async () => {
  await closePeers();
  await stopAll();
});

/** Records every command sent through `qmp` (by name, in order) until `stop()`. */
function countCommands(qmp: QmpClient): { commands: string[]; stop(): void } {
  const commands: string[] = [];
  const orig = qmp.execute.bind(qmp);
  qmp.execute = ((command: string, ...rest: unknown[]) => {
    commands.push(command);
    return (orig as (...a: unknown[]) => Promise<unknown>)(command, ...rest);
  }) as QmpClient['execute'];
  return { commands, stop: () => void (qmp.execute = orig) };
}

function tally(commands: string[]): Record<string, number> {
  const t: Record<string, number> = {};
  for (const c of commands) t[c] = (t[c] ?? 0) + 1;
  return t;
}

describe('QMP commands of a one-disk VM backup job', () => {
  it('stock QEMU (qemu-system-x86_64 -S, standard commands): full and incremental stay within the bound, each block query at most twice', async () => {
    const q = await startVm({ size: 8 * MiB });
    const store = await tempDir();
    await vmWrite(q, 'virtio0', 0x11, 0, MiB);
    const p = new RecordingProviderV2({ storeid: 'store1', scfg: {}, log: () => {} }, { storeDir: store });
    const guest: VmGuest = { vmid: 100, type: 'qemu', qmp: q.qmp, devices: ['virtio0'], config: 'name: vm\n' };
    const runs: string[][] = [];
    for (const round of [0, 1]) {
      if (round === 1) await vmWrite(q, 'virtio0', 0x22, 4 * MiB, 64 * 1024);
      const rec = countCommands(q.qmp);
      const r = await runBackupJob({ provider: p, storeid: 'store1', guests: [guest], tmpdir: store });
      rec.stop();
      expect(r.guests[0]!.error).toBeUndefined();
      runs.push(rec.commands);
    }
    const [full, inc] = runs as [string[], string[]];
    expect(p.calls.filter((c) => c[0] === 'backupVm').map((c) => (c[3] as Record<string, { bitmapAction: string }>)['virtio0']!.bitmapAction)).toEqual(['new', 'used']);
    // Expected, full (26; 38 before): query-block + query-named-block-nodes (the one device lookup,
    // handed on to setup), query-proxmox-support (once per connection: not in the incremental),
    // qom-get (a stale access?), object-add (claim), blockdev-add (fleecing), query-status,
    // transaction (freeze the bitmaps), blockdev-add (copy-before-write), qom-set (filter in),
    // blockdev-add (snapshot-access), nbd-server-start, qom-set (record: own NBD server),
    // block-export-add; teardown: qom-get, block-export-del, query-block-exports (then
    // BLOCK_EXPORT_DELETED events, no polling), nbd-server-stop, query-named-block-nodes,
    // query-block, blockdev-del (snapshot), qom-set (filter out), blockdev-del (filter),
    // blockdev-del (fleecing; its file node goes with it), transaction (merge), object-del.
    // The incremental adds one query-named-block-nodes (QEMU's dirty count for the log line, one
    // query for all devices) and drops query-proxmox-support.
    for (const [run, bound, nodeQueries] of [[full, 26, 2], [inc, 26, 3]] as const) {
      const t = tally(run);
      expect(run.length, JSON.stringify(t)).toBeLessThanOrEqual(bound + 1); // + 1: a second export listing should QEMU be slow to drop it
      expect(t['query-named-block-nodes'] ?? 0).toBeLessThanOrEqual(nodeQueries);
      expect(t['query-block'] ?? 0).toBeLessThanOrEqual(2);
      expect(t['qom-get'] ?? 0).toBeLessThanOrEqual(2);
      expect(t['query-block-exports'] ?? 0).toBeLessThanOrEqual(2);
      expect(t['query-commands'] ?? 0).toBe(0);
    }
    expect(inc.filter((c) => c === 'query-proxmox-support')).toEqual([]);
    console.log('stock QEMU full', full.length, JSON.stringify(tally(full)));
    console.log('stock QEMU incremental', inc.length, JSON.stringify(tally(inc)));
  });

  it('Proxmox QEMU (scripted Proxmox QMP peer): full and incremental stay within the bound, each block query at most twice', async () => {
    const peer = await proxmoxPeer('devices');
    const work = await tempDir();
    const p = new RecordingProviderV2({ storeid: 'store1', scfg: {}, log: () => {} }, { incremental: { 'drive-scsi0': 'use' } });
    const runs: string[][] = [];
    for (const round of [0, 1]) {
      void round;
      peer.calls.length = 0;
      const r = await runBackupJob({ provider: p, storeid: 'store1', tmpdir: work, guests: [{ vmid: 100, type: 'qemu', qmp: peer.path, devices: ['drive-scsi0'], config: 'name: vm\n' }] });
      expect(r.guests[0]!.error).toBeUndefined();
      runs.push(peer.calls.map((c) => c.cmd));
    }
    const [full, inc] = runs as [string[], string[]];
    expect(p.calls.filter((c) => c[0] === 'backupVm').map((c) => (c[3] as Record<string, { bitmapAction: string }>)['drive-scsi0']!.bitmapAction)).toEqual(['new', 'used']);
    // Expected, full (20; 26 before): query-block + query-named-block-nodes (the one device lookup,
    // handed on to setup), query-proxmox-support, qom-get (a stale access?), query-qmp-schema
    // (which form of backup-access-setup; both once per connection), object-add (claim),
    // blockdev-add (<device>-fleecing, before the setup as qemu-server's
    // VZDump/QemuServer.pm attaches it), backup-access-setup, nbd-server-start, qom-set (record),
    // block-export-add, block-dirty-bitmap-add (the anchor, first backup only); teardown: qom-get,
    // block-export-del, query-block-exports, nbd-server-stop, backup-access-teardown,
    // query-named-block-nodes, blockdev-del (fleecing), object-del. The incremental has no anchor
    // to add and one query-named-block-nodes for the dirty count.
    for (const run of [full, inc]) {
      const t = tally(run);
      expect(run.length, JSON.stringify(t)).toBeLessThanOrEqual(20);
      expect(t['query-named-block-nodes'] ?? 0).toBeLessThanOrEqual(3);
      expect(t['query-block'] ?? 0).toBeLessThanOrEqual(1);
      expect(t['qom-get'] ?? 0).toBeLessThanOrEqual(2);
      expect(t['query-block-exports'] ?? 0).toBe(1);
      expect(t['query-qmp-schema'] ?? 0).toBeLessThanOrEqual(1);
    }
    console.log('proxmox full', full.length, JSON.stringify(tally(full)));
    console.log('proxmox incremental', inc.length, JSON.stringify(tally(inc)));
  });
});

describe('step times of a guest backup', () => {
  it('the job result carries each step of a VM backup (each >= 0, their sum within the total), the task log ends with them', async () => {
    const q = await startVm({ size: 8 * MiB });
    const store = await tempDir();
    await vmWrite(q, 'virtio0', 0x11, 0, MiB);
    const p = new RecordingProviderV2({ storeid: 'store1', scfg: {}, log: () => {} }, { storeDir: store });
    const guest: VmGuest = { vmid: 100, type: 'qemu', qmp: q.qmpPath, devices: ['virtio0'], config: 'name: vm\n' };
    await q.qmp.close(); // QEMU's monitor serves one client: the job connects to the socket itself
    for (const round of ['full', 'incremental']) {
      if (round === 'incremental') {
        const c = await QmpClient.connect(q.qmpPath);
        await vmWrite({ ...q, qmp: c }, 'virtio0', 0x22, 4 * MiB, 64 * 1024);
        await c.close();
      }
      const r = await runBackupJob({ provider: p, storeid: 'store1', guests: [guest], tmpdir: store });
      const g = r.guests[0]!;
      expect(g.error).toBeUndefined();
      const steps = g.steps!;
      expect(Object.keys(steps).sort()).toEqual([...GUEST_STEPS, 'total'].sort());
      for (const name of ['qmp-connect', 'setup', 'bitmap-query', 'provider', 'teardown', 'task-log', 'total'] as const) {
        expect(steps[name], name).toBeGreaterThanOrEqual(0);
      }
      const sum = GUEST_STEPS.reduce((a, s) => a + (steps[s] ?? 0), 0);
      expect(sum).toBeLessThanOrEqual(steps.total + 0.01);
      expect(steps.provider).toBeGreaterThan(0);
      // the task log's last line: every step but the handling of the log itself
      expect(g.log.at(-1)).toMatch(/INFO: step times: prepare [\d.]+ ms, qmp-connect [\d.]+ ms, setup [\d.]+ ms, bitmap-query [\d.]+ ms, provider [\d.]+ ms, teardown [\d.]+ ms, finish [\d.]+ ms, total [\d.]+ ms$/);
      console.log(`step times (ms), ${round} backup of an 8 MiB disk on qemu-system-x86_64 -S:`, JSON.stringify(steps));
    }
  });

  it('backup --json (a stopped VM: qemu-storage-daemon started in qmp-connect) prints them, and the core summary of each disk copy', async () => {
    const dir = await tempDir();
    const disk = path.join(dir, 'disk0.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', disk, String(8 * MiB)]);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', disk]);
    const cli = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');
    const r = spawnSync(process.execPath, [cli, 'backup', '--store', path.join(dir, 'store'), '--vmid', '100', '--disk', `disk0=${disk}`, '--json'], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const { steps, copies } = JSON.parse(r.stdout) as { steps: Record<string, number>; copies: Record<string, { bytesRead: number; seconds: number }> };
    expect(Object.keys(steps).sort()).toEqual([...GUEST_STEPS, 'total'].sort());
    expect(steps['qmp-connect']).toBeGreaterThan(0);
    // and the core's own summary of each disk's copy: what was read, in how long (seconds)
    expect(Object.keys(copies)).toEqual(['disk0']);
    expect(copies.disk0!.bytesRead).toBe(MiB);
    expect(copies.disk0!.seconds).toBeGreaterThan(0);
    expect(copies.disk0!.seconds * 1000).toBeLessThanOrEqual(steps.provider!);
  });

  it('a container backup has its steps too, without the QEMU ones', async () => {
    const store = await tempDir();
    const root = await tempDir();
    const p = new RecordingProviderV2({ storeid: 'store1', scfg: {}, log: () => {} }, {});
    const r = await runBackupJob({ provider: p, storeid: 'store1', tmpdir: store, guests: [{ vmid: 200, type: 'lxc', rootdir: root, config: 'arch: amd64\n' }] });
    const steps = r.guests[0]!.steps!;
    expect(r.guests[0]!.error).toBeUndefined();
    expect(Object.keys(steps).sort()).toEqual(['finish', 'prepare', 'provider', 'task-log', 'total']);
    expect(GUEST_STEPS.reduce((a, s) => a + (steps[s] ?? 0), 0)).toBeLessThanOrEqual(steps.total + 0.01);
  });
});

describe('the access record in QEMU', () => {
  it('is written compressed (QEMU reads a command byte by byte), and a plain JSON record of an earlier version is still read', async () => {
    const q = await startStorageDaemon();
    const fleece = await tempDir();
    // an earlier version's record (plain JSON) of an access whose owner is gone: found and removed
    const gone = { ...currentOwner(), pid: 2 ** 22 + 1, start: '1' };
    const old = { v: 1, targetId: 'snapshot-access:old', backend: 'upstream', socketPath: '/nonexistent/nbd.sock', ownNbd: false, devices: [], owner: gone };
    await q.qmp.execute('object-add', { 'qom-type': 'secret', id: 'pvebp-access', format: 'raw', data: JSON.stringify(old) });
    const a = await setupBackupAccess(q.qmp, { targetId: 'snapshot-access:store1', bitmap: 'store1', devices: ['disk0'], fleecing: { dir: fleece }, nbdServer: { path: q.nbdPath! } });
    expect(a.recovered).toEqual([`access for target 'snapshot-access:old' () left by pid ${2 ** 22 + 1} on ${gone.host}`]);
    const data = await q.qmp.execute<string>('qom-get', { path: '/objects/pvebp-access', property: 'data' });
    expect(data.startsWith('z:')).toBe(true);
    expect(data.length).toBeLessThan(600);
    await teardownBackupAccess(q.qmp, { targetId: 'snapshot-access:store1', success: true });
    await expect(q.qmp.execute('qom-get', { path: '/objects/pvebp-access', property: 'data' })).rejects.toMatchObject({ code: 'ERR_QMP' });
  });
});

/**
 * The job runner's call order against recording providers of both generations: two stopped VMs
 * (the runner serves their disk images with a real qemu-storage-daemon) and a container.
 */
import { mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { afterEach, describe, expect, it } from 'vitest';

import { JobAbortedError, runBackupJob, type BackupJobResult, type Guest, type LogLevel, type ProviderContext } from '../lib/index.js';
import { createImage } from './helpers/images.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { RecordingProviderV1, RecordingProviderV2, type RecordingOptions } from './helpers/recording-provider.js';

const MiB = 2 ** 20;
const ctx = { storeid: 'store1', scfg: {}, log: () => {} };
const IDMAP = [
  { type: 'u' as const, container: 0, host: 100000, length: 65536 },
  { type: 'g' as const, container: 0, host: 100000, length: 65536 },
];
const FW = '[OPTIONS]\nenable: 1\n';

afterEach(async () => {
  await stopAll();
});

async function setup(): Promise<{ dir: string; guests: Guest[]; tmp: string }> {
  const dir = await tempDir();
  createImage(path.join(dir, 'vm100-disk0.qcow2'), MiB, 'qcow2');
  createImage(path.join(dir, 'vm100-disk1.raw'), 256 * 1024, 'raw');
  createImage(path.join(dir, 'vm101-disk0.qcow2'), MiB, 'qcow2');
  const rootfs = path.join(dir, 'rootfs');
  mkdirSync(path.join(rootfs, 'etc'), { recursive: true });
  writeFileSync(path.join(rootfs, 'etc', 'hostname'), 'ct200\n');
  const tmp = path.join(dir, 'tmp');
  mkdirSync(tmp);
  const guests: Guest[] = [
    {
      vmid: 100,
      type: 'qemu',
      qmp: {
        disks: [
          { device: 'disk0', file: path.join(dir, 'vm100-disk0.qcow2'), format: 'qcow2' },
          { device: 'disk1', file: path.join(dir, 'vm100-disk1.raw'), format: 'raw' },
        ],
      },
      config: 'name: vm100\n',
      firewallConfig: FW,
    },
    { vmid: 101, type: 'qemu', qmp: { disks: [{ device: 'disk0', file: path.join(dir, 'vm101-disk0.qcow2'), format: 'qcow2' }] }, config: 'name: vm101\n' },
    { vmid: 200, type: 'lxc', rootdir: rootfs, config: 'hostname: ct200\n', idMap: IDMAP, excludePaths: ['/tmp/**'] },
  ];
  return { dir, guests, tmp };
}

const hooks = (volname: string, notes: string, vmid: number, vmtype: string): unknown[][] => [
  ['storage.setNotes', volname, notes],
  ['storage.setProtected', volname, true],
  ['storage.prune', { vmid, vmtype, keep: { keepLast: 2 } }],
];
const jobOptions = { notesTemplate: '{{guestname}} {{vmid}}', protected: true, prune: { keepLast: 2 } };

function nbd(vmid: number, device: string, size: number, mode = 'none', action = 'not-used'): unknown[] {
  return ['backupNbd', vmid, device, '<nbd.sock>', mode, undefined, 0, { bitmapAction: action, size, nbdUri: `nbd:${device}` }];
}

function v1Guest(vmid: number, type: 'qemu' | 'lxc', seq: number, firewall: boolean, data: unknown[][], end: unknown[][]): unknown[][] {
  return [
    ['backupStart', vmid, type],
    ['backupGetTarget', vmid, type],
    ['backupGuestConfig', vmid, type === 'qemu' ? '<qemu-server.conf>' : '<pct.conf>'],
    ...(firewall ? [['backupFirewallConfig', vmid, type === 'qemu' ? '<qemu-server.fw>' : '<pct.fw>']] : []),
    ['backupGetMechanism', vmid, type],
    ...data,
    ...end,
    ['backupHandleLogFile', vmid, '<task.log>'],
  ];
}

describe('job runner, seed-generation provider (V1)', () => {
  it('two VMs and a container: exact call order and arguments; notes, protected, prune', async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV1(ctx);
    const jobLines: Array<[LogLevel, string]> = [];
    const res = await runBackupJob({ provider: p, storeid: 'store1', guests, tmpdir: tmp, log: (l, m) => jobLines.push([l, m]), ...jobOptions });
    expect(res.guests.map((g) => [g.vmid, g.status, g.archiveName])).toEqual([
      [100, 'ok', 'backup/qemu-100-1'],
      [101, 'ok', 'backup/qemu-101-2'],
      [200, 'ok', 'backup/lxc-200-3'],
    ]);
    expect(res.ok).toBe(true);
    expect(p.calls).toEqual([
      ['jobStart', 'number'],
      ...v1Guest(100, 'qemu', 1, true, [nbd(100, 'disk0', MiB), nbd(100, 'disk1', 256 * 1024)], [...hooks('backup/qemu-100-1', 'vm100 100', 100, 'qemu'), ['backupGetTaskSize', 100], ['backupEnd', 100]]),
      ...v1Guest(101, 'qemu', 2, false, [nbd(101, 'disk0', MiB)], [...hooks('backup/qemu-101-2', 'vm101 101', 101, 'qemu'), ['backupGetTaskSize', 101], ['backupEnd', 101]]),
      ...v1Guest(200, 'lxc', 3, false, [['backupDirectory', 200, '<rootfs>', IDMAP, ['/tmp/**'], ['.'], 0]], [...hooks('backup/lxc-200-3', 'ct200 200', 200, 'lxc'), ['backupEnd', 200]]),
      ['jobEnd'],
    ]);
    // the per-guest task log: timestamps and levels, handed to the provider
    const log = p.store.logs.get(100)!;
    expect(log).toMatch(/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO: Starting Backup of VM 100 \(qemu\)$/m);
    expect(log).toMatch(/INFO: include disk 'disk0' 1.00 MiB$/m);
    expect(log).toMatch(/INFO: backup size: /m);
    expect(log).toMatch(/INFO: prune older backups with retention: keepLast=2$/m);
    expect(res.guests[0]!.log.join('\n')).toContain('Finished Backup of VM 100');
    expect(jobLines.some(([l, m]) => l === 'info' && m.startsWith('Starting Backup of VM 100'))).toBe(true);
    // nothing is left in the temporary directory
    expect(readdirSync(tmp)).toEqual([]);
  });

  it('one guest failing does not stop the others; its log and abort are recorded', async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV1(ctx, { bitmapId: 'b1', fail: { backupNbd: { message: 'disk full', when: (vmid) => vmid === 101 } }, storage: false });
    const res = await runBackupJob({ provider: p, storeid: 'store1', guests, tmpdir: tmp, notesTemplate: 'x' });
    expect(res.ok).toBe(false);
    expect(res.guests.map((g) => g.status)).toEqual(['ok', 'failed', 'ok']);
    expect(res.guests[1]!.error?.message).toBe('disk full');
    expect(p.calls).toEqual([
      ['jobStart', 'number'],
      ...v1Guest(100, 'qemu', 1, true, [nbd(100, 'disk0', MiB, 'new', 'new'), nbd(100, 'disk1', 256 * 1024, 'new', 'new')], [['backupGetTaskSize', 100], ['backupEnd', 100]]),
      ...v1Guest(101, 'qemu', 2, false, [nbd(101, 'disk0', MiB, 'new', 'new')], [['backupAbort', 101, 'Error(disk full)']]),
      ...v1Guest(200, 'lxc', 3, false, [['backupDirectory', 200, '<rootfs>', IDMAP, ['/tmp/**'], ['.'], 0]], [['backupEnd', 200]]),
      ['jobEnd'],
    ]);
    expect(p.store.logs.get(101)).toMatch(/ERROR: Backup of VM 101 failed - disk full$/m);
    expect(p.store.logs.get(100)).toMatch(/INFO: disk0: dirty-bitmap status: created new$/m);
    // a job option the provider cannot do is a warning
    expect(res.guests[0]!.warnings).toEqual(["backup provider 'recording-v1' cannot set notes: skipped"]);
  });

  it('SIGINT (handleSignals) takes the abort path: backupAbort, log, jobAbort; later guests skipped', async () => {
    const { guests, tmp } = await setup();
    const before = process.listenerCount('SIGINT');
    const p = new RecordingProviderV1(ctx, {
      onCall: async (m, args) => {
        if (m === 'backupNbd' && args[0] === 101) {
          process.kill(process.pid, 'SIGINT');
          await sleep(300);
        }
      },
    });
    const err = (await runBackupJob({ provider: p, storeid: 'store1', guests, tmpdir: tmp, handleSignals: true }).catch((e: unknown) => e)) as JobAbortedError;
    expect(err).toBeInstanceOf(JobAbortedError);
    expect(err.code).toBe('ERR_JOB_ABORTED');
    expect(err.message).toBe('interrupted by signal SIGINT');
    const result = err.result as BackupJobResult;
    expect(result.guests.map((g) => g.status)).toEqual(['ok', 'failed', 'skipped']);
    expect(p.calls.slice(-4)).toEqual([
      nbd(101, 'disk0', MiB),
      ['backupAbort', 101, 'Error(interrupted by signal SIGINT)'],
      ['backupHandleLogFile', 101, '<task.log>'],
      ['jobAbort', 'Error(interrupted by signal SIGINT)'],
    ]);
    expect(p.calls.some((c) => c[1] === 200)).toBe(false);
    expect(process.listenerCount('SIGINT')).toBe(before);
    expect(readdirSync(tmp)).toEqual([]);
  });

  it('a provider factory that fails aborts the job; a factory class is constructed with the context', async () => {
    const { guests, tmp } = await setup();
    const err = await runBackupJob({
      provider: () => {
        throw new Error('no credentials');
      },
      storeid: 'store1',
      guests,
      tmpdir: tmp,
    }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_JOB_ABORTED', message: 'backup job aborted: creating the backup provider failed: no credentials' });

    let made: RecordingProviderV1 | undefined;
    class Made extends RecordingProviderV1 {
      constructor(c: ProviderContext) {
        super(c);
        made = this;
      }
      override async backupGuestConfig(vmid: number, filename: string): Promise<void> {
        this.log.warn('from the provider');
        await super.backupGuestConfig(vmid, filename);
      }
    }
    const res = await runBackupJob({ provider: Made, storeid: 'store1', guests: guests.slice(2), tmpdir: tmp });
    expect(res.ok).toBe(true);
    expect(made!.storeid).toBe('store1');
    // provider log lines land in the guest's task log
    expect(res.guests[0]!.warnings).toEqual(['from the provider']);
  });

  it('jobStart failing aborts the job with jobAbort and no guest is touched', async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV1(ctx, { fail: { jobStart: { message: 'server down' } } });
    const err = await runBackupJob({ provider: p, storeid: 'store1', guests, tmpdir: tmp }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_JOB_ABORTED', message: 'backup job aborted: server down' });
    expect(p.calls).toEqual([['jobStart', 'number'], ['jobAbort', 'Error(server down)']]);
  });

  it('an unsupported or missing mechanism fails that guest clearly', async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV1(ctx, { mechanismOverride: { lxc: undefined, qemu: 'rsync' } });
    const res = await runBackupJob({ provider: p, storeid: 'store1', guests: [guests[1]!, guests[2]!], tmpdir: tmp });
    expect(res.guests.map((g) => [g.status, g.error?.message, (g.error as { code?: string })?.code])).toEqual([
      ['failed', "mechanism 'rsync' requested by backup provider 'recording-v1' is not supported for VMs", 'ERR_MECHANISM'],
      ['failed', "backup provider 'recording-v1' returned no backup mechanism for containers", 'ERR_MECHANISM'],
    ]);
    expect(p.calls.filter((c) => c[0] === 'backupAbort').length).toBe(2);
  });
});

function v2Vm(vmid: number, seq: number, config: string, devices: Record<string, number>, fw: boolean, end: unknown[][], mode = 'new'): unknown[][] {
  const volumes: Record<string, unknown> = {};
  for (const [d, size] of Object.entries(devices)) volumes[d] = { size, bitmapMode: mode, bitmapAction: mode, nbdPath: '<nbd.sock>', nbdUri: `nbd:${d}` };
  const sizes: Record<string, unknown> = {};
  for (const [d, size] of Object.entries(devices)) sizes[d] = { size };
  return [
    ['backupInit', vmid, 'qemu', 'number'],
    ['backupGetMechanism', vmid, 'qemu'],
    ['backupVmQueryIncremental', vmid, sizes],
    ['backupVm', vmid, config, volumes, { mechanism: 'nbd', archiveName: `qemu-${vmid}-${seq}`, ...(fw ? { firewallConfig: FW } : {}) }],
    ...end,
    ['backupHandleLogFile', vmid, '<task.log>'],
  ];
}

describe('job runner, Proxmox VE 8.4 provider (V2) through the adapter', () => {
  const ctInfo = { directory: '<rootfs>', sources: ['.'], backupUserId: 100000, idMap: IDMAP, archiveName: 'lxc-200-3' };
  const ct = (end: unknown[][]): unknown[][] => [
    ['backupInit', 200, 'lxc', 'number'],
    ['backupGetMechanism', 200, 'lxc'],
    ['backupContainerPrepare', 200, ctInfo],
    ['backupContainer', 200, 'hostname: ct200\n', ['/tmp/**'], ctInfo],
    ...end,
    ['backupHandleLogFile', 200, '<task.log>'],
  ];

  it('two VMs and a container: exact call order and arguments (notes, protected, prune, then backupCleanup)', async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV2(ctx);
    const res = await runBackupJob({ provider: p, storeid: 'store1', guests, tmpdir: tmp, ...jobOptions });
    expect(res.ok).toBe(true);
    expect(p.calls).toEqual([
      ['jobInit', 'number'],
      ...v2Vm(100, 1, 'name: vm100\n', { disk0: MiB, disk1: 256 * 1024 }, true, [...hooks('backup/qemu-100-1', 'vm100 100', 100, 'qemu'), ['backupCleanup', 100, 'qemu', true, {}]]),
      ...v2Vm(101, 2, 'name: vm101\n', { disk0: MiB }, false, [...hooks('backup/qemu-101-2', 'vm101 101', 101, 'qemu'), ['backupCleanup', 101, 'qemu', true, {}]]),
      ...ct([...hooks('backup/lxc-200-3', 'ct200 200', 200, 'lxc'), ['backupCleanup', 200, 'lxc', true, {}]]),
      ['jobCleanup'],
    ]);
    expect(res.guests.map((g) => g.size)).toEqual([4096, 4096, 4096]); // backupCleanup's stats.archiveSize
  });

  it("volume names are backup/<archive name>, as vzdump builds them; archive names may contain '='", async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV2(ctx);
    const orig = p.backupInit.bind(p);
    p.backupInit = async (vmid, vmtype, t) => ({ archiveName: `${(await orig(vmid, vmtype, t)).archiveName}=nightly` });
    const res = await runBackupJob({ provider: p, storeid: 'store1', guests: [guests[2]!], tmpdir: tmp, ...jobOptions });
    expect(res.guests[0]).toMatchObject({ status: 'ok', archiveName: 'lxc-200-1=nightly', volname: 'backup/lxc-200-1=nightly' });
    // the storage side gets what vzdump hands update_volume_attribute and prune_backups
    expect(p.calls.filter((c) => c[0].startsWith('storage.set')).map((c) => c[1])).toEqual(['backup/lxc-200-1=nightly', 'backup/lxc-200-1=nightly']);
  });

  it('one guest failing: backupCleanup(false, { error }) and the others go on', async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV2(ctx, { fail: { backupVm: { message: 'disk full', when: (vmid) => vmid === 101 } }, storage: false });
    const res = await runBackupJob({ provider: p, storeid: 'store1', guests, tmpdir: tmp });
    expect(res.guests.map((g) => g.status)).toEqual(['ok', 'failed', 'ok']);
    expect(p.calls).toEqual([
      ['jobInit', 'number'],
      ...v2Vm(100, 1, 'name: vm100\n', { disk0: MiB, disk1: 256 * 1024 }, true, [['backupCleanup', 100, 'qemu', true, {}]]),
      ...v2Vm(101, 2, 'name: vm101\n', { disk0: MiB }, false, [['backupCleanup', 101, 'qemu', false, { error: 'disk full' }]]),
      ...ct([['backupCleanup', 200, 'lxc', true, {}]]),
      ['jobCleanup'],
    ]);
  });

  it('an AbortSignal takes the abort path: backupCleanup(false), jobCleanup, later guests skipped', async () => {
    const { guests, tmp } = await setup();
    const ac = new AbortController();
    const opts: RecordingOptions = {
      onCall: (m, args) => {
        if (m === 'backupVm' && args[0] === 101) ac.abort(new Error('operator said stop'));
      },
    };
    const p = new RecordingProviderV2(ctx, opts);
    const err = (await runBackupJob({ provider: p, storeid: 'store1', guests, tmpdir: tmp, signal: ac.signal }).catch((e: unknown) => e)) as JobAbortedError;
    expect(err).toMatchObject({ code: 'ERR_JOB_ABORTED', message: 'backup job aborted' });
    expect((err.cause as Error).message).toBe('operator said stop');
    expect((err.result as BackupJobResult).guests.map((g) => g.status)).toEqual(['ok', 'failed', 'skipped']);
    expect(p.calls.slice(-3)).toEqual([['backupCleanup', 101, 'qemu', false, { error: 'backup job aborted' }], ['backupHandleLogFile', 101, '<task.log>'], ['jobCleanup']]);
  });

  // pve-manager VZDump.pm exec_backup_task: notes are in an eval (warn), protected and prune die
  // inside the guest's eval, so the guest fails and backup_cleanup(0, { error }) follows.
  const ct200 = (g: Guest[]): Guest[] => [g[2]!];
  it('failing notes only warn; the guest succeeds and backupCleanup(true) follows the other hooks', async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV2(ctx, { fail: { 'storage.setNotes': { message: 'notes store read-only' } } });
    const res = await runBackupJob({ provider: p, storeid: 'store1', guests: ct200(guests), tmpdir: tmp, ...jobOptions });
    expect(res.guests[0]).toMatchObject({ status: 'ok', warnings: ['unable to add notes to backup - notes store read-only'] });
    expect(p.calls.slice(5).map((c) => c[0])).toEqual(['storage.setNotes', 'storage.setProtected', 'storage.prune', 'backupCleanup', 'backupHandleLogFile', 'jobCleanup']);
  });

  it('a failing protected flag fails the guest: no prune, backupCleanup(false, { error }), log file, jobCleanup', async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV2(ctx, { fail: { 'storage.setProtected': { message: 'too many protected backups' } } });
    const res = await runBackupJob({ provider: p, storeid: 'store1', guests: ct200(guests), tmpdir: tmp, ...jobOptions });
    expect(res.ok).toBe(false);
    expect(res.guests[0]!.status).toBe('failed');
    expect(res.guests[0]!.error).toMatchObject({ code: 'ERR_STORAGE_HOOK', hook: 'protected', message: 'unable to set protected flag - too many protected backups' });
    expect(p.calls.slice(5)).toEqual([
      ['storage.setNotes', 'backup/lxc-200-1', 'ct200 200'],
      ['storage.setProtected', 'backup/lxc-200-1', true],
      ['backupCleanup', 200, 'lxc', false, { error: 'unable to set protected flag - too many protected backups' }],
      ['backupHandleLogFile', 200, '<task.log>'],
      ['jobCleanup'],
    ]);
  });

  it('a failing prune fails the guest, and so does protected asked of a provider without setProtected', async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV2(ctx, { fail: { 'storage.prune': { message: 'store offline' } } });
    const res = await runBackupJob({ provider: p, storeid: 'store1', guests: ct200(guests), tmpdir: tmp, ...jobOptions });
    expect(res.guests[0]!.error).toMatchObject({ code: 'ERR_STORAGE_HOOK', hook: 'prune', message: 'unable to prune older backups - store offline' });
    expect(p.calls.slice(7).map((c) => c.slice(0, 4))).toEqual([['storage.prune', { vmid: 200, vmtype: 'lxc', keep: { keepLast: 2 } }], ['backupCleanup', 200, 'lxc', false], ['backupHandleLogFile', 200, '<task.log>'], ['jobCleanup']]);
    const bare = new RecordingProviderV2(ctx, { storage: false });
    const res2 = await runBackupJob({ provider: bare, storeid: 'store1', guests: ct200(guests), tmpdir: tmp, protected: true });
    expect(res2.guests[0]!.error).toMatchObject({ code: 'ERR_NOT_IMPLEMENTED' });
    expect(bare.calls.slice(-3).map((c) => c.slice(0, 4))).toEqual([['backupCleanup', 200, 'lxc', false], ['backupHandleLogFile', 200, '<task.log>'], ['jobCleanup']]);
  });

  it('backupCleanup(true) failing fails the guest and is followed by backupCleanup(false, { error })', async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV2(ctx, { fail: { backupCleanup: { message: 'upload not finalised', when: (_v, _t, success) => success === true } } });
    const res = await runBackupJob({ provider: p, storeid: 'store1', guests: ct200(guests), tmpdir: tmp });
    expect(res.guests[0]).toMatchObject({ status: 'failed', error: { message: 'upload not finalised' } });
    expect(p.calls.slice(-4)).toEqual([
      ['backupCleanup', 200, 'lxc', true, {}],
      ['backupCleanup', 200, 'lxc', false, { error: 'upload not finalised' }],
      ['backupHandleLogFile', 200, '<task.log>'],
      ['jobCleanup'],
    ]);
  });

  // pve-manager VZDump.pm exec_backup_task: backup_handle_log_file runs outside any eval, so its
  // die escapes the guest and aborts the whole job (docs/pve-bridge-notes.md 3.3 step 7)
  it('a failing backupHandleLogFile aborts the job: later guests are skipped, jobCleanup runs, ERR_JOB_ABORTED with the cause', async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV2(ctx, { fail: { backupHandleLogFile: { message: 'log store gone', when: (vmid) => vmid === 101 } } });
    const err = (await runBackupJob({ provider: p, storeid: 'store1', guests, tmpdir: tmp }).catch((e: unknown) => e)) as JobAbortedError;
    expect(err).toBeInstanceOf(JobAbortedError);
    expect(err).toMatchObject({ code: 'ERR_JOB_ABORTED', message: 'backup job aborted: log store gone' });
    expect((err.cause as Error).message).toBe('log store gone');
    // the guest whose log failed was backed up; the container after it never started
    expect((err.result as BackupJobResult).guests.map((g) => g.status)).toEqual(['ok', 'ok', 'skipped']);
    expect(p.calls.slice(-3)).toEqual([['backupCleanup', 101, 'qemu', true, {}], ['backupHandleLogFile', 101, '<task.log>'], ['jobCleanup']]);
    expect(p.calls.some((c) => c[1] === 200)).toBe(false);
  });

  it("a provider answering 'none' for a device (qemu-server accepts it) backs it up without a bitmap", async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV2(ctx, { incremental: { disk0: 'none', disk1: 'new' } });
    const res = await runBackupJob({ provider: p, storeid: 'store1', guests: [guests[0]!], tmpdir: tmp });
    expect(res.guests[0]!.status).toBe('ok');
    const vm = p.calls.find((c) => c[0] === 'backupVm')!;
    expect(vm[3]).toEqual({
      disk0: { size: MiB, bitmapMode: 'none', bitmapAction: 'not-used', nbdPath: '<nbd.sock>', nbdUri: 'nbd:disk0' },
      disk1: { size: 256 * 1024, bitmapMode: 'new', bitmapAction: 'new', nbdPath: '<nbd.sock>', nbdUri: 'nbd:disk1' },
    });
    // anything else is refused, as qemu-server does ("invalid incremental mode")
    const bad = new RecordingProviderV2(ctx, { incremental: { disk0: 'maybe' as 'use' } });
    const res2 = await runBackupJob({ provider: bad, storeid: 'store1', guests: [guests[0]!], tmpdir: tmp });
    expect(res2.guests[0]!.error).toMatchObject({ code: 'ERR_PROVIDER_RESULT' });
  });

  it('a provider asking for no bitmap on a device and new on another gets exactly that', async () => {
    const { guests, tmp } = await setup();
    const p = new RecordingProviderV2(ctx, { incremental: { disk1: 'new' } });
    await runBackupJob({ provider: p, storeid: 'store1', guests: [guests[0]!], tmpdir: tmp });
    const vm = p.calls.find((c) => c[0] === 'backupVm')!;
    expect(vm[3]).toEqual({
      disk0: { size: MiB, bitmapMode: 'none', bitmapAction: 'not-used', nbdPath: '<nbd.sock>', nbdUri: 'nbd:disk0' },
      disk1: { size: 256 * 1024, bitmapMode: 'new', bitmapAction: 'new', nbdPath: '<nbd.sock>', nbdUri: 'nbd:disk1' },
    });
  });
});

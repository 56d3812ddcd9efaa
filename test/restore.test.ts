/**
 * VM restore through providers of both generations: call order, error precedence (first error
 * wins, cleanup always), early failure on a missing size, wrong guest type, and real
 * `qemu-img convert` into new and existing targets.
 */
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { DirectoryProvider, RestoreError, extractConfig, restoreVm, runBackupJob, type LogLevel } from '../lib/index.js';
import { createImage, expectSameBytes, qemuIo } from './helpers/images.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { RecordingProviderV1, RecordingProviderV2 } from './helpers/recording-provider.js';

const MiB = 2 ** 20;
const KiB = 1024;
const ctx = { storeid: 'store1', scfg: {}, log: () => {} };
const VOL = 'backup/qemu-100-1';
const INFO = { storeid: 'store1', vmtype: 'qemu', mechanism: 'qemu-img' };

afterEach(async () => {
  await stopAll();
});

/** Backs up a stopped VM with two disks of known content; returns the provider and the content. */
async function fixture<P extends RecordingProviderV1 | RecordingProviderV2>(make: (storeDir: string) => P): Promise<{ p: P; dir: string; disks: { disk0: Buffer; disk1: Buffer } }> {
  const dir = await tempDir();
  const d0 = path.join(dir, 'disk0.qcow2');
  const d1 = path.join(dir, 'disk1.raw');
  createImage(d0, MiB, 'qcow2');
  createImage(d1, 256 * KiB, 'raw');
  qemuIo(d0, 'qcow2', ['write -P 0x5a 0 64k', 'write -P 0x5b 512k 128k']);
  qemuIo(d1, 'raw', ['write -P 0x6c 4k 8k']);
  const disks = { disk0: Buffer.alloc(MiB), disk1: Buffer.alloc(256 * KiB) };
  disks.disk0.fill(0x5a, 0, 64 * KiB).fill(0x5b, 512 * KiB, 640 * KiB);
  disks.disk1.fill(0x6c, 4 * KiB, 12 * KiB);
  const p = make(path.join(dir, 'store'));
  const res = await runBackupJob({
    provider: p,
    storeid: 'store1',
    tmpdir: dir,
    guests: [
      {
        vmid: 100,
        type: 'qemu',
        qmp: {
          disks: [
            { device: 'disk0', file: d0, format: 'qcow2' },
            { device: 'disk1', file: d1, format: 'raw' },
          ],
        },
        config: 'name: restored\n',
        firewallConfig: '[OPTIONS]\nenable: 1\n',
      },
    ],
  });
  expect(res.ok).toBe(true);
  p.calls.length = 0;
  return { p, dir, disks };
}

const v1Device = (d: string): unknown[][] => [
  ['restoreQemuImgInit', VOL, 'store1', d],
  ['restoreQemuImgCleanup', VOL, 'store1', d],
];

describe('restoreVm, seed-generation provider (V1)', () => {
  it('success: exact call order, configs written, bytes equal', async () => {
    const { p, dir, disks } = await fixture((s) => new RecordingProviderV1(ctx, { storeDir: s }));
    const res = await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets: (d) => path.join(dir, `r-${d}.raw`), configDir: dir });
    expect(p.calls).toEqual([
      ['restoreGetMechanism', VOL, 'store1'],
      ['restoreStart', VOL, INFO],
      // qemu-server restore_external_archive: device info (restore_vm_init) before the configs
      ['restoreQemuGetDeviceInfo', VOL, 'store1'],
      ['extractGuestConfig', VOL, 'store1'],
      ['extractFirewallConfig', VOL, 'store1'],
      ...v1Device('disk0'),
      ...v1Device('disk1'),
      ['restoreEnd', VOL, INFO],
    ]);
    expect(res).toMatchObject({ config: 'name: restored\n', firewallConfig: '[OPTIONS]\nenable: 1\n', configFile: path.join(dir, 'qemu-server.conf'), firewallFile: path.join(dir, 'qemu-server.fw') });
    expect(readFileSync(path.join(dir, 'qemu-server.fw'), 'utf8')).toBe('[OPTIONS]\nenable: 1\n');
    expectSameBytes(readFileSync(path.join(dir, 'r-disk0.raw')), disks.disk0, 'disk0');
    expectSameBytes(readFileSync(path.join(dir, 'r-disk1.raw')), disks.disk1, 'disk1');
  });

  it('writes into existing targets (qemu-img -n), zeroing what the backup has as zeros', async () => {
    const { p, dir, disks } = await fixture((s) => new RecordingProviderV1(ctx, { storeDir: s }));
    const targets = { disk0: path.join(dir, 't0.raw'), disk1: path.join(dir, 't1.raw') };
    writeFileSync(targets.disk0, Buffer.alloc(MiB, 0xff));
    writeFileSync(targets.disk1, Buffer.alloc(256 * KiB, 0xee));
    await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets });
    expectSameBytes(readFileSync(targets.disk0), disks.disk0, 'disk0');
    expectSameBytes(readFileSync(targets.disk1), disks.disk1, 'disk1');
  });

  it("overwrite 'replace': an existing larger file is replaced whole, 0600, through a .partial file", async () => {
    const { p, dir, disks } = await fixture((s) => new RecordingProviderV1(ctx, { storeDir: s }));
    const targets = { disk0: path.join(dir, 't0.raw'), disk1: path.join(dir, 't1.raw') };
    // in place, these would keep their tails beyond the restored sizes
    writeFileSync(targets.disk0, Buffer.alloc(2 * MiB, 0xff), { mode: 0o644 });
    writeFileSync(targets.disk1, Buffer.alloc(MiB, 0xee), { mode: 0o644 });
    await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets, overwrite: 'replace' });
    expectSameBytes(readFileSync(targets.disk0), disks.disk0, 'disk0');
    expectSameBytes(readFileSync(targets.disk1), disks.disk1, 'disk1');
    for (const t of Object.values(targets)) expect(statSync(t).mode & 0o777).toBe(0o600);
    expect(readdirSync(dir).filter((f) => f.includes('.partial'))).toEqual([]);
  });

  it("leftover partial files: a dead restore's of this host is removed; another host's (a shared folder) is left alone", async () => {
    const { p, dir, disks } = await fixture((s) => new RecordingProviderV1(ctx, { storeDir: s }));
    const targets = { disk0: path.join(dir, 't0.raw'), disk1: path.join(dir, 't1.raw') };
    // pid 2^22 + 1 lies above Linux's largest pid: no such process runs
    const dead = `t0.raw.partial-${hostname()}-4194305-1`;
    const elsewhere = 't0.raw.partial-other-node.example-4194305-1';
    for (const f of [dead, elsewhere]) writeFileSync(path.join(dir, f), 'left');
    await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets });
    expectSameBytes(readFileSync(targets.disk0), disks.disk0, 'disk0');
    expect(readdirSync(dir).filter((f) => f.includes('.partial')).sort()).toEqual([elsewhere]);
  });

  it('a cancelled convert removes the partial file and leaves no file under the target name', async () => {
    const { p, dir } = await fixture((s) => new RecordingProviderV1(ctx, { storeDir: s }));
    const target = path.join(dir, 'cancelled.raw');
    const controller = new AbortController();
    let sawPartial = false;
    const err = await restoreVm({
      provider: p,
      volname: VOL,
      storeid: 'store1',
      targets: { disk0: target, disk1: path.join(dir, 'never.raw') },
      bandwidthLimit: 16 * KiB,
      signal: controller.signal,
      onProgress: () => {
        // qemu-img reports progress once it writes: the copy has started
        sawPartial ||= readdirSync(dir).some((f) => f.startsWith('cancelled.raw.partial-'));
        controller.abort();
      },
    }).catch((e: unknown) => e);
    expect(sawPartial).toBe(true);
    expect(err).toMatchObject({ code: 'ERR_RESTORE', device: 'disk0' });
    expect(((err as RestoreError).cause as { code: string }).code).toBe('ERR_CANCELLED');
    expect(readdirSync(dir).filter((f) => /^(cancelled|never)\.raw/.test(f))).toEqual([]);
  });

  it('a target map naming a device the backup lacks is refused before anything is written', async () => {
    const { p, dir } = await fixture((s) => new RecordingProviderV1(ctx, { storeDir: s }));
    const targets = { disk0: path.join(dir, 'a.raw'), disk1: path.join(dir, 'b.raw'), scsi7: path.join(dir, 'c.raw') };
    const err = await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_RESTORE', device: 'scsi7', message: "restore of 'backup/qemu-100-1' failed: the backup has no device scsi7 (it has disk0, disk1)" });
    expect(p.calls.map((c) => c[0])).not.toContain('restoreQemuImgInit');
    for (const t of Object.values(targets)) expect(existsSync(t)).toBe(false);
  });

  it('a failing convert: cleanup still runs, the rest is not attempted, restoreAbort names the device', async () => {
    const { p, dir } = await fixture((s) => new RecordingProviderV1(ctx, { storeDir: s }));
    const orig = p.restoreQemuImgInit.bind(p);
    p.restoreQemuImgInit = async (v, s, d) => (d === 'disk0' ? path.join(dir, 'missing.raw') : orig(v, s, d));
    const err = (await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets: (d) => path.join(dir, `r-${d}.raw`) }).catch((e: unknown) => e)) as RestoreError;
    expect(err).toBeInstanceOf(RestoreError);
    expect(err).toMatchObject({ code: 'ERR_RESTORE', device: 'disk0' });
    expect(err.message).toMatch(/^restore of 'backup\/qemu-100-1' failed \(device disk0\): qemu-img convert of disk0 failed \(exit code 1\): .*missing\.raw/);
    expect(p.calls.map((c) => c[0])).toEqual([
      'restoreGetMechanism',
      'restoreStart',
      'restoreQemuGetDeviceInfo',
      'extractGuestConfig',
      'extractFirewallConfig',
      'restoreQemuImgCleanup',
      'restoreAbort',
    ]);
    expect(p.calls.at(-1)).toEqual(['restoreAbort', VOL, `Error(${err.message})`, INFO]);
  });

  it('a failing cleanup is the error when nothing failed before; later devices are not attempted', async () => {
    const { p, dir } = await fixture((s) => new RecordingProviderV1(ctx, { storeDir: s }));
    p.store.opts.fail = { restoreQemuImgCleanup: { message: 'cleanup broke', when: (_v, _s, d) => d === 'disk0' } };
    const err = (await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets: (d) => path.join(dir, `r-${d}.raw`) }).catch((e: unknown) => e)) as RestoreError;
    expect(err).toMatchObject({ code: 'ERR_RESTORE', device: 'disk0', message: "restore of 'backup/qemu-100-1' failed (device disk0): cleanup broke" });
    expect(p.calls.slice(5).map((c) => c.slice(0, 4))).toEqual([...v1Device('disk0'), ['restoreAbort', VOL, `Error(${err.message})`, INFO]]);
  });

  it('when convert and cleanup both fail the first error wins and the cleanup error is logged', async () => {
    const { p, dir } = await fixture((s) => new RecordingProviderV1(ctx, { storeDir: s }));
    p.store.opts.fail = { restoreQemuImgCleanup: { message: 'cleanup broke' } };
    p.restoreQemuImgInit = async () => path.join(dir, 'missing.raw');
    const lines: Array<[LogLevel, string]> = [];
    const err = (await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets: (d) => path.join(dir, `r-${d}.raw`), log: (l, m) => lines.push([l, m]) }).catch((e: unknown) => e)) as RestoreError;
    expect(err.message).toMatch(/^restore of 'backup\/qemu-100-1' failed \(device disk0\): qemu-img convert of disk0 failed/);
    expect(lines).toContainEqual(['warn', 'cleanup of device disk0 failed: cleanup broke']);
    expect(p.calls.slice(5).map((c) => c[0])).toEqual(['restoreQemuImgCleanup', 'restoreAbort']);
  });

  it('a volume init that dies is not followed by its cleanup (qemu-server: init outside the eval)', async () => {
    const { p, dir } = await fixture((s) => new RecordingProviderV1(ctx, { storeDir: s }));
    p.store.opts.fail = { restoreQemuImgInit: { message: 'no such archive part' } };
    const err = (await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets: (d) => path.join(dir, `r-${d}.raw`) }).catch((e: unknown) => e)) as RestoreError;
    expect(err.message).toBe("restore of 'backup/qemu-100-1' failed (device disk0): no such archive part");
    expect(p.calls.slice(5).map((c) => c[0])).toEqual(['restoreQemuImgInit', 'restoreAbort']);
  });

  it('a device without a size fails before anything is written, naming the device', async () => {
    const { p, dir } = await fixture((s) => new RecordingProviderV1(ctx, { storeDir: s }));
    p.restoreQemuGetDeviceInfo = async () => ({ disk0: { size: MiB }, disk1: {} as { size: number } });
    const err = (await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets: (d) => path.join(dir, `r-${d}.raw`) }).catch((e: unknown) => e)) as RestoreError;
    expect(err).toMatchObject({ code: 'ERR_RESTORE' });
    expect(err.message).toMatch(/missing or invalid size for device 'disk1'/);
    expect((err.cause as { code: string }).code).toBe('ERR_PROVIDER_RESULT');
    expect(p.calls.map((c) => c[0])).not.toContain('restoreQemuImgInit');
    expect(p.calls.at(-1)![0]).toBe('restoreAbort');
  });

  it('a container archive is refused as a VM restore, before any hook', async () => {
    const p = new RecordingProviderV1(ctx);
    const err = await restoreVm({ provider: p, volname: 'backup/lxc-200-1', storeid: 'store1', targets: {} }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_RESTORE', message: "restore of 'backup/lxc-200-1' failed: cannot restore a guest of type 'lxc' as a VM" });
    expect(((err as RestoreError).cause as { code: string }).code).toBe('ERR_MECHANISM');
    expect(p.calls).toEqual([['restoreGetMechanism', 'backup/lxc-200-1', 'store1']]);
  });

  it('honours the bandwidth limit (qemu-img -r) and reports progress', async () => {
    const { p, dir, disks } = await fixture((s) => new RecordingProviderV1(ctx, { storeDir: s }));
    p.restoreQemuGetDeviceInfo = async () => ({ disk0: { size: MiB } });
    const t0 = Date.now();
    const progress: number[] = [];
    await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets: { disk0: path.join(dir, 'slow.raw') }, bandwidthLimit: 64 * KiB, onProgress: (e) => progress.push(e.percent) });
    // 192 KiB of data (zeros are not copied) at 64 KiB/s: QEMU lets the first request through at once
    expect(Date.now() - t0).toBeGreaterThan(600);
    expect(progress.at(-1)).toBe(100);
    expectSameBytes(readFileSync(path.join(dir, 'slow.raw')), disks.disk0, 'disk0');
  });
});

describe('restoreVm, Proxmox VE 8.4 provider (V2) through the adapter', () => {
  it('success: exact call order, bytes equal', async () => {
    const { p, dir, disks } = await fixture((s) => new RecordingProviderV2(ctx, { storeDir: s }));
    await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets: (d) => path.join(dir, `r-${d}.raw`) });
    expect(p.calls).toEqual([
      ['restoreGetMechanism', VOL],
      ['restoreStart', VOL, INFO],
      // qemu-server restore_external_archive: restore_vm_init, then the configs
      ['restoreVmInit', VOL],
      ['archiveGetGuestConfig', VOL],
      ['archiveGetFirewallConfig', VOL],
      ['restoreVmVolumeInit', VOL, 'disk0', {}],
      ['restoreVmVolumeCleanup', VOL, 'disk0', {}],
      ['restoreVmVolumeInit', VOL, 'disk1', {}],
      ['restoreVmVolumeCleanup', VOL, 'disk1', {}],
      ['restoreVmCleanup', VOL],
      ['restoreEnd', VOL, INFO],
    ]);
    expectSameBytes(readFileSync(path.join(dir, 'r-disk0.raw')), disks.disk0, 'disk0');
    expectSameBytes(readFileSync(path.join(dir, 'r-disk1.raw')), disks.disk1, 'disk1');
  });

  it('failure: a volume init that died gets no volume cleanup; restoreVmCleanup still runs, then restoreAbort', async () => {
    const { p, dir } = await fixture((s) => new RecordingProviderV2(ctx, { storeDir: s }));
    p.store.opts.fail = { restoreVmVolumeInit: { message: 'offline', when: (_v, d) => d === 'disk1' } };
    const err = await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets: (d) => path.join(dir, `r-${d}.raw`) }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_RESTORE', device: 'disk1', message: "restore of 'backup/qemu-100-1' failed (device disk1): offline" });
    expect(p.calls.slice(2).map((c) => c.slice(0, 3))).toEqual([
      ['restoreVmInit', VOL],
      ['archiveGetGuestConfig', VOL],
      ['archiveGetFirewallConfig', VOL],
      ['restoreVmVolumeInit', VOL, 'disk0'],
      ['restoreVmVolumeCleanup', VOL, 'disk0'],
      ['restoreVmVolumeInit', VOL, 'disk1'],
      ['restoreVmCleanup', VOL],
      ['restoreAbort', VOL, `Error(${(err as Error).message})`],
    ]);
  });

  it('restoreVmCleanup failing after success is the error; failing after an error is logged', async () => {
    const { p, dir } = await fixture((s) => new RecordingProviderV2(ctx, { storeDir: s }));
    p.store.opts.fail = { restoreVmCleanup: { message: 'session lost' } };
    const err = await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets: (d) => path.join(dir, `r-${d}.raw`) }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_RESTORE', message: "restore of 'backup/qemu-100-1' failed: session lost" });
    p.calls.length = 0;
    p.store.opts.fail = { restoreVmCleanup: { message: 'session lost' }, restoreVmInit: { message: 'archive corrupt' } };
    const lines: string[] = [];
    const err2 = await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets: {}, log: (_l, m) => lines.push(m) }).catch((e: unknown) => e);
    expect(err2).toMatchObject({ message: "restore of 'backup/qemu-100-1' failed: archive corrupt" });
    expect(lines).toContain('restore cleanup failed: session lost');
    expect(p.calls.map((c) => c[0])).toEqual(['restoreGetMechanism', 'restoreStart', 'restoreVmInit', 'restoreVmCleanup', 'restoreAbort']);
  });

  it('restoreVmCleanup runs even when restoreGetMechanism died (qemu-server: cleanup after the eval)', async () => {
    const p = new RecordingProviderV2(ctx);
    p.store.opts.fail = { restoreGetMechanism: { message: 'backup server unreachable' } };
    const err = await restoreVm({ provider: p, volname: VOL, storeid: 'store1', targets: {} }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_RESTORE', message: "restore of 'backup/qemu-100-1' failed: backup server unreachable" });
    expect(p.calls).toEqual([
      ['restoreGetMechanism', VOL],
      ['restoreVmCleanup', VOL],
    ]);
  });
});

describe('extract_vzdump_config ("Show configuration")', () => {
  it('a fresh DirectoryProvider answers archiveGetGuestConfig alone, without restoreVmInit or anything before it', async () => {
    const { dir } = await fixture((s) => new RecordingProviderV2(ctx, { storeDir: s }));
    const root = path.join(dir, 'dirstore');
    const config = 'name: shown\nscsi0: local:vm-100-disk-0,size=1M\n#qmdump#map:scsi0:drive-scsi0:local:raw:\n';
    const writer = new DirectoryProvider({ storeid: 'dir1', scfg: { path: root }, log: () => {} });
    const res = await runBackupJob({
      provider: writer,
      storeid: 'dir1',
      tmpdir: dir,
      guests: [{ vmid: 100, type: 'qemu', qmp: { disks: [{ device: 'drive-scsi0', file: path.join(dir, 'disk0.qcow2'), format: 'qcow2' }] }, config }],
    });
    expect(res.ok).toBe(true);
    const volname = res.guests[0]!.volname!;
    // Storage.pm extract_vzdump_config: new_backup_provider, then only archive_get_guest_config
    const fresh = new DirectoryProvider({ storeid: 'dir1', scfg: { path: root }, log: () => {} });
    const called: string[] = [];
    const spied = new Proxy(fresh, {
      get(target, prop, receiver) {
        const v = Reflect.get(target, prop, receiver) as unknown;
        if (typeof v === 'function' && typeof prop === 'string' && prop !== 'constructor') {
          return (...args: unknown[]) => {
            called.push(prop);
            return (v as (...a: unknown[]) => unknown).apply(target, args);
          };
        }
        return v;
      },
    });
    expect(await extractConfig(spied, `dir1:${volname}`)).toBe(config);
    expect(called).toEqual(['archiveGetGuestConfig']);
    // and directly, on another fresh instance, as the Perl bridge calls it
    expect(await new DirectoryProvider({ storeid: 'dir1', scfg: { path: root }, log: () => {} }).archiveGetGuestConfig(volname)).toBe(config);
  });
});

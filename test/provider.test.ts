/**
 * The provider API without QEMU (its errors are in errors.test.ts): version check, base classes, adapter, helpers.
 */
import { describe, expect, it } from 'vitest';

import {
  BackupProviderBase,
  BackupProviderBaseV1,
  BandwidthLimiter,
  NotImplementedError,
  PROVIDER_API_AGE,
  PROVIDER_API_VERSION,
  ProviderApiVersionError,
  adaptProvider,
  checkApiVersion,
  createLogger,
  expandNotesTemplate,
  extractConfig,
  runBackupJob,
  type BackupProvider,
  type LogLevel,
} from '../lib/index.js';
import { RecordingProviderV1, RecordingProviderV2 } from './helpers/recording-provider.js';

const ctx = { storeid: 'store1', scfg: {}, log: () => {} };

describe('API version (libtool current/age)', () => {
  it('serves current - age .. current', () => {
    expect(PROVIDER_API_VERSION).toBe(2);
    expect(PROVIDER_API_AGE).toBe(1);
    expect(checkApiVersion({ apiVersion: 1 })).toBe(1);
    expect(checkApiVersion({ apiVersion: 2 })).toBe(2);
    for (const v of [0, 3, undefined, '2', 1.5, null]) {
      expect(() => checkApiVersion({ apiVersion: v })).toThrow(ProviderApiVersionError);
    }
  });

  it('a refused provider fails the job before anything is called', async () => {
    const p = new RecordingProviderV2(ctx);
    Object.defineProperty(p, 'apiVersion', { value: 3 });
    const err = await runBackupJob({ provider: p, storeid: 'store1', guests: [{ vmid: 100, type: 'lxc', rootdir: '/nonexistent', config: '' }] }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ProviderApiVersionError);
    expect((err as ProviderApiVersionError).message).toMatch(/newer than this runner/);
    expect(p.calls).toEqual([]);
  });
});

describe('base classes', () => {
  it('throw NotImplementedError naming the method (V2)', async () => {
    class Mine extends BackupProviderBase {}
    const p = new Mine(ctx);
    expect(p.apiVersion).toBe(2);
    expect(await p.providerName()).toBe('Mine');
    const err = await p.backupVm(1, '', {}, {} as never).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NotImplementedError);
    expect(err).toMatchObject({ code: 'ERR_NOT_IMPLEMENTED', method: 'backupVm', message: "backup provider 'Mine': method 'backupVm' is not implemented" });
    for (const m of ['jobInit', 'backupInit', 'backupGetMechanism', 'backupVmQueryIncremental', 'backupContainer', 'backupHandleLogFile', 'restoreGetMechanism', 'restoreVmInit', 'restoreVmVolumeInit', 'archiveGetGuestConfig', 'archiveGetFirewallConfig', 'restoreContainerInit'] as const) {
      await expect((p[m] as () => Promise<unknown>).call(p)).rejects.toMatchObject({ code: 'ERR_NOT_IMPLEMENTED', method: m });
    }
    // prepare and cleanup hooks do nothing unless overridden
    for (const m of ['jobCleanup', 'backupCleanup', 'backupContainerPrepare', 'restoreVmCleanup', 'restoreVmVolumeCleanup', 'restoreContainerCleanup'] as const) {
      await expect((p[m] as () => Promise<unknown>).call(p)).resolves.toBeUndefined();
    }
  });

  it('throw NotImplementedError naming the method (V1)', async () => {
    class Old extends BackupProviderBaseV1 {}
    const p = new Old(ctx);
    expect(p.apiVersion).toBe(1);
    for (const m of ['jobStart', 'backupNbd', 'backupDirectory', 'restoreQemuImgInit', 'restoreTarInit', 'backupGetTaskSize'] as const) {
      await expect((p[m] as () => Promise<unknown>).call(p)).rejects.toMatchObject({ code: 'ERR_NOT_IMPLEMENTED', method: m });
    }
    for (const m of ['restoreQemuImgCleanup', 'restoreTarCleanup', 'restoreDirectoryCleanup'] as const) {
      await expect((p[m] as () => Promise<unknown>).call(p)).resolves.toBeUndefined();
    }
  });

  it('bind a logger to the log function, called with a level or by a method per level', () => {
    const lines: Array<[LogLevel, string]> = [];
    class Mine extends BackupProviderBase {
      hello(): void {
        this.log.info('i');
        this.log.warn('w');
        this.log.err('e');
        this.log('info', 'as context.log'); // the spelling of ProviderContext.log, as plain JavaScript from the README uses it
        this.log.log('warn', 'any level');
      }
    }
    new Mine({ storeid: 's', scfg: {}, log: (l, m) => lines.push([l, m]) }).hello();
    expect(lines).toEqual([
      ['info', 'i'],
      ['warn', 'w'],
      ['err', 'e'],
      ['info', 'as context.log'],
      ['warn', 'any level'],
    ]);
  });
});

describe('adapter', () => {
  it('a plain object provider lacking a method fails with NotImplementedError when it is called', async () => {
    const p = { apiVersion: 2, providerName: () => 'plain' } as unknown as BackupProvider;
    const d = adaptProvider(p);
    expect(d.generation).toBe(2);
    await expect(d.jobStart(1)).rejects.toMatchObject({ code: 'ERR_NOT_IMPLEMENTED', method: 'jobInit', message: expect.stringContaining("'plain'") });
  });

  it('maps V1 and V2 methods onto the one internal shape', async () => {
    const v1 = new RecordingProviderV1(ctx);
    const v2 = new RecordingProviderV2(ctx);
    const d1 = adaptProvider(v1);
    const d2 = adaptProvider(v2);
    await d1.jobStart(5);
    await d2.jobStart(5);
    await d1.jobAbort(new Error('x'));
    await d2.jobAbort(new Error('x'));
    expect(v1.calls).toEqual([['jobStart', 'number'], ['jobAbort', 'Error(x)']]);
    expect(v2.calls).toEqual([['jobInit', 'number'], ['jobCleanup']]);
    expect(await d1.backupMechanism(100, 'qemu')).toEqual({ mechanism: 'nbd', bitmapId: undefined });
    expect(await d2.backupMechanism(100, 'lxc')).toEqual({ mechanism: 'directory', bitmapId: undefined });
    expect(await d1.vmBitmapPlan(100, 'b1', { disk0: 1 }, 'store1')).toEqual({ bitmapId: 'store1-b1', devices: { disk0: 'use' } });
    expect(await d2.vmBitmapPlan(100, undefined, { a: 1, b: 2 }, 'store1')).toEqual({ bitmapId: 'store1', devices: { a: 'new', b: 'new' } });
  });

  it('refuses bad answers with a clear error', async () => {
    const v2 = new RecordingProviderV2(ctx, { incremental: { nosuch: 'use' } });
    await expect(adaptProvider(v2).vmBitmapPlan(1, undefined, { a: 1 }, 's')).rejects.toMatchObject({ code: 'ERR_PROVIDER_RESULT', message: "backupVmQueryIncremental: unknown device 'nosuch'" });
    const bad = Object.assign(new RecordingProviderV2(ctx), { backupInit: async () => ({ archiveName: '../etc' }) });
    await expect(adaptProvider(bad).backupStart(1, 'qemu', 0)).rejects.toMatchObject({ code: 'ERR_PROVIDER_RESULT', method: 'backupInit', message: expect.stringMatching(/^backupInit: invalid archive name "\.\.\/etc"/) });
    const none = new RecordingProviderV1(ctx, { mechanismOverride: { qemu: undefined } });
    await expect(adaptProvider(none).backupMechanism(1, 'qemu')).rejects.toMatchObject({ code: 'ERR_MECHANISM', message: "backup provider 'recording-v1' returned no backup mechanism for VMs" });
    const fh = new RecordingProviderV1(ctx, { mechanismOverride: { qemu: 'file-handle' } });
    await expect(adaptProvider(fh).backupMechanism(1, 'qemu')).rejects.toMatchObject({
      code: 'ERR_MECHANISM',
      message: "mechanism 'file-handle' requested by backup provider 'recording-v1' is not supported for VMs",
    });
    const badId = Object.assign(new RecordingProviderV1(ctx), { backupGetMechanism: async () => ({ mechanism: 'nbd', bitmapId: 'a/b' }) });
    await expect(adaptProvider(badId).backupMechanism(1, 'qemu')).rejects.toMatchObject({ code: 'ERR_PROVIDER_RESULT', method: 'backupGetMechanism', message: expect.stringMatching(/^backupGetMechanism: invalid bitmap id "a\/b"/) });
  });

  it('extractConfig delegates to the provider (both generations)', async () => {
    const v1 = new RecordingProviderV1(ctx);
    const v2 = new RecordingProviderV2(ctx);
    expect(await extractConfig(v1, 'store1:backup/qemu-100-1')).toBe('name: recorded\n');
    expect(await extractConfig(v2, 'store1:backup/qemu-100-1')).toBe('name: recorded\n');
    expect(v1.calls).toEqual([['extractGuestConfig', 'backup/qemu-100-1', 'store1']]);
    expect(v2.calls).toEqual([['archiveGetGuestConfig', 'backup/qemu-100-1']]);
    await expect(extractConfig(v1, 'nocolon')).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
  });
});

describe('helpers', () => {
  it('logger never throws', () => {
    const log = createLogger(() => {
      throw new Error('sink down');
    }, 'p: ');
    expect(() => log.err('x')).not.toThrow();
    const lines: string[] = [];
    createLogger((l, m) => lines.push(`${l}:${m}`), 'p: ').warn('x');
    expect(lines).toEqual(['warn:p: x']);
  });

  it('bandwidth limiter paces to the limit', async () => {
    const lim = new BandwidthLimiter(1_000_000);
    const t0 = performance.now();
    for (let i = 0; i < 6; i++) await lim.consume(250_000);
    const ms = performance.now() - t0;
    // one second of burst, then 0.5 MB more at 1 MB/s
    expect(ms).toBeGreaterThan(400);
    expect(ms).toBeLessThan(1500);
    const none = new BandwidthLimiter(0);
    expect(none.limited).toBe(false);
    await none.consume(1e12);
    expect(() => new BandwidthLimiter(-1)).toThrow(/bandwidth limit/);
  });

  it('expands the notes template as vzdump does', () => {
    expect(expandNotesTemplate('{{guestname}} ({{vmid}}) on {{node}}/{{cluster}}\\nx\\\\y {{other}}', { guestname: 'web', vmid: 100, node: 'n1', cluster: 'c' })).toBe(
      'web (100) on n1/c\nx\\y {{other}}',
    );
  });
});

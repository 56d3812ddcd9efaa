/**
 * The provider host's mapping between the Perl API's calls (names, hashes with dashed keys,
 * scalars that may be strings) and the TypeScript provider API (apiVersion 2), over its line
 * protocol on in-memory streams. The end-to-end path through Perl is test/bridge.test.ts.
 */
import { PassThrough } from 'node:stream';
import { createInterface } from 'node:readline';
import { describe, expect, it } from 'vitest';

import { ProviderHost } from '../lib/bridge/host.js';
import { BackupProviderBase } from '../lib/provider/base.js';
import type { BackupMechanism, BackupVmInfo, BackupVmVolume, GuestType, ProviderContext } from '../lib/provider/api.js';

type Reply = { id?: number; result?: unknown; error?: { message: string; code: string }; log?: { level: string; message: string } };

/** A host on in-memory streams; `call` sends one request and collects log events until its reply. */
function host(factory: (c: ProviderContext) => unknown): { call: (method: string, ...params: unknown[]) => Promise<Reply & { logs: Reply['log'][] }>; end: () => Promise<void> } {
  const input = new PassThrough();
  const output = new PassThrough();
  const h = new ProviderHost({ factory: factory as never, input, output });
  const served = h.serve();
  const lines = createInterface({ input: output })[Symbol.asyncIterator]();
  let id = 0;
  return {
    call: async (method, ...params) => {
      const my = ++id;
      input.write(`${JSON.stringify({ id: my, method, params })}\n`);
      const logs: Reply['log'][] = [];
      for (;;) {
        const { value } = await lines.next();
        const r = JSON.parse(value as string) as Reply;
        if (r.log) logs.push(r.log);
        else if (r.id === my) return { ...r, logs };
      }
    },
    end: async () => {
      input.end();
      await served;
    },
  };
}

class Recording extends BackupProviderBase {
  calls: unknown[][] = [];
  mechanism: BackupMechanism = 'nbd';
  override async backupInit(vmid: number, vmtype: GuestType, startTime: number): Promise<{ archiveName: string }> {
    this.calls.push(['backupInit', vmid, vmtype, startTime]);
    this.log.info('init');
    return { archiveName: `vm/${vmid}/x` };
  }
  override async backupGetMechanism(): Promise<BackupMechanism> {
    return this.mechanism;
  }
  override async backupVm(vmid: number, config: string, volumes: Record<string, BackupVmVolume>, info: BackupVmInfo): Promise<void> {
    const { signal, ...rest } = info;
    this.calls.push(['backupVm', vmid, config, volumes, rest, signal instanceof AbortSignal]);
  }
  override async backupCleanup(vmid: number, vmtype: GuestType, success: boolean, info: { error?: string }): Promise<{ stats: { archiveSize: number } }> {
    this.calls.push(['backupCleanup', vmid, vmtype, success, info]);
    return { stats: { archiveSize: 4096 } };
  }
  override async restoreGetMechanism(): Promise<{ mechanism: 'qemu-img'; vmtype: 'qemu' }> {
    return { mechanism: 'qemu-img', vmtype: 'qemu' };
  }
  override async restoreVmVolumeInit(volname: string, device: string): Promise<{ qemuImgPath: string }> {
    return { qemuImgPath: `/run/${volname}/${device}` };
  }
}

describe('provider host: Perl calls to the TypeScript API and back', () => {
  it('maps dashed keys and string scalars to the provider API, and its answers back to Perl shapes', async () => {
    let p!: Recording;
    const h = host((c) => (p = new Recording(c)));
    expect((await h.call('hello', { storeid: 's1', scfg: { path: '/x' } })).result).toEqual({ protocol: 1, apiVersion: 2 });
    const init = await h.call('backup_init', '100', 'qemu', '1700000000');
    expect(init.result).toEqual({ 'archive-name': 'vm/100/x' });
    expect(init.logs).toEqual([{ level: 'info', message: 'init' }]);
    await h.call('backup_vm', '100', 'cfg', {
      'drive-scsi0': { size: '1048576', 'bitmap-mode': 'reuse', 'nbd-path': '/run/q/100-nbd', 'bitmap-name': 'snapshot-access:s1' },
      'drive-efidisk0': { size: 131072, 'bitmap-mode': 'none', 'nbd-path': '/run/q/100-nbd' },
    }, { 'bandwidth-limit': '10240', 'firewall-config': '[OPTIONS]\n' });
    expect(p.calls[1]).toEqual([
      'backupVm', 100, 'cfg',
      {
        'drive-scsi0': { size: 1048576, bitmapMode: 'reuse', bitmapAction: 'used', nbdPath: '/run/q/100-nbd', nbdUri: 'nbd+unix:///drive-scsi0?socket=/run/q/100-nbd', bitmapName: 'snapshot-access:s1' },
        'drive-efidisk0': { size: 131072, bitmapMode: 'none', bitmapAction: 'not-used', nbdPath: '/run/q/100-nbd', nbdUri: 'nbd+unix:///drive-efidisk0?socket=/run/q/100-nbd' },
      },
      { mechanism: 'nbd', archiveName: 'vm/100/x', bandwidthLimit: 10240, firewallConfig: '[OPTIONS]\n' },
      true,
    ]);
    expect((await h.call('backup_cleanup', '100', null, '0', { error: 'boom' })).result).toEqual({ stats: { 'archive-size': 4096 } });
    expect(p.calls[2]).toEqual(['backupCleanup', 100, undefined, false, { error: 'boom' }]);
    expect((await h.call('restore_get_mechanism', 'backup/1', 's1')).result).toEqual(['qemu-img', 'qemu']);
    expect((await h.call('restore_vm_volume_init', 'v', 'drive-scsi0', {})).result).toEqual({ 'qemu-img-path': '/run/v/drive-scsi0' });
    await h.end();
  });

  it('refuses the file-handle mechanism, volumes without nbd-path, unknown methods and calls before hello with ERR_BRIDGE', async () => {
    let p!: Recording;
    const h = host((c) => (p = new Recording(c)));
    expect((await h.call('provider_name')).error).toEqual({ code: 'ERR_BRIDGE', message: 'provider_name: called before hello' });
    await h.call('hello', { storeid: 's1', scfg: {} });
    p.mechanism = 'file-handle';
    const m = await h.call('backup_get_mechanism', 100, 'qemu');
    expect(m.error?.code).toBe('ERR_BRIDGE');
    expect(m.error?.message).toMatch(/'file-handle'.*does not carry.*use 'nbd'/);
    await h.call('backup_init', 100, 'qemu', 1);
    const vm = await h.call('backup_vm', 100, '', { 'drive-scsi0': { size: 1, 'bitmap-mode': 'none' } }, {});
    expect(vm.error).toMatchObject({ code: 'ERR_BRIDGE', message: expect.stringMatching(/only the nbd mechanism is bridged/) });
    expect((await h.call('frobnicate')).error).toEqual({ code: 'ERR_BRIDGE', message: "unknown method 'frobnicate'" });
    // a method the provider does not implement answers with the provider's own code
    expect((await h.call('archive_get_guest_config', 'v')).error?.code).toBe('ERR_NOT_IMPLEMENTED');
    await h.end();
  });

  it('refuses a provider of apiVersion 1: the Perl API is the 8.4 shape', async () => {
    const h = host(() => ({ apiVersion: 1, providerName: () => 'old' }));
    const r = await h.call('hello', { storeid: 's1', scfg: {} });
    expect(r.error?.code).toBe('ERR_BRIDGE');
    expect(r.error?.message).toMatch(/apiVersion 1.*serves apiVersion 2/);
    await h.end();
  });

  it('cancels the running call through its AbortSignal and keeps serving', async () => {
    let started!: () => void;
    const running = new Promise<void>((r) => (started = r));
    class Waiting extends Recording {
      override async backupVm(_vmid: number, _c: string, _v: Record<string, BackupVmVolume>, info: BackupVmInfo): Promise<void> {
        started();
        await new Promise((_, reject) => info.signal.addEventListener('abort', () => reject(info.signal.reason as Error), { once: true }));
      }
    }
    const input = new PassThrough();
    const output = new PassThrough();
    const h = new ProviderHost({ factory: (c) => new Waiting(c), input, output });
    const served = h.serve();
    const lines = createInterface({ input: output })[Symbol.asyncIterator]();
    const next = async (): Promise<Reply> => JSON.parse((await lines.next()).value as string) as Reply;
    input.write(`${JSON.stringify({ id: 1, method: 'hello', params: [{ storeid: 's', scfg: {} }] })}\n`);
    await next();
    input.write(`${JSON.stringify({ id: 2, method: 'backup_init', params: [1, 'qemu', 1] })}\n`);
    await next(); // log
    await next(); // reply
    input.write(`${JSON.stringify({ id: 3, method: 'backup_vm', params: [1, '', { d: { size: 1, 'nbd-path': '/s' } }, {}] })}\n`);
    await running;
    h.cancel();
    expect(await next()).toEqual({ id: 3, error: { code: 'ERR_CANCELLED', message: 'cancelled by a signal to the provider host' } });
    input.write(`${JSON.stringify({ id: 4, method: 'backup_cleanup', params: [1, 'qemu', 0, { error: 'x' }] })}\n`);
    expect(await next()).toEqual({ id: 4, result: { stats: { 'archive-size': 4096 } } });
    input.end();
    await served;
  });
});

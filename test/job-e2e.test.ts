/**
 * End to end with real QEMU and the native core: a provider that stores what it reads (raw images
 * via copyExtents, or through the file-handle mechanism), full then incremental, with guest writes
 * between and during the backups; restored with `qemu-img convert` and compared byte for byte
 * with the point-in-time content. On qemu-storage-daemon (V1 provider, nbd) and on a paused
 * `qemu-system-x86_64 -S` (V2 provider, nbd and file-handle).
 */
import { execFile } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { JobAbortedError, restoreVm, runBackupJob, type BackupJobResult, type VmGuest } from '../lib/index.js';
import { startScriptedAgent } from './helpers/guest-agent.js';
import { expectSameBytes } from './helpers/images.js';
import { nbdWrite, startStorageDaemon, startVm, stopAll, tempDir, vmWrite } from './helpers/qemu.js';
import { RecordingProviderV1, RecordingProviderV2 } from './helpers/recording-provider.js';

const execFileP = promisify(execFile);

const MiB = 2 ** 20;
const KiB = 1024;

afterEach(async () => {
  await stopAll();
});

/** The guest's disk as the test knows it: every write is applied here too. */
class Model {
  readonly disks = new Map<string, Buffer>();
  constructor(sizes: Record<string, number>) {
    for (const [d, s] of Object.entries(sizes)) this.disks.set(d, Buffer.alloc(s));
  }
  write(device: string, pattern: number, offset: number, length: number): void {
    this.disks.get(device)!.fill(pattern, offset, offset + length);
  }
  snapshot(): Map<string, Buffer> {
    return new Map([...this.disks].map(([d, b]) => [d, Buffer.from(b)]));
  }
}

describe('end to end on qemu-storage-daemon, seed-generation provider (nbd)', () => {
  it('full and incremental backups with writes between and during restore to the point-in-time content', async () => {
    const q = await startStorageDaemon({ size: 8 * MiB });
    const store = await tempDir();
    const live = `nbd+unix:///live0?socket=${q.nbdPath!}`;
    const model = new Model({ disk0: 8 * MiB });
    const write = async (pattern: number, offset: number, length: number): Promise<void> => {
      await nbdWrite(live, pattern, offset, length);
      model.write('disk0', pattern, offset, length);
    };
    await write(0x11, 0, 2 * MiB);
    await write(0x22, 5 * MiB, MiB);

    let during: Array<[number, number, number]> = [
      [0x33, MiB, 512 * KiB],
      [0x44, 7 * MiB, 64 * KiB],
    ];
    const p = new RecordingProviderV1(
      { storeid: 'store1', scfg: {}, log: () => {} },
      {
        storeDir: store,
        bitmapId: 'b1',
        onCall: async (m) => {
          if (m !== 'backupNbd') return;
          for (const [pat, off, len] of during) await write(pat, off, len); // the guest writes while the provider reads
        },
      },
    );
    const guest: VmGuest = { vmid: 100, type: 'qemu', qmp: q.qmp, nbdServer: q.nbdPath!, devices: ['disk0'], config: 'name: e2e\n', firewallConfig: '[OPTIONS]\n' };

    // full
    const full = model.snapshot();
    const r1 = await runBackupJob({ provider: p, storeid: 'store1', guests: [guest], tmpdir: store });
    expect(r1.guests[0]).toMatchObject({ status: 'ok', archiveName: 'backup/qemu-100-1' });
    expect(p.calls.find((c) => c[0] === 'backupNbd')).toEqual(['backupNbd', 100, 'disk0', '<live.sock>', 'new', undefined, 0, { bitmapAction: 'new', size: 8 * MiB, nbdUri: 'nbd:disk0' }]);

    // between
    await write(0x55, 3 * MiB, 256 * KiB);
    during = [[0x66, 0, 64 * KiB]];
    const inc = model.snapshot();
    const r2 = await runBackupJob({ provider: p, storeid: 'store1', guests: [guest], tmpdir: store });
    expect(r2.guests[0]!.status).toBe('ok');
    const incCall = p.calls.filter((c) => c[0] === 'backupNbd')[1]!;
    expect(incCall.slice(4, 5)).toEqual(['reuse']);
    expect(incCall[5]).toBe('snapshot-access:store1/store1-b1'); // <target id>/<storeid>-<bitmap id> (seed generation)
    expect((incCall[7] as { bitmapAction: string }).bitmapAction).toBe('used');
    // dirty: the writes during the full backup and between (1.5 MiB + 64 KiB... counted by QEMU granularity)
    expect(p.store.logs.get(100)).toMatch(/disk0: dirty-bitmap status: OK \(\d.*of 8.00 MiB dirty\)/);

    // restore both, through qemu-img convert, and compare with the points in time
    const dir = await tempDir();
    const progress: number[] = [];
    const res1 = await restoreVm({
      provider: p,
      volname: 'backup/qemu-100-1',
      storeid: 'store1',
      targets: { disk0: path.join(dir, 'full.raw') },
      configDir: dir,
      onProgress: (e) => progress.push(e.percent),
    });
    expect(res1.devices).toEqual([{ device: 'disk0', size: 8 * MiB, target: path.join(dir, 'full.raw') }]);
    expect(readFileSync(path.join(dir, 'qemu-server.conf'), 'utf8')).toBe('name: e2e\n');
    expect(readFileSync(path.join(dir, 'qemu-server.fw'), 'utf8')).toBe('[OPTIONS]\n');
    expect(progress.at(-1)).toBe(100);
    expectSameBytes(readFileSync(path.join(dir, 'full.raw')), full.get('disk0')!, 'full backup');
    await restoreVm({ provider: p, volname: 'backup/qemu-100-2', storeid: 'store1', targets: (d) => path.join(dir, `inc-${d}.raw`) });
    expectSameBytes(readFileSync(path.join(dir, 'inc-disk0.raw')), inc.get('disk0')!, 'incremental backup');
    // and the incremental really was: the live disk moved on after it
    expect(model.disks.get('disk0')!.equals(inc.get('disk0')!)).toBe(false);
  });
});

describe('end to end on qemu-system-x86_64 -S, Proxmox VE 8.4 provider', () => {
  it.each(['nbd', 'file-handle'] as const)('mechanism %s: full and incremental with writes between and during restore byte for byte', async (mechanism) => {
    const q = await startVm({ size: 8 * MiB });
    const store = await tempDir();
    const model = new Model({ virtio0: 8 * MiB, efidisk0: 256 * KiB });
    const write = async (device: 'virtio0' | 'efidisk0', pattern: number, offset: number, length: number): Promise<void> => {
      await vmWrite(q, device, pattern, offset, length);
      model.write(device, pattern, offset, length);
    };
    await write('virtio0', 0x11, 0, 3 * MiB);
    await write('efidisk0', 0x12, 0, 128 * KiB);
    let during: Array<['virtio0' | 'efidisk0', number, number, number]> = [
      ['virtio0', 0x21, 2 * MiB, MiB],
      ['efidisk0', 0x22, 64 * KiB, 4 * KiB],
    ];
    const p = new RecordingProviderV2(
      { storeid: 'store1', scfg: {}, log: () => {} },
      {
        storeDir: store,
        vmMechanism: mechanism,
        onCall: async (m) => {
          if (m !== 'backupVm') return;
          for (const [d, pat, off, len] of during) await write(d, pat, off, len);
        },
      },
    );
    const guest: VmGuest = { vmid: 100, type: 'qemu', qmp: q.qmp, devices: ['virtio0', 'drive-efidisk0'], config: 'name: vm\n' };
    const full = model.snapshot();
    const r1 = await runBackupJob({ provider: p, storeid: 'store1', guests: [guest], tmpdir: store });
    expect(r1.guests[0]!.error).toBeUndefined();
    await write('virtio0', 0x31, 6 * MiB, 128 * KiB);
    during = [['virtio0', 0x41, 0, 64 * KiB]];
    const inc = model.snapshot();
    const r2 = await runBackupJob({ provider: p, storeid: 'store1', guests: [guest], tmpdir: store });
    expect(r2.guests[0]!.error).toBeUndefined();
    const vmCalls = p.calls.filter((c) => c[0] === 'backupVm');
    const vols = vmCalls[1]![3] as Record<string, { bitmapMode: string; bitmapAction: string }>;
    expect(vols['virtio0']).toMatchObject({ bitmapMode: 'reuse', bitmapAction: 'used' });
    expect(vols['drive-efidisk0']).toMatchObject({ bitmapMode: 'reuse', bitmapAction: 'used' });
    expect(p.store.logs.get(100)).toMatch(/virtio0: dirty-bitmap status: OK/);

    const dir = await tempDir();
    const expectRestored = async (volname: string, expected: Map<string, Buffer>): Promise<void> => {
      const res = await restoreVm({ provider: p, volname, storeid: 'store1', targets: (d) => path.join(dir, `${volname.replace(/\//g, '_')}-${d}.raw`) });
      expect(res.devices.map((d) => [d.device, d.size])).toEqual([
        ['virtio0', 8 * MiB],
        ['drive-efidisk0', 256 * KiB],
      ]);
      for (const d of res.devices) expectSameBytes(readFileSync(d.target), expected.get(d.device === 'drive-efidisk0' ? 'efidisk0' : d.device)!, `${volname} ${d.device}`);
    };
    await expectRestored('backup/qemu-100-1', full);
    await expectRestored('backup/qemu-100-2', inc);
    // nothing of the backup access is left in QEMU
    expect(await q.qmp.execute('query-block-exports')).toEqual([]);
    const nodes = await q.qmp.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true });
    expect(nodes.filter((n) => n['node-name'].startsWith('pvebp'))).toEqual([]);
  });
});

describe('abort on a running VM', () => {
  it('SIGTERM during backupVm tears backup access down: no export, node, background bitmap or fleecing file is left', async () => {
    const q = await startVm({ size: 8 * MiB });
    const store = await tempDir();
    const fleecing = await tempDir();
    await vmWrite(q, 'virtio0', 0x11, 0, MiB);
    let fleecingFiles: string[] | undefined;
    const p = new RecordingProviderV2(
      { storeid: 'store1', scfg: {}, log: () => {} },
      {
        onCall: async (m) => {
          if (m !== 'backupVm') return;
          fleecingFiles = readdirSync(fleecing); // checked below: a failed expect here would only fail the guest
          process.kill(process.pid, 'SIGTERM');
          await sleep(300);
        },
      },
    );
    const guest: VmGuest = { vmid: 100, type: 'qemu', qmp: q.qmp, devices: ['virtio0', 'drive-efidisk0'], config: 'name: vm\n', qga: '/nonexistent/qga.sock' };
    const err = (await runBackupJob({ provider: p, storeid: 'store1', guests: [guest], tmpdir: store, fleecing: { dir: fleecing }, handleSignals: true }).catch((e: unknown) => e)) as JobAbortedError;
    expect(fleecingFiles).toHaveLength(2); // the access was up (one fleecing image per disk) while the provider read
    expect(err).toBeInstanceOf(JobAbortedError);
    expect(err.message).toBe('interrupted by signal SIGTERM');
    expect(p.calls.slice(-3)).toEqual([
      ['backupCleanup', 100, 'qemu', false, { error: 'interrupted by signal SIGTERM' }],
      ['backupHandleLogFile', 100, '<task.log>'],
      ['jobCleanup'],
    ]);
    const outcome = (err.result as BackupJobResult).guests[0]!;
    expect(outcome.warnings[0]).toMatch(/^skipping guest-agent 'fs-freeze', agent configured but not running\?/);
    expect(outcome.log.join('\n')).toMatch(/ERROR: Backup of VM 100 failed - interrupted by signal SIGTERM/);
    expect(await q.qmp.execute('query-block-exports')).toEqual([]);
    const nodes = await q.qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string }> }>>('query-named-block-nodes', { flat: true });
    expect(nodes.filter((n) => n['node-name'].startsWith('pvebp'))).toEqual([]);
    expect(nodes.flatMap((n) => (n['dirty-bitmaps'] ?? []).map((b) => b.name)).filter((b) => b.endsWith('//background'))).toEqual([]);
    expect(readdirSync(fleecing)).toEqual([]);
    expect(readdirSync(store)).toEqual([]);
  });
});

describe('guest agent', () => {
  it('freezes the guest file systems around the point in time, thawed before the provider reads', async () => {
    const q = await startVm({ size: 8 * MiB });
    const store = await tempDir();
    const agent = await startScriptedAgent(store);
    let atBackup: string[] = [];
    const p = new RecordingProviderV2(
      { storeid: 'store1', scfg: {}, log: () => {} },
      { onCall: (m) => void (m === 'backupVm' && (atBackup = agent.calls.filter((c) => c.startsWith('guest-fsfreeze')))) },
    );
    try {
      const res = await runBackupJob({ provider: p, storeid: 'store1', tmpdir: store, guests: [{ vmid: 100, type: 'qemu', qmp: q.qmp, devices: ['virtio0'], config: '', qga: agent.path }] });
      expect(res.ok).toBe(true);
      expect(atBackup).toEqual(['guest-fsfreeze-freeze', 'guest-fsfreeze-thaw']);
      expect(res.guests[0]!.log.join('\n')).toMatch(/issuing guest-agent 'fs-freeze' command[\s\S]*issuing guest-agent 'fs-thaw' command/);
    } finally {
      agent.server.close();
    }
  });
});

describe('EFI vars and TPM state (PVE 9 blockdev names)', () => {
  it("backs up drive-efidisk0 and drive-tpmstate0-backup through fleecing like any disk, byte for byte", async () => {
    const q = await startVm({ size: 8 * MiB });
    const store = await tempDir();
    const fleecing = await tempDir();
    await vmWrite(q, 'virtio0', 0x11, 0, MiB);
    await vmWrite(q, 'efidisk0', 0x22, 64 * 1024, 64 * 1024);
    // qemu-server (VZDump/QemuServer.pm prepare/attach_tpmstate_drive) attaches the TPM state for
    // the backup as a node named drive-tpmstate0-backup, with no guest device on it
    const tpm = path.join(q.dir, 'tpmstate.raw');
    await execFileP('qemu-img', ['create', '-q', '-f', 'raw', tpm, String(4 * MiB)]);
    await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 8k', tpm]);
    await q.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'drive-tpmstate0-backup', file: { driver: 'file', filename: tpm, 'node-name': 'drive-tpmstate0-backup-file' } });
    let fleecingFiles: string[] = [];
    const p = new RecordingProviderV2({ storeid: 'store1', scfg: {}, log: () => {} }, { storeDir: path.join(store, 'store'), onCall: (m) => void (m === 'backupVm' && (fleecingFiles = readdirSync(fleecing))) });
    const devices = ['virtio0', 'drive-efidisk0', 'drive-tpmstate0-backup'];
    const res = await runBackupJob({ provider: p, storeid: 'store1', tmpdir: store, fleecing: { dir: fleecing }, guests: [{ vmid: 100, type: 'qemu', qmp: q.qmp, devices, config: 'name: vm\n' }] });
    expect(res.guests[0]!.error).toBeUndefined();
    // one fleecing image per volume: the EFI disk and the TPM state go through fleecing too
    expect(fleecingFiles.map((f) => devices.find((d) => f.includes(`-${d}-fleecing`))).sort()).toEqual([...devices].sort());
    const vm = p.calls.find((c) => c[0] === 'backupVm')!;
    expect(Object.keys(vm[3] as object)).toEqual(devices);
    expect((vm[3] as Record<string, { size: number }>)['drive-tpmstate0-backup']!.size).toBe(4 * MiB);
    const volname = res.guests[0]!.volname!;
    const out = await tempDir();
    await restoreVm({ provider: p, volname, storeid: 'store1', targets: (d) => path.join(out, `${d}.raw`) });
    expectSameBytes(readFileSync(path.join(out, 'drive-tpmstate0-backup.raw')), readFileSync(tpm), 'tpm');
    expectSameBytes(readFileSync(path.join(out, 'drive-efidisk0.raw')), readFileSync(q.images['efidisk0']!), 'efi');
  });
});

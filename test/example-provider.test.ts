/**
 * The example third-party provider (examples/raw-file-provider/provider.js), loaded as a vendor's
 * module by `provider-host --provider <path>`:
 * - through the Perl bridge under `perl -T` (test/pve/driver.pl, the stand-in for vzdump's and
 *   qmrestore's order), QEMU's part on a real qemu-storage-daemon as test/bridge.test.ts does it:
 *   a full and two incremental backups with the guest writing between and during each, every one
 *   restored byte for byte; the incrementals read only the dirty data; a changed, missing or
 *   unfinished previous backup gives a full backup;
 * - directly: the storage hooks on a fresh provider, a container backup as a tar archive and its
 *   restore, and the modes of what it stores, all under umask 000.
 * Needs `npm run build:ts` (the host runs from dist/, and the example imports the package by name).
 */
import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { parseIdMap, restoreContainer, type BackupProviderV2, type ProviderContext, type ProviderStorage } from '../lib/index.js';
import { setupBackupAccess, teardownBackupAccess } from '../lib/qemu/backup-access.js';
import { dropDeviceBitmap, resolveDevices } from '../lib/qemu/devices.js';
import { drive as driveBridge, type Msg, type Run } from './helpers/bridge-driver.js';
import { nbdRead, nbdWrite, startStorageDaemon, stopAll, tempDir, type QemuInstance } from './helpers/qemu.js';
import { buildTree, snapshotTree, TEST_MAP_LINES } from './helpers/tree.js';

const MiB = 1024 * 1024;
const KiB = 1024;
const ROOT = path.resolve(import.meta.dirname, '..');
const EXAMPLE = path.join(ROOT, 'examples/raw-file-provider/provider.js');
const STOREID = 'raw1';
const TARGET_ID = `snapshot-access:${STOREID}`;
const CONFIG = 'memory: 512\nvirtio0: local:100/vm-100-disk-0.qcow2,size=8M\n#qmdump#map:virtio0:disk0:local:qcow2:\n';

let umask = 0;
beforeAll(() => {
  // everything below runs under umask 000: the provider must still store 0700 folders and 0600 files
  umask = process.umask(0);
});
afterAll(() => {
  process.umask(umask);
});
afterEach(async () => {
  await stopAll();
});

/**
 * The example as a vendor installs it: `pve-backup-provider pve-plugin generate --type rawfile
 * --provider <the example>` writes the storage plugin and its provider class once (beforeAll), and
 * the driver gets every provider from the plugin's `new_backup_provider`, as upstream's callers do.
 */
let pluginDir = '';
afterAll(async () => {
  if (pluginDir) await fs.rm(path.dirname(pluginDir), { recursive: true, force: true });
});
const PLUGIN = 'PVE::Storage::Custom::RawfilePlugin';
beforeAll(async () => {
  // not tempDir(): its folders go after each test, this one serves the whole file
  pluginDir = path.join(await fs.mkdtemp(path.join(tmpdir(), 'pvebp-plugin-')), 'perl5');
  execFileSync(process.execPath, [path.join(ROOT, 'dist/cli/main.js'), 'pve-plugin', 'generate', '--type', 'rawfile', '--provider', EXAMPLE, '--dest', pluginDir], { encoding: 'utf8' });
});

/** Runs the driver under `perl -T` with the generated plugin; `onMessage` answers the phases that wait for the test. */
function drive(job: Record<string, unknown>, onMessage?: (m: Msg) => Promise<object | undefined> | object | undefined): Promise<Run> {
  return driveBridge({ plugin: PLUGIN, ...job }, onMessage, { perl5: pluginDir });
}

/** A backup of VM 100 through the bridge, QEMU's part done here as qemu-server does it. */
interface VmBackup extends Run {
  /** The disk as it was when backup access was set up: what the backup must hold. */
  expected: Buffer;
  incremental: Record<string, string>;
  volname: string;
}

/**
 * One vzdump-style VM backup. `during` runs while backup_vm reads (the guest writing after the
 * snapshot: not in this backup, in the next one).
 */
async function backupVm(q: QemuInstance, dir: string, during?: () => Promise<void>, o: { keepBitmap?: boolean; expectError?: boolean } = {}): Promise<VmBackup> {
  const fleece = path.join(dir, 'fleece');
  await fs.mkdir(fleece, { recursive: true });
  const live = `nbd+unix:///live0?socket=${q.nbdPath!}`;
  let expected: Buffer | undefined;
  let incremental: Record<string, string> = {};
  const run = await drive(
    {
      mode: 'backup',
      storeid: STOREID,
      scfg: { path: path.join(dir, 'store'), type: 'rawfile' },
      vmid: '100',
      config: CONFIG,
      devices: { disk0: 8 * MiB },
      logfile: path.join(dir, 'qemu-100.log'),
    },
    async (m) => {
      if (m.phase === 'setup') {
        incremental = (m.incremental ?? {}) as Record<string, string>;
        expected = await nbdRead(live, dir); // nothing writes between this read and the snapshot
        const any = Object.values(incremental).some((v) => v === 'new' || v === 'use');
        // Proxmox's QEMU recreates the bitmap of a device asked `new`; on stock QEMU the caller
        // drops it first (lib/qemu/types.ts bitmapModes), as the job runner does
        if (!o.keepBitmap) for (const s of await resolveDevices(q.qmp, ['disk0'])) if (incremental[s.device] === 'new') await dropDeviceBitmap(q.qmp, s, TARGET_ID, STOREID);
        const access = await setupBackupAccess(q.qmp, {
          targetId: TARGET_ID,
          devices: ['disk0'],
          // qemu-server hands QEMU the provider's answer per device (bitmap-mode of backup-access-setup)
          ...(any ? { bitmap: STOREID, bitmapModes: incremental as Record<string, 'use' | 'new' | 'none'> } : {}),
          fleecing: { dir: fleece },
          nbdServer: { path: q.nbdPath! },
        });
        const volumes: Record<string, object> = {};
        for (const d of access.devices) {
          volumes[d.device] = {
            size: String(d.size),
            'nbd-path': access.socketPath,
            'bitmap-mode': d.bitmapMode,
            ...(d.bitmapName !== undefined && d.bitmapMode !== 'none' ? { 'bitmap-name': d.bitmapName } : {}),
          };
        }
        return { volumes };
      }
      // the driver does not wait for this one: the writes race with backup_vm's reads
      if (m.phase === 'backup_vm') await during?.();
      if (m.phase === 'teardown') {
        await teardownBackupAccess(q.qmp, { targetId: TARGET_ID, success: m.success === true });
        return {};
      }
      return undefined;
    },
  );
  expect(run.stderr).not.toMatch(/Insecure|tainted/);
  if (!o.expectError) expect(run.done.error ?? null).toBeNull();
  expect(run.done.job_error ?? null).toBeNull();
  return { ...run, expected: expected!, incremental, volname: `backup/${run.done.archive!}` };
}

/** Restores disk0 of `volname` through the bridge in qmrestore's order and returns its bytes. */
async function restoreVm(dir: string, volname: string): Promise<Buffer> {
  const target = path.join(dir, `restored-${Math.random().toString(16).slice(2)}.raw`);
  const r = await drive({
    mode: 'restore',
    storeid: STOREID,
    scfg: { path: path.join(dir, 'store') },
    volname,
    targets: { disk0: target },
  });
  expect(r.stderr).not.toMatch(/Insecure|tainted/);
  expect(r.done.error ?? null).toBeNull();
  const configs = r.messages.find((m) => m.phase === 'configs')!;
  expect(configs.config).toBe(CONFIG);
  expect(configs.devices).toEqual({ disk0: { size: 8 * MiB } });
  const bytes = await fs.readFile(target);
  await fs.rm(target);
  return bytes;
}

interface IndexJson {
  id: string;
  vmid: number;
  vmtype: string;
  parent?: string;
  disks?: Record<string, { file: string; size: number; kind: string; bytesRead: number; mtimeMs: number }>;
  notes?: string;
  protected: boolean;
}

function backupDir(dir: string, volname: string): string {
  return path.join(dir, 'store', volname.slice('backup/'.length));
}

async function readIndex(dir: string, volname: string): Promise<IndexJson> {
  return JSON.parse(await fs.readFile(path.join(backupDir(dir, volname), 'index.json'), 'utf8')) as IndexJson;
}

async function mode(p: string): Promise<number> {
  return (await fs.stat(p)).mode & 0o777;
}

/** A fresh instance of the example, as the storage plugin makes one for each call. */
async function freshProvider(store: string, logs: string[] = []): Promise<BackupProviderV2 & { storage: Required<ProviderStorage> }> {
  const { default: RawFileProvider } = (await import(EXAMPLE)) as { default: new (c: ProviderContext) => BackupProviderV2 & { storage: Required<ProviderStorage> } };
  return new RawFileProvider({ storeid: STOREID, scfg: { path: store }, log: (l, m) => logs.push(`${l}: ${m}`) });
}

describe('the example provider through the Perl bridge (perl -T, real qemu-storage-daemon)', () => {
  it('backs up full and twice incremental with the guest writing between and during each; restores each byte for byte', async () => {
    const q = await startStorageDaemon({ size: 8 * MiB });
    const dir = await tempDir();
    await fs.writeFile(path.join(dir, 'qemu-100.log'), 'INFO: vzdump log\n');
    const live = `nbd+unix:///live0?socket=${q.nbdPath!}`;
    await nbdWrite(live, 0x11, 0, 3 * MiB);
    await nbdWrite(live, 0x5a, 6 * MiB, 512 * KiB);

    // full; the guest writes 256 KiB while it is read
    const full = await backupVm(q, dir, () => nbdWrite(live, 0x44, 2 * MiB, 256 * KiB));
    expect(full.incremental).toEqual({ disk0: 'new' });
    const i1 = await readIndex(dir, full.volname);
    expect(i1.disks!.disk0!).toMatchObject({ kind: 'full', size: 8 * MiB });
    expect(i1.parent).toBeUndefined();

    // what it stores is private whatever the umask, and the raw file is what qemu-server's
    // file_size_info accepts: a regular file, raw, no backing file
    const bdir = backupDir(dir, full.volname);
    for (const d of [path.join(dir, 'store'), path.join(dir, 'store/100'), bdir]) expect(await mode(d)).toBe(0o700);
    for (const f of ['index.json', 'disk0.raw', 'backup.log', '../last-good.json']) expect(await mode(path.join(bdir, f))).toBe(0o600);
    expect((await fs.readdir(bdir)).sort()).toEqual(['backup.log', 'disk0.raw', 'index.json']);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', path.join(bdir, 'disk0.raw')], { encoding: 'utf8' })) as Record<string, unknown>;
    expect(info).toMatchObject({ format: 'raw', 'virtual-size': 8 * MiB });
    expect(info['backing-filename']).toBeUndefined();

    // incremental 1: the write made during the full, one between, one during
    await nbdWrite(live, 0x22, 5 * MiB, 1 * MiB);
    const incr1 = await backupVm(q, dir, () => nbdWrite(live, 0x66, 7 * MiB, 128 * KiB));
    expect(incr1.incremental).toEqual({ disk0: 'use' });
    const i2 = await readIndex(dir, incr1.volname);
    expect(i2.parent).toBe(full.volname);
    expect(i2.disks!.disk0!.kind).toBe('incremental');
    // only the dirty data was read: 256 KiB + 1 MiB (a full read 3.5 MiB+)
    expect(i2.disks!.disk0!.bytesRead).toBe(256 * KiB + 1 * MiB);
    expect(incr1.logs).toContainEqual(['info', `disk0: incremental, read ${256 * KiB + 1 * MiB} of ${8 * MiB} bytes`]);

    // incremental 2: the write made during incremental 1, and one between
    await nbdWrite(live, 0x33, 64 * KiB, 64 * KiB);
    const incr2 = await backupVm(q, dir, () => nbdWrite(live, 0x77, 1 * MiB, 64 * KiB));
    expect(incr2.incremental).toEqual({ disk0: 'use' });
    const i3 = await readIndex(dir, incr2.volname);
    expect(i3.parent).toBe(incr1.volname);
    expect(i3.disks!.disk0!.bytesRead).toBe(128 * KiB + 64 * KiB);
    expect(i1.disks!.disk0!.bytesRead).toBeGreaterThanOrEqual(3 * MiB + 512 * KiB);

    const states = [full.expected, incr1.expected, incr2.expected];
    expect(new Set(states.map((b) => b.toString('base64'))).size).toBe(3);
    for (const [b, expected] of [[full, full.expected], [incr1, incr1.expected], [incr2, incr2.expected]] as const) {
      const restored = await restoreVm(dir, b.volname);
      expect(restored.equals(expected)).toBe(true);
    }
    // the writes made during the last backup are on the disk, not in any backup
    expect((await nbdRead(live, dir)).equals(incr2.expected)).toBe(false);
  }, 180_000);

  it('makes a full backup when the previous one changed, is gone, or never completed', async () => {
    const q = await startStorageDaemon({ size: 8 * MiB });
    const dir = await tempDir();
    const live = `nbd+unix:///live0?socket=${q.nbdPath!}`;
    const store = path.join(dir, 'store');
    await nbdWrite(live, 0x11, 0, 2 * MiB);
    const b1 = await backupVm(q, dir);
    expect(b1.incremental).toEqual({ disk0: 'new' });

    // changed: the previous raw file was modified after its backup completed
    await nbdWrite(live, 0x22, 4 * MiB, 64 * KiB);
    const raw1 = path.join(backupDir(dir, b1.volname), 'disk0.raw');
    const fh = await fs.open(raw1, 'r+');
    await fh.write(Buffer.alloc(512, 0xee), 0, 512, 0);
    await fh.close();
    const b2 = await backupVm(q, dir);
    expect(b2.incremental).toEqual({ disk0: 'new' });
    expect(b2.logs.some(([l, msg]) => l === 'warn' && msg.includes(`${b1.volname} has a changed or missing disk0.raw`))).toBe(true);
    expect((await readIndex(dir, b2.volname)).disks!.disk0!.kind).toBe('full');
    expect((await restoreVm(dir, b2.volname)).equals(b2.expected)).toBe(true);

    // gone: the previous backup was removed
    await nbdWrite(live, 0x33, 5 * MiB, 64 * KiB);
    await (await freshProvider(store)).storage.removeBackup(b2.volname);
    const b3 = await backupVm(q, dir);
    expect(b3.incremental).toEqual({ disk0: 'new' });
    expect(b3.logs.some(([l, msg]) => l === 'warn' && msg.includes(`${b2.volname} is gone or was replaced`))).toBe(true);
    expect((await restoreVm(dir, b3.volname)).equals(b3.expected)).toBe(true);

    // never completed: a run that may have told QEMU success died before writing its index
    await nbdWrite(live, 0x44, 6 * MiB, 64 * KiB);
    const record = path.join(store, '100/last-good.json');
    const good = JSON.parse(await fs.readFile(record, 'utf8')) as { volname: string; id: string };
    expect(good.volname).toBe(b3.volname);
    await fs.writeFile(record, JSON.stringify({ ...good, pending: 'backup/100/qemu-2026_11_30-00_00_00' }));
    const b4 = await backupVm(q, dir);
    expect(b4.incremental).toEqual({ disk0: 'new' });
    expect((await restoreVm(dir, b4.volname)).equals(b4.expected)).toBe(true);

    // QEMU offering its old bitmap although the provider asked for a new one (a caller that
    // ignored the answer): the backup fails rather than building on the wrong base
    await nbdWrite(live, 0x66, 3 * MiB, 64 * KiB);
    await fs.writeFile(record, JSON.stringify({ ...JSON.parse(await fs.readFile(record, 'utf8')), pending: 'backup/100/qemu-2026_11_30-00_00_00' }));
    const bad = await backupVm(q, dir, undefined, { keepBitmap: true, expectError: true });
    expect(bad.incremental).toEqual({ disk0: 'new' });
    expect(bad.done.error).toMatch(/disk0: QEMU offers an incremental backup, but there is no previous raw file to start from \[ERR_RAWFILE_STATE\]/);
    await expect(fs.access(backupDir(dir, bad.volname))).rejects.toThrow();
    // QEMU was told failure; the record names no trusted base (b4 was never confirmed): full again
    const b4b = await backupVm(q, dir);
    expect(b4b.incremental).toEqual({ disk0: 'new' });
    expect((await restoreVm(dir, b4b.volname)).equals(b4b.expected)).toBe(true);

    // and with the record intact, the next one is incremental again
    await nbdWrite(live, 0x55, 7 * MiB, 64 * KiB);
    const b5 = await backupVm(q, dir);
    expect(b5.incremental).toEqual({ disk0: 'use' });
    expect((await readIndex(dir, b5.volname)).disks!.disk0!).toMatchObject({ kind: 'incremental', bytesRead: 64 * KiB });
    expect((await restoreVm(dir, b5.volname)).equals(b5.expected)).toBe(true);
  }, 240_000);
});

describe('the example provider called directly (umask 000 unless a test sets another)', () => {
  it('backs up a container as a tar archive and restores it; the storage hooks work on a fresh instance', async () => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    await fs.mkdir(src);
    buildTree(src, { idBase: 100000 });
    await fs.mkdir(path.join(src, 'sbin'));
    await fs.writeFile(path.join(src, 'sbin/init'), '#!/bin/sh\n');
    await fs.lchown(path.join(src, 'sbin'), 100000, 100000);
    await fs.lchown(path.join(src, 'sbin/init'), 100000, 100000);
    const before = snapshotTree(src);
    const store = path.join(work, 'store');
    const idMap = parseIdMap(TEST_MAP_LINES);

    const logfile = path.join(work, 'lxc-200.log');
    await fs.writeFile(logfile, 'INFO: vzdump log\n');
    const p = await freshProvider(store);
    await p.jobInit(0);
    const t0 = Date.UTC(2026, 10, 1, 10) / 1000;
    const volnames: string[] = [];
    for (const [i, start] of [t0, t0 + 86_400, t0 + 2 * 86_400].entries()) {
      const { archiveName } = await p.backupInit(200, 'lxc', start);
      expect(await p.backupGetMechanism(200, 'lxc')).toBe('directory');
      const info = { directory: src, sources: ['.'], backupUserId: 100000, idMap, archiveName, firewallConfig: i === 0 ? '[OPTIONS]\nenable: 1\n' : '', signal: new AbortController().signal };
      await p.backupContainerPrepare(200, info);
      await p.backupContainer(200, `hostname: ct200\n#${i}\n`, ['/tmp/?*'], info);
      const res = await p.backupCleanup(200, 'lxc', true, {});
      expect(res?.stats?.archiveSize).toBeGreaterThan(0);
      await p.backupHandleLogFile(200, logfile);
      volnames.push(`backup/${archiveName}`);
    }
    await p.jobCleanup();
    expect(volnames[0]).toBe('backup/200/lxc-2026_11_01-10_00_00');

    // a folder without an index (a run that died) is not a backup
    const dead = path.join(store, '200/lxc-2026_10_01-00_00_00');
    await fs.mkdir(dead);
    await fs.writeFile(path.join(dead, 'root.tar'), 'partial');

    // modes, whatever the umask
    const b0 = path.join(store, '200/lxc-2026_11_01-10_00_00');
    for (const d of [store, path.join(store, '200'), b0]) expect(await mode(d)).toBe(0o700);
    for (const f of ['index.json', 'root.tar', 'backup.log']) expect(await mode(path.join(b0, f))).toBe(0o600);

    // restore with the tar mechanism: a regular .tar file pve-container can list (>= 10 members, sbin)
    const r = await freshProvider(store);
    expect(await r.restoreGetMechanism(volnames[0]!)).toEqual({ mechanism: 'tar', vmtype: 'lxc' });
    expect(await r.archiveGetFirewallConfig(volnames[0]!)).toBe('[OPTIONS]\nenable: 1\n');
    const { tarPath } = await r.restoreContainerInit(volnames[0]!, STOREID, {});
    expect(tarPath).toMatch(/\.tar$/);
    expect((await fs.stat(tarPath!)).isFile()).toBe(true);
    const members = execFileSync('tar', ['-tvf', tarPath!], { encoding: 'latin1' }).trim().split('\n');
    expect(members.length).toBeGreaterThanOrEqual(10);
    expect(members.some((m) => / \.\/sbin\/?$/.test(m))).toBe(true);
    const dst = path.join(work, 'dst');
    await fs.mkdir(dst);
    const res = await restoreContainer({ provider: r, volname: volnames[0]!, storeid: STOREID, rootdir: dst, configDir: work, idMap: TEST_MAP_LINES });
    expect(res).toMatchObject({ mechanism: 'tar', config: 'hostname: ct200\n#0\n' });
    expect(snapshotTree(dst)).toEqual(before);

    // the storage side, each call on a fresh instance as Proxmox VE's storage plugin makes them
    const s = async (): Promise<Required<ProviderStorage>> => (await freshProvider(store)).storage;
    const listed = await (await s()).listBackups({ vmid: 200 });
    expect(listed.map((b) => b.volname)).toEqual(volnames);
    expect(listed[0]).toMatchObject({ vmid: 200, vmtype: 'lxc', ctime: t0, protected: false });
    expect(listed[0]!.size).toBeGreaterThan(0);
    expect(await (await s()).listBackups({})).toHaveLength(3);
    expect(await (await s()).listBackups({ vmid: 999 })).toEqual([]);

    await (await s()).setNotes(volnames[1]!, 'before the upgrade');
    expect(await (await s()).getNotes(volnames[1]!)).toBe('before the upgrade');
    expect(await (await s()).getNotes(volnames[0]!)).toBeUndefined();
    await (await s()).setProtected(volnames[0]!, true);
    expect(await (await s()).getProtected(volnames[0]!)).toBe(true);
    expect(await (await s()).getProtected(volnames[1]!)).toBe(false);
    // notes and the flag set at once on one backup: neither change is lost (the index lock)
    const [a, b] = [await s(), await s()];
    await Promise.all([a.setNotes(volnames[2]!, 'n2'), b.setProtected(volnames[2]!, true)]);
    expect(await (await s()).getNotes(volnames[2]!)).toBe('n2');
    expect(await (await s()).getProtected(volnames[2]!)).toBe(true);
    await (await s()).setProtected(volnames[2]!, false);
    expect(await mode(path.join(b0, 'index.json'))).toBe(0o600);

    // prune keep-last 1: dry run decides and removes nothing
    const dry = await (await s()).prune({ vmid: 200, vmtype: 'lxc', keep: { keepLast: 1 }, dryRun: true });
    expect(dry).toEqual({
      removed: [],
      marks: [
        { volname: volnames[2], vmid: 200, vmtype: 'lxc', ctime: t0 + 2 * 86_400, mark: 'keep' },
        { volname: volnames[1], vmid: 200, vmtype: 'lxc', ctime: t0 + 86_400, mark: 'remove' },
        { volname: volnames[0], vmid: 200, vmtype: 'lxc', ctime: t0, mark: 'protected' },
      ],
    });
    expect(await (await s()).listBackups({ vmid: 200 })).toHaveLength(3);
    expect((await (await s()).prune({ vmid: 200, vmtype: 'qemu', keep: { keepLast: 1 } })) ).toEqual({ removed: [], marks: [] });
    const real = await (await s()).prune({ vmid: 200, vmtype: 'lxc', keep: { keepLast: 1 } });
    expect(real!.removed).toEqual([volnames[1]]);
    expect((await (await s()).listBackups({ vmid: 200 })).map((x) => x.volname)).toEqual([volnames[0], volnames[2]]);
    await expect(fs.access(path.join(store, volnames[1]!.slice('backup/'.length)))).rejects.toThrow();

    // remove refuses a protected backup, and takes it once unprotected
    await expect((await s()).removeBackup(volnames[0]!)).rejects.toMatchObject({ code: 'ERR_RAWFILE_PROTECTED' });
    expect(await (await s()).listBackups({ vmid: 200 })).toHaveLength(2);
    await (await s()).setProtected(volnames[0]!, false);
    await (await s()).removeBackup(volnames[0]!);
    expect((await (await s()).listBackups({ vmid: 200 })).map((x) => x.volname)).toEqual([volnames[2]]);

    // unknown and malformed volume names
    await expect((await s()).getNotes('backup/200/lxc-2026_10_01-00_00_00')).rejects.toMatchObject({ code: 'ERR_RAWFILE_NOT_FOUND' });
    await expect((await s()).getNotes('backup/200/../../etc')).rejects.toMatchObject({ code: 'ERR_RAWFILE_VOLNAME' });

    const st = await (await s()).status();
    expect(st.total).toBeGreaterThan(0);
    expect(st.free).toBeGreaterThan(0);
    expect(st.free + st.used).toBeLessThanOrEqual(st.total);
  }, 120_000);

  it('stores 0700 folders and 0600 files under a umask that takes the owner\'s bits too (0277)', async () => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    await fs.mkdir(path.join(src, 'etc'), { recursive: true });
    await fs.writeFile(path.join(src, 'etc/hostname'), 'ct201\n');
    const logfile = path.join(work, 'lxc-201.log');
    await fs.writeFile(logfile, 'INFO: vzdump log\n');
    const store = path.join(work, 'store');
    const old = process.umask(0o277);
    try {
      const p = await freshProvider(store);
      await p.jobInit(0);
      const { archiveName } = await p.backupInit(201, 'lxc', Date.UTC(2026, 10, 2) / 1000);
      const info = { directory: src, sources: ['.'], backupUserId: 0, idMap: [], archiveName, signal: new AbortController().signal };
      await p.backupContainer(201, 'hostname: ct201\n', [], info);
      await p.backupCleanup(201, 'lxc', true, {});
      await p.backupHandleLogFile(201, logfile);
      await p.storage!.setNotes!(`backup/${archiveName}`, 'n');
      await p.jobCleanup();
      const dir = path.join(store, archiveName);
      for (const d of [store, path.join(store, '201'), dir]) expect(await mode(d)).toBe(0o700);
      for (const f of ['index.json', 'root.tar', 'backup.log']) expect(await mode(path.join(dir, f))).toBe(0o600);
    } finally {
      process.umask(old);
    }
  });

  it('keeps two jobs of one guest apart, and removes only what a dead writer left', async () => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    await fs.mkdir(path.join(src, 'etc'), { recursive: true });
    await fs.writeFile(path.join(src, 'etc/hostname'), 'ct202\n');
    const store = path.join(work, 'store');
    const start = Date.UTC(2026, 10, 3) / 1000;
    // what a killed run left: its writer is a process that is gone
    const gone = execFileSync(process.execPath, ['-p', 'process.pid'], { encoding: 'utf8' }).trim();
    const dead = path.join(store, '202/lxc-2026_11_02-00_00_00');
    await fs.mkdir(dead, { recursive: true });
    await fs.writeFile(path.join(dead, 'writer.json'), JSON.stringify({ host: hostname(), pid: Number(gone), start: '1' }));
    // a backup another host is writing to the shared storage is left alone
    const remote = path.join(store, '202/lxc-2026_11_02-00_00_01');
    await fs.mkdir(remote);
    await fs.writeFile(path.join(remote, 'writer.json'), JSON.stringify({ host: 'other-node', pid: 1, start: '1' }));

    const [p1, p2] = [await freshProvider(store), await freshProvider(store)];
    const [a, b] = await Promise.all([p1.backupInit(202, 'lxc', start), p2.backupInit(202, 'lxc', start)]);
    expect(a.archiveName).not.toBe(b.archiveName);
    await expect(fs.access(dead)).rejects.toThrow();
    await fs.access(remote);
    const info = (archiveName: string) => ({ directory: src, sources: ['.'], backupUserId: 0, idMap: [], archiveName, signal: new AbortController().signal });
    await Promise.all([p1.backupContainer(202, 'hostname: a\n', [], info(a.archiveName)), p2.backupContainer(202, 'hostname: b\n', [], info(b.archiveName))]);
    // a third job starting meanwhile leaves the two running backups alone (their writer is alive)
    const p3 = await freshProvider(store);
    const c = await p3.backupInit(202, 'lxc', start);
    await p3.backupCleanup(202, 'lxc', false, { error: 'test' });
    await expect(fs.access(path.join(store, c.archiveName))).rejects.toThrow();
    await Promise.all([p1.backupCleanup(202, 'lxc', true, {}), p2.backupCleanup(202, 'lxc', true, {})]);
    const listed = await (await freshProvider(store)).storage.listBackups({ vmid: 202 });
    expect(listed.map((x) => x.volname).sort()).toEqual([`backup/${a.archiveName}`, `backup/${b.archiveName}`].sort());
    expect(await p1.archiveGetGuestConfig(`backup/${a.archiveName}`)).toBe('hostname: a\n');
    expect(await p1.archiveGetGuestConfig(`backup/${b.archiveName}`)).toBe('hostname: b\n');
    expect(await fs.readdir(path.join(store, a.archiveName))).toEqual(expect.not.arrayContaining(['writer.json']));
  });

  it('exports pveStorage: the fixed path and one prefixed property of its own', async () => {
    const mod = (await import(EXAMPLE)) as { pveStorage: { properties: Record<string, unknown>; options: Record<string, { fixed?: boolean }>; archiveNameVmid: string } };
    expect(mod.pveStorage.options.path).toEqual({ fixed: true });
    expect(Object.keys(mod.pveStorage.properties)).toEqual(['rawfile-incremental']);
    expect(new RegExp(mod.pveStorage.archiveNameVmid).exec('200/lxc-2026_11_01-10_00_00')?.[1]).toBe('200');
  });

  it('type-checks against the package (tsc --checkJs through the package name)', () => {
    execFileSync(process.execPath, [path.join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', path.join(ROOT, 'examples/raw-file-provider')], { encoding: 'utf8' });
  }, 60_000);
});

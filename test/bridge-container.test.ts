/**
 * Containers through the Perl bridge under `perl -T`, as Proxmox VE runs them
 * (test/pve/driver.pl stands in for vzdump with pve-container's `PVE::VZDump::LXC`, for `pct
 * restore` and for "Show configuration"; docs/pve-bridge-notes.md §3.5, §4.2, §4.3, §6.4, §7.7):
 * - vzdump unshares its mount namespace and bind-mounts the tree at the mount point after the
 *   host was started at `job_init`, so the host sees an empty folder there; it reads the tree
 *   through `/proc/<pid>/root` of the driver instead (§7.7 (a));
 * - for an unprivileged container `backup_container` runs in a forked child in a new user
 *   namespace as the container's root (host uid 100000), over the inherited channel. Real user
 *   namespaces are used here (the driver unshares CLONE_NEWUSER and writes the maps as
 *   newuidmap/newgidmap would); the test fails, not skips, where the kernel refuses them;
 * - `pct restore` builds a fresh provider per phase and extracts with pve-container's tar pipe
 *   (`directory`) or its checked tar extract (`tar`), the extracting tar in the container's user
 *   namespace as `lxc-usernsexec` runs it, so owners end up shifted by the id map.
 * Also: two jobs at once on one store (a VM and a container), qmrestore's process shape, and the
 * same container backup and pct restore with the ChunkProvider on a Garage cluster.
 * Needs root and `npm run build:ts` (the host runs from dist/).
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, chownSync, lchownSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';

import { PassThrough } from 'node:stream';
import { createInterface } from 'node:readline';

import { ProviderHost } from '../lib/bridge/host.js';
import { BackupProviderBase } from '../lib/provider/base.js';
import type { ContainerBackupInfo } from '../lib/provider/api.js';
import { DirectoryProvider } from '../lib/index.js';
import { DirectoryStore } from '../lib/directory-provider/store.js';
import { bridgeOptions, drive, qemuPart, type Msg, type Run } from './helpers/bridge-driver.js';
import { nbdRead, nbdWrite, startStorageDaemon, stopAll, tempDir } from './helpers/qemu.js';
import { gone, requireTool } from './helpers/tools.js';
import { startS3Cluster, type S3Cluster } from './helpers/s3-cluster.js';
import { buildTree, shiftSnapshot, snapshotTree, TEST_MAP_LINES, type TreeEntry } from './helpers/tree.js';

const MiB = 1024 * 1024;
const STOREID = 'dir1';
const CT_CONFIG = 'arch: amd64\nhostname: ct200\nmemory: 512\nrootfs: local:200/vm-200-disk-0.raw,size=8G\nunprivileged: 1\n';
const PRIV_CONFIG = 'arch: amd64\nhostname: ct201\nmemory: 512\nrootfs: local:201/vm-201-disk-0.raw,size=8G\n';
const FIREWALL = '[OPTIONS]\nenable: 1\n';
const VM_CONFIG = 'memory: 512\nvirtio0: local:100/vm-100-disk-0.qcow2,size=8M\n#qmdump#map:virtio0:disk0:local:qcow2:\n';
/** What vzdump adds to every job's exclude list with stdexcludes (pve-manager VZDump.pm new). */
const STD_EXCLUDES = ['/tmp/?*', '/var/tmp/?*', '/var/run/?*.pid'];
/** VFS capability v3 (cap_net_raw+ep) with root id 100000: what `setcap` inside the container stores. */
const CAP_V3_100000 = '0x0100000300200000000000000000000000000000a0860100';

afterEach(async () => {
  await stopAll();
});

function requireRoot(): void {
  if (process.getuid?.() !== 0) throw new Error('these tests need root (mount namespaces, bind mounts, user namespaces, chown)');
  requireTool('mount', 'mount');
  requireTool('tar', 'tar');
}

/**
 * A container's tree as the host sees it (owners + `base`): test/helpers/tree.ts's tree plus
 * `sbin` (pct restore's tar check wants it), without device nodes (an unprivileged container
 * cannot make them, and tar in its user namespace cannot mknod them back); for an unprivileged
 * container its file capability is the v3 one a `setcap` inside it stores.
 */
function containerTree(work: string, base: number): string {
  const src = path.join(work, `rootfs-${base}`);
  mkdirSync(src);
  buildTree(src, { idBase: base });
  mkdirSync(path.join(src, 'sbin'));
  lchownSync(path.join(src, 'sbin'), base, base);
  writeFileSync(path.join(src, 'sbin', 'init'), '#!/bin/sh\n');
  lchownSync(path.join(src, 'sbin', 'init'), base, base);
  chmodSync(path.join(src, 'sbin', 'init'), 0o755);
  rmSync(path.join(src, 'char-null'));
  rmSync(path.join(src, 'block-loop'));
  if (base === 100000) execFileSync('setfattr', ['-n', 'security.capability', '-v', CAP_V3_100000, path.join(src, 'ping')]);
  return src;
}

/** `snapshot` without the entries vzdump's standard excludes leave out of the test tree. */
function withoutExcluded(snapshot: Record<string, TreeEntry>): Record<string, TreeEntry> {
  const { 'var/tmp/junk.tmp': _junk, ...rest } = snapshot;
  return rest;
}

/**
 * Compares a tree pct restored with its source. One known gap, of the DirectoryProvider and not
 * of the bridge: it stores a file capability as the host sees it (VFS caps v3, root id 100000)
 * instead of the container's view (what vzdump's copy inside the user namespace would read: v2),
 * and tar in the container's user namespace cannot write a root id its map does not hold (the
 * write fails, `--warning=no-xattr-write` keeps tar quiet), so the capability is lost. Pinned
 * here, so that fixing it shows.
 */
function expectRestored(restored: Record<string, TreeEntry>, source: Record<string, TreeEntry>): void {
  const want = withoutExcluded(source);
  const { ping: gotPing, ...got } = restored;
  const { ping: wantPing, ...rest } = want;
  expect(got).toEqual(rest);
  const { xattrs: gotX, ...gotPingRest } = gotPing!;
  const { xattrs: wantX, ...wantPingRest } = wantPing!;
  expect(gotPingRest).toEqual(wantPingRest);
  expect(wantX?.['security.capability']).toBe(CAP_V3_100000);
  expect(gotX?.['security.capability']).toBeUndefined();
}

interface CtJob {
  work: string;
  rootfs: string;
  config: string;
  mode: 'tar' | 'directory';
  provider?: string;
  /** The storage configuration (default: a directory store under `work`). */
  scfg?: Record<string, unknown>;
  vmid?: string;
  pause?: boolean;
  onMessage?: (m: Msg) => Promise<object | undefined> | object | undefined;
}

/** A vzdump job backing up one container through the bridge. */
async function ctBackup(j: CtJob): Promise<Run> {
  const mountpoint = path.join(j.work, `vzsnap-${j.vmid ?? '200'}`);
  await fs.mkdir(mountpoint, { recursive: true });
  const logfile = path.join(j.work, `lxc-${j.vmid ?? '200'}.log`);
  await fs.writeFile(logfile, 'INFO: vzdump log\n');
  return drive(
    {
      mode: 'ct-backup',
      storeid: STOREID,
      scfg: j.scfg ?? { path: path.join(j.work, 'store'), 'lxc-backup-mode': j.mode },
      bridge: bridgeOptions(j.provider ?? 'directory.mjs', path.join(j.work, 'state')),
      vmid: j.vmid ?? '200',
      config: j.config,
      rootfs: j.rootfs,
      mountpoint,
      firewall: FIREWALL,
      logfile,
      ...(j.pause ? { pause: true } : {}),
    },
    j.onMessage,
  );
}

/** pct restore of `volname` into a fresh root directory owned by the container's root, as pve-container creates it. */
async function ctRestore(work: string, volname: string, name: string, o: { scfg?: Record<string, unknown>; provider?: string } = {}): Promise<{ run: Run; rootdir: string }> {
  // the extracting tar runs as host uid 100000: the folders above the root must be searchable
  chmodSync(work, 0o755);
  const rootdir = path.join(work, name);
  mkdirSync(rootdir);
  chownSync(rootdir, 100000, 100000);
  chmodSync(rootdir, 0o755);
  const run = await drive({
    mode: 'ct-restore',
    storeid: STOREID,
    scfg: o.scfg ?? { path: path.join(work, 'store') },
    bridge: bridgeOptions(o.provider ?? 'directory.mjs', path.join(work, 'state')),
    volname,
    rootdir,
    config: 'arch: amd64\nhostname: restored\nunprivileged: 1\n',
  });
  return { run, rootdir };
}

function expectClean(run: Run): void {
  expect(run.stderr).not.toMatch(/Insecure|tainted|interrupted by signal/);
  expect(run.done.error ?? null).toBeNull();
  expect(run.done.job_error ?? null).toBeNull();
  expect(run.exitCode).toBe(0);
}

/** The DirectoryProvider on `rootfs` without the bridge, in-process: what the bridge must store too. */
async function directBackup(work: string, rootfs: string, config: string, mode: 'tar' | 'directory', mapped: boolean): Promise<string> {
  const root = path.join(work, 'direct-store');
  const p = new DirectoryProvider({ storeid: STOREID, scfg: { path: root, 'lxc-backup-mode': mode }, log: () => {} });
  const backupUserId = mapped ? 100000 : 0;
  const idMap = mapped
    ? TEST_MAP_LINES.map((l) => {
        const [type, container, host, length] = l.split(' ');
        return { type: type as 'u' | 'g', container: Number(container), host: Number(host), length: Number(length) };
      })
    : [];
  await p.jobInit(Math.floor(Date.now() / 1000));
  const { archiveName } = await p.backupInit(200, 'lxc', Math.floor(Date.now() / 1000));
  const info = { directory: rootfs, sources: ['./'], backupUserId, idMap, archiveName, firewallConfig: FIREWALL, signal: new AbortController().signal };
  await p.backupContainerPrepare(200, info);
  await p.backupContainer(200, config, STD_EXCLUDES, info);
  await p.backupCleanup(200, 'lxc', true, {});
  await p.jobCleanup();
  return (await DirectoryStore.open(root)).backupDir(`backup/${archiveName}`);
}

async function storedDir(work: string, archive: string): Promise<string> {
  return (await DirectoryStore.open(path.join(work, 'store'))).backupDir(`backup/${archive}`);
}

describe('containers through the Perl bridge (perl -T, vzdump and pct stand-ins)', () => {
  it('backs up an unprivileged container from another mount namespace in a user-namespace child, stores what a direct backup stores, and pct restores it exactly (directory)', async () => {
    requireRoot();
    const work = await tempDir();
    const rootfs = containerTree(work, 100000);
    const source = snapshotTree(rootfs);

    const run = await ctBackup({ work, rootfs, config: CT_CONFIG, mode: 'directory' });
    expectClean(run);
    const phase = run.messages.find((m) => m.phase === 'backup_container')!;
    // backup_container ran in a forked child, container root in a new user namespace (host uid 100000)
    const child = run.messages.find((m) => m.phase === 'in_userns')!;
    expect(child).toBeDefined();
    expect(child.pid).not.toBe(phase.ns_pid);
    expect(child.uid).toBe(0);
    expect(String(child.uid_map).trim().split(/\s+/)).toEqual(['0', '100000', '65536']);
    expect(gone(phase.host_pid as number)).toBe(true);
    expect(run.logs).toContainEqual(['info', `creating directory archive '${run.done.archive!}'`]);
    // the bind mount lived in the driver's namespace only
    expect(readFileSync('/proc/self/mountinfo', 'utf8')).not.toContain(path.join(work, 'vzsnap-200'));

    // the stored tree holds the container's view, exactly as the provider stores it without the bridge
    const stored = await storedDir(work, run.done.archive!);
    const direct = await directBackup(work, rootfs, CT_CONFIG, 'directory', true);
    const storedTree = snapshotTree(path.join(stored, 'root'));
    expect(storedTree['usr-bin-su']).toMatchObject({ uid: 0, gid: 0, mode: '4755' });
    expect(storedTree['home/user/notes.txt']).toMatchObject({ uid: 1000, gid: 1000, mode: '0600' });
    expect(storedTree['hello.txt']!.xattrs?.['user.comment']).toBeDefined();
    expect(storedTree).toEqual(snapshotTree(path.join(direct, 'root')));
    expect(await fs.readFile(path.join(stored, 'guest.conf'), 'utf8')).toBe(CT_CONFIG);

    // pct restore: P1..P4, the tar pipe into the container's user namespace
    const { run: r, rootdir } = await ctRestore(work, `backup/${run.done.archive!}`, 'restored');
    expectClean(r);
    expect(r.done.mechanism).toBe('directory');
    expect(r.messages.find((m) => m.phase === 'recovered-config')!.config).toBe(CT_CONFIG);
    expect(r.messages.find((m) => m.phase === 'configs')).toMatchObject({ config: CT_CONFIG, firewall: FIREWALL });
    const hosts = r.done.hosts as Record<string, number>;
    expect(new Set(Object.values(hosts)).size).toBe(4); // a provider object, and a host, per phase
    for (const pid of Object.values(hosts)) expect(gone(pid)).toBe(true);
    expectRestored(snapshotTree(rootdir), source);
  });

  it('stores and restores a tar archive the same way, through pct\'s checks (name, tar -tvf, regular file)', async () => {
    requireRoot();
    const work = await tempDir();
    const rootfs = containerTree(work, 100000);
    const source = snapshotTree(rootfs);

    const run = await ctBackup({ work, rootfs, config: CT_CONFIG, mode: 'tar' });
    expectClean(run);
    expect(run.messages.some((m) => m.phase === 'in_userns')).toBe(true);
    const stored = await storedDir(work, run.done.archive!);
    const direct = await directBackup(work, rootfs, CT_CONFIG, 'tar', true);
    const list = (dir: string): string => execFileSync('tar', ['-tvf', path.join(dir, 'root.tar'), '--numeric-owner', '--full-time'], { encoding: 'latin1' });
    expect(list(stored)).toBe(list(direct));
    expect(list(stored)).toMatch(/^-rwsr-xr-x 0\/0 .* \.\/usr-bin-su$/m);

    const { run: r, rootdir } = await ctRestore(work, `backup/${run.done.archive!}`, 'restored');
    expectClean(r);
    expect(r.done.mechanism).toBe('tar');
    expectRestored(snapshotTree(rootdir), source);
  });

  it('backs up a privileged container in-process (no fork); pct restores it only as unprivileged, owners shifted', async () => {
    requireRoot();
    const work = await tempDir();
    const rootfs = containerTree(work, 0);
    const source = snapshotTree(rootfs);
    const run = await ctBackup({ work, rootfs, config: PRIV_CONFIG, mode: 'directory', vmid: '201' });
    expectClean(run);
    expect(run.messages.some((m) => m.phase === 'in_userns')).toBe(false);
    expect(run.logs).toContainEqual(['warn', 'external backup of privileged container can only be restored as unprivileged']);
    const stored = await storedDir(work, run.done.archive!);
    const storedTree = snapshotTree(path.join(stored, 'root'));
    expect(withoutExcluded(source)['usr-bin-su']).toEqual(storedTree['usr-bin-su']);
    expect(storedTree['home/user/notes.txt']).toMatchObject({ uid: 1000, gid: 1000 });

    const { run: r, rootdir } = await ctRestore(work, `backup/${run.done.archive!}`, 'restored');
    expectClean(r);
    const restored = snapshotTree(rootdir);
    expect(restored['usr-bin-su']).toMatchObject({ uid: 100000, gid: 100000, mode: '4755' });
    expect(restored['home/user/notes.txt']).toMatchObject({ uid: 101000, gid: 101000, mode: '0600' });
    // everything shifted by the map, ACL entries too; the (v2) file capability, written by tar
    // in the container's user namespace, becomes the kernel's v3 one with root id 100000
    const expected = shiftSnapshot(withoutExcluded(source), 100000);
    expected['ping'] = { ...expected['ping']!, xattrs: { ...expected['ping']!.xattrs, 'security.capability': CAP_V3_100000 } };
    expect(restored).toEqual(expected);
  });

  it('keeps a quiet backup_container alive in the user-namespace child (kill(0) on the host answers EPERM there)', async () => {
    requireRoot();
    const work = await tempDir();
    const rootfs = containerTree(work, 100000);
    const run = await ctBackup({ work, rootfs, config: CT_CONFIG, mode: 'directory', provider: 'quiet-container.mjs' });
    expectClean(run);
    expect(run.messages.some((m) => m.phase === 'in_userns')).toBe(true);
  });

  it("gives the worker's next call its own answer when the user-namespace child dies mid-call (the child's late reply is dropped)", async () => {
    requireRoot();
    const work = await tempDir();
    const rootfs = containerTree(work, 100000);
    const bridge = bridgeOptions('quiet-container.mjs', path.join(work, 'state'));
    (bridge.env as Record<string, string>).QUIET_CONTAINER_FAIL = '1';
    const mountpoint = path.join(work, 'vzsnap');
    await fs.mkdir(mountpoint);
    const run = await drive(
      { mode: 'ct-backup', storeid: STOREID, scfg: { path: path.join(work, 'store') }, bridge, vmid: '200', config: CT_CONFIG, rootfs, mountpoint },
      (m) => {
        if (m.phase === 'in_userns') setTimeout(() => process.kill(m.pid as number, 'SIGKILL'), 300);
        return undefined;
      },
    );
    expect(run.done.error).toBe('child exited without a result\n');
    // backup_cleanup(…, 0) got its own reply, not the late error of the dead child's call
    expect(run.logs.filter(([, msg]) => /backup cleanup for external provider failed/.test(msg))).toEqual([]);
    expect(run.logs.some(([l, msg]) => l === 'warn' && /removing the incomplete backup/.test(msg))).toBe(true);
    expect(run.done.job_error ?? null).toBeNull();
    expect(run.exitCode).toBe(0);
  });

  it('"Show configuration": a fresh provider answers archive_get_guest_config alone', async () => {
    requireRoot();
    const work = await tempDir();
    const rootfs = containerTree(work, 100000);
    const run = await ctBackup({ work, rootfs, config: CT_CONFIG, mode: 'tar' });
    expectClean(run);
    const r = await drive({
      mode: 'extractconfig',
      storeid: STOREID,
      scfg: { path: path.join(work, 'store') },
      bridge: bridgeOptions('directory.mjs', path.join(work, 'state')),
      volname: `backup/${run.done.archive!}`,
    });
    expect(r.stderr).not.toMatch(/Insecure|tainted/);
    expect(r.done.error ?? null).toBeNull();
    expect(r.done.config).toBe(CT_CONFIG);
    expect(gone(r.done.host_pid as number)).toBe(true);
  });

  it('runs a VM and a container job at the same time on one store; both restore exactly; qmrestore restores in a forked worker', async () => {
    requireRoot();
    const work = await tempDir();
    const rootfs = containerTree(work, 100000);
    const source = snapshotTree(rootfs);
    const q = await startStorageDaemon({ size: 8 * MiB });
    const live = `nbd+unix:///live0?socket=${q.nbdPath!}`;
    await nbdWrite(live, 0x42, 0, 2 * MiB);
    await nbdWrite(live, 0x17, 5 * MiB, 256 * 1024);
    const disk = await nbdRead(live, work);
    const fleece = path.join(work, 'fleece');
    await fs.mkdir(fleece);
    const vmPart = qemuPart(q, STOREID, fleece);

    // the container job waits before backup_container until the VM job is inside its backup
    let releaseCt: (v: object) => void = () => {};
    const ctHeld = new Promise<object>((resolve) => (releaseCt = resolve));
    let ctWaiting: () => void = () => {};
    const ctAtBackup = new Promise<void>((resolve) => (ctWaiting = resolve));
    let ctJob: Promise<Run> | undefined;
    const vmJob = drive(
      {
        mode: 'backup',
        storeid: STOREID,
        scfg: { path: path.join(work, 'store') },
        bridge: bridgeOptions('directory.mjs', path.join(work, 'state')),
        vmid: '100',
        config: VM_CONFIG,
        devices: { disk0: 8 * MiB },
      },
      async (m) => {
        if (m.phase === 'setup') {
          ctJob = ctBackup({ work, rootfs, config: CT_CONFIG, mode: 'directory', pause: true, onMessage: (c) => (c.phase === 'backup_container' ? (ctWaiting(), ctHeld) : undefined) });
          await ctAtBackup; // both jobs are between backup_init and their data call
        }
        if (m.phase === 'backup_vm') releaseCt({});
        return vmPart(m);
      },
    );
    const [vm, ct] = [await vmJob, await ctJob!];
    expectClean(vm);
    expectClean(ct);
    const store = await DirectoryStore.open(path.join(work, 'store'));
    const listed = [...(await store.listBackups(100)), ...(await store.listBackups(200))];
    expect(listed.map((b) => b.status)).toEqual(['ok', 'ok']);

    // qmrestore: the provider built in the API process, the restore in a forked worker
    const target = path.join(work, 'restored.raw');
    const r = await drive({
      mode: 'restore',
      worker: true,
      storeid: STOREID,
      scfg: { path: path.join(work, 'store') },
      bridge: bridgeOptions('directory.mjs', path.join(work, 'state')),
      volname: `backup/${vm.done.archive!}`,
      targets: { disk0: target },
    });
    expect(r.stderr).not.toMatch(/Insecure|tainted/);
    expect(r.done.error ?? null).toBeNull();
    const order = r.messages.map((m) => m.phase).filter((p) => p !== undefined);
    expect(order).toEqual(['api-returned', 'worker', 'configs', 'worker-exit']);
    expect(r.messages.find((m) => m.phase === 'worker-exit')!.status).toBe(0);
    expect((await fs.readFile(target)).equals(disk)).toBe(true);

    const { run: cr, rootdir } = await ctRestore(work, `backup/${ct.done.archive!}`, 'restored-ct');
    expectClean(cr);
    expectRestored(snapshotTree(rootdir), source);
  });
});

describe("the provider host's part of a container backup", () => {
  it('reads the tree through /proc/<bridge-ns-pid>/root, maps ids from the config, and refuses a bad pid or a relative directory', async () => {
    const seen: Array<[string, Omit<ContainerBackupInfo, 'signal'>]> = [];
    class Seeing extends BackupProviderBase {
      override async backupInit(vmid: number): Promise<{ archiveName: string }> {
        return { archiveName: `ct/${vmid}` };
      }
      override async backupContainerPrepare(_vmid: number, info: ContainerBackupInfo): Promise<void> {
        const { signal: _s, ...rest } = info;
        seen.push(['prepare', rest]);
      }
      override async backupContainer(_vmid: number, _c: string, _e: string[], info: ContainerBackupInfo): Promise<void> {
        const { signal: _s, ...rest } = info;
        seen.push(['backup', rest]);
      }
    }
    const input = new PassThrough();
    const output = new PassThrough();
    const served = new ProviderHost({ factory: (c) => new Seeing(c), input, output }).serve();
    const lines = createInterface({ input: output })[Symbol.asyncIterator]();
    let id = 0;
    type Reply = { id?: number; result?: unknown; error?: { code: string; message: string } };
    const call = async (method: string, ...params: unknown[]): Promise<Reply> => {
      const my = ++id;
      input.write(`${JSON.stringify({ id: my, method, params })}\n`);
      for (;;) {
        const r = JSON.parse((await lines.next()).value as string) as Reply;
        if (r.id === my) return r;
      }
    };
    await call('hello', { storeid: 's', scfg: {} });
    await call('backup_init', '200', 'lxc', 1);
    const info = { directory: '/mnt/vzsnap0', sources: ['./'], 'backup-user-id': '100000' };
    expect((await call('backup_container_prepare', '200', { ...info, 'bridge-ns-pid': '4242' })).error).toBeUndefined();
    const config = 'unprivileged: 1\nlxc.idmap: u 0 200000 65536\nlxc.idmap: g 0 300000 65536\n';
    expect((await call('backup_container', '200', config, [], { ...info, 'bridge-ns-pid': 4242 })).error).toBeUndefined();
    expect((await call('backup_container', '200', config, [], info)).error).toBeUndefined();
    expect(seen.map(([w, i]) => [w, i.directory])).toEqual([
      ['prepare', '/proc/4242/root/mnt/vzsnap0'],
      ['backup', '/proc/4242/root/mnt/vzsnap0'],
      ['backup', '/mnt/vzsnap0'], // no pid: the path as given (a provider run without the bridge's namespaces)
    ]);
    expect(seen[0]![1]).toMatchObject({ backupUserId: 100000, idMap: [{ type: 'u', container: 0, host: 100000, length: 65536 }, { type: 'g', container: 0, host: 100000, length: 65536 }] });
    expect(seen[1]![1].idMap).toEqual([{ type: 'u', container: 0, host: 200000, length: 65536 }, { type: 'g', container: 0, host: 300000, length: 65536 }]);
    for (const bad of [{ ...info, 'bridge-ns-pid': '0' }, { ...info, 'bridge-ns-pid': '1.5' }, { ...info, 'bridge-ns-pid': 'x' }, { ...info, directory: 'mnt/vzsnap0', 'bridge-ns-pid': 7 }]) {
      expect((await call('backup_container', '200', config, [], bad)).error?.code).toBe('ERR_BRIDGE');
    }
    input.end();
    await served;
  });
});

describe('a container through the Perl bridge into the chunk store (Garage, 3 nodes)', { timeout: 300_000 }, () => {
  let cluster: S3Cluster | undefined;
  afterAll(async () => {
    await cluster?.stop();
  });

  it('vzdump backs up an unprivileged container (user-namespace child) into chunks; pct restores it exactly from the tar file the provider writes', async () => {
    requireRoot();
    cluster = await startS3Cluster();
    const work = await tempDir();
    const credentials = path.join(work, 'credentials');
    writeFileSync(credentials, `[default]\naws_access_key_id = ${cluster.accessKeyId}\naws_secret_access_key = ${cluster.secretAccessKey}\n`, { mode: 0o600 });
    const scfg = { store: `s3://${cluster.bucket}/bridge-ct`, endpoint: cluster.endpoint, region: cluster.region, 'allow-http': 1, 'credentials-file': credentials };
    const rootfs = containerTree(work, 100000);
    const source = snapshotTree(rootfs);

    const run = await ctBackup({ work, rootfs, config: CT_CONFIG, mode: 'tar', provider: 'chunks.mjs', scfg });
    expectClean(run);
    expect(run.messages.some((m) => m.phase === 'in_userns')).toBe(true);
    const { run: r, rootdir } = await ctRestore(work, `backup/${run.done.archive!}`, 'restored', { scfg, provider: 'chunks.mjs' });
    expectClean(r);
    expect(r.done.mechanism).toBe('tar');
    expect(r.messages.find((m) => m.phase === 'configs')).toMatchObject({ config: CT_CONFIG, firewall: FIREWALL });
    expectRestored(snapshotTree(rootdir), source);
  });
});

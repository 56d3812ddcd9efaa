/**
 * The store commands of the command line, as a user runs them: backup (disk images through
 * qemu-storage-daemon, a container directory), list, restore, prune, delete, verify, protect;
 * JSON output; bad input gets one line and a non-zero exit, never a stack trace.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { appendFileSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { open } from 'node:fs/promises';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { createImage, qemuIo, rawContent } from './helpers/images.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { manifestChecksum, type Manifest } from '../lib/directory-provider/layout.js';
import { native } from '../lib/native.js';

const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');

afterEach(async () => {
  await stopAll();
});

function cli(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Fails unless the command failed with exactly one line on stderr and no stack trace. */
function expectOneLine(r: { status: number | null; stderr: string }, status: number, pattern: RegExp): void {
  expect(r.status, r.stderr).toBe(status);
  expect(r.stderr.trim().split('\n'), r.stderr).toHaveLength(1);
  expect(r.stderr.trim()).toMatch(pattern);
  expect(r.stderr).not.toMatch(/\n\s+at /);
}

describe('pve-backup-provider backup / list / restore / prune / delete / verify', () => {
  it("a delete or prune while another process changes the guest's backups is refused (ERR_STORE_BUSY); the lock goes with its holder", async () => {
    const dir = await tempDir();
    const disk = path.join(dir, 'disk0.qcow2');
    const store = path.join(dir, 'store');
    createImage(disk, '8M', 'qcow2');
    for (const p of ['0x11', '0x22']) {
      qemuIo(disk, 'qcow2', [`write -P ${p} 0 1M`]);
      expect(cli('backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`).status).toBe(0);
    }
    const [base, child] = (JSON.parse(cli('list', '--store', store, '--json').stdout) as Array<{ volid: string }>).map((b) => b.volid) as [string, string];
    // another process (this test) holds the lock, as a delete merging into the child would
    const held = await open(path.join(store, '100', '.changing'), 'a');
    try {
      expect(native.tryLockFile(held.fd)).toBe(true);
      expectOneLine(cli('delete', base, '--store', store), 1, /being deleted or pruned by another process.*\[ERR_STORE_BUSY\]$/);
      expectOneLine(cli('prune', '--store', store, '--keep-last', '1'), 1, /\[ERR_STORE_BUSY\]$/);
      expect(cli('prune', '--store', store, '--keep-last', '1', '--dry-run').status).toBe(0);
    } finally {
      await held.close();
    }
    expect(statSync(path.join(store, '100', '.changing')).mode & 0o777).toBe(0o600);
    expect(cli('delete', base, '--store', store).stdout.trim()).toBe(`deleted ${base} (merged into ${child})`);
  });

  it('a removal cut short leaves nothing listed that is not whole; the next prune removes what is left', async () => {
    const dir = await tempDir();
    const disk = path.join(dir, 'disk0.qcow2');
    const store = path.join(dir, 'store');
    createImage(disk, '8M', 'qcow2');
    const contents: Buffer[] = [];
    for (const p of ['0x31', '0x32']) {
      qemuIo(disk, 'qcow2', [`write -P ${p} 0 1M`]);
      expect(cli('backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`).status).toBe(0);
      contents.push(rawContent(disk, 'qcow2', path.join(dir, 'c.raw')));
    }
    const [base, child] = (JSON.parse(cli('list', '--store', store, '--json').stdout) as Array<{ volid: string }>).map((b) => b.volid) as [string, string];
    // the child's removal stops part-way with its manifest still there, as a crash between two
    // unlinks can leave it: here the kernel refuses to remove the manifest (immutable)
    const name = child.split('/').pop()!;
    const pinned = [path.join(store, '100', name, 'manifest.json'), path.join(store, '100', `.removing-${name}`, 'manifest.json')];
    execFileSync('chattr', ['+i', pinned[0]!]);
    try {
      const d = cli('delete', child, '--store', store);
      expect(d.status, d.stdout).toBe(1);
      expect(d.stderr).toMatch(/manifest\.json/);
      const list = JSON.parse(cli('list', '--store', store, '--json').stdout) as Array<{ volid: string; status: string }>;
      expect(list.map((b) => [b.volid, b.status])).toEqual([[base, 'ok']]);
    } finally {
      for (const f of pinned) spawnSync('chattr', ['-i', f]);
    }
    const r = cli('restore', base, '--store', store, '--to', `disk0=${path.join(dir, 'r.raw')}`);
    expect(r.status, r.stderr).toBe(0);
    expect(readFileSync(path.join(dir, 'r.raw')).equals(contents[0]!)).toBe(true);
    expect(cli('prune', '--store', store, '--keep-last', '5').status).toBe(0);
    expect(readdirSync(path.join(store, '100')).filter((n) => n !== '.changing' && n !== 'previous-info')).toEqual([base.split('/').pop()]);
  });

  it('a VM from its disk image: full, incremental, restore both, prune, delete, verify', async () => {
    const dir = await tempDir();
    const disk = path.join(dir, 'disk0.qcow2');
    const store = path.join(dir, 'store');
    createImage(disk, '16M', 'qcow2');
    qemuIo(disk, 'qcow2', ['write -P 0x11 0 4M']);
    const first = rawContent(disk, 'qcow2', path.join(dir, 'first.raw'));
    const b1 = cli('backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--json');
    expect(b1.status, b1.stderr).toBe(0);
    expect(JSON.parse(b1.stdout)).toMatchObject({ volid: expect.stringMatching(/^directory:backup\/100\/qemu-/), format: 'qcow2', status: 'ok' });
    qemuIo(disk, 'qcow2', ['write -P 0x22 1M 512k']);
    const second = rawContent(disk, 'qcow2', path.join(dir, 'second.raw'));
    const b2 = cli('backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--notes', 'after the update');
    expect(b2.status, b2.stderr).toBe(0);
    expect(b2.stdout).toMatch(/^directory:backup\/100\/qemu-\S+: qcow2, .*, incremental over directory:backup\/100\/qemu-/);
    expect(b2.stderr).toMatch(/INFO: disk0: dirty-bitmap status: OK/);

    const list = JSON.parse(cli('list', '--store', store, '--json').stdout) as Array<{ volid: string; parent?: string; notes?: string }>;
    expect(list).toHaveLength(2);
    expect(list[1]).toMatchObject({ parent: list[0]!.volid, notes: 'after the update' });
    // what backup --json reported (one backup looked up alone) is what list says of it, field by field in order
    const { warnings: _w, steps: _s, copies: _c, ...reported } = JSON.parse(b1.stdout) as Record<string, unknown>;
    expect(JSON.stringify(reported)).toBe(JSON.stringify(list[0]));
    expect(cli('list', '--store', store).stdout).toMatch(/^volid\s+type\s+created\s+size/);

    for (const [i, expected] of [first, second].entries()) {
      const out = path.join(dir, `r${i}`);
      const r = cli('restore', list[i]!.volid, '--store', store, '--to', out, '--config-dir', out);
      expect(r.status, r.stderr).toBe(0);
      expect(readFileSync(path.join(out, 'disk0.raw')).equals(expected)).toBe(true);
      expect(readFileSync(path.join(out, 'qemu-server.conf'), 'utf8')).toBe('name: vm100\n');
    }
    // prune: the base is needed by the kept incremental
    const dry = cli('prune', '--store', store, '--keep-last', '1', '--dry-run', '--json');
    expect(JSON.parse(dry.stdout).map((m: { mark: string }) => m.mark)).toEqual(['keep', 'keep']);
    expect(cli('protect', list[1]!.volid, '--store', store).status).toBe(0);
    expectOneLine(cli('delete', list[1]!.volid, '--store', store), 1, /is protected.*\[ERR_BACKUP_PROTECTED\]$/);
    // delete the base: merged into the incremental, which still restores
    const del = cli('delete', list[0]!.volid, '--store', store);
    expect(del.stdout.trim()).toBe(`deleted ${list[0]!.volid} (merged into ${list[1]!.volid})`);
    const r = cli('restore', list[1]!.volid, '--store', store, '--to', `disk0=${path.join(dir, 'merged.raw')}`, '--json');
    expect(r.status, r.stderr).toBe(0);
    expect(readFileSync(path.join(dir, 'merged.raw')).equals(second)).toBe(true);
    expect(cli('verify', '--store', store).stdout.trim()).toBe(`${list[1]!.volid}: ok`);
    // corrupt it: verify exits 1 naming the file, restore refuses naming it
    const image = path.join(store, '100', list[1]!.volid.split('/').pop()!, 'disk0.qcow2');
    appendFileSync(image, 'garbage');
    const v = cli('verify', list[1]!.volid, '--store', store, '--json');
    expect(v.status).toBe(1);
    expect(JSON.parse(v.stdout)[0].problems[0]).toContain(image);
    expectOneLine(cli('restore', list[1]!.volid, '--store', store, '--to', path.join(dir, 'x')), 1, new RegExp(`refusing to restore it: ${image}: size \\d+ differs.*\\[ERR_RESTORE\\]$`));
  });

  it('protect keeps an old full backup that nothing builds on through prune --keep-last 1; --off lets prune remove it', async () => {
    const dir = await tempDir();
    const disk = path.join(dir, 'disk0.qcow2');
    const store = path.join(dir, 'store');
    createImage(disk, '4M', 'qcow2');
    qemuIo(disk, 'qcow2', ['write -P 0x11 0 1M']);
    const volids: string[] = [];
    for (let i = 0; i < 2; i++) {
      // full backups: no chain rule keeps the older one
      const b = cli('backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--mode', 'full', '--json');
      expect(b.status, b.stderr).toBe(0);
      volids.push((JSON.parse(b.stdout) as { volid: string }).volid);
      if (i === 0) await new Promise((r) => setTimeout(r, 1100)); // a later backup id
    }
    const list = (): Array<{ volid: string; parent?: string; protected: boolean }> => JSON.parse(cli('list', '--store', store, '--json').stdout);
    expect(list().map((b) => [b.volid, b.parent, b.protected])).toEqual([[volids[0], undefined, false], [volids[1], undefined, false]]);
    const p = cli('protect', volids[0]!, '--store', store);
    expect(p.status, p.stderr).toBe(0);
    const pruned = cli('prune', '--store', store, '--keep-last', '1', '--json');
    expect(pruned.status, pruned.stderr).toBe(0);
    expect(JSON.parse(pruned.stdout).map((m: { volid: string; mark: string }) => [m.volid, m.mark])).toEqual([[volids[1], 'keep'], [volids[0], 'protected']]);
    expect(list().map((b) => [b.volid, b.protected])).toEqual([[volids[0], true], [volids[1], false]]);
    expect(cli('protect', volids[0]!, '--store', store, '--off').status).toBe(0);
    expect(cli('prune', '--store', store, '--keep-last', '1').status).toBe(0);
    expect(list().map((b) => b.volid)).toEqual([volids[1]]);
  });

  it('list marks an incremental whose base is gone as broken; prune keeps the full it would otherwise remove', async () => {
    const dir = await tempDir();
    const disk = path.join(dir, 'disk0.qcow2');
    const store = path.join(dir, 'store');
    createImage(disk, '4M', 'qcow2');
    const volids: string[] = [];
    for (let i = 0; i < 3; i++) {
      qemuIo(disk, 'qcow2', [`write -P 0x${i + 1}${i + 1} ${i}M 64k`]);
      const b = cli('backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--json');
      expect(b.status, b.stderr).toBe(0);
      volids.push((JSON.parse(b.stdout) as { volid: string }).volid);
      await new Promise((r) => setTimeout(r, 1100));
    }
    rmSync(path.join(store, '100', volids[1]!.split('/').pop()!), { recursive: true });
    const list = JSON.parse(cli('list', '--store', store, '--json').stdout) as Array<{ volid: string; status: string }>;
    expect(list.map((b) => [b.volid, b.status])).toEqual([[volids[0], 'ok'], [volids[2], 'broken']]);
    expect(cli('list', '--store', store).stdout).toMatch(/\sbroken\b/);
    const pruned = cli('prune', '--store', store, '--keep-last', '1', '--json');
    expect(JSON.parse(pruned.stdout).map((m: { volid: string; mark: string }) => [m.volid, m.mark])).toEqual([[volids[0], 'keep']]);
    const r = cli('restore', volids[0]!, '--store', store, '--to', `disk0=${path.join(dir, 'r.raw')}`);
    expect(r.status, r.stderr).toBe(0);
  });

  it('a container directory, tar and directory modes', async () => {
    const dir = await tempDir();
    const root = path.join(dir, 'ct');
    mkdirSync(path.join(root, 'etc'), { recursive: true });
    writeFileSync(path.join(root, 'etc', 'hostname'), 'ct200\n');
    writeFileSync(path.join(root, 'skip.log'), 'x');
    const store = path.join(dir, 'store');
    for (const mode of ['tar', 'directory']) {
      const b = cli('backup', '--store', store, '--vmid', '200', '--rootdir', root, '--lxc-mode', mode, '--exclude', '*.log', '--json');
      expect(b.status, b.stderr).toBe(0);
      const { volid, format } = JSON.parse(b.stdout) as { volid: string; format: string };
      expect(format).toBe(mode);
      const to = path.join(dir, `restored-${mode}`);
      mkdirSync(to);
      const r = cli('restore', volid, '--store', store, '--to', to);
      expect(r.status, r.stderr).toBe(0);
      expect(readFileSync(path.join(to, 'etc', 'hostname'), 'utf8')).toBe('ct200\n');
      expect(() => readFileSync(path.join(to, 'skip.log'))).toThrow();
    }
  });

  it('a restore under umask 000 leaves nothing open to other users: the disk, the configuration files, the folders it creates', async () => {
    const dir = await tempDir();
    const disk = path.join(dir, 'disk0.qcow2');
    const store = path.join(dir, 'store');
    createImage(disk, '4M', 'qcow2');
    qemuIo(disk, 'qcow2', ['write -P 0x11 0 1M']);
    writeFileSync(path.join(dir, 'fw'), '[OPTIONS]\nenable: 1\n');
    const b = cli('backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--firewall', path.join(dir, 'fw'), '--json');
    expect(b.status, b.stderr).toBe(0);
    const { volid } = JSON.parse(b.stdout) as { volid: string };
    // an existing configuration file of the same name does not keep its own, open mode either
    mkdirSync(path.join(dir, 'out'));
    writeFileSync(path.join(dir, 'out', 'qemu-server.conf'), 'old\n', { mode: 0o666 });
    const r = spawnSync('sh', ['-c', 'umask 000; exec "$0" "$@"', process.execPath, CLI, 'restore', volid, '--store', store, '--to', path.join(dir, 'out', 'disks'), '--config-dir', path.join(dir, 'out', 'conf', 'vm')], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const r2 = spawnSync('sh', ['-c', 'umask 000; exec "$0" "$@"', process.execPath, CLI, 'restore', volid, '--store', store, '--to', path.join(dir, 'out', 'disks2'), '--config-dir', path.join(dir, 'out')], { encoding: 'utf8' });
    expect(r2.status, r2.stderr).toBe(0);
    const mode = (p: string): string => (statSync(path.join(dir, 'out', p)).mode & 0o777).toString(8);
    expect(Object.fromEntries(['disks', 'disks/disk0.raw', 'conf', 'conf/vm', 'conf/vm/qemu-server.conf', 'conf/vm/qemu-server.fw', 'qemu-server.conf'].map((p) => [p, mode(p)]))).toEqual({
      disks: '700',
      'disks/disk0.raw': '600',
      conf: '700',
      'conf/vm': '700',
      'conf/vm/qemu-server.conf': '600',
      'conf/vm/qemu-server.fw': '600',
      'qemu-server.conf': '600',
    });
    expect(readFileSync(path.join(dir, 'out', 'qemu-server.conf'), 'utf8')).toBe('name: vm100\n');
  });

  it('a crafted manifest naming a disk or a file outside the backup folder is refused: nothing is written outside the folder restore was given', async () => {
    const dir = await tempDir();
    const disk = path.join(dir, 'disk0.qcow2');
    const store = path.join(dir, 'store');
    createImage(disk, '4M', 'qcow2');
    const b = cli('backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--json');
    expect(b.status, b.stderr).toBe(0);
    const { volid } = JSON.parse(b.stdout) as { volid: string };
    // the manifest's checksum guards against damage, not against whoever can write the store
    const file = path.join(store, '100', volid.split('/').pop()!, 'manifest.json');
    const { checksum: _c, ...m } = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown> & { devices: Record<string, unknown> };
    const crafted = { ...m, devices: { '../escaped': m.devices['disk0'] } };
    writeFileSync(file, JSON.stringify({ ...crafted, checksum: manifestChecksum(crafted as unknown as Manifest) }));
    mkdirSync(path.join(dir, 'a'));
    // refused by the store as a corrupted manifest (the command line refuses such a disk name for
    // any store before it makes a file name of it)
    expectOneLine(cli('restore', volid, '--store', store, '--to', path.join(dir, 'a', 'out')), 1, /names "\.\.\/escaped", which is not a file of its folder.*\]$/);
    expect(readdirSync(path.join(dir, 'a'))).toEqual([]);
    // the store reads, merges and restores by the manifest's file names: one naming a file
    // elsewhere is taken for a corrupted manifest
    const other = { ...m, files: { ...(m.files as Record<string, unknown>), '../../outside': { size: 1, sha256: '0' } } };
    writeFileSync(file, JSON.stringify({ ...other, checksum: manifestChecksum(other as unknown as Manifest) }));
    expectOneLine(cli('restore', volid, '--store', store, '--to', `disk0=${path.join(dir, 'a', 'x.raw')}`), 1, /names "\.\.\/\.\.\/outside", which is not a file of its folder.*\]$/);
    expect(JSON.parse(cli('list', '--store', store, '--json').stdout)).toMatchObject([{ volid, status: 'corrupt' }]);
    expect(readdirSync(path.join(dir, 'a'))).toEqual([]);
  });

  it('bad input: one line, non-zero exit, never a stack trace', async () => {
    const dir = await tempDir();
    writeFileSync(path.join(dir, 'file'), 'x');
    const store = path.join(dir, 'store');
    // makes a store (of a tree beside it: a tree holding the store changes while tar reads it)
    const tree = path.join(dir, 'tree');
    mkdirSync(tree);
    writeFileSync(path.join(tree, 'file'), 'x');
    const made = cli('backup', '--store', store, '--vmid', '101', '--rootdir', tree, '--json');
    expect(made.status, made.stderr).toBe(0);
    expectOneLine(cli('list', '--store', dir), 1, /^pve-backup-provider: .* is not a backup store: pve-backup-store.json is missing \[ERR_NOT_A_STORE\]$/);
    expectOneLine(cli('backup', '--store', dir, '--vmid', '101', '--rootdir', dir), 1, /is not a backup store: it has other content.*\[ERR_NOT_A_STORE\]$/);
    expectOneLine(cli('restore', 'directory:backup/100/qemu-2024_01_01-00_00_00', '--store', store, '--to', dir), 1, /unknown volume .*: no such backup in .*\[ERR_UNKNOWN_VOLUME\]$/);
    expectOneLine(cli('delete', 'other:backup/100/qemu-2024_01_01-00_00_00', '--store', store), 1, /this store is 'directory', not 'other' \[ERR_UNKNOWN_VOLUME\]$/);
    expectOneLine(cli('verify', 'directory:backup/1/nonsense', '--store', store), 1, /invalid backup volume name.*\[ERR_INVALID_VOLID\]$/);
    expectOneLine(cli('backup', '--store', store, '--vmid', '101', '--disk', path.join(dir, 'missing.qcow2')), 1, /cannot read disk image .*missing\.qcow2.*\[ERR_INVALID_ARGUMENT\]$/);
    // a socket that is not QMP
    const sock = path.join(dir, 'not-qmp.sock');
    const server = net.createServer((c) => c.end('hello, this is not QMP\n')).listen(sock);
    await new Promise((r) => server.once('listening', r));
    try {
      const r = await new Promise<{ status: number | null; stderr: string }>((resolve) => {
        const child = spawn(process.execPath, [CLI, 'backup', '--store', store, '--vmid', '100', '--qmp', sock]);
        let stderr = '';
        child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
        child.on('close', (status) => resolve({ status, stderr }));
      });
      expectOneLine(r, 1, /is not a QMP socket: expected a QMP greeting.*\[ERR_QMP_NOT_QMP\]$/);
    } finally {
      server.close();
    }
    expectOneLine(cli('backup', '--store', store, '--vmid', '101', '--qmp', path.join(dir, 'file')), 1, /cannot connect to QMP socket.*\[ERR_QMP_CLOSED\]$/);
  });

  it('bad usage exits with 2; every command has --help', () => {
    expectOneLine(cli('backup', '--store', '/tmp/x', '--vmid', '101'), 2, /give exactly one of --qmp, --disk, --rootdir/);
    expect(cli('backup', '--vmid', 'abc', '--store', 'x').status).toBe(2);
    expectOneLine(cli('prune', '--store', '/tmp/x'), 2, /give at least one --keep-\* option/);
    expect(cli('restore').status).toBe(2);
    for (const c of ['backup', 'restore', 'list', 'prune', 'delete', 'verify', 'protect', 'notes', 'serve', 'info', 'copy', 'demo']) {
      const r = cli(c, '--help');
      expect(r.status, c).toBe(0);
      expect(r.stdout, c).toMatch(new RegExp(`^Usage: pve-backup-provider ${c}`));
    }
  });
});

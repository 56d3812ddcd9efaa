/**
 * The command line under interruption and on a terminal, as a user meets it: Ctrl-C / SIGTERM
 * during `backup` and `restore` (exit 130, nothing partial left that looks complete), SIGKILL of
 * a restore (a qemu-img it runs dies too), existing images (refused, or replaced whole with --force),
 * the mode of restored images, strict guest ids, unknown devices, non-empty container targets,
 * where progress bars and log lines go, two restores into one target at once, and a `delete`
 * SIGKILLed while it merges a base into its child.
 */
import { spawn, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, watch, writeFileSync } from 'node:fs';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { createImage, expectSameBytes, qemuIo, rawContent } from './helpers/images.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { asManifestVersion1 } from './helpers/directory.js';
import { DirectoryStore } from '../lib/index.js';

const CLI = path.join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');
const MiB = 2 ** 20;
// cli-progress draws its bar with these characters; any terminal escape starts with ESC [
const BAR = /[█░]/;
const ESCAPE = /\x1b\[/;

afterEach(async () => {
  await stopAll();
});

interface Result {
  status: number | null;
  stdout: string;
  stderr: string;
}

function cli(...args: string[]): Result {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/**
 * Starts the command line without waiting for it, in its own process group. `kill('SIGINT')`
 * signals the whole group, as Ctrl-C on a terminal does (the children get it too); other signals
 * go to the command alone, as `kill PID` sends them.
 */
function startCli(args: string[]): { pid: number; stderr: () => string; kill: (sig: NodeJS.Signals) => void; done: Promise<Result & { signal: NodeJS.Signals | null }> } {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<Result & { signal: NodeJS.Signals | null }>((resolve) => child.on('close', (status, signal) => resolve({ status, signal, stdout, stderr })));
  return { pid: child.pid!, stderr: () => stderr, kill: (sig) => (sig === 'SIGINT' ? process.kill(-child.pid!, sig) : child.kill(sig)), done };
}

async function waitFor(cond: () => boolean, what: string, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Pids of the live (not zombie) processes whose parent is `ppid` and whose name is `comm`. */
function children(ppid: number, comm: string): number[] {
  const out: number[] = [];
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${e}/stat`, 'utf8');
    } catch {
      continue; // gone meanwhile
    }
    // pid (comm) state ppid ...
    const m = /^\d+ \((.*)\) (\S) (\d+) /.exec(stat);
    if (m && m[1] === comm && m[2] !== 'Z' && Number(m[3]) === ppid) out.push(Number(e));
  }
  return out;
}

const alive = (pid: number): boolean => {
  try {
    return !/^\d+ \(.*\) Z /.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
};

/** A store with one full backup of VM 100: a 32 MiB disk with 24 MiB of data. */
async function vmBackup(): Promise<{ dir: string; store: string; volid: string; content: Buffer }> {
  const dir = await tempDir();
  const disk = path.join(dir, 'disk0.qcow2');
  const store = path.join(dir, 'store');
  createImage(disk, 32 * MiB, 'qcow2');
  qemuIo(disk, 'qcow2', ['write -P 0x11 0 16M', 'write -P 0x22 20M 8M']);
  const content = rawContent(disk, 'qcow2', path.join(dir, 'content.raw'));
  const b = cli('backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--json');
  expect(b.status, b.stderr).toBe(0);
  return { dir, store, volid: (JSON.parse(b.stdout) as { volid: string }).volid, content };
}

describe('restore: interrupted, killed, existing targets', () => {
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    it(`${sig} during restore --bwlimit exits 130 and leaves no image, complete-looking or partial`, async () => {
      const { dir, store, volid } = await vmBackup();
      const out = path.join(dir, 'out');
      // 24 MiB of data at 2 MiB/s: about 12 s, interrupted after the copy started
      const run = startCli(['restore', volid, '--store', store, '--to', out, '--bwlimit', '2M']);
      await waitFor(() => (existsSync(out) && readdirSync(out).some((f) => f.startsWith('disk0.raw.partial-'))), 'the restore to start writing');
      await new Promise((r) => setTimeout(r, 1000));
      run.kill(sig);
      const r = await run.done;
      expect(r.status, r.stderr).toBe(130);
      expect(r.stderr.trim().split('\n').at(-1)).toBe('pve-backup-provider: cancelled');
      expect(readdirSync(out)).toEqual([]);
    });
  }

  it('SIGKILL of a restore leaves no file under the image name', async () => {
    const { dir, store, volid } = await vmBackup();
    const out = path.join(dir, 'out');
    const run = startCli(['restore', volid, '--store', store, '--to', out, '--bwlimit', '2M']);
    await waitFor(() => (existsSync(out) && readdirSync(out).some((f) => f.startsWith('disk0.raw.partial-'))), 'the restore to start writing');
    run.kill('SIGKILL');
    await run.done;
    expect(existsSync(path.join(out, 'disk0.raw'))).toBe(false);
    // the next restore into the same place removes what the killed one left
    const again = cli('restore', volid, '--store', store, '--to', out);
    expect(again.status, again.stderr).toBe(0);
    expect(readdirSync(out)).toEqual(['disk0.raw']);
  });

  it('two restores of different backups into one target at once: each renames what it wrote, both succeed, the target is the last one whole', async () => {
    const { dir, store, volid: first, content: firstContent } = await vmBackup();
    const disk = path.join(dir, 'disk0.qcow2');
    qemuIo(disk, 'qcow2', ['write -P 0x33 0 32M']);
    const b = cli('backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--mode', 'full', '--json');
    expect(b.status, b.stderr).toBe(0);
    const second = (JSON.parse(b.stdout) as { volid: string }).volid;
    const out = path.join(dir, 'out');
    mkdirSync(out);
    const target = path.join(out, 'disk0.raw');
    // the first (24 MiB at 8 MiB/s) is still writing when the second starts and completes
    const slow = startCli(['restore', first, '--store', store, '--to', `disk0=${target}`, '--bwlimit', '8M']);
    await waitFor(() => readdirSync(out).some((f) => f.startsWith('disk0.raw.partial-')), 'the first restore to start writing');
    const fast = cli('restore', second, '--store', store, '--to', `disk0=${target}`, '--force');
    expect(fast.status, fast.stderr).toBe(0);
    const r = await slow.done;
    expect(r.status, r.stderr).toBe(0);
    expect(readFileSync(target).equals(firstContent)).toBe(true);
    expect(readdirSync(out)).toEqual(['disk0.raw']);
  });

  it('SIGKILL of a restore through qemu-img (a backup of manifest version 1) kills its qemu-img too', async () => {
    const { dir, store, volid } = await vmBackup();
    await asManifestVersion1(await DirectoryStore.open(store), volid.slice(volid.indexOf(':') + 1));
    const out = path.join(dir, 'out');
    const run = startCli(['restore', volid, '--store', store, '--to', out, '--bwlimit', '2M']);
    let pids: number[] = [];
    await waitFor(() => (pids = children(run.pid, 'qemu-img')).length > 0, 'qemu-img to start');
    run.kill('SIGKILL');
    await run.done;
    await waitFor(() => !alive(pids[0]!), `qemu-img (pid ${pids[0]}) to die with its parent`, 5000);
    expect(existsSync(path.join(out, 'disk0.raw'))).toBe(false);
  });

  it.each(['directory', 'tar'] as const)('SIGKILL of a container backup (mode %s) kills its copying tool too', async (mode) => {
    const dir = await tempDir();
    const src = path.join(dir, 'ct');
    mkdirSync(src);
    writeFileSync(path.join(src, 'big'), Buffer.alloc(16 * MiB, 1));
    const tool = mode === 'directory' ? 'rsync' : 'tar';
    const run = startCli(['backup', '--store', path.join(dir, 'store'), '--vmid', '200', '--rootdir', src, '--lxc-mode', mode, '--bwlimit', '1M']);
    let pids: number[] = [];
    await waitFor(() => (pids = children(run.pid, tool)).length > 0, `${tool} to start`);
    run.kill('SIGKILL');
    await run.done;
    // an orphaned rsync would go on writing into the store the user believes abandoned
    await waitFor(() => pids.every((p) => !alive(p)), `${tool} (pids ${pids.join(', ')}) to die with its parent`, 5000);
  });

  it("SIGKILL of a stopped VM's backup kills the qemu-storage-daemon serving its disks", async () => {
    const dir = await tempDir();
    const disk = path.join(dir, 'disk0.qcow2');
    createImage(disk, 32 * MiB, 'qcow2');
    qemuIo(disk, 'qcow2', ['write -P 0x42 0 16M']);
    const run = startCli(['backup', '--store', path.join(dir, 'store'), '--vmid', '100', '--disk', `disk0=${disk}`, '--bwlimit', '1M']);
    let pids: number[] = [];
    // the kernel keeps 15 characters of a command name
    await waitFor(() => (pids = children(run.pid, 'qemu-storage-da')).length > 0, 'qemu-storage-daemon to start');
    run.kill('SIGKILL');
    await run.done;
    // an orphan would keep the VM's images locked (the VM could not start)
    await waitFor(() => pids.every((p) => !alive(p)), `qemu-storage-daemon (pids ${pids.join(', ')}) to die with its parent`, 5000);
  });

  it('an existing image is refused without --force, left as it was, and replaced whole with --force', async () => {
    const { dir, store, volid, content } = await vmBackup();
    const out = path.join(dir, 'out');
    mkdirSync(out);
    const image = path.join(out, 'disk0.raw');
    // larger than the disk: writing into it would leave this tail behind the restored data
    const old = Buffer.alloc(40 * MiB, 0x77);
    writeFileSync(image, old);
    const refused = cli('restore', volid, '--store', store, '--to', out);
    expect(refused.status).toBe(1);
    expect(refused.stderr.trim()).toBe(`pve-backup-provider: restore target ${image} exists; give --force to replace it [ERR_TARGET_EXISTS]`);
    expect(readFileSync(image).equals(old)).toBe(true);
    // the same for an explicit device=PATH
    expect(cli('restore', volid, '--store', store, '--to', `disk0=${image}`).stderr).toMatch(/exists; give --force to replace it \[ERR_TARGET_EXISTS\]$/m);
    const forced = cli('restore', volid, '--store', store, '--to', out, '--force');
    expect(forced.status, forced.stderr).toBe(0);
    expectSameBytes(readFileSync(image), content, 'disk0.raw');
    expect(readdirSync(out)).toEqual(['disk0.raw']);
  });

  it('restored images are 0600 whatever the umask', async () => {
    const { dir, store, volid, content } = await vmBackup();
    const out = path.join(dir, 'out');
    const command = [process.execPath, CLI, 'restore', volid, '--store', store, '--to', out].map((a) => `'${a}'`).join(' ');
    const r = spawnSync('sh', ['-c', `umask 000 && exec ${command}`], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(statSync(path.join(out, 'disk0.raw')).mode & 0o7777).toBe(0o600);
    expectSameBytes(readFileSync(path.join(out, 'disk0.raw')), content, 'disk0.raw');
  });

  it('--to DEVICE=PATH for a device the backup lacks fails, naming it and the devices the backup has', async () => {
    const { dir, store, volid } = await vmBackup();
    const r = cli('restore', volid, '--store', store, '--to', `disk0=${path.join(dir, 'a.raw')}`, '--to', `scsi9=${path.join(dir, 'b.raw')}`);
    expect(r.status).toBe(1);
    expect(r.stderr.trim()).toBe(`pve-backup-provider: restore of '${volid.slice(volid.indexOf(':') + 1)}' failed: the backup has no device scsi9 (it has disk0) [ERR_RESTORE]`);
    expect(existsSync(path.join(dir, 'a.raw'))).toBe(false);
    expect(existsSync(path.join(dir, 'b.raw'))).toBe(false);
  });
});

describe('guest ids and container targets', () => {
  it('--vmid takes only plain decimal Proxmox ids (100..999999999), in every command', async () => {
    const dir = await tempDir();
    const store = path.join(dir, 'store');
    const root = path.join(dir, 'ct');
    mkdirSync(root);
    writeFileSync(path.join(root, 'f'), 'x');
    for (const bad of ['1e3', '0x64', '+100', ' 100', '100 ', '0100', '99', '1', '1000000000', '100.0']) {
      const b = cli('backup', '--store', store, '--vmid', bad, '--rootdir', root);
      expect(b.status, `backup --vmid ${JSON.stringify(bad)}`).toBe(2);
      expect(b.stderr).toContain(`not a guest id: ${JSON.stringify(bad)}`);
      for (const c of [['list'], ['prune', '--keep-last', '1'], ['verify']]) {
        expect(cli(...c, '--store', store, '--vmid', bad).status, `${c[0]} --vmid ${JSON.stringify(bad)}`).toBe(2);
      }
    }
    expect(existsSync(store)).toBe(false);
    for (const good of ['100', '999999999']) {
      const b = cli('backup', '--store', store, '--vmid', good, '--rootdir', root, '--json');
      expect(b.status, b.stderr).toBe(0);
      expect(JSON.parse(b.stdout)).toMatchObject({ vmid: Number(good) });
      expect(JSON.parse(cli('list', '--store', store, '--vmid', good, '--json').stdout)).toHaveLength(1);
    }
  });

  it('a non-empty container target names --allow-non-empty, which restores into it', async () => {
    const dir = await tempDir();
    const root = path.join(dir, 'ct');
    mkdirSync(path.join(root, 'etc'), { recursive: true });
    writeFileSync(path.join(root, 'etc', 'hostname'), 'ct200\n');
    const store = path.join(dir, 'store');
    const b = cli('backup', '--store', store, '--vmid', '200', '--rootdir', root, '--json');
    expect(b.status, b.stderr).toBe(0);
    const { volid } = JSON.parse(b.stdout) as { volid: string };
    const to = path.join(dir, 'target');
    mkdirSync(to);
    writeFileSync(path.join(to, 'keep.txt'), 'mine');
    const refused = cli('restore', volid, '--store', store, '--to', to);
    expect(refused.status).toBe(1);
    expect(refused.stderr.trim().split('\n').at(-1)).toBe(
      `pve-backup-provider: restore target ${to} is not empty (found keep.txt); give --allow-non-empty to restore into it anyway (existing files are kept) [ERR_ROOTDIR_NOT_EMPTY]`,
    );
    const r = cli('restore', volid, '--store', store, '--to', to, '--allow-non-empty');
    expect(r.status, r.stderr).toBe(0);
    expect(readFileSync(path.join(to, 'etc', 'hostname'), 'utf8')).toBe('ct200\n');
    expect(readFileSync(path.join(to, 'keep.txt'), 'utf8')).toBe('mine');
  });
});

describe('backup: interrupted', () => {
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    it(`${sig} during backup --bwlimit exits 130, removes the partial backup and leaves the store consistent`, async () => {
      const dir = await tempDir();
      const disk = path.join(dir, 'disk0.qcow2');
      const store = path.join(dir, 'store');
      createImage(disk, 32 * MiB, 'qcow2');
      qemuIo(disk, 'qcow2', ['write -P 0x33 0 24M']);
      const run = startCli(['backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--bwlimit', '2M']);
      const guestDir = path.join(store, '100');
      await waitFor(() => /INFO: disk0: full backup to disk0\.qcow2/.test(run.stderr()), 'the copy to start');
      await new Promise((r) => setTimeout(r, 1000));
      expect(readdirSync(guestDir).filter((d) => d.startsWith('qemu-'))).toHaveLength(1);
      run.kill(sig);
      const r = await run.done;
      expect(r.status, r.stderr).toBe(130);
      expect(r.stderr.trim().split('\n').at(-1)).toBe('pve-backup-provider: cancelled');
      expect(readdirSync(guestDir).filter((d) => d.startsWith('qemu-'))).toEqual([]);
      expect(JSON.parse(cli('list', '--store', store, '--json').stdout)).toEqual([]);
      // the store takes the next backup, and it is complete
      const again = cli('backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--json');
      expect(again.status, again.stderr).toBe(0);
      expect(cli('verify', '--store', store).status).toBe(0);
    });
  }
});

describe('progress: a bar on a terminal (stderr), log lines when piped, only JSON with --json', () => {
  /**
   * Runs the command line on a pseudo-terminal (script(1), util-linux) with stdout sent to a
   * file: what the terminal shows is stderr alone.
   */
  function onTty(stdoutFile: string, ...args: string[]): { status: number | null; terminal: string; stdout: string } {
    const command = [process.execPath, CLI, ...args].map((a) => `'${a}'`).join(' ');
    const r = spawnSync('script', ['-qec', `${command} >'${stdoutFile}'`, '/dev/null'], { encoding: 'utf8' });
    return { status: r.status, terminal: r.stdout, stdout: readFileSync(stdoutFile, 'utf8') };
  }

  it('backup and restore', async () => {
    const dir = await tempDir();
    const disk = path.join(dir, 'disk0.qcow2');
    const store = path.join(dir, 'store');
    createImage(disk, 32 * MiB, 'qcow2');
    qemuIo(disk, 'qcow2', ['write -P 0x44 0 16M']);
    const bar = /disk0\s+[█░]+ \d+% \| [\d.]+ \w+ \/ 32\.0 MiB/;

    // backup on a terminal: the bar on stderr, the result line alone on stdout
    const b = onTty(path.join(dir, 'b.out'), 'backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--bwlimit', '16M');
    expect(b.status, b.terminal).toBe(0);
    expect(b.terminal).toMatch(bar);
    expect(b.stdout).toMatch(/^directory:backup\/100\/qemu-\S+: qcow2, .*, full\n$/);
    const volid = b.stdout.split(':').slice(0, 2).join(':');

    // restore on a terminal
    const r = onTty(path.join(dir, 'r.out'), 'restore', volid, '--store', store, '--to', path.join(dir, 'r1'), '--bwlimit', '16M');
    expect(r.status, r.terminal).toBe(0);
    expect(r.terminal).toMatch(bar);
    expect(r.stdout).toBe(`restored disk0 (32.0 MiB) to ${path.join(dir, 'r1', 'disk0.raw')}\n`);

    // --json on a terminal: no bar, stdout is one JSON document
    const bj = onTty(path.join(dir, 'bj.out'), 'backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--json');
    expect(bj.status, bj.terminal).toBe(0);
    expect(bj.terminal).not.toMatch(BAR);
    expect(JSON.parse(bj.stdout)).toMatchObject({ vmid: 100, status: 'ok' });
    const rj = onTty(path.join(dir, 'rj.out'), 'restore', volid, '--store', store, '--to', path.join(dir, 'r2'), '--json');
    expect(rj.status, rj.terminal).toBe(0);
    expect(rj.terminal).not.toMatch(BAR);
    expect(JSON.parse(rj.stdout)).toMatchObject({ devices: [{ device: 'disk0', size: 32 * MiB }] });

    // piped: plain log lines on stderr, no bar and no escape codes anywhere
    const bp = cli('backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`);
    expect(bp.status, bp.stderr).toBe(0);
    expect(bp.stderr).toMatch(/^INFO: /m);
    expect(bp.stderr.split('\n').filter(Boolean).every((l) => /^(INFO|WARN): /.test(l)), bp.stderr).toBe(true);
    const rp = cli('restore', volid, '--store', store, '--to', path.join(dir, 'r3'));
    expect(rp.status, rp.stderr).toBe(0);
    expect(rp.stderr).toMatch(/^INFO: restoring device disk0 /m);
    for (const x of [bp, rp]) {
      expect(x.stderr + x.stdout).not.toMatch(BAR);
      expect(x.stderr + x.stdout).not.toMatch(ESCAPE);
    }
    // --json piped: stdout is JSON alone, stderr empty
    for (const args of [
      ['backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--json'],
      ['restore', volid, '--store', store, '--to', path.join(dir, 'r4'), '--json'],
    ]) {
      const x = cli(...args);
      expect(x.status, x.stderr).toBe(0);
      expect(() => JSON.parse(x.stdout)).not.toThrow();
      expect(x.stderr).toBe('');
    }
  });
});

describe('delete: killed while it merges a base into its child', () => {
  /** SIGKILLs `delete <volid>` as soon as `name` is renamed (to or from) in `dir`. */
  async function deleteKilledAt(store: string, volid: string, dir: string, name: string): Promise<boolean> {
    const run = startCli(['delete', volid, '--store', store]);
    let killed = false;
    const watcher = watch(dir, (_event, file) => {
      if (file === name && !killed) {
        killed = true;
        run.kill('SIGKILL');
      }
    });
    await run.done;
    watcher.close();
    return killed;
  }

  it('at every rename of the merge the child stays restorable, byte-exact, and the next delete finishes', async () => {
    const dir = await tempDir();
    const disk = path.join(dir, 'disk0.qcow2');
    const pristine = path.join(dir, 'pristine');
    createImage(disk, 16 * MiB, 'qcow2');
    const points: Array<{ volid: string; content: Buffer }> = [];
    for (const [i, at] of [0, 4, 8].entries()) {
      qemuIo(disk, 'qcow2', [`write -P 0x${i + 1}${i + 1} ${at}M 2M`]);
      const b = cli('backup', '--store', pristine, '--vmid', '100', '--disk', `disk0=${disk}`, '--json');
      expect(b.status, b.stderr).toBe(0);
      points.push({ volid: (JSON.parse(b.stdout) as { volid: string }).volid, content: rawContent(disk, 'qcow2', path.join(dir, `c${i}.raw`)) });
      await new Promise((r) => setTimeout(r, 1100)); // a later backup id
    }
    const [first, middle, last] = points as [(typeof points)[0], (typeof points)[0], (typeof points)[0]];
    // before the commit point (the copy being made), at it (the next manifest), and each move after it
    for (const name of ['disk0.qcow2.merge', 'manifest.json.next', 'disk0.qcow2.digests', 'disk0.qcow2', 'manifest.json']) {
      const store = path.join(dir, 'store');
      rmSync(store, { recursive: true, force: true });
      cpSync(pristine, store, { recursive: true });
      const lastDir = path.join(store, '100', last.volid.split('/').pop()!);
      expect(await deleteKilledAt(store, middle.volid, lastDir, name), name).toBe(true);
      for (const p of [first, last]) {
        const target = path.join(dir, 'r.raw');
        const r = cli('restore', p.volid, '--store', store, '--to', `disk0=${target}`, '--force');
        expect(r.status, `killed at ${name}: ${r.stderr}`).toBe(0);
        expectSameBytes(readFileSync(target), p.content, `${p.volid} after a delete killed at ${name}`);
      }
      const v = cli('verify', last.volid, '--store', store);
      expect(v.status, `killed at ${name}: ${v.stdout}`).toBe(0);
      // the delete is done again, or was done: the middle backup goes either way
      cli('delete', middle.volid, '--store', store);
      const list = JSON.parse(cli('list', '--store', store, '--json').stdout) as Array<{ volid: string; status: string }>;
      expect(list.map((b) => [b.volid, b.status])).toEqual([[first.volid, 'ok'], [last.volid, 'ok']]);
      const r = cli('restore', last.volid, '--store', store, '--to', `disk0=${path.join(dir, 'r.raw')}`, '--force');
      expect(r.status, r.stderr).toBe(0);
      expectSameBytes(readFileSync(path.join(dir, 'r.raw')), last.content, `${last.volid} after the delete was finished`);
    }
  });

  it('a damaged next manifest (not a committed merge) leaves the backup as it was: listed ok, restored byte-exact', async () => {
    const dir = await tempDir();
    const disk = path.join(dir, 'disk0.qcow2');
    const store = path.join(dir, 'store');
    createImage(disk, 8 * MiB, 'qcow2');
    qemuIo(disk, 'qcow2', ['write -P 0x5a 1M 2M']);
    const b = cli('backup', '--store', store, '--vmid', '100', '--disk', `disk0=${disk}`, '--json');
    expect(b.status, b.stderr).toBe(0);
    const volid = (JSON.parse(b.stdout) as { volid: string }).volid;
    const content = rawContent(disk, 'qcow2', path.join(dir, 'c.raw'));
    writeFileSync(path.join(store, '100', volid.split('/').pop()!, 'manifest.json.next'), '{"volname": "torn');
    const list = JSON.parse(cli('list', '--store', store, '--json').stdout) as Array<{ volid: string; status: string }>;
    expect(list.map((x) => [x.volid, x.status])).toEqual([[volid, 'ok']]);
    const target = path.join(dir, 'r.raw');
    const r = cli('restore', volid, '--store', store, '--to', `disk0=${target}`);
    expect(r.status, r.stderr).toBe(0);
    expectSameBytes(readFileSync(target), content, volid);
  });
});

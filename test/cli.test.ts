import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { run } from './helpers/images.js';
import { startNbdkit, useCleanups } from './helpers/nbd-servers.js';

const CLI = join(import.meta.dirname, '..', 'dist', 'cli', 'main.js');
const { track, scratch } = useCleanups();

function cli(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('pve-backup-provider info / copy', () => {
  it('info --json describes an export', async () => {
    const server = track(await startNbdkit(['memory', 'size=1M']));
    const r = cli('info', server.uri, '--json');
    expect(r.status).toBe(0);
    const info = JSON.parse(r.stdout);
    expect(info).toMatchObject({ size: 1048576, canTrim: true, bitmaps: [] });
    expect(info.availableMetaContexts).toContain('base:allocation');
  });

  it('info prints a table for a person', async () => {
    const server = track(await startNbdkit(['memory', 'size=1M']));
    const r = cli('info', server.uri);
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/size\s+1048576 \(1\.00 MiB\)/);
  });

  it('copy --json writes the target and prints the summary', async () => {
    const server = track(await startNbdkit(['sparse-random', 'size=8M', 'seed=1']));
    const dir = scratch();
    const target = join(dir, 'out.raw');
    const r = cli('copy', server.uri, target, '--json', '--requests', '4');
    expect(r.status).toBe(0);
    const summary = JSON.parse(r.stdout);
    expect(summary.bytesTotal).toBe(8 * 2 ** 20);
    expect(readFileSync(target).length).toBe(8 * 2 ** 20);
  });

  it('copy --format qcow2 writes an image qemu-img accepts, with the same content', async () => {
    const server = track(await startNbdkit(['sparse-random', 'size=8M', 'seed=2']));
    const dir = scratch();
    const target = join(dir, 'out.qcow2');
    const r = cli('copy', server.uri, target, '--format', 'qcow2', '--compression', 'zstd', '--json', '--no-discard');
    expect(r.status, r.stderr).toBe(0);
    run('qemu-img', ['check', '-q', target]);
    run('nbdcopy', [server.uri, join(dir, 'ref.raw')]);
    run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', target, join(dir, 'ref.raw')]);
  });

  it('copy shows a progress bar on a terminal, and none with --json or when piped', async () => {
    const server = track(await startNbdkit(['sparse-random', 'size=32M', 'seed=3']));
    // script(1) (util-linux, in every Debian) runs the command on a real pseudo-terminal.
    const onTty = (...args: string[]): string => {
      const command = [process.execPath, CLI, ...args].map((a) => `'${a}'`).join(' ');
      const r = spawnSync('script', ['-qec', command, '/dev/null'], { encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      return r.stdout;
    };
    const tty = onTty('copy', server.uri, '-', '--bwlimit', '64M');
    expect(tty).toMatch(/copy [█░]+ \d+% \| [\d.]+ \w+ \/ 32\.0 MiB/);
    expect(tty).toMatch(/copied .* of 32\.0 MiB in/);
    const json = onTty('copy', server.uri, '-', '--json');
    expect(json).not.toMatch(/[█░]/);
    expect(JSON.parse(json.trim()).bytesTotal).toBe(32 * 2 ** 20);
    const piped = cli('copy', server.uri, '-');
    expect(piped.status).toBe(0);
    expect(piped.stderr + piped.stdout).not.toMatch(/[█░]/);
  });

  it('bad input gets one clear line and a non-zero exit, never a stack trace', () => {
    const r = cli('copy', 'nbd+unix:///disk', '/tmp/x.raw');
    expect(r.status).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/^pve-backup-provider: .*socket.*\[ERR_INVALID_ARGUMENT\]$/m);
    expect(r.stderr).not.toMatch(/\n\s+at /);
  });

  it('demo backs up a disk into a directory store while a guest writes, restores and checks both points in time', () => {
    const r = cli('demo', '--size', '64M', '--json');
    expect(r.status, r.stderr).toBe(0);
    const phases = JSON.parse(r.stdout);
    expect(phases.map((p: { volid: string }) => p.volid)).toEqual([expect.stringMatching(/^demo:backup\/100\/qemu-/), expect.stringMatching(/^demo:backup\/100\/qemu-/)]);
    // the incremental image holds what changed, not the disk
    expect(phases[1].stored).toBeLessThan(phases[0].stored);
    expect(phases.map((p: { phase: string; bitmapMode: string; verified: boolean }) => [p.phase, p.bitmapMode, p.verified])).toEqual([
      ['full', 'new', true],
      ['incremental', 'reuse', true],
    ]);
    // discard freed what copy-before-write had put into the fleecing image
    for (const p of phases) expect(p.fleecingAfter).toBeLessThan(p.fleecingBefore);
  });

  it('--version prints the package version', () => {
    const pkg = JSON.parse(readFileSync(join(import.meta.dirname, '..', 'package.json'), 'utf8')) as { version: string };
    const r = cli('--version');
    expect(r.status).toBe(0);
    expect(r.stdout.trim()).toBe(pkg.version);
  });

  it('bad usage exits with 2', () => {
    expect(cli('copy').status).toBe(2);
    expect(cli('copy', 'nbd://h/e', 'x', '--connections', 'zero').status).toBe(2);
  });
});

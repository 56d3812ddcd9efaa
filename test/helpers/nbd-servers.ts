/**
 * Real NBD servers for tests, each on a private unix socket in a fresh temporary folder, stopped
 * by `stop()` (call it in afterEach). Tools missing from the machine fail the test with the
 * Debian package to install; nothing is skipped.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { afterEach } from 'vitest';

import { requireTool } from './tools.js';

export interface NbdServer {
  /** `nbd+unix:///EXPORT?socket=PATH` */
  uri: string;
  socket: string;
  dir: string;
  stop(): Promise<void>;
}

/**
 * Cleanups run after each test of the calling file, last registered first: `defer` any function,
 * `track` a server to stop it, `scratch` a temporary folder to remove it.
 */
export function useCleanups(): { defer: (fn: () => Promise<void> | void) => void; track: (server: NbdServer) => NbdServer; scratch: () => string } {
  const cleanups: Array<() => Promise<void> | void> = [];
  afterEach(async () => {
    while (cleanups.length) await cleanups.pop()!();
  });
  return {
    defer: (fn) => void cleanups.push(fn),
    track: (server) => {
      cleanups.push(() => server.stop());
      return server;
    },
    scratch: () => {
      const { dir, remove } = tempDir();
      cleanups.push(remove);
      return dir;
    },
  };
}

/** A fresh temporary folder, removed by the returned function. */
export function tempDir(prefix = 'pbp-test-'): { dir: string; remove: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** True once a server accepts on the unix socket (it exists after bind, accepts only after listen). */
function accepts(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect(path);
    sock.once('connect', () => {
      sock.destroy();
      resolve(true);
    });
    sock.once('error', () => resolve(false));
  });
}

async function waitForSocket(path: string, child: ChildProcess, what: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (existsSync(path) && (await accepts(path))) return;
    if (child.exitCode !== null) throw new Error(`${what} exited with code ${child.exitCode} before listening`);
    await sleep(25);
  }
  throw new Error(`${what} did not accept on ${path} within 5 s`);
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 3000);
  await exited;
  clearTimeout(timer);
}

function start(cmd: string, args: string[], socket: string, dir: string, exportName: string, cleanup: () => void): Promise<NbdServer> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  return waitForSocket(socket, child, cmd)
    .catch((err: Error) => {
      cleanup();
      throw new Error(`${err.message}\n${stderr}`);
    })
    .then(() => ({
      uri: `nbd+unix:///${exportName}?socket=${socket}`,
      socket,
      dir,
      stop: async () => {
        await stopChild(child);
        cleanup();
      },
    }));
}

/**
 * nbdkit with a plugin and filters, e.g. `startNbdkit(['memory', 'size=1M'])` or
 * `startNbdkit(['--filter=error', 'memory', 'size=1M', 'error-pread-rate=1'])`.
 */
export function startNbdkit(args: string[]): Promise<NbdServer> {
  requireTool('nbdkit', 'nbdkit');
  const { dir, remove } = tempDir('pbp-nbdkit-');
  const socket = join(dir, 'nbd.sock');
  return start('nbdkit', ['--foreground', '--exit-with-parent', '--unix', socket, ...args], socket, dir, '', remove);
}

/** qemu-nbd serving `image` (format detected from `format`), writable unless `readOnly`. */
export function startQemuNbd(image: string, options: { format?: string; readOnly?: boolean; exportName?: string; extra?: string[] } = {}): Promise<NbdServer> {
  requireTool('qemu-nbd', 'qemu-utils');
  const { dir, remove } = tempDir('pbp-qemu-nbd-');
  const socket = join(dir, 'nbd.sock');
  const name = options.exportName ?? 'disk';
  const args = ['--persistent', '--shared=8', `--socket=${socket}`, `--export-name=${name}`, `--format=${options.format ?? 'raw'}`];
  if (options.readOnly) args.push('--read-only');
  args.push(...(options.extra ?? []), image);
  return start('qemu-nbd', args, socket, dir, name, remove);
}

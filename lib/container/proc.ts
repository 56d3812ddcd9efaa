/**
 * Running tar, rsync and the attr tools: stderr kept for the error, cancellation kills the child;
 * {@link checkAborted} for the steps between them.
 *
 * @packageDocumentation
 */
import { spawn, type ChildProcess, type StdioOptions } from 'node:child_process';

import { requireTool, tiedToParent } from '../tools.js';
import { ContainerAbortError, ContainerToolError, type ContainerToolErrorCode } from './errors.js';

/** Debian package of each program run here (for `ERR_TOOL_MISSING`). */
const PACKAGES: Record<string, string> = {
  tar: 'tar',
  rsync: 'rsync',
  getfattr: 'attr',
  setfattr: 'attr',
};

/** Path of `tool`, or a `ToolMissingError` (`ERR_TOOL_MISSING`) naming its Debian package. */
export function toolPath(tool: string): string {
  return requireTool(tool, PACKAGES[tool] ?? tool);
}

/** Throws a {@link ContainerAbortError} when `signal` is aborted. */
export function checkAborted(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted) throw new ContainerAbortError(what, signal.reason);
}

const STDERR_KEEP = 64 * 1024;

/** A started child process and a promise of how it ended. */
export interface Running {
  child: ChildProcess;
  /** Resolves when the child has exited with an accepted status; rejects with a typed error otherwise. */
  done: Promise<void>;
  /** Kills the child (SIGTERM, then SIGKILL after 5 s). */
  kill(): void;
  /** What the child wrote to stderr so far (the last 64 KiB). */
  stderr(): string;
}

/** Options of {@link startTool}. */
export interface StartToolOptions {
  /** Program name (looked up on PATH). */
  tool: string;
  /** Error code when it fails. */
  code: ContainerToolErrorCode;
  /** What the run is for, for messages (`tar create`, `rsync restore`). */
  what: string;
  args: string[];
  cwd?: string;
  stdio?: StdioOptions;
  signal?: AbortSignal;
  /** Exit statuses taken as success (default `[0]`). */
  okExitCodes?: number[];
}

/**
 * Starts a tool. Its stderr is collected; a non-accepted exit rejects `done` with a
 * {@link ContainerToolError} carrying the stderr tail; an abort of `signal` kills the child and
 * rejects `done` with a {@link ContainerAbortError}. The environment gets `LC_ALL=C` so messages
 * and name quoting do not depend on the locale.
 */
export function startTool(o: StartToolOptions): Running {
  const path = toolPath(o.tool);
  if (o.signal?.aborted) throw new ContainerAbortError(o.what, o.signal.reason);
  const stdio: StdioOptions = o.stdio ?? ['ignore', 'ignore', 'pipe'];
  // dies with this process, even by SIGKILL: an orphaned tar or rsync would go on writing
  const tied = tiedToParent(path, o.args);
  const child = spawn(tied.file, tied.args, { cwd: o.cwd, stdio, env: { ...process.env, LC_ALL: 'C' } });
  let stderr = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (s: string) => {
    stderr += s;
    if (stderr.length > STDERR_KEEP * 2) stderr = stderr.slice(-STDERR_KEEP);
  });
  let aborted = false;
  let killTimer: NodeJS.Timeout | undefined;
  const kill = (): void => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    killTimer ??= setTimeout(() => child.kill('SIGKILL'), 5000);
    killTimer.unref();
  };
  const onAbort = (): void => {
    aborted = true;
    kill();
  };
  o.signal?.addEventListener('abort', onAbort, { once: true });
  const done = new Promise<void>((resolve, reject) => {
    child.once('error', (err) => {
      o.signal?.removeEventListener('abort', onAbort);
      reject(new ContainerToolError(`${o.what}: cannot run ${o.tool}: ${err.message}`, { code: o.code, tool: o.tool, cause: err }));
    });
    child.once('close', (exitCode, signal) => {
      o.signal?.removeEventListener('abort', onAbort);
      if (killTimer) clearTimeout(killTimer);
      if (aborted) {
        reject(new ContainerAbortError(o.what, o.signal?.reason));
        return;
      }
      if (exitCode !== null && (o.okExitCodes ?? [0]).includes(exitCode)) {
        resolve();
        return;
      }
      const tail = tailLines(stderr.slice(-STDERR_KEEP).trim(), 4);
      const how = exitCode !== null ? `exit status ${exitCode}` : `signal ${signal}`;
      reject(
        new ContainerToolError(`${o.what} failed (${o.tool} ${how})${tail ? `: ${tail}` : ''}`, {
          code: o.code,
          tool: o.tool,
          exitCode,
          signal,
          stderr: stderr.slice(-STDERR_KEEP).trim(),
        }),
      );
    });
  });
  // Whoever awaits `done` sees the error; avoid an unhandled rejection when another error wins.
  done.catch(() => undefined);
  return { child, done, kill, stderr: () => stderr };
}

/** The last `n` meaningful lines of `text` joined with `; ` (tar's `--totals` line dropped). */
function tailLines(text: string, n: number): string {
  const lines = text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !/^Total bytes (written|read):/.test(l) && !/^(tar|rsync): Exiting with failure status/.test(l));
  return lines.slice(-n).join('; ');
}

/** Runs a tool to completion and returns its stdout (for small outputs such as `getfattr` dumps). */
export async function runToolCapture(o: Omit<StartToolOptions, 'stdio'> & { input?: string | Buffer }): Promise<Buffer> {
  const r = startTool({ ...o, stdio: [o.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
  const chunks: Buffer[] = [];
  r.child?.stdout?.on('data', (b: Buffer) => chunks.push(b));
  if (o.input !== undefined && r.child?.stdin) {
    r.child.stdin.on('error', () => undefined);
    r.child.stdin.end(o.input);
  }
  await r.done;
  return Buffer.concat(chunks);
}

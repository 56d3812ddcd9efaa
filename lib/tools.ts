/** External programs the library runs, found on PATH or reported missing with how to install them. */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';

import { PveBackupError } from './errors.js';

/** A program the library needs is not installed (code `ERR_TOOL_MISSING`). */
export class ToolMissingError extends PveBackupError {
  declare readonly code: 'ERR_TOOL_MISSING';
  /** The executable that was looked for. */
  readonly tool: string;
  /** The Debian package that provides it. */
  readonly debianPackage: string;
  /**
   * @param tool - The executable looked for.
   * @param debianPackage - The Debian package that provides it.
   */
  constructor(tool: string, debianPackage: string) {
    super(`${tool} not found: apt-get install ${debianPackage}`, { code: 'ERR_TOOL_MISSING' });
    this.name = 'ToolMissingError';
    this.tool = tool;
    this.debianPackage = debianPackage;
  }
}

const found = new Map<string, string>();

/** Path of `name` on PATH, or a {@link ToolMissingError} naming the Debian package to install. */
export function requireTool(name: string, debianPackage: string): string {
  const hit = found.get(name);
  if (hit) return hit;
  let path = '';
  try {
    path = execFileSync('sh', ['-c', 'command -v "$1"', 'sh', name], { encoding: 'utf8' }).trim();
  } catch {
    path = '';
  }
  if (!path) throw new ToolMissingError(name, debianPackage);
  found.set(name, path);
  return path;
}

// setpriv (util-linux, in every Debian) sets the parent-death signal before it execs the tool.
const SETPRIV = ['/usr/bin/setpriv', '/bin/setpriv'].find((p) => existsSync(p));

/**
 * The command line that runs `command` so that it is killed when this process dies, even by
 * SIGKILL (which leaves no chance to kill it ourselves): a `qemu-img convert` or `tar` left running
 * would go on writing a target the user believes abandoned. Spawn `file` with `args`: the child's
 * pid is the tool's (setpriv execs it). Node spawns from its main thread, the thread
 * `PR_SET_PDEATHSIG` watches. Without setpriv the tool runs directly (and survives a SIGKILL of
 * this process).
 */
export function tiedToParent(command: string, args: readonly string[], signal: 'KILL' | 'TERM' = 'KILL'): { file: string; args: string[] } {
  // TERM for a tool that must undo something on its way out (a FUSE mount), KILL otherwise
  return SETPRIV ? { file: SETPRIV, args: ['--pdeathsig', signal, '--', command, ...args] } : { file: command, args: [...args] };
}

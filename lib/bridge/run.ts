/**
 * The provider host as a process: stdin/stdout carry the protocol, signals cancel.
 *
 * @packageDocumentation
 */
import { Console } from 'node:console';
import { Writable } from 'node:stream';

import { ProviderHost, loadProviderModule } from './host.js';
import { CancelledError } from '../errors.js';

/**
 * The signals that stop a task: qemu-server's `archive_external` and `restore_external_archive`
 * die "interrupted by signal" on INT, TERM, QUIT and HUP (and PIPE, which Node ignores); a task
 * stop sends TERM to the process group, a terminal's Ctrl-C INT, its hangup HUP. The host cancels
 * the running call and lives on for the cleanup calls that follow.
 */
const STOP_SIGNALS = ['SIGTERM', 'SIGINT', 'SIGHUP', 'SIGQUIT'] as const;

/** How long a call may go on after the host's input ended (see {@link runProviderHost}). */
const HUNG_CALL_GRACE_MS = 5000;

/**
 * Serves `moduleSpec`'s provider on stdin/stdout until stdin ends, then ends the process.
 * SIGTERM, SIGINT, SIGHUP and SIGQUIT ({@link STOP_SIGNALS}) cancel the running call but do not
 * end the process: a stopped vzdump task still calls `backup_cleanup` and `job_cleanup` through
 * the same host (docs/pve-bridge-notes.md §6.3).
 * Anything the provider writes to stdout itself (`console.log`, `console.dir`,
 * `process.stdout.write`) goes to stderr (the task log), never into the protocol.
 *
 * The end of stdin is the end: once the last call settled (or, cancelled, failed to settle
 * within {@link HUNG_CALL_GRACE_MS}), the process exits even when the provider still holds
 * timers, sockets or child processes (a token refresh, a keep-alive agent).
 * Nobody can call it any more, and nobody may be left to end it: Proxmox VE's tasks (vzdump,
 * qmrestore, pct restore) end with `POSIX::_exit` (pve-common `RESTEnvironment.pm`
 * `fork_worker`), so the bridge object's DESTROY never runs; only the input ends. Child
 * processes the provider tied to this one (`tiedToParent`: qemu-storage-daemon's FUSE export
 * unmounts on its SIGTERM) go with it.
 */
export async function runProviderHost(moduleSpec: string): Promise<void> {
  // The protocol owns stdout: whatever else writes there (console.log or console.dir,
  // process.stdout.write of a progress line) goes to stderr, the task log, instead; a stray line
  // in the protocol would fail the call running then. Only the protocol keeps stdout's own write.
  const stdout = process.stdout;
  const protocolWrite = stdout.write.bind(stdout) as (chunk: Buffer | string, callback: (err?: Error | null) => void) => boolean;
  const output = new Writable({ write: (chunk: Buffer, _encoding, callback) => void protocolWrite(chunk, callback) });
  // a write that fails (EPIPE: the Perl side is gone) or comes after the end (a hung call settling
  // while the process ends) has nobody to tell; the input's end follows and ends the process
  output.on('error', () => undefined);
  stdout.on('error', () => undefined);
  stdout.write = process.stderr.write.bind(process.stderr) as typeof stdout.write;
  globalThis.console = new Console({ stdout: process.stderr, stderr: process.stderr });
  const factory = await loadProviderModule(moduleSpec);
  const host = new ProviderHost({ factory, input: process.stdin, output });
  const onSignal = (sig: NodeJS.Signals): void => host.cancel(new CancelledError(`cancelled by ${sig}`));
  for (const sig of STOP_SIGNALS) process.on(sig, onSignal);
  // the input's end cancels the running call; one that does not settle (a hung provider) gets
  // as long as Proxmox VE gives a stopped task before SIGKILL (pve-common RESTEnvironment.pm
  // kill_process_group: TERM, 5 s, KILL), then the process ends without it
  const inputEnded = new Promise<void>((resolve) => process.stdin.once('end', () => resolve()));
  try {
    await Promise.race([host.serve(), inputEnded.then(() => new Promise((resolve) => setTimeout(resolve, HUNG_CALL_GRACE_MS)))]);
  } finally {
    for (const sig of STOP_SIGNALS) process.off(sig, onSignal);
  }
  // what was written reaches the pipe first (an empty write calls back after the ones before it)
  await new Promise<void>((resolve) => output.end(() => resolve()));
  await new Promise<void>((resolve) => protocolWrite('', () => resolve()));
  process.exit(0);
}

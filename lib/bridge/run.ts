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
 * Serves `moduleSpec`'s provider on stdin/stdout until stdin ends, then ends the process. SIGTERM
 * and SIGINT cancel the running call but do not end the process: a stopped vzdump task still
 * calls `backup_cleanup` and `job_cleanup` through the same host (docs/pve-bridge-notes.md §6.3).
 * Anything the provider prints with `console.log` goes to stderr (the task log), never into
 * the protocol.
 *
 * The end of stdin is the end: once the last call settled, the process exits even when the
 * provider still holds timers, sockets or child processes (a token refresh, a keep-alive agent).
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
  stdout.write = process.stderr.write.bind(process.stderr) as typeof stdout.write;
  globalThis.console = new Console({ stdout: process.stderr, stderr: process.stderr });
  const factory = await loadProviderModule(moduleSpec);
  const host = new ProviderHost({ factory, input: process.stdin, output });
  const onSignal = (sig: NodeJS.Signals): void => host.cancel(new CancelledError(`cancelled by ${sig}`));
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  try {
    await host.serve();
  } finally {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
  }
  // what was written reaches the pipe first (an empty write calls back after the ones before it)
  await new Promise<void>((resolve) => output.end(() => resolve()));
  await new Promise<void>((resolve) => protocolWrite('', () => resolve()));
  process.exit(0);
}

/**
 * The provider host as a process: stdin/stdout carry the protocol, signals cancel.
 *
 * @packageDocumentation
 */
import { ProviderHost, loadProviderModule } from './host.js';
import { CancelledError } from '../errors.js';

/**
 * Serves `moduleSpec`'s provider on stdin/stdout until stdin ends. SIGTERM and SIGINT cancel
 * the running call but do not end the process: a stopped vzdump task still calls
 * `backup_cleanup` and `job_cleanup` through the same host (docs/pve-bridge-notes.md §6.3).
 * Anything the provider prints with `console.log` goes to stderr (the task log), never into
 * the protocol.
 */
export async function runProviderHost(moduleSpec: string): Promise<void> {
  const output = process.stdout;
  // the protocol owns stdout: console output of the provider goes to the task log instead
  for (const k of ['log', 'info', 'debug', 'trace'] as const) console[k] = console.error;
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
}

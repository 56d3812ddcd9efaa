/**
 * `pve-backup-provider provider-host --provider MODULE`: the process the Perl bridge
 * (`perl/PVE/BackupProvider/Plugin/NodeBridge.pm`) starts and talks to on stdin/stdout.
 */
import type { Command } from 'commander';

/** Registers the `provider-host` command. */
export function addProviderHostCommand(program: Command): void {
  program
    .command('provider-host')
    .description('serve a provider module to the Perl bridge on stdin/stdout (newline-delimited JSON); ends when stdin closes')
    .requiredOption('--provider <module>', 'ESM module (path or package) whose default export is a factory (context) => provider or a provider class')
    .action(async (opts: { provider: string }) => {
      const { runProviderHost } = await import('../bridge/run.js'); // loaded only for the host
      await runProviderHost(opts.provider);
    });
}

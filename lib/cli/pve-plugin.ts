/**
 * `pve-backup-provider pve-plugin generate|install --type NAME --provider MODULE`: the Proxmox VE
 * storage plugin of a provider module (lib/bridge/pve-plugin.ts).
 *
 * - `generate --dest DIR` writes the two Perl files into DIR as a perl5 tree
 *   (`DIR/PVE/Storage/Custom/<Name>Plugin.pm`, `DIR/PVE/BackupProvider/Plugin/<Name>.pm`), to
 *   package or inspect them.
 * - `install` writes them into `/usr/share/perl5` (under `--root` for a staging tree, e.g. a
 *   Debian package's build root): Proxmox VE's daemons run under `perl -T`, which ignores
 *   PERL5LIB, so that is the one place they look.
 *
 * Both refuse to replace a file another plugin wrote unless `--force`, and print what to restart
 * and the `pvesm add` line.
 */
import path from 'node:path';

import type { Command } from 'commander';

import { UsageError } from './errors.js';

interface PluginOptions {
  type: string;
  provider: string;
  dest?: string;
  root?: string;
  node?: string;
  force?: boolean;
  json?: boolean;
}

async function run(mode: 'generate' | 'install', opts: PluginOptions): Promise<void> {
  const { generatePvePlugin, writePvePlugin, PVE_PERL5_DIR } = await import('../bridge/pve-plugin.js');
  let dir: string;
  if (mode === 'generate') {
    if (!opts.dest) throw new UsageError('pve-plugin generate needs --dest DIR');
    dir = path.resolve(opts.dest);
  } else {
    dir = opts.root ? path.join(path.resolve(opts.root), PVE_PERL5_DIR) : PVE_PERL5_DIR;
  }
  const plugin = await generatePvePlugin({ type: opts.type, provider: opts.provider, node: opts.node });
  const files = await writePvePlugin(plugin, dir, { force: opts.force === true });
  if (opts.json) {
    console.log(
      JSON.stringify({
        type: plugin.names.type,
        storagePackage: plugin.names.storagePackage,
        providerPackage: plugin.names.providerPackage,
        files,
        node: plugin.node,
        cli: plugin.cli,
        provider: plugin.provider,
        restart: plugin.restart,
        pvesmAdd: plugin.pvesmAdd,
      }),
    );
    return;
  }
  for (const f of files) console.log(`wrote ${f}`);
  if (mode === 'generate') console.log(`install: copy the PVE/ tree of ${dir} into ${PVE_PERL5_DIR} (files 0644) on every node`);
  console.log(`then restart what loads storage plugins: ${plugin.restart}`);
  console.log(`and add a storage: ${plugin.pvesmAdd}`);
}

/** Registers `pve-plugin generate` and `pve-plugin install`. */
export function addPvePluginCommands(program: Command): void {
  const group = program.command('pve-plugin').description("write a provider module's Proxmox VE storage plugin (two Perl files)");
  const common = (c: Command): Command =>
    c
      .requiredOption('--type <name>', 'storage type, lower case (e.g. acme: PVE::Storage::Custom::AcmePlugin)')
      .requiredOption('--provider <module>', 'the provider module file (ESM; its default export the provider, its pveStorage export the schema)')
      .option('--node <path>', 'absolute path of node for Proxmox VE to run (default: this node)')
      .option('--force', "replace files another plugin wrote")
      .option('--json', 'print what was written as JSON');
  common(group.command('generate').description('write the two Perl files into a folder (a perl5 tree)'))
    .option('--dest <dir>', 'folder to write into (required)')
    .action(async (opts: PluginOptions) => run('generate', opts));
  common(group.command('install').description(`write the two Perl files into /usr/share/perl5 (PVE's paths)`))
    .option('--root <dir>', 'write under this folder instead of / (a staging tree)')
    .action(async (opts: PluginOptions) => run('install', opts));
}

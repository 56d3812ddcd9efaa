/**
 * Generates the Proxmox VE storage plugin of a provider module: the two Perl files that make a
 * TypeScript provider a PVE backup storage (issue #14 §1), written by `pve-backup-provider
 * pve-plugin generate|install`.
 *
 * - `PVE/Storage/Custom/<Name>Plugin.pm`, package `PVE::Storage::Custom::<Name>Plugin`, from
 *   `perl/templates/StoragePlugin.pm.in`, with the storage type, the provider's `pveStorage`
 *   schema (properties, options, sensitive properties, the archive name's vmid) and the absolute
 *   paths of node, of this package's `dist/cli/main.js` and of the provider module baked in.
 * - `PVE/BackupProvider/Plugin/<Name>.pm`, package `PVE::BackupProvider::Plugin::<Name>`: a copy
 *   of this package's `NodeBridge.pm` under the vendor's name. Each vendor gets its own copy, not
 *   the shared `PVE::BackupProvider::Plugin::NodeBridge`, because the Perl class and the host it
 *   talks to (`dist/cli/main.js`) must be of the same package version: two vendors shipping
 *   different versions would otherwise overwrite one file both depend on.
 *
 * Names: `--type` is the storage type, the section type of `storage.cfg`, which pve-storage
 * lower-cases when it reads the file (`Plugin.pm` `parse_section_header`: `lc($1)`), so it must
 * be lower case: `[a-z][a-z0-9]{1,31}`. `<Name>` is the type with a capital first letter
 * (`acme` -> `PVE::Storage::Custom::AcmePlugin`, as pve-storage names `DirPlugin`), a valid Perl
 * package word by construction.
 *
 * Both files are read by every PVE daemon (pveproxy runs as www-data): they are written 0644 in
 * folders 0755, whatever the umask. They hold no secret: sensitive properties are kept by the
 * plugin under `/etc/pve/priv/storage/` (0600).
 *
 * @packageDocumentation
 */
import { spawnSync } from 'node:child_process';
import { accessSync, constants, existsSync, promises as fs, statSync } from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

import { InvalidArgumentError } from '../errors.js';
import { packageRoot, packageVersion } from '../package-root.js';
import type { PveStorageProperty, PveStorageSchema } from '../provider/api.js';
import { PluginFileExistsError } from './errors.js';

/** Storage types pve-storage registers itself (`Storage.pm`): a custom plugin must not take one. */
const BUILTIN_TYPES = ['dir', 'lvm', 'lvmthin', 'nfs', 'cifs', 'iscsi', 'rbd', 'cephfs', 'iscsidirect', 'zfspool', 'zfs', 'pbs', 'btrfs', 'esxi', 'glusterfs'];

/**
 * Properties pve-storage's own plugins declare: a plugin that declares one again dies at load
 * (pve-common `SectionConfig.pm` `init`: "duplicate property"); they may only be listed in
 * `options` (docs/pve-bridge-notes.md §1.2).
 */
const PVE_PROPERTIES = [
  'type', 'storage', 'nodes', 'content', 'disable', 'shared', 'path', 'prune-backups', 'max-protected-backups', 'bwlimit', 'format', 'preallocation',
  'server', 'export', 'share', 'username', 'password', 'domain', 'subdir', 'options', 'port', 'datastore', 'namespace', 'fingerprint', 'encryption-key',
  'master-pubkey', 'keyring', 'monhost', 'pool', 'krbd', 'fs-name', 'mkdir', 'create-base-path', 'create-subdirs', 'content-dirs', 'is_mountpoint',
  'snapshot-as-volume-chain', 'vgname', 'thinpool', 'base', 'saferemove', 'tagged_only', 'portal', 'target', 'blocksize', 'sparse', 'mountpoint',
];

/** Options every generated plugin takes (Proxmox VE's own properties), unless the schema says otherwise. */
const DEFAULT_OPTIONS: Record<string, { optional?: boolean; fixed?: boolean }> = {
  content: { optional: true },
  nodes: { optional: true },
  disable: { optional: true },
  'prune-backups': { optional: true },
  'max-protected-backups': { optional: true },
};

/** The services that load storage plugins: restart them after an install. */
export const PVE_SERVICES = ['pvedaemon', 'pveproxy', 'pvestatd', 'pvescheduler'] as const;

/** Where `install` writes: Perl's standard path, the only one `perl -T` daemons read (PERL5LIB is ignored). */
export const PVE_PERL5_DIR = '/usr/share/perl5';

/** The names a storage type gives the two Perl files. */
export interface PvePluginNames {
  /** The storage type (`storage.cfg` section type), e.g. `acme`. */
  type: string;
  /** `PVE::Storage::Custom::AcmePlugin`. */
  storagePackage: string;
  /** `PVE/Storage/Custom/AcmePlugin.pm`, relative to a perl5 folder. */
  storageFile: string;
  /** `PVE::BackupProvider::Plugin::Acme`. */
  providerPackage: string;
  /** `PVE/BackupProvider/Plugin/Acme.pm`. */
  providerFile: string;
}

/**
 * Checks a storage type and derives the Perl names.
 * @throws {@link InvalidArgumentError} for a type that is not `[a-z][a-z0-9]{1,31}` or is one of
 *   pve-storage's own.
 */
export function pvePluginNames(type: string): PvePluginNames {
  if (!/^[a-z][a-z0-9]{1,31}$/.test(type)) {
    throw new InvalidArgumentError(`storage type '${type}' must be 2 to 32 lower-case letters and digits, starting with a letter (pve-storage lower-cases section types)`);
  }
  if (BUILTIN_TYPES.includes(type)) throw new InvalidArgumentError(`storage type '${type}' is one of Proxmox VE's own`);
  const name = type.charAt(0).toUpperCase() + type.slice(1);
  return {
    type,
    storagePackage: `PVE::Storage::Custom::${name}Plugin`,
    storageFile: `PVE/Storage/Custom/${name}Plugin.pm`,
    providerPackage: `PVE::BackupProvider::Plugin::${name}`,
    providerFile: `PVE/BackupProvider/Plugin/${name}.pm`,
  };
}

/** A Perl single-quoted string literal. */
function perlString(s: string): string {
  return `'${s.replace(/\\/g, '\\\\').replace(/'/g, "\\'")}'`;
}

function perlValue(v: string | number | boolean): string {
  if (typeof v === 'boolean') return v ? '1' : '0';
  if (typeof v === 'number') return String(v);
  return perlString(v);
}

/** A property as pve-common's JSON schema (`PVE::JSONSchema`) wants it, as a Perl literal. */
function perlProperty(p: PveStorageProperty): string {
  const parts = [`type => ${perlString(p.type)}`, `description => ${perlString(p.description)}`];
  if (p.enum) parts.push(`enum => [${p.enum.map(perlString).join(', ')}]`);
  if (p.minimum !== undefined) parts.push(`minimum => ${p.minimum}`);
  if (p.maximum !== undefined) parts.push(`maximum => ${p.maximum}`);
  if (p.default !== undefined) parts.push(`default => ${perlValue(p.default)}`);
  return `{ ${parts.join(', ')} }`;
}

/**
 * Checks a provider's `pveStorage` schema against what pve-storage accepts.
 * @throws {@link InvalidArgumentError} naming the first problem.
 */
export function checkPveStorageSchema(schema: unknown): PveStorageSchema {
  if (schema === undefined) return {};
  if (typeof schema !== 'object' || schema === null) throw new InvalidArgumentError('pveStorage must be an object');
  const s = schema as PveStorageSchema;
  for (const [name, p] of Object.entries(s.properties ?? {})) {
    if (!/^[a-z][a-z0-9-]{1,63}$/.test(name)) throw new InvalidArgumentError(`pveStorage property '${name}': names are lower-case letters, digits and '-'`);
    if (PVE_PROPERTIES.includes(name)) throw new InvalidArgumentError(`pveStorage property '${name}' is Proxmox VE's own: list it in options only (a second declaration fails to load)`);
    if (!p || !['string', 'integer', 'boolean'].includes(p.type)) throw new InvalidArgumentError(`pveStorage property '${name}': type must be string, integer or boolean`);
    if (typeof p.description !== 'string' || p.description === '') throw new InvalidArgumentError(`pveStorage property '${name}' needs a description`);
    if (p.enum && (!Array.isArray(p.enum) || p.enum.some((e) => typeof e !== 'string'))) throw new InvalidArgumentError(`pveStorage property '${name}': enum must be strings`);
  }
  for (const [name, o] of Object.entries(s.options ?? {})) {
    if (!(name in (s.properties ?? {})) && !PVE_PROPERTIES.includes(name)) throw new InvalidArgumentError(`pveStorage option '${name}' is neither a property of the provider nor one of Proxmox VE's`);
    if (typeof o !== 'object' || o === null) throw new InvalidArgumentError(`pveStorage option '${name}' must be {optional?, fixed?}`);
  }
  for (const name of s.sensitive ?? []) {
    if (!(name in (s.properties ?? {}))) throw new InvalidArgumentError(`pveStorage sensitive property '${name}' is not one of its properties`);
  }
  if (s.archiveNameVmid !== undefined) {
    let re: RegExp;
    try {
      re = new RegExp(s.archiveNameVmid);
    } catch (err) {
      throw new InvalidArgumentError(`pveStorage archiveNameVmid is not a regular expression: ${(err as Error).message}`);
    }
    // one capture group: count them by matching the empty alternative
    const groups = new RegExp(`${re.source}|`).exec('')!.length - 1;
    if (groups !== 1) throw new InvalidArgumentError(`pveStorage archiveNameVmid must have exactly one capture group (the vmid), has ${groups}`);
  }
  return s;
}

/** What {@link generatePvePlugin} needs. */
export interface GenerateOptions {
  /** The storage type. */
  type: string;
  /** The provider module (a file; made absolute against the working directory). */
  provider: string;
  /** Absolute path of node (default: the node running this). */
  node?: string;
  /** Absolute path of `dist/cli/main.js` (default: this package's). */
  cli?: string;
}

/** One file to write, relative to a perl5 folder. */
export interface GeneratedFile {
  path: string;
  content: string;
}

/** The generated plugin. */
export interface GeneratedPlugin {
  names: PvePluginNames;
  /** The storage plugin, then the provider class. */
  files: GeneratedFile[];
  /** Absolute paths baked in. */
  node: string;
  cli: string;
  provider: string;
  /** The `pvesm add` line, with the required options as placeholders. */
  pvesmAdd: string;
  /** The `systemctl restart` line. */
  restart: string;
}

function absoluteFile(p: string, what: string, executable = false): string {
  if (!path.isAbsolute(p)) throw new InvalidArgumentError(`${what} must be an absolute path: ${p}`);
  if (/[\0\n]/.test(p)) throw new InvalidArgumentError(`${what} holds a NUL or a newline`);
  let st;
  try {
    st = statSync(p);
  } catch {
    throw new InvalidArgumentError(`${what} ${p} does not exist`);
  }
  if (!st.isFile()) throw new InvalidArgumentError(`${what} ${p} is not a file`);
  if (executable) {
    try {
      accessSync(p, constants.X_OK);
    } catch {
      throw new InvalidArgumentError(`${what} ${p} is not executable`);
    }
  }
  return p;
}

/** Checks that Perl compiles the vmid pattern as JavaScript does, when perl is there (it is on PVE). */
function checkPerlRegex(re: string): void {
  const r = spawnSync('perl', ['-e', 'my $r = $ARGV[0]; qr/$r/', re], { encoding: 'utf8' });
  if (r.error) return; // no perl here: the JavaScript check above stands
  if (r.status !== 0) throw new InvalidArgumentError(`pveStorage archiveNameVmid does not compile in Perl: ${r.stderr.trim()}`);
}

/**
 * Generates the two Perl files for a provider module: loads the module (its `pveStorage` export),
 * checks it and every path that is baked in.
 * @throws {@link InvalidArgumentError} for a bad type, path or schema.
 */
export async function generatePvePlugin(opts: GenerateOptions): Promise<GeneratedPlugin> {
  const names = pvePluginNames(opts.type);
  const provider = absoluteFile(path.resolve(opts.provider), 'the provider module');
  const node = absoluteFile(opts.node ?? process.execPath, 'node', true);
  const cli = absoluteFile(opts.cli ?? path.join(packageRoot(), 'dist', 'cli', 'main.js'), "pve-backup-provider's dist/cli/main.js");

  let mod: { default?: unknown; pveStorage?: unknown };
  try {
    mod = (await import(pathToFileURL(provider).href)) as typeof mod;
  } catch (err) {
    throw new InvalidArgumentError(`cannot load the provider module ${provider}: ${(err as Error).message}`, { cause: err });
  }
  if (typeof mod.default !== 'function') throw new InvalidArgumentError(`the provider module ${provider} has no default export that is a factory or a provider class`);
  const schema = checkPveStorageSchema(mod.pveStorage);
  const vmidRe = schema.archiveNameVmid ?? '^(\\d+)/';
  checkPerlRegex(vmidRe);

  const properties = schema.properties ?? {};
  const options: Record<string, { optional?: boolean; fixed?: boolean }> = { ...DEFAULT_OPTIONS };
  for (const name of Object.keys(properties)) options[name] = { optional: true };
  Object.assign(options, schema.options ?? {});
  const perlHash = (entries: string[]): string => (entries.length === 0 ? '{}' : `{\n        ${entries.join(',\n        ')},\n    }`);
  const propertiesPerl = perlHash(Object.entries(properties).map(([k, p]) => `${perlString(k)} => ${perlProperty(p)}`));
  const optionsPerl = perlHash(
    Object.entries(options).map(([k, o]) => {
      const flags = [o.optional ? 'optional => 1' : '', o.fixed ? 'fixed => 1' : ''].filter(Boolean);
      return `${perlString(k)} => { ${flags.join(', ')} }`;
    }),
  );
  const sensitive = `(${(schema.sensitive ?? []).map(perlString).join(', ')})`;
  const name = names.providerPackage.split('::').pop()!;

  const template = await fs.readFile(path.join(packageRoot(), 'perl', 'templates', 'StoragePlugin.pm.in'), 'utf8');
  const values: Record<string, string> = {
    PACKAGE: names.storagePackage.split('::').pop()!,
    TYPE: names.type,
    TYPE_LITERAL: perlString(names.type),
    PROVIDER_PATH: provider.replace(/[\r\n]/g, ' '),
    PROVIDER_CLASS: name,
    VERSION: packageVersion(),
    NODE: perlString(node),
    CLI: perlString(cli),
    PROVIDER: perlString(provider),
    VMID_RE: perlString(vmidRe),
    SENSITIVE: sensitive,
    PROPERTIES: propertiesPerl,
    OPTIONS: optionsPerl,
  };
  const storage = template.replace(/@@([A-Z_]+)@@/g, (m, k: string) => {
    const v = values[k];
    if (v === undefined) throw new InvalidArgumentError(`template placeholder ${m} has no value`);
    return v;
  });

  const bridge = await fs.readFile(path.join(packageRoot(), 'perl', 'PVE', 'BackupProvider', 'Plugin', 'NodeBridge.pm'), 'utf8');
  const packageLine = 'package PVE::BackupProvider::Plugin::NodeBridge;';
  if (!bridge.startsWith(packageLine)) throw new InvalidArgumentError('perl/PVE/BackupProvider/Plugin/NodeBridge.pm does not start with its package line');
  const providerClass =
    `package ${names.providerPackage};\n` +
    `# pve-backup-provider-generated: type=${names.type} provider=${values.PROVIDER_PATH}\n` +
    `#\n# GENERATED by \`pve-backup-provider pve-plugin generate\` (pve-backup-provider ${values.VERSION}): this\n` +
    `# vendor's copy of the package's PVE::BackupProvider::Plugin::NodeBridge, so that it always matches\n` +
    `# the host it starts (${cli}). Do not edit; generate it again.\n` +
    bridge.slice(packageLine.length);

  const required = Object.entries(options)
    .filter(([k, o]) => !o.optional && !DEFAULT_OPTIONS[k])
    .map(([k]) => `--${k} <${k}>`);
  return {
    names,
    files: [
      { path: names.storageFile, content: storage },
      { path: names.providerFile, content: providerClass },
    ],
    node,
    cli,
    provider,
    pvesmAdd: ['pvesm add', names.type, '<storeid>', ...required].join(' '),
    restart: `systemctl restart ${PVE_SERVICES.join(' ')}`,
  };
}

/** The `type=... provider=...` of a generated file's header, or undefined. */
function ownerOf(content: string): string | undefined {
  return /^# pve-backup-provider-generated: (type=\S+ provider=.*)$/m.exec(content.split('\n').slice(0, 3).join('\n'))?.[1];
}

/**
 * Writes the generated files under `root` (a perl5 folder: `--dest` or `/usr/share/perl5`).
 * A file that exists is replaced only when the same type and provider module wrote it (a new
 * version of the same vendor's plugin), or with `force`. Folders are created 0755 and files
 * written 0644 whatever the umask: Proxmox VE's daemons, pveproxy as www-data, read them.
 * The files are written to a temporary name and renamed, so a running daemon never loads half.
 *
 * @returns The absolute paths written.
 * @throws {@link PluginFileExistsError} for another writer's file without `force`.
 */
export async function writePvePlugin(plugin: GeneratedPlugin, root: string, options: { force?: boolean } = {}): Promise<string[]> {
  const owner = `type=${plugin.names.type} provider=${plugin.provider.replace(/[\r\n]/g, ' ')}`;
  const targets = plugin.files.map((f) => ({ ...f, abs: path.join(root, f.path) }));
  // check both before writing either
  for (const t of targets) {
    if (!existsSync(t.abs) || options.force) continue;
    const theirs = ownerOf(await fs.readFile(t.abs, 'utf8'));
    if (theirs !== owner) throw new PluginFileExistsError(t.abs, theirs ? `another plugin (${theirs})` : 'no plugin generated by pve-backup-provider');
  }
  const written: string[] = [];
  for (const t of targets) {
    // each missing folder 0755 (mkdir's mode is cut by the umask: chmod what was created)
    const missing: string[] = [];
    for (let d = path.dirname(t.abs); !existsSync(d); d = path.dirname(d)) missing.unshift(d);
    for (const d of missing) {
      await fs.mkdir(d);
      await fs.chmod(d, 0o755);
    }
    const tmp = `${t.abs}.tmp-${process.pid}`;
    await fs.writeFile(tmp, t.content, { mode: 0o644 });
    await fs.chmod(tmp, 0o644);
    await fs.rename(tmp, t.abs);
    written.push(t.abs);
  }
  return written;
}

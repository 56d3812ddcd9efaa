/**
 * The generated Proxmox VE storage plugin (`pve-backup-provider pve-plugin generate|install`),
 * loaded under `perl -T` by the stand-in of pve-storage's loader (test/pve/PVE/Storage.pm) and
 * driven by test/pve/storage-driver.pl the way pvesm, pvestatd and the content API call it:
 * schema, parse_volname, list_volumes, cached status, notes and protected (with upstream's
 * max-protected-backups count), prune, free, secrets, errors. Providers: the fixture
 * test/pve/providers/jsonstore.mjs (storage hooks over a JSON file) and the DirectoryProvider.
 * Needs `npm run build:ts` (the host runs from dist/).
 */
import { spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { PassThrough } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';

import { ProviderHost } from '../lib/bridge/host.js';
import { keepFromPerl } from '../lib/bridge/storage-calls.js';
import { DirectoryProvider, runBackupJob } from '../lib/index.js';
import { startDisk, vmGuest } from './helpers/directory.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { gone, requireTool } from './helpers/tools.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const CLI = path.join(ROOT, 'dist', 'cli', 'main.js');
const JSONSTORE = path.join(ROOT, 'test/pve/providers/jsonstore.mjs');
const MiB = 2 ** 20;

afterEach(async () => {
  await stopAll();
});

function cli(args: string[], umask = '022'): { status: number | null; stdout: string; stderr: string } {
  // under a tight umask, to see that modes are set whatever it is
  const r = spawnSync('sh', ['-c', `umask ${umask}; exec "$0" "$@"`, process.execPath, CLI, ...args], { encoding: 'utf8', cwd: ROOT });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

async function generate(type: string, provider: string): Promise<string> {
  const dest = path.join(await tempDir(), 'perl5');
  const r = cli(['pve-plugin', 'generate', '--type', type, '--provider', provider, '--dest', dest]);
  expect(r.stderr).toBe('');
  expect(r.status).toBe(0);
  return dest;
}

interface OpResult {
  op: string;
  ms: number;
  result?: any; // eslint-disable-line @typescript-eslint/no-explicit-any
  error?: string;
  warnings: string[];
}

interface Drive {
  loaded: { class: string | null; warnings: string[]; error: string | null };
  ops: OpResult[];
  stderr: string;
}

/** Runs test/pve/storage-driver.pl under perl -T with one job. */
function drive(job: { perl5: string; type: string; storeid?: string; scfg: Record<string, unknown>; settings?: Record<string, unknown>; ops: Array<Record<string, unknown>> }, apiver?: number): Drive {
  const perl = requireTool('perl', 'perl');
  const r = spawnSync(perl, ['-T', '-I', path.join(ROOT, 'test/pve'), path.join(ROOT, 'test/pve/storage-driver.pl')], {
    input: `${JSON.stringify({ storeid: 'js1', ...job })}\n`,
    encoding: 'utf8',
    timeout: 120_000,
    env: { ...process.env, ...(apiver !== undefined ? { PVE_STANDIN_APIVER: String(apiver) } : {}) },
  });
  const lines = r.stdout.split('\n').filter((l) => l !== '').map((l) => JSON.parse(l));
  expect(r.stderr).not.toMatch(/Insecure/);
  expect(r.status, r.stderr).toBe(0);
  return { loaded: lines[0].loaded, ops: lines.slice(1), stderr: r.stderr };
}

const T0 = Date.UTC(2026, 10, 1, 10) / 1000;
const DAY = 86400;

interface FixtureBackup {
  volname: string;
  vmid: number;
  vmtype: 'qemu' | 'lxc';
  ctime: number;
  size: number;
  notes?: string;
  protected?: boolean;
}

/** A jsonstore fixture: its data file, a storage config and the driver settings of a temp dir. */
async function fixture(data: Record<string, unknown> = {}): Promise<{ dir: string; file: string; scfg: Record<string, unknown>; settings: Record<string, unknown>; read: () => Promise<{ backups: FixtureBackup[] }>; spawns: () => Promise<number[]> }> {
  const dir = await tempDir();
  const file = path.join(dir, 'data.json');
  const backups: FixtureBackup[] = [
    { volname: 'backup/guest=101/2026-11-01T10:00:00Z', vmid: 101, vmtype: 'qemu', ctime: T0, size: 1000 },
    { volname: 'backup/guest=101/2026-11-02T10:00:00Z', vmid: 101, vmtype: 'qemu', ctime: T0 + DAY, size: 2000, notes: 'second' },
    { volname: 'backup/guest=101/2026-11-03T10:00:00Z', vmid: 101, vmtype: 'qemu', ctime: T0 + 2 * DAY, size: 3000 },
    { volname: 'backup/guest=102/2026-11-02T10:00:00Z', vmid: 102, vmtype: 'lxc', ctime: T0 + DAY, size: 4000 },
  ];
  await fs.writeFile(file, JSON.stringify({ backups, status: { total: 100 * MiB, free: 60 * MiB, used: 40 * MiB }, ...data }));
  return {
    dir,
    file,
    scfg: { 'jsonstore-file': file },
    settings: { STATE_DIR: path.join(dir, 'state'), PRIV_DIR: path.join(dir, 'priv'), STATUS_TIMEOUT: 2, CALL_TIMEOUT: 20 },
    read: async () => JSON.parse(await fs.readFile(file, 'utf8')),
    spawns: async () =>
      (await fs.readFile(`${file}.spawns`, 'utf8').catch(() => ''))
        .split('\n')
        .filter(Boolean)
        .map(Number),
  };
}

describe('pve-plugin generate | install', () => {
  it('has --help, and refuses a bad type or a missing --dest with a clear line', () => {
    const help = cli(['pve-plugin', 'generate', '--help']);
    expect(help.status).toBe(0);
    expect(help.stdout).toMatch(/--type <name>/);
    expect(help.stdout).toMatch(/--provider <module>/);
    expect(help.stdout).toMatch(/--dest <dir>/);
    expect(cli(['pve-plugin', 'install', '--help']).stdout).toMatch(/--root <dir>/);

    const noDest = cli(['pve-plugin', 'generate', '--type', 'jsonstore', '--provider', JSONSTORE]);
    expect(noDest.status).toBe(2);
    expect(noDest.stderr).toMatch(/needs --dest/);
    for (const bad of ['Acme', 'a', '1abc', 'my-store', 'dir', 'pbs']) {
      const r = cli(['pve-plugin', 'generate', '--type', bad, '--provider', JSONSTORE, '--dest', '/nonexistent/x']);
      expect(r.status, bad).toBe(1);
      expect(r.stderr, bad).toMatch(/storage type .*\[ERR_INVALID_ARGUMENT\]/);
    }
    const missing = cli(['pve-plugin', 'generate', '--type', 'acme', '--provider', '/nonexistent/p.mjs', '--dest', '/nonexistent/x']);
    expect(missing.stderr).toMatch(/provider module \/nonexistent\/p.mjs does not exist \[ERR_INVALID_ARGUMENT\]/);
  });

  it('generate writes both files 0644 in folders 0755 under umask 077, with the paths baked in, and prints the restart and pvesm lines', async () => {
    const dest = path.join(await tempDir(), 'perl5');
    const r = cli(['pve-plugin', 'generate', '--type', 'jsonstore', '--provider', path.relative(ROOT, JSONSTORE), '--dest', dest], '077');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('systemctl restart pvedaemon pveproxy pvestatd pvescheduler');
    expect(r.stdout).toContain('pvesm add jsonstore <storeid> --jsonstore-file <jsonstore-file>');
    const storage = path.join(dest, 'PVE/Storage/Custom/JsonstorePlugin.pm');
    const bridge = path.join(dest, 'PVE/BackupProvider/Plugin/Jsonstore.pm');
    for (const f of [storage, bridge]) expect(((await fs.stat(f)).mode & 0o777).toString(8)).toBe('644');
    for (const d of ['', 'PVE', 'PVE/Storage', 'PVE/Storage/Custom', 'PVE/BackupProvider', 'PVE/BackupProvider/Plugin']) {
      expect(((await fs.stat(path.join(dest, d))).mode & 0o777).toString(8), d).toBe('755');
    }
    const text = await fs.readFile(storage, 'utf8');
    expect(text).toMatch(/^package PVE::Storage::Custom::JsonstorePlugin;\n# pve-backup-provider-generated: type=jsonstore provider=/);
    expect(text).toContain(`my $PROVIDER = '${JSONSTORE}';`);
    expect(text).toContain(`my $CLI = '${CLI}';`);
    expect(text).toContain(`my $NODE = '${process.execPath}';`);
    expect(text).not.toMatch(/@@[A-Z_]+@@/);
    const copy = await fs.readFile(bridge, 'utf8');
    expect(copy).toMatch(/^package PVE::BackupProvider::Plugin::Jsonstore;\n/);
    expect(copy).toContain('sub storage_call');

    const json = cli(['pve-plugin', 'generate', '--type', 'jsonstore', '--provider', JSONSTORE, '--dest', dest, '--json']);
    expect(json.status, json.stderr).toBe(0);
    expect(JSON.parse(json.stdout)).toMatchObject({
      type: 'jsonstore',
      storagePackage: 'PVE::Storage::Custom::JsonstorePlugin',
      providerPackage: 'PVE::BackupProvider::Plugin::Jsonstore',
      files: [storage, bridge],
      provider: JSONSTORE,
      pvesmAdd: 'pvesm add jsonstore <storeid> --jsonstore-file <jsonstore-file>',
    });
  });

  it('install --root writes into usr/share/perl5, replaces its own files, refuses another vendor\'s (or a foreign file) without --force', async () => {
    const root = await tempDir();
    const perl5 = path.join(root, 'usr/share/perl5');
    const first = cli(['pve-plugin', 'install', '--type', 'jsonstore', '--provider', JSONSTORE, '--root', root]);
    expect(first.status, first.stderr).toBe(0);
    expect(first.stdout).toContain(`wrote ${path.join(perl5, 'PVE/Storage/Custom/JsonstorePlugin.pm')}`);
    expect(first.stdout).toContain('systemctl restart pvedaemon pveproxy pvestatd pvescheduler');
    expect(first.stdout).toContain('pvesm add jsonstore <storeid> --jsonstore-file');
    // the same vendor again (an upgrade): fine
    expect(cli(['pve-plugin', 'install', '--type', 'jsonstore', '--provider', JSONSTORE, '--root', root]).status).toBe(0);
    // another vendor's module taking the same type
    const other = path.join(await tempDir(), 'other.mjs');
    await fs.copyFile(JSONSTORE, other);
    const refused = cli(['pve-plugin', 'install', '--type', 'jsonstore', '--provider', other, '--root', root]);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toMatch(/JsonstorePlugin\.pm exists and belongs to another plugin \(type=jsonstore provider=.*jsonstore\.mjs\); give --force to replace it \[ERR_PLUGIN_FILE_EXISTS\]/);
    expect(await fs.readFile(path.join(perl5, 'PVE/Storage/Custom/JsonstorePlugin.pm'), 'utf8')).toContain(JSONSTORE);
    const forced = cli(['pve-plugin', 'install', '--type', 'jsonstore', '--provider', other, '--root', root, '--force']);
    expect(forced.status, forced.stderr).toBe(0);
    expect(await fs.readFile(path.join(perl5, 'PVE/Storage/Custom/JsonstorePlugin.pm'), 'utf8')).toContain(other);
    // a hand-written plugin of that name
    await fs.writeFile(path.join(perl5, 'PVE/BackupProvider/Plugin/Acme.pm'), 'package PVE::BackupProvider::Plugin::Acme;\n1;\n');
    const foreign = cli(['pve-plugin', 'install', '--type', 'acme', '--provider', JSONSTORE, '--root', root]);
    expect(foreign.stderr).toMatch(/Acme\.pm exists and belongs to no plugin generated by pve-backup-provider.*\[ERR_PLUGIN_FILE_EXISTS\]/);
    // nothing of the refused install was written
    await expect(fs.access(path.join(perl5, 'PVE/Storage/Custom/AcmePlugin.pm'))).rejects.toThrow();
  });
});

describe('the generated storage plugin under perl -T (jsonstore fixture)', () => {
  it('the stand-in driver refuses to run without taint mode, as PVE never does', () => {
    const r = spawnSync(requireTool('perl', 'perl'), ['-I', path.join(ROOT, 'test/pve'), path.join(ROOT, 'test/pve/storage-driver.pl')], { input: '{}\n', encoding: 'utf8' });
    expect(r.status).not.toBe(0);
    // perl itself refuses a -T script run without -T; the driver refuses anything but -T
    expect(r.stderr).toMatch(/not in taint mode|"-T" is on the #! line, it must also be used on the command line/);
  });

  it('loads through upstream\'s loader check; api, plugindata, properties and options come from the schema', async () => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture();
    const d = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings: f.settings, ops: [{ op: 'schema' }, { op: 'activate' }] });
    expect(d.loaded).toEqual({ class: 'PVE::Storage::Custom::JsonstorePlugin', warnings: [], error: null });
    const s = d.ops[0]!.result;
    // within the loader's range (APIVER-APIAGE..APIVER = 9..15) and what backup providers need (11)
    expect(s.api).toBe(15);
    expect(s.type).toBe('jsonstore');
    expect(s.has_feature).toBe(1);
    expect(s.plugindata).toEqual({ content: [{ backup: 1, none: 1 }, { backup: 1 }], features: { 'backup-provider': 1 }, 'sensitive-properties': { 'jsonstore-token': 1 } });
    expect(s.sensitive).toEqual(['jsonstore-token']);
    expect(s.properties).toEqual({
      'jsonstore-file': { type: 'string', description: 'The JSON file holding the backups.' },
      'jsonstore-token': { type: 'string', description: 'A secret the provider needs.' },
      'jsonstore-level': { type: 'integer', description: 'A number.', minimum: 1, maximum: 9, default: 3 },
    });
    expect(s.options).toEqual({
      content: { optional: 1 },
      nodes: { optional: 1 },
      disable: { optional: 1 },
      'prune-backups': { optional: 1 },
      'max-protected-backups': { optional: 1 },
      'jsonstore-file': { fixed: 1 },
      'jsonstore-token': { optional: 1 },
      'jsonstore-level': { optional: 1 },
    });
    // the base activate_storage dies without path; the plugin's needs none and starts no host
    expect(d.ops[1]).toMatchObject({ result: 1 });
    expect(await f.spawns()).toEqual([]);
  });

  it('two vendors side by side: each has its own provider class, so one built with another bridge version breaks only itself', async () => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const other = cli(['pve-plugin', 'generate', '--type', 'vendortwo', '--provider', path.join(ROOT, 'test/pve/providers/directory.mjs'), '--dest', perl5]);
    expect(other.status, other.stderr).toBe(0);
    // vendor two's copy of the bridge speaks another protocol (another package version)
    const twoClass = path.join(perl5, 'PVE/BackupProvider/Plugin/Vendortwo.pm');
    await fs.writeFile(twoClass, (await fs.readFile(twoClass, 'utf8')).replace('use constant PROTOCOL_VERSION => 1;', 'use constant PROTOCOL_VERSION => 99;'));
    const f = await fixture();
    const one = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings: f.settings, ops: [{ op: 'provider_name' }] });
    expect(one.loaded.warnings).toEqual([]);
    expect(one.ops[0]!.result).toEqual({ class: 'PVE::BackupProvider::Plugin::Jsonstore', name: 'jsonstore' });
    const store = path.join(await tempDir(), 'store');
    const two = drive({ perl5, type: 'vendortwo', storeid: 'two1', scfg: { path: store }, settings: f.settings, ops: [{ op: 'provider_name' }] });
    expect(two.loaded.class).toBe('PVE::Storage::Custom::VendortwoPlugin');
    expect(two.ops[0]!.error).toMatch(/speaks another protocol version than 99/);
  });

  it.each([
    [11, 11, []],
    [13, 13, []],
    [16, 15, ['Plugin "PVE::Storage::Custom::JsonstorePlugin" is implementing an older storage API, an upgrade is recommended\n']],
  ] as const)('api() follows pve-storage\'s APIVER %i within 11..15 (no warning in every task log), else the newest tested (%i)', async (apiver, api, warnings) => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture();
    const d = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings: f.settings, ops: [{ op: 'schema' }] }, apiver);
    expect(d.loaded.warnings).toEqual(warnings);
    expect(d.ops[0]!.result.api).toBe(api);
  });

  it('is refused by a pve-storage whose APIAGE no longer covers the newest tested api (loader: too old)', async () => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture();
    const d = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings: f.settings, ops: [] }, 22);
    expect(d.loaded.class).toBeNull();
    expect(d.loaded.warnings.join('')).toMatch(/Error loading storage plugin "PVE::Storage::Custom::JsonstorePlugin": API version too old, please update the plugin \(15 < 16\)/);
  });

  it('parse_volname: backup/<archive-name> with = / :, the vmid from archiveNameVmid, no host; a bad name dies', async () => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture();
    const names = ['backup/guest=101/2026-11-01T10:00:00Z', 'backup/guest=7/a+b.c_d-e', 'backup/other:1/x'];
    // a '.', '..' or empty segment: a provider may make paths of names, and Proxmox VE passes a
    // user's name here with only VM.Backup on the vmid it yields checked (check_volume_access)
    const bad = ['backup/', 'backup/a b', 'images/guest=1/x', 'backup/guest=1/x\n', 'guest=1/x', 'backup/a;b', 'backup/guest=101/../../../etc/passwd', 'backup/guest=101/./x', 'backup//etc/passwd', 'backup/guest=101/x/', 'backup/..'];
    const d = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings: f.settings, ops: [...names, ...bad].map((volname) => ({ op: 'parse', volname })) });
    expect(d.ops.slice(0, 3).map((o) => o.result)).toEqual([
      ['backup', 'guest=101/2026-11-01T10:00:00Z', '101', null, null, null, 'backup-provider'],
      ['backup', 'guest=7/a+b.c_d-e', '7', null, null, null, 'backup-provider'],
      // no vmid in the name: undef, as PBS answers (only Datastore.Allocate may touch it then)
      ['backup', 'other:1/x', null, null, null, null, 'backup-provider'],
    ]);
    for (const o of d.ops.slice(3)) expect(o.error).toMatch(/^unable to parse backup volume name/);
    expect(await f.spawns()).toEqual([]);
  });

  it('list_volumes: pve-storage items with subtype, a vmid filter, parse_volname per item, untainted; [] without a host for other content', async () => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture();
    const d = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings: f.settings, ops: [{ op: 'list' }, { op: 'list', vmid: 102 }, { op: 'list', content: ['images', 'iso'] }, { op: 'size', volname: 'backup/guest=101/2026-11-02T10:00:00Z' }, { op: 'path', volname: 'backup/guest=101/2026-11-02T10:00:00Z' }] });
    const [all, one, none, size, p] = d.ops;
    expect(all!.result.items).toEqual([
      { volid: 'js1:backup/guest=101/2026-11-01T10:00:00Z', vmid: 101, format: 'backup-provider', size: 1000, ctime: T0, content: 'backup', subtype: 'qemu' },
      { volid: 'js1:backup/guest=101/2026-11-02T10:00:00Z', vmid: 101, format: 'backup-provider', size: 2000, ctime: T0 + DAY, content: 'backup', subtype: 'qemu', notes: 'second' },
      { volid: 'js1:backup/guest=101/2026-11-03T10:00:00Z', vmid: 101, format: 'backup-provider', size: 3000, ctime: T0 + 2 * DAY, content: 'backup', subtype: 'qemu' },
      { volid: 'js1:backup/guest=102/2026-11-02T10:00:00Z', vmid: 102, format: 'backup-provider', size: 4000, ctime: T0 + DAY, content: 'backup', subtype: 'lxc' },
    ]);
    expect(all!.result.parsed.map((x: unknown[]) => x[2])).toEqual(['101', '101', '101', '102']);
    expect(all!.result.tainted).toBe(0);
    expect(one!.result.items.map((i: { volid: string }) => i.volid)).toEqual(['js1:backup/guest=102/2026-11-02T10:00:00Z']);
    expect(none!.result.items).toEqual([]);
    expect(size!.result).toEqual([2000, 'backup-provider', 2000, null]);
    expect(p!.result).toEqual(['jsonstore://js1/backup/guest=101/2026-11-02T10:00:00Z', '101', 'backup']);
    // one host per call that needs the provider (list, list, size), none for other content or path
    expect((await f.spawns()).length).toBe(3);
    for (const pid of await f.spawns()) expect(gone(pid)).toBe(true);
  });

  it('status is cached: one host per TTL across processes, a second call within it starts none; the cache is 0600 in 0700', async () => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture();
    const settings = { ...f.settings, STATUS_TTL: 2 };
    const a = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings, ops: [{ op: 'status' }, { op: 'status' }] });
    expect(a.ops.map((o) => o.result)).toEqual([
      { status: [100 * MiB, 60 * MiB, 40 * MiB, 1], tainted: 0 },
      { status: [100 * MiB, 60 * MiB, 40 * MiB, 1], tainted: 0 },
    ]);
    expect(a.ops[1]!.ms).toBeLessThan(50);
    expect((await f.spawns()).length).toBe(1);
    // another process (pvedaemon beside pvestatd) within the TTL: still none
    drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings, ops: [{ op: 'status' }] });
    expect((await f.spawns()).length).toBe(1);
    const state = path.join(f.dir, 'state');
    expect(((await fs.stat(state)).mode & 0o777).toString(8)).toBe('700');
    expect(((await fs.stat(path.join(state, 'js1.status'))).mode & 0o777).toString(8)).toBe('600');
    // past the TTL: refreshed, with what the provider says now
    const data = await f.read();
    await fs.writeFile(f.file, JSON.stringify({ ...data, status: { total: 100 * MiB, free: 10 * MiB, used: 90 * MiB } }));
    await new Promise((r) => setTimeout(r, 2100));
    const c = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings, ops: [{ op: 'status' }] });
    expect(c.ops[0]!.result.status).toEqual([100 * MiB, 10 * MiB, 90 * MiB, 1]);
    expect((await f.spawns()).length).toBe(2);
  });

  it('status of a failing provider is inactive with a warning; of a hanging one inactive within the bound, its host killed; neither retried within the TTL', async () => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const failing = await fixture({ fail: { status: 'the vendor cloud is down' } });
    const a = drive({ perl5, type: 'jsonstore', scfg: failing.scfg, settings: failing.settings, ops: [{ op: 'status' }, { op: 'status' }] });
    expect(a.ops[0]!.result.status).toEqual([0, 0, 0, 0]);
    expect(a.ops[0]!.warnings.join('')).toMatch(/jsonstore storage 'js1': status failed - the vendor cloud is down \[ERR_VENDOR_STORE\]/);
    expect(a.ops[1]!.result.status).toEqual([0, 0, 0, 0]);
    expect((await failing.spawns()).length).toBe(1);

    const hanging = await fixture({ hang: ['status'] });
    const b = drive({ perl5, type: 'jsonstore', scfg: hanging.scfg, settings: { ...hanging.settings, STATUS_TIMEOUT: 1 }, ops: [{ op: 'status' }, { op: 'status' }] });
    expect(b.ops[0]!.result.status).toEqual([0, 0, 0, 0]);
    expect(b.ops[0]!.warnings.join('')).toMatch(/did not answer status within 1 s/);
    // the bound plus the kill, not the 5 + 2 s of an ordinary shutdown
    expect(b.ops[0]!.ms).toBeLessThan(2500);
    expect(b.ops[1]!.ms).toBeLessThan(50);
    const [pid] = await hanging.spawns();
    expect(gone(pid!)).toBe(true);

    // stuck in its constructor: hello never answers; the same bound, then killed
    const blocked = await fixture({ blockConstruct: true });
    const e = drive({ perl5, type: 'jsonstore', scfg: blocked.scfg, settings: { ...blocked.settings, STATUS_TIMEOUT: 1 }, ops: [{ op: 'status' }] });
    expect(e.ops[0]!.result.status).toEqual([0, 0, 0, 0]);
    expect(e.ops[0]!.warnings.join('')).toMatch(/did not start: backup provider host did not answer hello within 1 s/);
    expect(e.ops[0]!.ms).toBeLessThan(3000);
    expect(gone((await blocked.spawns())[0]!)).toBe(true);

    const lacking = await fixture({ without: ['status'] });
    const c = drive({ perl5, type: 'jsonstore', scfg: lacking.scfg, settings: lacking.settings, ops: [{ op: 'status' }] });
    expect(c.ops[0]!.result.status).toEqual([0, 0, 0, 0]);
    expect(c.ops[0]!.warnings.join('')).toMatch(/method 'storage\.status' is not implemented \[ERR_NOT_IMPLEMENTED\]/);
  });

  it('notes and protected round trip through PVE::Storage::update_volume_attribute, with upstream\'s max-protected-backups count', async () => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture();
    const v1 = 'backup/guest=101/2026-11-01T10:00:00Z';
    const v2 = 'backup/guest=101/2026-11-02T10:00:00Z';
    const v3 = 'backup/guest=102/2026-11-02T10:00:00Z';
    const d = drive({
      perl5,
      type: 'jsonstore',
      scfg: { ...f.scfg, 'max-protected-backups': 1 },
      settings: f.settings,
      ops: [
        { op: 'set', volid: `js1:${v1}`, attr: 'notes', value: 'line 1\nline 2 ü' },
        { op: 'get', volname: v1, attr: 'notes' },
        { op: 'get', volname: v1, attr: 'protected' },
        { op: 'set', volid: `js1:${v1}`, attr: 'protected', value: 1 },
        { op: 'get', volname: v1, attr: 'protected' },
        { op: 'set', volid: `js1:${v2}`, attr: 'protected', value: 1 },
        { op: 'set', volid: `js1:${v3}`, attr: 'protected', value: 1 },
        { op: 'set', volid: `js1:${v1}`, attr: 'protected', value: 0 },
        { op: 'get', volname: v1, attr: 'protected' },
        { op: 'get', volname: v1, attr: 'size' },
        { op: 'set', volid: `js1:${v1}`, attr: 'size', value: 1 },
      ],
    });
    const r = d.ops.map((o) => o.error ?? o.result);
    expect(r[0]).toBe(1);
    expect(r[1]).toBe('line 1\nline 2 ü');
    expect(r[2]).toBe(0);
    expect(r[4]).toBe(1);
    // a second protected backup of VM 101 is refused by the count over list_volumes, same subtype
    expect(r[5]).toBe("The number of protected backups per guest is limited to 1 on storage 'js1'\n");
    expect(r[6]).toBe(1); // a container's backup counts apart
    expect(r[8]).toBe(0);
    expect(r[9]).toBeNull(); // unknown attributes: undef, as the base
    expect(r[10]).toBe("attribute 'size' is not supported for storage type 'jsonstore'\n");
    const data = await f.read();
    expect(data.backups.find((b) => b.volname === v1)).toMatchObject({ notes: 'line 1\nline 2 ü', protected: false });
    expect(data.backups.find((b) => b.volname === v3)).toMatchObject({ protected: true });
  });

  it('prune_backups: a dry run marks (keep-last, protected apart) and removes nothing; the real run removes and logs', async () => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture();
    const data = await f.read();
    data.backups[0]!.protected = true;
    await fs.writeFile(f.file, JSON.stringify(data));
    const ops = [
      { op: 'prune', keep: { 'keep-last': '1' }, vmid: 101, type: 'qemu', dryrun: 1 },
      { op: 'list' },
      { op: 'prune', keep: { 'keep-last': 1 }, vmid: 101, type: 'qemu', dryrun: 0 },
      { op: 'list' },
    ];
    const d = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings: f.settings, ops });
    const marks = [
      { volid: 'js1:backup/guest=101/2026-11-01T10:00:00Z', type: 'qemu', ctime: T0, mark: 'protected', vmid: 101 },
      { volid: 'js1:backup/guest=101/2026-11-02T10:00:00Z', type: 'qemu', ctime: T0 + DAY, mark: 'remove', vmid: 101 },
      { volid: 'js1:backup/guest=101/2026-11-03T10:00:00Z', type: 'qemu', ctime: T0 + 2 * DAY, mark: 'keep', vmid: 101 },
    ];
    expect(d.ops[0]!.result).toEqual({ list: marks, log: [] });
    expect(d.ops[1]!.result.items).toHaveLength(4);
    expect(d.ops[2]!.result).toEqual({ list: marks, log: ["info: removing backup 'js1:backup/guest=101/2026-11-02T10:00:00Z'"] });
    expect(d.ops[3]!.result.items.map((i: { volid: string }) => i.volid)).toEqual([
      'js1:backup/guest=101/2026-11-01T10:00:00Z',
      'js1:backup/guest=101/2026-11-03T10:00:00Z',
      'js1:backup/guest=102/2026-11-02T10:00:00Z',
    ]);
    // without vmid and type (pvesm prune-backups on the whole storage): every guest, grouped
    const all = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings: f.settings, ops: [{ op: 'prune', keep: { 'keep-last': 1 }, dryrun: 1 }] });
    expect(all.ops[0]!.result.list.map((e: { mark: string }) => e.mark)).toEqual(['protected', 'keep', 'keep']);
  });

  it('skips a backup the provider lists malformed, with a warning: listing and prune go on for the others', async () => {
    // one bad entry failed the whole list_volumes (the GUI's Backups tab) and prune_backups of its
    // guest, which vzdump runs after every backup: the guest's backups failed, and were removed
    // (backup_cleanup(..., 0)), every time; upstream's own listings skip what they cannot parse
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture();
    const data = await f.read();
    data.backups.push({ volname: 'backup/guest=101/bad name', vmid: 101, vmtype: 'qemu', ctime: T0 + 3 * DAY, size: 1 });
    await fs.writeFile(f.file, JSON.stringify(data));
    const d = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings: f.settings, ops: [{ op: 'list' }, { op: 'prune', keep: { 'keep-last': 1 }, vmid: 101, type: 'qemu', dryrun: 0 }] });
    expect(d.ops[0]!.error).toBeUndefined();
    expect(d.ops[0]!.result.items).toHaveLength(4);
    expect(d.ops[0]!.warnings.join('')).toMatch(/skipped a backup it lists without a valid volume name.*bad name/);
    expect(d.ops[1]!.error).toBeUndefined();
    expect(d.ops[1]!.result.log).toEqual([
      expect.stringMatching(/^warn: .*skipped a backup it lists without a valid volume name.*bad name/),
      "info: removing backup 'js1:backup/guest=101/2026-11-02T10:00:00Z'",
      "info: removing backup 'js1:backup/guest=101/2026-11-01T10:00:00Z'",
    ]);
    // the newest listed backup is kept; the one it could not take is not touched
    expect((await f.read()).backups.map((b) => b.volname)).toEqual(['backup/guest=101/2026-11-03T10:00:00Z', 'backup/guest=102/2026-11-02T10:00:00Z', 'backup/guest=101/bad name']);
  });

  it.each(['marks', 'removed'] as const)("prune_backups: a provider's own prune decides (answering %s), once per guest", async (answer) => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture({ ownPrune: answer });
    const d = drive({
      perl5,
      type: 'jsonstore',
      scfg: f.scfg,
      settings: f.settings,
      ops: [
        // keep-last 3 would keep all three under Proxmox VE's rules: the provider's rule wins
        { op: 'prune', keep: { 'keep-last': 3 }, vmid: 101, type: 'qemu', dryrun: 1 },
        { op: 'prune', keep: { 'keep-last': 3 }, dryrun: 0 },
      ],
    });
    const expected = [
      { volid: 'js1:backup/guest=101/2026-11-01T10:00:00Z', type: 'qemu', ctime: T0, mark: 'remove', vmid: 101 },
      { volid: 'js1:backup/guest=101/2026-11-02T10:00:00Z', type: 'qemu', ctime: T0 + DAY, mark: 'remove', vmid: 101 },
      { volid: 'js1:backup/guest=101/2026-11-03T10:00:00Z', type: 'qemu', ctime: T0 + 2 * DAY, mark: 'keep', vmid: 101 },
    ];
    expect(d.ops[0]!.result.list).toEqual(expected);
    expect(d.ops[1]!.result.list).toEqual([...expected, { volid: 'js1:backup/guest=102/2026-11-02T10:00:00Z', type: 'lxc', ctime: T0 + DAY, mark: 'keep', vmid: 102 }]);
    expect(d.ops[1]!.result.log).toHaveLength(2);
    expect((await f.read()).backups.map((b) => b.volname)).toEqual(['backup/guest=101/2026-11-03T10:00:00Z', 'backup/guest=102/2026-11-02T10:00:00Z']);
  });

  it("free_image deletes a backup; a protected one is refused in the caller's task, not only in the delete's worker", async () => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture();
    const data = await f.read();
    data.backups[0]!.protected = true;
    await fs.writeFile(f.file, JSON.stringify(data));
    const d = drive({
      perl5,
      type: 'jsonstore',
      scfg: f.scfg,
      settings: f.settings,
      ops: [
        { op: 'free', volname: 'backup/guest=101/2026-11-02T10:00:00Z' },
        { op: 'free', volname: 'backup/guest=101/2026-11-01T10:00:00Z' },
        { op: 'free', volname: 'backup/bad name' },
      ],
    });
    expect(d.ops[0]!.result).toBe('worker');
    expect(d.ops[1]!.error).toBe("backup 'backup/guest=101/2026-11-01T10:00:00Z' is protected: unprotect it first\n");
    expect(d.ops[2]!.error).toMatch(/^unable to parse backup volume name/);
    expect((await f.read()).backups.map((b) => b.volname)).toEqual([
      'backup/guest=101/2026-11-01T10:00:00Z',
      'backup/guest=101/2026-11-03T10:00:00Z',
      'backup/guest=102/2026-11-02T10:00:00Z',
    ]);
  });

  it('free_image deletes in a worker of its own, with no time bound: a delete may take longer than a storage call may', async () => {
    // the DirectoryProvider merges a backup others build on into its child first, minutes for a
    // large disk; vdisk_free runs a code ref free_image returns as a worker task (pve-storage
    // Storage.pm vdisk_free), outside the storage lock cfs_lock_storage bounds to 60 s
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture({ slow: { removeBackup: 2500 } });
    const d = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings: { ...f.settings, CALL_TIMEOUT: 1 }, ops: [{ op: 'free', volname: 'backup/guest=101/2026-11-02T10:00:00Z' }] });
    expect(d.ops[0]!.error).toBeUndefined();
    expect(d.ops[0]!.result).toBe('worker');
    expect((await f.read()).backups.map((b) => b.volname)).not.toContain('backup/guest=101/2026-11-02T10:00:00Z');
  });

  it('a hook that throws makes the Perl call die with its message and code; a missing hook names itself', async () => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture({ fail: { listBackups: 'listing is broken', setNotes: 'notes are read-only' }, without: ['getNotes'] });
    const d = drive({
      perl5,
      type: 'jsonstore',
      scfg: f.scfg,
      settings: f.settings,
      ops: [
        { op: 'list' },
        { op: 'set', volid: 'js1:backup/guest=101/2026-11-01T10:00:00Z', attr: 'notes', value: 'x' },
        { op: 'get', volname: 'backup/guest=101/2026-11-01T10:00:00Z', attr: 'notes' },
        { op: 'prune', keep: { 'keep-last': 1 }, vmid: 101, type: 'qemu', dryrun: 1 },
      ],
    });
    expect(d.ops[0]!.error).toBe('listing is broken [ERR_VENDOR_STORE]\n');
    expect(d.ops[1]!.error).toBe('notes are read-only [ERR_VENDOR_STORE]\n');
    expect(d.ops[2]!.error).toBe("method 'storage.getNotes' is not implemented [ERR_NOT_IMPLEMENTED]\n");
    expect(d.ops[3]!.error).toBe('listing is broken [ERR_VENDOR_STORE]\n');
    for (const pid of await f.spawns()) expect(gone(pid)).toBe(true);
  });

  it('sensitive properties: on_add_hook keeps them 0600 in the priv folder, the provider gets them, update and delete remove them', async () => {
    const perl5 = await generate('jsonstore', JSONSTORE);
    const f = await fixture();
    const priv = path.join(f.dir, 'priv', 'js1.jsonstore.json');
    const a = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings: f.settings, ops: [{ op: 'add', sensitive: { 'jsonstore-token': 's3cret' } }, { op: 'provider_name' }] });
    expect(a.ops[0]!.result).toBe(1);
    expect(((await fs.stat(priv)).mode & 0o777).toString(8)).toBe('600');
    expect(((await fs.stat(path.dirname(priv))).mode & 0o777).toString(8)).toBe('700');
    expect(JSON.parse(await fs.readFile(priv, 'utf8'))).toEqual({ 'jsonstore-token': 's3cret' });
    expect(a.ops[1]!.result).toEqual({ class: 'PVE::BackupProvider::Plugin::Jsonstore', name: 'jsonstore with token s3cret' });
    const b = drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings: f.settings, ops: [{ op: 'update', sensitive: { 'jsonstore-token': 'n3w' } }, { op: 'provider_name' }, { op: 'update', sensitive: { 'jsonstore-token': null } }, { op: 'provider_name' }] });
    expect(b.ops[1]!.result.name).toBe('jsonstore with token n3w');
    expect(b.ops[3]!.result.name).toBe('jsonstore');
    await expect(fs.access(priv)).rejects.toThrow();
    drive({ perl5, type: 'jsonstore', scfg: f.scfg, settings: f.settings, ops: [{ op: 'add', sensitive: { 'jsonstore-token': 'x' } }, { op: 'delete' }] });
    await expect(fs.access(priv)).rejects.toThrow();
  });
});

// These assertions depend on the DirectoryProvider's storage hooks (status, listBackups, notes,
// protected, removeBackup, prune), which helper D implements in parallel against
// lib/provider/api.ts; the plugin side is the same as for the fixture above.
describe('the generated storage plugin over the DirectoryProvider (its storage hooks)', () => {
  it('lists a real VM backup with subtype qemu, reports status, sets notes and protected, prunes and frees', async () => {
    const disk = await startDisk(4 * MiB);
    const store = path.join(await tempDir(), 'store');
    const scratch = await tempDir();
    const provider = new DirectoryProvider({ storeid: 'dir1', scfg: { path: store }, log: () => {} });
    const volnames: string[] = [];
    for (let i = 0; i < 2; i++) {
      await disk.write(0x60 + i, i * MiB, 64 * 1024);
      const r = await runBackupJob({ provider, storeid: 'dir1', guests: [vmGuest(disk, 100)], tmpdir: scratch });
      expect(r.guests[0]!.error).toBeUndefined();
      volnames.push(r.guests[0]!.volname!);
      await new Promise((res) => setTimeout(res, 1100)); // distinct ctimes
    }
    const perl5 = await generate('pbpdir', path.join(ROOT, 'test/pve/providers/directory.mjs'));
    const line = cli(['pve-plugin', 'generate', '--type', 'pbpdir', '--provider', path.join(ROOT, 'test/pve/providers/directory.mjs'), '--dest', perl5, '--json']);
    expect(JSON.parse(line.stdout).pvesmAdd).toBe('pvesm add pbpdir <storeid> --path <path>');
    const state = await tempDir();
    const d = drive({
      perl5,
      type: 'pbpdir',
      storeid: 'dir1',
      scfg: { path: store },
      settings: { STATE_DIR: path.join(state, 'state'), PRIV_DIR: path.join(state, 'priv'), STATUS_TIMEOUT: 10, CALL_TIMEOUT: 60 },
      ops: [
        { op: 'schema' },
        { op: 'list' },
        { op: 'status' },
        { op: 'set', volid: `dir1:${volnames[0]}`, attr: 'notes', value: 'first' },
        { op: 'get', volname: volnames[0], attr: 'notes' },
        { op: 'set', volid: `dir1:${volnames[1]}`, attr: 'protected', value: 1 },
        { op: 'get', volname: volnames[1], attr: 'protected' },
        { op: 'prune', keep: { 'keep-last': 1 }, vmid: 100, type: 'qemu', dryrun: 1 },
        { op: 'free', volname: volnames[1] },
        { op: 'set', volid: `dir1:${volnames[1]}`, attr: 'protected', value: 0 },
        { op: 'list' },
      ],
    });
    const [schema, list, status, , notes, , prot, prune, freeProtected, , after] = d.ops;
    expect(d.loaded.warnings).toEqual([]);
    expect(schema!.result.options.path).toEqual({ fixed: 1 });
    expect(schema!.result.properties).toEqual({});
    expect(list!.error).toBeUndefined();
    expect(list!.result.items.map((i: Record<string, unknown>) => [i.volid, i.vmid, i.subtype, i.content])).toEqual(volnames.map((v) => [`dir1:${v}`, 100, 'qemu', 'backup']));
    expect(list!.result.parsed.map((p: unknown[]) => p[2])).toEqual(['100', '100']);
    expect(status!.result.status[3]).toBe(1);
    expect(status!.result.status[0]).toBeGreaterThan(0);
    expect(notes!.result).toBe('first');
    expect(prot!.result).toBe(1);
    expect(prune!.error).toBeUndefined();
    expect(prune!.result.list.map((e: { volid: string; mark: string }) => [e.volid, e.mark])).toContainEqual([`dir1:${volnames[1]}`, 'protected']);
    expect(freeProtected!.error).toMatch(/protected/);
    expect(after!.result.items).toHaveLength(2);
  }, 120_000);
});

type Reply = { id?: number; result?: unknown; error?: { message: string; code: string } };

/** A provider host on in-memory streams: `call` sends one request and returns its reply. */
function memoryHost(provider: object): { call: (method: string, ...params: unknown[]) => Promise<Reply>; end: () => Promise<void> } {
  const input = new PassThrough();
  const output = new PassThrough();
  const served = new ProviderHost({ factory: (() => provider) as never, input, output }).serve();
  const lines = createInterface({ input: output })[Symbol.asyncIterator]();
  let id = 0;
  return {
    call: async (method, ...params) => {
      const my = ++id;
      input.write(`${JSON.stringify({ id: my, method, params })}\n`);
      for (;;) {
        const r = JSON.parse((await lines.next()).value as string) as Reply;
        if (r.id === my) return r;
      }
    },
    end: async () => {
      input.end();
      await served;
    },
  };
}

describe('the host\'s storage calls (lib/bridge/storage-calls.ts) on in-memory streams', () => {
  it('needs hello first, names a missing hook, and checks what Perl sends and what the provider lists', async () => {
    const listed: unknown[] = [{ volname: 'backup/100/a', vmid: 100, vmtype: 'qemu', ctime: 1, size: 2 }];
    const h = memoryHost({ apiVersion: 2, providerName: () => 'p', storage: { listBackups: () => listed } });
    expect((await h.call('status')).error).toMatchObject({ code: 'ERR_BRIDGE', message: 'status: called before hello' });
    expect((await h.call('hello', { storeid: 's1', scfg: {} })).error).toBeUndefined();
    expect((await h.call('status')).error).toEqual({ code: 'ERR_NOT_IMPLEMENTED', message: "method 'storage.status' is not implemented" });
    expect((await h.call('prune_backups', { 'keep-last': 1 }, 100, 'qemu', 1)).error).toEqual({
      code: 'ERR_NOT_IMPLEMENTED',
      message: "method 'storage.prune (or storage.listBackups and storage.removeBackup)' is not implemented",
    });
    expect((await h.call('list_volumes', '100', ['backup'])).result).toEqual([
      { volid: 's1:backup/100/a', vmid: 100, format: 'backup-provider', size: 2, ctime: 1, content: 'backup', subtype: 'qemu' },
    ]);
    expect((await h.call('list_volumes', null, ['iso'])).result).toEqual([]);
    expect((await h.call('get_volume_attribute', '../etc/passwd', 'notes')).error).toMatchObject({ code: 'ERR_BRIDGE' });
    expect((await h.call('get_volume_attribute', 'backup/100/../../etc', 'notes')).error).toMatchObject({ code: 'ERR_BRIDGE', message: expect.stringContaining('not a backup volume name') });
    expect((await h.call('get_volume_attribute', 'backup/100/a', 'size')).result).toBeNull();
    listed.push({ volname: 'not-a-backup', vmid: 1, vmtype: 'qemu', ctime: 1, size: 1 });
    expect((await h.call('list_volumes', null, ['backup'])).result).toHaveLength(1);
    await h.end();
  });

  it('reads Perl\'s keep hash (dashed keys, string counts, keep-all) and refuses an unknown option', () => {
    expect(keepFromPerl({ 'keep-last': '3', 'keep-daily': 2, 'keep-weekly': '0', 'keep-all': '0' })).toEqual({ keepLast: 3, keepDaily: 2, keepWeekly: 0, keepAll: false });
    expect(keepFromPerl({ 'keep-all': 1 })).toEqual({ keepAll: true });
    expect(keepFromPerl(null)).toEqual({});
    expect(() => keepFromPerl({ 'keep-forever': 1 })).toThrow(/unknown keep option 'keep-forever'/);
    expect(() => keepFromPerl({ 'keep-last': '-1' })).toThrow(/keep-last is not a count/);
  });
});

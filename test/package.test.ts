import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { tempDir } from './helpers/nbd-servers.js';

const ROOT = join(import.meta.dirname, '..');

describe('npm pack', () => {
  const { dir, remove } = tempDir('pbp-pack-');
  afterAll(remove);

  it('gives a tarball that installs into a scratch project and works there', () => {
    const packed = JSON.parse(execFileSync('npm', ['pack', '--json', '--pack-destination', dir], { cwd: ROOT, encoding: 'utf8' }));
    const files: string[] = packed[0].files.map((f: { path: string }) => f.path);
    expect(files).toContain('native/index.cjs');
    expect(files.some((f) => f.endsWith('.node'))).toBe(true);
    expect(files).toContain('dist/index.js');
    expect(files).toContain('perl/PVE/BackupProvider/Plugin/NodeBridge.pm'); // the Perl half of the bridge
    expect(files).toContain('perl/templates/StoragePlugin.pm.in'); // what pve-plugin generate fills in
    expect(files.some((f) => f.startsWith('test/') || f.startsWith('native/src/'))).toBe(false);
    // the example provider ships, to be run as it is or copied (examples/raw-file-provider/README.md)
    expect(files).toContain('examples/raw-file-provider/provider.js');
    expect(files).toContain('examples/raw-file-provider/README.md');

    const project = join(dir, 'project');
    execFileSync('mkdir', ['-p', project]);
    writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'scratch', version: '1.0.0', type: 'module' }));
    execFileSync('npm', ['install', '--no-audit', '--no-fund', join(dir, packed[0].filename)], { cwd: project, stdio: 'pipe' });
    const out = execFileSync(
      process.execPath,
      ['--input-type=module', '-e', "import * as p from 'pve-backup-provider'; console.log(typeof p.copyExtents, typeof p.NbdClient.connect)"],
      { cwd: project, encoding: 'utf8' },
    );
    expect(out.trim()).toBe('function function');
    // installed, the example loads and finds the package by its name (self-reference)
    const example = join(project, 'node_modules', 'pve-backup-provider', 'examples', 'raw-file-provider', 'provider.js');
    const loaded = execFileSync(process.execPath, ['--input-type=module', '-e', `const m = await import(${JSON.stringify(example)}); console.log(typeof m.default, Object.keys(m.pveStorage.properties).join())`], { cwd: project, encoding: 'utf8' });
    expect(loaded.trim()).toBe('function rawfile-incremental');
    const help = execFileSync(join(project, 'node_modules', '.bin', 'pve-backup-provider'), ['--help'], { encoding: 'utf8' });
    expect(help).toMatch(/Usage: pve-backup-provider/);
    // pve-plugin generate finds its template and main.js in the installed package
    const installed = join(project, 'node_modules', 'pve-backup-provider');
    const gen = JSON.parse(
      execFileSync(join(project, 'node_modules', '.bin', 'pve-backup-provider'), ['pve-plugin', 'generate', '--type', 'acme', '--provider', join(ROOT, 'test/pve/providers/jsonstore.mjs'), '--dest', join(dir, 'perl5'), '--json'], { encoding: 'utf8' }),
    );
    expect(gen.cli).toBe(join(installed, 'dist', 'cli', 'main.js'));
    expect(gen.files).toEqual([join(dir, 'perl5/PVE/Storage/Custom/AcmePlugin.pm'), join(dir, 'perl5/PVE/BackupProvider/Plugin/Acme.pm')]);
  }, 180_000);
});

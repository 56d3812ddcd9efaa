import { execFileSync, spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { tempDir } from './helpers/nbd-servers.js';

const ROOT = join(import.meta.dirname, '..');

describe('npm pack', () => {
  const { dir, remove } = tempDir('pbp-pack-');
  afterAll(remove);

  it('gives a tarball that installs into a scratch project and works there', async () => {
    const packed = JSON.parse(execFileSync('npm', ['pack', '--json', '--pack-destination', dir], { cwd: ROOT, encoding: 'utf8' }));
    const files: string[] = packed[0].files.map((f: { path: string }) => f.path);
    expect(files).toContain('native/index.cjs');
    expect(files.some((f) => f.endsWith('.node'))).toBe(true);
    expect(files).toContain('dist/index.js');
    // the code ships once, in the bundle with its two entries; tsc's modules stay out (types aside)
    expect(files.filter((f) => f.startsWith('dist/') && !f.endsWith('.d.ts')).sort()).toEqual(['dist/bundle.js', 'dist/bundle.js.map', 'dist/cli/main.js', 'dist/index.js']);
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
    const bin = join(project, 'node_modules', '.bin', 'pve-backup-provider');
    const help = execFileSync(bin, ['--help'], { encoding: 'utf8' });
    expect(help).toMatch(/Usage: pve-backup-provider/);
    // the CLI finds the package's package.json from inside the bundle (lib/package-root.ts)
    const { version } = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string };
    expect(execFileSync(bin, ['--version'], { encoding: 'utf8' }).trim()).toBe(version);
    // pve-plugin generate finds its template and main.js in the installed package
    const installed = join(project, 'node_modules', 'pve-backup-provider');
    const gen = JSON.parse(
      execFileSync(join(project, 'node_modules', '.bin', 'pve-backup-provider'), ['pve-plugin', 'generate', '--type', 'acme', '--provider', join(ROOT, 'test/pve/providers/jsonstore.mjs'), '--dest', join(dir, 'perl5'), '--json'], { encoding: 'utf8' }),
    );
    expect(gen.cli).toBe(join(installed, 'dist', 'cli', 'main.js'));
    expect(gen.files).toEqual([join(dir, 'perl5/PVE/Storage/Custom/AcmePlugin.pm'), join(dir, 'perl5/PVE/BackupProvider/Plugin/Acme.pm')]);

    // the installed host (the CLI's entry) and a provider module importing the package by name
    // share one copy of its classes: the reason of a cancelled call is the module's CancelledError
    const vendor = join(project, 'vendor.mjs');
    writeFileSync(
      vendor,
      `import { CancelledError } from 'pve-backup-provider';
export default (context) => ({
  apiVersion: 2,
  backupInit: async (vmid) => ({ archiveName: vmid + '/x' }),
  backupVm: async (vmid, config, volumes, info) => {
    context.log('info', 'started');
    await new Promise((resolve) => info.signal.addEventListener('abort', resolve, { once: true }));
    throw new Error("the package's CancelledError: " + (info.signal.reason instanceof CancelledError));
  },
});
`,
    );
    const host = spawn(bin, ['provider-host', '--provider', vendor], { stdio: ['pipe', 'pipe', 'inherit'] });
    const requests = [
      { id: 1, method: 'hello', params: [{ storeid: 's', scfg: {} }] },
      { id: 2, method: 'backup_init', params: [100, 'qemu', 0] },
      { id: 3, method: 'backup_vm', params: [100, '', { 'drive-scsi0': { size: 1, 'bitmap-mode': 'none', 'nbd-path': '/nonexistent' } }, {}] },
    ];
    host.stdin.write(requests.map((r) => `${JSON.stringify(r)}\n`).join(''));
    let answer: { message?: string } | undefined;
    for await (const line of createInterface({ input: host.stdout })) {
      const m = JSON.parse(line) as { id?: number; log?: { message: string }; error?: { message: string } };
      if (m.log?.message === 'started') host.kill('SIGTERM'); // a task stop: the host cancels the call
      if (m.id === 3) {
        answer = m.error;
        host.stdin.end();
      }
    }
    expect(answer?.message).toBe("the package's CancelledError: true");
  }, 180_000);
});

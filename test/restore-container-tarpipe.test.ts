/**
 * A directory-mode container backup is restored as pve-container restores it (`Create.pm`
 * `restore_external_archive`, mechanism `directory`): `tar cpf - | tar xpf - … --anchored
 * --exclude ./dev/*`, not rsync. So what is under `/dev` is left out (the container's `/dev` is
 * populated at start), and with `allowNonEmpty` files already in the target stay (`rsync --delete`
 * would remove them, and copy `/dev`): the same tree a tar-mode restore gives.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { DirectoryProvider, DirectoryStore, restoreContainer, runBackupJob } from '../lib/index.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { requireTool } from './helpers/tools.js';

afterEach(async () => {
  await stopAll();
});

describe('directory-mode container restore: the tar pipe pve-container uses', () => {
  it('leaves /dev contents out, keeps files already in a non-empty target, and matches a tar-mode restore', async () => {
    requireTool('tar', 'tar');
    const work = await tempDir();
    const src = path.join(work, 'src');
    mkdirSync(path.join(src, 'dev', 'pts'), { recursive: true });
    mkdirSync(path.join(src, 'etc'), { recursive: true });
    writeFileSync(path.join(src, 'dev', 'stale-node'), 'left over from a running container\n');
    writeFileSync(path.join(src, 'etc', 'hostname'), 'ct200\n');
    const restored: Record<string, string[]> = {};
    for (const mode of ['directory', 'tar'] as const) {
      const root = path.join(work, `store-${mode}`);
      const provider = new DirectoryProvider({ storeid: 'dir1', scfg: { path: root, 'lxc-backup-mode': mode }, log: () => {} });
      const r = await runBackupJob({ provider, storeid: 'dir1', tmpdir: work, guests: [{ vmid: 200, type: 'lxc', rootdir: src, config: 'hostname: ct200\n' }] });
      expect(r.guests[0]!.error).toBeUndefined();
      const volname = r.guests[0]!.volname!;
      if (mode === 'directory') expect(existsSync(path.join((await DirectoryStore.open(root)).backupDir(volname), 'root', 'dev', 'stale-node'))).toBe(true);
      const dst = path.join(work, `dst-${mode}`);
      mkdirSync(dst);
      writeFileSync(path.join(dst, 'kept'), 'already here\n');
      const res = await restoreContainer({ provider, volname, storeid: 'dir1', rootdir: dst, allowNonEmpty: true });
      expect(res.mechanism).toBe(mode);
      expect(lstatSync(path.join(dst, 'dev')).isDirectory()).toBe(true);
      expect(readdirSync(path.join(dst, 'dev'))).toEqual([]);
      expect(readFileSync(path.join(dst, 'etc', 'hostname'), 'utf8')).toBe('ct200\n');
      expect(readFileSync(path.join(dst, 'kept'), 'utf8')).toBe('already here\n');
      restored[mode] = readdirSync(dst, { recursive: true }).map(String).sort();
    }
    expect(restored.directory).toEqual(restored.tar);
  });
});

describe('restoreContainerInit / restoreContainerCleanup take (volname, storeid, info) as pve-container calls them', () => {
  it('passes the storage id; a provider declaring only volname still restores', async () => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    mkdirSync(path.join(src, 'etc'), { recursive: true });
    writeFileSync(path.join(src, 'etc', 'hostname'), 'ct201\n');
    const calls: unknown[][] = [];
    class Recording extends DirectoryProvider {
      override restoreContainerInit(...args: Parameters<DirectoryProvider['restoreContainerInit']>): ReturnType<DirectoryProvider['restoreContainerInit']> {
        calls.push(['restoreContainerInit', ...args]);
        return super.restoreContainerInit(...args);
      }
      override async restoreContainerCleanup(...args: Parameters<DirectoryProvider['restoreContainerCleanup']>): Promise<void> {
        calls.push(['restoreContainerCleanup', ...args]);
        await super.restoreContainerCleanup(...args);
      }
    }
    // written to Base.pm's documentation: the storage id is of no use to it
    class OneArgument extends DirectoryProvider {
      override restoreContainerInit(volname: string): ReturnType<DirectoryProvider['restoreContainerInit']> {
        return super.restoreContainerInit(volname, 'unused', {});
      }
    }
    const scfg = { path: path.join(work, 'store'), 'lxc-backup-mode': 'directory' };
    const recording = new Recording({ storeid: 'dir7', scfg, log: () => {} });
    const r = await runBackupJob({ provider: recording, storeid: 'dir7', tmpdir: work, guests: [{ vmid: 201, type: 'lxc', rootdir: src, config: 'hostname: ct201\n' }] });
    expect(r.guests[0]!.error).toBeUndefined();
    const volname = r.guests[0]!.volname!;
    const dst = path.join(work, 'dst');
    mkdirSync(dst);
    await restoreContainer({ provider: recording, volname, storeid: 'dir7', rootdir: dst });
    expect(calls).toEqual([
      ['restoreContainerInit', volname, 'dir7', {}],
      ['restoreContainerCleanup', volname, 'dir7', {}],
    ]);
    const dst2 = path.join(work, 'dst2');
    mkdirSync(dst2);
    await restoreContainer({ provider: new OneArgument({ storeid: 'dir7', scfg, log: () => {} }), volname, storeid: 'dir7', rootdir: dst2 });
    expect(readFileSync(path.join(dst2, 'etc', 'hostname'), 'utf8')).toBe('ct201\n');
  });
});

describe('tar-path as pve-container checks it', () => {
  it('is a regular file named *.tar that tar -tvf reads twice', async () => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    mkdirSync(path.join(src, 'sbin'), { recursive: true });
    for (let i = 0; i < 12; i++) writeFileSync(path.join(src, 'sbin', `tool${i}`), `#${i}\n`);
    const provider = new DirectoryProvider({ storeid: 'dir1', scfg: { path: path.join(work, 'store') }, log: () => {} });
    const r = await runBackupJob({ provider, storeid: 'dir1', tmpdir: work, guests: [{ vmid: 202, type: 'lxc', rootdir: src, config: 'hostname: ct202\n' }] });
    expect(r.guests[0]!.error).toBeUndefined();
    const volname = r.guests[0]!.volname!;
    const { tarPath } = await provider.restoreContainerInit(volname, 'dir1', {});
    // pve-storage tar_compression_option; pve-container restore_external_archive: die if !-f
    expect(tarPath).toMatch(/\.tar(\.(gz|bz2|xz|lzo|zst))?$/);
    expect(lstatSync(tarPath!).isFile()).toBe(true);
    // check_tar_archive lists it whole (needing sbin and at least 10 members), then it is extracted
    for (let i = 0; i < 2; i++) {
      const list = execFileSync('tar', ['-tvf', tarPath!], { encoding: 'utf8' }).trim().split('\n');
      expect(list.length).toBeGreaterThanOrEqual(10);
      expect(list.some((l) => / \.\/sbin\/?$/.test(l))).toBe(true);
    }
    await provider.restoreContainerCleanup(volname, 'dir1', {});
  });
});

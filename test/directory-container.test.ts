/**
 * Containers through the DirectoryProvider, the job runner and restore: tar and directory modes,
 * privileged and with an id map, both API generations; the restored tree equals the source (tree
 * walk of content, modes, owners, xattrs, ACLs, links); a changed archive is refused.
 */
import { appendFileSync, mkdirSync } from 'node:fs';
import path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { DirectoryProvider, DirectoryProviderV1, DirectoryStore, restoreContainer, runBackupJob, type BackupProvider } from '../lib/index.js';
import { stopAll, tempDir } from './helpers/qemu.js';
import { buildTree, snapshotTree, TEST_MAP_LINES } from './helpers/tree.js';

afterEach(async () => {
  await stopAll();
});

const cases = [
  ['tar', 2, false],
  ['tar', 1, true],
  ['directory', 2, true],
  ['directory', 1, false],
] as const;

describe('containers round trip through the provider', () => {
  it.each(cases)('lxc-backup-mode %s, API generation %i, id map %s', async (mode, generation, mapped) => {
    const work = await tempDir();
    const src = path.join(work, 'src');
    mkdirSync(src);
    buildTree(src, { idBase: mapped ? 100000 : 0 });
    const before = snapshotTree(src);
    const root = path.join(work, 'store');
    const context = { storeid: 'dir1', scfg: { path: root, 'lxc-backup-mode': mode }, log: () => {} };
    const provider: BackupProvider = generation === 2 ? new DirectoryProvider(context) : new DirectoryProviderV1(context);
    const r = await runBackupJob({
      provider,
      storeid: 'dir1',
      tmpdir: work,
      bandwidthLimit: 1 << 30,
      guests: [{ vmid: 200, type: 'lxc', rootdir: src, config: 'hostname: ct200\n', ...(mapped ? { idMap: TEST_MAP_LINES } : {}) }],
    });
    expect(r.guests[0]!.error).toBeUndefined();
    const volname = r.guests[0]!.archiveName!;
    const store = await DirectoryStore.open(root);
    const [info] = await store.listBackups(200);
    expect(info).toMatchObject({ volname, subtype: 'lxc', format: mode, status: 'ok' });
    expect((await store.verifyBackup(volname)).ok).toBe(true);

    const dst = path.join(work, 'dst');
    mkdirSync(dst);
    const res = await restoreContainer({ provider, volname, storeid: 'dir1', rootdir: dst, configDir: work, ...(mapped ? { idMap: TEST_MAP_LINES } : {}) });
    expect(res).toMatchObject({ mechanism: mode, config: 'hostname: ct200\n' });
    expect(snapshotTree(dst)).toEqual(before);

    // a changed archive: verify finds it, restore refuses it
    const changed = mode === 'tar' ? path.join(store.backupDir(volname), 'root.tar') : path.join(store.backupDir(volname), 'root', 'hello.txt');
    appendFileSync(changed, 'x');
    expect((await store.verifyBackup(volname)).problems[0]).toMatch(/checksum mismatch/);
    const dst2 = path.join(work, 'dst2');
    mkdirSync(dst2);
    await expect(restoreContainer({ provider, volname, storeid: 'dir1', rootdir: dst2 })).rejects.toThrow(/is corrupted, refusing to restore it/);
  });
});

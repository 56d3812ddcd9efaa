/**
 * Where a container restore writes: the empty-target rule of the tar and rsync restores
 * (pve-container restores into a fresh root directory).
 *
 * @packageDocumentation
 */
import { lstat, readdir } from 'node:fs/promises';
import { join } from 'node:path';

import { InvalidArgumentError } from '../errors.js';
import { RootdirNotEmptyError } from './errors.js';

/**
 * Refuses a restore target that holds anything but `lost+found` and empty directories (mount
 * point skeletons), unless `allowNonEmpty`.
 */
export async function checkRestoreTarget(rootdir: string, allowNonEmpty: boolean | undefined): Promise<void> {
  const st = await lstat(rootdir).catch((err: NodeJS.ErrnoException) => {
    throw new InvalidArgumentError(`restore target ${rootdir}: ${err.code === 'ENOENT' ? 'does not exist' : err.message}`, { cause: err });
  });
  if (!st.isDirectory()) throw new InvalidArgumentError(`restore target ${rootdir} is not a directory`);
  if (allowNonEmpty) return;
  const visit = async (dir: string, rel: string): Promise<void> => {
    for (const e of await readdir(dir, { withFileTypes: true })) {
      if (e.name === 'lost+found' && e.isDirectory()) continue;
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (!e.isDirectory()) throw new RootdirNotEmptyError(rootdir, r);
      await visit(join(dir, e.name), r);
    }
  };
  await visit(rootdir, '');
}

/**
 * The low-level container tools (GNU tar, rsync, id maps) live in `lib/container/`, written
 * separately. They are loaded lazily here, so the runner builds and runs VM backups before they
 * are merged, and container restores fail with a clear error until then.
 *
 * The expected signatures are spelled out below; after the merge these can become static imports.
 *
 * @packageDocumentation
 */
import { PveBackupError } from '../errors.js';
import type { IdMapEntry } from '../provider/api.js';

/** `lib/container/idmap.ts`, `lib/container/tar.ts`, `lib/container/directory.ts`. */
export interface ContainerTools {
  parseIdMap(lines: string[]): IdMapEntry[];
  extractTarArchive(o: { archive: string; rootdir: string; idMap?: IdMapEntry[]; bandwidthLimit?: number; signal?: AbortSignal }): Promise<void>;
  restoreDirectoryTree(o: { source: string; rootdir: string; idMap?: IdMapEntry[]; bandwidthLimit?: number; signal?: AbortSignal }): Promise<void>;
}

let loaded: Promise<ContainerTools> | undefined;

/** Loads the container tools, or throws `ERR_CONTAINER_TOOLS` when they are not part of this build. */
export function loadContainerTools(): Promise<ContainerTools> {
  loaded ??= (async () => {
    // Specifiers in variables: the modules may not exist in this build yet.
    const idmap = '../container/idmap.js';
    const tar = '../container/tar.js';
    const directory = '../container/directory.js';
    try {
      const [a, b, c] = await Promise.all([import(idmap), import(tar), import(directory)]);
      return {
        parseIdMap: a.parseIdMap,
        extractTarArchive: b.extractTarArchive,
        restoreDirectoryTree: c.restoreDirectoryTree,
      } as ContainerTools;
    } catch (err) {
      loaded = undefined;
      throw new PveBackupError(`the container tools (lib/container) are not available: ${(err as Error).message}`, { code: 'ERR_CONTAINER_TOOLS', cause: err });
    }
  })();
  return loaded;
}

/**
 * Where the package's own files are (`package.json`, `native/`, `perl/`, `dist/cli/main.js`),
 * found from the running module rather than from a fixed number of `../`: a module's code runs
 * from `dist/bundle.js` (scripts/bundle.mjs), from the module tsc wrote at its depth in `dist/`, or
 * under vitest from `lib/`. The one home of that question.
 *
 * @packageDocumentation
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The `name` of the package's package.json, which marks its root. */
const PACKAGE_NAME = 'pve-backup-provider';

let root: string | undefined;

/** Whether `dir` holds the package.json of this package (another package's, or none: no). */
function isPackageRoot(dir: string): boolean {
  try {
    return (JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: unknown }).name === PACKAGE_NAME;
  } catch {
    return false;
  }
}

/**
 * The package's root folder: the nearest folder above this module whose package.json is
 * pve-backup-provider's (computed once). Throws when there is none, which only a copy of
 * `dist/` taken out of its package can cause: nothing of the package can be found then.
 * @internal
 */
export function packageRoot(): string {
  if (root !== undefined) return root;
  const here = path.dirname(fileURLToPath(import.meta.url));
  for (let dir = here; ; dir = path.dirname(dir)) {
    if (isPackageRoot(dir)) return (root = dir);
    if (path.dirname(dir) === dir) break;
  }
  throw new Error(`${PACKAGE_NAME}: no package.json of ${PACKAGE_NAME} above ${here}: the package's files were moved out of it`);
}

/**
 * The package's version, from its package.json. It is printed by every command and written into
 * generated plugins, so an install without a readable one gives 'unknown' instead of failing them.
 * @internal
 */
export function packageVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(path.join(packageRoot(), 'package.json'), 'utf8')) as { version?: unknown };
    return typeof pkg.version === 'string' ? pkg.version : 'unknown';
  } catch {
    return 'unknown';
  }
}

/**
 * What a container backup reads: the sources (`.` and mount point paths) relative to the
 * container's root, as the tar and rsync tools pass them.
 *
 * @packageDocumentation
 */
import { InvalidArgumentError } from '../errors.js';

/**
 * Normalises backup sources (paths relative to the source directory, as vzdump's `.` and
 * `./mnt/data`) to `./PATH` form. Absolute paths are taken relative to the source (`/mnt/data`),
 * as mount point paths are. `..` components are refused. Default: `['.']`.
 */
export function normaliseSources(sources: string[] | undefined): string[] {
  if (sources === undefined || sources.length === 0) return ['.'];
  return sources.map((s) => {
    if (typeof s !== 'string' || s === '' || /[\0\n]/.test(s)) throw new InvalidArgumentError(`bad backup source ${JSON.stringify(s)}`);
    const parts = s.split('/').filter((p) => p !== '' && p !== '.');
    if (parts.includes('..')) throw new InvalidArgumentError(`backup source '${s}' must not contain '..'`);
    return parts.length === 0 ? '.' : `./${parts.join('/')}`;
  });
}

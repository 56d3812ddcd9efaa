/**
 * Exclusion patterns for container backups: rsync-compatible patterns (as vzdump's
 * `exclude-path` option takes them) turned into what GNU tar and rsync each need.
 *
 * Pattern language (rsync's):
 * - `/foo/bar`: anchored, matched from the container's root (`/` is the root file system);
 * - `foo`, `foo/bar`: unanchored, matched against the end of any path, at a `/` boundary
 *   (`foo` excludes `/foo` and `/a/b/foo`);
 * - `dir/`: a trailing slash restricts the pattern to directories;
 * - wildcards `*`, `?`, `[...]`; `**` matches across `/` too.
 * Excluding a directory excludes everything below it.
 *
 * How Proxmox's vzdump maps them (pve-container `PVE::VZDump::LXC`): rsync gets each pattern
 * unchanged as `--exclude=PATTERN`, next to `--relative` sources of the form `ROOT/./PATH` so
 * anchored patterns are relative to the container's root. GNU tar runs with `-C ROOT` on
 * sources `./...`: unanchored patterns follow `--no-anchored` as `--exclude=PATTERN`, anchored
 * ones follow `--anchored` as `--exclude=.PATTERN` (tar's member names start with `./`); an
 * unprivileged container also gets `--no-anchored --exclude=lost+found`.
 *
 * Differences between the two tools, and what this module does about them:
 * - Trailing slash: tar never matches `dir/` (vzdump only warns). Here tar gets `dir/*`
 *   instead, so it skips everything inside `dir` and keeps `dir` itself, empty — the direction
 *   Proxmox's own TODO in `VZDump/LXC.pm` proposes; rsync drops the directory entirely. Neither
 *   excludes a non-directory called `dir`.
 * - Wildcards: GNU tar's exclusion wildcards match `/` (`--wildcards-match-slash` is its default
 *   for exclusions), rsync's `*` does not. vzdump passes patterns unchanged and so does this
 *   module: `/var/log/*.gz` also excludes `/var/log/a/b.gz` in a tar backup.
 *
 * @packageDocumentation
 */
import { InvalidArgumentError } from '../errors.js';

/** One exclusion pattern, classified. */
export interface ExcludePattern {
  /** The pattern as given. */
  pattern: string;
  /** Starts with `/`: matched from the container's root. */
  anchored: boolean;
  /** Ends with `/`: matches directories only. */
  directoryOnly: boolean;
}

/**
 * Validates and classifies exclusion patterns.
 *
 * @throws {@link InvalidArgumentError} for an empty pattern, `/` alone (would exclude the
 * whole container), or a pattern containing a NUL or newline.
 */
export function parseExcludePatterns(patterns: readonly string[] = []): ExcludePattern[] {
  return patterns.map((pattern) => {
    if (typeof pattern !== 'string' || pattern === '') throw new InvalidArgumentError('exclude pattern must be a non-empty string');
    if (/[\0\n]/.test(pattern)) throw new InvalidArgumentError(`exclude pattern ${JSON.stringify(pattern)} contains a NUL or newline`);
    if (/^\/+$/.test(pattern)) throw new InvalidArgumentError(`exclude pattern '${pattern}' would exclude everything`);
    return { pattern, anchored: pattern.startsWith('/'), directoryOnly: pattern.endsWith('/') };
  });
}

/** Options shared by {@link tarExcludeArgs} and {@link rsyncExcludeArgs}. */
export interface ExcludeArgsOptions {
  /** Also exclude every `lost+found` (vzdump does for unprivileged containers, whose lost+found is owned by host root). */
  skipLostAndFound?: boolean;
}

/**
 * GNU tar arguments for `patterns`, for a tar run with `-C ROOT` on sources `.` or `./PATH`.
 * Leaves tar in `--anchored` mode, as vzdump does. Put them before the sources.
 */
export function tarExcludeArgs(patterns: readonly string[] = [], options: ExcludeArgsOptions = {}): string[] {
  const parsed = parseExcludePatterns(patterns);
  const tarPattern = (p: ExcludePattern): string => (p.directoryOnly ? `${p.pattern}*` : p.pattern);
  const args: string[] = ['--no-anchored'];
  if (options.skipLostAndFound) args.push('--exclude=lost+found');
  for (const p of parsed) if (!p.anchored) args.push(`--exclude=${tarPattern(p)}`);
  args.push('--anchored');
  for (const p of parsed) if (p.anchored) args.push(`--exclude=.${tarPattern(p)}`);
  return args;
}

/**
 * rsync arguments for `patterns`, for an rsync run with `--relative` on sources `ROOT/./PATH`
 * (so `/foo` is anchored at ROOT). Patterns pass unchanged, as in vzdump.
 */
export function rsyncExcludeArgs(patterns: readonly string[] = [], options: ExcludeArgsOptions = {}): string[] {
  const parsed = parseExcludePatterns(patterns);
  const args = parsed.map((p) => `--exclude=${p.pattern}`);
  if (options.skipLostAndFound) args.unshift('--exclude=lost+found');
  return args;
}

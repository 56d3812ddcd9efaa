/**
 * Container backup and restore tools: GNU tar archives and rsync directory copies of a
 * container's root file system, with owners shifted by the container's id map (no user
 * namespace needed), rsync-style exclusions, bandwidth limits and cancellation.
 *
 * @packageDocumentation
 */
export { parseIdMap, validateIdMap, formatIdMapEntry, toHost, toContainer, isIdentityMap, rootIds, MAX_ID, type IdMapEntry } from './idmap.js';
export {
  createTarArchive,
  extractTarArchive,
  extractDirectoryWithTar,
  writeTarStream,
  extractTarStream,
  type WriteTarStreamOptions,
  type ExtractTarStreamOptions,
  type CreateTarArchiveOptions,
  type ExtractTarArchiveOptions,
  type ExtractDirectoryOptions,
} from './tar.js';
export {
  backupDirectoryTree,
  restoreDirectoryTree,
  type BackupDirectoryTreeOptions,
  type RestoreDirectoryTreeOptions,
} from './directory.js';
export { parseExcludePatterns, tarExcludeArgs, rsyncExcludeArgs, type ExcludePattern, type ExcludeArgsOptions } from './exclude.js';
export { COMMON_TAR_FLAGS } from './tar.js';
export { ContainerToolError, IdMapError, RootdirNotEmptyError, ContainerAbortError, type ContainerToolErrorCode } from './errors.js';
export { ThrottleStream } from '../bandwidth.js';

/**
 * The directory provider: the reference {@link DirectoryProvider} (both API generations) and its
 * storage side, {@link DirectoryStore}.
 *
 * @packageDocumentation
 */
export { DirectoryProvider, type DirectoryProviderOptions, type DeviceProgress } from './provider.js';
export { DirectoryProviderV1 } from './provider-v1.js';
export { DirectoryStore, type BackupInfo, type VerifyResult, type PruneResultEntry, type PreviousInfo } from './store.js';
export { DirectoryStoreError, type DirectoryStoreErrorCode } from './errors.js';
export { markBackups, hasKeepOptions, type PruneEntry, type PruneMark } from '../provider/prune.js';
export { parseVolname, STORE_MARKER, type Manifest, type ManifestDevice, type ParsedVolname } from './layout.js';

/**
 * pve-backup-provider: the Proxmox VE backup provider API for Node.
 * @packageDocumentation
 */
export { PveBackupError, InvalidArgumentError, CancelledError, type ErrorCode, type PveBackupErrorOptions } from './errors.js';
export { requireTool, ToolMissingError } from './tools.js';
export { NbdError, type NbdErrorCode } from './nbd/errors.js';
export { digestImage, checkImageDigests, type ImageDigests } from './directory-provider/digests.js';
export { restoreChain, type ChainLayer, type RestoreChainOptions, type RestoreChainProgress, type RestoreChainSummary } from './directory-provider/restore-chain.js';
export {
  NbdClient,
  listBitmaps,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  NBD_STATE_DIRTY,
  type NbdConnectOptions,
  type ExportInfo,
  type Extent,
} from './nbd/client.js';
export {
  copyExtents,
  readChunks,
  type ExtentReadOptions,
  type CopyExtentsOptions,
  type CopyProgress,
  type CopySummary,
  type Chunk,
  type ChunkStream,
} from './nbd/copy.js';

// Provider API (lib/provider) and job runner (lib/job)
export {
  PROVIDER_API_VERSION,
  PROVIDER_API_AGE,
  type BackupProvider,
  type BackupProviderV1,
  type BackupProviderV2,
  type ProviderCommon,
  type ProviderContext,
  type ProviderFactory,
  type ProviderStorage,
  type StoredBackup,
  type StorageStatus,
  type StoragePruneMark,
  type PveStorageSchema,
  type PveStorageProperty,
  type PruneOptions,
  type RestoreHookInfo,
  type GuestType,
  type LogLevel,
  type LogFunction,
  type BitmapAction,
  type BitmapMode,
  type BackupMechanism,
  type RestoreMechanism,
  type RestoreMechanismInfo,
  type BackupMechanismInfoV1,
  type NbdBackupExtra,
  type BackupInitResult,
  type BackupCleanupResult,
  type IncrementalRequest,
  type VolumeHandle,
  type VolumeSize,
  type BackupVmVolume,
  type BackupVmInfo,
  type ContainerBackupInfo,
  type RestoreVmVolumeInitResult,
  type RestoreContainerInitResult,
  type RestoreContainerTarget,
  type Awaitable,
} from './provider/api.js';
export { BackupProviderBase, BackupProviderBaseV1 } from './provider/base.js';
export { adaptProvider, checkApiVersion } from './provider/adapter.js';
export { createLogger, type ProviderLogger } from './provider/logger.js';
export { BandwidthLimiter, normaliseBandwidthLimit, type BandwidthLimiterOptions } from './bandwidth.js';
export { backupNbdToFile, type BackupNbdToFileOptions } from './provider/backup-nbd-to-file.js';
export { nbdUriFor, dirtyRegions, dirtyBytes } from './provider/dirty-regions.js';
export {
  ProviderApiVersionError,
  NotImplementedError,
  MechanismError,
  ProviderResultError,
  JobAbortedError,
  RestoreError,
  StorageHookError,
} from './provider/errors.js';
export { runBackupJob } from './job/runner.js';
export { expandNotesTemplate } from './job/storage-hooks.js';
export { restoreVm, restoreContainer, extractConfig, type RestoreVmOptions, type RestoreVmResult, type RestoreContainerOptions, type RestoreContainerResult, type ConvertProgress } from './job/restore.js';
export type { RunBackupJobOptions, BackupJobResult, GuestOutcome, Guest, VmGuest, ContainerGuest } from './job/types.js';
export { GUEST_STEPS, type GuestStep, type GuestStepTimes } from './job/steps.js';

// QMP and guest agent clients (lib/qmp), backup access on any QEMU (lib/qemu)
export * from './qmp/index.js';
export * from './qemu/index.js';
export { startStorageDaemon, type StorageDaemon, type StorageDaemonDisk, type StorageDaemonOptions } from './qemu/storage-daemon.js';

// Container tools (lib/container)
export * from './container/index.js';

// The reference provider (lib/directory-provider)
export {
  DirectoryProvider,
  DirectoryProviderV1,
  DirectoryStore,
  DirectoryStoreError,
  markBackups,
  parseVolname,
  type DirectoryProviderOptions,
  type DeviceProgress,
  type BackupInfo,
  type VerifyResult,
  type PruneResultEntry,
  type PreviousInfo,
  type DirectoryStoreErrorCode,
  type PruneEntry,
  type PruneMark,
  type Manifest,
  type ManifestDevice,
  type ParsedVolname,
} from './directory-provider/index.js';

// The chunk store on S3-compatible object storage (lib/chunk-provider)
export { ChunkStoreError, ChunkBackupError, type ChunkStoreErrorCode } from './chunk-provider/errors.js';
export {
  ChunkStore,
  type ChunkManifest,
  type ChunkManifestDevice,
  type ChunkBackupInfo,
  type ChunkPruneEntry,
  type StoreDescriptor,
} from './chunk-provider/store.js';
export { ChunkProvider, type ChunkProviderOptions, type ChunkDeviceProgress } from './chunk-provider/provider.js';
export type { ChunkJobs, ChunkDiskBackup, ChunkDiskRestore, ChunkDiskSummary } from './chunk-provider/jobs.js';
export { verifyChunkStore, type ChunkVerifyResult, type VerifyChunkStoreOptions } from './chunk-provider/verify.js';
export { StoreKey, createKeyFile, readKeyFile } from './chunk-provider/key.js';
export {
  S3ObjectStore,
  parseS3Url,
  isS3Url,
  readCredentialsFile,
  s3StoreOptions,
  type S3StoreOptions,
  type S3UrlOptions,
  type S3Location,
  type S3Credentials,
  type StoredObject,
} from './chunk-provider/s3.js';

// The Perl bridge's Node half (lib/bridge): the provider host behind `provider-host`
export * from './bridge/index.js';

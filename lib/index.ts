/**
 * pve-backup-provider: the Proxmox VE backup provider API for Node.
 * @packageDocumentation
 */
export { PveBackupError } from './errors.js';
export { NbdError, type NbdErrorCode } from './nbd/errors.js';
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

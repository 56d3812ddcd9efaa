/**
 * Backup access for QEMU.
 *
 * @packageDocumentation
 */
export { bitmapModeFor, explainFleecingFailure, recoverBackupAccess, setupBackupAccess, teardownBackupAccess } from './backup-access.js';
export type { BackupAccess, BackupAccessDevice, BitmapAction, BitmapMode, SetupBackupAccessOptions } from './types.js';
export { BackupAccessActiveError, BackupAccessError, FleecingFullError, QemuImgError, QemuStartError } from './errors.js';
export { BITMAP_ID_RE, DEVICE_RE, TARGET_ID_RE } from './names.js';

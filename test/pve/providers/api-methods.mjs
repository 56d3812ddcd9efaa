// The methods of a provider of API generation 2 (lib/provider/api.ts BackupProviderV2), for the
// bridge tests' provider modules that answer every one of them alike.
export const API2_METHODS = [
  'providerName', 'jobInit', 'jobCleanup', 'backupInit', 'backupCleanup', 'backupGetMechanism',
  'backupHandleLogFile', 'backupVmQueryIncremental', 'backupVm', 'backupContainerPrepare',
  'backupContainer', 'restoreGetMechanism', 'archiveGetGuestConfig', 'archiveGetFirewallConfig',
  'restoreVmInit', 'restoreVmCleanup', 'restoreVmVolumeInit', 'restoreVmVolumeCleanup',
  'restoreContainerInit', 'restoreContainerCleanup',
];

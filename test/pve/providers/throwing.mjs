// A provider module for the bridge tests: every method of the apiVersion 2 API throws an error
// naming itself, with a vendor's code; with scfg `init-ok`, backupInit answers (so that
// backup_vm and backup_container reach the provider). Default export: a factory.
const METHODS = [
  'providerName', 'jobInit', 'jobCleanup', 'backupInit', 'backupCleanup', 'backupGetMechanism',
  'backupHandleLogFile', 'backupVmQueryIncremental', 'backupVm', 'backupContainerPrepare',
  'backupContainer', 'restoreGetMechanism', 'archiveGetGuestConfig', 'archiveGetFirewallConfig',
  'restoreVmInit', 'restoreVmCleanup', 'restoreVmVolumeInit', 'restoreVmVolumeCleanup',
  'restoreContainerInit', 'restoreContainerCleanup',
];

export default (context) => {
  const provider = { apiVersion: 2 };
  for (const m of METHODS) {
    provider[m] = async () => {
      throw Object.assign(new Error(`${m} refused by the vendor`), { code: `ERR_VENDOR_${m.toUpperCase()}` });
    };
  }
  if (context.scfg['init-ok']) provider.backupInit = async (vmid) => ({ archiveName: `${vmid}/x` });
  return provider;
};

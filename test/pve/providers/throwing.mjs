// A provider module for the bridge tests: every method of the apiVersion 2 API throws an error
// naming itself, with a vendor's code; with scfg `init-ok`, backupInit answers (so that
// backup_vm and backup_container reach the provider). Default export: a factory.
import { API2_METHODS } from './api-methods.mjs';

export default (context) => {
  const provider = { apiVersion: 2 };
  for (const m of API2_METHODS) {
    provider[m] = async () => {
      throw Object.assign(new Error(`${m} refused by the vendor`), { code: `ERR_VENDOR_${m.toUpperCase()}` });
    };
  }
  if (context.scfg['init-ok']) provider.backupInit = async (vmid) => ({ archiveName: `${vmid}/x` });
  return provider;
};

// A provider module for the bridge tests: the reference DirectoryProvider as a vendor would
// ship it (default export: the class). Loaded by `provider-host --provider` from dist/.
export { DirectoryProvider as default } from '../../../dist/index.js';

// Its storage plugin's schema (pve-plugin generate): the store folder is Proxmox VE's own `path`
// property (DirPlugin declares it), fixed once the storage is added.
export const pveStorage = { options: { path: { fixed: true } } };

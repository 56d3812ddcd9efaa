/**
 * The Perl bridge's Node half: serve a provider module to `PVE::BackupProvider::Plugin::NodeBridge`.
 *
 * @packageDocumentation
 */
export { ProviderHost, loadProviderModule, BRIDGE_PROTOCOL_VERSION, type ProviderHostOptions, type ProviderModuleExport } from './host.js';
export { BridgeError, PluginFileExistsError } from './errors.js';
export { STORAGE_CALLS, isStorageCall, serveStorageCall, keepFromPerl, BACKUP_VOLUME_FORMAT, type StorageCall, type PveVolumeItem, type PvePruneItem } from './storage-calls.js';
export {
  generatePvePlugin,
  writePvePlugin,
  pvePluginNames,
  checkPveStorageSchema,
  PVE_SERVICES,
  PVE_PERL5_DIR,
  type GenerateOptions,
  type GeneratedFile,
  type GeneratedPlugin,
  type PvePluginNames,
} from './pve-plugin.js';
export { runProviderHost } from './run.js';

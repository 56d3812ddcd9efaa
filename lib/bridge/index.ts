/**
 * The Perl bridge's Node half: serve a provider module to `PVE::BackupProvider::Plugin::NodeBridge`.
 *
 * @packageDocumentation
 */
export { ProviderHost, loadProviderModule, BRIDGE_PROTOCOL_VERSION, type ProviderHostOptions, type ProviderModuleExport } from './host.js';
export { BridgeError } from './errors.js';
export { runProviderHost } from './run.js';

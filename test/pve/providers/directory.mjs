// A provider module for the bridge tests: the reference DirectoryProvider as a vendor would
// ship it (default export: the class). Loaded by `provider-host --provider` from dist/.
export { DirectoryProvider as default } from '../../../dist/index.js';

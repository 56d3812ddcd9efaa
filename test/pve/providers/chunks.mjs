// A provider module for the bridge tests: the ChunkProvider (S3 chunk store) as a vendor would
// ship it (default export: the class). Loaded by `provider-host --provider` from dist/; the
// store comes from the storage configuration the driver passes (store, endpoint, region,
// credentials-file, allow-http).
export { ChunkProvider as default } from '../../../dist/index.js';

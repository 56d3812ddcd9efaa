/**
 * Loads the native core through the loader napi-rs generates (`native/index.cjs`), which picks
 * the `.node` file for this platform. Everything native goes through here.
 * @internal
 */
import { createRequire } from 'node:module';
import type * as Binding from '../native/index.cjs';

const require = createRequire(import.meta.url);

/** The native binding; its types are generated from the Rust sources by `napi build`. */
export const native: typeof Binding = require('../native/index.cjs');
export type { Binding };

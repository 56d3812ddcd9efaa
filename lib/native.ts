/**
 * Loads the native core through the loader napi-rs generates (`native/index.cjs`), which picks
 * the `.node` file for this platform. Everything native goes through here.
 * @internal
 */
import { createRequire } from 'node:module';
import path from 'node:path';

import type * as Binding from '../native/index.cjs';
import { packageRoot } from './package-root.js';

// Found from the package's root, not relative to this module: bundled, this code runs from
// dist/bundle.js, at another depth than dist/native.js (lib/package-root.ts).
const requireCjs = createRequire(import.meta.url);

/** The native binding; its types are generated from the Rust sources by `napi build`. */
export const native: typeof Binding = requireCjs(path.join(packageRoot(), 'native', 'index.cjs'));
export type { Binding };

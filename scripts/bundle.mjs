#!/usr/bin/env node
// The second half of `npm run build:ts`, after `tsc -p tsconfig.build.json`: puts the whole package
// into one file, dist/bundle.js, and turns its two entry points into facades over it:
// dist/index.js (the package's export ".") and dist/cli/main.js (its `bin`, which the Perl bridge
// starts as `provider-host` for every storage call, and which loads a provider module that imports
// the package). Node loads an ESM graph file by file; the ~100 modules tsc writes cost each process
// tens of milliseconds that one file does not (README, "Layout": `dist/`).
//
// One file, not esbuild's code splitting: every dynamic import() is a split point there, which
// gave ~70 chunks, most of them loaded anyway, and a third of the gain. In one file a dynamic
// import() is a lazily initialised module (its code is parsed, not run, until imported). Both
// entries reach the same file, so the provider host and a provider module importing the package
// see the same classes: the host's CancelledError is the module's (test/bridge.test.ts,
// test/bridge-lifecycle.test.ts, test/package.test.ts).
//
// Every module tsc wrote stays in dist/ as it is, with the .d.ts files (the types, and the tests
// and benchmarks that import an internal module directly): a process uses either those or the
// entry points, never both, which would give it two copies of the same classes. The package
// ships only this file, the two entries and the .d.ts files (package.json `files`).
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { build } from 'esbuild';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const dist = path.join(root, 'dist');
const index = path.join(dist, 'index.js');
const cliMain = path.join(dist, 'cli', 'main.js');
const bundle = path.join(dist, 'bundle.js');
/** The line every file written here starts with (after main.js's `#!`): tsc never writes it. */
const MARK = '// Written by scripts/bundle.mjs: the code is in dist/bundle.js.';

for (const file of [index, cliMain]) {
  if (readFileSync(file, 'utf8').includes(MARK)) {
    throw new Error(`${path.relative(root, file)} is already a facade: run the whole \`npm run build:ts\` (tsc first, then this script)`);
  }
}

const common = { absWorkingDir: root, bundle: true, format: 'esm', platform: 'node', target: 'node20', logLevel: 'warning' };

// the names the package exports (its index), read from tsc's dist/index.js before it is replaced
const analysed = await build({ ...common, entryPoints: [index], packages: 'external', write: false, metafile: true, outdir: dist });
const exported = Object.values(analysed.metafile.outputs).find((o) => o.entryPoint)?.exports ?? [];
if (exported.length === 0) throw new Error('dist/index.js exports nothing: is it tsc\'s output?');
// the bundle exports what main.js imports from program.js too, under its name: not one of the index
if (exported.includes('main')) throw new Error("the index exports 'main', which dist/bundle.js exports for the CLI: rename one");

await build({
  ...common,
  stdin: {
    contents: `export * from './index.js';\nexport { main } from './cli/program.js';\n`,
    resolveDir: dist,
    sourcefile: 'bundle-entry.js',
  },
  outfile: bundle,
  // commander (CommonJS) is bundled too: it loads in a fraction of the time from inside the file.
  // Its require() of Node's modules needs a require in an ES module. cli-progress stays where it
  // is, required by lib/cli/output.ts only when a progress bar is shown.
  banner: { js: `${MARK}\nimport { createRequire as __createRequire } from 'node:module';\nconst require = __createRequire(import.meta.url);` },
  // error classes are named after their class (`new.target.name`): no renaming of a class that
  // has a namesake in another module
  keepNames: true,
  // maps to lib/*.ts through tsc's maps, which esbuild follows from the input files
  sourcemap: true,
  sourcesContent: false,
});

writeFileSync(index, `${MARK}\nexport {\n${exported.map((n) => `  ${n},\n`).join('')}} from './bundle.js';\n`);

// main.js is tsc's, with its import of program.js pointed at the bundle (main.ts stays its one source)
await build({
  ...common,
  entryPoints: [cliMain],
  outfile: cliMain,
  allowOverwrite: true,
  banner: { js: MARK },
  plugins: [
    {
      name: 'cli-main-facade',
      setup(b) {
        b.onResolve({ filter: /^\./ }, (args) => {
          if (args.importer === cliMain && path.resolve(args.resolveDir, args.path) === path.join(dist, 'cli', 'program.js')) {
            return { path: '../bundle.js', external: true };
          }
          return { errors: [{ text: `${args.path}, imported by ${path.relative(root, args.importer)}, is not in dist/bundle.js: export it there` }] };
        });
      },
    },
  ],
});

// tsc's maps of the two files replaced; the facades have no code to map
for (const map of [`${index}.map`, `${cliMain}.map`]) rmSync(map, { force: true });

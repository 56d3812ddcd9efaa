/**
 * The layering of `lib/`, read from the import statements of every module (static, type-only,
 * re-exports and dynamic `import()` alike): the provider API is the ground floor a provider
 * author reads first, so nothing in `lib/provider/` may import the layers that implement backup
 * access (`lib/qemu/`), the job runner (`lib/job/`) or the container tools (`lib/container/`);
 * the words they share live in `lib/vocabulary.ts`. Each folder imports only the folders the
 * README's "Layout" section names for it. And no import cycle exists anywhere in `lib/`.
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';

import ts from 'typescript';
import { describe, expect, it } from 'vitest';

const LIB = path.join(import.meta.dirname, '..', 'lib');

/** Every `.ts` file under `lib/`, as a path relative to `lib/` with `/` separators. */
function libFiles(dir = LIB): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const full = path.join(dir, e.name);
    if (e.isDirectory()) return libFiles(full);
    return e.isFile() && e.name.endsWith('.ts') ? [path.relative(LIB, full).split(path.sep).join('/')] : [];
  });
}

/**
 * The modules of `lib/` a module imports: relative specifiers that stay inside `lib/` (the native
 * loader outside it is no module of the graph); `.js` names the `.ts` source.
 */
function importsOf(file: string): string[] {
  const info = ts.preProcessFile(readFileSync(path.join(LIB, file), 'utf8'), true, true);
  return info.importedFiles
    .map((f) => f.fileName)
    .filter((spec) => spec.startsWith('.'))
    .map((spec) => path.posix.normalize(path.posix.join(path.posix.dirname(file), spec)))
    .filter((target) => !target.startsWith('../'))
    .map((target) => target.replace(/\.js$/, '.ts'));
}

const graph = new Map(libFiles().map((f) => [f, importsOf(f)]));

describe('layering of lib/', () => {
  it('reads a plausible graph: every relative import names a module of lib/', () => {
    expect(graph.size).toBeGreaterThan(40);
    for (const [file, deps] of graph) for (const d of deps) expect(graph.has(d), `${file} imports ${d}`).toBe(true);
  });

  it('lib/provider/ imports nothing of lib/qemu/, lib/job/ or lib/container/', () => {
    const offending = [...graph]
      .filter(([file]) => file.startsWith('provider/'))
      .flatMap(([file, deps]) => deps.filter((d) => /^(qemu|job|container)\//.test(d)).map((d) => `${file} -> ${d}`));
    expect(offending).toEqual([]);
  });

  it('each folder imports only what README.md says it may (its "Layout" section)', () => {
    // the bottom modules at the top of lib/ that any folder may use
    const bottom = ['errors', 'vocabulary', 'bandwidth', 'owner', 'tools', 'format', 'concurrency', 'native', 'package-root'];
    const allowed: Record<string, string[]> = {
      nbd: [],
      qmp: [],
      provider: ['nbd'],
      qemu: ['qmp'],
      container: [],
      job: ['provider', 'qemu', 'container', 'nbd', 'qmp'],
      'directory-provider': ['provider', 'container', 'nbd', 'qemu'],
      bridge: ['provider'],
      'chunk-provider': ['provider', 'container', 'nbd', 'qemu', 'directory-provider'],
    };
    const unitOf = (file: string): string => (file.includes('/') ? file.split('/')[0]! : file.replace(/\.ts$/, ''));
    const offending = [...graph].flatMap(([file, deps]) => {
      const from = unitOf(file);
      const may = allowed[from];
      if (!may) return [];
      return deps.map(unitOf).filter((to) => to !== from && !bottom.includes(to) && !may.includes(to)).map((to) => `${file} -> ${to}/`);
    });
    expect(offending).toEqual([]);
  });

  it('lib/vocabulary.ts imports nothing of the package', () => {
    expect(graph.get('vocabulary.ts')).toEqual([]);
  });

  it('has no import cycle', () => {
    // Depth-first search; a module met again while still on the path closes a cycle.
    const state = new Map<string, 'open' | 'done'>();
    const cycles: string[] = [];
    const visit = (file: string, trail: string[]): void => {
      state.set(file, 'open');
      for (const d of graph.get(file) ?? []) {
        if (state.get(d) === 'open') cycles.push([...trail.slice(trail.indexOf(d)), d].join(' -> '));
        else if (!state.has(d)) visit(d, [...trail, d]);
      }
      state.set(file, 'done');
    };
    for (const file of graph.keys()) if (!state.has(file)) visit(file, [file]);
    expect(cycles).toEqual([]);
  });
});

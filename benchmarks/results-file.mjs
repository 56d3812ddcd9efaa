/**
 * RESULTS.md holds the reports of several benchmarks (run.mjs: the core; provider.mjs: the whole
 * stack). Each owns one section between `<!-- begin NAME -->` and `<!-- end NAME -->` and rewrites
 * only that, so one benchmark's run never erases another's last report (issue 15).
 */
import { readFile, writeFile } from 'node:fs/promises';

const markers = (name) => [`<!-- begin ${name} -->`, `<!-- end ${name} -->`];

/**
 * Replaces section `name` of the markdown file `file` with `body` (markers added here); appends
 * the section when the file has none yet, and creates the file when missing.
 */
export async function writeSection(file, name, body) {
  const [begin, end] = markers(name);
  const block = `${begin}\n${body.replace(/\n*$/, '\n')}${end}\n`;
  let text = await readFile(file, 'utf8').catch((err) => (err.code === 'ENOENT' ? '' : Promise.reject(err)));
  const b = text.indexOf(begin);
  const e = b >= 0 ? text.indexOf(end, b) : -1;
  if (b >= 0 && e < 0) throw new Error(`${file}: '${begin}' has no '${end}'; fix the file by hand rather than guess where the section ends`);
  if (b >= 0) {
    const after = text.indexOf('\n', e);
    text = text.slice(0, b) + block + (after >= 0 ? text.slice(after + 1) : '');
  } else {
    text = text === '' ? block : `${text.replace(/\n*$/, '\n')}\n${block}`;
  }
  await writeFile(file, text);
}

// A provider module for the bridge tests: answers what the storage configuration scripts and
// records what it is called with. scfg `answers`: {method: value} (a value, returned as is);
// scfg `block`: {method: ms}, the method blocks the whole process that long (a synchronous call);
// scfg `delay`: {method: ms}, the method answers that much later (a slow store);
// scfg `logs`: {method: [level, message, cut]}, the method logs the message cut after `cut` UTF-16
// code units first, as `message.slice(0, cut)` in a provider would (possibly half a surrogate pair);
// scfg `stdout`: {method: text}, the method writes the text with process.stdout.write and dumps an
// object with console.dir (a progress line, a debugging aid);
// scfg `record`: a file that gets one JSON line per call, {method, args, path} (path: scfg's). Default export: a factory.
import { appendFileSync } from 'node:fs';
import { API2_METHODS } from './api-methods.mjs';

export default (context) => {
  const answers = context.scfg.answers ?? {};
  const provider = { apiVersion: 2 };
  for (const m of API2_METHODS) {
    provider[m] = async (...args) => {
      const ms = context.scfg.block?.[m];
      if (ms) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, Number(ms));
      const line = context.scfg.logs?.[m];
      if (line) context.log(line[0], line[1].slice(0, Number(line[2] ?? line[1].length)));
      const text = context.scfg.stdout?.[m];
      if (text) {
        process.stdout.write(text);
        console.dir({ method: m });
      }
      const later = context.scfg.delay?.[m];
      if (later) await new Promise((resolve) => setTimeout(resolve, Number(later)));
      if (context.scfg.record) {
        const plain = args.map((a) => (a && typeof a === 'object' && 'signal' in a ? { ...a, signal: undefined } : a));
        appendFileSync(context.scfg.record, `${JSON.stringify({ method: m, args: plain, path: context.scfg.path })}\n`);
      }
      return answers[m];
    };
  }
  return provider;
};

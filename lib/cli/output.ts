import { createRequire } from 'node:module';

import { formatBytes } from '../format.js';

// cli-progress (CommonJS) is loaded only when a bar is shown: a piped or `--json` run, like every
// backup job a scheduler starts, does not pay its start-up time.
const require = createRequire(import.meta.url);

export { formatBytes };

/** Exit codes of the command line, documented in the README. */
export const EXIT = { ok: 0, failed: 1, usage: 2, cancelled: 130 } as const;

/** Progress shown to a person: a bar on a TTY, nothing when piped or with `--json`. */
export interface ProgressView {
  update(done: number, total: number, bytesPerSecond: number): void;
  stop(): void;
}

export function progressView(label: string, enabled: boolean): ProgressView {
  if (!enabled || !process.stderr.isTTY) return { update() {}, stop() {} };
  const cliProgress = require('cli-progress') as typeof import('cli-progress');
  const bar = new cliProgress.SingleBar(
    {
      format: `${label} {bar} {percentage}% | {doneH} / {totalH} | {rateH}/s | eta {eta_formatted}`,
      stream: process.stderr,
      hideCursor: true,
      clearOnComplete: true,
    },
    cliProgress.Presets.shades_classic,
  );
  let started = false;
  return {
    update(done, total, rate) {
      const payload = { doneH: formatBytes(done), totalH: formatBytes(total), rateH: formatBytes(rate) };
      if (!started) {
        bar.start(Math.max(total, 1), done, payload);
        started = true;
      } else {
        bar.setTotal(Math.max(total, 1));
        bar.update(done, payload);
      }
    },
    stop() {
      if (started) bar.stop();
    },
  };
}

/** Prints a table of rows (first row is the header) with aligned columns. */
export function printTable(rows: string[][], out: (line: string) => void = console.log): void {
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length))) ?? [];
  for (const row of rows) out(row.map((cell, i) => cell.padEnd(widths[i] ?? 0)).join('  ').trimEnd());
}

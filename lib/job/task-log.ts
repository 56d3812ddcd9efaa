/**
 * The per-guest task log: timestamped lines with levels, written to a file (handed to the
 * provider's `backupHandleLogFile`) and forwarded to the job's log function.
 *
 * @packageDocumentation
 */
import { appendFileSync, writeFileSync } from 'node:fs';

import type { LogFunction, LogLevel } from '../provider/api.js';

const LABEL: Record<LogLevel, string> = { info: 'INFO', warn: 'WARN', err: 'ERROR' };

function stamp(d: Date): string {
  const p = (n: number): string => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

/** A task log file; lines look like `2025-01-31 10:00:00 INFO: message` (vzdump's format). */
export class TaskLog {
  /** Lines written so far (without the trailing newline). */
  readonly lines: string[] = [];
  /** Warnings logged (messages). */
  readonly warnings: string[] = [];

  /**
   * @param path - File to write (created, truncated).
   * @param forward - Also receives each message (the job log), optional.
   */
  constructor(
    readonly path: string,
    private readonly forward?: LogFunction,
  ) {
    writeFileSync(path, '');
  }

  /** Writes a line; multi-line messages become several lines. */
  write(level: LogLevel, message: string): void {
    const level2: LogLevel = LABEL[level] ? level : 'info';
    const ts = stamp(new Date());
    let text = '';
    for (const part of String(message).split('\n')) {
      const line = `${ts} ${LABEL[level2]}: ${part}`;
      this.lines.push(line);
      text += `${line}\n`;
    }
    if (level2 === 'warn') this.warnings.push(String(message));
    try {
      appendFileSync(this.path, text);
    } catch {
      /* the log must never fail the backup */
    }
    try {
      this.forward?.(level2, String(message));
    } catch {
      /* idem */
    }
  }

  info(message: string): void {
    this.write('info', message);
  }
  warn(message: string): void {
    this.write('warn', message);
  }
  err(message: string): void {
    this.write('err', message);
  }
}

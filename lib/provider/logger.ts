/**
 * The provider's logger: a leveled logger over the job's log function ({@link createLogger}),
 * what `this.log` of the base classes is and what the runner writes task logs with.
 *
 * @packageDocumentation
 */
import type { LogFunction, LogLevel } from './api.js';

/**
 * A logger writing through a {@link LogFunction}: call it as the log function itself,
 * `log('info', message)`, or with one method per level, `log.info(message)`.
 */
export interface ProviderLogger {
  (level: LogLevel, message: string): void;
  info(message: string): void;
  warn(message: string): void;
  err(message: string): void;
  /** Any level. */
  log(level: LogLevel, message: string): void;
}

/**
 * Binds a logger to the job's log function. A log function that throws never breaks the caller:
 * the error is dropped (a log line is not worth failing a backup).
 *
 * @param log - The log function the provider was constructed with.
 * @param prefix - Optional prefix for each message (e.g. the provider name and `': '`).
 */
export function createLogger(log: LogFunction | undefined, prefix = ''): ProviderLogger {
  const write = (level: LogLevel, message: string): void => {
    try {
      log?.(level, prefix + message);
    } catch {
      /* a throwing sink must not fail the backup */
    }
  };
  return Object.assign((level: LogLevel, message: string) => write(level, message), {
    info: (m: string) => write('info', m),
    warn: (m: string) => write('warn', m),
    err: (m: string) => write('err', m),
    log: write,
  });
}

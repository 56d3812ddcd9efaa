/**
 * What one backup job hands the code that backs up each guest.
 *
 * @packageDocumentation
 */
import type { ProviderDriver } from '../provider/adapter.js';
import type { LogFunction } from '../provider/api.js';
import type { TaskLog } from './task-log.js';
import type { RunBackupJobOptions } from './types.js';

/** The running job: its options, the provider, the abort signal and the logs. */
export interface JobContext {
  opts: RunBackupJobOptions;
  driver: ProviderDriver;
  providerName: string;
  signal: AbortSignal;
  jobLog: LogFunction;
  tmpdir: string;
  startTime: number;
  /** Where provider log lines go while a guest runs. */
  setCurrent(log: TaskLog | undefined): void;
}

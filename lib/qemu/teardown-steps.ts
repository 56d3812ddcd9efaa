/**
 * Teardown that keeps going: a {@link StepRunner} runs each undo step, collects failures and
 * skips the QMP steps once QEMU is gone, and {@link removeLocalFiles} removes what an access left
 * on this host. Both backends tear down (and roll back a failed setup) with these.
 *
 * @packageDocumentation
 */
import { promises as fs } from 'node:fs';
import type { QmpClient } from '../qmp/client.js';
import { QmpClosedError } from '../qmp/errors.js';
import { BackupAccessError } from './errors.js';
import type { AccessState } from './state.js';

/**
 * Runs teardown steps, continuing after failures: errors are collected; a closed connection
 * makes the remaining QMP steps moot (they are skipped) but local cleanup still runs.
 */
export class StepRunner {
  /** Errors of failed steps. */
  readonly errors: Error[] = [];
  /** True once the QMP connection was found closed. */
  qemuGone = false;

  constructor(private readonly qmp: QmpClient) {
    if (qmp.closed) this.qemuGone = true;
  }

  /** Runs a QMP step unless QEMU is gone. */
  async qmpStep(what: string, fn: () => Promise<unknown>): Promise<void> {
    if (this.qemuGone || this.qmp.closed) {
      this.qemuGone = true;
      return;
    }
    try {
      await fn();
    } catch (err) {
      if (err instanceof QmpClosedError || this.qmp.closed) {
        this.qemuGone = true;
        return;
      }
      this.errors.push(err instanceof BackupAccessError ? err : new BackupAccessError(`${what} failed: ${(err as Error).message}`, { cause: err }));
    }
  }

  /** Runs a local step (files). */
  async localStep(what: string, fn: () => Promise<unknown>): Promise<void> {
    try {
      await fn();
    } catch (err) {
      this.errors.push(new BackupAccessError(`${what} failed: ${(err as Error).message}`, { cause: err }));
    }
  }

  /** Throws the collected errors as one {@link BackupAccessError}, if any. */
  throwIfFailed(context: string): void {
    const first = this.errors[0];
    if (!first) return;
    if (this.errors.length === 1) throw first;
    throw new BackupAccessError(`${context}: ${this.errors.map((e) => e.message).join('; ')}`, { cause: new AggregateError(this.errors) });
  }
}

/** Removes local files of an access (fleecing images, socket dir). */
export async function removeLocalFiles(runner: StepRunner, state: AccessState): Promise<void> {
  for (const d of state.devices) {
    await runner.localStep(`${d.device}: removing fleecing image ${d.fleecingPath}`, () => fs.rm(d.fleecingPath, { force: true }));
  }
  if (state.socketDir) {
    const dir = state.socketDir;
    await runner.localStep(`removing NBD socket dir ${dir}`, () => fs.rm(dir, { recursive: true, force: true }));
  }
}

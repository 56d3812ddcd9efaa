/**
 * Where a guest's backup spends its time: named steps timed on the monotonic clock, reported in
 * the job's result (`GuestOutcome.steps`) and in one line at the end of the task log.
 *
 * @packageDocumentation
 */
import { performance } from 'node:perf_hooks';

/**
 * The steps of a guest's backup, in the order they run. A step entered more than once adds up.
 *
 * - `prepare`: the provider's calls before the data (`backupStart`/`backup_init`, configs, mechanism)
 *   and the guest's temporary folder.
 * - `qmp-connect` (VMs): connecting to QEMU's monitor, or starting qemu-storage-daemon for a
 *   stopped VM (its start-up is in this step), and the device list when none was given.
 * - `setup` (VMs): the device lookup (block devices and nodes), the guest agent, and backup access
 *   setup (fleecing images, filters or `backup-access-setup`, NBD server and exports).
 * - `bitmap-query` (VMs): the provider's bitmap plan (`backup_vm_query_incremental`), the bitmaps
 *   it asks to drop, and QEMU's count of dirty bytes for the log.
 * - `provider`: the provider's `backupVm` / `backupContainer` (the copy and whatever the provider
 *   does to finish it: fsync, checksums, manifest).
 * - `teardown` (VMs): backup access teardown and the disconnect (or qemu-storage-daemon's stop).
 * - `finish`: the storage hooks (notes, protected, prune) and `backupCleanup`/`backup_cleanup`.
 * - `task-log`: the provider's `backupHandleLogFile` (not in the task log's own timing line).
 */
export const GUEST_STEPS = ['prepare', 'qmp-connect', 'setup', 'bitmap-query', 'provider', 'teardown', 'finish', 'task-log'] as const;

/** A step of {@link GUEST_STEPS}. */
export type GuestStep = (typeof GUEST_STEPS)[number];

/**
 * Milliseconds (monotonic clock, fractional) spent in each step a guest's backup reached, and
 * `total`, from the guest's start to its end (the steps are disjoint: their sum is at most it).
 */
export type GuestStepTimes = Partial<Record<GuestStep, number>> & { total: number };

/** Times the steps of one guest's backup. */
export class StepTimer {
  private readonly start = performance.now();
  private readonly spent = new Map<GuestStep, number>();

  /** Runs `fn` as (part of) `step`, counting its time whether it resolves or throws. */
  async time<T>(step: GuestStep, fn: () => Promise<T>): Promise<T> {
    const t = performance.now();
    try {
      return await fn();
    } finally {
      this.spent.set(step, (this.spent.get(step) ?? 0) + (performance.now() - t));
    }
  }

  /** The times so far, `total` up to now; rounded to microseconds. */
  times(): GuestStepTimes {
    const round = (ms: number): number => Math.round(ms * 1000) / 1000;
    const out: GuestStepTimes = { total: round(performance.now() - this.start) };
    for (const s of GUEST_STEPS) {
      const ms = this.spent.get(s);
      if (ms !== undefined) out[s] = Math.min(round(ms), out.total);
    }
    return out;
  }

  /** One line for the task log: `step times: prepare 1.2 ms, ..., total 123.4 ms`. */
  line(): string {
    const t = this.times();
    const parts = GUEST_STEPS.filter((s) => t[s] !== undefined).map((s) => `${s} ${t[s]!.toFixed(1)} ms`);
    return `step times: ${[...parts, `total ${t.total.toFixed(1)} ms`].join(', ')}`;
  }
}

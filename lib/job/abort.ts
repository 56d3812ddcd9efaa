/**
 * How the job runner waits on a provider while the job may be aborted: {@link raceAbort} for
 * hooks, {@link settleOnAbort} for the data calls that must stop before teardown runs.
 *
 * @packageDocumentation
 */
import { setTimeout as sleep } from 'node:timers/promises';

/** `e` as an Error (a provider may throw anything). */
export const toError = (e: unknown): Error => (e instanceof Error ? e : new Error(String(e)));

/**
 * Resolves with `promise`, or rejects with the signal's reason as soon as `signal` aborts (the
 * promise is left to settle on its own; its rejection is swallowed).
 */
export function raceAbort<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  promise.catch(() => undefined);
  if (signal.aborted) return Promise.reject(toError(signal.reason));
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(toError(signal.reason));
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(toError(e));
      },
    );
  });
}

/**
 * {@link raceAbort} for the provider's data calls (`backupVm`, `backupContainer`): on abort, the
 * provider (which got the signal) has up to `graceMs` to stop before this rejects, so that
 * teardown and cleanup never run while it still reads the export or writes its target.
 */
export async function settleOnAbort<T>(promise: Promise<T>, signal: AbortSignal, graceMs = 30_000): Promise<T> {
  try {
    return await raceAbort(promise, signal);
  } catch (err) {
    if (!signal.aborted) throw err;
    const timer = new AbortController();
    await Promise.race([promise.then(() => undefined, () => undefined), sleep(graceMs, undefined, { signal: timer.signal }).catch(() => undefined)]);
    timer.abort();
    throw err;
  }
}

/**
 * Errors of the provider API, the job runner and restore.
 *
 * Each class extends {@link PveBackupError}, has a stable `code` and typed fields. Match on `code`.
 *
 * @packageDocumentation
 */
import { PveBackupError } from '../errors.js';

/**
 * The provider declares an API version this runner cannot serve (code `ERR_PROVIDER_API_VERSION`).
 * Thrown before any provider method is called.
 */
export class ProviderApiVersionError extends PveBackupError {
  declare readonly code: 'ERR_PROVIDER_API_VERSION';
  /** What the provider declared (`undefined` when it declared nothing usable). */
  readonly apiVersion: unknown;
  /** The runner's current API version. */
  readonly current: number;
  /** How many versions before `current` the runner still serves. */
  readonly age: number;

  /**
   * @param apiVersion - The provider's declared `apiVersion`.
   * @param current - Runner's current version.
   * @param age - Runner's age.
   */
  constructor(apiVersion: unknown, current: number, age: number) {
    const range = age === 0 ? `${current}` : `${current - age} to ${current}`;
    let why: string;
    if (typeof apiVersion !== 'number' || !Number.isInteger(apiVersion)) {
      why = `the provider declares no integer apiVersion (got ${JSON.stringify(apiVersion)})`;
    } else if (apiVersion > current) {
      why = `the provider targets API version ${apiVersion}, newer than this runner; upgrade pve-backup-provider`;
    } else {
      why = `the provider targets API version ${apiVersion}, which this runner no longer serves; update the provider`;
    }
    super(`backup provider API version not supported: ${why} (supported: ${range})`, { code: 'ERR_PROVIDER_API_VERSION' });
    this.apiVersion = apiVersion;
    this.current = current;
    this.age = age;
  }
}

/** A provider method that was called is not implemented (code `ERR_NOT_IMPLEMENTED`). */
export class NotImplementedError extends PveBackupError {
  declare readonly code: 'ERR_NOT_IMPLEMENTED';
  /** The TypeScript method name, e.g. `backupNbd`. */
  readonly method: string;

  /**
   * @param method - Method name.
   * @param provider - Provider name, when known.
   */
  constructor(method: string, provider?: string) {
    super(`${provider ? `backup provider '${provider}': ` : ''}method '${method}' is not implemented`, { code: 'ERR_NOT_IMPLEMENTED' });
    this.method = method;
  }
}

/**
 * The provider asked for a mechanism the runner does not support for the guest type, or returned
 * none (code `ERR_MECHANISM`).
 */
export class MechanismError extends PveBackupError {
  declare readonly code: 'ERR_MECHANISM';
  /** Mechanism returned by the provider (`undefined` when it returned none). */
  readonly mechanism: string | undefined;
  /** Guest type concerned. */
  readonly vmtype: string;

  /**
   * @param message - What is wrong.
   * @param options - Mechanism and guest type.
   */
  constructor(message: string, options: { mechanism: string | undefined; vmtype: string }) {
    super(message, { code: 'ERR_MECHANISM' });
    this.mechanism = options.mechanism;
    this.vmtype = options.vmtype;
  }
}

/** A provider method returned something that breaks its contract (code `ERR_PROVIDER_RESULT`). */
export class ProviderResultError extends PveBackupError {
  declare readonly code: 'ERR_PROVIDER_RESULT';
  /** Method whose result was wrong. */
  readonly method: string;

  /**
   * @param method - Method name.
   * @param message - What is wrong with the result.
   */
  constructor(method: string, message: string) {
    super(`${method}: ${message}`, { code: 'ERR_PROVIDER_RESULT' });
    this.method = method;
  }
}

/**
 * The backup job was aborted: a signal, an `AbortSignal`, or a fundamental failure such as the
 * provider factory or `jobStart` failing (code `ERR_JOB_ABORTED`). `cause` holds the reason and
 * `result` what had been done until then.
 */
export class JobAbortedError extends PveBackupError {
  declare readonly code: 'ERR_JOB_ABORTED';
  /** Outcome of each guest up to the abort (guests not reached are `skipped`). */
  readonly result: unknown;

  /**
   * @param message - Why the job stopped.
   * @param options - Cause and the partial result.
   */
  constructor(message: string, options: { cause?: unknown; result?: unknown } = {}) {
    super(message, { code: 'ERR_JOB_ABORTED', cause: options.cause });
    this.result = options.result;
  }
}

/**
 * A storage hook run after a guest's backup failed where vzdump fails the guest: the protected
 * flag or pruning (code `ERR_STORAGE_HOOK`); `cause` is the provider's error.
 */
export class StorageHookError extends PveBackupError {
  declare readonly code: 'ERR_STORAGE_HOOK';
  /** Which hook failed. */
  readonly hook: 'protected' | 'prune';

  /**
   * @param message - What failed.
   * @param options - The hook and the cause.
   */
  constructor(message: string, options: { hook: 'protected' | 'prune'; cause?: unknown }) {
    super(message, { code: 'ERR_STORAGE_HOOK', cause: options.cause });
    this.hook = options.hook;
  }
}

/** A restore failed (code `ERR_RESTORE`); `cause` is the underlying error. */
export class RestoreError extends PveBackupError {
  declare readonly code: 'ERR_RESTORE';
  /** Device being restored, when the failure concerns one. */
  readonly device: string | undefined;

  /**
   * @param message - What failed.
   * @param options - Device and cause.
   */
  constructor(message: string, options: { device?: string; cause?: unknown } = {}) {
    super(message, { code: 'ERR_RESTORE', cause: options.cause });
    this.device = options.device;
  }
}

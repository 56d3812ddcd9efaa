/**
 * Options and results of the job runner.
 *
 * @packageDocumentation
 */
import type { QmpClient } from '../qmp/client.js';
import type { BackupProvider, GuestType, IdMapEntry, LogFunction, ProviderFactory, PruneOptions } from '../provider/api.js';
import type { GuestStepTimes } from './steps.js';

export type { GuestStep, GuestStepTimes } from './steps.js';

/** A VM to back up. */
export interface VmGuest {
  vmid: number;
  type: 'qemu';
  /**
   * A running QEMU: its QMP unix socket (connected for the backup, then closed), or a connected
   * {@link QmpClient} (used, left open; QEMU's monitor socket serves one client at a time). A
   * stopped VM: its disk images, on which the runner starts qemu-storage-daemon for the backup
   * (device names must match `[A-Za-z][A-Za-z0-9_-]{0,30}`).
   */
  qmp: string | QmpClient | { disks: Array<{ device: string; file: string; format: 'raw' | 'qcow2' }> };
  /** Raw guest configuration (the content of `qemu-server/<vmid>.conf`). */
  config: string;
  /** Raw firewall configuration, if the guest has one. */
  firewallConfig?: string;
  /**
   * Devices to back up: BlockBackend names (`drive-scsi0`), qdev ids (`virtio0`) or, on
   * qemu-storage-daemon, node names. Default: every writable inserted drive (running VM), every
   * disk (stopped VM).
   */
  devices?: string[];
  /** Guest agent socket: file systems are frozen around the point in time. */
  qga?: string;
  /**
   * Unix socket of an NBD server the QEMU process already runs (QEMU allows one per process, e.g.
   * qemu-storage-daemon started with `--nbd-server`): the backup exports are added to it. Absent:
   * backup access starts a server on a private socket and stops it afterwards.
   */
  nbdServer?: string;
}

/** A container to back up. */
export interface ContainerGuest {
  vmid: number;
  type: 'lxc';
  /** The container's file tree (a snapshot or the stopped container's mounted root). */
  rootdir: string;
  /** Raw guest configuration (the content of `lxc/<vmid>.conf`). */
  config: string;
  /** Raw firewall configuration, if the guest has one. */
  firewallConfig?: string;
  /** Id map: entries, or `lxc.idmap` values such as `u 0 100000 65536`. Absent: privileged. */
  idMap?: IdMapEntry[] | string[];
  /** Exclusion patterns (rsync style: leading `/` anchors at the root, `**` any depth). */
  excludePaths?: string[];
  /** Paths inside `rootdir` to back up, one per mount point; default `['.']`. */
  sources?: string[];
}

/** A guest of a backup job. */
export type Guest = VmGuest | ContainerGuest;

/** Options of {@link runBackupJob}. */
export interface RunBackupJobOptions {
  /** A provider of either API generation, or a factory (function or class) that constructs one. */
  provider: BackupProvider | ProviderFactory | (new (context: import('../provider/api.js').ProviderContext) => BackupProvider);
  /** Storage id of the provider's storage (prefixes bitmap ids, names the backup access target). */
  storeid: string;
  /** Storage configuration handed to a factory. */
  scfg?: Record<string, unknown>;
  /** Guests, backed up one after another in this order. */
  guests: Guest[];
  /** Bandwidth limit in bytes per second (0, `Infinity` or absent: none; negative: `ERR_INVALID_ARGUMENT`). */
  bandwidthLimit?: number;
  /** Fleecing images: directory (default: the guest's temporary directory) and format (default qcow2). */
  fleecing?: { dir?: string; format?: 'qcow2' | 'raw' };
  /** Directory for temporary files (configs, logs, sockets); default the OS temp dir. */
  tmpdir?: string;
  /** Keeps each guest's task log file here (default: removed once the provider handled it). */
  logDir?: string;
  /** The job's log: every task log line, and job-level lines. */
  log?: LogFunction;
  /** Aborts the job: the running guest takes the abort path, backup access is torn down. */
  signal?: AbortSignal;
  /** Take SIGINT/SIGTERM as an abort while the job runs (default false: a library leaves signals alone). */
  handleSignals?: boolean;
  /** Notes for each successful backup; `{{guestname}}`, `{{vmid}}`, `{{node}}`, `{{cluster}}` are expanded. */
  notesTemplate?: string;
  /** Mark each successful backup protected. */
  protected?: boolean;
  /** Retention to apply after each successful guest backup. */
  prune?: PruneOptions;
  /** Node name for the notes template (default: the host name). */
  node?: string;
  /** Cluster name for the notes template (default: empty). */
  cluster?: string;
  /** Backup access backend (default: detected). */
  backend?: 'auto' | 'proxmox' | 'upstream';
}

/** What happened to one guest. */
export interface GuestOutcome {
  vmid: number;
  type: GuestType;
  /** `ok`, `failed`, or `skipped` (not reached: the job was aborted before). */
  status: 'ok' | 'failed' | 'skipped';
  /** Archive name the provider chose. */
  archiveName?: string;
  /**
   * The backup's volume name, as the storage lists it and restore takes it: version 2
   * `backup/<archiveName>` (vzdump: `$volid = "${storeid}:backup/${archive_name}"`), version 1 the
   * target as the provider named it.
   */
  volname?: string;
  /** Size reported by the provider (V1 `backupGetTaskSize`, V2 `archiveSize`). */
  size?: number;
  /** Why it failed. */
  error?: Error;
  /** Warnings of the guest's task (log lines of level warn). */
  warnings: string[];
  /** The task log lines. */
  log: string[];
  /** Path of the task log file when `logDir` was given. */
  logFile?: string;
  /** Unix times (s). */
  startTime?: number;
  endTime?: number;
  /**
   * Where the guest's backup spent its time: milliseconds per step reached (`prepare`,
   * `qmp-connect`, `setup`, `bitmap-query`, `provider`, `teardown`, `finish`, `task-log`; see
   * `GUEST_STEPS`) and `total`. Present once the guest started (absent for a skipped guest).
   */
  steps?: GuestStepTimes;
}

/** Result of {@link runBackupJob}. */
export interface BackupJobResult {
  /** Every guest `ok` and the job ended cleanly. */
  ok: boolean;
  /** Unix time (s) the job started (handed to `jobStart` / `jobInit`). */
  startTime: number;
  /** One outcome per guest, in input order. */
  guests: GuestOutcome[];
  /** Error of `jobEnd` / `jobCleanup`, if it failed. */
  jobEndError?: Error;
}

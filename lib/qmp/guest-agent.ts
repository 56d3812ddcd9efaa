/**
 * QEMU guest agent (QGA) client for filesystem freeze and thaw.
 *
 * @packageDocumentation
 */
import net from 'node:net';
import { randomInt } from 'node:crypto';
import { InvalidArgumentError } from '../errors.js';
import { JsonLineDecoder, encodeMessage } from './codec.js';
import { QmpClosedError, QmpError, QmpProtocolError, QmpTimeoutError } from './errors.js';

/** Result of `guest-fsfreeze-status`. */
export type FsfreezeStatus = 'thawed' | 'frozen';

/** Options of {@link GuestAgentClient.connect}. */
export interface GuestAgentConnectOptions {
  /** Timeout for connecting and synchronising, and default per command. Default 10 000 ms. */
  timeoutMs?: number;
}

interface Waiter {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout | undefined;
  syncId?: number;
}

/**
 * A connection to the guest agent's socket (virtio-serial chardev on the host).
 *
 * The agent has no greeting and answers one command at a time, so commands are serialised. On
 * connect the client sends `guest-sync-delimited` and drops everything until the matching answer,
 * which discards stale replies left from an earlier user of the channel.
 */
export class GuestAgentClient {
  private readonly socket: net.Socket;
  private readonly decoder = new JsonLineDecoder();
  private readonly timeoutMs: number;
  private waiter: Waiter | undefined;
  private chain: Promise<unknown> = Promise.resolve();
  private closedFlag = false;
  /** Socket path this client is connected to. */
  readonly path: string;

  private constructor(socket: net.Socket, path: string, timeoutMs: number) {
    this.socket = socket;
    this.path = path;
    this.timeoutMs = timeoutMs;
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.fail(err));
    socket.on('close', () => this.fail(undefined));
  }

  /**
   * Connects to the agent socket and synchronises with `guest-sync-delimited`.
   *
   * @param path - Unix socket of the agent's chardev.
   * @param opts - `timeoutMs` (default 10 s).
   * @throws {@link QmpClosedError} when the socket cannot be opened, {@link QmpTimeoutError} when
   *   the agent does not answer (for example because it is not running in the guest).
   */
  static async connect(path: string, opts: GuestAgentConnectOptions = {}): Promise<GuestAgentClient> {
    if (typeof path !== 'string' || path === '') throw new InvalidArgumentError('guest agent socket path is empty');
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const socket = net.connect({ path });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', (err) =>
        reject(new QmpClosedError(`cannot connect to guest agent socket ${path}: ${err.message}`, { cause: err })),
      );
    });
    const client = new GuestAgentClient(socket, path, timeoutMs);
    try {
      await client.sync();
    } catch (err) {
      await client.close();
      throw err;
    }
    return client;
  }

  /** True once the connection is closed. */
  get closed(): boolean {
    return this.closedFlag;
  }

  /**
   * Runs a guest agent command and returns its `return` value. Commands are serialised.
   *
   * @param command - Agent command, e.g. `guest-ping`.
   * @param args - Arguments.
   * @param opts - `timeoutMs` for this command.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    const run = (): Promise<T> => this.send<T>(command, args, opts.timeoutMs ?? this.timeoutMs);
    const p = this.chain.then(run, run);
    this.chain = p.catch(() => undefined);
    return p;
  }

  /** `guest-fsfreeze-freeze`: freezes the guest's filesystems; returns how many were frozen. */
  fsfreezeFreeze(): Promise<number> {
    return this.execute<number>('guest-fsfreeze-freeze');
  }

  /** `guest-fsfreeze-thaw`: thaws the guest's filesystems; returns how many were thawed. */
  fsfreezeThaw(): Promise<number> {
    return this.execute<number>('guest-fsfreeze-thaw');
  }

  /** `guest-fsfreeze-status`. */
  fsfreezeStatus(): Promise<FsfreezeStatus> {
    return this.execute<FsfreezeStatus>('guest-fsfreeze-status');
  }

  /** Closes the connection; a pending command fails with {@link QmpClosedError}. Idempotent. */
  async close(): Promise<void> {
    if (this.socket.destroyed) {
      this.fail(undefined);
      return;
    }
    await new Promise<void>((resolve) => {
      this.socket.once('close', () => resolve());
      this.socket.end();
      setTimeout(() => this.socket.destroy(), 500).unref();
    });
  }

  private async sync(): Promise<void> {
    const id = randomInt(1, 2 ** 31);
    const got = await this.send<number>('guest-sync-delimited', { id }, this.timeoutMs, id);
    if (got !== id) throw new QmpProtocolError(`guest agent at ${this.path} answered guest-sync with ${String(got)}`);
  }

  private send<T>(command: string, args: Record<string, unknown> | undefined, timeoutMs: number, syncId?: number): Promise<T> {
    if (this.closedFlag) {
      return Promise.reject(new QmpClosedError(`guest agent connection ${this.path} is closed; cannot run ${command}`, { command }));
    }
    return new Promise<T>((resolve, reject) => {
      const waiter: Waiter = { command, resolve: resolve as (v: unknown) => void, reject, timer: undefined };
      if (syncId !== undefined) waiter.syncId = syncId;
      if (timeoutMs > 0) {
        waiter.timer = setTimeout(() => {
          if (this.waiter === waiter) this.waiter = undefined;
          reject(new QmpTimeoutError(command, timeoutMs));
        }, timeoutMs);
      }
      this.waiter = waiter;
      const msg: Record<string, unknown> = { execute: command };
      if (args !== undefined) msg.arguments = args;
      this.socket.write(encodeMessage(msg));
    });
  }

  private onData(chunk: Buffer): void {
    let msgs;
    try {
      msgs = this.decoder.push(chunk);
    } catch (err) {
      this.fail(err as Error);
      return;
    }
    for (const m of msgs) {
      const w = this.waiter;
      if (!w || !m.ok) continue; // stale or garbage output from before the sync
      const v = m.value;
      if (w.syncId !== undefined && v.return !== w.syncId) continue;
      if (!('return' in v) && !('error' in v)) continue;
      this.waiter = undefined;
      if (w.timer) clearTimeout(w.timer);
      if ('return' in v) w.resolve(v.return);
      else {
        const e = (v.error ?? {}) as { class?: unknown; desc?: unknown };
        w.reject(
          new QmpError({
            qmpClass: typeof e.class === 'string' ? e.class : 'GenericError',
            desc: typeof e.desc === 'string' ? e.desc : JSON.stringify(v.error),
            command: w.command,
          }),
        );
      }
    }
  }

  private fail(err: Error | undefined): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    const w = this.waiter;
    this.waiter = undefined;
    if (w) {
      if (w.timer) clearTimeout(w.timer);
      w.reject(
        new QmpClosedError(`guest agent connection ${this.path} closed while ${w.command} was pending`, { command: w.command, cause: err }),
      );
    }
    this.socket.destroy();
  }
}

/**
 * Runs `fn` with the guest's filesystems frozen through the agent (when one is given).
 *
 * Once `guest-fsfreeze-freeze` has succeeded, `guest-fsfreeze-thaw` is sent on every path: when
 * `fn` resolves, when it throws, and when the freeze reply itself failed after the agent may have
 * frozen (a timeout). A failing thaw after a failing `fn` does not hide `fn`'s error; a failing
 * thaw after a successful `fn` is thrown.
 *
 * @param qga - Guest agent client, or `undefined` to run `fn` without freezing.
 * @param fn - The work to do while frozen (keep it short).
 */
export async function withFrozenFilesystems<T>(qga: GuestAgentClient | undefined, fn: () => Promise<T>): Promise<T> {
  if (!qga) return fn();
  try {
    await qga.fsfreezeFreeze();
  } catch (err) {
    // A timeout may leave the guest frozen: thaw to be sure, then report the freeze failure.
    if (err instanceof QmpTimeoutError) await qga.fsfreezeThaw().catch(() => undefined);
    throw err;
  }
  let result: T;
  try {
    result = await fn();
  } catch (err) {
    await qga.fsfreezeThaw().catch(() => undefined);
    throw err;
  }
  await qga.fsfreezeThaw();
  return result;
}

/**
 * QMP client: connection, greeting, commands with ids, events.
 *
 * @packageDocumentation
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { InvalidArgumentError } from '../errors.js';
import { JsonLineDecoder, encodeMessage } from './codec.js';
import { QmpBusyError, QmpClosedError, QmpError, QmpProtocolError, QmpTimeoutError } from './errors.js';

/** Where to connect: a unix socket path, `{ path }`, or `{ host, port }` for TCP. */
export type QmpTarget = string | { path: string } | { host: string; port: number };

/** Options of {@link QmpClient.connect}. */
export interface QmpConnectOptions {
  /** Timeout for connecting, the greeting and `qmp_capabilities`, and the default per command. Default 30 000 ms. */
  timeoutMs?: number;
}

/** Options of {@link QmpClient.execute}. */
export interface QmpExecuteOptions {
  /** Timeout for this command in milliseconds; defaults to the client's timeout. `0` waits forever. */
  timeoutMs?: number;
  /** Device the command concerns; named in the error should the command fail. */
  device?: string;
}

/** An asynchronous QEMU event. */
export interface QmpEvent {
  /** Event name, e.g. `BLOCK_EXPORT_DELETED`. */
  event: string;
  /** Event data (an empty object when QEMU sent none). */
  data: Record<string, unknown>;
  /** QEMU's timestamp. */
  timestamp: { seconds: number; microseconds: number };
}

/** QEMU version from the QMP greeting. */
export interface QmpVersion {
  /** Major, minor and micro version numbers. */
  qemu: { major: number; minor: number; micro: number };
  /** Distribution suffix, e.g. `Debian 1:7.2+dfsg-7`. */
  package: string;
}

interface Pending {
  command: string;
  device: string | undefined;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout | undefined;
}

const DEFAULT_TIMEOUT_MS = 30_000;

/** Converts a connection target to `net.connect` options, validating it. */
function toConnectOptions(target: QmpTarget): net.NetConnectOpts {
  if (typeof target === 'string') {
    if (target === '') throw new InvalidArgumentError('QMP socket path is empty');
    return { path: target };
  }
  if ('path' in target) {
    if (typeof target.path !== 'string' || target.path === '') throw new InvalidArgumentError('QMP socket path is empty');
    return { path: target.path };
  }
  if (typeof target.host !== 'string' || !Number.isInteger(target.port) || target.port < 1 || target.port > 65535) {
    throw new InvalidArgumentError('QMP TCP target needs a host and a port in 1..65535');
  }
  return { host: target.host, port: target.port };
}

function describeTarget(target: QmpTarget): string {
  if (typeof target === 'string') return target;
  if ('path' in target) return target.path;
  return `${target.host}:${target.port}`;
}

/**
 * A connection to a QEMU monitor speaking QMP.
 *
 * Several commands may be in flight; replies are matched by id. When the connection closes, every
 * pending command fails at once with {@link QmpClosedError}; nothing waits forever unless asked to
 * (a per-command timeout of 0).
 *
 * Events are delivered to `on('event', listener)` listeners and to every iterator returned by
 * {@link QmpClient.events}. The client emits `'close'` (with the error, if any) once.
 */
export class QmpClient extends EventEmitter {
  /** QEMU version from the greeting. */
  readonly version: QmpVersion;
  /** Capabilities QEMU offered in the greeting (e.g. `oob`). */
  readonly capabilities: readonly string[];
  /** Human-readable description of where the client is connected. */
  readonly address: string;

  private readonly socket: net.Socket;
  private readonly pending = new Map<string, Pending>();
  private readonly defaultTimeoutMs: number;
  private nextId = 1;
  private closedFlag = false;
  private closeError: Error | undefined;
  private readonly closeWaiters: Array<() => void> = [];

  private constructor(socket: net.Socket, greeting: Record<string, unknown>, address: string, timeoutMs: number) {
    super();
    this.socket = socket;
    this.address = address;
    this.defaultTimeoutMs = timeoutMs;
    const qmp = (greeting.QMP ?? {}) as { version?: Partial<QmpVersion>; capabilities?: unknown };
    const v = qmp.version ?? {};
    this.version = {
      qemu: {
        major: Number(v.qemu?.major ?? 0),
        minor: Number(v.qemu?.minor ?? 0),
        micro: Number(v.qemu?.micro ?? 0),
      },
      package: typeof v.package === 'string' ? v.package : '',
    };
    this.capabilities = Array.isArray(qmp.capabilities) ? qmp.capabilities.map(String) : [];
  }

  /**
   * Connects, reads the greeting and negotiates capabilities (`qmp_capabilities`).
   *
   * @param target - Unix socket path, `{ path }` or `{ host, port }`.
   * @param opts - `timeoutMs` for the handshake and default for commands (default 30 s).
   * @throws {@link QmpClosedError} when the connection fails or closes during the handshake,
   *   {@link QmpProtocolError} (`ERR_QMP_NOT_QMP`) when the peer does not greet with QMP,
   *   {@link QmpBusyError} (`ERR_QMP_BUSY`) when it accepts but stays silent (a monitor busy with
   *   another client), {@link QmpTimeoutError} when `qmp_capabilities` is not answered.
   */
  static async connect(target: QmpTarget, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const address = describeTarget(target);
    const socket = net.connect(toConnectOptions(target));
    const decoder = new JsonLineDecoder();
    let greeting: Record<string, unknown>;
    try {
      greeting = await new Promise<Record<string, unknown>>((resolve, reject) => {
        const timer = timeoutMs > 0 ? setTimeout(() => fail(new QmpBusyError(address, timeoutMs)), timeoutMs) : undefined;
        const cleanup = (): void => {
          if (timer) clearTimeout(timer);
          socket.off('data', onData);
          socket.off('error', onError);
          socket.off('close', onClose);
        };
        const fail = (err: Error): void => {
          cleanup();
          reject(err);
        };
        const onError = (err: Error): void =>
          fail(new QmpClosedError(`cannot connect to QMP socket ${address}: ${err.message}`, { cause: err }));
        const onClose = (): void => fail(new QmpClosedError(`QMP socket ${address} closed before the greeting`));
        const onData = (chunk: Buffer): void => {
          let msgs;
          try {
            msgs = decoder.push(chunk);
          } catch (err) {
            fail(new QmpProtocolError(`${address} is not a QMP socket: message too long`, { cause: err }));
            return;
          }
          const first = msgs[0];
          if (!first) {
            // A greeting starts with '{': anything else (an NBD server's binary greeting has no
            // newline to wait for) is told at once instead of after the timeout.
            const head = decoder.pending.trimStart();
            if (head !== '' && !head.startsWith('{')) {
              const what = head.startsWith('NBDMAGIC') ? 'it is an NBD server' : `it sent ${JSON.stringify(head.slice(0, 40))}`;
              fail(new QmpProtocolError(`${address} is not a QMP socket: ${what}`));
            }
            return;
          }
          if (!first.ok || typeof first.value.QMP !== 'object' || first.value.QMP === null) {
            const text = first.ok ? JSON.stringify(first.value) : first.line;
            fail(new QmpProtocolError(`${address} is not a QMP socket: expected a QMP greeting, got ${text.slice(0, 200)}`));
            return;
          }
          cleanup();
          if (msgs.length > 1 || decoder.pending.trim() !== '') {
            fail(new QmpProtocolError(`${address} sent data before qmp_capabilities`));
            return;
          }
          resolve(first.value);
        };
        socket.on('data', onData);
        socket.on('error', onError);
        socket.on('close', onClose);
      });
    } catch (err) {
      socket.destroy();
      throw err;
    }
    const client = new QmpClient(socket, greeting, address, timeoutMs);
    client.attach(decoder);
    try {
      await client.execute('qmp_capabilities', {}, { timeoutMs });
    } catch (err) {
      await client.close();
      throw err;
    }
    return client;
  }

  /** True once the connection has closed (by {@link QmpClient.close}, QEMU or an error). */
  get closed(): boolean {
    return this.closedFlag;
  }

  /**
   * Sends a command and resolves with its `return` value.
   *
   * @typeParam T - Expected type of the return value (not checked).
   * @param command - QMP command name (e.g. `query-block`).
   * @param args - Arguments, sent as `arguments` when given.
   * @param opts - Per-command timeout and the device to name in errors.
   * @throws {@link QmpError} when QEMU answers with an error, {@link QmpClosedError} when the
   *   connection closes first, {@link QmpTimeoutError} when the timeout expires.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: QmpExecuteOptions = {}): Promise<T> {
    if (typeof command !== 'string' || !/^[A-Za-z_][A-Za-z0-9_-]*$/.test(command)) {
      return Promise.reject(new InvalidArgumentError(`invalid QMP command name ${JSON.stringify(command)}`));
    }
    if (this.closedFlag) {
      return Promise.reject(
        new QmpClosedError(`QMP connection to ${this.address} is closed; cannot run ${command}`, { command, cause: this.closeError }),
      );
    }
    const id = `pvebp-${this.nextId++}`;
    const timeoutMs = opts.timeoutMs ?? this.defaultTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const entry: Pending = {
        command,
        device: opts.device,
        resolve: resolve as (value: unknown) => void,
        reject,
        timer: undefined,
      };
      if (timeoutMs > 0) {
        entry.timer = setTimeout(() => {
          // A late reply finds no entry and is dropped.
          this.pending.delete(id);
          reject(new QmpTimeoutError(command, timeoutMs));
        }, timeoutMs);
      }
      this.pending.set(id, entry);
      const message: Record<string, unknown> = { execute: command, id };
      if (args !== undefined) message.arguments = args;
      this.socket.write(encodeMessage(message));
    });
  }

  /**
   * Waits for the next event matching `name` (and `predicate`, when given).
   *
   * @param name - Event name.
   * @param opts - `predicate` on the event data, `timeoutMs` (default: the client's timeout).
   * @throws {@link QmpTimeoutError} or {@link QmpClosedError}.
   */
  waitForEvent(
    name: string,
    opts: { predicate?: (data: Record<string, unknown>) => boolean; timeoutMs?: number } = {},
  ): Promise<QmpEvent> {
    const timeoutMs = opts.timeoutMs ?? this.defaultTimeoutMs;
    return new Promise((resolve, reject) => {
      if (this.closedFlag) {
        reject(new QmpClosedError(`QMP connection to ${this.address} is closed; cannot wait for ${name}`));
        return;
      }
      let timer: NodeJS.Timeout | undefined;
      const done = (): void => {
        if (timer) clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      const onEvent = (ev: QmpEvent): void => {
        if (ev.event !== name || (opts.predicate && !opts.predicate(ev.data))) return;
        done();
        resolve(ev);
      };
      const onClose = (): void => {
        done();
        reject(new QmpClosedError(`QMP connection to ${this.address} closed while waiting for ${name}`));
      };
      if (timeoutMs > 0) {
        timer = setTimeout(() => {
          done();
          reject(new QmpTimeoutError(`event ${name}`, timeoutMs));
        }, timeoutMs);
      }
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }

  /**
   * Events as an async iterator. Each call returns a new iterator that sees the events arriving
   * after the call; it ends when the connection closes or when the loop is left.
   */
  events(): AsyncIterable<QmpEvent> {
    const queue: QmpEvent[] = [];
    let wake: (() => void) | undefined;
    let ended = this.closedFlag;
    const onEvent = (ev: QmpEvent): void => {
      queue.push(ev);
      wake?.();
    };
    const onClose = (): void => {
      ended = true;
      wake?.();
    };
    this.on('event', onEvent);
    this.on('close', onClose);
    const stop = (): void => {
      ended = true;
      this.off('event', onEvent);
      this.off('close', onClose);
      wake?.();
    };
    const iterator: AsyncIterator<QmpEvent> = {
      next: async (): Promise<IteratorResult<QmpEvent>> => {
        for (;;) {
          const ev = queue.shift();
          if (ev) return { value: ev, done: false };
          if (ended) {
            stop();
            return { value: undefined, done: true };
          }
          await new Promise<void>((r) => (wake = r));
          wake = undefined;
        }
      },
      return: async (): Promise<IteratorResult<QmpEvent>> => {
        stop();
        queue.length = 0;
        return { value: undefined, done: true };
      },
    };
    return { [Symbol.asyncIterator]: () => iterator };
  }

  /**
   * Closes the connection. Pending commands fail with {@link QmpClosedError}. Idempotent.
   */
  async close(): Promise<void> {
    if (this.closedFlag && this.socket.destroyed) return;
    await new Promise<void>((resolve) => {
      this.closeWaiters.push(resolve);
      this.socket.end();
      // Do not wait for a peer that never answers the FIN.
      setTimeout(() => this.socket.destroy(), 1000).unref();
      if (this.closedFlag) resolve();
    });
  }

  private attach(decoder: JsonLineDecoder): void {
    this.socket.on('data', (chunk: Buffer) => {
      let msgs;
      try {
        msgs = decoder.push(chunk);
      } catch (err) {
        this.fail(new QmpProtocolError(`QMP peer ${this.address} sent an over-long message`, { cause: err }));
        return;
      }
      for (const msg of msgs) {
        if (!msg.ok) {
          this.fail(new QmpProtocolError(`QMP peer ${this.address} sent invalid JSON: ${msg.line.slice(0, 200)}`, { cause: msg.error }));
          return;
        }
        this.dispatch(msg.value);
      }
    });
    this.socket.on('error', (err) => this.fail(err));
    this.socket.on('close', () => this.fail(undefined));
  }

  private dispatch(msg: Record<string, unknown>): void {
    if (typeof msg.event === 'string') {
      const ts = (msg.timestamp ?? {}) as { seconds?: number; microseconds?: number };
      const ev: QmpEvent = {
        event: msg.event,
        data: (msg.data && typeof msg.data === 'object' ? msg.data : {}) as Record<string, unknown>,
        timestamp: { seconds: Number(ts.seconds ?? 0), microseconds: Number(ts.microseconds ?? 0) },
      };
      // A throwing listener must not break the connection.
      try {
        this.emit('event', ev);
      } catch (err) {
        queueMicrotask(() => {
          throw err;
        });
      }
      return;
    }
    const id = typeof msg.id === 'string' ? msg.id : undefined;
    const entry = id === undefined ? undefined : this.pending.get(id);
    if (!entry || id === undefined) return; // reply to a timed-out command, or unsolicited
    this.pending.delete(id);
    if (entry.timer) clearTimeout(entry.timer);
    if ('return' in msg) {
      entry.resolve(msg.return);
    } else {
      const e = (msg.error ?? {}) as { class?: unknown; desc?: unknown };
      entry.reject(
        new QmpError({
          qmpClass: typeof e.class === 'string' ? e.class : 'GenericError',
          desc: typeof e.desc === 'string' ? e.desc : JSON.stringify(msg.error),
          command: entry.command,
          ...(entry.device !== undefined ? { device: entry.device } : {}),
        }),
      );
    }
  }

  private fail(err: Error | undefined): void {
    if (!this.closedFlag) {
      this.closedFlag = true;
      this.closeError = err;
      const reason = err ? `: ${err.message}` : '';
      for (const [id, entry] of this.pending) {
        this.pending.delete(id);
        if (entry.timer) clearTimeout(entry.timer);
        entry.reject(
          new QmpClosedError(`QMP connection to ${this.address} closed while ${entry.command} was pending${reason}`, {
            command: entry.command,
            cause: err,
          }),
        );
      }
      this.socket.destroy();
      this.emit('close', err);
    }
    if (this.socket.destroyed) {
      for (const w of this.closeWaiters.splice(0)) w();
    }
  }
}

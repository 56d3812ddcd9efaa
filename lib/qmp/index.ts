/**
 * QMP and guest agent clients.
 *
 * @packageDocumentation
 */
export { QmpClient } from './client.js';
export type { QmpConnectOptions, QmpEvent, QmpExecuteOptions, QmpTarget, QmpVersion } from './client.js';
export { QmpBusyError, QmpClosedError, QmpError, QmpProtocolError, QmpTimeoutError } from './errors.js';
export type { QmpErrorDetails } from './errors.js';
export { GuestAgentClient, withFrozenFilesystems } from './guest-agent.js';
export type { FsfreezeStatus } from './guest-agent.js';
export * from './commands.js';

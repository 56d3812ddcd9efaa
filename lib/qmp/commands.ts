/**
 * A small typed layer over the QMP commands used by backup access. Unknown commands can still be
 * sent raw with {@link QmpClient.execute}.
 *
 * @packageDocumentation
 */
import type { QmpClient } from './client.js';
import { QmpError } from './errors.js';

/** A dirty bitmap as listed by `query-block` / `query-named-block-nodes`. */
export interface QmpDirtyBitmapInfo {
  /** Bitmap name. */
  name: string;
  /** Dirty bytes. */
  count: number;
  /** Granularity in bytes. */
  granularity: number;
  /** Whether the bitmap records writes (QEMU >= 4.0). */
  recording?: boolean;
  /** Whether the bitmap is in use by an operation (export, job, filter). */
  busy?: boolean;
  /** Whether the bitmap is stored in the image (qcow2). */
  persistent?: boolean;
  /** Whether the stored bitmap is inconsistent (not saved cleanly). */
  inconsistent?: boolean;
}

/** A block node as listed by `query-named-block-nodes` (the fields used here). */
export interface QmpBlockNodeInfo {
  /** Node name (may be auto-generated, starting with `#`). */
  'node-name': string;
  /** Driver, e.g. `qcow2`, `raw`, `file`, `copy-before-write`. */
  drv: string;
  /** File name or JSON description of the node. */
  file: string;
  /** Whether the node is read-only. */
  ro: boolean;
  /** Image information. */
  image?: { 'virtual-size'?: number; filename?: string; format?: string };
  /** Dirty bitmaps attached to the node. */
  'dirty-bitmaps'?: QmpDirtyBitmapInfo[];
}

/** An entry of `query-block` (the fields used here). */
export interface QmpBlockInfo {
  /** BlockBackend name (`drive-scsi0` with `-drive`), empty for `-blockdev` devices. */
  device: string;
  /** QOM path of the device model, e.g. `/machine/peripheral/virtio0/virtio-backend`. */
  qdev?: string;
  /** Inserted medium; absent when empty. */
  inserted?: QmpBlockNodeInfo;
}

/** An entry of `query-block-exports`. */
export interface QmpBlockExportInfo {
  /** Export id. */
  id: string;
  /** Export type, e.g. `nbd`. */
  type: string;
  /** Exported node. */
  'node-name': string;
  /** True while the export is being removed. */
  'shutting-down': boolean;
}

/** `query-block`. */
export function queryBlock(qmp: QmpClient): Promise<QmpBlockInfo[]> {
  return qmp.execute<QmpBlockInfo[]>('query-block');
}

/** `query-named-block-nodes` with `flat: true`. */
export function queryNamedBlockNodes(qmp: QmpClient): Promise<QmpBlockNodeInfo[]> {
  return qmp.execute<QmpBlockNodeInfo[]>('query-named-block-nodes', { flat: true });
}

/** `query-block-exports`. */
export function queryBlockExports(qmp: QmpClient): Promise<QmpBlockExportInfo[]> {
  return qmp.execute<QmpBlockExportInfo[]>('query-block-exports');
}

/** The names of every command QEMU supports (`query-commands`). */
export async function queryCommands(qmp: QmpClient): Promise<Set<string>> {
  const list = await qmp.execute<Array<{ name: string }>>('query-commands');
  return new Set(list.map((c) => c.name));
}

/** `blockdev-del` of one node; the error names the node. */
export async function blockdevDel(qmp: QmpClient, nodeName: string): Promise<void> {
  await qmp.execute('blockdev-del', { 'node-name': nodeName }, { device: nodeName });
}

/** True when `err` is a {@link QmpError} (QEMU answered with an error). */
export function isQmpError(err: unknown): err is QmpError {
  return err instanceof QmpError;
}

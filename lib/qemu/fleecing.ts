/**
 * Fleecing images: checking the folder they go in, creating an image of a disk's size, and
 * attaching it to QEMU as the copy-before-write filter's target. Both backends use these.
 *
 * @packageDocumentation
 */
import { randomBytes } from 'node:crypto';
import { constants as fsc, promises as fs } from 'node:fs';
import path from 'node:path';
import type { QmpClient } from '../qmp/client.js';
import { BackupAccessError, deviceError } from './errors.js';
import { NAME_PREFIX } from './names.js';

/** Checks that `dir` is an absolute, existing, writable directory (by creating a probe file). */
export async function checkFleecingDir(dir: unknown): Promise<string> {
  if (typeof dir !== 'string' || !path.isAbsolute(dir) || dir.includes('\0')) {
    throw new BackupAccessError(`fleecing dir must be an absolute path, got ${JSON.stringify(dir)}`);
  }
  const resolved = path.resolve(dir);
  let st;
  try {
    st = await fs.stat(resolved);
  } catch (err) {
    throw new BackupAccessError(`fleecing dir ${resolved} cannot be used: ${(err as Error).message}`, { cause: err });
  }
  if (!st.isDirectory()) throw new BackupAccessError(`fleecing dir ${resolved} is not a directory`);
  // Random, so that setups checking the same folder at once do not collide on the probe's name.
  const probe = path.join(resolved, `.${NAME_PREFIX}-probe-${process.pid}-${randomBytes(6).toString('hex')}`);
  try {
    const fh = await fs.open(probe, fsc.O_CREAT | fsc.O_EXCL | fsc.O_WRONLY, 0o600);
    await fh.close();
    await fs.rm(probe, { force: true });
  } catch (err) {
    throw new BackupAccessError(`fleecing dir ${resolved} is not writable: ${(err as Error).message}`, { cause: err });
  }
  return resolved;
}

/** Cluster size of the fleecing images (qemu-img's default for qcow2). */
const CLUSTER = 65536;

/**
 * The metadata of an empty qcow2 v3 image of `size` bytes, as `qemu-img create -f qcow2` lays it
 * out: header (cluster 0), refcount table (cluster 1), refcount block (cluster 2), L1 table
 * (cluster 3 on), 64 KiB clusters, 16-bit refcounts, no extensions. Written here rather than by a
 * `qemu-img` process, whose start-up was half of a backup's access setup; `qemu-img check` and
 * QEMU itself take it (test/backup-access-fleecing.test.ts).
 *
 * @returns The byte ranges to write and the file's length (the rest is zeros).
 */
export function emptyQcow2(size: number): { writes: Array<[number, Buffer]>; length: number } {
  if (!Number.isSafeInteger(size) || size <= 0 || size % 512 !== 0) throw new RangeError(`a qcow2 image size must be a positive multiple of 512, got ${size}`);
  const l1Entries = Math.ceil(size / (CLUSTER * (CLUSTER / 8))); // one L2 table maps 512 MiB
  const l1Clusters = Math.max(1, Math.ceil((l1Entries * 8) / CLUSTER));
  const clusters = 3 + l1Clusters;
  if (clusters > CLUSTER / 2) throw new RangeError(`image of ${size} bytes too large for one refcount block`);
  const header = Buffer.alloc(112);
  header.write('QFI\xfb', 0, 'latin1');
  header.writeUInt32BE(3, 4); // version
  header.writeUInt32BE(16, 20); // cluster_bits
  header.writeBigUInt64BE(BigInt(size), 24);
  header.writeUInt32BE(l1Entries, 36); // l1_size
  header.writeBigUInt64BE(BigInt(3 * CLUSTER), 40); // l1_table_offset
  header.writeBigUInt64BE(BigInt(CLUSTER), 48); // refcount_table_offset
  header.writeUInt32BE(1, 56); // refcount_table_clusters
  header.writeUInt32BE(4, 96); // refcount_order: 16-bit refcounts
  header.writeUInt32BE(104, 100); // header_length; an end-of-extensions marker (zeros) follows
  const table = Buffer.alloc(8);
  table.writeBigUInt64BE(BigInt(2 * CLUSTER)); // the one refcount block
  const refcounts = Buffer.alloc(2 * clusters);
  for (let i = 0; i < clusters; i++) refcounts.writeUInt16BE(1, 2 * i);
  return { writes: [[0, header], [CLUSTER, table], [2 * CLUSTER, refcounts]], length: clusters * CLUSTER };
}

/** Creates a fleecing image of `size` bytes (claiming the name exclusively first). */
export async function createFleecingImage(device: string, file: string, format: 'qcow2' | 'raw', size: number): Promise<void> {
  try {
    const fh = await fs.open(file, fsc.O_CREAT | fsc.O_EXCL | fsc.O_WRONLY, 0o600);
    try {
      if (format === 'raw') {
        await fh.truncate(size);
      } else {
        const image = emptyQcow2(size);
        for (const [offset, data] of image.writes) await fh.write(data, 0, data.length, offset);
        await fh.truncate(image.length);
      }
    } finally {
      await fh.close();
    }
  } catch (err) {
    await fs.rm(file, { force: true }).catch(() => undefined);
    throw new BackupAccessError(`${device}: creating fleecing image ${file} failed: ${(err as Error).message}`, { device, cause: err });
  }
}

/** `blockdev-add` of a fleecing image (file node below a format node). */
export async function addFleecingNodes(
  qmp: QmpClient,
  device: string,
  d: { fleecingPath: string; fleecingFormat: 'qcow2' | 'raw'; fleecingNode: string; fleecingFileNode: string },
): Promise<void> {
  try {
    await qmp.execute(
      'blockdev-add',
      {
        driver: d.fleecingFormat,
        'node-name': d.fleecingNode,
        discard: 'unmap',
        file: { driver: 'file', filename: d.fleecingPath, 'node-name': d.fleecingFileNode, discard: 'unmap' },
      },
      { device },
    );
  } catch (err) {
    throw deviceError(device, 'attaching the fleecing image', err);
  }
}

/**
 * Backups written straight into a chunk store (docs/chunk-store.md), without a VM: a manifest of
 * one 1 GiB VM disk whose fixed index names the given chunks first and zero chunks after them,
 * and the guest configuration as a blob. The chunks are real chunk objects (the native encoder;
 * encrypted with the store's key), short ones: enough for list, prune, delete and verify, not a
 * disk to restore.
 */
import { createHash } from 'node:crypto';

import { encodeBlob } from '../../lib/chunk-provider/blob.js';
import { chunkKey, type ChunkStore, type UnsignedManifest } from '../../lib/chunk-provider/store.js';

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** A disk of 1 GiB: 256 chunks of 4 MiB. */
const SIZE = 1 << 30;
const CHUNK = 4 << 20;

/**
 * Stores `chunks` (plain contents) as chunk objects: each one's digest is what its header
 * records (SHA-256 of the content; with the store's key, the keyed digest).
 * @returns The digests, in order.
 */
export async function putChunks(store: ChunkStore, chunks: Buffer[]): Promise<Buffer[]> {
  const digests: Buffer[] = [];
  for (const c of chunks) {
    const object = encodeBlob(c, store.key);
    const digest = Buffer.from(object.subarray(16, 48));
    await store.objects.put(chunkKey(digest), object);
    digests.push(digest);
  }
  return digests;
}

/**
 * A backup `volname` of `ctime` whose disk `drive-scsi0` names `digests` first (stored already,
 * e.g. by {@link putChunks}; shared with other backups as deduplication shares them), then zero
 * chunks.
 */
export async function putBackup(store: ChunkStore, volname: string, ctime: number, digests: Buffer[] = []): Promise<void> {
  const n = SIZE / CHUNK;
  if (digests.length > n) throw new Error(`a 1 GiB disk has ${n} chunks, not ${digests.length}`);
  const head = Buffer.alloc(24);
  head.write('PBPFIDX\x01', 0, 'latin1');
  head.writeBigUInt64LE(BigInt(SIZE), 8);
  head.writeUInt32LE(CHUNK, 16);
  const body = Buffer.concat([head, ...digests, Buffer.alloc((n - digests.length) * 32)]);
  const index = Buffer.concat([body, createHash('sha256').update(body).digest()]);
  await store.objects.put(store.objectKey(volname, 'drive-scsi0.fidx'), index);
  const conf = await store.putBlob(volname, 'guest.conf.blob', Buffer.from(`name: ${volname}\n`));
  const p = store.parseVolname(volname);
  const m: UnsignedManifest = {
    format: 'pve-backup-provider/chunks',
    version: 1,
    volname,
    vmid: p.vmid,
    vmtype: p.vmtype,
    ctime,
    status: 'ok',
    keyFingerprint: store.key?.fingerprint ?? null,
    devices: { 'drive-scsi0': { index: 'drive-scsi0.fidx', size: SIZE, bitmapMode: 'new', bytesRead: 0, chunksUploaded: Math.max(1, digests.length), chunksReused: 0, chunksZero: n - Math.max(1, digests.length) } },
    archive: null,
    files: { 'drive-scsi0.fidx': { size: index.length, sha256: sha(index) }, 'guest.conf.blob': conf },
  };
  await store.writeManifest(m);
}

/**
 * Shared by the DirectoryProvider tests: a qemu-storage-daemon disk whose content the test
 * tracks, the VM guest that backs it up, and a restore-and-compare check.
 */
import { openSync, closeSync, writeSync } from 'node:fs';
import { readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';

import { expect } from 'vitest';

import { restoreVm, type BackupProvider, type DirectoryStore, type VmGuest } from '../../lib/index.js';
import { hashFile, manifestChecksum, type Manifest } from '../../lib/directory-provider/layout.js';
import { expectSameBytes, layerMap } from './images.js';
import { nbdWrite, startStorageDaemon, type QemuInstance } from './qemu.js';

const MiB = 2 ** 20;

/** A qemu-storage-daemon disk and what the test knows its content to be. */
export class Disk {
  readonly content: Buffer;
  constructor(
    readonly q: QemuInstance,
    size: number,
  ) {
    this.content = Buffer.alloc(size);
  }
  get live(): string {
    return `nbd+unix:///live0?socket=${this.q.nbdPath!}`;
  }
  async write(pattern: number, offset: number, length: number): Promise<void> {
    await nbdWrite(this.live, pattern, offset, length);
    this.content.fill(pattern, offset, offset + length);
  }
  snapshot(): Buffer {
    return Buffer.from(this.content);
  }
}

export async function startDisk(size = 8 * MiB): Promise<Disk> {
  return new Disk(await startStorageDaemon({ size }), size);
}

export function vmGuest(d: Disk, vmid = 100): VmGuest {
  return { vmid, type: 'qemu', qmp: d.q.qmp, nbdServer: d.q.nbdPath!, devices: ['disk0'], config: `name: vm${vmid}\n`, firewallConfig: '[OPTIONS]\nenable: 1\n' };
}

/** Restores `volname` and compares with `expected`. */
export async function expectRestores(provider: BackupProvider, volname: string, expected: Buffer, scratch: string): Promise<void> {
  const target = path.join(scratch, `${volname.replace(/\//g, '_')}.raw`);
  await rm(target, { force: true });
  const r = await restoreVm({ provider, volname, storeid: 'dir1', targets: { disk0: target } });
  expect(r.devices).toEqual([{ device: 'disk0', size: expected.length, target }]);
  expectSameBytes(await readFile(target), expected, volname);
  await rm(target, { force: true });
}

/**
 * Overwrites two bytes of the first data cluster a qcow2 image itself stores (found with
 * `qemu-img map` of the image alone, without its backing file): a change of content, which the
 * image's content digests must catch. Returns the guest offset of the damaged cluster.
 */
export function damageImageData(image: string): number {
  const extent = layerMap(image).find((e) => e.data && e.offset !== undefined);
  if (!extent) throw new Error(`${image} stores no data cluster`);
  const fd = openSync(image, 'r+');
  try {
    writeSync(fd, Buffer.from([0xde, 0xad]), 0, 2, extent.offset! + 100);
  } finally {
    closeSync(fd);
  }
  return extent.start;
}

/**
 * Rewrites a backup's manifest as manifest version 1 wrote it: every file by its SHA-256, no
 * digest files (a store written before content digests).
 */
export async function asManifestVersion1(store: DirectoryStore, volname: string): Promise<void> {
  const dir = store.backupDir(volname);
  const m = await store.readManifest(volname);
  const files: Manifest['files'] = {};
  for (const [name, f] of Object.entries(m.files)) {
    if (name.endsWith('.digests')) continue;
    files[name] = 'digests' in f ? await hashFile(path.join(dir, name)) : f;
    if ('digests' in f) await rm(path.join(dir, f.digests));
  }
  const { checksum: _c, ...rest } = m;
  const v1 = { ...rest, version: 1, files };
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ ...v1, checksum: manifestChecksum(v1) }));
}

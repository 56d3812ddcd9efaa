/**
 * Content digests of qcow2 images: recorded by the qcow2 target of `copyExtents` while it writes
 * (`digests: true`), computed for an image `qemu-img` made (`digestImage`), and checked
 * (`checkImageDigests`): an image matches its digests until a byte of it changes, and then the
 * problem names the image and the guest range. Against real qemu-storage-daemon, qemu-img and
 * qemu-io.
 */
import { createHash } from 'node:crypto';
import { copyFileSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { DirectoryStoreError } from '../lib/directory-provider/errors.js';
import { checkImageDigests, copyExtents, digestImage, InvalidArgumentError, NbdError } from '../lib/index.js';
import { createImage, qemuIo } from './helpers/images.js';
import { useCleanups } from './helpers/nbd-servers.js';
import { nbdWrite, startStorageDaemon, stopAll } from './helpers/qemu.js';

const MiB = 2 ** 20;
const BLOCK = 4 * MiB; // 64 clusters of 64 KiB: the range one digest record covers
const { scratch } = useCleanups();
afterEach(stopAll);

const sha256 = (file: string): string => createHash('sha256').update(readFileSync(file)).digest('hex');

/** A qemu-storage-daemon disk with data in blocks 0, 2 and 3, served over NBD. */
async function liveDisk(): Promise<string> {
  const q = await startStorageDaemon({ size: 20 * MiB });
  const uri = `nbd+unix:///live0?socket=${q.nbdPath!}`;
  await nbdWrite(uri, 0x11, 0, MiB);
  await nbdWrite(uri, 0x22, 2 * BLOCK + 64 * 1024, 300 * 1024);
  await nbdWrite(uri, 0x33, 3 * BLOCK + 5000, 7000);
  return uri;
}

describe('digests recorded while a qcow2 image is written', () => {
  it('match the image until one of its data bytes changes, and then name the image and the range', async () => {
    const uri = await liveDisk();
    const dir = scratch();
    const image = join(dir, 'disk.qcow2');
    const summary = await copyExtents({ uri, target: 'qcow2', path: image, digests: true });
    expect(summary.digests).toEqual({ file: `${image}.digests`, sha256: sha256(`${image}.digests`) });
    expect(statSync(`${image}.digests`).mode & 0o777).toBe(0o600);
    expect(await checkImageDigests(image, `${image}.digests`)).toEqual([]);

    // The same digests as a read of the finished image computes (a copy, so the file differs).
    const copy = join(dir, 'copy.qcow2');
    copyFileSync(image, copy);
    const read = await digestImage(copy);
    expect(read).toEqual({ digestsFile: `${copy}.digests`, digestsSha256: summary.digests!.sha256, records: 3 });

    // One data byte changed in block 2 (written in place: the cluster is allocated).
    qemuIo(image, 'qcow2', [`write -P 0x55 ${2 * BLOCK + 128 * 1024} 512`]);
    expect(await checkImageDigests(image, `${image}.digests`)).toEqual([
      `${image}: bytes ${2 * BLOCK}..${3 * BLOCK}: content does not match its digest`,
    ]);
    // A cluster where none was written (block 4): found too.
    qemuIo(copy, 'qcow2', [`write -P 0x55 ${4 * BLOCK} 512`]);
    expect(await checkImageDigests(copy, `${copy}.digests`)).toEqual([
      `${copy}: bytes ${4 * BLOCK}..${5 * BLOCK}: stores clusters where none were recorded`,
    ]);
  });

  it('without digests: no file and no summary field; other targets refuse the option', async () => {
    const uri = await liveDisk();
    const dir = scratch();
    const image = join(dir, 'plain.qcow2');
    const summary = await copyExtents({ uri, target: 'qcow2', path: image });
    expect(summary.digests).toBeUndefined();
    expect(() => statSync(`${image}.digests`)).toThrow();
    for (const target of ['raw', 'null'] as const) {
      const err = await copyExtents({ uri, target, path: join(dir, 'x.raw'), digests: true }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(InvalidArgumentError);
    }
  });
});

describe('digestImage and checkImageDigests', () => {
  it('digest an overlay qemu-img made (data and zero clusters over a backing file) as the check reads it', async () => {
    const dir = scratch();
    const base = join(dir, 'base.qcow2');
    const over = join(dir, 'over.qcow2');
    createImage(base, 16 * MiB, 'qcow2');
    qemuIo(base, 'qcow2', ['write -P 0x61 0 16M']);
    createImage(over, 16 * MiB, 'qcow2', ['-b', base, '-F', 'qcow2']);
    qemuIo(over, 'qcow2', ['write -P 0x62 1M 100k', 'write -z 5M 1M', 'write -P 0x63 13M 4k', 'write -z 15M 64k']);
    const r = await digestImage(over);
    expect(r.digestsFile).toBe(`${over}.digests`);
    expect(r.digestsSha256).toBe(sha256(r.digestsFile));
    expect(r.records).toBe(3); // blocks 0, 1 and 3
    expect(await checkImageDigests(over, r.digestsFile)).toEqual([]);
    // The zero clusters are part of what is recorded: writing data over them is a problem.
    qemuIo(over, 'qcow2', ['write -P 0x64 5M 64k']);
    expect(await checkImageDigests(over, r.digestsFile)).toEqual([
      `${over}: bytes ${BLOCK}..${2 * BLOCK}: its clusters differ from the recorded ones`,
    ]);
  });

  it('reject a damaged digest file with ERR_BACKUP_CORRUPT naming it, and a missing image with ERR_SINK', async () => {
    const dir = scratch();
    const image = join(dir, 'img.qcow2');
    createImage(image, 8 * MiB, 'qcow2');
    qemuIo(image, 'qcow2', ['write -P 0x61 0 1M']);
    const { digestsFile } = await digestImage(image);
    const good = readFileSync(digestsFile);
    const bytes = Buffer.from(good);
    bytes[50]! ^= 1;
    writeFileSync(digestsFile, bytes);
    const err = await checkImageDigests(image, digestsFile).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DirectoryStoreError);
    expect(err).toMatchObject({ code: 'ERR_BACKUP_CORRUPT', file: digestsFile });
    expect((err as Error).message).toContain(digestsFile);
    writeFileSync(digestsFile, good);
    const missing = await checkImageDigests(join(dir, 'none.qcow2'), digestsFile).catch((e: unknown) => e);
    expect(missing).toBeInstanceOf(NbdError);
    expect(missing).toMatchObject({ code: 'ERR_SINK' });
    const noImage = await digestImage(join(dir, 'none.qcow2')).catch((e: unknown) => e);
    expect(noImage).toBeInstanceOf(NbdError);
    expect(noImage).toMatchObject({ code: 'ERR_SINK' });
  });
});

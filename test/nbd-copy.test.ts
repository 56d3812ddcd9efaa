import { copyFileSync, existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import {
  BackupProviderBaseV1,
  NbdClient,
  NbdError,
  backupNbdToFile,
  copyExtents,
  readChunks,
  runBackupJob,
  type BackupMechanismInfoV1,
  type BitmapMode,
  type Chunk,
  type CopySummary,
} from '../lib/index.js';
import { startDisk, vmGuest } from './helpers/directory.js';
import { allocatedBytes, createImage, expectSameBytes, qemuIo, run } from './helpers/images.js';
import { startNbdkit, startQemuNbd, useCleanups } from './helpers/nbd-servers.js';
import { stopAll } from './helpers/qemu.js';
import { requireTool } from './helpers/tools.js';

const MiB = 2 ** 20;
const { track, scratch } = useCleanups();

/** What `nbdcopy` (libnbd's tool) reads from the same export: the reference content. */
function nbdcopyReference(uri: string, dir: string): Buffer {
  requireTool('nbdcopy', 'libnbd-bin');
  const out = join(dir, 'reference.raw');
  run('nbdcopy', [uri, out]);
  return readFileSync(out);
}

describe('copyExtents', () => {
  it('copies a sparse qcow2 export to a sparse raw file equal to what nbdcopy reads', async () => {
    const dir = scratch();
    const image = join(dir, 'disk.qcow2');
    createImage(image, '32M', 'qcow2');
    qemuIo(image, 'qcow2', ['write -P 0x11 0 3M', 'write -P 0x22 10M 1M', 'write -z 12M 2M', 'write -P 0x33 31M 1M']);
    const server = track(await startQemuNbd(image, { format: 'qcow2', readOnly: true }));
    const target = join(dir, 'copy.raw');
    const summary = await copyExtents({ uri: server.uri, path: target });
    expectSameBytes(readFileSync(target), nbdcopyReference(server.uri, dir));
    expect(summary).toMatchObject({ bytesTotal: 32 * MiB, bytesRead: 5 * MiB });
    expect(summary.bytesZero).toBe(27 * MiB);
    expect(allocatedBytes(target)).toBeLessThanOrEqual(5 * MiB + 65536);
  });

  it('copies nbdkit sparse-random data exactly, over several connections', async () => {
    const dir = scratch();
    const server = track(await startNbdkit(['sparse-random', 'size=64M', 'seed=7', 'percent=40']));
    const target = join(dir, 'copy.raw');
    const summary = await copyExtents({ uri: server.uri, path: target, connections: 3, requests: 24, discard: false });
    expectSameBytes(readFileSync(target), nbdcopyReference(server.uri, dir));
    expect(summary.connections).toBe(3);
    expect(summary.bytesRead + summary.bytesZero).toBe(64 * MiB);
  });

  it('clamps reads to a server maximum smaller than the request size', async () => {
    const dir = scratch();
    const server = track(
      await startNbdkit(['--filter=blocksize-policy', 'sparse-random', 'size=8M', 'seed=3', 'blocksize-maximum=65536', 'blocksize-error-policy=error']),
    );
    const target = join(dir, 'copy.raw');
    await copyExtents({ uri: server.uri, path: target, maxRequest: 4 * MiB, discard: false });
    expectSameBytes(readFileSync(target), nbdcopyReference(server.uri, dir));
  });

  it('handles export sizes that are not a multiple of 512 or of the cluster size', async () => {
    const dir = scratch();
    const server = track(await startNbdkit(['memory', 'size=1000001']));
    const nbd = await NbdClient.connect(server.uri);
    await nbd.write(0, Buffer.alloc(70000, 0x5a));
    await nbd.write(999_000, Buffer.alloc(1001, 0xa5));
    await nbd.close();
    const target = join(dir, 'copy.raw');
    const expected = nbdcopyReference(server.uri, dir);
    const summary = await copyExtents({ uri: server.uri, path: target, discard: true });
    expect(summary.bytesTotal).toBe(1000001);
    expectSameBytes(readFileSync(target), expected);
    // asked to discard: every byte was discarded after the copy, the partial last cluster included
    expect(summary.bytesTrimmed).toBe(1000001);
  });

  it('surfaces an injected EIO as an NbdError naming the offset, and removes the partial target', async () => {
    const dir = scratch();
    const server = track(await startNbdkit(['--filter=error', 'pattern', 'size=16M', 'error-pread=EIO', 'error-pread-rate=1']));
    const target = join(dir, 'copy.raw');
    const err = await copyExtents({ uri: server.uri, path: target }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdError);
    expect(err).toMatchObject({ code: 'ERR_NBD_SERVER', errno: 'EIO', command: 'READ' });
    expect(typeof (err as NbdError).offset).toBe('number');
    expect((err as Error).message).toMatch(/EIO on READ at offset \d+/);
    // the target was created (reads start after it), and nothing of it is left
    expect(readdirSync(dir)).toEqual([]);
  });

  it('stops within a second of an abort and never reports success', async () => {
    const dir = scratch();
    const server = track(await startNbdkit(['--filter=delay', 'pattern', 'size=256M', 'delay-read=200ms']));
    const controller = new AbortController();
    const started = Date.now();
    const copy = copyExtents({ uri: server.uri, path: join(dir, 'copy.raw'), signal: controller.signal });
    setTimeout(() => controller.abort(), 500);
    const err = await copy.catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_CANCELLED', name: 'AbortError' });
    expect(Date.now() - started).toBeLessThan(1500);
  });

  it('keeps to the bandwidth limit', async () => {
    const server = track(await startNbdkit(['pattern', 'size=12M']));
    const limit = 4 * MiB;
    const summary = await copyExtents({ uri: server.uri, target: 'null', bandwidthLimit: limit });
    const rate = summary.bytesRead / summary.seconds;
    expect(summary.bytesRead).toBe(12 * MiB);
    expect(rate).toBeLessThanOrEqual(limit * 1.05);
    expect(rate).toBeGreaterThan(limit * 0.7);
  });

  it('reports progress, ending at the total', async () => {
    const server = track(await startNbdkit(['pattern', 'size=16M']));
    const seen: number[] = [];
    await copyExtents({ uri: server.uri, target: 'null', bandwidthLimit: 32 * MiB, onProgress: (p) => seen.push(p.done) });
    await new Promise((r) => setTimeout(r, 50)); // progress calls are queued to the event loop
    expect(seen.length).toBeGreaterThan(1);
    expect(seen.at(-1)).toBe(16 * MiB);
  });

  it('writes an incremental run into a copy of the previous full image', async () => {
    const dir = scratch();
    const image = join(dir, 'disk.qcow2');
    createImage(image, '16M', 'qcow2');
    qemuIo(image, 'qcow2', ['write -P 0x11 0 8M']);
    run('qemu-img', ['bitmap', '--add', image, 'inc']);
    const full = join(dir, 'full.raw');
    {
      const server = track(await startQemuNbd(image, { format: 'qcow2', readOnly: true }));
      await copyExtents({ uri: server.uri, path: full });
      await server.stop();
    }
    // changes after the bitmap was added: new data, overwritten data, zeroed data
    qemuIo(image, 'qcow2', ['write -P 0x22 1M 512k', 'write -P 0x33 12M 64k', 'write -z 4M 1M']);
    const server = track(await startQemuNbd(image, { format: 'qcow2', readOnly: true, extra: ['--bitmap=inc'] }));
    const incremental = join(dir, 'incremental.raw');
    copyFileSync(full, incremental);
    const summary = await copyExtents({ uri: server.uri, path: incremental, existing: true, bitmap: 'inc' });
    expectSameBytes(readFileSync(incremental), nbdcopyReference(server.uri, dir));
    expect(summary.bytesRead).toBe(512 * 1024 + 65536);
    expect(summary.bytesZero).toBe(MiB);
    expect(summary.bytesSkipped).toBe(16 * MiB - summary.bytesRead - summary.bytesZero);
  });

  it('fails with a clear error for a bitmap the export does not have', async () => {
    const dir = scratch();
    const image = join(dir, 'disk.qcow2');
    createImage(image, '1M', 'qcow2');
    const server = track(await startQemuNbd(image, { format: 'qcow2', readOnly: true }));
    await expect(copyExtents({ uri: server.uri, target: 'null', bitmap: 'nope' })).rejects.toMatchObject({
      code: 'ERR_NBD_UNSUPPORTED',
      message: expect.stringMatching(/no dirty bitmap "nope"/),
    });
  });
});

describe('readChunks', () => {
  it('streams chunks in order and discards a range only after the consumer asks for the next one', async () => {
    const server = track(await startNbdkit(['memory', 'size=16M']));
    const writer = await NbdClient.connect(server.uri);
    for (let i = 0; i < 16; i++) await writer.write(i * MiB, Buffer.alloc(MiB, i + 1));
    const chunks: Chunk[] = [];
    const stream = readChunks({ uri: server.uri, maxRequest: MiB, discard: true, requests: 4 });
    for await (const chunk of stream) {
      // the chunk just received is not discarded yet: its data is still on the export
      const still = await writer.read(chunk.offset, 16);
      expect(still.equals(Buffer.alloc(16, chunk.offset / MiB + 1))).toBe(true);
      expect(chunk.data?.equals(Buffer.alloc(chunk.length, chunk.offset / MiB + 1))).toBe(true);
      chunks.push(chunk);
    }
    expect(chunks.map((c) => c.offset)).toEqual(Array.from({ length: 16 }, (_, i) => i * MiB));
    const summary = await stream.summary;
    expect(summary.bytesTrimmed).toBe(16 * MiB);
    // all taken ranges are discarded once the stream has ended (nbdkit's memory plugin frees trimmed ranges)
    expect((await writer.read(0, 16 * MiB)).equals(Buffer.alloc(16 * MiB))).toBe(true);
    await writer.close();
  });

  it("rejects with the copy's own error, not just that the stream stopped", async () => {
    const server = track(await startNbdkit(['--filter=error', 'pattern', 'size=16M', 'error-pread=EIO', 'error-pread-rate=1']));
    const consume = async (): Promise<void> => {
      for await (const chunk of readChunks({ uri: server.uri })) void chunk;
    };
    await expect(consume()).rejects.toMatchObject({ code: 'ERR_NBD_SERVER', errno: 'EIO', command: 'READ' });
    const dir = scratch();
    const image = join(dir, 'disk.qcow2');
    createImage(image, '1M', 'qcow2');
    const qemuNbd = track(await startQemuNbd(image, { format: 'qcow2', readOnly: true }));
    const missing = async (): Promise<void> => {
      for await (const chunk of readChunks({ uri: qemuNbd.uri, bitmap: 'nope' })) void chunk;
    };
    await expect(missing()).rejects.toMatchObject({ code: 'ERR_NBD_UNSUPPORTED', message: expect.stringMatching(/no dirty bitmap "nope"/) });
  });

  it('ends the copy when the consumer stops early', async () => {
    const server = track(await startNbdkit(['pattern', 'size=64M']));
    const stream = readChunks({ uri: server.uri });
    for await (const chunk of stream) {
      expect(chunk.offset).toBe(0);
      break;
    }
    await expect(stream.summary).rejects.toMatchObject({ code: 'ERR_CANCELLED' });
  });
});

describe('backupNbdToFile (provider helper)', () => {
  it('reuse mode writes into a copy and renames it only on success; a failure leaves the previous image as it was', async () => {
    const dir = scratch();
    const image = join(dir, 'disk.qcow2');
    createImage(image, '8M', 'qcow2');
    qemuIo(image, 'qcow2', ['write -P 0x11 0 4M']);
    run('qemu-img', ['bitmap', '--add', image, 'inc']);
    const full = join(dir, 'disk.raw');
    {
      const server = track(await startQemuNbd(image, { format: 'qcow2', readOnly: true }));
      await backupNbdToFile({ uri: server.uri, bitmapMode: 'new', path: full, discard: false });
      await server.stop();
    }
    const before = readFileSync(full);
    qemuIo(image, 'qcow2', ['write -P 0x22 1M 64k']);
    const server = track(await startQemuNbd(image, { format: 'qcow2', readOnly: true, extra: ['--bitmap=inc'] }));
    // a failing run (no such bitmap) must not touch the previous image, which is also the target
    await expect(backupNbdToFile({ uri: server.uri, bitmapMode: 'reuse', bitmapName: 'nope', previous: full, path: full, discard: false })).rejects.toMatchObject({
      code: 'ERR_NBD_UNSUPPORTED',
    });
    expect(readFileSync(full).equals(before)).toBe(true);
    expect(existsSync(`${full}.part`)).toBe(false);
    const summary = await backupNbdToFile({ uri: server.uri, bitmapMode: 'reuse', bitmapName: 'inc', previous: full, path: full, discard: false });
    expect(summary.bytesRead).toBe(65536);
    expectSameBytes(readFileSync(full), nbdcopyReference(server.uri, dir));
    expect(existsSync(`${full}.part`)).toBe(false);
  });
});

describe('the source export is never trimmed unless asked', () => {
  /** A raw source image with data all over it, and a copy of its bytes to compare with later. */
  function sourceImage(dir: string): { path: string; bytes: Buffer } {
    const path = join(dir, 'src.raw');
    createImage(path, '8M', 'raw');
    qemuIo(path, 'raw', ['write -P 0x11 0 3M', 'write -P 0x22 4M 1M', 'write -P 0x33 7M 1M']);
    return { path, bytes: readFileSync(path) };
  }

  const servers = {
    'nbdkit file': (path: string) => startNbdkit(['file', path]),
    'qemu-nbd --discard=unmap': (path: string) => startQemuNbd(path, { extra: ['--discard=unmap'] }),
  };

  for (const [name, serve] of Object.entries(servers)) {
    it(`copyExtents and readChunks from ${name} leave the source byte-identical`, async () => {
      const dir = scratch();
      const src = sourceImage(dir);
      const server = track(await serve(src.path));
      const probe = await NbdClient.connect(server.uri);
      // the export would take TRIM: only the copy's restraint keeps the source whole
      expect(probe.info).toMatchObject({ canTrim: true, readOnly: false });
      await probe.close();

      const target = join(dir, 'copy.raw');
      const summary = await copyExtents({ uri: server.uri, path: target, maxRequest: MiB });
      expect(summary.bytesTrimmed).toBe(0);
      expectSameBytes(readFileSync(target), src.bytes, 'target');
      expectSameBytes(readFileSync(src.path), src.bytes, 'source after copyExtents');

      const stream = readChunks({ uri: server.uri, maxRequest: MiB });
      for await (const chunk of stream) void chunk;
      expect((await stream.summary).bytesTrimmed).toBe(0);
      expectSameBytes(readFileSync(src.path), src.bytes, 'source after readChunks');

      // the provider helper too: this is no backup's snapshot export
      expect((await backupNbdToFile({ uri: server.uri, bitmapMode: 'none', path: join(dir, 'helper.raw') })).bytesTrimmed).toBe(0);
      expectSameBytes(readFileSync(src.path), src.bytes, 'source after backupNbdToFile');
    });
  }

  it("backupNbdToFile discards by default on the snapshot export the runner hands a provider (fleecing space is freed)", async () => {
    const disk = await startDisk(8 * MiB);
    await disk.write(0x5a, 0, 4 * MiB);
    const dir = scratch();
    const summaries: CopySummary[] = [];
    class HelperProvider extends BackupProviderBaseV1 {
      override async jobStart(): Promise<void> {}
      override async jobEnd(): Promise<void> {}
      override async backupStart(): Promise<void> {}
      override async backupGetTarget(vmid: number): Promise<string> {
        return `backup/${vmid}`;
      }
      override async backupGuestConfig(): Promise<void> {}
      override async backupFirewallConfig(): Promise<void> {}
      override async backupGetMechanism(): Promise<BackupMechanismInfoV1> {
        return { mechanism: 'nbd' };
      }
      override async backupNbd(_vmid: number, device: string, nbdPath: string, bitmapMode: BitmapMode): Promise<void> {
        summaries.push(await backupNbdToFile({ deviceName: device, nbdPath, bitmapMode, path: join(dir, `${device}.raw`) }));
      }
      override async backupGetTaskSize(): Promise<number> {
        return 0;
      }
      override async backupEnd(): Promise<void> {}
      override async backupHandleLogFile(): Promise<void> {}
    }
    const r = await runBackupJob({ provider: new HelperProvider({ storeid: 's1', scfg: {}, log: () => {} }), storeid: 's1', guests: [vmGuest(disk)], tmpdir: dir });
    expect(r.guests[0]!.error).toBeUndefined();
    expect(summaries).toHaveLength(1);
    expect(summaries[0]!.bytesTrimmed).toBeGreaterThanOrEqual(4 * MiB);
    expectSameBytes(readFileSync(join(dir, 'disk0.raw')), disk.snapshot(), 'disk0.raw');
    await stopAll();
  });
});

describe('request timeout', () => {
  it('a read the server leaves unanswered fails with ERR_NBD_TIMEOUT naming it, instead of hanging', async () => {
    const dir = scratch();
    const server = track(await startNbdkit(['--filter=delay', 'pattern', 'size=4M', 'delay-read=300']));
    const err = await copyExtents({ uri: server.uri, path: join(dir, 'copy.raw'), requestTimeoutMs: 500 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdError);
    expect(err).toMatchObject({ code: 'ERR_NBD_TIMEOUT', command: 'READ', length: expect.any(Number), offset: expect.any(Number) });
    expect((err as Error).message).toMatch(/no reply to READ at offset \d+ length \d+ within 0\.5 s/);
    expect(readdirSync(dir)).toEqual([]);

    const nbd = await NbdClient.connect(server.uri, { requestTimeoutMs: 500, metaContexts: [] });
    await expect(nbd.read(65536, 512)).rejects.toMatchObject({ code: 'ERR_NBD_TIMEOUT', command: 'READ', offset: 65536, length: 512 });
    await nbd.close().catch(() => undefined);
  });
});

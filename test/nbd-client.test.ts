import { createServer, type Socket } from 'node:net';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { NbdClient, NbdError, listBitmaps, NBD_STATE_HOLE, NBD_STATE_ZERO } from '../lib/index.js';
import { createImage, qemuIo, run } from './helpers/images.js';
import { startNbdkit, startQemuNbd, useCleanups } from './helpers/nbd-servers.js';

const { defer, track, scratch } = useCleanups();

describe('NbdClient against nbdkit', () => {
  it('reads, writes, trims and flushes, with pipelined requests', async () => {
    const server = track(await startNbdkit(['memory', 'size=8M']));
    const nbd = await NbdClient.connect(server.uri);
    expect(nbd.size).toBe(8 * 2 ** 20);
    expect(nbd.info.canTrim).toBe(true);
    expect(nbd.info.structuredReplies).toBe(true);
    const blocks = Array.from({ length: 32 }, (_, i) => Buffer.alloc(65536, i + 1));
    await Promise.all(blocks.map((b, i) => nbd.write(i * 65536, b)));
    const back = await Promise.all(blocks.map((_, i) => nbd.read(i * 65536, 65536)));
    back.forEach((b, i) => expect(b.equals(blocks[i]!)).toBe(true));
    await nbd.trim(0, 65536);
    expect((await nbd.read(0, 65536)).equals(Buffer.alloc(65536))).toBe(true);
    await nbd.writeZeroes(65536, 65536);
    expect((await nbd.read(65536, 16)).equals(Buffer.alloc(16))).toBe(true);
    await nbd.flush();
    await nbd.close();
  });

  it('works with an export size that is not a multiple of 512', async () => {
    const server = track(await startNbdkit(['memory', 'size=1000001']));
    const nbd = await NbdClient.connect(server.uri);
    expect(nbd.size).toBe(1000001);
    await nbd.write(1000000, Buffer.from([0xab]));
    expect((await nbd.read(999999, 2)).equals(Buffer.from([0, 0xab]))).toBe(true);
    await expect(nbd.read(1000000, 2)).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
    await nbd.close();
  });

  it('surfaces an injected EIO as a typed error naming command and offset', async () => {
    const server = track(await startNbdkit(['--filter=error', 'memory', 'size=1M', 'error-pread=EIO', 'error-pread-rate=1']));
    const nbd = await NbdClient.connect(server.uri);
    const err = await nbd.read(131072, 4096).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdError);
    expect(err).toMatchObject({ code: 'ERR_NBD_SERVER', errno: 'EIO', command: 'READ', offset: 131072, length: 4096 });
    expect((err as Error).message).toMatch(/EIO on READ at offset 131072/);
    await nbd.close();
  });

  it('obeys the block size maximum the server advertises', async () => {
    const server = track(await startNbdkit(['--filter=blocksize-policy', 'memory', 'size=1M', 'blocksize-maximum=65536', 'blocksize-error-policy=error']));
    const nbd = await NbdClient.connect(server.uri);
    expect(nbd.info.blockSizes.maximum).toBe(65536);
    await expect(nbd.read(0, 131072)).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
    expect((await nbd.read(0, 65536)).length).toBe(65536);
    await nbd.close();
  });
});

describe('NbdClient against qemu-nbd', () => {
  it('reports holes and zeros through base:allocation', async () => {
    const dir = scratch();
    const image = join(dir, 'disk.qcow2');
    createImage(image, '4M', 'qcow2');
    qemuIo(image, 'qcow2', ['write -P 0x11 0 1M', 'write -z 2M 1M']);
    const server = track(await startQemuNbd(image, { format: 'qcow2' }));
    const nbd = await NbdClient.connect(server.uri);
    const extents = await nbd.blockStatus(0, nbd.size);
    expect(extents[0]).toMatchObject({ offset: 0, length: 2 ** 20, flags: 0 });
    const covered = extents.reduce((n, e) => n + e.length, 0);
    expect(covered).toBe(nbd.size);
    const tail = extents.filter((e) => e.offset >= 2 ** 20);
    expect(tail.every((e) => (e.flags & NBD_STATE_ZERO) !== 0)).toBe(true);
    expect(tail.some((e) => (e.flags & NBD_STATE_HOLE) !== 0)).toBe(true);
    await nbd.close();
  });

  it('lists the dirty bitmaps an export offers', async () => {
    const dir = scratch();
    const image = join(dir, 'disk.qcow2');
    createImage(image, '4M', 'qcow2');
    // qemu-img bitmap needs QEMU >= 5.1; Debian 12 has 7.2
    run('qemu-img', ['bitmap', '--add', image, 'backup-1']);
    const server = track(await startQemuNbd(image, { format: 'qcow2', readOnly: true, extra: ['--bitmap=backup-1'] }));
    expect(await listBitmaps(server.uri)).toEqual(['backup-1']);
  });
});

describe('bad input', () => {
  it('rejects a malformed URI naming what is wrong', async () => {
    await expect(NbdClient.connect('nbd+unix:///disk')).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT', message: expect.stringMatching(/socket/) });
    await expect(NbdClient.connect('http://example/disk')).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
    await expect(NbdClient.connect('nbds://localhost/disk')).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT', message: expect.stringMatching(/TLS/i) });
  });

  it('fails cleanly on a socket that does not speak NBD', async () => {
    const dir = scratch();
    const socket = join(dir, 'not-nbd.sock');
    const server = createServer((c) => {
      c.on('error', () => {}); // the client hangs up on what it cannot parse
      c.end('HTTP/1.1 400 Bad Request\r\n\r\n');
    });
    await new Promise<void>((r) => server.listen(socket, r));
    defer(() => new Promise<void>((r) => server.close(() => r())));
    const err = await NbdClient.connect(`nbd+unix:///x?socket=${socket}`).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdError);
    expect((err as NbdError).code).toMatch(/ERR_NBD_(PROTOCOL|CLOSED)/);
  });

  it('gives up on a socket that stays silent instead of hanging', async () => {
    const dir = scratch();
    const socket = join(dir, 'silent.sock');
    const peers: Socket[] = [];
    const server = createServer((c) => void peers.push(c)); // accepts, never speaks (a guest agent's socket)
    await new Promise<void>((r) => server.listen(socket, r));
    defer(() => new Promise<void>((r) => (peers.forEach((c) => c.destroy()), server.close(() => r()))));
    const started = Date.now();
    const err = await NbdClient.connect(`nbd+unix:///x?socket=${socket}`, { handshakeTimeoutMs: 300 }).catch((e: unknown) => e);
    expect(Date.now() - started).toBeLessThan(5000);
    expect(err).toBeInstanceOf(NbdError);
    expect(err).toMatchObject({ code: 'ERR_NBD_IO', message: expect.stringMatching(/silent\.sock.*no NBD handshake within 300ms/) });
  });

  it('names a missing socket', async () => {
    const err = await NbdClient.connect('nbd+unix:///x?socket=/nonexistent/nbd.sock').catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_NBD_IO', message: expect.stringMatching(/\/nonexistent\/nbd\.sock/) });
  });
});


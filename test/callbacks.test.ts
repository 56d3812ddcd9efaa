/**
 * A caller's callback that throws never crashes the process: the native core calls progress
 * callbacks on the JavaScript thread, where an uncaught exception would end the process. The copy
 * stops and fails with what the callback threw.
 */
import { describe, expect, it } from 'vitest';

import { copyExtents, readChunks } from '../lib/index.js';
import { startNbdkit, useCleanups } from './helpers/nbd-servers.js';

const { track } = useCleanups();
const MiB = 2 ** 20;

describe('a progress callback that throws', () => {
  it('copyExtents: the copy stops and rejects with what the callback threw', async () => {
    const server = track(await startNbdkit(['pattern', `size=${64 * MiB}`]));
    const boom = new Error('bug in the caller');
    let calls = 0;
    const copy = copyExtents({
      uri: server.uri,
      target: 'null',
      bandwidthLimit: 32 * MiB, // about 2 s: progress is reported many times
      onProgress: () => {
        calls++;
        throw boom;
      },
    });
    await expect(copy).rejects.toBe(boom);
    expect(calls).toBe(1); // not called again once it threw
  });

  it('readChunks: the stream and its summary reject with what the callback threw', async () => {
    const server = track(await startNbdkit(['pattern', `size=${64 * MiB}`]));
    const boom = new Error('bug in the caller');
    const stream = readChunks({ uri: server.uri, bandwidthLimit: 32 * MiB, onProgress: () => { throw boom; } });
    const consume = async (): Promise<number> => {
      let n = 0;
      for await (const c of stream) n += c.length;
      return n;
    };
    await expect(consume()).rejects.toBe(boom);
    await expect(stream.summary).rejects.toBe(boom);
  });
});

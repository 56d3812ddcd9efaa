/**
 * `qemu-img convert` of a provider's raw source into a restore target, with progress parsed from
 * `-p` and the bandwidth limit passed as `-r`.
 *
 * @packageDocumentation
 */
import { spawn } from 'node:child_process';
import { stat } from 'node:fs/promises';

import { CancelledError } from '../errors.js';
import { QemuImgError } from '../qemu/errors.js';
import { requireTool, tiedToParent } from '../tools.js';

/** Progress of a convert: `percent` 0..100, `bytes` estimated from the size. */
export interface ConvertProgress {
  device: string;
  percent: number;
  bytes: number;
  total: number;
}

/** Options of {@link qemuImgConvert}. */
export interface QemuImgConvertOptions {
  /** Source path or URI, read as raw. */
  source: string;
  /** Target: a file or block device path, or an NBD URI. */
  target: string;
  /** Device name (for progress and errors). */
  device: string;
  /** Size in bytes of the source (for progress). */
  size: number;
  /**
   * The target exists, holds zeros only and has the source's size (a file just created and
   * truncated): `qemu-img` writes only the data (`-n --target-is-zero`).
   */
  targetIsZero?: boolean;
  /** Bytes per second (`-r`); `undefined`: none (normalised by the caller, `normaliseBandwidthLimit`). */
  bandwidthLimit?: number | undefined;
  onProgress?: (p: ConvertProgress) => void;
  signal?: AbortSignal;
}

/** Whether a restore target is a URI (such as `nbd+unix:///...`) rather than a path. */
export const isUri = (t: string): boolean => /^[a-z][a-z0-9+.-]*:/i.test(t) && !t.startsWith('/');

/**
 * Runs `qemu-img convert -p -f raw -O raw [-n [--target-is-zero]] [-r LIMIT] SOURCE TARGET`. `-n`
 * (write into the existing target) is used when the target exists or is a URI; otherwise the
 * target file is created with the source's size. The child dies with this process.
 */
export async function qemuImgConvert(o: QemuImgConvertOptions): Promise<void> {
  const qemuImg = requireTool('qemu-img', 'qemu-utils');
  const exists = isUri(o.target) || (await stat(o.target).then(() => true, () => false));
  const args = ['convert', '-p', '-f', 'raw', '-O', 'raw'];
  if (exists || o.targetIsZero) args.push('-n');
  if (o.targetIsZero) args.push('--target-is-zero');
  if (o.bandwidthLimit !== undefined) args.push('-r', String(Math.max(1, Math.floor(o.bandwidthLimit))));
  args.push(o.source, o.target);
  o.signal?.throwIfAborted();
  await new Promise<void>((resolve, reject) => {
    const tied = tiedToParent(qemuImg, args);
    const child = spawn(tied.file, tied.args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    let buf = '';
    let last = -1;
    const onAbort = (): void => {
      child.kill('SIGTERM');
    };
    o.signal?.addEventListener('abort', onAbort, { once: true });
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (d: string) => {
      buf += d;
      const parts = buf.split(/[\r\n]/);
      buf = parts.pop() ?? '';
      for (const p of parts) {
        const m = /\((\d+(?:\.\d+)?)\/100%\)/.exec(p);
        if (!m) continue;
        const percent = Math.min(100, Number(m[1]));
        if (percent === last) continue;
        last = percent;
        try {
          o.onProgress?.({ device: o.device, percent, bytes: Math.round((percent / 100) * o.size), total: o.size });
        } catch {
          /* a throwing listener does not stop the restore */
        }
      }
    });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (d: string) => (stderr += d));
    child.on('error', (err) => reject(err));
    child.on('close', (code, sig) => {
      o.signal?.removeEventListener('abort', onAbort);
      if (code === 0) return resolve();
      if (o.signal?.aborted) return reject(new CancelledError(`qemu-img convert of ${o.device} cancelled`, { cause: o.signal.reason }));
      reject(
        new QemuImgError(`qemu-img convert of ${o.device} failed (${code !== null ? `exit code ${code}` : `signal ${sig}`}): ${stderr.trim()}`, {
          device: o.device,
          exitCode: code,
          signal: sig,
          stderr: stderr.trim(),
        }),
      );
    });
  });
}

/** Disk images for tests, made and inspected with the real QEMU tools. */
import { execFileSync } from 'node:child_process';
import { readFileSync, statSync } from 'node:fs';

import { requireTool } from './tools.js';

export function run(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** A qcow2 image alone, without its backing chain, as QEMU's JSON filename (what the layer itself stores). */
export function layerAlone(image: string): string {
  return `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: image }, backing: null })}`;
}

/** One extent of `qemu-img map --output=json` (`offset`: where the data is in the image file). */
export interface MapEntry {
  start: number;
  length: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** `qemu-img map` of a qcow2 image alone (see {@link layerAlone}). */
export function layerMap(image: string): MapEntry[] {
  requireTool('qemu-img', 'qemu-utils');
  return JSON.parse(run('qemu-img', ['map', '-U', '--output=json', layerAlone(image)])) as MapEntry[];
}

/** `qemu-img create`. */
export function createImage(path: string, size: number | string, format: 'raw' | 'qcow2' = 'raw', extra: string[] = []): void {
  requireTool('qemu-img', 'qemu-utils');
  run('qemu-img', ['create', '-q', '-f', format, ...extra, path, String(size)]);
}

/** Runs qemu-io commands (e.g. `write -P 0x55 0 64k`) on an image file or NBD URI. */
export function qemuIo(target: string, format: string, commands: string[]): void {
  requireTool('qemu-io', 'qemu-utils');
  const args = ['-f', format];
  for (const c of commands) args.push('-c', c);
  run('qemu-io', [...args, target]);
}

/** Bytes the file really occupies on disk (sparse files occupy less than their size). */
export function allocatedBytes(path: string): number {
  return statSync(path).blocks * 512;
}

/** Raw content of an image of any format, via `qemu-img convert` to a raw file. */
export function rawContent(path: string, format: string, scratch: string): Buffer {
  run('qemu-img', ['convert', '-f', format, '-O', 'raw', path, scratch]);
  return readFileSync(scratch);
}

/** Throws with the first differing offset unless the two buffers are equal. */
export function expectSameBytes(actual: Buffer, expected: Buffer, what = 'content'): void {
  if (actual.length !== expected.length) throw new Error(`${what}: length ${actual.length}, expected ${expected.length}`);
  if (actual.equals(expected)) return;
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) throw new Error(`${what}: first difference at offset ${i}`);
  }
}

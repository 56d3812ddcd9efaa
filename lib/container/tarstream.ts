/**
 * A tar stream filter that rewrites owner ids and POSIX ACL qualifiers member by member, as the
 * archive flows between GNU tar and the archive file.
 *
 * Why: GNU tar maps owners on create (`--owner-map`) but never the user and group ids named in
 * ACL entries (stored as `SCHILY.acl.access` / `SCHILY.acl.default` pax records), and it maps
 * nothing on extract. Rewriting the stream gives archives that hold container ids throughout,
 * and a restore that creates each file with its host owner directly: no chown afterwards, so
 * setuid/setgid bits and file capabilities (which chown clears) stay, and hard links need no
 * bookkeeping.
 *
 * Understands what GNU tar writes: ustar/pax headers (`x` per-member and `g` global extended
 * headers), GNU long names (`L`, `K`) and old GNU sparse headers (`S` with extension blocks).
 * Every header's checksum is verified, so a stream that is not a tar archive is refused rather
 * than misread.
 *
 * @packageDocumentation
 */
import { execFileSync } from 'node:child_process';
import { Transform, type TransformCallback } from 'node:stream';

import { ContainerToolError, IdMapError } from './errors.js';

const BLOCK = 512;

/** How the filter changes ids. `type` is `u` or `g`; `path` is the member's printable name. */
export interface TarRewriteOptions {
  /** Maps a member's owner uid/gid; throws {@link IdMapError} for an unmapped one. Absent: owners unchanged. */
  mapOwner?: (type: 'u' | 'g', id: number, path: string) => number;
  /** Maps a user/group id named in an ACL entry. Absent: ACLs unchanged. */
  mapAcl?: (type: 'u' | 'g', id: number, path: string) => number;
}

/** A member name (raw bytes) as printable text: valid UTF-8 as is, other bytes and controls escaped. */
export function printableName(raw: Buffer): string {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(raw);
  } catch {
    text = Array.from(raw, (b) => (b >= 0x20 && b < 0x7f && b !== 0x5c ? String.fromCharCode(b) : `\\x${b.toString(16).padStart(2, '0')}`)).join('');
    return text;
  }
  return text.replace(/[\0-\x1f\x7f\\]/g, (c) => (c === '\n' ? '\\n' : c === '\\' ? '\\\\' : `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`));
}

function cstring(buf: Buffer, start: number, length: number): Buffer {
  const field = buf.subarray(start, start + length);
  const nul = field.indexOf(0);
  return nul < 0 ? field : field.subarray(0, nul);
}

/** Reads a numeric header field: octal text, or GNU base-256 when the high bit of the first byte is set. */
function readNumber(buf: Buffer, start: number, length: number): number {
  const field = buf.subarray(start, start + length);
  if (field[0]! & 0x80) {
    if (field[0] === 0xff) throw new Error('negative number in tar header');
    let n = field[0]! & 0x7f;
    for (let i = 1; i < field.length; i++) n = n * 256 + field[i]!;
    return n;
  }
  const text = field.toString('latin1').replace(/[\0 ]+$/g, '').replace(/^[ \0]+/, '');
  if (text === '') return 0;
  if (!/^[0-7]+$/.test(text)) throw new Error(`bad numeric field '${text}' in tar header`);
  return parseInt(text, 8);
}

/** Writes a numeric header field: octal with a NUL when it fits, base-256 otherwise (GNU tar reads both). */
function writeNumber(buf: Buffer, start: number, length: number, value: number): void {
  const octal = value.toString(8);
  if (octal.length <= length - 1) {
    buf.write(octal.padStart(length - 1, '0'), start, 'latin1');
    buf[start + length - 1] = 0;
    return;
  }
  buf[start] = 0x80;
  let v = value;
  for (let i = length - 1; i >= 1; i--) {
    buf[start + i] = v % 256;
    v = Math.floor(v / 256);
  }
}

function checksum(block: Buffer): number {
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : block[i]!;
  return sum;
}

function setChecksum(block: Buffer): void {
  const sum = checksum(block);
  block.write(sum.toString(8).padStart(6, '0'), 148, 'latin1');
  block[154] = 0;
  block[155] = 0x20;
}

interface PaxRecord {
  key: string;
  value: Buffer;
}

function parsePax(data: Buffer): PaxRecord[] {
  const records: PaxRecord[] = [];
  let pos = 0;
  while (pos < data.length) {
    if (data[pos] === 0) break;
    const space = data.indexOf(0x20, pos);
    if (space < 0) throw new Error('malformed pax record');
    const len = Number(data.toString('latin1', pos, space));
    if (!Number.isSafeInteger(len) || len <= 0 || pos + len > data.length) throw new Error('malformed pax record length');
    const body = data.subarray(space + 1, pos + len - 1); // without the trailing newline
    const eq = body.indexOf(0x3d);
    if (eq < 0) throw new Error('malformed pax record');
    records.push({ key: body.toString('utf8', 0, eq), value: Buffer.from(body.subarray(eq + 1)) });
    pos += len;
  }
  return records;
}

function formatPax(records: PaxRecord[]): Buffer {
  const out: Buffer[] = [];
  for (const r of records) {
    const body = Buffer.concat([Buffer.from(`${r.key}=`, 'utf8'), r.value, Buffer.from('\n')]);
    let len = body.length + 2;
    while (String(len).length + 1 + body.length !== len) len = String(len).length + 1 + body.length;
    out.push(Buffer.from(`${len} `, 'latin1'), body);
  }
  return Buffer.concat(out);
}

const nameCache = new Map<string, number | undefined>();

/** A user or group name as this host resolves it (NSS through `getent`), or undefined. */
function resolveName(type: 'u' | 'g', name: string): number | undefined {
  const key = `${type}:${name}`;
  if (nameCache.has(key)) return nameCache.get(key);
  let id: number | undefined;
  try {
    const line = execFileSync('getent', [type === 'u' ? 'passwd' : 'group', name], { encoding: 'utf8' });
    const field = line.split(':')[2];
    if (field !== undefined && /^\d+$/.test(field)) id = Number(field);
  } catch {
    id = undefined;
  }
  nameCache.set(key, id);
  return id;
}

/**
 * Maps the qualifiers of an ACL in GNU tar's text form (`user::rw-\nuser:101000:rwx\n...`, also
 * `,`-separated, entries possibly followed by `\t#effective:...`). Named qualifiers are resolved on
 * this host (as tar would on extract) and written back numeric.
 */
export function mapAclText(text: string, map: (type: 'u' | 'g', id: number) => number, path: string): string {
  return text.replace(/(^|[\n,])((?:d(?:efault)?:)?)(u(?:ser)?|g(?:roup)?):([^:\n,]+):/g, (all, sep: string, dflt: string, tag: string, qual: string) => {
    const type = tag.startsWith('u') ? 'u' : 'g';
    let id: number | undefined;
    if (/^\d+$/.test(qual)) id = Number(qual);
    else id = resolveName(type, qual);
    if (id === undefined) {
      throw new IdMapError(`${path}: ACL entry names ${type === 'u' ? 'user' : 'group'} '${qual}', unknown on this host`, { idType: type, path });
    }
    return `${sep}${dflt}${tag}:${map(type, id)}:`;
  });
}

type State =
  | { kind: 'header' }
  | { kind: 'data'; remaining: number }
  | { kind: 'collect'; block: Buffer; size: number; padded: number; parts: Buffer[]; got: number }
  | { kind: 'sparse-ext' };

/**
 * The filter. Input and output are tar streams; everything but the rewritten ids passes through
 * byte for byte (a rewritten pax header may change length, in whole blocks).
 */
export class TarIdRewriter extends Transform {
  private buf: Buffer = Buffer.alloc(0);
  private state: State = { kind: 'header' };
  /** Held `x` header (block + records) until its member's header arrives. */
  private pendingPax: { block: Buffer; records: PaxRecord[] } | undefined;
  private longName: Buffer | undefined;
  private offset = 0;
  /** Stream offset of the header being read, for messages. */
  private headerAt = 0;
  /** Members seen (headers of files, directories, links...). */
  members = 0;

  constructor(private readonly opts: TarRewriteOptions) {
    super();
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    try {
      this.process();
    } catch (err) {
      done(this.wrapError(err));
      return;
    }
    done();
  }

  override _flush(done: TransformCallback): void {
    if (this.buf.length) this.push(this.buf);
    this.buf = Buffer.alloc(0);
    if (this.pendingPax || this.state.kind === 'collect') {
      done(new ContainerToolError('tar archive ends inside an extended header', { code: 'ERR_TAR', tool: 'tar' }));
      return;
    }
    done();
  }

  private wrapError(err: unknown): Error {
    if (err instanceof IdMapError || err instanceof ContainerToolError) return err;
    const msg = err instanceof Error ? err.message : String(err);
    return new ContainerToolError(`not a valid tar stream at byte ${this.headerAt}: ${msg}`, { code: 'ERR_TAR', tool: 'tar', cause: err });
  }

  private takeBytes(n: number): Buffer {
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    this.offset += n;
    return out;
  }

  private process(): void {
    for (;;) {
      const st = this.state;
      if (st.kind === 'data') {
        if (st.remaining === 0) {
          this.state = { kind: 'header' };
          continue;
        }
        if (this.buf.length === 0) return;
        const n = Math.min(st.remaining, this.buf.length);
        this.push(this.takeBytes(n));
        st.remaining -= n;
        continue;
      }
      if (st.kind === 'collect') {
        if (this.buf.length === 0) return;
        const n = Math.min(st.padded - st.got, this.buf.length);
        st.parts.push(Buffer.from(this.takeBytes(n)));
        st.got += n;
        if (st.got < st.padded) return;
        this.state = { kind: 'header' };
        this.collected(st.block, Buffer.concat(st.parts).subarray(0, st.size));
        continue;
      }
      if (this.buf.length < BLOCK) return;
      if (st.kind === 'sparse-ext') {
        const ext = this.takeBytes(BLOCK);
        this.push(ext);
        if (ext[504] === 0) this.state = { kind: 'data', remaining: this.afterSparse };
        continue;
      }
      this.headerAt = this.offset;
      this.header(Buffer.from(this.takeBytes(BLOCK)));
    }
  }

  private afterSparse = 0;

  private header(block: Buffer): void {
    if (block.every((b) => b === 0)) {
      this.push(block);
      return;
    }
    if (readNumber(block, 148, 8) !== checksum(block)) throw new Error('header checksum mismatch');
    const type = String.fromCharCode(block[156]!);
    const size = readNumber(block, 124, 12);
    const padded = Math.ceil(size / BLOCK) * BLOCK;
    if (type === 'x' || type === 'L' || type === 'K') {
      this.state = { kind: 'collect', block, size, padded, parts: [], got: 0 };
      return;
    }
    if (type === 'g') {
      this.push(block);
      this.state = { kind: 'data', remaining: padded };
      return;
    }
    this.member(block, type, size);
  }

  private collected(block: Buffer, data: Buffer): void {
    const type = String.fromCharCode(block[156]!);
    if (type === 'x') {
      if (this.pendingPax) throw new Error('two extended headers in a row');
      this.pendingPax = { block, records: parsePax(data) };
      return;
    }
    // GNU long name/link: pass through, remember the name for messages.
    if (type === 'L') this.longName = cstring(data, 0, data.length);
    this.push(block);
    this.push(data);
    const pad = (BLOCK - (data.length % BLOCK)) % BLOCK;
    if (pad) this.push(Buffer.alloc(pad));
  }

  private member(block: Buffer, type: string, headerSize: number): void {
    this.members++;
    const pax = this.pendingPax;
    this.pendingPax = undefined;
    const rec = (key: string): PaxRecord | undefined => pax?.records.find((r) => r.key === key);
    let rawName: Buffer;
    const paxPath = rec('path');
    if (paxPath) rawName = paxPath.value;
    else if (this.longName) rawName = this.longName;
    else {
      const name = cstring(block, 0, 100);
      const prefix = block.toString('latin1', 257, 263) === 'ustar\0' ? cstring(block, 345, 155) : Buffer.alloc(0);
      rawName = prefix.length ? Buffer.concat([prefix, Buffer.from('/'), name]) : name;
    }
    this.longName = undefined;
    const path = printableName(rawName);

    let headerChanged = false;
    if (this.opts.mapOwner) {
      for (const [t, key, off] of [
        ['u', 'uid', 108],
        ['g', 'gid', 116],
      ] as const) {
        const r = rec(key);
        if (r) {
          r.value = Buffer.from(String(this.opts.mapOwner(t, Number(r.value.toString('latin1')), path)), 'latin1');
        } else {
          const mapped = this.opts.mapOwner(t, readNumber(block, off, 8), path);
          writeNumber(block, off, 8, mapped);
          headerChanged = true;
        }
      }
    }
    if (pax && this.opts.mapAcl) {
      const mapAcl = this.opts.mapAcl;
      for (const r of pax.records) {
        if (r.key === 'SCHILY.acl.access' || r.key === 'SCHILY.acl.default') {
          r.value = Buffer.from(mapAclText(r.value.toString('utf8'), (t, id) => mapAcl(t, id, path), path), 'utf8');
        }
      }
    }
    if (pax) {
      const data = formatPax(pax.records);
      writeNumber(pax.block, 124, 12, data.length);
      setChecksum(pax.block);
      this.push(pax.block);
      this.push(data);
      const pad = (BLOCK - (data.length % BLOCK)) % BLOCK;
      if (pad) this.push(Buffer.alloc(pad));
    }
    if (headerChanged) setChecksum(block);
    this.push(block);

    const paxSize = rec('size');
    const size = paxSize ? Number(paxSize.value.toString('latin1')) : headerSize;
    const padded = Math.ceil(size / BLOCK) * BLOCK;
    if (type === 'S' && block[482] !== 0) {
      this.afterSparse = padded;
      this.state = { kind: 'sparse-ext' };
      return;
    }
    this.state = { kind: 'data', remaining: padded };
  }
}

/** Unit tests of the container tools that need no file tree: id maps, exclusion mapping, the tar stream filter, the throttle. */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';

import { describe, expect, test } from 'vitest';

import { PveBackupError } from '../lib/errors.js';
import { IdMapError } from '../lib/container/errors.js';
import { parseExcludePatterns, rsyncExcludeArgs, tarExcludeArgs } from '../lib/container/exclude.js';
import { formatIdMapEntry, parseIdMap, rootIds, toContainer, toHost, validateIdMap } from '../lib/container/idmap.js';
import { mapAclXattr } from '../lib/container/remap.js';
import { mapAclText, printableName, TarIdRewriter } from '../lib/container/tarstream.js';
import { ThrottleStream } from '../lib/bandwidth.js';
import { requireTool } from './helpers/tools.js';

describe('parseIdMap', () => {
  test('accepts bare, Proxmox and LXC forms, skips blanks and comments', () => {
    const map = parseIdMap(['u 0 100000 65536', 'lxc.idmap: g 0 100000 1000', 'lxc.idmap = g 1000 1000 1', '', '# comment', 'lxc.idmap:g 1001 101001 64535']);
    expect(map).toEqual([
      { type: 'u', container: 0, host: 100000, length: 65536 },
      { type: 'g', container: 0, host: 100000, length: 1000 },
      { type: 'g', container: 1000, host: 1000, length: 1 },
      { type: 'g', container: 1001, host: 101001, length: 64535 },
    ]);
    expect(map.map(formatIdMapEntry)[0]).toBe('u 0 100000 65536');
  });

  test.each([
    [['x 0 100000 65536'], /not of the form/],
    [['u 0 100000'], /not of the form/],
    [['u -1 100000 10'], /not a non-negative integer/],
    [['u 0 1e5 10'], /not a non-negative integer/],
    [['u 0 100000 0'], /at least 1/],
    [['u 0 100000 65536', 'u 100 200000 10'], /overlap in their container ids/],
    [['u 0 100000 65536', 'u 70000 100100 10'], /overlap in their host ids/],
    [['u 4294967290 0 10'], /goes past id/],
    [['lxc.idmap u 0 1 2'], /not of the form/],
  ])('refuses %j', (lines, message) => {
    let err: unknown;
    try {
      parseIdMap(lines);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(IdMapError);
    expect(err).toBeInstanceOf(PveBackupError);
    expect((err as IdMapError).code).toBe('ERR_IDMAP');
    expect((err as Error).message).toMatch(message);
  });

  test('validateIdMap checks maps built by hand', () => {
    expect(() => validateIdMap([{ type: 'u', container: 0, host: 1.5, length: 1 }])).toThrow(IdMapError);
    expect(() => validateIdMap([{ type: 'x' as 'u', container: 0, host: 1, length: 1 }])).toThrow(/type/);
    expect(() => validateIdMap([{ type: 'u', container: 0, host: 100000, length: 65536 }, { type: 'g', container: 0, host: 100000, length: 65536 }])).not.toThrow();
  });
});

describe('toHost / toContainer', () => {
  const map = parseIdMap(['u 0 100000 1000', 'u 1000 1000 1', 'u 1001 101001 64535', 'g 0 100000 65536']);

  test('translate both ways, per type and range', () => {
    expect(toHost(map, 'u', 0)).toBe(100000);
    expect(toHost(map, 'u', 999)).toBe(100999);
    expect(toHost(map, 'u', 1000)).toBe(1000);
    expect(toHost(map, 'u', 1001)).toBe(101001);
    expect(toHost(map, 'g', 1000)).toBe(101000);
    expect(toContainer(map, 'u', 1000)).toBe(1000);
    expect(toContainer(map, 'u', 165535)).toBe(65535);
    expect(toContainer(map, 'g', 100033)).toBe(33);
    expect(rootIds(map)).toEqual({ uid: 100000, gid: 100000 });
  });

  test('identity for an empty map', () => {
    expect(toHost([], 'u', 12345)).toBe(12345);
    expect(toContainer([], 'g', 0)).toBe(0);
    expect(rootIds([])).toEqual({ uid: 0, gid: 0 });
  });

  test('an unmapped id is an error with the id', () => {
    expect(() => toHost(map, 'u', 65536)).toThrow(/container uid 65536 is not covered/);
    expect(() => toContainer(map, 'g', 5)).toThrow(/host gid 5 is not covered/);
    expect(() => toContainer(map, 'u', 99999)).toThrow(expect.objectContaining({ name: 'IdMapError', code: 'ERR_IDMAP', idType: 'u', id: 99999 }));
  });
});

describe('exclusion patterns', () => {
  test('tar: unanchored after --no-anchored, anchored as ./PATH after --anchored, directories by their content', () => {
    expect(tarExcludeArgs(['/tmp/?*', '*.log', 'cache/', '/var/cache/', 'a/b', '/deep/**/x'], { skipLostAndFound: true })).toEqual([
      '--no-anchored',
      '--exclude=lost+found',
      '--exclude=*.log',
      '--exclude=cache/*',
      '--exclude=a/b',
      '--anchored',
      '--exclude=./tmp/?*',
      '--exclude=./var/cache/*',
      '--exclude=./deep/**/x',
    ]);
    expect(tarExcludeArgs([])).toEqual(['--no-anchored', '--anchored']);
  });

  test('rsync: patterns unchanged', () => {
    expect(rsyncExcludeArgs(['/tmp/?*', '*.log', 'cache/'], { skipLostAndFound: true })).toEqual([
      '--exclude=lost+found',
      '--exclude=/tmp/?*',
      '--exclude=*.log',
      '--exclude=cache/',
    ]);
  });

  test('classification and refusals', () => {
    expect(parseExcludePatterns(['/a', 'b/'])).toEqual([
      { pattern: '/a', anchored: true, directoryOnly: false },
      { pattern: 'b/', anchored: false, directoryOnly: true },
    ]);
    expect(() => parseExcludePatterns([''])).toThrow(/non-empty/);
    expect(() => parseExcludePatterns(['/'])).toThrow(/everything/);
    expect(() => parseExcludePatterns(['a\nb'])).toThrow(/newline/);
  });
});

describe('ACL id mapping', () => {
  test('tar ACL text: numeric and named qualifiers, default entries, effective comments', () => {
    const text = 'user::rw-\nuser:101000:rwx\t#effective:r--\ngroup::r--\ngroup:100033:r--\nmask::r--\nother::---\n';
    expect(mapAclText(text, (_t, id) => id - 100000, './f')).toBe(
      'user::rw-\nuser:1000:rwx\t#effective:r--\ngroup::r--\ngroup:33:r--\nmask::r--\nother::---\n',
    );
    expect(mapAclText('default:user:101000:r-x,default:group:root:r-x', (_t, id) => id + 7, './d')).toBe('default:user:101007:r-x,default:group:7:r-x');
    expect(() => mapAclText('user:no-such-user-here:r--', (_t, id) => id, './f')).toThrow(/unknown on this host/);
  });

  test('raw POSIX ACL xattr', () => {
    const v = Buffer.from('0200000001000600ffffffff02000700888a010004000400ffffffff08000400a186010010000700ffffffff20000400ffffffff', 'hex');
    const out = mapAclXattr(v, (_t, id) => id - 100000);
    expect(out.readUInt32LE(4 + 8 + 4)).toBe(1000); // user 101000
    expect(out.readUInt32LE(4 + 24 + 4)).toBe(100001 - 100000); // group 100001
    expect(out.readUInt32LE(4 + 4)).toBe(0xffffffff); // user_obj untouched
  });
});

describe('TarIdRewriter', () => {
  test('rewrites owners and ACLs of a real GNU tar stream, which tar then reads', async () => {
    requireTool('tar', 'tar');
    requireTool('setfacl', 'acl');
    const d = mkdtempSync(join(tmpdir(), 'ct-units-'));
    try {
      mkdirSync(join(d, 'src'));
      writeFileSync(join(d, 'src', 'f'), 'x');
      execFileSync('chown', ['5:6', join(d, 'src', 'f')]);
      execFileSync('setfacl', ['-m', 'u:7:r,g:8:r', join(d, 'src', 'f')]);
      // A long name, forcing a pax path record.
      const long = 'n'.repeat(150);
      writeFileSync(join(d, 'src', long), 'y');
      execFileSync('chown', ['3000000:3000001', join(d, 'src', long)]);
      const archive = execFileSync('tar', ['-c', '-f', '-', '--acls', '--numeric-owner', '-C', join(d, 'src'), '.'], { maxBuffer: 1 << 26 });
      const chunks: Buffer[] = [];
      // Feed in odd-sized pieces to exercise the block reassembly.
      const pieces = function* (): Generator<Buffer> {
        for (let i = 0; i < archive.length; i += 333) yield archive.subarray(i, i + 333);
      };
      await pipeline(
        Readable.from(pieces()),
        new TarIdRewriter({ mapOwner: (_t, id) => id + 100000, mapAcl: (_t, id) => id + 100000 }),
        new Writable({
          write(c: Buffer, _e, cb) {
            chunks.push(c);
            cb();
          },
        }),
      );
      const out = Buffer.concat(chunks);
      writeFileSync(join(d, 'out.tar'), out);
      const listing = execFileSync('tar', ['-tvv', '--numeric-owner', '-f', join(d, 'out.tar')], { encoding: 'utf8' });
      expect(listing).toMatch(/ 100005\/100006 .* \.\/f\n/);
      expect(listing).toMatch(new RegExp(` 3100000/3100001 .* \\./${long}\\n`));
      mkdirSync(join(d, 'x'));
      execFileSync('tar', ['-x', '-f', join(d, 'out.tar'), '--acls', '--numeric-owner', '-C', join(d, 'x')]);
      const acl = execFileSync('getfacl', ['-n', '-c', join(d, 'x', 'f')], { encoding: 'utf8' });
      expect(acl).toContain('user:100007:r--');
      expect(acl).toContain('group:100008:r--');
      // Ids too large for the octal header field are written base-256, which tar reads.
      const big: Buffer[] = [];
      await pipeline(
        Readable.from([archive]),
        new TarIdRewriter({ mapOwner: (_t, id) => id + 3_000_000 }),
        new Writable({
          write(c: Buffer, _e, cb) {
            big.push(c);
            cb();
          },
        }),
      );
      writeFileSync(join(d, 'big.tar'), Buffer.concat(big));
      expect(execFileSync('tar', ['-tvv', '--numeric-owner', '-f', join(d, 'big.tar')], { encoding: 'utf8' })).toMatch(/ 3000005\/3000006 .* \.\/f\n/);
    } finally {
      rmSync(d, { recursive: true, force: true });
    }
  });

  test('refuses what is not a tar stream', async () => {
    const sink = new Writable({ write: (_c, _e, cb) => cb() });
    const run = pipeline(Readable.from([Buffer.alloc(1024, 0x41)]), new TarIdRewriter({ mapOwner: (_t, id) => id }), sink);
    await expect(run).rejects.toMatchObject({ code: 'ERR_TAR', message: expect.stringMatching(/not a valid tar stream at byte 0/) });
  });

  test('printable names', () => {
    expect(printableName(Buffer.from('a b'))).toBe('a b');
    expect(printableName(Buffer.from('new\nline'))).toBe('new\\nline');
    expect(printableName(Buffer.from([0x66, 0xff]))).toBe('f\\xff');
    expect(printableName(Buffer.from('été'))).toBe('été');
  });
});

describe('ThrottleStream', () => {
  test('holds the rate and counts bytes', async () => {
    const t = new ThrottleStream(1024 * 1024);
    const start = performance.now();
    let got = 0;
    await pipeline(
      Readable.from([Buffer.alloc(512 * 1024), Buffer.alloc(256 * 1024)]),
      t,
      new Writable({
        write(c: Buffer, _e, cb) {
          got += c.length;
          cb();
        },
      }),
    );
    const seconds = (performance.now() - start) / 1000;
    expect(got).toBe(768 * 1024);
    expect(t.bytes).toBe(768 * 1024);
    expect(seconds).toBeGreaterThanOrEqual(0.7);
    expect(seconds).toBeLessThan(2);
  });
});

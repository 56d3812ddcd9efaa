/**
 * Shifting the owners of a whole directory tree in place, for directory copies (rsync has no id
 * range mapping): every entry's uid/gid, the ids in its POSIX ACLs, and what chown destroys.
 *
 * Per tree:
 * 1. `getfattr -R -P -h -d -e hex` dumps the ACLs (`system.posix_acl_access`,
 *    `system.posix_acl_default`) and file capabilities (`security.capability`) of every entry;
 *    the ids in the ACL entries of type user and group are mapped in the dump.
 * 2. A walk (`lstat`, never following symlinks) `lchown`s each entry once (hard links share an
 *    inode and are done once), then puts setuid/setgid bits back with `chmod` (chown clears them).
 * 3. `setfattr --restore` writes the mapped ACLs and the capabilities (chown clears those too)
 *    back.
 * An id the map does not cover, as owner or in an ACL, is an error naming the file, raised before
 * anything is changed for ACLs and at the entry for owners.
 *
 * @packageDocumentation
 */
import { chmod, lchown, lstat, readdir } from 'node:fs/promises';

import { checkAborted, runToolCapture } from './proc.js';
import { printableName } from './tarstream.js';

/** Maps an id of `type` for the entry at printable relative `path`; throws `IdMapError` when unmapped. */
export type IdMapper = (type: 'u' | 'g', id: number, path: string) => number;

const ATTR_PATTERN = '^(system\\.posix_acl_(access|default)|security\\.capability)$';

const ACL_USER = 0x02;
const ACL_GROUP = 0x08;

/** Maps the ids in a `system.posix_acl_*` xattr value (version 2: 4-byte header, 8-byte entries). */
export function mapAclXattr(value: Buffer, map: (type: 'u' | 'g', id: number) => number): Buffer {
  const out = Buffer.from(value);
  if (out.length < 4 || out.readUInt32LE(0) !== 2 || (out.length - 4) % 8 !== 0) throw new Error('unknown POSIX ACL xattr format');
  for (let pos = 4; pos < out.length; pos += 8) {
    const tag = out.readUInt16LE(pos);
    if (tag === ACL_USER || tag === ACL_GROUP) out.writeUInt32LE(map(tag === ACL_USER ? 'u' : 'g', out.readUInt32LE(pos + 4)), pos + 4);
  }
  return out;
}

/** `getfattr` quotes names with backslash-octal escapes; this is the printable form used in messages. */
function unquoteGetfattr(name: string): string {
  const bytes: number[] = [];
  for (let i = 0; i < name.length; i++) {
    if (name[i] === '\\' && /^[0-7]{3}$/.test(name.slice(i + 1, i + 4))) {
      bytes.push(parseInt(name.slice(i + 1, i + 4), 8));
      i += 3;
    } else if (name[i] === '\\' && name[i + 1] === '\\') {
      bytes.push(0x5c);
      i += 1;
    } else {
      bytes.push(name.charCodeAt(i) & 0xff);
    }
  }
  return printableName(Buffer.from(bytes));
}

/**
 * Rewrites owners, ACL ids, setuid/setgid bits and file capabilities of every entry under `root`
 * (see the module documentation).
 *
 * @throws `ERR_IDMAP` naming the file; `ERR_ACL` when getfattr/setfattr fail; `ERR_CANCELLED`.
 */
export async function remapTree(root: string, mapOwner: IdMapper, mapAcl: IdMapper, signal?: AbortSignal): Promise<void> {
  const what = `id mapping of ${root}`;
  // 1. ACLs and capabilities, before chown clears the capabilities.
  const dump = (
    await runToolCapture({
      tool: 'getfattr',
      code: 'ERR_ACL',
      what: `${what} (reading ACLs and capabilities)`,
      args: ['-R', '-P', '-h', '-d', '-e', 'hex', '-m', ATTR_PATTERN, '.'],
      cwd: root,
      signal,
    })
  ).toString('latin1');
  let file = '';
  let any = false;
  const mapped = dump
    .split('\n')
    .map((line) => {
      if (line.startsWith('# file: ')) {
        file = line.slice(8);
        return line;
      }
      const m = /^(system\.posix_acl_(?:access|default))=0x([0-9a-f]*)$/.exec(line);
      if (m) {
        any = true;
        const path = unquoteGetfattr(file);
        const value = mapAclXattr(Buffer.from(m[2]!, 'hex'), (type, id) => mapAcl(type, id, path));
        return `${m[1]!}=0x${value.toString('hex')}`;
      }
      if (/^security\.capability=/.test(line)) any = true;
      return line;
    })
    .join('\n');

  // 2. Owners and setuid/setgid bits.
  const seen = new Set<string>();
  const stack: { abs: Buffer; rel: Buffer }[] = [{ abs: Buffer.from(root), rel: Buffer.from('.') }];
  let count = 0;
  while (stack.length) {
    const { abs, rel } = stack.pop()!;
    if ((++count & 1023) === 0) checkAborted(signal, what);
    const st = await lstat(abs);
    if (st.nlink > 1 && !st.isDirectory()) {
      const key = `${st.dev}:${st.ino}`;
      if (seen.has(key)) continue;
      seen.add(key);
    }
    const path = printableName(rel);
    const uid = mapOwner('u', st.uid, path);
    const gid = mapOwner('g', st.gid, path);
    if (uid !== st.uid || gid !== st.gid) {
      await lchown(abs, uid, gid);
      if (!st.isSymbolicLink() && st.mode & 0o6000) await chmod(abs, st.mode & 0o7777);
    }
    if (st.isDirectory()) {
      const names = await readdir(abs, { encoding: 'buffer' });
      for (const name of names) {
        stack.push({
          abs: Buffer.concat([abs, Buffer.from('/'), name]),
          rel: rel.equals(Buffer.from('.')) ? Buffer.concat([Buffer.from('./'), name]) : Buffer.concat([rel, Buffer.from('/'), name]),
        });
      }
    }
  }

  // 3. ACLs (mapped) and capabilities back.
  if (any) {
    checkAborted(signal, what);
    await runToolCapture({
      tool: 'setfattr',
      code: 'ERR_ACL',
      what: `${what} (writing ACLs and capabilities)`,
      args: ['-h', '--restore=-'],
      cwd: root,
      input: Buffer.from(mapped, 'latin1'),
      signal,
    });
  }
}


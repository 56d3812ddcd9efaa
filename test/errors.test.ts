/**
 * The error table: every error class of the package, constructed, with its name, code, message,
 * cause and typed fields; every code of `ErrorCode` owned by exactly one class.
 */
import { describe, expect, it } from 'vitest';

import * as lib from '../lib/index.js';
import {
  BackupAccessActiveError,
  BackupAccessError,
  CancelledError,
  ChunkBackupError,
  ChunkStoreError,
  ContainerAbortError,
  ContainerToolError,
  DirectoryStoreError,
  FleecingFullError,
  IdMapError,
  InvalidArgumentError,
  JobAbortedError,
  MechanismError,
  NbdError,
  NotImplementedError,
  ProviderApiVersionError,
  ProviderResultError,
  PveBackupError,
  QemuImgError,
  QemuStartError,
  QmpBusyError,
  QmpClosedError,
  QmpError,
  QmpProtocolError,
  QmpTimeoutError,
  RestoreError,
  StorageHookError,
  RootdirNotEmptyError,
  ToolMissingError,
  type ErrorCode,
} from '../lib/index.js';
import { BackupFailedError, DemoError, TargetExistsError, UsageError, VerifyFailedError } from '../lib/cli/errors.js';
import { fromNative } from '../lib/nbd/errors.js';
import { fromNative as chunkStoreFromNative } from '../lib/chunk-provider/errors.js';
import { BridgeError, PluginFileExistsError } from '../lib/bridge/errors.js';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type ErrorClass = abstract new (...args: any[]) => PveBackupError;

/** The one class that owns each code (a subclass of it may throw it too). */
const OWNER = {
  ERR_INVALID_ARGUMENT: InvalidArgumentError,
  ERR_CANCELLED: CancelledError,
  ERR_TOOL_MISSING: ToolMissingError,
  ERR_NBD_IO: NbdError,
  ERR_NBD_PROTOCOL: NbdError,
  ERR_NBD_SERVER: NbdError,
  ERR_NBD_CLOSED: NbdError,
  ERR_NBD_UNSUPPORTED: NbdError,
  ERR_NBD_TIMEOUT: NbdError,
  ERR_SINK: NbdError,
  ERR_QMP: QmpError,
  ERR_QMP_CLOSED: QmpClosedError,
  ERR_QMP_TIMEOUT: QmpTimeoutError,
  ERR_QMP_NOT_QMP: QmpProtocolError,
  ERR_QMP_BUSY: QmpBusyError,
  ERR_BACKUP_ACCESS: BackupAccessError,
  ERR_BACKUP_ACCESS_ACTIVE: BackupAccessActiveError,
  ERR_FLEECING_FULL: FleecingFullError,
  ERR_QEMU_START: QemuStartError,
  ERR_QEMU_IMG: QemuImgError,
  ERR_PROVIDER_API_VERSION: ProviderApiVersionError,
  ERR_NOT_IMPLEMENTED: NotImplementedError,
  ERR_MECHANISM: MechanismError,
  ERR_PROVIDER_RESULT: ProviderResultError,
  ERR_JOB_ABORTED: JobAbortedError,
  ERR_RESTORE: RestoreError,
  ERR_STORAGE_HOOK: StorageHookError,
  ERR_TAR: ContainerToolError,
  ERR_RSYNC: ContainerToolError,
  ERR_ACL: ContainerToolError,
  ERR_IDMAP: IdMapError,
  ERR_ROOTDIR_NOT_EMPTY: RootdirNotEmptyError,
  ERR_NOT_A_STORE: DirectoryStoreError,
  ERR_INVALID_VOLID: DirectoryStoreError,
  ERR_UNKNOWN_VOLUME: DirectoryStoreError,
  ERR_BACKUP_INCOMPLETE: DirectoryStoreError,
  ERR_BACKUP_CORRUPT: DirectoryStoreError,
  ERR_BACKUP_VERSION: DirectoryStoreError,
  ERR_CHAIN_BROKEN: DirectoryStoreError,
  ERR_CHAIN_DELETE: DirectoryStoreError,
  ERR_BACKUP_PROTECTED: DirectoryStoreError,
  ERR_STORE_IO: DirectoryStoreError,
  ERR_STORE_BUSY: DirectoryStoreError,
  ERR_PROVIDER_STATE: DirectoryStoreError,
  ERR_STORE_UNAVAILABLE: ChunkStoreError,
  ERR_STORE_ACCESS: ChunkStoreError,
  ERR_STORE_NOT_FOUND: ChunkStoreError,
  ERR_STORE_FULL: ChunkStoreError,
  ERR_STORE_CERTIFICATE: ChunkStoreError,
  ERR_KEY_REQUIRED: ChunkStoreError,
  ERR_KEY_MISMATCH: ChunkStoreError,
  ERR_WRITER_EXPIRED: ChunkStoreError,
  ERR_GC_RUNNING: ChunkStoreError,
  ERR_USAGE: UsageError,
  ERR_TARGET_EXISTS: TargetExistsError,
  ERR_VERIFY_FAILED: VerifyFailedError,
  ERR_BACKUP_FAILED: BackupFailedError,
  ERR_DEMO: DemoError,
  ERR_DEMO_MISMATCH: DemoError,
  ERR_BRIDGE: BridgeError,
  ERR_PLUGIN_FILE_EXISTS: PluginFileExistsError,
} satisfies Record<ErrorCode, ErrorClass>; // a code missing here, or one not in ErrorCode, does not compile

interface Case {
  err: PveBackupError;
  cls: ErrorClass;
  name: string;
  code: ErrorCode;
  message: RegExp;
  cause?: unknown;
  fields?: Record<string, unknown>;
}

const cause = new Error('the cause');
const fleecingFull = new FleecingFullError('disk0', '/f', 0);
const qmpCause = new QmpError({ qmpClass: 'GenericError', desc: 'no', command: 'blockdev-add' });

const nbdCases: Case[] = (['ERR_NBD_IO', 'ERR_NBD_PROTOCOL', 'ERR_NBD_CLOSED', 'ERR_NBD_UNSUPPORTED', 'ERR_SINK'] as const).map((code) => ({
  err: new NbdError('nbd failed', { code, cause }),
  cls: NbdError,
  name: 'NbdError',
  code,
  message: /^nbd failed$/,
  cause,
}));

const storeCodes = [
  'ERR_NOT_A_STORE',
  'ERR_INVALID_VOLID',
  'ERR_UNKNOWN_VOLUME',
  'ERR_BACKUP_INCOMPLETE',
  'ERR_BACKUP_CORRUPT',
  'ERR_BACKUP_VERSION',
  'ERR_CHAIN_BROKEN',
  'ERR_CHAIN_DELETE',
  'ERR_BACKUP_PROTECTED',
  'ERR_STORE_IO',
  'ERR_STORE_BUSY',
  'ERR_PROVIDER_STATE',
] as const;
const storeCases: Case[] = storeCodes.map((code) => ({
  err: new DirectoryStoreError(code, 'store failed', { volname: 'backup/100/qemu-2024_01_01-00_00_00', file: 'manifest.json', cause }),
  cls: DirectoryStoreError,
  name: 'DirectoryStoreError',
  code,
  message: /^store failed$/,
  cause,
  fields: { volname: 'backup/100/qemu-2024_01_01-00_00_00', file: 'manifest.json' },
}));

const chunkStoreCodes = ['ERR_STORE_UNAVAILABLE', 'ERR_STORE_ACCESS', 'ERR_STORE_NOT_FOUND', 'ERR_STORE_FULL', 'ERR_STORE_CERTIFICATE', 'ERR_KEY_REQUIRED', 'ERR_KEY_MISMATCH', 'ERR_WRITER_EXPIRED', 'ERR_GC_RUNNING'] as const;
const chunkStoreCases: Case[] = chunkStoreCodes.map((code) => ({
  err: new ChunkStoreError(code, 'S3 get of p/store.json at http://h bucket b: failed', { cause }),
  cls: ChunkStoreError,
  name: 'ChunkStoreError',
  code,
  message: /^S3 get of p\/store\.json at http:\/\/h bucket b: failed$/,
  cause,
}));

const cases: Case[] = [
  // every layer
  { err: new InvalidArgumentError('bad', { cause }), cls: InvalidArgumentError, name: 'InvalidArgumentError', code: 'ERR_INVALID_ARGUMENT', message: /^bad$/, cause },
  { err: new CancelledError(), cls: CancelledError, name: 'AbortError', code: 'ERR_CANCELLED', message: /^cancelled$/ },
  { err: new CancelledError('copy cancelled', { cause }), cls: CancelledError, name: 'AbortError', code: 'ERR_CANCELLED', message: /^copy cancelled$/, cause },
  {
    err: new ToolMissingError('rsync', 'rsync'),
    cls: ToolMissingError,
    name: 'ToolMissingError',
    code: 'ERR_TOOL_MISSING',
    message: /^rsync not found: apt-get install rsync$/,
    fields: { tool: 'rsync', debianPackage: 'rsync' },
  },
  // NBD
  ...nbdCases,
  {
    err: new NbdError('server said EIO', { code: 'ERR_NBD_SERVER', errno: 'EIO', command: 'READ', offset: 512, length: 4096 }),
    cls: NbdError,
    name: 'NbdError',
    code: 'ERR_NBD_SERVER',
    message: /^server said EIO$/,
    fields: { errno: 'EIO', command: 'READ', offset: 512, length: 4096 },
  },
  {
    err: new NbdError('timed out', { code: 'ERR_NBD_TIMEOUT', command: 'READ', offset: 0, length: 1 }),
    cls: NbdError,
    name: 'NbdError',
    code: 'ERR_NBD_TIMEOUT',
    message: /^timed out$/,
    fields: { command: 'READ', offset: 0, length: 1, errno: undefined },
  },
  // QMP
  {
    err: new QmpError({ qmpClass: 'DeviceNotFound', desc: 'no such thing', command: 'blockdev-del', device: 'disk0', cause }),
    cls: QmpError,
    name: 'QmpError',
    code: 'ERR_QMP',
    message: /^QMP command blockdev-del \(device disk0\) failed: no such thing \[DeviceNotFound\]$/,
    cause,
    fields: { qmpClass: 'DeviceNotFound', desc: 'no such thing', command: 'blockdev-del', device: 'disk0' },
  },
  { err: new QmpClosedError('closed', { command: 'query-block', cause }), cls: QmpClosedError, name: 'QmpClosedError', code: 'ERR_QMP_CLOSED', message: /^closed$/, cause, fields: { command: 'query-block' } },
  {
    err: new QmpTimeoutError('query-status', 5),
    cls: QmpTimeoutError,
    name: 'QmpTimeoutError',
    code: 'ERR_QMP_TIMEOUT',
    message: /^QMP command query-status timed out after 5 ms$/,
    fields: { command: 'query-status', timeoutMs: 5 },
  },
  { err: new QmpProtocolError('not QMP', { cause }), cls: QmpProtocolError, name: 'QmpProtocolError', code: 'ERR_QMP_NOT_QMP', message: /^not QMP$/, cause },
  {
    err: new QmpBusyError('/run/qmp.sock', 5),
    cls: QmpBusyError,
    name: 'QmpBusyError',
    code: 'ERR_QMP_BUSY',
    message: /^QMP socket \/run\/qmp\.sock accepted the connection but sent no greeting within 5 ms/,
    fields: { address: '/run/qmp.sock', timeoutMs: 5 },
  },
  // backup access and QEMU programs
  {
    err: new BackupAccessError('disk0: setup failed', { device: 'disk0', cause: qmpCause }),
    cls: BackupAccessError,
    name: 'BackupAccessError',
    code: 'ERR_BACKUP_ACCESS',
    message: /^disk0: setup failed$/,
    cause: qmpCause,
    fields: { device: 'disk0', command: 'blockdev-add' }, // the command comes from a QmpError cause
  },
  {
    err: new BackupAccessActiveError('t', 'node left'),
    cls: BackupAccessActiveError,
    name: 'BackupAccessActiveError',
    code: 'ERR_BACKUP_ACCESS_ACTIVE',
    message: /^a backup access for target 't' is already active \(node left\); tear it down or recover first$/,
    fields: { activeTargetId: 't' },
  },
  {
    err: new FleecingFullError('disk0', '/f/disk0.qcow2', 7, cause),
    cls: FleecingFullError,
    name: 'FleecingFullError',
    code: 'ERR_FLEECING_FULL',
    message: /^disk0: fleecing image \/f\/disk0\.qcow2 ran out of space \(7 bytes free/,
    cause,
    fields: { device: 'disk0', fleecingPath: '/f/disk0.qcow2', freeBytes: 7 },
  },
  {
    err: new QemuStartError('qemu-storage-daemon', 'qemu-storage-daemon exited early: boom'),
    cls: QemuStartError,
    name: 'QemuStartError',
    code: 'ERR_QEMU_START',
    message: /^qemu-storage-daemon exited early: boom$/,
    fields: { program: 'qemu-storage-daemon' },
  },
  {
    err: new QemuImgError('qemu-img convert of disk0 failed (exit code 1): bad', { device: 'disk0', exitCode: 1, stderr: 'bad' }),
    cls: QemuImgError,
    name: 'QemuImgError',
    code: 'ERR_QEMU_IMG',
    message: /^qemu-img convert of disk0 failed \(exit code 1\): bad$/,
    fields: { device: 'disk0', exitCode: 1, signal: null, stderr: 'bad' },
  },
  // provider API, job runner, restore
  {
    err: new ProviderApiVersionError(3, 2, 1),
    cls: ProviderApiVersionError,
    name: 'ProviderApiVersionError',
    code: 'ERR_PROVIDER_API_VERSION',
    message: /targets API version 3, newer.*supported: 1 to 2/,
    fields: { apiVersion: 3, current: 2, age: 1 },
  },
  {
    err: new ProviderApiVersionError(0, 2, 1),
    cls: ProviderApiVersionError,
    name: 'ProviderApiVersionError',
    code: 'ERR_PROVIDER_API_VERSION',
    message: /version 0, which this runner no longer serves/,
    fields: { apiVersion: 0, current: 2, age: 1 },
  },
  {
    err: new ProviderApiVersionError(undefined, 2, 0),
    cls: ProviderApiVersionError,
    name: 'ProviderApiVersionError',
    code: 'ERR_PROVIDER_API_VERSION',
    message: /declares no integer apiVersion.*supported: 2\)/,
    fields: { apiVersion: undefined, current: 2, age: 0 },
  },
  {
    err: new NotImplementedError('backupNbd', 'p'),
    cls: NotImplementedError,
    name: 'NotImplementedError',
    code: 'ERR_NOT_IMPLEMENTED',
    message: /^backup provider 'p': method 'backupNbd' is not implemented$/,
    fields: { method: 'backupNbd' },
  },
  { err: new NotImplementedError('jobInit'), cls: NotImplementedError, name: 'NotImplementedError', code: 'ERR_NOT_IMPLEMENTED', message: /^method 'jobInit' is not implemented$/, fields: { method: 'jobInit' } },
  { err: new MechanismError('m', { mechanism: 'x', vmtype: 'qemu' }), cls: MechanismError, name: 'MechanismError', code: 'ERR_MECHANISM', message: /^m$/, fields: { mechanism: 'x', vmtype: 'qemu' } },
  { err: new MechanismError('m', { mechanism: undefined, vmtype: 'lxc' }), cls: MechanismError, name: 'MechanismError', code: 'ERR_MECHANISM', message: /^m$/, fields: { mechanism: undefined, vmtype: 'lxc' } },
  { err: new ProviderResultError('backupInit', 'bad'), cls: ProviderResultError, name: 'ProviderResultError', code: 'ERR_PROVIDER_RESULT', message: /^backupInit: bad$/, fields: { method: 'backupInit' } },
  {
    err: new JobAbortedError('stop', { cause, result: { ok: false } }),
    cls: JobAbortedError,
    name: 'JobAbortedError',
    code: 'ERR_JOB_ABORTED',
    message: /^stop$/,
    cause,
    fields: { result: { ok: false } },
  },
  { err: new RestoreError('r', { device: 'disk0', cause }), cls: RestoreError, name: 'RestoreError', code: 'ERR_RESTORE', message: /^r$/, cause, fields: { device: 'disk0' } },
  { err: new StorageHookError('p', { hook: 'prune', cause }), cls: StorageHookError, name: 'StorageHookError', code: 'ERR_STORAGE_HOOK', message: /^p$/, cause, fields: { hook: 'prune' } },
  // container tools
  {
    err: new ContainerToolError('tar failed', { code: 'ERR_TAR', tool: 'tar', exitCode: 2, stderr: 'e', cause }),
    cls: ContainerToolError,
    name: 'ContainerToolError',
    code: 'ERR_TAR',
    message: /^tar failed$/,
    cause,
    fields: { tool: 'tar', exitCode: 2, signal: null, stderr: 'e' },
  },
  {
    err: new ContainerToolError('rsync killed', { code: 'ERR_RSYNC', tool: 'rsync', signal: 'SIGKILL' }),
    cls: ContainerToolError,
    name: 'ContainerToolError',
    code: 'ERR_RSYNC',
    message: /^rsync killed$/,
    fields: { tool: 'rsync', exitCode: null, signal: 'SIGKILL', stderr: '' },
  },
  { err: new ContainerToolError('acl', { code: 'ERR_ACL', tool: 'setfattr', exitCode: 1 }), cls: ContainerToolError, name: 'ContainerToolError', code: 'ERR_ACL', message: /^acl$/, fields: { tool: 'setfattr' } },
  {
    err: new IdMapError('uid 5 is not mapped', { idType: 'u', id: 5, path: 'etc/x', cause }),
    cls: IdMapError,
    name: 'IdMapError',
    code: 'ERR_IDMAP',
    message: /^uid 5 is not mapped$/,
    cause,
    fields: { idType: 'u', id: 5, path: 'etc/x' },
  },
  {
    err: new RootdirNotEmptyError('/r', 'a'),
    cls: RootdirNotEmptyError,
    name: 'RootdirNotEmptyError',
    code: 'ERR_ROOTDIR_NOT_EMPTY',
    message: /^restore target \/r is not empty \(found a\); pass allowNonEmpty to restore into it anyway$/,
    fields: { rootdir: '/r', entry: 'a' },
  },
  {
    // the CLI names its own option
    err: new RootdirNotEmptyError('/r', 'a', { remedy: 'give --allow-non-empty', cause }),
    cls: RootdirNotEmptyError,
    name: 'RootdirNotEmptyError',
    code: 'ERR_ROOTDIR_NOT_EMPTY',
    message: /^restore target \/r is not empty \(found a\); give --allow-non-empty$/,
    cause,
    fields: { rootdir: '/r', entry: 'a' },
  },
  { err: new ContainerAbortError('tar of /r', cause), cls: ContainerAbortError, name: 'AbortError', code: 'ERR_CANCELLED', message: /^tar of \/r cancelled$/, cause },
  // directory store
  ...storeCases,
  // chunk store
  ...chunkStoreCases,
  {
    err: new ChunkBackupError('ERR_BACKUP_CORRUPT', 'backup c:backup/100/qemu-2024_01_01-00_00_00 is corrupted: s3://b/p/backups/100/qemu-2024_01_01-00_00_00/manifest.json does not match its checksum', { volname: 'backup/100/qemu-2024_01_01-00_00_00', file: 'backups/100/qemu-2024_01_01-00_00_00/manifest.json', cause }),
    cls: ChunkBackupError,
    name: 'ChunkBackupError',
    code: 'ERR_BACKUP_CORRUPT',
    message: /manifest\.json does not match its checksum$/,
    cause,
    fields: { volname: 'backup/100/qemu-2024_01_01-00_00_00', file: 'backups/100/qemu-2024_01_01-00_00_00/manifest.json' },
  },
  // command line
  { err: new UsageError('give --to'), cls: UsageError, name: 'UsageError', code: 'ERR_USAGE', message: /^give --to$/ },
  { err: new TargetExistsError('/x.raw'), cls: TargetExistsError, name: 'TargetExistsError', code: 'ERR_TARGET_EXISTS', message: /^restore target \/x\.raw exists; give --force to replace it$/, fields: { target: '/x.raw' } },
  { err: new VerifyFailedError(1, 3), cls: VerifyFailedError, name: 'VerifyFailedError', code: 'ERR_VERIFY_FAILED', message: /^1 of 3 backup\(s\) failed verification$/, fields: { failed: 1, total: 3 } },
  {
    err: new BackupFailedError(100, 'qemu', fleecingFull),
    cls: BackupFailedError,
    name: 'BackupFailedError',
    code: 'ERR_BACKUP_FAILED',
    message: /^backup of VM 100 failed: disk0: fleecing image \/f ran out of space/,
    cause: fleecingFull,
    fields: { vmid: 100, vmtype: 'qemu', causeCode: 'ERR_FLEECING_FULL' },
  },
  {
    err: new BackupFailedError(101, 'lxc'),
    cls: BackupFailedError,
    name: 'BackupFailedError',
    code: 'ERR_BACKUP_FAILED',
    message: /^backup of CT 101 failed: unknown error$/,
    fields: { vmid: 101, vmtype: 'lxc', causeCode: undefined },
  },
  { err: new DemoError('ERR_DEMO', 'the full backup failed'), cls: DemoError, name: 'DemoError', code: 'ERR_DEMO', message: /^the full backup failed$/ },
  { err: new DemoError('ERR_DEMO_MISMATCH', 'differs'), cls: DemoError, name: 'DemoError', code: 'ERR_DEMO_MISMATCH', message: /^differs$/ },
  { err: new BridgeError('bad request', { method: 'backup_vm', cause }), cls: BridgeError, name: 'BridgeError', code: 'ERR_BRIDGE', message: /^bad request$/, cause, fields: { method: 'backup_vm' } },
  {
    err: new PluginFileExistsError('/usr/share/perl5/PVE/Storage/Custom/AcmePlugin.pm', 'another plugin (type=acme provider=/x.mjs)'),
    cls: PluginFileExistsError,
    name: 'PluginFileExistsError',
    code: 'ERR_PLUGIN_FILE_EXISTS',
    message: /^\/usr\/share\/perl5\/PVE\/Storage\/Custom\/AcmePlugin\.pm exists and belongs to another plugin \(type=acme provider=\/x\.mjs\); give --force to replace it$/,
    fields: { target: '/usr/share/perl5/PVE/Storage/Custom/AcmePlugin.pm' },
  },
];

describe('error table', () => {
  it.each(cases.map((c) => [c.err.name, c.code, c] as const))('%s %s: name, code, classes, message, cause, fields', (_name, _code, c) => {
    expect(c.err).toBeInstanceOf(Error);
    expect(c.err).toBeInstanceOf(PveBackupError);
    expect(c.err).toBeInstanceOf(c.cls);
    expect(c.err).toBeInstanceOf(OWNER[c.code]); // the code's one owner, or a subclass of it
    expect(c.err.name).toBe(c.name);
    expect(c.err.code).toBe(c.code);
    expect(c.err.message).toMatch(c.message);
    expect(c.err.cause).toBe(c.cause);
    if (c.fields) expect(c.err).toMatchObject(c.fields);
    expect(String(c.err)).toBe(`${c.name}: ${c.err.message}`);
  });

  it('constructs every error class exported from lib/index.ts', () => {
    const exported = Object.entries(lib).filter(
      ([, v]) => typeof v === 'function' && (v as { prototype?: unknown }).prototype instanceof PveBackupError,
    );
    const tested = new Set<unknown>(cases.map((c) => c.cls));
    expect(exported.length).toBeGreaterThan(20);
    for (const [name, cls] of exported) expect(tested.has(cls), `${name} is in the table`).toBe(true);
  });

  it('produces every code of ErrorCode, each from the class that owns it', () => {
    const produced = new Set(cases.map((c) => c.err.code));
    expect([...produced].sort()).toEqual(Object.keys(OWNER).sort());
  });

  it('hands the native core cancellations and bad arguments to the classes that own those codes', () => {
    const native = (details: object): unknown => fromNative(new Error(JSON.stringify(details)));
    const cancelled = native({ code: 'ERR_CANCELLED', message: 'copy cancelled' });
    expect(cancelled).toBeInstanceOf(CancelledError);
    expect(cancelled).toMatchObject({ name: 'AbortError', code: 'ERR_CANCELLED', message: 'copy cancelled' });
    const invalid = native({ code: 'ERR_INVALID_ARGUMENT', message: 'read beyond the end', offset: 1 });
    expect(invalid).toBeInstanceOf(InvalidArgumentError);
    expect(invalid).toMatchObject({ code: 'ERR_INVALID_ARGUMENT', message: 'read beyond the end' });
    const server = native({ code: 'ERR_NBD_SERVER', message: 'EIO', errno: 'EIO', command: 'READ', offset: 0, length: 512 });
    expect(server).toBeInstanceOf(NbdError);
    expect(server).toMatchObject({ name: 'NbdError', errno: 'EIO', command: 'READ', offset: 0, length: 512 });
    const foreign = new Error('not JSON');
    expect(fromNative(foreign)).toBe(foreign);
  });

  it('hands the native core store errors to ChunkStoreError, and the rest as the NBD layer does', () => {
    const native = (details: object): unknown => chunkStoreFromNative(new Error(JSON.stringify(details)));
    for (const code of chunkStoreCodes) {
      const err = native({ code, message: `S3 put of k at http://h bucket b: ${code}` });
      expect(err).toBeInstanceOf(ChunkStoreError);
      expect(err).toMatchObject({ name: 'ChunkStoreError', code, message: `S3 put of k at http://h bucket b: ${code}` });
    }
    const corrupt = native({ code: 'ERR_BACKUP_CORRUPT', message: 'chunks/ab/cd/abcd: its content does not match its digest' });
    expect(corrupt).toBeInstanceOf(ChunkBackupError);
    expect(corrupt).toBeInstanceOf(DirectoryStoreError);
    expect(corrupt).toMatchObject({ name: 'ChunkBackupError', code: 'ERR_BACKUP_CORRUPT' });
    expect(native({ code: 'ERR_INVALID_ARGUMENT', message: 'bad key' })).toBeInstanceOf(InvalidArgumentError);
    expect(native({ code: 'ERR_CANCELLED', message: 'cancelled' })).toBeInstanceOf(CancelledError);
    const foreign = new Error('not JSON');
    expect(chunkStoreFromNative(foreign)).toBe(foreign);
  });
});

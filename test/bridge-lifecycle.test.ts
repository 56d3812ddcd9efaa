/**
 * The Perl bridge's process handling under `perl -T`: the host starts on the first call and
 * belongs to the process that started it, a dead host is an error (never a hang, never vzdump's
 * SIGPIPE abort), setup calls time out, and what the bridge cannot carry is refused in Perl.
 * Needs `npm run build:ts` (the host runs from dist/).
 */
import { spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';

import { gone, requireTool } from './helpers/tools.js';
import { stopAll, tempDir } from './helpers/qemu.js';

const ROOT = path.resolve(import.meta.dirname, '..');

afterEach(async () => {
  await stopAll();
});

/** Runs `body` under `perl -T` with `$p`, a bridge on `provider`, and `@log`, the log function's lines. */
async function perlT(provider: string, body: string): Promise<{ out: Record<string, string>; stderr: string; status: number | null }> {
  const perl = requireTool('perl', 'perl');
  await fs.access(path.join(ROOT, 'dist/cli/main.js')).catch(() => {
    throw new Error('dist/cli/main.js is missing: run npm run build:ts');
  });
  const dir = await tempDir();
  const script = `
use strict; use warnings;
use Time::HiRes qw(time sleep);
use POSIX ();
use PVE::BackupProvider::Plugin::NodeBridge;
die "not in taint mode\\n" if !\${^TAINT};
$ENV{PATH} = '/sbin:/bin:/usr/sbin:/usr/bin';
my ($node, $cli, $mod, $store, $state) = map { /^(.*)$/ ? $1 : die } @ARGV;
my @log;
my $p = PVE::BackupProvider::Plugin::NodeBridge->new(undef, { path => $store }, 'dir1', sub { push @log, "$_[0]: $_[1]" },
    provider => $mod, node => $node, cli => $cli, env => { PVE_BACKUP_PROVIDER_STATE_DIR => $state }, setup_timeout => 2);
sub out { my ($k, $v) = @_; $v //= ''; $v =~ s/\\n/ /g; print "$k=$v\\n" }
${body}
`;
  const file = path.join(dir, 'case.pl');
  await fs.writeFile(file, script);
  const r = spawnSync(
    perl,
    ['-T', '-I', path.join(ROOT, 'test/pve'), '-I', path.join(ROOT, 'perl'), file, process.execPath, path.join(ROOT, 'dist/cli/main.js'), provider.startsWith('/') ? provider : path.join(ROOT, 'test/pve/providers', provider), path.join(dir, 'store'), path.join(dir, 'state')],
    { encoding: 'utf8', timeout: 60_000 },
  );
  const out: Record<string, string> = {};
  for (const line of r.stdout.split('\n')) {
    const i = line.indexOf('=');
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1);
  }
  return { out, stderr: r.stderr, status: r.status };
}

describe('the Perl bridge: the host process (perl -T)', () => {
  it('starts the host on the first call, not in new; a fork dropping the object leaves it; the owner dropping it ends it', async () => {
    const r = await perlT('directory.mjs', `
out('after-new', $p->host_pid // 'none');
out('name', $p->provider_name);
my $pid = $p->host_pid;
out('pid', $pid);
my $child = fork() // die;
if ($child == 0) { undef $p; exit(0) }    # DESTROY in another pid
waitpid($child, 0);
out('alive-after-fork', kill(0, $pid) ? 1 : 0);
out('name-again', $p->provider_name);
undef $p;
out('alive-after-undef', kill(0, $pid) ? 1 : 0);
`);
    expect(r.stderr).not.toMatch(/Insecure/);
    expect(r.status).toBe(0);
    expect(r.out).toMatchObject({ 'after-new': 'none', name: 'directory', 'alive-after-fork': '1', 'name-again': 'directory', 'alive-after-undef': '0' });
    expect(gone(Number(r.out.pid))).toBe(true);
  });

  it('turns a host killed between calls into a plain die, also for cleanup calls, even with vzdump\'s SIGPIPE handler', async () => {
    const r = await perlT('directory.mjs', `
$SIG{PIPE} = sub { die "interrupted by signal\\n" };    # as vzdump's worker has it
$p->provider_name;
my $pid = $p->host_pid;
kill('KILL', $pid);
sleep(0.3);
my $t = time();
eval { $p->provider_name };
out('err', $@);
eval { $p->job_cleanup };
out('cleanup-err', $@);
out('elapsed', time() - $t);
out('pid', $pid);
`);
    expect(r.status).toBe(0);
    expect(r.out.err).toMatch(/^backup provider host is not running \(killed by signal 9\): cannot call provider_name/);
    expect(r.out['cleanup-err']).toMatch(/^backup provider host is not running \(killed by signal 9\): cannot call job_cleanup/);
    expect(`${r.out.err}${r.stderr}`).not.toMatch(/interrupted by signal/);
    expect(Number(r.out.elapsed)).toBeLessThan(2);
    expect(gone(Number(r.out.pid))).toBe(true);
  });

  it('makes an error thrown in each provider method a die of the matching Perl call, with its message and code', async () => {
    // [Perl call, arguments as upstream passes them, the TypeScript method that throws]
    const calls: Array<[string, string, string]> = [
      ['provider_name', '', 'providerName'],
      ['job_init', 'time()', 'jobInit'],
      ['job_cleanup', '', 'jobCleanup'],
      ['backup_init', "100, 'qemu', time()", 'backupInit'],
      ['backup_cleanup', "100, 'qemu', 1, {}", 'backupCleanup'],
      ['backup_get_mechanism', "100, 'qemu'", 'backupGetMechanism'],
      ['backup_vm_query_incremental', '100, { disk0 => { size => 1048576 } }', 'backupVmQueryIncremental'],
      ['restore_get_mechanism', "'backup/100/x'", 'restoreGetMechanism'],
      ['archive_get_guest_config', "'backup/100/x', 'dir1'", 'archiveGetGuestConfig'],
      ['archive_get_firewall_config', "'backup/100/x', 'dir1'", 'archiveGetFirewallConfig'],
      ['restore_vm_init', "'backup/100/x'", 'restoreVmInit'],
      ['restore_vm_cleanup', "'backup/100/x'", 'restoreVmCleanup'],
      ['restore_vm_volume_init', "'backup/100/x', 'disk0', {}", 'restoreVmVolumeInit'],
      ['restore_vm_volume_cleanup', "'backup/100/x', 'disk0', {}", 'restoreVmVolumeCleanup'],
      ['restore_container_init', "'backup/100/x', 'dir1', {}", 'restoreContainerInit'],
      ['restore_container_cleanup', "'backup/100/x', 'dir1', {}", 'restoreContainerCleanup'],
      // the data calls need the archive name of a backup_init that answered (scfg init-ok)
      ['backup_vm', "100, 'cfg', { disk0 => { size => 1048576, 'nbd-path' => '/run/x.sock', 'bitmap-mode' => 'none' } }, {}", 'backupVm'],
      ['backup_container_prepare', "100, { directory => '/mnt/vzsnap0', 'backup-user-id' => 0, sources => ['.'] }", 'backupContainerPrepare'],
      ['backup_container', "100, 'arch: amd64', [], { directory => '/mnt/vzsnap0', 'backup-user-id' => 0, sources => ['.'] }", 'backupContainer'],
    ];
    const body = calls
      .map(([perl, args, ts]) => `eval { $p->${perl}(${args}) }; out('${ts}', $@);${perl === 'restore_container_cleanup' ? " $p = PVE::BackupProvider::Plugin::NodeBridge->new(undef, { 'init-ok' => 1 }, 'dir1', sub { push @log, \"$_[0]: $_[1]\" }, provider => $mod, node => $node, cli => $cli); $p->backup_init(100, 'qemu', time());" : ''}`)
      .join('\n');
    const r = await perlT('throwing.mjs', `${body}
eval { $p->backup_handle_log_file(100, '/nonexistent.log') };
out('handle-log-died', $@);
out('log', join(' | ', @log));
`);
    expect(r.stderr).not.toMatch(/Insecure/);
    expect(r.status).toBe(0);
    for (const [, , ts] of calls) expect(r.out[ts], ts).toBe(`${ts} refused by the vendor [ERR_VENDOR_${ts.toUpperCase()}] `);
    // vzdump calls backup_handle_log_file outside any eval: the bridge warns instead of dying
    expect(r.out['handle-log-died']).toBe('');
    expect(r.out.log).toMatch(/warn: backup provider failed to handle the log file - backupHandleLogFile refused by the vendor \[ERR_VENDOR_BACKUPHANDLELOGFILE\]/);
  });

  it("refuses a qemu-img-path that is not a local file (qemu-server's file_size_info needs one)", async () => {
    const r = await perlT('uri-restore.mjs', `
eval { $p->restore_vm_volume_init('backup/100/qemu-x', 'drive-scsi0', {}) };
out('err', $@);
`);
    expect(r.status).toBe(0);
    expect(r.out.err).toMatch(/^backup provider returned an invalid qemu-img-path \(not an absolute path\)/);
  });

  it('fails a setup call the provider does not answer within the setup timeout', async () => {
    const r = await perlT('hanging.mjs', `
my $t = time();
eval { $p->job_init(time()) };
out('err', $@);
out('elapsed', time() - $t);
`);
    expect(r.status).toBe(0);
    expect(r.out.err).toBe('backup provider host did not answer job_init within 2 s ');
    expect(Number(r.out.elapsed)).toBeGreaterThanOrEqual(1.9);
    expect(Number(r.out.elapsed)).toBeLessThan(4);
  });

  it('keeps a log line cut in the middle of a surrogate pair from failing the call it belongs to', async () => {
    // message.slice(0, n) in a provider can keep half of a character outside the BMP; JSON.stringify
    // writes it as a lone \\ud83d escape, which JSON::PP refuses: the running call (backup_vm) died
    const r = await perlT('scripted.mjs', `
my $s = PVE::BackupProvider::Plugin::NodeBridge->new(undef, { logs => { backupInit => ['info', "archive \\x{1F418} ready", 9] }, answers => { backupInit => { archiveName => '100/x' } } }, 'dir1', sub { push @log, "$_[0]: $_[1]" },
    provider => $mod, node => $node, cli => $cli);
my $res = eval { $s->backup_init(100, 'qemu', time()) };
out('err', $@);
out('name', $res ? $res->{'archive-name'} : undef);
out('log', unpack('H*', join('|', @log)));
`);
    expect(r.status).toBe(0);
    expect(r.out).toMatchObject({ err: '', name: '100/x' });
    expect(Buffer.from(r.out.log!, 'hex').toString('utf8')).toBe('info: archive \uFFFD');
  });

  it("sends what a provider writes to stdout itself (process.stdout.write, console.dir) to the task log, not into the protocol", async () => {
    const r = await perlT('scripted.mjs', `
my $s = PVE::BackupProvider::Plugin::NodeBridge->new(undef, { stdout => { backupInit => "copied 50%\\r" }, answers => { backupInit => { archiveName => '100/x' }, providerName => 'scripted' } }, 'dir1', sub { },
    provider => $mod, node => $node, cli => $cli);
my $res = eval { $s->backup_init(100, 'qemu', time()) };
out('err', $@);
out('name', eval { $s->provider_name() } // $@);
`);
    expect(r.status).toBe(0);
    expect(r.out).toMatchObject({ err: '', name: 'scripted' });
    expect(r.stderr).toContain('copied 50%');
    expect(r.stderr).toContain("method: 'backupInit'");
  });

  it("lets a task stop's die through backup_handle_log_file, which swallows only the provider's failures", async () => {
    // vzdump calls it outside any eval (pve-manager VZDump.pm exec_backup_task), so a provider's
    // failure must not die; a signal handler's die must: it is how a stopped job stops
    const r = await perlT('scripted.mjs', `
my $s = PVE::BackupProvider::Plugin::NodeBridge->new(undef, { delay => { backupHandleLogFile => 3000 } }, 'dir1', sub { push @log, "$_[0]: $_[1]" },
    provider => $mod, node => $node, cli => $cli);
$s->job_init(time());
eval {
    local $SIG{ALRM} = sub { die "interrupted by signal\\n" };    # vzdump's handlers die like this
    alarm(1);
    $s->backup_handle_log_file(100, '/tmp/task.log');
};
alarm(0);
out('err', $@);
out('log', join('|', @log));
`);
    expect(r.status).toBe(0);
    expect(r.out.err).toBe('interrupted by signal ');
    expect(r.out.log).toBe('');
  });

  it("lets a task stop's die out of the log function (a slow task log) end the call, instead of swallowing it", async () => {
    const r = await perlT('scripted.mjs', `
my $s = PVE::BackupProvider::Plugin::NodeBridge->new(undef, { logs => { backupInit => ['info', 'starting'] }, delay => { backupInit => 2000 }, answers => { backupInit => { archiveName => '100/x' } } }, 'dir1', sub { sleep(3) },
    provider => $mod, node => $node, cli => $cli);
$s->job_init(time());
my $res = eval {
    local $SIG{ALRM} = sub { die "interrupted by signal\\n" };    # vzdump's handlers die like this
    alarm(1);
    $s->backup_init(100, 'qemu', time());
};
alarm(0);
out('err', $@);
`);
    expect(r.status).toBe(0);
    expect(r.out.err).toBe('interrupted by signal ');
  });

  it("does not fail a backup over its statistics: backup_cleanup's archive size is rounded down, or left out with a warning", async () => {
    // vzdump only shows the size (VZDump.pm exec_backup_task: $task->{size}); a die in
    // backup_cleanup(..., 1) fails the guest, and the provider then removes a complete backup
    const cases = [1234.9, -5, 'big', null];
    const r = await perlT('scripted.mjs', cases.map((size, i) => `
my $s${i} = PVE::BackupProvider::Plugin::NodeBridge->new(undef, { answers => { backupCleanup => { stats => { archiveSize => ${JSON.stringify(size).replace('null', 'undef')} } } } }, 'dir1', sub { push @log, "$_[0]: $_[1]" },
    provider => $mod, node => $node, cli => $cli);
my $r${i} = eval { $s${i}->backup_cleanup(100, 'qemu', 1, {}) };
out('err${i}', $@);
out('size${i}', $r${i} && $r${i}->{stats} ? $r${i}->{stats}->{'archive-size'} : 'none');
`).join('') + `
out('log', join('|', @log));
`);
    expect(r.status).toBe(0);
    expect(r.out).toMatchObject({ err0: '', size0: '1234', err1: '', size1: 'none', err2: '', size2: 'none', err3: '', size3: 'none' });
    expect(r.out.log).toMatch(/warn: .*archive size -5/);
    expect(r.out.log).toMatch(/warn: .*archive size "big"/);
  });

  it('gives restore_vm_init no time limit, as the other restore inits: a provider may check the whole backup there', async () => {
    // the DirectoryProvider hashes every image of a backup recorded by SHA-256 (manifest version
    // 1) in restoreVmInit, minutes for a large disk; qemu-server waits as long as it takes
    const r = await perlT('scripted.mjs', `
my $s = PVE::BackupProvider::Plugin::NodeBridge->new(undef, { delay => { restoreVmInit => 3000 }, answers => { restoreVmInit => { disk0 => { size => 4096 } } } }, 'dir1', sub { },
    provider => $mod, node => $node, cli => $cli, setup_timeout => 1);
my $r = eval { $s->restore_vm_init('backup/100/x') };
out('err', $@);
out('size', $r ? $r->{disk0}->{size} : undef);
`);
    expect(r.status).toBe(0);
    expect(r.out).toMatchObject({ err: '', size: '4096' });
  });

  it('fails within seconds when the host cannot start (a module that does not load)', async () => {
    const r = await perlT('/nonexistent/provider.mjs', `
my $t = time();
eval { $p->provider_name };
out('err', $@);
out('elapsed', time() - $t);
`);
    expect(r.status).toBe(0);
    expect(r.out.err).toMatch(/^backup provider host did not start: backup provider host is not running \(exit code 1\)/);
    expect(r.stderr).toMatch(/cannot load the provider module '\/nonexistent\/provider.mjs'.*\[ERR_BRIDGE\]/);
    expect(Number(r.out.elapsed)).toBeLessThan(5);
  });

  it('drops the late reply of a call a signal interrupted: the next call gets its own answer', async () => {
    const r = await perlT('slow.mjs', `
$p->backup_init(100, 'qemu', time());
eval {
    local $SIG{ALRM} = sub { die "interrupted by signal\n" };    # vzdump's handlers die like this
    alarm(1);
    $p->backup_vm(100, '', { 'drive-scsi0' => { size => 1, 'bitmap-mode' => 'none', 'nbd-path' => '/nonexistent' } }, {});
};
alarm(0);
out('vm-err', $@);
kill('TERM', $p->host_pid);    # the task stop reaches the host too: backup_vm ends, its reply comes late
sleep(0.3);
out('name', $p->provider_name);
out('log', join('|', @log));
`);
    expect(r.status).toBe(0);
    expect(r.out['vm-err']).toBe('interrupted by signal ');
    expect(r.out.name).toBe('directory');
    // the host's log lines of the interrupted call still reach the log function; the host's
    // CancelledError is the one the provider module imports (one copy of the package's classes)
    expect(r.out.log).toContain("info: backup_vm saw the cancellation (the package's CancelledError: true)");
  });

  it("ends the host when its input ends, though the provider keeps a timer: fork_worker leaves with POSIX::_exit, no DESTROY", async () => {
    // pve-common RESTEnvironment.pm fork_worker ends every task (vzdump, qmrestore, pct restore)
    // with POSIX::_exit: no DESTROY closes the host down, its input only ends
    const r = await perlT('timer.mjs', `
$| = 1;
open(STDERR, '>', '/dev/null');    # the host's stderr: a host left behind must not hold the test's pipe
out('name', $p->provider_name);
out('pid', $p->host_pid);
POSIX::_exit(0);
`);
    expect(r.out.name).toBe('directory');
    const pid = Number(r.out.pid);
    expect(pid).toBeGreaterThan(0);
    const until = Date.now() + 5000;
    while (!gone(pid) && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 100));
    const left = !gone(pid);
    if (left) process.kill(pid, 'SIGKILL');
    expect(left, 'the host outlived its Perl side').toBe(false);
  });

  it('ends the host a few seconds after its input ended even when a call never settles (a hung provider)', async () => {
    const r = await perlT('scripted.mjs', `
$| = 1;
open(STDERR, '>', '/dev/null');    # the host's stderr: a host left behind must not hold the test's pipe
my $s = PVE::BackupProvider::Plugin::NodeBridge->new(undef, { delay => { jobInit => 120000 } }, 'dir1', sub { },
    provider => $mod, node => $node, cli => $cli, setup_timeout => 1);
eval { $s->job_init(time()) };
out('err', $@);
out('pid', $s->host_pid);
POSIX::_exit(0);
`);
    expect(r.out.err).toBe('backup provider host did not answer job_init within 1 s ');
    const pid = Number(r.out.pid);
    const until = Date.now() + 10_000;
    while (!gone(pid) && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 100));
    const left = !gone(pid);
    if (left) process.kill(pid, 'SIGKILL');
    expect(left, 'the host outlived its Perl side').toBe(false);
  });

  it('carries text as UTF-8 both ways: PVE\'s byte strings (a config from file_get_contents) reach the provider as text, its text returns as bytes', async () => {
    // Proxmox VE reads a guest config with file_get_contents (UTF-8 bytes, no decoding) and writes
    // the restored one with file_set_contents (print without a layer: characters below U+0100 are
    // written as single bytes); API parameters (notes) are Perl characters (docs/pve-bridge-notes.md §6.2)
    const r = await perlT('scripted.mjs', `
my $record = "$ARGV[3].record";
my $answers = {
    backupInit => { archiveName => '100/x' },
    archiveGetGuestConfig => "description: caf\\x{e9}\\n",
    archiveGetFirewallConfig => "# \\x{fc}ber \\x{20ac}\\n",
    restoreContainerInit => { tarPath => "/mnt/b\\x{fc}ro/root.tar" },
    providerName => "Caf\\x{e9} backup",
};
# storage.cfg as pmxcfs gives it: bytes
my $s = PVE::BackupProvider::Plugin::NodeBridge->new(undef, { answers => $answers, record => $record, path => "/mnt/b\\xc3\\xbcro" }, 'dir1', sub { push @log, "$_[0]: $_[1]" },
    provider => $mod, node => $node, cli => $cli);
$s->backup_init(100, 'qemu', time());
# the config as bytes, as file_get_contents gives them; the firewall config as characters, as an API parameter is
$s->backup_vm(100, "description: caf\\xc3\\xa9\\n", { disk0 => { size => 1, 'nbd-path' => '/x', 'bitmap-mode' => 'none' } }, { 'firewall-config' => "# \\x{fc}ber\\n" });
out('guest', unpack('H*', $s->archive_get_guest_config('backup/100/x')));
out('firewall', unpack('H*', $s->archive_get_firewall_config('backup/100/x')));
out('name', unpack('H*', $s->provider_name()));
out('tar', unpack('H*', $s->restore_container_init('backup/100/x', 'dir1', {})->{'tar-path'}));
open(my $fh, '<', $record) or die;
my @calls = <$fh>;
out('vm', (grep { /"backupVm"/ } @calls)[0]);
`);
    expect(r.stderr).not.toMatch(/Insecure|Wide character/);
    expect(r.status).toBe(0);
    const vm = JSON.parse(r.out.vm!) as { args: [number, string, unknown, { firewallConfig: string }]; path: string };
    // a store path read as Latin-1 would be another folder (/mnt/bÃ¼ro), one nobody handed over
    expect(vm.path).toBe('/mnt/büro');
    expect(vm.args[1]).toBe('description: café\n');
    expect(vm.args[3].firewallConfig).toBe('# über\n');
    expect(Buffer.from(r.out.guest!, 'hex').toString('utf8')).toBe('description: café\n');
    expect(Buffer.from(r.out.firewall!, 'hex').toString('utf8')).toBe('# über €\n');
    expect(Buffer.from(r.out.name!, 'hex').toString('utf8')).toBe('Café backup');
    expect(Buffer.from(r.out.tar!, 'hex').toString('utf8')).toBe('/mnt/büro/root.tar');
  });

  it("refuses an archive name with a trailing newline (Perl's $ would have dropped it from the name vzdump uses) or a '.', '..' or empty segment", async () => {
    const names = ['100/x\\n', '100/../../x', '100/./x', '/100/x', '100//x'];
    const r = await perlT('scripted.mjs', names.map((n, i) => `
my $s${i} = PVE::BackupProvider::Plugin::NodeBridge->new(undef, { answers => { backupInit => { archiveName => "${n}" } } }, 'dir1', sub { },
    provider => $mod, node => $node, cli => $cli);
my $res${i} = eval { $s${i}->backup_init(100, 'qemu', time()) };
out('err${i}', $@ || $res${i}->{'archive-name'});
`).join(''));
    expect(r.status).toBe(0);
    expect(r.out.err0).toMatch(/^backup provider returned an archive name with illegal characters/);
    for (const i of [1, 2, 3, 4]) expect(r.out[`err${i}`]).toMatch(/^backup provider returned an archive name with a '.', '..' or empty path segment/);
  });

  it('keeps the channel in step after a signal cut a request short: the next call is answered', async () => {
    // the host's event loop is blocked (a provider's synchronous call outlived the setup timeout),
    // so a large request fills the pipe; a signal (a task stop: vzdump's handlers die) ends the
    // write half way, and the next request would be glued to the torn one; for backup_cleanup,
    // which has no time limit, that was a hang
    const r = await perlT('scripted.mjs', `
my $s = PVE::BackupProvider::Plugin::NodeBridge->new(undef, { block => { jobInit => 3000 }, answers => { providerName => 'scripted', backupInit => { archiveName => '100/x' } } }, 'dir1', sub { },
    provider => $mod, node => $node, cli => $cli, setup_timeout => 1);
$s->backup_init(100, 'qemu', time());
eval { $s->job_init(time()) };
out('init-err', $@);
eval {
    local $SIG{ALRM} = sub { die "interrupted by signal\\n" };
    alarm(1);
    $s->backup_vm(100, 'x' x 4_000_000, { disk0 => { size => 1, 'nbd-path' => '/x', 'bitmap-mode' => 'none' } }, {});
};
alarm(0);
out('vm-err', $@);
sleep(2.5);    # the host's synchronous call ends; it reads what is in the pipe
$s->{setup_timeout} = 5;
out('name', eval { $s->provider_name() } // $@);
`);
    expect(r.status).toBe(0);
    expect(r.out['init-err']).toBe('backup provider host did not answer job_init within 1 s ');
    expect(r.out['vm-err']).toBe('interrupted by signal ');
    expect(r.out.name).toBe('scripted');
  });

  it('refuses a file-handle volume in backup_vm before anything crosses the pipe', async () => {
    const r = await perlT('directory.mjs', `
eval { $p->backup_vm(100, '', { 'drive-scsi0' => { size => 1, 'bitmap-mode' => 'none', 'file-handle' => \\*STDIN, 'next-dirty-region' => sub { () } } }, {}) };
out('err', $@);
out('started', $p->host_pid // 'none');
`);
    expect(r.out.err).toBe("volume 'drive-scsi0': the Node bridge carries only the nbd mechanism (no nbd-path; file-handle is not supported) ");
    expect(r.out.started).toBe('none');
  });
});

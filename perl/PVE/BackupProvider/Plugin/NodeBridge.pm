package PVE::BackupProvider::Plugin::NodeBridge;

# A backup provider for Proxmox VE (PVE::BackupProvider::Plugin, PVE 8.4+) whose logic lives in
# a Node module: every method is forwarded to `pve-backup-provider provider-host --provider
# MODULE`, a child process that speaks newline-delimited JSON on its stdin/stdout (protocol in
# lib/bridge/host.ts of pve-backup-provider).
#
# What upstream decides here (docs/pve-bridge-notes.md of the package has file and line):
# - The host starts on the first call, never in new(): vzdump builds the provider before getlock,
#   qemu-server in the API process before fork_worker (§1.3, §7.1). The process that started it
#   owns it ($$ is recorded); DESTROY elsewhere does nothing.
# - vzdump runs under perl -T: Node is exec'd by absolute path in list form with a fixed PATH,
#   and every reply is validated and untainted before it is returned, because upstream passes
#   provider results to run_command (§6.2).
# - vzdump's $SIG{PIPE} handler dies "interrupted by signal", which aborts the whole job: writes
#   ignore SIGPIPE and a dead host becomes an ordinary die (§6.3).
# - A task stop signals the process group, the host included; the host only cancels the running
#   call and keeps serving, since backup_cleanup and job_cleanup still follow (§6.3, §7.2).
#
# Core Perl only.

use strict;
use warnings;

use Errno qw(EINTR);
use Fcntl qw(F_GETFD F_SETFD FD_CLOEXEC);
use File::Basename qw(dirname);
use File::Spec;
use IO::Handle;
use IO::Select;
use JSON::PP;
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

use parent -norequire, 'PVE::BackupProvider::Plugin::Base';
# the real base class is in pve-storage; load it when present, so this file compiles without it
BEGIN { eval { require PVE::BackupProvider::Plugin::Base; 1 } }

use constant PROTOCOL_VERSION => 1;
# what vzdump accepts as an archive name (pve-manager VZDump.pm exec_backup_task,
# PVE::Storage::SAFE_CHAR_CLASS_RE); \z, not $: with $ a name ending in a newline would pass
# and lose the newline, so vzdump's volume would not be the one the provider names
my $ARCHIVE_NAME_RE = qr/^((?:[a-zA-Z0-9\-\.\+\=\_]|\/|:)+)\z/;
my $SAFE_PATH = '/sbin:/bin:/usr/sbin:/usr/bin';

# Text crosses the pipe as UTF-8. Proxmox VE's strings are mostly bytes: a guest or firewall
# config from file_get_contents holds UTF-8 bytes, undecoded, and what it writes back goes through
# file_set_contents, which prints without a layer (characters below U+0100 become single bytes);
# API parameters (notes, exclude paths) are Perl characters (pve-common PVE/File.pm). So requests
# are encoded over bytes (character strings encoded to UTF-8 first: _bytes) and the text of
# replies (configs, log lines, errors) is handed to Proxmox VE as UTF-8 bytes again (_utf8).
my $JSON = JSON::PP->new->utf8->canonical->allow_nonref->allow_blessed;    # replies
my $JSON_BYTES = JSON::PP->new->canonical->allow_nonref->allow_blessed;    # requests, over _bytes

# A copy of a request's data in which every string is UTF-8 bytes, so that bytes and characters
# both reach the host as the text they are: a character string (UTF8 flag, as JSON and the API
# decode them) is encoded; a byte string is taken as UTF-8 when it is valid UTF-8, else as
# Latin-1 characters (a string of characters below U+0100 may lack the flag), never replaced.
sub _bytes {
    my ($v) = @_;
    my $r = ref($v);
    return { map { (_bytes($_) => _bytes($v->{$_})) } keys %$v } if $r eq 'HASH';
    return [ map { _bytes($_) } @$v ] if $r eq 'ARRAY';
    return $v if $r || !defined($v) || $v !~ /[^\x00-\x7f]/;
    my $b = $v;
    if (!utf8::is_utf8($b)) {
        my $check = $b;
        return $b if utf8::decode($check);
        utf8::upgrade($b);
    }
    utf8::encode($b);
    return $b;
}

# A decoded reply's text as the UTF-8 bytes Proxmox VE prints and writes.
sub _utf8 {
    my ($v) = @_;
    return $v if !defined($v) || ref($v);
    utf8::encode($v);
    return $v;
}

# Calls that move or check data have no time limit (a backup may take hours; a provider may check
# a whole backup before a restore writes anything, as the DirectoryProvider does in
# restore_vm_init for images recorded by SHA-256); the others must answer within the setup
# timeout. A dead host fails every call within about a second either way.
my %NO_TIMEOUT = map { $_ => 1 } qw(
    backup_vm backup_container backup_container_prepare backup_cleanup
    restore_vm_init restore_vm_volume_init restore_container_init
);

# new($class, $storage_plugin, $scfg, $storeid, $log_function, %options), the constructor
# Base.pm documents. Options (a storage plugin's new_backup_provider passes them):
#   provider      the provider module (path or package) for --provider; required
#   node          absolute path of node (default /usr/bin/node)
#   cli           absolute path of pve-backup-provider's dist/cli/main.js (default: the one
#                 of the package this file belongs to)
#   setup_timeout seconds a setup call may take (default 120)
#   env           extra environment for the host (hash)
sub new {
    my ($class, $storage_plugin, $scfg, $storeid, $log_function, %opts) = @_;

    die "no provider module given to $class\n" if !defined($opts{provider}) || $opts{provider} eq '';
    my $node = $opts{node} // '/usr/bin/node';
    my $cli = $opts{cli} // default_cli();
    my $self = bless {
        storage_plugin => $storage_plugin,
        scfg => $scfg,
        storeid => $storeid,
        log_function => $log_function,
        node => _untaint_abs($node, 'node'),
        cli => _untaint_abs($cli, 'cli'),
        provider => _untaint_arg($opts{provider}, 'provider'),
        setup_timeout => $opts{setup_timeout} // 120,
        env => $opts{env} // {},
        host => undef,
    }, $class;
    return $self;
}

# dist/cli/main.js of the package holding this file (perl/PVE/BackupProvider/Plugin/NodeBridge.pm)
sub default_cli {
    my $dir = dirname(File::Spec->rel2abs(__FILE__));
    return File::Spec->catfile($dir, ('..') x 4, 'dist', 'cli', 'main.js');
}

# pid of the running host, or undef (for tests and diagnostics)
sub host_pid {
    my ($self) = @_;
    my $h = $self->{host};
    return ($h && !defined($h->{exit})) ? $h->{pid} : undef;
}

sub _untaint_abs {
    my ($v, $what) = @_;
    die "$what must be an absolute path\n" if !defined($v) || $v !~ m!^(/[^\0]*)$!;
    return $1;
}

sub _untaint_arg {
    my ($v, $what) = @_;
    die "$what is empty or holds a NUL\n" if !defined($v) || $v !~ m!^([^\0]+)$!;
    return $1;
}

# Whether an error is a signal handler's die: a task stop or Ctrl-C (qemu-server's and vzdump's
# "interrupted by signal", fork_worker's "received interrupt"). Such a die must reach Proxmox VE
# wherever it strikes: stopping the job is what it is for (VZDump.pm exec_backup_task rethrows it).
sub _interrupt {
    my ($err) = @_;
    return defined($err) && $err =~ /^(?:interrupted by signal|received interrupt)\n\z/;
}

sub _log {
    my ($self, $level, $message) = @_;
    my $fn = $self->{log_function} or return;
    $level = 'err' if !defined($level) || $level !~ /^(info|warn|err)$/;
    eval { $fn->($level, $message) };    # a broken log function must not break the call
    die $@ if _interrupt($@);            # but a task stop striking while it writes must
}

# ---- the host process ----

sub _start_host {
    my ($self) = @_;

    pipe(my $child_in, my $to_host) or die "bridge: pipe failed: $!\n";
    pipe(my $from_host, my $child_out) or die "bridge: pipe failed: $!\n";
    my @cmd = ($self->{node}, $self->{cli}, 'provider-host', '--provider', $self->{provider});

    my $pid;
    {
        # taint: exec needs a clean PATH and environment (docs/pve-bridge-notes.md §6.2)
        local $ENV{PATH} = $SAFE_PATH;
        local @ENV{qw(IFS CDPATH ENV BASH_ENV)};
        delete @ENV{qw(IFS CDPATH ENV BASH_ENV)};
        local @ENV{keys %{ $self->{env} }} = values %{ $self->{env} };
        $pid = fork();
        die "bridge: fork failed: $!\n" if !defined($pid);
        if ($pid == 0) {
            # the channel goes on stdin/stdout: dup2 clears FD_CLOEXEC, so Node gets exactly these
            eval {
                close($to_host);
                close($from_host);
                POSIX::dup2(fileno($child_in), 0) // die "dup2: $!\n";
                POSIX::dup2(fileno($child_out), 1) // die "dup2: $!\n";
                exec { $cmd[0] } @cmd or die "exec $cmd[0]: $!\n";
            };
            print STDERR "bridge: cannot start the provider host: $@";
            POSIX::_exit(127);
        }
    }
    close($child_in);
    close($child_out);
    $to_host->autoflush(1);

    $self->{host} = {
        pid => $pid,
        owner => $$,
        in => $to_host,
        out => $from_host,
        select => IO::Select->new($from_host),
        buf => '',
        next_id => 0,
        exit => undef,
    };

    my $hello = eval {
        $self->_request('hello', $self->{setup_timeout}, { storeid => $self->{storeid}, scfg => $self->{scfg} });
    };
    if (my $err = $@) {
        $self->shutdown_host();
        die "backup provider host did not start: $err";
    }
    if (ref($hello) ne 'HASH' || ($hello->{protocol} // '') ne PROTOCOL_VERSION) {
        $self->shutdown_host();
        die "backup provider host speaks another protocol version than " . PROTOCOL_VERSION . "\n";
    }
}

# Records the host's exit (status text) once; true if it has exited.
sub _check_exit {
    my ($self, $block) = @_;
    my $h = $self->{host} or return 1;
    return 1 if defined($h->{exit});
    if ($h->{owner} != $$) {
        # A forked child (an unprivileged container's backup_container) cannot wait for its
        # parent's child. It runs as the container's root uid (e.g. 100000) in a user namespace
        # of its own, so kill(0) answers EPERM for the host: that means alive, only ESRCH gone.
        return 0 if kill(0, $h->{pid}) || $!{EPERM};
        $h->{exit} = 'gone';
        return 1;
    }
    my $r = waitpid($h->{pid}, $block ? 0 : WNOHANG);
    return 0 if $r == 0;
    if ($r == $h->{pid}) {
        my $st = $?;
        $h->{exit} = ($st & 127) ? "killed by signal " . ($st & 127) : "exit code " . ($st >> 8);
    } else {
        # reaped by someone else (pvedaemon's SIGCHLD reaper) or never ours
        $h->{exit} = 'gone';
    }
    return 1;
}

sub _dead {
    my ($self, $what) = @_;
    my $h = $self->{host};
    $self->_check_exit(0);
    my $how = $h && defined($h->{exit}) ? $h->{exit} : 'closed its output';
    die "backup provider host is not running ($how): cannot $what\n";
}

sub _write {
    my ($self, $data, $method) = @_;
    my $h = $self->{host};
    # vzdump's SIGPIPE handler would abort the whole job (docs/pve-bridge-notes.md §6.3)
    local $SIG{PIPE} = 'IGNORE';
    # A die from a signal handler (a task stop) can end a write half way when the pipe is full,
    # here or in a forked container child sharing the pipe: every request starts a line of its own,
    # so a torn one is one bad line the host answers with id null (dropped in _request), not the
    # start of this request, which would never be answered. The host skips empty lines.
    $data = "\n$data";
    my $off = 0;
    while ($off < length($data)) {
        my $n = syswrite($h->{in}, $data, length($data) - $off, $off);
        if (!defined($n)) {
            next if $! == EINTR;
            $self->_dead("call $method (write failed: $!)");
        }
        $off += $n;
    }
}

# One request: send, stream log events to $log_function, return the result or die.
sub _request {
    my ($self, $method, $timeout, @params) = @_;
    my $h = $self->{host};
    $self->_dead("call $method") if !$h || defined($h->{exit});

    # Ids carry the pid: an unprivileged container's backup_container is a forked child using the
    # inherited channel with its own copy of the counter. Its reply, if the child was killed
    # before reading it, must not pass for the answer to the parent's next call.
    my $id = "$$." . ++$h->{next_id};
    $self->_write($JSON_BYTES->encode(_bytes({ id => $id, method => $method, params => \@params })) . "\n", $method);
    my $deadline = defined($timeout) ? time() + $timeout : undef;

    while (1) {
        while ($h->{buf} =~ s/^([^\n]*)\n//) {
            my $line = $1;
            next if $line eq '';
            my $msg = eval { $JSON->decode($line) };
            die "backup provider host sent something that is not JSON: " . substr($line, 0, 80) . "\n"
                if ref($msg) ne 'HASH';
            if (ref($msg->{log}) eq 'HASH') {
                $self->_log($msg->{log}->{level}, _utf8($msg->{log}->{message} // ''));
                next;
            }
            # a reply to a call interrupted earlier (a die from a signal handler) is dropped
            next if !defined($msg->{id}) || $msg->{id} ne $id;
            if (defined(my $err = $msg->{error})) {
                my $text = ref($err) eq 'HASH' ? ($err->{message} // 'unknown error') : "$err";
                my $code = ref($err) eq 'HASH' && defined($err->{code}) && $err->{code} =~ /^([A-Za-z0-9_]{1,64})$/ ? $1 : 'ERR_PROVIDER';
                $text =~ s/\s+$//;
                $self->{last_error_code} = $code;
                die _utf8($text) . " [$code]\n";
            }
            return $msg->{result};
        }

        my $wait = 1;    # watch the pid at least once a second: a dead host never hangs a call
        if (defined($deadline)) {
            my $left = $deadline - time();
            if ($left <= 0) {
                die "backup provider host did not answer $method within $timeout s\n";
            }
            $wait = $left if $left < $wait;
        }
        my @ready = $h->{select}->can_read($wait);
        if (@ready) {
            my $n = sysread($h->{out}, my $chunk, 65536);
            if (!defined($n)) {
                next if $! == EINTR;
                die "backup provider host: read failed: $!\n";
            }
            if ($n == 0) {
                # EOF: the host is gone; give it a moment to be reaped so the message says how
                for (1 .. 20) { last if $self->_check_exit(0); sleep(0.05) }
                $h->{exit} //= 'closed its output';
                $self->_dead("finish $method");
            }
            $h->{buf} .= $chunk;
        } elsif ($self->_check_exit(0)) {
            $self->_dead("finish $method");
        }
    }
}

sub _call {
    my ($self, $method, @params) = @_;
    $self->_start_host() if !$self->{host};
    my $timeout = $NO_TIMEOUT{$method} ? undef : $self->{setup_timeout};
    return $self->_request($method, $timeout, @params);
}

# Ends the host: closes its input (it exits when stdin ends), then TERM and KILL if it lingers.
# Only in the process that started it.
sub shutdown_host {
    my ($self) = @_;
    my $h = $self->{host} or return;
    return if $h->{owner} != $$;
    close($h->{in}) if $h->{in};
    $h->{in} = undef;
    # storage_call shortens the waits: its caller (pvestatd) has a time bound
    my $grace = $self->{shutdown_grace} // 5;
    my $end = time() + $grace;
    while (!$self->_check_exit(0)) {
        last if time() > $end;
        sleep(0.05);
    }
    if (!defined($h->{exit})) {
        kill('TERM', $h->{pid});
        $end = time() + ($self->{shutdown_grace} // 2);
        while (!$self->_check_exit(0) && time() < $end) { sleep(0.05) }
        if (!defined($h->{exit})) {
            kill('KILL', $h->{pid});
            $self->_check_exit(1);
        }
    }
    close($h->{out}) if $h->{out};
    $h->{out} = undef;
}

sub DESTROY {
    my ($self) = @_;
    local ($@, $!, $?);
    my $h = $self->{host} or return;
    return if $h->{owner} != $$;    # a forked parent or child must not end the owner's host
    eval { $self->shutdown_host() };
}

# ---- validation and untainting of replies (docs/pve-bridge-notes.md §6.2, §7.5) ----

# text for Proxmox VE to write (a config): untainted, as UTF-8 bytes
sub _text {
    my ($v, $what) = @_;
    die "backup provider returned no $what\n" if !defined($v) || ref($v);
    $v =~ /^(.*)\z/s;
    return _utf8($1);
}

sub _uint {
    my ($v, $what) = @_;
    die "backup provider returned an invalid $what\n" if !defined($v) || ref($v) || $v !~ /^(\d+)\z/;
    return $1 + 0;
}

sub _device {
    my ($v) = @_;
    die "backup provider returned an invalid device name\n" if !defined($v) || $v !~ /^([a-zA-Z0-9][a-zA-Z0-9_.\-]*)\z/;
    return $1;
}

# a path for Proxmox VE to open: untainted, as the UTF-8 bytes of its name
sub _abs_path {
    my ($v, $what) = @_;
    die "backup provider returned an invalid $what\n" if !defined($v) || ref($v) || $v !~ m!^(/[^\0]+)\z!;
    return _utf8($1);
}

# ---- the API (PVE::BackupProvider::Plugin::Base of pve-storage, PVE 8.4+) ----
# Every method takes extra trailing arguments: upstream passes $storeid to several (§2).

sub provider_name {
    my ($self) = @_;
    my $name = $self->_call('provider_name');
    die "backup provider returned an invalid name\n" if !defined($name) || ref($name) || $name !~ /^([^\0\n]{1,200})\z/;
    return _utf8($1);
}

sub job_init {
    my ($self, $start_time) = @_;
    $self->_call('job_init', $start_time);
    return;
}

sub job_cleanup {
    my ($self) = @_;
    $self->_call('job_cleanup');
    return;
}

sub backup_init {
    my ($self, $vmid, $vmtype, $start_time) = @_;
    my $r = $self->_call('backup_init', $vmid, $vmtype, $start_time);
    die "backup provider returned no archive name\n" if ref($r) ne 'HASH' || !defined($r->{'archive-name'});
    my $name = $r->{'archive-name'};
    die "backup provider returned an archive name with illegal characters: '$name'\n" if $name !~ $ARCHIVE_NAME_RE;
    $name = $1;
    # the generated storage plugin's parse_volname refuses these (a user's volume name must not
    # climb out of a provider's paths): a backup named so could not be annotated, protected or
    # pruned by vzdump afterwards
    die "backup provider returned an archive name with a '.', '..' or empty path segment: '$name'\n"
        if grep { $_ eq '' || $_ eq '.' || $_ eq '..' } split(m!/!, $name, -1);
    return { 'archive-name' => $name };
}

sub backup_cleanup {
    my ($self, $vmid, $vmtype, $success, $info) = @_;
    my %info = ref($info) eq 'HASH' ? %$info : ();
    $info{error} = "$info{error}" if defined($info{error});    # an error object becomes its text
    my $r = $self->_call('backup_cleanup', $vmid, $vmtype, $success ? 1 : 0, \%info);
    my $res = {};
    if (ref($r) eq 'HASH' && ref($r->{stats}) eq 'HASH' && defined($r->{stats}->{'archive-size'})) {
        $res->{stats} = { 'archive-size' => _uint($r->{stats}->{'archive-size'}, 'archive size') };
    }
    return $res;
}

sub backup_get_mechanism {
    my ($self, $vmid, $vmtype) = @_;
    my $m = $self->_call('backup_get_mechanism', $vmid, $vmtype);
    return undef if !defined($m);
    die "backup provider returned an invalid mechanism\n" if ref($m) || $m !~ /^(nbd|directory)$/;
    return $1;
}

sub backup_handle_log_file {
    my ($self, $vmid, $filename) = @_;
    # vzdump calls this outside any eval: a die would abort the whole job (§3.3 step 7); the
    # provider's failure only warns. A signal handler's die (a task stop or Ctrl-C: qemu-server's
    # "interrupted by signal", fork_worker's "received interrupt") goes on: stopping the job is
    # what it is for.
    eval { $self->_call('backup_handle_log_file', $vmid, $filename) };
    if (my $err = $@) {
        die $err if _interrupt($err);
        $self->_log('warn', "backup provider failed to handle the log file - $err");
    }
    return;
}

sub backup_vm_query_incremental {
    my ($self, $vmid, $volumes) = @_;
    my $r = $self->_call('backup_vm_query_incremental', $vmid, $volumes);
    return undef if !defined($r);
    die "backup provider returned an invalid incremental plan\n" if ref($r) ne 'HASH';
    my $res = {};
    for my $dev (keys %$r) {
        my $mode = $r->{$dev};
        die "backup provider returned invalid incremental mode for '$dev'\n"
            if !defined($mode) || ref($mode) || $mode !~ /^(new|use|none)$/;
        $res->{ _device($dev) } = $1;
    }
    return $res;
}

sub backup_vm {
    my ($self, $vmid, $guest_config, $volumes, $info) = @_;
    my %vols;
    for my $dev (keys %{ $volumes // {} }) {
        my $v = $volumes->{$dev};
        die "volume '$dev': the Node bridge carries only the nbd mechanism (no nbd-path; file-handle is not supported)\n"
            if !defined($v->{'nbd-path'});
        # only the plain values cross the pipe (a file handle or closure could not)
        $vols{$dev} = { map { ($_ => $v->{$_}) } grep { !ref($v->{$_}) } keys %$v };
    }
    $self->_call('backup_vm', $vmid, $guest_config, \%vols, $info // {});
    return;
}

# Containers (pve-container src/PVE/VZDump/LXC.pm archive, docs/pve-bridge-notes.md §3.5, §6.4,
# §7.7): vzdump mounts the container's tree at $info->{directory} (/mnt/vzsnap0) in a mount
# namespace of its own, made after the host was started at job_init, so the host cannot see it
# at that path. Both calls tell the host the pid of a process in that namespace
# ('bridge-ns-pid'); the host, root in the old namespace, reads the tree as
# /proc/<pid>/root<directory> and maps owners to the container's view itself (design (a) of
# §7.7). backup_container_prepare runs in vzdump's worker; backup_container, for an unprivileged
# container, in a child forked after it (PVE::LXC::Namespaces::run_in_userns), which inherits
# what prepare recorded in $self and sends the worker's pid, whose namespace holds the mount.
sub backup_container_prepare {
    my ($self, $vmid, $info) = @_;
    $self->{ct_ns_pid}->{$vmid} = $$;
    $self->_call('backup_container_prepare', $vmid, { %{ $info // {} }, 'bridge-ns-pid' => $$ });
    return;
}

sub backup_container {
    my ($self, $vmid, $guest_config, $exclude_patterns, $info) = @_;
    # without a prepare in this job (not what vzdump does), the caller's own namespace
    my $ns_pid = $self->{ct_ns_pid}->{$vmid} // $$;
    $self->_call('backup_container', $vmid, $guest_config, $exclude_patterns // [], { %{ $info // {} }, 'bridge-ns-pid' => $ns_pid });
    return;    # a plain scalar: the result crosses run_fork's JSON (§3.5)
}

sub restore_get_mechanism {
    my ($self, $volname) = @_;
    my $r = $self->_call('restore_get_mechanism', $volname);
    die "backup provider returned an invalid restore mechanism\n" if ref($r) ne 'ARRAY' || scalar(@$r) != 2;
    my ($mechanism, $vmtype) = @$r;
    die "backup provider returned an invalid restore mechanism\n" if !defined($mechanism) || $mechanism !~ /^(qemu-img|tar|directory)$/;
    $mechanism = $1;
    die "backup provider returned an invalid guest type\n" if !defined($vmtype) || $vmtype !~ /^(qemu|lxc)$/;
    return ($mechanism, $1);
}

sub archive_get_guest_config {
    my ($self, $volname) = @_;
    return _text($self->_call('archive_get_guest_config', $volname), 'guest configuration');
}

sub archive_get_firewall_config {
    my ($self, $volname) = @_;
    my $r = $self->_call('archive_get_firewall_config', $volname);
    return defined($r) ? _text($r, 'firewall configuration') : undef;
}

sub restore_vm_init {
    my ($self, $volname) = @_;
    my $r = $self->_call('restore_vm_init', $volname);
    die "backup provider returned no device list\n" if ref($r) ne 'HASH';
    my $res = {};
    for my $dev (keys %$r) {
        die "backup provider returned no size for '$dev'\n" if ref($r->{$dev}) ne 'HASH';
        $res->{ _device($dev) } = { size => _uint($r->{$dev}->{size}, "size of '$dev'") };
    }
    return $res;
}

sub restore_vm_cleanup {
    my ($self, $volname) = @_;
    $self->_call('restore_vm_cleanup', $volname);
    return;
}

sub restore_vm_volume_init {
    my ($self, $volname, $device_name, $info) = @_;
    my $r = $self->_call('restore_vm_volume_init', $volname, $device_name, $info // {});
    die "backup provider returned no qemu-img-path\n" if ref($r) ne 'HASH' || !defined($r->{'qemu-img-path'});
    my $p = $r->{'qemu-img-path'};
    # upstream checks the path with file_size_info($path, undef, 'raw', 1) and needs a local raw
    # file or block device (qemu-server QemuServer.pm restore_external_archive): a URI or a
    # `json:` filename would only fail later, inside qemu-server
    die "backup provider returned an invalid qemu-img-path (not an absolute path)\n" if ref($p) || $p !~ m!^(/[^\0]+)\z!;
    return { 'qemu-img-path' => _utf8($1) };
}

sub restore_vm_volume_cleanup {
    my ($self, $volname, $device_name, $info) = @_;
    $self->_call('restore_vm_volume_cleanup', $volname, $device_name, $info // {});
    return;
}

sub restore_container_init {
    my ($self, $volname, @rest) = @_;
    my $r = $self->_call('restore_container_init', $volname, @rest);
    die "backup provider returned no restore source\n" if ref($r) ne 'HASH';
    return { 'tar-path' => _abs_path($r->{'tar-path'}, 'tar-path') } if defined($r->{'tar-path'});
    return { 'archive-directory' => _abs_path($r->{'archive-directory'}, 'archive-directory') };
}

sub restore_container_cleanup {
    my ($self, $volname, @rest) = @_;
    $self->_call('restore_container_cleanup', $volname, @rest);
    return;
}

# ---- one storage call, for the generated storage plugin's class methods ----
# Proxmox VE calls a storage plugin as a class, with no provider object and no job: pvestatd
# (status every 10 s), pvedaemon (every listing of the GUI) and pvesm (docs/pve-bridge-notes.md
# §1.4, §7.10). Each such call builds a bridge, starts a host, makes the one call and ends the
# host, everything within $timeout seconds (plus a short kill), so a hung provider never holds its
# caller longer than that; $timeout 0 sets no bound on the call (a worker task of its own, as
# free_image's). Returns the reply as the host sent it (tainted: the caller validates).
sub storage_call {
    my ($self, $method, $timeout, @params) = @_;
    my $deadline = $timeout ? time() + $timeout : undef;
    local $self->{setup_timeout} = $timeout || $self->{setup_timeout};
    local $self->{shutdown_grace} = 0.5;
    my $res = eval {
        $self->_start_host() if !$self->{host};
        my $left = defined($deadline) ? $deadline - time() : undef;
        die "backup provider host did not answer $method within $timeout s\n" if defined($left) && $left <= 0;
        $self->_request($method, $left, @params);
    };
    my $err = $@;
    # the bound the caller set, not what was left of it after the host's start
    $err = "backup provider host did not answer $method within $timeout s\n"
        if $err && $err =~ /^backup provider host did not answer \Q$method\E within /;
    $self->_end_host_now();
    die $err if $err;
    return $res;
}

# Ends the host of a storage call at once: closing its input ends a host whose call finished; one
# still busy (the call timed out) is killed, since SIGTERM only cancels its call (§6.3).
sub _end_host_now {
    my ($self) = @_;
    my $h = $self->{host} or return;
    return if $h->{owner} != $$;
    close($h->{in}) if $h->{in};
    $h->{in} = undef;
    my $end = time() + 1;
    while (!$self->_check_exit(0) && time() < $end) { sleep(0.02) }
    if (!defined($h->{exit})) {
        kill('KILL', $h->{pid});
        $self->_check_exit(1);
    }
    close($h->{out}) if $h->{out};
    $h->{out} = undef;
}

1;

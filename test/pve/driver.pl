#!/usr/bin/perl -T
# STAND-IN for Proxmox VE's callers, not Proxmox VE's code: replays the order in which vzdump
# (pve-manager PVE/VZDump.pm exec_backup / exec_backup_task with qemu-server
# PVE/VZDump/QemuServer.pm archive_external or pve-container src/PVE/VZDump/LXC.pm), qmrestore
# (qemu-server PVE/QemuServer.pm restore_external_archive), pct restore (pve-container
# src/PVE/LXC/Create.pm) and "Show configuration" (pve-storage extract_vzdump_config) call a
# backup provider, against the Perl bridge (perl/PVE/BackupProvider/Plugin/NodeBridge.pm).
# docs/pve-bridge-notes.md §3 and §4 give the order with file and line. Runs under perl -T, as
# vzdump, qmrestore and pct do. It must run as root: a container backup unshares its mount
# namespace and bind-mounts the tree, as vzdump does.
#
# The test talks to it in JSON lines. The first line on stdin is the job:
#   {mode, storeid, scfg, bridge: {provider, node, cli, env}, ...}
#   backup:       vmid, config (guest config text), devices {dev: size}, firewall (optional)
#   restore:      volname, targets {dev: raw file to write}; worker: true builds the provider in
#                 this process (the API handler) and restores in a forked worker, as qmrestore
#   ct-backup:    vmid, config (pct.conf text), rootfs (the tree, host ids), mountpoint (stands in
#                 for /mnt/vzsnap0), exclude [globs], firewall, logfile, pause (wait for a line
#                 before backup_container)
#   ct-restore:   volname, rootdir (owned by the container's root), config (target's pct.conf)
#   extractconfig: volname
# On stdout it prints {log: [level, message]} for every $log_function call, {phase: ...} at each
# point where the test must act (QEMU's part: backup access setup and teardown), reading the
# test's answer from stdin, and {done: ...} at the end.

use strict;
use warnings;

use Config;
use Fcntl qw(F_GETFD F_SETFD FD_CLOEXEC O_RDONLY);
use IO::Handle;
use JSON::PP;
use POSIX ();
use Socket qw(AF_UNIX SOCK_STREAM PF_UNSPEC);
use PVE::BackupProvider::Plugin::NodeBridge;

die "driver: not in taint mode (run it with perl -T)\n" if !${^TAINT};

$ENV{PATH} = '/sbin:/bin:/usr/sbin:/usr/bin';    # as PVE's daemons and CLIs set it
delete @ENV{qw(IFS CDPATH ENV BASH_ENV)};
STDOUT->autoflush(1);

my $json = JSON::PP->new->utf8->canonical->allow_nonref;

# storage.cfg values are not tainted in PVE (pve-cluster IPCC.xs); the job line stands in for
# them, so it is untainted here, and only here
sub untaint_deep {
    my ($v) = @_;
    if (ref($v) eq 'HASH') { return { map { (untaint_deep($_) => untaint_deep($v->{$_})) } keys %$v } }
    if (ref($v) eq 'ARRAY') { return [ map { untaint_deep($_) } @$v ] }
    return $v if !defined($v) || ref($v);
    $v =~ /^(.*)$/s;
    return $1;
}

sub emit { print $json->encode($_[0]), "\n" }

sub read_line {
    my $line = <STDIN>;
    die "driver: the test closed stdin\n" if !defined($line);
    return $json->decode($line);    # tainted, as anything QEMU or a socket gives would be
}

my $job = untaint_deep(read_line());
my $log = sub { emit({ log => [ $_[0], $_[1] ] }) };
# every provider object of the driver is built here (pct restore builds one per phase)
# With `plugin` (a storage plugin `pve-backup-provider pve-plugin generate` wrote, its folder on
# @INC), the provider comes from the plugin's new_backup_provider, as every upstream caller gets
# it (pve-storage Storage.pm new_backup_provider); without, the bridge class is built directly.
sub new_provider {
    if (defined(my $plugin = $job->{plugin})) {
        die "driver: bad plugin package\n" if $plugin !~ /^(PVE::Storage::Custom::[A-Za-z0-9_]+)$/;
        $plugin = $1;
        (my $file = "$plugin.pm") =~ s!::!/!g;
        require $file;
        return $plugin->new_backup_provider($job->{scfg}, $job->{storeid}, $log);
    }
    return PVE::BackupProvider::Plugin::NodeBridge->new(
        undef, $job->{scfg}, $job->{storeid}, $log, %{ $job->{bridge} },
    );
}
my $provider = new_provider();

if ($job->{mode} eq 'backup') {
    run_backup();
} elsif ($job->{mode} eq 'restore') {
    $job->{worker} ? run_restore_in_worker() : run_restore();
} elsif ($job->{mode} eq 'ct-backup') {
    run_ct_backup();
} elsif ($job->{mode} eq 'ct-restore') {
    run_ct_restore();
} elsif ($job->{mode} eq 'extractconfig') {
    run_extractconfig();
} else {
    die "driver: unknown mode\n";
}
$provider->shutdown_host() if $provider;
exit(0);

sub run_backup {
    my $vmid = $job->{vmid};
    my ($archive, $size, $job_err, $guest_err);
    my $teardown_success = 0;
    my $access = 0;    # whether QEMU's backup access was set up (then cleanup tears it down)

    # pve-manager VZDump.pm exec_backup
    eval {
        $provider->job_init(time());

        # exec_backup_task: per-guest errors are caught inside
        eval {
            my $res = $provider->backup_init($vmid, 'qemu', time());
            die "backup init failed: did not receive a valid result from the backup provider\n"
                if !defined($res) || ref($res) ne 'HASH';
            $archive = $res->{'archive-name'};
            die "backup init failed: illegal characters in archive name '$archive'\n"
                if $archive !~ m!^([a-zA-Z0-9\-\.\+\=\_]|/|:)+$!;

            # qemu-server archive_external
            my $name = $provider->provider_name();
            $log->('info', "creating $name archive '$archive'");
            my $mechanism = $provider->backup_get_mechanism($vmid, 'qemu');
            die "mechanism '" . ($mechanism // 'undef') . "' requested by backup provider is not supported for VMs\n"
                if !defined($mechanism) || ($mechanism ne 'nbd' && $mechanism ne 'file-handle');
            my $devices = { map { ($_ => { size => $job->{devices}->{$_} }) } keys %{ $job->{devices} } };
            my $incremental = $provider->backup_vm_query_incremental($vmid, $devices) // {};
            for my $mode (values %$incremental) {
                die "invalid incremental mode '$mode'\n" if $mode !~ /^(new|use|none)$/;
            }

            # QEMU's part (backup-access-setup, NBD exports): the test does it
            emit({ phase => 'setup', mechanism => $mechanism, incremental => $incremental });
            my $volumes = read_line();
            $access = 1;
            die "driver: setup failed: $volumes->{error}\n" if $volumes->{error};

            my $info = {};
            $info->{'firewall-config'} = $job->{firewall} if defined($job->{firewall});
            emit({ phase => 'backup_vm', host_pid => $provider->host_pid() });
            my $backup_ok = eval { $provider->backup_vm($vmid, $job->{config}, $volumes->{volumes}, $info); 1 };
            my $vm_err = $@;
            # the access is torn down in cleanup(), after backup_cleanup; success = backup_vm returned
            $teardown_success = $backup_ok ? 1 : 0;
            die $vm_err if !$backup_ok;

            my $cleanup = $provider->backup_cleanup($vmid, 'qemu', 1, {});
            $size = $cleanup->{stats}->{'archive-size'};
        };
        $guest_err = $@;
        if ($guest_err) {
            eval { $provider->backup_cleanup($vmid, 'qemu', 0, { error => $guest_err }) };
            $log->('warn', "backup cleanup for external provider failed - $@") if $@;
        }
        # the guest plugin's cleanup: backup-access-teardown (the test's part)
        if ($access) {
            emit({ phase => 'teardown', success => $teardown_success ? JSON::PP::true : JSON::PP::false });
            read_line();
        }
        # not in an eval upstream (§3.3 step 7)
        $provider->backup_handle_log_file($vmid, $job->{logfile}) if $job->{logfile};

        $provider->job_cleanup();
    };
    $job_err = $@;
    if ($job_err) {
        eval { $provider->job_cleanup() };
        $job_err .= "job cleanup for external provider failed - $@" if $@;
    }
    emit({ done => { archive => $archive, size => $size, error => $guest_err || undef, job_error => $job_err || undef } });
}

sub run_restore {
    my $volname = $job->{volname};
    my $err;
    # qemu-server QemuServer.pm restore_external_archive
    eval {
        my ($mechanism, $vmtype) = $provider->restore_get_mechanism($volname);
        die "mechanism '$mechanism' requested by backup provider is not supported for VMs\n" if $mechanism ne 'qemu-img';
        die "cannot restore non-VM guest of type '$vmtype'\n" if $vmtype ne 'qemu';
        my $devinfo = $provider->restore_vm_init($volname);
        my $data = $provider->archive_get_guest_config($volname)
            or die "backup provider failed to extract guest configuration\n";
        my $firewall = $provider->archive_get_firewall_config($volname);
        emit({ phase => 'configs', config => $data, firewall => $firewall, devices => $devinfo });

        # devices come from the #qmdump#map lines of the stored config
        my @devs;
        for my $line (split(/\n/, $data)) {
            push @devs, $1 if $line =~ m/^\#qmdump\#map:[^:]+:([^:]+):/;
        }
        for my $dev (sort @devs) {
            die "archive does not contain data for drive '$dev'\n" if !$devinfo->{$dev};
            die "got no size for '$dev'\n" if !defined($devinfo->{$dev}->{size});
            my $target = $job->{targets}->{$dev} or die "driver: no target for '$dev'\n";
            my $info = $provider->restore_vm_volume_init($volname, $dev, {});
            my $source = $info->{'qemu-img-path'}
                or die "did not get source image path from backup provider\n";
            # upstream's file_size_info needs a local file (docs/pve-bridge-notes.md §4.1)
            die "failed to stat '$source'\n" if !-e $source;
            my @cmd = ('/usr/bin/qemu-img', 'convert', '-q', '-f', 'raw', '-O', 'raw', $source, $target);
            my $convert_ok = eval { system(@cmd) == 0 or die "qemu-img convert failed: exit $?\n"; 1 };
            my $convert_err = $@;
            eval { $provider->restore_vm_volume_cleanup($volname, $dev, {}) };
            my $cleanup_err = $@;
            die $convert_err if !$convert_ok;
            die $cleanup_err if $cleanup_err;
        }
    };
    $err = $@;
    eval { $provider->restore_vm_cleanup($volname) };
    warn "backup provider cleanup after restore failed - $@" if $@;
    emit({ done => { error => $err || undef } });
}

# ---- qmrestore's process shape ----

# qemu-server builds the provider in the API handler ($classify_restore_archive) and restores in
# a fork_worker child (docs/pve-bridge-notes.md §4.1, §6.5): the host starts in the worker and
# belongs to it; the handler drops its object when the request returns, while the worker runs.
sub run_restore_in_worker {
    pipe(my $go_r, my $go_w) or die "driver: pipe: $!\n";
    my $pid = fork() // die "driver: fork: $!\n";
    if ($pid == 0) {
        close($go_w);
        <$go_r>;    # the API handler has returned (dropped its object)
        emit({ phase => 'worker', pid => $$ });
        run_restore();
        $provider->shutdown_host();
        POSIX::_exit(0);
    }
    close($go_r);
    undef $provider;    # DESTROY in the API process: must not touch the worker's host
    emit({ phase => 'api-returned' });
    close($go_w);
    waitpid($pid, 0);
    emit({ phase => 'worker-exit', status => $? });
}

# ---- containers ----

# unshare(2) by number, as PVE::Tools does (PVE::Syscall); core Perl has no wrapper
# (constants: the main program above runs before assignments down here would)
use constant SYS_UNSHARE => { 'x86_64' => 272, 'aarch64' => 97 };
use constant { CLONE_NEWNS => 0x00020000, CLONE_NEWUSER => 0x10000000 };

sub unshare {
    my ($flags) = @_;
    my ($arch) = $Config{archname} =~ /^([^-]+)/;
    my $nr = SYS_UNSHARE->{$arch} // die "driver: no unshare syscall number for $arch\n";
    return syscall($nr, $flags) == 0;
}

sub run_cmd {
    my (@cmd) = @_;
    system(@cmd) == 0 or die "command '@cmd' failed: " . ($? == -1 ? $! : "exit " . ($? >> 8)) . "\n";
}

# PVE::LXC::parse_id_maps (pve-container src/PVE/LXC.pm): lxc.idmap lines, or the default map
# of an unprivileged container
sub parse_id_maps {
    my ($config) = @_;
    my ($id_map, $root_uid, $root_gid) = ([], 0, 0);
    for my $line (split(/\n/, $config)) {
        next if $line !~ /^lxc\.idmap\s*[:=]\s*(.*)$/;
        my $value = $1;
        die "failed to parse idmap: $value\n" if $value !~ /^([ug])\s+(\d+)\s+(\d+)\s+(\d+)\s*$/;
        push @$id_map, [ $1, $2, $3, $4 ];
        if ($2 == 0) { $root_uid = $3 if $1 eq 'u'; $root_gid = $3 if $1 eq 'g' }
    }
    if (!@$id_map && $config =~ /^unprivileged:\s*1\s*$/m) {
        $id_map = [ [ 'u', 0, 100000, 65536 ], [ 'g', 0, 100000, 65536 ] ];
        $root_uid = $root_gid = 100000;
    }
    return ($id_map, $root_uid, $root_gid);
}

# Stands in for newuidmap/newgidmap (PVE::LXC::Namespaces set_id_map): the driver is root, so
# it writes the child's maps itself, one write(2) each as the kernel requires.
sub set_id_map {
    my ($pid, $id_map) = @_;
    for my $type ('g', 'u') {
        my $text = join('', map { "$_->[1] $_->[2] $_->[3]\n" } grep { $_->[0] eq $type } @$id_map);
        next if $text eq '';
        my $file = "/proc/$pid/" . ($type eq 'u' ? 'uid_map' : 'gid_map');
        open(my $fh, '>', $file) or die "open $file: $!\n";
        syswrite($fh, $text) == length($text) or die "write $file: $!\n";
        close($fh) or die "close $file: $!\n";
    }
}

# The child side of PVE::LXC::Namespaces run_in_userns / lxc-usernsexec: a new user (and mount)
# namespace whose maps the parent writes, then uid and gid 0 in it (the container's root, host
# ids root_uid/root_gid). $sync is the child's end of the socketpair.
sub enter_userns_child {
    my ($sync) = @_;
    unshare(CLONE_NEWUSER | CLONE_NEWNS) or die "unshare(NEWUSER|NEWNS): $!\n";
    syswrite($sync, "1\n");
    shutdown($sync, 1);
    my $l = <$sync>;
    die "sync read failed\n" if !defined($l) || $l ne "2\n";
    close($sync);
    $! = 0;
    ($(, $)) = (0, 0);
    die "setgid(0): $!\n" if $!;
    ($<, $>) = (0, 0);
    die "setuid(0): $!\n" if $!;
}

sub userns_parent {
    my ($sync, $pid, $id_map) = @_;
    my $l = <$sync>;
    die "sync read failed (the child could not unshare)\n" if !defined($l) || $l ne "1\n";
    set_id_map($pid, $id_map);
    syswrite($sync, "2\n");
    close($sync);
}

# PVE::LXC::Namespaces::run_in_userns on PVE::Tools::run_fork (pve-common Tools.pm
# run_fork_with_timeout): $code runs in a forked child in the container's user namespace; its
# result comes back as JSON on a pipe (a die as {error}); the parent blocks on the pipe, then
# kills and reaps the child.
sub run_in_userns {
    my ($code, $id_map) = @_;
    socketpair(my $sp, my $sc, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die "socketpair: $!\n";
    pipe(my $res_r, my $res_w) or die "pipe: $!\n";
    my $pid = fork() // die "fork: $!\n";
    if ($pid == 0) {
        close($sp);
        close($res_r);
        my $res = eval {
            enter_userns_child($sc);
            { result => $code->() };
        } // { error => "$@" };
        print {$res_w} encode_json($res);
        close($res_w);
        POSIX::_exit(0);
    }
    close($sc);
    close($res_w);
    if (!eval { userns_parent($sp, $pid, $id_map); 1 }) {
        my $err = $@;
        kill('KILL', $pid);
        waitpid($pid, 0);
        die $err;
    }
    my $out = do { local $/; <$res_r> };
    close($res_r);
    kill('KILL', $pid);
    waitpid($pid, 0);
    my $res = eval { decode_json($out // '') } // { error => "child exited without a result\n" };
    die $res->{error} if defined($res->{error});
    return $res->{result};
}

# pve-manager VZDump.pm exec_backup / exec_backup_task with pve-container src/PVE/VZDump/LXC.pm
# (docs/pve-bridge-notes.md §3.2, §3.3, §3.5), snapshot mode on a directory: the tree is
# bind-mounted at the mount point in a new mount namespace of this process, made after
# job_init started the host.
sub run_ct_backup {
    my $vmid = $job->{vmid};
    my ($archive, $size, $job_err, $guest_err);
    my ($id_map, $root_uid) = parse_id_maps($job->{config});
    my $snapdir = $job->{mountpoint};
    my $mounted = 0;

    eval {
        $provider->job_init(time());
        eval {
            # prepare: a private mount namespace for this worker (LXC.pm prepare, L124 ff.)
            unshare(CLONE_NEWNS) or die "unshare(CLONE_NEWNS) failed: $!\n";
            run_cmd('mount', '--make-rslave', '/');

            my $res = $provider->backup_init($vmid, 'lxc', time());
            die "backup init failed: did not receive a valid result from the backup provider\n"
                if !defined($res) || ref($res) ne 'HASH';
            $archive = $res->{'archive-name'};
            die "backup init failed: illegal characters in archive name '$archive'\n"
                if $archive !~ m!^([a-zA-Z0-9\-\.\+\=\_]|/|:)+$!;

            # snapshot: the tree appears at the mount point, in this namespace only
            run_cmd('mount', '--bind', $job->{rootfs}, $snapdir);
            $mounted = 1;

            # archive (LXC.pm L363-445)
            my $name = $provider->provider_name();
            $log->('info', "creating $name archive '$archive'");
            $log->('warn', "external backup of privileged container can only be restored as unprivileged")
                if !scalar(@$id_map);
            my $mechanism = $provider->backup_get_mechanism($vmid, 'lxc');
            die "mechanism '" . ($mechanism // 'undef') . "' requested by backup provider is not supported for containers\n"
                if !defined($mechanism) || $mechanism ne 'directory';
            my $info = { directory => $snapdir, sources => ['./'], 'backup-user-id' => $root_uid };
            $info->{'firewall-config'} = $job->{firewall} // '';    # pct.fw exists for every CT
            $provider->backup_container_prepare($vmid, $info);

            my $exclude = [ @{ $job->{exclude} // [] }, '/tmp/?*', '/var/tmp/?*', '/var/run/?*.pid' ];
            emit({ phase => 'backup_container', host_pid => $provider->host_pid(), ns_pid => $$ });
            read_line() if $job->{pause};
            if (scalar(@$id_map)) {
                run_in_userns(sub {
                    my $map = '';
                    if (open(my $fh, '<', '/proc/self/uid_map')) { local $/; $map = <$fh> }
                    emit({ phase => 'in_userns', pid => $$, uid => $<, euid => $>, uid_map => $map });
                    $provider->backup_container($vmid, $job->{config}, $exclude, $info);
                    return undef;
                }, $id_map);
            } else {
                $provider->backup_container($vmid, $job->{config}, $exclude, $info);
            }

            my $cleanup = $provider->backup_cleanup($vmid, 'lxc', 1, {});
            $size = $cleanup->{stats}->{'archive-size'};
        };
        $guest_err = $@;
        if ($guest_err) {
            eval { $provider->backup_cleanup($vmid, 'lxc', 0, { error => $guest_err }) };
            $log->('warn', "backup cleanup for external provider failed - $@") if $@;
        }
        # the guest plugin's cleanup: unmount the snapshot
        if ($mounted) {
            eval { run_cmd('umount', $snapdir) };
            $log->('warn', "umount failed - $@") if $@;
        }
        $provider->backup_handle_log_file($vmid, $job->{logfile}) if $job->{logfile};
        $provider->job_cleanup();
    };
    $job_err = $@;
    if ($job_err) {
        eval { $provider->job_cleanup() };
        $job_err .= "job cleanup for external provider failed - $@" if $@;
    }
    emit({ done => { archive => $archive, size => $size, error => $guest_err || undef, job_error => $job_err || undef } });
}

# @PVE::Storage::Plugin::COMMON_TAR_FLAGS (pve-storage src/PVE/Storage/Plugin.pm)
use constant COMMON_TAR_FLAGS => qw(
    --one-file-system -p --sparse --numeric-owner --acls --xattrs --xattrs-include=user.*
    --xattrs-include=security.capability --warning=no-file-ignored --warning=no-xattr-write
);

# Runs @$extract (tar xpf - ...) as lxc-usernsexec -m <map> -- would, in the container's user
# namespace as its root, reading stdin from $in_fh; with @$create, the tar writing the stream.
# run_command of PVE::Tools dies on a non-zero exit of either.
sub run_extract_in_userns {
    my ($id_map, $extract, $in_fh, $create) = @_;
    my ($create_pid, $pipe_r);
    if ($create) {
        pipe($pipe_r, my $pipe_w) or die "pipe: $!\n";
        $create_pid = fork() // die "fork: $!\n";
        if ($create_pid == 0) {
            close($pipe_r);
            POSIX::dup2(fileno($pipe_w), 1) // POSIX::_exit(126);
            open(STDIN, '<', '/dev/null');
            exec { $create->[0] } @$create or POSIX::_exit(127);
        }
        close($pipe_w);
        $in_fh = $pipe_r;
    }
    socketpair(my $sp, my $sc, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die "socketpair: $!\n";
    my $pid = fork() // die "fork: $!\n";
    if ($pid == 0) {
        close($sp);
        eval {
            enter_userns_child($sc) if @$id_map;
            POSIX::dup2(fileno($in_fh), 0) // die "dup2: $!\n";
            POSIX::dup2(2, 1) // die "dup2: $!\n";    # tar's --totals to stderr: stdout is the protocol
            exec { $extract->[0] } @$extract or die "exec $extract->[0]: $!\n";
        };
        print STDERR "driver: extract: $@";
        POSIX::_exit(127);
    }
    close($sc);
    if (@$id_map && !eval { userns_parent($sp, $pid, $id_map); 1 }) {
        my $err = $@;
        kill('KILL', $pid);
        kill('KILL', $create_pid) if $create_pid;
        waitpid($pid, 0);
        waitpid($create_pid, 0) if $create_pid;
        die $err;
    }
    close($sp) if !@$id_map;
    close($pipe_r) if $pipe_r;
    waitpid($pid, 0);
    my $st = $?;
    if ($create_pid) {
        waitpid($create_pid, 0);
        die "command '@$create' failed: exit " . ($? >> 8) . "\n" if $?;
    }
    die "command '@$extract' failed: exit " . ($st >> 8) . "\n" if $st;
}

sub restore_tar_archive_command {
    my ($compression_opt, $rootdir) = @_;
    my $cmd = [ '/bin/tar', 'xpf', '-' ];
    push @$cmd, $compression_opt if $compression_opt;
    push @$cmd, '--totals', (COMMON_TAR_FLAGS), '-C', $rootdir, '--skip-old-files', '--anchored', '--exclude', './dev/*';
    return $cmd;
}

# LXC/Create.pm tar_compression_option
sub tar_compression_option {
    my ($archive) = @_;
    my %map = ('.gz' => '-z', '.bz2' => '-j', '.xz' => '-J', '.lzo' => '--lzop', '.zst' => '--zstd');
    die "file does not look like a template archive: $archive\n" if $archive !~ /\.tar(\.[^.]+)?$/;
    return undef if !defined($1);
    return $map{$1} // die "unrecognized compression format: $1\n";
}

# LXC/Create.pm check_tar_archive: `tar -tvf` over the whole archive; sbin and 10 members
sub check_tar_archive {
    my ($archive, $compression_opt) = @_;
    my @cmd = ('/bin/tar', '-tvf', $archive, ($compression_opt ? ($compression_opt) : ()), '--numeric-owner');
    open(my $fh, '-|', @cmd) or die "tar -tvf: $!\n";
    my ($found_sbin, $members) = (0, 0);
    while (my $line = <$fh>) {
        chomp($line);
        $members++;
        my ($type, $file_info) = $line =~ m!^([a-zA-Z\-])\S+\s+\d+/\d+\s+\d+(?:,\d+)?\s+\S+\s+\S+\s+(.*)$!;
        next if !defined($type);
        die "found multi-volume member in archive\n" if $type eq 'M';
        $found_sbin = 1 if ($file_info =~ m!^(?:\./)?sbin/$! && $type eq 'd')
            || ($file_info =~ m!^(?:\./)?sbin ->! && $type eq 'l')
            || ($file_info =~ m!^(?:\./)?sbin link to! && $type eq 'h');
    }
    close($fh) or die "command 'tar -tvf $archive' failed: exit " . ($? >> 8) . "\n";
    die "no 'sbin' directory (or link) found in archive '$archive'\n" if !$found_sbin;
    die "less than 10 members in archive '$archive'\n" if $members < 10;
}

# pct restore (pve-container src/PVE/LXC/Create.pm, docs/pve-bridge-notes.md §4.2): a fresh
# provider per phase: P1 recover_config (extract_vzdump_config), P2 restore_archive, P3/P4
# restore_configuration.
sub run_ct_restore {
    my $volname = $job->{volname};
    my $storeid = $job->{storeid};
    my $rootdir = $job->{rootdir};
    my (%hosts, $mechanism, $err);
    undef $provider;    # pct builds none outside the phases

    eval {
        my $p1 = new_provider();
        my $config = $p1->archive_get_guest_config($volname, $storeid);
        $hosts{p1} = $p1->host_pid();
        undef $p1;
        emit({ phase => 'recovered-config', config => $config });

        my ($id_map, $root_uid, $root_gid) = parse_id_maps($job->{config});
        die "refusing to restore privileged container backup from external source\n"
            if $job->{config} !~ /^unprivileged:\s*1\s*$/m;

        # restore_archive -> restore_external_archive on P2
        my $p2 = new_provider();
        my $vmtype;
        ($mechanism, $vmtype) = $p2->restore_get_mechanism($volname, $storeid);
        die "cannot restore non-LXC guest of type '$vmtype'\n" if $vmtype ne 'lxc';
        my $info = $p2->restore_container_init($volname, $storeid, {});    # outside the eval upstream
        $hosts{p2} = $p2->host_pid();
        eval {
            if ($mechanism eq 'tar') {
                my $tar_path = $info->{'tar-path'} or die "did not get path to tar file from backup provider\n";
                die "not a regular file '$tar_path'" if !-f $tar_path;
                # restore_tar_archive($tar_path, ..., untrusted = 1)
                my $compression_opt = tar_compression_option($tar_path);
                sysopen(my $fh, $tar_path, O_RDONLY) or die "failed to open '$tar_path': $!\n";
                check_tar_archive($tar_path, $compression_opt);
                die "refusing to restore privileged container backup from external source\n"
                    if $root_uid == 0 || $root_gid == 0;
                run_extract_in_userns($id_map, restore_tar_archive_command($compression_opt, $rootdir), $fh);
                close($fh);
            } elsif ($mechanism eq 'directory') {
                my $directory = $info->{'archive-directory'} or die "did not get path to archive directory from backup provider\n";
                die "not a directory '$directory'" if !-d $directory;
                my @flags = grep { $_ ne '--one-file-system' } (COMMON_TAR_FLAGS);
                my $create = [ '/bin/tar', 'cpf', '-', @flags, "--directory=$directory", '.' ];
                run_extract_in_userns($id_map, restore_tar_archive_command(undef, $rootdir), undef, $create);
            } else {
                die "mechanism '$mechanism' requested by backup provider is not supported for LXCs\n";
            }
        };
        my $extract_err = $@;
        eval { $p2->restore_container_cleanup($volname, $storeid, {}) };
        if (my $cleanup_err = $@) {
            die $cleanup_err if !$extract_err;
            warn $cleanup_err;
        }
        die $extract_err if $extract_err;
        undef $p2;

        # restore_configuration: P3 for the firewall, P4 (recover_config) for the guest config
        my $p3 = new_provider();
        my $p4 = new_provider();
        my $guest = $p4->archive_get_guest_config($volname, $storeid);
        my $firewall = $p3->archive_get_firewall_config($volname, $storeid);
        $hosts{p3} = $p3->host_pid();
        $hosts{p4} = $p4->host_pid();
        emit({ phase => 'configs', config => $guest, firewall => $firewall });
    };
    $err = $@;
    emit({ done => { error => $err || undef, mechanism => $mechanism, hosts => \%hosts } });
}

# "Show configuration" (pve-manager API2/VZDump.pm extractconfig -> pve-storage
# extract_vzdump_config, docs/pve-bridge-notes.md §4.3): a fresh provider, archive_get_guest_config
# alone, then the object is dropped.
sub run_extractconfig {
    my $config = eval { $provider->archive_get_guest_config($job->{volname}, $job->{storeid}) };
    my $err = $@;
    my $host = $provider->host_pid();
    undef $provider;
    emit({ done => { config => $config, error => $err || undef, host_pid => $host } });
}

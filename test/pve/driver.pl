#!/usr/bin/perl -T
# STAND-IN for Proxmox VE's callers, not Proxmox VE's code: replays the order in which vzdump
# (pve-manager PVE/VZDump.pm exec_backup / exec_backup_task with qemu-server
# PVE/VZDump/QemuServer.pm archive_external) and qmrestore (qemu-server PVE/QemuServer.pm
# restore_external_archive) call a backup provider, against the Perl bridge
# (perl/PVE/BackupProvider/Plugin/NodeBridge.pm). docs/pve-bridge-notes.md §3 and §4.1 give the
# order with file and line. Runs under perl -T, as vzdump and qmrestore do.
#
# The test talks to it in JSON lines. The first line on stdin is the job:
#   {mode: backup|restore, storeid, scfg, bridge: {provider, node, cli, env}, ...}
#   backup:  vmid, config (guest config text), devices {dev: size}, firewall (optional)
#   restore: volname, targets {dev: raw file to write}
# On stdout it prints {log: [level, message]} for every $log_function call, {phase: ...} at each
# point where the test must act (QEMU's part: backup access setup and teardown), reading the
# test's answer from stdin, and {done: ...} at the end.

use strict;
use warnings;

use IO::Handle;
use JSON::PP;
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
my $provider = PVE::BackupProvider::Plugin::NodeBridge->new(
    undef, $job->{scfg}, $job->{storeid}, $log, %{ $job->{bridge} },
);

if ($job->{mode} eq 'backup') {
    run_backup();
} elsif ($job->{mode} eq 'restore') {
    run_restore();
} else {
    die "driver: unknown mode\n";
}
$provider->shutdown_host();
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
            # upstream's file_size_info needs a local file; a json: filename is let through until
            # the reference provider serves one (docs/pve-bridge-notes.md §4.1)
            die "failed to stat '$source'\n" if $source !~ /^json:/ && !-e $source;
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

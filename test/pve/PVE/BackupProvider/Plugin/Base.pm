package PVE::BackupProvider::Plugin::Base;

# STAND-IN for the tests of pve-backup-provider, not Proxmox VE's code: the interface of
# pve-storage's src/PVE/BackupProvider/Plugin/Base.pm (PVE 8.4+) and nothing more, so the
# Perl bridge can be loaded and driven without a Proxmox VE host. Every method dies as the real
# one does; the documentation of what each must do is in the real file.

use strict;
use warnings;

sub new {
    my ($class, $storage_plugin, $scfg, $storeid, $log_function) = @_;
    die "implement me in subclass";
}

for my $method (qw(
    provider_name job_init job_cleanup backup_init backup_cleanup backup_get_mechanism
    backup_handle_log_file backup_vm_query_incremental backup_vm backup_container_prepare
    backup_container restore_get_mechanism archive_get_guest_config archive_get_firewall_config
    restore_vm_init restore_vm_cleanup restore_vm_volume_init restore_vm_volume_cleanup
    restore_container_init restore_container_cleanup
)) {
    no strict 'refs';
    *{$method} = sub { die "implement me in subclass" };
}

1;

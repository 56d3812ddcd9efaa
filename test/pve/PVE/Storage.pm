package PVE::Storage;

# STAND-IN for the tests of pve-backup-provider, not Proxmox VE's code: the parts of pve-storage's
# src/PVE/Storage.pm a custom backup-provider storage plugin meets, and nothing more:
# - APIVER / APIAGE (15 and 6 at pve-storage 9.1.7; APIVER from PVE_STANDIN_APIVER when set);
# - the loader of third-party plugins (Storage.pm L66-103): require, isa PVE::Storage::Plugin,
#   can api, the version range, register, the "older storage API" warning. Upstream scans
#   /usr/share/perl5/PVE/Storage/Custom; here the folder is an argument (a perl5 tree on @INC);
# - update_volume_attribute's max-protected-backups check (Storage.pm L345-378) and
#   get_max_protected_backups (L312-321; the permission check answers "not Datastore.Allocate").

use strict;
use warnings;

use PVE::Storage::Plugin;

# PVE_STANDIN_APIVER stands in for another pve-storage release (tests of api()'s choice)
use constant APIVER => (($ENV{PVE_STANDIN_APIVER} // '') =~ /^(\d+)\z/ ? $1 + 0 : 15);
use constant APIAGE => 6;

# Loads every <dir>/PVE/Storage/Custom/*.pm as upstream does; returns the warnings it gave.
sub load_custom_plugins {
    my ($perl5dir) = @_;
    my @warnings;
    my $dir = "$perl5dir/PVE/Storage/Custom";
    opendir(my $dh, $dir) or return ["cannot read $dir: $!"];
    # pve-common dir_glob_foreach hands over the regex's capture: untainted
    for my $entry (sort readdir($dh)) {
        next if $entry !~ m/^(.*\.pm)$/;
        my $file = $1;
        my $modname = 'PVE::Storage::Custom::' . $file;
        $modname =~ s!\.pm$!!;
        $file = 'PVE/Storage/Custom/' . $file;
        eval {
            require $file;
            die "not derived from PVE::Storage::Plugin\n" if !$modname->isa('PVE::Storage::Plugin');
            die "does not provide an api() method\n" if !$modname->can('api');
            my $version = $modname->api();
            die "implements an API version newer than current ($version > " . APIVER . ")\n"
                if $version > APIVER;
            my $min_version = (APIVER - APIAGE);
            die "API version too old, please update the plugin ($version < $min_version)\n"
                if $version < $min_version;
            import $file;
            $modname->register();
            push @warnings, "Plugin \"$modname\" is implementing an older storage API, an upgrade is recommended\n"
                if $version != APIVER;
        };
        push @warnings, "Error loading storage plugin \"$modname\": $@" if $@;
    }
    closedir($dh);
    PVE::Storage::Plugin->init();
    return \@warnings;
}

sub parse_volume_id {
    my ($volid) = @_;
    return ($1, $2) if $volid =~ m/^([a-z][a-z0-9\-\_\.]*[a-z0-9]):(.+)$/i;
    die "unable to parse volume ID '$volid'\n";
}

sub get_max_protected_backups {
    my ($scfg, $storeid) = @_;
    return $scfg->{'max-protected-backups'} if defined($scfg->{'max-protected-backups'});
    return 5;
}

# $cfg is { ids => { storeid => scfg } }, as storage.cfg parses
sub update_volume_attribute {
    my ($cfg, $volid, $attribute, $value) = @_;
    my ($storeid, $volname) = parse_volume_id($volid);
    my $scfg = $cfg->{ids}->{$storeid} // die "storage '$storeid' does not exist\n";
    my $plugin = PVE::Storage::Plugin->lookup($scfg->{type});
    my ($vtype, undef, $vmid) = $plugin->parse_volname($volname);
    my $max_protected_backups = get_max_protected_backups($scfg, $storeid);
    if (
        $vtype eq 'backup'
        && $vmid
        && $attribute eq 'protected'
        && $value
        && !$plugin->get_volume_attribute($scfg, $storeid, $volname, 'protected')
        && $max_protected_backups > -1
    ) {
        my $backups = $plugin->list_volumes($storeid, $scfg, $vmid, ['backup']);
        my ($backup_type) = map { $_->{subtype} } grep { $_->{volid} eq $volid } $backups->@*;
        my $protected_count = grep {
            $_->{protected} && (!$backup_type || ($_->{subtype} && $_->{subtype} eq $backup_type))
        } $backups->@*;
        if ($max_protected_backups <= $protected_count) {
            die "The number of protected backups per guest is limited to $max_protected_backups "
                . "on storage '$storeid'\n";
        }
    }
    return $plugin->update_volume_attribute($scfg, $storeid, $volname, $attribute, $value);
}

1;

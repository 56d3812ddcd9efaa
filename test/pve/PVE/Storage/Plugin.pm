package PVE::Storage::Plugin;

# STAND-IN for the tests of pve-backup-provider, not Proxmox VE's code: the interface of
# pve-storage's src/PVE/Storage/Plugin.pm (and the parts of pve-common's SectionConfig.pm it
# inherits) that a generated storage plugin uses or overrides, and nothing more:
# - register / lookup / plugindata / storage_has_feature / sensitive_properties (Plugin.pm L280-302,
#   SectionConfig.pm register);
# - init's check that no plugin declares a property twice and that every option names a known
#   property (SectionConfig.pm init: "duplicate property");
# - the base methods a backup-provider plugin must override die as upstream's do without `path`
#   (activate_storage, status) or always (parse_volname of a non-vzdump name,
#   update_volume_attribute, new_backup_provider), so a test sees when an override is missing.

use strict;
use warnings;

# properties pve-storage's own plugins declare (DirPlugin path, Plugin.pm's common ones)
my %PVE_PROPERTIES = map { ($_ => { type => 'string' }) } qw(
    type nodes content disable shared path prune-backups max-protected-backups bwlimit format
);

my $plugins = {};       # type => class
my $plugindata = {};    # type => plugindata

sub register {
    my ($class) = @_;
    my $type = $class->type();
    die "duplicate plugin registration (type = $type)" if defined($plugins->{$type});
    $plugindata->{$type} = $class->plugindata();
    $plugins->{$type} = $class;
}

sub lookup {
    my ($class, $type) = @_;
    return $plugins->{$type} // die "unknown section type '$type'\n";
}

sub init {
    my %props = %PVE_PROPERTIES;
    for my $type (sort keys %$plugins) {
        my $p = $plugins->{$type}->properties();
        for my $k (keys %$p) {
            die "duplicate property '$k'" if exists($props{$k});
            $props{$k} = $p->{$k};
        }
    }
    for my $type (sort keys %$plugins) {
        my $o = $plugins->{$type}->options();
        for my $k (keys %$o) {
            die "undefined property '$k' in options of '$type'" if !exists($props{$k});
        }
    }
    return \%props;
}

sub type { die "overwrite me" }
sub plugindata { return {} }
sub properties { return {} }
sub options { return {} }

sub storage_has_feature {
    my ($type, $feature) = @_;
    my $data = $plugindata->{$type};
    return $data->{features} ? $data->{features}->{$feature} : undef;
}

sub sensitive_properties {
    my ($type) = @_;
    my $data = $plugindata->{$type};
    return [ sort keys %{ $data->{'sensitive-properties'} } ] if $data->{'sensitive-properties'};
    return [qw(encryption-key keyring master-pubkey password)];
}

sub on_add_hook { return undef }
sub on_update_hook { return undef }
sub on_delete_hook { return undef }

sub parse_volname {
    my ($class, $volname) = @_;
    die "unable to parse volume name '$volname'\n";
}

sub activate_storage {
    my ($class, $storeid, $scfg, $cache) = @_;
    die "storage definition has no path\n" if !$scfg->{path};
    return 1;
}

sub check_connection { return 1 }

sub status {
    my ($class, $storeid, $scfg, $cache) = @_;
    die "storage definition has no path\n" if !$scfg->{path};
    return (0, 0, 0, 0);
}

sub get_volume_attribute { return undef }

sub update_volume_attribute {
    my ($class, $scfg, $storeid, $volname, $attribute, $value) = @_;
    die "attribute '$attribute' is not supported for storage type '$scfg->{type}'\n";
}

sub new_backup_provider {
    my ($class, $scfg, $storeid, $log_function) = @_;
    die "implement me if enabling the feature 'backup-provider' in plugindata()->{features}\n";
}

1;

#!/usr/bin/perl -T
# STAND-IN for Proxmox VE's storage callers (pvesm, pvestatd, pvedaemon's content API, vzdump's
# storage steps), not Proxmox VE's code: replays how pve-storage calls a custom storage plugin
# (docs/pve-bridge-notes.md §1, §5), under perl -T as pvedaemon and pvesm run.
#
# The test writes one JSON job on stdin:
#   {perl5: DIR (the generated tree, also on @INC), type, storeid, scfg,
#    settings: {STATE_DIR, PRIV_DIR, STATUS_TTL, STATUS_TIMEOUT, CALL_TIMEOUT, HOST_ENV},
#    ops: [{op, ...}]}
# It first runs upstream's loader (PVE::Storage stand-in: require, isa, can api, version range,
# register) and prints {loaded: {...}}, then one line {op, ms, result} or {op, ms, error} per op:
#   schema                  api, plugindata, properties, options
#   parse {volname}         parse_volname
#   list {vmid?, content?}  list_volumes, then parse_volname per item (check_volume_access)
#   status                  status (pvestatd)
#   get {volname, attr}     get_volume_attribute
#   set {volid, attr, value} PVE::Storage::update_volume_attribute (max-protected-backups check)
#   prune {keep, vmid?, type?, dryrun}  prune_backups with a log function
#   free {volname}          parse_volname then free_image, and the code ref it returns (vdisk_free)
#   size {volname}          volume_size_info
#   path {volname}          path
#   add {sensitive} / update {sensitive} / delete   on_add_hook / on_update_hook / on_delete_hook
#   provider_name           new_backup_provider, then provider_name

use strict;
use warnings;

use IO::Handle;
use JSON::PP;
use Time::HiRes qw(time);

die "storage-driver: not in taint mode (run it with perl -T)\n" if ${^TAINT} != 1;

$ENV{PATH} = '/sbin:/bin:/usr/sbin:/usr/bin';    # as PVE's daemons and CLIs set it
delete @ENV{qw(IFS CDPATH ENV BASH_ENV)};
STDOUT->autoflush(1);

my $json = JSON::PP->new->utf8->canonical->allow_nonref->allow_blessed;

# storage.cfg values are not tainted in PVE (pve-cluster IPCC.xs): the job stands in for them
sub untaint_deep {
    my ($v) = @_;
    if (ref($v) eq 'HASH') { return { map { (untaint_deep($_) => untaint_deep($v->{$_})) } keys %$v } }
    if (ref($v) eq 'ARRAY') { return [ map { untaint_deep($_) } @$v ] }
    return $v if !defined($v) || ref($v);
    $v =~ /^(.*)$/s;
    return $1;
}

sub emit { print $json->encode($_[0]), "\n" }

my $line = <STDIN> // die "storage-driver: no job\n";
my $job = untaint_deep($json->decode($line));
unshift @INC, $job->{perl5};

require PVE::Storage;
my @load_warnings;
{
    local $SIG{__WARN__} = sub { push @load_warnings, $_[0] };
    push @load_warnings, @{ PVE::Storage::load_custom_plugins($job->{perl5}) };
}
my $plugin = eval { PVE::Storage::Plugin->lookup($job->{type}) };
emit({ loaded => { class => $plugin, warnings => \@load_warnings, error => $@ || undef } });
exit(0) if !$plugin;

my $settings = $job->{settings} // {};
{
    no strict 'refs';
    for my $k (keys %$settings) {
        if ($k eq 'HOST_ENV') { %{"${plugin}::HOST_ENV"} = %{ $settings->{$k} } }
        else { ${"${plugin}::$k"} = $settings->{$k} }
    }
}

my $storeid = $job->{storeid};
my $scfg = { %{ $job->{scfg} }, type => $job->{type} };
my $cfg = { ids => { $storeid => $scfg } };

sub bool { return $_[0] ? JSON::PP::true : JSON::PP::false }

my %ops = (
    schema => sub {
        return {
            api => $plugin->api(),
            type => $plugin->type(),
            plugindata => $plugin->plugindata(),
            properties => $plugin->properties(),
            options => $plugin->options(),
            has_feature => PVE::Storage::Plugin::storage_has_feature($plugin->type(), 'backup-provider') ? 1 : 0,
            sensitive => PVE::Storage::Plugin::sensitive_properties($plugin->type()),
        };
    },
    parse => sub { my ($o) = @_; return [ $plugin->parse_volname($o->{volname}) ] },
    list => sub {
        my ($o) = @_;
        my $list = $plugin->list_volumes($storeid, $scfg, $o->{vmid}, $o->{content} // ['backup']);
        # check_volume_access: parse_volname once per listed backup (Storage.pm L619-656)
        my @parsed = map { my (undef, $v) = PVE::Storage::parse_volume_id($_->{volid}); [ $plugin->parse_volname($v) ] } @$list;
        my $tainted = grep { my $i = $_; grep { defined($i->{$_}) && ${^TAINT} && Scalar::Util::tainted($i->{$_}) } keys %$i } @$list;
        return { items => $list, parsed => \@parsed, tainted => $tainted };
    },
    status => sub {
        my @s = $plugin->status($storeid, $scfg, {});
        my $tainted = grep { Scalar::Util::tainted($_) } @s;
        return { status => \@s, tainted => $tainted };
    },
    get => sub { my ($o) = @_; return $plugin->get_volume_attribute($scfg, $storeid, $o->{volname}, $o->{attr}) },
    set => sub {
        my ($o) = @_;
        PVE::Storage::update_volume_attribute($cfg, $o->{volid}, $o->{attr}, $o->{value});
        return 1;
    },
    prune => sub {
        my ($o) = @_;
        my @log;
        my $list = $plugin->prune_backups($scfg, $storeid, $o->{keep}, $o->{vmid}, $o->{type}, $o->{dryrun}, sub { push @log, "$_[0]: $_[1]" });
        return { list => [ sort { $a->{volid} cmp $b->{volid} } @$list ], log => \@log };
    },
    free => sub {
        my ($o) = @_;
        my (undef, undef, undef, undef, undef, undef, $format) = $plugin->parse_volname($o->{volname});
        my $worker = $plugin->free_image($storeid, $scfg, $o->{volname}, 0, $format);
        return 1 if !$worker;
        # vdisk_free runs a returned code ref as a worker task of its own (fork_worker 'imgdel'),
        # whose failure shows in that task, not in the caller's
        eval { $worker->() };
        die "in the worker task: $@" if $@;
        return 'worker';
    },
    size => sub { my ($o) = @_; return [ $plugin->volume_size_info($scfg, $storeid, $o->{volname}, 5) ] },
    path => sub { my ($o) = @_; return [ $plugin->path($scfg, $o->{volname}, $storeid) ] },
    add => sub { my ($o) = @_; $plugin->on_add_hook($storeid, $scfg, %{ $o->{sensitive} // {} }); return 1 },
    update => sub { my ($o) = @_; $plugin->on_update_hook($storeid, $scfg, %{ $o->{sensitive} // {} }); return 1 },
    delete => sub { $plugin->on_delete_hook($storeid, $scfg); return 1 },
    activate => sub { return $plugin->activate_storage($storeid, $scfg, {}) },
    provider_name => sub {
        my @log;
        my $p = $plugin->new_backup_provider($scfg, $storeid, sub { push @log, "$_[0]: $_[1]" });
        return { class => ref($p), name => $p->provider_name() };
    },
);

use Scalar::Util ();
for my $o (@{ $job->{ops} }) {
    my $fn = $ops{ $o->{op} } // die "storage-driver: unknown op $o->{op}\n";
    my $t0 = time();
    my @warn;
    local $SIG{__WARN__} = sub { push @warn, $_[0] };
    my $r = eval { $fn->($o) };
    my $err = $@;
    my $out = { op => $o->{op}, ms => int((time() - $t0) * 1000), warnings => \@warn };
    if ($err) { $out->{error} = "$err" } else { $out->{result} = $r }
    emit($out);
}

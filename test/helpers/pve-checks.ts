/**
 * Proxmox VE's own checks, copied from its sources for tests of what a provider hands it.
 */

/**
 * pve-storage `src/PVE/Storage/Plugin.pm` `file_size_info($filename, undef, 'raw', 1)`
 * ("untrusted"), as qemu-server's `restore_external_archive` calls it on the provider's
 * `qemu-img-path`: a Perl script taking the path; prints `<virtual size> <format> <file size>`,
 * dies as Proxmox VE would. Run with `perl -e FILE_SIZE_INFO PATH`.
 */
export const FILE_SIZE_INFO = String.raw`
use strict; use warnings;
use File::stat (); use JSON::PP;
my $f = shift;
my $st = File::stat::stat($f) or die "failed to stat '$f'\n";
die "can't use directory '$f'\n" if -d $f;
die "not a regular file or block device '$f'\n" if !(-f $f || -b $f);
open(my $fh, '-|', '/usr/bin/qemu-img', 'info', '--output=json', $f, '-f', 'raw') or die "qemu-img: $!\n";
my $json = do { local $/; <$fh> }; close($fh) or die "qemu-img info failed\n";
die "no output from qemu-img info\n" if !$json;
my $info = decode_json($json);
die "$f: backing file not allowed\n" if exists $info->{'backing-filename'};
die "bad virtual-size\n" if ($info->{'virtual-size'} // '') !~ /^\d+$/;
die "bad actual-size\n" if ($info->{'actual-size'} // '') !~ /^\d+$/;
print $info->{'virtual-size'}, ' ', $info->{format}, ' ', $st->size, "\n";
`;

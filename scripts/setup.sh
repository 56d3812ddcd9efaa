#!/usr/bin/env bash
# Installs everything pve-backup-provider needs on Debian 12 (as root): the QEMU tools, libnbd's
# tools, nbdkit, GNU tar/rsync/acl/attr, Garage (cached), then the npm dependencies and the native build.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  qemu-utils            # qemu-img, qemu-io, qemu-nbd
  qemu-system-common    # qemu-storage-daemon
  fuse3                 # fusermount3, for the FUSE export a VM restore reads (the daemon needs /dev/fuse)
  qemu-system-x86       # qemu-system-x86_64 (TCG, for VM tests)
  libnbd-bin            # nbdinfo, nbdcopy (peer tools in tests and benchmarks)
  python3-libnbd        # the seed's baseline algorithm in benchmarks
  nbdkit                # memory, sparse-random, data plugins; error and delay filters
  time                  # /usr/bin/time: peak RSS and CPU of benchmark runs
  tar rsync acl attr    # container backup and restore
  perl                  # the Perl bridge (perl/) and its tests: perl -T, JSON::PP, IO::Select
  openssl               # test certificates for the TLS endpoint in front of Garage (CA-signed, self-signed)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}; run as root or: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi

# Garage, the distributed S3 store the object-storage tests run as a three-node cluster. Cached
# outside the clone, built only when missing or of another version: a Rust build of the server
# takes tens of minutes on two cores. Nothing goes on PATH; tests look for it at this path (or
# $PVE_BACKUP_GARAGE).
garage_version=2.5.0
garage_root=/var/cache/pve-backup-provider/garage-$garage_version
if [[ "$("$garage_root/bin/garage" --version 2>/dev/null)" != *" cargo:$garage_version "* ]]; then
  cargo install garage --version "$garage_version" --locked --root "$garage_root"
fi

npm ci --no-audit --no-fund
npm run build

#!/usr/bin/env bash
# Installs QEMU's x86 system emulator beside the machine's qemu-img, for side-by-side
# benchmarks, and prints the path of qemu-system-x86_64.
#
# Debian 12's qemu-system-x86 package would replace a newer qemu-utils with 7.2, so the
# packages are downloaded and unpacked into a private folder instead of installed; only
# the shared libraries they link against are installed with apt-get.
set -euo pipefail

prefix=${QEMU_REFERENCE_DIR:-/opt/monstervm/qemu-reference}
binary="$prefix/usr/bin/qemu-system-x86_64"

if [ -x "$binary" ] && "$binary" --version >/dev/null 2>&1; then
  echo "$binary"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq libcapstone4 libfdt1 libpmem1 librdmacm1 libibverbs1 libslirp0 \
  libvdeplug2 libaio1 liburing2 libpixman-1-0 libjpeg62-turbo libpng16-16 >/dev/null

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q qemu-system-x86 qemu-system-common qemu-system-data seabios >/dev/null 2>&1)
mkdir -p "$prefix"
for package in "$work"/*.deb; do
  dpkg-deb -x "$package" "$prefix"
done

if ! "$binary" --version >/dev/null; then
  echo "qemu-system-x86_64 in $prefix does not start; check its libraries with: ldd $binary" >&2
  exit 1
fi
echo "$binary"

#!/usr/bin/env bash
# Install what ia2shim needs on a fresh Debian 12 machine, skipping what is
# already there: QEMU (the PKU virtual machine), a Debian kernel and a static
# busybox for its guest, dav1d and aomenc for the demo, a C compiler, and the
# stock programs of the compatibility corpus.
set -euo pipefail
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v dav1d >/dev/null || need+=(dav1d)
command -v aomenc >/dev/null || need+=(aom-tools)
# rsvg-convert renders the --map pictures in ia2run's tests.
command -v rsvg-convert >/dev/null || need+=(librsvg2-bin)
command -v cc >/dev/null || need+=(gcc libc6-dev)
# build.rs links a copy of gcc's static unwinder (libgcc_eh.a), made with objcopy.
command -v objcopy >/dev/null || need+=(binutils)
if command -v cc >/dev/null && ! cc -print-file-name=libgcc_eh.a | grep -q /; then
  need+=(gcc)
fi
# The compatibility corpus (tests/corpus.rs): stock programs and their libraries.
for p in libxml2-utils xsltproc xmlstarlet libarchive-tools curl python3 perl \
         sqlite3 jq openssl lua5.4 xz-utils zstd bzip2 file pigz qpdf exiv2 \
         imagemagick ffmpeg tcl gawk bc gzip tar; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
fi
command -v cargo >/dev/null || { echo "setup: cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }

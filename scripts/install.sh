#!/usr/bin/env bash
# Installs libia2shim.so, ia2run, the C headers and a pkg-config file into a
# prefix (default /usr/local):
#
#   scripts/install.sh [--prefix DIR] [--no-build] [--from DIR]
#
#   PREFIX/bin/ia2run
#   PREFIX/lib/libia2shim.so              (ia2run finds it here by itself)
#   PREFIX/include/ia2shim.h, ia2_allocator.h
#   PREFIX/lib/pkgconfig/ia2shim.pc
#   PREFIX/share/ia2shim/install-manifest.txt   (the files, for removal)
#
# It builds both with `cargo build --release` first, unless --no-build (then
# the files come from --from DIR, default target/release or
# $CARGO_TARGET_DIR/release). DESTDIR is honoured, for packaging.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
prefix=/usr/local build=1 from=""
while [ $# -gt 0 ]; do
  case $1 in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --prefix=*) prefix=${1#--prefix=}; shift ;;
    --no-build) build=0; shift ;;
    --from) from=${2:?--from needs a directory}; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
done
case $prefix in /*) ;; *) echo "install.sh: --prefix must be absolute: $prefix" >&2; exit 2 ;; esac
if [ "$build" = 1 ]; then
  (cd "$root" && cargo build --release -p ia2shim -p ia2run)
fi
[ -n "$from" ] || from=${CARGO_TARGET_DIR:-$root/target}/release
for f in libia2shim.so ia2run; do
  [ -f "$from/$f" ] || { echo "install.sh: $from/$f is missing (build with cargo build --release --workspace)" >&2; exit 1; }
done
dest=${DESTDIR:-}$prefix
manifest=()
put() { # mode source target
  install -D -m "$1" "$2" "$dest/$3"
  manifest+=("$prefix/$3")
}
put 755 "$from/ia2run" bin/ia2run
put 755 "$from/libia2shim.so" lib/libia2shim.so
put 644 "$root/include/ia2shim.h" include/ia2shim.h
put 644 "$root/include/ia2_allocator.h" include/ia2_allocator.h
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
pc=$(mktemp)
cat >"$pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: ia2shim
Description: MPK/PKU compartments for unmodified programs (LD_PRELOAD=\${libdir}/libia2shim.so)
Version: $version
Cflags: -I\${includedir}
Libs:
PC
put 644 "$pc" lib/pkgconfig/ia2shim.pc
rm -f "$pc"
manifest+=("$prefix/share/ia2shim/install-manifest.txt")
mkdir -p "$dest/share/ia2shim"
printf '%s\n' "${manifest[@]}" >"$dest/share/ia2shim/install-manifest.txt"
echo "installed into ${DESTDIR:-}$prefix:"
printf '  %s\n' "${manifest[@]}"

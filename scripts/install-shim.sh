#!/usr/bin/env bash
# Installs the shim for C, C++ and Fortran programs: the static and shared libraries, the header
# and a pkg-config file, so that `cc sim.c $(pkg-config --cflags --libs supervise-shim)` works.
#
#   scripts/install-shim.sh [--prefix DIR] [--from DIR]
#
# --prefix  where to install (default: ~/.local); then PKG_CONFIG_PATH=DIR/lib/pkgconfig
# --from    take already built libraries from DIR instead of `cargo build --release`
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="$HOME/.local"
from=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --from) from="$2"; shift 2 ;;
        *) echo "usage: $0 [--prefix DIR] [--from DIR]" >&2; exit 2 ;;
    esac
done
if [ -z "$from" ]; then
    cargo build --release -p supervise-shim
    from=target/release
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' shim/Cargo.toml | head -1)
install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0644 "$from/libsupervise_shim.a" "$prefix/lib/"
install -m 0755 "$from/libsupervise_shim.so" "$prefix/lib/"
install -m 0644 shim/include/supervise.h "$prefix/include/"
cat > "$prefix/lib/pkgconfig/supervise-shim.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: supervise-shim
Description: Checkpoint/restart shim for programs run under supervise
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -lsupervise_shim
Libs.private: -lpthread -ldl -lm
PC
echo "installed in $prefix; use: PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --cflags --libs supervise-shim"

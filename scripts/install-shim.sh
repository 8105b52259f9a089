#!/usr/bin/env bash
# Installs the shim for C, C++ and Fortran programs: the static and shared libraries, the header
# and a pkg-config file, so that `cc sim.c $(pkg-config --cflags --libs supervise-shim)` works;
# the Fortran module's source (include/supervise.f90) and, when gfortran is here, the module
# compiled with it (include/supervise.mod, lib/libsupervise_fortran.a) and a pkg-config file, so
# that `gfortran sim.f90 $(pkg-config --cflags --libs supervise-shim-fortran)` works. A .mod file
# is read only by the gfortran version that wrote it; other compilers: build
# include/supervise.f90 with the program.
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
    cargo build --release -p supervise-capi
    from=target/release
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' shim/capi/Cargo.toml | head -1)
install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0644 "$from/libsupervise.a" "$prefix/lib/"
install -m 0755 "$from/libsupervise.so" "$prefix/lib/"
# The names of releases before the C ABI had a crate of its own, for programs that link them.
ln -sf libsupervise.a "$prefix/lib/libsupervise_shim.a"
ln -sf libsupervise.so "$prefix/lib/libsupervise_shim.so"
install -m 0644 shim/capi/include/supervise.h shim/capi/include/supervise.f90 "$prefix/include/"
cat > "$prefix/lib/pkgconfig/supervise-shim.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: supervise-shim
Description: Checkpoint/restart shim for programs run under supervise
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -lsupervise
Libs.private: -lpthread -ldl -lm
PC
echo "installed in $prefix; use: PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --cflags --libs supervise-shim"

if ! command -v gfortran >/dev/null 2>&1; then
    echo "gfortran not found: the Fortran module was installed as source only ($prefix/include/supervise.f90)"
    exit 0
fi
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# The module's wrappers have code of their own (the NUL-terminated names, the error message):
# supervise.mod for `use supervise`, and its object in a library beside libsupervise.
gfortran -O2 -fPIC -c shim/capi/include/supervise.f90 -J "$build" -o "$build/supervise_f90.o"
ar rcs "$build/libsupervise_fortran.a" "$build/supervise_f90.o"
install -m 0644 "$build/supervise.mod" "$prefix/include/"
install -m 0644 "$build/libsupervise_fortran.a" "$prefix/lib/"
cat > "$prefix/lib/pkgconfig/supervise-shim-fortran.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: supervise-shim-fortran
Description: The Fortran module of the supervise shim (use supervise), built with $(gfortran -dumpfullversion 2>/dev/null || gfortran -dumpversion)
Version: $version
Requires: supervise-shim = $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -lsupervise_fortran
PC
echo "Fortran: gfortran sim.f90 \$(PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --cflags --libs supervise-shim-fortran)"

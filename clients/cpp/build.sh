#!/usr/bin/env bash
# Builds the C++ client wafer-invoke against capnp/cluster.capnp.
#
#   clients/cpp/build.sh [OUTDIR]      (default: <repo>/target/cpp)
#
# Generates the schema's C++ code into OUTDIR/gen and compiles OUTDIR/wafer-invoke.
# Does nothing when the binary is newer than its source, the schema and this script.
# Progress goes to stderr; the last line of stdout is the binary's path.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/cpp}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

src="$here/wafer_invoke.c++"
schema="$root/capnp/cluster.capnp"
bin="$out/wafer-invoke"

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    log "run scripts/bootstrap.sh, or: apt-get install libcapnp-dev capnproto g++ pkg-config"
    exit 1
}

# Up to date: nothing to do.
if [ -x "$bin" ] && [ "$bin" -nt "$src" ] && [ "$bin" -nt "$schema" ] &&
   [ "$bin" -nt "${BASH_SOURCE[0]}" ]; then
    log "up to date"
    echo "$bin"
    exit 0
fi

# The tools: a C++ compiler, pkg-config, the Cap'n Proto compiler + C++ plugin, the library.
cxx="${CXX:-g++}"
command -v "$cxx" >/dev/null || die "$cxx (C++ compiler) not found"
command -v pkg-config >/dev/null || die "pkg-config not found"
command -v capnp >/dev/null || die "capnp (the Cap'n Proto compiler) not found"
command -v capnpc-c++ >/dev/null || die "capnpc-c++ (capnp's C++ plugin) not found"
pkg-config --exists capnp-rpc || die "the capnp-rpc library (libcapnp-dev) not found by pkg-config"

# Generate cluster.capnp.h / cluster.capnp.c++ (they must match the library's version).
log "generating C++ code for $schema into $out/gen"
mkdir -p "$out/gen"
capnp compile -oc++:"$out/gen" --src-prefix="$root/capnp" "$schema"

# Compile to a temporary name, so a failed build never looks up to date.
log "compiling $bin"
# shellcheck disable=SC2046,SC2086  # pkg-config's flags and CXXFLAGS are word lists
"$cxx" ${CXXFLAGS:--std=c++17 -O2 -Wall -Wextra} -pthread -I"$out/gen" \
    -o "$bin.tmp" "$src" "$out/gen/cluster.capnp.c++" \
    $(pkg-config --cflags --libs capnp-rpc)
mv -f "$bin.tmp" "$bin"

echo "$bin"

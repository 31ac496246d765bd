#!/usr/bin/env bash
# Installs the Debian packages and Python modules wafer needs (when missing), builds
# every guest in functions/ for wasm32-wasip1 into target/functions/ (NAME.wasm, plus
# NAME.json when the function ships a wafer.json manifest), and builds the web console
# into target/console/ (scripts/console.sh) for `cargo build` to embed. Idempotent;
# quick when nothing is missing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/target/functions"
packages=(capnproto libcapnp-dev ocl-icd-opencl-dev pocl-opencl-icd clinfo rustc-web cargo-web rust-web-src lld wasi-libc clang
          libclang-rt-14-dev-wasm32 g++ pkg-config chromium chromium-driver)

log() { printf 'bootstrap: %s\n' "$*" >&2; }
. "$root/scripts/lib.sh"

install_packages "${packages[@]}"

# The Python client's tests: pycapnp and pytest from PyPI, when missing.
if ! python3 -c "import capnp, pytest" 2>/dev/null; then
    log "installing pycapnp and pytest with pip"
    pip=(python3 -m pip install --quiet --disable-pip-version-check "pycapnp>=2.2,<3" "pytest>=7")
    "${pip[@]}" 2>/dev/null || "${pip[@]}" --break-system-packages
fi

mkdir -p "$out"
cd "$root/functions"

log "building Rust guests for wasm32-wasip1"
"$root/scripts/wasm-cargo.sh"

for dir in */; do
    name="${dir%/}"
    if [ -f "$name/Cargo.toml" ]; then
        wasm="target/wasm32-wasip1/release/$name.wasm"
        [ -f "$wasm" ] || { log "error: $wasm was not built"; exit 1; }
        cp -u "$wasm" "$out/$name.wasm"
    elif ls "$name"/*.c >/dev/null 2>&1; then
        if [ ! -f "$out/$name.wasm" ] || [ -n "$(find "$name" include -name '*.[ch]' -newer "$out/$name.wasm")" ]; then
            log "building C guest $name with clang + wasi-libc"
            clang --target=wasm32-wasi --sysroot=/usr -O2 -I include -o "$out/$name.wasm" "$name"/*.c
        fi
    else
        continue
    fi
    if [ -f "$name/wafer.json" ]; then
        cp -u "$name/wafer.json" "$out/$name.json"
    fi
done

log "guests in $out: $(cd "$out" && ls *.wasm | tr '\n' ' ')"

"$root/scripts/console.sh"

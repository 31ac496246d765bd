#!/usr/bin/env bash
# `cargo build --release --target wasm32-wasip1 "$@"` in the current folder: with rustup's
# wasm32-wasip1 target when installed, else with Debian's rustc-web and build-std (see
# ../shared/TOOLCHAIN.md). WASM_CRT=reactor links a reactor (library) instead of a command.
set -euo pipefail
crt="${WASM_CRT:-command}"
if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    exec cargo build --quiet --release --target wasm32-wasip1 "$@"
fi
PATH=/usr/bin:$PATH RUSTC_BOOTSTRAP=1 \
CARGO_TARGET_WASM32_WASIP1_LINKER=wasm-ld \
RUSTFLAGS="-C link-self-contained=no -L /usr/lib/wasm32-wasi -C link-arg=/usr/lib/wasm32-wasi/crt1-$crt.o" \
    exec /usr/bin/cargo build --quiet --release -Zbuild-std=std,panic_abort --target wasm32-wasip1 "$@"

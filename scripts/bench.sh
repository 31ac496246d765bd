#!/usr/bin/env bash
# Runs wafer's benchmarks (not part of the test suite) and prints a Markdown report.
# Installs what the comparisons need: wasmtime-cli 48 (for `wasmtime serve`, built once
# into target/tools) and the wasi:http hello component's core module.
# Extra arguments go to `wafer-bench all` (see `--help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/bootstrap.sh"

tools="$root/target/tools"
if ! "$tools/bin/wasmtime" --version 2>/dev/null | grep -q '^wasmtime 48\.'; then
    echo "bench: installing wasmtime-cli 48 into $tools (once; several minutes)" >&2
    cargo install --quiet wasmtime-cli --version '^48' --root "$tools"
fi

echo "bench: building the wasi:http hello for wasmtime serve" >&2
(cd "$root/bench/wasi-http-hello" && WASM_CRT=reactor "$root/scripts/wasm-cargo.sh")
mkdir -p "$root/target/bench"
cp -u "$root/bench/wasi-http-hello/target/wasm32-wasip1/release/wasi_http_hello.wasm" "$root/target/bench/"

cargo build --release --bins --quiet
exec "$root/target/release/wafer-bench" all \
    --wasmtime "$tools/bin/wasmtime" \
    --wasi-http-hello "$root/target/bench/wasi_http_hello.wasm" "$@"

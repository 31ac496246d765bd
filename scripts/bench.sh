#!/usr/bin/env bash
# Runs wafer's benchmarks (not part of the test suite) and prints a Markdown report.
# Installs what the comparisons need: wasmtime-cli 48 (for `wasmtime serve`, built once
# into target/tools), the wasi:http hello component's core module, and etcd 3.4 with
# what its gRPC client needs to build (Debian: etcd-server, protobuf-compiler,
# libprotobuf-dev).
# Extra arguments go to `wafer-bench all` (see `--help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/bootstrap.sh"

missing=()
for p in etcd-server protobuf-compiler libprotobuf-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bench: installing Debian packages: ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

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
cargo build --release --quiet -p wafer-bench --features etcd
exec "$root/target/release/wafer-bench" all \
    --wasmtime "$tools/bin/wasmtime" \
    --wasi-http-hello "$root/target/bench/wasi_http_hello.wasm" "$@"

#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing, builds the guest
# functions and the host, checks formatting and lints, then runs every test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/bootstrap.sh"

echo "test: cargo fmt --check" >&2
cargo fmt --all -- --check
(cd functions && cargo fmt --all -- --check)
(cd web-ui && cargo fmt --all -- --check)

echo "test: cargo clippy" >&2
cargo clippy --release --workspace --all-targets --quiet -- -D warnings
(cd web-ui && cargo clippy --all-targets --quiet -- -D warnings)

# With the tests' targets in the same build, features resolve as in `cargo test`, so
# the binary and the tests share one build of every crate (--bins alone would build
# wafer, wasmtime, axum ... a second time with other features).
echo "test: building the wafer binary and the tests" >&2
cargo build --release --workspace --all-targets --quiet

echo "test: cargo test" >&2
cargo test --release --workspace
(cd web-ui && cargo test --quiet)

echo "test: the Python client against a real wafer dev (pytest)" >&2
(cd clients/python && python3 -m pytest -q)

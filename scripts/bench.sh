#!/usr/bin/env bash
# Runs wafer's benchmarks (not part of the test suite) and prints a Markdown report.
# Extra arguments go to `wafer-bench all` (see `--help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/bootstrap.sh"
cargo build --release --bins --quiet
exec "$root/target/release/wafer-bench" all "$@"

#!/usr/bin/env bash
# Bootstraps a fresh machine (Debian packages, guest functions), builds wafer and starts
# `wafer dev` with the example functions. Extra arguments go to `wafer dev`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/bootstrap.sh"
cargo build --release --bin wafer --quiet
exec "$root/target/release/wafer" dev --functions "$root/target/functions" "$@"

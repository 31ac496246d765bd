#!/usr/bin/env bash
# Builds the web console (web-ui/, crate wafer-console; Leptos, client-side rendered) for
# wasm32-unknown-unknown into target/console/, ready for `cargo build` to embed into
# `wafer`: index.html, boot.js, style.css, the wasm-bindgen output, a gzip twin of each
# asset, and BUILD (the build's id, which names the assets' URL folder). Installs the
# wasm-bindgen CLI it needs (the exact version of web-ui/Cargo.lock) into target/tools,
# and Debian's rustc-web when neither it nor rustup's wasm32-unknown-unknown is there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/target/console"
tools="$root/target/tools"
log() { printf 'console: %s\n' "$*" >&2; }
. "$root/scripts/lib.sh"

rustup_target=false
if rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
    rustup_target=true
else
    install_packages rustc-web cargo-web rust-web-src lld
fi

version="$(grep -A1 '^name = "wasm-bindgen"$' "$root/web-ui/Cargo.lock" | sed -n 's/^version = "\(.*\)"$/\1/p')"
bindgen="$tools/bin/wasm-bindgen"
if [ ! -x "$bindgen" ] || [ "$("$bindgen" --version 2>/dev/null)" != "wasm-bindgen $version" ]; then
    log "installing wasm-bindgen-cli $version into $tools (once; a few minutes)"
    cargo install --quiet --root "$tools" wasm-bindgen-cli --version "$version"
fi

cd "$root/web-ui"
log "building wafer-console for wasm32-unknown-unknown"
if $rustup_target; then
    cargo build --quiet --release --target wasm32-unknown-unknown
else
    PATH=/usr/bin:$PATH RUSTC_BOOTSTRAP=1 CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=wasm-ld \
        /usr/bin/cargo build --quiet --release -Zbuild-std=std,panic_abort --target wasm32-unknown-unknown
fi

mkdir -p "$root/target"
stage="$(mktemp -d "$root/target/console.XXXXXX")"
chmod 755 "$stage"
trap 'rm -rf "$stage"' EXIT
"$bindgen" --target web --no-typescript --out-name wafer_console --out-dir "$stage" \
    target/wasm32-unknown-unknown/release/wafer-console.wasm
cp static/style.css static/boot.js static/favicon.svg "$stage/"
build="$(cat "$stage"/*.js "$stage"/*.wasm "$stage"/*.css "$stage"/*.svg static/index.html | sha256sum | cut -c1-16)"
sed "s/@BUILD@/$build/g" static/index.html > "$stage/index.html"
for f in "$stage"/*.js "$stage"/*.wasm "$stage"/*.css "$stage"/*.svg; do
    gzip -9 -n -k "$f"
done
echo "$build" > "$stage/BUILD"

# Replaced only when it changed, so that cargo does not rebuild wafer for nothing.
if [ -f "$out/BUILD" ] && [ "$(cat "$out/BUILD")" = "$build" ]; then
    log "console unchanged in $out (build $build)"
else
    rm -rf "$out"
    mv "$stage" "$out"
    log "console built into $out (build $build, $(du -sh "$out/wafer_console_bg.wasm" | cut -f1) wasm)"
fi

#!/usr/bin/env bash
# Runs the native unit tests of every plugin crate under plugins/ and of the fixture
# crates under tests/plugins/ (plain `cargo test`
# with the normal toolchain). The crates are outside the root workspace, so they share
# one native target dir of their own: target/plugins-native (never the wasm32 one).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -d "$HOME/.cargo/bin" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
export CARGO_TARGET_DIR="$root/target/plugins-native"
status=0
for manifest in "$root"/plugins/*/Cargo.toml "$root"/tests/plugins/*/Cargo.toml; do
    [ -e "$manifest" ] || continue
    name="$(basename "$(dirname "$manifest")")"
    case "$name" in dist|target) continue ;; esac
    echo "[plugin-tests] $name"
    cargo test --manifest-path "$manifest" --no-fail-fast || status=1
done
exit "$status"

#!/usr/bin/env bash
# Build every plugin crate under plugins/ to wasm32 and copy the modules to
# plugins/dist/; then the test fixture crates under tests/plugins/ (the ABI v1
# builds kept to prove v1 still loads) to tests/plugins/dist/.
#
# A plugin crate is a directory plugins/<name>/ with a Cargo.toml. Each one is
# built on its own (it is its own workspace), into one target dir shared by all
# plugin crates (plugins/target), so the wasm32 std is built once and the wasm
# toolchain never shares the workspace's target/. With no plugin crates this
# script does nothing and succeeds.
#
# Toolchain, first that works:
#   1. rustup's wasm32-unknown-unknown target (if installed)
#   2. Debian's rustc-web + cargo-web + rust-web-src, building std with
#      -Zbuild-std (RUSTC_BOOTSTRAP=1), linked with rustup's rust-lld
#   3. otherwise: print how to install either, and fail
#
# Environment:
#   PLUGINS_DIR   plugin source folder (default: <repo>/plugins)
#   DIST_DIR      output folder        (default: $PLUGINS_DIR/dist)
#   PLUGIN_PROFILE  cargo profile       (default: release)
#   PLUGINS_TARGET_DIR  the target dir shared by all plugin crates (default:
#                   $PLUGINS_DIR/target). Sharing builds std for wasm32 once
#                   instead of once per crate (~1 min each).
#   FIXTURES_DIR  test fixture crates (default: <repo>/tests/plugins; built to
#                 $FIXTURES_DIR/dist; set it empty to skip them)
set -euo pipefail

log() { echo "[plugins] $*"; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
plugins_dir="${PLUGINS_DIR:-$root/plugins}"
dist_dir="${DIST_DIR:-$plugins_dir/dist}"
profile="${PLUGIN_PROFILE:-release}"
target_dir="${PLUGINS_TARGET_DIR:-$plugins_dir/target}"
target=wasm32-unknown-unknown
fixtures_dir="${FIXTURES_DIR-$root/tests/plugins}"

# rustup's cargo/rustc first; Debian's live in /usr/bin.
if [ -d "$HOME/.cargo/bin" ]; then
    case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) export PATH="$HOME/.cargo/bin:$PATH" ;; esac
fi

mkdir -p "$dist_dir"

# crates[i] is built into dists[i].
crates=()
dists=()
add_crates() {  # <folder> <dist>
    [ -n "$1" ] && [ -d "$1" ] || return 0
    for manifest in "$1"/*/Cargo.toml; do
        [ -e "$manifest" ] || continue
        dir="$(dirname "$manifest")"
        case "$(basename "$dir")" in dist|target) continue ;; esac
        crates+=("$dir")
        dists+=("$2")
    done
}
add_crates "$plugins_dir" "$dist_dir"
[ -n "$fixtures_dir" ] && add_crates "$fixtures_dir" "$fixtures_dir/dist"

if [ ${#crates[@]} -eq 0 ]; then
    log "no plugin crates in $plugins_dir; nothing to build"
    exit 0
fi
log "plugin crates: ${crates[*]##*/}"

# --- pick a toolchain ---------------------------------------------------------
mode=""
if command -v rustup >/dev/null 2>&1 \
    && rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    mode=rustup
    cargo_cmd=(cargo)
    log "toolchain: rustup target $target ($(rustc --version))"
elif [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] \
    && [ -d "$(/usr/bin/rustc --print sysroot)/lib/rustlib/src/rust/library" ]; then
    mode=build-std
    # The wasm32 linker is rust-lld. Debian's rustc-web does not ship it;
    # rustup's toolchain does.
    if ! command -v rust-lld >/dev/null 2>&1; then
        if command -v rustc >/dev/null 2>&1 && [ "$(command -v rustc)" != /usr/bin/rustc ]; then
            lld_dir="$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/bin"
            [ -x "$lld_dir/rust-lld" ] && export PATH="$PATH:$lld_dir"
        fi
    fi
    if ! command -v rust-lld >/dev/null 2>&1; then
        log "ERROR: rust-lld not found (needed to link wasm32). It comes with any rustup toolchain:"
        log "  curl https://sh.rustup.rs -sSf | sh   (then re-run this script)"
        exit 1
    fi
    export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1
    unset RUSTUP_TOOLCHAIN RUSTDOC || true
    cargo_cmd=(/usr/bin/cargo)
    build_std=(-Zbuild-std=std,panic_abort)
    log "toolchain: Debian $(/usr/bin/rustc --version) with -Zbuild-std (linker: $(command -v rust-lld))"
else
    log "ERROR: no wasm32 toolchain found. Install one of:"
    log "  rustup target add $target"
    log "  apt-get install -y rustc-web cargo-web rust-web-src   (or: scripts/setup.sh)"
    exit 1
fi

# --- build ---------------------------------------------------------------------
profile_dir="$profile"; [ "$profile" = dev ] && profile_dir=debug
start=$(date +%s)
built=0
for i in "${!crates[@]}"; do
    dir="${crates[$i]}"
    dist_dir="${dists[$i]}"
    mkdir -p "$dist_dir"
    name="$(basename "$dir")"
    log "building $name ($mode, profile $profile)"
    t0=$(date +%s)
    tdir="$target_dir"
    args=(build --manifest-path "$dir/Cargo.toml" --target "$target"
          --target-dir "$tdir" --profile "$profile")
    if [ "$mode" = build-std ]; then args+=("${build_std[@]}"); fi
    # Run from the crate dir so its (and plugins/) .cargo/config.toml apply.
    if ! (cd "$dir" && "${cargo_cmd[@]}" "${args[@]}"); then
        log "ERROR: building $name failed."
        log "  Hint: a plugin crate inside this repo needs its own empty [workspace] table"
        log "  in its Cargo.toml, or cargo attaches it to the root workspace (see plugins/README.md)."
        exit 1
    fi
    n=0
    # Only this crate's artifact (the target dir is shared). cargo names it after
    # the lib (keep_last.wasm); it is installed under the package name
    # (keep-last.wasm), which is the plugin's name in config.
    pkg="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$dir/Cargo.toml" | head -n1)"
    lib="$(printf '%s' "$pkg" | tr - _)"
    for wasm in "$tdir/$target/$profile_dir"/*.wasm; do
        if [ "$(basename "$wasm" .wasm)" != "$lib" ]; then continue; fi
        [ -e "$wasm" ] || continue
        [ "$lib" != "$pkg" ] && rm -f "$dist_dir/$lib.wasm"   # stale copy under the lib name
        cp -f "$wasm" "$dist_dir/$pkg.wasm"
        log "  -> ${dist_dir#"$root"/}/$pkg.wasm ($(stat -c %s "$wasm") bytes)"
        n=$((n + 1))
    done
    if [ "$n" = 0 ]; then
        log "  warning: $name produced no .wasm (is crate-type = [\"cdylib\"] set?)"
    fi
    built=$((built + n))
    log "  $name done in $(( $(date +%s) - t0 ))s"
done
log "built $built module(s) from ${#crates[@]} crate(s) in $(( $(date +%s) - start ))s"

#!/usr/bin/env bash
# Idempotent installer for everything Switchyard's build and tests need on
# Debian bookworm (run as root, or as a user with passwordless sudo):
#
#   protoc    <- protobuf-compiler  (etcd-client's build script runs protoc)
#   etcd      <- etcd-server        (cluster tests start their own etcd)
#   etcdctl   <- etcd-client
#   chromium  <- chromium           (the chat page's browser test, headless;
#   node, npm <- nodejs npm          only with --browser, as `make test` asks)
#   python3, venv <- python3 python3-venv  (only with --centrifugo, as `make test`
#                asks: tests/centrifugo/.venv gets tests/centrifugo/requirements.txt,
#                the pinned centrifuge-python SDK the Centrifugo SDK tests drive)
#   wasm32    <- rustc-web cargo-web rust-web-src  (plugins are built with
#                -Zbuild-std; skipped when rustup already has the
#                wasm32-unknown-unknown target)
#
# Each item is skipped when its command/package is already present.
# `apt-get update` runs only when something must be installed.
#
# Environment:
#   SWITCHYARD_SKIP_WASM=1   do not install the wasm toolchain
#   SWITCHYARD_SKIP_ETCD=1   do not install etcd
#   SWITCHYARD_SKIP_BROWSER=1 do not install chromium/node/npm even with --browser,
#                            nor the Python venv with --centrifugo (`make test` then
#                            skips `npm ci`, the browser and the Centrifugo SDK tests)
#   SWITCHYARD_WITH_NATS=1   also install nats-server (the benchmark peer); same as
#                            passing --bench. `make test` never needs it.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

log() { echo "[setup] $*"; }

WITH_NATS="${SWITCHYARD_WITH_NATS:-0}"
WITH_BROWSER=0
WITH_CENTRIFUGO=0
for arg in "$@"; do
    case "$arg" in
        --bench) WITH_NATS=1 ;;
        --browser) WITH_BROWSER=1 ;;
        --centrifugo) WITH_CENTRIFUGO=1 ;;
        *) log "unknown argument: $arg (known: --bench, --browser, --centrifugo)"; exit 2 ;;
    esac
done
if [ "${SWITCHYARD_SKIP_BROWSER:-0}" = 1 ]; then
    WITH_BROWSER=0
    WITH_CENTRIFUGO=0
fi

start=$(date +%s)

# rustup's cargo/rustc must come before Debian's /usr/bin ones.
if [ -d "$HOME/.cargo/bin" ]; then
    case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) export PATH="$HOME/.cargo/bin:$PATH" ;; esac
fi

SUDO=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        # sudo resets the environment: pass DEBIAN_FRONTEND through explicitly.
        SUDO=(sudo -n env DEBIAN_FRONTEND=noninteractive)
    fi
fi

pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

missing=()
want_cmd() { # want_cmd COMMAND PACKAGE
    if command -v "$1" >/dev/null 2>&1; then
        log "ok: $1 ($(command -v "$1"))"
    elif pkg_installed "$2"; then
        log "ok: package $2 is installed"
    else
        log "missing: $1 -> will install package $2"
        missing+=("$2")
    fi
}

want_pkg() { # want_pkg PACKAGE
    if pkg_installed "$1"; then
        log "ok: package $1"
    else
        log "missing: package $1 -> will install"
        missing+=("$1")
    fi
}

if ! command -v cargo >/dev/null 2>&1; then
    log "WARNING: cargo not found. Install Rust with rustup (https://rustup.rs); this script does not."
fi
# `make test` runs `cargo fmt --check` and `cargo clippy -D warnings`: both are rustup
# components (part of the default profile). Add them when this toolchain lacks them.
for comp in clippy rustfmt; do
    sub=$([ "$comp" = clippy ] && echo clippy || echo fmt)
    if command -v cargo >/dev/null 2>&1 && ! cargo "$sub" --version >/dev/null 2>&1; then
        log "missing: cargo $sub -> rustup component add $comp"
        timeout 300 rustup component add "$comp" || log "WARNING: could not add $comp; make test needs it"
    fi
done
want_cmd cc gcc
want_cmd protoc protobuf-compiler
if [ "${SWITCHYARD_SKIP_ETCD:-0}" != 1 ]; then
    want_cmd etcd etcd-server
    want_cmd etcdctl etcd-client
fi

if [ "$WITH_BROWSER" = 1 ]; then
    want_cmd chromium chromium
    want_cmd node nodejs
    # nodesource's nodejs ships npm and conflicts with Debian's npm package: ask for npm
    # only when node is already there without it (else see the second pass below).
    if command -v node >/dev/null 2>&1; then want_cmd npm npm; fi
fi

if [ "$WITH_NATS" = 1 ]; then
    want_cmd nats-server nats-server
fi

if [ "$WITH_CENTRIFUGO" = 1 ]; then
    want_cmd python3 python3
    # Debian's python3 has no venv module (nor ensurepip) without python3-venv.
    if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        want_pkg python3-venv
    fi
fi

if [ "${SWITCHYARD_SKIP_WASM:-0}" = 1 ]; then
    log "skip: wasm toolchain (SWITCHYARD_SKIP_WASM=1)"
elif command -v rustup >/dev/null 2>&1 \
    && rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
    log "ok: rustup target wasm32-unknown-unknown is installed; Debian's rustc-web is not needed"
else
    log "rustup has no wasm32-unknown-unknown target: plugins use Debian's rustc-web + build-std"
    want_pkg rustc-web
    want_pkg cargo-web
    want_pkg rust-web-src
fi

# tests/centrifugo/.venv with the pinned requirements, (re)made when requirements.txt
# changed since the last install (its copy is kept inside the venv).
centrifugo_venv() {
    [ "$WITH_CENTRIFUGO" = 1 ] || return 0
    local dir venv req
    dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/centrifugo"
    venv="$dir/.venv"
    req="$dir/requirements.txt"
    if [ -x "$venv/bin/python" ] && cmp -s "$req" "$venv/requirements.installed"; then
        log "ok: $venv ($(grep -m1 '^centrifuge-python' "$req"))"
        return 0
    fi
    log "python venv $venv <- $req"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req"
    cp "$req" "$venv/requirements.installed"
    log "now: $("$venv/bin/python" -m pip freeze --disable-pip-version-check | tr '\n' ' ')"
}

if [ ${#missing[@]} -eq 0 ]; then
    centrifugo_venv
    log "nothing to install ($(( $(date +%s) - start ))s)"
    exit 0
fi

if [ "$(id -u)" != 0 ] && [ ${#SUDO[@]} -eq 0 ]; then
    log "ERROR: need root (or sudo) to install: ${missing[*]}"
    log "run:  apt-get update && apt-get install -y ${missing[*]}"
    exit 1
fi

# Never start services from package scripts (there is no init system here, and
# a stray etcd on :2379 would disturb the tests).
policy_created=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${SUDO[@]}" chmod +x /usr/sbin/policy-rc.d
    policy_created=1
fi
cleanup() { if [ "$policy_created" = 1 ]; then "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

APT_OPTS=(-o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0)
log "apt-get update"
"${SUDO[@]}" apt-get "${APT_OPTS[@]}" update
log "apt-get install -y ${missing[*]}"
"${SUDO[@]}" apt-get "${APT_OPTS[@]}" install -y "${missing[@]}"

if [ "$WITH_BROWSER" = 1 ] && ! command -v npm >/dev/null 2>&1; then
    log "apt-get install -y npm (Debian's nodejs comes without it)"
    "${SUDO[@]}" apt-get "${APT_OPTS[@]}" install -y npm
fi

for c in protoc etcd etcdctl nats-server chromium node npm; do
    if command -v "$c" >/dev/null 2>&1; then log "now: $c -> $(command -v "$c")"; fi
done
if [ -x /usr/bin/rustc ]; then log "now: Debian rustc: $(/usr/bin/rustc --version)"; fi
log "cargo on PATH: $(command -v cargo || echo none)"
centrifugo_venv
log "done in $(( $(date +%s) - start ))s"

#!/usr/bin/env bash
# The cost of TLS on the client listener: the same `switchyard bench` load against a fresh
# plaintext node (ws://) and a fresh [tls] node (wss://, a self-signed certificate made by
# openssl for this run), in one run. Servers are pinned to CPU 0 and the generator to CPU
# 1 (taskset, 2+ CPUs). Prints each report as JSON lines on stdout; progress on stderr.
#
# Environment: BENCH_DURATION [10s], BENCH_WARMUP [2s], LAT_RATE [1000], TP_FIXED_RATE
# [2000], BENCH_NO_BUILD=1 (skip cargo build), SWITCHYARD_BIN (router binary).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
log() { echo "[bench-tls] $*" >&2; }
DURATION="${BENCH_DURATION:-10s}"; WARMUP="${BENCH_WARMUP:-2s}"
# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"
bench_prepare
certs="$(mktemp -d /tmp/switchyard-tls.XXXXXX)"
trap 'stop_server; rm -rf "$certs"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=127.0.0.1 \
    -addext "subjectAltName=IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" -keyout "$certs/key.pem" -out "$certs/cert.pem" 2>/dev/null
printf '[tls]\ncert_file = "%s"\nkey_file = "%s"\n' "$certs/cert.pem" "$certs/key.pem" >"$certs/tls.toml"
measure() { # measure LABEL bench-args...
    local label="$1"; shift
    for mode in plain tls; do
        if [ "$mode" = tls ]; then BENCH_CONFIG="$certs/tls.toml"; else unset BENCH_CONFIG; fi
        start_switchyard
        local target="$url"
        [ "$mode" = tls ] && target="${url/ws:\/\//wss://}"
        log "$label over $mode ($target)"
        "${client_pin[@]}" "$server_bin" bench "$@" --url "$target" --tls-ca "$certs/cert.pem" \
            --server-pid "$server_pid" --duration "$DURATION" --warmup "$WARMUP" --json --label "$label-$mode"
        stop_server
    done
}
measure latency latency --rate "${LAT_RATE:-1000}"
measure fanout-fixed fanout --rate "${TP_FIXED_RATE:-2000}"

#!/usr/bin/env bash
# Switchyard alone (scripts/compare.sh runs the same scenarios against
# nats-server too; `make bench` runs that). Build release, then for each
# measurement start a fresh router on a free loopback port with a temporary data
# dir, run `switchyard bench` against it, stop it. The server is pinned to CPU 0
# and the generator to CPU 1 (when there are 2+ CPUs and taskset exists).
# Results: target/bench/<time>/<mode>.txt.
#
# Environment (defaults in brackets):
#   BENCH_MODES      modes to run ["latency throughput throughput-fixed connections"]
#   BENCH_DURATION   measured time per run [10s]     BENCH_WARMUP  warm-up [2s]
#   LAT_SUBSCRIBERS [100]  LAT_RATE [1000]
#   TP_SUBSCRIBERS (total, split evenly over the channels) [1000]  TP_CHANNELS [100]  TP_PUBLISHERS [4]  TP_INFLIGHT [64]
#   TP_FIXED_RATE   publishes/s for throughput-fixed (server CPU per 1M at a fixed load) [2000]
#   CONN_COUNT [10000]  CONN_CHANNELS [1000]
#   SWITCHYARD_BIN  router binary [target/release/switchyard]; BENCH_NO_BUILD=1 skips cargo build
#   BENCH_CONFIG    a router config file for every run (e.g. plugins bound to the bench namespace)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"

MODES="${BENCH_MODES:-latency throughput throughput-fixed connections}"
DURATION="${BENCH_DURATION:-10s}"
WARMUP="${BENCH_WARMUP:-2s}"
LAT_SUBSCRIBERS="${LAT_SUBSCRIBERS:-100}"
LAT_RATE="${LAT_RATE:-1000}"
TP_SUBSCRIBERS="${TP_SUBSCRIBERS:-1000}"
TP_CHANNELS="${TP_CHANNELS:-100}"
TP_PUBLISHERS="${TP_PUBLISHERS:-4}"
TP_INFLIGHT="${TP_INFLIGHT:-64}"
TP_FIXED_RATE="${TP_FIXED_RATE:-2000}"
CONN_COUNT="${CONN_COUNT:-10000}"
CONN_CHANNELS="${CONN_CHANNELS:-1000}"

log() { echo "[bench] $*"; }

if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    log "cargo build --release (switchyard)"
    cargo build --release -p switchyard-router --bin switchyard
fi
server_bin="${SWITCHYARD_BIN:-$root/target/release/switchyard}"
[ -x "$server_bin" ] || { log "ERROR: $server_bin not built"; exit 1; }

server_pin=(); client_pin=()
if command -v taskset >/dev/null 2>&1 && [ "$(nproc --all)" -ge 2 ]; then
    server_pin=(taskset -c 0); client_pin=(taskset -c 1)
    log "pinning: server -> CPU 0, generator -> CPU 1"
else
    log "not pinning (need taskset and 2+ CPUs)"
fi
# More file descriptors for 10k connections (the generator raises its own).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

load="$(cut -d' ' -f1 /proc/loadavg)"
log "load average (1 min): $load"
if awk -v l="$load" 'BEGIN { exit !(l > 0.5) }'; then
    log "WARNING: the machine is busy (load $load): other processes share the 2 CPUs, figures will be noisy"
fi
out_dir="$root/target/bench/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out_dir"
server_pid=""; tmp=""

stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$server_pid" 2>/dev/null; then
            log "server $server_pid did not stop on SIGTERM within 10s; killing it"
            kill -KILL "$server_pid" 2>/dev/null || true
        fi
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
    if [ -n "$tmp" ]; then rm -rf "$tmp"; tmp=""; fi
}
trap stop_server EXIT
trap 'exit 130' INT TERM

start_server() { # sets server_pid, url
    tmp="$(mktemp -d /tmp/switchyard-bench.XXXXXX)"
    local plugins="$root/plugins/dist"
    [ -d "$plugins" ] || { plugins="$tmp/plugins"; mkdir -p "$plugins"; }
    local config=()
    [ -n "${BENCH_CONFIG:-}" ] && config=(--config "$BENCH_CONFIG")
    RUST_LOG="${RUST_LOG:-warn}" "${server_pin[@]}" "$server_bin" serve "${config[@]}" --listen 127.0.0.1:0 \
        --data-dir "$tmp/data" --plugins-dir "$plugins" >"$tmp/stdout" 2>"$tmp/stderr" &
    server_pid=$!
    local addr=""
    for _ in $(seq 1 300); do
        addr="$(sed -n 's/^switchyard listening on //p' "$tmp/stdout" | head -n1)"
        [ -n "$addr" ] && break
        if ! kill -0 "$server_pid" 2>/dev/null; then
            log "ERROR: router exited before listening:"; cat "$tmp/stderr" >&2; exit 1
        fi
        sleep 0.1
    done
    [ -n "$addr" ] || { log "ERROR: router did not print its address within 30s"; cat "$tmp/stderr" >&2; exit 1; }
    url="ws://$addr/ws"
    log "router pid $server_pid listening on $addr (data dir $tmp/data)"
}

run() { # run NAME bench-args...
    local name="$1"; shift
    log "=== $name: switchyard bench $* ==="
    start_server
    local status=0
    "${client_pin[@]}" "$server_bin" bench "$@" --url "$url" --server-pid "$server_pid" 2>&1 \
        | tee "$out_dir/$name.txt" || status=$?
    if ! kill -0 "$server_pid" 2>/dev/null; then
        log "WARNING: router died during $name"; tail -20 "$tmp/stderr" >&2 || true
    elif grep -qiE 'panic|ERROR' "$tmp/stderr"; then
        log "router stderr has errors (last lines):"; grep -iE 'panic|ERROR' "$tmp/stderr" | tail -5 >&2
    fi
    stop_server
    [ "$status" = 0 ] || log "WARNING: $name exited $status"
}

for mode in $MODES; do
    case "$mode" in
        latency)
            run latency latency --subscribers "$LAT_SUBSCRIBERS" --rate "$LAT_RATE" \
                --duration "$DURATION" --warmup "$WARMUP" ;;
        throughput)
            run throughput fanout --subscribers "$(( TP_SUBSCRIBERS / TP_CHANNELS ))" --channels "$TP_CHANNELS" \
                --publishers "$TP_PUBLISHERS" --inflight "$TP_INFLIGHT" --duration "$DURATION" --warmup "$WARMUP" ;;
        throughput-fixed)
            run throughput-fixed fanout --label fanout-fixed --subscribers "$(( TP_SUBSCRIBERS / TP_CHANNELS ))" \
                --channels "$TP_CHANNELS" --publishers "$TP_PUBLISHERS" --inflight "$TP_INFLIGHT" --rate "$TP_FIXED_RATE" \
                --duration "$DURATION" --warmup "$WARMUP" ;;
        connections)
            run connections connections --count "$CONN_COUNT" --channels "$CONN_CHANNELS" ;;
        *) log "unknown mode $mode"; exit 2 ;;
    esac
done

echo
echo "================ Switchyard bench results ($(date -u +%FT%TZ), $(nproc) CPUs, load at start $load) ================"
for mode in $MODES; do
    f="$out_dir/$mode.txt"
    [ -f "$f" ] || continue
    echo "--- $mode"
    sed -n '/^== .* summary .*==$/,$p' "$f" | grep -v '^== '
done
echo "(full logs: ${out_dir#"$root"/})"

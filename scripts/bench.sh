#!/usr/bin/env bash
# Switchyard alone (scripts/compare.sh runs the same scenarios against
# nats-server too; `make bench` runs that). Build release, then for each
# measurement start a fresh router on a free loopback port with a temporary data
# dir, run `switchyard bench` against it, stop it. The server is pinned to CPU 0
# and the generator to CPU 1 (when there are 2+ CPUs and taskset exists).
# Results: target/bench/<time>/<mode>.txt.
#
# Environment (defaults in brackets):
#   BENCH_MODES      modes to run ["latency throughput throughput-fixed connections"];
#                    throughput-batch and throughput-fixed-batch are the same loads with
#                    subscribers that ask for packed pushes (connect batch:true)
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

# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"
bench_prepare
out_dir="$root/target/bench/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out_dir"
run() { # run NAME bench-args...
    local name="$1"; shift
    log "=== $name: switchyard bench $* ==="
    start_switchyard
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
        throughput-batch)
            run throughput-batch fanout --label fanout-batch --batch --subscribers "$(( TP_SUBSCRIBERS / TP_CHANNELS ))" \
                --channels "$TP_CHANNELS" --publishers "$TP_PUBLISHERS" --inflight "$TP_INFLIGHT" \
                --duration "$DURATION" --warmup "$WARMUP" ;;
        throughput-fixed)
            run throughput-fixed fanout --label fanout-fixed --subscribers "$(( TP_SUBSCRIBERS / TP_CHANNELS ))" \
                --channels "$TP_CHANNELS" --publishers "$TP_PUBLISHERS" --inflight "$TP_INFLIGHT" --rate "$TP_FIXED_RATE" \
                --duration "$DURATION" --warmup "$WARMUP" ;;
        throughput-fixed-batch)
            run throughput-fixed-batch fanout --label fanout-fixed-batch --batch \
                --subscribers "$(( TP_SUBSCRIBERS / TP_CHANNELS ))" --channels "$TP_CHANNELS" --publishers "$TP_PUBLISHERS" \
                --inflight "$TP_INFLIGHT" --rate "$TP_FIXED_RATE" --duration "$DURATION" --warmup "$WARMUP" ;;
        connections)
            run connections connections --count "$CONN_COUNT" --channels "$CONN_CHANNELS" ;;
        *) log "unknown mode $mode"; exit 2 ;;
    esac
done

echo
echo "================ Switchyard bench results ($(date -u +%FT%TZ), $(nproc) CPUs, load at start $bench_load) ================"
for mode in $MODES; do
    f="$out_dir/$mode.txt"
    [ -f "$f" ] || continue
    echo "--- $mode"
    sed -n '/^== .* summary .*==$/,$p' "$f" | grep -v '^== '
done
echo "(full logs: ${out_dir#"$root"/})"

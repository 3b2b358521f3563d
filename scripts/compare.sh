#!/usr/bin/env bash
# `make bench`: Switchyard side by side with nats-server (its WebSocket
# listener), the same load from `switchyard bench` against both, one table.
#
# For each scenario, each server is started fresh on 127.0.0.1 (Switchyard with
# a temporary data dir, nats-server with a temporary config on free ports),
# measured, and stopped. Servers are pinned to CPU 0 and the generator to CPU 1
# (taskset, with 2+ CPUs). nats-server is installed through
# `scripts/setup.sh --bench` when missing. Results and logs:
# target/bench/compare-<time>/ (one JSON-lines file per column, table.md).
#
# Environment (defaults in brackets):
#   COMPARE_SCENARIOS  ["fanout fanout-fixed latency connections"] (also: cluster)
#   BENCH_DURATION [10s]  BENCH_WARMUP [2s]
#   FANOUT_CHANNELS [100] FANOUT_SUBSCRIBERS (per channel) [10] FANOUT_PUBLISHERS [4]
#   FANOUT_INFLIGHT [64]  FIXED_RATE (publishes/s for fanout-fixed) [2000]
#   LAT_SUBSCRIBERS [100] LAT_RATE [1000]   CONN_COUNT [10000] CONN_CHANNELS [1000]
#   COMPARE_FSYNC_NEVER=0  skip the third column (Switchyard with fsync = "never")
#   COMPARE_CENTRIFUGO=1   add a column: Switchyard through Centrifugo's protocol
#                          (`switchyard bench --protocol centrifugo`, /connection/websocket)
#   COMPARE_ROTATE=N       run the columns rotated by N places (the table keeps its
#                          order), so repeated runs do not always measure one column last
#   BENCH_CONFIG     a router config file for the Switchyard columns
#   BENCH_NO_BUILD=1 skip cargo build; SWITCHYARD_BIN router binary
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin"

SCENARIOS="${COMPARE_SCENARIOS:-fanout fanout-fixed latency connections}"
DURATION="${BENCH_DURATION:-10s}"
WARMUP="${BENCH_WARMUP:-2s}"
FANOUT_CHANNELS="${FANOUT_CHANNELS:-100}"
FANOUT_SUBSCRIBERS="${FANOUT_SUBSCRIBERS:-10}"
FANOUT_PUBLISHERS="${FANOUT_PUBLISHERS:-4}"
FANOUT_INFLIGHT="${FANOUT_INFLIGHT:-64}"
FIXED_RATE="${FIXED_RATE:-2000}"
LAT_SUBSCRIBERS="${LAT_SUBSCRIBERS:-100}"
LAT_RATE="${LAT_RATE:-1000}"
CONN_COUNT="${CONN_COUNT:-10000}"
CONN_CHANNELS="${CONN_CHANNELS:-1000}"
WITH_NEVER="${COMPARE_FSYNC_NEVER:-1}"
WITH_CF="${COMPARE_CENTRIFUGO:-0}"

log() { echo "[compare] $*" >&2; }

if ! command -v nats-server >/dev/null 2>&1; then
    log "nats-server missing: scripts/setup.sh --bench"
    "$root/scripts/setup.sh" --bench
fi
nats_bin="$(command -v nats-server)" || { log "ERROR: nats-server not found after setup"; exit 1; }
# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"
bench_prepare
out_dir="$root/target/bench/compare-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out_dir"

start_nats() { # sets server_pid, url
    tmp="$(mktemp -d /tmp/nats-compare.XXXXXX)"
    local port ws_port
    port="$(free_port)"; ws_port="$(free_port)"
    while [ "$ws_port" = "$port" ]; do ws_port="$(free_port)"; done
    cat >"$tmp/nats.conf" <<CONF
host: "127.0.0.1"
port: $port
websocket {
  listen: "127.0.0.1:$ws_port"
  no_tls: true
}
CONF
    "${server_pin[@]}" "$nats_bin" -c "$tmp/nats.conf" >"$tmp/stdout" 2>"$tmp/stderr" &
    server_pid=$!
    for _ in $(seq 1 100); do
        port_free "$ws_port" || break
        kill -0 "$server_pid" 2>/dev/null || { log "ERROR: nats-server exited:"; cat "$tmp/stderr" >&2; exit 1; }
        sleep 0.1
    done
    port_free "$ws_port" && { log "ERROR: nats-server did not listen within 10s"; cat "$tmp/stderr" >&2; exit 1; }
    url="ws://127.0.0.1:$ws_port"
}

scenario_args() { # scenario_args NAME URL: the bench arguments of a scenario
    local t=(--duration "$DURATION" --warmup "$WARMUP")
    local fan=(--channels "$FANOUT_CHANNELS" --subscribers "$FANOUT_SUBSCRIBERS" --publishers "$FANOUT_PUBLISHERS" \
        --inflight "$FANOUT_INFLIGHT")
    case "$1" in
        fanout) echo fanout "${fan[@]}" "${t[@]}" --url "$2" ;;
        fanout-fixed) echo fanout --label fanout-fixed "${fan[@]}" --rate "$FIXED_RATE" "${t[@]}" --url "$2" ;;
        latency) echo latency --subscribers "$LAT_SUBSCRIBERS" --rate "$LAT_RATE" "${t[@]}" --url "$2" ;;
        connections) echo connections --count "$CONN_COUNT" --channels "$CONN_CHANNELS" --url "$2" ;;
        cluster) echo cluster --pub-url "$2" --sub-urls "$2,$2" "${fan[@]}" "${t[@]}" ;;
        *) log "unknown scenario $1"; return 2 ;;
    esac
}

columns=(switchyard nats)
[ "$WITH_NEVER" = 1 ] && columns+=(switchyard-never)
[ "$WITH_CF" = 1 ] && columns+=(switchyard-centrifugo)
rotate="${COMPARE_ROTATE:-0}"
run_order=()
for i in "${!columns[@]}"; do run_order+=("${columns[$(( (i + rotate) % ${#columns[@]} ))]}"); done

for sc in $SCENARIOS; do
    for col in "${run_order[@]}"; do
        case "$col" in
            switchyard) start_switchyard; target=switchyard; protocol=native ;;
            switchyard-never) start_switchyard never; target=switchyard; protocol=native ;;
            switchyard-centrifugo) start_switchyard; target=switchyard; protocol=centrifugo ;;
            nats) start_nats; target=nats; protocol=native ;;
        esac
        # shellcheck disable=SC2207
        args=($(scenario_args "$sc" "$url"))
        log "=== $sc / $col (pid $server_pid): switchyard bench ${args[*]} --target $target --protocol $protocol"
        status=0
        "${client_pin[@]}" "$server_bin" bench "${args[@]}" --target "$target" --protocol "$protocol" \
            --server-pid "$server_pid" --json \
            >>"$out_dir/$col.jsonl" 2> >(tee "$out_dir/$sc-$col.log" >&2) || status=$?
        [ "$status" = 0 ] || log "WARNING: $sc / $col exited $status (counts did not add up, or it failed): see $out_dir/$sc-$col.log"
        if ! kill -0 "$server_pid" 2>/dev/null; then
            log "WARNING: the server died during $sc / $col"; tail -20 "$tmp/stderr" >&2 || true
        fi
        stop_server
    done
done

table_args=(--column "Switchyard=$out_dir/switchyard.jsonl" --column "nats-server=$out_dir/nats.jsonl")
[ "$WITH_NEVER" = 1 ] && table_args+=(--column "Switchyard fsync=never=$out_dir/switchyard-never.jsonl")
[ "$WITH_CF" = 1 ] && table_args+=(--column "Switchyard via Centrifugo protocol=$out_dir/switchyard-centrifugo.jsonl")
{
    echo "Switchyard vs nats-server $("$nats_bin" --version 2>&1 | head -n1) over WebSocket on 127.0.0.1," \
        "$(date -u +%FT%TZ), $(nproc --all) CPUs, load at start $bench_load; servers on CPU 0, generator on CPU 1."
    echo
    "$server_bin" bench table "${table_args[@]}"
    echo
    echo "- Switchyard acknowledges a publish only after it is durable (group-commit fsync); NATS core"
    echo "  persists nothing and has no publish acknowledgement: its \"acknowledged\" publishes are those"
    echo "  covered by a PING/PONG round trip after each window. The fsync=never column removes the fsync."
    echo "- Flow control is the same for both: a publisher sends as many publishes as it has permits"
    echo "  (the window), as one batch, and gets a batch's permits back when the whole batch is"
    echo "  acknowledged (Switchyard: its last reply; NATS: the PONG). \`switchyard bench --flow each\` returns a permit per Switchyard reply instead."
    echo "- fanout: $FANOUT_CHANNELS channels x $FANOUT_SUBSCRIBERS subscribers, $FANOUT_PUBLISHERS publishers x" \
        "$FANOUT_INFLIGHT in flight, as fast as acknowledged; fanout-fixed: the same at $FIXED_RATE publishes/s;" \
        "latency: 1 channel x $LAT_SUBSCRIBERS subscribers at $LAT_RATE publishes/s; connections: $CONN_COUNT idle" \
        "over $CONN_CHANNELS channels. Warm-up $WARMUP, measured $DURATION."
    echo "- Ratio = Switchyard / nats-server: above 1 is better for rates, below 1 is better for latency, CPU and memory."
} | tee "$out_dir/table.md"
log "results: ${out_dir#"$root"/}"

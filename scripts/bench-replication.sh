#!/usr/bin/env bash
# The cost of replication: a two-node cluster (real etcd, release build) measured with
# `switchyard bench` twice in one run, first with `replicas = 1`, then `replicas = 2`,
# the same load against node 1 (channels spread over both nodes' partitions, so half of
# the publishes are forwarded in both runs). Prints the figures of each run.
#
# Then the catch-up rate of a new follower: node 1 alone (replicas = 2, so running
# under-replicated) is filled by `switchyard bench fanout` for CATCHUP_FILL [20s]; node 2
# then joins, and the time from its start to a full ISR on every partition, and its
# snapshot log lines, give messages/s and MB/s.
#
# Environment: BENCH_DURATION [10s], BENCH_WARMUP [2s], LAT_RATE [1000],
# BENCH_NO_BUILD=1 (skip cargo build), SWITCHYARD_BIN (router binary).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin"
log() { echo "[bench-replication] $*" >&2; }
DURATION="${BENCH_DURATION:-10s}"; WARMUP="${BENCH_WARMUP:-2s}"; RATE="${LAT_RATE:-1000}"
if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    log "cargo build --release (switchyard)"
    cargo build --release -p switchyard --bin switchyard
fi
bin="${SWITCHYARD_BIN:-$root/target/release/switchyard}"
command -v etcd >/dev/null || { log "etcd missing: run scripts/setup.sh"; exit 1; }
work="$(mktemp -d /tmp/switchyard-repl.XXXXXX)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"  # port_free, free_port

start_etcd() { # start_etcd NAME: sets cport
    cport="$(free_port)"; local pport; pport="$(free_port)"
    etcd --data-dir "$work/etcd-$1" --listen-client-urls "http://127.0.0.1:$cport" \
        --advertise-client-urls "http://127.0.0.1:$cport" --listen-peer-urls "http://127.0.0.1:$pport" \
        >"$work/etcd-$1.log" 2>&1 &
    pids+=($!)
}
start_node() { # start_node ID NAME REPLICAS LOG_LEVEL: sets addr
    local port; port="$(free_port)"
    cat >"$work/$1-$2.toml" <<TOML
node_id = "$1"
partitions = 16
[cluster]
etcd = ["http://127.0.0.1:$cport"]
name = "bench"
secret = "bench-secret-0123456789"
replicas = $3
coordination_interval = "1s"
TOML
    RUST_LOG="$4" "$bin" serve --config "$work/$1-$2.toml" --listen "127.0.0.1:$port" \
        --data-dir "$work/data-$1-$2" --plugins-dir "$work/plugins" >"$work/$1-$2.log" 2>&1 &
    pids+=($!)
    addr="127.0.0.1:$port"
}
full_isr() { # full_isr REPLICAS: true once the map exists and (with 2) every ISR has both nodes
    local map; map="$(ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$cport" get /switchyard/bench/partition-map --print-value-only 2>/dev/null || true)"
    [ -n "$map" ] || return 1
    [ "$1" = 1 ] && return 0
    python3 -c 'import json,sys; m=json.loads(sys.argv[1]); sys.exit(0 if m.get("isr") and all(len(i)==2 for i in m["isr"]) else 1)' "$map"
}
run() { # run REPLICAS
    local r="$1"
    start_etcd "r$r"
    start_node n1 "r$r" "$r" warn; local a1="$addr"
    start_node n2 "r$r" "$r" warn
    log "replicas = $r: nodes $a1 $addr, etcd :$cport; waiting for the map (and a full ISR)"
    for _ in $(seq 1 300); do full_isr "$r" && break; sleep 0.2; done
    log "replicas = $r: latency at $RATE publishes/s"
    "$bin" bench latency --url "ws://$a1/ws" --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" --json >"$work/lat-$r.json"
    log "replicas = $r: saturation (fanout, 100 channels x 10 subscribers, 4 publishers)"
    "$bin" bench fanout --url "ws://$a1/ws" --duration "$DURATION" --warmup "$WARMUP" --json >"$work/fan-$r.json"
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
    echo "replicas=$r latency: $(cat "$work/lat-$r.json")"
    echo "replicas=$r fanout:  $(cat "$work/fan-$r.json")"
}
catchup() {
    start_etcd catchup
    start_node n1 catchup 2 info; local a1="$addr"
    for _ in $(seq 1 300); do full_isr 1 && break; sleep 0.1; done
    log "catch-up: filling n1 alone for ${CATCHUP_FILL:-20s}"
    "$bin" bench fanout --url "ws://$a1/ws" --channels 100 --subscribers 1 --duration "${CATCHUP_FILL:-20s}" --warmup 1s --json >"$work/fill.json"
    local t0; t0="$(date +%s.%N)"
    start_node n2 catchup 2 info
    log "catch-up: n2 started; waiting for a full ISR"
    for _ in $(seq 1 600); do full_isr 2 && break; sleep 0.1; done
    local t1; t1="$(date +%s.%N)"
    python3 - "$work/n2-catchup.log" "$work/fill.json" "$t0" "$t1" <<'PY'
import json, re, sys
log, fill, t0, t1 = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
msgs = sum(int(m) for m in re.findall(r"replica snapshot taken .*?messages=(\d+)", open(log).read()))
published = json.load(open(fill))["totals"]["acked"]
wall = t1 - t0
# 100-byte payloads; stored messages carry their idempotency-free JSON plus ~40 bytes of framing.
mb = msgs * 140 / 1e6
print(f"catch-up: {msgs} messages (of {published} published) copied by snapshot; "
      f"n2 start to full ISR {wall:.2f} s: {msgs / wall:,.0f} messages/s, {mb / wall:.1f} MB/s (~140 B per message)")
PY
}
mkdir -p "$work/plugins"
run 1
run 2
catchup

#!/usr/bin/env bash
# A reconnect storm (issue #33): etcd and three release nodes on free loopback ports,
# then `switchyard bench storm`: STORM_CLIENTS subscribed clients over the three nodes,
# a steady publisher on the first, and after the warm-up the third node is killed with
# SIGKILL. The bench prints its figures (one JSON line with STORM_JSON=1); progress goes
# to stderr. Everything it starts is stopped on exit, and its temp dirs removed.
#
#   STORM_CLIENTS   [10000]   subscribed clients
#   STORM_PER       [10]      clients per channel
#   STORM_RATE      [1000]    publishes/s
#   STORM_WARMUP    [5s]      steady traffic before the kill
#   STORM_DEADLINE  [15s]     how long after the kill recoveries are waited for
#   STORM_PARTITIONS [64]     partitions of the cluster
#   STORM_JSON      [0]       1: one JSON line on stdout
#   BENCH_NO_BUILD  [0]       1: use the binary already built (SWITCHYARD_BIN or target/release)
#   STORM_SERVER_BIN [the same] run the nodes from another binary (e.g. an older build, for a
#                             before/after comparison); the bench is always SWITCHYARD_BIN's
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin"
log() { echo "[storm.sh] $*" >&2; }

clients="${STORM_CLIENTS:-10000}"
per="${STORM_PER:-10}"
rate="${STORM_RATE:-1000}"
warmup="${STORM_WARMUP:-5s}"
deadline="${STORM_DEADLINE:-15s}"
partitions="${STORM_PARTITIONS:-64}"

if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    log "cargo build --release -p switchyard"
    cargo build --release -p switchyard --bin switchyard
fi
bin="${SWITCHYARD_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/switchyard}"
[ -x "$bin" ] || { log "ERROR: $bin not built"; exit 1; }
server_bin="${STORM_SERVER_BIN:-$bin}"
[ -x "$server_bin" ] || { log "ERROR: $server_bin not found"; exit 1; }
etcd_bin="${SWITCHYARD_ETCD_BIN:-$(command -v etcd || echo /usr/bin/etcd)}"
[ -x "$etcd_bin" ] || { log "ERROR: etcd not found (scripts/setup.sh installs it)"; exit 1; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

tmp="$(mktemp -d /tmp/switchyard-storm.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"  # free_port, listening_addr

# A free port can be taken between probing and binding: a few tries on other ports.
for attempt in 1 2 3 4; do
    cport="$(free_port)"; pport="$(free_port)"
    while [ "$pport" = "$cport" ]; do pport="$(free_port)"; done
    log "etcd on 127.0.0.1:$cport"
    "$etcd_bin" --name storm --data-dir "$tmp/etcd" \
        --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport" \
        --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
        --initial-cluster "storm=http://127.0.0.1:$pport" >"$tmp/etcd.log" 2>&1 &
    etcd_pid=$!
    pids+=("$etcd_pid")
    for _ in $(seq 1 150); do
        port_free "$cport" || break
        kill -0 "$etcd_pid" 2>/dev/null || break
        sleep 0.1
    done
    port_free "$cport" || break
    log "etcd did not listen (try $attempt):"; tail -3 "$tmp/etcd.log" >&2
    kill "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true
    rm -rf "$tmp/etcd"
    [ "$attempt" = 4 ] && { log "ERROR: etcd did not start"; exit 1; }
done

urls=(); node_pids=()
for n in 1 2 3; do
    dir="$tmp/n$n"; mkdir -p "$dir/data" "$dir/plugins"
    cat >"$dir/config.toml" <<TOML
node_id = "n$n"
partitions = $partitions
[cluster]
etcd = ["http://127.0.0.1:$cport"]
name = "storm"
secret = "storm-bench-secret-0123456789"
lease_ttl = "2s"
coordination_interval = "1s"
TOML
    RUST_LOG="${RUST_LOG:-warn}" "$server_bin" serve --config "$dir/config.toml" --listen 127.0.0.1:0 \
        --data-dir "$dir/data" --plugins-dir "$dir/plugins" >"$dir/stdout" 2>"$dir/stderr" &
    pid=$!
    pids+=("$pid"); node_pids+=("$pid")
    addr="$(listening_addr "$pid" "$dir/stdout" "$dir/stderr" "node n$n")" || exit 1
    urls+=("ws://$addr/ws")
    log "node n$n pid $pid on $addr"
done

# Until every node routes by a map that names all three.
log "waiting for the cluster to form"
for _ in $(seq 1 300); do
    formed=1; epochs=""
    for u in "${urls[@]}"; do
        http="${u#ws://}"; http="http://${http%/ws}/api/v1/cluster"
        # The epoch, if the map names all three nodes as owners.
        e="$(curl -fsS "$http" 2>/dev/null | python3 -c 'import json,sys
v=json.load(sys.stdin); o=json.dumps(v.get("owners", v))
print(v["epoch"] if all(f"\"n{i}\"" in o for i in (1,2,3)) else "")' 2>/dev/null || true)"
        [ -n "$e" ] || formed=0
        epochs="$epochs $e"
    done
    if [ "$formed" = 1 ] && [ "$(tr ' ' '\n' <<<"$epochs" | sort -u | grep -c .)" = 1 ]; then
        break
    fi
    formed=0
    sleep 0.2
done
[ "$formed" = 1 ] || { log "ERROR: the cluster did not form within 60s"; exit 1; }

json=(); [ "${STORM_JSON:-0}" = 1 ] && json=(--json)
sub_urls="$(IFS=,; echo "${urls[*]}")"
server_pids="$(IFS=,; echo "${node_pids[*]}")"
log "$(nproc) CPUs, kernel $(uname -r), load $(cut -d' ' -f1 /proc/loadavg)"
log "switchyard bench storm --count $clients --subscribers $per --rate $rate --warmup $warmup --duration $deadline --sub-urls $sub_urls --kill-pid ${node_pids[2]} --server-pids $server_pids"
status=0
"$bin" bench storm --count "$clients" --subscribers "$per" --rate "$rate" --warmup "$warmup" \
    --duration "$deadline" --sub-urls "$sub_urls" --kill-pid "${node_pids[2]}" --kill-url "${urls[2]}" \
    --server-pids "$server_pids" "${json[@]}" || status=$?
exit "$status"

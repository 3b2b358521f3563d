#!/usr/bin/env bash
# P=4096, 3 nodes, replicas 2, defaults otherwise: time from the nodes' start to a full
# ISR on every partition, and the map epoch then (each ISR write bumps it).
#   scripts/bench-isr-startup.sh [ROUTER_BIN]   (default target/release/switchyard; needs etcd)
# Progress goes to stderr every 5 s; gives up after 120 s.
set -u
bin="${1:-target/release/switchyard}"; work="$(mktemp -d /tmp/switchyard-isr.XXXX)"; pids=()
trap 'kill ${pids[@]} 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
cport=$(free_port); pport=$(free_port)
etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport" --listen-peer-urls "http://127.0.0.1:$pport" > "$work/etcd.log" 2>&1 & pids+=($!)
sleep 1
start=$(date +%s.%N)
for id in n1 n2 n3; do
  port=$(free_port)
  cat > "$work/$id.toml" <<TOML
node_id = "$id"
partitions = 4096
[cluster]
etcd = ["http://127.0.0.1:$cport"]
name = "p4k"
secret = "p4k-secret-0123456789"
TOML
  RUST_LOG=warn "$bin" serve --config "$work/$id.toml" --listen "127.0.0.1:$port" --data-dir "$work/data-$id" --plugins-dir "$work/plugins" > "$work/$id.log" 2>&1 & pids+=($!)
done
for i in $(seq 1 240); do
  map="$(ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$cport" get /switchyard/p4k/partition-map --print-value-only 2>/dev/null)"
  if [ -n "$map" ]; then
    r=$(echo "$map" | python3 -c 'import json,sys; m=json.load(sys.stdin); o=m["owners"]; isr=m.get("isr",[]); full=sum(1 for x in isr if len(x)>=2); print(m["epoch"], len(set(o)), full, len(json.dumps(m)))')
    set -- $r
    if [ "$2" = 3 ] && [ "$3" = 4096 ]; then
      echo "full ISR on every partition after $(python3 -c "print(round($(date +%s.%N)-$start,1))") s: map epoch $1, map JSON $4 bytes"; exit 0
    fi
  fi
  [ $((i % 10)) = 0 ] && echo "[isr] $((i / 2)) s: map epoch, owners, partitions with a full ISR, map bytes: ${r:-no map yet}" >&2
  sleep 0.5
done
echo "no full ISR within 120 s: last epoch/nodes/full/bytes: $r"; grep -ciE "lease|timeout|timed out" $work/n*.log | head

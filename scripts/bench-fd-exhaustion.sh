#!/usr/bin/env bash
# CPU of a node whose file descriptors are exhausted: a fresh release node gets
# RLIMIT_NOFILE 128 (prlimit), then 300 idle TCP connections are opened to it (the rest
# wait in the listen backlog). Prints the node's CPU use over 5 s before, during, and
# after the connections are closed. A spinning accept loop would show ~75% of a core.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin="${SWITCHYARD_BIN:-$root/target/release/switchyard}"
[ -x "$bin" ] || cargo build --release -p switchyard --bin switchyard
tmp="$(mktemp -d /tmp/switchyard-fd.XXXXXX)"
RUST_LOG=warn "$bin" serve --listen 127.0.0.1:0 --data-dir "$tmp/data" --plugins-dir "$tmp/plugins" >"$tmp/out" 2>"$tmp/err" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 1 100); do grep -q "listening on" "$tmp/out" && break; sleep 0.1; done
addr="$(sed -n 's/^switchyard listening on //p' "$tmp/out")"
prlimit --pid="$pid" --nofile=128:128
python3 - "$pid" "$addr" <<'PY'
import os, socket, sys, time
pid, addr = int(sys.argv[1]), sys.argv[2]
host, port = addr.rsplit(":", 1)
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
def measure(label):
    a, t = cpu(), time.time(); time.sleep(5); b, u = cpu(), time.time()
    print(f"{label}: node CPU {100 * (b - a) / (u - t):.1f}% of one core over 5 s")
measure("idle, descriptors free")
held = []
for _ in range(300):
    try:
        held.append(socket.create_connection((host, int(port)), timeout=1))
    except OSError:
        pass
measure(f"{len(held)} idle connections held, descriptors exhausted")
for s in held:
    s.close()
time.sleep(1)
measure("connections closed")
PY
echo "back-off log lines: $(grep -c 'out of file descriptors' "$tmp/err" || true)"

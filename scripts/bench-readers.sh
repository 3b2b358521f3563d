#!/usr/bin/env bash
# `switchyard bench readers` (issue #33): live publish→deliver latency at 1,000
# publishes/s on 10 channels, without and with N history readers (default 500) paging
# other channels, alternating, RUNS runs of each (default 3), each on a fresh node
# (server pinned to CPU 0, generator to CPU 1, as in scripts/compare.sh). nats-server
# has no history, so there is no peer column here.
#
# Environment: READERS (500), RUNS (3), DURATION (10s), WARMUP (3s), OUT (a directory
# for the JSON-lines results, default a temporary one), BENCH_NO_BUILD=1 and
# SWITCHYARD_BIN to serve with an existing binary (e.g. one built from another commit),
# BENCH_CLIENT_BIN for the generator's binary (default the server's; a binary from before
# this scenario existed needs one from after).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[bench-readers] $*" >&2; }
# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"
cd "$root"
bench_prepare
readers="${READERS:-500}"
runs="${RUNS:-3}"
out="${OUT:-$(mktemp -d /tmp/bench-readers.XXXXXX)}"
mkdir -p "$out"
log "results in $out; $(nproc --all) CPUs, kernel $(uname -r)"
for run in $(seq 1 "$runs"); do
    for n in 0 "$readers"; do
        start_switchyard
        log "=== run $run, $n readers (pid $server_pid)"
        "${client_pin[@]}" "${BENCH_CLIENT_BIN:-$server_bin}" bench readers --url "$url" --readers "$n" \
            --duration "${DURATION:-10s}" --warmup "${WARMUP:-3s}" --server-pid "$server_pid" \
            --label "readers-$n" --json >>"$out/readers-$n.jsonl"
        stop_server
    done
done
for n in 0 "$readers"; do
    log "--- $n readers"
    jq -r '"live p50 \(.latency.p50_us/1000) ms p99 \(.latency.p99_us/1000) ms max \(.latency.max_us/1000) ms | ack p99 \(.ack_rtt.p99_us/1000) ms | server CPU \(.server_cpu_pct)% | \(.warnings | map(select(startswith("history"))) | join(""))"' \
        "$out/readers-$n.jsonl" >&2 || cat "$out/readers-$n.jsonl" >&2
done

# Shared by scripts/bench.sh and scripts/compare.sh (sourced, not run): build the
# release binary, pin CPUs, raise the open-file limit, and start/stop a fresh Switchyard
# node. The caller defines `root` and `log` first. Sets: server_bin, server_pin,
# client_pin, server_pid, url, tmp, bench_load (the load average at the start).

bench_prepare() {
    if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
        log "cargo build --release (switchyard)"
        cargo build --release -p switchyard --bin switchyard
    fi
    server_bin="${SWITCHYARD_BIN:-$root/target/release/switchyard}"
    [ -x "$server_bin" ] || { log "ERROR: $server_bin not built"; exit 1; }
    server_pin=(); client_pin=()
    if command -v taskset >/dev/null 2>&1 && [ "$(nproc --all)" -ge 2 ]; then
        server_pin=(taskset -c 0); client_pin=(taskset -c 1)
        log "pinning: servers -> CPU 0, generator -> CPU 1"
    else
        log "not pinning (need taskset and 2+ CPUs)"
    fi
    # More file descriptors for 10k connections (the generator raises its own).
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    log "open files: $(ulimit -n)"
    bench_load="$(cut -d' ' -f1 /proc/loadavg)"
    log "load average (1 min): $bench_load"
    if awk -v l="$bench_load" 'BEGIN { exit !(l > 0.5) }'; then
        log "WARNING: the machine is busy (load $bench_load): other processes share the 2 CPUs, figures will be noisy"
    fi
    server_pid=""; tmp=""; url=""
    trap stop_server EXIT
    trap 'exit 130' INT TERM
}

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

start_switchyard() { # start_switchyard [never]: a fresh node (BENCH_CONFIG applies; `never` forces fsync off)
    tmp="$(mktemp -d /tmp/switchyard-bench.XXXXXX)"
    local plugins="$root/plugins/dist"
    [ -d "$plugins" ] || { plugins="$tmp/plugins"; mkdir -p "$plugins"; }
    local config=()
    if [ "${1:-}" = never ]; then
        if [ -n "${BENCH_CONFIG:-}" ]; then
            { echo 'fsync = "never"'; grep -v '^[[:space:]]*fsync[[:space:]]*=' "$BENCH_CONFIG"; } >"$tmp/config.toml"
        else
            echo 'fsync = "never"' >"$tmp/config.toml"
        fi
        config=(--config "$tmp/config.toml")
    elif [ -n "${BENCH_CONFIG:-}" ]; then
        config=(--config "$BENCH_CONFIG")
    fi
    RUST_LOG="${RUST_LOG:-warn}" "${server_pin[@]}" "$server_bin" serve "${config[@]}" --listen 127.0.0.1:0 \
        --data-dir "$tmp/data" --plugins-dir "$plugins" >"$tmp/stdout" 2>"$tmp/stderr" &
    server_pid=$!
    local addr=""
    for _ in $(seq 1 300); do
        addr="$(sed -n 's/^switchyard listening on //p' "$tmp/stdout" | head -n1)"
        [ -n "$addr" ] && break
        kill -0 "$server_pid" 2>/dev/null || { log "ERROR: router exited before listening:"; cat "$tmp/stderr" >&2; exit 1; }
        sleep 0.1
    done
    [ -n "$addr" ] || { log "ERROR: router did not print its address within 30s"; cat "$tmp/stderr" >&2; exit 1; }
    url="ws://$addr/ws"
    log "router pid $server_pid listening on $addr (data dir $tmp/data)"
}

# Shared by scripts/bench.sh, compare.sh, storm.sh and bench-replication.sh (sourced, not
# run): build the release binary, pin CPUs, raise the open-file limit, pick free ports,
# wait for a node to listen, and start/stop a fresh Switchyard node. The caller defines
# `root` and `log` first. Sets: server_bin, server_pin,
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

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A free loopback port below the kernel's ephemeral range (32768+), which a generator's
# thousands of connections fill: a port free to connect to there may still be taken for bind.
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$(( 10000 + RANDOM % 20000 ))
        if port_free "$p"; then echo "$p"; return 0; fi
    done
    log "ERROR: no free port found"; return 1
}

# listening_addr PID STDOUT STDERR NAME: prints the address node PID announces on STDOUT,
# within 30 s; fails (with the node's STDERR) if it exits or says nothing.
listening_addr() {
    local addr
    for _ in $(seq 1 300); do
        addr="$(sed -n 's/^switchyard listening on //p' "$2" | head -n1)"
        if [ -n "$addr" ]; then echo "$addr"; return 0; fi
        kill -0 "$1" 2>/dev/null || { log "ERROR: $4 exited before listening:"; cat "$3" >&2; return 1; }
        sleep 0.1
    done
    log "ERROR: $4 did not print its address within 30s"; cat "$3" >&2; return 1
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
    local addr
    addr="$(listening_addr "$server_pid" "$tmp/stdout" "$tmp/stderr" router)" || exit 1
    url="ws://$addr/ws"
    log "router pid $server_pid listening on $addr (data dir $tmp/data)"
}

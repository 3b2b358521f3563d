//! Switchyard router: a WebAssembly-extensible message router.
//!
//! The library holds every part of a node; the `switchyard` binary only parses flags and
//! calls [`run`]. Module map: `config` (settings), `protocol` (wire format, no I/O),
//! `channel` and `partition` (names, hashing, ownership), `cluster` (etcd: membership,
//! election, the partition map), `store` (fjall), `owner` (one
//! single-writer task per partition), `outbox` and `session` (one client), `server` (HTTP and
//! WebSocket), `policy` and `maintenance` (retention and compaction), `plugin` (the WASM host), `metrics`, `node`
//! (wiring).

pub mod access;
pub mod auth;
pub mod bench;
pub mod channel;
pub mod cluster;
pub mod config;
pub mod gate;
pub mod maintenance;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod owner;
pub mod partition;
pub mod peer;
pub mod plugin;
pub mod policy;
pub mod poll;
pub mod protocol;
pub mod ratelimit;
pub mod rules;
pub mod server;
pub mod session;
pub mod sessions;
pub mod store;
pub mod web;

use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Runs a node until SIGINT or SIGTERM, then shuts down gracefully: stop accepting, close
/// every client with 4100 after its in-flight replies, drain the owners, sync the store.
pub async fn run(config: config::Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    // With port 0 the real port is known only now; the cluster advertises it.
    let mut config = config;
    config.listen = addr;
    let timeout = config.shutdown_timeout;
    if config.cluster.enabled() {
        cluster::preflight(&config).await?;
    }
    let node = node::Node::start(config)?;
    println!("switchyard listening on {addr}");
    tracing::info!(%addr, node = %node.config.node_id, "serving");
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let server = tokio::spawn(server::serve(node.clone(), listener, alive_tx));
    access::spawn_reload_on_sighup(node.clone());
    wait_for_signal().await;
    tracing::info!("shutting down");
    node.shutdown();
    let drained = tokio::time::timeout(timeout, async {
        let _ = server.await;
        while alive_rx.recv().await.is_some() {}
        node.close().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(?timeout, "shutdown timed out; syncing the store and exiting");
        let _ = node.store.close();
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

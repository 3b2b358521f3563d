//! Switchyard router: a WebAssembly-extensible message router.
//!
//! The library holds every part of a node; the `switchyard` binary only parses flags and
//! calls [`run`]. Module map: `config` (settings), `protocol` (wire format, no I/O),
//! `channel` and `partition` (names, hashing, ownership), `cluster` (etcd: membership,
//! election, the partition map), `peer` (links between nodes, forwarding, upstream
//! subscriptions), `handover` (moving a partition's state), `store` (fjall), `owner` (one
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
pub mod handover;
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
    if wait_for_signal().await == Signal::Terminate {
        drain(&node).await;
    }
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

#[derive(PartialEq)]
enum Signal {
    Terminate,
    Interrupt,
}

async fn wait_for_signal() -> Signal {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => Signal::Terminate,
        _ = int.recv() => Signal::Interrupt,
    }
}

/// How long a draining node waits for its partitions to be moved and handed over.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// SIGTERM in cluster mode with peer links: mark this node draining, wait until the leader
/// has moved every partition away and each new owner has pulled its state, then return so
/// the normal shutdown closes the clients with 4100. A second signal cuts it short.
async fn drain(node: &std::sync::Arc<node::Node>) {
    if node.cluster.is_none() || node.peers.is_none() {
        return;
    }
    tracing::info!("draining: asking the leader to move this node's partitions away");
    if let Err(e) = cluster::drain(node).await {
        tracing::warn!(error = %e, "could not mark this node draining; shutting down without handover");
        return;
    }
    let me = node.config.node_id.clone();
    let started = std::time::Instant::now();
    let done = async {
        loop {
            let owned = node.map.load().owners.iter().filter(|o| **o == me).count();
            if owned == 0 && node.handovers.outstanding() == 0 {
                break;
            }
            // Every member is leaving (the whole cluster is stopping): nobody can take over.
            let view = node.cluster.as_ref().map(|c| c.view());
            if view.is_some_and(|v| v.nodes.values().all(|n| n.draining)) {
                tracing::info!("every member is draining; stopping without handover");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        r = tokio::time::timeout(DRAIN_LIMIT, done) => match r {
            Ok(()) => tracing::info!(elapsed = ?started.elapsed(), "drained: every partition handed over"),
            Err(_) => tracing::warn!(limit = ?DRAIN_LIMIT, "drain timed out; shutting down anyway"),
        },
        _ = wait_for_signal() => tracing::warn!("second signal: shutting down without finishing the drain"),
    }
}

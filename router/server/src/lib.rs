//! The server layer: the config file, the sockets, and `run()`, which wires every layer
//! into one running node.
//!
//! Module map: [`admin`] (the admin token and the endpoints `switchyard ctl` uses), [`config`] (the whole config tree: loading, merging, validation; the only
//! module that knows the file), `node` (startup in dependency order and the cluster's
//! hooks), `http` (the HTTP API, health, metrics and the WebSocket and `/peer` upgrades),
//! `session` (one WebSocket client), `socket` (a client's socket: the frames queued for it,
//! written without copying, and whether it may be read), `poll` (HTTP long-poll), `web` (the demo page and its
//! token endpoint), `policies` (namespace bindings to policies), `tls` (the listener's
//! certificate), `ws` (a [`Text`](switchyard_proto::Text) frame as a WebSocket text
//! payload). It must never route a
//! message itself (the peer layer's `Router` does) nor hold protocol state beyond one
//! connection.

pub mod admin;
pub mod config;
mod http;
mod listen;
mod node;
mod policies;
mod poll;
mod recovery;
mod session;
mod socket;
mod tls;
mod web;
mod ws;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::{Config, ConfigError, Overrides};
use crate::node::Node;
pub use crate::tls::TlsError;

/// Why a node could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address from the config.
        addr: std::net::SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The store (or the data or plugin folder) cannot be opened.
    #[error(transparent)]
    Store(#[from] switchyard_store::StoreError),
    /// The `[tls]` certificate or key cannot be used (exit status 2).
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// `cluster.peer_ca_file` cannot be used (exit status 2).
    #[error("tls: cluster.peer_ca_file: {0}")]
    PeerTls(#[source] TlsError),
    /// etcd holds a cluster this node cannot join as configured (exit status 2).
    #[error("{0}")]
    Fatal(String),
    /// A store write or fsync failed while serving (exit status 3): the node stopped so
    /// that a restart recovers the store from the journal on disk.
    #[error("the store failed a write or fsync (the cause is logged above); stopped so that a restart recovers it from its journal on disk")]
    StoreFailed,
}

impl ServerError {
    /// The process exit status this error calls for: 2 for a configuration mismatch, 3
    /// for a store that failed while serving, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ServerError::Fatal(_) | ServerError::Tls(_) | ServerError::PeerTls(_) => 2,
            ServerError::StoreFailed => 3,
            _ => 1,
        }
    }
}

/// Runs a node until SIGINT or SIGTERM, then shuts down gracefully: stop accepting, close
/// every client with 4100 after its in-flight replies, drain the owners, sync the store.
pub async fn run(config: Config) -> Result<(), ServerError> {
    let tls = match &config.tls {
        Some(t) => Some(tls::acceptor(&t.cert_file, &t.key_file)?),
        None => None,
    };
    let peer_tls = match &config.cluster.peer_ca_file {
        Some(ca) if config.cluster.enabled() => Some(tls::peer_client(ca).map_err(ServerError::PeerTls)?),
        _ => None,
    };
    listen::raise_open_files(config.limits.max_connections);
    let listener = listen::bind(config.listen).map_err(|source| ServerError::Listen { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Listen { addr: config.listen, source })?;
    // With port 0 the real port is known only now; the cluster advertises it.
    let mut config = config;
    config.listen = addr;
    let timeout = config.shutdown_timeout;
    if config.cluster.enabled() {
        match switchyard_cluster::preflight(&node::cluster_settings(&config)).await {
            Err(switchyard_cluster::Error::Fatal(msg)) => return Err(ServerError::Fatal(msg)),
            Err(e) => tracing::warn!(error = %e, "cluster preflight failed"),
            Ok(()) => {}
        }
    }
    let node = Node::start(config, peer_tls)?;
    println!("switchyard listening on {addr}");
    tracing::info!(%addr, node = %node.config.node_id, "serving");
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    if tls.is_some() {
        tracing::info!("TLS on: clients connect with wss:// and https://");
    }
    let server = tokio::spawn(http::serve(node.clone(), listener, alive_tx, tls));
    spawn_reload_on_sighup(node.clone());
    // A store that failed a write refuses every write from then on (fjall is poisoned, and
    // after a failed fsync the page cache no longer says what is on disk): reopening it
    // in-process would mean recovering every partition from the journal again, which is
    // exactly a restart. So the node stops at once, without a drain (it can take no handover
    // write), revokes its lease so a cluster moves its partitions now, and exits with 3 for
    // the supervisor (`Restart=on-failure`) to start it again.
    let mut health = node.router.partitions().store.health();
    let store_failed = tokio::select! {
        signal = wait_for_signal() => {
            if signal == Signal::Terminate {
                drain(&node).await;
            }
            false
        }
        _ = health.wait_for(|h| *h == switchyard_store::Health::Failed) => {
            tracing::error!("the store failed a write: refusing everything and stopping so that a restart recovers it");
            true
        }
    };
    tracing::info!("shutting down");
    node.shutdown();
    // A failed store has nothing left to drain into: a short bound, so the supervisor's
    // restart comes soon (the lease is revoked at once either way).
    let timeout = if store_failed { timeout.min(FAILED_STORE_SHUTDOWN) } else { timeout };
    let drained = tokio::time::timeout(timeout, async {
        let _ = server.await;
        while alive_rx.recv().await.is_some() {}
        node.close().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(?timeout, "shutdown timed out; syncing the store and exiting");
        let _ = node.router.partitions().store.close();
    }
    tracing::info!("stopped");
    if store_failed {
        return Err(ServerError::StoreFailed);
    }
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

/// The longest a node whose store failed waits for its connections to close.
const FAILED_STORE_SHUTDOWN: Duration = Duration::from_secs(2);

/// How long a draining node waits for its partitions to be moved and handed over.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// SIGTERM in cluster mode with peer links: mark this node draining, wait until the leader
/// has moved every partition away and each new owner has pulled its state, then return so
/// the normal shutdown closes the clients with 4100. A second signal cuts it short.
#[tracing::instrument(name = "drain", skip_all, fields(node = %node.config.node_id))]
async fn drain(node: &Arc<Node>) {
    let Some(cluster) = node.cluster.as_ref().filter(|_| node.router.peers_enabled()) else { return };
    tracing::info!("draining: asking the leader to move this node's partitions away");
    if let Err(e) = switchyard_cluster::drain(cluster, &node.metrics).await {
        tracing::warn!(error = %e, "could not mark this node draining; shutting down without handover");
        return;
    }
    let me = node.config.node_id.clone();
    let router = &node.router;
    let handovers = &router.partitions().handovers;
    let started = tokio::time::Instant::now();
    let (mut maps, mut members) = (router.map_changes(), router.member_changes());
    let done = async {
        loop {
            // Register for the wake-up before reading what it would announce.
            let changed = handovers.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Done when this node leads nothing and holds no replica: a partition moving
            // off it keeps it as an in-sync replica until its new replicas are in sync.
            let (owned, held, epoch) = {
                let map = maps.borrow_and_update();
                let held = map.replicas.iter().filter(|r| r.contains(&me)).count();
                (map.owners.iter().filter(|o| **o == me).count(), held, map.epoch)
            };
            if owned == 0 && held == 0 && handovers.settled(epoch) {
                break;
            }
            // Every member is leaving (the whole cluster is stopping): nobody can take over.
            let all_draining = {
                let m = members.borrow_and_update();
                !m.is_empty() && m.values().all(|m| m.draining)
            };
            if all_draining {
                tracing::info!("every member is draining; stopping without handover");
                break;
            }
            tokio::select! {
                _ = maps.changed() => {}
                _ = members.changed() => {}
                _ = &mut changed => {}
            }
        }
    };
    tokio::select! {
        r = tokio::time::timeout(DRAIN_LIMIT, done) => match r {
            Ok(()) => tracing::info!(elapsed = ?started.elapsed(), "drained: every partition moved off this node"),
            Err(_) => tracing::warn!(limit = ?DRAIN_LIMIT, "drain timed out; shutting down anyway"),
        },
        _ = wait_for_signal() => tracing::warn!("second signal: shutting down without finishing the drain"),
    }
}

/// Re-reads the config file and applies its live sections (sessions, rate limits).
fn reload_from_file(node: &Node, path: &Path) -> Result<(), ConfigError> {
    let config = Config::load(Some(path), Overrides::default())?;
    node.access.apply(node::live_settings(&config));
    Ok(())
}

/// SIGHUP reloads the config file's live sections, until shutdown.
fn spawn_reload_on_sighup(node: Arc<Node>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Some(path) = node.config.source.clone() else { return };
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the SIGHUP handler; reload is off");
            return;
        }
    };
    let mut shutdown = node.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            match reload_from_file(&node, &path) {
                Ok(()) => tracing::info!(path = %path.display(), "config reloaded (sessions, rate_limit)"),
                Err(e) => tracing::warn!(error = %e, "config reload failed; keeping the current settings"),
            }
        }
    });
}

/// Why `switchyard token` could not mint a token; printed as is.
#[derive(Debug, thiserror::Error)]
enum TokenError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Mint(#[from] switchyard_access::auth::AuthError),
}

/// The `switchyard token` command: prints a token on stdout; errors go to stderr with exit
/// status 2.
pub fn token_command(
    config: &Path,
    user: &str,
    ttl: Duration,
    channels: Option<Vec<String>>,
) -> std::process::ExitCode {
    let minted = Config::load(Some(config), Default::default())
        .map_err(TokenError::from)
        .and_then(|c| Ok(switchyard_access::auth::mint_from_config(&c.auth, user, ttl, channels)?));
    match minted {
        Ok(token) => {
            println!("{token}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchyard token: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

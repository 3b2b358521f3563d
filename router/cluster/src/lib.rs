//! Cluster mode: membership, leader election, the partition map and dynamic config in etcd.
//!
//! It owns the node's etcd session: connect with backoff, a lease kept alive every TTL/3
//! (re-used after a reconnect while etcd still holds it, re-granted when lost), the
//! `nodes/<id>` record under that lease (rewritten with `draining: true` by [`drain`] when
//! the node shuts down, and kept so across sessions), the `reach/<id>` report of the
//! peers its links reach (`reach.rs`), one prefix watch that keeps [`ClusterView`]
//! and the node's in-memory partition map current, the load reporter and the election/leader
//! loop (`leader.rs`). When anything in a session fails, the whole session is torn down and
//! re-created, so watches and keepalives never silently stop. It must never be on the
//! request path: commands read the map the watch stored in the node and never wait on etcd;
//! with etcd down, nodes keep routing by the last map they saw.

pub mod balance;
mod isr;
pub mod keys;
pub mod leader;
mod load;
pub mod move_requests;
pub mod moves;
pub mod reach;
pub mod replicas;
mod settings;

pub use settings::{ClusterConfig, Settings};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

use arc_swap::ArcSwap;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp, WatchOptions,
};
use serde::Serialize;
use tokio::sync::{watch, Notify};

use keys::{DynamicConfig, Keys, LeaderRecord, MapRecord, NodeRecord};
use switchyard_core::policy::BalancePlugins;
use switchyard_core::Partitions;
use switchyard_metrics::Metrics;
use switchyard_proto::partition::{Member, Members, PartitionMap};

/// What the cluster changes when etcd changes, implemented by the layer that wires the node
/// together. Every method runs inside the etcd watch loop and must never wait.
pub trait MapHooks: Send + Sync + 'static {
    /// A new map is about to be installed: partitions moving here get their mailbox held
    /// before anything routed by the new map runs.
    fn before_install(&self, new: &PartitionMap);
    /// The watch installed a batch of changes; `before` is the map before it (the same map
    /// when nothing moved).
    fn after_install(&self, before: &PartitionMap);
    /// The dynamic config's default retention limits changed (None: the file's values).
    fn retention_defaults(&self, limits: Option<&keys::RetentionLimits>);
}

/// Everything the cluster's tasks touch besides etcd.
pub struct Context {
    /// What this node is and how it joins.
    pub settings: Settings,
    /// This node's partitions: load reports read their counters; a fatal etcd answer syncs
    /// the store before the process exits.
    pub partitions: Arc<Partitions>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The partition map the request path routes by; only the cluster writes it.
    pub map: watch::Sender<Arc<PartitionMap>>,
    /// Live members, for peer links and error messages; only the cluster writes it.
    pub members: watch::Sender<Arc<Members>>,
    /// Map-change hooks (handover, dynamic policies).
    pub hooks: Arc<dyn MapHooks>,
    /// Runs balancer plugins for the leader.
    pub balancer: Arc<dyn BalancePlugins>,
    /// Turns true when the node shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// The peers this node's links reach now (None without peer links: no `reach/<id>`
    /// report, and the node counts as reaching everyone).
    pub reach: Option<watch::Receiver<Arc<std::collections::BTreeSet<String>>>>,
}

/// Why an etcd session ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An etcd request failed.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// An etcd request took longer than `cluster.etcd_timeout`.
    #[error("etcd request timed out: {0}")]
    Timeout(&'static str),
    /// The lease is gone (expired while etcd or this node was unreachable).
    #[error("lease lost")]
    LeaseLost,
    /// A stream etcd should keep open ended.
    #[error("etcd {0} stream ended")]
    StreamEnded(&'static str),
    /// This node is no longer the leader.
    #[error("deposed: {0}")]
    Deposed(String),
    /// The cluster cannot be joined with this configuration.
    #[error("{0}")]
    Fatal(String),
    /// The node id is taken by another live process.
    #[error("{0}")]
    Conflict(String),
    /// A leader round has no balance decision (no live nodes): it steps down like a
    /// deposed leader.
    #[error("deposed: {0}")]
    NoDecision(#[from] balance::BalanceError),
}

/// Runs an etcd request with the session's deadline.
pub(crate) async fn timed<T>(
    what: &'static str,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Error::Timeout(what)),
    }
}

/// One member's load report, summed over its partitions, as `/api/v1/cluster` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeLoad {
    /// Client connections.
    pub connections: u64,
    /// Publishes per second over its partitions.
    pub msg_rate: f64,
    /// Bytes stored in its partitions.
    pub bytes: u64,
}

/// What this node knows about the cluster, as `/api/v1/cluster` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterView {
    /// True while the etcd session is up.
    pub etcd_connected: bool,
    /// True while this node leads.
    pub is_leader: bool,
    /// Live members, by id.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// The current leader record.
    pub leader: Option<LeaderRecord>,
    /// Every member's last reachability report, by id.
    pub reach: BTreeMap<String, keys::ReachRecord>,
    /// The last map seen.
    pub map: Option<MapRecord>,
    /// The dynamic config in force (last valid value of the `config` key).
    pub config: DynamicConfig,
    /// Why the last session ended, if it did.
    pub last_error: Option<String>,
}

/// Lease freshness by this node's own clock: a leader stops acting once a whole TTL has
/// passed since the last keepalive etcd confirmed (counted from when it was sent).
#[derive(Clone)]
pub struct LeaseClock {
    ttl: Duration,
    renewed: Arc<Mutex<Instant>>,
}

impl LeaseClock {
    fn new(ttl: Duration, at: Instant) -> Self {
        Self { ttl, renewed: Arc::new(Mutex::new(at)) }
    }

    fn renewed(&self, sent: Instant) {
        *self.renewed.lock().expect("lease clock") = sent;
    }

    /// True while the lease is certainly still alive in etcd (with a margin of a tenth of
    /// the TTL for clock-rate differences).
    pub fn fresh(&self) -> bool {
        self.renewed.lock().expect("lease clock").elapsed() < self.ttl - self.ttl / 10
    }
}

/// The cluster side of a node, shared by its tasks and the HTTP API.
pub struct State {
    /// `[cluster]` settings.
    pub config: ClusterConfig,
    /// Key names.
    pub keys: Keys,
    node_id: String,
    partitions: u32,
    view: ArcSwap<ClusterView>,
    /// Every member's last load report, as this node last read it (for the API).
    loads: ArcSwap<BTreeMap<String, NodeLoad>>,
    dynamic: watch::Sender<Arc<DynamicConfig>>,
    /// Signalled when the member set changes (the leader runs a round at once).
    membership: Notify,
    /// Set by the leader while a planned move waits for its new replicas to be in sync:
    /// then every map change (an ISR grew) runs a round at once.
    pending_moves: AtomicBool,
    /// Term of the leader that wrote the map in use.
    term: std::sync::atomic::AtomicI64,
    /// Set by [`drain`]; every registration from then on writes `draining: true`.
    draining: AtomicBool,
    /// The registration of the session that is up (None between sessions). Held while
    /// `nodes/<id>` is written, so a registration and [`drain`] never interleave.
    registration: tokio::sync::Mutex<Option<Registration>>,
    /// Counts registrations, so [`drain`] can wait for the next session.
    registered: watch::Sender<u64>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What a session registered `nodes/<id>` with.
struct Registration {
    client: Client,
    lease: i64,
    record: NodeRecord,
}

impl State {
    /// The state of a node configured with `config` (cluster mode).
    pub fn new(settings: &Settings) -> Arc<Self> {
        Arc::new(Self {
            config: settings.config.clone(),
            keys: Keys::new(&settings.config.name),
            node_id: settings.node_id.clone(),
            partitions: settings.partitions,
            view: ArcSwap::from_pointee(ClusterView::default()),
            loads: ArcSwap::from_pointee(BTreeMap::new()),
            dynamic: watch::Sender::new(Arc::new(DynamicConfig::default())),
            membership: Notify::new(),
            pending_moves: AtomicBool::new(false),
            term: std::sync::atomic::AtomicI64::new(0),
            draining: AtomicBool::new(false),
            registration: tokio::sync::Mutex::new(None),
            registered: watch::Sender::new(0),
            task: Mutex::new(None),
        })
    }

    /// A snapshot of what this node knows.
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.load_full()
    }

    /// Every member's last load report (read after each of this node's own reports).
    pub fn loads(&self) -> Arc<BTreeMap<String, NodeLoad>> {
        self.loads.load_full()
    }

    /// The dynamic config in force.
    pub fn dynamic(&self) -> Arc<DynamicConfig> {
        self.dynamic.borrow().clone()
    }

    fn update(&self, f: impl Fn(&mut ClusterView)) {
        self.view.rcu(|v| {
            let mut v = ClusterView::clone(v);
            f(&mut v);
            v
        });
    }

    /// True when, by the reports this node last saw, most other members cannot reach it
    /// (the majority rule of [`reach::unreachable`], undamped). A partition leader cut off
    /// like that does not shrink its ISR: its followers are not behind, it is.
    pub fn cut_off(&self) -> bool {
        let view = self.view.load();
        let live: std::collections::BTreeSet<&str> = view.nodes.keys().map(String::as_str).collect();
        reach::unreachable(&live, &view.reach).contains(&self.node_id)
    }

    /// True once [`drain`] was called.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Waits (bounded) for the session task to finish after shutdown began: it revokes the
    /// lease, so the leader reassigns this node's partitions at once.
    pub async fn stopped(&self, limit: Duration) {
        let task = self.task.lock().expect("cluster task").take();
        if let Some(t) = task {
            if tokio::time::timeout(limit, t).await.is_err() {
                tracing::warn!("cluster session did not stop in time");
            }
        }
    }
}

/// Reads the map once before the node listens: a node configured with another partition
/// count than the cluster's gets [`Error::Fatal`] (the caller exits with status 2). An
/// unreachable etcd is not an error here (the session retries and repeats the check).
pub async fn preflight(settings: &Settings) -> Result<(), Error> {
    let c = &settings.config;
    let check = async {
        let mut client = connect(c).await?;
        let resp = timed("get partition-map", c.etcd_timeout, client.get(Keys::new(&c.name).map(), None)).await?;
        check_partitions(resp.kvs().first(), settings.partitions)
    };
    match check.await {
        Err(Error::Fatal(msg)) => Err(Error::Fatal(msg)),
        Err(e) => {
            tracing::warn!(error = %e, "etcd not reachable at startup; serving nothing until it is");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

fn check_partitions(map: Option<&KeyValue>, partitions: u32) -> Result<(), Error> {
    let Some(kv) = map else { return Ok(()) };
    match serde_json::from_slice::<MapRecord>(kv.value()) {
        Ok(m) if m.partitions != partitions => Err(Error::Fatal(format!(
            "this node is configured with partitions = {partitions}, but the cluster was created with {}; \
             the partition count is fixed for the life of a cluster (set `partitions = {}`)",
            m.partitions, m.partitions
        ))),
        _ => Ok(()),
    }
}

async fn connect(c: &ClusterConfig) -> Result<Client, Error> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(c.etcd_timeout)
        .with_keep_alive(c.lease_ttl / 3, c.etcd_timeout)
        .with_keep_alive_while_idle(true);
    timed("connect", c.etcd_timeout, Client::connect(&c.etcd, Some(opts))).await
}

/// Starts the session supervisor of a cluster-mode node.
pub fn spawn(state: &Arc<State>, node: Context) {
    let node = Arc::new(node);
    if let Some(changes) = node.partitions.replication.take_isr_changes() {
        tokio::spawn(isr::run(node.clone(), state.clone(), changes));
    }
    let task = tokio::spawn(supervise(node, state.clone()));
    *state.task.lock().expect("cluster task") = Some(task);
}

async fn supervise(node: Arc<Context>, state: Arc<State>) {
    let mut lease: Option<i64> = None;
    let mut backoff = Duration::from_millis(100);
    let mut shutdown = node.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            // Shut down between sessions: still leave at once if etcd answers.
            if let Some(id) = lease {
                if let Ok(mut client) = connect(&state.config).await {
                    let _ = timed("lease revoke", state.config.etcd_timeout, client.lease_revoke(id)).await;
                }
            }
            return;
        }
        let started = Instant::now();
        let result = session(&node, &state, &mut lease).await;
        *state.registration.lock().await = None;
        node.metrics.cluster_etcd_up.set(0);
        node.metrics.cluster_is_leader.set(0);
        let error = match result {
            Ok(()) => return,
            Err(Error::Fatal(msg)) => {
                tracing::error!("{msg}");
                eprintln!("switchyard: {msg}");
                let _ = node.partitions.store.close();
                std::process::exit(2);
            }
            Err(e) => e,
        };
        if matches!(error, Error::LeaseLost) {
            lease = None;
        }
        tracing::warn!(error = %error, retry_in = ?backoff, "etcd session ended; keeping the last map");
        let message = error.to_string();
        state.update(|v| {
            v.etcd_connected = false;
            v.is_leader = false;
            v.last_error = Some(message.clone());
        });
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One etcd session: lease, registration, watch, load reports and the election, until one
/// of them fails (`Err`) or the node shuts down (`Ok`, after revoking the lease).
async fn session(node: &Arc<Context>, state: &Arc<State>, lease_slot: &mut Option<i64>) -> Result<(), Error> {
    let c = &state.config;
    let t = c.etcd_timeout;
    let mut client = connect(c).await?;
    node.metrics.cluster_sessions.inc();
    let resp = timed("get partition-map", t, client.get(state.keys.map(), None)).await?;
    check_partitions(resp.kvs().first(), state.partitions)?;

    // The lease: keep the old one if etcd still has it (a short outage), else a new one.
    let ttl_secs = c.lease_ttl.as_secs().max(1) as i64;
    let sent = Instant::now();
    let reused = match *lease_slot {
        Some(id) => match timed("lease keepalive", t, client.lease_keep_alive(id)).await {
            Ok(_) => Some(id),
            Err(Error::Etcd(etcd_client::Error::LeaseKeepAliveError(_))) => None,
            Err(e) => return Err(e),
        },
        None => None,
    };
    let lease = match reused {
        Some(id) => id,
        None => {
            let id = timed("lease grant", t, client.lease_grant(ttl_secs, None)).await?.id();
            node.metrics.cluster_lease_grants.inc();
            tracing::info!(lease = format!("{id:x}"), ttl = ttl_secs, "lease granted");
            id
        }
    };
    *lease_slot = Some(lease);
    // The clock counts the TTL etcd enforces (whole seconds), not the configured one.
    let ttl = Duration::from_secs(ttl_secs as u64);
    let clock = LeaseClock::new(ttl, sent);

    let record = NodeRecord {
        id: state.node_id.clone(),
        url: node.settings.advertise_url.clone(),
        peer_url: node.settings.advertise_url.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: keys::timestamp(node.settings.started_at),
        partitions: state.partitions,
        draining: false,
    };
    register(&mut client, state, record, lease).await?;

    // Current state, then every change after it.
    let all = timed("list", t, client.get(state.keys.root(), Some(GetOptions::new().with_prefix()))).await?;
    let revision = all.header().map_or(0, |h| h.revision());
    let map_before = node.map.borrow().clone();
    let mut fresh = ClusterView { etcd_connected: true, ..ClusterView::default() };
    let mut dynamic = None;
    for kv in all.kvs() {
        apply(node, state, &mut fresh, &mut dynamic, EventType::Put, kv)?;
    }
    // No `config` key: file values. A key that did not validate: keep the last good value.
    let config_present = all.kvs().iter().any(|kv| kv.key() == state.keys.config().as_bytes());
    let dynamic_now = match dynamic {
        Some(d) => d,
        None if config_present => DynamicConfig::clone(&state.dynamic()),
        None => DynamicConfig::default(),
    };
    fresh.config = dynamic_now.clone();
    publish_view(node, state, fresh);
    node.hooks.after_install(&map_before);
    set_dynamic(node, state, dynamic_now);
    state.membership.notify_one();
    let opts = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let watch = timed("watch", t, client.watch(state.keys.root(), Some(opts))).await?;
    node.metrics.cluster_etcd_up.set(1);
    tracing::info!(cluster = %c.name, node = %state.node_id, revision, "etcd session up");

    let mut shutdown = node.shutdown.clone();
    // Keepalive runs as its own task: a leader round that blocks its thread (a slow
    // balancer plugin) must not starve the lease.
    let mut keeper = tokio::spawn(keepalive(client.clone(), lease, clock.clone(), ttl, t));
    let _abort = AbortOnDrop(keeper.abort_handle());
    tokio::select! {
        r = &mut keeper => r.unwrap_or(Err(Error::StreamEnded("keepalive task"))),
        r = watch_loop(node, state, watch) => r,
        r = load::report(node, state, client.clone(), lease) => r,
        r = reach::report(node, state, client.clone(), lease) => r,
        r = leader::run(node, state, client.clone(), lease, clock) => r,
        _ = stopping(&mut shutdown) => {
            // Revoking deletes the node, election, leader and load keys at once.
            match timed("lease revoke", t, client.lease_revoke(lease)).await {
                Ok(_) => tracing::info!("lease revoked; left the cluster"),
                Err(e) => tracing::warn!(error = %e, "could not revoke the lease; it expires by itself"),
            }
            Ok(())
        }
    }
}

/// Aborts a task when the session that spawned it ends.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes `nodes/<id>` under `lease` (draining if [`drain`] was called), unless another
/// live process holds that id, and makes it the registration [`drain`] rewrites.
async fn register(client: &mut Client, state: &State, mut record: NodeRecord, lease: i64) -> Result<(), Error> {
    let mut slot = state.registration.lock().await;
    // Read under the lock: a `drain` either came before (and is seen here) or comes after
    // (and rewrites what this writes).
    record.draining = state.draining();
    write_registration(client, state, &record, lease).await?;
    *slot = Some(Registration { client: client.clone(), lease, record });
    drop(slot);
    state.registered.send_modify(|n| *n += 1);
    Ok(())
}

/// Marks this node draining in etcd (rewrites `nodes/<id>` under the current lease with
/// `draining = true`) so the leader moves its partitions away. Returns once etcd has the
/// record, or an error after `etcd_timeout`.
///
/// Every later registration (after an etcd session restart) writes `draining: true` too.
/// Without a session up, it waits (within the same bound) for the next one to register.
/// Standalone nodes have nothing to drain: `Ok` at once.
pub async fn drain(state: &Arc<State>, metrics: &Metrics) -> Result<(), Error> {
    let state = state.clone();
    state.draining.store(true, Ordering::SeqCst);
    metrics.cluster_draining.set(1);
    let t = state.config.etcd_timeout;
    let mut registered = state.registered.subscribe();
    let mut last: Option<Error> = None;
    let attempt = async {
        loop {
            registered.borrow_and_update();
            {
                let mut slot = state.registration.lock().await;
                if let Some(reg) = slot.as_mut() {
                    if reg.record.draining {
                        return Ok(());
                    }
                    let record = NodeRecord { draining: true, ..reg.record.clone() };
                    match write_registration(&mut reg.client, &state, &record, reg.lease).await {
                        Ok(()) => {
                            reg.record = record;
                            return Ok(());
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not mark this node draining; retrying with the next session");
                            last = Some(e);
                        }
                    }
                }
            }
            // No session, or this one failed: the next registration writes `draining`.
            if registered.changed().await.is_err() {
                return Err(Error::StreamEnded("registrations"));
            }
        }
    };
    match tokio::time::timeout(t, attempt).await {
        Ok(Ok(())) => {
            tracing::info!(node = %state.node_id, "node record marked draining");
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(last.unwrap_or(Error::Timeout("mark node draining"))),
    }
}

/// Writes `record` as `nodes/<id>` under `lease`, unless another live process holds it.
async fn write_registration(client: &mut Client, state: &State, record: &NodeRecord, lease: i64) -> Result<(), Error> {
    let key = state.keys.node(&state.node_id);
    let json = serde_json::to_string_pretty(record).expect("node record serializes");
    let put = || TxnOp::put(key.clone(), json.clone(), Some(PutOptions::new().with_lease(lease)));
    let t = state.config.etcd_timeout;
    // Free, or already ours (a re-used lease): write it.
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([put()])
        .or_else([TxnOp::get(key.clone(), None)]);
    let resp = timed("register", t, client.txn(txn)).await?;
    if resp.succeeded() {
        return Ok(());
    }
    let holder = resp.op_responses().into_iter().find_map(|r| match r {
        etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.lease()),
        _ => None,
    });
    match holder {
        Some(l) if l == lease => {
            let txn = Txn::new().when([Compare::lease(key.clone(), CompareOp::Equal, lease)]).and_then([put()]);
            if timed("register", t, client.txn(txn)).await?.succeeded() {
                return Ok(());
            }
            Err(Error::Conflict(format!("node id {} changed hands while registering", state.node_id)))
        }
        Some(l) => Err(Error::Conflict(format!(
            "node id {} is registered by another live process (lease {l:x}); waiting for it to leave or expire",
            state.node_id
        ))),
        None => Err(Error::Conflict(format!("node id {} vanished while registering; retrying", state.node_id))),
    }
}

async fn keepalive(
    mut client: Client,
    lease: i64,
    clock: LeaseClock,
    ttl: Duration,
    limit: Duration,
) -> Result<(), Error> {
    let (mut keeper, mut stream) = timed("lease keepalive", limit, client.lease_keep_alive(lease)).await?;
    let period = ttl / 3;
    loop {
        tokio::time::sleep(period).await;
        let sent = Instant::now();
        timed("lease keepalive", limit, keeper.keep_alive()).await?;
        let resp = timed("lease keepalive", limit.min(period), stream.message())
            .await?
            .ok_or(Error::StreamEnded("keepalive"))?;
        if resp.ttl() <= 0 {
            return Err(Error::LeaseLost);
        }
        clock.renewed(sent);
    }
}

async fn watch_loop(
    node: &Arc<Context>,
    state: &Arc<State>,
    mut stream: etcd_client::WatchStream,
) -> Result<(), Error> {
    loop {
        let resp = stream.message().await?.ok_or(Error::StreamEnded("watch"))?;
        if resp.canceled() {
            // Compacted past our revision, or etcd dropped the watch: list again.
            return Err(Error::StreamEnded("watch (canceled)"));
        }
        let mut view = ClusterView::clone(&state.view());
        let mut dynamic = None;
        let members = view.nodes.len();
        let map_before = node.map.borrow().clone();
        for event in resp.events() {
            if let Some(kv) = event.kv() {
                apply(node, state, &mut view, &mut dynamic, event.event_type(), kv)?;
            }
        }
        // Any event under `nodes/`: a join or leave, and also a record rewritten in place (a
        // member that turned draining), so the leader re-balances at once.
        // A changed reachability report too: the leader may have a node to cut off or restore.
        let (nodes_prefix, reach_prefix) = (state.keys.nodes(), state.keys.reaches());
        let membership_changed = resp.events().iter().any(|e| {
            e.kv().is_some_and(|kv| {
                kv.key().starts_with(nodes_prefix.as_bytes()) || kv.key().starts_with(reach_prefix.as_bytes())
            })
        });
        // A map change while a move waits on its followers: maybe the ISR it waits for.
        let map_changed =
            resp.events().iter().any(|e| e.kv().is_some_and(|kv| kv.key() == state.keys.map().as_bytes()));
        let membership_changed = membership_changed || (map_changed && state.pending_moves.load(Ordering::Relaxed));
        if let Some(d) = dynamic.clone() {
            view.config = d;
        }
        publish_view(node, state, view);
        node.hooks.after_install(&map_before);
        if let Some(d) = dynamic {
            set_dynamic(node, state, d);
        }
        if membership_changed {
            tracing::debug!(before = members, "membership changed");
            state.membership.notify_one();
        }
    }
}

/// Applies one key to `view` (and the node's map). A `config` change lands in `dynamic`.
fn apply(
    node: &Arc<Context>,
    state: &State,
    view: &mut ClusterView,
    dynamic: &mut Option<DynamicConfig>,
    kind: EventType,
    kv: &KeyValue,
) -> Result<(), Error> {
    let keys = &state.keys;
    let Ok(key) = std::str::from_utf8(kv.key()) else { return Ok(()) };
    let put = kind == EventType::Put;
    if let Some(id) = key.strip_prefix(&keys.nodes()) {
        if !put {
            tracing::info!(node = id, "member left");
            view.nodes.remove(id);
            return Ok(());
        }
        match serde_json::from_slice::<NodeRecord>(kv.value()) {
            Ok(rec) => {
                if !view.nodes.contains_key(id) {
                    tracing::info!(node = id, url = %rec.url, "member joined");
                }
                view.nodes.insert(id.to_string(), rec);
            }
            Err(e) => tracing::warn!(key, error = %e, "ignoring an unreadable node record"),
        }
    } else if let Some(id) = key.strip_prefix(&keys.reaches()) {
        if !put {
            view.reach.remove(id);
            return Ok(());
        }
        match serde_json::from_slice::<keys::ReachRecord>(kv.value()) {
            Ok(rec) => {
                view.reach.insert(id.to_string(), rec);
            }
            Err(e) => tracing::warn!(key, error = %e, "ignoring an unreadable reach record"),
        }
    } else if key == keys.leader() {
        view.leader = if put { serde_json::from_slice(kv.value()).ok() } else { None };
    } else if key == keys.map() {
        if !put {
            tracing::warn!("partition-map deleted; routing by the last map until a leader writes one");
            return Ok(());
        }
        check_partitions(Some(kv), state.partitions)?;
        match serde_json::from_slice::<MapRecord>(kv.value()) {
            Ok(m) if m.owners.len() == m.partitions as usize => {
                if install_map(node, state, &m) {
                    view.map = Some(m);
                }
            }
            Ok(m) => tracing::error!(epoch = m.epoch, owners = m.owners.len(), "ignoring a malformed partition map"),
            Err(e) => tracing::error!(error = %e, "ignoring an unreadable partition map"),
        }
    } else if key == keys.config() {
        if !put {
            tracing::info!("dynamic config deleted; file values apply");
            *dynamic = Some(DynamicConfig::default());
            return Ok(());
        }
        match DynamicConfig::parse(kv.value()) {
            Ok(c) => {
                tracing::info!(config = %String::from_utf8_lossy(kv.value()), "dynamic config applied");
                *dynamic = Some(c);
            }
            Err(e) => {
                node.metrics.cluster_config_errors.inc();
                tracing::warn!(error = %e, "invalid dynamic config ignored; keeping the last good value");
            }
        }
    }
    Ok(())
}

/// Makes `m` the map commands are routed by, and returns true. A map older than the one
/// in use is refused unless a newer leader wrote it (a restored or hand-edited etcd).
/// Stores a new view and, when membership changed, the member list the peer layer reads.
fn publish_view(node: &Context, state: &State, view: ClusterView) {
    let members: Members = view
        .nodes
        .iter()
        .map(|(id, n)| (id.clone(), Member { url: n.url.clone(), peer_url: n.peer_url.clone(), draining: n.draining }))
        .collect();
    node.members.send_if_modified(|m| {
        let changed = **m != members;
        if changed {
            *m = Arc::new(members);
        }
        changed
    });
    state.view.store(Arc::new(view));
}

fn install_map(node: &Arc<Context>, state: &State, m: &MapRecord) -> bool {
    let current = node.map.borrow().clone();
    let term = state.term.load(std::sync::atomic::Ordering::Relaxed);
    if m.epoch < current.epoch && m.term <= term {
        tracing::warn!(epoch = m.epoch, term = m.term, current = current.epoch, "refusing an older partition map");
        return false;
    }
    state.term.store(m.term, std::sync::atomic::Ordering::Relaxed);
    // Entries of partitions that do not exist (a hand-edited map) are left out.
    let moved: BTreeMap<_, _> =
        m.moved.iter().filter(|(p, _)| **p < m.partitions).map(|(p, v)| (*p, v.clone())).collect();
    let owned = m.owners.iter().filter(|o| **o == state.node_id).count();
    // Replication fields of another length than the owners (a hand-edited map) are ignored.
    let n = m.owners.len();
    let fits = m.replicas.len() == n && m.isr.len() == n && m.leader_epochs.len() == n;
    let absent = m.replicas.is_empty() && m.isr.is_empty() && m.leader_epochs.is_empty();
    if !fits && !absent {
        tracing::error!(epoch = m.epoch, "partition map with malformed replication fields; replication off for it");
    }
    let map = PartitionMap {
        epoch: m.epoch,
        owners: m.owners.clone(),
        moved,
        replicas: if fits { m.replicas.clone() } else { Vec::new() },
        isr: if fits { m.isr.clone() } else { Vec::new() },
        leader_epochs: if fits { m.leader_epochs.clone() } else { Vec::new() },
    };
    if current.epoch == map.epoch
        && current.owners == map.owners
        && current.moved == map.moved
        && current.isr == map.isr
        && current.replicas == map.replicas
    {
        return true;
    }
    // Partitions moving here wait for their state before anything routed by this map runs.
    node.hooks.before_install(&map);
    node.map.send_replace(Arc::new(map));
    node.metrics.cluster_map_epoch.set(m.epoch as i64);
    node.metrics.cluster_owned_partitions.set(owned as i64);
    tracing::info!(epoch = m.epoch, leader = %m.leader, owned, "partition map installed");
    true
}

fn set_dynamic(node: &Context, state: &State, d: DynamicConfig) {
    if *state.dynamic() == d {
        return;
    }
    node.hooks.retention_defaults(d.retention.as_ref());
    state.dynamic.send_replace(Arc::new(d));
}

async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

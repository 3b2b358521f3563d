//! One running node as the server layer wires it together.
//!
//! It owns startup in dependency order (store, partitions, plugin host, router, cluster,
//! maintenance), the shutdown signal every task watches, the client connection slots
//! (`limits.max_connections`), and the [`Hooks`] through which
//! the cluster's map and dynamic-config changes reach the router and the policies. It must
//! never route a message itself (the router does) nor talk to etcd (the cluster does).

use std::sync::Arc;

use switchyard_access::rules::Rules;
use switchyard_access::{Access, Live};
use switchyard_cluster::keys::RetentionLimits;
use switchyard_core::policy::Policies;
use switchyard_core::{maintenance, partitions, Partitions};
use switchyard_metrics::Metrics;
use switchyard_peer::Router;
use switchyard_plugin_host::host::{CallLimits, Host};
use switchyard_plugin_host::registry::{QuarantineRules, Registry};
use switchyard_proto::partition::{Members, PartitionMap};
use switchyard_store::{Store, StoreError};
use tokio::sync::{watch, Semaphore};

use crate::config::Config;

/// A running node: what the HTTP server and the sessions share.
pub(crate) struct Node {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Every client operation goes through it.
    pub router: Arc<Router>,
    /// Tokens, per-user sessions, the API key and the live (reloadable) limits.
    pub access: Arc<Access>,
    /// The policy plugins of `plugins_dir`.
    pub plugins: Arc<Registry>,
    /// Cluster mode state (None in standalone mode).
    pub cluster: Option<Arc<switchyard_cluster::State>>,
    /// Flips to true when the node starts shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// One permit per client WebSocket connection, `limits.max_connections` in all. A
    /// connection takes its permit before its upgrade is answered and holds it until it
    /// ends, so no number of simultaneous upgrades gets past the cap.
    /// (`metrics.connections` counts the same connections, for metrics only.)
    pub connection_slots: Arc<Semaphore>,
    /// The bound on catch-ups in progress (`limits.recovery_concurrency`).
    pub recoveries: crate::recovery::Admission,
    /// Begins every client id this process hands out: the node id and a random tag of this
    /// run, so ids are unique across the cluster and across restarts.
    pub client_prefix: String,
    shutdown_tx: watch::Sender<bool>,
}

/// Builds the wasm host and loads the plugin folder (before any policy round runs).
fn start_plugins(config: &Config, metrics: Arc<Metrics>) -> Result<Arc<Registry>, StoreError> {
    let pc = &config.plugins;
    std::fs::create_dir_all(&config.plugins_dir)
        .map_err(|source| StoreError::DataDir { path: config.plugins_dir.clone(), source })?;
    let host = Host::new(Some(config.data_dir.join("plugin-cache"))).map_err(|e| StoreError::DataDir {
        path: config.plugins_dir.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let limits = CallLimits { timeout: pc.call_timeout, max_memory: pc.memory_limit_bytes };
    let rules = QuarantineRules {
        after: pc.quarantine_after,
        min: pc.quarantine_min,
        max: pc.quarantine_max,
        healthy_reset: pc.healthy_reset,
    };
    let plugins = Registry::new(host, config.plugins_dir.clone(), limits, rules, metrics);
    plugins.rescan();
    Ok(plugins)
}

/// The access layer's settings, from the config file.
pub(crate) fn live_settings(config: &Config) -> Live {
    Live { sessions: config.sessions.clone(), rate_limit: config.rate_limit.clone() }
}

fn rules(config: &Config) -> Rules {
    Rules {
        default: config.defaults.rule,
        namespaces: config.namespaces.iter().filter_map(|(n, ns)| Some((n.clone(), ns.rule?))).collect(),
    }
}

impl Node {
    /// Opens the store, recovers every channel and starts the owners, the plugin host, the
    /// router, maintenance and (in cluster mode) the etcd session.
    pub(crate) fn start(
        config: Config,
        peer_tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    ) -> Result<Arc<Self>, StoreError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|source| StoreError::DataDir { path: config.data_dir.clone(), source })?;
        let read_threads = config.store_read_threads.unwrap_or_else(switchyard_store::default_read_threads);
        let store = Store::open_with_readers(&config.data_dir, config.fsync, metrics.clone(), read_threads)?;
        tracing::info!(data_dir = %config.data_dir.display(), "store opened");
        store.guard_space(config.store);
        // Writes that reach a sealed partition are forwarded to its new owner (cluster mode
        // with peer links only).
        let secret = config.cluster.secret.clone().filter(|_| config.cluster.enabled());
        let settings = partitions::Settings {
            partitions: config.partitions,
            idempotency_window: config.publish.idempotency_window,
            forward_sealed: secret.is_some(),
            max_reply_bytes: config.limits.max_reply_bytes,
            idempotency_max_keys: config.publish.idempotency_max_keys,
            idempotency_max_bytes: config.publish.idempotency_max_bytes,
            replica_lag_timeout: config.cluster.replica_lag_timeout,
            presence: Arc::new(crate::policies::PresenceConfig(config.clone())),
        };
        let (partitions, sealed_writes) = Partitions::start(store, metrics.clone(), settings)?;
        if config.cluster.enabled() && secret.is_some() {
            partitions.replication.set_wanted(config.cluster.replicas as usize);
        }
        let plugins = start_plugins(&config, metrics.clone())?;
        let (shutdown_tx, shutdown) = watch::channel(false);
        // In cluster mode nothing is owned until the first map arrives from etcd.
        let map = match config.cluster.enabled() {
            true => PartitionMap::unassigned(config.partitions),
            false => PartitionMap::standalone(&config.node_id, config.partitions),
        };
        let (map_tx, map_rx) = watch::channel(Arc::new(map));
        let (members_tx, members_rx) = watch::channel(Arc::new(Members::new()));
        let router = Router::new(
            switchyard_peer::Settings {
                node_id: config.node_id.clone(),
                secret,
                peer_tls,
                allow_plaintext_peers: config.cluster.allow_plaintext_peers,
                // Peer links leave from the address this node listens on, when it is a
                // specific one (operators filter and trace peer traffic by it).
                bind: Some(config.listen.ip()).filter(|ip| !ip.is_unspecified()),
            },
            partitions.clone(),
            map_rx,
            members_rx,
            shutdown.clone(),
        );
        if let Some(writes) = sealed_writes {
            router.forward_sealed(writes);
        }
        let (policies_tx, policies_rx) = watch::channel(Arc::new(crate::policies::from_config(&config, &plugins)));
        let access = Arc::new(Access::new(&config.auth, rules(&config), live_settings(&config)));
        plugins.watch(config.plugins.reload_debounce, shutdown.clone());
        let timing = maintenance::Settings {
            interval: config.maintenance.interval,
            idle_recheck: config.maintenance.idle_recheck,
        };
        maintenance::spawn(&partitions, policies_rx, timing, shutdown.clone());
        let cluster = config.cluster.enabled().then(|| {
            let settings = cluster_settings(&config);
            let state = switchyard_cluster::State::new(&settings);
            let hooks = Hooks {
                router: router.clone(),
                policies: policies_tx,
                config: config.clone(),
                plugins: plugins.clone(),
            };
            let context = switchyard_cluster::Context {
                settings,
                partitions: partitions.clone(),
                metrics: metrics.clone(),
                map: map_tx,
                members: members_tx,
                hooks: Arc::new(hooks),
                balancer: plugins.clone(),
                shutdown: shutdown.clone(),
                reach: router.reachable(),
            };
            switchyard_cluster::spawn(&state, context);
            state
        });
        let connection_slots = Arc::new(Semaphore::new(config.limits.max_connections));
        let recoveries = crate::recovery::Admission::new(config.limits.recovery_concurrency);
        let client_prefix = format!("{}-{}", config.node_id, switchyard_core::owner::new_epoch());
        Ok(Arc::new(Self {
            config,
            metrics,
            router,
            access,
            plugins,
            cluster,
            shutdown,
            shutdown_tx,
            connection_slots,
            recoveries,
            client_prefix,
        }))
    }

    /// Tells the listener and every session to stop.
    pub(crate) fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
    }

    /// Called after sessions are gone: leaves the cluster, stops the owners (after their
    /// queued work) and syncs the store.
    pub(crate) async fn close(&self) {
        if let Some(cluster) = &self.cluster {
            cluster.stopped(self.config.cluster.etcd_timeout * 2).await;
        }
        self.router.partitions().close().await;
    }
}

/// What the cluster needs to know about this node.
pub(crate) fn cluster_settings(config: &Config) -> switchyard_cluster::Settings {
    let mut cluster = config.cluster.clone();
    if cluster.replicas > 1 && cluster.secret.is_none() {
        // Replication runs over the peer links, which need the secret.
        tracing::warn!(
            replicas = cluster.replicas,
            "no cluster.secret, so no peer links: replication is off (replicas = 1)"
        );
        cluster.replicas = 1;
    }
    switchyard_cluster::Settings {
        config: cluster,
        node_id: config.node_id.clone(),
        partitions: config.partitions,
        advertise_url: config.advertise_url(),
        balancer: config.balancer.clone(),
        started_at: std::time::SystemTime::now(),
    }
}

/// The cluster's map and dynamic-config changes, applied to the router and the policies.
struct Hooks {
    /// Seals and adopts partitions as maps move them.
    router: Arc<Router>,
    /// Replaced when the default retention limits change.
    policies: watch::Sender<Arc<Policies>>,
    /// The file's values, which dynamic config overrides.
    config: Arc<Config>,
    /// Plugins the rebuilt bindings call.
    plugins: Arc<Registry>,
}

impl switchyard_cluster::MapHooks for Hooks {
    fn before_install(&self, new: &PartitionMap) {
        self.router.before_install(new);
    }

    fn after_install(&self, before: &PartitionMap) {
        self.router.after_install(before);
    }

    fn retention_defaults(&self, limits: Option<&RetentionLimits>) {
        let mut config = Config::clone(&self.config);
        if let Some(l) = limits {
            if let Some(v) = l.history_size {
                config.defaults.history_size = v;
            }
            if let Some(v) = l.history_ttl {
                config.defaults.history_ttl = v;
            }
            if let Some(v) = l.history_bytes {
                config.defaults.history_bytes = v;
            }
        }
        self.policies.send_replace(Arc::new(crate::policies::from_config(&config, &self.plugins)));
    }
}

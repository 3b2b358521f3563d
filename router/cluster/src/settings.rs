//! The cluster's settings: the `[cluster]` section of the config file and what else a node
//! needs to join (its id, partition count, advertised URL).
//!
//! It owns the section's serde shape and defaults; the server layer's config loader reads,
//! merges and validates it. It must never read files or the environment itself.

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use switchyard_core::policy::PluginBinding;

/// Cluster mode: membership, election and the partition map in etcd.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// etcd endpoints, e.g. `["http://127.0.0.1:2379"]`. Empty (the default) = standalone.
    pub etcd: Vec<String>,
    /// Cluster name: every key lives under `/switchyard/<name>/`. Default `default`.
    pub name: String,
    /// The URL other nodes and clients reach this node at. Default `http://<listen>`.
    pub advertise: Option<String>,
    /// TTL of the node's lease; keepalive runs every third of it. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often the leader runs a coordination round (the `config` key overrides it).
    /// Default 5 s.
    #[serde(with = "humantime_serde")]
    pub coordination_interval: Duration,
    /// Most partitions with a live owner that one round may move (the `config` key
    /// overrides it). Default 64.
    pub max_moves: u32,
    /// How often the node writes its `load/<id>` report. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub load_interval: Duration,
    /// Deadline of one etcd request. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub etcd_timeout: Duration,
    /// Shared secret of the peer links (at least 16 characters). Unset: no peer links, and
    /// commands for channels owned elsewhere get `unavailable` naming the owner.
    pub secret: Option<String>,
    /// A file holding the secret (relative to the config file's folder), instead of
    /// `secret`; the environment variable `SWITCHYARD_CLUSTER_SECRET` overrides both.
    pub secret_file: Option<std::path::PathBuf>,
    /// Copies of each partition, on distinct nodes (the leader included). Default 2;
    /// 1 turns replication off. Fewer live nodes than this: partitions run
    /// under-replicated (the `switchyard_under_replicated_partitions` gauge says so).
    pub replicas: u32,
    /// How long an in-sync follower may stay behind before its leader removes it from
    /// the ISR (acknowledgements wait for it until then). Default 2 s.
    #[serde(with = "humantime_serde")]
    pub replica_lag_timeout: Duration,
    /// How long most members must report this node's peer links down before the leader
    /// moves leadership of its partitions to in-sync followers. Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub unreachable_after: Duration,
    /// How long a node cut off that way must be reachable again before it may lead
    /// partitions again. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub reachable_after: Duration,
    /// When a partition's leader dies with no live in-sync follower: false (the default)
    /// keeps the partition unavailable until an in-sync replica returns; true gives it to
    /// another node at once, under new channel epochs (acknowledged messages the other
    /// nodes lacked are lost, and clients see `recovered: false`).
    pub unclean_failover: bool,
    /// PEM file of the CA (or self-signed certificates) that peers' TLS certificates are
    /// verified against, for peers whose URL is `https://` (relative to the config file's
    /// folder).
    pub peer_ca_file: Option<std::path::PathBuf>,
    /// Whether the cluster secret may cross a plaintext (`http://`) peer link. Default true
    /// (development); set false in production with `[tls]` and `https://` peer URLs.
    pub allow_plaintext_peers: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            etcd: Vec::new(),
            name: "default".into(),
            advertise: None,
            lease_ttl: Duration::from_secs(2),
            coordination_interval: Duration::from_secs(5),
            max_moves: 64,
            load_interval: Duration::from_secs(2),
            etcd_timeout: Duration::from_secs(2),
            secret: None,
            secret_file: None,
            replicas: 2,
            replica_lag_timeout: Duration::from_secs(2),
            unreachable_after: Duration::from_millis(500),
            reachable_after: Duration::from_secs(5),
            unclean_failover: false,
            peer_ca_file: None,
            allow_plaintext_peers: true,
        }
    }
}

impl ClusterConfig {
    /// True when etcd endpoints are configured.
    pub fn enabled(&self) -> bool {
        !self.etcd.is_empty()
    }
}

/// What a node brings to the cluster.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `[cluster]` section.
    pub config: ClusterConfig,
    /// This node's id.
    pub node_id: String,
    /// Partition count P (fixed for the life of a cluster).
    pub partitions: u32,
    /// The URL other nodes and clients reach this node at.
    pub advertise_url: String,
    /// The balancer bound in the config file (the `config` key can override it).
    pub balancer: Option<PluginBinding>,
    /// When the node started (its node record says so).
    pub started_at: SystemTime,
}

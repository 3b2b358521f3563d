//! Prometheus metrics of one router process, all named `switchyard_*`.
//!
//! It owns the metric handles and the text exposition for `GET /metrics`. Handles are
//! lock-free atomics, so the hot path only increments. It must never use a channel name, a
//! client id or any other unbounded value as a label.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the router exports.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// WebSocket connections accepted since start.
    pub connections_total: IntCounter,
    /// Active subscriptions over all connections.
    pub subscriptions: IntGauge,
    /// Messages accepted and stored (not counting idempotent repeats).
    pub messages_published: IntCounter,
    /// Message pushes written to client sockets.
    pub messages_delivered: IntCounter,
    /// Payload bytes accepted.
    pub bytes_published: IntCounter,
    /// Push bytes written to client sockets.
    pub bytes_delivered: IntCounter,
    /// Of `messages_delivered`, the pushes partition owners framed straight into a socket
    /// its session had lent them (the direct path), with no session wake-up.
    pub messages_delivered_direct: IntCounter,
    /// Catch-up pages cut from a store read another client's catch-up made (a shared read).
    pub catch_up_shared_pages: IntCounter,
    /// Publishes answered from the idempotency window instead of being stored again.
    pub publish_duplicates: IntCounter,
    /// Idempotency keys not remembered because the node's key budget was spent.
    pub idempotency_unremembered: IntCounter,
    /// Connections closed with 4008 because their outbound queue overflowed.
    pub slow_consumer_disconnects: IntCounter,
    /// Duration of each group fsync.
    pub store_sync_seconds: Histogram,
    /// Group fsyncs performed.
    pub store_syncs: IntCounter,
    /// Journal batches start-up repair dropped (from the first damaged one on).
    pub store_journal_dropped_batches: IntCounter,
    /// Journal bytes start-up repair dropped.
    pub store_journal_dropped_bytes: IntCounter,
    /// Store reads that failed on damaged or unreadable data.
    pub store_read_errors: IntCounter,
    /// Partitions a read found damaged data in since start.
    pub store_damaged_partitions: IntGauge,
    /// Store reads a partition owner started for a channel's parked commands (idempotency
    /// windows, consumer offsets).
    pub store_loads: IntCounter,
    /// Bytes free for the node on the data directory's filesystem, as last checked.
    pub store_free_bytes: IntGauge,
    /// The free-space reserve in bytes (`[store] reserve_bytes`/`reserve_percent`).
    pub store_reserve_bytes: IntGauge,
    /// 1 while free space is below the reserve and writes are refused.
    pub store_space_low: IntGauge,
    /// Write batches refused because free space was below the reserve.
    pub store_space_refusals: IntCounter,
    /// 1 once a write or fsync failed (the node stops and exits).
    pub store_failed: IntGauge,
    /// Channels held per partition.
    pub partition_channels: IntGaugeVec,
    /// Messages removed by retention.
    pub retention_removed: IntCounter,
    /// Messages removed by compaction.
    pub compaction_removed: IntCounter,
    /// Error replies sent, by code.
    pub protocol_errors: IntCounterVec,
    /// Plugin calls, by plugin and kind (plugins are files an operator drops in: few).
    pub plugin_calls: IntCounterVec,
    /// Failed plugin calls, by plugin, kind and reason.
    pub plugin_failures: IntCounterVec,
    /// 1 while this node is the cluster leader.
    pub cluster_is_leader: IntGauge,
    /// Members the leader counts as cut off (most others cannot reach them), as of its
    /// last round (0 on other nodes).
    pub cluster_unreachable_nodes: IntGauge,
    /// 1 while the node's etcd session (lease and watches) is up.
    pub cluster_etcd_up: IntGauge,
    /// Epoch of the partition map this node routes by.
    pub cluster_map_epoch: IntGauge,
    /// Partitions this node owns in that map.
    pub cluster_owned_partitions: IntGauge,
    /// 1 once this node is draining (shutting down; the leader moves its partitions away).
    pub cluster_draining: IntGauge,
    /// Coordination rounds run by this node as leader, by result.
    pub cluster_rounds: IntCounterVec,
    /// Map writes refused by the fencing compare (this node had been deposed).
    pub cluster_fenced_writes: IntCounter,
    /// etcd sessions started (the first, and each re-connect).
    pub cluster_sessions: IntCounter,
    /// Followers this node (as a partition leader) had removed from an ISR.
    pub isr_shrinks: IntCounter,
    /// Followers this node (as a partition leader) had added back to an ISR.
    pub isr_expands: IntCounter,
    /// Partitions this node leads whose ISR lacks an assigned follower.
    pub under_replicated_partitions: IntGauge,
    /// The most batches any follower of a partition led here is behind (over partitions).
    pub replica_lag_batches: IntGauge,
    /// Partition leader changes published by this node as cluster leader, by reason
    /// (`failover`, `move`, `unclean`).
    pub leader_elections: IntCounterVec,
    /// Partitions given to a replica outside the ISR (`unclean_failover`): new channel epochs.
    pub unclean_failovers: IntCounter,
    /// Replica snapshots taken by this node as a follower.
    pub replica_snapshots: IntCounter,
    /// Tails truncated by this node as a follower (channels re-copied from a new leader).
    pub replica_truncations: IntCounter,
    /// Leases granted (the first, and each after one was lost).
    pub cluster_lease_grants: IntCounter,
    /// `config` values ignored because they did not parse or validate.
    pub cluster_config_errors: IntCounter,
    /// Operations forwarded to their owner over a peer link, by op and result.
    pub peer_forwarded: IntCounterVec,
    /// Redirects received (the owner had changed).
    pub peer_redirects: IntCounter,
    /// Connects whose seat holder could not be asked in time: the per-node cap applied.
    pub seat_fallbacks: IntCounter,
    /// Seats this node holds for users (as the holder of their `seats:<user>` partition).
    pub seats_held: IntGauge,
    /// 1 while the outgoing link to a peer is connected (by peer node id: few).
    pub peer_link_up: IntGaugeVec,
    /// Outgoing link connections made, by peer.
    pub peer_connects: IntCounterVec,
    /// Upstream subscriptions this node (as a gateway) holds to channels owned elsewhere.
    pub peer_upstreams: IntGauge,
    /// Gateway subscriptions handed to the owner here when the map moved their channel onto
    /// this node (instead of telling the clients to subscribe again).
    pub peer_upstream_handoffs: IntCounter,
    /// Subscribes with a recovery position refused because this node's catch-up admission
    /// (`limits.recovery_*`) was full.
    pub recovery_refusals: IntCounter,
    /// Upstream subscriptions other nodes hold here (as owner): one per channel per gateway.
    pub peer_subscriptions: IntGauge,
    /// Partition handovers this node received, by result (`ok`, or `lost`: started afresh).
    pub handovers: IntCounterVec,
    /// Messages received by handovers.
    pub handover_messages: IntCounter,
    /// Duration of one handover on the receiving side.
    pub handover_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone())).expect("metric names are unique");
            m
        }
        let counter = |name: &str, help: &str| reg(&registry, IntCounter::new(name, help).expect("valid metric"));
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).expect("valid metric"));
        Self {
            connections: gauge("switchyard_connections", "Open WebSocket connections"),
            connections_total: counter("switchyard_connections_total", "WebSocket connections accepted"),
            subscriptions: gauge("switchyard_subscriptions", "Active subscriptions"),
            messages_published: counter("switchyard_messages_published_total", "Messages stored"),
            messages_delivered: counter("switchyard_messages_delivered_total", "Message pushes written to clients"),
            bytes_published: counter("switchyard_bytes_published_total", "Payload bytes stored"),
            bytes_delivered: counter("switchyard_bytes_delivered_total", "Push bytes written to clients"),
            messages_delivered_direct: counter(
                "switchyard_messages_delivered_direct_total",
                "Message pushes written by partition owners into sockets lent by their sessions",
            ),
            catch_up_shared_pages: counter(
                "switchyard_catch_up_shared_pages_total",
                "Catch-up pages cut from a store read shared with another client's catch-up",
            ),
            publish_duplicates: counter(
                "switchyard_publish_duplicates_total",
                "Publishes answered from the idempotency window",
            ),
            idempotency_unremembered: counter(
                "switchyard_idempotency_unremembered_total",
                "Idempotency keys not remembered: the node's key budget was spent",
            ),
            slow_consumer_disconnects: counter(
                "switchyard_slow_consumer_disconnects_total",
                "Connections closed with 4008 (outbound queue full)",
            ),
            store_sync_seconds: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("switchyard_store_sync_seconds", "Duration of one group fsync").buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            store_syncs: counter("switchyard_store_syncs_total", "Group fsyncs performed"),
            store_journal_dropped_batches: counter(
                "switchyard_store_journal_dropped_batches_total",
                "Journal batches start-up repair dropped (the first damaged one and all after it)",
            ),
            store_journal_dropped_bytes: counter(
                "switchyard_store_journal_dropped_bytes_total",
                "Journal bytes start-up repair dropped",
            ),
            store_read_errors: counter(
                "switchyard_store_read_errors_total",
                "Store reads that failed on damaged or unreadable data",
            ),
            store_damaged_partitions: gauge(
                "switchyard_store_damaged_partitions",
                "Partitions a store read found damaged data in since start",
            ),
            store_loads: counter(
                "switchyard_owner_store_loads_total",
                "Store reads an owner parked a channel's commands behind",
            ),
            store_free_bytes: gauge("switchyard_store_free_bytes", "Bytes free on the data directory's filesystem"),
            store_reserve_bytes: gauge("switchyard_store_reserve_bytes", "The free-space reserve in bytes"),
            store_space_low: gauge("switchyard_store_space_low", "1 while free space is below the reserve"),
            store_space_refusals: counter(
                "switchyard_store_space_refusals_total",
                "Write batches refused because free space was below the reserve",
            ),
            store_failed: gauge("switchyard_store_failed", "1 once a store write or fsync failed"),
            partition_channels: reg(
                &registry,
                IntGaugeVec::new(Opts::new("switchyard_partition_channels", "Channels per partition"), &["partition"])
                    .expect("valid metric"),
            ),
            retention_removed: counter("switchyard_retention_removed_total", "Messages removed by retention"),
            compaction_removed: counter("switchyard_compaction_removed_total", "Messages removed by compaction"),
            protocol_errors: reg(
                &registry,
                IntCounterVec::new(Opts::new("switchyard_protocol_errors_total", "Error replies by code"), &["code"])
                    .expect("valid metric"),
            ),
            plugin_calls: reg(
                &registry,
                IntCounterVec::new(Opts::new("switchyard_plugin_calls_total", "Plugin calls"), &["plugin", "kind"])
                    .expect("valid metric"),
            ),
            plugin_failures: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new("switchyard_plugin_failures_total", "Plugin calls that failed (built-in policy used)"),
                    &["plugin", "kind", "reason"],
                )
                .expect("valid metric"),
            ),
            cluster_is_leader: gauge("switchyard_cluster_is_leader", "1 while this node is the cluster leader"),
            cluster_unreachable_nodes: gauge(
                "switchyard_cluster_unreachable_nodes",
                "Members the leader counts as cut off from most of the others (leader only)",
            ),
            cluster_etcd_up: gauge("switchyard_cluster_etcd_up", "1 while the etcd session is up"),
            cluster_map_epoch: gauge("switchyard_cluster_map_epoch", "Epoch of the partition map in use"),
            cluster_owned_partitions: gauge("switchyard_cluster_owned_partitions", "Partitions this node owns"),
            cluster_draining: gauge(
                "switchyard_cluster_draining",
                "1 while this node is draining (its partitions are moved away)",
            ),
            cluster_rounds: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new("switchyard_cluster_rounds_total", "Coordination rounds run as leader, by result"),
                    &["result"],
                )
                .expect("valid metric"),
            ),
            cluster_fenced_writes: counter(
                "switchyard_cluster_fenced_writes_total",
                "Map writes refused by the fencing compare (deposed leader)",
            ),
            cluster_sessions: counter("switchyard_cluster_sessions_total", "etcd sessions started"),
            isr_shrinks: counter("switchyard_isr_shrinks_total", "Followers removed from an ISR by this leader"),
            isr_expands: counter("switchyard_isr_expands_total", "Followers added back to an ISR by this leader"),
            under_replicated_partitions: reg(
                &registry,
                IntGauge::new(
                    "switchyard_under_replicated_partitions",
                    "Partitions led here whose ISR lacks an assigned follower",
                )
                .expect("valid metric"),
            ),
            replica_lag_batches: reg(
                &registry,
                IntGauge::new(
                    "switchyard_replica_lag_messages",
                    "Most store batches (messages, grouped) any follower of a partition led here is behind",
                )
                .expect("valid metric"),
            ),
            leader_elections: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new("switchyard_leader_elections_total", "Partition leader changes published, by reason"),
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            unclean_failovers: counter(
                "switchyard_unclean_failovers_total",
                "Partitions given to a replica outside the ISR (new channel epochs)",
            ),
            replica_snapshots: counter("switchyard_replica_snapshots_total", "Replica snapshots taken as a follower"),
            replica_truncations: counter(
                "switchyard_replica_truncations_total",
                "Log tails a new leader never had, truncated by this node as a follower",
            ),
            cluster_lease_grants: counter("switchyard_cluster_lease_grants_total", "etcd leases granted"),
            cluster_config_errors: counter(
                "switchyard_cluster_config_errors_total",
                "Dynamic config values ignored as invalid",
            ),
            peer_forwarded: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "switchyard_peer_forwarded_total",
                        "Operations forwarded to their owner, by op and result",
                    ),
                    &["op", "result"],
                )
                .expect("valid metric"),
            ),
            peer_redirects: counter("switchyard_peer_redirects_total", "Redirects received from a former owner"),
            seat_fallbacks: counter(
                "switchyard_seat_fallbacks_total",
                "Connects that applied the per-node cap because the seat holder did not answer in time",
            ),
            seats_held: reg(
                &registry,
                IntGauge::new("switchyard_seats_held", "Session seats held here for the cluster-wide per-user cap")
                    .expect("valid metric"),
            ),
            peer_link_up: reg(
                &registry,
                IntGaugeVec::new(Opts::new("switchyard_peer_link_up", "1 while the link to a peer is up"), &["peer"])
                    .expect("valid metric"),
            ),
            peer_connects: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new("switchyard_peer_connects_total", "Peer link connections made"),
                    &["peer"],
                )
                .expect("valid metric"),
            ),
            peer_upstreams: gauge("switchyard_peer_upstreams", "Upstream subscriptions held to remote channels"),
            peer_upstream_handoffs: counter(
                "switchyard_peer_upstream_handoffs_total",
                "Gateway subscriptions handed to the owner here when their channel moved onto this node",
            ),
            recovery_refusals: counter(
                "switchyard_recovery_refusals_total",
                "Recovering subscribes refused: the node's catch-up admission was full",
            ),
            peer_subscriptions: gauge(
                "switchyard_peer_subscriptions",
                "Upstream subscriptions other nodes hold on channels owned here",
            ),
            handovers: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new("switchyard_handovers_total", "Partition handovers received"),
                    &["result"],
                )
                .expect("valid metric"),
            ),
            handover_messages: counter("switchyard_handover_messages_total", "Messages received by handovers"),
            handover_seconds: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("switchyard_handover_seconds", "Duration of one received handover")
                        .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                )
                .expect("valid metric"),
            ),
            registry,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

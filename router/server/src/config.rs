//! The configuration tree: serde types, documented defaults, loading and validation.
//!
//! It owns how a config file, `SWITCHYARD_*` environment variables and command-line flags
//! merge into one [`Config`], and the [`Config::validate`] check that runs before anything
//! binds. It must never open sockets or files other than the config file itself and the
//! key files its `[auth]`, `[admin]` and `[cluster]` sections name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use switchyard_access::auth::AuthConfig;
use switchyard_access::ratelimit::RateLimitConfig;
use switchyard_access::rules::Rule;
use switchyard_access::user_sessions::SessionsConfig;
pub use switchyard_cluster::ClusterConfig;
use switchyard_core::policy::{empty_params, PluginBinding};
use switchyard_proto::channel;
pub use switchyard_store::FsyncPolicy;

/// Errors found while loading or validating configuration. Each names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this tree (unknown keys land here too).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file that was read.
        path: PathBuf,
        /// The parser's message, which names the offending key.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config value for `{field}`: {message}")]
    Invalid {
        /// Dotted path of the field, e.g. `limits.max_frame_bytes`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A section owned by the access layer (`[auth]`, `[sessions]`, `[rate_limit]`) is invalid.
    #[error(transparent)]
    Access(#[from] switchyard_access::SettingsError),
}

/// The whole configuration of one router node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the one HTTP/WebSocket listener. Default `127.0.0.1:8000`.
    pub listen: SocketAddr,
    /// Directory of the embedded store. Default `./data`.
    pub data_dir: PathBuf,
    /// Directory watched for `.wasm` policy plugins. Default `./plugins/dist`.
    pub plugins_dir: PathBuf,
    /// This node's id, shown to clients in `connect` and in `/api/v1/cluster`. Default `standalone`.
    pub node_id: String,
    /// Number of partitions P the channel space is hashed into. Default 64.
    pub partitions: u32,
    /// Store sync policy. Default `batch` (group commit).
    pub fsync: FsyncPolicy,
    /// Store reads (history, catch-up, owner loads, handover chunks) that run at once on
    /// blocking threads; more wait their turn. Default (absent): twice the cores, at least 4.
    pub store_read_threads: Option<usize>,
    /// The free-space reserve (`[store]`): below it, writes that store data are refused
    /// with `unavailable` until space is freed. Default: the larger of 256 MiB and 1%.
    pub store: switchyard_store::Reserve,
    /// How long a graceful shutdown may take before the process exits anyway. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Per-connection limits.
    pub limits: Limits,
    /// Publishing behaviour.
    pub publish: PublishConfig,
    /// Background retention and compaction.
    pub maintenance: MaintenanceConfig,
    /// Settings for channels whose namespace has no entry in `namespaces`.
    pub defaults: NamespaceConfig,
    /// Per-namespace settings; the namespace is the part of a channel name before the first `:`.
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    /// The WASM plugin host.
    pub plugins: PluginsConfig,
    /// The balancing plugin the cluster leader uses; absent means the built-in even spread.
    /// The `config` key in etcd overrides it at run time.
    pub balancer: Option<PluginBinding>,
    /// Cluster mode (etcd); absent `etcd` endpoints mean standalone.
    pub cluster: ClusterConfig,
    /// Client authentication (`[auth]`): JWT verification, API key, dev tokens.
    pub auth: AuthConfig,
    /// The admin API's token (`[admin]`): `switchyard ctl`, the cluster view, the plugin list.
    pub admin: crate::admin::AdminConfig,
    /// Per-user connection cap and server pings (`[sessions]`; reloadable).
    pub sessions: SessionsConfig,
    /// Per-connection publish rate limit (`[rate_limit]`; reloadable).
    pub rate_limit: RateLimitConfig,
    /// TLS on the client listener (`[tls]`): with it, clients use `wss://` and `https://`
    /// on `listen`, and plaintext connections fail their handshake. Absent: plaintext.
    pub tls: Option<TlsConfig>,
    /// The config file this was loaded from (set by [`Config::load`]; SIGHUP re-reads it).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[tls]`: the certificate chain and key the client listener presents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first (relative to the config file's folder).
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1; relative to the config file's folder).
    pub key_file: PathBuf,
}

/// The WASM plugin host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Deadline of one plugin call. Default 50 ms.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// Memory cap of one plugin instance. Default 32 MiB.
    pub memory_limit_bytes: usize,
    /// Consecutive failures that quarantine a plugin. Default 3.
    pub quarantine_after: u32,
    /// First quarantine period; doubles on each relapse. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub quarantine_min: Duration,
    /// Longest quarantine period. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub quarantine_max: Duration,
    /// A plugin without failures for this long starts over at `quarantine_min`. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub healthy_reset: Duration,
    /// How long the folder must be quiet before a change is loaded. Default 200 ms.
    #[serde(with = "humantime_serde")]
    pub reload_debounce: Duration,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_millis(50),
            memory_limit_bytes: 32 * 1024 * 1024,
            quarantine_after: 3,
            quarantine_min: Duration::from_secs(1),
            quarantine_max: Duration::from_secs(30),
            healthy_reset: Duration::from_secs(60),
            reload_debounce: Duration::from_millis(200),
        }
    }
}

/// Per-connection limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted WebSocket frame (and HTTP publish body). Larger frames get
    /// `too_large` and close 1009. Default 64 KiB.
    pub max_frame_bytes: usize,
    /// Most subscriptions one connection may hold. Default 1024.
    pub max_subscriptions: usize,
    /// Messages that may wait in one connection's outbound queue before it is a slow
    /// consumer and is disconnected with 4008. Default 4096.
    pub outbound_queue_messages: usize,
    /// Bytes that may wait in one connection's outbound queue. Default 8 MiB.
    pub outbound_queue_bytes: usize,
    /// Longest `key` and `idempotency_key` of a publish, in bytes; longer ones get
    /// `too_large`. Default 256.
    pub max_key_bytes: usize,
    /// Most message bytes (payload, keys, ids) in one history, catch-up or long-poll page;
    /// a page stops early (never below one message) and the client pages on from its last
    /// offset. Default 8 MiB.
    pub max_reply_bytes: usize,
    /// Most client WebSocket connections this node holds; past it, upgrades get 503 with
    /// `Retry-After`. Default 65,536 (as nats-server).
    pub max_connections: usize,
    /// A connection whose socket accepts no bytes this long while a reply or push waits is
    /// closed and its memory freed. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Most catch-ups (a subscribe with a recovery position whose grant needs a store
    /// read) in progress on this node at once; beyond it the subscribe is refused with
    /// `unavailable` and `retry_after_ms`. 0 refuses every such subscribe. Default 1024.
    pub recovery_concurrency: usize,
}

/// Publishing behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    /// How long an `idempotency_key` is remembered per channel. Default 2 minutes.
    #[serde(with = "humantime_serde")]
    pub idempotency_window: Duration,
    /// Most idempotency keys the node remembers over all channels; past it a channel first
    /// forgets its own oldest keys. Default 1,000,000.
    pub idempotency_max_keys: usize,
    /// Most bytes of remembered idempotency keys (key length plus 64 per key). Default
    /// 128 MiB.
    pub idempotency_max_bytes: usize,
}

/// Background retention and compaction.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceConfig {
    /// How often each partition's channels are checked. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A channel bound to a retention plugin whose counters did not change is called again
    /// only after this long (time-based plugins such as max-age act within it). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub idle_recheck: Duration,
}

/// Retention and compaction settings of one namespace.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceConfig {
    /// Most messages kept per channel; 0 means unlimited. Default 100 000.
    pub history_size: u64,
    /// Longest a message is kept; 0 means unlimited. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub history_ttl: Duration,
    /// Most stored bytes per channel; 0 means unlimited. Default 0.
    pub history_bytes: u64,
    /// Keyed compaction; absent means none.
    pub compaction: Option<CompactionConfig>,
    /// A retention plugin; the limits above are its fallback.
    pub retention: Option<PluginBinding>,
    /// Who may subscribe, publish and read history when auth is on (see `switchyard_access::rules`).
    /// Absent: `user` for the `user` namespace, `dialog` for `dialog`, else `defaults.rule`,
    /// else `allowlist`.
    pub rule: Option<Rule>,
    /// Subscriptions join the channel's presence (`presence`, `presence_stats`). Default false.
    pub presence: bool,
    /// Subscribers get `join` and `leave` pushes; requires `presence`. Default false.
    pub join_leave: bool,
    /// Most clients a `presence` reply lists; past it the request gets `limit_exceeded`
    /// (`presence_stats` still answers). Default 1000.
    pub presence_max_list: usize,
    /// No `join`/`leave` pushes while a channel has more subscribers than this (each join
    /// would cost a push per subscriber: the rule against storms). Default 1000.
    pub join_leave_max_subscribers: usize,
}

/// Keyed compaction: keep the latest value per key.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CompactionConfig {
    /// A keyed message is removed when a newer one with the same key arrived within this
    /// window of it. Absent means any newer one (Kafka's "latest value per key").
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
    /// A tombstone (keyed message with `null` data) that is the latest for its key is
    /// removed once it is this old. Default 1 minute.
    #[serde(default = "default_tombstone_delay", with = "humantime_serde")]
    pub tombstone_delay: Duration,
    /// A compaction plugin (file stem); `window` and `tombstone_delay` are its fallback.
    #[serde(default)]
    pub plugin: Option<String>,
    /// Params for the plugin. Default `{}`.
    #[serde(default = "empty_params")]
    pub params: serde_json::Value,
}

fn default_tombstone_delay() -> Duration {
    Duration::from_secs(60)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8000".parse().expect("static address"),
            data_dir: PathBuf::from("./data"),
            plugins_dir: PathBuf::from("./plugins/dist"),
            node_id: "standalone".into(),
            partitions: 64,
            fsync: FsyncPolicy::Batch,
            store_read_threads: None,
            store: switchyard_store::Reserve::default(),
            shutdown_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            publish: PublishConfig::default(),
            maintenance: MaintenanceConfig::default(),
            defaults: NamespaceConfig::default(),
            namespaces: BTreeMap::new(),
            plugins: PluginsConfig::default(),
            balancer: None,
            cluster: ClusterConfig::default(),
            auth: Default::default(),
            admin: Default::default(),
            sessions: Default::default(),
            rate_limit: Default::default(),
            tls: None,
            source: None,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_subscriptions: 1024,
            outbound_queue_messages: 4096,
            outbound_queue_bytes: 8 * 1024 * 1024,
            max_key_bytes: 256,
            max_reply_bytes: 8 * 1024 * 1024,
            max_connections: 65_536,
            write_timeout: Duration::from_secs(30),
            recovery_concurrency: 1024,
        }
    }
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            idempotency_window: Duration::from_secs(120),
            idempotency_max_keys: 1_000_000,
            idempotency_max_bytes: 128 << 20,
        }
    }
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self { interval: Duration::from_secs(1), idle_recheck: Duration::from_secs(10) }
    }
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self {
            history_size: 100_000,
            history_ttl: Duration::from_secs(7 * 24 * 3600),
            history_bytes: 0,
            compaction: None,
            retention: None,
            rule: None,
            presence: false,
            join_leave: false,
            presence_max_list: 1000,
            join_leave_max_subscribers: 1000,
        }
    }
}

/// Values given on the command line or in the environment; they override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen` / `SWITCHYARD_LISTEN`.
    pub listen: Option<SocketAddr>,
    /// `--data-dir` / `SWITCHYARD_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--plugins-dir` / `SWITCHYARD_PLUGINS_DIR`.
    pub plugins_dir: Option<PathBuf>,
    /// `--etcd` / `SWITCHYARD_ETCD`: comma-separated endpoints; turns on cluster mode.
    pub etcd: Option<Vec<String>>,
    /// `--cluster` / `SWITCHYARD_CLUSTER`.
    pub cluster: Option<String>,
    /// `--node-id` / `SWITCHYARD_NODE_ID`.
    pub node_id: Option<String>,
    /// `--advertise` / `SWITCHYARD_ADVERTISE`.
    pub advertise: Option<String>,
    /// `SWITCHYARD_CLUSTER_SECRET` (environment only, never a flag: argv is world-readable).
    pub cluster_secret: Option<String>,
}

impl Config {
    /// Parses a TOML document (unknown keys are errors). `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })
    }

    /// Reads `cluster.secret_file` (relative to `base`, the config file's folder) into
    /// `cluster.secret`. Setting both is an error.
    fn read_secret_file(&mut self, base: &Path) -> Result<(), ConfigError> {
        let Some(file) = self.cluster.secret_file.take() else { return Ok(()) };
        if self.cluster.secret.is_some() {
            return Err(ConfigError::Invalid {
                field: "cluster.secret_file".into(),
                message: "set cluster.secret or cluster.secret_file, not both".into(),
            });
        }
        let path = base.join(file);
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Invalid {
            field: "cluster.secret_file".into(),
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        self.cluster.secret = Some(text.trim_end_matches(['\r', '\n']).to_string());
        Ok(())
    }

    /// Loads the file (if any), applies overrides and validates the result.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                let mut config = Self::from_toml(&text, path)?;
                let base = path.parent().unwrap_or(Path::new("."));
                config.auth.load_files(base)?;
                config.admin.load_file(base)?;
                config.read_secret_file(base)?;
                if let Some(tls) = &mut config.tls {
                    tls.cert_file = base.join(&tls.cert_file);
                    tls.key_file = base.join(&tls.key_file);
                }
                if let Some(ca) = &mut config.cluster.peer_ca_file {
                    *ca = base.join(&*ca);
                }
                config.source = Some(path.to_owned());
                config
            }
            None => Self::default(),
        };
        if let Some(secret) = overrides.cluster_secret.filter(|s| !s.is_empty()) {
            config.cluster.secret = Some(secret);
        }
        if let Some(listen) = overrides.listen {
            config.listen = listen;
        }
        if let Some(dir) = overrides.data_dir {
            config.data_dir = dir;
        }
        if let Some(dir) = overrides.plugins_dir {
            config.plugins_dir = dir;
        }
        if let Some(etcd) = overrides.etcd {
            config.cluster.etcd = etcd;
        }
        if let Some(name) = overrides.cluster {
            config.cluster.name = name;
        }
        if let Some(id) = overrides.node_id {
            config.node_id = id;
        }
        if let Some(url) = overrides.advertise {
            config.cluster.advertise = Some(url);
        }
        config.validate()?;
        Ok(config)
    }

    /// Rejects values the router cannot run with, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |field: &str, message: &str| Err(ConfigError::Invalid { field: field.into(), message: message.into() });
        if self.partitions == 0 || self.partitions > 65_536 {
            return invalid("partitions", "must be between 1 and 65536");
        }
        if self.node_id.is_empty() || !channel::is_valid_name(&self.node_id) {
            return invalid("node_id", "must be 1-255 characters of [A-Za-z0-9_:.@-]");
        }
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty");
        }
        if self.shutdown_timeout.is_zero() {
            return invalid("shutdown_timeout", "must be greater than zero");
        }
        if !(0.0..=50.0).contains(&self.store.reserve_percent) {
            return invalid("store.reserve_percent", "must be between 0 and 50");
        }
        if self.store_read_threads.is_some_and(|n| n == 0 || n > 1024) {
            return invalid("store_read_threads", "must be between 1 and 1024");
        }
        let l = &self.limits;
        if l.max_frame_bytes < 256 || l.max_frame_bytes > 16 * 1024 * 1024 {
            return invalid("limits.max_frame_bytes", "must be between 256 and 16777216");
        }
        if l.max_subscriptions == 0 {
            return invalid("limits.max_subscriptions", "must be at least 1");
        }
        if l.write_timeout < Duration::from_millis(100) {
            return invalid("limits.write_timeout", "must be at least 100ms");
        }
        if l.max_connections == 0 {
            return invalid("limits.max_connections", "must be at least 1");
        }
        if l.max_key_bytes == 0 || l.max_key_bytes > 65_536 {
            return invalid("limits.max_key_bytes", "must be between 1 and 65536");
        }
        if l.max_reply_bytes < 64 * 1024 || l.max_reply_bytes > 32 * 1024 * 1024 {
            return invalid(
                "limits.max_reply_bytes",
                "must be between 65536 and 33554432 (the peer frame limit is 64 MiB)",
            );
        }
        if l.outbound_queue_messages == 0 {
            return invalid("limits.outbound_queue_messages", "must be at least 1");
        }
        if l.outbound_queue_bytes < l.max_frame_bytes {
            return invalid(
                "limits.outbound_queue_bytes",
                "must be at least limits.max_frame_bytes so one message always fits",
            );
        }
        if self.maintenance.interval < Duration::from_millis(10) {
            return invalid("maintenance.interval", "must be at least 10ms");
        }
        if self.publish.idempotency_max_keys == 0 || self.publish.idempotency_max_bytes < 64 * 1024 {
            return invalid(
                "publish.idempotency_max_keys",
                "must be at least 1 (and idempotency_max_bytes at least 65536)",
            );
        }
        if self.publish.idempotency_window.is_zero() {
            return invalid("publish.idempotency_window", "must be greater than zero");
        }
        let namespaces = std::iter::once(("defaults".to_string(), &self.defaults))
            .chain(self.namespaces.iter().map(|(n, c)| (format!("namespaces.{n}"), c)));
        for (path, ns) in namespaces {
            if let Some(c) = &ns.compaction {
                if c.window.is_some_and(|w| w.is_zero()) {
                    return invalid(&format!("{path}.compaction.window"), "must be greater than zero");
                }
                if let Some(plugin) = &c.plugin {
                    check_binding(&format!("{path}.compaction"), plugin, &c.params)?;
                }
            }
            if let Some(b) = &ns.retention {
                check_binding(&format!("{path}.retention"), &b.plugin, &b.params)?;
            }
            if ns.join_leave && !ns.presence {
                return invalid(&format!("{path}.join_leave"), "requires presence = true in the same namespace");
            }
            if ns.presence_max_list == 0 {
                return invalid(&format!("{path}.presence_max_list"), "must be at least 1");
            }
        }
        if let Some(b) = &self.balancer {
            check_binding("balancer", &b.plugin, &b.params)?;
        }
        self.validate_cluster()?;
        let pl = &self.plugins;
        if pl.call_timeout < Duration::from_millis(1) || pl.call_timeout > Duration::from_secs(10) {
            return invalid("plugins.call_timeout", "must be between 1ms and 10s");
        }
        if pl.memory_limit_bytes < 1024 * 1024 {
            return invalid("plugins.memory_limit_bytes", "must be at least 1 MiB (16 wasm pages)");
        }
        if pl.quarantine_after == 0 {
            return invalid("plugins.quarantine_after", "must be at least 1");
        }
        if pl.quarantine_min.is_zero() || pl.quarantine_max < pl.quarantine_min {
            return invalid("plugins.quarantine_max", "must be at least plugins.quarantine_min, which must be > 0");
        }
        for name in self.namespaces.keys() {
            if name.is_empty() || name.contains(':') || !channel::is_valid_name(name) {
                return invalid(&format!("namespaces.{name}"), "namespace names are [A-Za-z0-9_.@-]+");
            }
        }
        if matches!(self.defaults.rule, Some(Rule::User | Rule::Dialog)) {
            return invalid("defaults.rule", "must be \"public\" or \"allowlist\" (user and dialog need a namespace)");
        }
        self.auth.validate()?;
        self.admin.validate()?;
        self.sessions.validate()?;
        self.rate_limit.validate()?;
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        let invalid =
            |field: &str, message: &str| Err(ConfigError::Invalid { field: field.into(), message: message.into() });
        if !c.enabled() {
            return Ok(());
        }
        if c.replicas == 0 {
            return invalid("cluster.replicas", "must be at least 1 (1 = no replication)");
        }
        if c.replica_lag_timeout < std::time::Duration::from_millis(100) {
            return invalid("cluster.replica_lag_timeout", "must be at least 100ms");
        }
        if c.reachable_after < c.unreachable_after {
            return invalid(
                "cluster.reachable_after",
                "must be at least cluster.unreachable_after (a flapping link must not move leadership back and forth)",
            );
        }
        if c.secret.is_some() {
            let plaintext = !self.advertise_url().starts_with("https://");
            if plaintext && !c.allow_plaintext_peers {
                return invalid(
                    "cluster.allow_plaintext_peers",
                    "is false, but this node's peer URL is http://: set [tls] (the URL becomes https://) \
                     or allow plaintext peers",
                );
            }
            if !plaintext && self.tls.is_none() {
                return invalid("cluster.advertise", "is https://, but this node has no [tls] to serve it");
            }
            if self.tls.is_some() && c.peer_ca_file.is_none() {
                return invalid(
                    "cluster.peer_ca_file",
                    "peer links of a [tls] node verify their peers against a CA file: set it",
                );
            }
        }
        let key_safe = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        };
        if !key_safe(&c.name) {
            return invalid("cluster.name", "must be 1-128 characters of [A-Za-z0-9_.-]");
        }
        if !key_safe(&self.node_id) {
            return invalid(
                "node_id",
                "in cluster mode must be 1-128 characters of [A-Za-z0-9_.-] (it is an etcd key)",
            );
        }
        if let Some(e) = c.etcd.iter().find(|e| e.is_empty() || e.contains(char::is_whitespace)) {
            return invalid("cluster.etcd", &format!("bad endpoint {e:?}"));
        }
        if let Some(a) = &c.advertise {
            if !(a.starts_with("http://") || a.starts_with("https://")) {
                return invalid("cluster.advertise", "must be an http:// or https:// URL");
            }
        }
        if c.lease_ttl < Duration::from_secs(2) || c.lease_ttl > Duration::from_secs(300) {
            return invalid("cluster.lease_ttl", "must be between 2s and 300s (etcd counts whole seconds)");
        }
        if c.coordination_interval < Duration::from_millis(100) {
            return invalid("cluster.coordination_interval", "must be at least 100ms");
        }
        if c.load_interval < Duration::from_millis(100) {
            return invalid("cluster.load_interval", "must be at least 100ms");
        }
        if c.secret.as_ref().is_some_and(|s| s.len() < 16 || s.chars().any(|ch| ch.is_control())) {
            return invalid("cluster.secret", "must be at least 16 printable characters");
        }
        if c.etcd_timeout < Duration::from_millis(100) {
            return invalid("cluster.etcd_timeout", "must be at least 100ms");
        }
        Ok(())
    }

    /// The URL this node advertises in cluster mode.
    pub fn advertise_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.cluster.advertise.clone().unwrap_or_else(|| format!("{scheme}://{}", self.listen))
    }

    /// Refuses a publish whose `key` or `idempotency_key` is over `limits.max_key_bytes`.
    pub fn check_keys(
        &self,
        key: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<(), switchyard_proto::protocol::OpError> {
        let max = self.limits.max_key_bytes;
        for (field, value) in [("key", key), ("idempotency_key", idempotency_key)] {
            if let Some(v) = value.filter(|v| v.len() > max) {
                return Err(switchyard_proto::protocol::OpError::new(
                    switchyard_proto::protocol::ErrorCode::TooLarge,
                    format!("{field} is {} bytes; limits.max_key_bytes is {max}", v.len()),
                ));
            }
        }
        Ok(())
    }

    /// The settings that apply to a channel, by its namespace.
    pub fn namespace(&self, channel: &str) -> &NamespaceConfig {
        channel::namespace(channel).and_then(|ns| self.namespaces.get(ns)).unwrap_or(&self.defaults)
    }
}

/// A binding names a plugin by file stem and gives a params object.
fn check_binding(path: &str, plugin: &str, params: &serde_json::Value) -> Result<(), ConfigError> {
    let stem_ok = !plugin.is_empty()
        && plugin.len() <= 128
        && plugin.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !stem_ok {
        return Err(ConfigError::Invalid {
            field: format!("{path}.plugin"),
            message: "must be a plugin file stem of [A-Za-z0-9_.-]".into(),
        });
    }
    if !params.is_object() {
        return Err(ConfigError::Invalid { field: format!("{path}.params"), message: "must be a table".into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let c = Config::from_toml(text, Path::new("test.toml"))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse("").unwrap();
        assert_eq!(c.partitions, 64);
        assert_eq!(c.fsync, FsyncPolicy::Batch);
        assert_eq!(c.limits.max_frame_bytes, 65536);
    }

    #[test]
    fn full_file_parses() {
        let c = parse(
            r#"
            listen = "127.0.0.1:9000"
            fsync = "always"
            [limits]
            max_subscriptions = 10
            [namespaces.chat]
            history_size = 5
            history_ttl = "1h"
            compaction = { window = "10s" }
            "#,
        )
        .unwrap();
        assert_eq!(c.fsync, FsyncPolicy::Always);
        let chat = c.namespace("chat:room1");
        assert_eq!(chat.history_size, 5);
        assert_eq!(chat.history_ttl, Duration::from_secs(3600));
        let comp = chat.compaction.as_ref().unwrap();
        assert_eq!(comp.window, Some(Duration::from_secs(10)));
        assert_eq!(comp.tombstone_delay, Duration::from_secs(60));
        assert_eq!(c.namespace("other:x"), &c.defaults);
        let c = parse(
            "[namespaces.chat]\nretention = { plugin = \"keep-last\", params = { count = 3 } }\n\
             compaction = { plugin = \"latest-per-key\" }\n[plugins]\ncall_timeout = \"20ms\"\n",
        )
        .unwrap();
        let b = c.namespace("chat:a").retention.as_ref().unwrap();
        assert_eq!((b.plugin.as_str(), &b.params), ("keep-last", &serde_json::json!({"count": 3})));
        assert_eq!(c.namespace("chat:a").compaction.as_ref().unwrap().params, serde_json::json!({}));
        assert_eq!(c.namespace("plain"), &c.defaults);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = parse("listen = \"127.0.0.1:1\"\nbogus_key = 1\n").unwrap_err().to_string();
        assert!(err.contains("bogus_key"), "{err}");
        let err = parse("[limits]\nmax_frame = 1\n").unwrap_err().to_string();
        assert!(err.contains("max_frame"), "{err}");
    }

    #[test]
    fn overrides_beat_the_file() {
        let dir = std::env::temp_dir().join(format!("sy-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:1111\"\ndata_dir = \"/from/file\"\n").unwrap();
        let c = Config::load(Some(&file), Overrides::default()).unwrap();
        assert_eq!((c.listen.port(), c.data_dir.as_path()), (1111, Path::new("/from/file")));
        let o = Overrides {
            listen: Some("127.0.0.1:2222".parse().unwrap()),
            data_dir: Some("/flag".into()),
            ..Default::default()
        };
        let c = Config::load(Some(&file), o).unwrap();
        assert_eq!((c.listen.port(), c.data_dir.as_path()), (2222, Path::new("/flag")));
        assert!(Config::load(Some(&dir.join("missing.toml")), Overrides::default())
            .unwrap_err()
            .to_string()
            .contains("missing.toml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_name_the_field() {
        for (text, field) in [
            ("partitions = 0", "partitions"),
            ("[limits]\nmax_frame_bytes = 10", "limits.max_frame_bytes"),
            ("[limits]\nmax_subscriptions = 0", "limits.max_subscriptions"),
            ("[maintenance]\ninterval = \"1ms\"", "maintenance.interval"),
            ("[namespaces.\"a:b\"]\nhistory_size = 1", "namespaces.a:b"),
            ("[namespaces.x]\ncompaction = { window = \"0s\" }", "namespaces.x.compaction.window"),
            ("[namespaces.x]\nretention = { plugin = \"a/b\" }", "namespaces.x.retention.plugin"),
            ("[namespaces.x]\nretention = { plugin = \"k\", params = 3 }", "namespaces.x.retention.params"),
            ("[namespaces.x]\njoin_leave = true", "namespaces.x.join_leave"),
            ("[defaults]\npresence = true\npresence_max_list = 0", "defaults.presence_max_list"),
            ("[plugins]\ncall_timeout = \"0s\"", "plugins.call_timeout"),
            ("[cluster]\netcd = [\"http://x:1\"]\nlease_ttl = \"1s\"", "cluster.lease_ttl"),
            ("[cluster]\netcd = [\"http://x:1\"]\nname = \"a/b\"", "cluster.name"),
            ("node_id = \"a:b\"\n[cluster]\netcd = [\"http://x:1\"]", "node_id"),
            ("[cluster]\netcd = [\"http://x:1\"]\nadvertise = \"x:1\"", "cluster.advertise"),
            ("[cluster]\netcd = [\"http://x:1\"]\nreplicas = 0", "cluster.replicas"),
            ("[cluster]\netcd = [\"http://x:1\"]\nreplica_lag_timeout = \"1ms\"", "cluster.replica_lag_timeout"),
            (
                "[cluster]\netcd = [\"http://x:1\"]\nunreachable_after = \"3s\"\nreachable_after = \"1s\"",
                "cluster.reachable_after",
            ),
            ("[cluster]\netcd = [\"http://x:1\"]\nreplicas = -1", "replicas"),
            ("store_read_threads = 0", "store_read_threads"),
            ("[store]\nreserve_percent = 60", "store.reserve_percent"),
            ("[store]\nreserve_bytes = -1", "reserve_bytes"),
            ("store_read_threads = 1025", "store_read_threads"),
            ("store_read_threads = -1", "store_read_threads"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
        let err = parse("fsync = \"sometimes\"").unwrap_err().to_string();
        assert!(err.contains("fsync"), "{err}");
        let err = parse("shutdown_timeout = \"soon\"").unwrap_err().to_string();
        assert!(err.contains("shutdown_timeout"), "{err}");
    }

    proptest::proptest! {
        /// Fuzz-style: any file text is a config or a typed error, never a panic.
        #[test]
        fn any_file_text_loads_or_is_refused(text in "(\\[[a-z_.]{1,12}\\]\n|[a-z_]{1,16} = (-?[0-9]{1,12}|\"[a-z0-9 ]{0,8}\"|true|\\[\\])\n|.{0,20}\n){0,12}") {
            if let Ok(c) = Config::from_toml(&text, Path::new("fuzz.toml")) {
                let _ = c.validate();
            }
        }
    }
}

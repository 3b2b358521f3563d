//! The etcd key layout under `/switchyard/<cluster>/` and the JSON records stored there.
//!
//! It owns every key name and value shape the cluster writes or reads, so that what
//! `etcdctl get --prefix /switchyard/<cluster>/` prints is defined in one place (docs/cluster.md
//! documents the same shapes). It must never talk to etcd: callers do the I/O.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use switchyard_core::policy::PluginBinding;
pub use switchyard_proto::partition::Moved;

/// A `config` value that does not validate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A field is out of range, or the JSON does not parse.
    #[error("invalid config value for `{field}`: {message}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// Key names of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// Keys of cluster `name`.
    pub fn new(name: &str) -> Self {
        Self { root: format!("/switchyard/{name}/") }
    }

    /// `/switchyard/<cluster>/`: everything.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// `nodes/` prefix.
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.root)
    }

    /// `nodes/<id>`.
    pub fn node(&self, id: &str) -> String {
        format!("{}nodes/{id}", self.root)
    }

    /// The election name (etcd's election API appends `/<lease>`).
    pub fn election(&self) -> String {
        format!("{}election", self.root)
    }

    /// `leader`.
    pub fn leader(&self) -> String {
        format!("{}leader", self.root)
    }

    /// `partition-map`.
    pub fn map(&self) -> String {
        format!("{}partition-map", self.root)
    }

    /// `load/` prefix.
    pub fn loads(&self) -> String {
        format!("{}load/", self.root)
    }

    /// `load/<id>`.
    pub fn load(&self, id: &str) -> String {
        format!("{}load/{id}", self.root)
    }

    /// `reach/` prefix.
    pub fn reaches(&self) -> String {
        format!("{}reach/", self.root)
    }

    /// `reach/<id>`.
    pub fn reach(&self, id: &str) -> String {
        format!("{}reach/{id}", self.root)
    }

    /// `moves/` prefix: operators' move requests (see `move_requests.rs`).
    pub fn moves(&self) -> String {
        format!("{}moves/", self.root)
    }

    /// `moves/<partition>`.
    pub fn move_request(&self, partition: u32) -> String {
        format!("{}moves/{partition}", self.root)
    }

    /// `config`.
    pub fn config(&self) -> String {
        format!("{}config", self.root)
    }
}

/// RFC 3339 UTC time with milliseconds, as every record shows times.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `nodes/<id>`: a live member (under its lease).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id.
    pub id: String,
    /// URL clients connect to (`/ws`, the HTTP API).
    pub url: String,
    /// URL peers connect to (the same listener today).
    pub peer_url: String,
    /// Router version.
    pub version: String,
    /// When this process started.
    pub started_at: String,
    /// Partition count the node is configured with.
    pub partitions: u32,
    /// True once the node is shutting down: it stays a member until it exits, but the
    /// leader gives it no partitions and moves the ones it has to the other members.
    #[serde(default)]
    pub draining: bool,
}

/// `reach/<id>`: the peers a node's links reach (under its lease), rewritten when the set
/// changes. The leader moves leadership away from a node most others cannot reach.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReachRecord {
    /// Ids of the members whose peer link from this node is up, sorted.
    pub reachable: Vec<String>,
    /// When the set last changed.
    #[serde(default)]
    pub since: String,
    /// Whether this node's store can write: the leader moves leadership and replicas away
    /// from a node that cannot, like from one most others cannot reach.
    #[serde(default)]
    pub store: StoreState,
}

/// A node's store as its `reach/<id>` report says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreState {
    /// Writes work (also what a report without the field means).
    #[default]
    Ok,
    /// Free space is below the reserve: writes are refused until it is back.
    NoSpace,
    /// A write failed; the node is stopping.
    Failed,
    /// It leads a partition whose log lost batches an in-sync follower holds (a journal
    /// repair at start-up dropped them): the leadership must move to that follower.
    LostTail,
    /// A read met damaged data in its store (a bad table block): its partitions are served
    /// from healthy replicas until an operator rebuilds its data (like a Kafka broker whose
    /// log directory went offline).
    Damaged,
}

impl StoreState {
    /// True when the node can take writes.
    pub fn writable(self) -> bool {
        self == StoreState::Ok
    }
}

/// `leader`: who leads and since when (under the leader's lease).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// Leader node id.
    pub node: String,
    /// The create revision of its election key: grows with every new leader.
    pub term: i64,
    /// When it became leader.
    pub since: String,
}

/// `partition-map`: the owner of every partition, written only by the leader in a fenced
/// transaction. `owners[p]` owns partition `p`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapRecord {
    /// Version; every published map has the previous epoch + 1.
    pub epoch: u64,
    /// P, fixed when the cluster was created.
    pub partitions: u32,
    /// The leader that wrote it.
    pub leader: String,
    /// That leader's term.
    pub term: i64,
    /// When it was written.
    pub updated_at: String,
    /// Partitions per node, for reading at a glance.
    pub counts: BTreeMap<String, u32>,
    /// Owner node id of every partition, indexed by partition.
    pub owners: Vec<String>,
    /// For each partition, by id, the last time its owner changed from one node to
    /// another: the previous owner and the epoch of the map that made the change (see
    /// [`switchyard_proto::partition::PartitionMap::moved`]). Absent when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub moved: BTreeMap<u32, Moved>,
    /// Replicas of every partition, the leader (its owner) first. Absent when
    /// `replicas = 1`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<Vec<String>>,
    /// In-sync replicas of every partition, the leader first. Partition leaders change
    /// their entry by a compare-and-swap of this key fenced by their leader epoch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isr: Vec<Vec<String>>,
    /// Leader epoch of every partition: bumped by every change of its leader.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leader_epochs: Vec<u64>,
}

impl MapRecord {
    /// Pretty JSON, as stored: one field per line, the owners eight to a line so that
    /// `etcdctl get` shows the whole map on one screen, and one `moved` entry per line.
    pub fn to_json(&self) -> String {
        let head = Self {
            owners: Vec::new(),
            moved: BTreeMap::new(),
            replicas: Vec::new(),
            isr: Vec::new(),
            leader_epochs: Vec::new(),
            ..self.clone()
        };
        let text = serde_json::to_string_pretty(&head).expect("map serializes");
        let rows: Vec<String> = self
            .owners
            .chunks(8)
            .map(|row| {
                let cells: Vec<String> =
                    row.iter().map(|o| serde_json::to_string(o).expect("string serializes")).collect();
                format!("    {}", cells.join(", "))
            })
            .collect();
        let owners = if rows.is_empty() { "[]".to_string() } else { format!("[\n{}\n  ]", rows.join(",\n")) };
        let mut tail = format!("\"owners\": {owners}");
        if !self.moved.is_empty() {
            let rows: Vec<String> = self
                .moved
                .iter()
                .map(|(p, m)| format!("    \"{p}\": {}", serde_json::to_string(m).expect("move serializes")))
                .collect();
            tail.push_str(&format!(",\n  \"moved\": {{\n{}\n  }}", rows.join(",\n")));
        }
        // Replication: one row of eight partitions per line, like the owners.
        fn table<T: Serialize>(name: &str, cells: &[T]) -> String {
            let lines: Vec<String> = cells
                .chunks(8)
                .map(|row| {
                    let row: Vec<String> =
                        row.iter().map(|c| serde_json::to_string(c).expect("cells serialize")).collect();
                    format!("    {}", row.join(", "))
                })
                .collect();
            format!(",\n  \"{name}\": [\n{}\n  ]", lines.join(",\n"))
        }
        if !self.replicas.is_empty() {
            tail.push_str(&table("replicas", &self.replicas));
            tail.push_str(&table("isr", &self.isr));
            tail.push_str(&table("leader_epochs", &self.leader_epochs));
        }
        // `owners` is the last field `head` prints (`moved` is skipped when empty).
        text.replacen("\"owners\": []", &tail, 1)
    }

    /// Partitions per owner.
    pub fn count(owners: &[String]) -> BTreeMap<String, u32> {
        let mut counts = BTreeMap::new();
        for o in owners {
            *counts.entry(o.clone()).or_default() += 1;
        }
        counts
    }
}

/// One partition's figures in a load report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionLoad {
    /// Messages per second published since the previous report.
    pub msg_rate: f64,
    /// Payload bytes stored.
    pub bytes: u64,
    /// Live subscriptions on its channels.
    pub subscribers: u64,
}

/// `load/<id>`: a node's load (under its lease), for the balancer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadRecord {
    /// Node id.
    pub node: String,
    /// When it was measured.
    pub at: String,
    /// Client connections.
    pub connections: u64,
    /// Sum over its partitions.
    pub msg_rate: f64,
    /// Sum over its partitions.
    pub bytes: u64,
    /// Figures of each partition it owns, by partition id.
    pub partitions: BTreeMap<u32, PartitionLoad>,
}

/// Default retention limits settable at run time (applied to the `defaults` namespace).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionLimits {
    /// Most messages kept per channel (0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_size: Option<u64>,
    /// Longest a message is kept (0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub history_ttl: Option<Duration>,
    /// Most stored bytes per channel (0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_bytes: Option<u64>,
}

/// `config`: the dynamic configuration operators write with `etcdctl put`. Every field is
/// optional; an absent field keeps the node's file value.
///
/// ```json
/// {"coordination_interval": "2s", "max_moves": 8,
///  "balancer": {"plugin": "load-aware", "params": {}},
///  "retention": {"history_size": 1000, "history_ttl": "1h"}}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicConfig {
    /// How often the leader runs a round.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub coordination_interval: Option<Duration>,
    /// Most moves of partitions with a live owner per round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_moves: Option<u32>,
    /// The balancing plugin and its params; absent = the file's `balancer`, or built-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer: Option<PluginBinding>,
    /// Default retention limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionLimits>,
}

impl DynamicConfig {
    /// Parses and validates a `config` value.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let c: Self = serde_json::from_slice(bytes)
            .map_err(|e| ConfigError::Invalid { field: "config".into(), message: e.to_string() })?;
        let invalid = |field: &str, message: &str| {
            Err(ConfigError::Invalid { field: format!("config.{field}"), message: message.into() })
        };
        if c.coordination_interval.is_some_and(|d| d < Duration::from_millis(100)) {
            return invalid("coordination_interval", "must be at least 100ms");
        }
        if let Some(b) = &c.balancer {
            let stem_ok = !b.plugin.is_empty()
                && b.plugin.len() <= 128
                && b.plugin.bytes().all(|x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'-' | b'.'));
            if !stem_ok {
                return invalid("balancer.plugin", "must be a plugin file stem of [A-Za-z0-9_.-]");
            }
            if !b.params.is_object() {
                return invalid("balancer.params", "must be an object");
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_config_parses_and_rejects() {
        let c = DynamicConfig::parse(
            br#"{"coordination_interval":"2s","max_moves":3,"balancer":{"plugin":"load-aware"},
                "retention":{"history_size":10,"history_ttl":"1h"}}"#,
        )
        .unwrap();
        assert_eq!(c.coordination_interval, Some(Duration::from_secs(2)));
        assert_eq!(c.max_moves, Some(3));
        assert_eq!(c.balancer.unwrap().params, serde_json::json!({}));
        assert_eq!(c.retention.unwrap().history_ttl, Some(Duration::from_secs(3600)));
        assert_eq!(DynamicConfig::parse(b"{}").unwrap(), DynamicConfig::default());
        for bad in [
            &b"{not json"[..],
            br#"{"max_moves":"many"}"#,
            br#"{"bogus":1}"#,
            br#"{"coordination_interval":"1ms"}"#,
            br#"{"balancer":{"plugin":"../x"}}"#,
            br#"{"retention":{"history_size":-1}}"#,
        ] {
            assert!(DynamicConfig::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn map_json_is_the_documented_shape() {
        let owners = vec!["a".to_string(), "b".into(), "a".into()];
        let m = MapRecord {
            epoch: 3,
            partitions: 3,
            leader: "a".into(),
            term: 42,
            updated_at: timestamp(SystemTime::UNIX_EPOCH),
            counts: MapRecord::count(&owners),
            owners,
            moved: BTreeMap::new(),
            replicas: Vec::new(),
            isr: Vec::new(),
            leader_epochs: Vec::new(),
        };
        assert!(!m.to_json().contains("moved"), "no moves, no field: {}", m.to_json());
        let v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(serde_json::from_value::<MapRecord>(v.clone()).unwrap(), m);
        let many = MapRecord { owners: vec!["n1".into(); 20], ..m.clone() };
        assert_eq!(serde_json::from_str::<MapRecord>(&many.to_json()).unwrap(), many);
        let rows = many.to_json().lines().filter(|l| l.trim_start().starts_with("\"n1\", ")).count();
        assert_eq!(rows, 3, "{}", many.to_json());
        assert_eq!(v["epoch"], 3);
        assert_eq!(v["counts"]["a"], 2);
        assert_eq!(v["owners"][1], "b");
        assert_eq!(v["updated_at"], "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn map_json_round_trips_with_moves() {
        let owners: Vec<String> = (0..10).map(|i| format!("n{}", i % 3)).collect();
        let mut moved = BTreeMap::new();
        moved.insert(2, Moved { from: "n0".into(), epoch: 4 });
        moved.insert(9, Moved { from: "old \"quoted\" node".into(), epoch: 5 });
        let m = MapRecord {
            epoch: 5,
            partitions: 10,
            leader: "n1".into(),
            term: 7,
            updated_at: timestamp(SystemTime::UNIX_EPOCH),
            counts: MapRecord::count(&owners),
            owners,
            moved,
            replicas: Vec::new(),
            isr: Vec::new(),
            leader_epochs: Vec::new(),
        };
        let text = m.to_json();
        assert_eq!(serde_json::from_str::<MapRecord>(&text).unwrap(), m, "{text}");
        // The same value serde itself writes, and the shape documented.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v, serde_json::to_value(&m).unwrap());
        assert_eq!(v["moved"]["2"], serde_json::json!({"from": "n0", "epoch": 4}));
        // Owners still eight to a line, one move per line.
        assert!(text.contains("\"owners\": [\n    \"n0\", \"n1\", \"n2\", \"n0\", \"n1\", \"n2\", \"n0\", \"n1\",\n    \"n2\", \"n0\"\n  ],"));
        assert!(text.lines().any(|l| l == r#"    "2": {"from":"n0","epoch":4},"#), "{text}");
        assert!(text.trim_end().ends_with('}'));
    }

    #[test]
    fn map_records_of_older_and_newer_writers_read() {
        // Written before `moved` existed: no moves.
        let old = r#"{"epoch":1,"partitions":1,"leader":"a","term":1,"updated_at":"","counts":{"a":1},"owners":["a"]}"#;
        let m: MapRecord = serde_json::from_str(old).unwrap();
        assert!(m.moved.is_empty());
        // Fields a newer writer adds are ignored, as before.
        let new = r#"{"epoch":1,"partitions":1,"leader":"a","term":1,"updated_at":"","counts":{},"owners":["a"],
            "moved":{"0":{"from":"b","epoch":1}},"future":true}"#;
        let m: MapRecord = serde_json::from_str(new).unwrap();
        assert_eq!(m.moved[&0], Moved { from: "b".into(), epoch: 1 });
    }

    #[test]
    fn node_record_draining_defaults_to_false() {
        let text = r#"{"id":"a","url":"u","peer_url":"u","version":"1","started_at":"t","partitions":8}"#;
        let n: NodeRecord = serde_json::from_str(text).unwrap();
        assert!(!n.draining);
        let n = NodeRecord { draining: true, ..n };
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(v["draining"], true);
        assert_eq!(serde_json::from_value::<NodeRecord>(v).unwrap(), n);
    }
}

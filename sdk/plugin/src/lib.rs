//! Switchyard policy ABI (v1 and v2): the types shared by the router (host) and policy plugins
//! (guest), and the guest-side glue that exports plain Rust functions.
//!
//! This crate owns the data that crosses the policy boundary: what a retention, compaction
//! or balancing policy is shown, and what it may answer. The router's built-in policies
//! and WebAssembly plugins consume and produce exactly these types, so a policy behaves
//! the same whichever side implements it. `README.md` documents the ABI for other
//! languages. It must never depend on the router or do I/O: it is compiled for `wasm32` too.
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};

pub mod balance;
pub mod balance_v2;
pub mod fx;
pub mod guest;
pub mod log;
pub mod v2;

pub use balance_v2::{BalanceView, Placement};
pub use guest::NoParams;
pub use v2::{Bitmap, ChannelView, Message, Removals};

/// Metadata of one stored message, as a policy sees it up front (never the payload itself:
/// a v2 policy reads that on demand with [`ChannelView::payload`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageMeta {
    /// Offset of the message in its channel (starts at 1, rises by 1).
    pub offset: u64,
    /// Milliseconds since the Unix epoch at which the owner accepted the message.
    pub ts: u64,
    /// Stored size of the message in bytes (payload and metadata).
    pub size: u32,
    /// Compaction key given by the publisher, if any.
    pub key: Option<String>,
    /// True when the payload is JSON `null`: a delete marker for its key.
    pub tombstone: bool,
}

/// Counters of one channel's retained log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStats {
    /// Lowest offset that may still be retained (messages below it are gone).
    pub first_offset: u64,
    /// Highest offset ever assigned (the channel top); 0 for an empty new channel.
    pub last_offset: u64,
    /// Number of retained messages.
    pub count: u64,
    /// Stored bytes of the retained messages.
    pub bytes: u64,
}

/// What a retention policy is shown for one channel in one round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionInput {
    /// Channel name.
    pub channel: String,
    /// The channel's counters.
    pub stats: ChannelStats,
    /// Metadata of the oldest retained messages, oldest first (a bounded prefix of the log).
    pub oldest: Vec<MessageMeta>,
    /// Current time in milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// A retention policy's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetentionDecision {
    /// Drop nothing this round.
    Keep,
    /// Drop every message with an offset below this one. It may not exceed `last_offset + 1`.
    DropBelow(u64),
}

/// What a compaction policy is shown for one channel in one round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionInput {
    /// Channel name.
    pub channel: String,
    /// Metadata of the keyed messages in the compaction window, oldest first.
    pub window: Vec<MessageMeta>,
    /// Current time in milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// A compaction policy's answer: offsets to remove. Each must be one shown in the window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionDecision {
    /// Offsets to remove from the channel, in any order.
    pub remove: Vec<u64>,
}

/// The name of the export that marks a module as ABI v1.
pub const ABI_V1_MARKER: &str = "switchyard_abi_v1";
/// The name of the export that marks a module as ABI v2.
pub const ABI_V2_MARKER: &str = "switchyard_abi_v2";
/// The v2 host import that reads a message's key: `(index: i32, ptr: i32, cap: i32) -> i32`.
pub const KEY_IMPORT: &str = "key";
/// The v2 host import that reads a message's stored JSON payload: `(index: i32, ptr: i32,
/// cap: i32) -> i32`.
pub const PAYLOAD_IMPORT: &str = "payload";
/// The guest allocator export: `(len: i32) -> i32`.
pub const ALLOC_EXPORT: &str = "switchyard_alloc";
/// The retention entry point: `(ptr: i32, len: i32) -> i64`.
pub const RETENTION_EXPORT: &str = "switchyard_retention";
/// The compaction entry point: `(ptr: i32, len: i32) -> i64`.
pub const COMPACTION_EXPORT: &str = "switchyard_compaction";
/// The balancing entry point: `(ptr: i32, len: i32) -> i64`.
pub const BALANCE_EXPORT: &str = "switchyard_balance";
/// The host import module name.
pub const HOST_MODULE: &str = "switchyard";
/// The host log import: `(level: i32, ptr: i32, len: i32)`.
pub const LOG_IMPORT: &str = "log";

/// One call's input as the host encodes it (postcard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call<I> {
    /// The binding's params as JSON object text (`"{}"` when none).
    pub params: String,
    /// The policy input.
    pub input: I,
}

/// What a guest answers (postcard): its decision, or its own error message.
pub type GuestResult<O> = Result<O, String>;

/// Load of one live node, as the leader reads it from the node's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// Failure zone (empty when unknown).
    pub zone: String,
    /// Relative capacity (1.0 = a standard node).
    pub weight: f64,
    /// Messages per second over all its partitions.
    pub msg_rate: f64,
    /// Bytes stored.
    pub bytes: u64,
    /// Client connections.
    pub connections: u64,
}

/// One partition's load and current owner.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionInfo {
    /// Partition index.
    pub id: u32,
    /// Current owner node id, if any.
    pub owner: Option<String>,
    /// Messages per second.
    pub msg_rate: f64,
    /// Bytes stored.
    pub bytes: u64,
    /// Subscribers (connections) on its channels.
    pub connections: u64,
}

/// What a balancing policy is shown in one coordination round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BalanceInput {
    /// Live nodes.
    pub nodes: Vec<NodeInfo>,
    /// Every partition, indexed by id (`partitions[i].id == i`).
    pub partitions: Vec<PartitionInfo>,
    /// Most partitions whose owner may change this round (partitions without a live owner
    /// must be placed and do not count).
    pub max_moves: u32,
    /// Current time in milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// A balancing policy's answer: the owner node id of every partition, indexed by partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceDecision {
    /// `owners[i]` owns partition `i`; each must be a live node.
    pub owners: Vec<String>,
}

/// Replica placement shown to a balancer with its [`BalanceInput`]: ABI v2 only (a v1
/// plugin never sees it, and the router places its followers itself). Host side; not part
/// of the v1 postcard wire.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaInput {
    /// Copies each partition should have, leader included (1: no followers).
    pub replicas: u32,
    /// `followers[i]`: partition i's current followers (node ids, in the map's order; they
    /// may name nodes that are no longer live).
    pub followers: Vec<Vec<String>>,
}

/// A balancer's whole answer as the router uses it: the owners and, when the policy placed
/// them (ABI v2 only), the followers. Host side; not part of the v1 postcard wire.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalancePlan {
    /// The owner of every partition.
    pub decision: BalanceDecision,
    /// `followers[i]`: partition i's followers; None when the router places them.
    pub followers: Option<Vec<Vec<String>>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use std::fmt::Debug;

    fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
        let bytes = postcard::to_stdvec(value).unwrap();
        let back: T = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(&back, value);
    }

    fn meta(offset: u64, key: Option<&str>, tombstone: bool) -> MessageMeta {
        MessageMeta { offset, ts: 1_700_000_000_000 + offset, size: 120, key: key.map(String::from), tombstone }
    }

    fn retention_input() -> RetentionInput {
        RetentionInput {
            channel: "chat.room1".into(),
            stats: ChannelStats { first_offset: 3, last_offset: 99, count: 97, bytes: 97 * 120 },
            oldest: vec![meta(3, None, false), meta(4, Some("k"), false), meta(5, Some("k"), true)],
            now_ms: 1_700_000_123_456,
        }
    }

    fn compaction_input() -> CompactionInput {
        CompactionInput {
            channel: "state.x".into(),
            window: vec![meta(7, Some("a"), false), meta(9, Some("a"), true), meta(10, Some("é"), false)],
            now_ms: 5,
        }
    }

    fn balance_input() -> BalanceInput {
        BalanceInput {
            nodes: vec![
                NodeInfo {
                    id: "n1".into(),
                    zone: "z1".into(),
                    weight: 1.0,
                    msg_rate: 12.5,
                    bytes: 1 << 40,
                    connections: 3,
                },
                NodeInfo { id: "n2".into(), zone: String::new(), weight: 0.5, msg_rate: 0.0, bytes: 0, connections: 0 },
            ],
            partitions: vec![
                PartitionInfo { id: 0, owner: Some("n1".into()), msg_rate: 12.5, bytes: 10, connections: 3 },
                PartitionInfo { id: 1, owner: None, msg_rate: 0.0, bytes: 0, connections: 0 },
            ],
            max_moves: 4,
            now_ms: 42,
        }
    }

    #[test]
    fn abi_types_roundtrip_through_postcard() {
        roundtrip(&Call { params: r#"{"count":1000}"#.to_string(), input: retention_input() });
        roundtrip(&Call { params: "{}".to_string(), input: compaction_input() });
        roundtrip(&Call { params: "{}".to_string(), input: balance_input() });
        roundtrip(&Call { params: "{}".to_string(), input: RetentionInput { oldest: vec![], ..retention_input() } });
        roundtrip::<GuestResult<RetentionDecision>>(&Ok(RetentionDecision::Keep));
        roundtrip::<GuestResult<RetentionDecision>>(&Ok(RetentionDecision::DropBelow(u64::MAX)));
        roundtrip::<GuestResult<CompactionDecision>>(&Ok(CompactionDecision { remove: vec![7, 9] }));
        roundtrip::<GuestResult<BalanceDecision>>(&Ok(BalanceDecision { owners: vec!["n1".into(), "n2".into()] }));
        roundtrip::<GuestResult<BalanceDecision>>(&Err("no live nodes".into()));
    }

    /// Pins the wire bytes of a few values, so an accidental change of a type's shape (which
    /// would break plugins built against an older SDK) fails here.
    #[test]
    fn wire_format_is_stable() {
        // Result: varint tag 0 = Ok, 1 = Err; enum: varint variant index; u64: varint.
        assert_eq!(
            postcard::to_stdvec::<GuestResult<RetentionDecision>>(&Ok(RetentionDecision::Keep)).unwrap(),
            [0, 0]
        );
        assert_eq!(
            postcard::to_stdvec::<GuestResult<RetentionDecision>>(&Ok(RetentionDecision::DropBelow(300))).unwrap(),
            [0, 1, 0xac, 0x02]
        );
        assert_eq!(postcard::to_stdvec::<GuestResult<CompactionDecision>>(&Err("x".into())).unwrap(), [1, 1, b'x']);
        let call = Call {
            params: "{}".to_string(),
            input: RetentionInput { channel: "c".into(), stats: ChannelStats::default(), oldest: vec![], now_ms: 1 },
        };
        assert_eq!(postcard::to_stdvec(&call).unwrap(), [2, b'{', b'}', 1, b'c', 0, 0, 0, 0, 0, 1]);
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default)]
    struct Optional {
        count: u64,
        ratio: Option<f64>,
    }

    #[derive(Debug, serde::Deserialize)]
    struct Required {
        count: u64,
    }

    fn encoded(params: &str) -> Vec<u8> {
        postcard::to_stdvec(&Call { params: params.to_string(), input: retention_input() }).unwrap()
    }

    #[test]
    fn guest_call_parses_params_and_reports_errors() {
        let keep_n = |i: &RetentionInput, p: &Optional| {
            assert!(p.ratio.is_none());
            RetentionDecision::DropBelow(i.stats.first_offset + p.count)
        };
        // Empty and `{}` params give the defaults.
        assert_eq!(guest::call(&encoded("{}"), keep_n), Ok(RetentionDecision::DropBelow(3)));
        assert_eq!(guest::call(&encoded(""), keep_n), Ok(RetentionDecision::DropBelow(3)));
        assert_eq!(guest::call(&encoded(r#"{"count":2}"#), keep_n), Ok(RetentionDecision::DropBelow(5)));

        let required = |_: &RetentionInput, p: &Required| RetentionDecision::DropBelow(p.count);
        let err = guest::call(&encoded("{}"), required).unwrap_err();
        assert!(err.contains("invalid params") && err.contains("count"), "{err}");
        let err = guest::call(&encoded(r#"{"count":"x"}"#), required).unwrap_err();
        assert!(err.contains("invalid params"), "{err}");

        // No params at all.
        let none = |_: &RetentionInput, _: &NoParams| RetentionDecision::Keep;
        assert_eq!(guest::call(&encoded(r#"{"anything":[1,2]}"#), none), Ok(RetentionDecision::Keep));

        // Undecodable input is an error, not a panic.
        let err = guest::call::<RetentionInput, NoParams, RetentionDecision, _>(&[0xff, 0xff], none).unwrap_err();
        assert!(err.contains("undecodable input"), "{err}");

        // A policy may report its own failure.
        let failing = |_: &RetentionInput, _: &NoParams| -> Result<RetentionDecision, String> { Err("nope".into()) };
        assert_eq!(guest::call(&encoded("{}"), failing), Err("nope".to_string()));

        // The answer encodes as the host decodes it.
        let bytes = guest::encode(&guest::call(&encoded(r#"{"count":2}"#), keep_n)).unwrap();
        assert_eq!(
            postcard::from_bytes::<GuestResult<RetentionDecision>>(&bytes).unwrap(),
            Ok(RetentionDecision::DropBelow(5))
        );
    }

    fn retention_fn(_: &RetentionInput, _: &Required) -> RetentionDecision {
        RetentionDecision::Keep
    }
    fn compaction_fn(_: &CompactionInput, _: &NoParams) -> Result<CompactionDecision, String> {
        Ok(CompactionDecision::default())
    }
    fn balance_fn(_: &BalanceInput, _: &Optional) -> BalanceDecision {
        BalanceDecision::default()
    }
    fn retention_v2(_: &ChannelView<'_>, _: &Required) -> RetentionDecision {
        RetentionDecision::Keep
    }
    fn compaction_v2(_: &ChannelView<'_>, _: &NoParams) -> Result<Removals, String> {
        Ok(Removals::Offsets(vec![]))
    }
    // The macros expand natively to a signature check only.
    crate::export_retention_v1!(retention_fn);
    crate::export_compaction_v1!(compaction_fn);
    crate::export_balance_v1!(balance_fn);
    mod v2_exports {
        use super::*;
        fn balance_v2(_: &BalanceView<'_>, _: &NoParams) -> Placement {
            Placement::default()
        }
        crate::export_balance!(balance_v2);
        crate::export_retention!(retention_v2);
        crate::export_compaction!(compaction_v2);
    }

    #[test]
    fn log_macro_prints_natively() {
        crate::log!(info, "kept {} of {}", 3, 10);
        crate::log!(error, "plain");
        crate::log!(trace, "{:?}", Level::Trace);
        use crate::log::Level;
    }
}

//! Switchyard policy ABI v1: the types shared by the router (host) and policy plugins
//! (guest), and the guest-side glue that exports plain Rust functions.
//!
//! This crate owns the data that crosses the policy boundary: what a retention, compaction
//! or balancing policy is shown, and what it may answer. The router's built-in policies
//! and WebAssembly plugins consume and produce exactly these types, so a policy behaves
//! the same whichever side implements it. `README.md` documents the ABI for other
//! languages. It must never depend on the router or do I/O: it is compiled for `wasm32` too.
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};

/// Metadata of one stored message, as a policy sees it (never the payload itself).
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

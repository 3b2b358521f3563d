//! Switchyard policy ABI types, shared by the router (host) and policy plugins (guest).
//!
//! This crate owns the data that crosses the policy boundary: what a retention or
//! compaction policy is shown about a channel, and what it may answer. The router's
//! built-in policies and (from ABI v1 on) WebAssembly plugins consume and produce exactly
//! these types, so a policy behaves the same whichever side implements it.
//! It must never depend on the router or do I/O: it is compiled for `wasm32` too.
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

//! What a call sends: the inputs the host can give a plugin, their ABI v2 record form, and
//! the bound on an honest answer's size.
//!
//! It owns [`PolicyInput`] (postcard or v2 records per kind, and turning a v2 answer into
//! the kind's decision) and [`OutputBound`]. It must never touch wasmtime or guest memory:
//! the call path does, within these bounds.

use serde::{de::DeserializeOwned, Serialize};
use switchyard_sdk as abi;
use switchyard_sdk::v2;

use super::CallError;

/// The largest output a decision for this input can honestly need; anything longer is
/// refused before it is decoded, so a guest cannot make the host decode gigabytes.
pub trait OutputBound {
    /// Maximum output length in bytes.
    fn max_output(&self) -> usize;
}

/// One channel of a v2 call: the record kind, `now_ms` and the channel.
pub struct V2Call<'a> {
    /// [`v2::KIND_RETENTION`] or [`v2::KIND_COMPACTION`].
    pub kind: u32,
    /// Current time.
    pub now_ms: u64,
    /// The channel.
    pub channel: v2::ChannelIn<'a>,
}

/// An input the host can send to a plugin: postcard (ABI v1, and balance in v2) or v2
/// records, with the decision type it answers.
pub trait PolicyInput: Serialize + OutputBound {
    /// The decision.
    type Output: DeserializeOwned;
    /// The v2 record form of this input; None when the kind keeps postcard in v2 (balance).
    fn v2(&self) -> Option<V2Call<'_>>;
    /// The decision from a v2 answer for this input.
    fn decision_from_v2(&self, answer: v2::Answer) -> Result<Self::Output, CallError>;
}

/// Compaction inputs carry no counters: v2 sends zeros.
static ZERO_STATS: abi::ChannelStats = abi::ChannelStats { first_offset: 0, last_offset: 0, count: 0, bytes: 0 };

impl PolicyInput for abi::RetentionInput {
    type Output = abi::RetentionDecision;
    fn v2(&self) -> Option<V2Call<'_>> {
        let channel = v2::ChannelIn { name: &self.channel, stats: &self.stats, messages: &self.oldest };
        Some(V2Call { kind: v2::KIND_RETENTION, now_ms: self.now_ms, channel })
    }
    fn decision_from_v2(&self, answer: v2::Answer) -> Result<Self::Output, CallError> {
        match answer {
            v2::Answer::Retention(d) => Ok(d),
            v2::Answer::Compaction(_) => Err(CallError::Garbage("a compaction answer to a retention call".into())),
        }
    }
}

impl PolicyInput for abi::CompactionInput {
    type Output = abi::CompactionDecision;
    fn v2(&self) -> Option<V2Call<'_>> {
        let channel = v2::ChannelIn { name: &self.channel, stats: &ZERO_STATS, messages: &self.window };
        Some(V2Call { kind: v2::KIND_COMPACTION, now_ms: self.now_ms, channel })
    }
    fn decision_from_v2(&self, answer: v2::Answer) -> Result<Self::Output, CallError> {
        match answer {
            v2::Answer::Compaction(r) => Ok(v2::removals_to_decision(&r, &self.window)),
            v2::Answer::Retention(_) => Err(CallError::Garbage("a retention answer to a compaction call".into())),
        }
    }
}

impl PolicyInput for abi::BalanceInput {
    type Output = abi::BalanceDecision;
    fn v2(&self) -> Option<V2Call<'_>> {
        None
    }
    fn decision_from_v2(&self, _: v2::Answer) -> Result<Self::Output, CallError> {
        Err(CallError::Garbage("balance answers are postcard".into()))
    }
}

/// Room for a guest error message on top of any decision.
pub(super) const ERROR_ROOM: usize = 1024;

impl OutputBound for abi::RetentionInput {
    fn max_output(&self) -> usize {
        ERROR_ROOM + 16
    }
}

impl OutputBound for abi::CompactionInput {
    fn max_output(&self) -> usize {
        ERROR_ROOM + 16 + 10 * self.window.len()
    }
}

impl OutputBound for abi::BalanceInput {
    fn max_output(&self) -> usize {
        let longest_id = self.nodes.iter().map(|n| n.id.len()).max().unwrap_or(0);
        ERROR_ROOM + 16 + self.partitions.len() * (longest_id + 5)
    }
}

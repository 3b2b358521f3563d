//! One call's store state: its limits, its log allowance, and the tables the ABI v2
//! imports read.
//!
//! It owns [`CallState`] (wasmtime's `StoreLimits` plus a note of which limit was hit and of
//! any import fault) and the key and payload tables of a v2 call's messages, by message
//! index. It must never read a payload up front: the payload table only names each message,
//! and `switchyard.payload` reads one when the guest asks for it.

use std::sync::Arc;

use switchyard_core::policy::Payloads;
use switchyard_sdk::v2;
use wasmtime::{ResourceLimiter, StoreLimits};

use super::imports::LogBudget;

/// Per-call store state: wasmtime's `StoreLimits` (memory cap, one instance, small
/// tables, growth failures trap) plus a note of which limit was hit, and the log budget.
pub(super) struct CallState {
    pub(super) plugin: Arc<str>,
    /// The host's per-plugin log windows.
    pub(super) log_budget: Arc<LogBudget>,
    pub(super) limits: StoreLimits,
    pub(super) max_memory: usize,
    pub(super) memory_hit: bool,
    pub(super) logs_left: u32,
    /// v2: the keys of this call's messages, for `switchyard.key`.
    pub(super) keys: KeyTable,
    /// v2: where `switchyard.payload` reads this call's messages from (None: the caller
    /// gave no payload source, and every in-range read answers -1).
    pub(super) payloads: Option<PayloadTable>,
    /// A host import refused the guest's arguments (an index or pointer out of range).
    pub(super) fault: Option<String>,
}

/// The keys of one v2 call's messages, by message index: one buffer and a span each.
#[derive(Default)]
pub(super) struct KeyTable {
    pub(super) bytes: Vec<u8>,
    /// `(start, len)` in `bytes`; `len == u32::MAX` for an unkeyed message.
    pub(super) spans: Vec<(u32, u32)>,
}

/// The messages of one v2 call, by message index, as `switchyard.payload` reads them: the
/// caller's payload source and what it needs to name each message (owned: the store keeps
/// it for the whole call).
pub(super) struct PayloadTable {
    /// Reads a payload from the store at the moment the guest asks.
    pub(super) source: Arc<dyn Payloads>,
    /// Per channel, ascending: the index of its first message and its name.
    channels: Vec<(u32, Arc<str>)>,
    /// Per message index: its offset.
    offsets: Vec<u64>,
    /// The last read, `(index, payload)`: a guest that asks again with a larger buffer gets
    /// the same bytes, without a second store read.
    pub(super) last: Option<(u32, Option<String>)>,
}

impl PayloadTable {
    /// The table of a v2 call's channels (index = position in the message table).
    pub(super) fn new(source: &Arc<dyn Payloads>, channels: &[v2::ChannelIn<'_>]) -> Self {
        let total = channels.iter().map(|c| c.messages.len()).sum();
        let mut t = PayloadTable {
            source: source.clone(),
            channels: Vec::with_capacity(channels.len()),
            offsets: Vec::with_capacity(total),
            last: None,
        };
        for c in channels {
            t.channels.push((t.offsets.len() as u32, Arc::from(c.name)));
            t.offsets.extend(c.messages.iter().map(|m| m.offset));
        }
        t
    }

    /// Channel name and offset of message `index` (None past the end).
    pub(super) fn locate(&self, index: u32) -> Option<(Arc<str>, u64)> {
        let offset = *self.offsets.get(index as usize)?;
        // The last channel starting at or before `index` (empty channels share a start).
        let c = self.channels.partition_point(|(start, _)| *start <= index).checked_sub(1)?;
        Some((self.channels[c].1.clone(), offset))
    }
}

impl ResourceLimiter for CallState {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.memory_hit = true;
        }
        self.limits.memory_growing(current, desired, maximum)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// The key table of a v2 call's messages (index = position in the message table).
pub(super) fn key_table(channels: &[v2::ChannelIn<'_>]) -> KeyTable {
    let total = channels.iter().map(|c| c.messages.len()).sum();
    let mut t = KeyTable { bytes: Vec::new(), spans: Vec::with_capacity(total) };
    for m in channels.iter().flat_map(|c| c.messages) {
        match &m.key {
            Some(k) => {
                t.spans.push((t.bytes.len() as u32, k.len() as u32));
                t.bytes.extend_from_slice(k.as_bytes());
            }
            None => t.spans.push((0, u32::MAX)),
        }
    }
    t
}

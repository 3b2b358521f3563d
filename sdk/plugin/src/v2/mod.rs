//! ABI v2: fixed-size little-endian records instead of postcard for retention and
//! compaction (balancing keeps the v1 postcard encoding). `README.md` specifies the layout
//! byte for byte; this module is its one implementation, used by both sides:
//!
//! - host side: [`input_len`] and [`encode_input`] write one call's input into the buffer
//!   the guest allocated; [`decode_output`] reads and checks the guest's answer;
//! - guest side: [`parse_input`] views the input buffer without copying (the message
//!   records are read in place as [`Message`]), [`encode_output`] writes the answer, and the
//!   [`export_retention!`](crate::export_retention) and
//!   [`export_compaction!`](crate::export_compaction) macros glue a plain function to them;
//! - natively, [`call_retention`] and [`call_compaction`] run a policy through the whole
//!   byte path (encode, view, run, answer, decode), for plugin unit tests.
//!
//! A policy sees a [`ChannelView`]: the channel's name and counters and its messages'
//! records (offset, ts, size, a 64-bit key hash, flags). A key string or a payload is read
//! only when asked for, with [`ChannelView::key`] and [`ChannelView::payload`] (on wasm32
//! through the host imports `switchyard.key` and `switchyard.payload`). It must never do
//! I/O: it is compiled for wasm32 too.
//!
//! The code is split by side. This file holds what both sides share: the layout's
//! constants, the records ([`Message`], [`Answer`], [`Removals`], [`Bitmap`]) and the
//! [`ChannelView`] a policy reads, with the little-endian byte helpers. `host` writes
//! inputs and reads outputs (the router); `guest` reads inputs and writes outputs (the
//! plugin); `native` runs both ends in one process for tests; `glue` is the wasm32
//! boundary (the exports, the export macros, the `switchyard.key` and `switchyard.payload`
//! imports). Every public item is re-exported here, so its path is `v2::NAME` whatever file
//! it lives in.

use std::borrow::Cow;

use crate::guest::IntoGuestResult;
use crate::{ChannelStats, CompactionInput, GuestResult, MessageMeta, RetentionDecision, RetentionInput};

mod glue;
mod guest;
mod host;
mod native;
#[cfg(test)]
mod tests;

#[cfg(not(feature = "abi-v1"))]
#[doc(hidden)]
pub use glue::abi_v2_enabled;
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub use glue::run;
#[cfg(all(target_arch = "wasm32", not(feature = "abi-v1")))]
pub use glue::switchyard_abi_v2;
#[doc(hidden)]
pub use glue::{check_compaction, check_retention};
use glue::{host_key, host_payload};
pub use guest::{encode_output, handle, handle_compaction, handle_retention, parse_input, Input};
pub use host::{decode_output, encode_input, input_len, max_output, removals_to_decision, ChannelIn, OutputError};
pub use native::{call_compaction, call_retention};

/// Input header length.
pub const HEADER_LEN: usize = 32;
/// One channel record.
pub const CHANNEL_LEN: usize = 48;
/// One message record.
pub const MESSAGE_LEN: usize = 32;
/// Output header length.
pub const OUTPUT_HEADER_LEN: usize = 8;
/// One result record in the output.
pub const RESULT_LEN: usize = 16;
/// The ABI number in the input header.
pub const ABI: u32 = 2;
/// `kind` of a retention call.
pub const KIND_RETENTION: u32 = 1;
/// `kind` of a compaction call.
pub const KIND_COMPACTION: u32 = 2;
/// Message flag: the payload is JSON `null` (a delete marker for its key).
pub const FLAG_TOMBSTONE: u32 = 1;
/// Message flag: the message has a key (`key_hash` is meaningful).
pub const FLAG_KEYED: u32 = 2;
/// Output status: result records follow.
pub const STATUS_OK: u32 = 0;
/// Output status: a UTF-8 error message follows.
pub const STATUS_ERROR: u32 = 1;
/// Compaction result form: a bitmap over the channel's messages.
pub const FORM_BITMAP: u32 = 0;
/// Compaction result form: a strictly ascending list of u64 offsets.
pub const FORM_OFFSETS: u32 = 1;

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn get64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at.checked_add(8)?)?.try_into().ok()?))
}
/// One message record, exactly as it lies in the input buffer (32 bytes, little-endian).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Message {
    /// Offset in the channel.
    pub offset: u64,
    /// Milliseconds since the Unix epoch at which the owner accepted it.
    pub ts: u64,
    /// 64-bit hash of the key (0 when unkeyed). Equal keys have equal hashes within a call.
    pub key_hash: u64,
    /// Stored size in bytes.
    pub size: u32,
    /// [`FLAG_TOMBSTONE`] | [`FLAG_KEYED`]; other bits are 0.
    pub flags: u32,
}

const _: () = assert!(std::mem::size_of::<Message>() == MESSAGE_LEN && std::mem::align_of::<Message>() == 8);

impl Message {
    /// True for a delete marker.
    pub fn tombstone(&self) -> bool {
        self.flags & FLAG_TOMBSTONE != 0
    }

    /// True when the message has a key.
    pub fn keyed(&self) -> bool {
        self.flags & FLAG_KEYED != 0
    }

    /// The record of a v1 message, with `hash` as its key hash.
    pub fn from_meta(m: &MessageMeta, hash: impl FnOnce(&str) -> u64) -> Self {
        let mut flags = if m.tombstone { FLAG_TOMBSTONE } else { 0 };
        let key_hash = match m.key.as_deref() {
            Some(k) => {
                flags |= FLAG_KEYED;
                hash(k)
            }
            None => 0,
        };
        Message { offset: m.offset, ts: m.ts, key_hash, size: m.size, flags }
    }
}

/// Where [`ChannelView::key`] and [`ChannelView::payload`] read from.
#[derive(Debug, Clone)]
enum Lazy<'a> {
    /// The host imports `switchyard.key` and `switchyard.payload` (wasm32).
    #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
    Host,
    /// Native: the v1 input's keys, one per message of this channel, and the payloads a
    /// test gave with [`ChannelView::with_payloads`] (none by default).
    Local { keys: Vec<Option<&'a str>>, payloads: Vec<Option<&'a str>> },
}

/// What a v2 retention or compaction policy sees of one channel.
#[derive(Debug, Clone)]
pub struct ChannelView<'a> {
    name: &'a str,
    stats: ChannelStats,
    messages: Cow<'a, [Message]>,
    now_ms: u64,
    /// Index of this channel's first message in the call's message table.
    base: u32,
    lazy: Lazy<'a>,
}

impl<'a> ChannelView<'a> {
    /// Channel name.
    pub fn name(&self) -> &str {
        self.name
    }

    /// The channel's counters (retention; all zero for compaction, as in v1).
    pub fn stats(&self) -> &ChannelStats {
        &self.stats
    }

    /// Retention: the oldest retained messages, oldest first (a bounded prefix of the log).
    /// Compaction: the keyed messages of the window, oldest first.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Current time in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// The key of `messages()[i]` (None when unkeyed or `i` is out of range). Costs a host
    /// call on wasm32: use [`Message::key_hash`] unless the string itself matters.
    pub fn key(&self, i: usize) -> Option<String> {
        if i >= self.messages.len() || !self.messages[i].keyed() {
            return None;
        }
        match &self.lazy {
            Lazy::Local { keys, .. } => keys.get(i).copied().flatten().map(String::from),
            Lazy::Host => host_key(self.base + i as u32),
        }
    }

    /// The stored JSON payload of `messages()[i]`, read from the store now: None when that
    /// message is no longer stored (retention or compaction removed it since the round's
    /// input was built), or `i` is out of range. Costs a host call and a store read on
    /// wasm32: decide from the records unless the payload itself matters. Natively, the
    /// payloads given with [`ChannelView::with_payloads`] (None without).
    pub fn payload(&self, i: usize) -> Option<String> {
        if i >= self.messages.len() {
            return None;
        }
        match &self.lazy {
            Lazy::Local { payloads, .. } => payloads.get(i).copied().flatten().map(String::from),
            Lazy::Host => host_payload(self.base + i as u32, self.messages[i].size),
        }
    }

    /// Native tests: this view with `payloads[i]` as the payload of `messages()[i]` (None
    /// for a message no longer stored). A view of a wasm32 call is returned unchanged.
    pub fn with_payloads(mut self, payloads: &[Option<&'a str>]) -> Self {
        if let Lazy::Local { payloads: mine, .. } = &mut self.lazy {
            *mine = payloads.to_vec();
        }
        self
    }

    /// A view of a v1 retention input (native tests), key hashes by [`crate::fx::hash_bytes`].
    pub fn from_retention(input: &'a RetentionInput) -> Self {
        Self::local(&input.channel, input.stats.clone(), &input.oldest, input.now_ms)
    }

    /// A view of a v1 compaction input (native tests), key hashes by [`crate::fx::hash_bytes`].
    pub fn from_compaction(input: &'a CompactionInput) -> Self {
        Self::local(&input.channel, ChannelStats::default(), &input.window, input.now_ms)
    }

    fn local(name: &'a str, stats: ChannelStats, metas: &'a [MessageMeta], now_ms: u64) -> Self {
        let messages = metas.iter().map(|m| Message::from_meta(m, |k| crate::fx::hash_bytes(k.as_bytes()))).collect();
        let lazy = Lazy::Local { keys: metas.iter().map(|m| m.key.as_deref()).collect(), payloads: Vec::new() };
        ChannelView { name, stats, messages: Cow::Owned(messages), now_ms, base: 0, lazy }
    }
}
/// Messages a compaction policy removes: a bitmap over the channel's messages (bit `i`
/// set removes `messages()[i]`), or a strictly ascending list of offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removals {
    /// One bit per message of the channel.
    Bitmap(Bitmap),
    /// Offsets to remove, strictly ascending, each one of the channel's shown messages.
    Offsets(Vec<u64>),
}

impl Removals {
    /// The offsets removed, ascending (for tests).
    pub fn offsets(&self, messages: &[Message]) -> Vec<u64> {
        match self {
            Removals::Bitmap(b) => b.ones().filter_map(|i| messages.get(i).map(|m| m.offset)).collect(),
            Removals::Offsets(o) => o.clone(),
        }
    }
}

/// A fixed-length bitmap, bit `i` in byte `i / 8` at position `i % 8` (LSB first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    bytes: Vec<u8>,
    len: usize,
}

impl Bitmap {
    /// `len` bits, all clear.
    pub fn new(len: usize) -> Self {
        Bitmap { bytes: vec![0; len.div_ceil(8)], len }
    }

    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets bit `i` (ignored past the end).
    pub fn set(&mut self, i: usize) {
        if i < self.len {
            self.bytes[i / 8] |= 1 << (i % 8);
        }
    }

    /// Bit `i`.
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.bytes[i / 8] & (1 << (i % 8)) != 0
    }

    /// Indices of the set bits, ascending.
    pub fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len).filter(|&i| self.get(i))
    }

    /// The raw bytes (`len.div_ceil(8)` of them).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl IntoGuestResult<Removals> for Removals {
    fn into_guest_result(self) -> GuestResult<Removals> {
        Ok(self)
    }
}
/// One channel's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Retention.
    Retention(RetentionDecision),
    /// Compaction.
    Compaction(Removals),
}

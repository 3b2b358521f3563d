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

use std::borrow::Cow;

use crate::guest::{parse_params, IntoGuestResult};
use crate::{
    ChannelStats, CompactionDecision, CompactionInput, GuestResult, MessageMeta, RetentionDecision, RetentionInput,
};
use serde::de::DeserializeOwned;

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

#[cfg(target_arch = "wasm32")]
fn host_key(index: u32) -> Option<String> {
    #[link(wasm_import_module = "switchyard")]
    unsafe extern "C" {
        #[link_name = "key"]
        fn switchyard_key(index: i32, ptr: i32, cap: i32) -> i32;
    }
    let mut buf = vec![0u8; 256];
    // SAFETY: the host writes at most `cap` bytes at `ptr`, inside `buf`.
    let len = unsafe { switchyard_key(index as i32, buf.as_mut_ptr() as usize as i32, buf.len() as i32) };
    if len < 0 {
        return None;
    }
    let len = len as usize;
    if len > buf.len() {
        buf = vec![0u8; len];
        // SAFETY: as above, with a buffer of the key's full length.
        unsafe { switchyard_key(index as i32, buf.as_mut_ptr() as usize as i32, buf.len() as i32) };
    }
    buf.truncate(len);
    String::from_utf8(buf).ok()
}

#[cfg(not(target_arch = "wasm32"))]
fn host_key(_index: u32) -> Option<String> {
    None
}

/// Reads message `index`'s payload through `switchyard.payload`, first into a buffer of
/// `hint` bytes (the stored size, which holds the payload), again at its full length if it
/// was longer.
#[cfg(target_arch = "wasm32")]
fn host_payload(index: u32, hint: u32) -> Option<String> {
    #[link(wasm_import_module = "switchyard")]
    unsafe extern "C" {
        #[link_name = "payload"]
        fn switchyard_payload(index: i32, ptr: i32, cap: i32) -> i32;
    }
    let mut buf = vec![0u8; (hint as usize).clamp(16, 1 << 20)];
    // SAFETY: the host writes at most `cap` bytes at `ptr`, inside `buf`.
    let len = unsafe { switchyard_payload(index as i32, buf.as_mut_ptr() as usize as i32, buf.len() as i32) };
    if len < 0 {
        return None;
    }
    let len = len as usize;
    if len > buf.len() {
        buf = vec![0u8; len];
        // SAFETY: as above, with a buffer of the payload's full length. The host answers
        // the same bytes (it keeps the last payload read), or -1.
        let again = unsafe { switchyard_payload(index as i32, buf.as_mut_ptr() as usize as i32, buf.len() as i32) };
        if again as usize != len {
            return None;
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).ok()
}

#[cfg(not(target_arch = "wasm32"))]
fn host_payload(_index: u32, _hint: u32) -> Option<String> {
    None
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

// === host side: the input ===

/// One channel as the host encodes it.
#[derive(Debug, Clone, Copy)]
pub struct ChannelIn<'a> {
    /// Channel name.
    pub name: &'a str,
    /// Counters (zero for compaction).
    pub stats: &'a ChannelStats,
    /// The messages shown.
    pub messages: &'a [MessageMeta],
}

/// Bytes [`encode_input`] writes for these channels and params.
pub fn input_len(params: &str, channels: &[ChannelIn<'_>]) -> usize {
    let messages: usize = channels.iter().map(|c| c.messages.len()).sum();
    let names: usize = channels.iter().map(|c| c.name.len()).sum();
    HEADER_LEN + CHANNEL_LEN * channels.len() + MESSAGE_LEN * messages + params.len() + names
}

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

/// Writes one call's input into `buf` (exactly [`input_len`] bytes); `hash` gives each key
/// its 64-bit hash. Panics when `buf` has another length or a count exceeds u32.
pub fn encode_input(
    buf: &mut [u8],
    kind: u32,
    now_ms: u64,
    params: &str,
    channels: &[ChannelIn<'_>],
    mut hash: impl FnMut(&str) -> u64,
) {
    assert_eq!(buf.len(), input_len(params, channels), "v2 input buffer length");
    let total: usize = channels.iter().map(|c| c.messages.len()).sum();
    let messages_at = HEADER_LEN + CHANNEL_LEN * channels.len();
    let params_at = messages_at + MESSAGE_LEN * total;
    put32(buf, 0, ABI);
    put32(buf, 4, kind);
    put64(buf, 8, now_ms);
    put32(buf, 16, params_at as u32);
    put32(buf, 20, params.len() as u32);
    put32(buf, 24, u32::try_from(channels.len()).expect("channels fit u32"));
    put32(buf, 28, u32::try_from(total).expect("messages fit u32"));
    buf[params_at..params_at + params.len()].copy_from_slice(params.as_bytes());
    let (mut name_at, mut index, mut at) = (params_at + params.len(), 0usize, messages_at);
    for (i, c) in channels.iter().enumerate() {
        let r = HEADER_LEN + CHANNEL_LEN * i;
        put64(buf, r, c.stats.first_offset);
        put64(buf, r + 8, c.stats.last_offset);
        put64(buf, r + 16, c.stats.count);
        put64(buf, r + 24, c.stats.bytes);
        put32(buf, r + 32, index as u32);
        put32(buf, r + 36, c.messages.len() as u32);
        put32(buf, r + 40, name_at as u32);
        put32(buf, r + 44, c.name.len() as u32);
        buf[name_at..name_at + c.name.len()].copy_from_slice(c.name.as_bytes());
        name_at += c.name.len();
        for m in c.messages {
            let rec = Message::from_meta(m, &mut hash);
            put64(buf, at, rec.offset);
            put64(buf, at + 8, rec.ts);
            put64(buf, at + 16, rec.key_hash);
            put32(buf, at + 24, rec.size);
            put32(buf, at + 28, rec.flags);
            at += MESSAGE_LEN;
        }
        index += c.messages.len();
    }
}

// === guest side: the input ===

/// One call's input as the guest sees it.
#[derive(Debug)]
pub struct Input<'a> {
    /// [`KIND_RETENTION`] or [`KIND_COMPACTION`].
    pub kind: u32,
    /// The binding's params as JSON text.
    pub params: &'a str,
    /// The channels, in the host's order.
    pub channels: Vec<ChannelView<'a>>,
}

/// Views an input buffer. The message records are read in place when the buffer is
/// 8-aligned (always on wasm32: `switchyard_alloc` aligns), copied otherwise.
pub fn parse_input(buf: &[u8]) -> Result<Input<'_>, String> {
    let bad = |what: &str| format!("malformed v2 input: {what}");
    let abi = get32(buf, 0).ok_or_else(|| bad("short header"))?;
    if abi != ABI {
        return Err(bad(&format!("abi {abi}")));
    }
    let kind = get32(buf, 4).ok_or_else(|| bad("header"))?;
    let now_ms = get64(buf, 8).ok_or_else(|| bad("header"))?;
    let (params_at, params_len) = (get32(buf, 16).unwrap_or(0) as usize, get32(buf, 20).unwrap_or(0) as usize);
    let (n_channels, n_messages) = (get32(buf, 24).unwrap_or(0) as usize, get32(buf, 28).unwrap_or(0) as usize);
    let str_at = |at: usize, len: usize| -> Result<&str, String> {
        let bytes = at.checked_add(len).and_then(|end| buf.get(at..end)).ok_or_else(|| bad("string range"))?;
        std::str::from_utf8(bytes).map_err(|_| bad("string not UTF-8"))
    };
    let params = str_at(params_at, params_len)?;
    let messages_at =
        n_channels.checked_mul(CHANNEL_LEN).and_then(|n| n.checked_add(HEADER_LEN)).ok_or_else(|| bad("channels"))?;
    let table = n_messages
        .checked_mul(MESSAGE_LEN)
        .and_then(|n| n.checked_add(messages_at))
        .and_then(|end| buf.get(messages_at..end))
        .ok_or_else(|| bad("message table"))?;
    let all: Cow<'_, [Message]> = messages_in_place(table).map(Cow::Borrowed).unwrap_or_else(|| {
        Cow::Owned(
            table
                .chunks_exact(MESSAGE_LEN)
                .map(|r| Message {
                    offset: get64(r, 0).unwrap_or(0),
                    ts: get64(r, 8).unwrap_or(0),
                    key_hash: get64(r, 16).unwrap_or(0),
                    size: get32(r, 24).unwrap_or(0),
                    flags: get32(r, 28).unwrap_or(0),
                })
                .collect(),
        )
    });
    let mut channels = Vec::with_capacity(n_channels);
    for i in 0..n_channels {
        let r = HEADER_LEN + CHANNEL_LEN * i;
        let field = |o: usize| get64(buf, r + o).unwrap_or(0);
        let stats = ChannelStats { first_offset: field(0), last_offset: field(8), count: field(16), bytes: field(24) };
        let (start, count) = (get32(buf, r + 32).unwrap_or(0) as usize, get32(buf, r + 36).unwrap_or(0) as usize);
        let name = str_at(get32(buf, r + 40).unwrap_or(0) as usize, get32(buf, r + 44).unwrap_or(0) as usize)?;
        let end = start.checked_add(count).filter(|&e| e <= all.len()).ok_or_else(|| bad("channel messages"))?;
        let messages = match &all {
            Cow::Borrowed(s) => Cow::Borrowed(&s[start..end]),
            Cow::Owned(v) => Cow::Owned(v[start..end].to_vec()),
        };
        channels.push(ChannelView { name, stats, messages, now_ms, base: start as u32, lazy: Lazy::Host });
    }
    Ok(Input { kind, params, channels })
}

/// The message table read in place, when `table` is 8-aligned on a little-endian target.
#[allow(unsafe_code)]
fn messages_in_place(table: &[u8]) -> Option<&[Message]> {
    if cfg!(target_endian = "big") || !(table.as_ptr() as usize).is_multiple_of(std::mem::align_of::<Message>()) {
        return None;
    }
    // SAFETY: `Message` is `repr(C)`, 32 bytes of plain integers without padding (any bit
    // pattern is valid), the pointer is aligned for it, the length is a whole number of
    // records, and the records are little-endian as on this target.
    Some(unsafe { std::slice::from_raw_parts(table.as_ptr().cast::<Message>(), table.len() / MESSAGE_LEN) })
}

// === guest side: the output ===

/// One channel's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Retention.
    Retention(RetentionDecision),
    /// Compaction.
    Compaction(Removals),
}

/// Encodes a guest's answer: one [`Answer`] per channel, or its error message.
pub fn encode_output(result: &GuestResult<Vec<Answer>>) -> Vec<u8> {
    let answers = match result {
        Err(message) => {
            let mut out = Vec::with_capacity(OUTPUT_HEADER_LEN + message.len());
            out.extend_from_slice(&STATUS_ERROR.to_le_bytes());
            out.extend_from_slice(&(message.len() as u32).to_le_bytes());
            out.extend_from_slice(message.as_bytes());
            return out;
        }
        Ok(answers) => answers,
    };
    let records_end = OUTPUT_HEADER_LEN + RESULT_LEN * answers.len();
    let mut out = vec![0u8; records_end];
    put32(&mut out, 0, STATUS_OK);
    put32(&mut out, 4, answers.len() as u32);
    for (i, a) in answers.iter().enumerate() {
        let r = OUTPUT_HEADER_LEN + RESULT_LEN * i;
        match a {
            Answer::Retention(RetentionDecision::Keep) => {}
            Answer::Retention(RetentionDecision::DropBelow(x)) => put64(&mut out, r, *x),
            Answer::Compaction(removals) => {
                while !out.len().is_multiple_of(8) {
                    out.push(0);
                }
                let data_at = out.len();
                let (form, n) = match removals {
                    Removals::Bitmap(b) => {
                        out.extend_from_slice(b.as_bytes());
                        (FORM_BITMAP, b.len())
                    }
                    Removals::Offsets(o) => {
                        for x in o {
                            out.extend_from_slice(&x.to_le_bytes());
                        }
                        (FORM_OFFSETS, o.len())
                    }
                };
                let data_len = out.len() - data_at;
                put32(&mut out, r, form);
                put32(&mut out, r + 4, n as u32);
                put32(&mut out, r + 8, data_at as u32);
                put32(&mut out, r + 12, data_len as u32);
            }
        }
    }
    out
}

/// Runs one call's byte path without the pointers: views `bytes`, parses the params once,
/// runs `f` on every channel and encodes the answers (or the first error).
pub fn handle<P: DeserializeOwned>(
    bytes: &[u8],
    kind: u32,
    f: impl Fn(&ChannelView<'_>, &P) -> GuestResult<Answer>,
) -> Vec<u8> {
    let result = parse_input(bytes).and_then(|input| {
        if input.kind != kind {
            return Err(format!("called as kind {} by a plugin of kind {kind}", input.kind));
        }
        let params: P = parse_params(input.params)?;
        input.channels.iter().map(|c| f(c, &params)).collect::<GuestResult<Vec<Answer>>>()
    });
    encode_output(&result)
}

/// Retention glue: `f` on every channel.
pub fn handle_retention<P: DeserializeOwned, R: IntoGuestResult<RetentionDecision>>(
    bytes: &[u8],
    f: impl Fn(&ChannelView<'_>, &P) -> R,
) -> Vec<u8> {
    handle(bytes, KIND_RETENTION, |c, p| f(c, p).into_guest_result().map(Answer::Retention))
}

/// Compaction glue: `f` on every channel.
pub fn handle_compaction<P: DeserializeOwned, R: IntoGuestResult<Removals>>(
    bytes: &[u8],
    f: impl Fn(&ChannelView<'_>, &P) -> R,
) -> Vec<u8> {
    handle(bytes, KIND_COMPACTION, |c, p| f(c, p).into_guest_result().map(Answer::Compaction))
}

// === host side: the output ===

/// Why an output was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputError {
    /// Bytes that are not a v2 output (a host `garbage` failure).
    Garbage(String),
    /// Well-formed, but not a valid decision for this input (`invalid_output`).
    Invalid(String),
    /// The guest's own error message (`guest_error`).
    Guest(String),
}

/// Reads a guest's output for channels with `counts[i]` messages each (`kind` as called):
/// one answer per channel, each bitmap exactly as long as its channel's messages, each
/// offset list strictly ascending. Anything else is an [`OutputError`]; never a panic.
pub fn decode_output(out: &[u8], kind: u32, counts: &[usize]) -> Result<Vec<Answer>, OutputError> {
    let garbage = |m: String| Err(OutputError::Garbage(m));
    let (Some(status), Some(n)) = (get32(out, 0), get32(out, 4)) else {
        return garbage(format!("output of {} bytes has no header", out.len()));
    };
    let n = n as usize;
    match status {
        STATUS_OK => {}
        STATUS_ERROR => {
            let Some(text) = out.get(OUTPUT_HEADER_LEN..).filter(|t| t.len() == n) else {
                return garbage(format!("error message of {n} bytes in {} bytes", out.len()));
            };
            return Err(OutputError::Guest(String::from_utf8_lossy(text).chars().take(512).collect()));
        }
        s => return garbage(format!("output status {s}")),
    }
    if n != counts.len() {
        return Err(OutputError::Invalid(format!("{n} answers for {} channels", counts.len())));
    }
    let mut answers = Vec::with_capacity(n);
    for (i, &count) in counts.iter().enumerate() {
        let r = OUTPUT_HEADER_LEN + RESULT_LEN * i;
        let Some(record) = out.get(r..r + RESULT_LEN) else {
            return garbage(format!("output of {} bytes ends inside answer {i}", out.len()));
        };
        if kind == KIND_RETENTION {
            let (below, rest) = (get64(record, 0).unwrap_or(0), get64(record, 8).unwrap_or(0));
            if rest != 0 {
                return garbage(format!("answer {i}: reserved bytes not zero"));
            }
            answers.push(Answer::Retention(if below == 0 {
                RetentionDecision::Keep
            } else {
                RetentionDecision::DropBelow(below)
            }));
            continue;
        }
        let (form, len) = (get32(record, 0).unwrap_or(0), get32(record, 4).unwrap_or(0) as usize);
        let (at, data_len) = (get32(record, 8).unwrap_or(0) as usize, get32(record, 12).unwrap_or(0) as usize);
        let Some(data) = at.checked_add(data_len).and_then(|end| out.get(at..end)) else {
            return garbage(format!("answer {i}: data [{at}, +{data_len}) outside the {} output bytes", out.len()));
        };
        match form {
            FORM_BITMAP => {
                if len != count || data_len != count.div_ceil(8) {
                    return Err(OutputError::Invalid(format!(
                        "bitmap of {len} bits in {data_len} bytes for {count} messages"
                    )));
                }
                if !count.is_multiple_of(8) && data[data_len - 1] >> (count % 8) != 0 {
                    return Err(OutputError::Invalid("bits set past the end of the bitmap".into()));
                }
                answers.push(Answer::Compaction(Removals::Bitmap(Bitmap { bytes: data.to_vec(), len })));
            }
            FORM_OFFSETS => {
                if data_len != len.saturating_mul(8) || len > count {
                    return Err(OutputError::Invalid(format!(
                        "{len} offsets in {data_len} bytes for {count} messages"
                    )));
                }
                let offsets: Vec<u64> =
                    data.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
                if offsets.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(OutputError::Invalid("offset list not strictly ascending".into()));
                }
                answers.push(Answer::Compaction(Removals::Offsets(offsets)));
            }
            f => return garbage(format!("answer {i}: unknown form {f}")),
        }
    }
    Ok(answers)
}

/// A compaction answer as the v1 decision over these messages (bitmap bits become their
/// messages' offsets). Offsets in a list are passed through: the host's validation checks
/// that each was shown.
pub fn removals_to_decision(removals: &Removals, messages: &[MessageMeta]) -> CompactionDecision {
    match removals {
        Removals::Bitmap(b) => {
            CompactionDecision { remove: b.ones().filter_map(|i| messages.get(i).map(|m| m.offset)).collect() }
        }
        Removals::Offsets(o) => CompactionDecision { remove: o.clone() },
    }
}

/// The largest output a valid answer for channels of `counts` messages can need.
pub fn max_output(kind: u32, counts: &[usize]) -> usize {
    let records = OUTPUT_HEADER_LEN + RESULT_LEN * counts.len();
    if kind == KIND_RETENTION {
        return records;
    }
    records + counts.iter().map(|&c| 8 + c.saturating_mul(8)).sum::<usize>()
}

// === native: the whole path ===

fn native_call<O>(
    kind: u32,
    params: &str,
    channel: ChannelIn<'_>,
    run: impl FnOnce(&[u8]) -> Vec<u8>,
    finish: impl FnOnce(Answer) -> Option<O>,
) -> GuestResult<O> {
    let mut buf = vec![0u8; input_len(params, &[channel])];
    encode_input(&mut buf, kind, 0, params, &[channel], |k| crate::fx::hash_bytes(k.as_bytes()));
    let out = run(&buf);
    match decode_output(&out, kind, &[channel.messages.len()]) {
        Ok(mut answers) => finish(answers.remove(0)).ok_or_else(|| "answer of the wrong kind".into()),
        Err(OutputError::Guest(m)) => Err(m),
        Err(OutputError::Garbage(m) | OutputError::Invalid(m)) => Err(format!("bad output: {m}")),
    }
}

/// Runs a v2 retention policy natively through the whole byte path (encode, view, run,
/// answer, decode), as the router and the wasm glue would; for plugin unit tests.
/// `input.now_ms` is passed as given. Keys are read from `input` (no host import natively).
pub fn call_retention<P: DeserializeOwned, R: IntoGuestResult<RetentionDecision>>(
    params: &str,
    input: &RetentionInput,
    f: impl Fn(&ChannelView<'_>, &P) -> R,
) -> GuestResult<RetentionDecision> {
    let channel = ChannelIn { name: &input.channel, stats: &input.stats, messages: &input.oldest };
    let keys: Vec<Option<&str>> = input.oldest.iter().map(|m| m.key.as_deref()).collect();
    native_call(
        KIND_RETENTION,
        params,
        channel,
        |buf| {
            let mut buf = buf.to_vec();
            put64(&mut buf, 8, input.now_ms);
            handle_retention(&buf, |c: &ChannelView<'_>, p: &P| f(&with_keys(c, &keys), p))
        },
        |a| match a {
            Answer::Retention(d) => Some(d),
            Answer::Compaction(_) => None,
        },
    )
}

/// Runs a v2 compaction policy natively through the whole byte path; see [`call_retention`].
pub fn call_compaction<P: DeserializeOwned, R: IntoGuestResult<Removals>>(
    params: &str,
    input: &CompactionInput,
    f: impl Fn(&ChannelView<'_>, &P) -> R,
) -> GuestResult<CompactionDecision> {
    let stats = ChannelStats::default();
    let channel = ChannelIn { name: &input.channel, stats: &stats, messages: &input.window };
    let keys: Vec<Option<&str>> = input.window.iter().map(|m| m.key.as_deref()).collect();
    native_call(
        KIND_COMPACTION,
        params,
        channel,
        |buf| {
            let mut buf = buf.to_vec();
            put64(&mut buf, 8, input.now_ms);
            handle_compaction(&buf, |c: &ChannelView<'_>, p: &P| f(&with_keys(c, &keys), p))
        },
        |a| match a {
            Answer::Compaction(r) => Some(removals_to_decision(&r, &input.window)),
            Answer::Retention(_) => None,
        },
    )
}

fn with_keys<'a>(c: &ChannelView<'a>, keys: &[Option<&'a str>]) -> ChannelView<'a> {
    let start = c.base as usize;
    let lazy = Lazy::Local { keys: keys[start..start + c.messages.len()].to_vec(), payloads: Vec::new() };
    ChannelView { lazy, ..c.clone() }
}

// === wasm32 glue ===

/// The ABI v2 marker export (the host never calls it). Absent with the `abi-v1` feature.
#[cfg(all(target_arch = "wasm32", not(feature = "abi-v1")))]
#[unsafe(no_mangle)]
pub extern "C" fn switchyard_abi_v2() {}

/// Referenced by the v2 export macros: a crate that turns on the `abi-v1` feature cannot
/// use them (the module would carry the wrong marker).
#[cfg(not(feature = "abi-v1"))]
#[doc(hidden)]
pub const fn abi_v2_enabled() {}

/// Runs one v2 call on wasm32: the input at `[ptr, ptr+len)`, the answer leaked and packed
/// as `(ptr << 32) | len`.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub fn run(ptr: i32, len: i32, handle: impl FnOnce(&[u8]) -> Vec<u8>) -> i64 {
    let bytes: &[u8] = if len <= 0 || ptr == 0 {
        &[]
    } else {
        // SAFETY: the host wrote `len` bytes at `ptr`, which `switchyard_alloc` returned.
        unsafe { core::slice::from_raw_parts(ptr as usize as *const u8, len as u32 as usize) }
    };
    crate::guest::pack_out(handle(bytes).leak())
}

/// Type check used by [`export_retention!`](crate::export_retention) natively.
#[doc(hidden)]
pub fn check_retention<P: DeserializeOwned, R: IntoGuestResult<RetentionDecision>>(
    _: impl Fn(&ChannelView<'_>, &P) -> R,
) {
}

/// Type check used by [`export_compaction!`](crate::export_compaction) natively.
#[doc(hidden)]
pub fn check_compaction<P: DeserializeOwned, R: IntoGuestResult<Removals>>(_: impl Fn(&ChannelView<'_>, &P) -> R) {}

/// Exports `$f: fn(&ChannelView, &P) -> RetentionDecision` (or `-> Result<RetentionDecision,
/// E: Display>`) as the ABI v2 entry point `switchyard_retention`, where `P:
/// DeserializeOwned` is the params type. On wasm32 it defines the export; natively it only
/// checks `$f`'s signature, so `cargo test` tests `$f` directly. Use it once per crate.
#[macro_export]
macro_rules! export_retention {
    ($f:path) => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn switchyard_retention(ptr: i32, len: i32) -> i64 {
            const _: () = $crate::v2::abi_v2_enabled();
            $crate::v2::run(ptr, len, |bytes| $crate::v2::handle_retention(bytes, $f))
        }
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            #[allow(dead_code)]
            fn __switchyard_check() {
                $crate::v2::check_retention($f)
            }
        };
    };
}

/// Exports `$f: fn(&ChannelView, &P) -> Removals` (or `-> Result<Removals, E>`) as the ABI
/// v2 entry point `switchyard_compaction`. See [`export_retention!`](crate::export_retention).
#[macro_export]
macro_rules! export_compaction {
    ($f:path) => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn switchyard_compaction(ptr: i32, len: i32) -> i64 {
            const _: () = $crate::v2::abi_v2_enabled();
            $crate::v2::run(ptr, len, |bytes| $crate::v2::handle_compaction(bytes, $f))
        }
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            #[allow(dead_code)]
            fn __switchyard_check() {
                $crate::v2::check_compaction($f)
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fx::FxHashMap;
    use proptest::prelude::*;

    fn meta(offset: u64, ts: u64, key: Option<&str>, tombstone: bool) -> MessageMeta {
        MessageMeta { offset, ts, size: 100 + offset as u32, key: key.map(String::from), tombstone }
    }

    #[test]
    fn input_roundtrips_through_the_layout() {
        let stats = ChannelStats { first_offset: 3, last_offset: 9, count: 7, bytes: 700 };
        let a = [meta(3, 10, None, false), meta(4, 20, Some("k"), true)];
        let b = [meta(7, 30, Some("é"), false)];
        let channels = [
            ChannelIn { name: "chat:a", stats: &stats, messages: &a },
            ChannelIn { name: "chat:b", stats: &stats, messages: &b },
        ];
        let params = r#"{"count":2}"#;
        let len = input_len(params, &channels);
        assert_eq!(len, 32 + 2 * 48 + 3 * 32 + params.len() + 12);
        let mut buf = vec![0u8; len];
        encode_input(&mut buf, KIND_COMPACTION, 42, params, &channels, |k| k.len() as u64 + 1);
        let input = parse_input(&buf).unwrap();
        assert_eq!((input.kind, input.params, input.channels.len()), (KIND_COMPACTION, params, 2));
        let (ca, cb) = (&input.channels[0], &input.channels[1]);
        assert_eq!((ca.name(), ca.stats(), ca.now_ms()), ("chat:a", &stats, 42));
        assert_eq!(
            ca.messages(),
            &[
                Message { offset: 3, ts: 10, key_hash: 0, size: 103, flags: 0 },
                Message { offset: 4, ts: 20, key_hash: 2, size: 104, flags: FLAG_KEYED | FLAG_TOMBSTONE },
            ]
        );
        assert_eq!((cb.name(), cb.messages()[0].key_hash, cb.base), ("chat:b", 3, 2));
        // Pinned bytes of the header and the first message record.
        assert_eq!(&buf[0..8], &[2, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(&buf[8..16], &42u64.to_le_bytes());
        assert_eq!(&buf[24..32], &[2, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(&buf[128..136], &3u64.to_le_bytes());
    }

    /// The README's byte-for-byte example.
    #[test]
    fn the_readme_example_is_exact() {
        let stats = ChannelStats { first_offset: 3, last_offset: 4, count: 2, bytes: 240 };
        let msgs = [
            MessageMeta { offset: 3, ts: 10, size: 120, key: None, tombstone: false },
            MessageMeta { offset: 4, ts: 20, size: 120, key: Some("k".into()), tombstone: true },
        ];
        let channels = [ChannelIn { name: "c", stats: &stats, messages: &msgs }];
        let mut buf = vec![0u8; input_len("{}", &channels)];
        assert_eq!(buf.len(), 147);
        encode_input(&mut buf, KIND_RETENTION, 99, "{}", &channels, |_| u64::from_le_bytes([0xaa; 8]));
        let mut expected = Vec::new();
        let le32 = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
        let le64 = |v: &mut Vec<u8>, x: u64| v.extend_from_slice(&x.to_le_bytes());
        le32(&mut expected, 2);
        le32(&mut expected, 1);
        le64(&mut expected, 99);
        for x in [144, 2, 1, 2] {
            le32(&mut expected, x);
        }
        for x in [3, 4, 2, 240] {
            le64(&mut expected, x);
        }
        for x in [0, 2, 146, 1] {
            le32(&mut expected, x);
        }
        for (offset, ts, hash, flags) in [(3u64, 10u64, 0u64, 0u32), (4, 20, u64::from_le_bytes([0xaa; 8]), 3)] {
            le64(&mut expected, offset);
            le64(&mut expected, ts);
            le64(&mut expected, hash);
            le32(&mut expected, 120);
            le32(&mut expected, flags);
        }
        expected.extend_from_slice(b"{}c");
        assert_eq!(buf, expected);
        let answer = encode_output(&Ok(vec![Answer::Retention(RetentionDecision::DropBelow(4))]));
        assert_eq!(answer, [0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn outputs_roundtrip_and_bad_ones_are_refused() {
        let mut bm = Bitmap::new(10);
        bm.set(0);
        bm.set(9);
        let answers =
            vec![Answer::Compaction(Removals::Bitmap(bm.clone())), Answer::Compaction(Removals::Offsets(vec![3, 5]))];
        let out = encode_output(&Ok(answers.clone()));
        assert_eq!(decode_output(&out, KIND_COMPACTION, &[10, 4]), Ok(answers));
        // A bitmap of the wrong length.
        assert!(matches!(decode_output(&out, KIND_COMPACTION, &[11, 4]), Err(OutputError::Invalid(_))));
        // Unsorted offsets.
        let out2 = encode_output(&Ok(vec![Answer::Compaction(Removals::Offsets(vec![5, 3]))]));
        assert!(matches!(decode_output(&out2, KIND_COMPACTION, &[4]), Err(OutputError::Invalid(_))));
        // Wrong number of answers.
        assert!(matches!(decode_output(&out, KIND_COMPACTION, &[10]), Err(OutputError::Invalid(_))));
        // Retention.
        let r = encode_output(&Ok(vec![Answer::Retention(RetentionDecision::DropBelow(7))]));
        assert_eq!(r.len(), 24);
        assert_eq!(
            decode_output(&r, KIND_RETENTION, &[3]),
            Ok(vec![Answer::Retention(RetentionDecision::DropBelow(7))])
        );
        // A guest error.
        let e = encode_output(&Err("nope".into()));
        assert_eq!(e, [1, 0, 0, 0, 4, 0, 0, 0, b'n', b'o', b'p', b'e']);
        assert_eq!(decode_output(&e, KIND_RETENTION, &[1]), Err(OutputError::Guest("nope".into())));
    }

    proptest! {
        /// Fuzz-style: any bytes decode to answers or a typed error, never a panic; any
        /// bytes as input give an error or a view, never a panic.
        #[test]
        fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..256), n in 0usize..40) {
            let _ = decode_output(&bytes, KIND_COMPACTION, &[n]);
            let _ = decode_output(&bytes, KIND_RETENTION, &[n]);
            let _ = parse_input(&bytes);
            let _ = handle_retention(&bytes, |_: &ChannelView<'_>, _: &crate::NoParams| RetentionDecision::Keep);
        }
    }

    fn latest_per_key(c: &ChannelView<'_>, _: &crate::NoParams) -> Removals {
        let mut seen: FxHashMap<u64, ()> = FxHashMap::default();
        let mut bm = Bitmap::new(c.messages().len());
        for (i, m) in c.messages().iter().enumerate().rev() {
            if m.keyed() && seen.insert(m.key_hash, ()).is_some() {
                bm.set(i);
            }
        }
        Removals::Bitmap(bm)
    }

    #[test]
    fn the_native_path_runs_a_policy_end_to_end() {
        let input = CompactionInput {
            channel: "c".into(),
            window: vec![meta(1, 0, Some("a"), false), meta(2, 0, Some("b"), false), meta(3, 0, Some("a"), false)],
            now_ms: 5,
        };
        assert_eq!(call_compaction("{}", &input, latest_per_key), Ok(CompactionDecision { remove: vec![1] }));
        let view = ChannelView::from_compaction(&input);
        assert_eq!(view.key(2).as_deref(), Some("a"));
        assert_eq!(latest_per_key(&view, &crate::NoParams {}).offsets(view.messages()), vec![1]);
        let keys = |c: &ChannelView<'_>, _: &crate::NoParams| -> Result<RetentionDecision, String> {
            Err(format!("{:?} at {}", c.key(1), c.now_ms()))
        };
        let r = RetentionInput {
            channel: "c".into(),
            stats: ChannelStats::default(),
            oldest: input.window.clone(),
            now_ms: 77,
        };
        assert_eq!(call_retention("{}", &r, keys), Err("Some(\"b\") at 77".into()));
        let bad = call_retention("{", &r, |_: &ChannelView<'_>, _: &crate::NoParams| RetentionDecision::Keep);
        assert!(bad.unwrap_err().contains("invalid params"));
    }

    /// Natively a view has no payloads unless a test gives them; out-of-range is None.
    #[test]
    fn payloads_are_read_by_index_from_what_a_test_gives() {
        let input = CompactionInput {
            channel: "c".into(),
            window: vec![meta(1, 0, Some("a"), false), meta(2, 0, Some("b"), false), meta(3, 0, Some("a"), false)],
            now_ms: 5,
        };
        let view = ChannelView::from_compaction(&input);
        assert_eq!(view.payload(0), None, "no payloads given");
        let view = view.with_payloads(&[Some(r#"{"drop":true}"#), None, Some("1")]);
        assert_eq!(view.payload(0).as_deref(), Some(r#"{"drop":true}"#));
        assert_eq!(view.payload(1), None, "a message no longer stored");
        assert_eq!(view.payload(2).as_deref(), Some("1"));
        assert_eq!(view.payload(3), None, "out of range");
        let marked = |c: &ChannelView<'_>, _: &crate::NoParams| {
            let mut bm = Bitmap::new(c.messages().len());
            (0..c.messages().len())
                .filter(|&i| c.payload(i).is_some_and(|p| p.contains("drop")))
                .for_each(|i| bm.set(i));
            Removals::Bitmap(bm)
        };
        assert_eq!(marked(&view, &crate::NoParams {}).offsets(view.messages()), vec![1]);
    }
}

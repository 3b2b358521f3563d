//! ABI v2, guest side: what a plugin does with the bytes, on wasm32 and natively alike. It
//! views one call's input without copying ([`parse_input`]: the message records are read in
//! place as [`Message`] when the buffer is aligned), runs the policy on every channel and
//! encodes the answers ([`handle`], [`encode_output`]). It must never panic on any input
//! bytes (a malformed input is an error answer), and it holds no pointers or exports: the
//! wasm32 entry points are in `glue`.

use std::borrow::Cow;

use super::{
    get32, get64, put32, put64, Answer, ChannelView, Lazy, Message, Removals, ABI, CHANNEL_LEN, FORM_BITMAP,
    FORM_OFFSETS, HEADER_LEN, KIND_COMPACTION, KIND_RETENTION, MESSAGE_LEN, OUTPUT_HEADER_LEN, RESULT_LEN,
    STATUS_ERROR, STATUS_OK,
};
use crate::guest::{parse_params, IntoGuestResult};
use crate::{ChannelStats, GuestResult, RetentionDecision};
use serde::de::DeserializeOwned;

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

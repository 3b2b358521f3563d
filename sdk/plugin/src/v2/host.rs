//! ABI v2, host side: what the router does with the bytes. It writes one call's input into
//! the buffer the guest allocated ([`input_len`], [`encode_input`], from the router's own
//! [`MessageMeta`] through [`ChannelIn`]) and reads and checks the guest's answer
//! ([`decode_output`], [`max_output`], [`removals_to_decision`]). A guest's output is
//! untrusted: decoding must never panic, whatever the bytes; anything malformed or invalid
//! is an [`OutputError`]. It must never run a policy or touch a wasm instance (the plugin
//! host does that), and never change a byte of the layout `README.md` specifies.

use super::{
    get32, get64, put32, put64, Answer, Bitmap, Message, Removals, ABI, CHANNEL_LEN, FORM_BITMAP, FORM_OFFSETS,
    HEADER_LEN, KIND_RETENTION, MESSAGE_LEN, OUTPUT_HEADER_LEN, RESULT_LEN, STATUS_ERROR, STATUS_OK,
};
use crate::{ChannelStats, CompactionDecision, MessageMeta, RetentionDecision};

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

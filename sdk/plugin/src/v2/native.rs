//! ABI v2, natively: [`call_retention`] and [`call_compaction`] run a policy through the
//! whole byte path in one process (the host's encoding, the guest's view and answer, the
//! host's decoding), so a plugin's unit tests exercise exactly the bytes the router would
//! exchange with it. Keys are read from the v1 input instead of a host import. It must never
//! take a shortcut around the encoding (the point is to test it), and never do I/O.

use super::{
    decode_output, encode_input, handle_compaction, handle_retention, input_len, put64, removals_to_decision, Answer,
    ChannelIn, ChannelView, Lazy, OutputError, Removals, KIND_COMPACTION, KIND_RETENTION,
};
use crate::guest::IntoGuestResult;
use crate::{ChannelStats, CompactionDecision, CompactionInput, GuestResult, RetentionDecision, RetentionInput};
use serde::de::DeserializeOwned;

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

//! `size-cap`: a retention plugin that keeps a channel's stored bytes at most `bytes`.
//!
//! Params: `{ bytes = N }` (required). `bytes = 0` means no limit, as the router's built-in
//! `history_bytes = 0` does. The same semantics as the byte limit of the router's built-in
//! `LimitsRetention`: the oldest shown messages go until the excess `stats.bytes - bytes` is
//! covered (or the shown prefix runs out; the rest goes in later rounds).

use serde::Deserialize;
use switchyard_sdk::{ChannelView, RetentionDecision};

/// Params of a `size-cap` binding.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Most stored bytes kept (0 = unlimited).
    pub bytes: u64,
}

/// Drops the oldest messages until the channel fits in `bytes`.
pub fn policy(input: &ChannelView<'_>, params: &Params) -> RetentionDecision {
    let stats = input.stats();
    if params.bytes == 0 || stats.bytes <= params.bytes {
        return RetentionDecision::Keep;
    }
    let mut excess = stats.bytes - params.bytes;
    let mut drop = 0;
    for m in input.messages() {
        if excess == 0 {
            break;
        }
        excess = excess.saturating_sub(m.size as u64);
        drop += 1;
    }
    match drop {
        0 => RetentionDecision::Keep,
        n => RetentionDecision::DropBelow(input.messages()[n - 1].offset + 1),
    }
}

switchyard_sdk::export_retention!(policy);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::{v2, ChannelStats, MessageMeta, RetentionInput};

    /// The policy on a v1-style input.
    fn run(input: &RetentionInput, params: &Params) -> RetentionDecision {
        policy(&ChannelView::from_retention(input), params)
    }

    fn input(sizes: &[u32], shown: usize) -> RetentionInput {
        let all: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| MessageMeta { offset: i as u64 + 1, ts: 0, size, key: None, tombstone: false })
            .collect();
        RetentionInput {
            channel: "c".into(),
            stats: ChannelStats {
                first_offset: 1,
                last_offset: all.len() as u64,
                count: all.len() as u64,
                bytes: sizes.iter().map(|&s| s as u64).sum(),
            },
            oldest: all.into_iter().take(shown).collect(),
            now_ms: 0,
        }
    }

    #[test]
    fn caps_stored_bytes() {
        // 10 x 10 bytes, cap 25: drop 8 (as the built-in policy does), keeping 20 bytes.
        assert_eq!(run(&input(&[10; 10], 10), &Params { bytes: 25 }), RetentionDecision::DropBelow(9));
        assert_eq!(run(&input(&[10; 10], 10), &Params { bytes: 30 }), RetentionDecision::DropBelow(8));
        assert_eq!(run(&input(&[10; 10], 10), &Params { bytes: 100 }), RetentionDecision::Keep);
        assert_eq!(run(&input(&[10; 10], 10), &Params { bytes: 0 }), RetentionDecision::Keep);
        // One big old message covers the excess.
        assert_eq!(run(&input(&[500, 10, 10], 3), &Params { bytes: 100 }), RetentionDecision::DropBelow(2));
        // Cap below the newest message's size: everything shown goes.
        assert_eq!(run(&input(&[10, 10, 10], 3), &Params { bytes: 5 }), RetentionDecision::DropBelow(4));
        assert_eq!(run(&input(&[], 0), &Params { bytes: 5 }), RetentionDecision::Keep);
    }

    #[test]
    fn drops_only_what_was_shown() {
        assert_eq!(run(&input(&[10; 100], 3), &Params { bytes: 10 }), RetentionDecision::DropBelow(4));
        assert_eq!(run(&input(&[10; 100], 0), &Params { bytes: 10 }), RetentionDecision::Keep);
    }

    #[test]
    fn params_through_the_abi() {
        let call = |params: &str| v2::call_retention(params, &input(&[10; 10], 10), policy);
        assert_eq!(call(r#"{"bytes":25}"#), Ok(RetentionDecision::DropBelow(9)));
        assert!(call("{}").unwrap_err().contains("missing field `bytes`"));
    }
}

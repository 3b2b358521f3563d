//! `keep-last-v1`: the ABI v1 build of `plugins/keep-last`, kept as a test fixture (v1 modules must keep loading).
//!
//! `keep-last`: a retention plugin that keeps the newest `count` messages of a channel.
//!
//! Params: `{ count = N }` (required). `count = 0` means no limit, as the router's built-in
//! `history_size = 0` does. The same semantics as the count limit of the router's
//! built-in `LimitsRetention`: the `stats.count - count` oldest messages go, but never more
//! than the host showed in `oldest` (the rest go in later rounds).

use serde::Deserialize;
use switchyard_sdk::{RetentionDecision, RetentionInput};

/// Params of a `keep-last` binding.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Most messages kept (0 = unlimited).
    pub count: u64,
}

/// Drops the oldest messages beyond the newest `count`.
pub fn policy(input: &RetentionInput, params: &Params) -> RetentionDecision {
    if params.count == 0 || input.stats.count <= params.count {
        return RetentionDecision::Keep;
    }
    let excess = input.stats.count - params.count;
    let drop = (excess.min(input.oldest.len() as u64)) as usize;
    match drop {
        0 => RetentionDecision::Keep,
        n => {
            switchyard_sdk::log!(debug, "{}: {} messages over {}, dropping {n}", input.channel, excess, params.count);
            RetentionDecision::DropBelow(input.oldest[n - 1].offset + 1)
        }
    }
}

switchyard_sdk::export_retention_v1!(policy);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::{guest, ChannelStats, MessageMeta};

    fn input(offsets: impl IntoIterator<Item = u64>, count: u64, shown: usize) -> RetentionInput {
        let all: Vec<_> = offsets
            .into_iter()
            .map(|o| MessageMeta { offset: o, ts: o * 10, size: 10, key: None, tombstone: false })
            .collect();
        let last = all.last().map_or(0, |m| m.offset);
        let first = all.first().map_or(1, |m| m.offset);
        RetentionInput {
            channel: "c".into(),
            stats: ChannelStats { first_offset: first, last_offset: last, count, bytes: count * 10 },
            oldest: all.into_iter().take(shown).collect(),
            now_ms: 0,
        }
    }

    #[test]
    fn keeps_the_newest_count() {
        let p = Params { count: 3 };
        assert_eq!(policy(&input(1..=10, 10, 10), &p), RetentionDecision::DropBelow(8));
        assert_eq!(policy(&input(1..=3, 3, 3), &p), RetentionDecision::Keep);
        assert_eq!(policy(&input(1..=2, 2, 2), &p), RetentionDecision::Keep);
        assert_eq!(policy(&input(std::iter::empty(), 0, 0), &p), RetentionDecision::Keep);
        // Gaps left by compaction: count-based, not offset-based.
        assert_eq!(policy(&input([2, 5, 6, 9, 12], 5, 5), &Params { count: 2 }), RetentionDecision::DropBelow(7));
    }

    #[test]
    fn drops_only_what_was_shown() {
        // 100 messages, 4 shown: only the shown ones go this round.
        assert_eq!(policy(&input(1..=100, 100, 4), &Params { count: 10 }), RetentionDecision::DropBelow(5));
        // Counters say more than shown but nothing shown: keep.
        assert_eq!(policy(&input(1..=100, 100, 0), &Params { count: 10 }), RetentionDecision::Keep);
    }

    #[test]
    fn zero_count_is_unlimited() {
        assert_eq!(policy(&input(1..=10, 10, 10), &Params { count: 0 }), RetentionDecision::Keep);
    }

    #[test]
    fn params_through_the_abi() {
        let call = |params: &str| guest::call(&guest::encode_call(params, &input(1..=10, 10, 10)).unwrap(), policy);
        assert_eq!(call(r#"{"count":4}"#), Ok(RetentionDecision::DropBelow(7)));
        assert!(call("{}").unwrap_err().contains("missing field `count`"));
        assert!(call(r#"{"cuont":4}"#).unwrap_err().contains("unknown field"));
    }
}

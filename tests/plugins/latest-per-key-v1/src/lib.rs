//! `latest-per-key-v1`: the ABI v1 build of `plugins/latest-per-key`, kept as a test fixture (v1 modules must keep loading).
//!
//! `latest-per-key`: a compaction plugin that keeps the latest message per key.
//!
//! Params: `{ window_ms = N, tombstone_delay_ms = N }`, both optional. The same semantics
//! as the router's built-in `KeyedCompaction`:
//!
//! - a keyed message is removed when a newer message with the same key is in the window,
//!   and, if `window_ms` is set, that newer one came at most `window_ms` after it;
//! - a tombstone that is the latest for its key is removed once it is `tombstone_delay_ms`
//!   old (default 60000, the built-in default of 1 minute);
//! - unkeyed messages are never removed.

use std::collections::BTreeMap;

use serde::Deserialize;
use switchyard_sdk::{CompactionDecision, CompactionInput};

/// Params of a `latest-per-key` binding.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Supersede only within this many ms (absent = always).
    pub window_ms: Option<u64>,
    /// Age in ms after which a tombstone that is the latest for its key is removed.
    pub tombstone_delay_ms: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self { window_ms: None, tombstone_delay_ms: 60_000 }
    }
}

/// Removes superseded keyed messages and expired latest tombstones.
pub fn policy(input: &CompactionInput, params: &Params) -> CompactionDecision {
    // Walk newest to oldest, remembering the ts of the next newer message per key.
    let mut newer: BTreeMap<&str, u64> = BTreeMap::new();
    let mut remove = Vec::new();
    for m in input.window.iter().rev() {
        let Some(key) = m.key.as_deref() else { continue };
        match newer.get(key) {
            Some(&newer_ts) => {
                if params.window_ms.is_none_or(|w| newer_ts.saturating_sub(m.ts) <= w) {
                    remove.push(m.offset);
                }
            }
            None => {
                if m.tombstone && input.now_ms.saturating_sub(m.ts) >= params.tombstone_delay_ms {
                    remove.push(m.offset);
                }
            }
        }
        newer.insert(key, m.ts);
    }
    remove.reverse();
    CompactionDecision { remove }
}

switchyard_sdk::export_compaction_v1!(policy);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::{guest, MessageMeta};

    fn meta(offset: u64, ts: u64, key: Option<&str>, tombstone: bool) -> MessageMeta {
        MessageMeta { offset, ts, size: 1, key: key.map(String::from), tombstone }
    }

    fn window() -> Vec<MessageMeta> {
        vec![
            meta(1, 0, Some("a"), false),
            meta(2, 10, Some("b"), false),
            meta(3, 20, None, false),
            meta(4, 30, Some("a"), false),
            meta(5, 40, Some("b"), true),
        ]
    }

    fn input(now_ms: u64) -> CompactionInput {
        CompactionInput { channel: "c".into(), window: window(), now_ms }
    }

    #[test]
    fn keeps_latest_per_key() {
        // The built-in policy's own test cases.
        let p = Params { window_ms: None, tombstone_delay_ms: 100 };
        assert_eq!(policy(&input(100), &p).remove, vec![1, 2]);
        // Later, the tombstone itself is old enough to go.
        assert_eq!(policy(&input(140), &p).remove, vec![1, 2, 5]);
        let p = Params { window_ms: Some(25), tombstone_delay_ms: 1000 };
        assert_eq!(policy(&input(100), &p).remove, Vec::<u64>::new());
        let p = Params { window_ms: Some(30), tombstone_delay_ms: 1000 };
        assert_eq!(policy(&input(100), &p).remove, vec![1, 2]);
    }

    #[test]
    fn unkeyed_and_lone_messages_stay() {
        let w = vec![meta(1, 0, None, false), meta(2, 0, None, true), meta(3, 0, Some("x"), false)];
        let inp = CompactionInput { channel: "c".into(), window: w, now_ms: u64::MAX };
        assert!(policy(&inp, &Params::default()).remove.is_empty());
        let empty = CompactionInput { channel: "c".into(), window: vec![], now_ms: 0 };
        assert!(policy(&empty, &Params::default()).remove.is_empty());
    }

    #[test]
    fn many_versions_of_one_key() {
        let w: Vec<_> = (1..=6).map(|i| meta(i, i * 10, Some("k"), false)).collect();
        let inp = CompactionInput { channel: "c".into(), window: w, now_ms: 100 };
        assert_eq!(policy(&inp, &Params::default()).remove, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn params_through_the_abi() {
        let call = |params: &str| guest::call(&guest::encode_call(params, &input(100)).unwrap(), policy);
        // Default tombstone delay (1 minute): the tombstone stays.
        assert_eq!(call("{}").unwrap().remove, vec![1, 2]);
        assert_eq!(call(r#"{"tombstone_delay_ms":60}"#).unwrap().remove, vec![1, 2, 5]);
        assert_eq!(call(r#"{"window_ms":25}"#).unwrap().remove, Vec::<u64>::new());
        assert!(call(r#"{"window":"1s"}"#).unwrap_err().contains("unknown field"));
    }
}

//! `drop-marked`: an ABI v2 compaction test fixture that decides on payloads, read lazily
//! through `ChannelView::payload` (the host import `switchyard.payload`); the Rust twin of
//! `tests/plugins/wat/drop-marked.wat`.
//!
//! It removes every shown message whose stored JSON payload contains `marker` (default
//! `"DROP"`). A message whose payload can no longer be read (removed since the round's
//! input was built) is kept: there is nothing left to remove. It must never read a payload
//! it does not need: each read is a host call and a store read.

use serde::Deserialize;
use switchyard_sdk::{Bitmap, ChannelView, Removals};

/// Params of a `drop-marked` binding.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The text whose presence in a payload removes its message.
    pub marker: String,
}

impl Default for Params {
    fn default() -> Self {
        Params { marker: "DROP".into() }
    }
}

/// Removes the messages whose payload contains the marker.
pub fn policy(input: &ChannelView<'_>, params: &Params) -> Removals {
    let mut removed = Bitmap::new(input.messages().len());
    for i in 0..input.messages().len() {
        if input.payload(i).is_some_and(|p| p.contains(&params.marker)) {
            removed.set(i);
        }
    }
    Removals::Bitmap(removed)
}

switchyard_sdk::export_compaction!(policy);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::{CompactionInput, MessageMeta};

    #[test]
    fn removes_what_is_marked_and_keeps_what_is_gone() {
        let window = (1..=4)
            .map(|o| MessageMeta { offset: o, ts: o, size: 10, key: Some(format!("k{o}")), tombstone: false })
            .collect();
        let input = CompactionInput { channel: "kv:a".into(), window, now_ms: 0 };
        let view = ChannelView::from_compaction(&input).with_payloads(&[
            Some(r#"{"say":"DROP"}"#),
            Some("1"),
            None,
            Some(r#""xDROPx""#),
        ]);
        assert_eq!(policy(&view, &Params::default()).offsets(view.messages()), vec![1, 4]);
        let other = Params { marker: "say".into() };
        assert_eq!(policy(&view, &other).offsets(view.messages()), vec![1]);
    }
}

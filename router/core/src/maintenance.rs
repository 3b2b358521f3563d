//! Background retention and compaction, one task per partition.
//!
//! It owns the rounds: every `maintenance.interval` it asks a partition's owner for its
//! channels' counters, reads the needed message metadata from the store, asks each bound
//! policy for the decisions of all its channels of the round at once (a plugin policy
//! then makes one call per round, not one per channel), validates each and sends the
//! owner a `Trim`. While a policy decides, it may read payloads on demand through a
//! [`StorePayloads`] (one store read per payload asked for; nothing is copied up front). It
//! must never run on the publish path or write to the store itself: the owner applies
//! every removal.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use switchyard_sdk::{CompactionInput, RetentionDecision, RetentionInput};
use tokio::sync::oneshot;

use tokio::sync::watch;

use crate::owner::{now_ms, OwnerCommand, Snapshot, TrimReason};
use crate::partitions::Partitions;
use crate::policy::{validate_compaction, validate_retention, CompactionPolicy, Payloads, Policies, RetentionPolicy};
use switchyard_proto::partition::PartitionId;

/// Oldest messages shown to a retention policy per round.
const RETENTION_SHOWN: usize = 1024;
/// Most messages of a round's inputs held at once: the channels collected so far are
/// decided (and trimmed) before more metadata is read.
const ROUND_HELD_MAX: usize = 20_000;
/// Most messages scanned for a compaction round.
const COMPACTION_SCAN_MAX: usize = 100_000;

/// Starts one maintenance task per partition.
/// How often maintenance runs.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Time between rounds of one partition.
    pub interval: Duration,
    /// How often a channel whose counters did not change is visited by a costly (plugin)
    /// policy.
    pub idle_recheck: Duration,
}

/// Starts one maintenance task per partition; each stops when `partitions` is dropped or
/// `shutdown` turns true. Bindings are re-read from `policies` every round.
pub fn spawn(
    partitions: &Arc<Partitions>,
    policies: watch::Receiver<Arc<Policies>>,
    settings: Settings,
    shutdown: watch::Receiver<bool>,
) {
    for p in 0..partitions.count() {
        let node = Arc::downgrade(partitions);
        let (policies, shutdown) = (policies.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(settings.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut memory = Memory::default();
            loop {
                ticker.tick().await;
                let Some(node) = node.upgrade() else { return };
                if *shutdown.borrow() {
                    return;
                }
                // Bindings change at run time (the cluster's dynamic retention defaults).
                let current = policies.borrow().clone();
                round(&node, p, &current, settings.idle_recheck, &mut memory).await;
            }
        });
    }
}

async fn trim(
    node: &Partitions,
    p: PartitionId,
    channel: Arc<str>,
    first: Option<u64>,
    drops: Vec<(u64, u32)>,
    reason: TrimReason,
) {
    let (reply, rx) = oneshot::channel();
    if node.send_to(p, OwnerCommand::Trim { channel, first, drops, reason, reply }).await.is_ok() {
        let _ = rx.await;
    }
}

/// What a partition's maintenance task remembers between rounds, so that quiet channels
/// cost no store reads.
#[derive(Default)]
struct Memory {
    /// Per channel: the keyed generation last compacted and whether tombstones were waiting.
    compacted: HashMap<Arc<str>, (u64, bool)>,
    /// Per channel: `(first_offset, ts of the oldest retained message)` when last read.
    oldest_ts: HashMap<Arc<str>, (u64, u64)>,
    /// Per channel: counters and time of the last retention round of a costly (plugin)
    /// policy; an unchanged channel is visited again only after `idle_recheck`.
    retention_seen: HashMap<Arc<str>, (switchyard_sdk::ChannelStats, tokio::time::Instant)>,
}

/// Keys longer than this reach policies as a short hash: a publisher cannot make every
/// policy call of its namespace heavy (keys may be as long as a frame).
const POLICY_KEY_MAX: usize = 256;

/// What a policy is shown of stored messages: the store's metadata as the SDK's type, with
/// over-long keys replaced by `#xxh3:<hex>` (distinct keys stay distinct).
fn policy_metas(metas: impl IntoIterator<Item = switchyard_store::MessageMeta>) -> Vec<switchyard_sdk::MessageMeta> {
    metas
        .into_iter()
        .map(|m| {
            let key = m.key.map(|k| {
                if k.len() > POLICY_KEY_MAX {
                    format!("#xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(k.as_bytes()))
                } else {
                    k
                }
            });
            switchyard_sdk::MessageMeta { offset: m.offset, ts: m.ts, size: m.size, key, tombstone: m.tombstone }
        })
        .collect()
}

/// The payloads of one partition's messages, read from the store when a policy asks (the
/// message as stored now: None once retention or compaction removed it).
pub(crate) struct StorePayloads {
    /// The store the partition's owner writes through.
    store: Arc<switchyard_store::Store>,
    /// The partition whose channels are being decided.
    partition: PartitionId,
}

impl Payloads for StorePayloads {
    fn payload(&self, channel: &str, offset: u64) -> Option<String> {
        let after = offset.checked_sub(1)?;
        // Policies decide inside `block_in_place`, so this thread may wait for the pool.
        let (p, name) = (self.partition, channel.to_string());
        let read = self.store.read(move |r| r.read_messages(p, &name, after, offset, 1));
        match tokio::runtime::Handle::current().block_on(read).and_then(|read| read) {
            Ok(found) => found.into_iter().find(|(o, _)| *o == offset).map(|(_, m)| m.data),
            Err(e) => {
                tracing::debug!(channel, offset, error = %e, "policy payload read failed");
                None
            }
        }
    }
}

/// Channels of one round bound to the same policy object, decided together.
struct Group<P: ?Sized, I> {
    policy: Arc<P>,
    /// Per channel: its snapshot's index and its input.
    items: Vec<(usize, I)>,
}

/// Adds `input` to the group of `policy` (by identity), keeping first-seen order.
fn group<P: ?Sized, I>(groups: &mut Vec<Group<P, I>>, policy: &Arc<P>, item: (usize, I)) {
    let same = |g: &&mut Group<P, I>| std::ptr::addr_eq(Arc::as_ptr(&g.policy), Arc::as_ptr(policy));
    match groups.iter_mut().find(same) {
        Some(g) => g.items.push(item),
        None => groups.push(Group { policy: policy.clone(), items: vec![item] }),
    }
}

/// One round over one partition: every due channel's retention input first, then each
/// policy's decisions for all its channels in one `decide_many`, then the trims; then the
/// same for compaction.
async fn round(node: &Partitions, p: PartitionId, policies: &Policies, idle_recheck: Duration, memory: &mut Memory) {
    let Some(snaps) = node.snapshot(p).await else { return };
    let mut retentions: Vec<Group<dyn RetentionPolicy, RetentionInput>> = Vec::new();
    let mut compactions: Vec<Group<dyn CompactionPolicy, CompactionInput>> = Vec::new();
    // Messages held in inputs not yet decided: past ROUND_HELD_MAX they are decided first.
    let mut held = 0usize;
    for (index, snap) in snaps.iter().enumerate() {
        let bound = policies.for_channel(&snap.channel).clone();
        if let Some(policy) = &bound.retention {
            let recently = memory
                .retention_seen
                .get(&snap.channel)
                .is_some_and(|(stats, at)| *stats == snap.stats && at.elapsed() < idle_recheck);
            if snap.stats.count > 0 && !(policy.skips_idle_channels() && recently) {
                if let Some(input) = retention_input(node, p, snap, policy.as_ref(), &mut memory.oldest_ts).await {
                    held += input.oldest.len();
                    group(&mut retentions, policy, (index, input));
                }
                if policy.skips_idle_channels() {
                    memory
                        .retention_seen
                        .insert(snap.channel.clone(), (snap.stats.clone(), tokio::time::Instant::now()));
                }
            }
        }
        if held >= ROUND_HELD_MAX {
            decide_retention(node, p, &snaps, std::mem::take(&mut retentions)).await;
            held = 0;
        }
    }
    decide_retention(node, p, &snaps, retentions).await;
    held = 0;
    // Compaction reads the metadata after retention trimmed (as a channel's round always did).
    for (index, snap) in snaps.iter().enumerate() {
        if let Some(policy) = &policies.for_channel(&snap.channel).compaction {
            let last = memory.compacted.get(&snap.channel).copied();
            if snap.keyed_generation > 0
                && last.is_none_or(|(generation, pending)| generation != snap.keyed_generation || pending)
            {
                match compaction_input(node, p, snap, policy.as_ref()).await {
                    Some(input) => {
                        held += input.window.len();
                        group(&mut compactions, policy, (index, input));
                    }
                    None => {
                        memory.compacted.insert(snap.channel.clone(), (snap.keyed_generation, true));
                    }
                }
            }
        }
        if held >= ROUND_HELD_MAX {
            decide_compaction(node, p, &snaps, std::mem::take(&mut compactions), memory).await;
            held = 0;
        }
    }
    decide_compaction(node, p, &snaps, compactions, memory).await;
}

/// What a policy of partition `p` reads payloads through.
fn payloads(node: &Partitions, p: PartitionId) -> Arc<dyn Payloads> {
    Arc::new(StorePayloads { store: node.store.clone(), partition: p })
}

/// Decides each group's channels at once and applies the decisions.
async fn decide_retention(
    node: &Partitions,
    p: PartitionId,
    snaps: &[Snapshot],
    groups: Vec<Group<dyn RetentionPolicy, RetentionInput>>,
) {
    for g in groups {
        let (indices, inputs): (Vec<usize>, Vec<RetentionInput>) = g.items.into_iter().unzip();
        // A policy call may run a plugin for up to its deadline: keep it off the async workers.
        let payloads = payloads(node, p);
        let decisions = tokio::task::block_in_place(|| g.policy.decide_many_with(&inputs, &payloads));
        for ((index, input), decision) in indices.into_iter().zip(&inputs).zip(decisions) {
            apply_retention(node, p, &snaps[index], g.policy.as_ref(), input, decision).await;
        }
    }
}

/// Decides each group's channels at once, applies the decisions and notes which channels
/// still wait on tombstones.
async fn decide_compaction(
    node: &Partitions,
    p: PartitionId,
    snaps: &[Snapshot],
    groups: Vec<Group<dyn CompactionPolicy, CompactionInput>>,
    memory: &mut Memory,
) {
    for g in groups {
        let (indices, inputs): (Vec<usize>, Vec<CompactionInput>) = g.items.into_iter().unzip();
        let payloads = payloads(node, p);
        let decisions = tokio::task::block_in_place(|| g.policy.decide_many_with(&inputs, &payloads));
        for ((index, input), decision) in indices.into_iter().zip(&inputs).zip(decisions) {
            let snap = &snaps[index];
            let pending = apply_compaction(node, p, snap, g.policy.as_ref(), input, decision).await;
            memory.compacted.insert(snap.channel.clone(), (snap.keyed_generation, pending));
        }
    }
}

/// The timestamp of a channel's oldest retained message, read only when `first` moved.
async fn oldest_ts(
    node: &Partitions,
    p: PartitionId,
    snap: &Snapshot,
    cache: &mut HashMap<Arc<str>, (u64, u64)>,
) -> Option<u64> {
    let stats = &snap.stats;
    if let Some(&(first, ts)) = cache.get(&snap.channel) {
        if first == stats.first_offset {
            return Some(ts);
        }
    }
    let (channel, first, last) = (snap.channel.clone(), stats.first_offset, stats.last_offset);
    let oldest = node.store.read(move |r| r.read_metas(p, &channel, first, last, 1)).await;
    let ts = oldest.ok()?.ok()?.first()?.ts;
    cache.insert(snap.channel.clone(), (stats.first_offset, ts));
    Some(ts)
}

/// The retention input of a channel that needs a round, or None (nothing to do, or the
/// metadata cannot be read).
async fn retention_input(
    node: &Partitions,
    p: PartitionId,
    snap: &Snapshot,
    policy: &dyn RetentionPolicy,
    cache: &mut HashMap<Arc<str>, (u64, u64)>,
) -> Option<RetentionInput> {
    let stats = &snap.stats;
    let now = now_ms();
    let oldest_ts = oldest_ts(node, p, snap, cache).await?;
    if !policy.needs_round(stats, oldest_ts, now) {
        return None;
    }
    let (channel, first, last) = (snap.channel.clone(), stats.first_offset, stats.last_offset);
    let oldest = node.store.read(move |r| r.read_metas(p, &channel, first, last, RETENTION_SHOWN)).await;
    let oldest = match oldest.and_then(|read| read) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(channel = %snap.channel, error = %e, "retention: cannot read metadata");
            return None;
        }
    };
    let oldest = policy_metas(oldest);
    Some(RetentionInput { channel: snap.channel.to_string(), stats: stats.clone(), oldest, now_ms: now })
}

/// Validates a retention decision and sends the owner its trim.
async fn apply_retention(
    node: &Partitions,
    p: PartitionId,
    snap: &Snapshot,
    policy: &dyn RetentionPolicy,
    input: &RetentionInput,
    decision: Result<RetentionDecision, crate::policy::PolicyError>,
) {
    let stats = &snap.stats;
    let decision = decision.and_then(|d| validate_retention(policy.name(), input, &d).map(|()| d));
    let below = match decision {
        Ok(RetentionDecision::DropBelow(x)) if x > stats.first_offset => x,
        Ok(_) => return,
        Err(e) => {
            return tracing::warn!(channel = %snap.channel, policy = policy.name(), error = %e, "retention round skipped")
        }
    };
    // Only what was shown can be removed this round; the rest follows next round.
    let shown_end = input.oldest.last().map(|m| m.offset + 1).unwrap_or(stats.first_offset);
    let below = if input.oldest.len() == RETENTION_SHOWN { below.min(shown_end) } else { below };
    let drops = input.oldest.iter().filter(|m| m.offset < below).map(|m| (m.offset, m.size)).collect();
    trim(node, p, snap.channel.clone(), Some(below), drops, TrimReason::Retention).await;
}

/// The compaction input of a channel, or None when its metadata cannot be read.
async fn compaction_input(
    node: &Partitions,
    p: PartitionId,
    snap: &Snapshot,
    policy: &dyn CompactionPolicy,
) -> Option<CompactionInput> {
    let stats = &snap.stats;
    let (channel, first, last) = (snap.channel.clone(), stats.first_offset, stats.last_offset);
    let metas = node.store.read(move |r| r.read_metas(p, &channel, first, last, COMPACTION_SCAN_MAX)).await;
    let metas = match metas.and_then(|read| read) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(channel = %snap.channel, error = %e, "compaction: cannot read metadata");
            return None;
        }
    };
    // The oldest keyed messages, as many as the policy takes in one round.
    let window = policy_metas(metas.into_iter().filter(|m| m.key.is_some()).take(policy.max_window()));
    Some(CompactionInput { channel: snap.channel.to_string(), window, now_ms: now_ms() })
}

/// Validates a compaction decision and sends the owner its trim. Returns true when
/// tombstones are still waiting for their delay (or the round failed).
async fn apply_compaction(
    node: &Partitions,
    p: PartitionId,
    snap: &Snapshot,
    policy: &dyn CompactionPolicy,
    input: &CompactionInput,
    decided: Result<switchyard_sdk::CompactionDecision, crate::policy::PolicyError>,
) -> bool {
    let decided = decided.and_then(|d| validate_compaction(policy.name(), input, &d).map(|()| d));
    let decision = match decided {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(channel = %snap.channel, policy = policy.name(), error = %e, "compaction round skipped");
            return true;
        }
    };
    let removed: std::collections::HashSet<u64> = decision.remove.iter().copied().collect();
    // Only a tombstone that is the latest for its key can still go (after its delay);
    // superseded ones a window kept will never be removed and must not force rounds.
    let mut latest: HashMap<&str, u64> = HashMap::new();
    for m in &input.window {
        if let Some(k) = m.key.as_deref() {
            latest.insert(k, m.offset);
        }
    }
    let pending = input.window.iter().any(|m| {
        m.tombstone && !removed.contains(&m.offset) && m.key.as_deref().and_then(|k| latest.get(k)) == Some(&m.offset)
    });
    if !removed.is_empty() {
        let drops = input.window.iter().filter(|m| removed.contains(&m.offset)).map(|m| (m.offset, m.size)).collect();
        trim(node, p, snap.channel.clone(), None, drops, TrimReason::Compaction).await;
    }
    pending
}

#[cfg(test)]
mod tests {
    //! Payloads a round's policies read, on a real store.

    use super::*;
    use crate::policy::{Bound, PolicyError};
    use crate::test_support::{eventually, request, start};
    use switchyard_sdk::RetentionDecision;

    async fn publish_all(parts: &Partitions, channel: &str, payloads: &[&str]) {
        let p = parts.partition(channel);
        for data in payloads {
            parts.publish(p, request(channel, data, None)).await.unwrap().await.unwrap().unwrap();
        }
    }

    /// A policy sees every field the store read, and a short hash for an over-long key.
    #[test]
    fn policies_see_the_stored_metadata_with_long_keys_shortened() {
        let stored = |offset: u64, key: Option<String>| switchyard_store::MessageMeta {
            offset,
            ts: 1_000 + offset,
            size: 40 + offset as u32,
            key,
            tombstone: offset == 2,
        };
        let long = "k".repeat(POLICY_KEY_MAX + 1);
        let shown = policy_metas([stored(1, None), stored(2, Some("short".into())), stored(3, Some(long.clone()))]);
        let expected_long = format!("#xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(long.as_bytes()));
        assert_eq!(
            shown,
            vec![
                switchyard_sdk::MessageMeta { offset: 1, ts: 1_001, size: 41, key: None, tombstone: false },
                switchyard_sdk::MessageMeta {
                    offset: 2,
                    ts: 1_002,
                    size: 42,
                    key: Some("short".into()),
                    tombstone: true
                },
                switchyard_sdk::MessageMeta {
                    offset: 3,
                    ts: 1_003,
                    size: 43,
                    key: Some(expected_long),
                    tombstone: false
                },
            ]
        );
        let at_limit = "k".repeat(POLICY_KEY_MAX);
        assert_eq!(policy_metas([stored(4, Some(at_limit.clone()))])[0].key, Some(at_limit));
    }

    /// A policy's payload read, as policies make it: inside `block_in_place`.
    fn read_payload(source: &Arc<dyn Payloads>, channel: &str, offset: u64) -> Option<String> {
        tokio::task::block_in_place(|| source.payload(channel, offset))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn payloads_are_read_from_the_store_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        publish_all(&parts, "room:1", &["1", r#""DROP""#, r#"{"n":3}"#]).await;
        let p = parts.partition("room:1");
        let source = payloads(&parts, p);
        assert_eq!(read_payload(&source, "room:1", 2).as_deref(), Some(r#""DROP""#));
        assert_eq!(read_payload(&source, "room:1", 3).as_deref(), Some(r#"{"n":3}"#));
        for (channel, offset) in [("room:1", 0), ("room:1", 4), ("room:2", 1)] {
            assert_eq!(read_payload(&source, channel, offset), None, "{channel} {offset}");
        }
        let metas = parts.store.startup_reader().read_metas(p, "room:1", 1, 3, 10).unwrap();
        let drops = metas.iter().take(2).map(|m| (m.offset, m.size)).collect();
        trim(&parts, p, Arc::from("room:1"), Some(3), drops, TrimReason::Retention).await;
        eventually("removed by retention", async || read_payload(&source, "room:1", 2).is_none()).await;
        assert_eq!(read_payload(&source, "room:1", 3).as_deref(), Some(r#"{"n":3}"#));
    }

    /// Drops everything up to the newest shown message whose payload says `DROP`.
    struct DropMarked;

    impl RetentionPolicy for DropMarked {
        fn name(&self) -> &str {
            "test:drop-marked"
        }

        fn decide(&self, _: &RetentionInput) -> Result<RetentionDecision, PolicyError> {
            Ok(RetentionDecision::Keep)
        }

        fn decide_many_with(
            &self,
            inputs: &[RetentionInput],
            payloads: &Arc<dyn Payloads>,
        ) -> Vec<Result<RetentionDecision, PolicyError>> {
            let marked = |i: &RetentionInput, offset: u64| {
                payloads.payload(&i.channel, offset).is_some_and(|p| p.contains("DROP"))
            };
            inputs
                .iter()
                .map(|i| {
                    let last = i.oldest.iter().map(|m| m.offset).filter(|&o| marked(i, o)).max();
                    Ok(last.map_or(RetentionDecision::Keep, |o| RetentionDecision::DropBelow(o + 1)))
                })
                .collect()
        }
    }

    /// A round hands its policies the partition's stored payloads.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_round_gives_its_policies_the_stored_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        publish_all(&parts, "room:1", &["1", r#"{"say":"DROP"}"#, "3", "4"]).await;
        let policies = Policies::new(Bound { retention: Some(Arc::new(DropMarked)), compaction: None }, HashMap::new());
        let p = parts.partition("room:1");
        round(&parts, p, &policies, Duration::from_secs(60), &mut Memory::default()).await;
        eventually("dropped below the marked message", async || {
            let page = parts.history(p, "room:1", crate::HistoryQuery::forward(0, 10)).await.unwrap();
            let stored = parts.store.startup_reader().read_metas(p, "room:1", 1, 4, 10).unwrap();
            page.messages.iter().map(|m| m.offset).collect::<Vec<_>>() == vec![3, 4] && stored.len() == 2
        })
        .await;
    }
}

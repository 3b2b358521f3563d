//! Background retention and compaction, one task per partition.
//!
//! It owns the rounds: every `maintenance.interval` it asks a partition's owner for its
//! channels' counters, reads the needed message metadata from the store, asks the bound
//! policy for a decision, validates it and sends the owner a `Trim`. It must never run on
//! the publish path or write to the store itself: the owner applies every removal.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use switchyard_sdk::{CompactionInput, RetentionDecision, RetentionInput};
use tokio::sync::oneshot;

use tokio::sync::watch;

use crate::owner::{now_ms, OwnerCommand, Snapshot, TrimReason};
use crate::partitions::Partitions;
use crate::policy::{validate_compaction, validate_retention, Policies};
use switchyard_proto::partition::PartitionId;

/// Oldest messages shown to a retention policy per round.
const RETENTION_SHOWN: usize = 1024;
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

/// Replaces over-long keys with `#xxh3:<hex>` (distinct keys stay distinct).
fn shorten_keys(metas: &mut [switchyard_sdk::MessageMeta]) {
    for m in metas {
        if let Some(k) = m.key.as_mut().filter(|k| k.len() > POLICY_KEY_MAX) {
            *k = format!("#xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(k.as_bytes()));
        }
    }
}

/// One round over one partition.
async fn round(node: &Partitions, p: PartitionId, policies: &Policies, idle_recheck: Duration, memory: &mut Memory) {
    let Some(snaps) = node.snapshot(p).await else { return };
    for snap in snaps {
        let bound = policies.for_channel(&snap.channel).clone();
        if let Some(policy) = &bound.retention {
            let recently = memory
                .retention_seen
                .get(&snap.channel)
                .is_some_and(|(stats, at)| *stats == snap.stats && at.elapsed() < idle_recheck);
            if snap.stats.count > 0 && !(policy.skips_idle_channels() && recently) {
                retention(node, p, &snap, policy.as_ref(), &mut memory.oldest_ts).await;
                if policy.skips_idle_channels() {
                    memory
                        .retention_seen
                        .insert(snap.channel.clone(), (snap.stats.clone(), tokio::time::Instant::now()));
                }
            }
        }
        if let Some(policy) = &bound.compaction {
            let last = memory.compacted.get(&snap.channel).copied();
            if snap.keyed_generation > 0
                && last.is_none_or(|(generation, pending)| generation != snap.keyed_generation || pending)
            {
                let pending = compaction(node, p, &snap, policy.as_ref()).await;
                memory.compacted.insert(snap.channel.clone(), (snap.keyed_generation, pending));
            }
        }
    }
}

/// The timestamp of a channel's oldest retained message, read only when `first` moved.
fn oldest_ts(
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
    let oldest = tokio::task::block_in_place(|| {
        node.store.read_metas(p, &snap.channel, stats.first_offset, stats.last_offset, 1)
    });
    let ts = oldest.ok()?.first()?.ts;
    cache.insert(snap.channel.clone(), (stats.first_offset, ts));
    Some(ts)
}

async fn retention(
    node: &Partitions,
    p: PartitionId,
    snap: &Snapshot,
    policy: &dyn crate::policy::RetentionPolicy,
    cache: &mut HashMap<Arc<str>, (u64, u64)>,
) {
    let stats = &snap.stats;
    let now = now_ms();
    let Some(oldest_ts) = oldest_ts(node, p, snap, cache) else { return };
    if !policy.needs_round(stats, oldest_ts, now) {
        return;
    }
    let mut oldest = match tokio::task::block_in_place(|| {
        node.store.read_metas(p, &snap.channel, stats.first_offset, stats.last_offset, RETENTION_SHOWN)
    }) {
        Ok(m) => m,
        Err(e) => return tracing::warn!(channel = %snap.channel, error = %e, "retention: cannot read metadata"),
    };
    shorten_keys(&mut oldest);
    let input = RetentionInput { channel: snap.channel.to_string(), stats: stats.clone(), oldest, now_ms: now };
    // A policy call may run a plugin for up to its deadline: keep it off the async workers.
    let decision = tokio::task::block_in_place(|| {
        policy.decide(&input).and_then(|d| validate_retention(policy.name(), &input, &d).map(|()| d))
    });
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

/// Returns true when tombstones are still waiting for their delay.
async fn compaction(
    node: &Partitions,
    p: PartitionId,
    snap: &Snapshot,
    policy: &dyn crate::policy::CompactionPolicy,
) -> bool {
    let stats = &snap.stats;
    let metas = match tokio::task::block_in_place(|| {
        node.store.read_metas(p, &snap.channel, stats.first_offset, stats.last_offset, COMPACTION_SCAN_MAX)
    }) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(channel = %snap.channel, error = %e, "compaction: cannot read metadata");
            return true;
        }
    };
    // The oldest keyed messages, as many as the policy takes in one round.
    let mut window: Vec<_> = metas.into_iter().filter(|m| m.key.is_some()).take(policy.max_window()).collect();
    shorten_keys(&mut window);
    let input = CompactionInput { channel: snap.channel.to_string(), window, now_ms: now_ms() };
    let decided = tokio::task::block_in_place(|| {
        policy.decide(&input).and_then(|d| validate_compaction(policy.name(), &input, &d).map(|()| d))
    });
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

//! Retention and compaction policies: the interface and the built-in implementations.
//!
//! It owns the [`RetentionPolicy`] and [`CompactionPolicy`] traits that both the built-in
//! policies and the WASM plugin host implement, over the shared `switchyard-sdk` types, and
//! [`Policies::for_channel`], which picks the policies bound to a channel's namespace. It also
//! owns the host-side validation of a policy's answer, and the [`Payloads`] interface through
//! which a policy reads a message's payload on demand. It must never touch the store or a
//! partition owner: the maintenance task feeds it inputs (and a [`Payloads`] over the store)
//! and applies its decisions.

use std::sync::Arc;
use std::time::Duration;

use switchyard_sdk::{ChannelStats, CompactionDecision, CompactionInput, RetentionDecision, RetentionInput};

use switchyard_sdk::{BalanceInput, BalancePlan, ReplicaInput};

/// Why a policy produced no usable decision.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The decision breaks the host's rules.
    #[error("invalid decision from {policy}: {message}")]
    Invalid {
        /// Policy name.
        policy: String,
        /// What is wrong.
        message: String,
    },
    /// The policy gave no decision (a plugin missing, quarantined, trapped or out of time).
    #[error("no decision from {policy}: {reason}")]
    NoDecision {
        /// Policy name.
        policy: String,
        /// Why.
        reason: String,
    },
}

/// Reads a stored message's payload on demand while a policy decides: the maintenance
/// task hands one to [`RetentionPolicy::decide_many_with`] and
/// [`CompactionPolicy::decide_many_with`], and a plugin policy reads through it only the
/// payloads its guest asks for (ABI v2's `switchyard.payload`). It is read-only.
pub trait Payloads: Send + Sync {
    /// The JSON payload of message `offset` of `channel`, or None when that message is no
    /// longer stored (retention or compaction removed it) or cannot be read.
    fn payload(&self, channel: &str, offset: u64) -> Option<String>;
}

/// Decides which old messages of a channel to drop.
pub trait RetentionPolicy: Send + Sync {
    /// Name for logs and metrics.
    fn name(&self) -> &str;
    /// One round for one channel.
    fn decide(&self, input: &RetentionInput) -> Result<RetentionDecision, PolicyError>;

    /// One round for several channels, one answer per input in order. By default each is
    /// decided on its own; a plugin decides them in as few calls as it can.
    fn decide_many(&self, inputs: &[RetentionInput]) -> Vec<Result<RetentionDecision, PolicyError>> {
        inputs.iter().map(|i| self.decide(i)).collect()
    }

    /// [`decide_many`](Self::decide_many) for a policy that may read payloads through
    /// `payloads` while it decides (a v2 plugin does, on its guest's demand). By default
    /// the payloads are not read.
    fn decide_many_with(
        &self,
        inputs: &[RetentionInput],
        payloads: &Arc<dyn Payloads>,
    ) -> Vec<Result<RetentionDecision, PolicyError>> {
        let _ = payloads;
        self.decide_many(inputs)
    }

    /// A cheap pre-check from counters alone (and the oldest message's timestamp): false
    /// means the round would certainly keep everything, so no metadata is read.
    fn needs_round(&self, _stats: &ChannelStats, _oldest_ts: u64, _now_ms: u64) -> bool {
        true
    }

    /// True when a round costs enough (a plugin call) that a channel whose counters did not
    /// change is visited only every `maintenance.idle_recheck`, not every interval.
    fn skips_idle_channels(&self) -> bool {
        false
    }
}

/// Decides which superseded keyed messages of a channel to remove.
pub trait CompactionPolicy: Send + Sync {
    /// Name for logs and metrics.
    fn name(&self) -> &str;
    /// One round for one channel.
    fn decide(&self, input: &CompactionInput) -> Result<CompactionDecision, PolicyError>;

    /// One round for several channels, one answer per input in order. By default each is
    /// decided on its own; a plugin decides them in as few calls as it can.
    fn decide_many(&self, inputs: &[CompactionInput]) -> Vec<Result<CompactionDecision, PolicyError>> {
        inputs.iter().map(|i| self.decide(i)).collect()
    }

    /// [`decide_many`](Self::decide_many) for a policy that may read payloads through
    /// `payloads` while it decides (a v2 plugin does, on its guest's demand). By default
    /// the payloads are not read.
    fn decide_many_with(
        &self,
        inputs: &[CompactionInput],
        payloads: &Arc<dyn Payloads>,
    ) -> Vec<Result<CompactionDecision, PolicyError>> {
        let _ = payloads;
        self.decide_many(inputs)
    }

    /// Most keyed messages shown in one round (a plugin must answer within its deadline).
    fn max_window(&self) -> usize {
        100_000
    }
}

/// Runs balancer plugins: implemented by the plugin host, called by the cluster's leader.
pub trait BalancePlugins: Send + Sync {
    /// Runs plugin `plugin` (with `params` as JSON text) on `input` (an ABI v2 plugin also
    /// sees `replicas`) and validates the answer with [`validate_balance`] and, when it
    /// placed followers, [`validate_followers`]; an error says why there is no usable
    /// decision, and the caller falls back to the built-in balancer (owners and followers)
    /// for the round.
    fn balance(
        &self,
        plugin: &str,
        params: &str,
        input: &BalanceInput,
        replicas: &ReplicaInput,
    ) -> Result<BalancePlan, PolicyError>;
}

/// A plugin bound to a role (a namespace's retention, the balancer), with its params.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginBinding {
    /// Plugin name: the `.wasm` file stem in the plugin folder.
    pub plugin: String,
    /// Params handed to the plugin as JSON.
    #[serde(default = "empty_params")]
    pub params: serde_json::Value,
}

/// `{}`.
pub fn empty_params() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// A duration in whole milliseconds, saturating.
pub fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

// === impl LimitsRetention ===

/// Built-in retention: keep at most `size` messages, none older than `ttl`, at most `bytes`
/// bytes (each limit off when 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsRetention {
    /// Most messages kept (0 = unlimited).
    pub size: u64,
    /// Longest a message is kept, in ms (0 = unlimited).
    pub ttl_ms: u64,
    /// Most bytes kept (0 = unlimited).
    pub bytes: u64,
}

impl LimitsRetention {
    /// True when no limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.size == 0 && self.ttl_ms == 0 && self.bytes == 0
    }
}

impl RetentionPolicy for LimitsRetention {
    fn name(&self) -> &str {
        "builtin:limits"
    }

    fn needs_round(&self, stats: &ChannelStats, oldest_ts: u64, now_ms: u64) -> bool {
        (self.size > 0 && stats.count > self.size)
            || (self.bytes > 0 && stats.bytes > self.bytes)
            || (self.ttl_ms > 0 && oldest_ts < now_ms.saturating_sub(self.ttl_ms))
    }

    fn decide(&self, input: &RetentionInput) -> Result<RetentionDecision, PolicyError> {
        let stats = &input.stats;
        // Number of the oldest shown messages each limit wants gone; the largest wins.
        let mut drop = 0usize;
        if self.size > 0 && stats.count > self.size {
            drop = drop.max((stats.count - self.size) as usize);
        }
        if self.ttl_ms > 0 {
            let cutoff = input.now_ms.saturating_sub(self.ttl_ms);
            drop = drop.max(input.oldest.iter().take_while(|m| m.ts < cutoff).count());
        }
        if self.bytes > 0 && stats.bytes > self.bytes {
            let mut excess = stats.bytes - self.bytes;
            let mut n = 0;
            for m in &input.oldest {
                if excess == 0 {
                    break;
                }
                excess = excess.saturating_sub(m.size as u64);
                n += 1;
            }
            drop = drop.max(n);
        }
        let drop = drop.min(input.oldest.len());
        Ok(match drop {
            0 => RetentionDecision::Keep,
            n => RetentionDecision::DropBelow(input.oldest[n - 1].offset + 1),
        })
    }
}

// === impl KeyedCompaction ===

/// Built-in compaction: keep the latest value per key; a newer message with the same key
/// supersedes an older one (only when it came within `window_ms`, if set); a tombstone that
/// is the latest for its key is removed once older than `tombstone_delay_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedCompaction {
    /// Supersede only within this many ms (None = always).
    pub window_ms: Option<u64>,
    /// Age after which a latest tombstone is removed.
    pub tombstone_delay_ms: u64,
}

impl CompactionPolicy for KeyedCompaction {
    fn name(&self) -> &str {
        "builtin:keyed"
    }

    fn decide(&self, input: &CompactionInput) -> Result<CompactionDecision, PolicyError> {
        use std::collections::HashMap;
        // Walk newest to oldest, remembering the ts of the next newer message per key.
        let mut newer: HashMap<&str, u64> = HashMap::new();
        let mut remove = Vec::new();
        for m in input.window.iter().rev() {
            let Some(key) = m.key.as_deref() else { continue };
            match newer.get(key) {
                Some(&newer_ts) => {
                    if self.window_ms.is_none_or(|w| newer_ts.saturating_sub(m.ts) <= w) {
                        remove.push(m.offset);
                    }
                }
                None => {
                    if m.tombstone && input.now_ms.saturating_sub(m.ts) >= self.tombstone_delay_ms {
                        remove.push(m.offset);
                    }
                }
            }
            newer.insert(key, m.ts);
        }
        remove.reverse();
        Ok(CompactionDecision { remove })
    }
}

// === validation ===

/// Checks a retention decision against the channel: it may not drop above the top.
pub fn validate_retention(policy: &str, input: &RetentionInput, d: &RetentionDecision) -> Result<(), PolicyError> {
    if let RetentionDecision::DropBelow(x) = d {
        if *x > input.stats.last_offset + 1 {
            return Err(PolicyError::Invalid {
                policy: policy.into(),
                message: format!("drop below {x} is above the channel top {}", input.stats.last_offset),
            });
        }
    }
    Ok(())
}

/// Checks a compaction decision: each offset at most once, and only offsets that were shown.
pub fn validate_compaction(policy: &str, input: &CompactionInput, d: &CompactionDecision) -> Result<(), PolicyError> {
    let invalid = |message: String| Err(PolicyError::Invalid { policy: policy.into(), message });
    if d.remove.len() > input.window.len() {
        return invalid(format!("{} removals for a window of {}", d.remove.len(), input.window.len()));
    }
    let shown: std::collections::HashSet<u64> = input.window.iter().map(|m| m.offset).collect();
    let mut seen = std::collections::HashSet::with_capacity(d.remove.len());
    for o in &d.remove {
        if !shown.contains(o) {
            return invalid(format!("offset {o} was not in the window"));
        }
        if !seen.insert(*o) {
            return invalid(format!("offset {o} removed twice"));
        }
    }
    Ok(())
}

/// Checks a balancing decision: one live owner per partition, and at most `max_moves`
/// partitions whose current owner is live get a new one (orphans must be placed and do
/// not count as moves).
pub fn validate_balance(
    policy: &str,
    input: &switchyard_sdk::BalanceInput,
    d: &switchyard_sdk::BalanceDecision,
) -> Result<(), PolicyError> {
    let invalid = |message: String| Err(PolicyError::Invalid { policy: policy.into(), message });
    if d.owners.len() != input.partitions.len() {
        return invalid(format!("{} owners for {} partitions", d.owners.len(), input.partitions.len()));
    }
    let live: std::collections::HashSet<&str> = input.nodes.iter().map(|n| n.id.as_str()).collect();
    if let Some((p, owner)) = d.owners.iter().enumerate().find(|(_, o)| !live.contains(o.as_str())) {
        return invalid(format!("partition {p} given to {owner:?}, which is not a live node"));
    }
    let moves = input
        .partitions
        .iter()
        .zip(&d.owners)
        .filter(|(p, new)| p.owner.as_deref().is_some_and(|old| live.contains(old) && old != new.as_str()))
        .count();
    if moves > input.max_moves as usize {
        return invalid(format!("{moves} partitions moved; the limit is {}", input.max_moves));
    }
    Ok(())
}

/// Checks a balancer's followers: one list per partition, of `replicas.replicas - 1` live
/// nodes (fewer copies when there are fewer live nodes: at most one per node), distinct,
/// none of them the partition's owner.
pub fn validate_followers(
    policy: &str,
    input: &BalanceInput,
    replicas: &ReplicaInput,
    owners: &[String],
    followers: &[Vec<String>],
) -> Result<(), PolicyError> {
    let invalid = |message: String| Err(PolicyError::Invalid { policy: policy.into(), message });
    if followers.len() != owners.len() {
        return invalid(format!("followers for {} partitions; there are {}", followers.len(), owners.len()));
    }
    let live: std::collections::HashSet<&str> = input.nodes.iter().map(|n| n.id.as_str()).collect();
    let want = (replicas.replicas as usize).clamp(1, live.len().max(1)) - 1;
    for (p, (row, owner)) in followers.iter().zip(owners).enumerate() {
        if row.len() != want {
            return invalid(format!("partition {p} has {} followers; it needs {want}", row.len()));
        }
        for (k, f) in row.iter().enumerate() {
            if !live.contains(f.as_str()) {
                return invalid(format!("partition {p}: follower {f:?} is not a live node"));
            }
            if f == owner {
                return invalid(format!("partition {p}: follower {f:?} is its owner"));
            }
            if row[..k].contains(f) {
                return invalid(format!("partition {p}: follower {f:?} given twice"));
            }
        }
    }
    Ok(())
}

// === impl Policies ===

/// The policies bound to one namespace.
#[derive(Clone)]
pub struct Bound {
    /// Retention, or None when every limit is off.
    pub retention: Option<Arc<dyn RetentionPolicy>>,
    /// Compaction, or None when not configured.
    pub compaction: Option<Arc<dyn CompactionPolicy>>,
}

/// Resolves a channel to its bound policies.
pub struct Policies {
    defaults: Bound,
    namespaces: std::collections::HashMap<String, Bound>,
}

/// The built-in policies of a namespace, wrapped by its plugin bindings when `plugins` is
/// given. A bound plugin falls back to the built-in one on any failure.
impl Policies {
    /// Bindings: `defaults` for channels outside every listed namespace.
    pub fn new(defaults: Bound, namespaces: std::collections::HashMap<String, Bound>) -> Self {
        Self { defaults, namespaces }
    }

    /// The policies for `channel`.
    pub fn for_channel(&self, channel: &str) -> &Bound {
        switchyard_proto::channel::namespace(channel).and_then(|ns| self.namespaces.get(ns)).unwrap_or(&self.defaults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::MessageMeta;

    fn meta(offset: u64, ts: u64, size: u32, key: Option<&str>, tombstone: bool) -> MessageMeta {
        MessageMeta { offset, ts, size, key: key.map(String::from), tombstone }
    }

    fn input(first: u64, last: u64, now_ms: u64, oldest: Vec<MessageMeta>) -> RetentionInput {
        let bytes = oldest.iter().map(|m| m.size as u64).sum();
        RetentionInput {
            channel: "c".into(),
            stats: ChannelStats { first_offset: first, last_offset: last, count: oldest.len() as u64, bytes },
            oldest,
            now_ms,
        }
    }

    #[test]
    fn retention_by_count_age_and_bytes() {
        let msgs: Vec<_> = (1..=10).map(|i| meta(i, i * 100, 10, None, false)).collect();
        let by_count = LimitsRetention { size: 3, ttl_ms: 0, bytes: 0 };
        assert_eq!(by_count.decide(&input(1, 10, 0, msgs.clone())).unwrap(), RetentionDecision::DropBelow(8));
        let by_age = LimitsRetention { size: 0, ttl_ms: 500, bytes: 0 };
        // now 1000, cutoff 500: offsets 1..=4 (ts < 500) go.
        assert_eq!(by_age.decide(&input(1, 10, 1000, msgs.clone())).unwrap(), RetentionDecision::DropBelow(5));
        let by_bytes = LimitsRetention { size: 0, ttl_ms: 0, bytes: 25 };
        assert_eq!(by_bytes.decide(&input(1, 10, 0, msgs.clone())).unwrap(), RetentionDecision::DropBelow(9));
        let all = LimitsRetention { size: 20, ttl_ms: 10_000, bytes: 1000 };
        let inp = input(1, 10, 1000, msgs);
        assert_eq!(all.decide(&inp).unwrap(), RetentionDecision::Keep);
        assert!(!all.needs_round(&inp.stats, 100, 1000));
        assert!(by_count.needs_round(&inp.stats, 100, 1000));
        assert!(by_age.needs_round(&inp.stats, 100, 1000));
        assert!(!by_age.needs_round(&inp.stats, 600, 1000));
    }

    #[test]
    fn compaction_keeps_latest_per_key() {
        let w = vec![
            meta(1, 0, 1, Some("a"), false),
            meta(2, 10, 1, Some("b"), false),
            meta(3, 20, 1, None, false),
            meta(4, 30, 1, Some("a"), false),
            meta(5, 40, 1, Some("b"), true),
        ];
        let c = KeyedCompaction { window_ms: None, tombstone_delay_ms: 100 };
        let inp = CompactionInput { channel: "c".into(), window: w.clone(), now_ms: 100 };
        assert_eq!(c.decide(&inp).unwrap().remove, vec![1, 2]);
        // Later, the tombstone itself is old enough to go.
        let inp = CompactionInput { channel: "c".into(), window: w.clone(), now_ms: 140 };
        assert_eq!(c.decide(&inp).unwrap().remove, vec![1, 2, 5]);

        let c = KeyedCompaction { window_ms: Some(25), tombstone_delay_ms: 1000 };
        let inp = CompactionInput { channel: "c".into(), window: w, now_ms: 100 };
        assert_eq!(c.decide(&inp).unwrap().remove, Vec::<u64>::new());
    }

    #[test]
    fn balance_validation() {
        use switchyard_sdk::{BalanceDecision, NodeInfo, PartitionInfo};
        let node = |id: &str| NodeInfo { id: id.into(), weight: 1.0, ..Default::default() };
        let part = |id: u32, owner: &str| PartitionInfo { id, owner: Some(owner.into()), ..Default::default() };
        let input = BalanceInput {
            nodes: vec![node("a"), node("b")],
            partitions: vec![part(0, "a"), part(1, "a"), part(2, "gone")],
            max_moves: 1,
            now_ms: 0,
        };
        let ok = |owners: &[&str]| {
            validate_balance("p", &input, &BalanceDecision { owners: owners.iter().map(|s| s.to_string()).collect() })
        };
        assert!(ok(&["a", "b", "b"]).is_ok(), "one move plus placing an orphan");
        assert!(ok(&["b", "b", "a"]).is_err(), "two moves");
        assert!(ok(&["a", "a", "gone"]).is_err(), "dead owner");
        assert!(ok(&["a", "a"]).is_err(), "missing partition");

        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let owners = s(&["a", "b", "b"]);
        let two = ReplicaInput { replicas: 2, followers: vec![] };
        let fol = |rows: &[&[&str]]| {
            let rows: Vec<Vec<String>> = rows.iter().map(|r| s(r)).collect();
            validate_followers("p", &input, &two, &owners, &rows)
        };
        assert!(fol(&[&["b"], &["a"], &["a"]]).is_ok());
        assert!(fol(&[&["b"], &["a"]]).is_err(), "a partition without followers");
        assert!(fol(&[&["a"], &["a"], &["a"]]).is_err(), "the owner as its own follower");
        assert!(fol(&[&["gone"], &["a"], &["a"]]).is_err(), "not a live node");
        assert!(fol(&[&["b", "b"], &["a"], &["a"]]).is_err(), "too many (and twice)");
        assert!(fol(&[&[], &["a"], &["a"]]).is_err(), "too few");
        // Three copies wanted of two nodes: one follower each.
        let three = ReplicaInput { replicas: 3, followers: vec![] };
        let rows = vec![s(&["b"]), s(&["a"]), s(&["a"])];
        assert!(validate_followers("p", &input, &three, &owners, &rows).is_ok());
    }

    #[test]
    fn validation_rejects_out_of_range_answers() {
        let inp = input(1, 5, 0, vec![]);
        assert!(validate_retention("p", &inp, &RetentionDecision::DropBelow(6)).is_ok());
        assert!(validate_retention("p", &inp, &RetentionDecision::DropBelow(7)).is_err());
        let ci = CompactionInput { channel: "c".into(), window: vec![meta(2, 0, 1, Some("k"), false)], now_ms: 0 };
        assert!(validate_compaction("p", &ci, &CompactionDecision { remove: vec![2] }).is_ok());
        assert!(validate_compaction("p", &ci, &CompactionDecision { remove: vec![3] }).is_err());
        assert!(validate_compaction("p", &ci, &CompactionDecision { remove: vec![2, 2] }).is_err());
    }
}

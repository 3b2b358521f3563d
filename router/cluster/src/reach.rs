//! Reachability: which members each node's peer links reach, and which nodes the leader
//! takes partition leadership away from because most of the others cannot reach them.
//!
//! It owns the `reach/<id>` report (written under the session's lease when the set of
//! peers whose link is up changes), the majority rule ([`unreachable`]: a node is cut off
//! when most of the other live members, counting only reporters that themselves reach a
//! majority, report no link to it) and its damping ([`Tracker`]: cut off only after the
//! rule held for `unreachable_after`, restored only after it stopped holding for
//! `reachable_after`). It must never write the map or decide where a partition goes: the
//! leader removes the nodes [`Tracker`] says are cut off from its round, which then fails
//! their partitions over to in-sync followers like those of a departed member.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{Client, PutOptions};
use tokio::time::Instant;

use switchyard_store::Health;

use crate::keys::{self, ReachRecord, StoreState};
use crate::{timed, Context, Error, State};

/// How often the report looks for a partition this node leads with a lost log tail.
const LOST_TAIL_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Writes `reach/<id>` under `lease` now and whenever the set of reachable peers or the
/// store's health changes. Without peer links there is nothing to report (and no replica
/// to move to): it waits forever (the session's other tasks end it).
pub(crate) async fn report(
    node: &Arc<Context>,
    state: &Arc<State>,
    mut client: Client,
    lease: i64,
) -> Result<(), Error> {
    let Some(mut reach) = node.reach.clone() else { return std::future::pending().await };
    let mut health = node.partitions.store.health();
    let key = state.keys.reach(&state.node_id);
    // A lost log tail (found by a follower's fetch) and damaged data (found by a read)
    // come without a wake-up of their own: they are looked at on a short tick (a scan of
    // P small locks and one flag).
    let mut tick = tokio::time::interval(LOST_TAIL_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let store_state = |health: &mut tokio::sync::watch::Receiver<Health>| match *health.borrow_and_update() {
        Health::NoSpace => StoreState::NoSpace,
        Health::Failed => StoreState::Failed,
        Health::Ok if node.partitions.replication.any_lost_tail() => StoreState::LostTail,
        Health::Ok if node.partitions.store.has_damage() => StoreState::Damaged,
        Health::Ok => StoreState::Ok,
    };
    loop {
        let reachable: Vec<String> = reach.borrow_and_update().iter().cloned().collect();
        let store = store_state(&mut health);
        let record = ReachRecord { reachable, since: keys::timestamp(SystemTime::now()), store };
        let json = serde_json::to_string_pretty(&record).expect("reach record serializes");
        let put = client.put(key.clone(), json, Some(PutOptions::new().with_lease(lease)));
        timed("write reach", state.config.etcd_timeout, put).await?;
        tracing::debug!(reachable = ?record.reachable, store = ?record.store, "reachability reported");
        let changed = loop {
            tokio::select! {
                r = reach.changed() => break r.is_ok(),
                r = health.changed() => break r.is_ok(),
                _ = tick.tick() => {
                    if store_state(&mut health) != store {
                        break true;
                    }
                }
            }
        };
        if !changed {
            return std::future::pending().await;
        }
    }
}

/// The live nodes whose own report says their store cannot write. Unlike reachability,
/// this needs no majority: a node knows its own disk.
pub fn unwritable(live: &BTreeSet<&str>, reports: &BTreeMap<String, ReachRecord>) -> BTreeSet<String> {
    reports
        .iter()
        .filter(|(id, r)| live.contains(id.as_str()) && !r.store.writable())
        .map(|(id, _)| id.clone())
        .collect()
}

/// The live nodes that a majority of the other live nodes report unreachable right now.
///
/// Only reports of live nodes that themselves reach a majority of the live nodes (counting
/// themselves) count: a node cut off from everyone reports everyone unreachable, and that
/// must not take leadership from the others. A node without a report (an older version,
/// or no peer links) counts as a reporter that reaches everyone. With fewer than three live
/// nodes nobody is ever cut off: two nodes cannot tell which of them is.
pub fn unreachable(live: &BTreeSet<&str>, reports: &BTreeMap<String, ReachRecord>) -> BTreeSet<String> {
    let n = live.len();
    if n < 3 {
        return BTreeSet::new();
    }
    let reaches = |r: &str, x: &str| reports.get(r).is_none_or(|rec| rec.reachable.iter().any(|p| p == x));
    // Reporters that see a strict majority of the live nodes, themselves included.
    let credible: BTreeSet<&str> = live
        .iter()
        .copied()
        .filter(|r| match reports.get(*r) {
            None => true,
            Some(rec) => {
                let seen = rec.reachable.iter().filter(|p| p.as_str() != *r && live.contains(p.as_str())).count();
                2 * (seen + 1) > n
            }
        })
        .collect();
    live.iter()
        .copied()
        .filter(|x| {
            let against = credible.iter().filter(|r| *r != x && !reaches(r, x)).count();
            // A strict majority of the other live nodes.
            2 * against > n - 1
        })
        .map(str::to_string)
        .collect()
}

/// One node's damped state.
#[derive(Debug, Clone, Copy)]
struct Track {
    /// Whether the node counts as cut off now.
    cut: bool,
    /// Since when the majority rule has said the opposite of `cut`, if it does.
    flipping: Option<Instant>,
    /// Not cut off before this: a node that rejoins during the term gets `up_after` for
    /// the others' links to it to come back (they may be in their reconnect backoff) and
    /// their reports to say so; until then their reports still describe the node that left.
    not_before: Instant,
}

/// The leader's damped view of [`unreachable`]: a node is cut off once the rule has held
/// for it continuously for `down_after`, and counts as reachable again once the rule has
/// not held for `up_after` (longer, so a flapping link does not move leadership back and
/// forth). Kept for one term: a new leader starts with every node reachable.
#[derive(Debug)]
pub struct Tracker {
    down_after: Duration,
    up_after: Duration,
    nodes: BTreeMap<String, Track>,
    /// Nodes that left during the term: if one comes back, it gets the grace above.
    departed: BTreeSet<String>,
}

impl Tracker {
    /// A tracker with these delays.
    pub fn new(down_after: Duration, up_after: Duration) -> Self {
        Self { down_after, up_after, nodes: BTreeMap::new(), departed: BTreeSet::new() }
    }

    /// Takes the rule's answer `now` (`unreachable` among `live`) and returns the nodes
    /// that count as cut off. Nodes no longer live are forgotten; one that comes back in the
    /// same term cannot be cut off for `up_after`.
    pub fn observe(&mut self, now: Instant, live: &BTreeSet<&str>, unreachable: &BTreeSet<String>) -> BTreeSet<String> {
        let departed = &mut self.departed;
        self.nodes.retain(|id, _| {
            let stays = live.contains(id.as_str());
            if !stays {
                departed.insert(id.clone());
            }
            stays
        });
        for id in live {
            let bad = unreachable.contains(*id);
            let not_before = if self.departed.contains(*id) { now + self.up_after } else { now };
            let t = self.nodes.entry(id.to_string()).or_insert(Track { cut: false, flipping: None, not_before });
            if bad == t.cut {
                t.flipping = None;
                continue;
            }
            let since = *t.flipping.get_or_insert(now);
            if now >= due(t, since, self.down_after, self.up_after) {
                t.cut = bad;
                t.flipping = None;
                if bad {
                    tracing::warn!(node = %id, "most members cannot reach this node, or its store cannot write: moving its partition leadership and replicas away");
                } else {
                    tracing::info!(node = %id, "node reachable again");
                }
            }
        }
        self.cut()
    }

    /// The nodes that count as cut off.
    pub fn cut(&self) -> BTreeSet<String> {
        self.nodes.iter().filter(|(_, t)| t.cut).map(|(id, _)| id.clone()).collect()
    }

    /// When the next pending change falls due, if one is pending: the leader runs a round
    /// then.
    pub fn next_change(&self) -> Option<Instant> {
        self.nodes.values().filter_map(|t| t.flipping.map(|s| due(t, s, self.down_after, self.up_after))).min()
    }
}

/// When `t`'s flip, pending since `since`, takes effect.
fn due(t: &Track, since: Instant, down_after: Duration, up_after: Duration) -> Instant {
    if t.cut {
        since + up_after
    } else {
        (since + down_after).max(t.not_before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live<'a>(ids: &[&'a str]) -> BTreeSet<&'a str> {
        ids.iter().copied().collect()
    }

    fn reports(r: &[(&str, &[&str])]) -> BTreeMap<String, ReachRecord> {
        r.iter()
            .map(|(id, reach)| {
                let reachable = reach.iter().map(|s| s.to_string()).collect();
                (id.to_string(), ReachRecord { reachable, since: String::new(), store: StoreState::Ok })
            })
            .collect()
    }

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    /// A node cut from its peers is cut off; its own report (it reaches nobody) takes
    /// nothing from the others.
    #[test]
    fn a_majority_of_credible_reporters_cuts_a_node_off() {
        let l = live(&["a", "b", "c"]);
        let r = reports(&[("a", &[]), ("b", &["c"]), ("c", &["b"])]);
        assert_eq!(unreachable(&l, &r), set(&["a"]));
        // Everyone reaches everyone: nobody.
        let r = reports(&[("a", &["b", "c"]), ("b", &["a", "c"]), ("c", &["a", "b"])]);
        assert!(unreachable(&l, &r).is_empty());
        // One link down (b cannot reach a, everyone else fine): one voice of two, no.
        let r = reports(&[("a", &["b", "c"]), ("b", &["c"]), ("c", &["a", "b"])]);
        assert!(unreachable(&l, &r).is_empty());
        // Reports naming nodes that are not live do not make a reporter credible.
        let r = reports(&[("a", &["x", "y"]), ("b", &["c"]), ("c", &["b"])]);
        assert_eq!(unreachable(&l, &r), set(&["a"]));
    }

    /// Two live nodes cannot tell which one is cut off, and a node without a report counts
    /// as reaching everyone.
    #[test]
    fn small_clusters_and_missing_reports_cut_nobody_off() {
        let r = reports(&[("a", &[]), ("b", &[])]);
        assert!(unreachable(&live(&["a", "b"]), &r).is_empty());
        assert!(unreachable(&live(&["a"]), &r).is_empty());
        // c has no report: it reaches a; b alone is not a majority of a's others.
        let r = reports(&[("a", &[]), ("b", &["c"])]);
        assert!(unreachable(&live(&["a", "b", "c"]), &r).is_empty());
        // Five nodes, a split 2/3: the two on the small side lose leadership, the three
        // keep it (the two are not credible: they see 2 of 5).
        let l = live(&["a", "b", "c", "d", "e"]);
        let r = reports(&[("a", &["b"]), ("b", &["a"]), ("c", &["d", "e"]), ("d", &["c", "e"]), ("e", &["c", "d"])]);
        assert_eq!(unreachable(&l, &r), set(&["a", "b"]));
        // Every node alone: nobody is credible, nobody is cut off.
        let r = reports(&[("a", &[]), ("b", &[]), ("c", &[]), ("d", &[]), ("e", &[])]);
        assert!(unreachable(&l, &r).is_empty());
    }

    /// A node whose own report says its store cannot take writes (or that it lost a log
    /// tail) is taken off without any majority; a report without the field, or of a node
    /// that is not live, takes nobody off.
    #[test]
    fn a_node_that_cannot_write_is_taken_off_on_its_own_word() {
        let l = live(&["a", "b", "c"]);
        let mut r = reports(&[("a", &["b", "c"]), ("b", &["a", "c"]), ("c", &["a", "b"])]);
        assert!(unwritable(&l, &r).is_empty());
        for (state, taken) in [
            (StoreState::NoSpace, true),
            (StoreState::Failed, true),
            (StoreState::LostTail, true),
            (StoreState::Damaged, true),
            (StoreState::Ok, false),
        ] {
            r.get_mut("b").unwrap().store = state;
            assert_eq!(unwritable(&l, &r) == set(&["b"]), taken, "{state:?}");
        }
        r.get_mut("b").unwrap().store = StoreState::NoSpace;
        assert!(unwritable(&live(&["a", "c"]), &r).is_empty(), "only live nodes");
        // Two live nodes: unlike reachability, no majority is needed.
        assert_eq!(unwritable(&live(&["a", "b"]), &r), set(&["b"]));
        // An older node's report has no `store` field: it can write.
        let old: ReachRecord = serde_json::from_str(r#"{"reachable":["a"],"since":""}"#).unwrap();
        assert_eq!(old.store, StoreState::Ok);
    }

    /// Cut off only after `down_after` of continuous reports, restored only after
    /// `up_after` of continuous reachability; a flap restarts the count.
    #[test]
    fn the_tracker_damps_flapping() {
        let (down, up) = (Duration::from_millis(500), Duration::from_secs(3));
        let mut t = Tracker::new(down, up);
        let l = live(&["a", "b", "c"]);
        let t0 = Instant::now();
        let bad = set(&["a"]);
        let none = BTreeSet::new();
        assert!(t.observe(t0, &l, &bad).is_empty());
        assert_eq!(t.next_change(), Some(t0 + down));
        assert!(t.observe(t0 + Duration::from_millis(300), &l, &bad).is_empty());
        // A flap back: the count restarts.
        assert!(t.observe(t0 + Duration::from_millis(400), &l, &none).is_empty());
        assert_eq!(t.next_change(), None);
        let t1 = t0 + Duration::from_millis(450);
        assert!(t.observe(t1, &l, &bad).is_empty());
        assert!(t.observe(t1 + Duration::from_millis(499), &l, &bad).is_empty());
        assert_eq!(t.observe(t1 + down, &l, &bad), set(&["a"]));
        assert_eq!(t.next_change(), None);
        // Reachable again: cut off until up_after has passed without a report against it.
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(t.observe(t2, &l, &none), set(&["a"]));
        assert_eq!(t.next_change(), Some(t2 + up));
        assert_eq!(t.observe(t2 + Duration::from_secs(2), &l, &none), set(&["a"]));
        // A short relapse restarts the wait.
        assert_eq!(t.observe(t2 + Duration::from_millis(2500), &l, &bad), set(&["a"]));
        let t3 = t2 + Duration::from_secs(3);
        assert_eq!(t.observe(t3, &l, &none), set(&["a"]));
        assert_eq!(t.observe(t3 + up - Duration::from_millis(1), &l, &none), set(&["a"]));
        assert!(t.observe(t3 + up, &l, &none).is_empty());
        // A node that leaves is forgotten: if it returns it starts reachable, and the
        // others' reports (still about the node that left) cannot cut it off for up_after.
        assert_eq!(t.observe(t3 + up, &l, &bad), BTreeSet::new());
        let later = t3 + up + down;
        assert_eq!(t.observe(later, &l, &bad), set(&["a"]));
        assert!(t.observe(later, &live(&["b", "c"]), &none).is_empty());
        assert!(t.observe(later, &l, &bad).is_empty());
        assert!(t.observe(later + down, &l, &bad).is_empty(), "a returning node has a grace");
        assert_eq!(t.next_change(), Some(later + up));
        assert!(t.observe(later + up - Duration::from_millis(1), &l, &bad).is_empty());
        assert_eq!(t.observe(later + up, &l, &bad), set(&["a"]));
        // A node that joins for the first time mid-term has no grace.
        let (l4, t4) = (live(&["a", "b", "c", "d"]), later + up);
        let d = set(&["d"]);
        assert_eq!(t.observe(t4, &l4, &d), set(&["a"]), "a is still cut: restoring takes up_after");
        assert_eq!(t.observe(t4 + down, &l4, &d), set(&["a", "d"]));
    }
}

//! Leader election and the leader's coordination rounds.
//!
//! It owns the campaign under `election` (etcd's election API, on the session's lease, so
//! keepalive keeps running while it waits), the check before every leader action that the
//! leader key still exists with its create revision (the term), stepping down by the node's
//! own clock when the lease was not renewed in time, and each round: read the live nodes,
//! their load, their reachability reports and the current map, leave out the nodes most
//! others cannot reach (damped by [`reach::Tracker`]; their partitions fail over to in-sync
//! followers exactly as a departed member's do, and never uncleanly; a leader cut off
//! from its peers but not from etcd leads on and gives its own partitions away), balance
//! (draining members get nothing and lose what they
//! hold; with every member draining the map stays), validate, steer the partitions that
//! operators asked to move (`moves/<p>`, [`move_requests`]), and publish `epoch + 1`, with
//! the move record of every partition whose owner changed ([`next_moved`]), in a
//! transaction fenced on the leader key's create revision and the map's mod revision. It
//! must never write the map outside that transaction: a deposed leader's write must fail.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use super::keys::{self, LeaderRecord, LoadRecord, MapRecord, Moved, NodeRecord};
use super::{balance, move_requests, moves, reach, replicas, timed, Error, LeaseClock, State};
use crate::Context;

/// The leadership this node holds: the election key and its create revision.
#[derive(Debug, Clone)]
pub struct Leadership {
    /// The election key (`election/<lease>`).
    pub key: Vec<u8>,
    /// Its create revision: the term.
    pub term: i64,
}

/// Campaigns, then leads until leadership or the session is lost.
pub(super) async fn run(
    node: &Arc<Context>,
    state: &Arc<State>,
    client: Client,
    lease: i64,
    clock: LeaseClock,
) -> Result<(), Error> {
    let t = state.config.etcd_timeout;
    let mut election = client.election_client();
    // Blocks until elected; the session's keepalive runs meanwhile.
    let resp = election
        .campaign(state.keys.election(), serde_json::json!({ "node": state.node_id }).to_string(), lease)
        .await?;
    let leader = resp.leader().ok_or_else(|| Error::Deposed("campaign returned no leader key".into()))?;
    let me = Leadership { key: leader.key().to_vec(), term: leader.rev() };
    let mut kv = client.clone();
    // `campaign` can return after our lease expired: check before acting.
    verify(&mut kv, &me, t).await?;
    if !clock.fresh() {
        return Err(Error::Deposed("elected, but the lease was not renewed in time".into()));
    }
    let record = LeaderRecord { node: state.node_id.clone(), term: me.term, since: keys::timestamp(SystemTime::now()) };
    let json = serde_json::to_string_pretty(&record).expect("leader record serializes");
    let txn = Txn::new()
        .when([Compare::create_revision(me.key.clone(), CompareOp::Equal, me.term)])
        .and_then([TxnOp::put(state.keys.leader(), json, Some(PutOptions::new().with_lease(lease)))]);
    if !timed("write leader", t, kv.txn(txn)).await?.succeeded() {
        return Err(Error::Deposed("leader key changed before the leader record was written".into()));
    }
    tracing::info!(term = me.term, "elected leader");
    node.metrics.cluster_is_leader.set(1);
    state.update(|v| v.is_leader = true);
    let tracker = reach::Tracker::new(state.config.unreachable_after, state.config.reachable_after);
    let result = Leader { node, state, kv: &mut kv, me: &me, clock: &clock, tracker }.lead().await;
    node.metrics.cluster_is_leader.set(0);
    state.update(|v| v.is_leader = false);
    tracing::warn!(term = me.term, "stepped down");
    result
}

/// Checks that our election key still exists with our create revision.
pub async fn verify(kv: &mut Client, me: &Leadership, limit: std::time::Duration) -> Result<(), Error> {
    let resp = timed("check leader key", limit, kv.get(me.key.clone(), None)).await?;
    match resp.kvs().first() {
        Some(k) if k.create_revision() == me.term => Ok(()),
        Some(_) => Err(Error::Deposed("leader key was re-created".into())),
        None => Err(Error::Deposed("leader key is gone (lease expired)".into())),
    }
}

/// A node while it leads: everything a round needs.
struct Leader<'a> {
    node: &'a Arc<Context>,
    state: &'a Arc<State>,
    kv: &'a mut Client,
    me: &'a Leadership,
    clock: &'a LeaseClock,
    /// Which nodes count as cut off, this term.
    tracker: reach::Tracker,
}

impl Leader<'_> {
    /// Rounds every interval, and at once on a membership or config change, until a
    /// round finds leadership lost.
    async fn lead(mut self) -> Result<(), Error> {
        let mut dynamic = self.state.dynamic.subscribe();
        loop {
            self.round().await?;
            let interval =
                self.state.dynamic().coordination_interval.unwrap_or(self.state.config.coordination_interval);
            // A node about to be cut off or restored gets its round when that falls due.
            let next = tokio::time::Instant::now() + interval;
            let next = self.tracker.next_change().map_or(next, |due| due.min(next));
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.state.membership.notified() => {}
                _ = dynamic.changed() => {}
            }
        }
    }

    /// One coordination round.
    #[tracing::instrument(name = "leader_round", skip_all, fields(term = self.me.term))]
    async fn round(&mut self) -> Result<(), Error> {
        let (node, state, me, clock) = (self.node, self.state, self.me, self.clock);
        let kv = &mut *self.kv;
        let t = state.config.etcd_timeout;
        let rounds = &node.metrics.cluster_rounds;
        if !clock.fresh() {
            return Err(Error::Deposed("own clock: the lease was not renewed within its TTL".into()));
        }
        verify(kv, me, t).await?;
        let prefix = Some(GetOptions::new().with_prefix());
        let mut nodes: BTreeMap<String, NodeRecord> =
            records(timed("list nodes", t, kv.get(state.keys.nodes(), prefix.clone())).await?.kvs());
        // A member configured with another P could never serve what it is given.
        nodes.retain(|id, n| {
            let same = n.partitions == state.partitions;
            if !same {
                tracing::error!(node = %id, partitions = n.partitions, ours = state.partitions, "member with another partition count left out of the map");
            }
            same
        });
        let loads: BTreeMap<String, LoadRecord> =
            records(timed("list loads", t, kv.get(state.keys.loads(), prefix.clone())).await?.kvs());
        let reports: BTreeMap<String, keys::ReachRecord> =
            records(timed("list reach", t, kv.get(state.keys.reaches(), prefix)).await?.kvs());
        let resp = timed("get map", t, kv.get(state.keys.map(), None)).await?;
        let (mut current, map_rev) = match resp.kvs().first() {
            Some(k) => (serde_json::from_slice::<MapRecord>(k.value()).ok(), k.mod_revision()),
            None => (None, 0),
        };
        // A missing or unreadable key (deleted, hand-edited, restored from a backup) does not
        // restart the epochs or reshuffle everything: the map in use is the starting point.
        let in_use = node.map.borrow().clone();
        if current.as_ref().is_none_or(|m| m.epoch < in_use.epoch) && in_use.epoch > 0 {
            current = Some(MapRecord {
                epoch: in_use.epoch,
                partitions: state.partitions,
                leader: String::new(),
                term: 0,
                updated_at: String::new(),
                counts: Default::default(),
                owners: in_use.owners.clone(),
                moved: in_use.moved.clone(),
                replicas: in_use.replicas.clone(),
                isr: in_use.isr.clone(),
                leader_epochs: in_use.leader_epochs.clone(),
            });
        }
        super::check_partitions(resp.kvs().first(), state.partitions)?;
        if !nodes.contains_key(&state.node_id) {
            return Err(Error::Deposed("this node's own record is gone (lease expired)".into()));
        }
        // Nodes most others cannot reach lead nothing and hold no replica: from here on
        // the round treats them as departed (this leader too, if it is one of them: it
        // can still write etcd, so it leads on and gives its own partitions away).
        let live: std::collections::BTreeSet<&str> = nodes.keys().map(String::as_str).collect();
        // A node whose store cannot write (below its free-space reserve, or failed) is
        // treated like one most others cannot reach: it leads nothing and holds no replica
        // until it can write again and `reachable_after` has passed.
        let mut away = reach::unreachable(&live, &reports);
        away.extend(reach::unwritable(&live, &reports));
        let mut cut = self.tracker.observe(tokio::time::Instant::now(), &live, &away);
        if state.config.replicas <= 1 {
            // Unreplicated partitions have no follower to take over: they stay.
            cut.clear();
        }
        node.metrics.cluster_unreachable_nodes.set(cut.len() as i64);
        nodes.retain(|id, _| !cut.contains(id));
        let dynamic = state.dynamic();
        let max_moves = dynamic.max_moves.unwrap_or(state.config.max_moves);
        let binding = dynamic.balancer.as_ref().or(node.settings.balancer.as_ref());
        // Failovers first: a partition whose leader left goes to a live in-sync follower
        // (which the balancer then sees as its owner), or waits for one.
        let replicas = state.config.replicas.max(1) as usize;
        let alive: std::collections::BTreeSet<&str> = nodes.keys().map(String::as_str).collect();
        let mut failovers = match (&current, replicas > 1) {
            (Some(m), true) => replicas::failovers(m, &alive, state.config.unclean_failover),
            _ => replicas::Failovers::default(),
        };
        // A cut-off node still holds what it acknowledged: its partitions with no in-sync
        // follower wait for it, whatever `unclean_failover` says.
        if let Some(m) = &current {
            failovers.unclean.retain(|p| {
                let owner = &m.owners[*p as usize];
                let keep = !cut.contains(owner);
                if !keep {
                    failovers.waiting.insert(*p, owner.clone());
                }
                keep
            });
        }
        let effective: Option<Vec<String>> = current.as_ref().map(|m| {
            let mut o = m.owners.clone();
            for (p, n) in &failovers.promoted {
                o[*p as usize] = n.clone();
            }
            o
        });
        let owners = effective.as_deref();
        let input = balance::input(&nodes, &loads, owners, state.partitions, max_moves, super::now_ms());
        if input.nodes.is_empty() {
            // Every member is draining: nowhere to move anything, keep the map.
            tracing::debug!(nodes = nodes.len(), "every member is draining; map kept");
            rounds.with_label_values(&["unchanged"]).inc();
            return Ok(());
        }
        let shown = balance::replica_input(current.as_ref(), &input, replicas);
        let balance::Decided { mut decision, followers: given, policy } =
            balance::decide(node.balancer.as_ref(), binding, &input, &shown)?;
        // Operators' move requests (`moves/<p>`) steer their partitions to the node asked
        // for; finished and void ones are deleted. The move itself is a replica move below.
        let asked: BTreeMap<String, move_requests::MoveRequest> = records(
            timed("list move requests", t, kv.get(state.keys.moves(), Some(GetOptions::new().with_prefix())))
                .await?
                .kvs(),
        );
        if !asked.is_empty() {
            let eligible: std::collections::BTreeSet<&str> = input.nodes.iter().map(|n| n.id.as_str()).collect();
            let steer = move_requests::steer(&asked, state.partitions, current.as_ref(), &eligible);
            move_requests::delete(kv, state, &steer.finished).await;
            for (p, to) in steer.owners {
                decision.owners[p as usize] = to;
            }
        }
        // Partitions with no live in-sync replica stay on their departed leader.
        for (p, owner) in &failovers.waiting {
            decision.owners[*p as usize] = owner.clone();
        }
        // Replicated: place the replicas for the decided owners, then turn planned moves
        // into replica moves (a move waits until its new replicas are in sync) and keep
        // departed replicas that no live node replaced.
        let reassigned = if replicas > 1 {
            let eligible: Vec<String> = nodes.iter().filter(|(_, n)| !n.draining).map(|(id, _)| id.clone()).collect();
            let given = given.as_deref();
            let (lists, isr, epochs) = replicas::place(
                current.as_ref(),
                &decision.owners,
                &eligible,
                &alive,
                replicas,
                &failovers.waiting,
                given,
            );
            let mut out = moves::reassign(current.as_ref(), &alive, decision.owners.clone(), lists, isr, epochs);
            moves::keep_departed(current.as_ref(), &alive, replicas, &mut out);
            out
        } else {
            moves::Reassigned { owners: decision.owners.clone(), ..Default::default() }
        };
        state.pending_moves.store(!reassigned.pending.is_empty(), std::sync::atomic::Ordering::Relaxed);
        let moves::Reassigned { owners: decided, replicas: replica_lists, isr, leader_epochs, switched, pending } =
            reassigned;
        decision.owners = decided;
        let unchanged = current.as_ref().is_some_and(|m| {
            m.owners == decision.owners
                && m.replicas == replica_lists
                && m.isr == isr
                && m.leader_epochs == leader_epochs
        });
        if unchanged {
            rounds.with_label_values(&["unchanged"]).inc();
            return Ok(());
        }
        let moved = match owners {
            Some(o) => o.iter().zip(&decision.owners).filter(|(a, b)| a != b).count(),
            None => decision.owners.len(),
        };
        let epoch = current.as_ref().map_or(0, |m| m.epoch) + 1;
        let mut moves = next_moved(owners, current.as_ref().map(|m| &m.moved), &decision.owners, epoch);
        // A promoted follower serves what it replicated: no handover from anyone; nor does
        // an in-sync follower that a planned move made the leader.
        for (p, n) in &failovers.promoted {
            if decision.owners[*p as usize] == *n {
                moves.remove(p);
            }
        }
        for p in &switched {
            moves.remove(p);
        }
        let draining = nodes.values().filter(|n| n.draining).count();
        let record = MapRecord {
            epoch,
            partitions: state.partitions,
            leader: state.node_id.clone(),
            term: me.term,
            updated_at: keys::timestamp(SystemTime::now()),
            counts: MapRecord::count(&decision.owners),
            owners: decision.owners,
            moved: moves,
            replicas: replica_lists,
            isr,
            leader_epochs,
        };
        if publish_map(kv, me, &state.keys.map(), map_rev, &record, t).await? {
            rounds.with_label_values(&["published"]).inc();
            let elections = &node.metrics.leader_elections;
            elections.with_label_values(&["failover"]).inc_by(failovers.promoted.len() as u64);
            elections.with_label_values(&["unclean"]).inc_by(failovers.unclean.len() as u64);
            node.metrics.unclean_failovers.inc_by(failovers.unclean.len() as u64);
            elections.with_label_values(&["move"]).inc_by(moved.saturating_sub(failovers.promoted.len()) as u64);
            tracing::info!(
                epoch,
                moved,
                promoted = failovers.promoted.len(),
                switched = switched.len(),
                pending = pending.len(),
                waiting = failovers.waiting.len(),
                unclean = failovers.unclean.len(),
                %policy,
                nodes = nodes.len(),
                draining,
                "partition map published"
            );
            Ok(())
        } else if verify(kv, me, t).await.is_ok() {
            // A partition leader changed an ISR since we read the map: run again.
            rounds.with_label_values(&["retried"]).inc();
            state.membership.notify_one();
            Ok(())
        } else {
            node.metrics.cluster_fenced_writes.inc();
            rounds.with_label_values(&["fenced"]).inc();
            Err(Error::Deposed(format!("map write for epoch {epoch} refused by the fencing compare")))
        }
    }
}

/// The `moved` entries of the map with `new_owners` and epoch `new_epoch`, published after
/// a map with `prev_owners` (None: there was none) and `prev_moved`: a partition whose owner
/// changes from a node to another gets `{from: previous owner, epoch: new_epoch}`; one whose
/// owner stays keeps its entry; one that had no owner before gets none.
pub fn next_moved(
    prev_owners: Option<&[String]>,
    prev_moved: Option<&BTreeMap<u32, Moved>>,
    new_owners: &[String],
    new_epoch: u64,
) -> BTreeMap<u32, Moved> {
    let mut moved = BTreeMap::new();
    for (p, new) in new_owners.iter().enumerate() {
        let p = p as u32;
        let prev = prev_owners.and_then(|o| o.get(p as usize)).map_or("", String::as_str);
        if prev.is_empty() {
            continue;
        }
        if prev != new {
            moved.insert(p, Moved { from: prev.to_string(), epoch: new_epoch });
        } else if let Some(m) = prev_moved.and_then(|m| m.get(&p)) {
            moved.insert(p, m.clone());
        }
    }
    moved
}

/// Writes `record` to `map_key` only if `me` still holds leadership (its election key has
/// create revision `me.term`) and the map was not written since we read it at `map_rev`
/// (0: absent). Returns false when the compare refused the write.
pub async fn publish_map(
    kv: &mut Client,
    me: &Leadership,
    map_key: &str,
    map_rev: i64,
    record: &MapRecord,
    limit: std::time::Duration,
) -> Result<bool, Error> {
    let txn = Txn::new()
        .when([
            Compare::create_revision(me.key.clone(), CompareOp::Equal, me.term),
            Compare::mod_revision(map_key, CompareOp::Equal, map_rev),
        ])
        .and_then([TxnOp::put(map_key, record.to_json(), None)]);
    Ok(timed("write map", limit, kv.txn(txn)).await?.succeeded())
}

pub(crate) fn records<T: serde::de::DeserializeOwned>(kvs: &[etcd_client::KeyValue]) -> BTreeMap<String, T> {
    kvs.iter()
        .filter_map(|kv| {
            let key = std::str::from_utf8(kv.key()).ok()?;
            let id = key.rsplit('/').next()?.to_string();
            match serde_json::from_slice(kv.value()) {
                Ok(v) => Some((id, v)),
                Err(e) => {
                    tracing::warn!(key, error = %e, "ignoring an unreadable record");
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(s: &str) -> Vec<String> {
        s.split(',').map(|o| o.trim().to_string()).collect()
    }

    fn mv(from: &str, epoch: u64) -> Moved {
        Moved { from: from.into(), epoch }
    }

    #[test]
    fn first_map_records_no_moves() {
        assert!(next_moved(None, None, &owners("a,b,a"), 1).is_empty());
        // A map of unassigned partitions (empty owners) counts as none.
        assert!(next_moved(Some(&owners(",,")), None, &owners("a,b,a"), 1).is_empty());
    }

    #[test]
    fn moves_are_recorded_and_carried_forward() {
        let e1 = owners("a,a,a,a");
        let e2 = owners("a,b,a,b");
        let m2 = next_moved(Some(&e1), Some(&BTreeMap::new()), &e2, 2);
        assert_eq!(m2, [(1, mv("a", 2)), (3, mv("a", 2))].into_iter().collect());
        // Partition 3 moves again, 2 moves for the first time, 1 stays and keeps its entry.
        let e3 = owners("a,b,c,c");
        let m3 = next_moved(Some(&e2), Some(&m2), &e3, 3);
        assert_eq!(m3, [(1, mv("a", 2)), (2, mv("a", 3)), (3, mv("b", 3))].into_iter().collect());
        // Nothing changes: everything carried as it was.
        assert_eq!(next_moved(Some(&e3), Some(&m3), &e3, 4), m3);
        // An entry of a partition that moves back is replaced, not kept.
        let e5 = owners("a,a,c,c");
        let m5 = next_moved(Some(&e3), Some(&m3), &e5, 5);
        assert_eq!(m5[&1], mv("b", 5));
    }

    #[test]
    fn stray_entries_are_dropped() {
        // An entry past the partition count, or of a partition that had no owner, goes.
        let prev_moved = [(0, mv("x", 1)), (9, mv("x", 1))].into_iter().collect();
        let m = next_moved(Some(&owners(",b")), Some(&prev_moved), &owners("a,b"), 2);
        assert!(m.is_empty(), "{m:?}");
    }
}

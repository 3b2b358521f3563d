//! Operators' requests to move one partition's leadership to a named node (`switchyard ctl
//! move`), kept in etcd as `moves/<partition>` until the leader has carried them out.
//!
//! It owns the request record, the checks a request passes before it is written (the
//! partition exists, the target is a live member that is not draining), writing it, and
//! the leader's side: which requests steer a round's owners, and which are finished or void
//! and are deleted. The move itself is the usual replica move ([`crate::moves`]): the
//! target first catches up as a follower, then leadership switches in one map write, so no
//! acknowledged message is lost. It must never write the map: only the leader's round does,
//! in its fenced transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::keys::{self, MapRecord};
use crate::{timed, Error, State};

/// `moves/<partition>`: a node asked to lead the partition. Not under a lease: it outlives
/// the node that wrote it, and the leader deletes it once the move is done or void.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveRequest {
    /// The node that should lead the partition.
    pub to: String,
    /// When it was asked.
    pub requested_at: String,
}

/// Why a move request was not written.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The partition number is out of range.
    #[error("partition {partition} does not exist (the cluster has partitions 0 to {})", partitions.saturating_sub(1))]
    NoSuchPartition {
        /// The partition asked for.
        partition: u32,
        /// The cluster's partition count.
        partitions: u32,
    },
    /// The target is not a live member.
    #[error("node {0} is not a live member of the cluster")]
    NotMember(String),
    /// The target is draining: the leader gives it nothing.
    #[error("node {0} is draining: it takes no partitions")]
    Draining(String),
    /// This node has no etcd session now.
    #[error("this node is not connected to etcd; try again or ask another node")]
    NoSession,
    /// Writing the request failed.
    #[error(transparent)]
    Etcd(#[from] Error),
}

/// What [`request`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// The request is in etcd; the leader carries it out in its next rounds.
    Written,
    /// The node already leads the partition: nothing to do.
    AlreadyThere,
}

/// Checks a request to move `partition` to `to` against what this node knows (its view of
/// the members and the map) and writes it as `moves/<partition>` (replacing an earlier
/// request for the same partition).
pub async fn request(state: &State, partition: u32, to: &str) -> Result<Requested, MoveError> {
    if partition >= state.partitions {
        return Err(MoveError::NoSuchPartition { partition, partitions: state.partitions });
    }
    let view = state.view();
    match view.nodes.get(to) {
        None => return Err(MoveError::NotMember(to.to_string())),
        Some(n) if n.draining => return Err(MoveError::Draining(to.to_string())),
        Some(_) => {}
    }
    if view.map.as_ref().and_then(|m| m.owners.get(partition as usize)).is_some_and(|o| o == to) {
        return Ok(Requested::AlreadyThere);
    }
    let client = state.registration.lock().await.as_ref().map(|r| r.client.clone());
    let mut client = client.ok_or(MoveError::NoSession)?;
    let record = MoveRequest { to: to.to_string(), requested_at: keys::timestamp(SystemTime::now()) };
    let json = serde_json::to_string_pretty(&record).expect("move request serializes");
    let key = state.keys.move_request(partition);
    timed("write move request", state.config.etcd_timeout, client.put(key, json, None)).await?;
    tracing::info!(partition, to, "move requested");
    Ok(Requested::Written)
}

/// What the leader does with the requests of one round.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Steer {
    /// Partitions whose owner this round is the requested node.
    pub owners: BTreeMap<u32, String>,
    /// Requests to delete, with why: done (the node leads the partition) or void (the
    /// partition does not exist, the node left or drains).
    pub finished: Vec<(u32, &'static str)>,
}

/// Sorts the `requests` (by partition) into those that steer this round's owners and those
/// that are finished, given the `current` map and the nodes that may lead (`eligible`:
/// live, not draining, not cut off).
pub(crate) fn steer(
    requests: &BTreeMap<String, MoveRequest>,
    partitions: u32,
    current: Option<&MapRecord>,
    eligible: &BTreeSet<&str>,
) -> Steer {
    let mut out = Steer::default();
    for (key, req) in requests {
        let Ok(p) = key.parse::<u32>() else { continue };
        if p >= partitions {
            out.finished.push((p, "no such partition"));
        } else if current.and_then(|m| m.owners.get(p as usize)).is_some_and(|o| *o == req.to) {
            out.finished.push((p, "done"));
        } else if !eligible.contains(req.to.as_str()) {
            out.finished.push((p, "the node left, drains or is cut off"));
        } else {
            out.owners.insert(p, req.to.clone());
        }
    }
    out
}

/// Deletes the finished requests (best effort: one that stays is finished again next round).
pub(crate) async fn delete(kv: &mut etcd_client::Client, state: &State, finished: &[(u32, &'static str)]) {
    for (p, why) in finished {
        let key = state.keys.move_request(*p);
        match timed("delete move request", state.config.etcd_timeout, kv.delete(key, None)).await {
            Ok(_) => tracing::info!(partition = p, why, "move request finished"),
            Err(e) => tracing::warn!(partition = p, error = %e, "could not delete a finished move request"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicas::tests::map;

    fn req(to: &str) -> MoveRequest {
        MoveRequest { to: to.into(), requested_at: String::new() }
    }

    /// A request steers its partition to a live target; one that is done, out of range,
    /// or aimed at a node that cannot lead is finished (deleted); unreadable keys are left.
    #[test]
    fn requests_steer_until_done_or_void() {
        let current = map(&["a", "b", "a"], &[&["a"], &["b"], &["a"]], &[&["a"], &["b"], &["a"]], &[1, 1, 1]);
        let eligible: BTreeSet<&str> = ["a", "b"].into_iter().collect();
        let requests: BTreeMap<String, MoveRequest> = [
            ("0".to_string(), req("b")),
            ("1".to_string(), req("b")),
            ("2".to_string(), req("c")),
            ("9".to_string(), req("a")),
            ("x".to_string(), req("a")),
        ]
        .into_iter()
        .collect();
        let s = steer(&requests, 3, Some(&current), &eligible);
        assert_eq!(s.owners, [(0, "b".to_string())].into_iter().collect());
        assert_eq!(s.finished, vec![(1, "done"), (2, "the node left, drains or is cut off"), (9, "no such partition")]);
        // Without a map yet, a request to an eligible node steers.
        let s = steer(&requests, 3, None, &eligible);
        assert_eq!(s.owners.len(), 2);
    }
}

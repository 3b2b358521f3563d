//! Channel → partition hashing and the partition → owner map.
//!
//! It owns `partition = jump_consistent_hash(stable_hash64(channel), P)` and the in-memory
//! [`PartitionMap`] that the request path reads. The hash must never change between
//! releases: a fixed table in the tests pins it. It must never wait on I/O.

use std::collections::BTreeMap;

use xxhash_rust::xxh3::xxh3_64;

/// Index of a partition, `0..P`.
pub type PartitionId = u32;

/// A hash of a channel name that is the same on every machine, build and release (XXH3-64,
/// seed 0, over the name's UTF-8 bytes).
pub fn stable_hash64(channel: &str) -> u64 {
    xxh3_64(channel.as_bytes())
}

/// The partition a channel belongs to among `partitions`.
pub fn partition_of(channel: &str, partitions: u32) -> PartitionId {
    jump_consistent_hash::hash(stable_hash64(channel), partitions as usize)
}

/// Where a partition came from when its owner last changed: the handover source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Moved {
    /// The previous owner's node id.
    pub from: String,
    /// The map epoch that made the change.
    pub epoch: u64,
}

/// Who owns which partition. In standalone mode one node owns every partition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionMap {
    /// Version of the map; 0 for the static standalone map.
    pub epoch: u64,
    /// Owner node id of each partition, indexed by partition.
    pub owners: Vec<String>,
    /// For each partition, the last time its owner changed from one node to another: the
    /// previous owner and the map epoch that made the change; the new owner pulls the
    /// partition's state from `from` (which may have left the cluster since). Partitions
    /// whose owner never changed that way (placed by the first map) have no entry.
    pub moved: BTreeMap<PartitionId, Moved>,
    /// Replication (empty when partitions have one copy): the replicas of each partition,
    /// its owner (the leader) first.
    pub replicas: Vec<Vec<String>>,
    /// The in-sync replicas of each partition, leader first: the only ones a leader may
    /// hand over to on a failover.
    pub isr: Vec<Vec<String>>,
    /// The leader epoch of each partition: bumped by every change of its leader.
    pub leader_epochs: Vec<u64>,
}

impl PartitionMap {
    /// The standalone map: `node` owns all `partitions`.
    pub fn standalone(node: &str, partitions: u32) -> Self {
        Self { owners: vec![node.to_string(); partitions as usize], ..Self::unassigned(partitions) }
    }

    /// A cluster node's map before the first one arrives: `partitions` with no owner.
    pub fn unassigned(partitions: u32) -> Self {
        Self {
            epoch: 0,
            owners: vec![String::new(); partitions as usize],
            moved: BTreeMap::new(),
            replicas: Vec::new(),
            isr: Vec::new(),
            leader_epochs: Vec::new(),
        }
    }

    /// Number of partitions.
    pub fn partitions(&self) -> u32 {
        self.owners.len() as u32
    }

    /// The owner of `p`, if it has one.
    pub fn owner(&self, p: PartitionId) -> Option<&str> {
        self.owners.get(p as usize).map(String::as_str).filter(|o| !o.is_empty())
    }

    /// The followers of `p` (its replicas other than the owner).
    pub fn followers(&self, p: PartitionId) -> Vec<String> {
        let owner = self.owner(p).unwrap_or_default();
        self.replicas.get(p as usize).map_or_else(Vec::new, |r| r.iter().filter(|n| *n != owner).cloned().collect())
    }

    /// The in-sync replicas of `p`, leader first (empty when not replicated).
    pub fn isr(&self, p: PartitionId) -> &[String] {
        self.isr.get(p as usize).map_or(&[], Vec::as_slice)
    }

    /// The leader epoch of `p` (0 when not replicated).
    pub fn leader_epoch(&self, p: PartitionId) -> u64 {
        self.leader_epochs.get(p as usize).copied().unwrap_or(0)
    }

    /// Where `p` came from when its owner last changed (see [`PartitionMap::moved`]).
    pub fn moved_from(&self, p: PartitionId) -> Option<&Moved> {
        self.moved.get(&p)
    }
}

/// A live member of the cluster, as the cluster's watch last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The URL clients reach it at (error messages name it).
    pub url: String,
    /// The URL its `/peer` endpoint answers at (peer links dial it).
    pub peer_url: String,
    /// True once it asked the leader to move its partitions away.
    pub draining: bool,
}

/// Every live member by node id: empty in standalone mode.
pub type Members = BTreeMap<String, Member>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the mapping: if this table changes, every deployed cluster's data moves.
    #[test]
    fn mapping_is_stable() {
        let table: &[(&str, u32, PartitionId)] = &[
            ("room:1", 64, 58),
            ("room:2", 64, 63),
            ("chat:lobby", 64, 0),
            ("user:alice", 64, 47),
            ("dialog:alice:bob", 64, 53),
            ("a", 64, 14),
            ("room:1", 8, 7),
            ("room:1", 1, 0),
        ];
        let actual: Vec<_> = table.iter().map(|(c, p, _)| (*c, *p, partition_of(c, *p))).collect();
        let expected: Vec<_> = table.to_vec();
        assert_eq!(actual, expected);
    }

    #[test]
    fn spreads_and_stays_in_range() {
        let mut counts = vec![0u32; 64];
        for i in 0..64_000 {
            let p = partition_of(&format!("room:{i}"), 64);
            counts[p as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
    }

    #[test]
    fn moved_from_reads_the_moves() {
        let mut m = PartitionMap::standalone("a", 4);
        assert!(m.moved.is_empty() && PartitionMap::unassigned(4).moved.is_empty());
        assert_eq!(m.moved_from(1), None);
        m.moved.insert(1, Moved { from: "b".into(), epoch: 7 });
        assert_eq!(m.moved_from(1), Some(&Moved { from: "b".into(), epoch: 7 }));
        assert_eq!(m.moved_from(2), None);
    }

    #[test]
    fn hash_is_xxh3() {
        assert_eq!(stable_hash64(""), 0x2d06800538d394c2);
    }
}

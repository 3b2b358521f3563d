//! Typed refusals: the outcomes of an operation that another node (or this node's own
//! routing) acts on, as values.
//!
//! It owns [`Refusal`], which rides on an [`OpError`](crate::protocol::OpError) from the
//! layer that refuses (an owner sealing a partition, a leader refusing a fetch, a node that
//! does not own a channel) to the layer that decides what to do next (follow a redirect,
//! wait for an adoption, take a snapshot, retry a lost request), and its stable numeric
//! tags. A refusal never reaches a client: the client sees the error's code and message
//! only. It must never be inferred from an error's text, and a tag, once given, is never
//! reused for another meaning (peers of two versions read each other's tags).

/// Why a node refused an operation, where the caller acts on the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The partition was sealed here (it moved to another node); the write was not
    /// stored, and is retried where the map now puts the channel.
    Sealed,
    /// This node's copy of the partition is not authoritative: it is still adopting it,
    /// or gave an adoption up half-way. A new owner pulling from it waits.
    NotAdopted,
    /// A follower's position is outside the leader's log: it must take a snapshot. The
    /// position it asked for.
    Resync {
        /// The seq the follower asked for.
        from: u64,
    },
    /// This node does not lead the partition under the leader epoch the caller named.
    NotLeader,
    /// This node does not own the channel's partition: `owner` does, by this node's map
    /// at `epoch`. The caller retries there once its own map has caught up.
    Redirect {
        /// The owner's node id.
        owner: String,
        /// The map epoch of the node that answered.
        epoch: u64,
    },
    /// A transient condition (a full link queue, an owner stopping): try again later.
    Unavailable,
    /// The link failed with the request in flight: the owner may or may not have run it.
    /// Made by the caller's side of a link, never sent.
    Lost,
    /// A refusal this version does not know (a newer peer's tag): acted on like an error
    /// with no refusal.
    Other(u32),
}

impl Refusal {
    /// The refusal's stable tag on the peer wire.
    pub fn tag(&self) -> u32 {
        match self {
            Self::Sealed => 1,
            Self::NotAdopted => 2,
            Self::Resync { .. } => 3,
            Self::NotLeader => 4,
            Self::Redirect { .. } => 5,
            Self::Unavailable => 6,
            Self::Lost => 7,
            Self::Other(tag) => *tag,
        }
    }

    /// The refusal of `tag` as it follows a peer's reply, with `Resync`'s `from` when its
    /// field bytes gave one. An unknown tag, a known one without the fields it needs, and
    /// a redirect (which travels in its own field, never as a tag) are [`Refusal::Other`].
    pub fn from_tag(tag: u32, from: Option<u64>) -> Self {
        match (tag, from) {
            (1, _) => Self::Sealed,
            (2, _) => Self::NotAdopted,
            (3, Some(from)) => Self::Resync { from },
            (4, _) => Self::NotLeader,
            (6, _) => Self::Unavailable,
            (7, _) => Self::Lost,
            (tag, _) => Self::Other(tag),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_round_trips_through_its_tag() {
        let all = [
            Refusal::Sealed,
            Refusal::NotAdopted,
            Refusal::Resync { from: 7 },
            Refusal::NotLeader,
            Refusal::Redirect { owner: "n1".into(), epoch: 3 },
            Refusal::Unavailable,
            Refusal::Lost,
        ];
        for r in all {
            let from = match &r {
                Refusal::Resync { from } => Some(*from),
                _ => None,
            };
            let back = Refusal::from_tag(r.tag(), from);
            match r {
                Refusal::Redirect { .. } => assert_eq!(back, Refusal::Other(5), "a redirect is never a tag"),
                r => assert_eq!(back, r),
            }
        }
        assert_eq!(Refusal::from_tag(99, None), Refusal::Other(99));
        // A known tag without the fields it needs is not guessed at.
        assert_eq!(Refusal::from_tag(3, None), Refusal::Other(3));
    }
}

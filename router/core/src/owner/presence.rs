//! Presence at a channel's owner: which clients are subscribed, cluster-wide, and the
//! `join`/`leave` pushes that announce them.
//!
//! It owns [`Presence`] (one channel's entries, each with the node its client is connected
//! to, and per-user counts so that a join, a leave and the stats are O(1)), the presence
//! commands' handling at the owner, and the storm rule: join and leave pushes go out only
//! while the channel has at most `join_leave_max_subscribers` subscribers. It holds
//! presence in memory only and must never write it to the store: presence is soft state,
//! rebuilt by the gateways that announced it (a seal clears it, a node that leaves takes
//! its clients with it).

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_proto::presence::{self, Change, PresenceEntry, PresenceStats};
use switchyard_proto::protocol::OpError;
use tokio::sync::oneshot;

use super::batch::Work;
use super::Owner;
use crate::outbox::{Delivery, Kind};

/// A namespace's presence limits, as the owner applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceLimits {
    /// Join and leave pushes are sent (to every subscriber of the channel).
    pub join_leave: bool,
    /// Most clients a `presence` list returns; past it the list is refused (`limit_exceeded`).
    pub max_list: usize,
    /// Join and leave pushes stop while the channel has more subscribers than this (the
    /// rule against storms: N joins would cost N² pushes).
    pub join_leave_max_subscribers: usize,
}

impl Default for PresenceLimits {
    fn default() -> Self {
        Self { join_leave: false, max_list: 1000, join_leave_max_subscribers: 1000 }
    }
}

/// Where an owner reads the presence limits of a channel's namespace (the server's config).
pub trait PresenceSettings: Send + Sync {
    /// The limits for `channel`.
    fn limits(&self, channel: &str) -> PresenceLimits;
}

/// The same limits for every channel.
impl PresenceSettings for PresenceLimits {
    fn limits(&self, _channel: &str) -> PresenceLimits {
        *self
    }
}

/// A presence command for a partition owner.
pub(crate) enum PresenceCommand {
    /// Record (or replace) a client's entry. A new client is announced with a `join` push
    /// unless `announce` is false (a gateway re-announcing after the channel moved).
    Join {
        /// Channel.
        channel: String,
        /// The node the client is connected to.
        origin: Arc<str>,
        /// The entry.
        entry: PresenceEntry,
        /// Push `join` if the client is new.
        announce: bool,
        /// Answer.
        reply: oneshot::Sender<Result<(), OpError>>,
    },
    /// Forget a client's entry (with a `leave` push).
    Leave {
        /// Channel.
        channel: String,
        /// The node the client is connected to.
        origin: Arc<str>,
        /// The client's id.
        client: String,
        /// Answer.
        reply: Option<oneshot::Sender<Result<(), OpError>>>,
    },
    /// Every entry, unless there are more than the namespace's `presence_max_list`.
    List {
        /// Channel.
        channel: String,
        /// Answer.
        reply: oneshot::Sender<Result<Vec<PresenceEntry>, OpError>>,
    },
    /// The counts.
    Stats {
        /// Channel.
        channel: String,
        /// Answer.
        reply: oneshot::Sender<Result<PresenceStats, OpError>>,
    },
    /// Forget every entry of clients connected to `node` (it left the cluster).
    DropOrigin {
        /// The node.
        node: Arc<str>,
    },
}

impl PresenceCommand {
    /// Answers the command's caller with `err` (the partition is sealed or not written here).
    pub(super) fn refuse(self, err: OpError) {
        match self {
            PresenceCommand::Join { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            PresenceCommand::Leave { reply, .. } => {
                if let Some(r) = reply {
                    let _ = r.send(Err(err));
                }
            }
            PresenceCommand::List { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            PresenceCommand::Stats { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            PresenceCommand::DropOrigin { .. } => {}
        }
    }
}

/// One channel's presence: (origin node, client id) → entry, and clients per user. Client
/// ids are a connection's id on its node, so the node is part of the key: two nodes'
/// connections never count as one.
#[derive(Default)]
pub(crate) struct Presence {
    clients: HashMap<(Arc<str>, String), PresenceEntry>,
    users: HashMap<String, u32>,
}

impl Presence {
    /// Records `entry` from `origin`; true if the client is new (a repeated join replaces
    /// the entry's info and is not new).
    pub(crate) fn join(&mut self, origin: Arc<str>, entry: PresenceEntry) -> bool {
        match self.clients.get_mut(&(origin.clone(), entry.client.clone())) {
            Some(held) => {
                if held.user != entry.user {
                    Self::uncount(&mut self.users, &held.user);
                    *self.users.entry(entry.user.clone()).or_default() += 1;
                }
                *held = entry;
                false
            }
            None => {
                *self.users.entry(entry.user.clone()).or_default() += 1;
                self.clients.insert((origin, entry.client.clone()), entry);
                true
            }
        }
    }

    /// Forgets `client` of `origin`; its entry if it was here.
    pub(crate) fn leave(&mut self, origin: &Arc<str>, client: &str) -> Option<PresenceEntry> {
        let entry = self.clients.remove(&(origin.clone(), client.to_string()))?;
        Self::uncount(&mut self.users, &entry.user);
        Some(entry)
    }

    fn uncount(users: &mut HashMap<String, u32>, user: &str) {
        if let Some(n) = users.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                users.remove(user);
            }
        }
    }

    /// Forgets every client connected to `node`; their entries.
    pub(crate) fn drop_origin(&mut self, node: &str) -> Vec<PresenceEntry> {
        let gone: Vec<(Arc<str>, String)> =
            self.clients.keys().filter(|(origin, _)| &**origin == node).cloned().collect();
        gone.iter().filter_map(|(origin, c)| self.leave(origin, c)).collect()
    }

    /// The counts, in O(1).
    pub(crate) fn stats(&self) -> PresenceStats {
        PresenceStats { num_clients: self.clients.len() as u64, num_users: self.users.len() as u64 }
    }

    /// Every entry.
    pub(crate) fn list(&self) -> Vec<PresenceEntry> {
        self.clients.values().cloned().collect()
    }

    /// Number of clients.
    pub(crate) fn len(&self) -> usize {
        self.clients.len()
    }

    /// No client.
    pub(crate) fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

impl Owner {
    /// Runs a presence command (after the batch it arrived in, like every read).
    pub(super) fn presence(&mut self, cmd: PresenceCommand) {
        match cmd {
            PresenceCommand::Join { channel, origin, entry, announce, reply } => {
                let ch = self.channel(&channel, &mut Work::default());
                let new = ch.presence.get_or_insert_with(Default::default).join(origin, entry.clone());
                if new && announce {
                    self.announce(&channel, Change::Join, &entry);
                }
                let _ = reply.send(Ok(()));
            }
            PresenceCommand::Leave { channel, origin, client, reply } => {
                let left = self.channels.get_mut(channel.as_str()).and_then(|ch| {
                    let left = ch.presence.as_mut()?.leave(&origin, &client);
                    if ch.presence.as_ref().is_some_and(|p| p.is_empty()) {
                        ch.presence = None;
                    }
                    left
                });
                if let Some(entry) = left {
                    self.announce(&channel, Change::Leave, &entry);
                }
                self.evict_if_idle(&channel);
                if let Some(r) = reply {
                    let _ = r.send(Ok(()));
                }
            }
            PresenceCommand::List { channel, reply } => {
                let max = self.presence_settings.limits(&channel).max_list;
                let p = self.channels.get(channel.as_str()).and_then(|ch| ch.presence.as_deref());
                let result = match p {
                    Some(p) if p.len() > max => Err(presence::list_too_long(max)),
                    Some(p) => Ok(p.list()),
                    None => Ok(Vec::new()),
                };
                let _ = reply.send(result);
            }
            PresenceCommand::Stats { channel, reply } => {
                let p = self.channels.get(channel.as_str()).and_then(|ch| ch.presence.as_deref());
                let _ = reply.send(Ok(p.map(Presence::stats).unwrap_or_default()));
            }
            PresenceCommand::DropOrigin { node } => {
                let mut left = Vec::new();
                for ch in self.channels.values_mut() {
                    let Some(p) = ch.presence.as_mut() else { continue };
                    let gone = p.drop_origin(&node);
                    if p.is_empty() {
                        ch.presence = None;
                    }
                    if !gone.is_empty() {
                        left.push((ch.name.clone(), gone));
                    }
                }
                for (channel, gone) in left {
                    for entry in &gone {
                        self.announce(&channel, Change::Leave, entry);
                    }
                    self.evict_if_idle(&channel);
                }
            }
        }
    }

    /// Pushes a join or leave to every subscriber of `channel`, when its namespace sends
    /// them and the channel has at most `join_leave_max_subscribers` subscribers (here, or
    /// clients in its presence, whichever is more). Each dialect's frame is rendered once.
    fn announce(&mut self, channel: &str, change: Change, entry: &PresenceEntry) {
        let limits = self.presence_settings.limits(channel);
        let Some(ch) = self.channels.get_mut(channel) else { return };
        // A gateway's upstream is one subscriber here for all of its clients: the channel's
        // presence counts them all.
        let audience = ch.subscribers.len().max(ch.presence.as_ref().map_or(0, |p| p.len()));
        if !limits.join_leave || ch.subscribers.is_empty() || audience > limits.join_leave_max_subscribers {
            return;
        }
        let mut frames = presence::Pushes::new(channel, change, entry);
        let to_flush = &mut self.to_flush;
        ch.subscribers.retain(|s| {
            let frame = frames.get(s.outbox.dialect());
            s.outbox.fan_out(Delivery { sub: s.sub, offset: 0, frame, kind: Kind::Event }, to_flush)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(client: &str, user: &str) -> PresenceEntry {
        PresenceEntry::new(client, user)
    }

    #[test]
    fn joins_are_idempotent_and_counts_follow_users() {
        let mut p = Presence::default();
        let n1: Arc<str> = "n1".into();
        assert!(p.join(n1.clone(), entry("1", "alice")));
        assert!(p.join(n1.clone(), entry("2", "alice")));
        assert!(p.join("n2".into(), entry("3", "bob")));
        assert!(!p.join(n1.clone(), entry("1", "alice")), "a repeated join is not new");
        assert_eq!(p.stats(), PresenceStats { num_clients: 3, num_users: 2 });
        assert!(!p.join(n1.clone(), entry("2", "carol")), "a replaced entry moves its user count");
        assert_eq!(p.stats(), PresenceStats { num_clients: 3, num_users: 3 });
        assert!(p.join("n2".into(), entry("1", "dave")), "another node's client 1 is another client");
        assert_eq!(p.leave(&"n2".into(), "1").map(|e| e.user), Some("dave".to_string()));
        assert_eq!(p.leave(&n1, "1").map(|e| e.user), Some("alice".to_string()));
        assert_eq!(p.leave(&n1, "1"), None);
        assert_eq!(p.stats(), PresenceStats { num_clients: 2, num_users: 2 });
        let gone = p.drop_origin("n2");
        assert_eq!(gone.iter().map(|e| e.client.as_str()).collect::<Vec<_>>(), vec!["3"]);
        assert_eq!(p.stats(), PresenceStats { num_clients: 1, num_users: 1 });
        assert_eq!(p.list(), vec![entry("2", "carol")]);
    }

    /// Stats on 100,000 members answer in well under a millisecond: they are counters, not
    /// a walk over the members. (A bound, not a benchmark: it fails only if stats walk.)
    #[test]
    fn stats_on_a_hundred_thousand_members_are_constant_time() {
        let mut p = Presence::default();
        let origin: Arc<str> = "n1".into();
        for i in 0..100_000 {
            p.join(origin.clone(), entry(&i.to_string(), &format!("u{}", i % 5000)));
        }
        let started = tokio::time::Instant::now();
        let mut stats = PresenceStats::default();
        for _ in 0..1000 {
            stats = std::hint::black_box(p.stats());
        }
        let each = started.elapsed() / 1000;
        assert_eq!(stats, PresenceStats { num_clients: 100_000, num_users: 5000 });
        assert!(each < std::time::Duration::from_micros(100), "presence_stats took {each:?}");
        let started = tokio::time::Instant::now();
        assert!(!p.join(origin.clone(), entry("5", "u5")));
        p.leave(&origin, "6");
        assert!(started.elapsed() < std::time::Duration::from_millis(1), "a join and a leave are O(1)");
    }
}

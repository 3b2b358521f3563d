//! What other tasks send a partition owner and what it answers: the [`OwnerCommand`]
//! enum, the requests it carries ([`PublishRequest`], [`Start`]) and the answers
//! ([`Grant`], [`Facts`], [`ChannelView`], [`Snapshot`]), and [`grant_from`], the one rule
//! by which an owner or a gateway grants a subscription.
//!
//! It owns these types and nothing else: it holds no state and must never reach the
//! store, an outbox or the owner task; what the owner does with a command is decided in
//! its sibling modules.

use std::sync::Arc;

use serde_json::value::RawValue;
use switchyard_proto::protocol::{OpError, PublishOk, StartFrom};
use switchyard_sdk::ChannelStats;
use tokio::sync::oneshot;

use crate::outbox::Outbox;

/// A message to store, from a client or the HTTP API.
#[derive(Debug)]
pub struct PublishRequest {
    /// Channel.
    pub channel: String,
    /// Raw JSON payload.
    pub data: Box<RawValue>,
    /// Compaction key.
    pub key: Option<String>,
    /// Deduplication key.
    pub idempotency_key: Option<String>,
    /// Publisher's user id, when authenticated.
    pub from: Option<String>,
}

/// Where a new subscription starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// A `from` form.
    From(StartFrom),
    /// After a durable consumer's committed offset.
    Consumer(String),
    /// `latest` as the owner saw it on arrival: the top then (set by the owner itself, so
    /// publishes that follow the subscribe in the same batch are delivered).
    LatestAt(u64),
}

/// The owner's answer to a subscribe.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Channel epoch.
    pub epoch: Arc<str>,
    /// The reply's `offset`: the channel top, or for `latest` the top when it arrived
    /// (the subscriber's stream starts right after it).
    pub offset: u64,
    /// Channel top at the moment the subscriber was registered: catch-up ends here.
    pub top: u64,
    /// For recovery requests: whether the stream continues exactly.
    pub recovered: Option<bool>,
    /// Retained messages with `after < offset <= top` to push before live ones, if any.
    pub catch_up_after: Option<u64>,
    /// Live messages are pushed only above this offset (`top`, or a `from` above it).
    pub live_after: u64,
}

/// What a gateway on another node needs to grant a local subscription to a channel.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Channel epoch.
    pub epoch: Arc<str>,
    /// Acknowledged top.
    pub top: u64,
    /// First retained offset.
    pub first: u64,
    /// The consumer's committed offset (0 if none), when asked for.
    pub committed: Option<u64>,
}

/// A write that reached a sealed partition, handed on with its reply to be forwarded to
/// the partition's new owner.
pub enum Forward {
    /// A publish.
    Publish(PublishRequest, oneshot::Sender<Result<PublishOk, OpError>>),
    /// A commit.
    Commit {
        /// Channel.
        channel: String,
        /// Consumer name.
        consumer: String,
        /// Offset.
        offset: u64,
        /// Answer.
        reply: oneshot::Sender<Result<(), OpError>>,
    },
}

/// The message of errors for writes that reach a sealed partition: it moved, nothing was
/// stored, and a retry (routed by the new map) is safe. Such errors carry
/// [`Refusal::Sealed`](switchyard_proto::refusal::Refusal::Sealed), which is what callers act on.
pub const SEALED: &str = "partition sealed: it moved to another node; retry";

/// Grants a subscription to a channel with `epoch`, acknowledged `top` and `first`
/// retained offset. `committed` is the consumer's offset (for [`Start::Consumer`]).
/// `known_top` may exceed `top` on a gateway whose upstream lags the owner: a recovery
/// position up to it is still exact, and the stream resumes after it.
pub fn grant_from(epoch: Arc<str>, top: u64, first: u64, committed: u64, start: &Start, known_top: u64) -> Grant {
    let floor = first.saturating_sub(1);
    let mut grant = Grant { offset: top, top, recovered: None, catch_up_after: None, live_after: top, epoch };
    // `after`: retained messages above it are pushed before live ones.
    let after = match start {
        Start::Consumer(_) => {
            // A gateway's `top` may lag the owner's: never repeat what was committed.
            grant.live_after = top.max(committed);
            Some(committed.max(floor))
        }
        Start::From(StartFrom::Latest) => None,
        Start::LatestAt(at) => {
            grant.offset = *at;
            Some((*at).max(floor))
        }
        Start::From(StartFrom::Earliest) => Some(floor),
        Start::From(StartFrom::After(n)) => {
            grant.live_after = top.max(*n);
            Some((*n).max(floor))
        }
        Start::From(StartFrom::Recover { offset, epoch }) => {
            let exact = epoch.as_str() == &*grant.epoch && *offset >= floor && *offset <= top.max(known_top);
            grant.recovered = Some(exact);
            if exact {
                grant.live_after = top.max(*offset);
            }
            exact.then_some(*offset)
        }
    };
    grant.catch_up_after = after.filter(|a| *a < top);
    grant
}

/// A consistent view of a channel's acknowledged log.
#[derive(Debug, Clone)]
pub struct ChannelView {
    /// Channel epoch.
    pub epoch: Arc<str>,
    /// Highest acknowledged offset.
    pub top: u64,
    /// First retained offset.
    pub first: u64,
}

/// One channel's counters, for the maintenance task.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Channel name.
    pub channel: Arc<str>,
    /// Counters (last_offset = acknowledged top).
    pub stats: ChannelStats,
    /// Bumped by every keyed publish, so compaction runs only when something changed.
    pub keyed_generation: u64,
    /// Live subscriptions (load reports).
    pub subscribers: u64,
}

/// Which background policy removed messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrimReason {
    /// Retention.
    Retention,
    /// Compaction.
    Compaction,
}

/// A command for a partition owner.
pub(crate) enum OwnerCommand {
    /// Store and fan out a message.
    Publish(PublishRequest, oneshot::Sender<Result<PublishOk, OpError>>),
    /// Register a subscriber.
    Subscribe {
        /// Channel.
        channel: String,
        /// Globally unique subscription id.
        sub: u64,
        /// The connection's queue.
        outbox: Arc<Outbox>,
        /// Start position.
        start: Start,
        /// Answer.
        reply: oneshot::Sender<Result<Grant, OpError>>,
    },
    /// Forget a subscriber.
    Unsubscribe {
        /// Channel.
        channel: String,
        /// Subscription id.
        sub: u64,
    },
    /// Epoch and acknowledged top of a channel (for history).
    View(String, oneshot::Sender<ChannelView>),
    /// Store a consumer's offset.
    Commit {
        /// Channel.
        channel: String,
        /// Consumer name.
        consumer: String,
        /// Offset.
        offset: u64,
        /// Answer.
        reply: oneshot::Sender<Result<(), OpError>>,
    },
    /// Counters of every channel (maintenance).
    Snapshot(oneshot::Sender<Vec<Snapshot>>),
    /// The partition moved to another node: end every subscription with an `unsubscribed`
    /// push (code 4100, `reason`) so clients go to the new owner, forget the in-memory
    /// state and refuse every later write with [`SEALED`]. Answered once done (idempotent).
    Seal(String, Option<oneshot::Sender<()>>),
    /// Channel facts for a gateway's local grant.
    Info {
        /// Channel.
        channel: String,
        /// Durable consumer name.
        consumer: Option<String>,
        /// Answer.
        reply: oneshot::Sender<Result<Facts, OpError>>,
    },
    /// A presence change or read (memory only: never written to the store).
    Presence(super::PresenceCommand),
    /// Remove messages (maintenance).
    Trim {
        /// Channel.
        channel: Arc<str>,
        /// New lowest offset, if retention moved it.
        first: Option<u64>,
        /// Messages to remove with their stored sizes.
        drops: Vec<(u64, u32)>,
        /// Why.
        reason: TrimReason,
        /// Answered once applied.
        reply: oneshot::Sender<()>,
    },
}

impl OwnerCommand {
    /// The channel a command is about, for the commands that wait behind a load of it
    /// (presence commands are memory only and never wait; seals and snapshots are about
    /// the whole partition).
    pub(super) fn channel(&self) -> Option<&str> {
        match self {
            Self::Publish(req, _) => Some(&req.channel),
            Self::Subscribe { channel, .. }
            | Self::Unsubscribe { channel, .. }
            | Self::View(channel, _)
            | Self::Commit { channel, .. }
            | Self::Info { channel, .. } => Some(channel),
            Self::Trim { channel, .. } => Some(channel),
            Self::Snapshot(_) | Self::Seal(..) | Self::Presence(_) => None,
        }
    }
}

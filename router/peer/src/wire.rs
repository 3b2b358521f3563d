//! The peer-link wire format: binary WebSocket frames, each one postcard-encoded [`Frame`].
//!
//! It owns the request and reply types that gateways send to partition owners and the
//! conversions to and from the router's own types. It must never do I/O.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use switchyard_core::owner::PublishRequest;
use switchyard_core::{HistoryPage, HistoryQuery, OwnedMessage};
use switchyard_proto::presence::{PresenceEntry, PresenceStats};
use switchyard_proto::protocol::{ErrorCode, OpError, PublishOk};
use switchyard_proto::refusal::Refusal;
use switchyard_store::StoredMessage;

/// Header that carries the cluster secret on the `/peer` upgrade.
pub const SECRET_HEADER: &str = "x-switchyard-cluster-secret";

/// Header by which a dialing node says which version of this wire it reads. A node that
/// sends none predates typed refusals: its replies carry errors in the old shape
/// ([`WireError::legacy`]).
pub const WIRE_HEADER: &str = "x-switchyard-peer-wire";

/// This version of the peer wire: 2 adds typed refusals to errors; 3 adds backward history
/// reads (a [`Op::History`] request's suffix, [`HistoryRange`]) and presence (the ops
/// [`Op::Join`], [`Op::Leave`], [`Op::Presence`], [`Op::PresenceStats`], their answers, and
/// [`Frame::Events`]). A node sends such a request only to a peer that names version 3 or
/// later in [`WIRE_HEADER`] ([`Op::min_wire`]): an older acceptor is never sent one (the
/// caller gets `unavailable`), an older dialer is never sent an event (its clients see no
/// join or leave pushes). From version 3 on, an acceptor answers a request whose op it does
/// not know with an `unavailable` error instead of closing the link ([`decode_request_id`]).
pub const WIRE_VERSION: u32 = 3;

/// The first version of the wire with presence and backward history reads.
pub const PRESENCE_WIRE: u32 = 3;

/// The wire version a peer that sent `header` (the value of [`WIRE_HEADER`]) speaks: 1
/// when it sent none (it predates the header).
pub fn wire_version(header: Option<&[u8]>) -> u32 {
    header.and_then(|h| std::str::from_utf8(h).ok()).and_then(|v| v.trim().parse::<u32>().ok()).unwrap_or(1)
}

/// Whether a dialer that sent `header` (the value of [`WIRE_HEADER`]) reads refusals.
pub fn reads_refusals(header: Option<&[u8]>) -> bool {
    wire_version(header) >= 2
}

/// One frame on a peer link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// Gateway → owner.
    Request {
        /// Correlates the reply; unique per link.
        id: u64,
        /// The map epoch the gateway routed by.
        epoch: u64,
        /// What to do.
        op: Op,
    },
    /// Owner → gateway.
    Reply {
        /// The request's id.
        id: u64,
        /// The outcome.
        result: Result<Answer, WireError>,
    },
    /// Owner → gateway: the messages for upstream subscriptions that one wake-up of the
    /// link's pusher found, in order (one frame per burst, not per message).
    Pushes(Vec<Push>),
    /// Owner → gateway (wire 3 and later only): presence news for upstream subscriptions,
    /// in order. They carry no offset and never touch a subscription's offset continuity.
    Events(Vec<Event>),
}

/// Presence news for an upstream subscription: the native `join` or `leave` push, which the
/// gateway renders in each local subscriber's dialect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The gateway's id for the upstream subscription.
    pub sub: u64,
    /// The native push frame (JSON text).
    pub frame: String,
}

/// A presence entry on the wire (its info as JSON text: postcard cannot carry a raw value).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireEntry {
    /// Client id.
    pub client: String,
    /// User.
    pub user: String,
    /// Connection info (JSON text).
    pub conn_info: Option<String>,
    /// Channel info (JSON text).
    pub chan_info: Option<String>,
}

impl From<&PresenceEntry> for WireEntry {
    fn from(e: &PresenceEntry) -> Self {
        WireEntry {
            client: e.client.clone(),
            user: e.user.clone(),
            conn_info: e.conn_info.as_ref().map(|r| r.get().to_string()),
            chan_info: e.chan_info.as_ref().map(|r| r.get().to_string()),
        }
    }
}

impl WireEntry {
    /// Back to an entry; info that is not JSON is dropped.
    pub fn into_entry(self) -> PresenceEntry {
        let raw = |s: Option<String>| s.and_then(|s| RawValue::from_string(s).ok());
        PresenceEntry {
            client: self.client,
            user: self.user,
            conn_info: raw(self.conn_info),
            chan_info: raw(self.chan_info),
        }
    }
}

/// A message for an upstream subscription, as the owner serialized it for its own clients
/// (the gateway forwards the same text to every local subscriber).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Push {
    /// The gateway's id for the upstream subscription.
    pub sub: u64,
    /// Message offset.
    pub offset: u64,
    /// The `message` push frame (JSON text), or the `unsubscribed` push when `end`.
    pub frame: String,
    /// The owner has ended the subscription (its partition moved).
    pub end: bool,
}

/// An operation forwarded to a partition's owner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// `publish`.
    Publish {
        /// Channel.
        channel: String,
        /// Raw JSON payload.
        data: String,
        /// Compaction key.
        key: Option<String>,
        /// Deduplication key.
        idempotency_key: Option<String>,
        /// Publisher's user id.
        from: Option<String>,
    },
    /// `history`.
    ///
    /// `before` and `reverse` are not part of the op's own encoding (which is the previous
    /// version's, byte for byte): a backward read carries them as a [`HistoryRange`] after
    /// the request frame, and is sent only to a peer of wire version 3 or later
    /// ([`Op::min_wire`]).
    History {
        /// Channel.
        channel: String,
        /// Messages after this offset.
        since: u64,
        /// At most this many.
        limit: u32,
        /// Messages before this offset (exclusive); None: up to the top.
        #[serde(skip)]
        before: Option<u64>,
        /// Newest first.
        #[serde(skip)]
        reverse: bool,
    },
    /// `commit`.
    Commit {
        /// Channel.
        channel: String,
        /// Consumer name.
        consumer: String,
        /// Offset.
        offset: u64,
    },
    /// Register an upstream subscription: push every message above the current top to the
    /// gateway as [`Frame::Pushes`] tagged `sub`.
    Subscribe {
        /// Channel.
        channel: String,
        /// The gateway's id for it (unique per gateway).
        sub: u64,
    },
    /// Drop an upstream subscription.
    Unsubscribe {
        /// Channel.
        channel: String,
        /// The gateway's id for it.
        sub: u64,
    },
    /// The channel's epoch, acknowledged top, first retained offset and, if asked, a
    /// consumer's committed offset: what a gateway needs to grant a local subscription.
    Info {
        /// Channel.
        channel: String,
        /// Durable consumer name.
        consumer: Option<String>,
    },
    /// Handover: the next chunk of a partition this node lost, for its new owner. The
    /// first pull seals the partition here.
    Pull {
        /// The partition.
        partition: u32,
        /// The map epoch of the move.
        moved_at: u64,
        /// Resume after this `(channel, offset)`; None for the start.
        cursor: Option<(String, u64)>,
    },
    /// Handover: the new owner has the partition durably; the old owner drops its copy.
    Pulled {
        /// The partition.
        partition: u32,
        /// The map epoch of the move.
        moved_at: u64,
    },
    /// Replication: a follower fetches the leader's batches from seq `from` (it holds
    /// every one below durably), or asks where a snapshot starts (`from: None`).
    Fetch {
        /// The partition.
        partition: u32,
        /// The leader epoch the follower follows.
        leader_epoch: u64,
        /// The follower's node id.
        follower: String,
        /// The next seq it needs.
        from: Option<u64>,
    },
    /// Replication: the next chunk of a snapshot of a partition this node leads (of only
    /// the named channels, sorted, when a follower truncates).
    Snapshot {
        /// The partition.
        partition: u32,
        /// The leader epoch the follower follows.
        leader_epoch: u64,
        /// Resume after this `(channel, offset)`; None for the start.
        cursor: Option<(String, u64)>,
        /// Only these channels (sorted); None for the whole partition.
        channels: Option<Vec<String>>,
    },
    /// Replication: where the leader's log ended the follower's last leader epoch
    /// (KIP-101's OffsetsForLeaderEpoch), so the follower truncates what it never had.
    EpochEnd {
        /// The partition.
        partition: u32,
        /// The leader epoch the follower follows.
        leader_epoch: u64,
        /// The last leader epoch in the follower's history.
        last_epoch: u64,
    },
    /// Take a seat under the cluster-wide per-user session cap, at the seat holder: the
    /// owner of the partition of `key` (`seats:<user>`).
    Seat {
        /// Routing key, `seats:<user>`.
        key: String,
        /// The user.
        user: String,
        /// The node the connection is on.
        node: String,
        /// The connection's id on that node.
        conn: u64,
        /// The cap.
        max: u32,
        /// Take it even over the cap: a node re-registering seats it already granted.
        force: bool,
    },
    /// Give a seat back: the connection ended.
    Unseat {
        /// Routing key, `seats:<user>`.
        key: String,
        /// The user.
        user: String,
        /// The node the connection was on.
        node: String,
        /// The connection's id on that node.
        conn: u64,
    },
    /// Presence (wire 3): record a client of `node` in the channel's presence.
    Join {
        /// Channel.
        channel: String,
        /// The node the client is connected to.
        node: String,
        /// The entry (boxed: it would double the size of every op).
        entry: Box<WireEntry>,
        /// Push `join` if the client is new (false when re-announcing after a move).
        announce: bool,
    },
    /// Presence (wire 3): forget a client of `node`.
    Leave {
        /// Channel.
        channel: String,
        /// The node the client is connected to.
        node: String,
        /// The client's id.
        client: String,
    },
    /// Presence (wire 3): the channel's presence list.
    Presence {
        /// Channel.
        channel: String,
    },
    /// Presence (wire 3): the channel's presence counts.
    PresenceStats {
        /// Channel.
        channel: String,
    },
}

impl Op {
    /// The channel the operation is for.
    pub fn channel(&self) -> &str {
        match self {
            Op::Publish { channel, .. }
            | Op::History { channel, .. }
            | Op::Commit { channel, .. }
            | Op::Subscribe { channel, .. }
            | Op::Unsubscribe { channel, .. }
            | Op::Info { channel, .. }
            | Op::Join { channel, .. }
            | Op::Leave { channel, .. }
            | Op::Presence { channel }
            | Op::PresenceStats { channel } => channel,
            Op::Seat { key, .. } | Op::Unseat { key, .. } => key,
            Op::Pull { .. } | Op::Pulled { .. } | Op::Fetch { .. } | Op::Snapshot { .. } | Op::EpochEnd { .. } => "",
        }
    }

    /// The operation's name, for metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Publish { .. } => "publish",
            Op::Seat { .. } => "seat",
            Op::Unseat { .. } => "unseat",
            Op::History { .. } => "history",
            Op::Commit { .. } => "commit",
            Op::Subscribe { .. } => "subscribe",
            Op::Unsubscribe { .. } => "unsubscribe",
            Op::Info { .. } => "info",
            Op::Pull { .. } => "pull",
            Op::Pulled { .. } => "pulled",
            Op::Fetch { .. } => "fetch",
            Op::Snapshot { .. } => "snapshot",
            Op::EpochEnd { .. } => "epoch_end",
            Op::Join { .. } => "join",
            Op::Leave { .. } => "leave",
            Op::Presence { .. } => "presence",
            Op::PresenceStats { .. } => "presence_stats",
        }
    }

    /// The first wire version whose acceptors read this op as meant: presence ops and a
    /// history read with a [`HistoryRange`] suffix need 3. A link refuses to send an op to
    /// an acceptor of a lower version (a rolling upgrade), rather than have it misread.
    pub fn min_wire(&self) -> u32 {
        match self {
            Op::Join { .. } | Op::Leave { .. } | Op::Presence { .. } | Op::PresenceStats { .. } => PRESENCE_WIRE,
            _ if history_range(self).is_some() => PRESENCE_WIRE,
            _ => 0,
        }
    }

    /// Whether it is a client operation (publish, commit, history, info, a seat), which a
    /// node runs for a channel's owner, rather than one between nodes about partitions
    /// or upstream subscriptions.
    pub fn is_client(&self) -> bool {
        matches!(
            self,
            Op::Publish { .. }
                | Op::Commit { .. }
                | Op::History { .. }
                | Op::Info { .. }
                | Op::Seat { .. }
                | Op::Unseat { .. }
                | Op::Join { .. }
                | Op::Leave { .. }
                | Op::Presence { .. }
                | Op::PresenceStats { .. }
        )
    }

    /// Whether sending it twice has the effect of sending it once: a publish with an
    /// idempotency key, a commit, a read.
    pub fn retry_safe(&self) -> bool {
        match self {
            Op::Publish { idempotency_key, .. } => idempotency_key.is_some(),
            // Seats are keyed by (node, connection): asking twice holds one seat.
            Op::Commit { .. } | Op::History { .. } | Op::Info { .. } | Op::Seat { .. } | Op::Unseat { .. } => true,
            // A join is keyed by client id (a repeat replaces), a leave of a gone client does
            // nothing, and reads are reads.
            Op::Join { .. } | Op::Leave { .. } | Op::Presence { .. } | Op::PresenceStats { .. } => true,
            Op::Subscribe { .. }
            | Op::Unsubscribe { .. }
            | Op::Pull { .. }
            | Op::Pulled { .. }
            | Op::Fetch { .. }
            | Op::Snapshot { .. }
            | Op::EpochEnd { .. } => false,
        }
    }

    /// The op of a history read.
    pub fn history(channel: &str, q: HistoryQuery) -> Self {
        let HistoryQuery { since, before, limit, reverse } = q;
        Op::History { channel: channel.to_string(), since, limit, before, reverse }
    }

    /// The op of a publish.
    pub fn publish(req: &PublishRequest) -> Self {
        Op::Publish {
            channel: req.channel.clone(),
            data: req.data.get().to_string(),
            key: req.key.clone(),
            idempotency_key: req.idempotency_key.clone(),
            from: req.from.clone(),
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    /// A publish was stored.
    Published {
        /// Offset.
        offset: u64,
        /// Channel epoch.
        epoch: String,
    },
    /// A history page.
    History {
        /// Channel epoch.
        epoch: String,
        /// Channel top.
        offset: u64,
        /// First retained offset.
        first: u64,
        /// `(offset, message)`, oldest first.
        messages: Vec<(u64, StoredMessage)>,
    },
    /// A commit is durable.
    Committed,
    /// An upstream subscription is registered; pushes follow for offsets above `top`.
    Subscribed {
        /// Channel epoch.
        epoch: String,
        /// Acknowledged top when it was registered.
        top: u64,
    },
    /// Channel facts for a local grant.
    Info(ChannelInfo),
    /// A handover or snapshot chunk.
    Chunk(Chunk),
    /// Replicated batches `(seq, encoded ops)`, consecutive from the fetch's `from`.
    Batches(Vec<(u64, bytes::Bytes)>),
    /// A snapshot taken now starts after every batch below this seq; the leader's
    /// leader-epoch history, which the copy inherits.
    SnapshotAt(u64, Vec<(u64, u64)>),
    /// The largest leader epoch at or below the one asked about that the leader's
    /// history knows, and the seq where it ended; None when it knows none.
    EpochEnd(Option<(u64, u64)>),
    /// Whether a seat was granted.
    Seated(bool),
    /// Nothing to say (unsubscribe, pulled, unseat, join, leave).
    Done,
    /// A channel's presence list (wire 3).
    Presence(Vec<WireEntry>),
    /// A channel's presence counts (wire 3).
    PresenceStats(PresenceStats),
}

/// What a gateway needs to know about a channel to grant a local subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelInfo {
    /// Channel epoch.
    pub epoch: String,
    /// Acknowledged top.
    pub top: u64,
    /// First retained offset.
    pub first: u64,
    /// The consumer's committed offset (0 if none), when one was asked for.
    pub committed: Option<u64>,
}

/// A channel's metadata and its consumers' committed offsets, as a chunk carries them.
pub type ChunkChannel = (String, switchyard_store::ChannelMeta, Vec<(String, u64)>);

/// One step of a partition handover: whole channels' metadata and consumer offsets, and
/// messages in `(channel, offset)` order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// Channels whose transfer starts in this chunk: name, metadata, consumer offsets.
    pub channels: Vec<ChunkChannel>,
    /// Messages: channel, offset, message.
    pub messages: Vec<(String, u64, StoredMessage)>,
    /// Where the next pull resumes; None when this was the last chunk.
    pub next: Option<(String, u64)>,
}

/// A failed answer: a protocol error, with the [`Refusal`] the caller acts on, if any.
///
/// On the wire it is `code`, `message`, the redirect `(owner, map epoch)` as an option
/// (exactly the previous version's shape). A refusal other than a redirect follows the
/// whole reply frame as a suffix, its tag and its fields as bytes ([`encode`], [`decode`]),
/// so an error without one is byte for byte the previous version's, and an older peer's
/// error decodes with no refusal. A tag this version does not know decodes to
/// [`Refusal::Other`]: the error's code still says what the client is told. A dialer that
/// reads refusals says so with [`WIRE_HEADER`], and the acceptor answers with it too: an
/// older dialer gets [`WireError::legacy`], and an older acceptor's errors go through
/// [`from_legacy`].
#[derive(Debug, Clone, PartialEq)]
pub struct WireError {
    /// Protocol error code (`unavailable`, `bad_request`, ...).
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// Why, where the receiver acts on it.
    pub refusal: Option<Refusal>,
}

impl WireError {
    /// From a protocol error (keeping its refusal).
    pub fn op(e: &OpError) -> Self {
        Self { code: e.code.as_str().to_string(), message: e.message.clone(), refusal: e.refusal.clone() }
    }

    /// Back to a protocol error (with the refusal).
    pub fn to_op(&self) -> OpError {
        let code = ErrorCode::ALL.iter().copied().find(|c| c.as_str() == self.code).unwrap_or(ErrorCode::Internal);
        OpError { code, message: self.message.clone(), refusal: self.refusal.clone(), retry_after_ms: None }
    }

    /// The owner and map epoch of a redirect.
    pub fn redirect(&self) -> Option<(&str, u64)> {
        match &self.refusal {
            Some(Refusal::Redirect { owner, epoch }) => Some((owner, *epoch)),
            _ => None,
        }
    }

    /// This error as a peer that predates refusals reads it: the redirect only.
    pub(crate) fn legacy(mut self) -> Self {
        if !matches!(self.refusal, Some(Refusal::Redirect { .. })) {
            self.refusal = None;
        }
        self
    }
}

impl Serialize for WireError {
    /// The previous version's shape: code, message, redirect. The refusal's suffix is
    /// written by [`encode`], after the frame.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (&self.code, &self.message, self.redirect()).serialize(s)
    }
}

impl<'de> Deserialize<'de> for WireError {
    /// The previous version's shape; [`decode`] adds the refusal from the frame's suffix.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (code, message, redirect) = <(String, String, Option<(String, u64)>)>::deserialize(d)?;
        let refusal = redirect.map(|(owner, epoch)| Refusal::Redirect { owner, epoch });
        Ok(WireError { code, message, refusal })
    }
}

/// The suffix after a reply frame whose error has a refusal other than a redirect: its tag
/// and its fields as bytes.
fn refusal_suffix(frame: &Frame) -> Option<(u32, Vec<u8>)> {
    let Frame::Reply { result: Err(e), .. } = frame else { return None };
    let r = e.refusal.as_ref()?;
    match r {
        Refusal::Redirect { .. } => None,
        Refusal::Resync { from } => Some((r.tag(), encode_fields(from))),
        _ => Some((r.tag(), Vec::new())),
    }
}

/// The suffix after a request frame whose op is a history read with an upper bound or
/// newest first (wire version 3): the fields its op's encoding leaves out. A forward read
/// has none, so it is byte for byte the previous version's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRange {
    /// Exclusive upper offset; None: up to the top.
    pub before: Option<u64>,
    /// Newest first.
    pub reverse: bool,
}

/// The [`HistoryRange`] suffix `op` needs, if any.
fn history_range(op: &Op) -> Option<HistoryRange> {
    match *op {
        Op::History { before, reverse, .. } if before.is_some() || reverse => Some(HistoryRange { before, reverse }),
        _ => None,
    }
}

/// A refusal's fields as the bytes after its tag.
fn encode_fields<T: Serialize>(fields: &T) -> Vec<u8> {
    postcard::to_stdvec(fields).expect("refusal fields serialize")
}

/// The refusal of `tag` with its field bytes ([`Refusal::from_tag`]).
fn decode_refusal(tag: u32, fields: &[u8]) -> Refusal {
    Refusal::from_tag(tag, postcard::from_bytes::<u64>(fields).ok())
}

/// The messages of the previous version's errors that its peers acted on, and the refusal
/// each meant. Only [`from_legacy`] reads them, for replies from an acceptor that
/// predates refusals (it sends no [`WIRE_HEADER`]); remove with that version.
pub(crate) const LEGACY_NOT_ADOPTED: &str = "partition not adopted here (yet)";
const LEGACY_SEALED: &str = switchyard_core::owner::SEALED;

/// An error from an acceptor that predates refusals, with the refusal its message meant
/// to the version that sent it (a rolling upgrade: the two versions must keep acting on
/// the same outcomes, or a new owner would give up on an old one that is adopting, and a
/// new follower would never take the snapshot an old leader asks for).
pub(crate) fn from_legacy(mut e: WireError) -> WireError {
    if e.refusal.is_some() {
        return e;
    }
    let resync = e.message.strip_prefix("position ").and_then(|m| m.strip_suffix(" is outside the log; resync"));
    e.refusal = if e.message == LEGACY_NOT_ADOPTED {
        Some(Refusal::NotAdopted)
    } else if e.message == LEGACY_SEALED {
        Some(Refusal::Sealed)
    } else {
        resync.and_then(|n| n.parse().ok()).map(|from| Refusal::Resync { from })
    };
    e
}

impl Answer {
    /// A history page as sent.
    pub fn history(page: HistoryPage) -> Self {
        Answer::History {
            epoch: page.epoch,
            offset: page.offset,
            first: page.first,
            messages: page
                .messages
                .into_iter()
                .map(|m| {
                    let mut msg = m.msg;
                    msg.data = m.data.get().to_string();
                    (m.offset, msg)
                })
                .collect(),
        }
    }

    /// The page back, for `channel`.
    pub fn into_history(self, channel: &str) -> Result<HistoryPage, OpError> {
        let Answer::History { epoch, offset, first, messages } = self else {
            return Err(OpError::internal("peer answered history with another answer"));
        };
        let (name, ep): (std::sync::Arc<str>, std::sync::Arc<str>) = (channel.into(), epoch.as_str().into());
        let messages = messages
            .into_iter()
            .map(|(offset, mut msg)| {
                let data = RawValue::from_string(std::mem::take(&mut msg.data))
                    .map_err(|e| OpError::internal(format!("peer sent a bad payload: {e}")))?;
                Ok(OwnedMessage { channel: name.clone(), epoch: ep.clone(), offset, msg, data })
            })
            .collect::<Result<_, OpError>>()?;
        Ok(HistoryPage { epoch, offset, first, messages })
    }

    /// A publish ack back.
    pub fn into_published(self) -> Result<PublishOk, OpError> {
        match self {
            Answer::Published { offset, epoch } => Ok(PublishOk { offset, epoch: epoch.into() }),
            _ => Err(OpError::internal("peer answered publish with another answer")),
        }
    }
}

/// The id of a request whose op this version does not know (a newer peer's), so that it
/// can be answered with an error rather than the link closed: a `Frame::Request` is its
/// variant index 0, its id and its epoch, then the op's variant index.
pub(crate) fn decode_request_id(bytes: &[u8]) -> Option<u64> {
    match postcard::take_from_bytes::<(u32, u64, u64)>(bytes) {
        Ok(((0, id, _), _)) => Some(id),
        _ => None,
    }
}

/// Largest frame (and message) on a peer link. Replies are kept far below it (history
/// and handover chunks are cut by size), so only a broken peer reaches it.
pub const MAX_FRAME: usize = 64 << 20;

/// The WebSocket settings of both ends of a peer link.
pub fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME))
}

/// Encodes a frame.
///
/// A reply whose error carries a refusal other than a redirect is followed by the
/// refusal's suffix (see [`WireError`]); every other frame is exactly as the previous
/// version wrote it.
pub(crate) fn encode(frame: &Frame) -> Vec<u8> {
    let mut bytes = postcard::to_stdvec(frame).expect("peer frames serialize");
    if let Some(suffix) = refusal_suffix(frame) {
        bytes.extend(postcard::to_stdvec(&suffix).expect("refusal suffix serializes"));
    }
    if let Frame::Request { op, .. } = frame {
        push_range(&mut bytes, op);
    }
    bytes
}

/// Appends the [`HistoryRange`] suffix of a request for `op`, if it has one.
fn push_range(bytes: &mut Vec<u8>, op: &Op) {
    if let Some(range) = history_range(op) {
        bytes.extend(postcard::to_stdvec(&range).expect("history range serializes"));
    }
}

/// [`Frame::Request`] by reference, for encoding without a copy of the op (which the
/// caller keeps for a redirect). Postcard writes an enum as its variant index and then its
/// fields, so this first variant encodes exactly as `Frame::Request` does.
#[derive(Serialize)]
enum RequestRef<'a> {
    Request { id: u64, epoch: u64, op: &'a Op },
}

/// Encodes `Frame::Request { id, epoch, op }` from a borrowed op.
pub(crate) fn encode_request(id: u64, epoch: u64, op: &Op) -> Vec<u8> {
    let mut bytes = postcard::to_stdvec(&RequestRef::Request { id, epoch, op }).expect("peer frames serialize");
    push_range(&mut bytes, op);
    bytes
}

/// Why bytes from a peer are not a frame.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not a frame of this version.
    #[error("bad peer frame: {0}")]
    Bad(#[from] postcard::Error),
    /// A frame followed by bytes that belong to none.
    #[error("{0} trailing bytes after a peer frame")]
    Trailing(usize),
}

/// Decodes a frame. Bytes after it are an error, but for the refusal suffix of a reply
/// whose error has no redirect, which must be exactly one `(tag, fields)`, and the
/// [`HistoryRange`] of a history request, which must be exactly one.
pub(crate) fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
    let (mut frame, rest) = postcard::take_from_bytes::<Frame>(bytes)?;
    if rest.is_empty() {
        return Ok(frame);
    }
    if let Frame::Request { op: Op::History { before, reverse, .. }, .. } = &mut frame {
        return match postcard::take_from_bytes::<HistoryRange>(rest)? {
            (range, []) => {
                (*before, *reverse) = (range.before, range.reverse);
                Ok(frame)
            }
            (_, more) => Err(DecodeError::Trailing(more.len())),
        };
    }
    let Frame::Reply { result: Err(e), .. } = &mut frame else { return Err(DecodeError::Trailing(rest.len())) };
    if e.refusal.is_some() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    match postcard::take_from_bytes::<(u32, Vec<u8>)>(rest) {
        Ok(((tag, fields), [])) => {
            e.refusal = Some(decode_refusal(tag, &fields));
            Ok(frame)
        }
        Ok((_, more)) => Err(DecodeError::Trailing(more.len())),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_borrowed_request_encodes_as_the_owned_one() {
        let op = Op::Publish {
            channel: "room:1".into(),
            data: "{\"t\":1}".into(),
            key: Some("k".into()),
            idempotency_key: None,
            from: Some("alice".into()),
        };
        let owned = encode(&Frame::Request { id: 7, epoch: 3, op: op.clone() });
        assert_eq!(encode_request(7, 3, &op), owned);
        assert_eq!(decode(&owned).unwrap(), Frame::Request { id: 7, epoch: 3, op });
    }

    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let frames = [
            Frame::Request {
                id: 7,
                epoch: 3,
                op: Op::Publish {
                    channel: "room:1".into(),
                    data: r#"{"a":1}"#.into(),
                    key: Some("k".into()),
                    idempotency_key: None,
                    from: Some("alice".into()),
                },
            },
            Frame::Reply { id: 7, result: Ok(Answer::Published { offset: 9, epoch: "e".into() }) },
            Frame::Reply {
                id: 8,
                result: Err(WireError {
                    code: "unavailable".into(),
                    message: "m".into(),
                    refusal: Some(Refusal::Redirect { owner: "n2".into(), epoch: 4 }),
                }),
            },
            Frame::Reply {
                id: 9,
                result: Err(WireError {
                    code: "unavailable".into(),
                    message: "m".into(),
                    refusal: Some(Refusal::Resync { from: 12 }),
                }),
            },
            Frame::Reply {
                id: 10,
                result: Err(WireError {
                    code: "unavailable".into(),
                    message: "m".into(),
                    refusal: Some(Refusal::NotAdopted),
                }),
            },
            Frame::Reply {
                id: 11,
                result: Err(WireError { code: "internal".into(), message: "m".into(), refusal: None }),
            },
        ];
        for f in frames {
            assert_eq!(decode(&encode(&f)).unwrap(), f);
        }
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
        let mut extra = encode(&Frame::Reply { id: 1, result: Ok(Answer::Committed) });
        extra.push(0);
        assert!(decode(&extra).is_err());
        let e = WireError::op(&OpError::new(ErrorCode::Forbidden, "no"));
        assert_eq!(e.to_op().code, ErrorCode::Forbidden);
    }

    /// The previous version's error: code, message and redirect, nothing after.
    type OldError = (String, String, Option<(String, u64)>);

    /// The previous version's frames, as far as a reply goes.
    #[derive(Serialize)]
    enum OldFrame {
        #[allow(dead_code)]
        Request,
        Reply {
            id: u64,
            result: Result<(), OldError>,
        },
    }

    #[test]
    fn errors_stay_readable_across_one_version_step() {
        // An older peer's error (no refusal bytes) decodes, its redirect kept.
        let old = postcard::to_stdvec(&OldFrame::Reply {
            id: 5,
            result: Err(("unavailable".into(), "not the owner".into(), Some(("n2".into(), 9)))),
        })
        .unwrap();
        let Frame::Reply { id: 5, result: Err(e) } = decode(&old).unwrap() else { panic!("not a reply") };
        assert_eq!(e.refusal, Some(Refusal::Redirect { owner: "n2".into(), epoch: 9 }));
        let old = postcard::to_stdvec(&OldFrame::Reply { id: 6, result: Err(("internal".into(), "x".into(), None)) });
        let Frame::Reply { result: Err(e), .. } = decode(&old.unwrap()).unwrap() else { panic!("not a reply") };
        assert_eq!((e.code.as_str(), e.refusal), ("internal", None));

        // What this version sends an older peer (`legacy`) is byte for byte the old shape.
        let e = WireError { code: "unavailable".into(), message: "m".into(), refusal: Some(Refusal::NotAdopted) };
        let ours = encode(&Frame::Reply { id: 7, result: Err(e.legacy()) });
        let theirs =
            postcard::to_stdvec(&OldFrame::Reply { id: 7, result: Err(("unavailable".into(), "m".into(), None)) })
                .unwrap();
        assert_eq!(ours, theirs);

        // A newer peer's refusal this version does not know (tag 200, with fields)
        // decodes to a generic one; the code still says what the client is told.
        let mut newer =
            postcard::to_stdvec(&OldFrame::Reply { id: 8, result: Err(("unavailable".into(), "m".into(), None)) })
                .unwrap();
        newer.extend(postcard::to_stdvec(&(200u32, vec![1u8, 2, 3])).unwrap());
        let Frame::Reply { result: Err(e), .. } = decode(&newer).unwrap() else { panic!("not a reply") };
        assert_eq!(e.refusal, Some(Refusal::Other(200)));
        assert_eq!(e.to_op().code, ErrorCode::Unavailable);

        // A suffix that is cut short, a stray byte, or a suffix after a redirect or after
        // a successful reply is a broken frame, never an error without a refusal.
        let plain = postcard::to_stdvec(&OldFrame::Reply { id: 9, result: Err(("internal".into(), "m".into(), None)) })
            .unwrap();
        let with = |tail: &[u8]| [plain.as_slice(), tail].concat();
        assert!(decode(&with(&[0x02])).is_err(), "a tag without its field bytes");
        assert!(decode(&with(&[0x03, 0x05, 0x01])).is_err(), "fields shorter than their length");
        assert!(decode(&with(&[0x02, 0x00, 0x00])).is_err(), "a byte after the suffix");
        let redirected = postcard::to_stdvec(&OldFrame::Reply {
            id: 9,
            result: Err(("unavailable".into(), "m".into(), Some(("n2".into(), 3)))),
        })
        .unwrap();
        assert!(decode(&[redirected.as_slice(), &[0x02, 0x00]].concat()).is_err(), "a suffix after a redirect");
        let ok = encode(&Frame::Reply { id: 1, result: Ok(Answer::Committed) });
        assert!(decode(&[ok.as_slice(), &[0x02, 0x00]].concat()).is_err(), "a suffix after an answer");
    }

    /// The previous version's ops, as far as a history read goes.
    #[derive(Serialize, Deserialize)]
    enum OldOp {
        #[allow(dead_code)]
        Publish {
            channel: String,
            data: String,
            key: Option<String>,
            idempotency_key: Option<String>,
            from: Option<String>,
        },
        History {
            channel: String,
            since: u64,
            limit: u32,
        },
    }

    /// The previous version's request frame.
    #[derive(Serialize, Deserialize)]
    enum OldRequest {
        Request { id: u64, epoch: u64, op: OldOp },
    }

    #[test]
    fn history_requests_stay_readable_across_one_version_step() {
        let old = |since, limit| OldRequest::Request {
            id: 4,
            epoch: 2,
            op: OldOp::History { channel: "room:1".into(), since, limit },
        };
        // An older gateway's history request decodes as a forward read.
        let bytes = postcard::to_stdvec(&old(7, 50)).unwrap();
        let want = Op::History { channel: "room:1".into(), since: 7, limit: 50, before: None, reverse: false };
        assert_eq!(decode(&bytes).unwrap(), Frame::Request { id: 4, epoch: 2, op: want.clone() });

        // A forward read (catch-up, paging on) is byte for byte the old request, so an
        // older owner reads it; it needs no newer peer.
        assert_eq!(encode_request(4, 2, &want), bytes);
        assert_eq!(want.min_wire(), 0);
        let q = HistoryQuery { since: 7, before: None, limit: 50, reverse: false };
        assert_eq!(Op::history("room:1", q), want);

        // A backward read is the old request and its range after it: an older owner would
        // find trailing bytes, so links send it only to wire 3 peers.
        let back = Op::history("room:1", HistoryQuery { since: 0, before: Some(40), limit: 0, reverse: true });
        assert_eq!(back.min_wire(), 3);
        assert!(WIRE_VERSION >= back.min_wire());
        let ours = encode_request(4, 2, &back);
        let (head, rest) = postcard::take_from_bytes::<OldRequest>(&ours).unwrap();
        assert!(matches!(head, OldRequest::Request { op: OldOp::History { since: 0, limit: 0, .. }, .. }));
        assert_eq!(
            postcard::from_bytes::<HistoryRange>(rest).unwrap(),
            HistoryRange { before: Some(40), reverse: true }
        );
        assert_eq!(decode(&ours).unwrap(), Frame::Request { id: 4, epoch: 2, op: back });

        // A range that is cut short, or followed by a stray byte, is a broken frame; so is
        // a range after a request that is no history read.
        assert!(decode(&ours[..ours.len() - 1]).is_err(), "a range cut short");
        assert!(decode(&[ours.as_slice(), &[0]].concat()).is_err(), "a byte after the range");
        let commit = encode(&Frame::Request {
            id: 1,
            epoch: 1,
            op: Op::Commit { channel: "c".into(), consumer: "w".into(), offset: 1 },
        });
        assert!(decode(&[commit.as_slice(), &[0x01, 0x05, 0x01]].concat()).is_err(), "a range after a commit");

        // The version a peer says it speaks.
        assert_eq!(wire_version(None), 1);
        assert_eq!(wire_version(Some(b"2")), 2);
        assert_eq!(wire_version(Some(b" 3 ")), 3);
        assert_eq!(wire_version(Some(b"x")), 1);
        assert!(reads_refusals(Some(b"3")) && reads_refusals(Some(b"2")) && !reads_refusals(None));
    }

    /// An acceptor of the previous version names its refusals only in its messages: the
    /// link maps the ones its peers acted on, and nothing else.
    #[test]
    fn an_older_acceptors_errors_keep_their_meaning() {
        let old = |message: &str| WireError { code: "unavailable".into(), message: message.into(), refusal: None };
        assert_eq!(from_legacy(old("partition not adopted here (yet)")).refusal, Some(Refusal::NotAdopted));
        assert_eq!(from_legacy(old(switchyard_core::owner::SEALED)).refusal, Some(Refusal::Sealed));
        // This version still words them the same, for older dialers (`WireError::legacy`).
        let resync = switchyard_core::replication::FetchError::Resync(17).to_string();
        assert_eq!(from_legacy(old(&resync)).refusal, Some(Refusal::Resync { from: 17 }));
        assert_eq!(from_legacy(old("in the ISR: leave it before a resync")).refusal, None);
        assert_eq!(from_legacy(old("owner stopped")).refusal, None);
        let redirect = Some(Refusal::Redirect { owner: "n2".into(), epoch: 4 });
        let e = WireError { refusal: redirect.clone(), ..old("not the owner") };
        assert_eq!(from_legacy(e).refusal, redirect);
    }

    /// Presence (wire 3) round trips; a request whose op this version does not know still
    /// yields its id (answered with an error, the link kept); frames of the previous
    /// version encode as before.
    #[test]
    fn presence_crosses_the_wire_and_unknown_ops_are_answered() {
        let entry = WireEntry {
            client: "7".into(),
            user: "alice".into(),
            conn_info: Some("{\"a\":1}".into()),
            chan_info: None,
        };
        let frames = [
            Frame::Request {
                id: 1,
                epoch: 2,
                op: Op::Join {
                    channel: "room:1".into(),
                    node: "n1".into(),
                    entry: Box::new(entry.clone()),
                    announce: false,
                },
            },
            Frame::Request {
                id: 2,
                epoch: 2,
                op: Op::Leave { channel: "room:1".into(), node: "n1".into(), client: "7".into() },
            },
            Frame::Request { id: 3, epoch: 2, op: Op::PresenceStats { channel: "room:1".into() } },
            Frame::Reply { id: 3, result: Ok(Answer::Presence(vec![entry.clone()])) },
            Frame::Reply { id: 4, result: Ok(Answer::PresenceStats(PresenceStats { num_clients: 3, num_users: 2 })) },
            Frame::Events(vec![Event { sub: 9, frame: "{\"push\":\"join\"}".into() }]),
        ];
        for f in frames {
            assert_eq!(decode(&encode(&f)).unwrap(), f);
        }
        assert_eq!(entry.clone().into_entry().conn_info.unwrap().get(), "{\"a\":1}");
        assert_eq!(WireEntry::from(&entry.into_entry()).client, "7");
        assert_eq!(Op::Presence { channel: "x".into() }.min_wire(), PRESENCE_WIRE);
        assert_eq!(Op::history("x", HistoryQuery::forward(0, 1)).min_wire(), 0);

        // A newer peer's op (variant 200, with fields): not a frame here, but its id is read.
        let mut newer = postcard::to_stdvec(&(0u32, 41u64, 5u64, 200u32)).unwrap();
        newer.extend_from_slice(&[3, 1, 2, 3]);
        assert!(decode(&newer).is_err());
        assert_eq!(decode_request_id(&newer), Some(41));
        let reply = encode(&Frame::Reply { id: 41, result: Ok(Answer::Done) });
        assert_eq!(decode_request_id(&reply), None, "only requests are answered so");

        // What the previous version sends and reads is unchanged: a push frame, a request.
        let push = Frame::Pushes(vec![Push { sub: 1, offset: 2, frame: "{}".into(), end: false }]);
        assert_eq!(encode(&push), postcard::to_stdvec(&(2u32, vec![(1u64, 2u64, "{}", false)])).unwrap());
        assert_eq!(wire_version(Some(b"3")), 3);
        assert_eq!(wire_version(None), 1, "a peer without the header predates it");
        assert!(reads_refusals(Some(b"2")) && !reads_refusals(None));
    }

    proptest::proptest! {
        /// Fuzz-style: any bytes on a peer link decode to a frame or an error, never a panic.
        #[test]
        fn any_peer_bytes_decode_or_fail(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        /// Every request frame survives an encode/decode round trip.
        #[test]
        fn requests_round_trip(
            id in 0u64..,
            epoch in 0u64..,
            channel in "[a-z:0-9]{1,30}",
            since in 0u64..,
            limit in 0u32..,
            before in proptest::option::of(0u64..),
            reverse in proptest::bool::ANY,
        ) {
            let op = Op::History { channel, since, limit, before, reverse };
            let frame = Frame::Request { id, epoch, op: op.clone() };
            proptest::prop_assert_eq!(decode(&encode(&frame)).unwrap(), frame.clone());
            proptest::prop_assert_eq!(encode_request(id, epoch, &op), encode(&frame));
        }
    }
}

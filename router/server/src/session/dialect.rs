//! The session's two client protocols side by side: how a reply, a message, the end of a
//! subscription and a close look in each.
//!
//! It owns every choice of frame and code that depends on the connection's [`Dialect`]:
//! native frames from `switchyard_proto::protocol`, Centrifugo's from
//! `switchyard_proto::centrifugo`, and which Centrifugo code each of the router's conditions
//! becomes (a client told to stop must stop; one told to come back must come back). It must
//! never hold state or do I/O: the session calls it to frame, then writes.

use serde::Serialize;
use switchyard_core::partitions::{HistoryPage, OwnedMessage};
use switchyard_proto::centrifugo::{self as cf, CfError, Publication};
use switchyard_proto::protocol::{self, close, Empty, OpError};
use switchyard_proto::{Dialect, Text};

/// Where a reply goes: the command's id, and (Centrifugo) its method, which keys the reply.
#[derive(Debug, Clone, Copy)]
pub(super) struct To {
    pub(super) id: u64,
    pub(super) method: &'static str,
}

impl To {
    /// A native command's reply address.
    pub(super) fn native(id: u64) -> Self {
        Self { id, method: "" }
    }
}

/// A command's outcome in `dialect`: the native body as it is, or its Centrifugo form
/// (`centrifugo` turns the native body into it).
pub(super) fn answer<T: Serialize, C: Serialize>(
    dialect: Dialect,
    to: To,
    result: &Result<T, OpError>,
    centrifugo: impl FnOnce(&T) -> C,
) -> Text {
    match (dialect, result) {
        (Dialect::Native, result) => protocol::reply(to.id, result),
        (Dialect::Centrifugo, Ok(ok)) => cf::reply(to.id as u32, to.method, &centrifugo(ok)),
        (Dialect::Centrifugo, Err(e)) => cf::error_reply(to.id as u32, &CfError::from(e)),
    }
}

/// An answer whose Centrifugo form is empty (`{}`).
pub(super) fn empty<T: Serialize>(dialect: Dialect, to: To, result: &Result<T, OpError>) -> Text {
    answer(dialect, to, result, |_| Empty {})
}

/// An error reply; `id` None only in the native protocol (a frame with no usable id).
pub(super) fn error(dialect: Dialect, id: Option<u64>, e: &OpError) -> Text {
    match dialect {
        Dialect::Native => protocol::error_reply(id, e),
        Dialect::Centrifugo => cf::error_reply(id.unwrap_or(0) as u32, &CfError::from(e)),
    }
}

/// A Centrifugo error with its own code.
pub(super) fn cf_error(to: To, code: u32, message: &str) -> Text {
    cf::error_reply(to.id as u32, &CfError::new(code, message))
}

/// One stored message as a publication.
pub(super) fn publication(m: &OwnedMessage) -> Publication<'_> {
    Publication::new(&m.data, m.offset, m.msg.ts, m.msg.from.as_deref(), m.msg.key.as_deref())
}

/// One stored message as a push (catch-up).
pub(super) fn message(dialect: Dialect, m: &OwnedMessage) -> Text {
    match dialect {
        Dialect::Native => protocol::to_frame(&m.view(Some("message"))),
        Dialect::Centrifugo => cf::pub_push(&m.channel, &publication(m)),
    }
}

/// The server ended a subscription that the client should take up again (and recover).
pub(super) fn resubscribe(dialect: Dialect, channel: &str, reason: &str) -> Text {
    match dialect {
        Dialect::Native => protocol::unsubscribed_push(channel, close::SLOW_CONSUMER, reason),
        Dialect::Centrifugo => cf::unsubscribe_push(channel, cf::unsubscribe::INSUFFICIENT_STATE, reason),
    }
}

/// A history page as Centrifugo's `history` result.
#[derive(Serialize)]
pub(super) struct CfHistory<'a> {
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    publications: Vec<Publication<'a>>,
    epoch: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    offset: u64,
}

impl<'a> CfHistory<'a> {
    pub(super) fn new(page: &'a HistoryPage) -> Self {
        Self { publications: page.messages.iter().map(publication).collect(), epoch: &page.epoch, offset: page.offset }
    }
}

/// A subscribe grant as Centrifugo's `subscribe` result, with the first recovered messages.
#[derive(Serialize)]
pub(super) struct CfSubscribed<'a> {
    recoverable: bool,
    positioned: bool,
    epoch: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    recovered: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    was_recovering: bool,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    publications: Vec<Publication<'a>>,
}

impl<'a> CfSubscribed<'a> {
    pub(super) fn new(epoch: &'a str, offset: u64, recovered: Option<bool>, page: &'a [OwnedMessage]) -> Self {
        Self {
            recoverable: true,
            positioned: true,
            epoch,
            offset,
            recovered: recovered == Some(true),
            was_recovering: recovered.is_some(),
            publications: page.iter().map(publication).collect(),
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The close code and reason a connection ends with, from the native ones the session
/// decides on (`expired`: the token ran out, so the client may come back with a new one):
/// Centrifugo's equivalent, in the range that tells its clients the same thing (reconnect,
/// or stop).
pub(super) fn close_code(dialect: Dialect, code: u16, reason: &'static str, expired: bool) -> (u16, &'static str) {
    if dialect == Dialect::Native {
        return (code, reason);
    }
    match code {
        close::UNAUTHORIZED if expired => (cf::close::EXPIRED, "connection expired"),
        close::UNAUTHORIZED => (cf::close::INVALID_TOKEN, "invalid token"),
        close::SLOW_CONSUMER => (cf::close::SLOW, "slow"),
        close::TOO_MANY_SESSIONS => (cf::close::CONNECTION_LIMIT, "connection limit"),
        close::RATE_LIMITED => (cf::close::TOO_MANY_REQUESTS, "too many requests"),
        close::SHUTTING_DOWN => (cf::close::SHUTDOWN, "shutdown"),
        close::TOO_BIG => (cf::close::TOO_BIG, "message too big"),
        _ => (code, reason),
    }
}

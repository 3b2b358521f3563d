//! Presence: who is subscribed to a channel, as a client reads it and as the owner holds it.
//!
//! It owns [`PresenceEntry`] (one subscribed client), [`PresenceStats`] (the counts), the
//! native `presence` reply and the `join`/`leave` push frames in both dialects, and the
//! `limit_exceeded` error of a list too long to send. It must never hold presence state:
//! the channel's owner does (in the core layer), in memory only.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::protocol::{to_frame, ErrorCode, OpError};
use crate::{Dialect, Text};

/// One client subscribed to a channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresenceEntry {
    /// The client's id (a connection's id, as its `connect` reply named it).
    pub client: String,
    /// The client's user ("" when anonymous).
    pub user: String,
    /// The connection's info (the token's `info` claim), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn_info: Option<Box<RawValue>>,
    /// Channel-specific info, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chan_info: Option<Box<RawValue>>,
}

impl PartialEq for PresenceEntry {
    fn eq(&self, other: &Self) -> bool {
        let raw = |v: &Option<Box<RawValue>>| v.as_ref().map(|r| r.get().to_owned());
        self.client == other.client
            && self.user == other.user
            && raw(&self.conn_info) == raw(&other.conn_info)
            && raw(&self.chan_info) == raw(&other.chan_info)
    }
}

impl PresenceEntry {
    /// An entry without info.
    pub fn new(client: impl Into<String>, user: impl Into<String>) -> Self {
        Self { client: client.into(), user: user.into(), conn_info: None, chan_info: None }
    }
}

/// A channel's presence counts.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PresenceStats {
    /// Subscribed clients.
    pub num_clients: u64,
    /// Distinct users among them ("" counts as one user).
    pub num_users: u64,
}

/// The `ok` of a native `presence` reply.
#[derive(Debug, Serialize)]
pub struct PresenceOk<'a> {
    /// Every subscribed client.
    pub clients: &'a [PresenceEntry],
}

/// Whether a presence push says a client came or went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A client subscribed.
    Join,
    /// A client left.
    Leave,
}

impl Change {
    /// The push's name in both dialects.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Join => "join",
            Change::Leave => "leave",
        }
    }
}

/// `{"push":"join"|"leave","channel":c,"info":{client,user,conn_info?,chan_info?}}`.
pub fn native_push(channel: &str, change: Change, entry: &PresenceEntry) -> Text {
    #[derive(Serialize)]
    struct Push<'a> {
        push: &'static str,
        channel: &'a str,
        info: &'a PresenceEntry,
    }
    to_frame(&Push { push: change.as_str(), channel, info: entry })
}

/// The push of `change` for a connection that speaks `dialect`.
pub fn push(dialect: Dialect, channel: &str, change: Change, entry: &PresenceEntry) -> Text {
    match dialect {
        Dialect::Native => native_push(channel, change, entry),
        Dialect::Centrifugo => {
            let info = crate::centrifugo::ClientInfo {
                user: &entry.user,
                client: &entry.client,
                conn_info: entry.conn_info.as_deref(),
                chan_info: entry.chan_info.as_deref(),
            };
            crate::centrifugo::presence_push(channel, change.as_str(), &info)
        }
    }
}

/// One presence change's push in each [`Dialect`], each rendered at most once however many
/// subscribers take it.
pub struct Pushes<'a> {
    channel: &'a str,
    change: Change,
    entry: &'a PresenceEntry,
    native: Option<Text>,
    centrifugo: Option<Text>,
}

impl<'a> Pushes<'a> {
    /// The pushes of `change` of `entry` in `channel`.
    pub fn new(channel: &'a str, change: Change, entry: &'a PresenceEntry) -> Self {
        Self { channel, change, entry, native: None, centrifugo: None }
    }

    /// The frame for a connection that speaks `dialect`.
    pub fn get(&mut self, dialect: Dialect) -> Text {
        let slot = match dialect {
            Dialect::Native => &mut self.native,
            Dialect::Centrifugo => &mut self.centrifugo,
        };
        slot.get_or_insert_with(|| push(dialect, self.channel, self.change, self.entry)).clone()
    }
}

/// The `(change, entry)` of a native join or leave push (as a gateway receives it from the
/// owner), to render it in another dialect; None for any other frame.
pub fn parse_native_push(frame: &str) -> Option<(String, Change, PresenceEntry)> {
    #[derive(Deserialize)]
    struct Push {
        push: String,
        channel: String,
        info: PresenceEntry,
    }
    let p: Push = serde_json::from_str(frame).ok()?;
    let change = match p.push.as_str() {
        "join" => Change::Join,
        "leave" => Change::Leave,
        _ => return None,
    };
    Some((p.channel, change, p.info))
}

/// Centrifugo's form of a native join or leave push; None for any other frame.
pub fn centrifugo_from_native(frame: &str) -> Option<Text> {
    let (channel, change, entry) = parse_native_push(frame)?;
    Some(push(Dialect::Centrifugo, &channel, change, &entry))
}

/// The error of a `presence` request on a channel with more than `max` clients.
pub fn list_too_long(max: usize) -> OpError {
    OpError::new(ErrorCode::LimitExceeded, format!("presence list over {max} clients: use presence_stats"))
}

/// The error of a presence request in a namespace without presence.
pub fn not_enabled() -> OpError {
    OpError::bad_request("presence is off in this channel's namespace")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_render_once_per_dialect_and_read_back() {
        let mut e = PresenceEntry::new("7", "alice");
        e.conn_info = Some(RawValue::from_string("{\"n\":1}".into()).unwrap());
        let mut p = Pushes::new("room:1", Change::Join, &e);
        let native = p.get(Dialect::Native);
        assert_eq!(
            native.as_str(),
            r#"{"push":"join","channel":"room:1","info":{"client":"7","user":"alice","conn_info":{"n":1}}}"#
        );
        let cf = p.get(Dialect::Centrifugo);
        let v: serde_json::Value = serde_json::from_str(cf.as_str()).unwrap();
        assert_eq!(v["push"]["channel"], "room:1");
        assert_eq!(v["push"]["join"]["info"]["user"], "alice");
        let (channel, change, back) = parse_native_push(native.as_str()).unwrap();
        assert_eq!((channel.as_str(), change, back), ("room:1", Change::Join, e));
        assert!(parse_native_push(r#"{"push":"message","channel":"a","offset":1}"#).is_none());
    }
}

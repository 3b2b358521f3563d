//! Centrifugo's client protocol v2 in JSON: command parsing, reply and push encoding, and
//! the numeric error, close and unsubscribe codes its clients act on.
//!
//! It owns the wire format of `docs/centrifugo.md`: every field name and code the
//! `/connection/websocket` endpoint sends is spelled here. It must never do I/O or touch
//! router state, and never decide policy: it turns frame text into [`CfCommand`]s and values
//! into frame bytes; which code a router condition becomes is the session's choice, made with
//! the constants here.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::protocol::{ErrorCode, OpError};
use crate::Text;

/// The server's ping and the client's pong: an empty command.
pub const PING: &str = "{}";
/// Most commands one frame may carry (a client's first frame holds `connect` and every
/// pending `subscribe`).
pub const MAX_COMMANDS_PER_FRAME: usize = 1024;

/// Error codes of replies (`{"id", "error": {code, message, temporary}}`).
pub mod code {
    /// Internal error; sent as temporary (the client retries).
    pub const INTERNAL: u32 = 100;
    /// No valid credentials.
    pub const UNAUTHORIZED: u32 = 101;
    /// Unknown channel (a namespace that does not exist).
    pub const UNKNOWN_CHANNEL: u32 = 102;
    /// The rules forbid it.
    pub const PERMISSION_DENIED: u32 = 103;
    /// No such method.
    pub const METHOD_NOT_FOUND: u32 = 104;
    /// A second `subscribe` to a channel.
    pub const ALREADY_SUBSCRIBED: u32 = 105;
    /// A limit was hit (subscriptions, presence list size).
    pub const LIMIT_EXCEEDED: u32 = 106;
    /// Malformed or invalid command.
    pub const BAD_REQUEST: u32 = 107;
    /// A feature this server does not offer.
    pub const NOT_AVAILABLE: u32 = 108;
    /// The connection token expired: the client fetches a new one and reconnects.
    pub const TOKEN_EXPIRED: u32 = 109;
    /// Too many requests; sent as temporary.
    pub const TOO_MANY_REQUESTS: u32 = 111;
    /// The position cannot be recovered (another epoch, or history trimmed past it).
    pub const UNRECOVERABLE_POSITION: u32 = 112;
}

/// WebSocket close codes. 3000–3499 and 4000–4499 tell the client to reconnect;
/// 3500–3999 and 4500–4999 tell it to stop.
pub mod close {
    /// The node is shutting down: reconnect (possibly elsewhere).
    pub const SHUTDOWN: u16 = 3001;
    /// The token expired while connected: reconnect with a new one.
    pub const EXPIRED: u16 = 3005;
    /// The outbound queue overflowed: reconnect and recover.
    pub const SLOW: u16 = 3008;
    /// The client did not answer pings.
    pub const NO_PONG: u16 = 3012;
    /// Rate limited for too long: reconnect later.
    pub const TOO_MANY_REQUESTS: u16 = 3013;
    /// Invalid token: stop.
    pub const INVALID_TOKEN: u16 = 3500;
    /// A frame that is not the protocol: stop.
    pub const BAD_REQUEST: u16 = 3501;
    /// Too many connections for this user: stop.
    pub const CONNECTION_LIMIT: u16 = 3504;
    /// A feature this server does not offer, used without a reply (`send`): stop.
    pub const NOT_AVAILABLE: u16 = 3508;
    /// A frame over the size limit (RFC 6455 "message too big").
    pub const TOO_BIG: u16 = 1009;
}

/// Codes of the `unsubscribe` push: below 2500 the client stays unsubscribed, from 2500 it
/// subscribes again (and recovers from its position).
pub mod unsubscribe {
    /// The server ended the subscription for good.
    pub const SERVER: u32 = 2000;
    /// The server lost the subscription's continuity (the channel's partition moved, or
    /// catch-up found a hole): subscribe again and recover.
    pub const INSUFFICIENT_STATE: u32 = 2500;
}

/// Subscribe flag bit: the client wants error 112 instead of `recovered: false`.
pub const FLAG_REJECT_UNRECOVERED: i64 = 2;

/// A position in a channel's stream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct StreamPosition {
    /// Offset.
    #[serde(default)]
    pub offset: u64,
    /// Epoch.
    #[serde(default)]
    pub epoch: String,
}

/// A parsed Centrifugo command.
#[derive(Debug, Clone)]
pub enum CfCommand {
    /// An empty command: the client's pong.
    Pong,
    /// `connect`.
    Connect {
        /// Connection JWT (empty when none).
        token: Option<String>,
        /// Client name.
        name: Option<String>,
        /// Client version.
        version: Option<String>,
    },
    /// `subscribe`.
    Subscribe {
        /// Channel.
        channel: String,
        /// Recover from `offset` in `epoch`.
        recover: bool,
        /// Last offset seen.
        offset: u64,
        /// Epoch it was seen in.
        epoch: String,
        /// Feature bits ([`FLAG_REJECT_UNRECOVERED`]).
        flag: i64,
        /// `data.consumer`: a durable consumer to subscribe as.
        consumer: Option<String>,
        /// A feature asked for that this server does not offer (a tag filter, a map or
        /// shared-poll subscription, delta compression): answered 108, never ignored.
        unsupported: Option<&'static str>,
    },
    /// `unsubscribe`.
    Unsubscribe {
        /// Channel.
        channel: String,
    },
    /// `publish`.
    Publish {
        /// Channel.
        channel: String,
        /// Payload, raw JSON as sent.
        data: Box<RawValue>,
    },
    /// `history`.
    History {
        /// Channel.
        channel: String,
        /// Page size: 0 for the position only; negative is treated as the maximum.
        limit: i32,
        /// Where to start (exclusive), and the epoch the client believes in.
        since: Option<StreamPosition>,
        /// Newest first.
        reverse: bool,
    },
    /// `presence`.
    Presence {
        /// Channel.
        channel: String,
    },
    /// `presence_stats`.
    PresenceStats {
        /// Channel.
        channel: String,
    },
    /// `refresh`: a new connection token.
    Refresh {
        /// JWT.
        token: String,
    },
    /// `sub_refresh`: a new subscription token (not offered).
    SubRefresh {
        /// Channel.
        channel: String,
    },
    /// `rpc`.
    Rpc {
        /// Method name.
        method: String,
        /// Arguments, raw JSON.
        data: Option<Box<RawValue>>,
    },
    /// `send`: an asynchronous message to the server, with no reply.
    Send,
    /// `ping` (an explicit ping command, answered with an empty `ping` reply).
    Ping,
}

impl CfCommand {
    /// The method's name, which its reply repeats as its key.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Pong => "",
            Self::Connect { .. } => "connect",
            Self::Subscribe { .. } => "subscribe",
            Self::Unsubscribe { .. } => "unsubscribe",
            Self::Publish { .. } => "publish",
            Self::History { .. } => "history",
            Self::Presence { .. } => "presence",
            Self::PresenceStats { .. } => "presence_stats",
            Self::Refresh { .. } => "refresh",
            Self::SubRefresh { .. } => "sub_refresh",
            Self::Rpc { .. } => "rpc",
            Self::Send => "send",
            Self::Ping => "ping",
        }
    }
}

/// A command that could not be parsed: its id when one was usable, and why.
#[derive(Debug, Clone)]
pub struct CfRejected {
    /// The command's id (0 when it had none).
    pub id: u32,
    /// The error to answer with.
    pub error: CfError,
    /// The frame is not the protocol at all: close the connection with 3501.
    pub fatal: bool,
}

/// A Centrifugo error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CfError {
    /// Numeric code ([`code`]).
    pub code: u32,
    /// Human-readable text (never empty: strict clients read it).
    pub message: String,
    /// The client may retry.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub temporary: bool,
}

impl CfError {
    /// An error with `code` and `message`.
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), temporary: false }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(code::BAD_REQUEST, message)
    }
}

impl From<&OpError> for CfError {
    /// The Centrifugo form of a router error: same message, the code its clients act on.
    fn from(e: &OpError) -> Self {
        let (code, temporary) = match e.code {
            ErrorCode::BadRequest | ErrorCode::TooLarge => (code::BAD_REQUEST, false),
            ErrorCode::UnknownOp => (code::METHOD_NOT_FOUND, false),
            ErrorCode::Unauthorized => (code::UNAUTHORIZED, false),
            ErrorCode::Forbidden => (code::PERMISSION_DENIED, false),
            ErrorCode::RateLimited => (code::TOO_MANY_REQUESTS, true),
            ErrorCode::LimitExceeded => (code::LIMIT_EXCEEDED, false),
            // Retry: the owner comes back, or moves, within seconds.
            ErrorCode::Unavailable | ErrorCode::Internal => (code::INTERNAL, true),
        };
        let message = if e.message.is_empty() { e.code.as_str().to_string() } else { e.message.clone() };
        Self { code, message, temporary }
    }
}

#[derive(Deserialize)]
struct RawCommand<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    connect: Option<&'a RawValue>,
    #[serde(borrow, default)]
    subscribe: Option<&'a RawValue>,
    #[serde(borrow, default)]
    unsubscribe: Option<&'a RawValue>,
    #[serde(borrow, default)]
    publish: Option<&'a RawValue>,
    #[serde(borrow, default)]
    presence: Option<&'a RawValue>,
    #[serde(borrow, default)]
    presence_stats: Option<&'a RawValue>,
    #[serde(borrow, default)]
    history: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ping: Option<&'a RawValue>,
    #[serde(borrow, default)]
    send: Option<&'a RawValue>,
    #[serde(borrow, default)]
    rpc: Option<&'a RawValue>,
    #[serde(borrow, default)]
    refresh: Option<&'a RawValue>,
    #[serde(borrow, default)]
    sub_refresh: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ConnectReq {
    token: Option<String>,
    name: Option<String>,
    version: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SubscribeReq<'a> {
    channel: String,
    recover: bool,
    offset: u64,
    epoch: String,
    flag: i64,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    tf: Option<&'a RawValue>,
    #[serde(rename = "type")]
    kind: i64,
    delta: String,
}

#[derive(Deserialize)]
struct ChannelReq {
    #[serde(default)]
    channel: String,
}

#[derive(Deserialize)]
struct PublishReq<'a> {
    #[serde(default)]
    channel: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HistoryReq {
    channel: String,
    limit: i32,
    since: Option<StreamPosition>,
    reverse: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RefreshReq {
    token: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RpcReq<'a> {
    method: String,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SubscribeData {
    consumer: Option<String>,
}

fn body<'a, T: Deserialize<'a>>(raw: &'a RawValue, method: &str) -> Result<T, CfError> {
    serde_json::from_str(raw.get()).map_err(|e| CfError::bad_request(format!("malformed `{method}`: {e}")))
}

fn channel(name: String) -> Result<String, CfError> {
    if !crate::channel::is_valid_name(&name) {
        return Err(CfError::bad_request("invalid channel name: 1-255 characters of [A-Za-z0-9_:.@-]"));
    }
    Ok(name)
}

/// Splits one text frame into its commands (one JSON object per line), at most
/// [`MAX_COMMANDS_PER_FRAME`]; more is a [`CfRejected`] with `fatal` set.
pub fn split_frame(text: &str) -> Result<impl Iterator<Item = &str>, CfRejected> {
    let lines = text.split('\n').filter(|l| !l.trim().is_empty());
    if lines.clone().nth(MAX_COMMANDS_PER_FRAME).is_some() {
        return Err(CfRejected {
            id: 0,
            error: CfError::bad_request(format!("more than {MAX_COMMANDS_PER_FRAME} commands in one frame")),
            fatal: true,
        });
    }
    Ok(lines)
}

/// Parses one command (one line of a frame) into its id and command.
pub fn parse_command(line: &str) -> Result<(u32, CfCommand), CfRejected> {
    let fatal = |message: String| CfRejected { id: 0, error: CfError::bad_request(message), fatal: true };
    if !line.trim_start().starts_with('{') {
        return Err(fatal("a command must be a JSON object".into()));
    }
    let raw: RawCommand<'_> = serde_json::from_str(line).map_err(|e| fatal(format!("malformed command: {e}")))?;
    let id = match raw.id {
        None => 0,
        Some(v) => {
            serde_json::from_str::<u32>(v.get()).map_err(|_| fatal("`id` must be an unsigned integer".into()))?
        }
    };
    let methods = [
        ("connect", raw.connect),
        ("subscribe", raw.subscribe),
        ("unsubscribe", raw.unsubscribe),
        ("publish", raw.publish),
        ("presence", raw.presence),
        ("presence_stats", raw.presence_stats),
        ("history", raw.history),
        ("ping", raw.ping),
        ("send", raw.send),
        ("rpc", raw.rpc),
        ("refresh", raw.refresh),
        ("sub_refresh", raw.sub_refresh),
    ];
    let mut given = methods.into_iter().filter_map(|(name, v)| v.filter(|v| v.get() != "null").map(|v| (name, v)));
    let Some((method, req)) = given.next() else {
        if id == 0 {
            return Ok((0, CfCommand::Pong));
        }
        let error = CfError::new(code::METHOD_NOT_FOUND, "method not found");
        return Err(CfRejected { id, error, fatal: false });
    };
    if given.next().is_some() {
        return Err(CfRejected { id, error: CfError::bad_request("one method per command"), fatal: false });
    }
    if id == 0 && method != "send" {
        return Err(fatal(format!("`{method}` needs an `id`")));
    }
    let reject = |error: CfError| CfRejected { id, error, fatal: false };
    command(method, req).map(|c| (id, c)).map_err(reject)
}

fn command(method: &str, req: &RawValue) -> Result<CfCommand, CfError> {
    Ok(match method {
        "connect" => {
            let r: ConnectReq = body(req, method)?;
            CfCommand::Connect { token: r.token.filter(|t| !t.is_empty()), name: r.name, version: r.version }
        }
        "subscribe" => {
            let r: SubscribeReq<'_> = body(req, method)?;
            let consumer = match r.data {
                Some(d) => serde_json::from_str::<SubscribeData>(d.get()).unwrap_or_default().consumer,
                None => None,
            };
            if let Some(c) = &consumer {
                if !crate::channel::is_valid_name(c) {
                    return Err(CfError::bad_request("invalid consumer name: 1-255 characters of [A-Za-z0-9_:.@-]"));
                }
            }
            let unsupported = if r.tf.is_some_and(|f| f.get() != "null") {
                Some("a publication filter (`tf`)")
            } else if r.kind != 0 {
                Some("a map or shared-poll subscription (`type`)")
            } else if !r.delta.is_empty() {
                Some("delta compression")
            } else {
                None
            };
            CfCommand::Subscribe {
                channel: channel(r.channel)?,
                recover: r.recover,
                offset: r.offset,
                epoch: r.epoch,
                flag: r.flag,
                consumer,
                unsupported,
            }
        }
        "unsubscribe" => CfCommand::Unsubscribe { channel: channel(body::<ChannelReq>(req, method)?.channel)? },
        "publish" => {
            let r: PublishReq<'_> = body(req, method)?;
            let data = r.data.ok_or_else(|| CfError::bad_request("`publish` needs `data`"))?;
            CfCommand::Publish { channel: channel(r.channel)?, data: data.to_owned() }
        }
        "history" => {
            let r: HistoryReq = body(req, method)?;
            CfCommand::History { channel: channel(r.channel)?, limit: r.limit, since: r.since, reverse: r.reverse }
        }
        "presence" => CfCommand::Presence { channel: channel(body::<ChannelReq>(req, method)?.channel)? },
        "presence_stats" => CfCommand::PresenceStats { channel: channel(body::<ChannelReq>(req, method)?.channel)? },
        "refresh" => {
            let r: RefreshReq = body(req, method)?;
            if r.token.is_empty() {
                return Err(CfError::bad_request("`refresh` needs `token`"));
            }
            CfCommand::Refresh { token: r.token }
        }
        "sub_refresh" => CfCommand::SubRefresh { channel: body::<ChannelReq>(req, method)?.channel },
        "rpc" => {
            let r: RpcReq<'_> = body(req, method)?;
            CfCommand::Rpc { method: r.method, data: r.data.map(|d| d.to_owned()) }
        }
        "send" => CfCommand::Send,
        _ => CfCommand::Ping,
    })
}

// === encoding ===

/// Who published a message or joined a channel.
#[derive(Debug, Clone, Serialize)]
pub struct ClientInfo<'a> {
    /// User id ("" for anonymous).
    pub user: &'a str,
    /// Client id ("" when unknown: a publication records its publisher's user only).
    pub client: &'a str,
    /// The connection's info (the token's `info` claim).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_info: Option<&'a RawValue>,
    /// Channel-specific info.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chan_info: Option<&'a RawValue>,
}

/// A compaction key, as the publication's tags.
#[derive(Debug, Clone, Serialize)]
pub struct Tags<'a> {
    /// The message's key.
    pub key: &'a str,
}

/// One message as a publication (in a push, a subscribe reply or a history reply).
#[derive(Debug, Clone, Serialize)]
pub struct Publication<'a> {
    /// Payload.
    pub data: &'a RawValue,
    /// Offset (omitted when 0, like Centrifugo).
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// The publisher, when it was an authenticated client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<ClientInfo<'a>>,
    /// `{"key": k}` for a keyed message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags<'a>>,
    /// Milliseconds since the Unix epoch at which the owner accepted it.
    #[serde(skip_serializing_if = "is_zero")]
    pub time: u64,
}

impl<'a> Publication<'a> {
    /// The publication of a stored message: `from` becomes `info.user`, `key` the tag.
    pub fn new(data: &'a RawValue, offset: u64, ts: u64, from: Option<&'a str>, key: Option<&'a str>) -> Self {
        Self {
            data,
            offset,
            info: from.map(|user| ClientInfo { user, client: "", conn_info: None, chan_info: None }),
            tags: key.map(|key| Tags { key }),
            time: ts,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `{"id": id, "<method>": result}`.
pub fn reply<T: Serialize>(id: u32, method: &str, result: &T) -> Text {
    let body = serde_json::to_string(result).expect("protocol values always serialize");
    let mut out = String::with_capacity(body.len() + method.len() + 16);
    out.push_str("{\"id\":");
    out.push_str(&id.to_string());
    out.push_str(",\"");
    out.push_str(method);
    out.push_str("\":");
    out.push_str(&body);
    out.push('}');
    one_line(out)
}

/// `{"id": id, "error": {code, message, temporary}}`.
pub fn error_reply(id: u32, error: &CfError) -> Text {
    #[derive(Serialize)]
    struct Reply<'a> {
        #[serde(skip_serializing_if = "is_zero_u32")]
        id: u32,
        error: &'a CfError,
    }
    one_line(serde_json::to_string(&Reply { id, error }).expect("protocol values always serialize"))
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// `{"push": {"channel": channel, "<kind>": body}}`.
pub fn push<T: Serialize>(channel: &str, kind: &str, body: &T) -> Text {
    #[derive(Serialize)]
    struct Push<'a, T> {
        push: Inner<'a, T>,
    }
    struct Inner<'a, T> {
        channel: &'a str,
        kind: &'a str,
        body: &'a T,
    }
    impl<T: Serialize> Serialize for Inner<'_, T> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut m = s.serialize_map(Some(2))?;
            if !self.channel.is_empty() {
                m.serialize_entry("channel", self.channel)?;
            }
            m.serialize_entry(self.kind, self.body)?;
            m.end()
        }
    }
    one_line(
        serde_json::to_string(&Push { push: Inner { channel, kind, body } }).expect("protocol values always serialize"),
    )
}

/// The `pub` push of one message.
pub fn pub_push(channel: &str, publication: &Publication<'_>) -> Text {
    push(channel, "pub", publication)
}

/// The `unsubscribe` push: the server ended a subscription ([`unsubscribe`] codes).
pub fn unsubscribe_push(channel: &str, code: u32, reason: &str) -> Text {
    push(channel, "unsubscribe", &serde_json::json!({"code": code, "reason": reason}))
}

/// A `join` or `leave` push (`kind`) carrying `info`.
pub fn presence_push(channel: &str, kind: &str, info: &ClientInfo<'_>) -> Text {
    push(channel, kind, &serde_json::json!({ "info": info }))
}

/// The `pub` push of a message from its native push frame (`{"push":"message",...}`), for a
/// fan-out that has the native frame: read once, framed once per message. None when the
/// frame is not a native message push.
pub fn pub_from_native(native: &str) -> Option<Text> {
    #[derive(Deserialize)]
    struct Native<'a> {
        #[serde(borrow)]
        channel: Cow<'a, str>,
        offset: u64,
        #[serde(default)]
        ts: u64,
        // Keys may hold characters JSON escapes: borrowed when they do not.
        #[serde(borrow, default)]
        key: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        from: Option<Cow<'a, str>>,
        #[serde(borrow)]
        data: &'a RawValue,
    }
    let m: Native<'_> = serde_json::from_str(native).ok()?;
    let publication = Publication::new(m.data, m.offset, m.ts, m.from.as_deref(), m.key.as_deref());
    Some(pub_push(&m.channel, &publication))
}

/// A frame is one line: a line break in a raw payload's whitespace would split a packed
/// frame (serde escapes them inside strings).
fn one_line(text: String) -> Text {
    if text.bytes().any(|b| b == b'\n' || b == b'\r') {
        return Text::from(text.replace(['\n', '\r'], " "));
    }
    Text::from(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> (u32, CfCommand) {
        parse_command(line).unwrap()
    }

    /// Commands compare by their debug form (raw payloads have no `PartialEq`).
    fn same(a: &(u32, CfCommand), b: &(u32, CfCommand)) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    #[test]
    fn parses_what_centrifuge_js_sends() {
        let frame = "{\"id\":1,\"connect\":{\"token\":\"t\",\"name\":\"js\",\"version\":\"5.8.0\"}}\n\
                     {\"id\":2,\"subscribe\":{\"channel\":\"room:1\",\"recover\":true,\"offset\":7,\"epoch\":\"E\",\"flag\":1}}";
        let cmds: Vec<_> = split_frame(frame).unwrap().map(parse).collect();
        assert!(same(
            &cmds[0],
            &(
                1,
                CfCommand::Connect { token: Some("t".into()), name: Some("js".into()), version: Some("5.8.0".into()) }
            )
        ));
        assert!(same(
            &cmds[1],
            &(
                2,
                CfCommand::Subscribe {
                    channel: "room:1".into(),
                    recover: true,
                    offset: 7,
                    epoch: "E".into(),
                    flag: 1,
                    consumer: None,
                    unsupported: None
                }
            )
        ));
        assert!(matches!(parse("{}"), (0, CfCommand::Pong)));
        let (_, c) = parse(r#"{"id":3,"publish":{"channel":"room:1","data":{"text": "hi"}}}"#);
        assert!(matches!(c, CfCommand::Publish { data, .. } if data.get() == r#"{"text": "hi"}"#));
        let (_, c) =
            parse(r#"{"id":4,"history":{"channel":"c","limit":0,"since":{"offset":3,"epoch":"E"},"reverse":true}}"#);
        assert!(same(
            &(4, c),
            &(
                4,
                CfCommand::History {
                    channel: "c".into(),
                    limit: 0,
                    since: Some(StreamPosition { offset: 3, epoch: "E".into() }),
                    reverse: true
                }
            )
        ));
        let (_, c) = parse(r#"{"id":5,"subscribe":{"channel":"c","data":{"consumer":"phone"}}}"#);
        assert!(matches!(c, CfCommand::Subscribe { consumer: Some(name), .. } if name == "phone"));
        let (_, c) = parse(r#"{"id":6,"rpc":{"method":"commit","data":{"channel":"c"}}}"#);
        assert!(matches!(c, CfCommand::Rpc { method, data: Some(_) } if method == "commit"));
        assert!(matches!(parse(r#"{"send":{"data":{}}}"#), (0, CfCommand::Send)));
        assert!(matches!(parse(r#"{"id":7,"ping":{}}"#), (7, CfCommand::Ping)));
    }

    #[test]
    fn bad_commands_get_centrifugo_codes() {
        let r = parse_command("not json").unwrap_err();
        assert!(r.fatal);
        let r = parse_command("[1]").unwrap_err();
        assert!(r.fatal);
        let r = parse_command(r#"{"id":"x","ping":{}}"#).unwrap_err();
        assert!(r.fatal);
        let r = parse_command(r#"{"subscribe":{"channel":"c"}}"#).unwrap_err();
        assert!(r.fatal, "a command other than send needs an id");
        let r = parse_command(r#"{"id":3,"fly":{}}"#).unwrap_err();
        assert_eq!((r.id, r.error.code, r.fatal), (3, code::METHOD_NOT_FOUND, false));
        for bad in [
            r#"{"id":4,"subscribe":{"channel":"a b"}}"#,
            r#"{"id":4,"subscribe":{"channel":""}}"#,
            r#"{"id":4,"subscribe":{"channel":5}}"#,
            r#"{"id":4,"publish":{"channel":"c"}}"#,
            r#"{"id":4,"history":{"channel":"c","limit":"x"}}"#,
            r#"{"id":4,"refresh":{}}"#,
            r#"{"id":4,"ping":{},"publish":{"channel":"c","data":1}}"#,
        ] {
            let r = parse_command(bad).unwrap_err();
            assert_eq!((r.id, r.error.code, r.fatal), (4, code::BAD_REQUEST, false), "{bad}");
        }
        let many = "{\"id\":1,\"ping\":{}}\n".repeat(MAX_COMMANDS_PER_FRAME + 1);
        assert!(split_frame(&many).is_err_and(|r| r.fatal));
        assert_eq!(split_frame(&"{}\n".repeat(MAX_COMMANDS_PER_FRAME)).unwrap().count(), MAX_COMMANDS_PER_FRAME);
    }

    #[test]
    fn encodes_replies_and_pushes() {
        assert_eq!(reply(1, "publish", &serde_json::json!({})).as_str(), r#"{"id":1,"publish":{}}"#);
        assert_eq!(
            error_reply(2, &CfError::new(code::BAD_REQUEST, "no")).as_str(),
            r#"{"id":2,"error":{"code":107,"message":"no"}}"#
        );
        let e = CfError::from(&OpError::new(ErrorCode::Unavailable, "moving"));
        assert_eq!(error_reply(3, &e).as_str(), r#"{"id":3,"error":{"code":100,"message":"moving","temporary":true}}"#);
        let native = r#"{"push":"message","channel":"c","offset":2,"epoch":"E","ts":3,"key":"k","from":"al","data":{"t":
1}}"#;
        assert_eq!(
            pub_from_native(native).unwrap().as_str(),
            r#"{"push":{"channel":"c","pub":{"data":{"t": 1},"offset":2,"info":{"user":"al","client":""},"tags":{"key":"k"},"time":3}}}"#
        );
        assert!(pub_from_native("{\"push\":\"disconnect\"}").is_none());
        let escaped =
            r#"{"push":"message","channel":"c","offset":3,"epoch":"E","ts":4,"key":"a\"b\\c\u00e9","data":1}"#;
        let frame = pub_from_native(escaped).expect("a key with escapes");
        let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
        assert_eq!(v["push"]["pub"]["tags"]["key"], "a\"b\\cé");
        let (_, c) = parse(r#"{"id":9,"subscribe":{"channel":"c","tf":{"op":"eq"}}}"#);
        assert!(matches!(c, CfCommand::Subscribe { unsupported: Some(_), .. }));
        let (_, c) = parse(r#"{"id":9,"subscribe":{"channel":"c","delta":"fossil"}}"#);
        assert!(matches!(c, CfCommand::Subscribe { unsupported: Some(_), .. }));
        assert_eq!(
            unsubscribe_push("c", unsubscribe::INSUFFICIENT_STATE, "moved").as_str(),
            r#"{"push":{"channel":"c","unsubscribe":{"code":2500,"reason":"moved"}}}"#
        );
        let info = ClientInfo { user: "u", client: "9", conn_info: None, chan_info: None };
        assert_eq!(
            presence_push("c", "join", &info).as_str(),
            r#"{"push":{"channel":"c","join":{"info":{"client":"9","user":"u"}}}}"#
        );
    }

    proptest::proptest! {
        /// Fuzz-style: any text is a command or a typed rejection, never a panic.
        #[test]
        fn any_text_parses_or_is_rejected(text in ".{0,300}") {
            if let Ok(lines) = split_frame(&text) {
                for line in lines {
                    let _ = parse_command(line);
                }
            }
            let _ = pub_from_native(&text);
        }
    }
}

//! Client protocol v1: command parsing, reply and push encoding, error and close codes.
//!
//! It owns the wire format of `docs/protocol.md`: every field name, error code and close code the
//! router sends is spelled here and nowhere else. It must never do I/O or touch router state:
//! it turns text into [`Command`]s and values into frame bytes.

use crate::Text;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The protocol version reported by `connect`.
pub const VERSION: &str = "1";
/// Default `limit` of a `history` page.
pub const HISTORY_DEFAULT_LIMIT: u32 = 100;
/// Largest `history` page.
pub const HISTORY_MAX_LIMIT: u32 = 1000;

/// WebSocket close codes of protocol v1.
pub mod close {
    /// No valid token.
    pub const UNAUTHORIZED: u16 = 4001;
    /// The outbound queue overflowed: reconnect and recover.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Too many sessions for this user.
    pub const TOO_MANY_SESSIONS: u16 = 4009;
    /// Rate limited for too long.
    pub const RATE_LIMITED: u16 = 4029;
    /// The node is shutting down; reconnect, possibly elsewhere.
    pub const SHUTTING_DOWN: u16 = 4100;
    /// A frame over the size limit (RFC 6455 "message too big").
    pub const TOO_BIG: u16 = 1009;
}

/// The error codes of protocol v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed JSON, a missing or ill-typed field, or an invalid channel name.
    BadRequest,
    /// No such `op`.
    UnknownOp,
    /// No valid token.
    Unauthorized,
    /// Not allowed on this channel.
    Forbidden,
    /// Frame or `data` over the limit.
    TooLarge,
    /// Sending too fast.
    RateLimited,
    /// Too many subscriptions or sessions.
    LimitExceeded,
    /// The owner is unreachable or a handover is in progress.
    Unavailable,
    /// Anything else.
    Internal,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 9] = [
        Self::BadRequest,
        Self::UnknownOp,
        Self::Unauthorized,
        Self::Forbidden,
        Self::TooLarge,
        Self::RateLimited,
        Self::LimitExceeded,
        Self::Unavailable,
        Self::Internal,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnknownOp => "unknown_op",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::LimitExceeded => "limit_exceeded",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status the HTTP API answers this code with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest | Self::UnknownOp => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::TooLarge => 413,
            Self::RateLimited | Self::LimitExceeded => 429,
            Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }
}

/// An error answer to a command: a code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct OpError {
    /// The protocol code.
    pub code: ErrorCode,
    /// Human-readable text.
    pub message: String,
    /// Why, where another layer acts on the reason (never sent to a client).
    #[serde(skip)]
    pub refusal: Option<crate::refusal::Refusal>,
    /// A hint, in milliseconds, of how long to wait before retrying (an `unavailable`
    /// refusal under load); omitted when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl OpError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), refusal: None, retry_after_ms: None }
    }

    /// An `unavailable` error with the `refusal` its receiver acts on.
    pub fn refused(refusal: crate::refusal::Refusal, message: impl Into<String>) -> Self {
        Self { code: ErrorCode::Unavailable, message: message.into(), refusal: Some(refusal), retry_after_ms: None }
    }

    /// This error, carrying `refusal` as well.
    pub fn with_refusal(mut self, refusal: crate::refusal::Refusal) -> Self {
        self.refusal = Some(refusal);
        self
    }

    /// This error, with a hint to retry after `ms` milliseconds.
    pub fn retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    /// A `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// An `internal` error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

/// Where a subscription starts delivering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFrom {
    /// Live messages only (`from` omitted or `"latest"`).
    Latest,
    /// All retained messages, then live.
    Earliest,
    /// Retained messages with offset > N, then live.
    After(u64),
    /// Recovery from `{offset, epoch}`.
    Recover {
        /// Last offset the client saw.
        offset: u64,
        /// The epoch it saw it in.
        epoch: String,
    },
}

/// A parsed client command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `connect`.
    Connect {
        /// JWT; required when `auth.mode = "jwt"`, ignored otherwise.
        token: Option<String>,
        /// Client name for logs.
        name: Option<String>,
        /// `batch: true`: the server may pack several pushes into one text frame, one JSON
        /// object per line.
        batch: bool,
    },
    /// `refresh`: a new token for the same user, before the current one expires.
    Refresh {
        /// JWT naming the connection's user.
        token: String,
    },
    /// `subscribe`.
    Subscribe {
        /// Channel.
        channel: String,
        /// Start position.
        from: StartFrom,
        /// Durable consumer name; takes precedence over `from`.
        consumer: Option<String>,
    },
    /// `unsubscribe`.
    Unsubscribe {
        /// Channel.
        channel: String,
    },
    /// `publish`.
    Publish(Publish),
    /// `history`.
    History {
        /// Channel.
        channel: String,
        /// Exclusive lower offset.
        since: u64,
        /// Exclusive upper offset (only with `reverse`): pages backwards from there.
        before: Option<u64>,
        /// Page size, 0..=1000; 0 asks for the position (epoch and top) only.
        limit: u32,
        /// Newest first.
        reverse: bool,
    },
    /// `commit`.
    Commit {
        /// Channel.
        channel: String,
        /// Durable consumer name.
        consumer: String,
        /// Offset to store.
        offset: u64,
    },
    /// `ping`.
    Ping,
    /// `presence`: who is subscribed to the channel.
    Presence {
        /// Channel.
        channel: String,
    },
    /// `presence_stats`: how many clients and users are subscribed to the channel.
    PresenceStats {
        /// Channel.
        channel: String,
    },
}

/// A publish request, from the WebSocket or the HTTP API.
#[derive(Debug, Clone)]
pub struct Publish {
    /// Channel.
    pub channel: String,
    /// The payload as raw JSON text, exactly as the client sent it.
    pub data: Box<RawValue>,
    /// Compaction key.
    pub key: Option<String>,
    /// Deduplication key.
    pub idempotency_key: Option<String>,
}

impl PartialEq for Publish {
    fn eq(&self, other: &Self) -> bool {
        self.channel == other.channel
            && self.data.get() == other.data.get()
            && self.key == other.key
            && self.idempotency_key == other.idempotency_key
    }
}

/// A frame that could not be turned into a command: the reply id (if one was usable) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// The command's id, when the frame had a usable one.
    pub id: Option<u64>,
    /// The error to answer with.
    pub error: OpError,
}

/// Every field any command may carry, kept raw so that one ill-typed field does not lose the id.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    op: Option<&'a RawValue>,
    #[serde(borrow, default)]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default)]
    from: Option<&'a RawValue>,
    #[serde(borrow, default)]
    consumer: Option<&'a RawValue>,
    /// Kept even when it is JSON `null` (a tombstone), unlike the other fields.
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    key: Option<&'a RawValue>,
    #[serde(borrow, default)]
    idempotency_key: Option<&'a RawValue>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(borrow, default)]
    limit: Option<&'a RawValue>,
    #[serde(borrow, default)]
    before: Option<&'a RawValue>,
    #[serde(borrow, default)]
    reverse: Option<&'a RawValue>,
    #[serde(borrow, default)]
    offset: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<&'a RawValue>,
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    batch: Option<&'a RawValue>,
}

/// A field that is present is `Some`, even when its value is `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

fn field<T: serde::de::DeserializeOwned>(raw: Option<&RawValue>, name: &str, what: &str) -> Result<Option<T>, OpError> {
    match raw {
        None => Ok(None),
        Some(r) if r.get() == "null" => Ok(None),
        Some(r) => serde_json::from_str(r.get())
            .map(Some)
            .map_err(|_| OpError::bad_request(format!("field `{name}` must be {what}"))),
    }
}

fn required<T: serde::de::DeserializeOwned>(raw: Option<&RawValue>, name: &str, what: &str) -> Result<T, OpError> {
    field(raw, name, what)?.ok_or_else(|| OpError::bad_request(format!("field `{name}` is required")))
}

fn channel_field(raw: Option<&RawValue>) -> Result<String, OpError> {
    let channel: String = required(raw, "channel", "a string")?;
    if !crate::channel::is_valid_name(&channel) {
        return Err(OpError::bad_request("invalid channel name: 1-255 characters of [A-Za-z0-9_:.@-]"));
    }
    Ok(channel)
}

fn consumer_field(raw: Option<&RawValue>) -> Result<Option<String>, OpError> {
    let consumer: Option<String> = field(raw, "consumer", "a string")?;
    if let Some(c) = &consumer {
        if !crate::channel::is_valid_name(c) {
            return Err(OpError::bad_request("invalid consumer name: 1-255 characters of [A-Za-z0-9_:.@-]"));
        }
    }
    Ok(consumer)
}

fn from_field(raw: Option<&RawValue>) -> Result<StartFrom, OpError> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum From {
        Word(String),
        Offset(u64),
        Recover { offset: u64, epoch: String },
    }
    let err = || OpError::bad_request("field `from` must be \"latest\", \"earliest\", an offset or {offset, epoch}");
    Ok(match field::<From>(raw, "from", "a start position").map_err(|_| err())? {
        None => StartFrom::Latest,
        Some(From::Word(w)) if w == "latest" => StartFrom::Latest,
        Some(From::Word(w)) if w == "earliest" => StartFrom::Earliest,
        Some(From::Word(_)) => return Err(err()),
        Some(From::Offset(n)) => StartFrom::After(n),
        Some(From::Recover { offset, epoch }) => StartFrom::Recover { offset, epoch },
    })
}

/// Parses the `data`, `key` and `idempotency_key` of a publish.
fn publish_fields(f: &RawFrame<'_>, channel: String) -> Result<Publish, OpError> {
    let data = f.data.ok_or_else(|| OpError::bad_request("field `data` is required"))?;
    Ok(Publish {
        channel,
        data: data.to_owned(),
        key: field(f.key, "key", "a string")?,
        idempotency_key: field(f.idempotency_key, "idempotency_key", "a string")?,
    })
}

/// Parses a JSON object (serde alone would also take an array for a struct).
fn parse_object(text: &str) -> Result<RawFrame<'_>, OpError> {
    let not_object = || OpError::bad_request("a frame must be a JSON object");
    let f: RawFrame<'_> = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            not_object()
        } else {
            OpError::bad_request(format!("malformed JSON: {e}"))
        }
    })?;
    if !text.trim_start().starts_with('{') {
        return Err(not_object());
    }
    Ok(f)
}

/// Parses one text frame into its id and command.
pub fn parse_command(text: &str) -> Result<(u64, Command), Rejected> {
    let f = parse_object(text).map_err(|error| Rejected { id: None, error })?;
    let id: u64 = match field(f.id, "id", "an unsigned integer") {
        Ok(Some(id)) => id,
        Ok(None) => return Err(Rejected { id: None, error: OpError::bad_request("field `id` is required") }),
        Err(error) => return Err(Rejected { id: None, error }),
    };
    command(&f).map(|c| (id, c)).map_err(|error| Rejected { id: Some(id), error })
}

fn command(f: &RawFrame<'_>) -> Result<Command, OpError> {
    let op: String = required(f.op, "op", "a string")?;
    Ok(match op.as_str() {
        "connect" => Command::Connect {
            token: field(f.token, "token", "a string")?,
            name: field(f.name, "name", "a string")?,
            batch: field(f.batch, "batch", "a boolean")?.unwrap_or(false),
        },
        "subscribe" => Command::Subscribe {
            channel: channel_field(f.channel)?,
            from: from_field(f.from)?,
            consumer: consumer_field(f.consumer)?,
        },
        "unsubscribe" => Command::Unsubscribe { channel: channel_field(f.channel)? },
        "publish" => Command::Publish(publish_fields(f, channel_field(f.channel)?)?),
        "history" => {
            let channel = channel_field(f.channel)?;
            let since = field(f.since, "since", "an unsigned integer")?.unwrap_or(0);
            let limit: u32 = field(f.limit, "limit", "an unsigned integer")?.unwrap_or(HISTORY_DEFAULT_LIMIT);
            let reverse = field(f.reverse, "reverse", "a boolean")?.unwrap_or(false);
            let before = field(f.before, "before", "an unsigned integer")?;
            if before.is_some() && !reverse {
                return Err(OpError::bad_request("field `before` pages backwards and needs `reverse: true`"));
            }
            Command::History { channel, since, before, limit: limit.min(HISTORY_MAX_LIMIT), reverse }
        }
        "commit" => Command::Commit {
            channel: channel_field(f.channel)?,
            consumer: consumer_field(f.consumer)?
                .ok_or_else(|| OpError::bad_request("field `consumer` is required"))?,
            offset: required(f.offset, "offset", "an unsigned integer")?,
        },
        "ping" => Command::Ping,
        "presence" => Command::Presence { channel: channel_field(f.channel)? },
        "presence_stats" => Command::PresenceStats { channel: channel_field(f.channel)? },
        "refresh" => Command::Refresh { token: required(f.token, "token", "a string")? },
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(OpError::new(ErrorCode::UnknownOp, format!("unknown op `{shown}`")));
        }
    })
}

/// The body of `POST /api/v1/publish`.
pub fn parse_http_publish(body: &str) -> Result<Publish, OpError> {
    let f = parse_object(body)?;
    publish_fields(&f, channel_field(f.channel)?)
}

// === encoding ===

/// One message as it is pushed and listed (`docs/protocol.md`, "Pushes").
#[derive(Serialize)]
pub struct MessageView<'a> {
    /// `"message"` for a push; absent in a `history` list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push: Option<&'static str>,
    /// Channel.
    pub channel: &'a str,
    /// Offset.
    pub offset: u64,
    /// Channel epoch.
    pub epoch: &'a str,
    /// Milliseconds since the Unix epoch at which the owner accepted it.
    pub ts: u64,
    /// Compaction key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<&'a str>,
    /// Publisher's user id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<&'a str>,
    /// Payload.
    pub data: &'a RawValue,
}

/// Serializes `value` into the bytes of one text frame.
pub fn to_frame<T: Serialize>(value: &T) -> Text {
    let mut text = serde_json::to_string(value).expect("protocol values always serialize");
    // A raw payload keeps the publisher's whitespace, and a line break in it would split a
    // packed (JSON-lines) frame. serde escapes them inside strings, so here they can only
    // be whitespace between tokens, which a space replaces without changing the value.
    if text.bytes().any(|b| b == b'\n' || b == b'\r') {
        text = text.replace(['\n', '\r'], " ");
    }
    Text::from(text)
}

/// `{"id": id, "ok": ok}`.
pub fn ok_reply<T: Serialize>(id: u64, ok: &T) -> Text {
    #[derive(Serialize)]
    struct Reply<'a, T> {
        id: u64,
        ok: &'a T,
    }
    to_frame(&Reply { id, ok })
}

/// `{"id": id|null, "error": {code, message}}`.
pub fn error_reply(id: Option<u64>, error: &OpError) -> Text {
    #[derive(Serialize)]
    struct Reply<'a> {
        id: Option<u64>,
        error: &'a OpError,
    }
    to_frame(&Reply { id, error })
}

/// A reply carrying either outcome.
pub fn reply<T: Serialize>(id: u64, result: &Result<T, OpError>) -> Text {
    match result {
        Ok(ok) => ok_reply(id, ok),
        Err(e) => error_reply(Some(id), e),
    }
}

/// `{"push": "disconnect", "code", "reason"}`.
pub fn disconnect_push(code: u16, reason: &str) -> Text {
    to_frame(&serde_json::json!({"push": "disconnect", "code": code, "reason": reason}))
}

/// `{"push": "unsubscribed", "channel", "code", "reason"}`: the server ended a subscription.
pub fn unsubscribed_push(channel: &str, code: u16, reason: &str) -> Text {
    to_frame(&serde_json::json!({"push": "unsubscribed", "channel": channel, "code": code, "reason": reason}))
}

/// The `ok` of a `subscribe`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SubscribeOk {
    /// Channel.
    pub channel: String,
    /// Current epoch.
    pub epoch: String,
    /// Current top offset.
    pub offset: u64,
    /// Present for recovery requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

/// The `ok` of a `publish`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PublishOk {
    /// Offset assigned (or the original one for a repeated idempotency key).
    pub offset: u64,
    /// Channel epoch (shared with the channel state: no allocation per publish).
    pub epoch: std::sync::Arc<str>,
}

/// An empty `ok`.
#[derive(Debug, Clone, Serialize)]
pub struct Empty {}

#[cfg(test)]
mod tests {

    #[test]
    fn a_frame_is_one_line_whatever_the_payload_whitespace() {
        let data = RawValue::from_string("{\"a\":\r\n 1,\n\"b\": \"x\\ny\"}".to_string()).unwrap();
        #[derive(Serialize)]
        struct Push<'a> {
            push: &'a str,
            data: &'a RawValue,
        }
        let frame = to_frame(&Push { push: "message", data: &data });
        assert!(!frame.as_str().contains(['\n', '\r']), "{}", frame.as_str());
        let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
        assert_eq!(v["data"], serde_json::json!({"a": 1, "b": "x\ny"}));
    }

    use super::*;

    fn rejected(text: &str) -> Rejected {
        parse_command(text).unwrap_err()
    }

    #[test]
    fn parses_every_command() {
        let (id, c) =
            parse_command(r#"{"id":1,"op":"subscribe","channel":"a:b","from":{"offset":3,"epoch":"E"},"extra":true}"#)
                .unwrap();
        assert_eq!(id, 1);
        assert_eq!(
            c,
            Command::Subscribe {
                channel: "a:b".into(),
                from: StartFrom::Recover { offset: 3, epoch: "E".into() },
                consumer: None
            }
        );
        for (from, want) in [
            ("", StartFrom::Latest),
            (r#","from":"latest""#, StartFrom::Latest),
            (r#","from":"earliest""#, StartFrom::Earliest),
            (r#","from":7"#, StartFrom::After(7)),
        ] {
            let (_, c) = parse_command(&format!(r#"{{"id":2,"op":"subscribe","channel":"x"{from}}}"#)).unwrap();
            assert!(matches!(c, Command::Subscribe { from, .. } if from == want));
        }
        let (_, c) = parse_command(
            r#"{"id":3,"op":"publish","channel":"x","data":{"a": [1, 2]},"key":"k","idempotency_key":"i"}"#,
        )
        .unwrap();
        let Command::Publish(p) = c else { panic!() };
        assert_eq!(p.data.get(), r#"{"a": [1, 2]}"#);
        assert_eq!(p.key.as_deref(), Some("k"));
        assert_eq!(p.idempotency_key.as_deref(), Some("i"));
        let (_, c) = parse_command(r#"{"id":3,"op":"publish","channel":"x","data":null,"key":"k"}"#).unwrap();
        assert!(matches!(c, Command::Publish(p) if p.data.get() == "null"));
        let (_, c) = parse_command(r#"{"id":4,"op":"history","channel":"x","since":5,"limit":5000}"#).unwrap();
        assert_eq!(c, Command::History { channel: "x".into(), since: 5, before: None, limit: 1000, reverse: false });
        let (_, c) = parse_command(r#"{"id":4,"op":"history","channel":"x"}"#).unwrap();
        assert_eq!(c, Command::History { channel: "x".into(), since: 0, before: None, limit: 100, reverse: false });
        let (_, c) = parse_command(r#"{"id":4,"op":"history","channel":"x","limit":0}"#).unwrap();
        assert!(matches!(c, Command::History { limit: 0, reverse: false, .. }), "limit 0 asks for the position");
        let (_, c) =
            parse_command(r#"{"id":4,"op":"history","channel":"x","reverse":true,"before":7,"limit":3}"#).unwrap();
        assert_eq!(c, Command::History { channel: "x".into(), since: 0, before: Some(7), limit: 3, reverse: true });
        let (_, c) = parse_command(r#"{"id":4,"op":"history","channel":"x","reverse":true,"before":null}"#).unwrap();
        assert!(matches!(c, Command::History { before: None, reverse: true, .. }));
        let (_, c) = parse_command(r#"{"id":4,"op":"history","channel":"x","reverse":false}"#).unwrap();
        assert!(matches!(c, Command::History { before: None, reverse: false, .. }));
        let (_, c) = parse_command(r#"{"id":5,"op":"commit","channel":"x","consumer":"c","offset":9}"#).unwrap();
        assert_eq!(c, Command::Commit { channel: "x".into(), consumer: "c".into(), offset: 9 });
        assert_eq!(parse_command(r#"{"id":6,"op":"ping"}"#).unwrap().1, Command::Ping);
        assert_eq!(
            parse_command(r#"{"id":8,"op":"refresh","token":"t"}"#).unwrap().1,
            Command::Refresh { token: "t".into() }
        );
        assert!(parse_command(r#"{"id":9,"op":"refresh"}"#).is_err(), "a refresh needs its token");
        assert_eq!(
            parse_command(r#"{"id":10,"op":"presence","channel":"x"}"#).unwrap().1,
            Command::Presence { channel: "x".into() }
        );
        assert_eq!(
            parse_command(r#"{"id":11,"op":"presence_stats","channel":"x"}"#).unwrap().1,
            Command::PresenceStats { channel: "x".into() }
        );
        assert!(parse_command(r#"{"id":12,"op":"presence"}"#).is_err(), "presence needs its channel");
        assert!(matches!(parse_command(r#"{"id":7,"op":"connect","name":"n"}"#).unwrap().1, Command::Connect { .. }));
    }

    #[test]
    fn bad_input_gets_the_right_code_and_id() {
        let r = rejected("not json");
        assert_eq!((r.id, r.error.code), (None, ErrorCode::BadRequest));
        let r = rejected("[1,2]");
        assert_eq!((r.id, r.error.code), (None, ErrorCode::BadRequest));
        let r = rejected(r#"{"op":"ping"}"#);
        assert_eq!(r.id, None);
        let r = rejected(r#"{"id":"x","op":"ping"}"#);
        assert_eq!(r.id, None);
        let r = rejected(r#"{"id":9}"#);
        assert_eq!((r.id, r.error.code), (Some(9), ErrorCode::BadRequest));
        let r = rejected(r#"{"id":9,"op":"fly"}"#);
        assert_eq!((r.id, r.error.code), (Some(9), ErrorCode::UnknownOp));
        for bad in [
            r#"{"id":9,"op":"subscribe","channel":5}"#,
            r#"{"id":9,"op":"subscribe","channel":"a b"}"#,
            r#"{"id":9,"op":"subscribe","channel":""}"#,
            r#"{"id":9,"op":"subscribe","channel":"x","from":true}"#,
            r#"{"id":9,"op":"subscribe","channel":"x","from":"middle"}"#,
            r#"{"id":9,"op":"history","channel":"x","limit":"x"}"#,
            r#"{"id":9,"op":"history","channel":"x","limit":-1}"#,
            r#"{"id":9,"op":"history","channel":"x","before":5}"#,
            r#"{"id":9,"op":"history","channel":"x","before":5,"reverse":false}"#,
            r#"{"id":9,"op":"history","channel":"x","reverse":"yes"}"#,
            r#"{"id":9,"op":"history","channel":"x","reverse":true,"before":-1}"#,
            r#"{"id":9,"op":"publish","channel":"x"}"#,
            r#"{"id":9,"op":"publish","channel":"x","data":1,"key":3}"#,
            r#"{"id":9,"op":"commit","channel":"x","offset":1}"#,
            r#"{"id":9,"op":"commit","channel":"x","consumer":"c","offset":-1}"#,
        ] {
            let r = rejected(bad);
            assert_eq!((r.id, r.error.code), (Some(9), ErrorCode::BadRequest), "{bad}");
        }
    }

    #[test]
    fn encodes_replies_and_pushes() {
        assert_eq!(&ok_reply(1, &Empty {})[..], br#"{"id":1,"ok":{}}"#);
        let e = OpError::bad_request("no");
        assert_eq!(&error_reply(None, &e)[..], br#"{"id":null,"error":{"code":"bad_request","message":"no"}}"#);
        let data = RawValue::from_string("{\"t\":1}".into()).unwrap();
        let m = MessageView {
            push: Some("message"),
            channel: "c",
            offset: 2,
            epoch: "E",
            ts: 3,
            key: None,
            from: Some("al"),
            data: &data,
        };
        assert_eq!(
            &to_frame(&m)[..],
            br#"{"push":"message","channel":"c","offset":2,"epoch":"E","ts":3,"from":"al","data":{"t":1}}"#
        );
    }

    proptest::proptest! {
        /// Fuzz-style: any text is either a command or a typed rejection, never a panic.
        #[test]
        fn any_text_parses_or_is_rejected(text in ".{0,300}") {
            let _ = parse_command(&text);
            let _ = parse_http_publish(&text);
        }

        /// JSON-shaped input with random fields and values: same promise.
        #[test]
        fn json_shaped_frames_parse_or_are_rejected(
            id in proptest::option::of(0u64..1000),
            op in "(publish|subscribe|history|commit|connect|ping|unsubscribe|[a-z]{0,8})",
            channel in "[A-Za-z0-9_:.@ -]{0,20}",
            extra in proptest::collection::vec(("[a-z_]{1,12}", "(null|true|1|-1|\"x\"|\\{\\}|\\[\\])"), 0..4),
        ) {
            let mut text = format!("{{\"op\":\"{op}\",\"channel\":\"{channel}\"");
            if let Some(id) = id {
                text.push_str(&format!(",\"id\":{id}"));
            }
            for (k, v) in extra {
                text.push_str(&format!(",\"{k}\":{v}"));
            }
            text.push('}');
            match parse_command(&text) {
                Ok((got, _)) => proptest::prop_assert!(id.is_none_or(|id| id == got)),
                Err(r) => proptest::prop_assert!(!r.error.message.is_empty()),
            }
        }
    }
}

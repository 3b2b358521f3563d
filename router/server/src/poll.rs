//! Long-poll for clients without WebSocket: `GET /api/v1/poll?channel=&since=&timeout=`.
//!
//! It owns one request's wait: answer at once when the channel already has messages above
//! `since`, else register a temporary subscription with the channel's owner and answer as
//! soon as a message above `since` is pushed, or with an empty list when `timeout` passes
//! (or the node shuts down). The token (`Authorization: Bearer` or `token=`) and the
//! channel's subscribe rule apply as on the WebSocket. It must never poll the store in a
//! loop or block an owner: the owner pushes into a bounded outbox, as for any session.

use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderMap, AUTHORIZATION};

use crate::node::Node;
use switchyard_access::rules::{self, Action};
use switchyard_core::owner::Start;
use switchyard_core::{HistoryPage, HistoryQuery};
use switchyard_proto::protocol::{ErrorCode, OpError, StartFrom, HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT};

/// Default wait when `timeout` is absent.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait a client may ask for.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(120);

/// The parsed query of one poll.
#[derive(Debug, PartialEq)]
struct Query {
    channel: String,
    since: u64,
    timeout: Duration,
    limit: u32,
    token: Option<String>,
}

/// Decodes `%XX` escapes and `+` (as a space) of one query value.
pub(crate) fn percent_decode(v: &str) -> Result<String, OpError> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
                out.push(byte.ok_or_else(|| OpError::bad_request("bad %-escape in the query"))?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| OpError::bad_request("query is not UTF-8"))
}

fn parse_query(query: &str) -> Result<Query, OpError> {
    let mut q =
        Query { channel: String::new(), since: 0, timeout: DEFAULT_TIMEOUT, limit: HISTORY_DEFAULT_LIMIT, token: None };
    let number = |name: &str, v: &str| {
        v.parse::<u64>().map_err(|_| OpError::bad_request(format!("`{name}` must be an unsigned integer")))
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        match k {
            "channel" => q.channel = v,
            "since" => q.since = number("since", &v)?,
            "limit" => q.limit = number("limit", &v)?.clamp(1, u64::from(HISTORY_MAX_LIMIT)) as u32,
            "token" => q.token = Some(v),
            "timeout" => {
                q.timeout = match v.parse::<u64>() {
                    Ok(secs) => Duration::from_secs(secs),
                    Err(_) => humantime::parse_duration(&v).map_err(|_| {
                        OpError::bad_request("`timeout` must be seconds (`25`) or a duration (`1500ms`)")
                    })?,
                };
                if q.timeout > MAX_TIMEOUT {
                    return Err(OpError::bad_request(format!("`timeout` must be at most {}s", MAX_TIMEOUT.as_secs())));
                }
            }
            _ => {} // unknown parameters are ignored, like unknown frame fields
        }
    }
    if q.channel.is_empty() {
        return Err(OpError::bad_request("`channel` is required"));
    }
    if !switchyard_proto::channel::is_valid_name(&q.channel) {
        return Err(OpError::bad_request("invalid channel name: 1-255 characters of [A-Za-z0-9_:.@-]"));
    }
    Ok(q)
}

/// Serves one long-poll: messages with offset > `since` (oldest first, at most `limit`),
/// as soon as there is one, or an empty page at the timeout. A `since` above the channel's
/// top (e.g. from an older epoch) answers at once, so the client can start over from the
/// reply's `epoch` and `offset`.
pub(crate) async fn poll(node: Arc<Node>, headers: &HeaderMap, query: &str) -> Result<HistoryPage, OpError> {
    let q = parse_query(query)?;
    let bearer = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let who = node.access.http_identity(bearer, q.token.as_deref())?;
    if let (true, Some(who)) = (node.access.enforced(), &who) {
        rules::check(node.access.rules.rule_of(&q.channel), Action::Subscribe, &q.channel, who)?;
    }
    let page = node.router.history(&q.channel, HistoryQuery::forward(q.since, q.limit)).await?;
    if !page.messages.is_empty() || page.offset != q.since || q.timeout.is_zero() {
        return Ok(page);
    }
    // Nothing yet: subscribe, so the owner tells us about the next message.
    let limits = &node.config.limits;
    let (outbox, mut inbox) =
        switchyard_core::outbox::outbox(limits.outbound_queue_messages, limits.outbound_queue_bytes);
    let sub = node.router.next_id();
    let gone = || OpError::new(ErrorCode::Unavailable, "partition owner stopped");
    let start = Start::From(StartFrom::After(q.since));
    let granted = node.router.subscribe(&q.channel, sub, outbox.clone(), start).await?;
    // The subscribe is sent: from here on the guard removes it from its owner however this
    // future ends, even if it is dropped while waiting for the grant.
    let _registered = Registered::new(&node, &q.channel, sub);
    let grant = granted.await.map_err(|_| gone())?;
    match grant {
        Ok(grant) => {
            // A message published between the read and the subscribe is already there.
            if grant.top <= q.since {
                let mut shutdown = node.shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(q.timeout) => {}
                    _ = shutdown.wait_for(|s| *s) => {}
                    _ = async { while inbox.recv().await.offset <= q.since {} } => {}
                }
            }
            node.router.history(&q.channel, HistoryQuery::forward(q.since, q.limit)).await
        }
        Err(e) => Err(e),
    }
}

/// A poll's subscription while it waits: counted in the subscriptions gauge like a
/// session's, and removed from its owner however the request ends (answered, or dropped
/// because the node shuts down).
struct Registered {
    node: Arc<Node>,
    channel: String,
    sub: u64,
}

impl Registered {
    fn new(node: &Arc<Node>, channel: &str, sub: u64) -> Self {
        node.metrics.subscriptions.inc();
        Self { node: node.clone(), channel: channel.to_string(), sub }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.node.metrics.subscriptions.dec();
        let (node, channel, sub) = (self.node.clone(), std::mem::take(&mut self.channel), self.sub);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { node.router.unsubscribe(&channel, sub).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let q = parse_query("channel=user%3Abob&since=4&timeout=1500ms&token=a.b.c&x=1").unwrap();
        assert_eq!(
            q,
            Query {
                channel: "user:bob".into(),
                since: 4,
                timeout: Duration::from_millis(1500),
                limit: 100,
                token: Some("a.b.c".into())
            }
        );
        assert_eq!(parse_query("channel=a&timeout=2").unwrap().timeout, Duration::from_secs(2));
        for bad in [
            "",
            "since=1",
            "channel=a%20b",
            "channel=a&since=x",
            "channel=a&timeout=soon",
            "channel=a&timeout=999",
            "channel=%zz",
        ] {
            assert_eq!(parse_query(bad).unwrap_err().code, ErrorCode::BadRequest, "{bad}");
        }
    }
}

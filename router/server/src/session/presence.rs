//! Presence of a session's subscriptions: joining a channel's presence once a subscription
//! is granted (when its namespace has `presence` on), leaving it when the subscription or
//! the session ends, and answering `presence` and `presence_stats`.
//!
//! It owns the session's presence worker: one task per session that has joined anything,
//! which runs the session's joins and leaves one after another, in the order the session
//! made them (a leave never overtakes its join at the owner), so the session itself never
//! waits on an owner. It must never hold presence state beyond which channels the session
//! joined: the owner holds the entries, and the router's registry what this node announced.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::FutureExt;
use serde_json::value::RawValue;
use switchyard_peer::Router;
use switchyard_proto::centrifugo as cf;
use switchyard_proto::presence::{self, PresenceEntry, PresenceOk};
use switchyard_proto::protocol::{self, OpError};
use switchyard_proto::Dialect;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::dialect::{self, To};
use super::{ready, Output, Session};

/// A join or a leave, in the order the session made it.
enum Change {
    Join(String, PresenceEntry),
    Leave(String, String),
}

/// The channels a session joined, and its worker (started on the first join).
#[derive(Default)]
pub(super) struct Presence {
    joined: HashSet<String>,
    worker: Option<mpsc::UnboundedSender<Change>>,
}

impl Presence {
    fn send(&mut self, router: &Arc<Router>, change: Change) {
        let tx = self.worker.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(router.clone(), rx));
            tx
        });
        let _ = tx.send(change);
    }
}

/// Runs a session's joins and leaves in order, until the session is gone and every one is done.
async fn run(router: Arc<Router>, mut rx: mpsc::UnboundedReceiver<Change>) {
    while let Some(change) = rx.recv().await {
        match change {
            Change::Join(channel, entry) => {
                if let Err(e) = router.join(&channel, entry).await {
                    tracing::debug!(channel, error = %e, "joining presence failed");
                }
            }
            Change::Leave(channel, client) => router.leave(&channel, &client).await,
        }
    }
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // === presence ===

    /// Joins `channel`'s presence (once), if its namespace has presence on: as the session's
    /// client id, with the token's user ("" without one) and `info` claim.
    pub(super) fn join_presence(&mut self, channel: &str) {
        if !self.node.config.namespace(channel).presence || self.presence.joined.contains(channel) {
            return;
        }
        self.presence.joined.insert(channel.to_string());
        let mut entry =
            PresenceEntry::new(self.client_id(), self.gate.user().map(|u| u.to_string()).unwrap_or_default());
        // The token's `info` claim was checked as JSON when the token was verified.
        entry.conn_info = self.gate.info().and_then(|info| RawValue::from_string(info.to_string()).ok());
        self.presence.send(&self.node.router, Change::Join(channel.to_string(), entry));
    }

    /// Leaves `channel`'s presence, if the session joined it.
    pub(super) fn leave_presence(&mut self, channel: &str) {
        if self.presence.joined.remove(channel) {
            let client = self.client_id();
            self.presence.send(&self.node.router, Change::Leave(channel.to_string(), client));
        }
    }

    /// Leaves every channel's presence (the session is closing).
    pub(super) fn leave_all_presence(&mut self) {
        let joined: Vec<String> = self.presence.joined.iter().cloned().collect();
        for channel in joined {
            self.leave_presence(&channel);
        }
        // The worker finishes the leaves and ends.
        self.presence.worker = None;
    }

    /// Queues the reply to `presence` (`list`) or `presence_stats`, in the session's
    /// dialect (Centrifugo's `presence` is a map by client id).
    pub(super) fn presence_reply(&mut self, to: To, channel: String, list: bool) {
        let dialect = self.dialect;
        if !self.node.config.namespace(&channel).presence {
            if dialect == Dialect::Centrifugo {
                let message = "presence is off in this channel's namespace";
                return self.queue(ready(dialect::cf_error(to, cf::code::NOT_AVAILABLE, message)));
            }
            return self.queue_result::<protocol::Empty>(to, Err(presence::not_enabled()));
        }
        let router = self.node.router.clone();
        let metrics = self.node.metrics.clone();
        self.queue(
            async move {
                let frame = if list {
                    let result = router.presence(&channel).await;
                    count(&metrics, &result);
                    match (dialect, &result) {
                        (Dialect::Centrifugo, Ok(clients)) => {
                            let by_client: std::collections::BTreeMap<&str, cf::ClientInfo<'_>> =
                                clients.iter().map(|e| (e.client.as_str(), client_info(e))).collect();
                            cf::reply(to.id as u32, to.method, &serde_json::json!({ "presence": by_client }))
                        }
                        _ => {
                            let listed = result.as_ref().map(|clients| PresenceOk { clients }).map_err(Clone::clone);
                            dialect::answer(dialect, to, &listed, |_| protocol::Empty {})
                        }
                    }
                } else {
                    let result = router.presence_stats(&channel).await;
                    count(&metrics, &result);
                    dialect::answer(dialect, to, &result, |stats| *stats)
                };
                Output::Frame(frame)
            }
            .boxed(),
        );
    }
}

/// A presence entry as Centrifugo's client info.
fn client_info(e: &PresenceEntry) -> cf::ClientInfo<'_> {
    cf::ClientInfo {
        user: &e.user,
        client: &e.client,
        conn_info: e.conn_info.as_deref(),
        chan_info: e.chan_info.as_deref(),
    }
}

fn count<T>(metrics: &switchyard_metrics::Metrics, result: &Result<T, OpError>) {
    if let Err(e) = result {
        metrics.protocol_errors.with_label_values(&[e.code.as_str()]).inc();
    }
}

//! Reading: the client's frames, the heartbeat, and each command through the gate to the
//! router.
//!
//! It owns turning a frame into a command or an error reply, the gate's verdicts (the
//! refusals that end the connection), the cluster-wide seat, and queuing each command's
//! reply future behind the ones before it. It must never write a reply itself: every reply
//! is queued, so replies leave in the order the commands came.

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt};
use switchyard_access::gate::Refusal;
use switchyard_access::user_sessions::Beat;
use switchyard_core::owner::{PublishRequest, Start};
use switchyard_core::HistoryQuery;
use switchyard_peer::seats::Seating;
use switchyard_proto::protocol::{self, close, Command, Empty, ErrorCode, OpError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::dialect::{self, To};
use super::write::until_stopped;
use super::{deliver, ready, Output, Phase, Session, Stop, Sub};
use switchyard_proto::centrifugo as cf;
use switchyard_proto::{Dialect, Text};

fn owner_gone() -> OpError {
    OpError::new(ErrorCode::Unavailable, "partition owner stopped")
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // === reading ===

    pub(super) async fn on_frame(&mut self, frame: Option<Result<Message, WsError>>) -> Result<(), Stop> {
        let max = self.node.config.limits.max_frame_bytes;
        match frame {
            None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_))) => Err(Stop::Gone),
            Some(Err(WsError::Capacity(_))) => Err(Stop::TooLarge),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket protocol error");
                Err(Stop::Gone)
            }
            Some(Ok(Message::Text(text))) if text.len() > max => Err(Stop::TooLarge),
            Some(Ok(Message::Text(text))) if self.dialect == Dialect::Centrifugo => self.on_cf_text(&text).await,
            Some(Ok(Message::Text(text))) => match protocol::parse_command(&text) {
                // Boxed: a command's await states (a forwarded publish, a seat asked of
                // another node, a subscription) live only while it runs, not in every idle
                // session's future.
                Ok((id, cmd)) => Box::pin(self.dispatch(To::native(id), cmd)).await,
                Err(rejected) => {
                    let frame = self.reply_error(rejected.id, &rejected.error);
                    self.queue(ready(frame));
                    Ok(())
                }
            },
            Some(Ok(Message::Binary(data))) if data.len() > max => Err(Stop::TooLarge),
            Some(Ok(Message::Binary(_))) if self.dialect == Dialect::Centrifugo => Err(Stop::Protocol {
                code: cf::close::BAD_REQUEST,
                reason: "binary frames are not supported; send JSON",
            }),
            Some(Ok(Message::Binary(_))) => {
                let frame =
                    self.reply_error(None, &OpError::bad_request("binary frames are not supported; send JSON text"));
                self.queue(ready(frame));
                Ok(())
            }
            Some(Ok(Message::Close(_))) => Err(Stop::ClosedByPeer),
            Some(Ok(Message::Ping(_))) => {
                self.unflushed = true; // let the automatic pong out
                Ok(())
            }
            Some(Ok(Message::Pong(_))) => {
                self.heartbeat.on_pong();
                let next = self.heartbeat.deadline(&self.node.access.live().sessions);
                self.beat.as_mut().reset(next);
                Ok(())
            }
            Some(Ok(Message::Frame(_))) => Ok(()),
        }
    }

    /// The heartbeat's deadline passed: ping, or give up on a peer that did not answer.
    pub(super) async fn on_beat(&mut self) -> Result<(), Stop> {
        let live = self.node.access.live();
        let beat = self.heartbeat.on_deadline(&live.sessions, Instant::now());
        self.beat.as_mut().reset(self.heartbeat.deadline(&live.sessions));
        match beat {
            Beat::Wait => Ok(()),
            // Reading is paused at the reply budget, so its pong may be waiting unread: the
            // writes' deadline (`write_timeout`) judges this client instead.
            Beat::Dead if self.reading_paused() => {
                self.heartbeat.on_pong();
                Ok(())
            }
            Beat::Dead => Err(Stop::Unresponsive),
            // Centrifugo's clients expect pings only once connected.
            Beat::Ping if self.dialect == Dialect::Centrifugo && !self.gate.is_connected() => {
                self.heartbeat.on_pong();
                Ok(())
            }
            Beat::Ping if self.dialect == Dialect::Centrifugo => {
                // Centrifugo's clients ping at the protocol level: `{}`, answered by `{}`.
                self.write(Text::from(cf::PING)).await
            }
            Beat::Ping => {
                self.unflushed = true;
                let fut = self.ws.feed(Message::Ping(Bytes::new()));
                until_stopped(fut, &self.outbox, &mut self.shutdown, self.node.config.limits.write_timeout).await
            }
        }
    }

    /// Under the cluster-wide cap: asks the user's seat holder for a seat (the gate already
    /// took one under the same cap on this node). A full cap ends the connection with 4009;
    /// a holder that does not answer in time leaves the per-node cap in force.
    async fn take_cluster_seat(&mut self, to: To, user: &str) -> Result<(), Stop> {
        let max = self.node.access.live().sessions.max_per_user;
        match self.node.router.take_seat(user, self.id, max).await {
            Seating::Granted(seat) => self.cluster_seat = Some(seat),
            Seating::NotClustered => {}
            Seating::Full => {
                let error = OpError::new(
                    ErrorCode::LimitExceeded,
                    format!("user {user} already holds {max} connections in the cluster"),
                );
                return self.refuse(
                    to,
                    Err(Refusal {
                        error,
                        code: close::TOO_MANY_SESSIONS,
                        reason: "too many sessions for this user",
                        expired: false,
                    }),
                );
            }
            Seating::Unreachable { why, seat } => {
                self.node.metrics.seat_fallbacks.inc();
                tracing::warn!(user, why, "seat holder unreachable: the per-node session cap applies");
                self.cluster_seat = Some(seat);
            }
        }
        Ok(())
    }

    /// Queues an error reply; when the gate also ends the connection, says so.
    pub(super) fn refuse(&mut self, to: To, refused: Result<OpError, Refusal>) -> Result<(), Stop> {
        match refused {
            Ok(error) => {
                self.queue_result::<Empty>(to, Err(error));
                Ok(())
            }
            Err(refusal) => {
                self.queue_result::<Empty>(to, Err(refusal.error.clone()));
                Err(refusal.into())
            }
        }
    }

    /// Runs one command, whichever protocol it came in: its reply is queued in the
    /// connection's dialect.
    pub(super) async fn dispatch(&mut self, to: To, cmd: Command) -> Result<(), Stop> {
        self.dispatch_as(to, cmd, false).await
    }

    /// [`Session::dispatch`]; `reject_unrecovered` (Centrifugo's subscribe flag) makes a
    /// recovery that cannot continue exactly an error.
    pub(super) async fn dispatch_as(&mut self, to: To, cmd: Command, reject_unrecovered: bool) -> Result<(), Stop> {
        let node = self.node.clone();
        let dialect = self.dialect;
        if let Err(e) = self.gate.admit(&node.access, &cmd) {
            self.queue_result::<Empty>(to, Err(e));
            return Ok(());
        }
        match cmd {
            Command::Connect { name, token, batch } => {
                if let Some(name) = name {
                    tracing::debug!(name, "client named itself");
                }
                if let Err(refused) = self.gate.connect(&node.access, token.as_deref()) {
                    return self.refuse_connect(to, refused);
                }
                if let Some(user) = self.gate.user().cloned() {
                    self.take_cluster_seat(to, &user).await?;
                }
                self.auth_deadline = self.token_deadline();
                if let Some(at) = self.auth_deadline {
                    self.auth_timer.as_mut().reset(at);
                }
                self.pack = batch;
                if dialect == Dialect::Centrifugo {
                    let frame = cf::reply(to.id as u32, to.method, &self.cf_connected());
                    self.queue(ready(frame));
                    return Ok(());
                }
                let mut ok = serde_json::json!({"client": self.client_id(), "node": node.config.node_id, "version": protocol::VERSION});
                if batch {
                    ok["batch"] = serde_json::json!(true);
                }
                if let Some(user) = self.gate.user() {
                    ok["user"] = serde_json::json!(user);
                }
                self.queue_result(to, Ok(ok));
            }
            Command::Refresh { token } => match self.gate.refresh(&node.access, &token) {
                Ok(()) => {
                    // The expiry close now waits for the new token's expiry.
                    self.auth_deadline = self.token_deadline();
                    if let Some(at) = self.auth_deadline {
                        self.auth_timer.as_mut().reset(at);
                    }
                    let refreshed = self.cf_refreshed();
                    self.queue_answer(to, Ok(Empty {}), |_| refreshed);
                }
                Err(e) => self.queue_result::<Empty>(to, Err(e)),
            },
            Command::Ping => self.queue_result(to, Ok(Empty {})),
            Command::Subscribe { channel, from, consumer } => {
                self.subscribe(to, channel, from, consumer, reject_unrecovered).await
            }
            Command::Unsubscribe { channel } => {
                if let Some(sub) = self.by_channel.remove(&channel) {
                    self.remove_sub(sub);
                    node.metrics.subscriptions.dec();
                    node.router.unsubscribe(&channel, sub).await;
                    self.leave_presence(&channel);
                }
                self.queue_result(to, Ok(Empty {}));
            }
            Command::Publish(p) => {
                if let Err(refused) = self.gate.take_publish(&node.access, Instant::now()) {
                    return self.refuse(to, refused);
                }
                if let Err(e) = node.config.check_keys(p.key.as_deref(), p.idempotency_key.as_deref()) {
                    return self.refuse(to, Ok(e));
                }
                let req = PublishRequest {
                    channel: p.channel,
                    data: p.data,
                    key: p.key,
                    idempotency_key: p.idempotency_key.map(|k| self.scoped(k)),
                    from: self.gate.user().map(|u| u.to_string()),
                };
                match node.router.publish(req).await {
                    Ok(publishing) => {
                        let metrics = node.metrics.clone();
                        self.queue(
                            async move {
                                let result = publishing.acked().await;
                                if let Err(e) = &result {
                                    metrics.protocol_errors.with_label_values(&[e.code.as_str()]).inc();
                                }
                                Output::Frame(dialect::empty(dialect, to, &result))
                            }
                            .boxed(),
                        );
                    }
                    Err(e) => self.queue_result::<Empty>(to, Err(e)),
                }
            }
            Command::History { channel, since, before, limit, reverse } => {
                // Wherever the owner is; the read starts when the future is first polled,
                // after every command this connection sent before it. It may hold a full
                // page until written.
                let page = node.config.limits.max_reply_bytes;
                let q = HistoryQuery { since, before, limit, reverse };
                self.queue_sized(
                    async move {
                        // Only native clients come here: Centrifugo's history has its own
                        // position rules (`Session::cf_history`).
                        let page = node.router.history(&channel, q).await;
                        Output::Frame(history_reply(&node.router.partitions().store, to.id, page).await)
                    }
                    .boxed(),
                    page,
                )
            }
            Command::Presence { channel } => self.presence_reply(to, channel, true),
            Command::PresenceStats { channel } => self.presence_reply(to, channel, false),
            Command::Commit { channel, consumer, offset } => {
                match node.router.commit(&channel, self.scoped(consumer), offset).await {
                    Ok(rx) => self.queue(
                        async move {
                            let result = rx.await.unwrap_or_else(|_| Err(owner_gone())).map(|()| Empty {});
                            // Centrifugo: `commit` is an `rpc` method; its result has no data.
                            Output::Frame(dialect::empty(dialect, to, &result))
                        }
                        .boxed(),
                    ),
                    Err(e) => self.queue_result::<Empty>(to, Err(e)),
                }
            }
        }
        Ok(())
    }

    async fn subscribe(
        &mut self,
        to: To,
        channel: String,
        from: protocol::StartFrom,
        consumer: Option<String>,
        reject_unrecovered: bool,
    ) {
        if self.by_channel.contains_key(&channel) {
            let e = OpError::bad_request("already subscribed to this channel");
            if self.dialect == Dialect::Centrifugo {
                return self.queue(ready(dialect::cf_error(to, cf::code::ALREADY_SUBSCRIBED, &e.message)));
            }
            return self.queue_result::<Empty>(to, Err(e));
        }
        if self.subs.len() >= self.node.config.limits.max_subscriptions {
            return self.queue_result::<Empty>(
                to,
                Err(OpError::new(ErrorCode::LimitExceeded, "too many subscriptions on this connection")),
            );
        }
        let sub = self.node.router.next_id();
        let start = match consumer {
            Some(c) => Start::Consumer(self.scoped(c)),
            None => Start::From(from),
        };
        // A start that may need a catch-up reserves a page's worth of the reply budget: its
        // first page is read ahead, while it waits for its turn to be written.
        let reserve = match &start {
            Start::From(protocol::StartFrom::Latest) | Start::LatestAt(_) => None,
            _ => Some(deliver::AHEAD_RESERVE),
        };
        match self.node.router.subscribe(&channel, sub, self.outbox.clone(), start).await {
            Ok(rx) => {
                self.subs.insert(sub, Sub { channel: channel.clone(), phase: Phase::Pending(Vec::new()) });
                self.by_channel.insert(channel.clone(), sub);
                self.node.metrics.subscriptions.inc();
                let node = self.node.clone();
                let fut = async move {
                    let result = rx.await.unwrap_or_else(|_| Err(owner_gone()));
                    // Admission and the first catch-up page, concurrently with the other
                    // subscribes in flight; the session writes them in order.
                    let ahead = deliver::ahead(&node, &channel, &result).await;
                    Output::Subscribed { to, sub, channel, result, reject_unrecovered, ahead }
                }
                .boxed();
                match reserve {
                    Some(bytes) => self.queue_sized(fut, bytes),
                    None => self.queue(fut),
                }
            }
            Err(e) => self.queue_result::<Empty>(to, Err(e)),
        }
    }
}

/// Pages of at least this many messages are encoded on the store's read pool.
const ENCODE_OFF_WORKER: usize = 64;

/// The reply to a native `history` command. A large page (up to `max_reply_bytes` of
/// JSON) is encoded on the store's read pool, at the pool's lower priority, like the read
/// that produced it: encoding a 1 MB page takes about a millisecond of CPU that routing
/// would otherwise wait behind.
async fn history_reply(
    store: &std::sync::Arc<switchyard_store::Store>,
    id: u64,
    page: Result<switchyard_core::HistoryPage, OpError>,
) -> Text {
    if !page.as_ref().is_ok_and(|p| p.messages.len() >= ENCODE_OFF_WORKER) {
        return protocol::reply(id, &page);
    }
    match store.off_worker(move || protocol::reply(id, &page)).await {
        Ok(frame) => frame,
        Err(e) => protocol::reply::<Empty>(id, &Err(e.to_op_error())),
    }
}

//! A Centrifugo client's frames: commands split from each frame, each turned into the
//! router's own command, and what only Centrifugo has (its pong, `connect` and `refresh`
//! results, history positions, unsupported methods).
//!
//! It owns the translation from Centrifugo's methods to [`Command`]s, so that both
//! protocols share one path through the gate, the rules, the rate limit and the router:
//! a message published through one is delivered through the other with the same offset and
//! epoch. It must never answer a command itself where the shared path can, never leave a
//! command without an answer (what Switchyard does not offer gets 108 "not available"), and
//! never keep reading a frame that is not the protocol (close 3501).

use futures_util::FutureExt;
use serde::Serialize;
use switchyard_core::HistoryQuery;
use switchyard_proto::centrifugo::{self as cf, CfCommand, StreamPosition};
use switchyard_proto::protocol::{self, Command, OpError, Publish, StartFrom, HISTORY_MAX_LIMIT};
use tokio::io::{AsyncRead, AsyncWrite};

use super::dialect::{self, To};
use super::{ready, Output, Session, Stop};

/// The server version a Centrifugo client is told.
const VERSION: &str = concat!("switchyard ", env!("CARGO_PKG_VERSION"));

/// Centrifugo's `connect` result: the `refresh` result's fields and the ping schedule.
#[derive(Serialize)]
pub(super) struct Connected {
    #[serde(flatten)]
    token: Refreshed,
    #[serde(skip_serializing_if = "is_zero")]
    ping: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pong: bool,
    node: String,
}

/// Centrifugo's `refresh` result.
#[derive(Serialize)]
pub(super) struct Refreshed {
    client: String,
    version: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    expires: bool,
    #[serde(skip_serializing_if = "is_zero")]
    ttl: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The arguments of the `commit` RPC.
#[derive(serde::Deserialize)]
struct CommitArgs {
    channel: String,
    consumer: String,
    offset: u64,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // === Centrifugo ===

    /// One text frame from a Centrifugo client: its commands, in order.
    pub(super) async fn on_cf_text(&mut self, text: &str) -> Result<(), Stop> {
        let bad = || Stop::Protocol { code: cf::close::BAD_REQUEST, reason: "bad request" };
        let lines = cf::split_frame(text).map_err(|_| bad())?;
        for line in lines {
            match cf::parse_command(line) {
                Ok((_, CfCommand::Pong)) => {
                    self.heartbeat.on_pong();
                    let next = self.heartbeat.deadline(&self.node.access.live().sessions);
                    self.beat.as_mut().reset(next);
                }
                // Boxed, like a native command: its await states live only while it runs.
                Ok((id, cmd)) => Box::pin(self.cf_command(id, cmd)).await?,
                Err(rejected) if rejected.fatal => {
                    tracing::debug!(error = %rejected.error.message, "not a Centrifugo command");
                    return Err(bad());
                }
                Err(rejected) => {
                    self.node.metrics.protocol_errors.with_label_values(&["bad_request"]).inc();
                    self.queue(ready(cf::error_reply(rejected.id, &rejected.error)));
                }
            }
        }
        Ok(())
    }

    async fn cf_command(&mut self, id: u32, cmd: CfCommand) -> Result<(), Stop> {
        let to = To { id: u64::from(id), method: cmd.method() };
        let command = match cmd {
            CfCommand::Pong => return Ok(()),
            CfCommand::Connect { token, name, version } => {
                if let Some(version) = version {
                    tracing::debug!(version, "Centrifugo client version");
                }
                Command::Connect { token, name, batch: false }
            }
            CfCommand::Subscribe { unsupported: Some(what), .. } => {
                let message = format!("{what} is not available");
                self.queue(ready(dialect::cf_error(to, cf::code::NOT_AVAILABLE, &message)));
                return Ok(());
            }
            CfCommand::Subscribe { channel, recover, offset, epoch, flag, consumer, unsupported: None } => {
                let from = if recover { StartFrom::Recover { offset, epoch } } else { StartFrom::Latest };
                let reject_unrecovered = flag & cf::FLAG_REJECT_UNRECOVERED != 0;
                return self.dispatch_as(to, Command::Subscribe { channel, from, consumer }, reject_unrecovered).await;
            }
            CfCommand::Unsubscribe { channel } => Command::Unsubscribe { channel },
            CfCommand::Publish { channel, data } => {
                Command::Publish(Publish { channel, data, key: None, idempotency_key: None })
            }
            CfCommand::History { channel, limit, since, reverse } => {
                return self.cf_history(to, channel, limit, since, reverse);
            }
            CfCommand::Refresh { token } => Command::Refresh { token },
            CfCommand::Ping => Command::Ping,
            CfCommand::Rpc { method, data } if method == "commit" => {
                let args = data.as_deref().map(|d| serde_json::from_str::<CommitArgs>(d.get()));
                match args {
                    Some(Ok(CommitArgs { channel, consumer, offset }))
                        if switchyard_proto::channel::is_valid_name(&channel)
                            && switchyard_proto::channel::is_valid_name(&consumer) =>
                    {
                        Command::Commit { channel, consumer, offset }
                    }
                    _ => {
                        let message = "`commit` takes {\"channel\", \"consumer\", \"offset\"} with valid names";
                        self.queue(ready(dialect::cf_error(to, cf::code::BAD_REQUEST, message)));
                        return Ok(());
                    }
                }
            }
            CfCommand::Rpc { method, .. } => {
                let shown: String = method.chars().take(64).collect();
                let message = format!("rpc method `{shown}` is not available (Switchyard offers `commit`)");
                self.queue(ready(dialect::cf_error(to, cf::code::NOT_AVAILABLE, &message)));
                return Ok(());
            }
            CfCommand::SubRefresh { .. } => {
                let message = "subscription tokens are not available: channel rules and the connection token decide";
                self.queue(ready(dialect::cf_error(to, cf::code::NOT_AVAILABLE, message)));
                return Ok(());
            }
            CfCommand::Presence { channel } => Command::Presence { channel },
            CfCommand::PresenceStats { channel } => Command::PresenceStats { channel },
            // An asynchronous message has no reply to carry an error: Centrifugo closes.
            CfCommand::Send => return Err(Stop::Protocol { code: cf::close::NOT_AVAILABLE, reason: "not available" }),
        };
        self.dispatch(to, command).await
    }

    /// Centrifugo's `history`: `limit` 0 is the position only, `since` must be in the
    /// channel's epoch (else 112), `reverse` reads newest first.
    fn cf_history(
        &mut self,
        to: To,
        channel: String,
        limit: i32,
        since: Option<StreamPosition>,
        reverse: bool,
    ) -> Result<(), Stop> {
        let node = self.node.clone();
        let limit = if limit < 0 { HISTORY_MAX_LIMIT } else { (limit as u32).min(HISTORY_MAX_LIMIT) };
        // The rules see the same command a native `history` is.
        let check = Command::History { channel: channel.clone(), since: 0, before: None, limit, reverse };
        if let Err(e) = self.gate.admit(&node.access, &check) {
            self.queue_result::<protocol::Empty>(to, Err(e));
            return Ok(());
        }
        let page = node.config.limits.max_reply_bytes;
        let metrics = node.metrics.clone();
        self.queue_sized(
            async move {
                let frame = match cf_history_page(&node, &channel, limit, since, reverse).await {
                    Ok(page) => cf::reply(to.id as u32, "history", &dialect::CfHistory::new(&page)),
                    Err(HistoryError::Op(e)) => {
                        metrics.protocol_errors.with_label_values(&[e.code.as_str()]).inc();
                        dialect::error(switchyard_proto::Dialect::Centrifugo, Some(to.id), &e)
                    }
                    Err(HistoryError::Unrecoverable) => {
                        dialect::cf_error(to, cf::code::UNRECOVERABLE_POSITION, "unrecoverable position")
                    }
                };
                Output::Frame(frame)
            }
            .boxed(),
            page,
        );
        Ok(())
    }

    /// Centrifugo's `connect` result: the client id, the token's time left (the client
    /// refreshes when it runs out), and the ping schedule the session keeps.
    pub(super) fn cf_connected(&self) -> Connected {
        let ping = self.node.access.live().sessions.ping_interval;
        Connected {
            token: self.cf_refreshed(),
            // Whole seconds, rounded up: pings come at least this often.
            ping: if ping.is_zero() { 0 } else { ping.as_secs_f64().ceil() as u64 },
            pong: !ping.is_zero(),
            node: self.node.config.node_id.clone(),
        }
    }

    /// Centrifugo's `refresh` result: the client id and the token's time left.
    pub(super) fn cf_refreshed(&self) -> Refreshed {
        let ttl = self.gate.token_ttl();
        Refreshed {
            client: self.client_id(),
            version: VERSION,
            expires: ttl.is_some(),
            ttl: ttl.map_or(0, |t| t.as_secs().max(1)),
        }
    }

    /// A refused `connect`: Centrifugo's clients fetch a new token on 109 and reconnect,
    /// and stop on 101.
    pub(super) fn refuse_connect(
        &mut self,
        to: To,
        refused: Result<OpError, switchyard_access::gate::Refusal>,
    ) -> Result<(), Stop> {
        match refused {
            Err(refusal) if self.dialect == switchyard_proto::Dialect::Centrifugo && refusal.expired => {
                self.node.metrics.protocol_errors.with_label_values(&[refusal.error.code.as_str()]).inc();
                self.queue(ready(dialect::cf_error(to, cf::code::TOKEN_EXPIRED, "token expired")));
                Err(refusal.into())
            }
            refused => self.refuse(to, refused),
        }
    }
}

/// Why a Centrifugo history read has no page.
enum HistoryError {
    Op(OpError),
    /// `since` names another epoch.
    Unrecoverable,
}

async fn cf_history_page(
    node: &crate::node::Node,
    channel: &str,
    limit: u32,
    since: Option<StreamPosition>,
    reverse: bool,
) -> Result<switchyard_core::partitions::HistoryPage, HistoryError> {
    // `since` is exclusive either way: after it going forward, before it going back.
    let q = match (&since, reverse) {
        (Some(s), true) => HistoryQuery { since: 0, before: Some(s.offset), limit, reverse },
        (Some(s), false) => HistoryQuery { since: s.offset, before: None, limit, reverse },
        (None, _) => HistoryQuery { since: 0, before: None, limit, reverse },
    };
    let page = node.router.history(channel, q).await.map_err(HistoryError::Op)?;
    if since.is_some_and(|s| !s.epoch.is_empty() && s.epoch != page.epoch) {
        return Err(HistoryError::Unrecoverable);
    }
    Ok(page)
}

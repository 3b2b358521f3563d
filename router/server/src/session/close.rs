//! Closing: what a session does once it has stopped.
//!
//! It owns giving back the connection's seats and subscriptions at once, then the last
//! words the reason calls for: replies still in flight, the `disconnect` push (or
//! `too_large`) and the close frame, all under one deadline ([`CLOSE_WRITE_TIMEOUT`]). It
//! must never wait on a peer past that deadline, nor write last words to a peer that
//! stopped reading or answering.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use switchyard_proto::protocol::{self, close, ErrorCode, OpError, SubscribeOk};
use switchyard_proto::{Dialect, Text};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::dialect;
use super::{Output, Session, Stop};
use crate::socket::Socket;
use crate::ws::text;

/// How long a closing connection may take to write its last frames.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection waits for replies still in flight.
const SHUTDOWN_REPLY_WAIT: Duration = Duration::from_secs(2);

/// Writes out everything queued on the socket. tungstenite stops short of its flush once a
/// close handshake is over: its last frame is queued, but only this writes it.
async fn drain<S>(ws: &mut WebSocketStream<Socket<S>>) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    std::future::poll_fn(|cx| Pin::new(ws.get_mut()).poll_flush(cx)).await
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // === closing ===

    pub(super) async fn finish(&mut self, stop: Stop) {
        self.take_socket_back();
        // The connection is over: its seat is free now, not after the (up to
        // CLOSE_WRITE_TIMEOUT) close below, so a client reconnecting at once after 4029,
        // 4001 or 4100 is not refused with 4009.
        self.gate.release_seat();
        self.cluster_seat = None;
        for (sub, s) in self.subs.drain() {
            self.node.router.unsubscribe(&s.channel, sub).await;
            self.node.metrics.subscriptions.dec();
        }
        self.leave_all_presence();
        let (code, reason) = match stop {
            Stop::Gone => return,
            Stop::ClosedByPeer => {
                // tungstenite queued the answering close frame; a clean close needs it sent.
                let ws = &mut self.ws;
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
                    let _ = ws.flush().await;
                    drain(ws).await
                })
                .await;
                return;
            }
            // Centrifugo's clients are told why (3012, reconnect), within the close deadline.
            Stop::Unresponsive if self.dialect == Dialect::Centrifugo => {
                tracing::info!("closing a connection that stopped answering pings");
                (switchyard_proto::centrifugo::close::NO_PONG, "no pong")
            }
            Stop::Unresponsive => {
                // Nobody reads this socket: no last words, just drop it (and its resources).
                tracing::info!("closing a connection that stopped answering pings");
                return;
            }
            Stop::WriteTimeout => {
                // Its socket is full and stays full: last words could not be written either.
                tracing::info!(limit = ?self.node.config.limits.write_timeout, "closing a connection that stopped reading");
                return;
            }
            Stop::Protocol { code, reason } => (code, reason),
            Stop::Refused { code, reason, expired } => dialect::close_code(self.dialect, code, reason, expired),
            Stop::Slow => {
                self.node.metrics.slow_consumer_disconnects.inc();
                tracing::info!("slow consumer disconnected");
                dialect::close_code(self.dialect, close::SLOW_CONSUMER, "slow consumer", false)
            }
            Stop::Shutdown => dialect::close_code(self.dialect, close::SHUTTING_DOWN, "node shutting down", false),
            Stop::TooLarge => dialect::close_code(self.dialect, close::TOO_BIG, "frame too large", false),
        };
        let native = self.dialect == Dialect::Native;
        let too_large =
            OpError::new(ErrorCode::TooLarge, format!("frame over {} bytes", self.node.config.limits.max_frame_bytes));
        let too_large = (native && code == close::TOO_BIG).then(|| self.reply_error(None, &too_large));
        // Centrifugo's clients read the close frame's code and reason; the native protocol
        // also says it in a `disconnect` push first.
        let disconnect = native.then(|| too_large.unwrap_or_else(|| protocol::disconnect_push(code, reason)));
        let dialect = self.dialect;
        let packed = std::mem::take(&mut self.packed);
        let (ws, pending) = (&mut self.ws, &mut self.pending);
        // Every last write shares one deadline, so a peer that stopped reading cannot hold us.
        let last_words = async {
            if !packed.is_empty() {
                ws.feed(Message::Text(text(Text::join_lines(&packed)))).await?;
            }
            // Replies already in flight (acknowledged publishes among them) go out first,
            // in order; a subscription granted meanwhile gets its reply but no messages.
            let wait = tokio::time::Instant::now() + SHUTDOWN_REPLY_WAIT;
            while let Ok(Some(out)) = tokio::time::timeout_at(wait, pending.next()).await {
                let frame = match out {
                    Output::Frame(frame) => frame,
                    Output::Moved { .. } => continue,
                    Output::Subscribed { to, channel, result, .. } => match dialect {
                        Dialect::Native => protocol::reply(
                            to.id,
                            &result.map(|g| SubscribeOk {
                                channel,
                                epoch: g.epoch.to_string(),
                                offset: g.offset,
                                recovered: g.recovered,
                            }),
                        ),
                        Dialect::Centrifugo => match &result {
                            Ok(g) => switchyard_proto::centrifugo::reply(
                                to.id as u32,
                                "subscribe",
                                &dialect::CfSubscribed::new(&g.epoch, g.offset, g.recovered, &[]),
                            ),
                            Err(e) => dialect::error(dialect, Some(to.id), e),
                        },
                    },
                };
                ws.feed(Message::Text(text(frame))).await?;
            }
            if let Some(last) = disconnect {
                ws.feed(Message::Text(text(last))).await?;
            }
            let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
            let _ = ws.send(Message::Close(Some(frame))).await;
            drain(ws).await.map_err(WsError::Io)
        };
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, last_words).await;
    }
}

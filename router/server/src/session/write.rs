//! Writing: frames onto the session's socket, packed pushes, the cork's flush, and the
//! queue of replies in command order.
//!
//! It owns the reply budget (what each queued reply counts against
//! `limits.outbound_queue_bytes`) and the one way a write may wait ([`until_stopped`]),
//! raced against the slow-consumer signal, shutdown and `limits.write_timeout`. It must
//! never wait on a socket outside that race, nor copy a frame's payload: the bytes an owner
//! serialized once go to the socket as they are.

use futures_util::future::BoxFuture;
use futures_util::SinkExt;
use switchyard_core::outbox::Outbox;
use switchyard_proto::protocol::{self, OpError};
use switchyard_proto::Text;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::dialect::{self, To};
use super::{ready, stopping, Output, Session, Stop};

/// What a reply that carries no messages (an ack, an error, a subscribe grant) is counted
/// as against the connection's reply budget.
const SMALL_REPLY: usize = 1024;
/// Bytes a session queues on its socket before writing them out ahead of its flush.
const WRITE_BUFFER: usize = 32 * 1024;

/// Drives a socket write. The common case (room in the buffer) completes on the first poll
/// without registering any waiter; a blocked write is raced against the slow-consumer and
/// shutdown signals so a stuck peer cannot hold the session.
pub(super) async fn until_stopped<F, E>(
    fut: F,
    outbox: &Outbox,
    shutdown: &mut watch::Receiver<bool>,
    write_timeout: std::time::Duration,
) -> Result<(), Stop>
where
    F: std::future::Future<Output = Result<(), E>>,
{
    let mut fut = std::pin::pin!(fut);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
    if let std::task::Poll::Ready(r) = first {
        return r.map_err(|_| Stop::Gone);
    }
    let mut slow = std::pin::pin!(outbox.slow_signal.notified());
    slow.as_mut().enable();
    if outbox.is_slow() {
        return Err(Stop::Slow);
    }
    tokio::select! {
        biased;
        r = fut => r.map_err(|_| Stop::Gone),
        _ = slow => Err(Stop::Slow),
        _ = stopping(shutdown) => Err(Stop::Shutdown),
        // The socket took no bytes for this long: the client stopped reading.
        _ = tokio::time::sleep(write_timeout) => Err(Stop::WriteTimeout),
    }
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // === writing ===

    /// Writes one text frame after any packed pushes before it.
    pub(super) async fn write(&mut self, frame: Text) -> Result<(), Stop> {
        self.write_packed().await?;
        self.write_frame(frame).await
    }

    /// Writes the packed pushes as one frame of JSON lines.
    async fn write_packed(&mut self) -> Result<(), Stop> {
        match self.packed.len() {
            0 => Ok(()),
            1 => {
                let frame = self.packed.pop().expect("one");
                self.packed_bytes = 0;
                self.write_frame(frame).await
            }
            _ => {
                let frame = Text::join_lines(&self.packed);
                self.packed.clear();
                self.packed_bytes = 0;
                self.write_frame(frame).await
            }
        }
    }

    /// Queues one text frame on the socket, its payload shared, not copied. Past
    /// [`WRITE_BUFFER`] queued bytes it writes them out, and only when the socket is full
    /// does it wait, giving up if the connection turns slow or the node shuts down.
    async fn write_frame(&mut self, frame: Text) -> Result<(), Stop> {
        if self.outbox.is_slow() {
            return Err(Stop::Slow);
        }
        self.unflushed = true;
        let socket = self.ws.get_mut();
        socket.push_text(frame.into_bytes());
        if socket.queued() <= WRITE_BUFFER {
            return Ok(());
        }
        let fut = std::future::poll_fn(|cx| socket.poll_drain(cx, 0));
        until_stopped(fut, &self.outbox, &mut self.shutdown, self.node.config.limits.write_timeout).await
    }

    /// The end of the runtime pass in which frames were written: writes what the owners
    /// queued meanwhile, then flushes everything in one go.
    pub(super) async fn uncork(&mut self) -> Result<(), Stop> {
        self.cork = None;
        let more = self.inbox.try_recv_all();
        self.on_deliveries(more).await?;
        self.flush().await
    }

    pub(super) async fn flush(&mut self) -> Result<(), Stop> {
        self.write_packed().await?;
        if !self.unflushed {
            return Ok(());
        }
        self.unflushed = false;
        let metrics = &self.node.metrics;
        metrics.messages_delivered.inc_by(std::mem::take(&mut self.delivered));
        metrics.bytes_delivered.inc_by(std::mem::take(&mut self.delivered_bytes));
        let fut = self.ws.flush();
        until_stopped(fut, &self.outbox, &mut self.shutdown, self.node.config.limits.write_timeout).await
    }

    /// Writes a push; with packing, adds it to the frame being packed instead, which goes
    /// out before the next reply, at the end of the wake-up, or when one more push would
    /// take it past `max_frame_bytes`.
    pub(super) async fn push_message(&mut self, frame: Text) -> Result<(), Stop> {
        self.delivered += 1;
        self.delivered_bytes += frame.len() as u64;
        if !self.pack {
            return self.write_frame(frame).await;
        }
        if self.packed_bytes + 1 + frame.len() > self.node.config.limits.max_frame_bytes {
            self.write_packed().await?;
        }
        self.packed_bytes += frame.len() + usize::from(!self.packed.is_empty());
        self.packed.push(frame);
        Ok(())
    }

    pub(super) fn reply_error(&self, id: Option<u64>, error: &OpError) -> Text {
        self.node.metrics.protocol_errors.with_label_values(&[error.code.as_str()]).inc();
        dialect::error(self.dialect, id, error)
    }

    /// True while replies waiting to be written hold the connection's byte budget: no
    /// further command is read until they are.
    pub(super) fn reading_paused(&self) -> bool {
        self.reply_bytes >= self.node.config.limits.outbound_queue_bytes
    }

    /// Queues a reply behind the ones still in flight.
    pub(super) fn queue(&mut self, fut: BoxFuture<'static, Output>) {
        self.queue_sized(fut, SMALL_REPLY);
    }

    /// Queues a reply that may hold up to `bytes` until it is written.
    pub(super) fn queue_sized(&mut self, fut: BoxFuture<'static, Output>, bytes: usize) {
        self.pending.push_back(fut);
        self.reserved.push_back(bytes);
        self.reply_bytes += bytes;
    }

    /// A durable consumer name or idempotency key in this client's own namespace: with a
    /// token, `u/<sub>/<name>` (alice's `phone` is not bob's); anonymous clients share the
    /// channel-wide namespace, so a retry after a reconnect is still recognised. `/` is in
    /// neither user ids nor consumer names, so scoped and unscoped names never meet.
    pub(super) fn scoped(&self, name: String) -> String {
        match self.gate.user() {
            Some(user) => format!("u/{user}/{name}"),
            None => name,
        }
    }

    /// Queues a reply whose Centrifugo form is empty (`{}`), or an error.
    pub(super) fn queue_result<T: serde::Serialize>(&mut self, to: To, result: Result<T, OpError>) {
        self.queue_answer(to, result, |_| protocol::Empty {});
    }

    /// Queues a reply: the native body as it is, or its Centrifugo form, or an error.
    pub(super) fn queue_answer<T: serde::Serialize, C: serde::Serialize>(
        &mut self,
        to: To,
        result: Result<T, OpError>,
        centrifugo: impl FnOnce(&T) -> C,
    ) {
        let frame = match &result {
            Ok(_) => dialect::answer(self.dialect, to, &result, centrifugo),
            Err(e) => self.reply_error(Some(to.id), e),
        };
        self.queue(ready(frame));
    }
}

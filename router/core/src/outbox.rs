//! The outbound queue of one connection, shared by the partition owners that feed it.
//!
//! It owns the slow-consumer rule: the queue is bounded in messages and bytes, a push that
//! would overflow it marks the connection slow and wakes its session, and nothing ever
//! waits on it. An owner's fan-out therefore never slows down for one stuck client. The
//! session takes everything queued in one go, and a burst wakes it once. It must never
//! wait: its lock (one per connection) is held only to append, to take the queue, or for
//! one non-blocking write.
//!
//! It also owns the direct path, nats-server's way of flushing subscribers from the
//! producer. While a session has nothing of its own to write and every subscription is
//! live, it lends the outbox its socket ([`Inbox::enter_direct`], with each subscription's
//! last delivered offset). Owners then frame their pushes straight into the connection's
//! bytes ([`Outbox::push_direct`]) and write them at the end of their pass with one
//! non-blocking `send` ([`Outbox::flush_direct`]): no session wake-up per burst. The same
//! bounds hold. A socket that does not take everything, any other push, or anything the
//! session must do takes the socket back ([`Inbox::leave_direct`]), with the unwritten bytes
//! and the offsets, and the session carries on exactly where the direct path stopped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use bytes::{Buf, BytesMut};
use futures_util::task::AtomicWaker;
use switchyard_proto::{Dialect, Text};
use tokio::sync::Notify;

/// One message for one subscription of the connection.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The session's id for the subscription it belongs to.
    pub sub: u64,
    /// Message offset.
    pub offset: u64,
    /// The shared, serialize-once push frame, in the connection's [`Dialect`].
    pub frame: Text,
    /// What the frame is.
    pub kind: Kind,
}

/// What a [`Delivery`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A message at `offset`: written once per subscription and offset, in order.
    Message,
    /// An `unsubscribed` push that ends the subscription (the owner has already forgotten
    /// it). A session that speaks another dialect writes its own form of it.
    End,
    /// A push about the channel that carries no offset (presence: a join or a leave),
    /// written only while the subscription is live.
    Event,
    /// Not for the client: the gateway subscription's channel moved onto this very node, so
    /// the session subscribes at the owner here, recovering from its last delivered offset
    /// in the channel epoch `frame` holds (it has already been forgotten upstream).
    /// Consumers that cannot switch treat it like [`Kind::End`].
    Moved,
}

/// What is queued: the deliveries and their frame bytes. An empty queue holds at most the
/// room of a small recycled one ([`SPARE_SLOTS`]).
#[derive(Default)]
struct Queue {
    items: VecDeque<Delivery>,
    bytes: usize,
    /// Set while the session lends its socket to the pushers (the direct path).
    direct: Option<Box<Direct>>,
}

/// Writes to a connection's socket without waiting: the session's plain TCP stream.
pub trait DirectSink: Send + Sync {
    /// Writes what the socket takes now, like a non-blocking `send` (`WouldBlock` when
    /// it takes nothing).
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize>;
}

/// The direct path's state, under the queue's lock.
struct Direct {
    /// The socket's write side, held only while lent: a session that ends takes it back,
    /// so the stream closes with the session.
    sink: Arc<dyn DirectSink>,
    /// Pushers may append; false once the socket is handed back (it did not take
    /// everything, or a push needs the session), until the session takes it back.
    on: bool,
    /// Each live subscription and the last offset written to it: pushes at or below are
    /// duplicates (catch-up wrote them), a subscription not here is gone.
    subs: Vec<(u64, u64)>,
    /// Framed pushes not yet written: the socket's next bytes.
    out: BytesMut,
    /// Pushes and push bytes appended since the last flush, for the delivery counters.
    frames: u64,
    frame_bytes: u64,
}

/// What the session gets back when it takes its socket back from the direct path.
#[derive(Debug, Default)]
pub struct Returned {
    /// `(subscription, last offset written)`, for every subscription lent.
    pub subs: Vec<(u64, u64)>,
    /// Framed bytes the socket has not taken yet: they go out before anything else.
    pub unwritten: bytes::Bytes,
}

/// What one [`Outbox::flush_direct`] wrote: pushes and their payload bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Pushes that went out (or were handed to the session with the socket).
    pub messages: u64,
    /// Their frame payload bytes.
    pub bytes: u64,
}

/// The sending side, held (behind an `Arc`) by every owner the connection subscribes through.
pub struct Outbox {
    /// Locked only to append or to take everything; never across an await.
    queue: Mutex<Queue>,
    /// Wakes the inbox when the queue goes from empty to non-empty: once per burst. The
    /// inbox registers before it looks at the queue, so no wake-up is lost; a plain waker
    /// slot, cheaper than a `Notify`'s locked waiter list on every wake-up.
    ready: AtomicWaker,
    max_messages: usize,
    max_bytes: usize,
    /// The protocol the connection speaks: pushers frame for it.
    dialect: Dialect,
    slow: AtomicBool,
    /// The inbox is gone: pushes are refused and owners forget the subscriber.
    closed: AtomicBool,
    /// Wakes every registered waiter when the connection becomes slow.
    pub slow_signal: Notify,
}

/// The receiving side, owned by the session.
pub struct Inbox {
    outbox: Arc<Outbox>,
    /// An emptied queue handed back by [`Inbox::recycle`]: the next burst is queued into
    /// its room, so a busy connection allocates no queue per burst.
    spare: VecDeque<Delivery>,
}

/// Most slots an emptied queue may keep for reuse (the smallest room a queue allocates):
/// a connection that once took a burst holds two such rooms, about 450 bytes, while idle.
const SPARE_SLOTS: usize = 4;

/// A new queue bounded by `max_messages` and `max_bytes`, for a connection that speaks the
/// native protocol.
pub fn outbox(max_messages: usize, max_bytes: usize) -> (Arc<Outbox>, Inbox) {
    outbox_in(Dialect::Native, max_messages, max_bytes)
}

/// A new queue bounded by `max_messages` and `max_bytes`, for a connection that speaks
/// `dialect`.
pub fn outbox_in(dialect: Dialect, max_messages: usize, max_bytes: usize) -> (Arc<Outbox>, Inbox) {
    let outbox = Arc::new(Outbox {
        queue: Mutex::default(),
        ready: AtomicWaker::new(),
        max_messages,
        max_bytes,
        dialect,
        slow: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        slow_signal: Notify::new(),
    });
    (outbox.clone(), Inbox { outbox, spare: VecDeque::new() })
}

/// One push's frame in each [`Dialect`], each framed once however many subscribers take
/// it: the native frame its owner serialized, the others from it on first need.
pub struct Frames<'a> {
    native: &'a Text,
    /// Turns the native frame into Centrifugo's; None for a frame it cannot read.
    to_centrifugo: fn(&str) -> Option<Text>,
    centrifugo: Option<Option<Text>>,
}

impl<'a> Frames<'a> {
    /// The frames of the message whose native push frame is `native`.
    pub fn new(native: &'a Text) -> Self {
        Self { native, to_centrifugo: switchyard_proto::centrifugo::pub_from_native, centrifugo: None }
    }

    /// The frames of the presence news (a join or a leave) whose native push is `native`.
    pub fn presence(native: &'a Text) -> Self {
        Self { native, to_centrifugo: switchyard_proto::presence::centrifugo_from_native, centrifugo: None }
    }

    /// The frame for a connection that speaks `dialect`; None when `native` is not the push
    /// it should be (a peer's garbage), which no dialect can then carry.
    pub fn get(&mut self, dialect: Dialect) -> Option<Text> {
        match dialect {
            Dialect::Native => Some(self.native.clone()),
            Dialect::Centrifugo => self
                .centrifugo
                .get_or_insert_with(|| {
                    let framed = (self.to_centrifugo)(self.native.as_str());
                    if framed.is_none() {
                        tracing::warn!("a push that cannot be framed for Centrifugo clients: they do not get it");
                    }
                    framed
                })
                .clone(),
        }
    }
}

/// What happened to a push.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Dropped: the connection is (now) a slow consumer.
    Slow,
    /// Dropped: the connection is gone; the subscriber can be forgotten.
    Closed,
    /// Framed into the connection's bytes as the first push since its last flush: the
    /// pusher must call [`Outbox::flush_direct`] (once, at the end of its pass).
    Direct,
}

impl Outbox {
    /// Queues `d` unless that would overflow the bounds; never waits. While the socket is
    /// lent, the push takes it back for the session (which writes it after the bytes
    /// already framed).
    pub fn push(&self, d: Delivery) -> Pushed {
        self.push_as(d, false)
    }

    /// Like [`Outbox::push`], but while the session lends its socket the push is framed
    /// straight into the connection's bytes (`Direct` on the first since the last flush:
    /// the caller then owes one [`Outbox::flush_direct`]).
    pub fn push_direct(&self, d: Delivery) -> Pushed {
        self.push_as(d, true)
    }

    fn push_as(&self, d: Delivery, direct: bool) -> Pushed {
        if self.closed.load(Ordering::Acquire) {
            return Pushed::Closed;
        }
        if self.slow.load(Ordering::Relaxed) {
            return Pushed::Slow;
        }
        let len = d.frame.len();
        let was_empty = {
            let mut q = self.queue.lock().expect("outbox queue");
            match q.direct.as_deref_mut() {
                Some(lent) if lent.on && direct && matches!(d.kind, Kind::Message | Kind::Event) => {
                    return self.frame_direct(lent, d)
                }
                Some(lent) if lent.on => {
                    // The session must see this one: the socket goes back with it.
                    lent.on = false;
                    self.ready.wake();
                }
                _ => {}
            }
            if q.items.len() >= self.max_messages || q.bytes + len > self.max_bytes {
                None
            } else {
                q.bytes += len;
                q.items.push_back(d);
                Some(q.items.len() == 1)
            }
        };
        match was_empty {
            None => self.overflowed(),
            Some(true) => {
                self.ready.wake();
                Pushed::Queued
            }
            Some(false) => Pushed::Queued,
        }
    }

    /// Appends `d`'s frame to the lent socket's bytes, as the session would write it:
    /// once per subscription and offset, under the same bounds.
    fn frame_direct(&self, lent: &mut Direct, d: Delivery) -> Pushed {
        let Some((_, delivered)) = lent.subs.iter_mut().find(|(sub, _)| *sub == d.sub) else {
            // Not a live subscription of this connection any more.
            return Pushed::Queued;
        };
        if d.kind == Kind::Message && d.offset <= *delivered {
            return Pushed::Queued;
        }
        let (head, head_len) = switchyard_proto::ws_text_head(d.frame.len());
        if lent.frames as usize >= self.max_messages || lent.out.len() + head_len + d.frame.len() > self.max_bytes {
            return self.overflowed();
        }
        if d.kind == Kind::Message {
            *delivered = d.offset;
        }
        let first = lent.out.is_empty();
        lent.out.extend_from_slice(&head[..head_len]);
        lent.out.extend_from_slice(&d.frame);
        lent.frames += 1;
        lent.frame_bytes += d.frame.len() as u64;
        if first {
            Pushed::Direct
        } else {
            Pushed::Queued
        }
    }

    /// Writes the bytes framed on the lent socket since the last flush, without waiting.
    /// What the socket does not take goes back to the session with the socket, and the
    /// session is woken to write it. Returns what was framed since the last flush.
    pub fn flush_direct(&self) -> Flushed {
        let mut q = self.queue.lock().expect("outbox queue");
        let Some(lent) = q.direct.as_deref_mut() else { return Flushed::default() };
        let flushed = Flushed { messages: lent.frames, bytes: lent.frame_bytes };
        lent.frames = 0;
        lent.frame_bytes = 0;
        if !lent.on || lent.out.is_empty() {
            return flushed;
        }
        while !lent.out.is_empty() {
            match lent.sink.try_write(&lent.out) {
                Ok(0) => break,
                Ok(n) => lent.out.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Full, or failed: the session takes over and meets it on its own write.
                Err(_) => break,
            }
        }
        if lent.out.is_empty() {
            // An idle connection keeps no buffer.
            lent.out = BytesMut::new();
        } else {
            lent.on = false;
            self.ready.wake();
        }
        flushed
    }

    /// A push found the queue full: the connection is a slow consumer from now on.
    fn overflowed(&self) -> Pushed {
        if !self.slow.swap(true, Ordering::SeqCst) {
            // Every waiter (a blocked write) enables itself before it checks
            // `is_slow`, so waking the registered ones loses no signal; a waiting
            // `recv_all` returns.
            self.slow_signal.notify_waiters();
            self.ready.wake();
        }
        Pushed::Slow
    }
}

impl Outbox {
    /// [`Outbox::push_direct`] for a fan-out pass: a lent socket that now owes a flush is
    /// added to `lent`, which the pass flushes once at its end ([`flush_lent`]). False when
    /// the connection is gone and its subscriber can be forgotten.
    pub fn fan_out(self: &Arc<Self>, d: Delivery, lent: &mut Vec<Arc<Outbox>>) -> bool {
        match self.push_direct(d) {
            Pushed::Closed => false,
            Pushed::Direct => {
                lent.push(self.clone());
                true
            }
            Pushed::Queued | Pushed::Slow => true,
        }
    }

    /// The protocol the connection speaks.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// True once the connection overflowed.
    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::SeqCst)
    }
}

impl Inbox {
    /// Everything queued, oldest first, once there is something; or nothing once the
    /// connection is slow, so that a waiting session learns it without a second signal
    /// to wait on. (It is then returned at once on every call: stop calling it.)
    ///
    /// While the socket is lent, it also returns (possibly nothing) once the socket is
    /// handed back, so that the session takes it back ([`Inbox::leave_direct`]).
    pub async fn recv_all(&mut self) -> VecDeque<Delivery> {
        std::future::poll_fn(|cx| {
            self.outbox.ready.register(cx.waker());
            let (all, handed_back) = {
                let mut q = self.outbox.queue.lock().expect("outbox queue");
                let handed_back = q.direct.as_ref().is_some_and(|lent| !lent.on);
                (take(&mut q, &mut self.spare), handed_back)
            };
            if all.is_empty() && !handed_back && !self.outbox.is_slow() {
                Poll::Pending
            } else {
                Poll::Ready(all)
            }
        })
        .await
    }

    /// Lends the socket's write side to the pushers (see the direct path) with each live
    /// subscription and the last offset written to it. Refused (false) while anything is
    /// queued, or once the connection is slow.
    pub fn enter_direct(&mut self, sink: Arc<dyn DirectSink>, subs: Vec<(u64, u64)>) -> bool {
        if self.outbox.is_slow() {
            return false;
        }
        let mut q = self.outbox.queue.lock().expect("outbox queue");
        if !q.items.is_empty() || q.direct.is_some() {
            return false;
        }
        q.direct = Some(Box::new(Direct { sink, on: true, subs, out: BytesMut::new(), frames: 0, frame_bytes: 0 }));
        true
    }

    /// Takes the socket back: the offsets written meanwhile and the bytes framed but not
    /// yet written (the socket's next bytes). None when it was not lent.
    pub fn leave_direct(&mut self) -> Option<Returned> {
        let lent = self.outbox.queue.lock().expect("outbox queue").direct.take()?;
        let Direct { subs, out, .. } = *lent;
        Some(Returned { subs, unwritten: out.freeze() })
    }

    /// Everything queued now (possibly nothing).
    pub fn try_recv_all(&mut self) -> VecDeque<Delivery> {
        let mut q = self.outbox.queue.lock().expect("outbox queue");
        take(&mut q, &mut self.spare)
    }

    /// Hands back a queue taken by `recv_all` once it is drained, for the next burst.
    pub fn recycle(&mut self, mut used: VecDeque<Delivery>) {
        used.clear();
        if used.capacity() <= SPARE_SLOTS && used.capacity() > self.spare.capacity() {
            self.spare = used;
        }
    }

    /// The next delivery, waiting for one.
    pub async fn recv(&mut self) -> Delivery {
        std::future::poll_fn(|cx| {
            self.outbox.ready.register(cx.waker());
            match self.try_recv() {
                Some(d) => Poll::Ready(d),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// The next delivery if one is queued.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        let mut q = self.outbox.queue.lock().expect("outbox queue");
        let d = q.items.pop_front()?;
        q.bytes -= d.frame.len();
        Some(d)
    }
}

/// Writes what was framed into each of the `lent` sockets (see [`Outbox::flush_direct`]),
/// one `send` each, and counts it as delivered. Empties `lent`.
pub fn flush_lent(lent: &mut Vec<Arc<Outbox>>, metrics: &switchyard_metrics::Metrics) {
    if lent.is_empty() {
        return;
    }
    let (mut messages, mut bytes) = (0, 0);
    for outbox in lent.drain(..) {
        let flushed = outbox.flush_direct();
        messages += flushed.messages;
        bytes += flushed.bytes;
    }
    metrics.messages_delivered.inc_by(messages);
    metrics.messages_delivered_direct.inc_by(messages);
    metrics.bytes_delivered.inc_by(bytes);
}

/// Everything queued, leaving `spare`'s room in its place.
fn take(q: &mut Queue, spare: &mut VecDeque<Delivery>) -> VecDeque<Delivery> {
    if q.items.is_empty() {
        return VecDeque::new();
    }
    q.bytes = 0;
    std::mem::replace(&mut q.items, std::mem::take(spare))
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.outbox.closed.store(true, Ordering::Release);
        // Frames already queued are freed now, not when the last owner forgets the outbox.
        let _ = std::mem::take(&mut *self.outbox.queue.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: usize) -> Delivery {
        Delivery { sub: 1, offset: 1, frame: Text::from("x".repeat(n)), kind: Kind::Message }
    }

    #[test]
    fn overflow_by_count_marks_slow_once() {
        let (o, mut inbox) = outbox(2, 1000);
        assert_eq!(o.push(d(1)), Pushed::Queued);
        assert_eq!(o.push(d(1)), Pushed::Queued);
        assert_eq!(o.push(d(1)), Pushed::Slow);
        assert!(o.is_slow());
        assert!(inbox.try_recv().is_some());
        assert_eq!(o.push(d(1)), Pushed::Slow, "slow is final");
    }

    /// A session waiting for pushes learns that its connection turned slow.
    #[tokio::test]
    async fn a_waiting_inbox_returns_when_the_connection_turns_slow() {
        let (o, mut inbox) = outbox(10, 5);
        let waiter = tokio::spawn(async move { inbox.recv_all().await.len() });
        tokio::task::yield_now().await;
        assert_eq!(o.push(d(6)), Pushed::Slow, "too large for the byte bound");
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await;
        assert_eq!(got.expect("woken").unwrap(), 0, "nothing was queued");
    }

    #[test]
    fn overflow_by_bytes_and_closed() {
        let (o, mut inbox) = outbox(100, 10);
        assert_eq!(o.push(d(6)), Pushed::Queued);
        assert!(inbox.try_recv().is_some());
        assert_eq!(o.push(d(6)), Pushed::Queued, "bytes are released on receive");
        assert_eq!(o.push(d(6)), Pushed::Slow);
        let (o, inbox) = outbox(100, 10);
        drop(inbox);
        assert_eq!(o.push(d(1)), Pushed::Closed);
    }

    /// A burst wakes the inbox once and comes out whole; a push after the take wakes it
    /// again.
    #[tokio::test]
    async fn a_burst_comes_out_whole_and_in_order() {
        let (o, mut inbox) = outbox(100, 1000);
        for _ in 0..5 {
            assert_eq!(o.push(d(1)), Pushed::Queued);
        }
        let all = inbox.recv_all().await;
        assert_eq!(all.len(), 5);
        assert!(inbox.try_recv_all().is_empty());
        let waiter = tokio::spawn(async move { inbox.recv_all().await.len() });
        tokio::task::yield_now().await;
        assert_eq!(o.push(d(10)), Pushed::Queued);
        assert_eq!(waiter.await.unwrap(), 1);
    }

    /// `recv` takes one at a time without a wake-up per message, and a waiting `recv` is
    /// woken by the next push.
    #[tokio::test]
    async fn recv_takes_what_is_queued_and_wakes_on_the_next_push() {
        let (o, mut inbox) = outbox(100, 1000);
        for n in 1..=3 {
            assert_eq!(o.push(d(n)), Pushed::Queued);
        }
        for n in 1..=3 {
            assert_eq!(inbox.recv().await.frame.len(), n);
        }
        let waiter = tokio::spawn(async move { inbox.recv().await.frame.len() });
        tokio::task::yield_now().await;
        assert_eq!(o.push(d(7)), Pushed::Queued);
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await;
        assert_eq!(got.expect("woken").unwrap(), 7);
    }

    /// Drained queues handed back take the following bursts: after the first two, no burst
    /// allocates. A large queue is not kept, and the byte bound counts from zero.
    #[test]
    fn recycled_queues_take_the_next_bursts() {
        let (o, mut inbox) = outbox(100, 1000);
        let mut burst = |n: usize| {
            for _ in 0..n {
                assert_eq!(o.push(d(1)), Pushed::Queued);
            }
            let q = inbox.try_recv_all();
            let at = q.as_slices().0.as_ptr();
            inbox.recycle(q);
            at
        };
        let (a, b) = (burst(3), burst(3));
        assert_eq!((burst(3), burst(3), burst(3)), (a, b, a), "two queues take turns");
        burst(SPARE_SLOTS * 2);
        assert!(inbox.spare.capacity() <= SPARE_SLOTS, "a large queue is not kept");
        assert_eq!(o.push(d(900)), Pushed::Queued, "bytes counted from zero after a take");
    }

    /// A socket that takes up to `room` bytes, then reports itself full.
    struct Recorder {
        out: Mutex<Vec<u8>>,
        room: Mutex<usize>,
    }

    impl Recorder {
        fn new(room: usize) -> Arc<Self> {
            Arc::new(Recorder { out: Mutex::default(), room: Mutex::new(room) })
        }

        fn written(&self) -> Vec<u8> {
            self.out.lock().unwrap().clone()
        }
    }

    impl DirectSink for Recorder {
        fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
            let mut room = self.room.lock().unwrap();
            if *room == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(*room);
            *room -= n;
            self.out.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    fn at(sub: u64, offset: u64, text: &str) -> Delivery {
        Delivery { sub, offset, frame: Text::from(text), kind: Kind::Message }
    }

    /// A text frame as the session's socket writes it.
    fn framed(text: &str) -> Vec<u8> {
        let (head, n) = switchyard_proto::ws_text_head(text.len());
        [&head[..n], text.as_bytes()].concat()
    }

    /// While the socket is lent, pushes are framed once per offset and subscription, in
    /// order, and one flush writes them all; the session gets the offsets back.
    #[test]
    fn a_lent_socket_takes_each_push_once_and_one_flush_writes_them() {
        let (o, mut inbox) = outbox(100, 1000);
        let sink = Recorder::new(usize::MAX);
        assert!(inbox.enter_direct(sink.clone(), vec![(1, 5), (2, 0)]));
        assert_eq!(o.push_direct(at(1, 5, "old")), Pushed::Queued, "catch-up wrote 5 already");
        assert_eq!(o.push_direct(at(1, 6, "six")), Pushed::Direct, "the first since the flush");
        assert_eq!(o.push_direct(at(2, 1, "one")), Pushed::Queued, "the flush is owed already");
        assert_eq!(o.push_direct(at(9, 1, "gone")), Pushed::Queued, "not a subscription here");
        assert!(sink.written().is_empty(), "nothing is written before the flush");
        assert_eq!(o.flush_direct(), Flushed { messages: 2, bytes: 6 });
        assert_eq!(sink.written(), [framed("six"), framed("one")].concat());
        assert_eq!(o.flush_direct(), Flushed::default(), "nothing new");
        assert_eq!(o.push_direct(at(1, 7, "seven")), Pushed::Direct, "a new flush is owed");
        o.flush_direct();
        assert!(inbox.try_recv_all().is_empty(), "nothing went through the queue");
        let back = inbox.leave_direct().expect("lent");
        let mut subs = back.subs;
        subs.sort();
        assert_eq!(subs, vec![(1, 7), (2, 1)]);
        assert!(back.unwritten.is_empty());
        assert!(inbox.leave_direct().is_none(), "taken back once");
    }

    /// A socket that does not take everything goes back to the session, which is woken
    /// and gets the unwritten bytes (the rest of a frame first); later pushes queue.
    #[tokio::test]
    async fn a_full_socket_goes_back_to_the_session_with_its_unwritten_bytes() {
        let (o, mut inbox) = outbox(100, 1000);
        let sink = Recorder::new(3);
        assert!(inbox.enter_direct(sink.clone(), vec![(1, 0)]));
        assert_eq!(o.push_direct(at(1, 1, "first")), Pushed::Direct);
        assert_eq!(o.push_direct(at(1, 2, "second")), Pushed::Queued);
        assert_eq!(o.flush_direct().messages, 2);
        let woken = tokio::time::timeout(std::time::Duration::from_secs(10), inbox.recv_all()).await;
        assert!(woken.expect("the handback wakes the session").is_empty());
        assert_eq!(o.push_direct(at(1, 3, "third")), Pushed::Queued, "queued for the session");
        let back = inbox.leave_direct().expect("lent");
        assert_eq!(back.subs, vec![(1, 2)]);
        let mut wire = sink.written();
        assert_eq!(wire.len(), 3, "the socket took part of the first frame");
        wire.extend_from_slice(&back.unwritten);
        assert_eq!(wire, [framed("first"), framed("second")].concat());
        let queued = inbox.try_recv_all();
        assert_eq!(queued.iter().map(|d| d.offset).collect::<Vec<_>>(), vec![3]);
    }

    /// Any other push (an end, a gateway's) takes the socket back: the session writes it
    /// after what was framed; the socket is not lent while anything is queued.
    #[tokio::test]
    async fn a_plain_push_takes_the_socket_back() {
        let (o, mut inbox) = outbox(100, 1000);
        let sink = Recorder::new(usize::MAX);
        assert!(inbox.enter_direct(sink.clone(), vec![(1, 0)]));
        assert_eq!(o.push_direct(at(1, 1, "direct")), Pushed::Direct);
        assert_eq!(o.push(at(1, 2, "plain")), Pushed::Queued);
        assert_eq!(o.push_direct(at(1, 3, "after")), Pushed::Queued, "queued behind the plain one");
        assert_eq!(o.flush_direct().messages, 1);
        assert!(sink.written().is_empty(), "handed back before the flush: the session writes it");
        let got = inbox.recv_all().await;
        assert_eq!(got.iter().map(|d| d.offset).collect::<Vec<_>>(), vec![2, 3]);
        let back = inbox.leave_direct().expect("lent");
        assert_eq!(&back.unwritten[..], &framed("direct")[..]);
        assert_eq!(o.push(at(1, 4, "queued")), Pushed::Queued);
        assert!(!inbox.enter_direct(sink, vec![(1, 3)]), "not lent while a push is queued");
    }

    /// The queue's bounds hold for what a lent socket has framed and not written.
    #[test]
    fn lent_pushes_keep_the_bounds() {
        let (o, mut inbox) = outbox(2, 1000);
        assert!(inbox.enter_direct(Recorder::new(0), vec![(1, 0)]));
        assert_eq!(o.push_direct(at(1, 1, "a")), Pushed::Direct);
        assert_eq!(o.push_direct(at(1, 2, "b")), Pushed::Queued);
        assert_eq!(o.push_direct(at(1, 3, "c")), Pushed::Slow, "two pushes at most");
        assert!(o.is_slow());
        let (o, mut inbox) = outbox(100, 10);
        assert!(inbox.enter_direct(Recorder::new(0), vec![(1, 0)]));
        assert_eq!(o.push_direct(at(1, 1, "12345")), Pushed::Direct);
        assert_eq!(o.push_direct(at(1, 2, "12345")), Pushed::Slow, "10 bytes at most, headers counted");
        assert!(!inbox.enter_direct(Recorder::new(0), vec![]), "a slow connection lends nothing");
    }
}

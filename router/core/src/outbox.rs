//! The outbound queue of one connection, shared by the partition owners that feed it.
//!
//! It owns the slow-consumer rule: the queue is bounded in messages and bytes, a push that
//! would overflow it marks the connection slow and wakes its session, and nothing ever
//! waits on it. An owner's fan-out therefore never slows down for one stuck client. The
//! session takes everything queued in one go, and a burst wakes it once. It must never
//! wait: its lock (one per connection) is held only to append or to take the queue.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use switchyard_proto::Text;
use tokio::sync::Notify;

/// One message for one subscription of the connection.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The session's id for the subscription it belongs to.
    pub sub: u64,
    /// Message offset.
    pub offset: u64,
    /// The shared, serialize-once push frame.
    pub frame: Text,
    /// True when `frame` is an `unsubscribed` push that ends the subscription (the owner
    /// has already forgotten it).
    pub end: bool,
}

/// What is queued: the deliveries and their frame bytes. An empty queue holds at most the
/// room of a small recycled one ([`SPARE_SLOTS`]).
#[derive(Default)]
struct Queue {
    items: VecDeque<Delivery>,
    bytes: usize,
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

/// A new queue bounded by `max_messages` and `max_bytes`.
pub fn outbox(max_messages: usize, max_bytes: usize) -> (Arc<Outbox>, Inbox) {
    let outbox = Arc::new(Outbox {
        queue: Mutex::default(),
        ready: AtomicWaker::new(),
        max_messages,
        max_bytes,
        slow: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        slow_signal: Notify::new(),
    });
    (outbox.clone(), Inbox { outbox, spare: VecDeque::new() })
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
}

impl Outbox {
    /// Queues `d` unless that would overflow the bounds; never waits.
    pub fn push(&self, d: Delivery) -> Pushed {
        if self.closed.load(Ordering::Acquire) {
            return Pushed::Closed;
        }
        if self.slow.load(Ordering::Relaxed) {
            return Pushed::Slow;
        }
        let len = d.frame.len();
        let was_empty = {
            let mut q = self.queue.lock().expect("outbox queue");
            if q.items.len() >= self.max_messages || q.bytes + len > self.max_bytes {
                None
            } else {
                q.bytes += len;
                q.items.push_back(d);
                Some(q.items.len() == 1)
            }
        };
        match was_empty {
            None => {
                if !self.slow.swap(true, Ordering::SeqCst) {
                    // Every waiter (a blocked write) enables itself before it checks
                    // `is_slow`, so waking the registered ones loses no signal; a waiting
                    // `recv_all` returns.
                    self.slow_signal.notify_waiters();
                    self.ready.wake();
                }
                Pushed::Slow
            }
            Some(true) => {
                self.ready.wake();
                Pushed::Queued
            }
            Some(false) => Pushed::Queued,
        }
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
    pub async fn recv_all(&mut self) -> VecDeque<Delivery> {
        std::future::poll_fn(|cx| {
            self.outbox.ready.register(cx.waker());
            let all = self.try_recv_all();
            if all.is_empty() && !self.outbox.is_slow() {
                Poll::Pending
            } else {
                Poll::Ready(all)
            }
        })
        .await
    }

    /// Everything queued now (possibly nothing).
    pub fn try_recv_all(&mut self) -> VecDeque<Delivery> {
        let mut q = self.outbox.queue.lock().expect("outbox queue");
        if q.items.is_empty() {
            return VecDeque::new();
        }
        q.bytes = 0;
        std::mem::replace(&mut q.items, std::mem::take(&mut self.spare))
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
        Delivery { sub: 1, offset: 1, frame: Text::from("x".repeat(n)), end: false }
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
}

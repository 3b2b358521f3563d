//! The outbound queue of one connection, shared by the partition owners that feed it.
//!
//! It owns the slow-consumer rule: the queue is bounded in messages and bytes, a push that
//! would overflow it marks the connection slow and wakes its session, and nothing ever
//! waits on it. An owner's fan-out therefore never slows down for one stuck client. It must
//! never block and never hold a lock.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use switchyard_proto::Text;
use tokio::sync::{mpsc, Notify};

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

/// The sending side, held (behind an `Arc`) by every owner the connection subscribes through.
pub struct Outbox {
    tx: mpsc::UnboundedSender<Delivery>,
    queued: AtomicUsize,
    queued_bytes: AtomicUsize,
    max_messages: usize,
    max_bytes: usize,
    slow: AtomicBool,
    /// Wakes every registered waiter when the connection becomes slow.
    pub slow_signal: Notify,
}

/// The receiving side, owned by the session.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Delivery>,
}

/// A new queue bounded by `max_messages` and `max_bytes`.
pub fn outbox(max_messages: usize, max_bytes: usize) -> (std::sync::Arc<Outbox>, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let outbox = Outbox {
        tx,
        queued: AtomicUsize::new(0),
        queued_bytes: AtomicUsize::new(0),
        max_messages,
        max_bytes,
        slow: AtomicBool::new(false),
        slow_signal: Notify::new(),
    };
    (std::sync::Arc::new(outbox), Inbox { rx })
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
        if self.tx.is_closed() {
            return Pushed::Closed;
        }
        if self.slow.load(Ordering::Relaxed) {
            return Pushed::Slow;
        }
        let len = d.frame.len();
        let n = self.queued.fetch_add(1, Ordering::Relaxed) + 1;
        let b = self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        if n > self.max_messages || b > self.max_bytes {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            if !self.slow.swap(true, Ordering::SeqCst) {
                // Every waiter (the session loop, a blocked write) enables itself before it
                // checks `is_slow`, so waking the registered ones loses no signal.
                self.slow_signal.notify_waiters();
            }
            return Pushed::Slow;
        }
        match self.tx.send(d) {
            Ok(()) => Pushed::Queued,
            Err(_) => Pushed::Closed,
        }
    }

    /// True once the connection overflowed.
    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::SeqCst)
    }

    fn taken(&self, d: &Delivery) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        self.queued_bytes.fetch_sub(d.frame.len(), Ordering::Relaxed);
    }
}

impl Inbox {
    /// Waits for the next delivery.
    pub async fn recv(&mut self, outbox: &Outbox) -> Option<Delivery> {
        let d = self.rx.recv().await?;
        outbox.taken(&d);
        Some(d)
    }

    /// The next delivery if one is queued.
    pub fn try_recv(&mut self, outbox: &Outbox) -> Option<Delivery> {
        let d = self.rx.try_recv().ok()?;
        outbox.taken(&d);
        Some(d)
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
        assert!(inbox.try_recv(&o).is_some());
        assert_eq!(o.push(d(1)), Pushed::Slow, "slow is final");
    }

    #[test]
    fn overflow_by_bytes_and_closed() {
        let (o, mut inbox) = outbox(100, 10);
        assert_eq!(o.push(d(6)), Pushed::Queued);
        assert!(inbox.try_recv(&o).is_some());
        assert_eq!(o.push(d(6)), Pushed::Queued, "bytes are released on receive");
        assert_eq!(o.push(d(6)), Pushed::Slow);
        let (o, inbox) = outbox(100, 10);
        drop(inbox);
        assert_eq!(o.push(d(1)), Pushed::Closed);
    }
}

//! The direct path: lending the session's socket write side to the partition owners, and
//! taking it back.
//!
//! It owns when the socket may be lent (nothing of the session's own in flight, no message
//! held, every subscription live) and the hand-back: the offsets the owners wrote and the
//! bytes they framed that the socket did not take yet. It must never lend while a reply, a
//! held message or a queued byte waits, and the session never writes while it is lent:
//! whatever wakes the session takes the socket back first.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Phase, Session, Sub};

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // === the direct path ===

    /// Lends the socket's write side to the owners when the session has nothing of its
    /// own in flight: no reply, nothing queued or held, and every subscription live (so
    /// an owner's push needs nothing but its offset checked).
    pub(super) fn lend_socket(&mut self) {
        let Some(sink) = &self.sink else { return };
        if self.lent
            || self.pack
            || self.subs.is_empty()
            || !self.pending.is_empty()
            || self.held_bytes > 0
            || self.ws.get_ref().queued() > 0
            || *self.shutdown.borrow()
        {
            return;
        }
        let mut live = Vec::with_capacity(self.subs.len());
        for (&sub, s) in &self.subs {
            match s.phase {
                Phase::Live { delivered } => live.push((sub, delivered)),
                Phase::Pending(_) => return,
            }
        }
        if self.inbox.enter_direct(sink.clone(), live) {
            self.lent = true;
            self.ws.get_mut().set_lent(true);
        }
    }

    /// Takes the socket back from the owners: the offsets they wrote, and the bytes they
    /// framed that the socket did not take yet, which go out before anything else.
    pub(super) fn take_socket_back(&mut self) {
        if !std::mem::take(&mut self.lent) {
            return;
        }
        let socket = self.ws.get_mut();
        socket.set_lent(false);
        if let Some(back) = self.inbox.leave_direct() {
            for (sub, written) in back.subs {
                if let Some(Sub { phase: Phase::Live { delivered }, .. }) = self.subs.get_mut(&sub) {
                    *delivered = (*delivered).max(written);
                }
            }
            socket.unshift_raw(back.unwritten);
        }
        // Those bytes, and whatever tungstenite queued meanwhile (a pong), go out with
        // the next flush.
        if socket.queued() > 0 {
            self.unflushed = true;
        }
    }
}

//! Delivering: subscribe replies, catch-up from the store, and the owners' pushes.
//!
//! It owns each subscription's phase: pending (live messages held, bounded like the
//! outbox) until its reply and catch-up are written, then live, where a push is written
//! only past the last offset delivered, so there is no gap and no duplicate. It must never
//! write a subscription's message before its subscribe reply, nor go live over a hole: a
//! catch-up that finds one ends the subscription with `unsubscribed`.

use futures_util::FutureExt;
use switchyard_core::outbox::{Delivery, Kind};
use switchyard_core::owner::{Grant, Start};
use switchyard_core::partitions::OwnedMessage;
use switchyard_proto::centrifugo as cf;
use switchyard_proto::protocol::{self, ErrorCode, OpError, StartFrom, SubscribeOk};
use switchyard_proto::Dialect;
use tokio::io::{AsyncRead, AsyncWrite};

use super::dialect::{self, To};
use super::{Output, Phase, Session, Stop, Sub};
use crate::node::Node;
use crate::recovery::Admitted;

/// Catch-up is read from the store in pages of this many messages.
const CATCH_UP_PAGE: usize = 256;

/// What a subscribe that may need a catch-up holds of the reply budget while its first page
/// waits for its turn to be written (a page is usually well under it; reading pauses at the
/// budget, so a client pipelining subscribes holds a bounded number of pages).
pub(super) const AHEAD_RESERVE: usize = 64 * 1024;

/// One catch-up page: messages, and the channel's first retained offset.
type Page = Result<(Vec<OwnedMessage>, u64), OpError>;

/// A subscription's catch-up, begun in its reply's future as soon as the grant arrived:
/// the grants and first pages of a client's many subscribes proceed concurrently, and the
/// session writes each in its turn (reply, catch-up, then live: the order is unchanged).
pub(super) enum Ahead {
    /// Nothing to read ahead (no catch-up, or the grant failed).
    None,
    /// The first page (or why it could not be read), and for a recovery the node's
    /// catch-up permit, held until the subscription is live.
    Read { permit: Option<Admitted>, first: Page },
    /// A recovery over the node's catch-up bound: refused with this error.
    Refused(OpError),
}

/// Admits a granted subscription's catch-up (recoveries only: other starts are not
/// refused) and reads its first page.
pub(super) async fn ahead(node: &Node, channel: &str, result: &Result<Grant, OpError>) -> Ahead {
    let Ok(grant) = result else { return Ahead::None };
    let Some(after) = grant.catch_up_after else { return Ahead::None };
    let permit = match grant.recovered {
        Some(true) => match node.recoveries.admit() {
            Ok(permit) => Some(permit),
            Err(e) => return Ahead::Refused(e),
        },
        _ => None,
    };
    let first = node.router.catch_up(channel, &grant.epoch, after, grant.top, CATCH_UP_PAGE).await;
    Ahead::Read { permit, first }
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // === delivering ===

    pub(super) async fn on_output(&mut self, out: Output) -> Result<(), Stop> {
        match out {
            Output::Frame(frame) => self.write(frame).await,
            Output::Subscribed { to, sub, channel, result, reject_unrecovered, ahead } => match result {
                Err(e) => {
                    self.forget_sub(sub, &channel);
                    let frame = self.reply_error(Some(to.id), &e);
                    self.write(frame).await
                }
                Ok(grant) if reject_unrecovered && grant.recovered == Some(false) => {
                    // Centrifugo's flag: the client would rather know than start over.
                    if self.forget_sub(sub, &channel) {
                        self.node.router.unsubscribe(&channel, sub).await;
                    }
                    self.write(dialect::cf_error(to, cf::code::UNRECOVERABLE_POSITION, "unrecoverable position")).await
                }
                Ok(grant) => {
                    // A recovery over the node's catch-up bound is refused: it was granted,
                    // so the owner forgets it again.
                    let (_admitted, first) = match ahead {
                        Ahead::None => (None, None),
                        Ahead::Read { permit, first } => (permit, Some(first)),
                        Ahead::Refused(e) => {
                            self.node.metrics.recovery_refusals.inc();
                            if self.forget_sub(sub, &channel) {
                                self.node.router.unsubscribe(&channel, sub).await;
                            }
                            let frame = self.reply_error(Some(to.id), &e);
                            return self.write(frame).await;
                        }
                    };
                    // A native reply goes first; Centrifugo's carries the first recovered
                    // messages, so it is written with the first catch-up page.
                    let mut reply = None;
                    match self.dialect {
                        Dialect::Native => {
                            let ok = SubscribeOk {
                                channel: channel.clone(),
                                epoch: grant.epoch.to_string(),
                                offset: grant.offset,
                                recovered: grant.recovered,
                            };
                            self.write(protocol::ok_reply(to.id, &ok)).await?;
                        }
                        Dialect::Centrifugo => reply = Some(to),
                    }
                    if self.subs.contains_key(&sub) {
                        self.join_presence(&channel);
                        // Catch-up's future is the largest of the loop's: boxed, idle
                        // sessions do not carry its size.
                        Box::pin(self.go_live(sub, &channel, &grant, reply, first)).await?;
                    } else {
                        self.write_subscribed(&mut reply, &grant, &[]).await?;
                    }
                    Ok(())
                }
            },
            Output::Moved { sub, channel, result } => match result {
                // Still subscribed, and the stream continues exactly: catch up and go live.
                Ok(grant) if grant.recovered == Some(true) && self.subs.contains_key(&sub) => {
                    Box::pin(self.go_live(sub, &channel, &grant, None, None)).await
                }
                Ok(_) if !self.subs.contains_key(&sub) => Ok(()),
                Ok(_) => {
                    let reason = "channel restarted under a new epoch; subscribe again to recover";
                    self.end_subscription(sub, &channel, reason).await
                }
                Err(e) => {
                    if !self.subs.contains_key(&sub) {
                        return Ok(());
                    }
                    tracing::debug!(channel, error = %e, "moving a subscription to the owner here failed");
                    self.end_subscription(sub, &channel, &format!("{}; subscribe again", e.message)).await
                }
            },
        }
    }

    /// The gateway subscription `sub` ended because its channel moved onto this node
    /// (`epoch` is the one the session was granted under): subscribes at the owner here,
    /// recovering from the last offset written, with live messages held until caught up.
    /// The client sees nothing of it but the messages.
    async fn move_here(&mut self, sub: u64, epoch: &str) -> Result<(), Stop> {
        let Some(s) = self.subs.get_mut(&sub) else { return Ok(()) };
        let Phase::Live { delivered } = s.phase else { return Ok(()) };
        s.phase = Phase::Pending(Vec::new());
        let channel = s.channel.clone();
        let start = Start::From(StartFrom::Recover { offset: delivered, epoch: epoch.to_string() });
        match self.node.router.subscribe(&channel, sub, self.outbox.clone(), start).await {
            Ok(rx) => {
                self.queue(
                    async move {
                        let result = rx
                            .await
                            .unwrap_or_else(|_| Err(OpError::new(ErrorCode::Unavailable, "partition owner stopped")));
                        Output::Moved { sub, channel, result }
                    }
                    .boxed(),
                );
                Ok(())
            }
            Err(e) => self.end_subscription(sub, &channel, &format!("{}; subscribe again", e.message)).await,
        }
    }

    /// Forgets a subscription the session still holds; true if it did.
    fn forget_sub(&mut self, sub: u64, channel: &str) -> bool {
        if self.remove_sub(sub).is_none() {
            return false;
        }
        self.by_channel.remove(channel);
        self.node.metrics.subscriptions.dec();
        true
    }

    /// Writes Centrifugo's subscribe reply, if it is still owed, with `page` as its
    /// recovered publications.
    async fn write_subscribed(
        &mut self,
        reply: &mut Option<To>,
        grant: &Grant,
        page: &[OwnedMessage],
    ) -> Result<(), Stop> {
        let Some(to) = reply.take() else { return Ok(()) };
        let result = dialect::CfSubscribed::new(&grant.epoch, grant.offset, grant.recovered, page);
        self.delivered += page.len() as u64;
        self.write(cf::reply(to.id as u32, "subscribe", &result)).await
    }

    /// Pushes the catch-up range from the store, then the live messages held meanwhile.
    /// If retention trims part of the range before it is read (or a read fails), the
    /// subscription ends with an `unsubscribed` push instead of going live over a hole:
    /// the client subscribes again and recovery tells it what was lost. A Centrifugo
    /// subscribe reply still owed (`reply`) carries the first page.
    /// `ahead` is the first page, when it was read ahead ([`ahead`]).
    async fn go_live(
        &mut self,
        sub: u64,
        channel: &str,
        grant: &Grant,
        mut reply: Option<To>,
        mut ahead: Option<Page>,
    ) -> Result<(), Stop> {
        if let Some(mut after) = grant.catch_up_after {
            while after < grant.top {
                let read = match ahead.take() {
                    Some(page) => page,
                    None => self.node.router.catch_up(channel, &grant.epoch, after, grant.top, CATCH_UP_PAGE).await,
                };
                let (page, first) = match read {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(channel, error = %e, "catch-up read failed");
                        self.write_subscribed(&mut reply, grant, &[]).await?;
                        return self.end_subscription(sub, channel, "catch-up read failed; subscribe again").await;
                    }
                };
                let next = page.first().map_or(grant.top + 1, |m| m.offset);
                // Retention (not compaction) removed messages just above `after`.
                if next > after + 1 && first > after + 1 {
                    self.write_subscribed(&mut reply, grant, &[]).await?;
                    let reason = "history trimmed during catch-up; subscribe again to recover";
                    return self.end_subscription(sub, channel, reason).await;
                }
                let Some(last) = page.last() else { break };
                after = last.offset;
                if reply.is_some() {
                    self.write_subscribed(&mut reply, grant, &page).await?;
                    continue;
                }
                for m in &page {
                    let frame = dialect::message(self.dialect, m);
                    self.push_message(frame).await?;
                }
            }
        }
        self.write_subscribed(&mut reply, grant, &[]).await?;
        let held = match self.subs.get_mut(&sub) {
            Some(s) => std::mem::replace(&mut s.phase, Phase::Live { delivered: grant.live_after }),
            None => return Ok(()),
        };
        if let Phase::Pending(held) = held {
            for d in held {
                self.held_bytes -= d.frame.len();
                self.deliver(d).await?;
            }
        }
        Ok(())
    }

    /// Forgets a subscription, and the live messages it held while catching up.
    pub(super) fn remove_sub(&mut self, sub: u64) -> Option<Sub> {
        let s = self.subs.remove(&sub)?;
        if let Phase::Pending(held) = &s.phase {
            self.held_bytes -= held.iter().map(|d| d.frame.len()).sum::<usize>();
        }
        Some(s)
    }

    /// Ends one subscription from the server side with an `unsubscribed` push.
    async fn end_subscription(&mut self, sub: u64, channel: &str, reason: &str) -> Result<(), Stop> {
        if self.forget_sub(sub, channel) {
            self.node.router.unsubscribe(channel, sub).await;
            self.leave_presence(channel);
        }
        self.write(dialect::resubscribe(self.dialect, channel, reason)).await
    }

    /// Writes a wake-up's pushes, then, at the end of the runtime pass, what the owners
    /// queued meanwhile, and flushes once.
    pub(super) async fn on_pushes(&mut self, batch: std::collections::VecDeque<Delivery>) -> Result<(), Stop> {
        self.on_deliveries(batch).await?;
        tokio::task::yield_now().await;
        self.uncork().await
    }

    /// Writes everything the owners queued since the last wake-up; the loop flushes once
    /// after it.
    pub(super) async fn on_deliveries(&mut self, mut batch: std::collections::VecDeque<Delivery>) -> Result<(), Stop> {
        while let Some(d) = batch.pop_front() {
            self.deliver(d).await?;
        }
        self.inbox.recycle(batch);
        Ok(())
    }

    pub(super) async fn deliver(&mut self, d: Delivery) -> Result<(), Stop> {
        if d.kind == Kind::Moved {
            // Behind the subscribe reply, like an end.
            if let Some(Sub { phase: Phase::Pending(held), .. }) = self.subs.get_mut(&d.sub) {
                self.held_bytes += d.frame.len();
                held.push(d);
                return Ok(());
            }
            return self.move_here(d.sub, d.frame.as_str()).await;
        }
        if d.kind == Kind::End {
            // The owner ended it (its partition moved): it has forgotten the subscription.
            // Before the subscribe reply is written, the end waits behind it with the held
            // messages: the client never sees a subscription end before it began.
            if let Some(Sub { phase: Phase::Pending(held), .. }) = self.subs.get_mut(&d.sub) {
                self.held_bytes += d.frame.len();
                held.push(d);
                return Ok(());
            }
            let Some(sub) = self.remove_sub(d.sub) else { return Ok(()) };
            self.by_channel.remove(&sub.channel);
            self.node.metrics.subscriptions.dec();
            self.leave_presence(&sub.channel);
            return match self.dialect {
                Dialect::Native => self.write(d.frame).await,
                // The owner framed the native push: this client reads its own form of it.
                Dialect::Centrifugo => {
                    self.write(dialect::resubscribe(self.dialect, &sub.channel, "the channel moved; subscribe again"))
                        .await
                }
            };
        }
        let Some(sub) = self.subs.get_mut(&d.sub) else { return Ok(()) };
        if d.kind == Kind::Event {
            // Presence news carries no offset: only a live subscription shows it.
            return match sub.phase {
                Phase::Live { .. } => self.push_message(d.frame).await,
                Phase::Pending(_) => Ok(()),
            };
        }
        match &mut sub.phase {
            Phase::Pending(held) => {
                // Held messages left the outbox's accounting: bound them by the same limits.
                let limits = &self.node.config.limits;
                if held.len() >= limits.outbound_queue_messages
                    || self.held_bytes + d.frame.len() > limits.outbound_queue_bytes
                {
                    return Err(Stop::Slow);
                }
                self.held_bytes += d.frame.len();
                held.push(d)
            }
            Phase::Live { delivered } => {
                if d.offset > *delivered {
                    *delivered = d.offset;
                    self.push_message(d.frame).await?;
                }
            }
        }
        Ok(())
    }
}

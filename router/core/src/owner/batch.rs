//! One batch of a partition owner's commands on its way to the store: writes (publish,
//! commit, trim) change the channels' state and fill one store batch, reads and
//! registrations wait in [`Work`] until it is durable, and [`Owner::finish`] writes it
//! (stamped for the followers when the partition is replicated), rolls the state back if
//! the store refuses it, and hands it to `release` or parks it for the high watermark.
//!
//! It owns the write path: it must never acknowledge, fan out or answer a read before
//! the batch is durable (that is `release`), and never wait on anything but the store and
//! the partition's apply lock.

use std::sync::Arc;

use switchyard_proto::protocol::{self, MessageView, OpError, PublishOk, StartFrom};
use switchyard_proto::Text;
use switchyard_store::{ChannelMeta, StoredMessage};
use tokio::sync::{mpsc, oneshot};

use super::channel::ChannelState;
use super::{is_epoch_like, now_ms, Forward, Owner, OwnerCommand, PublishRequest, Start, TrimReason, SEALED};
use crate::idempotency::Window;
use crate::replication::ReplOp;

pub(super) type Ack<T> = (oneshot::Sender<Result<T, OpError>>, Result<T, OpError>);

/// What a batch must do once it is durable.
#[derive(Default)]
pub(super) struct Work {
    pub(super) acks: Vec<Ack<PublishOk>>,
    pub(super) commit_acks: Vec<Ack<()>>,
    pub(super) fanout: Vec<(Arc<str>, u64, Text)>,
    /// Reads answered after the batch, so they see its writes.
    pub(super) after: Vec<OwnerCommand>,
    pub(super) publishes: usize,
    pub(super) needs_sync: bool,
    /// Pre-batch state of channels touched (None: created by this batch), for rollback if
    /// the store fails.
    pub(super) undo: Vec<(Arc<str>, Option<ChannelMeta>)>,
    /// Channels whose metadata this batch rewrites.
    pub(super) dirty: Vec<Arc<str>>,
    /// The batch's writes, for followers (when the partition is replicated).
    pub(super) ops: Option<Vec<ReplOp>>,
    /// Each rewritten channel's top after this batch: acknowledged once it is released.
    pub(super) tops: Vec<(Arc<str>, u64)>,
}

/// Records that `ch`'s metadata must be written with the current batch.
pub(super) fn mark_dirty(ch: &mut ChannelState, work: &mut Work) {
    if !ch.dirty {
        ch.dirty = true;
        work.dirty.push(ch.name.clone());
    }
}

impl Owner {
    pub(super) fn handle(&mut self, cmd: OwnerCommand, batch: &mut switchyard_store::Batch<'_>, work: &mut Work) {
        // A seal always ends the subscriptions, even once the partition is followed here.
        if !self.sealed && matches!(cmd, OwnerCommand::Seal(..)) {
            return work.after.push(cmd);
        }
        // A follower's copy is written by replication only, and a node that is no replica
        // of a replicated partition (a deposed leader before its seal) writes nothing.
        if self.sealed || self.replication.written_elsewhere(self.partition) {
            return self.refuse_sealed(cmd, work);
        }
        // A command whose channel waits for a store read is parked until it is done.
        let Some(cmd) = self.gate(cmd) else { return };
        match cmd {
            OwnerCommand::Publish(req, reply) => {
                let result = self.publish(req, batch, work);
                work.acks.push((reply, result));
            }
            OwnerCommand::Commit { channel, consumer, offset, reply } => {
                let result = self.commit(&channel, consumer, offset, batch, work);
                work.commit_acks.push((reply, result));
            }
            OwnerCommand::Trim { channel, first, drops, reason, reply } => {
                self.trim(&channel, first, &drops, reason, batch, work);
                let _ = reply.send(());
            }
            OwnerCommand::Subscribe { channel, sub, outbox, start, reply } => {
                // A client that saw this channel empty (offset 0) under some epoch finds it
                // still empty under that epoch, even though nothing was stored for it.
                let seen = match &start {
                    Start::From(StartFrom::Recover { offset: 0, epoch }) if is_epoch_like(epoch) => {
                        Some(Arc::from(epoch.as_str()))
                    }
                    _ => None,
                };
                let ch = self.channel_in(&channel, seen, work);
                // Answered after the batch, but "latest" means latest when it arrived:
                // publishes later in this batch belong to the subscriber.
                let start = match start {
                    Start::From(StartFrom::Latest) => Start::LatestAt(ch.top),
                    other => other,
                };
                work.after.push(OwnerCommand::Subscribe { channel, sub, outbox, start, reply });
            }
            // A read of a channel with no state creates none (see `answer`).
            OwnerCommand::View(..) => work.after.push(cmd),
            OwnerCommand::Info { ref channel, .. } => {
                let channel = channel.clone();
                self.channel(&channel, work);
                work.after.push(cmd);
            }
            other => work.after.push(other),
        }
    }

    /// A sealed partition stores nothing: writes are handed on to be forwarded to the new
    /// owner (or get [`SEALED`]), registrations get [`SEALED`].
    pub(super) fn refuse_sealed(&mut self, cmd: OwnerCommand, work: &mut Work) {
        let sealed = || OpError::refused(switchyard_proto::refusal::Refusal::Sealed, SEALED);
        match cmd {
            OwnerCommand::Publish(req, reply) => match &self.forward {
                Some(fwd) => {
                    if let Err(mpsc::error::SendError(Forward::Publish(_, reply))) =
                        fwd.send(Forward::Publish(req, reply))
                    {
                        let _ = reply.send(Err(sealed()));
                    }
                }
                None => work.acks.push((reply, Err(sealed()))),
            },
            OwnerCommand::Commit { channel, consumer, offset, reply } => match &self.forward {
                Some(fwd) => {
                    if let Err(mpsc::error::SendError(Forward::Commit { reply, .. })) =
                        fwd.send(Forward::Commit { channel, consumer, offset, reply })
                    {
                        let _ = reply.send(Err(sealed()));
                    }
                }
                None => work.commit_acks.push((reply, Err(sealed()))),
            },
            OwnerCommand::Subscribe { reply, .. } => {
                let _ = reply.send(Err(sealed()));
            }
            OwnerCommand::Info { reply, .. } => {
                let _ = reply.send(Err(sealed()));
            }
            OwnerCommand::Trim { reply, .. } => {
                let _ = reply.send(());
            }
            // Dropping the reply tells the reader the owner is gone.
            OwnerCommand::View(..) => {}
            OwnerCommand::Snapshot(reply) => {
                let _ = reply.send(Vec::new());
            }
            OwnerCommand::Seal(_, reply) => {
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            OwnerCommand::Unsubscribe { .. } => {}
            OwnerCommand::Presence(cmd) => cmd.refuse(sealed()),
        }
    }

    fn publish(
        &mut self,
        req: PublishRequest,
        batch: &mut switchyard_store::Batch<'_>,
        work: &mut Work,
    ) -> Result<PublishOk, OpError> {
        let now = now_ms();
        let window_ms = self.idempotency_window.as_millis() as u64;
        let partition = self.partition;
        let metrics = self.metrics.clone();
        let budget = self.idempotency_budget.clone();
        let ch = self.channel(&req.channel, work);
        if let Some(key) = &req.idempotency_key {
            // `gate` loaded a recovered channel's window before letting this publish run.
            let window = ch.idempotency.get_or_insert_with(|| Window::new(budget));
            window.expire(now.saturating_sub(window_ms));
            if let Some(offset) = window.get(key) {
                metrics.publish_duplicates.inc();
                return Ok(PublishOk { offset, epoch: ch.epoch.clone() });
            }
        }
        let msg = StoredMessage {
            ts: now,
            key: req.key,
            from: req.from,
            idem: req.idempotency_key,
            data: req.data.get().to_owned(),
        };
        let offset = ch.top + 1;
        let size = batch.put_message(partition, &ch.name, offset, &msg);
        if let Some(ops) = &mut work.ops {
            ops.push(ReplOp::Message(ch.name.to_string(), offset, msg.clone()));
        }
        ch.top = offset;
        ch.count += 1;
        ch.bytes += size as u64;
        mark_dirty(ch, work);
        if msg.key.is_some() {
            ch.keyed_generation += 1;
        }
        if let (Some(key), Some(window)) = (&msg.idem, &mut ch.idempotency) {
            if !window.insert(key, offset, now) {
                // The node's key budget is spent: this key will not deduplicate a retry.
                metrics.idempotency_unremembered.inc();
            }
        }
        let view = MessageView {
            push: Some("message"),
            channel: &ch.name,
            offset,
            epoch: &ch.epoch,
            ts: now,
            key: msg.key.as_deref(),
            from: msg.from.as_deref(),
            data: &req.data,
        };
        let frame = protocol::to_frame(&view);
        work.fanout.push((ch.name.clone(), offset, frame));
        work.publishes += 1;
        work.needs_sync = true;
        metrics.bytes_published.inc_by(msg.data.len() as u64);
        Ok(PublishOk { offset, epoch: ch.epoch.clone() })
    }

    fn commit(
        &mut self,
        channel: &str,
        consumer: String,
        offset: u64,
        batch: &mut switchyard_store::Batch<'_>,
        work: &mut Work,
    ) -> Result<(), OpError> {
        let partition = self.partition;
        let stored = self.consumer_offset(channel, &consumer, work)?;
        let ch = self.channel(channel, work);
        if offset > ch.top {
            return Err(OpError::bad_request(format!("offset {offset} is beyond the channel top {}", ch.top)));
        }
        if offset > stored {
            batch.put_consumer(partition, channel, &consumer, offset);
            if let Some(ops) = &mut work.ops {
                ops.push(ReplOp::Consumer(channel.to_string(), consumer.clone(), offset));
            }
            ch.consumers.insert(consumer, offset);
            work.needs_sync = true;
        }
        Ok(())
    }

    fn trim(
        &mut self,
        channel: &str,
        first: Option<u64>,
        drops: &[(u64, u32)],
        reason: TrimReason,
        batch: &mut switchyard_store::Batch<'_>,
        work: &mut Work,
    ) {
        let partition = self.partition;
        let Some(ch) = self.channels.get_mut(channel) else { return };
        if !ch.dirty {
            work.undo.push((ch.name.clone(), Some(ch.meta())));
        }
        let mut removed = 0;
        for &(offset, size) in drops {
            if offset >= ch.first && offset <= ch.durable {
                batch.remove_message(partition, channel, offset);
                if let Some(ops) = &mut work.ops {
                    ops.push(ReplOp::Remove(channel.to_string(), offset));
                }
                ch.count = ch.count.saturating_sub(1);
                ch.bytes = ch.bytes.saturating_sub(size as u64);
                removed += 1;
            }
        }
        if let Some(f) = first {
            ch.first = ch.first.max(f.min(ch.durable + 1));
        }
        mark_dirty(ch, work);
        match reason {
            TrimReason::Retention => self.metrics.retention_removed.inc_by(removed),
            TrimReason::Compaction => self.metrics.compaction_removed.inc_by(removed),
        }
    }

    pub(super) async fn finish(&mut self, mut batch: switchyard_store::Batch<'_>, mut work: Work) {
        for name in &work.dirty {
            if let Some(ch) = self.channels.get(name) {
                let meta = ch.meta();
                batch.put_meta(self.partition, name, &meta);
                if let Some(ops) = &mut work.ops {
                    ops.push(ReplOp::Meta(name.to_string(), meta));
                }
            }
        }
        // A replicated batch is stamped with its seq and written with this replica's log
        // position, under the apply lock: no follower apply, truncation or snapshot of the
        // partition interleaves, and a node no longer leading never writes.
        let repl = self.replication.clone();
        let mut applying = None;
        let mut stamped = None;
        if let Some(ops) = work.ops.as_ref().filter(|ops| !ops.is_empty()) {
            applying = Some(repl.part(self.partition).apply_lock.lock().await);
            let (store, p) = (self.store.clone(), self.partition);
            if let Some((seq, epoch, meta)) = repl.stamp(p, || store.repl_meta(p).ok().flatten()) {
                batch.put_repl_batch(p, seq, &crate::replication::touched(ops), &meta);
                stamped = Some((seq, epoch));
            }
        }
        let stored = match (&work.ops, stamped) {
            (Some(ops), None) if !ops.is_empty() => Err(OpError::new(
                switchyard_proto::protocol::ErrorCode::Unavailable,
                "partition leadership changed before the write; retry",
            )),
            _ if batch.is_empty() => Ok(()),
            _ => batch.write(work.needs_sync).await.map_err(|e| {
                // The store logs the cause once (the reserve's state change, or the first
                // failed write), not once per batch.
                tracing::debug!(partition = self.partition, error = %e, "store write refused; batch rejected");
                e.to_op_error()
            }),
        };
        if let Err(err) = stored {
            self.rollback(&work.undo);
            for (reply, _) in work.acks.drain(..) {
                let _ = reply.send(Err(err.clone()));
            }
            for (reply, _) in work.commit_acks.drain(..) {
                let _ = reply.send(Err(err.clone()));
            }
            work.fanout.clear();
            work.ops = None;
        }
        for name in &work.dirty {
            if let Some(ch) = self.channels.get_mut(name) {
                ch.dirty = false;
                work.tops.push((name.clone(), ch.top));
            }
        }
        match (work.ops.take(), stamped) {
            // Replicated: acknowledged, fanned out and read only once the ISR has it.
            (Some(ops), Some((stamped, epoch))) if !ops.is_empty() => {
                let data = bytes::Bytes::from(postcard::to_stdvec(&ops).expect("ops encode"));
                let seq = repl.append(self.partition, data);
                drop(applying);
                debug_assert_eq!(seq, stamped, "only the owner appends, under the apply lock");
                self.parked.push_back((seq, epoch, work));
                self.release_parked();
            }
            // Nothing written: answered in order behind any parked batch.
            _ if !self.parked.is_empty() => {
                let seq = self.parked.back().map_or(0, |p| p.0);
                let epoch = self.parked.back().map_or(0, |p| p.1);
                self.parked.push_back((seq, epoch, work));
                self.release_parked();
            }
            _ => self.release(work),
        }
    }
}

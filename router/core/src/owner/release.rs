//! What a partition owner does once a batch is durable (and, when the partition is
//! replicated, in the ISR): acknowledge its writes, fan its messages out, answer the reads
//! and registrations that waited for it; or, when the store refused it or the leadership
//! ended first, fail its writes and undo its effects in memory.
//!
//! It owns the order of the answers (writes before reads, so a client reads its own
//! acknowledged writes) and must never block: fan-out goes through the non-blocking
//! [`Outbox`](crate::outbox::Outbox) and lent sockets get non-blocking `send`s only.

use std::sync::Arc;

use switchyard_proto::protocol::OpError;
use switchyard_proto::Text;
use switchyard_sdk::ChannelStats;
use switchyard_store::ChannelMeta;

use super::batch::Work;
use super::channel::Subscriber;
use super::{grant_from, new_epoch, now_ms, ChannelView, Facts, Grant, Owner, OwnerCommand, Snapshot, Start};
use crate::outbox::{Delivery, Frames, Kind};

impl Owner {
    /// Releases the parked batches the high watermark passed, in order; fails them all if
    /// the leadership they were written under ended.
    pub(super) fn release_parked(&mut self) {
        let hw = *self.hw.borrow_and_update();
        let epoch = self.replication.leader_epoch(self.partition);
        while let Some((seq, e, _)) = self.parked.front() {
            if epoch != Some(*e) {
                return self.fail_parked();
            }
            if *seq >= hw {
                return;
            }
            let (_, _, work) = self.parked.pop_front().expect("front exists");
            self.release(work);
        }
    }

    /// The leadership ended before the ISR had these batches: their writers get
    /// `unavailable` (a retry with the same idempotency key is safe), and seals,
    /// unsubscribes and presence commands (memory only) among their reads still run.
    pub(super) fn fail_parked(&mut self) {
        let err = OpError::new(
            switchyard_proto::protocol::ErrorCode::Unavailable,
            "partition leadership changed before the write was replicated; retry",
        );
        while let Some((_, _, work)) = self.parked.pop_front() {
            for (reply, _) in work.acks {
                let _ = reply.send(Err(err.clone()));
            }
            for (reply, _) in work.commit_acks {
                let _ = reply.send(Err(err.clone()));
            }
            for cmd in work.after {
                if matches!(cmd, OwnerCommand::Seal(..) | OwnerCommand::Unsubscribe { .. } | OwnerCommand::Presence(_))
                {
                    self.answer(cmd);
                }
            }
        }
    }

    /// Acknowledges, fans out and answers the reads of a batch that is durable (and, when
    /// replicated, in the ISR).
    pub(super) fn release(&mut self, work: Work) {
        for (name, top) in &work.tops {
            if let Some(ch) = self.channels.get_mut(name) {
                ch.durable = ch.durable.max(*top).min(ch.top);
            }
        }
        self.fan_out(&work.fanout);
        self.metrics.messages_published.inc_by(work.fanout.len() as u64);
        for (reply, result) in work.acks {
            let _ = reply.send(result);
        }
        for (reply, result) in work.commit_acks {
            let _ = reply.send(result);
        }
        for cmd in work.after {
            self.answer(cmd);
        }
    }

    /// Restores the pre-batch state of every channel the failed batch touched. Windows and
    /// caches that may hold the batch's effects are dropped and rebuilt from the store.
    pub(super) fn rollback(&mut self, undo: &[(Arc<str>, Option<ChannelMeta>)]) {
        for (name, before) in undo {
            match before {
                None => {
                    if self.channels.remove(name).is_some() {
                        self.metrics.partition_channels.with_label_values(&[&self.partition.to_string()]).dec();
                    }
                }
                Some(m) => {
                    if let Some(ch) = self.channels.get_mut(name) {
                        ch.top = m.top;
                        ch.first = m.first;
                        ch.count = m.count;
                        ch.bytes = m.bytes;
                        ch.idempotency = None;
                        ch.consumers.clear();
                        ch.dirty = false;
                    }
                }
            }
        }
    }

    fn fan_out(&mut self, fanout: &[(Arc<str>, u64, Text)]) {
        let to_flush = &mut self.to_flush;
        for (name, offset, frame) in fanout {
            let Some(ch) = self.channels.get_mut(name) else { continue };
            let mut frames = Frames::new(frame);
            ch.subscribers.retain(|s| {
                let Some(frame) = frames.get(s.outbox.dialect()) else { return true };
                s.outbox.fan_out(Delivery { sub: s.sub, offset: *offset, frame, kind: Kind::Message }, to_flush)
            });
        }
    }

    /// Answers reads and registrations after the batch they arrived in is durable.
    fn answer(&mut self, cmd: OwnerCommand) {
        match cmd {
            OwnerCommand::Subscribe { channel, sub, outbox, start, reply } => {
                let grant = self.grant(&channel, &start);
                if grant.is_ok() {
                    if let Some(ch) = self.channels.get_mut(channel.as_str()) {
                        ch.subscribers.push(Subscriber { sub, outbox });
                    }
                }
                let _ = reply.send(grant);
            }
            OwnerCommand::Unsubscribe { channel, sub } => {
                if let Some(ch) = self.channels.get_mut(channel.as_str()) {
                    ch.subscribers.retain(|s| s.sub != sub);
                }
                self.evict_if_idle(&channel);
            }
            OwnerCommand::Seal(reason, reply) => {
                for ch in self.channels.values_mut() {
                    if ch.subscribers.is_empty() {
                        continue;
                    }
                    let push = switchyard_proto::protocol::unsubscribed_push(
                        &ch.name,
                        switchyard_proto::protocol::close::SHUTTING_DOWN,
                        &reason,
                    );
                    let frame = push;
                    for s in ch.subscribers.drain(..) {
                        s.outbox.push(Delivery {
                            sub: s.sub,
                            offset: ch.durable,
                            frame: frame.clone(),
                            kind: Kind::End,
                        });
                    }
                }
                // The store keeps the state for the handover; memory (presence with it: the
                // gateways announce it again to the new owner) is freed now.
                self.channels.clear();
                self.sealed = true;
                // Commands parked behind a load are handed on (or refused) like any write
                // that reaches the sealed partition; the loads' results become stale.
                let parked = self.loads.take_all();
                self.ready.extend(parked);
                self.metrics.partition_channels.with_label_values(&[&self.partition.to_string()]).set(0);
                tracing::info!(partition = self.partition, "partition sealed");
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            OwnerCommand::Info { channel, consumer, reply } => {
                let committed = match &consumer {
                    Some(name) => match self.consumer_offset(&channel, name, &mut Work::default()) {
                        Ok(o) => Some(o),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            return;
                        }
                    },
                    None => None,
                };
                let facts = self.channels.get(channel.as_str()).map(|ch| Facts {
                    epoch: ch.epoch.clone(),
                    top: ch.durable,
                    first: ch.first,
                    committed,
                });
                let _ = reply.send(facts.ok_or_else(|| OpError::internal("channel vanished")));
            }
            OwnerCommand::View(channel, reply) => {
                let view = match self.channels.get(channel.as_str()) {
                    Some(ch) => ChannelView { epoch: ch.epoch.clone(), top: ch.durable, first: ch.first },
                    // Never written: empty, under an epoch made up for this answer. A client
                    // that recovers from offset 0 under it is told `recovered: true`.
                    None => ChannelView { epoch: new_epoch().into(), top: 0, first: 1 },
                };
                let _ = reply.send(view);
            }
            OwnerCommand::Snapshot(reply) => {
                // Maintenance asks every interval: keys expire on time even in channels
                // that see no further keyed publish.
                let cutoff = now_ms().saturating_sub(self.idempotency_window.as_millis() as u64);
                for w in self.channels.values_mut().filter_map(|ch| ch.idempotency.as_mut()) {
                    w.expire(cutoff);
                }
                self.shed_idle();
                let snaps = self
                    .channels
                    .values()
                    .map(|ch| Snapshot {
                        channel: ch.name.clone(),
                        stats: ChannelStats {
                            first_offset: ch.first,
                            last_offset: ch.durable,
                            count: ch.count,
                            bytes: ch.bytes,
                        },
                        keyed_generation: ch.keyed_generation,
                        subscribers: ch.subscribers.len() as u64,
                    })
                    .collect();
                let _ = reply.send(snaps);
            }
            OwnerCommand::Presence(cmd) => self.presence(cmd),
            OwnerCommand::Publish(..) | OwnerCommand::Commit { .. } | OwnerCommand::Trim { .. } => {
                unreachable!("writes are handled in the batch")
            }
        }
    }

    fn grant(&mut self, channel: &str, start: &Start) -> Result<Grant, OpError> {
        let committed = match start {
            Start::Consumer(name) => self.consumer_offset(channel, name, &mut Work::default())?,
            _ => 0,
        };
        let ch = self.channels.get(channel).ok_or_else(|| OpError::internal("channel vanished"))?;
        Ok(grant_from(ch.epoch.clone(), ch.durable, ch.first, committed, start, ch.durable))
    }
}

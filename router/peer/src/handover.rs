//! Partition handover: moving a partition's state to its new owner when the map moves it.
//!
//! It owns both sides. The old owner seals a partition it lost (its owner task ends every
//! subscription with 4100, drops the in-memory state and refuses later writes, which
//! gateways then retry at the new owner) and serves the sealed state from its store in
//! chunks over the peer link. The new owner holds the partition's mailbox closed (every
//! command for it waits) while it pulls the chunks, writes them to its own store and
//! fsyncs, then opens the mailbox and tells the old owner, which drops its copy. If the
//! old owner is gone (crashed), or cannot be reached before a deadline, the new owner
//! starts the partition from what it has: nothing trustworthy, so its stale copy is
//! cleared and channels restart under new epochs. It must never run on the message path:
//! everything here happens once per partition move.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::router::Router;
use crate::wire::{Answer, Chunk, Op};
use switchyard_core::owner::{Forward, OwnerCommand};
use switchyard_proto::partition::{PartitionId, PartitionMap};
use switchyard_proto::protocol::{ErrorCode, OpError};

/// Messages per handover chunk.
const CHUNK_MESSAGES: usize = 2000;
/// Payload bytes per handover chunk (a chunk may exceed it by one message).
const CHUNK_BYTES: usize = 4 << 20;
/// Channels whose metadata one chunk carries.
const CHUNK_CHANNELS: usize = 1000;
/// Deadline of one pull.
const PULL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new owner keeps trying to reach a live old owner before it starts the
/// partition from what it has.
const HANDOVER_DEADLINE: Duration = Duration::from_secs(30);

/// The message of the error a node answers a pull with when its copy of the partition is
/// not authoritative: it is still adopting it, or gave an adoption up half-way.
pub(crate) const NOT_ADOPTED: &str = "partition not adopted here (yet)";

/// Called with a new map before it is installed: for every partition it moves here that
/// was not adopted yet, closes the partition's mailbox (so nothing routed by the new map
/// runs on stale state) and starts pulling it from its old owner.
pub(crate) fn before_install(node: &Arc<Router>, new: &PartitionMap) {
    let me = node.node_id.as_str();
    for p in 0..new.partitions() {
        if new.owner(p) != Some(me) {
            continue;
        }
        // No move record: the first map gave it here; what the store holds is current.
        let Some(moved) = new.moved_from(p) else { continue };
        if moved.from == me || node.partitions.store.adopted(p).ok().flatten() == Some(moved.epoch) {
            continue;
        }
        {
            // One adoption of a partition at a time: a newer move while one runs is picked
            // up by the next map install after it ends (the map is re-read below).
            let mut adopting = node.partitions.handovers.adopting.lock().expect("handovers");
            if adopting.contains_key(&p) {
                continue;
            }
            adopting.insert(p, moved.epoch);
        }
        let (done, rx) = oneshot::channel();
        node.partitions.adopt(p, rx);
        tokio::spawn(adopt(node.clone(), p, moved.from.clone(), moved.epoch, new.epoch, done));
    }
}

/// Called after a new map is installed: seals every partition this node owned in `before`
/// and no longer owns, so its subscribers follow it and its writes go to the new owner.
pub(crate) fn after_install(node: &Arc<Router>, before: &PartitionMap) {
    let after = node.map();
    if after.epoch == before.epoch {
        return;
    }
    let me = node.node_id.as_str();
    for p in 0..before.partitions() {
        if before.owner(p) == Some(me) && after.owner(p) != Some(me) {
            let now = after.owner(p).unwrap_or_default();
            let reason = format!("partition moved to node {now} (map epoch {}); subscribe again", after.epoch);
            // This copy waits to be pulled only when the map moved the partition from here;
            // a follower promoted elsewhere (a failover) pulls nothing.
            let promoted = !after.replicas.is_empty() && after.moved_from(p).is_none_or(|m| m.from != me);
            if node.peers.is_some() && !promoted {
                let moved_at = after.moved_from(p).map_or(after.epoch, |m| m.epoch);
                node.partitions.handovers.sealed.lock().expect("handovers").insert(p, moved_at);
            }
            // Never wait here (this runs in the etcd watch loop): a held mailbox takes it later.
            node.partitions.hold(p, OwnerCommand::Seal(reason, None));
        }
    }
}

/// Forwards writes that reached a sealed partition (they raced the seal) to wherever the
/// map now puts their channel, and answers them from there.
pub(crate) async fn forward_sealed(
    node: std::sync::Weak<Router>,
    mut writes: tokio::sync::mpsc::UnboundedReceiver<Forward>,
) {
    while let Some(write) = writes.recv().await {
        let Some(node) = node.upgrade() else { return };
        tokio::spawn(async move {
            let sealed = || OpError::new(ErrorCode::Unavailable, switchyard_core::owner::SEALED);
            match write {
                Forward::Publish(req, reply) => {
                    // Only ever onwards: a partition still local here would come back sealed.
                    let result = match node.locate(&req.channel) {
                        Ok(crate::router::Route::Remote { .. }) => match node.publish(req).await {
                            Ok(publishing) => publishing.acked().await,
                            Err(e) => Err(e),
                        },
                        _ => Err(sealed()),
                    };
                    let _ = reply.send(result);
                }
                Forward::Commit { channel, consumer, offset, reply } => {
                    let result = match node.locate(&channel) {
                        Ok(crate::router::Route::Remote { .. }) => {
                            match node.commit(&channel, consumer, offset).await {
                                Ok(rx) => rx.await.unwrap_or_else(|_| Err(sealed())),
                                Err(e) => Err(e),
                            }
                        }
                        _ => Err(sealed()),
                    };
                    let _ = reply.send(result);
                }
            }
        });
    }
}

/// Pulls partition `p` from `from` into the store, then opens its mailbox.
#[tracing::instrument(name = "handover", skip_all, fields(partition = p, %from, moved_at))]
async fn adopt(node: Arc<Router>, p: PartitionId, from: String, moved_at: u64, map: u64, done: oneshot::Sender<()>) {
    let started = Instant::now();
    // No follower apply or snapshot may write the partition meanwhile.
    let applying = node.partitions.replication.part(p).apply_lock.lock().await;
    let outcome = pull_all(&node, p, &from, moved_at, map).await;
    let result = match outcome {
        Ok(Pulled::Moved(messages)) => {
            node.metrics.handover_messages.inc_by(messages);
            node.partitions.handovers.incomplete.lock().expect("handovers").remove(&p);
            tracing::info!(messages, elapsed = ?started.elapsed(), "partition handed over");
            tokio::spawn(confirm(node.clone(), p, from, moved_at));
            "ok"
        }
        Ok(Pulled::KeptOwn) => {
            tracing::info!("partition came back before its new owner took it; kept this node's copy");
            "kept"
        }
        Ok(Pulled::Abandoned) => {
            node.partitions.handovers.incomplete.lock().expect("handovers").insert(p);
            tracing::info!("partition moved back to its source mid-handover; adoption abandoned");
            "abandoned"
        }
        Err(why) => {
            tracing::warn!(%why, "no handover; starting the partition from what this node has (new epochs)");
            if let Err(e) = start_fresh(&node, p, moved_at).await {
                tracing::error!(error = %e, "clearing a partition failed");
            }
            node.partitions.handovers.incomplete.lock().expect("handovers").remove(&p);
            node.partitions.handovers.release(p);
            "lost"
        }
    };
    node.metrics.handovers.with_label_values(&[result]).inc();
    node.metrics.handover_seconds.observe(started.elapsed().as_secs_f64());
    node.partitions.handovers.adopting.lock().expect("handovers").remove(&p);
    drop(applying);
    let _ = done.send(());
}

/// Tells the old owner its copy can go, until it answers (or leaves, or the deadline).
async fn confirm(node: Arc<Router>, p: PartitionId, from: String, moved_at: u64) {
    let Some(links) = node.peers.clone() else { return };
    let deadline = Instant::now() + HANDOVER_DEADLINE;
    while Instant::now() < deadline {
        let epoch = node.map().epoch;
        if let Ok(pending) = links.send(&from, epoch, &Op::Pulled { partition: p, moved_at }) {
            if pending.wait(PULL_TIMEOUT).await.is_ok() {
                return;
            }
        }
        if !node.members().contains_key(&from) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How a pull ended (other than with a failure).
enum Pulled {
    /// The partition's state is here: this many messages came.
    Moved(u64),
    /// This node was the source, never saw the pull confirmed, and the partition came
    /// back: its own copy is still the authoritative one and is kept.
    KeptOwn,
    /// The map moved the partition back to the source before the pull ended: nothing
    /// written here counts.
    Abandoned,
}

/// Without the old owner, this node's copy of `p` (if any) is stale: clear it, so every
/// channel restarts under a new epoch and recovering clients learn they missed messages.
async fn start_fresh(node: &Router, p: PartitionId, moved_at: u64) -> Result<(), switchyard_store::StoreError> {
    node.partitions.store.clear_partition(p).await?;
    let mut batch = node.partitions.store.batch();
    batch.put_adopted(p, moved_at);
    batch.write(true).await
}

/// Copies partition `p` from `from`; returns the number of messages moved.
/// `map` is the epoch of the map that gave `p` here (this runs before it is installed).
async fn pull_all(node: &Arc<Router>, p: PartitionId, from: &str, moved_at: u64, map: u64) -> Result<Pulled, String> {
    let links = node.peers.as_ref().ok_or("peer links are off (no cluster.secret)")?;
    let mut deadline = Instant::now() + HANDOVER_DEADLINE;
    let alive = |n: &Router| n.members().contains_key(from);
    if !alive(node) {
        return Err(format!("old owner {from} is not a member any more"));
    }
    let mut cursor = None;
    let mut cleared = false;
    let mut moved = 0u64;
    loop {
        let now = node.map();
        if now.epoch > map && now.owner(p) == Some(from) {
            // Moved back to its source before the pull ended: leave the store alone (the
            // queued seal closes it again); the source still has everything.
            return Ok(Pulled::Abandoned);
        }
        let op = Op::Pull { partition: p, moved_at, cursor: cursor.clone() };
        let answer = match links.send(from, node.map().epoch, &op) {
            Ok(pending) => pending.wait(PULL_TIMEOUT).await,
            Err(e) => Err(e),
        };
        let chunk = match answer {
            Ok(Answer::Chunk(c)) => c,
            Ok(_) => return Err("old owner answered a pull with another answer".into()),
            Err(e) if e.message == NOT_ADOPTED && !cleared => {
                if node.partitions.handovers.release(p) {
                    // This node handed the partition out and it never arrived anywhere:
                    // its own copy is complete.
                    let mut batch = node.partitions.store.batch();
                    batch.put_adopted(p, moved_at);
                    batch.write(true).await.map_err(|e| e.to_string())?;
                    return Ok(Pulled::KeptOwn);
                }
                // The old owner is itself still adopting it (a chained move): wait for it,
                // without counting against the deadline while it is alive.
                if !alive(node) {
                    return Err(format!("old owner {from} left while adopting the partition"));
                }
                deadline = Instant::now() + HANDOVER_DEADLINE;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                if Instant::now() > deadline || !alive(node) {
                    return Err(format!("pulling from {from} failed: {}", e.message));
                }
                tracing::debug!(partition = p, %from, error = %e.message, "pull failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !cleared {
            // A stale copy from an earlier ownership goes before the first chunk lands.
            node.partitions.store.clear_partition(p).await.map_err(|e| e.to_string())?;
            cleared = true;
        }
        moved += chunk.messages.len() as u64;
        let next = chunk.next.clone();
        let mut batch = node.partitions.store.batch();
        stage_chunk(&mut batch, p, &chunk);
        if next.is_none() {
            batch.put_adopted(p, moved_at);
        }
        // Only the last batch needs the fsync: it covers every earlier one.
        batch.write(next.is_none()).await.map_err(|e| e.to_string())?;
        match next {
            Some(c) => cursor = Some(c),
            None => {
                node.partitions.handovers.release(p);
                return Ok(Pulled::Moved(moved));
            }
        }
    }
}

/// Adds one chunk of partition `p` (channel metadata, consumer offsets, messages) to a
/// store batch: a handover pull and a replica snapshot store chunks the same way.
pub(crate) fn stage_chunk(batch: &mut switchyard_store::Batch<'_>, p: PartitionId, chunk: &Chunk) {
    for (name, meta, consumers) in &chunk.channels {
        batch.put_meta(p, name, meta);
        for (consumer, offset) in consumers {
            batch.put_consumer(p, name, consumer, *offset);
        }
    }
    for (name, offset, msg) in &chunk.messages {
        batch.put_message(p, name, *offset, msg);
    }
}

/// The old owner's side of a pull: seals `p` (once every write it accepted is durable)
/// and reads the next chunk from its store.
pub(crate) async fn serve_pull(
    node: &Arc<Router>,
    p: PartitionId,
    moved_at: u64,
    cursor: Option<(String, u64)>,
) -> Result<Answer, OpError> {
    if p >= node.partitions.count() {
        return Err(OpError::bad_request(format!("no partition {p}")));
    }
    if node.map().epoch < moved_at {
        node.wait_for_epoch(moved_at).await;
    }
    let map = node.map();
    if map.epoch < moved_at {
        return Err(OpError::new(ErrorCode::Unavailable, format!("map epoch {moved_at} not seen here yet")));
    }
    let h = &node.partitions.handovers;
    if h.is_adopting(p) || h.incomplete.lock().expect("handovers").contains(&p) {
        return Err(OpError::new(ErrorCode::Unavailable, NOT_ADOPTED));
    }
    if map.owner(p) == Some(node.node_id.as_str()) {
        return Err(OpError::new(ErrorCode::Unavailable, format!("partition {p} is owned here")));
    }
    if cursor.is_none() {
        let (tx, rx) = oneshot::channel();
        node.partitions.handovers.sealed.lock().expect("handovers").insert(p, moved_at);
        let reason = format!("partition moved (map epoch {moved_at}); subscribe again");
        node.partitions.send_to(p, OwnerCommand::Seal(reason, Some(tx))).await?;
        rx.await.map_err(|_| OpError::new(ErrorCode::Unavailable, "owner stopped"))?;
    }
    let store = node.partitions.store.clone();
    tokio::task::spawn_blocking(move || read_chunk(&store, p, cursor, None))
        .await
        .map_err(|e| OpError::internal(e.to_string()))?
        .map(Answer::Chunk)
        .map_err(|e| OpError::internal(e.to_string()))
}

/// The next chunk of sealed partition `p` after `cursor`: `(channel, offset)` means the
/// channel's metadata and its messages up to `offset` were sent. With `only` (sorted),
/// just those of the named channels the store holds.
pub(crate) fn read_chunk(
    store: &switchyard_store::Store,
    p: PartitionId,
    cursor: Option<(String, u64)>,
    only: Option<&[String]>,
) -> Result<Chunk, switchyard_store::StoreError> {
    let mut chunk = Chunk { channels: Vec::new(), messages: Vec::new(), next: None };
    let mut bytes = 0usize;
    // One past the channels a chunk may start, plus the one being resumed.
    let from = cursor.as_ref().map(|c| c.0.as_str());
    let listed = match only {
        None => store.partition_channels(p, from, CHUNK_CHANNELS + 2)?,
        Some(names) => {
            let mut out = Vec::new();
            for name in names.iter().filter(|n| from.is_none_or(|f| n.as_str() >= f)) {
                if out.len() == CHUNK_CHANNELS + 2 {
                    break;
                }
                if let Some(meta) = store.channel_meta(p, name)? {
                    out.push((name.clone(), meta));
                }
            }
            out
        }
    };
    for (name, meta) in listed {
        let mut after = match &cursor {
            Some((c, o)) if *c == name => *o,
            _ => {
                if chunk.channels.len() >= CHUNK_CHANNELS {
                    break;
                }
                let consumers = store.consumers_of(p, &name)?;
                bytes += name.len() + 64 + consumers.iter().map(|(c, _)| c.len() + 16).sum::<usize>();
                chunk.channels.push((name.clone(), meta.clone(), consumers));
                0
            }
        };
        loop {
            // Small reads, so the byte budget is kept to within a few messages.
            let room = (CHUNK_MESSAGES - chunk.messages.len()).min(16);
            let rows = store.read_messages(p, &name, after, meta.top, room)?;
            let full = rows.len() == room;
            for (offset, msg) in rows {
                // Every byte the frame carries: keys and ids can outweigh the payload.
                bytes += msg.encoded_len() + name.len();
                after = offset;
                chunk.messages.push((name.clone(), offset, msg));
            }
            if chunk.messages.len() >= CHUNK_MESSAGES || bytes >= CHUNK_BYTES {
                chunk.next = Some((name, after));
                return Ok(chunk);
            }
            if !full {
                break;
            }
        }
        // This channel is complete.
        chunk.next = Some((name, u64::MAX));
    }
    // Ran out of channels (or of room for metadata, which `next` then resumes after).
    if chunk.channels.len() < CHUNK_CHANNELS {
        chunk.next = None;
    }
    Ok(chunk)
}

/// The new owner has `p` durably: drop the copy here, unless the partition came back.
pub(crate) async fn serve_pulled(node: &Arc<Router>, p: PartitionId, moved_at: u64) -> Result<(), OpError> {
    let mine = node.map().owner(p) == Some(node.node_id.as_str());
    // Only the confirmation of the move that sealed the copy here may drop it (a late one
    // from an older move must not).
    let sealed = node.partitions.handovers.sealed.lock().expect("handovers").get(&p) == Some(&moved_at);
    if !sealed {
        return Ok(());
    }
    // A follower's copy belongs to replication now (it resyncs from the new leader).
    let _applying = node.partitions.replication.part(p).apply_lock.lock().await;
    let following = node.partitions.replication.is_following(p);
    if !mine && !following && !node.partitions.handovers.is_adopting(p) {
        node.partitions.store.clear_partition(p).await.map_err(|e| OpError::internal(e.to_string()))?;
    }
    node.partitions.handovers.release(p);
    tracing::info!(partition = p, moved_at, "partition taken by its new owner; local copy dropped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_metrics::Metrics;
    use switchyard_store::FsyncPolicy;
    use switchyard_store::{ChannelMeta, Store, StoredMessage};

    fn msg(i: u64, size: usize) -> StoredMessage {
        StoredMessage { ts: i, key: None, from: None, idem: Some(format!("k{i}")), data: "7".repeat(size) }
    }

    /// Pulls every chunk of `p` the way a new owner does.
    fn pull(store: &Store, p: PartitionId) -> (Vec<Chunk>, usize) {
        let (mut cursor, mut chunks) = (None, Vec::new());
        loop {
            let c = read_chunk(store, p, cursor.clone(), None).unwrap();
            cursor = c.next.clone();
            chunks.push(c);
            if cursor.is_none() {
                let n = chunks.len();
                return (chunks, n);
            }
        }
    }

    /// Keys and idempotency keys count against the budget: 2,100 messages with 64 KB keys
    /// (the size that once overflowed the 64 MiB peer frame and lost a partition) move in
    /// chunks whose encoded frames stay far below the limit, and every message arrives.
    #[tokio::test]
    async fn large_keys_count_against_the_chunk_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), FsyncPolicy::Batch, Arc::new(Metrics::new())).unwrap();
        let mut b = store.batch();
        let big = |i: u64| StoredMessage {
            ts: i,
            key: Some(format!("{i}:{}", "k".repeat(64_000))),
            from: Some("alice".into()),
            idem: Some(format!("{i}:{}", "i".repeat(64_000))),
            data: "1".into(),
        };
        for i in 1..=2100 {
            b.put_message(6, "keys", i, &big(i));
        }
        b.put_meta(6, "keys", &ChannelMeta { epoch: "K".into(), top: 2100, first: 1, count: 2100, bytes: 0 });
        b.write(true).await.unwrap();
        let (chunks, n) = pull(&store, 6);
        assert!(n > 30, "split by bytes, not by message count: {n} chunks");
        for c in &chunks {
            let frame = crate::wire::encode(&crate::wire::Frame::Reply { id: 1, result: Ok(Answer::Chunk(c.clone())) });
            assert!(frame.len() < CHUNK_BYTES * 2, "a chunk frame of {} bytes", frame.len());
        }
        let offsets: Vec<u64> = chunks.iter().flat_map(|c| &c.messages).map(|m| m.1).collect();
        assert_eq!(offsets, (1..=2100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn chunks_carry_every_channel_message_and_consumer_once_within_the_size_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), FsyncPolicy::Batch, Arc::new(Metrics::new())).unwrap();
        let mut b = store.batch();
        // One big channel (5,000 messages of 2 KiB: over the message and byte budgets), many
        // small ones, and a neighbour partition that must not leak in.
        for i in 1..=5000 {
            b.put_message(4, "big", i, &msg(i, 2048));
        }
        b.put_meta(4, "big", &ChannelMeta { epoch: "E".into(), top: 5000, first: 1, count: 5000, bytes: 0 });
        b.put_consumer(4, "big", "svc", 4000);
        for c in 0..1500 {
            let name = format!("small:{c:04}");
            b.put_message(4, &name, 1, &msg(1, 10));
            b.put_meta(4, &name, &ChannelMeta { epoch: "S".into(), top: 1, first: 1, count: 1, bytes: 0 });
        }
        b.put_message(5, "other", 1, &msg(1, 10));
        b.put_meta(5, "other", &ChannelMeta { epoch: "O".into(), top: 1, first: 1, count: 1, bytes: 0 });
        b.write(true).await.unwrap();

        let (chunks, n) = pull(&store, 4);
        assert!(n > 3, "split into several chunks: {n}");
        for c in &chunks {
            let bytes: usize = c.messages.iter().map(|m| m.2.encoded_len() + m.0.len()).sum();
            assert!(bytes <= CHUNK_BYTES + 16 * 2048, "chunk of {bytes} bytes");
            assert!(c.messages.len() <= CHUNK_MESSAGES && c.channels.len() <= CHUNK_CHANNELS);
        }
        let channels: Vec<&String> = chunks.iter().flat_map(|c| c.channels.iter().map(|x| &x.0)).collect();
        assert_eq!(channels.len(), 1501, "every channel's metadata once");
        assert!(!channels.iter().any(|c| c.as_str() == "other"));
        let big: Vec<u64> = chunks.iter().flat_map(|c| &c.messages).filter(|m| m.0 == "big").map(|m| m.1).collect();
        assert_eq!(big, (1..=5000).collect::<Vec<_>>(), "every message once, in order");
        let small = chunks.iter().flat_map(|c| &c.messages).filter(|m| m.0 != "big").count();
        assert_eq!(small, 1500);
        let consumers: Vec<_> = chunks.iter().flat_map(|c| &c.channels).flat_map(|x| x.2.clone()).collect();
        assert_eq!(consumers, vec![("svc".to_string(), 4000)]);

        // Clearing removes exactly the partition.
        store.clear_partition(4).await.unwrap();
        assert!(store.partition_channels(4, None, usize::MAX).unwrap().is_empty());
        assert_eq!(store.partition_channels(5, None, usize::MAX).unwrap().len(), 1);
        assert!(store.read_messages(4, "big", 0, 5000, 10).unwrap().is_empty());
    }
}

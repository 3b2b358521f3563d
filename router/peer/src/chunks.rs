//! Partition chunks: a partition's stored state cut into bounded pieces, and stored back.
//!
//! It owns the one way a partition's channels (metadata, consumer offsets, messages) are
//! read from a store in `(channel, offset)` order in chunks that stay far below the peer
//! frame limit ([`read`]), and added to a store batch on the receiving side ([`stage`]).
//! A handover pull and a replica snapshot both move partitions this way. It must never
//! touch the network or the owners: it reads and stages store rows only, and [`read`] runs
//! on the store's read pool ([`read_blocking`]), never on a runtime worker.

use switchyard_proto::partition::PartitionId;

use switchyard_proto::protocol::OpError;

use crate::wire::Chunk;

/// Messages per handover chunk.
const CHUNK_MESSAGES: usize = 2000;
/// Payload bytes per handover chunk (a chunk may exceed it by one message).
const CHUNK_BYTES: usize = 4 << 20;
/// Channels whose metadata one chunk carries.
const CHUNK_CHANNELS: usize = 1000;

/// [`read`] on the store's read pool, never a runtime worker: a chunk is many store reads.
pub(crate) async fn read_blocking(
    store: &std::sync::Arc<switchyard_store::Store>,
    p: PartitionId,
    cursor: Option<(String, u64)>,
    only: Option<Vec<String>>,
) -> Result<Chunk, OpError> {
    store
        .read(move |r| read(r, p, cursor, only.as_deref()))
        .await
        .map_err(|e| OpError::internal(e.to_string()))?
        .map_err(|e| OpError::internal(e.to_string()))
}

/// Adds one chunk of partition `p` (channel metadata, consumer offsets, messages) to a
/// store batch: a handover pull and a replica snapshot store chunks the same way.
pub(crate) fn stage(batch: &mut switchyard_store::Batch<'_>, p: PartitionId, chunk: &Chunk) {
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

/// The next chunk of sealed partition `p` after `cursor`: `(channel, offset)` means the
/// channel's metadata and its messages up to `offset` were sent. With `only` (sorted),
/// just those of the named channels the store holds.
pub(crate) fn read(
    store: switchyard_store::Reader<'_>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Answer;
    use std::sync::Arc;
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
            let c = read(store.startup_reader(), p, cursor.clone(), None).unwrap();
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
        assert!(store.startup_reader().partition_channels(4, None, usize::MAX).unwrap().is_empty());
        assert_eq!(store.startup_reader().partition_channels(5, None, usize::MAX).unwrap().len(), 1);
        assert!(store.startup_reader().read_messages(4, "big", 0, 5000, 10).unwrap().is_empty());
    }
}

//! The store on a real fjall database in a temporary directory: group commit and its
//! rounds, reads after reopening, the replication bookkeeping, and the on-disk encoding
//! pinned byte for byte. Test code only: nothing here may be used by the crate.

use super::*;

fn msg(i: u64) -> StoredMessage {
    StoredMessage { ts: i, key: None, from: None, idem: None, data: format!("{{\"i\":{i}}}") }
}

fn one_message(store: &Store, p: PartitionId, offset: u64) -> Batch<'_> {
    let mut b = store.batch();
    b.put_message(p, "room:1", offset, &msg(offset));
    b
}

/// Batches written in one pass of the runtime reach the writer together: one fsync,
/// even when the pass is long enough for the writer to have synced the first alone.
#[tokio::test]
async fn batches_of_one_runtime_pass_share_one_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(dir.path(), FsyncPolicy::Batch, metrics.clone()).unwrap();
    let writers: Vec<_> = (1..=4)
        .map(|p| {
            let store = store.clone();
            tokio::spawn(async move {
                // A busy pass: each task computes for a while before it writes.
                let until = tokio::time::Instant::now() + std::time::Duration::from_millis(20);
                while tokio::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
                one_message(&store, p, 1).write(true).await
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    assert_eq!(metrics.store_syncs.get(), 1, "four batches of one pass, one group fsync");
    for p in 1..=4 {
        assert_eq!(store.reader().read_messages(p, "room:1", 0, u64::MAX, 10).unwrap().len(), 1);
    }
}

/// A round whose first writer is held up (its worker busy with a long synchronous
/// step) is handed over by a batch from another thread once it is older than
/// `ROUND_WAIT`.
#[tokio::test]
async fn a_held_up_round_is_handed_over_by_a_later_batch() {
    use std::future::Future;
    use std::task::Poll;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), FsyncPolicy::Batch, Arc::new(Metrics::new())).unwrap();
    let mut first = Box::pin(one_message(&store, 1, 1).write(true));
    let polled = std::future::poll_fn(|cx| Poll::Ready(first.as_mut().poll(cx))).await;
    assert!(polled.is_pending(), "the first batch waits for the end of the pass");
    // The first writer is never polled again; the round only grows older.
    let opened = tokio::time::Instant::now();
    while opened.elapsed() < ROUND_WAIT {
        std::hint::spin_loop();
    }
    let other = store.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(one_message(&other, 2, 1).write(true))
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(store.reader().read_messages(1, "room:1", 0, u64::MAX, 10).unwrap().len(), 1, "the first batch too");
    first.await.unwrap();
}

/// The batch that opened a round hands the round over even when its writer stops
/// waiting: the batches that joined it are still committed and answered.
#[tokio::test]
async fn a_dropped_first_writer_still_hands_its_round_over() {
    use std::future::Future;
    use std::task::Poll;
    async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx))).await
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), FsyncPolicy::Batch, Arc::new(Metrics::new())).unwrap();
    let mut first = Box::pin(one_message(&store, 1, 1).write(true));
    assert!(poll_once(&mut first).await.is_pending(), "the first batch waits for the end of the pass");
    let mut second = Box::pin(one_message(&store, 2, 1).write(true));
    assert!(poll_once(&mut second).await.is_pending(), "the second joins the round");
    drop(first);
    second.await.unwrap();
    for p in 1..=2 {
        assert_eq!(store.reader().read_messages(p, "room:1", 0, u64::MAX, 10).unwrap().len(), 1, "partition {p}");
    }
}

#[tokio::test]
async fn writes_read_back_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), FsyncPolicy::Batch, Arc::new(Metrics::new())).unwrap();
        let mut b = store.batch();
        for i in 1..=5 {
            b.put_message(3, "room:1", i, &msg(i));
        }
        b.put_message(3, "room:10", 1, &msg(99));
        b.put_meta(3, "room:1", &ChannelMeta { epoch: "E".into(), top: 5, first: 1, count: 5, bytes: 50 });
        b.put_consumer(3, "room:1", "svc", 4);
        b.write(true).await.unwrap();
        let got = store.reader().read_messages(3, "room:1", 1, 4, 100).unwrap();
        assert_eq!(got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!(got[0].1, msg(2));
        let mut b = store.batch();
        b.put_message(3, "room:1", 6, &StoredMessage { idem: Some("k6".into()), ..msg(6) });
        b.write(true).await.unwrap();
        let keys = store.reader().recent_idempotency_keys(3, "room:1", 6, 4, 100).unwrap();
        assert_eq!(keys, vec![(6, 6, "k6".to_string())], "stops at the first message older than the cutoff");
        assert!(store.reader().read_messages(3, "room:1", u64::MAX, u64::MAX, 10).unwrap().is_empty());
        let metas = store.reader().read_metas(3, "room:1", 1, 5, 100).unwrap();
        assert_eq!(metas.len(), 5);
        store.close().unwrap();
    }
    let store = Store::open(dir.path(), FsyncPolicy::Batch, Arc::new(Metrics::new())).unwrap();
    let all = store.reader().all_channels().unwrap();
    assert_eq!(
        all,
        vec![(3, "room:1".to_string(), ChannelMeta { epoch: "E".into(), top: 5, first: 1, count: 5, bytes: 50 })]
    );
    assert_eq!(store.reader().consumer_offset(3, "room:1", "svc").unwrap(), Some(4));
    assert_eq!(store.reader().consumer_offset(3, "room:1", "other").unwrap(), None);
    assert_eq!(store.reader().read_messages(3, "room:10", 0, 10, 10).unwrap().len(), 1);
}

/// A backward read returns the newest `limit` messages of `after < offset <= upto`,
/// newest first, steps over holes, and stays inside its channel (`room:1` beside
/// `room:10` and `room:0`, whose keys sort on either side).
#[tokio::test]
async fn reverse_reads_take_the_newest_of_the_range_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), FsyncPolicy::Batch, Arc::new(Metrics::new())).unwrap();
    let mut b = store.batch();
    for i in [1, 2, 3, 5, 8, 9] {
        b.put_message(3, "room:1", i, &msg(i));
    }
    b.put_message(3, "room:10", 1, &msg(99));
    b.put_message(3, "room:0", 100, &msg(98));
    b.write(true).await.unwrap();
    let offsets = |after, upto, limit| {
        store
            .reader()
            .read_messages_rev(3, "room:1", after, upto, limit)
            .unwrap()
            .into_iter()
            .map(|(o, _)| o)
            .collect::<Vec<_>>()
    };
    assert_eq!(offsets(0, u64::MAX, 100), vec![9, 8, 5, 3, 2, 1]);
    assert_eq!(offsets(0, u64::MAX, 2), vec![9, 8], "the newest of the range");
    assert_eq!(offsets(0, 7, 2), vec![5, 3], "below an upper bound, over the holes");
    assert_eq!(offsets(2, 7, 100), vec![5, 3], "above an exclusive lower bound");
    assert_eq!(offsets(0, 7, 0), Vec::<u64>::new(), "limit 0 reads nothing");
    assert_eq!(offsets(5, 5, 10), Vec::<u64>::new(), "an empty range");
    assert_eq!(offsets(7, 3, 10), Vec::<u64>::new(), "a range upside down");
    assert_eq!(offsets(u64::MAX, u64::MAX, 10), Vec::<u64>::new());
    let got = store.reader().read_messages_rev(3, "room:1", 0, 3, 1).unwrap();
    assert_eq!(got, vec![(3, msg(3))], "messages decode as written");
    // Paging backwards from the top by the last offset seen visits each message once.
    let (mut upto, mut seen) = (u64::MAX, Vec::new());
    loop {
        let page = offsets(0, upto, 4);
        let Some(&last) = page.last() else { break };
        seen.extend(page);
        upto = last - 1;
    }
    assert_eq!(seen, vec![9, 8, 5, 3, 2, 1]);
    // The forward read is unchanged beside it.
    let fwd = store.reader().read_messages(3, "room:1", 2, 8, 2).unwrap();
    assert_eq!(fwd.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![3, 5]);
}

/// The bytes the store writes, pinned: keys (partition, channel, NUL, offset, all
/// big-endian) and postcard values. A change here breaks every existing data directory.
#[tokio::test]
async fn the_on_disk_encoding_is_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), FsyncPolicy::Batch, Arc::new(Metrics::new())).unwrap();
    let message =
        StoredMessage { ts: 300, key: Some("k".into()), from: None, idem: Some("i".into()), data: "null".into() };
    let meta = ChannelMeta { epoch: "E".into(), top: 5, first: 1, count: 5, bytes: 50 };
    let position = ReplLogMeta { leo: 14, epochs: vec![(1, 10)] };
    let mut b = store.batch();
    assert_eq!(b.put_message(3, "c", 2, &message), 14, "the stored size is the encoded length");
    b.put_meta(3, "c", &meta);
    b.put_consumer(3, "c", "svc", 4);
    b.put_repl_batch(3, 7, &["c"], &position);
    b.put_adopted(3, 9);
    b.write(true).await.unwrap();

    let raw = |ks: &Keyspace, key: &[u8]| ks.get(key).unwrap().map(|v| v.to_vec());
    let message_key = [&[0, 0, 0, 3][..], b"c\0", &2u64.to_be_bytes()].concat();
    assert_eq!(message_key, super::message_key(3, "c", 2));
    assert_eq!(
        raw(&store.messages, &message_key),
        Some(vec![0xac, 0x02, 1, 1, b'k', 0, 1, 1, b'i', 4, b'n', b'u', b'l', b'l'])
    );
    assert_eq!(raw(&store.meta, &[0, 0, 0, 3, b'c', 0]), Some(vec![1, b'E', 5, 1, 5, 50]));
    assert_eq!(raw(&store.consumers, &[0, 0, 0, 3, b'c', 0, b's', b'v', b'c']), Some(4u64.to_be_bytes().to_vec()));
    assert_eq!(raw(&store.replog, &[0, 0, 0, 3, 0]), Some(vec![14, 1, 1, 10]));
    let touched_key = [&[0, 0, 0, 3, 1][..], &7u64.to_be_bytes()].concat();
    assert_eq!(raw(&store.replog, &touched_key), Some(vec![1, 1, b'c']));
    assert_eq!(raw(&store.adopted, &[0, 0, 0, 3]), Some(9u64.to_be_bytes().to_vec()));

    // What policies are shown is derived from those bytes.
    let metas = store.reader().read_metas(3, "c", 1, 5, 10).unwrap();
    assert_eq!(metas, vec![MessageMeta { offset: 2, ts: 300, size: 14, key: Some("k".into()), tombstone: true }]);
}

/// A replica's position is stored with its batches; the channels a run of batches
/// touched read back only when every record of the run is there; clearing a channel
/// or a partition removes what they hold.
#[tokio::test]
async fn replication_positions_and_touched_channels() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), FsyncPolicy::Batch, Arc::new(Metrics::new())).unwrap();
    assert_eq!(store.repl_meta(2).unwrap(), None);
    let mut b = store.batch();
    for seq in 10..14 {
        let meta = ReplLogMeta { leo: seq + 1, epochs: vec![(1, 10)] };
        let name = format!("c{}", seq % 2);
        b.put_repl_batch(2, seq, &[name.as_str(), "all"], &meta);
    }
    b.put_message(2, "c0", 1, &msg(1));
    b.put_meta(2, "c0", &ChannelMeta { epoch: "E".into(), top: 1, first: 1, count: 1, bytes: 10 });
    b.put_consumer(2, "c0", "svc", 1);
    b.put_message(2, "c1", 1, &msg(1));
    b.write(true).await.unwrap();
    assert_eq!(store.repl_meta(2).unwrap(), Some(ReplLogMeta { leo: 14, epochs: vec![(1, 10)] }));
    let names = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<std::collections::BTreeSet<_>>());
    assert_eq!(store.repl_touched(2, 12, 14).unwrap(), names(&["all", "c0", "c1"]));
    assert_eq!(store.repl_touched(2, 13, 14).unwrap(), names(&["all", "c1"]));
    assert_eq!(store.repl_touched(2, 14, 14).unwrap(), names(&[]));
    assert_eq!(store.repl_touched(2, 8, 14).unwrap(), None, "records 8 and 9 are missing");
    assert_eq!(store.repl_touched(2, 12, 16).unwrap(), None, "records 14 and 15 are missing");
    let mut b = store.batch();
    b.clear_channel(2, "c0").unwrap();
    b.write(true).await.unwrap();
    assert_eq!(store.reader().channel_meta(2, "c0").unwrap(), None);
    assert!(store.reader().read_messages(2, "c0", 0, 10, 10).unwrap().is_empty());
    assert_eq!(store.reader().consumer_offset(2, "c0", "svc").unwrap(), None);
    assert_eq!(store.reader().read_messages(2, "c1", 0, 10, 10).unwrap().len(), 1);
    store.clear_partition(2).await.unwrap();
    assert_eq!(store.repl_meta(2).unwrap(), None);
    assert_eq!(store.repl_touched(2, 13, 14).unwrap(), None);
}

/// Reads run on the pool's own threads at a lower priority, never on the calling thread,
/// and at most the pool's size at once: with one permit, a read held by the fault hook keeps a second read (of another
/// channel) waiting for its turn, while the runtime stays free; released, both answer.
#[tokio::test]
async fn reads_take_turns_on_the_pool_off_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with_readers(dir.path(), FsyncPolicy::Batch, Arc::new(Metrics::new()), 1).unwrap();
    one_message(&store, 1, 1).write(true).await.unwrap();
    let ran_on = store.read(|_| std::thread::current().name().map(String::from)).await.unwrap();
    assert_eq!(ran_on.as_deref(), Some("store-read-0"), "a read runs on the pool's thread");
    // The nice value is field 19 of /proc/thread-self/stat (16th after the command name).
    let nice = || {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        stat.rsplit_once(") ").unwrap().1.split(' ').nth(16).unwrap().parse::<i64>().unwrap()
    };
    let (mine, reads) = (nice(), store.read(move |_| nice()).await.unwrap());
    assert_eq!(reads, mine + i64::from(READ_NICE), "reads run at a lower priority");
    let hold = store.hold_reads("room:1");
    let held = tokio::spawn({
        let store = store.clone();
        async move { store.read(|r| r.read_messages(1, "room:1", 0, 10, 10)).await }
    });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while hold.waiting() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the read reached the hook");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let mut second = tokio::spawn({
        let store = store.clone();
        async move { store.read(|r| r.channel_meta(1, "room:2")).await }
    });
    // The runtime is free (this task runs), and the second read waits for the permit.
    let waited = tokio::time::timeout(std::time::Duration::from_millis(200), &mut second).await;
    assert!(waited.is_err(), "one permit: the second read waits its turn");
    drop(hold);
    assert_eq!(held.await.unwrap().unwrap().unwrap().len(), 1);
    assert_eq!(second.await.unwrap().unwrap().unwrap(), None);
}

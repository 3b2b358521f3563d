//! The owner task on a real store: seal, adoption, the hand-off of writes that race a
//! seal, and commands parked behind a store read of their channel (reads held by the
//! store's fault hook). It must never reach around the owner's mailbox into its state.

use super::*;
use switchyard_proto::protocol::{OpError, PublishOk};
use switchyard_store::StoredMessage;

fn publish(channel: &str, data: &str) -> (OwnerCommand, oneshot::Receiver<Result<PublishOk, OpError>>) {
    let (tx, rx) = oneshot::channel();
    (OwnerCommand::Publish(crate::test_support::request(channel, data, None), tx), rx)
}

/// Seal, adopt and the hand-off of writes that race a seal, on a real store.
#[tokio::test]
async fn a_sealed_owner_hands_writes_on_and_an_adoption_reloads_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(dir.path(), switchyard_store::FsyncPolicy::Batch, metrics.clone()).unwrap();
    let (tx, adopt_tx, mut fwd_rx) = spawn_owner(&store, &metrics, Vec::new());

    let (cmd, ack) = publish("room:1", "1");
    tx.send(cmd).await.unwrap();
    let first = ack.await.unwrap().unwrap();
    assert_eq!(first.offset, 1);

    let (done, sealed) = oneshot::channel();
    tx.send(OwnerCommand::Seal("moved".into(), Some(done))).await.unwrap();
    sealed.await.unwrap();
    // A write that arrives after the seal is not stored here: it is handed on.
    let (cmd, _ack) = publish("room:1", "2");
    tx.send(cmd).await.unwrap();
    match fwd_rx.recv().await.unwrap() {
        Forward::Publish(req, _) => assert_eq!(req.data.get(), "2"),
        Forward::Commit { .. } => panic!("expected the publish"),
    }
    assert_eq!(store.startup_reader().read_messages(3, "room:1", 0, 10, 10).unwrap().len(), 1);

    // An adoption waits for the store, then serves what it holds (same epoch, same top).
    let (fill, filled) = oneshot::channel();
    adopt_tx.send(filled).unwrap();
    let (cmd, ack) = publish("room:1", "3");
    tx.send(cmd).await.unwrap();
    let mut b = store.batch();
    b.put_message(3, "room:1", 2, &StoredMessage { ts: 1, key: None, from: None, idem: None, data: "9".into() });
    let meta = ChannelMeta { epoch: first.epoch.to_string(), top: 2, first: 1, count: 2, bytes: 2 };
    b.put_meta(3, "room:1", &meta);
    b.write(true).await.unwrap();
    fill.send(()).unwrap();
    let third = ack.await.unwrap().unwrap();
    assert_eq!((third.offset, third.epoch), (3, first.epoch), "the queued write runs on the adopted state");
}

/// An owner of partition 3 on `store` that recovered `recovered`; its mailbox, adoption
/// queue and the writes it hands on once sealed.
#[allow(clippy::type_complexity)]
fn spawn_owner(
    store: &Arc<Store>,
    metrics: &Arc<Metrics>,
    recovered: Vec<(String, ChannelMeta)>,
) -> (mpsc::Sender<OwnerCommand>, mpsc::UnboundedSender<oneshot::Receiver<()>>, mpsc::UnboundedReceiver<Forward>) {
    let (tx, rx) = mpsc::channel(64);
    let (adopt_tx, adopt_rx) = mpsc::unbounded_channel();
    let (fwd_tx, fwd_rx) = mpsc::unbounded_channel();
    let owner = Owner::new(
        3,
        store.clone(),
        metrics.clone(),
        Duration::from_secs(60),
        Budget::new(1000, 1 << 20),
        recovered,
        Mailbox {
            commands: rx,
            adoptions: adopt_rx,
            forward: Some(fwd_tx),
            replication: crate::replication::Replication::new(8, Duration::from_secs(2), 1 << 20),
            presence: Arc::new(PresenceLimits::default()),
        },
    );
    tokio::spawn(owner.run());
    (tx, adopt_tx, fwd_rx)
}

/// Stores messages 1..=n of `channel` in partition 3, message i with idempotency key `k{i}`
/// and accepted now; returns the channel's metadata as recovery would find it.
async fn stored_keyed(store: &Store, channel: &str, n: u64) -> ChannelMeta {
    let mut b = store.batch();
    for i in 1..=n {
        let m =
            StoredMessage { ts: now_ms(), key: None, from: None, idem: Some(format!("k{i}")), data: format!("{i}") };
        b.put_message(3, channel, i, &m);
    }
    let meta = ChannelMeta { epoch: "E".into(), top: n, first: 1, count: n, bytes: n };
    b.put_meta(3, channel, &meta);
    b.write(true).await.unwrap();
    meta
}

fn keyed(channel: &str, data: &str, key: &str) -> (OwnerCommand, oneshot::Receiver<Result<PublishOk, OpError>>) {
    let (tx, rx) = oneshot::channel();
    (OwnerCommand::Publish(crate::test_support::request(channel, data, Some(key)), tx), rx)
}

const DEADLINE: Duration = Duration::from_secs(5);

/// A recovered channel's first keyed publish starts the load of its idempotency window and
/// parks behind it, with every later command of that channel (an unkeyed publish too: it
/// must not take an offset first); another channel of the partition is served meanwhile.
/// Released, the keyed publish is deduplicated against the stored keys and the parked
/// commands run in arrival order.
#[tokio::test]
async fn a_keyed_publish_waits_for_its_window_and_other_channels_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(dir.path(), switchyard_store::FsyncPolicy::Batch, metrics.clone()).unwrap();
    let meta = stored_keyed(&store, "slow:1", 3).await;
    let hold = store.hold_reads("slow:1");
    let (tx, _adopt, _fwd) = spawn_owner(&store, &metrics, vec![("slow:1".into(), meta)]);

    let (cmd, mut retry) = keyed("slow:1", "\"again\"", "k2");
    tx.send(cmd).await.unwrap();
    let (cmd, mut after) = publish("slow:1", "4");
    tx.send(cmd).await.unwrap();
    let (cmd, mut fresh) = keyed("slow:1", "5", "k9");
    tx.send(cmd).await.unwrap();
    let (cmd, other) = publish("other:1", "1");
    tx.send(cmd).await.unwrap();
    let other = tokio::time::timeout(DEADLINE, other).await.expect("another channel is served").unwrap().unwrap();
    assert_eq!(other.offset, 1);
    crate::test_support::eventually("the window's read waits in the store", async || hold.waiting() == 1).await;
    for ack in [&mut retry, &mut after, &mut fresh] {
        assert!(matches!(ack.try_recv(), Err(oneshot::error::TryRecvError::Empty)), "parked");
    }
    assert_eq!(metrics.store_loads.get(), 1, "one load for the channel");

    drop(hold);
    let retry = tokio::time::timeout(DEADLINE, retry).await.expect("answered").unwrap().unwrap();
    assert_eq!((retry.offset, &*retry.epoch), (2, "E"), "deduplicated against the stored key");
    let after = after.await.unwrap().unwrap();
    let fresh = fresh.await.unwrap().unwrap();
    assert_eq!((after.offset, fresh.offset), (4, 5), "arrival order kept");
    let stored = store.startup_reader().read_messages(3, "slow:1", 0, 10, 10).unwrap();
    assert_eq!(stored.iter().map(|(o, m)| (*o, m.data.as_str())).collect::<Vec<_>>().len(), 5);
    assert_eq!(stored[3].1.data, "4");
    // The window is in memory now: a further retry needs no load.
    let (cmd, again) = keyed("slow:1", "0", "k9");
    tx.send(cmd).await.unwrap();
    assert_eq!(again.await.unwrap().unwrap().offset, 5);
    assert_eq!(metrics.store_loads.get(), 1);
}

/// A consumer lookup parks only its own channel, and answers from the store once released.
#[tokio::test]
async fn a_consumer_lookup_waits_for_its_read_and_other_channels_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(dir.path(), switchyard_store::FsyncPolicy::Batch, metrics.clone()).unwrap();
    let meta = stored_keyed(&store, "jobs:1", 6).await;
    let mut b = store.batch();
    b.put_consumer(3, "jobs:1", "worker", 5);
    b.write(true).await.unwrap();
    let hold = store.hold_reads("jobs:1");
    let (tx, _adopt, _fwd) = spawn_owner(&store, &metrics, vec![("jobs:1".into(), meta)]);
    let (reply, mut facts) = oneshot::channel();
    tx.send(OwnerCommand::Info { channel: "jobs:1".into(), consumer: Some("worker".into()), reply }).await.unwrap();
    let (reply, mut commit) = oneshot::channel();
    tx.send(OwnerCommand::Commit { channel: "jobs:1".into(), consumer: "worker".into(), offset: 3, reply })
        .await
        .unwrap();
    let (cmd, other) = publish("other:1", "1");
    tx.send(cmd).await.unwrap();
    tokio::time::timeout(DEADLINE, other).await.expect("another channel is served").unwrap().unwrap();
    crate::test_support::eventually("the lookup waits in the store", async || hold.waiting() == 1).await;
    assert!(matches!(facts.try_recv(), Err(oneshot::error::TryRecvError::Empty)), "parked");
    assert!(matches!(commit.try_recv(), Err(oneshot::error::TryRecvError::Empty)), "parked");
    drop(hold);
    let facts = tokio::time::timeout(DEADLINE, facts).await.expect("answered").unwrap().unwrap();
    assert_eq!((facts.committed, facts.top), (Some(5), 6));
    commit.await.unwrap().unwrap();
    let stored = store.read(|r| r.consumer_offset(3, "jobs:1", "worker")).await.unwrap().unwrap();
    assert_eq!(stored, Some(5), "a commit below the stored offset changes nothing");
}

/// A seal while a load is in flight hands the parked writes on like any write that reaches
/// the sealed partition, and the load's late result is ignored: after an adoption the
/// channel is loaded afresh.
#[tokio::test]
async fn a_seal_hands_parked_writes_on_and_a_stale_load_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(dir.path(), switchyard_store::FsyncPolicy::Batch, metrics.clone()).unwrap();
    let meta = stored_keyed(&store, "slow:1", 2).await;
    let hold = store.hold_reads("slow:1");
    let (tx, adopt_tx, mut fwd_rx) = spawn_owner(&store, &metrics, vec![("slow:1".into(), meta)]);
    let (cmd, _parked) = keyed("slow:1", "3", "k3");
    tx.send(cmd).await.unwrap();
    crate::test_support::eventually("the window's read waits in the store", async || hold.waiting() == 1).await;
    let (done, sealed) = oneshot::channel();
    tx.send(OwnerCommand::Seal("moved".into(), Some(done))).await.unwrap();
    tokio::time::timeout(DEADLINE, sealed).await.expect("sealed while the load is held").unwrap();
    match tokio::time::timeout(DEADLINE, fwd_rx.recv()).await.expect("handed on").unwrap() {
        Forward::Publish(req, _) => assert_eq!(req.idempotency_key.as_deref(), Some("k3")),
        Forward::Commit { .. } => panic!("expected the publish"),
    }
    // Adopted again (same store), then the stale load finishes.
    let (fill, filled) = oneshot::channel();
    adopt_tx.send(filled).unwrap();
    fill.send(()).unwrap();
    let (cmd, retry) = keyed("slow:1", "0", "k2");
    tx.send(cmd).await.unwrap();
    crate::test_support::eventually("the new load waits too", async || hold.waiting() == 2).await;
    drop(hold);
    let retry = tokio::time::timeout(DEADLINE, retry).await.expect("answered").unwrap().unwrap();
    assert_eq!(retry.offset, 2, "deduplicated by the new load");
    assert_eq!(metrics.store_loads.get(), 2);
}

/// An adoption whose read of the partition's channels hits a damaged table does not serve
/// the partition empty (every channel would restart at offset 1 over its stored data): it
/// stays sealed, and a write is handed on instead of stored.
#[tokio::test]
async fn an_adoption_that_cannot_read_the_store_stays_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    {
        let store = Store::open(dir.path(), switchyard_store::FsyncPolicy::Batch, metrics.clone()).unwrap();
        let mut b = store.batch();
        for i in 0..200 {
            let meta = ChannelMeta { epoch: "E".into(), top: 5, first: 1, count: 5, bytes: 50 };
            b.put_meta(3, &format!("room:{i:04}"), &meta);
        }
        b.write(true).await.unwrap();
        store.close().unwrap();
    }
    // Flush the channels into a table, then flip a byte inside its first data block.
    let table = {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let ks = db.keyspace("channels", fjall::KeyspaceCreateOptions::default).unwrap();
        ks.rotate_memtable_and_wait().unwrap();
        let tables = ks.path().join("tables");
        std::fs::read_dir(tables).unwrap().next().unwrap().unwrap().path()
    };
    let mut bytes = std::fs::read(&table).unwrap();
    bytes[100] ^= 0x5a;
    std::fs::write(&table, bytes).unwrap();

    let store = Store::open(dir.path(), switchyard_store::FsyncPolicy::Batch, metrics.clone()).unwrap();
    let (tx, adopt_tx, mut fwd_rx) = spawn_owner(&store, &metrics, Vec::new());
    let (filled, rx) = oneshot::channel();
    adopt_tx.send(rx).unwrap();
    filled.send(()).unwrap();
    let (cmd, _ack) = publish("room:0001", "1");
    tx.send(cmd).await.unwrap();
    match fwd_rx.recv().await.unwrap() {
        Forward::Publish(req, _) => assert_eq!(req.data.get(), "1", "handed on, not stored at offset 1"),
        Forward::Commit { .. } => panic!("expected the publish"),
    }
    assert_eq!(store.damaged().first().map(|(p, _)| *p), Some(3), "the failed read is recorded");
}

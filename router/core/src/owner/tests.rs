//! The owner task on a real store: seal, adoption, and the hand-off of writes that race a
//! seal. It must never reach around the owner's mailbox into its state.

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
    let (tx, rx) = mpsc::channel(16);
    let (adopt_tx, adopt_rx) = mpsc::unbounded_channel();
    let (fwd_tx, mut fwd_rx) = mpsc::unbounded_channel();
    let owner = Owner::new(
        3,
        store.clone(),
        metrics,
        Duration::from_secs(60),
        Budget::new(1000, 1 << 20),
        Vec::new(),
        Mailbox {
            commands: rx,
            adoptions: adopt_rx,
            forward: Some(fwd_tx),
            replication: crate::replication::Replication::new(8, Duration::from_secs(2), 1 << 20),
            presence: Arc::new(PresenceLimits::default()),
        },
    );
    tokio::spawn(owner.run());

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
    assert_eq!(store.read_messages(3, "room:1", 0, 10, 10).unwrap().len(), 1);

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

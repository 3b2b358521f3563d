//! The partition leaders' side of the configuration manager: ISR changes written to the
//! map key by compare-and-swap.
//!
//! It owns one task per node that takes the ISR changes its partition leaders ask for and
//! writes them (all that are queued, in one write) into `partition-map`, each only if the record still names this node as the
//! partition's leader under the same leader epoch, and only if the key was not written
//! since it was read (its mod revision). A change that cannot be written is dropped: the
//! leader's high watermark keeps counting the old set, and it asks again later. A shrink
//! asked while most members report this node unreachable ([`State::cut_off`]) is dropped
//! the same way: its followers are not behind, it is cut off, and an ISR of itself alone
//! would let it acknowledge what no follower holds while the leader moves its partitions
//! to those followers. It must
//! never change anything but one partition's ISR (and the map epoch, so every node
//! installs it).

use std::sync::Arc;
use std::time::SystemTime;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use switchyard_core::replication::IsrChange;
use tokio::sync::mpsc;

use crate::keys::{self, MapRecord};
use crate::{connect, timed, Context, State};

/// How long the writer waits for more changes after the first, so a burst (every
/// partition's follower catching up at start) costs a few map writes, not one per partition.
const GATHER: std::time::Duration = std::time::Duration::from_millis(50);

/// Writes the ISR changes of `changes` until the node shuts down, as many as are queued in
/// one fenced write of the map.
pub(crate) async fn run(node: Arc<Context>, state: Arc<State>, mut changes: mpsc::UnboundedReceiver<IsrChange>) {
    let mut client = None;
    let mut shutdown = node.shutdown.clone();
    loop {
        let first = tokio::select! {
            c = changes.recv() => match c { Some(c) => c, None => return },
            _ = shutdown.changed() => return,
        };
        tokio::time::sleep(GATHER).await;
        // The latest change per partition: a later one supersedes an earlier one.
        let mut batch = std::collections::BTreeMap::new();
        batch.insert(first.partition, first);
        while let Ok(c) = changes.try_recv() {
            batch.insert(c.partition, c);
        }
        let cut_off = state.cut_off();
        let batch: Vec<IsrChange> = batch
            .into_values()
            .filter(|c| {
                let keep = c.expand || !cut_off;
                if !keep {
                    tracing::warn!(partition = c.partition, isr = ?c.isr, "most members cannot reach this node: ISR shrink not written");
                }
                keep
            })
            .collect();
        if batch.is_empty() {
            continue;
        }
        if client.is_none() {
            client = connect(&state.config).await.ok();
        }
        let Some(kv) = client.as_mut() else {
            tracing::warn!(changes = batch.len(), "etcd unreachable; ISR changes not written");
            continue;
        };
        match write(kv, &state, &batch).await {
            Ok(written) => {
                for change in &batch {
                    if !written.contains(&change.partition) {
                        tracing::info!(partition = change.partition, "ISR change refused (fenced or stale)");
                        continue;
                    }
                    node.partitions.replication.isr_written(change.partition, change.leader_epoch, &change.isr);
                    let m = &node.metrics;
                    if change.expand {
                        m.isr_expands.inc()
                    } else {
                        m.isr_shrinks.inc()
                    }
                    tracing::info!(partition = change.partition, isr = ?change.isr, "ISR changed");
                }
            }
            Err(e) => {
                tracing::warn!(changes = batch.len(), error = %e, "ISR changes not written");
                client = None;
            }
        }
    }
}

/// One fenced compare-and-swap of every change in `changes` that this node may make (it
/// leads the partition under the change's leader epoch), retried while only the map's
/// revision moved. Returns the partitions whose ISR the map now holds as asked.
async fn write(kv: &mut etcd_client::Client, state: &State, changes: &[IsrChange]) -> Result<Vec<u32>, crate::Error> {
    let key = state.keys.map();
    let t = state.config.etcd_timeout;
    for _ in 0..5 {
        let resp = timed("get map", t, kv.get(key.clone(), None)).await?;
        let Some(found) = resp.kvs().first() else { return Ok(Vec::new()) };
        let Ok(mut map) = serde_json::from_slice::<MapRecord>(found.value()) else { return Ok(Vec::new()) };
        let (mut done, mut changed) = (Vec::new(), false);
        for change in changes {
            let p = change.partition as usize;
            let leads = map.owners.get(p) == Some(&state.node_id)
                && map.leader_epochs.get(p) == Some(&change.leader_epoch)
                && p < map.isr.len();
            if !leads {
                continue;
            }
            if map.isr[p] != change.isr {
                map.isr[p] = change.isr.clone();
                changed = true;
            }
            done.push(change.partition);
        }
        if !changed {
            return Ok(done);
        }
        map.epoch += 1;
        map.updated_at = keys::timestamp(SystemTime::now());
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, found.mod_revision())])
            .and_then([TxnOp::put(key.clone(), map.to_json(), None)]);
        if timed("write isr", t, kv.txn(txn)).await?.succeeded() {
            return Ok(done);
        }
    }
    Ok(Vec::new())
}

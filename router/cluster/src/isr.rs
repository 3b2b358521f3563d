//! The partition leaders' side of the configuration manager: ISR changes written to the
//! map key by compare-and-swap.
//!
//! It owns one task per node that takes the ISR changes its partition leaders ask for and
//! writes each into `partition-map` only if the record still names this node as the
//! partition's leader under the same leader epoch, and only if the key was not written
//! since it was read (its mod revision). A change that cannot be written is dropped: the
//! leader's high watermark keeps counting the old set, and it asks again later. It must
//! never change anything but one partition's ISR (and the map epoch, so every node
//! installs it).

use std::sync::Arc;
use std::time::SystemTime;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use switchyard_core::replication::IsrChange;
use tokio::sync::mpsc;

use crate::keys::{self, MapRecord};
use crate::{connect, timed, Context, State};

/// Writes the ISR changes of `changes` until the node shuts down.
pub(crate) async fn run(node: Arc<Context>, state: Arc<State>, mut changes: mpsc::UnboundedReceiver<IsrChange>) {
    let mut client = None;
    let mut shutdown = node.shutdown.clone();
    loop {
        let change = tokio::select! {
            c = changes.recv() => match c { Some(c) => c, None => return },
            _ = shutdown.changed() => return,
        };
        if client.is_none() {
            client = connect(&state.config).await.ok();
        }
        let Some(kv) = client.as_mut() else {
            tracing::warn!(partition = change.partition, "etcd unreachable; ISR change not written");
            continue;
        };
        match write(kv, &state, &change).await {
            Ok(true) => {
                let m = &node.metrics;
                if change.expand {
                    m.isr_expands.inc()
                } else {
                    m.isr_shrinks.inc()
                }
                tracing::info!(partition = change.partition, isr = ?change.isr, "ISR changed");
            }
            Ok(false) => tracing::info!(partition = change.partition, "ISR change refused (fenced or stale)"),
            Err(e) => {
                tracing::warn!(partition = change.partition, error = %e, "ISR change not written");
                client = None;
            }
        }
    }
}

/// One fenced compare-and-swap, retried while only the map's revision moved.
async fn write(kv: &mut etcd_client::Client, state: &State, change: &IsrChange) -> Result<bool, crate::Error> {
    let key = state.keys.map();
    let t = state.config.etcd_timeout;
    for _ in 0..5 {
        let resp = timed("get map", t, kv.get(key.clone(), None)).await?;
        let Some(found) = resp.kvs().first() else { return Ok(false) };
        let Ok(mut map) = serde_json::from_slice::<MapRecord>(found.value()) else { return Ok(false) };
        let p = change.partition as usize;
        let leads = map.owners.get(p) == Some(&state.node_id)
            && map.leader_epochs.get(p) == Some(&change.leader_epoch)
            && p < map.isr.len();
        if !leads {
            return Ok(false);
        }
        if map.isr[p] == change.isr {
            return Ok(true);
        }
        map.isr[p] = change.isr.clone();
        map.epoch += 1;
        map.updated_at = keys::timestamp(SystemTime::now());
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, found.mod_revision())])
            .and_then([TxnOp::put(key.clone(), map.to_json(), None)]);
        if timed("write isr", t, kv.txn(txn)).await?.succeeded() {
            return Ok(true);
        }
    }
    Ok(false)
}

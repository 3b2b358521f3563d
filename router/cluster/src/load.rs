//! The node's load report: `load/<id>` under its lease, every `cluster.load_interval`.
//!
//! It owns measuring, for each partition this node owns, the publish rate since the last
//! report, the bytes stored and the live subscriptions (from the owners' snapshots), and
//! writing them for the leader's balancer (then reading everyone's, for the API). It must
//! never block an owner: a snapshot is one
//! mailbox message per partition, answered between batches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;

use etcd_client::{Client, PutOptions};

use super::keys::{self, LoadRecord, PartitionLoad};
use super::{timed, Error, State};
use crate::Context;

pub(super) async fn report(
    node: &Arc<Context>,
    state: &Arc<State>,
    mut client: Client,
    lease: i64,
) -> Result<(), Error> {
    // Per partition: the sum of channel tops at the last report, to turn into a rate.
    let mut last: HashMap<u32, u64> = HashMap::new();
    let mut last_at = Instant::now();
    loop {
        let map = node.map.borrow().clone();
        let elapsed = last_at.elapsed().as_secs_f64().max(0.001);
        last_at = Instant::now();
        let mut rec = LoadRecord {
            node: state.node_id.clone(),
            at: keys::timestamp(SystemTime::now()),
            connections: node.metrics.connections.get().max(0) as u64,
            ..LoadRecord::default()
        };
        // Only partitions owned now: one that comes back starts its rate afresh.
        let mut tops_now = HashMap::new();
        for (p, owner) in map.owners.iter().enumerate() {
            if *owner != state.node_id {
                continue;
            }
            let p = p as u32;
            let Some(snaps) = node.partitions.snapshot(p).await else { continue };
            let tops: u64 = snaps.iter().map(|s| s.stats.last_offset).sum();
            let before = last.get(&p).copied();
            tops_now.insert(p, tops);
            let load = PartitionLoad {
                msg_rate: before.map_or(0.0, |b| tops.saturating_sub(b) as f64 / elapsed),
                bytes: snaps.iter().map(|s| s.stats.bytes).sum(),
                subscribers: snaps.iter().map(|s| s.subscribers).sum(),
            };
            rec.msg_rate += load.msg_rate;
            rec.bytes += load.bytes;
            rec.partitions.insert(p, load);
        }
        last = tops_now;
        let json = serde_json::to_string_pretty(&rec).expect("load record serializes");
        let key = state.keys.load(&state.node_id);
        let put = client.put(key, json, Some(PutOptions::new().with_lease(lease)));
        timed("write load", state.config.etcd_timeout, put).await?;
        // Everyone's reports, for the API's picture of the cluster; a failed read keeps the last.
        let all = client.get(state.keys.loads(), Some(etcd_client::GetOptions::new().with_prefix()));
        if let Ok(resp) = timed("list loads", state.config.etcd_timeout, all).await {
            let loads = crate::leader::records::<LoadRecord>(resp.kvs())
                .into_iter()
                .map(|(id, l)| {
                    (id, crate::NodeLoad { connections: l.connections, msg_rate: l.msg_rate, bytes: l.bytes })
                })
                .collect();
            state.loads.store(Arc::new(loads));
        }
        tokio::time::sleep(state.config.load_interval).await;
    }
}

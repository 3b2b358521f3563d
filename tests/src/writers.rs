//! Writers for failover tests: publishers that keep publishing to one channel through
//! one node while the cluster fails over, each acknowledgement recorded, and the check
//! that every acknowledged message is in history exactly once at its offset.
//!
//! It owns only these helpers; it must never start or stop nodes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use serde_json::{json, Value};
use switchyard_proto::partition::partition_of;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{assert_contiguous, poll_for, reply_ok, wait_until, Client, Node, DEADLINE};

/// How long one publish attempt may take before the writer gives up on it (and its
/// connection) and tries again.
pub const ATTEMPT: Duration = Duration::from_millis(500);

/// One channel (named `namespace:N`) in each partition `owner` leads in `map`.
pub fn channels_led_by(map: &Value, owner: &str, partitions: u32, namespace: &str) -> Vec<String> {
    (0..partitions)
        .filter(|p| map["owners"][*p as usize] == json!(owner))
        .map(|p| {
            (0..).map(|i| format!("{namespace}:{i}")).find(|c| partition_of(c, partitions) == p).expect("a channel")
        })
        .collect()
}

/// One acknowledged publish.
#[derive(Debug, Clone)]
pub struct Acked {
    pub data: String,
    pub offset: u64,
    pub epoch: String,
    pub sent: Instant,
    pub at: Instant,
}

/// Publishes to one channel through one node, one at a time, each with its own data;
/// an attempt that fails or takes longer than [`ATTEMPT`] is abandoned (its outcome is
/// unknown: it may still land, and is never retried with the same data).
pub struct Writer {
    pub channel: String,
    acked: Arc<Mutex<Vec<Acked>>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn start(addr: SocketAddr, channel: String, tag: String) -> Writer {
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let (stop, stopped) = watch::channel(false);
        let (ch, out) = (channel.clone(), acked.clone());
        let task = tokio::spawn(async move {
            let mut client: Option<Client> = None;
            for n in 0.. {
                if *stopped.borrow() {
                    return;
                }
                if client.is_none() {
                    client = tokio::time::timeout(ATTEMPT, Client::connect_to(addr)).await.ok().and_then(Result::ok);
                }
                let Some(c) = client.as_mut() else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let data = format!("{tag}-{n}");
                let sent = Instant::now();
                let attempt = async {
                    let id = c.send_cmd("publish", json!({ "channel": ch, "data": data })).await?;
                    reply_ok(c.wait_reply(id).await?)
                };
                match tokio::time::timeout(ATTEMPT, attempt).await {
                    Ok(Ok(ok)) => {
                        let (Some(offset), Some(epoch)) = (ok["offset"].as_u64(), ok["epoch"].as_str()) else {
                            continue;
                        };
                        let a = Acked { data, offset, epoch: epoch.into(), sent, at: Instant::now() };
                        out.lock().unwrap().push(a);
                    }
                    Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                    Err(_) => client = None,
                }
            }
        });
        Writer { channel, acked, stop, task }
    }

    pub fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits for `n` more acknowledgements.
    pub async fn progress(&self, n: usize) -> Result<()> {
        let want = self.count() + n;
        wait_until(&format!("{n} publishes to {} acknowledged", self.channel), DEADLINE, async || {
            Ok(self.count() >= want)
        })
        .await
    }

    /// From `t`, how long until a publish sent after `t` was acknowledged.
    pub fn back_after(&self, t: Instant) -> Option<Duration> {
        self.acked.lock().unwrap().iter().find(|a| a.sent >= t).map(|a| a.at - t)
    }

    pub async fn finish(self) -> Vec<Acked> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        Arc::try_unwrap(self.acked).map(|m| m.into_inner().unwrap()).unwrap_or_default()
    }
}

/// Every acknowledged publish is in history exactly once, at its offset, under one epoch;
/// history is contiguous and holds no data twice (an abandoned attempt may be there once).
pub async fn check_history(node: &Node, channel: &str, acked: &[Acked]) -> Result<()> {
    let history = poll_for("history", DEADLINE, async || {
        let Ok(mut c) = Client::connect_to(node.addr()).await else { return Ok(None) };
        Ok(c.history_all(channel).await.ok())
    })
    .await?;
    let offsets = history.offsets();
    if let Some(first) = offsets.first() {
        assert_contiguous(&offsets, *first)?;
    }
    let mut at: BTreeMap<String, u64> = BTreeMap::new();
    for m in &history.messages {
        let data = m["data"].as_str().unwrap_or_default().to_string();
        let offset = m["offset"].as_u64().unwrap_or_default();
        ensure!(at.insert(data.clone(), offset).is_none(), "{channel}: {data} is in history twice");
    }
    for a in acked {
        ensure!(
            a.epoch == history.epoch,
            "{channel}: acknowledged under epoch {}, history has {}",
            a.epoch,
            history.epoch
        );
        match at.get(&a.data) {
            Some(o) if *o == a.offset => {}
            Some(o) => bail!("{channel}: {} acknowledged at offset {} is at {o}", a.data, a.offset),
            None => bail!("{channel}: {} acknowledged at offset {} is not in history (lost)", a.data, a.offset),
        }
    }
    Ok(())
}

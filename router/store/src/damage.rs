//! Damage the store met at run time: which partitions (and a few of their channels) a read
//! failed on because the bytes on disk are bad.
//!
//! It owns the damage record that `/healthz` and the cluster layer read, the
//! `switchyard_store_read_errors_total` count and the rate-limited ERROR line. It must
//! never change what a read returns (the reader still gets its error and answers
//! `unavailable`), and its lock is taken only when a read has already failed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_metrics::Metrics;
use switchyard_proto::partition::PartitionId;

use crate::log_limit::LogLimit;
use crate::StoreError;

/// At most one ERROR line per this interval for failed reads.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Channel names kept per damaged partition (enough to find the data; bounded).
const CHANNELS_KEPT: usize = 16;

/// The store's damage record.
pub(crate) struct Damage {
    /// True once any read met damaged data (read without the lock).
    any: AtomicBool,
    /// Per damaged partition, the first few channels whose reads failed.
    partitions: Mutex<BTreeMap<PartitionId, BTreeSet<String>>>,
    /// Limits the ERROR lines, so a client retrying a damaged read cannot flood the log.
    log: LogLimit,
    /// Where the failed reads and the damaged partitions are counted.
    metrics: Arc<Metrics>,
}

impl Damage {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Self { any: AtomicBool::new(false), partitions: Mutex::default(), log: LogLimit::new(LOG_EVERY), metrics }
    }

    /// Notes a failed read of `partition` (and `channel`, when the read was of one) when
    /// its error means the bytes on disk are bad or unreadable; other errors pass.
    pub(crate) fn note(&self, partition: Option<PartitionId>, channel: Option<&str>, error: &StoreError) {
        if !matches!(error, StoreError::Fjall(_) | StoreError::Decode(_)) {
            return;
        }
        self.metrics.store_read_errors.inc();
        self.any.store(true, Ordering::Relaxed);
        if let Some(p) = partition {
            let mut parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            let channels = parts.entry(p).or_default();
            if let Some(c) = channel.filter(|_| channels.len() < CHANNELS_KEPT) {
                channels.insert(c.to_string());
            }
            self.metrics.store_damaged_partitions.set(parts.len() as i64);
        }
        if let Some(suppressed) = self.log.allow("read") {
            tracing::error!(
                partition = partition.map(i64::from),
                channel,
                error = %error,
                suppressed,
                "store read failed: data on disk is damaged or unreadable; the read answers unavailable (`switchyard store check` shows where)"
            );
        }
    }

    /// True once a read met damaged data.
    pub(crate) fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// The damaged partitions and the channels seen failing in each.
    pub(crate) fn partitions(&self) -> Vec<(PartitionId, Vec<String>)> {
        let parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        parts.iter().map(|(p, c)| (*p, c.iter().cloned().collect())).collect()
    }
}

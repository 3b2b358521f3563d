//! Helpers the crate's tests share: a [`Partitions`] on a real store in a temporary
//! directory, publish requests, and waiting for something that happens after an answer.
//!
//! Compiled for tests only. It must never assert anything about behaviour itself (that
//! belongs to the tests that use it), and never reach around the public handles into an
//! owner's state.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use switchyard_metrics::Metrics;
use switchyard_store::{FsyncPolicy, Store};

use crate::owner::PublishRequest;
use crate::partitions::{Partitions, Settings};

/// A node's partitions (4 of them) on a group-commit store under `dir`.
pub(crate) fn start(dir: &Path) -> Arc<Partitions> {
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(dir, FsyncPolicy::Batch, metrics.clone()).unwrap();
    let settings = Settings {
        partitions: 4,
        idempotency_window: Duration::from_secs(60),
        forward_sealed: false,
        max_reply_bytes: 1 << 20,
        idempotency_max_keys: 100_000,
        idempotency_max_bytes: 16 << 20,
        replica_lag_timeout: Duration::from_secs(2),
        presence: Arc::new(crate::owner::PresenceLimits {
            join_leave: true,
            max_list: 3,
            join_leave_max_subscribers: 4,
        }),
    };
    Partitions::start(store, metrics, settings).unwrap().0
}

/// A publish of the JSON `data` to `channel`, with an idempotency key if given.
pub(crate) fn request(channel: &str, data: &str, idem: Option<&str>) -> PublishRequest {
    PublishRequest {
        channel: channel.into(),
        data: RawValue::from_string(data.into()).unwrap(),
        key: None,
        idempotency_key: idem.map(String::from),
        from: None,
    }
}

/// Polls `done` until it holds, for at most 10 s (a trim is acknowledged before its batch
/// is written).
pub(crate) async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

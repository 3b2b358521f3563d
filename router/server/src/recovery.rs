//! Recovery admission: how much catch-up work (subscribes with a recovery position that
//! need a store read) this node takes on at once.
//!
//! It owns the node's bound, `limits.recovery_concurrency` catch-ups in progress: a
//! recovering subscription whose grant needs a catch-up takes a permit before the read
//! and holds it until it is live. With none left the subscribe is refused at once with
//! `unavailable` and a retry hint ([`RETRY_AFTER`]) instead of waiting in a queue: a
//! reconnect storm costs the node a bounded amount of store reads at a time, and the
//! clients beyond the bound come back a little later. It must never wait for a permit, and
//! never bound anything but catch-ups a client asked for (a subscription the node moves
//! onto its own owner is not refused).

use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::protocol::{ErrorCode, OpError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a refused client is told to wait before it subscribes again.
pub(crate) const RETRY_AFTER: Duration = Duration::from_millis(200);

/// The node's catch-up permits.
pub(crate) struct Admission {
    permits: Arc<Semaphore>,
}

/// One admitted catch-up; dropping it lets the next one in.
pub(crate) type Admitted = OwnedSemaphorePermit;

impl Admission {
    /// At most `concurrency` catch-ups at once.
    pub(crate) fn new(concurrency: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(concurrency)) }
    }

    /// A permit for one catch-up, or the refusal to answer the subscribe with.
    pub(crate) fn admit(&self) -> Result<Admitted, OpError> {
        self.permits.clone().try_acquire_owned().map_err(|_| refusal())
    }
}

/// `unavailable`, with the retry hint.
pub(crate) fn refusal() -> OpError {
    let ms = RETRY_AFTER.as_millis() as u64;
    OpError::new(ErrorCode::Unavailable, format!("too many recoveries in progress on this node; retry in {ms} ms"))
        .retry_after(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_bound_then_refuses_at_once_and_readmits_after_a_release() {
        let a = Admission::new(2);
        let first = a.admit().expect("first");
        let _second = a.admit().expect("second");
        let refused = a.admit().expect_err("third is over the bound");
        assert_eq!(refused.code, ErrorCode::Unavailable);
        assert_eq!(refused.retry_after_ms, Some(RETRY_AFTER.as_millis() as u64));
        let json = serde_json::to_value(&refused).unwrap();
        assert_eq!(json["code"], "unavailable");
        assert_eq!(json["retry_after_ms"], 200);
        drop(first);
        let _next = a.admit().expect("a released permit admits the next");
    }

    #[test]
    fn a_bound_of_zero_refuses_every_catch_up() {
        assert!(Admission::new(0).admit().is_err());
    }
}

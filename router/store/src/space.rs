//! The free-space reserve and the store's health.
//!
//! It owns the store's [`Health`] (ok, below the reserve, failed), the low-space flag the
//! log writer reads before it commits a batch that stores data, and the thread that checks
//! the data directory's filesystem every [`CHECK_EVERY`]: below the reserve it turns such
//! writes off, and once free space is back above the reserve (plus a small margin, so one
//! freed file does not flap the state) it turns them on again by itself. Each change is one
//! log line and a metric. It must never write, delete or free anything itself, and never
//! decide what a refused write means for a client (the caller maps
//! [`crate::StoreError::NoSpace`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use switchyard_metrics::Metrics;

/// How often the filesystem's free space is checked: one `statvfs`, far cheaper than the
/// writes it guards. At 1 GB/s of writes this lets about 100 MB pass between two checks,
/// which the default reserve covers several times over.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

/// The free-space reserve (`[store]` in the config file): the larger of `bytes` and
/// `percent` of the filesystem's size.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reserve {
    /// Bytes that must stay free. Default 256 MiB.
    pub reserve_bytes: u64,
    /// Percent of the filesystem that must stay free. Default 1.
    pub reserve_percent: f64,
}

impl Default for Reserve {
    fn default() -> Self {
        Self { reserve_bytes: 256 << 20, reserve_percent: 1.0 }
    }
}

impl Reserve {
    /// The reserve in bytes on a filesystem of `total` bytes.
    pub fn of(&self, total: u64) -> u64 {
        let share = (total as f64 * self.reserve_percent / 100.0) as u64;
        self.reserve_bytes.max(share)
    }

    /// Free space needed to leave the low state again: the reserve plus a twentieth of it
    /// (at most 64 MiB).
    fn resume_at(reserve: u64) -> u64 {
        reserve + (reserve / 20).min(64 << 20)
    }
}

/// What the store can do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Writes and reads work.
    Ok,
    /// Free space is below the reserve: writes that store data are refused until it is back.
    NoSpace,
    /// A write or fsync failed and fjall refuses every write from now on: only a restart
    /// (recovery from the journal on disk) brings the store back.
    Failed,
}

/// The flag and figures the log writer reads, and the health every watcher sees.
pub(crate) struct Space {
    low: AtomicBool,
    free: AtomicU64,
    reserve: AtomicU64,
    health: watch::Sender<Health>,
}

impl Space {
    pub(crate) fn new() -> Self {
        Self {
            low: AtomicBool::new(false),
            free: AtomicU64::new(u64::MAX),
            reserve: AtomicU64::new(0),
            health: watch::Sender::new(Health::Ok),
        }
    }

    /// `Some((free, reserve))` while writes that store data are refused.
    pub(crate) fn refused(&self) -> Option<(u64, u64)> {
        self.low
            .load(Ordering::Relaxed)
            .then(|| (self.free.load(Ordering::Relaxed), self.reserve.load(Ordering::Relaxed)))
    }

    /// Marks the store failed (for good).
    pub(crate) fn fail(&self) {
        self.health.send_if_modified(|h| std::mem::replace(h, Health::Failed) != Health::Failed);
    }

    pub(crate) fn is_failed(&self) -> bool {
        *self.health.borrow() == Health::Failed
    }

    pub(crate) fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    /// Takes one measurement: `free` of `total` bytes. Returns the new state when it changed.
    fn observe(&self, free: u64, total: u64, reserve: &Reserve) -> Option<bool> {
        let need = reserve.of(total);
        self.free.store(free, Ordering::Relaxed);
        self.reserve.store(need, Ordering::Relaxed);
        let was = self.low.load(Ordering::Relaxed);
        let low = if was { free < Reserve::resume_at(need) } else { free < need };
        if low == was {
            return None;
        }
        self.low.store(low, Ordering::Relaxed);
        self.health.send_if_modified(|h| match (*h, low) {
            (Health::Failed, _) => false,
            (Health::Ok, true) => {
                *h = Health::NoSpace;
                true
            }
            (Health::NoSpace, false) => {
                *h = Health::Ok;
                true
            }
            _ => false,
        });
        Some(low)
    }
}

/// Starts the thread that checks `dir`'s filesystem against `reserve` (a first check runs
/// before this returns, so a node that starts below the reserve refuses writes at once).
/// It ends when the store (the last strong reference to `space`) is dropped.
pub(crate) fn watch_space(dir: &Path, reserve: Reserve, space: &Arc<Space>, metrics: Arc<Metrics>) {
    let dir = dir.to_path_buf();
    check(&dir, &reserve, space, &metrics);
    let space = Arc::downgrade(space);
    std::thread::Builder::new()
        .name("store-space".into())
        .spawn(move || run(dir, reserve, space, metrics))
        .expect("spawn store space thread");
}

fn run(dir: PathBuf, reserve: Reserve, space: Weak<Space>, metrics: Arc<Metrics>) {
    loop {
        #[allow(
            clippy::disallowed_methods,
            reason = "a dedicated OS thread paced by its own period, never a runtime worker"
        )]
        std::thread::sleep(CHECK_EVERY);
        let Some(space) = space.upgrade() else { return };
        check(&dir, &reserve, &space, &metrics);
    }
}

/// One check; a filesystem that cannot be asked is logged once per failure streak and
/// leaves the state as it was.
fn check(dir: &Path, reserve: &Reserve, space: &Space, metrics: &Metrics) {
    let stat = match rustix::fs::statvfs(dir) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "statvfs of the data directory failed");
            return;
        }
    };
    let unit = stat.f_frsize.max(1);
    let (free, total) = (stat.f_bavail.saturating_mul(unit), stat.f_blocks.saturating_mul(unit));
    let changed = space.observe(free, total, reserve);
    let need = space.reserve.load(Ordering::Relaxed);
    metrics.store_free_bytes.set(free.min(i64::MAX as u64) as i64);
    metrics.store_reserve_bytes.set(need.min(i64::MAX as u64) as i64);
    match changed {
        Some(true) => {
            metrics.store_space_low.set(1);
            tracing::warn!(
                dir = %dir.display(), free, reserve = need,
                "free space is below the reserve: refusing writes that store data until space is freed"
            );
        }
        Some(false) => {
            metrics.store_space_low.set(0);
            tracing::info!(dir = %dir.display(), free, reserve = need, "free space is back above the reserve: writes resume");
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Low below the reserve, back only above the reserve plus the margin; the health
    /// follows, and a failed store stays failed whatever the space does.
    #[test]
    fn the_reserve_has_hysteresis_and_failure_is_sticky() {
        let r = Reserve { reserve_bytes: 1_000_000, reserve_percent: 0.0 };
        let s = Space::new();
        let h = s.health();
        assert_eq!(s.observe(2_000_000, 10_000_000, &r), None);
        assert_eq!(s.refused(), None);
        assert_eq!(s.observe(999_999, 10_000_000, &r), Some(true));
        assert_eq!(s.refused(), Some((999_999, 1_000_000)));
        assert_eq!(*h.borrow(), Health::NoSpace);
        // Above the reserve but inside the margin: still low.
        assert_eq!(s.observe(1_040_000, 10_000_000, &r), None);
        assert_eq!(s.observe(1_050_000, 10_000_000, &r), Some(false));
        assert_eq!(*h.borrow(), Health::Ok);
        s.fail();
        assert_eq!(s.observe(10, 10_000_000, &r), Some(true));
        assert_eq!(*h.borrow(), Health::Failed);
        assert_eq!(s.observe(5_000_000, 10_000_000, &r), Some(false));
        assert_eq!(*h.borrow(), Health::Failed);
    }

    /// The percentage wins on a large filesystem, the bytes on a small one.
    #[test]
    fn the_reserve_is_the_larger_of_bytes_and_percent() {
        let r = Reserve { reserve_bytes: 100, reserve_percent: 1.0 };
        assert_eq!(r.of(1_000), 100);
        assert_eq!(r.of(1_000_000), 10_000);
        assert_eq!(Reserve::default().of(1 << 30), 256 << 20);
    }
}

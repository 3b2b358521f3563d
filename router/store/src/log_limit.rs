//! A rate limit for log lines an error repeats: at most one line per interval per kind,
//! and the next line that gets through says how many were held back.
//!
//! It owns only the decision "log this one now?"; it never logs, counts metrics or
//! sleeps, and its lock is held for a comparison and an increment, never across a call.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// One limiter shared by every place that logs the same kinds of repeated error.
#[derive(Debug)]
pub struct LogLimit {
    /// The shortest time between two lines of one kind.
    every: Duration,
    /// Per kind: when its last line was let through, and how many were held back since.
    kinds: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl LogLimit {
    /// A limiter letting one line per `every` through for each kind.
    pub fn new(every: Duration) -> Self {
        Self { every, kinds: Mutex::default() }
    }

    /// Whether a line of `kind` may be logged now: `Some(held back since the last line)`,
    /// or None when it must be dropped (and is counted for the next line).
    pub fn allow(&self, kind: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        match kinds.get_mut(kind) {
            Some((last, held)) if now.duration_since(*last) < self.every => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                kinds.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_per_kind_with_the_count_held_back() {
        let limit = LogLimit::new(Duration::from_secs(10));
        assert_eq!(limit.allow("read"), Some(0));
        assert_eq!(limit.allow("read"), None);
        assert_eq!(limit.allow("read"), None);
        assert_eq!(limit.allow("other"), Some(0), "kinds are limited apart");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(limit.allow("read"), Some(2), "the next line says two were held back");
        assert_eq!(limit.allow("read"), None);
    }
}

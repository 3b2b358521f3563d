//! Publish rate limiting: the `[rate_limit]` settings and one token bucket per connection.
//!
//! It owns the bucket arithmetic (refill at `publish_rate` per second up to
//! `publish_burst`) and the rule for closing a client that keeps exceeding it
//! (`close_after` refusals within `close_window`). It is plain data touched only by its
//! own session: it must never lock, never sleep and never read the clock itself (callers
//! pass `now`, so tests control time).

use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::SettingsError as ConfigError;

/// The `[rate_limit]` section. Applied to live connections on reload.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Publishes per second one connection may sustain; 0 means unlimited. Default 0.
    pub publish_rate: f64,
    /// Publishes one connection may send at once after being idle. Default 0, meaning
    /// `publish_rate` rounded up (at least 1).
    pub publish_burst: u32,
    /// Refused publishes within `close_window` after which the connection is closed with
    /// 4029; 0 means never close. Default 20.
    pub close_after: u32,
    /// The window `close_after` counts in. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub close_window: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self { publish_rate: 0.0, publish_burst: 0, close_after: 20, close_window: Duration::from_secs(10) }
    }
}

impl RateLimitConfig {
    /// Rejects values the bucket cannot work with, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: &str| {
            Err(ConfigError::Invalid { field: format!("rate_limit.{field}"), message: message.into() })
        };
        if !self.publish_rate.is_finite() || self.publish_rate < 0.0 || self.publish_rate > 1e9 {
            return invalid("publish_rate", "must be between 0 (unlimited) and 1e9 per second");
        }
        if self.close_window.is_zero() {
            return invalid("close_window", "must be greater than zero");
        }
        Ok(())
    }

    /// The effective burst.
    pub fn burst(&self) -> f64 {
        if self.publish_burst > 0 {
            f64::from(self.publish_burst)
        } else {
            self.publish_rate.ceil().max(1.0)
        }
    }
}

/// What a publish attempt gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allowed,
    /// Refuse this publish with `rate_limited`.
    Limited,
    /// Refuse it and close the connection with 4029.
    Close,
}

/// One connection's bucket and refusal count.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
    refusals: u32,
    window_start: Instant,
}

impl Bucket {
    /// A full bucket (its size is read from the settings at each call, so a reload
    /// applies to it at once).
    pub fn new(now: Instant) -> Self {
        Self { tokens: f64::INFINITY, last: now, refusals: 0, window_start: now }
    }

    /// Takes one token under `limits`, or says why not.
    pub fn take(&mut self, limits: &RateLimitConfig, now: Instant) -> Verdict {
        if limits.publish_rate <= 0.0 {
            return Verdict::Allowed;
        }
        let burst = limits.burst();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limits.publish_rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allowed;
        }
        if now.saturating_duration_since(self.window_start) > limits.close_window {
            self.window_start = now;
            self.refusals = 0;
        }
        self.refusals += 1;
        if limits.close_after > 0 && self.refusals >= limits.close_after {
            Verdict::Close
        } else {
            Verdict::Limited
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_and_closes() {
        let limits = RateLimitConfig { publish_rate: 10.0, publish_burst: 3, close_after: 3, ..Default::default() };
        let t0 = Instant::now();
        let mut b = Bucket::new(t0);
        assert_eq!([b.take(&limits, t0), b.take(&limits, t0), b.take(&limits, t0)], [Verdict::Allowed; 3]);
        assert_eq!(b.take(&limits, t0), Verdict::Limited);
        // 100 ms at 10/s is one token.
        assert_eq!(b.take(&limits, t0 + Duration::from_millis(100)), Verdict::Allowed);
        assert_eq!(b.take(&limits, t0 + Duration::from_millis(100)), Verdict::Limited);
        assert_eq!(b.take(&limits, t0 + Duration::from_millis(100)), Verdict::Close);
    }

    #[test]
    fn unlimited_and_reload() {
        let mut b = Bucket::new(Instant::now());
        let off = RateLimitConfig::default();
        let now = Instant::now();
        assert!((0..10_000).all(|_| b.take(&off, now) == Verdict::Allowed));
        let tight = RateLimitConfig { publish_rate: 1.0, close_after: 0, ..Default::default() };
        assert_eq!(b.take(&tight, now), Verdict::Allowed);
        assert!((0..100).all(|_| b.take(&tight, now) == Verdict::Limited), "close_after = 0 never closes");
    }

    #[test]
    fn validation() {
        let bad = RateLimitConfig { publish_rate: -1.0, ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("rate_limit.publish_rate"));
        assert_eq!(RateLimitConfig { publish_rate: 2.5, ..Default::default() }.burst(), 3.0);
    }
}

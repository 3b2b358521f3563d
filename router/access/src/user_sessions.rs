//! Per-user sessions: the `[sessions]` settings, the per-user connection cap and the
//! server-side ping schedule of one connection.
//!
//! It owns how many connections each authenticated user holds on this node (a map touched
//! only on connect and disconnect, never per message) and the [`Heartbeat`] arithmetic that
//! decides when to ping and when a silent peer is dead. It must never touch sockets or
//! block: sessions ask it and act themselves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::SettingsError as ConfigError;

/// The `[sessions]` section. Applied to live connections on reload.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// Connections one user may hold on this node; the next gets `limit_exceeded` and
    /// close 4009. Default 5.
    pub max_per_user: usize,
    /// How often the server pings an idle-or-not connection; 0 disables pings. Default 25 s.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A connection that has not answered a ping with a pong this long after it was sent
    /// is closed and its resources freed. Default 20 s.
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self { max_per_user: 5, ping_interval: Duration::from_secs(25), ping_timeout: Duration::from_secs(20) }
    }
}

impl SessionsConfig {
    /// Rejects unusable values, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: &str| {
            Err(ConfigError::Invalid { field: format!("sessions.{field}"), message: message.into() })
        };
        if self.max_per_user == 0 {
            return invalid("max_per_user", "must be at least 1");
        }
        if !self.ping_interval.is_zero() && self.ping_interval < Duration::from_millis(10) {
            return invalid("ping_interval", "must be 0 (off) or at least 10ms");
        }
        if self.ping_timeout < Duration::from_millis(10) {
            return invalid("ping_timeout", "must be at least 10ms");
        }
        Ok(())
    }
}

// === impl SessionRegistry ===

/// Counts each user's connections on this node.
#[derive(Default)]
pub struct SessionRegistry {
    users: Arc<Mutex<HashMap<Arc<str>, usize>>>,
}

/// One held seat; dropping it frees the seat.
pub struct Seat {
    users: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    user: Arc<str>,
}

impl SessionRegistry {
    /// Takes a seat for `user` unless it already holds `max`.
    pub fn try_acquire(&self, user: &Arc<str>, max: usize) -> Option<Seat> {
        let mut users = self.users.lock().expect("session registry");
        let n = users.entry(user.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Seat { users: self.users.clone(), user: user.clone() })
    }

    /// Connections `user` holds now.
    pub fn count(&self, user: &str) -> usize {
        self.users.lock().expect("session registry").get(user).copied().unwrap_or(0)
    }

    /// Users with at least one connection.
    pub fn users(&self) -> usize {
        self.users.lock().expect("session registry").len()
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut users = self.users.lock().expect("session registry");
        if let Some(n) = users.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.user);
            }
        }
    }
}

// === impl Heartbeat ===

/// What the session should do when the heartbeat's deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Send a ping now.
    Ping,
    /// The peer did not answer the last ping in time: close it.
    Dead,
    /// Nothing (pings are off, or the settings changed): look at the deadline again.
    Wait,
}

/// The ping schedule of one connection.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    last_ping: Instant,
    outstanding: Option<Instant>,
}

/// When pings are off, the deadline is this far away (and re-read at each wake).
const IDLE: Duration = Duration::from_secs(3600);

/// Heartbeat deadlines fall on a process-wide tick of 1/25 of the ping interval (at most
/// 1 s): the sessions whose pings fall due in the same tick wake in one timer pass, so
/// 100,000 idle connections cost a few worker wake-ups per second rather than one per
/// ping. A ping goes out at most one tick late.
const TICKS_PER_INTERVAL: u32 = 25;
const MAX_TICK: Duration = Duration::from_secs(1);

/// `exact` rounded up to the next tick of the grid that `ping_interval` sets.
fn on_tick(exact: Instant, ping_interval: Duration) -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let tick = (ping_interval / TICKS_PER_INTERVAL).clamp(Duration::from_millis(1), MAX_TICK).as_nanos();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let since = exact.saturating_duration_since(origin).as_nanos();
    let rounded = since.div_ceil(tick) * tick;
    origin + Duration::from_nanos(u64::try_from(rounded).unwrap_or(u64::MAX))
}

impl Heartbeat {
    /// A schedule whose first ping is one interval from `now`.
    pub fn new(now: Instant) -> Self {
        Self { last_ping: now, outstanding: None }
    }

    /// When the session must wake up for the heartbeat: on the shared tick (see
    /// [`on_tick`]) at or after the exact time.
    pub fn deadline(&self, s: &SessionsConfig) -> Instant {
        let exact = match self.outstanding {
            Some(sent) => sent + s.ping_timeout,
            None if s.ping_interval.is_zero() => self.last_ping + IDLE,
            None => self.last_ping + s.ping_interval,
        };
        on_tick(exact, s.ping_interval)
    }

    /// Called at (or after) the deadline.
    pub fn on_deadline(&mut self, s: &SessionsConfig, now: Instant) -> Beat {
        if now < self.deadline(s) {
            return Beat::Wait;
        }
        match self.outstanding {
            Some(_) => Beat::Dead,
            None if s.ping_interval.is_zero() => {
                self.last_ping = now;
                Beat::Wait
            }
            None => {
                self.last_ping = now;
                self.outstanding = Some(now);
                Beat::Ping
            }
        }
    }

    /// A pong arrived: the peer is alive.
    pub fn on_pong(&mut self) {
        self.outstanding = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seats_are_capped_and_freed() {
        let r = SessionRegistry::default();
        let alice: Arc<str> = "alice".into();
        let seats: Vec<_> = (0..2).map(|_| r.try_acquire(&alice, 2).unwrap()).collect();
        assert!(r.try_acquire(&alice, 2).is_none());
        assert!(r.try_acquire(&"bob".into(), 2).is_some());
        drop(seats);
        assert_eq!((r.count("alice"), r.users()), (0, 0));
        assert!(r.try_acquire(&alice, 2).is_some());
    }

    #[test]
    fn heartbeat_pings_then_declares_death() {
        let s = SessionsConfig {
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        // Deadlines fall on the 400 ms tick (10 s / 25) at or after the exact time.
        let tick = Duration::from_millis(400);
        let near = |d: Instant, exact: Instant| assert!(d >= exact && d < exact + tick, "{d:?} vs {exact:?}");
        let t0 = Instant::now();
        let mut h = Heartbeat::new(t0);
        near(h.deadline(&s), t0 + Duration::from_secs(10));
        assert_eq!(h.on_deadline(&s, t0 + Duration::from_secs(1)), Beat::Wait);
        let ping = h.deadline(&s);
        assert_eq!(h.on_deadline(&s, ping), Beat::Ping);
        near(h.deadline(&s), ping + Duration::from_secs(5));
        h.on_pong();
        let ping = h.deadline(&s);
        near(ping, t0 + Duration::from_secs(20));
        assert_eq!(h.on_deadline(&s, ping), Beat::Ping);
        assert_eq!(h.on_deadline(&s, ping + Duration::from_secs(6)), Beat::Dead);
        // Sessions whose exact deadlines differ within a tick wake at the same instant.
        let (a, b) = (Heartbeat::new(t0), Heartbeat::new(t0 + Duration::from_millis(1)));
        let (da, db) = (a.deadline(&s), b.deadline(&s));
        assert!(da == db || db - da == tick, "{da:?} {db:?}");
        let off = SessionsConfig { ping_interval: Duration::ZERO, ..s };
        let mut h = Heartbeat::new(t0);
        assert_eq!(h.on_deadline(&off, t0 + IDLE), Beat::Wait);
    }
}

//! One connection's admission state: who it is, its seat under the per-user cap and its
//! publish bucket.
//!
//! It owns the per-command decisions a session must make before doing anything: `connect`
//! (verify the token, take a seat), "connect first" in `jwt` mode, the channel rule of each
//! command, and the rate limit of each publish, each answered with the protocol's error
//! code and, where the connection must end, its close code. It must never do I/O or wait:
//! the session writes the replies and closes the socket.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::{AuthError, Identity};
use crate::ratelimit::{Bucket, Verdict};
use crate::rules::{self, Action};
use crate::user_sessions::Seat;
use crate::Access;
use switchyard_proto::protocol::{close, Command, ErrorCode, OpError};

/// The longest a token's expiry is waited for; a later `exp` (any u64 is accepted) is
/// treated as this far away, so the deadline never overflows an [`Instant`].
pub const MAX_TOKEN_WAIT: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// An error reply after which the connection is closed with `code`.
#[derive(Debug)]
pub struct Refusal {
    /// The error reply.
    pub error: OpError,
    /// The close code.
    pub code: u16,
    /// The close reason.
    pub reason: &'static str,
    /// The token expired: the same client may come back with a new one (protocols that
    /// tell a client to refresh and one to stop apart act on it).
    pub expired: bool,
}

fn unauthorized(e: AuthError) -> Refusal {
    let expired = e == AuthError::Expired;
    let reason = if expired { "token expired" } else { "unauthorized" };
    Refusal { error: OpError::new(ErrorCode::Unauthorized, e.to_string()), code: close::UNAUTHORIZED, reason, expired }
}

/// Admission state of one connection.
pub struct Gate {
    identity: Option<Identity>,
    /// Held while connected as a user; dropping the gate frees it.
    _seat: Option<Seat>,
    connected: bool,
    bucket: Bucket,
    opened: Instant,
}

impl Gate {
    /// A connection that has not sent `connect`.
    pub fn new(now: Instant) -> Self {
        Self { identity: None, _seat: None, connected: false, bucket: Bucket::new(now), opened: now }
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&Arc<str>> {
        self.identity.as_ref().map(|i| &i.user)
    }

    /// Handles `connect`: verifies the token (required in `jwt` mode; optional when off,
    /// but a token given must be valid) and takes a seat under the per-user cap.
    pub fn connect(&mut self, access: &Access, token: Option<&str>) -> Result<(), Result<OpError, Refusal>> {
        if self.connected {
            return Err(Ok(OpError::bad_request("already connected")));
        }
        let identity = match token {
            Some(t) => Some(access.verifier.verify(t).map_err(|e| Err(unauthorized(e)))?),
            None if access.enforced() => return Err(Err(unauthorized(AuthError::Missing))),
            None => None,
        };
        if let Some(id) = &identity {
            let max = access.live().sessions.max_per_user;
            let seat = access.sessions.try_acquire(&id.user, max).ok_or_else(|| {
                Err(Refusal {
                    error: OpError::new(
                        ErrorCode::LimitExceeded,
                        format!("user {} already holds {max} connections", id.user),
                    ),
                    code: close::TOO_MANY_SESSIONS,
                    reason: "too many sessions for this user",
                    expired: false,
                })
            })?;
            self._seat = Some(seat);
        }
        self.identity = identity;
        self.connected = true;
        Ok(())
    }

    /// Handles `refresh`: replaces the connection's token (and so its expiry) with `token`,
    /// which must be valid and name the same user; subscriptions are untouched. A refused
    /// refresh changes nothing: the current token still expires when it would have.
    pub fn refresh(&mut self, access: &Access, token: &str) -> Result<(), OpError> {
        let Some(current) = &self.identity else {
            return Err(OpError::bad_request("refresh needs a connection authenticated with a token"));
        };
        let fresh = access.verifier.verify(token).map_err(|e| unauthorized(e).error)?;
        if fresh.user != current.user {
            return Err(OpError::new(
                ErrorCode::Forbidden,
                format!("the new token is for {}, this connection is {}", fresh.user, current.user),
            ));
        }
        self.identity = Some(fresh);
        Ok(())
    }

    /// The token's `info` claim as JSON text, if any.
    pub fn info(&self) -> Option<&Arc<str>> {
        self.identity.as_ref().and_then(|i| i.info.as_ref())
    }

    /// True once `connect` succeeded.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// How long the connection's token has left before its `exp`: None without a token, or
    /// when that is beyond [`MAX_TOKEN_WAIT`].
    pub fn token_ttl(&self) -> Option<Duration> {
        let id = self.identity.as_ref()?;
        let left = Duration::from_secs(id.exp.saturating_sub(crate::auth::now_secs()));
        (left < MAX_TOKEN_WAIT).then_some(left)
    }

    /// Gives the seat under the per-user cap back (the connection is ending), so the user
    /// may reconnect at once even while this socket's close is still being written.
    pub fn release_seat(&mut self) {
        self._seat = None;
    }

    /// When the connection must be closed with 4001: the `connect` deadline in `jwt` mode
    /// before `connect`, then the token's expiry plus the validation leeway (the moment
    /// `verify` would start refusing it). None: never (or not within [`MAX_TOKEN_WAIT`]
    /// of an instant this platform can represent).
    pub fn deadline(&self, access: &Access) -> Option<Instant> {
        match &self.identity {
            Some(id) => {
                let leeway = access.verifier.leeway().as_secs();
                let left = id.exp.saturating_add(leeway).saturating_sub(crate::auth::now_secs());
                Instant::now().checked_add(Duration::from_secs(left).min(MAX_TOKEN_WAIT))
            }
            None if access.enforced() && !self.connected => Some(self.opened + access.connect_timeout),
            None => None,
        }
    }

    /// The refusal sent when [`Gate::deadline`] passes.
    pub fn deadline_refusal(&self) -> Refusal {
        if self.connected {
            unauthorized(AuthError::Expired)
        } else {
            Refusal {
                error: OpError::new(ErrorCode::Unauthorized, "no `connect` with a valid token in time"),
                code: close::UNAUTHORIZED,
                reason: "unauthorized",
                expired: false,
            }
        }
    }

    /// Checks any command other than `connect`: "connect first" in `jwt` mode, then the
    /// channel rule (only in `jwt` mode).
    pub fn admit(&self, access: &Access, cmd: &Command) -> Result<(), OpError> {
        if !access.enforced() || matches!(cmd, Command::Connect { .. }) {
            return Ok(());
        }
        let Some(who) = &self.identity else {
            return Err(OpError::new(ErrorCode::Unauthorized, "send `connect` with a token first"));
        };
        let (op, channel) = match cmd {
            Command::Connect { .. } | Command::Refresh { .. } | Command::Ping | Command::Unsubscribe { .. } => {
                return Ok(())
            }
            // Who may subscribe may see who else is subscribed.
            Command::Subscribe { channel, .. }
            | Command::Commit { channel, .. }
            | Command::Presence { channel }
            | Command::PresenceStats { channel } => (Action::Subscribe, channel),
            Command::Publish(p) => (Action::Publish, &p.channel),
            Command::History { channel, .. } => (Action::History, channel),
        };
        rules::check(access.rules.rule_of(channel), op, channel, who)
    }

    /// Takes a publish token; `Err(Ok(_))` refuses this publish, `Err(Err(_))` also closes.
    pub fn take_publish(&mut self, access: &Access, now: Instant) -> Result<(), Result<OpError, Refusal>> {
        let live = access.live();
        let limited = || {
            OpError::new(
                ErrorCode::RateLimited,
                format!(
                    "over {} publishes per second (burst {})",
                    live.rate_limit.publish_rate,
                    live.rate_limit.burst()
                ),
            )
        };
        match self.bucket.take(&live.rate_limit, now) {
            Verdict::Allowed => Ok(()),
            Verdict::Limited => Err(Ok(limited())),
            Verdict::Close => Err(Err(Refusal {
                error: limited(),
                code: close::RATE_LIMITED,
                reason: "rate limited too long",
                expired: false,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AuthMode, Claims};

    const SECRET: &str = "0123456789abcdef-secret";

    fn access(leeway: Duration) -> Access {
        let auth = crate::auth::AuthConfig {
            mode: AuthMode::Jwt,
            hs256_secret: Some(SECRET.into()),
            leeway,
            ..Default::default()
        };
        Access::new(&auth, Default::default(), Default::default())
    }

    fn token(exp: u64) -> String {
        let claims = Claims { sub: "alice".into(), exp, channels: None, info: None };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_huge_exp_does_not_overflow_the_deadline() {
        let access = access(Duration::from_secs(60));
        let mut gate = Gate::new(Instant::now());
        gate.connect(&access, Some(&token(u64::MAX))).unwrap();
        let deadline = gate.deadline(&access).expect("a capped deadline");
        assert!(deadline <= Instant::now() + MAX_TOKEN_WAIT);
        assert!(deadline > Instant::now() + MAX_TOKEN_WAIT - Duration::from_secs(60));
    }

    #[tokio::test]
    async fn release_seat_frees_the_cap_before_the_gate_is_dropped() {
        let access = access(Duration::ZERO);
        let max = access.live().sessions.max_per_user;
        let t = token(crate::auth::now_secs() + 3600);
        let mut held: Vec<Gate> = (0..max)
            .map(|_| {
                let mut g = Gate::new(Instant::now());
                g.connect(&access, Some(&t)).unwrap();
                g
            })
            .collect();
        let mut next = Gate::new(Instant::now());
        let refused = next.connect(&access, Some(&t)).unwrap_err().unwrap_err();
        assert_eq!(refused.code, close::TOO_MANY_SESSIONS);
        held[0].release_seat(); // still alive, as while its close is being written
        let mut next = Gate::new(Instant::now());
        next.connect(&access, Some(&t)).unwrap();
    }

    #[tokio::test]
    async fn the_deadline_includes_the_leeway() {
        let access = access(Duration::from_secs(120));
        let mut gate = Gate::new(Instant::now());
        // Expired 30 s ago but inside the leeway: accepted, and closed only when the leeway
        // runs out (about 90 s from now), not at once.
        gate.connect(&access, Some(&token(crate::auth::now_secs() - 30))).unwrap();
        let left = gate.deadline(&access).unwrap() - Instant::now();
        assert!(left > Duration::from_secs(85) && left <= Duration::from_secs(91), "{left:?}");
    }
}

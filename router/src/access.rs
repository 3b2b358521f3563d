//! A node's access state: the token verifier, the per-user session registry, the HTTP API
//! key and the live (reloadable) session and rate-limit settings.
//!
//! It owns the one [`ArcSwap`] that live connections read their limits from, and the small
//! public entry points that replace it: [`Access::apply`] (for any source: a reloaded file
//! today, etcd dynamic config later) and [`reload_from_file`] (SIGHUP). Readers only
//! `load()`; nothing here is locked on the message path. It must never decide channel
//! permissions (that is [`crate::rules`]) nor verify tokens itself (that is [`crate::auth`]).

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::header::{HeaderMap, AUTHORIZATION};

use crate::auth::{AuthMode, Identity, Verifier};
use crate::config::{Config, ConfigError, Overrides};
use crate::node::Node;
use crate::protocol::{ErrorCode, OpError};
use crate::ratelimit::RateLimitConfig;
use crate::sessions::{Registry, SessionsConfig};

/// The settings that apply to live connections without a restart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Live {
    /// `[sessions]`: per-user cap (new connections) and the ping schedule.
    pub sessions: SessionsConfig,
    /// `[rate_limit]`: read at every publish.
    pub rate_limit: RateLimitConfig,
}

impl Live {
    /// The live part of a validated config.
    pub fn of(config: &Config) -> Self {
        Self { sessions: config.sessions.clone(), rate_limit: config.rate_limit.clone() }
    }
}

/// Per-node access state, shared by every session and the HTTP API.
pub struct Access {
    /// `off` or `jwt`.
    pub mode: AuthMode,
    /// Verifies tokens (and mints dev tokens when allowed).
    pub verifier: Verifier,
    /// Who holds how many connections.
    pub sessions: Registry,
    /// In `jwt` mode, how long a socket may stay without a valid `connect`.
    pub connect_timeout: std::time::Duration,
    api_key: Option<String>,
    live: ArcSwap<Live>,
}

impl Access {
    /// Builds the access state of a validated config.
    pub fn new(config: &Config) -> Self {
        Self {
            mode: config.auth.mode,
            verifier: Verifier::new(&config.auth),
            sessions: Registry::default(),
            connect_timeout: config.auth.connect_timeout,
            api_key: config.auth.api_key.clone(),
            live: ArcSwap::from_pointee(Live::of(config)),
        }
    }

    /// The live settings now (a cheap, lock-free snapshot).
    pub fn live(&self) -> arc_swap::Guard<Arc<Live>> {
        self.live.load()
    }

    /// Replaces the live settings. Connections pick them up at their next publish (rate
    /// limit), next ping (ping schedule) or next connect (per-user cap); none is dropped.
    pub fn apply(&self, live: Live) {
        tracing::info!(?live.rate_limit, ?live.sessions, "live settings applied");
        self.live.store(Arc::new(live));
    }

    /// True when clients must authenticate and rules are enforced.
    pub fn enforced(&self) -> bool {
        self.mode == AuthMode::Jwt
    }

    /// Checks the API key of an HTTP request (`Authorization: Bearer KEY` or
    /// `X-Api-Key: KEY`). The key bypasses channel rules, so in `jwt` mode without a
    /// configured key every request is refused (`unauthorized`); only in `off` mode does a
    /// missing key leave the HTTP API open.
    pub fn check_api_key(&self, headers: &HeaderMap) -> Result<(), OpError> {
        let Some(want) = &self.api_key else {
            if self.enforced() {
                return Err(OpError::new(
                    ErrorCode::Unauthorized,
                    "HTTP publish and history need an API key in auth.mode = \"jwt\", and auth.api_key is not set",
                ));
            }
            return Ok(());
        };
        let given = bearer(headers).or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
        match given {
            Some(key) if constant_time_eq(key.as_bytes(), want.as_bytes()) => Ok(()),
            Some(_) => Err(OpError::new(ErrorCode::Unauthorized, "wrong API key")),
            None => Err(OpError::new(
                ErrorCode::Unauthorized,
                "an API key is required: send `Authorization: Bearer <key>` or `X-Api-Key: <key>`",
            )),
        }
    }

    /// Who an HTTP request is, from its JWT (`Authorization: Bearer` or `token=` in the
    /// query). Without a token: `unauthorized` in `jwt` mode, anonymous (None) when off.
    pub fn http_identity(&self, headers: &HeaderMap, query_token: Option<&str>) -> Result<Option<Identity>, OpError> {
        match query_token.or_else(|| bearer(headers)) {
            Some(token) => {
                self.verifier.verify(token).map(Some).map_err(|e| OpError::new(ErrorCode::Unauthorized, e.to_string()))
            }
            None if self.enforced() => Err(OpError::new(
                ErrorCode::Unauthorized,
                "a token is required: `Authorization: Bearer <JWT>` or `token=<JWT>`",
            )),
            None => Ok(None),
        }
    }
}

/// The token of an `Authorization: Bearer ...` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Re-reads the config file and applies its live part (`[sessions]`, `[rate_limit]`).
/// Other changed settings need a restart and are left as they are. An invalid file changes
/// nothing.
pub fn reload_from_file(node: &Node, path: &Path) -> Result<Live, ConfigError> {
    let config = Config::load(Some(path), Overrides::default())?;
    let live = Live::of(&config);
    node.access.apply(live.clone());
    Ok(live)
}

/// Reloads the config file on every SIGHUP until the node shuts down (no-op without a
/// config file).
pub fn spawn_reload_on_sighup(node: Arc<Node>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Some(path) = node.config.source.clone() else { return };
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the SIGHUP handler; reload is off");
            return;
        }
    };
    let mut shutdown = node.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            match reload_from_file(&node, &path) {
                Ok(_) => tracing::info!(path = %path.display(), "config reloaded (sessions, rate_limit)"),
                Err(e) => tracing::warn!(error = %e, "config reload failed; keeping the current settings"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn api_key_headers() {
        let mut config = Config::default();
        config.auth.api_key = Some("k-123456".into());
        let access = Access::new(&config);
        let mut h = HeaderMap::new();
        assert_eq!(access.check_api_key(&h).unwrap_err().code, ErrorCode::Unauthorized);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer k-123456"));
        assert!(access.check_api_key(&h).is_ok());
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer nope"));
        assert!(access.check_api_key(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("k-123456"));
        assert!(access.check_api_key(&h).is_ok());
        assert!(Access::new(&Config::default()).check_api_key(&HeaderMap::new()).is_ok());
        // jwt mode without a configured key: closed, whatever the request sends.
        let mut config = Config::default();
        config.auth.mode = crate::auth::AuthMode::Jwt;
        config.auth.hs256_secret = Some("0123456789abcdef-secret".into());
        let access = Access::new(&config);
        assert_eq!(access.check_api_key(&HeaderMap::new()).unwrap_err().code, ErrorCode::Unauthorized);
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("anything"));
        assert_eq!(access.check_api_key(&h).unwrap_err().code, ErrorCode::Unauthorized);
    }
}

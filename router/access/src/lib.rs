//! A node's access layer: who may connect and what they may do.
//!
//! Module map: [`auth`] (token verification and dev tokens), [`rules`] (channel
//! permissions), [`user_sessions`] (per-user session caps and heartbeats), [`ratelimit`]
//! (publish token buckets), [`gate`] (admission of one connection's commands). This module
//! holds [`Access`]: the verifier, the session registry, the HTTP API key and the one
//! [`ArcSwap`] that live connections read their limits from; [`Access::apply`] replaces it
//! (a reloaded file, etcd dynamic config later). Readers only `load()`; nothing here is
//! locked on the message path. It must never do network I/O or read the config file: the
//! server layer loads settings and hands them in.

pub mod auth;
pub mod gate;
pub mod ratelimit;
pub mod rules;
pub mod user_sessions;

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use switchyard_proto::protocol::{ErrorCode, OpError};

use crate::auth::{AuthConfig, AuthMode, Identity, Verifier};
use crate::ratelimit::RateLimitConfig;
use crate::rules::Rules;
use crate::user_sessions::{SessionRegistry, SessionsConfig};

/// A setting of this layer that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A value is out of range or inconsistent.
    #[error("invalid config value for `{field}`: {message}")]
    Invalid {
        /// Dotted path of the field in the config file.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A file the settings name cannot be read.
    #[error("cannot read {path} (`{field}`): {source}")]
    Read {
        /// Dotted path of the field naming the file.
        field: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The settings a running node may change without a restart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Live {
    /// Per-user session caps and heartbeats.
    pub sessions: SessionsConfig,
    /// Publish rate limits.
    pub rate_limit: RateLimitConfig,
}

/// The access state of one node.
pub struct Access {
    /// `none` or `jwt`.
    pub mode: AuthMode,
    /// Verifies (and in dev mode mints) tokens.
    pub verifier: Verifier,
    /// Sessions per user, for `sessions.max_per_user`.
    pub sessions: SessionRegistry,
    /// How long a new connection may take to send `connect`.
    pub connect_timeout: std::time::Duration,
    /// Who may do what on which channel.
    pub rules: Rules,
    /// The HTTP API key, if set.
    api_key: Option<String>,
    /// The live settings; connections load them on use.
    live: ArcSwap<Live>,
}

impl Access {
    /// Builds the access state from validated settings.
    pub fn new(auth: &AuthConfig, rules: Rules, live: Live) -> Self {
        Self {
            mode: auth.mode,
            verifier: Verifier::new(auth),
            sessions: SessionRegistry::default(),
            connect_timeout: auth.connect_timeout,
            rules,
            api_key: auth.api_key.clone(),
            live: ArcSwap::from_pointee(live),
        }
    }

    /// The current live settings.
    pub fn live(&self) -> arc_swap::Guard<Arc<Live>> {
        self.live.load()
    }

    /// Replaces the live settings; connections pick them up on their next use.
    pub fn apply(&self, live: Live) {
        tracing::info!(?live.rate_limit, ?live.sessions, "live settings applied");
        self.live.store(Arc::new(live));
    }

    /// True when tokens are required (`auth.mode = "jwt"`).
    pub fn enforced(&self) -> bool {
        self.mode == AuthMode::Jwt
    }

    /// Checks the HTTP API key, from the `Authorization` (bearer) or `X-Api-Key` header
    /// values. Without a configured key, open in `none` mode and closed in `jwt` mode.
    pub fn check_api_key(&self, authorization: Option<&str>, x_api_key: Option<&str>) -> Result<(), OpError> {
        let Some(want) = &self.api_key else {
            if self.enforced() {
                return Err(OpError::new(
                    ErrorCode::Unauthorized,
                    "HTTP publish and history need an API key in auth.mode = \"jwt\", and auth.api_key is not set",
                ));
            }
            return Ok(());
        };
        let given = bearer(authorization).or(x_api_key);
        match given {
            Some(key) if constant_time_eq(key.as_bytes(), want.as_bytes()) => Ok(()),
            Some(_) => Err(OpError::new(ErrorCode::Unauthorized, "wrong API key")),
            None => Err(OpError::new(
                ErrorCode::Unauthorized,
                "an API key is required: send `Authorization: Bearer <key>` or `X-Api-Key: <key>`",
            )),
        }
    }

    /// The identity of an HTTP request (long-poll): a token from the query, else the
    /// `Authorization` bearer. None in `none` mode without a token.
    pub fn http_identity(
        &self,
        authorization: Option<&str>,
        query_token: Option<&str>,
    ) -> Result<Option<Identity>, OpError> {
        match query_token.or_else(|| bearer(authorization)) {
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

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let (scheme, token) = authorization?.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(auth: AuthConfig) -> Access {
        Access::new(&auth, Rules::default(), Live::default())
    }

    #[test]
    fn api_key_headers() {
        let key = AuthConfig { api_key: Some("k-123456".into()), ..Default::default() };
        let a = access(key);
        assert_eq!(a.check_api_key(None, None).unwrap_err().code, ErrorCode::Unauthorized);
        assert!(a.check_api_key(Some("Bearer k-123456"), None).is_ok());
        assert!(a.check_api_key(Some("Bearer nope"), None).is_err());
        assert!(a.check_api_key(None, Some("k-123456")).is_ok());
        assert!(access(AuthConfig::default()).check_api_key(None, None).is_ok());
        // jwt mode without a configured key: closed, whatever the request sends.
        let jwt = AuthConfig {
            mode: AuthMode::Jwt,
            hs256_secret: Some("0123456789abcdef-secret".into()),
            ..Default::default()
        };
        let a = access(jwt);
        assert_eq!(a.check_api_key(None, None).unwrap_err().code, ErrorCode::Unauthorized);
        assert_eq!(a.check_api_key(None, Some("anything")).unwrap_err().code, ErrorCode::Unauthorized);
    }
}

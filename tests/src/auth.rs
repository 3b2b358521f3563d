//! Auth helpers for the end-to-end tests: configs with `[auth]`, tokens minted here (HS256
//! with a known secret, RS256/ES256 with the fixture keys, expired, forged), clients that
//! `connect` as a user, and HTTP requests with headers.
//!
//! It owns the test secret and the fixture key paths. It must never reach anything but
//! 127.0.0.1 and never sleep to wait for a condition.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::{Client, HttpResponse, Node, DEADLINE};

/// The HS256 secret of [`jwt_config`].
pub const SECRET: &str = "e2e-test-secret-0123456789";

/// An `[auth]` section in `jwt` mode with [`SECRET`], plus `auth_extra` lines inside
/// `[auth]`, then `rest` (other tables).
pub fn jwt_config(auth_extra: &str, rest: &str) -> String {
    format!("[auth]\nmode = \"jwt\"\nhs256_secret = \"{SECRET}\"\n{auth_extra}\n{rest}\n")
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_secs() as i64
}

/// Signs `claims` with `alg` and `key`.
pub fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("signing a test token")
}

/// `{sub, exp: now + ttl_secs, channels?}` signed with [`SECRET`]. A negative ttl makes an
/// expired token.
pub fn token(user: &str, ttl_secs: i64, channels: Option<&[&str]>) -> String {
    token_signed(SECRET, user, ttl_secs, channels)
}

/// Like [`token`] with another HS256 secret (a forged token, for a server with [`SECRET`]).
pub fn token_signed(secret: &str, user: &str, ttl_secs: i64, channels: Option<&[&str]>) -> String {
    let mut claims = json!({ "sub": user, "exp": now_secs() + ttl_secs });
    if let Some(c) = channels {
        claims["channels"] = json!(c);
    }
    sign(Algorithm::HS256, &EncodingKey::from_secret(secret.as_bytes()), &claims)
}

/// A fixture file under `tests/fixtures/jwt/`.
pub fn fixture(name: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/jwt").join(name)
}

/// A token for `user` signed with the RS256 (`"rs256"`) or ES256 (`"es256"`) fixture key.
pub fn token_pem(kind: &str, user: &str, ttl_secs: i64) -> String {
    let pem = std::fs::read(fixture(&format!("{kind}-private.pem"))).expect("fixture private key");
    let (alg, key) = match kind {
        "rs256" => (Algorithm::RS256, EncodingKey::from_rsa_pem(&pem).expect("RSA fixture key")),
        "es256" => (Algorithm::ES256, EncodingKey::from_ec_pem(&pem).expect("EC fixture key")),
        other => panic!("no fixture key {other}"),
    };
    sign(alg, &key, &json!({ "sub": user, "exp": now_secs() + ttl_secs }))
}

/// A client that sent `connect` with `token`; returns it with the `ok` object.
pub async fn connect_with(node: &Node, token: &str) -> Result<(Client, Value)> {
    let mut c = node.client().await;
    let ok = c.ok("connect", json!({ "token": token })).await?;
    Ok((c, ok))
}

/// A client connected as `user` with an HS256 token valid for an hour.
pub async fn connect_as(node: &Node, user: &str) -> Result<Client> {
    Ok(connect_with(node, &token(user, 3600, None)).await?.0)
}

/// A client connected as `user` with a `channels` allow-list.
pub async fn connect_as_with_channels(node: &Node, user: &str, channels: &[&str]) -> Result<Client> {
    Ok(connect_with(node, &token(user, 3600, Some(channels))).await?.0)
}

/// Sends `connect` with `token` (None: no token), expects the `error` code and then a close
/// with `close_code`; returns the error message.
pub async fn expect_refused(node: &Node, token: Option<&str>, code: &str, close_code: u16) -> Result<String> {
    let mut c = node.client().await;
    let fields = match token {
        Some(t) => json!({ "token": t }),
        None => json!({}),
    };
    let reply = c.cmd("connect", fields).await?;
    let got = crate::error_code(&reply)?;
    anyhow::ensure!(got == code, "connect should fail with {code}, got {reply}");
    let closed = c.expect_close(DEADLINE).await?;
    anyhow::ensure!(closed == close_code, "expected close {close_code}, got {closed}");
    Ok(reply["error"]["message"].as_str().unwrap_or_default().to_string())
}

/// One HTTP/1.1 request with extra headers (`Connection: close`), within [`DEADLINE`].
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Result<HttpResponse> {
    let inner = crate::http_request(addr, method, path, headers, body);
    tokio::time::timeout(DEADLINE + Duration::from_secs(120), inner)
        .await
        .with_context(|| format!("{method} {path} timed out"))?
        .with_context(|| format!("{method} {path}"))
}

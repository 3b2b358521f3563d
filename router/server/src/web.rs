//! The browser side: the chat page's files (embedded in the binary) and the two small
//! endpoints it needs, `GET /api/v1/auth` (which login the page should offer) and
//! `POST /api/v1/dev/token` (a dev token for a user name, only when dev tokens are on).
//!
//! The page's script `web/chat.js` is generated: `scripts/build-web.sh` bundles
//! `web-src/*.ts` with the client SDK (`sdk/client/src`), and the result is committed so that
//! building the router never needs node (`scripts/build-web.sh --check` finds a stale one).
//!
//! It owns which paths serve which embedded file and the dev-token request and answer
//! shapes. It must never mint a token when [`switchyard_access::auth::Verifier::dev_tokens_enabled`]
//! says no, and never read files at run time.

use std::time::Duration;

use serde::Deserialize;

use crate::node::Node;
use switchyard_proto::protocol::{ErrorCode, OpError};

/// Default lifetime of a dev token.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest lifetime of a dev token.
const DEV_TOKEN_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The embedded file served at `path`: `(content type, bytes)`.
pub(crate) fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    Some(match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", include_bytes!("../web/chat.html")),
        "/chat.js" => ("text/javascript; charset=utf-8", include_bytes!("../web/chat.js")),
        "/chat.css" => ("text/css; charset=utf-8", include_bytes!("../web/chat.css")),
        "/console" => ("text/html; charset=utf-8", include_bytes!("../web/index.html")),
        _ => return None,
    })
}

/// `GET /api/v1/auth`: the auth mode and whether dev tokens can be had.
pub(crate) fn auth_info(node: &Node) -> serde_json::Value {
    let mode = if node.access.enforced() { "jwt" } else { "off" };
    serde_json::json!({ "mode": mode, "dev_tokens": node.access.verifier.dev_tokens_enabled() })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    user: String,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    #[serde(default)]
    channels: Option<Vec<String>>,
}

/// `POST /api/v1/dev/token` with `{"user", "ttl"?: "1h", "channels"?: [...]}`: answers
/// `{"token", "user", "exp"}`, or `forbidden` when dev tokens are off.
pub(crate) fn dev_token(node: &Node, body: &[u8]) -> Result<serde_json::Value, OpError> {
    if !node.access.verifier.dev_tokens_enabled() {
        return Err(OpError::new(
            ErrorCode::Forbidden,
            "dev tokens are off: auth.hs256_secret is set (or auth.mode = \"jwt\") without auth.dev_tokens = true",
        ));
    }
    let req: DevTokenRequest = serde_json::from_slice(body)
        .map_err(|e| OpError::bad_request(format!("expected {{\"user\", \"ttl\"?, \"channels\"?}}: {e}")))?;
    if !switchyard_access::auth::is_valid_user_id(&req.user) {
        return Err(OpError::bad_request("`user` must be 1-128 characters of [A-Za-z0-9_.@-]"));
    }
    let ttl = req.ttl.unwrap_or(DEV_TOKEN_TTL);
    if ttl.is_zero() || ttl > DEV_TOKEN_MAX_TTL {
        return Err(OpError::bad_request("`ttl` must be between 1s and 7d"));
    }
    let token =
        node.access.verifier.mint_dev(&req.user, ttl, req.channels).map_err(|e| OpError::internal(e.to_string()))?;
    Ok(
        serde_json::json!({ "token": token, "user": req.user, "exp": switchyard_access::auth::now_secs() + ttl.as_secs() }),
    )
}

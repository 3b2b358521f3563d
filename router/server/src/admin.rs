//! The admin API: `[admin]` settings, the admin token check, and the endpoints only
//! operators use (`switchyard ctl`): the cluster view, the plugin list, one channel's
//! facts, drain and move.
//!
//! It owns who may call them: with `admin.token` set, only a request carrying it as
//! `Authorization: Bearer <token>` (compared in constant time; a wrong or missing token
//! gets 401 and no detail); without one, anyone in development setups (`auth.mode = "off"`
//! or `auth.dev_tokens = true`, where the chat page polls the cluster view) and nobody
//! otherwise. It must never be on the message path: each endpoint reads snapshots the
//! node already keeps, asks one partition owner like any client operation, or writes one
//! etcd key through the cluster layer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use hyper::{Request, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::ConfigError;
use crate::node::Node;
use switchyard_access::auth::AuthMode;
use switchyard_proto::protocol;

/// `[admin]`: the token of the admin API.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The admin token, inline. Separate from client tokens and `auth.api_key`: it grants
    /// the cluster view, the plugin list, channel facts, drain and move. Unset: see the
    /// module doc for who may call the admin API then.
    pub token: Option<String>,
    /// A file holding the admin token (trailing newline dropped); relative to the config
    /// file. Not with `token`.
    pub token_file: Option<PathBuf>,
}

/// Shortest admin token accepted.
const MIN_TOKEN: usize = 16;

impl AdminConfig {
    /// Reads `token_file` (relative to `base`) into `token`.
    pub(crate) fn load_file(&mut self, base: &Path) -> Result<(), ConfigError> {
        let Some(file) = self.token_file.take() else { return Ok(()) };
        if self.token.is_some() {
            return Err(invalid("admin.token_file", "set admin.token or admin.token_file, not both"));
        }
        let path = base.join(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| invalid("admin.token_file", &format!("cannot read {}: {e}", path.display())))?;
        self.token = Some(text.trim_end_matches(['\r', '\n']).to_string());
        Ok(())
    }

    /// Rejects a token too short to be a secret, or with characters a header cannot carry.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.token_file.is_some() {
            return Err(invalid("admin.token_file", "is read by Config::load; set admin.token when building a Config"));
        }
        if let Some(t) = &self.token {
            if t.len() < MIN_TOKEN {
                return Err(invalid("admin.token", &format!("must be at least {MIN_TOKEN} characters")));
            }
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid("admin.token", "must be printable ASCII without spaces"));
            }
        }
        Ok(())
    }
}

fn invalid(field: &str, message: &str) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message: message.into() }
}

type Body = Full<Bytes>;

/// An admin API refusal: its status, a stable code and a one-line message, answered as
/// `{"error": {"code", "message"}}` (the shape of every other HTTP API error).
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    /// No or a wrong admin token (no detail on purpose).
    #[error("unauthorized")]
    Unauthorized,
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// What it names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The cluster refuses it (a draining target, standalone mode).
    #[error("{0}")]
    Refused(String),
    /// Not now (no etcd session, the owner did not answer).
    #[error("{0}")]
    Unavailable(String),
}

impl AdminError {
    fn status_and_code(&self) -> (u16, &'static str) {
        match self {
            Self::Unauthorized => (401, "unauthorized"),
            Self::BadRequest(_) => (400, "bad_request"),
            Self::NotFound(_) => (404, "not_found"),
            Self::Refused(_) => (409, "refused"),
            Self::Unavailable(_) => (503, "unavailable"),
        }
    }

    fn response(&self) -> Response<Body> {
        let (status, code) = self.status_and_code();
        let body = match self {
            Self::Unauthorized => serde_json::json!({ "error": { "code": code } }),
            other => serde_json::json!({ "error": { "code": code, "message": other.to_string() } }),
        };
        json(status, &body)
    }
}

fn json(status: u16, value: &impl serde::Serialize) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(protocol::to_frame(value).into()))
        .expect("valid response")
}

/// True when `given` equals `want`, in time independent of where they differ and of their
/// lengths (both are hashed first, then compared in constant time).
fn same_secret(given: &[u8], want: &[u8]) -> bool {
    switchyard_access::constant_time_eq(&Sha256::digest(given), &Sha256::digest(want))
}

/// Whether a request with these headers may call the admin API.
pub(crate) fn allowed(node: &Node, headers: &HeaderMap) -> Result<(), AdminError> {
    match node.config.admin.token.as_deref() {
        Some(want) => {
            let given = switchyard_access::bearer(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
            match given {
                Some(t) if same_secret(t.as_bytes(), want.as_bytes()) => Ok(()),
                _ => Err(AdminError::Unauthorized),
            }
        }
        None if node.config.auth.mode == AuthMode::Off || node.config.auth.dev_tokens => Ok(()),
        None => Err(AdminError::Unauthorized),
    }
}

/// Answers `ok()` when the request may call the admin API, else the refusal.
pub(crate) fn guarded(node: &Node, headers: &HeaderMap, ok: impl FnOnce() -> Response<Body>) -> Response<Body> {
    match allowed(node, headers) {
        Ok(()) => ok(),
        Err(e) => e.response(),
    }
}

/// The `{channel}` of `GET /api/v1/channels/{channel}/info` (channel facts).
pub(crate) fn info_channel(path: &str) -> Option<&str> {
    path.strip_prefix("/api/v1/channels/")?.strip_suffix("/info").filter(|c| !c.is_empty() && !c.contains('/'))
}

/// `GET /api/v1/channels/{channel}/info`.
pub(crate) async fn channel(node: Arc<Node>, headers: &HeaderMap, name: &str) -> Response<Body> {
    if let Err(e) = allowed(&node, headers) {
        return e.response();
    }
    match channel_facts(&node, name).await {
        Ok(v) => json(200, &v),
        Err(e) => e.response(),
    }
}

/// The channel's placement (from the map) and, when this node leads its partition, its
/// log, policies, presence and durable consumers (`local: true`). Another node's answer
/// has `local: false` and no facts: ask the leader.
async fn channel_facts(node: &Node, name: &str) -> Result<serde_json::Value, AdminError> {
    if !switchyard_proto::channel::is_valid_name(name) {
        return Err(AdminError::BadRequest("invalid channel name".into()));
    }
    let parts = node.router.partitions().clone();
    let p = parts.partition(name);
    let map = node.router.map();
    let leader = map.owners.get(p as usize).cloned().unwrap_or_default();
    let mut out = serde_json::json!({
        "channel": name,
        "partition": p,
        "leader": leader,
        "replicas": map.replicas.get(p as usize).cloned().unwrap_or_else(|| vec![leader.clone()]),
        "isr": map.isr.get(p as usize).cloned().unwrap_or_else(|| vec![leader.clone()]),
        "map_epoch": map.epoch,
        "leader_epoch": map.leader_epochs.get(p as usize).copied(),
        "node": node.config.node_id,
        "local": leader == node.config.node_id,
    });
    if leader != node.config.node_id {
        return Ok(out);
    }
    let view = parts.view(p, name).await.map_err(|e| AdminError::Unavailable(e.message.to_string()))?;
    let owned = name.to_string();
    let (meta, consumers) = parts
        .store
        .read(move |r| (r.channel_meta(p, &owned), r.consumers_of(p, &owned)))
        .await
        .map_err(|e| AdminError::Unavailable(format!("store: {e}")))?;
    let meta = meta.map_err(|e| AdminError::Unavailable(format!("store: {e}")))?;
    let consumers = consumers.map_err(|e| AdminError::Unavailable(format!("store: {e}")))?;
    let ns = node.config.namespace(name);
    let ns_name = switchyard_proto::channel::namespace(name).filter(|n| node.config.namespaces.contains_key(*n));
    let presence = if ns.presence {
        let stats = parts.presence_stats(p, name).await.map_err(|e| AdminError::Unavailable(e.message.to_string()))?;
        Some(serde_json::json!({ "clients": stats.num_clients, "users": stats.num_users }))
    } else {
        None
    };
    let top = view.top;
    let obj = out.as_object_mut().expect("object");
    obj.insert("exists".into(), (meta.is_some() || top > 0).into());
    obj.insert("epoch".into(), view.epoch.to_string().into());
    obj.insert("top".into(), top.into());
    obj.insert("first".into(), view.first.into());
    obj.insert("messages".into(), meta.as_ref().map_or(0, |m| m.count).into());
    obj.insert("bytes".into(), meta.as_ref().map_or(0, |m| m.bytes).into());
    obj.insert(
        "policies".into(),
        serde_json::json!({
            "namespace": ns_name.unwrap_or("defaults"),
            "rule": ns.rule.map(|r| format!("{r:?}").to_lowercase()),
            "history_size": ns.history_size,
            "history_ttl": humantime::format_duration(ns.history_ttl).to_string(),
            "history_bytes": ns.history_bytes,
            "retention_plugin": ns.retention.as_ref().map(|b| b.plugin.clone()),
            "compaction": ns.compaction.as_ref().map(|c| c.plugin.clone().unwrap_or_else(|| "builtin:keyed".into())),
        }),
    );
    obj.insert("presence".into(), presence.unwrap_or(serde_json::Value::Null));
    let consumers: Vec<_> = consumers
        .into_iter()
        .map(|(name, offset)| serde_json::json!({ "name": name, "committed": offset, "lag": top.saturating_sub(offset) }))
        .collect();
    obj.insert("consumers".into(), consumers.into());
    Ok(out)
}

/// The body of `POST /api/v1/drain` (optional) and `POST /api/v1/move`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    /// drain: the node meant (must be this one); move: the target.
    node: Option<String>,
    /// move: the partition.
    partition: Option<u32>,
}

async fn read_ask(req: Request<Incoming>) -> Result<Ask, AdminError> {
    let body = Limited::new(req.into_body(), 4096)
        .collect()
        .await
        .map_err(|_| AdminError::BadRequest("body over 4 KiB".into()))?
        .to_bytes();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Ask::default());
    }
    serde_json::from_slice(&body).map_err(|e| AdminError::BadRequest(format!("body: {e}")))
}

/// `POST /api/v1/drain` (body `{"node": ID}`, optional): marks this node draining in etcd,
/// as SIGTERM does, but the node keeps running (serving nothing it leads) until it is
/// stopped. The leader moves its partitions and replicas away; `GET /api/v1/cluster`
/// shows the progress.
pub(crate) async fn drain(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    if let Err(e) = allowed(&node, req.headers()) {
        return e.response();
    }
    let result = async {
        let ask = read_ask(req).await?;
        let Some(cluster) = &node.cluster else {
            return Err(AdminError::Refused("a standalone node has nothing to drain".into()));
        };
        if let Some(other) = ask.node.filter(|n| *n != node.config.node_id) {
            return Err(AdminError::BadRequest(format!(
                "this is node {}; send the drain of {other} to that node",
                node.config.node_id
            )));
        }
        if !cluster.draining() {
            tracing::info!("draining on request of the admin API");
        }
        switchyard_cluster::drain(cluster, &node.metrics).await.map_err(|e| AdminError::Unavailable(e.to_string()))?;
        Ok(serde_json::json!({ "node": node.config.node_id, "draining": true }))
    };
    match result.await {
        Ok(v) => json(200, &v),
        Err(e) => e.response(),
    }
}

/// `POST /api/v1/move` (body `{"partition": P, "node": ID}`): asks the cluster leader to
/// move partition P's leadership to node ID (`moves/<P>` in etcd). Answers once the request
/// is written (`requested`) or when ID leads P already (`already`).
pub(crate) async fn move_partition(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    use switchyard_cluster::move_requests::{request, MoveError, Requested};
    if let Err(e) = allowed(&node, req.headers()) {
        return e.response();
    }
    let result = async {
        let ask = read_ask(req).await?;
        let (Some(partition), Some(to)) = (ask.partition, ask.node) else {
            return Err(AdminError::BadRequest("body must be {\"partition\": P, \"node\": ID}".into()));
        };
        let Some(cluster) = &node.cluster else {
            return Err(AdminError::Refused("a standalone node has nothing to move".into()));
        };
        match request(cluster, partition, &to).await {
            Ok(done) => Ok(serde_json::json!({
                "partition": partition,
                "node": to,
                "state": if done == Requested::AlreadyThere { "already" } else { "requested" },
            })),
            Err(e @ MoveError::NoSuchPartition { .. }) | Err(e @ MoveError::NotMember(_)) => {
                Err(AdminError::NotFound(e.to_string()))
            }
            Err(e @ MoveError::Draining(_)) => Err(AdminError::Refused(e.to_string())),
            Err(e) => Err(AdminError::Unavailable(e.to_string())),
        }
    };
    match result.await {
        Ok(v) => json(200, &v),
        Err(e) => e.response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_value_only() {
        assert!(same_secret(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdeX", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdef0", b"0123456789abcdef"));
        assert!(!same_secret(b"", b"0123456789abcdef"));
    }

    #[test]
    fn tokens_are_checked() {
        let ok = AdminConfig { token: Some("0123456789abcdef".into()), token_file: None };
        ok.validate().unwrap();
        for bad in ["short", "0123456789 abcdef", "0123456789abcdé"] {
            let c = AdminConfig { token: Some(bad.into()), token_file: None };
            assert!(c.validate().is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), "fedcba9876543210\n").unwrap();
        let mut c = AdminConfig { token: None, token_file: Some("t".into()) };
        c.load_file(dir.path()).unwrap();
        assert_eq!(c.token.as_deref(), Some("fedcba9876543210"));
        let mut both = AdminConfig { token: Some("x".into()), token_file: Some("t".into()) };
        assert!(both.load_file(dir.path()).is_err());
        let mut missing = AdminConfig { token: None, token_file: Some("nope".into()) };
        assert!(missing.load_file(dir.path()).is_err());
    }

    #[test]
    fn info_paths() {
        assert_eq!(info_channel("/api/v1/channels/room:1/info"), Some("room:1"));
        assert_eq!(info_channel("/api/v1/channels/room:1"), None);
        assert_eq!(info_channel("/api/v1/channels/room:1/history"), None);
        assert_eq!(info_channel("/api/v1/channels//info"), None);
        assert_eq!(info_channel("/api/v1/channels/a/b/info"), None);
    }
}

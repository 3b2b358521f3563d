//! The one HTTP listener: WebSocket upgrades on `/ws`, the HTTP API, metrics and health.
//!
//! It owns accepting TCP connections (TCP_NODELAY on each), routing HTTP requests, the
//! WebSocket handshake with its cap on client connections (a slot per connection, held
//! until it ends) and handing upgraded sockets to [`crate::session`]. It must never
//! hold protocol state itself: every operation goes through [`Node`].

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::admin;
use crate::node::Node;
use crate::socket::{SharedTcp, Socket};
use switchyard_core::owner::PublishRequest;
use switchyard_core::HistoryQuery;
use switchyard_proto::protocol::{self, ErrorCode, OpError};
use switchyard_proto::Dialect;
use switchyard_store::Health;

/// The subprotocol the server offers.
pub(crate) const SUBPROTOCOL: &str = "switchyard.v1";

/// Read buffer of a WebSocket connection, and the most one read takes (tungstenite's
/// default is 128 KiB). Every connection holds it, idle or not, so it is small: a frame
/// longer than this is read in several calls into a buffer reserved for its full length.
const READ_BUFFER: usize = 1024;
/// Bytes tungstenite buffers before it writes to the socket on its own: only its own
/// frames (pings, pongs, the close, last words); sessions queue theirs on the [`Socket`].
const WRITE_BUFFER: usize = 32 * 1024;

type Body = Full<Bytes>;

/// A request's headers must arrive within this (a half-sent request is dropped).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long shutdown waits for the request in hand on a keep-alive connection.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// Pause before accepting again when the process is out of file descriptors.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
/// `EMFILE` and `ENFILE` on Linux: out of file descriptors (process, system).
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// Accepts connections until the node shuts down. Every spawned connection task holds a
/// clone of `alive`, so its receiver tells when all have ended.
pub(crate) async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    alive: mpsc::Sender<()>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut shutdown = node.shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if matches!(e.raw_os_error(), Some(EMFILE | ENFILE)) => {
                    // Out of file descriptors: the pending connection stays in the backlog,
                    // so accepting again at once would spin. Back off until some close.
                    tracing::warn!(error = %e, backoff = ?ACCEPT_BACKOFF, "out of file descriptors; accepting again shortly");
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        _ = shutdown.changed() => break,
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (node, alive, tls) = (node.clone(), alive.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_connection(node, TokioIo::new(stream), alive, peer).await,
                // The handshake has the same deadline as a request's headers.
                Some(tls) => match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(stream)) => serve_connection(node, TokioIo::new(stream), alive, peer).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        });
    }
}

/// Serves HTTP/1.1 (and WebSocket upgrades) on one accepted connection, plain or TLS.
async fn serve_connection<I>(node: Arc<Node>, io: I, alive: mpsc::Sender<()>, peer: std::net::SocketAddr)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut shutdown = node.shutdown.clone();
    let service = hyper::service::service_fn(move |req| {
        let node = node.clone();
        let alive = alive.clone();
        async move { Ok::<_, Infallible>(route(node, req, alive).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(io, service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.changed() => {
            // Finish the request in hand, then close the keep-alive connection; a request
            // still arriving (half-sent) does not hold the shutdown up.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_GRACE, conn).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "http connection ended with error");
    }
}

fn json_response(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.into()))
        .expect("valid response")
}

/// The value of header `name`, if it is text.
pub(crate) fn header(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The HTTP API key check, from the `Authorization` and `X-Api-Key` headers.
fn check_api_key(node: &Node, headers: &HeaderMap) -> Result<(), OpError> {
    node.access.check_api_key(header(headers, header::AUTHORIZATION), header(headers, "x-api-key"))
}

/// An error as JSON with its status; a retry hint (`retry_after_ms`) also becomes a
/// `Retry-After` header, in whole seconds rounded up.
fn error_response(e: &OpError) -> Response<Body> {
    let mut response = json_response(e.code.http_status(), protocol::to_frame(&serde_json::json!({ "error": e })));
    if let Some(ms) = e.retry_after_ms {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000).max(1)));
    }
    response
}

fn result_response<T: serde::Serialize>(result: Result<T, OpError>) -> Response<Body> {
    match result {
        Ok(v) => json_response(200, protocol::to_frame(&v)),
        Err(e) => error_response(&e),
    }
}

/// `/healthz` of a node that is not shutting down, by its store's health. A store below
/// its free-space reserve still serves reads; in a cluster the node also routes publishes
/// to the nodes that took its partitions over, so it stays in rotation (200, with the
/// store's state in the body); standalone it can take no write at all (503, like etcd's
/// `NOSPACE` alarm). A failed store is 503 everywhere: the node is about to exit.
fn health_response(node: &Node) -> Response<Body> {
    let store = &node.router.partitions().store;
    match *store.health().borrow() {
        Health::Ok if store.has_damage() => {
            // Still serving: only reads of the damaged data fail (like a Kafka broker with
            // one offline log, not a dead node), so a load balancer keeps it.
            let damaged: Vec<_> = store.damaged().into_iter().map(|(p, _)| p).collect();
            let body = serde_json::json!({ "status": "ok", "store": "damaged", "damaged_partitions": damaged });
            json_response(200, protocol::to_frame(&body))
        }
        Health::Ok => json_response(200, Bytes::from_static(br#"{"status":"ok"}"#)),
        Health::NoSpace if node.cluster.is_some() => {
            json_response(200, Bytes::from_static(br#"{"status":"ok","store":"no_space"}"#))
        }
        Health::NoSpace => json_response(503, Bytes::from_static(br#"{"status":"store_no_space"}"#)),
        Health::Failed => json_response(503, Bytes::from_static(br#"{"status":"store_failed"}"#)),
    }
}

async fn route(node: Arc<Node>, req: Request<Incoming>, alive: mpsc::Sender<()>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/ws") => upgrade(node, req, alive, Peer::Client(Dialect::Native)),
        (&Method::GET, "/connection/websocket") => upgrade(node, req, alive, Peer::Client(Dialect::Centrifugo)),
        (&Method::GET, "/peer") => match peer_auth(&node, &req) {
            Ok(()) => upgrade(node, req, alive, Peer::Node),
            Err(e) => error_response(&e),
        },
        (&Method::GET, "/healthz") => {
            if *node.shutdown.borrow() {
                json_response(503, Bytes::from_static(br#"{"status":"shutting_down"}"#))
            } else {
                health_response(&node)
            }
        }
        (&Method::GET, "/metrics") => Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(node.metrics.render())))
            .expect("valid response"),
        (&Method::GET, "/api/v1/cluster") => {
            admin::guarded(&node, req.headers(), || json_response(200, protocol::to_frame(&cluster(&node))))
        }
        (&Method::GET, "/api/v1/plugins") => admin::guarded(&node, req.headers(), || {
            json_response(
                200,
                protocol::to_frame(&serde_json::json!({ "dir": node.plugins.dir(), "plugins": node.plugins.list() })),
            )
        }),
        (&Method::POST, "/api/v1/drain") => admin::drain(node, req).await,
        (&Method::POST, "/api/v1/move") => admin::move_partition(node, req).await,
        (&Method::POST, "/api/v1/publish") => publish(node, req).await,
        (&Method::GET, p) if history_channel(p).is_some() => {
            let channel = history_channel(p).expect("matched above");
            if let Err(e) = check_api_key(&node, req.headers()) {
                return error_response(&e);
            }
            history(node, channel, req.uri().query().unwrap_or("")).await
        }
        (&Method::GET, p) if admin::info_channel(p).is_some() => {
            let channel = admin::info_channel(p).expect("matched above");
            admin::channel(node.clone(), req.headers(), channel).await
        }
        (&Method::GET, "/api/v1/poll") => {
            let query = req.uri().query().unwrap_or("").to_string();
            result_response(crate::poll::poll(node, req.headers(), &query).await)
        }
        (&Method::GET, "/api/v1/auth") => json_response(200, protocol::to_frame(&crate::web::auth_info(&node))),
        (&Method::POST, "/api/v1/dev/token") => match Limited::new(req.into_body(), 64 * 1024).collect().await {
            Ok(body) => result_response(crate::web::dev_token(&node, &body.to_bytes())),
            Err(_) => error_response(&OpError::new(ErrorCode::TooLarge, "body over 64 KiB")),
        },
        (&Method::GET, p) if crate::web::asset(p).is_some() => {
            let (content_type, bytes) = crate::web::asset(p).expect("matched above");
            Response::builder()
                .header(header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from_static(bytes)))
                .expect("valid response")
        }
        _ => {
            let e = OpError::bad_request(format!("no route for {} {path}", req.method()));
            json_response(404, protocol::to_frame(&serde_json::json!({ "error": e })))
        }
    }
}

/// The `{channel}` of `/api/v1/channels/{channel}/history`.
fn history_channel(path: &str) -> Option<&str> {
    path.strip_prefix("/api/v1/channels/")?.strip_suffix("/history").filter(|c| !c.is_empty())
}

fn cluster(node: &Node) -> serde_json::Value {
    let map = node.router.map();
    let Some(state) = &node.cluster else {
        return serde_json::json!({
            "mode": "standalone",
            "node": node.config.node_id,
            "leader": node.config.node_id,
            "epoch": map.epoch,
            "partitions": map.partitions(),
            "nodes": [{"id": node.config.node_id, "url": format!("http://{}", node.config.listen), "state": "serving",
                "version": env!("CARGO_PKG_VERSION"), "partitions": map.partitions()}],
            "owners": map.owners,
        });
    };
    let view = state.view();
    let nodes: Vec<_> = view
        .nodes
        .values()
        .map(|n| {
            let owned = map.owners.iter().filter(|o| **o == n.id).count();
            serde_json::json!({"id": n.id, "url": n.url, "version": n.version, "started_at": n.started_at,
                "partitions": owned, "draining": n.draining, "state": if n.draining { "draining" } else { "serving" }})
        })
        .collect();
    serde_json::json!({
        "mode": "cluster",
        "cluster": state.config.name,
        "node": node.config.node_id,
        "etcd_connected": view.etcd_connected,
        "is_leader": view.is_leader,
        "leader": view.leader.as_ref().map(|l| l.node.clone()),
        "term": view.leader.as_ref().map(|l| l.term),
        "leader_since": view.leader.as_ref().map(|l| l.since.clone()),
        "epoch": map.epoch,
        "partitions": map.partitions(),
        "nodes": nodes,
        "owners": map.owners,
        "replicas": map.replicas,
        "isr": map.isr,
        "leader_epochs": map.leader_epochs,
        "loads": *state.loads(),
        "reach": view.reach,
        "config": view.config,
        "last_error": view.last_error,
    })
}

async fn publish(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    // A browser form can post cross-site without a preflight, but not as JSON.
    let json = header(req.headers(), header::CONTENT_TYPE)
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        let e = OpError::bad_request("Content-Type must be application/json");
        return json_response(415, protocol::to_frame(&serde_json::json!({ "error": e })));
    }
    if let Err(e) = check_api_key(&node, req.headers()) {
        return error_response(&e);
    }
    let max = node.config.limits.max_frame_bytes;
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error_response(&OpError::new(ErrorCode::TooLarge, format!("body over {max} bytes"))),
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return error_response(&OpError::bad_request("body must be UTF-8 JSON"));
    };
    let p = match protocol::parse_http_publish(text) {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    if let Err(e) = node.config.check_keys(p.key.as_deref(), p.idempotency_key.as_deref()) {
        return error_response(&e);
    }
    // With tokens on, the API key's holder has an idempotency namespace of its own (see
    // the session's `scoped`); anonymous mode shares the channel-wide one.
    let idempotency_key = p.idempotency_key.map(|k| if node.access.enforced() { format!("h/{k}") } else { k });
    let req = PublishRequest { channel: p.channel, data: p.data, key: p.key, idempotency_key, from: None };
    result_response(node.router.publish_and_wait(req).await)
}

/// The query parameter `name` parsed as a `T` (`what` names the type in the error), if
/// given.
fn query_param<T: std::str::FromStr>(query: &str, name: &str, what: &str) -> Result<Option<T>, OpError> {
    for pair in query.split('&') {
        if let Some((k, v)) = pair.split_once('=') {
            if k == name && !v.is_empty() {
                return v.parse().map(Some).map_err(|_| OpError::bad_request(format!("`{name}` must be {what}")));
            }
        }
    }
    Ok(None)
}

fn query_u64(query: &str, name: &str) -> Result<Option<u64>, OpError> {
    query_param(query, name, "an unsigned integer")
}

fn query_bool(query: &str, name: &str) -> Result<Option<bool>, OpError> {
    query_param(query, name, "true or false")
}

/// The query of `GET /api/v1/channels/{channel}/history`: the `history` op's fields, with
/// its defaults, cap and rule (`before` only with `reverse=true`).
fn history_query(query: &str) -> Result<HistoryQuery, OpError> {
    let since = query_u64(query, "since")?.unwrap_or(0);
    let limit = query_u64(query, "limit")?.unwrap_or(protocol::HISTORY_DEFAULT_LIMIT as u64);
    let reverse = query_bool(query, "reverse")?.unwrap_or(false);
    let before = query_u64(query, "before")?;
    if before.is_some() && !reverse {
        return Err(OpError::bad_request("`before` pages backwards and needs `reverse=true`"));
    }
    Ok(HistoryQuery { since, before, limit: limit.min(protocol::HISTORY_MAX_LIMIT as u64) as u32, reverse })
}

async fn history(node: Arc<Node>, channel: &str, query: &str) -> Response<Body> {
    if !switchyard_proto::channel::is_valid_name(channel) {
        return error_response(&OpError::bad_request("invalid channel name"));
    }
    let page = async { node.router.history(channel, history_query(query)?).await };
    result_response(page.await)
}

/// Who is upgrading: a client (`/ws`, or Centrifugo's `/connection/websocket`) or another
/// node's peer link (`/peer`).
enum Peer {
    Client(Dialect),
    Node,
}

/// A peer link must carry the cluster secret (compared in constant time).
fn peer_auth(node: &Node, req: &Request<Incoming>) -> Result<(), OpError> {
    let Some(secret) = node.config.cluster.secret.as_deref().filter(|_| node.router.peers_enabled()) else {
        return Err(OpError::new(ErrorCode::Forbidden, "peer links are off (no cluster.secret)"));
    };
    let given = req.headers().get(switchyard_peer::wire::SECRET_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    if switchyard_access::constant_time_eq(given, secret.as_bytes()) {
        Ok(())
    } else {
        Err(OpError::new(ErrorCode::Unauthorized, "bad cluster secret"))
    }
}

fn upgrade(node: Arc<Node>, req: Request<Incoming>, alive: mpsc::Sender<()>, who: Peer) -> Response<Body> {
    let headers = req.headers();
    let is_upgrade =
        headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).filter(|_| is_upgrade) else {
        return error_response(&OpError::bad_request("expected a WebSocket upgrade"));
    };
    if *node.shutdown.borrow() {
        return error_response(&OpError::new(ErrorCode::Unavailable, "node shutting down"));
    }
    // A client's slot under `limits.max_connections`, held by its task until the connection
    // ends. Taken here, before the upgrade is answered: simultaneous upgrades cannot all
    // slip under the cap, as they could when the check read the connections gauge.
    let slot = match who {
        Peer::Client(_) => match node.connection_slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                let max_connections = node.config.limits.max_connections;
                let e =
                    OpError::new(ErrorCode::Unavailable, format!("limits.max_connections ({max_connections}) reached"));
                let mut response = error_response(&e);
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return response;
            }
        },
        Peer::Node => None,
    };
    let accept = derive_accept_key(key.as_bytes());
    let offers_subprotocol = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == SUBPROTOCOL));
    let max = node.config.limits.max_frame_bytes;
    let peer_link = matches!(who, Peer::Node);
    // A dialing node that predates typed refusals gets errors in the shape it reads, one
    // that predates presence no presence events.
    let wire =
        switchyard_peer::wire::wire_version(headers.get(switchyard_peer::wire::WIRE_HEADER).map(|v| v.as_bytes()));
    tokio::spawn(async move {
        let _alive = alive;
        let _slot = slot;
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                // tungstenite's own limit is a backstop far above ours; frames between the
                // two get a proper `too_large` reply from the session.
                // Small buffers keep idle connections cheap; both grow when traffic needs it.
                // Each side's future is allocated at its own size: the task itself stays
                // small, whichever side is larger (an idle client costs its session only).
                match who {
                    Peer::Client(dialect) => {
                        let config = WebSocketConfig::default()
                            .read_buffer_size(READ_BUFFER)
                            .write_buffer_size(WRITE_BUFFER)
                            .max_message_size(Some(max * 4 + 4096))
                            .max_frame_size(Some(max * 4 + 4096));
                        // A plain TCP client's stream is shared, so that its session can
                        // lend the write side to the owners (the outbox's direct path).
                        match upgraded.downcast::<TokioIo<tokio::net::TcpStream>>() {
                            Ok(parts) => {
                                let (io, sink) = SharedTcp::new(parts.io.into_inner(), parts.read_buf);
                                let socket = Socket::with_sink(io, sink);
                                let ws = WebSocketStream::from_raw_socket(socket, Role::Server, Some(config)).await;
                                Box::pin(crate::session::run(node, ws, dialect)).await
                            }
                            Err(upgraded) => {
                                let socket = Socket::new(TokioIo::new(upgraded));
                                let ws = WebSocketStream::from_raw_socket(socket, Role::Server, Some(config)).await;
                                Box::pin(crate::session::run(node, ws, dialect)).await
                            }
                        }
                    }
                    Peer::Node => {
                        let config = switchyard_peer::wire::ws_config();
                        let ws =
                            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
                        Box::pin(switchyard_peer::serve(node.router.clone(), ws, "peer".into(), wire)).await
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Full::new(Bytes::new()))
        .expect("valid response");
    if offers_subprotocol {
        resp.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));
    }
    if peer_link {
        // The dialing node learns that this one reads and sends typed refusals.
        resp.headers_mut()
            .insert(switchyard_peer::wire::WIRE_HEADER, HeaderValue::from(switchyard_peer::wire::WIRE_VERSION));
    }
    resp
}

#[cfg(test)]
mod tests {
    //! The listener against a real node on a loopback port.

    use std::time::Duration;

    use super::*;
    use crate::config::Config;

    /// Many clients upgrading at the same moment: exactly `max_connections` get in, every
    /// other one gets 503 with `Retry-After`, and the connections gauge never passes the
    /// cap. (When the cap was a check of the gauge, which a session raises only once it
    /// runs, this let 4 of 64 in past a cap of 3.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn simultaneous_upgrades_never_pass_max_connections() {
        const CAP: usize = 3;
        const CLIENTS: usize = 64;
        let dir = tempfile::tempdir().unwrap();
        let mut config =
            Config { data_dir: dir.path().join("data"), plugins_dir: dir.path().join("plugins"), ..Config::default() };
        config.limits.max_connections = CAP;
        config.validate().unwrap();
        let node = Node::start(config, None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (alive, _alive_rx) = mpsc::channel(1);
        tokio::spawn(serve(node.clone(), listener, alive, None));

        // The most connections the gauge shows at any moment of the storm.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = tokio::spawn({
            let (node, done) = (node.clone(), done.clone());
            async move {
                let mut most = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    most = most.max(node.metrics.connections.get());
                    tokio::task::yield_now().await;
                }
                most
            }
        });
        // Every client connects first; then, from a thread of their own, all send their
        // upgrade within microseconds, so the server holds many upgrades at once.
        let answers = tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Write as _};
            let request = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                           Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
            let mut clients: Vec<_> = (0..CLIENTS).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
            for c in &mut clients {
                c.write_all(request.as_bytes()).unwrap();
            }
            // Each answer's head (the 101 has no body; a 503's body is not needed).
            clients
                .into_iter()
                .map(|mut c| {
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        assert_eq!(c.read(&mut byte).unwrap(), 1, "the server closed before answering");
                        head.push(byte[0]);
                    }
                    (String::from_utf8(head).unwrap().to_ascii_lowercase(), c)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        let mut admitted = Vec::new();
        for (head, socket) in answers {
            if head.starts_with("http/1.1 101") {
                admitted.push(socket);
            } else {
                assert!(head.starts_with("http/1.1 503") && head.contains("retry-after: 1"), "{head}");
            }
        }
        // The admitted stay open: no slot was given back, so no refused client was let in late.
        assert_eq!(admitted.len(), CAP, "upgrades answered with 101");
        tokio::time::timeout(Duration::from_secs(10), async {
            while node.metrics.connections.get() != CAP as i64 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("every admitted session running");
        tokio::time::sleep(Duration::from_millis(100)).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(sampler.await.unwrap(), CAP as i64, "the most connections the gauge showed");
        assert_eq!(node.metrics.connections.get(), CAP as i64, "connections gauge");
        drop(admitted);
        node.shutdown();
    }

    /// The history endpoint's query: the op's defaults and cap, `limit=0`, and `before`
    /// only with `reverse=true`.
    #[test]
    fn history_queries_follow_the_op() {
        assert_eq!(history_query("").unwrap(), HistoryQuery::default());
        assert_eq!(history_query("since=5&limit=5000").unwrap(), HistoryQuery::forward(5, 1000));
        assert_eq!(history_query("limit=0").unwrap().limit, 0);
        assert_eq!(history_query("reverse=true&before=9&limit=3").unwrap(), HistoryQuery::backward(Some(9), 3));
        assert_eq!(history_query("reverse=true").unwrap(), HistoryQuery::backward(None, 100));
        for bad in ["before=9", "reverse=false&before=9", "reverse=yes", "reverse=true&before=-1", "limit=-1"] {
            assert_eq!(history_query(bad).unwrap_err().code, ErrorCode::BadRequest, "{bad}");
        }
    }
}

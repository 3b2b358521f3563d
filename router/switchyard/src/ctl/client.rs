//! The admin API client: one HTTP/1.1 request at a time over hyper, to the first of the
//! `--url` nodes that answers.
//!
//! It owns trying the nodes in order (a node that cannot be reached, times out, answers
//! something that is not JSON or belongs to another cluster than `--cluster` is skipped,
//! and the next one tried; the first that answers is kept for the rest of the run), the
//! admin token header, and turning every failure into a one-line [`CtlError`]. It must
//! never print: the commands decide what the operator sees.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header;
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The largest answer read (a 65,536-partition cluster view is a few MB).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Why a command failed; each is one line for the operator.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CtlError {
    /// No `--url` node answered usefully; each attempt's reason, in order.
    #[error("no node answered: {}", .0.join("; "))]
    NoNode(Vec<String>),
    /// One node (asked directly, e.g. the one being drained) did not answer usefully.
    #[error("{0}")]
    Node(String),
    /// The admin token was missing or wrong.
    #[error("{url}: 401 unauthorized: the admin token is missing or wrong (SWITCHYARD_ADMIN_TOKEN or --token-file)")]
    Unauthorized {
        /// The node that refused.
        url: String,
    },
    /// The API refused the request, with its reason.
    #[error("{0}")]
    Refused(String),
    /// The command's own input is wrong (an unknown node, a bad URL).
    #[error("{0}")]
    Usage(String),
    /// `--wait` ran out of time.
    #[error("{0}")]
    Timeout(String),
}

/// A JSON answer with its status.
pub(crate) struct Answer {
    pub status: u16,
    pub body: Value,
}

/// The admin API of a cluster, through the first `--url` node that answers.
pub(crate) struct Client {
    urls: Vec<String>,
    token: Option<String>,
    cluster: Option<String>,
    timeout: Duration,
    /// Index of the node that answered last.
    current: Option<usize>,
}

impl Client {
    /// A client of `urls` (tried in order) with the admin `token`; `cluster`, when given,
    /// is the name every node must report.
    pub(crate) fn new(urls: Vec<String>, token: Option<String>, cluster: Option<String>, timeout: Duration) -> Self {
        Self { urls, token, cluster, timeout, current: None }
    }

    /// The URL of the node in use (after a first answer).
    pub(crate) fn url(&self) -> &str {
        self.current.map_or("", |i| self.urls[i].as_str())
    }

    /// `GET /api/v1/cluster`, from the first node that answers it as a node of the
    /// expected cluster.
    pub(crate) async fn cluster(&mut self) -> Result<Value, CtlError> {
        let a = self.call(Method::GET, "/api/v1/cluster", None).await?;
        Ok(a.body)
    }

    /// A request to the nodes in turn. Unreachable nodes and unreadable answers move on to
    /// the next; any JSON answer ends the search (a 401 is reported as such).
    pub(crate) async fn call(&mut self, method: Method, path: &str, body: Option<&Value>) -> Result<Answer, CtlError> {
        let mut why = Vec::new();
        let order: Vec<usize> = match self.current {
            Some(i) => std::iter::once(i).chain((0..self.urls.len()).filter(|j| *j != i)).collect(),
            None => (0..self.urls.len()).collect(),
        };
        for i in order {
            let url = self.urls[i].clone();
            match self.once(&url, method.clone(), path, body).await {
                Ok(a) => {
                    if let Err(e) = self.same_cluster(&url, path, &a) {
                        why.push(e);
                        continue;
                    }
                    self.current = Some(i);
                    return check(&url, a);
                }
                Err(e) => why.push(e),
            }
        }
        Err(CtlError::NoNode(why))
    }

    /// A request to one node (named by URL), without moving on.
    pub(crate) async fn call_node(
        &self,
        url: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, CtlError> {
        let a = self.once(url, method, path, body).await.map_err(CtlError::Node)?;
        check(url, a)
    }

    /// A cluster view from a node of another cluster is an error for that node.
    fn same_cluster(&self, url: &str, path: &str, a: &Answer) -> Result<(), String> {
        let (Some(want), "/api/v1/cluster", 200) = (&self.cluster, path, a.status) else { return Ok(()) };
        let theirs = a.body.get("cluster").and_then(Value::as_str).unwrap_or("(standalone)");
        if theirs == want {
            Ok(())
        } else {
            Err(format!("{url}: a node of cluster {theirs}, not {want}"))
        }
    }

    /// One request with the deadline; the reason as text when it got no JSON answer.
    async fn once(&self, url: &str, method: Method, path: &str, body: Option<&Value>) -> Result<Answer, String> {
        match tokio::time::timeout(self.timeout, self.request(url, method, path, body)).await {
            Ok(r) => r.map_err(|e| format!("{url}: {e}")),
            Err(_) => Err(format!("{url}: no answer within {}", humantime::format_duration(self.timeout))),
        }
    }

    async fn request(&self, url: &str, method: Method, path: &str, body: Option<&Value>) -> Result<Answer, String> {
        let (authority, base) = parse_url(url)?;
        let stream =
            tokio::net::TcpStream::connect(authority.as_str()).await.map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header(header::HOST, authority.as_str())
            .header(header::ACCEPT, "application/json");
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(body)).map_err(|e| format!("bad request: {e}"))?;
        let resp = sender.send_request(req).await.map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("answer unreadable: {e}"))?
            .to_bytes();
        conn.abort();
        let body = serde_json::from_slice(&bytes).map_err(|e| {
            let shown: String = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).escape_debug().collect();
            format!("malformed answer (HTTP {status}, not JSON: {e}; starts \"{shown}\")")
        })?;
        Ok(Answer { status, body })
    }
}

/// A JSON answer: 2xx passes, 401 is [`CtlError::Unauthorized`], anything else is the
/// API's own message.
fn check(url: &str, a: Answer) -> Result<Answer, CtlError> {
    match a.status {
        200..=299 => Ok(a),
        401 => Err(CtlError::Unauthorized { url: url.to_string() }),
        status => {
            let msg = a.body.pointer("/error/message").and_then(Value::as_str).unwrap_or("no reason given");
            Err(CtlError::Refused(format!("{url}: {status}: {msg}")))
        }
    }
}

/// `(host:port, path prefix)` of an `http://` URL.
pub(crate) fn parse_url(url: &str) -> Result<(String, String), String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err("https:// is not supported by ctl yet: use a plain-HTTP listener".into()),
        _ => return Err("the URL must start with http://".into()),
    }
    let host = uri.host().ok_or("the URL has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let base = uri.path().trim_end_matches('/').to_string();
    Ok((format!("{host}:{port}"), base))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(parse_url("http://127.0.0.1:8000").unwrap(), ("127.0.0.1:8000".into(), String::new()));
        assert_eq!(parse_url("http://h/").unwrap(), ("h:80".into(), String::new()));
        assert!(parse_url("https://h").unwrap_err().contains("https"));
        assert!(parse_url("h:80").is_err());
        assert!(parse_url("::").is_err());
    }
}

//! TLS on the client listener (#14): with `[tls]`, a `wss://` client connects and is served,
//! HTTPS answers, and a plaintext client to the same port fails its handshake. The
//! certificate is made at test time (rcgen) and trusted by the test's client only.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use switchyard_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;

/// A self-signed certificate for 127.0.0.1, written next to the node's config.
struct Cert {
    dir: tempfile::TempDir,
    der: rustls::pki_types::CertificateDer<'static>,
}

fn cert() -> Result<Cert> {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("cert.pem"), made.cert.pem())?;
    std::fs::write(dir.path().join("key.pem"), made.key_pair.serialize_pem())?;
    Ok(Cert { dir, der: made.cert.der().clone() })
}

fn tls_config(c: &Cert) -> String {
    let p = |name: &str| c.dir.path().join(name).display().to_string();
    format!("[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n", p("cert.pem"), p("key.pem"))
}

async fn tls_stream(node: &Node, c: &Cert) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(c.der.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(node.addr()).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
    Ok(tokio::time::timeout(DEADLINE, connector.connect(name, tcp)).await.context("TLS handshake timed out")??)
}

#[tokio::test]
async fn a_wss_client_is_served_and_a_plaintext_one_fails() -> Result<()> {
    let c = cert()?;
    let node = Node::start(&tls_config(&c));

    // wss://: connect, publish, read it back.
    let stream = tls_stream(&node, &c).await?;
    let url = format!("wss://127.0.0.1:{}/ws", node.addr().port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    let publish = json!({"id": 1, "op": "publish", "channel": "room:tls", "data": "secret"});
    ws.send(Message::text(publish.to_string())).await?;
    let reply: Value = loop {
        match tokio::time::timeout(DEADLINE, ws.next()).await?.context("closed")?? {
            Message::Text(t) => break serde_json::from_str(&t)?,
            _ => continue,
        }
    };
    ensure!(reply["ok"]["offset"] == 1, "publish over wss: {reply}");

    // https://: the health endpoint answers through the same listener.
    let mut https = tls_stream(&node, &c).await?;
    https.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, https.read_to_string(&mut answer)).await??;
    ensure!(answer.starts_with("HTTP/1.1 200"), "https: {answer}");

    // A plaintext WebSocket client to the TLS port does not get a connection.
    let plain = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(node.ws_url())).await?;
    ensure!(plain.is_err(), "a plaintext client was served on the TLS port");
    Ok(())
}

#[tokio::test]
async fn an_unusable_certificate_stops_the_node_with_a_clear_error() -> Result<()> {
    let c = cert()?;
    std::fs::write(c.dir.path().join("key.pem"), "not a key")?;
    let (status, stderr) = run_expecting_exit(&tls_config(&c))?;
    ensure!(status.code() == Some(2), "exit {status}: {stderr}");
    ensure!(stderr.contains("tls:") && stderr.contains("key.pem"), "{stderr}");
    Ok(())
}

/// A `wss://` WebSocket to `node`, trusting `c`.
async fn wss(
    node: &Node,
    c: &Cert,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>> {
    let stream = tls_stream(node, c).await?;
    let url = format!("wss://127.0.0.1:{}/ws", node.addr().port());
    Ok(tokio_tungstenite::client_async(url, stream).await?.0)
}

/// Sends one command and returns its reply (pushes are skipped).
async fn command(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>,
    cmd: Value,
) -> Result<Value> {
    let id = cmd["id"].clone();
    ws.send(Message::text(cmd.to_string())).await?;
    loop {
        if let Message::Text(t) = tokio::time::timeout(DEADLINE, ws.next()).await?.context("closed")?? {
            let v: Value = serde_json::from_str(&t)?;
            if v["id"] == id {
                return Ok(v);
            }
        }
    }
}

/// Peer links over TLS (#14): two `[tls]` nodes with `allow_plaintext_peers = false` verify
/// each other against the CA file, forward a publish to the channel's owner and replicate
/// every partition (the ISR fills over the TLS links). A node that would send the secret
/// over plaintext refuses to start.
#[tokio::test]
async fn a_tls_peer_cluster_forwards_and_replicates() -> Result<()> {
    use switchyard_proto::partition::partition_of;
    use switchyard_tests::etcd::{node_config, Etcd};
    const P: u32 = 8;
    let c = cert()?;
    let etcd = Etcd::start().await;
    let ca = c.dir.path().join("cert.pem").display().to_string();
    let config = |id: &str| {
        format!(
            "{}secret = \"correct-horse-battery-staple\"\npeer_ca_file = \"{ca}\"\nallow_plaintext_peers = false\n",
            node_config(&etcd, "tls", id, P, &tls_config(&c))
        )
    };
    let (n1, n2) = (Node::start(&config("n1")), Node::start(&config("n2")));
    wait_until("both nodes own partitions and every ISR is full", DEADLINE, async || {
        let Some(m) = etcd.map("tls")? else { return Ok(false) };
        let owners: Vec<&str> = m["owners"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let full = m["isr"].as_array().is_some_and(|i| i.iter().all(|x| x.as_array().is_some_and(|x| x.len() == 2)));
        Ok(owners.contains(&"n1") && owners.contains(&"n2") && full)
    })
    .await?;
    let map = etcd.map("tls")?.context("map")?;
    let channel = (0..)
        .map(|i| format!("room:{i}"))
        .find(|ch| map["owners"][partition_of(ch, P) as usize] == "n2")
        .expect("a channel owned by n2");
    let mut ws = wss(&n1, &c).await?;
    let publish = json!({"id": 1, "op": "publish", "channel": channel, "data": "over tls"});
    let reply = loop {
        let r = command(&mut ws, publish.clone()).await?;
        if r.get("ok").is_some() {
            break r;
        }
        ensure!(r["error"]["code"] == "unavailable", "publish forwarded over TLS: {r}");
    };
    ensure!(reply["ok"]["offset"] == 1, "{reply}");
    let mut ws2 = wss(&n2, &c).await?;
    let history = command(&mut ws2, json!({"id": 2, "op": "history", "channel": channel})).await?;
    ensure!(history["ok"]["messages"][0]["data"] == "over tls", "{history}");

    // Plaintext peers refused: a node without [tls] cannot join with the secret.
    let plain = format!(
        "{}secret = \"correct-horse-battery-staple\"\nallow_plaintext_peers = false\n",
        node_config(&etcd, "tls", "n3", P, "")
    );
    let (status, stderr) = run_expecting_exit(&plain)?;
    ensure!(status.code() == Some(2), "exit {status}: {stderr}");
    ensure!(stderr.contains("cluster.allow_plaintext_peers"), "{stderr}");
    Ok(())
}

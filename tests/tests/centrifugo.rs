//! Centrifugo's client protocol at `/connection/websocket`, frame by frame: a raw client
//! that sends exactly what Centrifugo's SDKs send, and checks what comes back.
//!
//! It owns `docs/centrifugo.md`'s promises that the SDK tests (`centrifugo_sdk.rs`) cannot
//! reach: every bad input gets Centrifugo's error code or close code and costs no other
//! client anything; recovered messages inside a subscribe reply stay under
//! `limits.max_reply_bytes` and the rest follow as publications, in order; the server's
//! `{}` pings; and both protocols are views of the same channels (same offsets, same epoch).

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use switchyard_tests::auth::{jwt_config, token, token_signed};
use switchyard_tests::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw Centrifugo client: one JSON command per line, replies and pushes read line by line.
struct Cf {
    ws: Ws,
    lines: VecDeque<Value>,
    next_id: u64,
}

/// How a read ended when no line came.
#[derive(Debug, PartialEq)]
enum End {
    Closed(u16, String),
    Gone,
}

impl Cf {
    async fn open(node: &Node) -> Result<Cf> {
        let url = format!("ws://{}/connection/websocket", node.addr());
        let (ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url)).await??;
        Ok(Cf { ws, lines: VecDeque::new(), next_id: 1 })
    }

    /// Opens and connects with `token` (or none); returns the `connect` result.
    async fn connect(node: &Node, token: Option<&str>) -> Result<(Cf, Value)> {
        let mut cf = Cf::open(node).await?;
        let mut req = json!({});
        if let Some(t) = token {
            req["token"] = json!(t);
        }
        let reply = cf.call("connect", req).await?;
        Ok((cf, reply["connect"].clone()))
    }

    async fn send_text(&mut self, text: impl Into<String>) -> Result<()> {
        Ok(tokio::time::timeout(DEADLINE, self.ws.send(Message::text(text.into()))).await??)
    }

    /// Sends `{"id", method: body}`; returns the id.
    async fn send(&mut self, method: &str, body: Value) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        self.send_text(json!({ "id": id, method: body }).to_string()).await?;
        Ok(id)
    }

    /// Sends a command and waits for its reply (pushes read meanwhile are kept).
    async fn call(&mut self, method: &str, body: Value) -> Result<Value> {
        let id = self.send(method, body).await?;
        self.reply(id).await
    }

    async fn reply(&mut self, id: u64) -> Result<Value> {
        let deadline = Instant::now() + DEADLINE;
        let mut kept = VecDeque::new();
        let found = loop {
            match self.next_line(deadline).await {
                Ok(v) if v["id"] == json!(id) => break Ok(v),
                Ok(v) => kept.push_back(v),
                Err(e) => break Err(e),
            }
        };
        kept.extend(self.lines.drain(..));
        self.lines = kept;
        found
    }

    /// The next line (reply, push or ping), reading frames as needed.
    async fn next_line(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            if let Some(v) = self.lines.pop_front() {
                return Ok(v);
            }
            match self.frame(deadline).await? {
                Ok(text) => {
                    for line in text.split('\n') {
                        self.lines.push_back(serde_json::from_str(line).with_context(|| format!("line {line:?}"))?);
                    }
                }
                Err(end) => bail!("connection ended: {end:?}"),
            }
        }
    }

    /// The next push for `channel` of `kind` (`pub`, `unsubscribe`, ...), skipping pings.
    async fn next_push(&mut self, kind: &str) -> Result<Value> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let v = self.next_line(deadline).await?;
            if let Some(body) = v["push"].get(kind) {
                return Ok(body.clone());
            }
        }
    }

    async fn frame(&mut self, deadline: Instant) -> Result<std::result::Result<String, End>> {
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next()).await.context("no frame in time")?;
            return Ok(match next {
                Some(Ok(Message::Text(t))) => Ok(t.to_string()),
                Some(Ok(Message::Close(Some(c)))) => Err(End::Closed(c.code.into(), c.reason.to_string())),
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => Err(End::Gone),
                Some(Ok(_)) => continue,
            });
        }
    }

    /// Reads until the server closes; the close code and reason (lines before it are kept).
    async fn closed(&mut self) -> Result<(u16, String)> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.frame(deadline).await? {
                Ok(text) => self.lines.extend(text.split('\n').filter_map(|l| serde_json::from_str(l).ok())),
                Err(End::Closed(code, reason)) => return Ok((code, reason)),
                Err(End::Gone) => bail!("the connection dropped without a close frame"),
            }
        }
    }
}

fn code(reply: &Value) -> u64 {
    reply["error"]["code"].as_u64().unwrap_or(0)
}

const OPEN: &str = "[namespaces.room]\nrule = \"public\"\n";

/// Frames that are not the protocol close that connection with 3501 ("bad request": the
/// client must not retry the same bytes), and only that one: a subscriber on another
/// connection keeps receiving throughout.
#[tokio::test]
async fn frames_that_are_not_the_protocol_close_only_their_connection() -> Result<()> {
    let node = Node::start(OPEN);
    let (mut watcher, _) = Cf::connect(&node, None).await?;
    watcher.call("subscribe", json!({"channel": "room:calm"})).await?;
    let mut publisher = Client::connect(&node).await;
    // 10,000 empty commands fit under `limits.max_frame_bytes`: the command cap refuses them.
    let many = "{}\n".repeat(10_000);
    let frames: Vec<(&str, Message)> = vec![
        ("not JSON", Message::text("{\"id\":1,\"connect\":")),
        ("a JSON array", Message::text("[1,2]")),
        ("a binary frame", Message::binary(b"{\"id\":1,\"connect\":{}}".to_vec())),
        ("a command without an id", Message::text("{\"subscribe\":{\"channel\":\"room:a\"}}")),
        ("10,000 commands in one frame", Message::text(many)),
    ];
    for (n, (name, frame)) in frames.into_iter().enumerate() {
        let mut bad = Cf::open(&node).await?;
        if name != "10,000 commands in one frame" {
            bad.call("connect", json!({})).await?;
        }
        let started = Instant::now();
        bad.ws.send(frame).await?;
        let (code, reason) = bad.closed().await.with_context(|| name.to_string())?;
        assert_eq!(code, 3501, "{name}: {reason}");
        assert!(!reason.is_empty(), "{name}: a terminal close carries a reason (else clients reconnect forever)");
        assert!(started.elapsed() < Duration::from_secs(5), "{name}: took {:?}", started.elapsed());
        // Everyone else is served meanwhile.
        let (offset, _) = publisher.publish("room:calm", json!({ "n": n })).await?;
        let publication = watcher.next_push("pub").await?;
        assert_eq!(
            (publication["offset"].as_u64(), &publication["data"]),
            (Some(offset), &json!({ "n": n })),
            "{name}"
        );
    }
    Ok(())
}

/// Commands the server understands but refuses get Centrifugo's error codes, and the
/// connection carries on.
#[tokio::test]
async fn refused_commands_get_centrifugo_codes_and_the_connection_carries_on() -> Result<()> {
    let node = Node::start(OPEN);
    let (mut cf, connected) = Cf::connect(&node, None).await?;
    assert!(connected["client"].as_str().is_some_and(|c| !c.is_empty()), "{connected}");
    assert!(connected["version"].as_str().is_some_and(|v| v.starts_with("switchyard")), "{connected}");
    assert_eq!(connected.get("expires"), None, "no token, no expiry: {connected}");

    let id = cf.send("frobnicate", json!({})).await?;
    assert_eq!(code(&cf.reply(id).await?), 104, "unknown method");
    let first = cf.call("subscribe", json!({"channel": "room:twice"})).await?;
    assert_eq!(first["subscribe"]["recoverable"], json!(true), "{first}");
    let epoch = first["subscribe"]["epoch"].as_str().context("epoch")?.to_string();
    assert_eq!(code(&cf.call("subscribe", json!({"channel": "room:twice"})).await?), 105, "already subscribed");
    assert_eq!(code(&cf.call("subscribe", json!({"channel": "no spaces"})).await?), 107, "bad channel name");
    assert_eq!(code(&cf.call("publish", json!({"channel": "room:twice"})).await?), 107, "publish without data");
    let wrong = json!({"channel": "room:twice", "limit": 10, "since": {"offset": 0, "epoch": "not-the-epoch"}});
    assert_eq!(code(&cf.call("history", wrong).await?), 112, "history since another epoch");
    let right = json!({"channel": "room:twice", "limit": 10, "since": {"offset": 0, "epoch": epoch}});
    let page = cf.call("history", right).await?;
    assert_eq!(page["history"]["epoch"], json!(epoch), "{page}");
    assert_eq!(code(&cf.call("rpc", json!({"method": "launch"})).await?), 108, "unknown rpc method");
    assert_eq!(code(&cf.call("sub_refresh", json!({"channel": "room:twice", "token": "t"})).await?), 108);
    assert_eq!(code(&cf.call("rpc", json!({"method": "commit", "data": {"channel": "room:twice"}})).await?), 107);
    // Still connected and served.
    let reply = cf.call("ping", json!({})).await?;
    assert_eq!(reply["ping"], json!({}), "{reply}");
    cf.call("publish", json!({"channel": "room:twice", "data": {"still": "here"}})).await?;
    assert_eq!(cf.next_push("pub").await?["data"], json!({"still": "here"}));
    // `send` has no reply to carry an error: Centrifugo closes with 3508, terminal.
    cf.send_text(r#"{"send":{"data":{}}}"#).await?;
    assert_eq!(cf.closed().await?.0, 3508);
    Ok(())
}

/// Tokens: a valid one gives `expires` and `ttl` (the client refreshes before it runs out);
/// an expired one is 109 (fetch a new token, reconnect); a forged one is 101 and close 3500
/// (stop); a command before `connect` is 101.
#[tokio::test]
async fn tokens_get_the_codes_that_make_clients_refresh_or_stop() -> Result<()> {
    let node = Node::start(&jwt_config("", OPEN));
    let (mut cf, connected) = Cf::connect(&node, Some(&token("alice", 120, None))).await?;
    assert_eq!(connected["expires"], json!(true), "{connected}");
    let ttl = connected["ttl"].as_u64().context("ttl")?;
    assert!((100..=120).contains(&ttl), "ttl {ttl}");
    let refreshed = cf.call("refresh", json!({"token": token("alice", 300, None)})).await?;
    assert!(refreshed["refresh"]["ttl"].as_u64().is_some_and(|t| t > 250), "{refreshed}");
    assert_eq!(refreshed["refresh"]["client"], connected["client"], "{refreshed}");
    assert_eq!(code(&cf.call("refresh", json!({"token": token("bob", 300, None)})).await?), 103, "another user");

    let mut early = Cf::open(&node).await?;
    assert_eq!(code(&early.call("subscribe", json!({"channel": "room:1"})).await?), 101, "subscribe before connect");

    let mut expired = Cf::open(&node).await?;
    let reply = expired.call("connect", json!({"token": token("alice", -60, None)})).await?;
    assert_eq!(code(&reply), 109, "{reply}");
    let (close, _) = expired.closed().await?;
    assert!((3000..3500).contains(&close), "an expired token is a reconnect code, got {close}");

    let mut forged = Cf::open(&node).await?;
    let reply =
        forged.call("connect", json!({"token": token_signed("not-the-secret-0123456789", "alice", 60, None)})).await?;
    assert_eq!(code(&reply), 101, "{reply}");
    assert_eq!(reply["error"]["temporary"], Value::Null, "not temporary: the client stops");
    let (close, reason) = forged.closed().await?;
    assert_eq!(close, 3500, "{reason}");
    assert!(!reason.is_empty());
    Ok(())
}

/// Both protocols are views of the same channels: a message published through one arrives
/// through the other with the same offset, and both report the same epoch.
#[tokio::test]
async fn native_and_centrifugo_clients_share_channels_offsets_and_epochs() -> Result<()> {
    let node = Node::start(OPEN);
    let (mut cf, _) = Cf::connect(&node, None).await?;
    let mut native = Client::connect(&node).await;
    native.ok("connect", json!({})).await?;
    let granted = native.subscribe("room:mixed", json!({})).await?;
    let reply = cf.call("subscribe", json!({"channel": "room:mixed"})).await?;
    assert_eq!(reply["subscribe"]["epoch"], granted["epoch"], "{reply} {granted}");

    let (offset, epoch) = native.publish("room:mixed", json!({"from": "native"})).await?;
    let publication = cf.next_push("pub").await?;
    assert_eq!((publication["offset"].as_u64(), &publication["data"]), (Some(offset), &json!({"from": "native"})));
    assert_eq!(reply["subscribe"]["epoch"], json!(epoch));

    cf.call("publish", json!({"channel": "room:mixed", "data": {"from": "centrifugo"}})).await?;
    let pushed = native.next_messages("room:mixed", 2).await?;
    assert_eq!(offsets(&pushed), vec![offset, offset + 1]);
    assert_eq!(pushed[1]["data"], json!({"from": "centrifugo"}));

    // History in both directions, and the position alone.
    let listed = |reply: &Value| -> Vec<u64> {
        let list = reply["history"]["publications"].as_array().cloned().unwrap_or_default();
        list.iter().filter_map(|p| p["offset"].as_u64()).collect()
    };
    let newest = cf.call("history", json!({"channel": "room:mixed", "limit": 10, "reverse": true})).await?;
    assert_eq!(listed(&newest), vec![offset + 1, offset], "{newest}");
    let forward = cf.call("history", json!({"channel": "room:mixed", "limit": 10, "reverse": false})).await?;
    assert_eq!(listed(&forward), vec![offset, offset + 1], "{forward}");
    let since = json!({"offset": offset + 1, "epoch": epoch});
    let older =
        cf.call("history", json!({"channel": "room:mixed", "limit": 10, "reverse": true, "since": since})).await?;
    assert_eq!(listed(&older), vec![offset], "reverse from a position: older ones only");
    let position = cf.call("history", json!({"channel": "room:mixed", "limit": 0})).await?;
    assert_eq!(listed(&position), Vec::<u64>::new(), "{position}");
    assert_eq!(
        (position["history"]["offset"].as_u64(), &position["history"]["epoch"]),
        (Some(offset + 1), &json!(epoch))
    );
    Ok(())
}

/// Recovery of more than one reply can carry: the subscribe reply holds the first page
/// (within `limits.max_reply_bytes`), the rest follows as publications, each exactly once,
/// in order, with no gap into live delivery.
#[tokio::test]
async fn recovery_past_one_reply_continues_as_publications_in_order() -> Result<()> {
    let node = Node::start(&format!("[limits]\nmax_reply_bytes = 65536\n{OPEN}"));
    let mut native = Client::connect(&node).await;
    native.ok("connect", json!({})).await?;
    let (first, epoch) = native.publish("room:long", json!({"n": 0})).await?;
    let filler = "x".repeat(900);
    let total = 600u64;
    native.publish_many("room:long", (1..total).map(|n| json!({"n": n, "pad": filler}))).await?;

    let (mut cf, _) = Cf::connect(&node, None).await?;
    let req = json!({"channel": "room:long", "recover": true, "offset": first, "epoch": epoch, "flag": 1});
    let id = cf.send("subscribe", req).await?;
    // A live message right behind the recovery must come after all of it.
    native.publish("room:long", json!({"n": total})).await?;
    let reply = cf.reply(id).await?;
    let result = &reply["subscribe"];
    assert_eq!((result["recovered"].as_bool(), result["was_recovering"].as_bool()), (Some(true), Some(true)));
    let in_reply: Vec<u64> = result["publications"]
        .as_array()
        .context("publications")?
        .iter()
        .filter_map(|p| p["offset"].as_u64())
        .collect();
    assert!(!in_reply.is_empty() && (in_reply.len() as u64) < total - 1, "{} in the reply", in_reply.len());
    let reply_bytes = reply.to_string().len();
    assert!(reply_bytes <= 65536 + 4096, "the reply is {reply_bytes} bytes");
    let mut seen = in_reply;
    while seen.len() < total as usize {
        seen.push(cf.next_push("pub").await?["offset"].as_u64().context("offset")?);
    }
    let want: Vec<u64> = (first + 1..=first + total).collect();
    assert_eq!(seen, want, "every message once, in order");
    Ok(())
}

/// The server pings a connected client with `{}` on the session schedule, and a client
/// that answers `{}` stays; one that does not is closed.
#[tokio::test]
async fn the_server_pings_with_empty_commands_and_expects_them_back() -> Result<()> {
    let node = Node::start(&format!("[sessions]\nping_interval = \"300ms\"\nping_timeout = \"600ms\"\n{OPEN}"));
    let (mut cf, connected) = Cf::connect(&node, None).await?;
    assert_eq!((connected["ping"].as_u64(), connected["pong"].as_bool()), (Some(1), Some(true)), "{connected}");
    for _ in 0..4 {
        let deadline = Instant::now() + Duration::from_secs(5);
        let ping = cf.next_line(deadline).await?;
        assert_eq!(ping, json!({}), "a ping is an empty command");
        cf.send_text("{}").await?;
    }
    cf.call("ping", json!({})).await?;
    // Stop answering: the server gives up within the timeout.
    let (mut silent, _) = Cf::connect(&node, None).await?;
    let started = Instant::now();
    let end = loop {
        if let Err(end) = silent.frame(Instant::now() + Duration::from_secs(10)).await? {
            break end;
        }
    };
    assert_eq!(end, End::Closed(3012, "no pong".into()), "a reconnect code, with its reason");
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
    Ok(())
}

/// Presence through Centrifugo's methods: a map by client id (the token's `info` as
/// `conn_info`), stats, join and leave pushes between a Centrifugo and a native client, the
/// list bound answered 106 while the stats still answer, and 108 where a namespace has no
/// presence.
#[tokio::test]
async fn presence_is_shared_with_native_clients_and_bounded() -> Result<()> {
    let config = "[namespaces.room]\nrule = \"public\"\npresence = true\njoin_leave = true\npresence_max_list = 3\n\
                  [namespaces.quiet]\nrule = \"public\"\n";
    let node = Node::start(&jwt_config("", config));
    let alice = switchyard_tests::auth::sign(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(switchyard_tests::auth::SECRET.as_bytes()),
        &json!({"sub": "alice", "exp": switchyard_tests::auth::now_secs() + 60, "info": {"name": "Alice"}}),
    );
    let (mut cf, connected) = Cf::connect(&node, Some(&alice)).await?;
    let me = connected["client"].as_str().context("client")?.to_string();
    cf.call("subscribe", json!({"channel": "room:p"})).await?;
    let joined = cf.next_push("join").await?;
    assert_eq!(joined["info"]["client"], json!(me), "a subscriber sees its own join: {joined}");

    let mut bob = switchyard_tests::auth::connect_as(&node, "bob").await?;
    bob.subscribe("room:p", json!({})).await?;
    let joined = cf.next_push("join").await?;
    assert_eq!(joined["info"]["user"], json!("bob"), "{joined}");
    let bob_id = joined["info"]["client"].clone();

    let listed = cf.call("presence", json!({"channel": "room:p"})).await?;
    let map = listed["presence"]["presence"].as_object().context("a map")?;
    assert_eq!(map.len(), 2, "{listed}");
    assert_eq!(map[&me]["conn_info"], json!({"name": "Alice"}), "{listed}");
    assert_eq!(map[&me]["user"], json!("alice"));
    let stats = cf.call("presence_stats", json!({"channel": "room:p"})).await?;
    assert_eq!(stats["presence_stats"], json!({"num_clients": 2, "num_users": 2}), "{stats}");
    let native = bob.ok("presence", json!({"channel": "room:p"})).await?;
    assert_eq!(native["clients"].as_array().map(Vec::len), Some(2), "{native}");

    bob.ok("unsubscribe", json!({"channel": "room:p"})).await?;
    let left = cf.next_push("leave").await?;
    assert_eq!(left["info"]["client"], bob_id, "{left}");

    // Past `presence_max_list`: 106, and the stats still answer.
    let mut others = Vec::new();
    for user in ["carol", "dave", "erin"] {
        let mut c = switchyard_tests::auth::connect_as(&node, user).await?;
        c.subscribe("room:p", json!({})).await?;
        others.push(c);
    }
    wait_until("four clients in presence", DEADLINE, async || {
        let stats = cf.call("presence_stats", json!({"channel": "room:p"})).await?;
        Ok(stats["presence_stats"]["num_clients"] == json!(4))
    })
    .await?;
    assert_eq!(code(&cf.call("presence", json!({"channel": "room:p"})).await?), 106);
    assert_eq!(code(&cf.call("presence", json!({"channel": "quiet:1"})).await?), 108);
    assert_eq!(code(&cf.call("presence_stats", json!({"channel": "quiet:1"})).await?), 108);
    Ok(())
}

/// Switchyard's extras through Centrifugo's own fields: a durable consumer named in
/// `subscribe`'s `data`, `commit` as an `rpc` method, and a message key in `tags`.
#[tokio::test]
async fn a_durable_consumer_and_keys_ride_on_subscribe_data_rpc_and_tags() -> Result<()> {
    let node = Node::start(OPEN);
    let mut native = Client::connect(&node).await;
    native.ok("connect", json!({})).await?;
    for n in 1..=3 {
        native.ok("publish", json!({"channel": "room:durable", "data": {"n": n}, "key": format!("k{n}")})).await?;
    }
    let (mut cf, _) = Cf::connect(&node, None).await?;
    let consumer = json!({"channel": "room:durable", "data": {"consumer": "phone"}});
    let reply = cf.call("subscribe", consumer.clone()).await?;
    let mut got: Vec<u64> = reply["subscribe"]["publications"]
        .as_array()
        .map(|l| l.iter().filter_map(|p| p["offset"].as_u64()).collect())
        .unwrap_or_default();
    while got.len() < 3 {
        let publication = cf.next_push("pub").await?;
        got.push(publication["offset"].as_u64().context("offset")?);
        assert!(publication["tags"]["key"].as_str().is_some_and(|k| k.starts_with('k')), "{publication}");
    }
    assert_eq!(got, vec![1, 2, 3], "a new consumer starts at the beginning");
    let committed = cf
        .call("rpc", json!({"method": "commit", "data": {"channel": "room:durable", "consumer": "phone", "offset": 2}}))
        .await?;
    assert!(committed.get("rpc").is_some(), "{committed}");
    cf.call("unsubscribe", json!({"channel": "room:durable"})).await?;
    let again = cf.call("subscribe", consumer).await?;
    let mut after: Vec<u64> = again["subscribe"]["publications"]
        .as_array()
        .map(|l| l.iter().filter_map(|p| p["offset"].as_u64()).collect())
        .unwrap_or_default();
    if after.is_empty() {
        after.push(cf.next_push("pub").await?["offset"].as_u64().context("offset")?);
    }
    assert_eq!(after, vec![3], "the consumer resumes after its committed offset");
    Ok(())
}

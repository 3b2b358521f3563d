//! One session over an in-memory socket (`tokio::io::duplex`) against a real node: a
//! real store and owners, no TCP.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use switchyard_proto::protocol;
use tokio::io::DuplexStream;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::*;
use crate::config::Config;
use switchyard_core::outbox::Kind;

type Client = WebSocketStream<DuplexStream>;

fn node(dir: &std::path::Path, edit: impl FnOnce(&mut Config)) -> Arc<Node> {
    let mut config = Config { data_dir: dir.join("data"), plugins_dir: dir.join("plugins"), ..Config::default() };
    edit(&mut config);
    config.validate().unwrap();
    Node::start(config, None).unwrap()
}

async fn connect(node: &Arc<Node>) -> Client {
    let (client, server) = tokio::io::duplex(1 << 16);
    let node = node.clone();
    tokio::spawn(async move {
        let ws = WebSocketStream::from_raw_socket(Socket::new(server), Role::Server, None).await;
        run(node, ws, Dialect::Native).await;
    });
    WebSocketStream::from_raw_socket(client, Role::Client, None).await
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next JSON frame (pings are answered by tungstenite as they are read).
async fn next<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Value {
    loop {
        match ws.next().await.expect("open").expect("frame") {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// An owner can end a subscription (its partition moved) before the session has
/// written the subscribe reply: the `unsubscribed` push then waits behind the reply.
#[tokio::test]
async fn an_end_before_the_subscribe_reply_comes_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |_| {});
    let (client, server) = tokio::io::duplex(1 << 16);
    let server = WebSocketStream::from_raw_socket(Socket::new(server), Role::Server, None).await;
    let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    let mut session = Session::new(node.clone(), server, 1, Dialect::Native);
    session.subs.insert(7, Sub { channel: "room:1".into(), phase: Phase::Pending(Vec::new()) });
    session.by_channel.insert("room:1".into(), 7);
    let end = protocol::unsubscribed_push("room:1", protocol::close::SHUTTING_DOWN, "partition moved");
    session.deliver(Delivery { sub: 7, offset: 0, frame: end, kind: Kind::End }).await.unwrap();
    assert!(session.subs.contains_key(&7), "the subscription lives until its reply is out");
    let grant = Grant { epoch: "E".into(), offset: 0, top: 0, recovered: None, catch_up_after: None, live_after: 0 };
    let reply = Output::Subscribed {
        to: To::native(3),
        sub: 7,
        channel: "room:1".into(),
        result: Ok(grant),
        reject_unrecovered: false,
        ahead: super::deliver::Ahead::None,
    };
    session.on_output(reply).await.unwrap();
    session.flush().await.unwrap();
    assert!(session.subs.is_empty() && session.held_bytes == 0);
    let first = next(&mut client).await;
    assert_eq!((first["id"].as_u64(), first["ok"]["channel"].as_str()), (Some(3), Some("room:1")), "{first}");
    let second = next(&mut client).await;
    assert_eq!(second["push"], "unsubscribed", "{second}");
}

#[tokio::test]
async fn connect_subscribe_publish_and_the_push_arrive_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |_| {});
    let mut ws = connect(&node).await;
    send(&mut ws, json!({"id": 1, "op": "connect"})).await;
    assert_eq!(next(&mut ws).await["id"], 1);
    send(&mut ws, json!({"id": 2, "op": "subscribe", "channel": "room:1"})).await;
    let sub = next(&mut ws).await;
    assert_eq!((sub["id"].as_u64(), sub["ok"]["offset"].as_u64()), (Some(2), Some(0)), "{sub}");
    send(&mut ws, json!({"id": 3, "op": "publish", "channel": "room:1", "data": {"t": "hi"}})).await;
    // The ack and the push may come in either order; both must come.
    let (a, b) = (next(&mut ws).await, next(&mut ws).await);
    let (ack, push) = if a.get("push").is_some() { (b, a) } else { (a, b) };
    assert_eq!((ack["id"].as_u64(), ack["ok"]["offset"].as_u64()), (Some(3), Some(1)), "{ack}");
    assert_eq!((push["push"].as_str(), push["offset"].as_u64()), (Some("message"), Some(1)), "{push}");
    assert_eq!(push["data"], json!({"t": "hi"}));
    assert_eq!(push["epoch"], ack["ok"]["epoch"]);
}

/// Over real TCP an idle subscriber's session lends its socket's write side to the
/// owner, which writes the pushes itself; commands from the subscriber take the socket
/// back in between, and every message still arrives once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lent_tcp_socket_delivers_every_push_once_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |_| {});
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_node = node.clone();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (io, sink) = crate::socket::SharedTcp::new(stream, Bytes::new());
        let ws = WebSocketStream::from_raw_socket(Socket::with_sink(io, sink), Role::Server, None).await;
        run(server_node, ws, Dialect::Native).await;
    });
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut sub = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    send(&mut sub, json!({"id": 1, "op": "subscribe", "channel": "room:1"})).await;
    assert_eq!(next(&mut sub).await["id"], 1);
    let mut publisher = connect(&node).await;
    const N: u64 = 300;
    let read_all = async {
        let (mut offsets, mut replies) = (Vec::new(), 0);
        for i in 1..=N {
            send(&mut publisher, json!({"id": i, "op": "publish", "channel": "room:1", "data": i})).await;
            assert_eq!(next(&mut publisher).await["id"], i, "acknowledged");
            if i % 25 == 0 {
                // A command: the session takes its socket back to answer it.
                send(&mut sub, json!({"id": 1000 + i, "op": "ping"})).await;
            }
        }
        while offsets.len() < N as usize {
            let v = next(&mut sub).await;
            match v["push"].as_str() {
                Some("message") => offsets.push(v["offset"].as_u64().unwrap()),
                _ => replies += 1,
            }
        }
        (offsets, replies)
    };
    let (offsets, replies) = tokio::time::timeout(Duration::from_secs(30), read_all).await.expect("in time");
    assert_eq!(offsets, (1..=N).collect::<Vec<_>>(), "every push once, in order");
    let direct = node.metrics.messages_delivered_direct.get();
    assert!(direct > 0 && direct <= N, "the owner wrote pushes itself: {direct}");
    assert!(replies <= N / 25, "{replies} replies");
}

#[tokio::test]
async fn a_malformed_frame_gets_an_error_and_the_connection_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |_| {});
    let mut ws = connect(&node).await;
    ws.send(Message::text("{not json")).await.unwrap();
    let err = next(&mut ws).await;
    assert_eq!(err["error"]["code"], "bad_request", "{err}");
    send(&mut ws, json!({"id": 7, "op": "explode", "channel": "room:1"})).await;
    let err = next(&mut ws).await;
    assert_eq!((err["id"].as_u64(), err["error"]["code"].as_str()), (Some(7), Some("unknown_op")), "{err}");
    send(&mut ws, json!({"id": 8, "op": "ping"})).await;
    assert_eq!(next(&mut ws).await["id"], 8);
}

/// A client that stops answering pings is closed once `ping_timeout` passes; with time
/// paused the test takes no wall-clock time.
#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_after_the_ping_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |c| {
        c.sessions.ping_interval = Duration::from_secs(1);
        c.sessions.ping_timeout = Duration::from_secs(3);
    });
    let mut ws = connect(&node).await;
    send(&mut ws, json!({"id": 1, "op": "connect"})).await;
    // Not reading means not answering pings (tungstenite answers them on read).
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Reading now answers the ping too late: the server has closed (a close frame, or
    // the pong meets a socket the server already dropped).
    let mut pings = 0;
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_))) => pings += 1,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was still open a minute later");
    assert!(pings >= 1, "the server pinged before giving up");
    assert_eq!(node.metrics.connections.get(), 0);
}

/// Pipelined history reads whose replies are not read stop the server from reading
/// further commands once the replies waiting reach the byte budget: the publish sent
/// after them is only read (and seen by a subscriber) once the client reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_replies_pause_reading_at_the_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |c| {
        c.limits.outbound_queue_bytes = 256 * 1024;
        c.limits.max_reply_bytes = 64 * 1024;
    });
    let mut a = connect(&node).await;
    send(&mut a, json!({"id": 1, "op": "connect"})).await;
    assert_eq!(next(&mut a).await["id"], 1);
    let blob = "x".repeat(4000);
    for i in 0..40 {
        send(&mut a, json!({"id": 100 + i, "op": "publish", "channel": "big", "data": blob})).await;
    }
    for _ in 0..40 {
        assert!(next(&mut a).await.get("ok").is_some());
    }
    let mut b = connect(&node).await;
    send(&mut b, json!({"id": 1, "op": "subscribe", "channel": "probe"})).await;
    assert!(next(&mut b).await.get("ok").is_some());

    const READS: u64 = 40;
    for i in 0..READS {
        send(&mut a, json!({"id": 1000 + i, "op": "history", "channel": "big", "since": 0, "limit": 1000})).await;
    }
    send(&mut a, json!({"id": 2000, "op": "publish", "channel": "probe", "data": 1})).await;
    // Nothing to wait for but time: the probe must not be read while `a` reads nothing.
    let early = tokio::time::timeout(Duration::from_millis(500), next(&mut b)).await;
    assert!(early.is_err(), "the server read past its reply budget: {early:?}");

    // Reading again: every reply arrives, in order and capped, then the probe goes out.
    for i in 0..READS {
        let r = next(&mut a).await;
        assert_eq!(r["id"].as_u64(), Some(1000 + i), "{r}");
        let n = r["ok"]["messages"].as_array().unwrap().len();
        assert!((1..40).contains(&n), "a page is capped at max_reply_bytes: {n}");
    }
    let push = tokio::time::timeout(Duration::from_secs(10), next(&mut b)).await.expect("the probe arrives");
    assert_eq!(push["data"], 1, "{push}");
}

/// The raw text of the next text frame.
async fn next_text(ws: &mut Client) -> String {
    loop {
        match ws.next().await.expect("open").expect("frame") {
            Message::Text(t) => return t.to_string(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// With `batch: true`, catch-up and live pushes come packed as JSON lines, every one of
/// them in order, no frame over `max_frame_bytes`; without it, one push per frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_client_gets_pushes_packed_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |c| c.limits.max_frame_bytes = 4096);
    let mut p = connect(&node).await;
    for i in 0..100u64 {
        send(&mut p, json!({"id": i, "op": "publish", "channel": "room:b", "data": {"n": i, "pad": "y".repeat(100)}}))
            .await;
    }
    for _ in 0..100 {
        assert!(next(&mut p).await.get("ok").is_some());
    }
    for batch in [true, false] {
        let mut ws = connect(&node).await;
        send(&mut ws, json!({"id": 1, "op": "connect", "batch": batch})).await;
        let ok = next(&mut ws).await;
        assert_eq!(ok["ok"]["batch"].as_bool(), batch.then_some(true), "{ok}");
        send(&mut ws, json!({"id": 2, "op": "subscribe", "channel": "room:b", "from": "earliest"})).await;
        assert!(next(&mut ws).await.get("ok").is_some());
        let (mut offsets, mut frames) = (Vec::new(), 0);
        while offsets.len() < 100 {
            let frame = next_text(&mut ws).await;
            assert!(frame.len() <= 4096, "a frame over max_frame_bytes: {}", frame.len());
            frames += 1;
            for line in frame.split('\n') {
                let v: Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["push"], "message", "{v}");
                offsets.push(v["offset"].as_u64().unwrap());
            }
        }
        assert_eq!(offsets, (1..=100).collect::<Vec<_>>(), "every push once, in order");
        if batch {
            assert!(frames < 100 / 10, "packed: {frames} frames for 100 pushes");
        } else {
            assert_eq!(frames, 100, "one push per frame unless asked");
        }
    }
}

/// A client's close frame is answered with one: the close handshake completes.
#[tokio::test]
async fn a_client_close_is_answered_with_a_close_frame() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |_| {});
    let mut ws = connect(&node).await;
    send(&mut ws, json!({"id": 1, "op": "ping"})).await;
    assert_eq!(next(&mut ws).await["id"], 1);
    ws.close(None).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("an answer in time");
    assert!(matches!(answer, Some(Ok(Message::Close(_)))), "{answer:?}");
}

/// A client connected in `dialect`.
async fn connect_as(node: &Arc<Node>, dialect: Dialect) -> Client {
    let (client, server) = tokio::io::duplex(1 << 16);
    let node = node.clone();
    tokio::spawn(async move {
        let ws = WebSocketStream::from_raw_socket(Socket::new(server), Role::Server, None).await;
        run(node, ws, dialect).await;
    });
    WebSocketStream::from_raw_socket(client, Role::Client, None).await
}

/// Publishes two messages to `channel` and returns their epoch.
async fn two_messages(node: &Arc<Node>, channel: &str) -> String {
    let mut ws = connect(node).await;
    let mut epoch = String::new();
    for id in 1..=2 {
        send(&mut ws, json!({"id": id, "op": "publish", "channel": channel, "data": {"n": id}})).await;
        let ack = next(&mut ws).await;
        epoch = ack["ok"]["epoch"].as_str().unwrap_or_else(|| panic!("{ack}")).to_string();
    }
    epoch
}

/// A recovery that needs a store read, past the node's catch-up bound, is refused at once
/// with `unavailable` and a retry hint, and nothing of the subscription is pushed; the
/// connection stays usable and the same channel can be subscribed again.
#[tokio::test]
async fn a_recovery_over_the_catch_up_bound_is_refused_with_a_retry_hint() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |c| c.limits.recovery_concurrency = 0);
    let epoch = two_messages(&node, "room:1").await;
    let mut ws = connect(&node).await;
    send(&mut ws, json!({"id": 1, "op": "subscribe", "channel": "room:1", "from": {"offset": 1, "epoch": epoch}}))
        .await;
    let refused = next(&mut ws).await;
    assert_eq!(refused["id"], 1, "{refused}");
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");
    assert_eq!(refused["error"]["retry_after_ms"], crate::recovery::RETRY_AFTER.as_millis() as u64, "{refused}");
    assert_eq!(node.metrics.recovery_refusals.get(), 1);
    // Not subscribed: a recovery at the top needs no read and is granted, with no message
    // of the refused attempt before or after it.
    send(&mut ws, json!({"id": 2, "op": "subscribe", "channel": "room:1", "from": {"offset": 2, "epoch": epoch}}))
        .await;
    let ok = next(&mut ws).await;
    assert_eq!((ok["id"].as_u64(), ok["ok"]["recovered"].as_bool()), (Some(2), Some(true)), "{ok}");
    send(&mut ws, json!({"id": 3, "op": "ping"})).await;
    let pong = next(&mut ws).await;
    assert_eq!(pong["id"], 3, "nothing pushed for the refused subscribe: {pong}");
}

/// Centrifugo's clients get the refusal as a temporary error (code 100), which their SDKs
/// retry with backoff.
#[tokio::test]
async fn a_centrifugo_recovery_over_the_bound_is_a_temporary_error() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |c| c.limits.recovery_concurrency = 0);
    let epoch = two_messages(&node, "room:1").await;
    let mut ws = connect_as(&node, Dialect::Centrifugo).await;
    ws.send(Message::text(r#"{"id":1,"connect":{}}"#)).await.unwrap();
    assert_eq!(next(&mut ws).await["id"], 1);
    let sub = json!({"id": 2, "subscribe": {"channel": "room:1", "recover": true, "offset": 1, "epoch": epoch}});
    send(&mut ws, sub).await;
    let refused = next(&mut ws).await;
    assert_eq!(refused["id"], 2, "{refused}");
    assert_eq!(refused["error"]["code"], 100, "{refused}");
    assert_eq!(refused["error"]["temporary"], true, "{refused}");
}

/// With room under the bound the same recovery is granted and catches up exactly, and
/// the permit is given back once the subscription is live.
#[tokio::test]
async fn a_recovery_under_the_bound_catches_up_and_frees_its_permit() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |c| c.limits.recovery_concurrency = 1);
    let epoch = two_messages(&node, "room:1").await;
    for round in 0..2 {
        let mut ws = connect(&node).await;
        let from = json!({"offset": 0, "epoch": epoch});
        send(&mut ws, json!({"id": 1, "op": "subscribe", "channel": "room:1", "from": from})).await;
        let ok = next(&mut ws).await;
        assert_eq!(ok["ok"]["recovered"], true, "round {round}: {ok}");
        for offset in 1..=2 {
            let m = next(&mut ws).await;
            assert_eq!((m["push"].as_str(), m["offset"].as_u64()), (Some("message"), Some(offset)), "{m}");
        }
    }
    assert!(node.recoveries.admit().is_ok(), "the permit came back");
    assert_eq!(node.metrics.recovery_refusals.get(), 0);
}

/// Several recovering subscribes sent at once on one connection: each reply comes before
/// its own messages, every message comes once and in order, with the catch-ups read ahead
/// concurrently.
#[tokio::test]
async fn pipelined_recoveries_keep_each_subscriptions_order() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |_| {});
    let mut epochs = Vec::new();
    for c in 0..8 {
        epochs.push(two_messages(&node, &format!("room:{c}")).await);
    }
    let mut ws = connect(&node).await;
    for (c, epoch) in epochs.iter().enumerate() {
        let from = json!({"offset": 0, "epoch": epoch});
        send(&mut ws, json!({"id": c + 1, "op": "subscribe", "channel": format!("room:{c}"), "from": from})).await;
    }
    let mut replied = std::collections::HashSet::new();
    let mut last = std::collections::HashMap::new();
    while last.values().filter(|o| **o == 2).count() < 8 {
        let v = next(&mut ws).await;
        if let Some(id) = v["id"].as_u64() {
            assert_eq!(v["ok"]["recovered"], true, "{v}");
            replied.insert(format!("room:{}", id - 1));
            continue;
        }
        let channel = v["channel"].as_str().unwrap().to_string();
        assert!(replied.contains(&channel), "a message before its reply: {v}");
        let offset = v["offset"].as_u64().unwrap();
        let prev = last.insert(channel, offset).unwrap_or(0);
        assert_eq!(offset, prev + 1, "{v}");
    }
}

/// A session whose gateway subscription (here: sub 7 on room:1, live at offset 1) is
/// handed over by a [`Kind::Moved`] to the owner on its own node.
async fn moved_session(
    epoch_of_sub: Option<&str>,
) -> (tempfile::TempDir, Arc<Node>, Session<DuplexStream>, Client, String) {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |_| {});
    let epoch = two_messages(&node, "room:1").await;
    let (client, server) = tokio::io::duplex(1 << 16);
    let server = WebSocketStream::from_raw_socket(Socket::new(server), Role::Server, None).await;
    let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    let mut session = Session::new(node.clone(), server, 1, Dialect::Native);
    session.subs.insert(7, Sub { channel: "room:1".into(), phase: Phase::Live { delivered: 1 } });
    session.by_channel.insert("room:1".into(), 7);
    let frame = Text::from(epoch_of_sub.unwrap_or(&epoch));
    session.deliver(Delivery { sub: 7, offset: 1, frame, kind: Kind::Moved }).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(5), session.pending.next()).await.unwrap().unwrap();
    session.on_output(out).await.unwrap();
    session.flush().await.unwrap();
    (dir, node, session, client, epoch)
}

/// The channel moved onto the session's node under the same epoch: the session recovers
/// at the owner here from the last offset it wrote. The client sees the next message and
/// then live ones, no reply, no `unsubscribed`, no duplicate.
#[tokio::test]
async fn a_subscription_moved_onto_its_own_node_continues_without_a_gap() {
    let (_dir, node, mut session, mut client, epoch) = moved_session(None).await;
    let m = next(&mut client).await;
    assert_eq!((m["push"].as_str(), m["offset"].as_u64()), (Some("message"), Some(2)), "{m}");
    assert!(matches!(session.subs.get(&7).map(|s| &s.phase), Some(Phase::Live { delivered: 2 })));
    // A live message from the owner here reaches the session's outbox and is written.
    let mut publisher = connect(&node).await;
    send(&mut publisher, json!({"id": 1, "op": "publish", "channel": "room:1", "data": {"n": 3}})).await;
    assert_eq!(next(&mut publisher).await["ok"]["epoch"], epoch);
    let batch = tokio::time::timeout(Duration::from_secs(5), session.inbox.recv_all()).await.unwrap();
    session.on_deliveries(batch).await.unwrap();
    session.flush().await.unwrap();
    let m = next(&mut client).await;
    assert_eq!((m["push"].as_str(), m["offset"].as_u64()), (Some("message"), Some(3)), "{m}");
}

/// Under another epoch (the channel restarted) the subscription ends the usual way.
#[tokio::test]
async fn a_subscription_moved_under_another_epoch_ends_with_unsubscribed() {
    let (_dir, _node, session, mut client, _epoch) = moved_session(Some("Other1")).await;
    let m = next(&mut client).await;
    assert_eq!(m["push"], "unsubscribed", "{m}");
    assert!(session.subs.is_empty());
}

//! Bad input: malformed frames and commands, invalid channel names, oversized frames and
//! invalid config files.
//!
//! It owns docs/protocol.md's "How the server handles bad input": each bad frame gets the
//! specified error code, the reply's `id` is the command's id or null when the frame has no
//! usable id, and the connection then keeps working (except after an oversized frame,
//! which is closed with 1009). It also owns docs/configuration.md's rule that an unknown config key
//! makes the router exit with status 2 naming the key.

use serde_json::{json, Value};
use switchyard_tests::*;
use tokio_tungstenite::tungstenite::Message;

/// One bad frame and the reply it must get.
struct Case {
    name: &'static str,
    frame: Message,
    code: &'static str,
    /// The reply's `id`: the command's id, or null.
    id: Value,
}

fn case(name: &'static str, frame: Value, code: &'static str) -> Case {
    let id = frame.get("id").filter(|id| id.is_u64()).cloned().unwrap_or(Value::Null);
    Case { name, frame: Message::text(frame.to_string()), code, id }
}

fn raw(name: &'static str, frame: Message) -> Case {
    Case { name, frame, code: "bad_request", id: Value::Null }
}

fn cases() -> Vec<Case> {
    let long = "a".repeat(256);
    let sub = |id: u64, channel: Value| json!({ "id": id, "op": "subscribe", "channel": channel });
    vec![
        raw("not JSON", Message::text("{\"id\": 1, \"op\": ")),
        raw("empty text", Message::text("")),
        raw("JSON array", Message::text("[1, 2]")),
        raw("JSON string", Message::text("\"ping\"")),
        raw("JSON null", Message::text("null")),
        raw("binary frame", Message::binary(b"{\"id\":1,\"op\":\"ping\"}".to_vec())),
        case("id not a number", json!({ "id": "seven", "op": "ping" }), "bad_request"),
        case("negative id", json!({ "id": -1, "op": "ping" }), "bad_request"),
        case("missing op", json!({ "id": 10 }), "bad_request"),
        case("op not a string", json!({ "id": 11, "op": 5 }), "bad_request"),
        case("unknown op", json!({ "id": 12, "op": "frobnicate" }), "unknown_op"),
        case("channel is a number", sub(13, json!(5)), "bad_request"),
        case("channel missing", json!({ "id": 14, "op": "history" }), "bad_request"),
        case(
            "from is a bool",
            json!({ "id": 15, "op": "subscribe", "channel": "room:1", "from": true }),
            "bad_request",
        ),
        case(
            "from is an unknown word",
            json!({ "id": 16, "op": "subscribe", "channel": "room:1", "from": "soon" }),
            "bad_request",
        ),
        case(
            "limit is a string",
            json!({ "id": 17, "op": "history", "channel": "room:1", "limit": "x" }),
            "bad_request",
        ),
        case(
            "since is negative",
            json!({ "id": 18, "op": "history", "channel": "room:1", "since": -3 }),
            "bad_request",
        ),
        case("publish without data", json!({ "id": 19, "op": "publish", "channel": "room:1" }), "bad_request"),
        case(
            "key is a number",
            json!({ "id": 20, "op": "publish", "channel": "room:1", "data": 1, "key": 5 }),
            "bad_request",
        ),
        case(
            "commit offset is a string",
            json!({ "id": 21, "op": "commit", "channel": "room:1", "consumer": "c", "offset": "x" }),
            "bad_request",
        ),
        case(
            "commit without consumer",
            json!({ "id": 22, "op": "commit", "channel": "room:1", "offset": 1 }),
            "bad_request",
        ),
        case("empty channel", sub(23, json!("")), "bad_request"),
        case("256-byte channel", sub(24, json!(long)), "bad_request"),
        case("channel with a space", sub(25, json!("room 1")), "bad_request"),
        case("channel with a slash", sub(26, json!("room/1")), "bad_request"),
        case("channel with non-ASCII", sub(27, json!("café")), "bad_request"),
        case(
            "publish to a bad channel",
            json!({ "id": 28, "op": "publish", "channel": "a/b", "data": 1 }),
            "bad_request",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_frames_get_errors_and_the_connection_keeps_working() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut failures = Vec::new();
    for case in cases() {
        if let Err(e) = check_case(&node, &case).await {
            failures.push(format!("{}: {e:#}", case.name));
        }
    }
    assert!(failures.is_empty(), "{} bad-input cases failed:\n{}", failures.len(), failures.join("\n"));
    let m = metrics(&node).await?;
    assert!(
        m.value("switchyard_protocol_errors_total", &[("code", "bad_request")]).is_some_and(|v| v >= 1.0),
        "no bad_request errors counted"
    );
    assert!(
        m.value("switchyard_protocol_errors_total", &[("code", "unknown_op")]).is_some_and(|v| v >= 1.0),
        "no unknown_op errors counted"
    );
    Ok(())
}

async fn check_case(node: &Node, case: &Case) -> anyhow::Result<()> {
    let mut c = node.client().await;
    c.send(case.frame.clone()).await?;
    let reply = match case.id.as_u64() {
        Some(id) => c.wait_reply(id).await?,
        None => c.next_anonymous_reply().await?,
    };
    anyhow::ensure!(reply.get("id") == Some(&case.id), "reply id should be {}: {reply}", case.id);
    let code = error_code(&reply)?;
    anyhow::ensure!(code == case.code, "error code should be {}: {reply}", case.code);
    c.ping().await.map_err(|e| e.context("the connection no longer works after the bad frame"))
}

#[tokio::test(flavor = "multi_thread")]
async fn longest_valid_channel_name_is_accepted() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut c = node.client().await;
    let name = format!("ns:{}", "a".repeat(252));
    assert_eq!(name.len(), 255);
    c.subscribe(&name, json!({})).await?;
    assert_eq!(c.publish(&name, json!(1)).await?.0, 1);
    c.subscribe("Az09_:.@-", json!({})).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_frame_gets_too_large_then_close_1009() -> anyhow::Result<()> {
    let node = Node::start("[limits]\nmax_frame_bytes = 1024\n");
    let mut c = node.client().await;
    // Just under the limit works.
    c.publish("room:big", json!("y".repeat(900))).await?;
    c.send_json(&json!({ "id": 99, "op": "publish", "channel": "room:big", "data": "z".repeat(2000) })).await?;
    let ending = c.read_to_end(DEADLINE).await?;
    let reply = ending.frames.iter().find(|f| f.get("error").is_some());
    let reply = reply.ok_or_else(|| anyhow::anyhow!("no error reply before the close: {:?}", ending.frames))?;
    assert_eq!(error_code(reply)?, "too_large", "{reply}");
    assert!(reply["id"] == 99 || reply["id"].is_null(), "reply id is the command's or null: {reply}");
    assert!(matches!(ending.end, Event::Close(Some(1009))), "expected close 1009, got {:?}", ending.end);
    // Nothing was stored.
    let mut other = node.client().await;
    assert_eq!(other.history("room:big", None, None).await?.offset, 1);
    Ok(())
}

#[test]
fn unknown_config_keys_stop_the_router_naming_the_key() -> anyhow::Result<()> {
    for (config, key) in [
        ("bogus_key = 1\n", "bogus_key"),
        ("[limits]\nmax_frame_bites = 4096\n", "max_frame_bites"),
        ("[namespaces.chat]\nhistory_sise = 3\n", "history_sise"),
    ] {
        let (status, stderr) = run_expecting_exit(config)?;
        assert_eq!(status.code(), Some(2), "exit status for {config:?} (stderr: {stderr})");
        assert!(stderr.contains(key), "stderr should name `{key}`: {stderr}");
    }
    Ok(())
}

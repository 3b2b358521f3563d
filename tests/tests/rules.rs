//! Channel rules over the WebSocket protocol, each with allowed and denied cases for
//! subscribe, publish and history: `public` rooms, `user:{id}` inboxes (direct messages),
//! `dialog:{a}:{b}` (canonical names only), the token's `channels` allow-list; and `from`
//! on every pushed and listed message being the publisher's `sub`.

use serde_json::{json, Value};
use switchyard_tests::auth::*;
use switchyard_tests::*;

/// `room` is public; `user` and `dialog` use their built-in rules; everything else is
/// allow-list.
fn chat_config() -> String {
    jwt_config("", "[namespaces.room]\nrule = \"public\"\n")
}

async fn allowed(c: &mut Client, op: &str, channel: &str) -> anyhow::Result<()> {
    let fields = match op {
        "publish" => json!({ "channel": channel, "data": { "text": format!("{op} ok") } }),
        _ => json!({ "channel": channel }),
    };
    c.ok(op, fields).await.map(drop).map_err(|e| e.context(format!("{op} {channel} should be allowed")))
}

async fn denied(c: &mut Client, op: &str, channel: &str, code: &str) -> anyhow::Result<()> {
    let fields = match op {
        "publish" => json!({ "channel": channel, "data": 1 }),
        _ => json!({ "channel": channel }),
    };
    let reply = c.cmd(op, fields).await?;
    let got = error_code(&reply)?;
    anyhow::ensure!(got == code, "{op} {channel}: expected {code}, got {reply}");
    anyhow::ensure!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{reply}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn public_rooms_are_open_to_every_connected_user() -> anyhow::Result<()> {
    let node = Node::start(&chat_config());
    let mut alice = connect_as(&node, "alice").await?;
    let mut bob = connect_as(&node, "bob").await?;
    allowed(&mut bob, "subscribe", "room:lobby").await?;
    allowed(&mut alice, "publish", "room:lobby").await?;
    allowed(&mut alice, "history", "room:lobby").await?;
    let m = bob.next_messages("room:lobby", 1).await?;
    assert_eq!(m[0]["from"], "alice", "{}", m[0]);
    // Not connected at all: nothing is allowed, not even on a public room.
    let mut anon = node.client().await;
    denied(&mut anon, "history", "room:lobby", "unauthorized").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_message_to_an_inbox_arrives_with_from_and_others_cannot_read_it() -> anyhow::Result<()> {
    let node = Node::start(&chat_config());
    let mut bob = connect_as(&node, "bob").await?;
    bob.subscribe("user:bob", json!({})).await?;
    let mut alice = connect_as(&node, "alice").await?;
    let (offset, _) = alice.publish("user:bob", json!({ "text": "hi bob" })).await?;

    let m = bob.next_messages("user:bob", 1).await?;
    assert_eq!(
        (&m[0]["from"], &m[0]["data"], m[0]["offset"].as_u64()),
        (&json!("alice"), &json!({"text": "hi bob"}), Some(offset))
    );

    // Bob, on another connection, reads his inbox's history with `from`.
    let mut bob2 = connect_as(&node, "bob").await?;
    let h = bob2.history("user:bob", None, None).await?;
    assert_eq!(h.messages.len(), 1);
    assert_eq!(h.messages[0]["from"], "alice");

    let mut carol = connect_as(&node, "carol").await?;
    denied(&mut carol, "subscribe", "user:bob", "forbidden").await?;
    denied(&mut carol, "history", "user:bob", "forbidden").await?;
    let reply = carol.cmd("commit", json!({ "channel": "user:bob", "consumer": "c", "offset": 1 })).await?;
    assert_eq!(error_code(&reply)?, "forbidden", "commit follows the subscribe rule: {reply}");
    // Anyone authenticated may write to an inbox, including their own.
    allowed(&mut carol, "publish", "user:bob").await?;
    allowed(&mut carol, "subscribe", "user:carol").await?;
    // An inbox name that is not a user id.
    denied(&mut carol, "publish", "user:a:b", "bad_request").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_cannot_choose_its_from() -> anyhow::Result<()> {
    let node = Node::start(&chat_config());
    let mut bob = connect_as(&node, "bob").await?;
    bob.subscribe("user:bob", json!({})).await?;
    let mut alice = connect_as(&node, "alice").await?;
    // Alice claims to be bob (and sneaks `from` into the frame): the server ignores it.
    alice.ok("publish", json!({ "channel": "user:bob", "data": { "text": "it's me, bob" }, "from": "bob" })).await?;
    let m = bob.next_messages("user:bob", 1).await?;
    assert_eq!((&m[0]["from"], &m[0]["data"]), (&json!("alice"), &json!({ "text": "it's me, bob" })), "{}", m[0]);
    let h = bob.history("user:bob", None, None).await?;
    assert_eq!(h.messages[0]["from"], "alice", "{}", h.messages[0]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dialog_lists_100_messages_in_order_and_refuses_carol() -> anyhow::Result<()> {
    let node = Node::start(&chat_config());
    let dialog = "dialog:alice:bob";
    let mut alice = connect_as(&node, "alice").await?;
    let mut bob = connect_as(&node, "bob").await?;
    bob.subscribe(dialog, json!({})).await?;
    let mut sent = Vec::new();
    for i in 0..100 {
        let (who, c) = if i % 2 == 0 { ("alice", &mut alice) } else { ("bob", &mut bob) };
        let (offset, _) = c.publish(dialog, json!({ "text": format!("message {i}") })).await?;
        sent.push((offset, who));
    }
    // Listing a dialog is `history` on it.
    let h = alice.history(dialog, None, Some(1000)).await?;
    assert_eq!(h.messages.len(), 100);
    assert_contiguous(&h.offsets(), 1)?;
    for (i, m) in h.messages.iter().enumerate() {
        assert_eq!(m["data"]["text"], format!("message {i}"), "{m}");
        assert_eq!(m["from"], sent[i].1, "{m}");
        assert_eq!(m["offset"].as_u64(), Some(sent[i].0));
    }
    // Bob's live stream saw the same 100, in order, with `from`.
    let pushed = bob.next_messages(dialog, 100).await?;
    assert_eq!(offsets(&pushed), h.offsets());
    assert_eq!(
        pushed.iter().map(|m| m["from"].clone()).collect::<Vec<Value>>(),
        h.messages.iter().map(|m| m["from"].clone()).collect::<Vec<_>>()
    );

    let mut carol = connect_as(&node, "carol").await?;
    for op in ["subscribe", "publish", "history"] {
        denied(&mut carol, op, dialog, "forbidden").await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn dialog_names_must_be_canonical() -> anyhow::Result<()> {
    let node = Node::start(&chat_config());
    let mut alice = connect_as(&node, "alice").await?;
    for op in ["subscribe", "publish", "history"] {
        let fields = if op == "publish" {
            json!({ "channel": "dialog:bob:alice", "data": 1 })
        } else {
            json!({ "channel": "dialog:bob:alice" })
        };
        let reply = alice.cmd(op, fields).await?;
        assert_eq!(error_code(&reply)?, "bad_request", "{op}: {reply}");
        assert!(reply["error"]["message"].as_str().unwrap().contains("dialog:alice:bob"), "{reply}");
    }
    for bad in ["dialog:alice", "dialog:alice:alice", "dialog:alice:bob:carol", "dialog::alice"] {
        denied(&mut alice, "publish", bad, "bad_request").await?;
    }
    allowed(&mut alice, "subscribe", "dialog:alice:bob").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn other_namespaces_follow_the_token_allow_list() -> anyhow::Result<()> {
    let node = Node::start(&chat_config());
    let mut dana = connect_as_with_channels(&node, "dana", &["news:1", "team:*"]).await?;
    for op in ["subscribe", "publish", "history"] {
        allowed(&mut dana, op, "news:1").await?;
        allowed(&mut dana, op, if op == "subscribe" { "team:a" } else { "team:b" }).await?;
        denied(&mut dana, op, "news:2", "forbidden").await?;
        denied(&mut dana, op, "plain", "forbidden").await?;
    }
    // No `channels` claim: nothing outside the other rules.
    let mut eve = connect_as(&node, "eve").await?;
    for op in ["subscribe", "publish", "history"] {
        denied(&mut eve, op, "news:1", "forbidden").await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_rules_are_configurable() -> anyhow::Result<()> {
    let config = jwt_config(
        "",
        "[defaults]\nrule = \"public\"\n[namespaces.inbox]\nrule = \"user\"\n[namespaces.dm]\nrule = \"dialog\"\n[namespaces.vip]\nrule = \"allowlist\"\n",
    );
    let node = Node::start(&config);
    let mut alice = connect_as(&node, "alice").await?;
    allowed(&mut alice, "subscribe", "anything:1").await?; // defaults.rule = public
    allowed(&mut alice, "subscribe", "inbox:alice").await?;
    denied(&mut alice, "subscribe", "inbox:bob", "forbidden").await?;
    allowed(&mut alice, "publish", "dm:alice:zed").await?;
    denied(&mut alice, "publish", "dm:zed:alice", "bad_request").await?;
    denied(&mut alice, "publish", "vip:1", "forbidden").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_are_not_enforced_when_auth_is_off() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut anon = node.client().await;
    allowed(&mut anon, "subscribe", "user:bob").await?;
    allowed(&mut anon, "publish", "dialog:bob:alice").await?;
    allowed(&mut anon, "history", "news:1").await?;
    Ok(())
}

//! HTTP for clients without WebSocket, and the HTTP API key: long-poll returns a message
//! published while it waits and an empty list at its timeout, with the token and the
//! channel's subscribe rule applied; publish and history need the API key when one is set.

use std::time::Duration;
use tokio::time::Instant;

use serde_json::{json, Value};
use switchyard_tests::auth::*;
use switchyard_tests::*;

const API_KEY: &str = "test-api-key-42";

fn config() -> String {
    jwt_config(&format!("api_key = \"{API_KEY}\""), "[namespaces.room]\nrule = \"public\"\n")
}

async fn poll(node: &Node, query: &str, bearer: Option<&str>) -> anyhow::Result<(u16, Value)> {
    let auth = bearer.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("Authorization", a)]).unwrap_or_default();
    let r = http_with(node.addr(), "GET", &format!("/api/v1/poll?{query}"), &headers, None).await?;
    Ok((r.status, r.json()?))
}

#[tokio::test(flavor = "multi_thread")]
async fn long_poll_returns_a_message_published_while_it_waits() -> anyhow::Result<()> {
    let node = Node::start(&config());
    let bob = token("bob", 3600, None);
    let addr = node.addr();
    let waiting = {
        let bob = bob.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let r = http_with(
                addr,
                "GET",
                "/api/v1/poll?channel=user%3Abob&since=0&timeout=25",
                &[("Authorization", &format!("Bearer {bob}"))],
                None,
            )
            .await;
            (r, started.elapsed())
        })
    };
    // Publish once the poll is registered (its subscription shows in the gauge).
    wait_until("the poll to wait", DEADLINE, async || {
        Ok(metrics(&node).await?.value("switchyard_subscriptions", &[]) == Some(1.0))
    })
    .await?;
    let mut alice = connect_as(&node, "alice").await?;
    alice.publish("user:bob", json!({ "text": "wake up" })).await?;
    let (r, took) = waiting.await?;
    let r = r?;
    assert_eq!(r.status, 200, "{}", r.body);
    let page = parse_history(&r.json()?)?;
    assert_eq!(page.offsets(), vec![1]);
    assert_eq!((&page.messages[0]["from"], &page.messages[0]["data"]["text"]), (&json!("alice"), &json!("wake up")));
    assert!(took < Duration::from_secs(20), "returned as soon as the message arrived, took {took:?}");

    // Messages already there come back at once; `token=` in the query works too.
    let (status, body) = poll(&node, &format!("channel=user:bob&since=0&timeout=25&token={bob}"), None).await?;
    assert_eq!((status, parse_history(&body)?.offsets()), (200, vec![1]));
    // The subscription is gone after each poll.
    wait_until("poll subscriptions to be released", DEADLINE, async || {
        Ok(metrics(&node).await?.value("switchyard_subscriptions", &[]) == Some(0.0))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn long_poll_returns_empty_at_its_timeout() -> anyhow::Result<()> {
    let node = Node::start(&config());
    let t = token("bob", 3600, None);
    let started = Instant::now();
    let (status, body) = poll(&node, "channel=room:quiet&since=0&timeout=700ms", Some(&t)).await?;
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    let page = parse_history(&body)?;
    assert!(page.messages.is_empty(), "{body}");
    assert_eq!(page.offset, 0);
    assert!(took >= Duration::from_millis(650) && took < Duration::from_secs(10), "took {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn long_poll_checks_the_token_and_the_subscribe_rule() -> anyhow::Result<()> {
    let node = Node::start(&config());
    let (status, body) = poll(&node, "channel=room:a&timeout=1", None).await?;
    assert_eq!((status, &body["error"]["code"]), (401, &json!("unauthorized")), "no token: {body}");
    let (status, body) = poll(&node, "channel=room:a&timeout=1", Some("garbage")).await?;
    assert_eq!((status, &body["error"]["code"]), (401, &json!("unauthorized")), "garbage: {body}");
    let (status, body) = poll(&node, "channel=room:a&timeout=1", Some(&token("bob", -100, None))).await?;
    assert_eq!((status, &body["error"]["code"]), (401, &json!("unauthorized")), "expired: {body}");
    let carol = token("carol", 3600, None);
    let (status, body) = poll(&node, "channel=user:bob&timeout=1", Some(&carol)).await?;
    assert_eq!((status, &body["error"]["code"]), (403, &json!("forbidden")), "carol on bob's inbox: {body}");
    let (status, body) = poll(&node, "channel=dialog:bob:alice&timeout=1", Some(&carol)).await?;
    assert_eq!((status, &body["error"]["code"]), (400, &json!("bad_request")), "non-canonical: {body}");
    for bad in [
        "timeout=1",
        "channel=a%20b",
        "channel=room:a&since=-1",
        "channel=room:a&timeout=later",
        "channel=room:a&timeout=3600",
    ] {
        let (status, body) = poll(&node, bad, Some(&carol)).await?;
        assert_eq!((status, &body["error"]["code"]), (400, &json!("bad_request")), "{bad}: {body}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn http_publish_and_history_need_the_api_key() -> anyhow::Result<()> {
    let node = Node::start(&config());
    let body = json!({ "channel": "room:h", "data": { "n": 1 } });
    for headers in [vec![], vec![("Authorization", "Bearer wrong-key-123")], vec![("X-Api-Key", "nope")]] {
        let r = http_with(node.addr(), "POST", "/api/v1/publish", &headers, Some(&body)).await?;
        assert_eq!((r.status, &r.json()?["error"]["code"]), (401, &json!("unauthorized")), "{headers:?}: {}", r.body);
        let r = http_with(node.addr(), "GET", "/api/v1/channels/room:h/history", &headers, None).await?;
        assert_eq!((r.status, &r.json()?["error"]["code"]), (401, &json!("unauthorized")), "{headers:?}: {}", r.body);
    }
    let bearer = format!("Bearer {API_KEY}");
    let r = http_with(node.addr(), "POST", "/api/v1/publish", &[("Authorization", &bearer)], Some(&body)).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http_with(node.addr(), "POST", "/api/v1/publish", &[("X-Api-Key", API_KEY)], Some(&body)).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http_with(node.addr(), "GET", "/api/v1/channels/room:h/history", &[("X-Api-Key", API_KEY)], None).await?;
    assert_eq!((r.status, parse_history(&r.json()?)?.offsets()), (200, vec![1, 2]));
    // Without a configured key the HTTP API stays open in `off` mode (the default).
    let open = Node::start("");
    let (status, _) = post_json(&open, "/api/v1/publish", &body).await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn in_jwt_mode_without_an_api_key_http_publish_and_history_are_closed() -> anyhow::Result<()> {
    // The key bypasses channel rules, so jwt mode without one must not leave the HTTP API
    // open: the dialog and the inbox below stay out of reach.
    let node = Node::start(&jwt_config("", ""));
    let mut alice = connect_as(&node, "alice").await?;
    alice.publish("dialog:alice:bob", json!("secret")).await?;
    let bob_token = format!("Bearer {}", token("bob", 3600, None));
    for headers in [
        vec![],
        vec![("X-Api-Key", "some-guessed-key")],
        vec![("Authorization", "Bearer some-guessed-key")],
        vec![("Authorization", bob_token.as_str())],
    ] {
        let r = http_with(node.addr(), "GET", "/api/v1/channels/dialog:alice:bob/history", &headers, None).await?;
        assert_eq!((r.status, &r.json()?["error"]["code"]), (401, &json!("unauthorized")), "{headers:?}: {}", r.body);
        assert!(!r.body.contains("secret"), "{}", r.body);
        let body = json!({ "channel": "user:bob", "data": "spoof" });
        let r = http_with(node.addr(), "POST", "/api/v1/publish", &headers, Some(&body)).await?;
        assert_eq!((r.status, &r.json()?["error"]["code"]), (401, &json!("unauthorized")), "{headers:?}: {}", r.body);
    }
    let mut bob = connect_as(&node, "bob").await?;
    assert!(bob.history_all("user:bob").await?.offsets().is_empty(), "nothing reached bob's inbox");
    Ok(())
}

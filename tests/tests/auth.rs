//! Authentication over the WebSocket protocol: `connect` with a JWT (HS256, RS256, ES256),
//! every kind of bad token answered with `unauthorized` and close 4001, connect-first in
//! `jwt` mode, the per-user session cap (4009), token expiry, anonymous `off` mode, dev
//! tokens and the `switchyard token` command.

use serde_json::json;
use switchyard_tests::auth::*;
use switchyard_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_valid_token_connects_and_names_the_user() -> anyhow::Result<()> {
    let node = Node::start(&jwt_config("", ""));
    let (mut c, ok) = connect_with(&node, &token("alice", 3600, None)).await?;
    assert_eq!((&ok["user"], &ok["version"]), (&json!("alice"), &json!("1")), "{ok}");
    c.ping().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_get_unauthorized_and_close_4001() -> anyhow::Result<()> {
    let node = Node::start(&jwt_config("", ""));
    let msg = expect_refused(&node, None, "unauthorized", 4001).await?;
    assert!(msg.contains("token is required"), "missing: {msg}");
    let msg = expect_refused(&node, Some("not-a-jwt"), "unauthorized", 4001).await?;
    assert!(msg.contains("malformed"), "garbage: {msg}");
    let forged = token_signed("some-other-secret-0123456789", "alice", 3600, None);
    let msg = expect_refused(&node, Some(&forged), "unauthorized", 4001).await?;
    assert!(msg.contains("signature"), "wrong signature: {msg}");
    let msg = expect_refused(&node, Some(&token("alice", -120, None)), "unauthorized", 4001).await?;
    assert!(msg.contains("expired"), "expired: {msg}");
    let msg = expect_refused(&node, Some(&token("al:ice", 3600, None)), "unauthorized", 4001).await?;
    assert!(msg.contains("sub"), "bad sub: {msg}");
    // A token without `sub`.
    let no_sub = sign(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        &json!({ "exp": now_secs() + 60 }),
    );
    let msg = expect_refused(&node, Some(&no_sub), "unauthorized", 4001).await?;
    assert!(msg.contains("sub"), "no sub: {msg}");
    // RS256 token offered to an HS256 server: algorithm mismatch.
    let msg = expect_refused(&node, Some(&token_pem("rs256", "alice", 3600)), "unauthorized", 4001).await?;
    assert!(msg.contains("signature"), "alg mismatch: {msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_before_connect_are_unauthorized_and_the_socket_stays_open() -> anyhow::Result<()> {
    let node = Node::start(&jwt_config("", ""));
    let mut c = node.client().await;
    for (op, fields) in [
        ("subscribe", json!({ "channel": "room:a" })),
        ("publish", json!({ "channel": "room:a", "data": 1 })),
        ("history", json!({ "channel": "room:a" })),
        ("ping", json!({})),
    ] {
        assert_eq!(c.err(op, fields).await?, "unauthorized", "{op} before connect");
    }
    c.ok("connect", json!({ "token": token("alice", 3600, None) })).await?;
    c.ping().await?;
    assert_eq!(
        c.err("connect", json!({ "token": token("alice", 3600, None) })).await?,
        "bad_request",
        "second connect"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_socket_that_never_connects_is_closed_with_4001() -> anyhow::Result<()> {
    let node = Node::start(&jwt_config("connect_timeout = \"300ms\"", ""));
    let mut c = node.client().await;
    let ending = c.read_to_end(DEADLINE).await?;
    assert!(matches!(ending.end, Event::Close(Some(4001))), "{ending:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rs256_and_es256_public_keys_verify_tokens() -> anyhow::Result<()> {
    for kind in ["rs256", "es256"] {
        let config = format!(
            "[auth]\nmode = \"jwt\"\nalgorithm = \"{}\"\npublic_key_file = {:?}\n",
            kind.to_uppercase(),
            fixture(&format!("{kind}-public.pem")).display().to_string()
        );
        let node = Node::start(&config);
        let (mut c, ok) = connect_with(&node, &token_pem(kind, "dana", 3600)).await?;
        assert_eq!(ok["user"], "dana", "{kind}: {ok}");
        c.ping().await?;
        expect_refused(&node, Some(&token_pem(kind, "dana", -120)), "unauthorized", 4001).await?;
        // An HS256 token (e.g. signed with the public key as an HMAC secret) is refused.
        let pem = std::fs::read_to_string(fixture(&format!("{kind}-public.pem")))?;
        expect_refused(&node, Some(&token_signed(&pem, "dana", 3600, None)), "unauthorized", 4001).await?;
        let other = if kind == "rs256" { "es256" } else { "rs256" };
        expect_refused(&node, Some(&token_pem(other, "dana", 3600)), "unauthorized", 4001).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_auth_configs_are_rejected_naming_the_field() -> anyhow::Result<()> {
    for (config, field) in [
        ("[auth]\nmode = \"jwt\"\n", "auth.hs256_secret"),
        ("[auth]\nmode = \"jwt\"\nalgorithm = \"RS256\"\n", "auth.public_key_pem"),
        ("[auth]\nalgorithm = \"ES256\"\npublic_key_pem = \"junk\"\n", "auth.public_key_pem"),
        (
            "[auth]\nmode = \"jwt\"\nalgorithm = \"ES256\"\npublic_key_file = \"/nonexistent.pem\"\n",
            "auth.public_key_file",
        ),
        ("[auth]\nmode = \"sometimes\"\n", "mode"),
        ("[auth]\nhs256_secret = \"short\"\n", "auth.hs256_secret"),
        ("[auth]\napi_key = \"a b\"\n", "auth.api_key"),
        ("[sessions]\nmax_per_user = 0\n", "sessions.max_per_user"),
        ("[rate_limit]\npublish_rate = -1\n", "rate_limit.publish_rate"),
        ("[defaults]\nrule = \"dialog\"\n", "defaults.rule"),
        ("[namespaces.room]\nrule = \"friends\"\n", "rule"),
    ] {
        let (status, stderr) = run_expecting_exit(config)?;
        assert!(!status.success(), "{config} should be rejected");
        assert!(stderr.contains(field), "{config}: stderr should name {field}: {stderr}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sixth_connection_of_a_user_gets_4009() -> anyhow::Result<()> {
    let node = Node::start(&jwt_config("", ""));
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_as(&node, "alice").await?);
    }
    let t = token("alice", 3600, None);
    let msg = expect_refused(&node, Some(&t), "limit_exceeded", 4009).await?;
    assert!(msg.contains("5 connections"), "{msg}");
    // Other users are not affected.
    connect_as(&node, "bob").await?.ping().await?;
    // Closing one frees its seat.
    drop(held.pop());
    wait_until("a seat to be freed", DEADLINE, async || Ok(connect_with(&node, &t).await.is_ok())).await?;
    for c in &mut held {
        c.ping().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_cap_is_configurable() -> anyhow::Result<()> {
    let node = Node::start(&jwt_config("", "[sessions]\nmax_per_user = 1\n"));
    let _one = connect_as(&node, "alice").await?;
    expect_refused(&node, Some(&token("alice", 3600, None)), "limit_exceeded", 4009).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_is_closed_with_4001_when_its_token_expires() -> anyhow::Result<()> {
    let node = Node::start(&jwt_config("", ""));
    // 4 s: long enough that the token is still valid at `connect` on a slow machine.
    let (mut c, _) = connect_with(&node, &token("alice", 4, None)).await?;
    let ending = c.read_to_end(DEADLINE).await?;
    assert!(matches!(ending.end, Event::Close(Some(4001))), "{ending:?}");
    assert!(
        ending.frames.iter().any(|f| f["error"]["code"] == "unauthorized" || f["push"] == "disconnect"),
        "{:?}",
        ending.frames
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_off_is_anonymous_and_a_dev_token_names_the_publisher() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut anon = node.client().await;
    let ok = anon.ok("connect", json!({})).await?;
    assert!(ok.get("user").is_none(), "anonymous: {ok}");
    anon.subscribe("room:x", json!({})).await?;

    let (status, body) = post_json(&node, "/api/v1/dev/token", &json!({ "user": "zoe" })).await?;
    assert_eq!(status, 200, "{body}");
    let t = str_field(&body, "token")?;
    let (mut zoe, ok) = connect_with(&node, &t).await?;
    assert_eq!(ok["user"], "zoe");
    zoe.publish("room:x", json!("hi")).await?;
    let m = anon.next_messages("room:x", 1).await?;
    assert_eq!(m[0]["from"], "zoe", "{}", m[0]);
    // Anonymous publishes carry no `from`.
    anon.publish("room:x", json!("anon")).await?;
    let m = anon.next_messages("room:x", 1).await?;
    assert!(m[0].get("from").is_none(), "{}", m[0]);
    // Even in off mode a token that is given must be valid.
    expect_refused(&node, Some("junk"), "unauthorized", 4001).await?;
    let (status, body) = post_json(&node, "/api/v1/dev/token", &json!({ "user": "a:b" })).await?;
    assert_eq!((status, &body["error"]["code"]), (400, &json!("bad_request")), "{body}");
    let (_, info) = get_json(&node, "/api/v1/auth").await?;
    assert_eq!(info, json!({ "mode": "off", "dev_tokens": true }));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_tokens_need_the_flag_in_jwt_mode() -> anyhow::Result<()> {
    let node = Node::start(&jwt_config("", ""));
    let (status, body) = post_json(&node, "/api/v1/dev/token", &json!({ "user": "zoe" })).await?;
    assert_eq!((status, &body["error"]["code"]), (403, &json!("forbidden")), "{body}");

    let node = Node::start(&jwt_config("dev_tokens = true", ""));
    let (status, body) = post_json(&node, "/api/v1/dev/token", &json!({ "user": "zoe", "ttl": "5m" })).await?;
    assert_eq!(status, 200, "{body}");
    let (_, ok) = connect_with(&node, &str_field(&body, "token")?).await?;
    assert_eq!(ok["user"], "zoe");
    let (status, body) = post_json(&node, "/api/v1/dev/token", &json!({ "user": "zoe", "ttl": "30d" })).await?;
    assert_eq!(status, 400, "{body}");
    for bad in [json!({ "name": "zoe" }), json!({ "user": "zoe", "ttl": "soon" }), json!([1])] {
        let (status, body) = post_json(&node, "/api/v1/dev/token", &bad).await?;
        assert_eq!((status, &body["error"]["code"]), (400, &json!("bad_request")), "{bad}: {body}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn off_mode_with_a_configured_secret_mints_only_with_the_flag() -> anyhow::Result<()> {
    // An off-mode node sharing the secret of a jwt node must not hand out tokens the jwt
    // node accepts.
    let jwt = Node::start(&jwt_config("", ""));
    let off = Node::start(&format!("[auth]\nhs256_secret = \"{SECRET}\"\n"));
    let (status, body) = post_json(&off, "/api/v1/dev/token", &json!({ "user": "mallory", "ttl": "7d" })).await?;
    assert_eq!((status, &body["error"]["code"]), (403, &json!("forbidden")), "{body}");
    let (_, info) = get_json(&off, "/api/v1/auth").await?;
    assert_eq!(info, json!({ "mode": "off", "dev_tokens": false }));

    let flagged = Node::start(&format!("[auth]\nhs256_secret = \"{SECRET}\"\ndev_tokens = true\n"));
    let (status, body) = post_json(&flagged, "/api/v1/dev/token", &json!({ "user": "zoe" })).await?;
    assert_eq!(status, 200, "{body}");
    let (_, ok) = connect_with(&jwt, &str_field(&body, "token")?).await?;
    assert_eq!(ok["user"], "zoe");

    // Without a configured secret, off mode still mints, with a per-process secret that the
    // jwt node refuses.
    let open = Node::start("");
    let (status, body) = post_json(&open, "/api/v1/dev/token", &json!({ "user": "zoe" })).await?;
    assert_eq!(status, 200, "{body}");
    expect_refused(&jwt, Some(&str_field(&body, "token")?), "unauthorized", 4001).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_tokens_need_hs256_and_are_reported_only_when_they_work() -> anyhow::Result<()> {
    let es = format!(
        "[auth]\nalgorithm = \"ES256\"\npublic_key_file = {:?}\n",
        fixture("es256-public.pem").display().to_string()
    );
    // Asked for with a public-key algorithm: the config is refused, naming the field.
    let (status, stderr) =
        run_expecting_exit(&format!("{es}dev_tokens = true\nhs256_secret = \"0123456789abcdef-secret\"\n"))?;
    assert!(!status.success());
    assert!(stderr.contains("auth.dev_tokens"), "{stderr}");
    // Off mode with a public key: the chat page must not be told to mint (its tokens would
    // be refused, 4001 → mint → 4001).
    let node = Node::start(&es);
    let (_, info) = get_json(&node, "/api/v1/auth").await?;
    assert_eq!(info, json!({ "mode": "off", "dev_tokens": false }));
    let (status, body) = post_json(&node, "/api/v1/dev/token", &json!({ "user": "zoe" })).await?;
    assert_eq!((status, &body["error"]["code"]), (403, &json!("forbidden")), "{body}");
    let (_, ok) = connect_with(&node, &token_pem("es256", "dana", 3600)).await?;
    assert_eq!(ok["user"], "dana");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn switchyard_token_prints_a_token_the_server_accepts() -> anyhow::Result<()> {
    let node = Node::start(&jwt_config("", ""));
    let out = std::process::Command::new(router_bin())
        .args(["token", "--user", "alice", "--ttl", "10m", "--channels", "news:1,team:*", "--config"])
        .arg(node.config_path())
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = String::from_utf8(out.stdout)?.trim().to_string();
    let (mut c, ok) = connect_with(&node, &t).await?;
    assert_eq!(ok["user"], "alice");
    c.subscribe("team:x", json!({})).await?; // from the `channels` claim (allowlist rule)

    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("c.toml"), "")?;
    let out = std::process::Command::new(router_bin())
        .args(["token", "--user", "alice", "--config"])
        .arg(dir.path().join("c.toml"))
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hs256_secret"), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// `refresh` (#17): a new token for the same user replaces the connection's expiry without
/// touching its subscriptions. A connection whose token expired at the same moment but was
/// not refreshed is closed with 4001; the refreshed one keeps receiving. A token for
/// another user gets `forbidden`, a bad one `unauthorized`, and neither changes anything.
#[tokio::test(flavor = "multi_thread")]
async fn a_refreshed_token_keeps_the_connection_and_its_subscriptions() -> anyhow::Result<()> {
    let node = Node::start(&jwt_config("", ""));
    let room: &[&str] = &["room:refresh"];
    let expiring = token("alice", 4, Some(room));
    let (mut kept, _) = connect_with(&node, &expiring).await?;
    let (mut control, _) = connect_with(&node, &expiring).await?;
    kept.subscribe("room:refresh", json!({})).await?;
    assert_eq!(kept.err("refresh", json!({"token": token("bob", 3600, None)})).await?, "forbidden");
    assert_eq!(kept.err("refresh", json!({"token": "not-a-jwt"})).await?, "unauthorized");
    assert_eq!(kept.err("refresh", json!({})).await?, "bad_request");
    kept.ok("refresh", json!({"token": token("alice", 3600, Some(room))})).await?;

    // The first token's expiry closes the connection that did not refresh...
    let ending = control.read_to_end(DEADLINE).await?;
    assert!(matches!(ending.end, Event::Close(Some(4001))), "{ending:?}");
    // ...and the refreshed one is still served, subscription included.
    let (mut publisher, _) = connect_with(&node, &token("bob", 3600, Some(room))).await?;
    publisher.publish("room:refresh", json!("after the old expiry")).await?;
    let got = kept.next_messages("room:refresh", 1).await?;
    assert_eq!(got[0]["data"], "after the old expiry");

    // Without a token there is nothing to refresh.
    let anon = Node::start("");
    let mut c = anon.client().await;
    c.ok("connect", json!({})).await?;
    assert_eq!(c.err("refresh", json!({"token": token("alice", 3600, None)})).await?, "bad_request");
    Ok(())
}

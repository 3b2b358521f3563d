//! WASM policy plugins, end to end: bound in config, loaded from a watched folder, run by
//! background maintenance and observed only through the protocol, `/api/v1/plugins`,
//! `/metrics` and the `switchyard plugin check` command.
//!
//! It owns four promises (sdk/plugin/README.md, plugins/README.md). First, each example plugin
//! changes what `history` keeps exactly as its params say. Second, the plugin folder is hot:
//! replacing a file changes behaviour without a restart, deleting it reverts to the
//! namespace's built-in limits, and an invalid file keeps the last good version serving.
//! Third, a hostile module (endless loop, memory bomb, garbage or out-of-bounds output,
//! trap) never costs a message: the round falls back to the built-in limits, the failure
//! is counted with its reason, and the plugin is quarantined, whether it speaks ABI v1 or
//! v2; a module that breaks its ABI is refused at load, and an ABI v1 build keeps working
//! beside v2 ones. Fourth, `plugin check` accepts a good module (also as `--json`) and
//! refuses a bad one, and `plugin new` makes crates that test green.
//!
//! Every node gets its own plugin folder ([`PluginDir`]) and runs maintenance every
//! 100 ms; every check polls with a deadline. The example plugins come from `plugins/dist`
//! (`scripts/build-plugins.sh`); the hostile ones are written here in WAT.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde_json::{json, Value};
use switchyard_tests::*;

// === helpers ===

/// Config text: this folder, fast maintenance, then `rest` (namespaces, `[plugins]`).
fn config(plugins: &PluginDir, rest: &str) -> String {
    format!("{}{FAST_MAINTENANCE}\n{rest}", plugins.config_line())
}

/// Polls history of `channel` until its offsets equal `expected`; returns the history.
async fn wait_for_offsets(c: &mut Client, channel: &str, expected: &[u64]) -> anyhow::Result<History> {
    let mut last = Vec::new();
    poll_for(&format!("history of {channel} to be offsets {expected:?}"), DEADLINE, async || {
        let h = c.history_all(channel).await?;
        last = h.offsets();
        Ok((last == expected).then_some(h))
    })
    .await
    .with_context(|| format!("last seen offsets: {last:?}"))
}

/// Polls until the plugin's `calls` in `/api/v1/plugins` reach `min`; returns them.
async fn wait_calls(node: &Node, plugin: &str, min: u64) -> anyhow::Result<u64> {
    let row = wait_plugin_row(node, plugin, &format!("called at least {min} times"), |r| {
        r["calls"].as_u64().is_some_and(|c| c >= min)
    })
    .await?;
    Ok(row["calls"].as_u64().unwrap_or_default())
}

/// The `calls` of a plugin's row (0 when not listed).
async fn calls(node: &Node, plugin: &str) -> anyhow::Result<u64> {
    Ok(plugin_row(node, plugin).await?.and_then(|r| r["calls"].as_u64()).unwrap_or(0))
}

/// Publishes `(key, data)` pairs pipelined, in order.
async fn publish_keyed(c: &mut Client, channel: &str, items: &[(&str, Value)]) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for (key, data) in items {
        ids.push(c.send_cmd("publish", json!({ "channel": channel, "key": key, "data": data })).await?);
    }
    let mut offsets = Vec::new();
    for id in ids {
        offsets.push(u64_field(&reply_ok(c.wait_reply(id).await?)?, "offset")?);
    }
    Ok(offsets)
}

/// Checks that a subscriber got exactly the acknowledged publishes, as one contiguous run.
fn assert_nothing_lost(channel: &str, acked: &[u64], received: &[Value]) -> anyhow::Result<()> {
    ensure!(!acked.is_empty(), "the publisher to {channel} got no publish acknowledged");
    let got = offsets(received);
    ensure!(
        got.len() == acked.len(),
        "{channel}: {} publishes acknowledged but {} messages received",
        acked.len(),
        got.len()
    );
    ensure!(got == acked, "{channel}: received offsets differ from the acknowledged ones");
    assert_contiguous(&got, got[0])
}

// --- hand-written ABI v1 modules (v2 ones below, at the hostile tests) ---

/// A retention module: ABI marker, memory, a bump allocator, a data segment at 16
/// (`Ok(Keep)`, postcard `00 00`) and at 64 (bytes no `Result` decodes from), and `body` as
/// the retention entry point (params `$p $l`, result i64). Modeled on the router's own
/// `host.rs` test modules.
fn abi_module(body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
            (memory (export "memory") 1)
            (global $bump (mut i32) (i32.const 1024))
            (data (i32.const 16) "\00\00")
            (data (i32.const 64) "\07\ff\ff\ff\ff\ff\ff\ff\ff")
            (func (export "switchyard_abi_v1"))
            (func (export "switchyard_alloc") (param $n i32) (result i32)
              (local $p i32) (local.set $p (global.get $bump))
              (global.set $bump (i32.add (global.get $bump) (local.get $n))) (local.get $p))
            (func (export "switchyard_retention") (param $p i32) (param $l i32) (result i64) {body}))"#
    ))
    .expect("valid wat")
}

/// Returns `(ptr << 32) | len`.
fn output(ptr: u64, len: u64) -> String {
    format!("(i64.or (i64.shl (i64.const {ptr}) (i64.const 32)) (i64.const {len}))")
}

/// A well-behaved retention plugin that keeps everything, whatever the params.
fn keep_all() -> Vec<u8> {
    abi_module(&output(16, 2))
}

// === 1. the example plugins ===

#[tokio::test(flavor = "multi_thread")]
async fn keep_last_keeps_the_newest_count() -> anyhow::Result<()> {
    let plugins = PluginDir::new();
    plugins.install_example("keep-last", "keep-last");
    // No built-in limits: whatever goes, the plugin removed.
    let node = Node::start(&config(
        &plugins,
        "[namespaces.kl]\nretention = { plugin = \"keep-last\", params = { count = 3 } }\n",
    ));
    let mut c = node.client().await;
    let (_, epoch) = c.publish_many("kl:a", (1..=10).map(|i| json!(i))).await?;
    let h = wait_for_offsets(&mut c, "kl:a", &[8, 9, 10]).await?;
    assert_eq!(datas(&h.messages), vec![json!(8), json!(9), json!(10)]);
    assert_eq!((h.epoch.as_str(), h.offset), (epoch.as_str(), 10), "retention never moves the top");
    assert_eq!(c.publish("kl:a", json!(11)).await?.0, 11);
    wait_for_offsets(&mut c, "kl:a", &[9, 10, 11]).await?;
    // Other namespaces are not bound: they keep everything.
    c.publish_many("other:a", (1..=10).map(|i| json!(i))).await?;
    wait_calls(&node, "keep-last", calls(&node, "keep-last").await? + 4).await?;
    assert_eq!(c.history_all("other:a").await?.offsets(), (1..=10).collect::<Vec<_>>());
    wait_metric_at_least(
        &node,
        "switchyard_plugin_calls_total",
        &[("plugin", "keep-last"), ("kind", "retention")],
        1.0,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn max_age_drops_old_messages_and_keeps_fresh_ones() -> anyhow::Result<()> {
    let plugins = PluginDir::new();
    plugins.install_example("max-age", "max-age");
    let node = Node::start(&config(
        &plugins,
        "[namespaces.age]\nretention = { plugin = \"max-age\", params = { ttl_ms = 500 } }\n",
    ));
    let mut c = node.client().await;
    c.publish_many("age:a", (1..=5).map(|i| json!(i))).await?;
    // A client keeps publishing, so there are always messages younger than the TTL.
    let publisher = Publisher::start(&node, "age:a", Duration::from_millis(40)).await?;
    let h = poll_for("the old messages of age:a to go while fresh ones stay", DEADLINE, async || {
        let h = c.history_all("age:a").await?;
        let kept = h.offsets();
        Ok((kept.first().is_some_and(|&first| first > 5)).then_some(h))
    })
    .await?;
    let acked = publisher.stop().await?;
    let kept = h.offsets();
    assert_contiguous(&kept, kept[0])?;
    assert_eq!(kept.last(), Some(&h.offset), "the newest message is kept: {kept:?}");
    assert!(kept.len() >= 2, "messages younger than the TTL are kept: {kept:?}");
    let now_ms = h.messages.iter().filter_map(|m| m["ts"].as_u64()).max().unwrap_or_default();
    assert!(
        h.messages.iter().all(|m| m["ts"].as_u64().is_none_or(|ts| now_ms - ts < 2_000)),
        "nothing much older than the TTL is kept: {:?}",
        h.messages
    );
    // Once nobody publishes, everything ages out; the top stays.
    let top = *acked.last().expect("some publishes acknowledged");
    let h = wait_for_offsets(&mut c, "age:a", &[]).await?;
    assert_eq!(h.offset, top);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn size_cap_keeps_a_newest_suffix_within_the_budget() -> anyhow::Result<()> {
    const BUDGET: usize = 2000;
    let plugins = PluginDir::new();
    plugins.install_example("size-cap", "size-cap");
    let node = Node::start(&config(
        &plugins,
        &format!("[namespaces.cap]\nretention = {{ plugin = \"size-cap\", params = {{ bytes = {BUDGET} }} }}\n"),
    ));
    let mut c = node.client().await;
    let payload = "x".repeat(300);
    let (_, epoch) = c.publish_many("cap:a", (1..=20).map(|i| json!({ "i": i, "pad": payload }))).await?;
    // The router counts stored bytes its own way; the data alone is a lower bound.
    let data_bytes = |h: &History| h.messages.iter().map(|m| m["data"].to_string().len()).sum::<usize>();
    let h = poll_for(&format!("cap:a to keep at most {BUDGET} bytes of data"), DEADLINE, async || {
        let h = c.history_all("cap:a").await?;
        Ok((data_bytes(&h) <= BUDGET).then_some(h))
    })
    .await?;
    let kept = h.offsets();
    assert!(!kept.is_empty() && kept.last() == Some(&20), "the newest message must be kept: {kept:?}");
    assert!(kept.len() < 20, "{kept:?}");
    assert_contiguous(&kept, kept[0])?;
    assert_eq!((h.epoch.as_str(), h.offset), (epoch.as_str(), 20));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn latest_per_key_compacts_and_removes_tombstones() -> anyhow::Result<()> {
    let plugins = PluginDir::new();
    plugins.install_example("latest-per-key", "latest-per-key");
    // The built-in fallback would keep a tombstone for an hour: its removal is the plugin's.
    let node = Node::start(&config(
        &plugins,
        "[namespaces.kv]\ncompaction = { plugin = \"latest-per-key\", params = { tombstone_delay_ms = 0 }, tombstone_delay = \"1h\" }\n",
    ));
    let mut c = node.client().await;
    let items =
        [("k1", json!("a1")), ("k2", json!("b1")), ("k1", json!("a2")), ("k2", json!("b2")), ("k1", json!("a3"))];
    assert_eq!(publish_keyed(&mut c, "kv:a", &items).await?, vec![1, 2, 3, 4, 5]);
    let h = wait_for_offsets(&mut c, "kv:a", &[4, 5]).await?;
    assert_eq!(datas(&h.messages), vec![json!("b2"), json!("a3")]);
    assert_eq!((h.messages[0]["key"].clone(), h.messages[1]["key"].clone()), (json!("k2"), json!("k1")));
    assert_eq!(h.offset, 5);
    // A tombstone for k2 supersedes b2 and, with tombstone_delay_ms = 0, goes itself.
    assert_eq!(publish_keyed(&mut c, "kv:a", &[("k2", Value::Null)]).await?, vec![6]);
    let h = wait_for_offsets(&mut c, "kv:a", &[5]).await?;
    assert_eq!((h.offset, &h.messages[0]["data"]), (6, &json!("a3")));
    assert_eq!(c.publish("kv:a", json!("next")).await?.0, 7, "offsets go on after compaction");
    wait_metric_at_least(
        &node,
        "switchyard_plugin_calls_total",
        &[("plugin", "latest-per-key"), ("kind", "compaction")],
        1.0,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_plugins_api_lists_loaded_plugins_with_their_health() -> anyhow::Result<()> {
    let plugins = PluginDir::new();
    let examples = [
        ("keep-last", "retention"),
        ("max-age", "retention"),
        ("size-cap", "retention"),
        ("latest-per-key", "compaction"),
    ];
    let shas: Vec<String> = examples.iter().map(|(name, _)| sha256_hex(&plugins.install_example(name, name))).collect();
    let node = Node::start(&config(
        &plugins,
        r#"[namespaces.kl]
retention = { plugin = "keep-last", params = { count = 3 } }
[namespaces.age]
retention = { plugin = "max-age", params = { ttl = "10m" } }
[namespaces.cap]
retention = { plugin = "size-cap", params = { bytes = 100000 } }
[namespaces.kv]
compaction = { plugin = "latest-per-key", params = { tombstone_delay_ms = 0 } }
"#,
    ));
    let mut c = node.client().await;
    for ns in ["kl", "age", "cap"] {
        c.publish(&format!("{ns}:a"), json!(1)).await?;
    }
    publish_keyed(&mut c, "kv:a", &[("k", json!(1)), ("k", json!(2))]).await?;
    for (name, _) in examples {
        wait_calls(&node, name, 1).await?;
    }
    let (status, body) = get_json(&node, "/api/v1/plugins").await?;
    assert_eq!(status, 200);
    assert_eq!(
        std::fs::canonicalize(body["dir"].as_str().context("dir")?)?,
        std::fs::canonicalize(plugins.path())?,
        "{body}"
    );
    let rows = body["plugins"].as_array().context("plugins")?;
    assert_eq!(rows.len(), examples.len(), "{body}");
    for ((name, kind), sha) in examples.iter().zip(&shas) {
        let row = rows.iter().find(|r| r["name"] == *name).with_context(|| format!("{name} not listed: {body}"))?;
        assert_eq!(row["state"], "active", "{row}");
        assert_eq!(row["kinds"], json!([kind]), "{row}");
        assert_eq!(row["abi_version"], 2, "the examples are ABI v2: {row}");
        assert_eq!(row["sha256"], json!(sha), "{row}");
        assert_eq!(row["file_sha256"], json!(sha), "{row}");
        assert!(row["calls"].as_u64().is_some_and(|n| n > 0), "{row}");
        assert_eq!((&row["failures"], &row["last_error"]), (&json!(0), &Value::Null), "{row}");
    }
    Ok(())
}

// === 2. hot reload ===

/// `policy.wasm` is swapped under a running node while a client keeps publishing. The
/// binding's params (`count = 3`) suit keep-last only (every example plugin denies
/// unknown params), so the replacement is a hand-written module that ignores its params and
/// keeps everything: each phase has its own observable answer (3, all, 7 from the built-in
/// fallback, 3 again, still 3 after garbage is written over the file).
#[tokio::test(flavor = "multi_thread")]
async fn replacing_deleting_and_corrupting_a_plugin_under_load() -> anyhow::Result<()> {
    let plugins = PluginDir::new();
    let keep_last = plugins.install_example("keep-last", "policy");
    let keep_last_sha = sha256_hex(&keep_last);
    let node = Node::start(&config(
        &plugins,
        "[namespaces.hr]\nhistory_size = 7\nretention = { plugin = \"policy\", params = { count = 3 } }\n",
    ));
    let pid = node.pid();
    let mut c = node.client().await;
    wait_plugin_row(&node, "policy", "keep-last", |r| r["sha256"] == keep_last_sha.as_str()).await?;
    let subscriber = Subscriber::start(&node, "hr:live").await?;
    let publisher = Publisher::start(&node, "hr:live", Duration::from_millis(5)).await?;

    // keep-last, count 3.
    c.publish_many("hr:probe", (1..=10).map(|i| json!(i))).await?;
    wait_for_offsets(&mut c, "hr:probe", &[8, 9, 10]).await?;

    // Replaced by a plugin that keeps everything: nothing more goes.
    let keep_all = keep_all();
    plugins.install("policy", &keep_all);
    let row = wait_plugin_row(&node, "policy", "the keep-all build", |r| r["sha256"] == sha256_hex(&keep_all)).await?;
    assert_eq!((&row["state"], &row["last_error"]), (&json!("active"), &Value::Null), "{row}");
    c.publish_many("hr:probe", (11..=30).map(|i| json!(i))).await?;
    // Enough rounds over both channels to have trimmed the probe if anything would.
    wait_calls(&node, "policy", calls(&node, "policy").await? + 10).await?;
    assert_eq!(c.history_all("hr:probe").await?.offsets(), (8..=30).collect::<Vec<_>>(), "keep-all keeps everything");

    // Deleted: the namespace's built-in limit (history_size = 7) applies.
    plugins.remove("policy");
    poll_for("policy to leave /api/v1/plugins", DEADLINE, async || {
        Ok(plugin_row(&node, "policy").await?.is_none().then_some(()))
    })
    .await?;
    wait_for_offsets(&mut c, "hr:probe", &(24..=30).collect::<Vec<_>>()).await?;

    // keep-last again.
    plugins.install("policy", &keep_last);
    wait_plugin_row(&node, "policy", "keep-last again", |r| r["sha256"] == keep_last_sha.as_str()).await?;
    wait_for_offsets(&mut c, "hr:probe", &[28, 29, 30]).await?;

    // Garbage written over the file: refused, and the last good version keeps serving.
    let garbage = b"\0asm this is not a wasm module at all".to_vec();
    std::fs::write(plugins.file("policy"), &garbage)?;
    let row = wait_plugin_row(&node, "policy", "refusing the garbage file", |r| {
        r["file_sha256"] == sha256_hex(&garbage).as_str()
    })
    .await?;
    assert_eq!(row["state"], "active", "{row}");
    assert_eq!(row["sha256"], keep_last_sha.as_str(), "the last good version serves: {row}");
    assert_eq!(row["kinds"], json!(["retention"]), "{row}");
    let err = row["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("not a valid wasm module"), "last_error should say why the file was refused: {row}");
    c.publish_many("hr:probe", (31..=40).map(|i| json!(i))).await?;
    wait_for_offsets(&mut c, "hr:probe", &[38, 39, 40]).await?;

    // The live channel lost nothing through all of it, and ends under keep-last too.
    let acked = publisher.stop().await?;
    let received = subscriber.finish(*acked.last().context("no publish acknowledged")?).await?;
    assert_nothing_lost("hr:live", &acked, &received)?;
    let top = *acked.last().expect("checked");
    wait_for_offsets(&mut c, "hr:live", &[top - 2, top - 1, top]).await?;
    assert_eq!(node.pid(), pid, "no restart");
    Ok(())
}

// === 3. hostile modules ===

/// Binds retention of namespace `bad` to a module with this entry-point `body` (fallback:
/// `history_size = 5`) and checks, while a client publishes and another subscribes, that
/// nothing is lost, the fallback is applied, the failure is counted with `reason`, and the
/// plugin ends up quarantined.
async fn hostile_retention_falls_back(body: &str, reason: &str) -> anyhow::Result<()> {
    hostile_module_falls_back(&abi_module(body), &format!("hostile-{}", reason.replace('_', "-")), reason).await
}

/// [`hostile_retention_falls_back`] for any module bytes, installed as `name`.
async fn hostile_module_falls_back(module: &[u8], name: &str, reason: &str) -> anyhow::Result<()> {
    let plugins = PluginDir::new();
    let name = name.to_string();
    plugins.install(&name, module);
    let node = Node::start(&config(
        &plugins,
        &format!(
            r#"[namespaces.bad]
history_size = 5
retention = {{ plugin = "{name}" }}

[plugins]
call_timeout = "50ms"
memory_limit_bytes = 2097152
quarantine_after = 3
quarantine_min = "1s"
quarantine_max = "30s"
"#
        ),
    ));
    let row = wait_plugin_row(&node, &name, "loaded", |r| r["state"] == "active").await?;
    assert_eq!(row["kinds"], json!(["retention"]), "{row}");
    let subscriber = Subscriber::start(&node, "bad:live").await?;
    let publisher = Publisher::start(&node, "bad:live", Duration::from_millis(5)).await?;
    let mut c = node.client().await;
    c.publish_many("bad:probe", (1..=20).map(|i| json!(i))).await?;

    let labels = [("plugin", name.as_str()), ("kind", "retention"), ("reason", reason)];
    wait_metric_at_least(&node, "switchyard_plugin_failures_total", &labels, 1.0).await?;
    let row = wait_plugin_row(&node, &name, "quarantined", |r| r["state"] == "quarantined").await?;
    assert!(row["failures"].as_u64().is_some_and(|n| n >= 3), "quarantined after 3 failures: {row}");
    assert!(row["last_error"].is_string(), "{row}");
    // The built-in fallback applies whether the plugin fails or sits in quarantine.
    wait_for_offsets(&mut c, "bad:probe", &[16, 17, 18, 19, 20]).await?;

    let acked = publisher.stop().await?;
    let received = subscriber.finish(*acked.last().context("no publish acknowledged")?).await?;
    assert_nothing_lost("bad:live", &acked, &received)?;
    let top = *acked.last().expect("checked");
    wait_for_offsets(&mut c, "bad:live", &(top - 4..=top).collect::<Vec<_>>()).await?;
    let m = metrics(&node).await?;
    let others: Vec<String> =
        ["timeout", "memory", "trap", "out_of_bounds", "garbage", "guest_error", "invalid_output"]
            .into_iter()
            .filter(|r| *r != reason)
            .filter(|r| {
                m.value("switchyard_plugin_failures_total", &[("plugin", &name), ("reason", r)])
                    .is_some_and(|v| v > 0.0)
            })
            .map(String::from)
            .collect();
    assert!(others.is_empty(), "failures counted under other reasons too: {others:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_loop_times_out() -> anyhow::Result<()> {
    hostile_retention_falls_back("(loop $l (br $l)) (i64.const 0)", "timeout").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_bomb_hits_the_memory_limit() -> anyhow::Result<()> {
    // 1000 pages (64 MiB) against a 2 MiB limit.
    hostile_retention_falls_back("(drop (memory.grow (i32.const 1000))) (i64.const 0)", "memory").await
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_output_is_refused() -> anyhow::Result<()> {
    hostile_retention_falls_back(&output(64, 9), "garbage").await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_out_of_bounds_output_pointer_is_refused() -> anyhow::Result<()> {
    hostile_retention_falls_back(&output(0x7fff_0000, 64), "out_of_bounds").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trap_is_a_failure() -> anyhow::Result<()> {
    hostile_retention_falls_back("unreachable", "trap").await
}

/// An ABI v2 retention module (8-aligned bump allocator, the `switchyard.key` import as
/// `$key`) with `body` as its entry point; data at 16 is the v2 answer `Keep` (24 bytes).
fn abi_v2_module(body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
            (import "switchyard" "key" (func $key (param i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (global $bump (mut i32) (i32.const 1024))
            (data (i32.const 16) "\00\00\00\00\01\00\00\00")
            (func (export "switchyard_abi_v2"))
            (func (export "switchyard_alloc") (param $n i32) (result i32)
              (local $p i32) (local.set $p (global.get $bump))
              (global.set $bump (i32.and (i32.add (i32.add (local.get $p) (local.get $n)) (i32.const 7)) (i32.const -8)))
              (local.get $p))
            (func (export "switchyard_retention") (param $p i32) (param $l i32) (result i64) {body}))"#
    ))
    .expect("valid wat")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_v2_endless_loop_times_out() -> anyhow::Result<()> {
    hostile_module_falls_back(&abi_v2_module("(loop $l (br $l)) (i64.const 0)"), "hostile-v2-loop", "timeout").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_v2_key_index_out_of_range_is_refused() -> anyhow::Result<()> {
    let body = format!("(drop (call $key (i32.const 1000000) (i32.const 512) (i32.const 16))) {}", output(16, 24));
    hostile_module_falls_back(&abi_v2_module(&body), "hostile-v2-key", "out_of_bounds").await
}

/// The ABI v1 build of keep-last (`tests/plugins/dist/keep-last-v1.wasm`) keeps working
/// beside v2 plugins, listed as ABI 1.
#[tokio::test(flavor = "multi_thread")]
async fn an_abi_v1_plugin_still_works() -> anyhow::Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist/keep-last-v1.wasm");
    let v1 =
        std::fs::read(&path).with_context(|| format!("{}: build it with scripts/build-plugins.sh", path.display()))?;
    let plugins = PluginDir::new();
    plugins.install("old", &v1);
    plugins.install_example("keep-last", "new");
    let node = Node::start(&config(
        &plugins,
        "[namespaces.a]\nretention = { plugin = \"old\", params = { count = 3 } }\n\
         [namespaces.b]\nretention = { plugin = \"new\", params = { count = 2 } }\n",
    ));
    let mut c = node.client().await;
    c.publish_many("a:x", (1..=10).map(|i| json!(i))).await?;
    c.publish_many("b:x", (1..=10).map(|i| json!(i))).await?;
    wait_for_offsets(&mut c, "a:x", &[8, 9, 10]).await?;
    wait_for_offsets(&mut c, "b:x", &[9, 10]).await?;
    for (name, abi) in [("old", 1), ("new", 2)] {
        let row = plugin_row(&node, name).await?.context("listed")?;
        assert_eq!(
            (&row["abi_version"], &row["state"], &row["failures"]),
            (&json!(abi), &json!("active"), &json!(0)),
            "{row}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn modules_that_break_the_abi_are_refused_at_load() -> anyhow::Result<()> {
    let wat = |text: &str| wat::parse_str(text).expect("valid wat");
    let entry = r#"(func (export "switchyard_retention") (param i32 i32) (result i64) (i64.const 0))"#;
    let alloc = r#"(func (export "switchyard_alloc") (param i32) (result i32) (i32.const 1024))"#;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "abi-v3",
            wat(&format!(
                r#"(module (memory (export "memory") 1) (func (export "switchyard_abi_v3")) {alloc} {entry})"#
            )),
            "switchyard_abi_v3",
        ),
        (
            "no-marker",
            wat(&format!(r#"(module (memory (export "memory") 1) {alloc} {entry})"#)),
            "unsupported ABI version",
        ),
        (
            "no-alloc",
            wat(&format!(r#"(module (memory (export "memory") 1) (func (export "switchyard_abi_v1")) {entry})"#)),
            "switchyard_alloc",
        ),
        (
            "no-memory",
            wat(&format!(r#"(module (memory 1) (func (export "switchyard_abi_v1")) {alloc} {entry})"#)),
            "memory",
        ),
        (
            "no-entry",
            wat(&format!(r#"(module (memory (export "memory") 1) (func (export "switchyard_abi_v1")) {alloc})"#)),
            "no entry point",
        ),
        (
            "wasi",
            wat(&format!(
                r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                     (memory (export "memory") 1) (func (export "switchyard_abi_v1")) {alloc} {entry})"#
            )),
            "forbidden import",
        ),
        ("garbage", b"definitely not a wasm module".to_vec(), "not a valid wasm module"),
    ];
    let plugins = PluginDir::new();
    for (name, bytes, _) in &cases {
        plugins.install(name, bytes);
    }
    let node = Node::start(&config(
        &plugins,
        "[namespaces.v2]\nhistory_size = 5\nretention = { plugin = \"abi-v3\" }\n\
         [namespaces.ne]\nhistory_size = 5\nretention = { plugin = \"no-entry\" }\n",
    ));
    for (name, bytes, why) in &cases {
        let row = wait_plugin_row(&node, name, "listed", |_| true).await?;
        assert_eq!(row["state"], "rejected", "{row}");
        assert_eq!((&row["sha256"], &row["abi_version"]), (&Value::Null, &Value::Null), "{row}");
        assert_eq!(row["kinds"], json!([]), "{row}");
        assert_eq!(row["file_sha256"], sha256_hex(bytes).as_str(), "{row}");
        let err = row["last_error"].as_str().unwrap_or_default();
        assert!(err.contains(why), "{name}: last_error should mention {why:?}: {row}");
    }
    let abi = plugin_row(&node, "abi-v3").await?.context("listed")?;
    assert!(abi["last_error"].as_str().unwrap_or_default().contains("unsupported ABI version"), "{abi}");
    // Namespaces bound to a refused module use their built-in limits.
    let mut c = node.client().await;
    for ns in ["v2", "ne"] {
        let channel = format!("{ns}:a");
        c.publish_many(&channel, (1..=12).map(|i| json!(i))).await?;
        wait_for_offsets(&mut c, &channel, &[8, 9, 10, 11, 12]).await?;
    }
    for (name, _, _) in &cases {
        let row = plugin_row(&node, name).await?.context("listed")?;
        assert_eq!(
            (&row["calls"], &row["state"]),
            (&json!(0), &json!("rejected")),
            "a refused module is never called: {row}"
        );
    }
    Ok(())
}

// === 4. plugin check ===

#[test]
fn plugin_check_accepts_a_good_module_and_refuses_a_bad_one() -> anyhow::Result<()> {
    let good = plugins_dist().join("keep-last.wasm");
    example_plugin("keep-last"); // a clear message when the plugins are not built
    let out = Command::new(router_bin())
        .args(["plugin", "check"])
        .arg(&good)
        .args(["--params", r#"{"count":10}"#, "--calls", "2"])
        .env("NO_COLOR", "1")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check of keep-last failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.lines().any(|l| l.trim() == "kinds: retention"), "{stdout}");
    assert!(!stdout.contains("FAILED"), "{stdout}");

    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("garbage.wasm");
    std::fs::write(&bad, b"this is not a wasm module")?;
    let out = Command::new(router_bin()).args(["plugin", "check"]).arg(&bad).env("NO_COLOR", "1").output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "check of a garbage file succeeded:\n{stdout}");
    assert!(stdout.contains("REFUSED"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[test]
fn plugin_check_json_reports_every_size() -> anyhow::Result<()> {
    let good = plugins_dist().join("latest-per-key.wasm");
    example_plugin("latest-per-key");
    let out = Command::new(router_bin())
        .args(["plugin", "check"])
        .arg(&good)
        .args(["--params", r#"{"tombstone_delay_ms":0}"#, "--calls", "1", "--json"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(stdout.trim())?;
    assert_eq!((&report["abi"], &report["kinds"]), (&json!(2), &json!(["compaction"])), "{report}");
    assert_eq!(report["sha256"], sha256_hex(&std::fs::read(&good)?).as_str());
    let calls = report["calls"].as_array().context("calls")?;
    let sizes: Vec<u64> = calls.iter().filter_map(|c| c["n"].as_u64()).collect();
    assert_eq!(sizes, vec![100, 1_000, 10_000], "{report}");
    for c in calls {
        assert_eq!(c["kind"], "compaction", "{c}");
        assert!(c["wasm_ns"].as_u64().is_some_and(|n| n > 0) && c["native_ns"].is_u64(), "{c}");
        assert!(c["decisions"].as_str().is_some_and(|d| d.starts_with("removes ")), "{c}");
    }
    Ok(())
}

/// `switchyard plugin new` makes a crate whose native tests pass out of the box, for each
/// kind (built in the plugins' shared native target dir, offline: no new dependencies).
#[test]
fn plugin_new_scaffolds_crates_that_test_green() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins-native");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for kind in ["retention", "compaction", "balance"] {
        let crate_dir = dir.path().join(kind);
        let out = Command::new(router_bin())
            .args(["plugin", "new", &format!("my-{kind}"), "--kind", kind, "--dir"])
            .arg(&crate_dir)
            .output()?;
        assert!(out.status.success(), "plugin new --kind {kind}: {}", String::from_utf8_lossy(&out.stderr));
        let test = Command::new(&cargo)
            .args(["test", "--offline", "--quiet"])
            .current_dir(&crate_dir)
            .env("CARGO_TARGET_DIR", &target)
            .output()?;
        assert!(
            test.status.success(),
            "cargo test of the {kind} scaffold failed:\n{}\n{}",
            String::from_utf8_lossy(&test.stdout),
            String::from_utf8_lossy(&test.stderr)
        );
    }
    // An existing, non-empty directory is never overwritten.
    let again = Command::new(router_bin())
        .args(["plugin", "new", "my-retention", "--kind", "retention", "--dir"])
        .arg(dir.path().join("retention"))
        .output()?;
    assert!(!again.status.success());
    Ok(())
}

/// A v2 retention module that reads a payload by an index past the call's messages
/// (`switchyard.payload`, the lazy payload read) faults like an out-of-range key read: the
/// built-in decides, the failure counts as `out_of_bounds` toward quarantine, and clients
/// publish and receive without loss meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_v2_payload_index_out_of_range_is_refused() -> anyhow::Result<()> {
    let module = wat::parse_str(format!(
        r#"(module
            (import "switchyard" "payload" (func $payload (param i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (global $bump (mut i32) (i32.const 1024))
            (data (i32.const 16) "\00\00\00\00\01\00\00\00")
            (func (export "switchyard_abi_v2"))
            (func (export "switchyard_alloc") (param $n i32) (result i32)
              (local $p i32) (local.set $p (global.get $bump))
              (global.set $bump (i32.and (i32.add (i32.add (local.get $p) (local.get $n)) (i32.const 7)) (i32.const -8)))
              (local.get $p))
            (func (export "switchyard_retention") (param $p i32) (param $l i32) (result i64)
              (drop (call $payload (i32.const 1000000) (i32.const 512) (i32.const 16))) {}))"#,
        output(16, 24)
    ))
    .expect("valid wat");
    hostile_module_falls_back(&module, "hostile-v2-payload", "out_of_bounds").await
}

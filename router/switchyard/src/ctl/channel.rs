//! `ctl channel NAME`: one channel's placement and facts.
//!
//! It owns asking any node for the channel (`GET /api/v1/channels/NAME/info`: its partition,
//! leader and replicas from the map), then its partition's leader for the facts only the
//! leader has (offsets, retained messages and bytes, policies, presence, durable consumers
//! and their lag), and printing them. It must never change anything.

use serde_json::Value;

use super::client::{Client, CtlError};
use super::table;
use super::view;

/// `ctl channel NAME`.
pub(crate) async fn run(client: &mut Client, json: bool, name: &str) -> Result<(), CtlError> {
    if !switchyard_proto::channel::is_valid_name(name) {
        return Err(CtlError::Usage(format!("invalid channel name {name:?}: 1-255 characters of [A-Za-z0-9_:.@-]")));
    }
    let path = format!("/api/v1/channels/{name}/info");
    let first = client.call(hyper::Method::GET, &path, None).await?.body;
    let facts = if first.get("local").and_then(Value::as_bool) == Some(true) {
        first
    } else {
        let leader = first.get("leader").and_then(Value::as_str).unwrap_or_default().to_string();
        if leader.is_empty() {
            return Err(CtlError::Refused(format!(
                "partition {} of {name} has no leader now",
                first.get("partition").unwrap_or(&Value::Null)
            )));
        }
        let (cluster, _) = view::fetch(client).await?;
        let url = cluster.node(&leader)?.url.clone();
        let facts = client.call_node(&url, hyper::Method::GET, &path, None).await?.body;
        if facts.get("local").and_then(Value::as_bool) != Some(true) {
            return Err(CtlError::Refused(format!(
                "{url}: the leader of {name}'s partition moved while asking; try again"
            )));
        }
        facts
    };
    if facts.get("top").is_none() {
        return Err(CtlError::Node(format!("{}: malformed channel answer: no `top`", client.url())));
    }
    if json {
        println!("{facts}");
        return Ok(());
    }
    print!("{}", render(&facts));
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// The facts as `key: value` lines and a consumers table.
fn render(f: &Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<12} {v}\n"));
    line(&mut out, "channel", s(&f["channel"]));
    line(&mut out, "partition", s(&f["partition"]));
    line(&mut out, "leader", format!("{} (leader epoch {})", s(&f["leader"]), s(&f["leader_epoch"])));
    line(&mut out, "replicas", s(&f["replicas"]));
    line(&mut out, "isr", s(&f["isr"]));
    line(&mut out, "map epoch", s(&f["map_epoch"]));
    if f["exists"] == Value::Bool(false) {
        line(&mut out, "stored", "nothing (no message was ever published here)".into());
    }
    line(&mut out, "epoch", s(&f["epoch"]));
    line(&mut out, "offsets", format!("first {} top {}", s(&f["first"]), s(&f["top"])));
    line(&mut out, "retained", format!("{} messages, {} bytes", s(&f["messages"]), s(&f["bytes"])));
    let p = &f["policies"];
    let mut policy = format!(
        "namespace {}, rule {}, history_size {}, history_ttl {}, history_bytes {}",
        s(&p["namespace"]),
        s(&p["rule"]),
        s(&p["history_size"]),
        s(&p["history_ttl"]),
        s(&p["history_bytes"])
    );
    if !p["retention_plugin"].is_null() {
        policy.push_str(&format!(", retention plugin {}", s(&p["retention_plugin"])));
    }
    if !p["compaction"].is_null() {
        policy.push_str(&format!(", compaction {}", s(&p["compaction"])));
    }
    line(&mut out, "policies", policy);
    match &f["presence"] {
        Value::Null => line(&mut out, "presence", "off in this namespace".into()),
        pr => line(&mut out, "presence", format!("{} clients, {} users", s(&pr["clients"]), s(&pr["users"]))),
    }
    let consumers = f["consumers"].as_array().cloned().unwrap_or_default();
    if consumers.is_empty() {
        line(&mut out, "consumers", "none".into());
    } else {
        let rows: Vec<Vec<String>> =
            consumers.iter().map(|c| vec![s(&c["name"]), s(&c["committed"]), s(&c["lag"])]).collect();
        out.push_str(&table::render(&["CONSUMER", "COMMITTED", "LAG"], &rows));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn facts_render_with_consumers() {
        let f = serde_json::json!({"channel": "room:1", "partition": 3, "leader": "n1", "leader_epoch": 2,
            "replicas": ["n1", "n2"], "isr": ["n1", "n2"], "map_epoch": 7, "exists": true, "epoch": "e1",
            "first": 1, "top": 10, "messages": 10, "bytes": 200,
            "policies": {"namespace": "room", "rule": "public", "history_size": 100, "history_ttl": "0s", "history_bytes": 0},
            "presence": {"clients": 2, "users": 1},
            "consumers": [{"name": "phone", "committed": 7, "lag": 3}]});
        let out = super::render(&f);
        assert!(out.contains("leader       n1 (leader epoch 2)"), "{out}");
        assert!(out.contains("phone     7          3"), "{out}");
        assert!(out.contains("2 clients, 1 users"), "{out}");
    }
}

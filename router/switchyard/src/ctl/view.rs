//! `ctl status` and `ctl map`: the cluster view (`GET /api/v1/cluster`) as tables.
//!
//! It owns reading the view into typed rows ([`ClusterView`]; an answer without the
//! fields is a malformed answer, not a panic), what counts as under-replicated (an ISR
//! shorter than the replica list, as the chat page shows it) and the two commands. It must
//! never change anything in the cluster.

use serde::Deserialize;
use serde_json::Value;

use super::client::{Client, CtlError};
use super::table;

/// The fields of `GET /api/v1/cluster` that ctl reads.
#[derive(Debug, Deserialize)]
pub(crate) struct ClusterView {
    /// `cluster` or `standalone`.
    pub mode: String,
    /// The cluster name (cluster mode).
    #[serde(default)]
    pub cluster: Option<String>,
    /// The cluster leader's id.
    #[serde(default)]
    pub leader: Option<String>,
    /// Map epoch.
    pub epoch: u64,
    /// Partition count.
    pub partitions: u32,
    /// Live members.
    pub nodes: Vec<NodeRow>,
    /// Leader of every partition ("" when none).
    pub owners: Vec<String>,
    /// Replicas of every partition (empty when unreplicated).
    #[serde(default)]
    pub replicas: Vec<Vec<String>>,
    /// ISR of every partition (empty when unreplicated).
    #[serde(default)]
    pub isr: Vec<Vec<String>>,
    /// Leader epoch of every partition.
    #[serde(default)]
    pub leader_epochs: Vec<u64>,
}

/// One member.
#[derive(Debug, Deserialize)]
pub(crate) struct NodeRow {
    pub id: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub draining: bool,
}

impl ClusterView {
    /// Reads a view, naming the node when it is not one.
    pub(crate) fn parse(url: &str, v: Value) -> Result<Self, CtlError> {
        let view: Self =
            serde_json::from_value(v).map_err(|e| CtlError::Node(format!("{url}: malformed cluster view: {e}")))?;
        if view.owners.len() != view.partitions as usize {
            return Err(CtlError::Node(format!(
                "{url}: malformed cluster view: {} owners for {} partitions",
                view.owners.len(),
                view.partitions
            )));
        }
        Ok(view)
    }

    /// Replicas of partition `p` (its leader alone when unreplicated).
    pub(crate) fn replicas_of(&self, p: usize) -> Vec<String> {
        self.replicas.get(p).cloned().unwrap_or_else(|| vec![self.owners[p].clone()])
    }

    /// ISR of partition `p` (its leader alone when unreplicated).
    pub(crate) fn isr_of(&self, p: usize) -> Vec<String> {
        self.isr.get(p).cloned().unwrap_or_else(|| vec![self.owners[p].clone()])
    }

    /// Partitions whose ISR is shorter than their replica list, or that have no leader.
    pub(crate) fn under_replicated(&self) -> Vec<usize> {
        (0..self.owners.len())
            .filter(|p| self.owners[*p].is_empty() || self.isr_of(*p).len() < self.replicas_of(*p).len())
            .collect()
    }

    /// The member `id`, or a usage error listing the members.
    pub(crate) fn node(&self, id: &str) -> Result<&NodeRow, CtlError> {
        self.nodes.iter().find(|n| n.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.nodes.iter().map(|n| n.id.as_str()).collect();
            CtlError::Usage(format!("node {id} is not a live member (members: {})", ids.join(", ")))
        })
    }

    /// Partitions `id` leads, and partitions it holds a replica of (leading included).
    pub(crate) fn load_of(&self, id: &str) -> (usize, usize) {
        let leads = self.owners.iter().filter(|o| *o == id).count();
        let holds = (0..self.owners.len()).filter(|p| self.replicas_of(*p).iter().any(|r| r == id)).count();
        (leads, holds)
    }
}

/// The cluster view from the first node that answers.
pub(crate) async fn fetch(client: &mut Client) -> Result<(ClusterView, Value), CtlError> {
    let raw = client.cluster().await?;
    Ok((ClusterView::parse(client.url(), raw.clone())?, raw))
}

/// `ctl status`.
pub(crate) async fn status(client: &mut Client, json: bool) -> Result<(), CtlError> {
    let (view, _) = fetch(client).await?;
    // Plugins are per node: ask each member for its list (one that does not answer is
    // shown as such, not an error of the whole command).
    let mut quarantined: Vec<(String, String)> = Vec::new();
    let mut unreachable: Vec<String> = Vec::new();
    for n in &view.nodes {
        let url = if view.mode == "standalone" { client.url().to_string() } else { n.url.clone() };
        match client.call_node(&url, hyper::Method::GET, "/api/v1/plugins", None).await {
            Ok(a) => {
                for p in a.body.get("plugins").and_then(Value::as_array).into_iter().flatten() {
                    if p.get("state").and_then(Value::as_str) == Some("quarantined") {
                        let name = p.get("name").and_then(Value::as_str).unwrap_or("?").to_string();
                        quarantined.push((n.id.clone(), name));
                    }
                }
            }
            Err(e) => unreachable.push(format!("{}: {e}", n.id)),
        }
    }
    let under = view.under_replicated();
    if json {
        let nodes: Vec<Value> = view
            .nodes
            .iter()
            .map(|n| {
                let (leads, holds) = view.load_of(&n.id);
                serde_json::json!({ "id": n.id, "url": n.url, "version": n.version, "draining": n.draining,
                    "leads": leads, "replicas": holds })
            })
            .collect();
        let quarantined: Vec<Value> =
            quarantined.iter().map(|(n, p)| serde_json::json!({ "node": n, "plugin": p })).collect();
        let v = serde_json::json!({
            "mode": view.mode, "cluster": view.cluster, "leader": view.leader, "epoch": view.epoch,
            "partitions": view.partitions, "nodes": nodes, "under_replicated": under,
            "quarantined_plugins": quarantined, "unreachable": unreachable,
        });
        println!("{v}");
        return Ok(());
    }
    let name = view.cluster.as_deref().map_or("standalone".to_string(), |c| format!("cluster {c}"));
    println!(
        "{name}  leader {}  map epoch {}  partitions {}",
        view.leader.as_deref().unwrap_or("none"),
        view.epoch,
        view.partitions
    );
    let rows: Vec<Vec<String>> = view
        .nodes
        .iter()
        .map(|n| {
            let (leads, holds) = view.load_of(&n.id);
            let state = if n.draining { "draining" } else { "serving" };
            let lead_mark = if view.leader.as_deref() == Some(n.id.as_str()) { "*" } else { "" };
            vec![
                format!("{}{lead_mark}", n.id),
                state.into(),
                n.version.clone(),
                leads.to_string(),
                holds.to_string(),
                n.url.clone(),
            ]
        })
        .collect();
    print!("{}", table::render(&["NODE", "STATE", "VERSION", "LEADS", "REPLICAS", "URL"], &rows));
    let shown: Vec<String> = under.iter().take(20).map(|p| p.to_string()).collect();
    let more = if under.len() > 20 { format!(" (and {} more)", under.len() - 20) } else { String::new() };
    println!(
        "under-replicated partitions: {}{}{more}",
        under.len(),
        if under.is_empty() { String::new() } else { format!(" ({})", shown.join(", ")) }
    );
    if quarantined.is_empty() {
        println!("plugins in quarantine: none");
    } else {
        let list: Vec<String> = quarantined.iter().map(|(n, p)| format!("{p} on {n}")).collect();
        println!("plugins in quarantine: {}", list.join(", "));
    }
    for u in unreachable {
        println!("plugin list unavailable from {u}");
    }
    Ok(())
}

/// `ctl map`.
pub(crate) async fn map(
    client: &mut Client,
    json: bool,
    node: Option<String>,
    under_replicated: bool,
) -> Result<(), CtlError> {
    let (view, _) = fetch(client).await?;
    if let Some(n) = &node {
        view.node(n)?;
    }
    let under = view.under_replicated();
    let picked: Vec<usize> = (0..view.owners.len())
        .filter(|p| node.as_ref().is_none_or(|n| view.replicas_of(*p).contains(n) || view.owners[*p] == *n))
        .filter(|p| !under_replicated || under.contains(p))
        .collect();
    if json {
        let rows: Vec<Value> = picked
            .iter()
            .map(|p| {
                serde_json::json!({ "partition": p, "leader": view.owners[*p], "replicas": view.replicas_of(*p),
                    "isr": view.isr_of(*p), "leader_epoch": view.leader_epochs.get(*p),
                    "under_replicated": under.contains(p) })
            })
            .collect();
        println!("{}", serde_json::json!({ "epoch": view.epoch, "partitions": rows }));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = picked
        .iter()
        .map(|p| {
            let leader = if view.owners[*p].is_empty() { "-".to_string() } else { view.owners[*p].clone() };
            vec![
                p.to_string(),
                leader,
                view.replicas_of(*p).join(","),
                view.isr_of(*p).join(","),
                view.leader_epochs.get(*p).map_or("-".into(), u64::to_string),
                if under.contains(p) { "under-replicated".into() } else { String::new() },
            ]
        })
        .collect();
    println!("map epoch {}", view.epoch);
    print!("{}", table::render(&["PARTITION", "LEADER", "REPLICAS", "ISR", "LEADER_EPOCH", ""], &rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_parse_and_count() {
        let v = serde_json::json!({"mode": "cluster", "cluster": "c", "leader": "a", "epoch": 4, "partitions": 3,
            "nodes": [{"id": "a", "url": "http://x"}, {"id": "b", "url": "http://y", "draining": true}],
            "owners": ["a", "b", ""], "replicas": [["a", "b"], ["b", "a"], ["a"]], "isr": [["a", "b"], ["b"], []]});
        let view = ClusterView::parse("u", v).unwrap();
        assert_eq!(view.under_replicated(), vec![1, 2]);
        assert_eq!(view.load_of("a"), (1, 3));
        assert!(view.node("zz").unwrap_err().to_string().contains("members: a, b"));
        // Not a view: one line naming the node, no panic.
        let e = ClusterView::parse("http://u", serde_json::json!({"hello": 1})).unwrap_err().to_string();
        assert!(e.starts_with("http://u: malformed cluster view"), "{e}");
        let short = serde_json::json!({"mode": "cluster", "epoch": 1, "partitions": 4, "nodes": [], "owners": ["a"]});
        assert!(ClusterView::parse("u", short).is_err());
    }
}

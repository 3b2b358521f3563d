//! Damaged data on disk (issue #30): a journal with a flipped byte or cut short, a table
//! with a flipped byte, and `switchyard store check|repair` on each.
//!
//! It owns the promises that a node with a damaged journal starts, keeps exactly the
//! batches before the damage, says at ERROR what it dropped, keeps the damaged file in
//! `damaged/` and counts it; that a damaged table answers `unavailable` without a
//! library's text while other channels keep serving, and shows in `/healthz` and the
//! metrics; and that `store check` finds each case (and nothing on a clean directory).

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context as _, Result};
use serde_json::{json, Value};
use switchyard_proto::partition::partition_of;
use switchyard_store::repair::{journal_batches, BatchAt};
use switchyard_tests::*;

/// Acknowledged after fsync, so after `kill -9` every acknowledged publish is in the journal.
const CONFIG: &str = "fsync = \"batch\"\n";

/// Publishes `n` numbered messages to `channel` one at a time (one store batch each).
async fn publish_n(c: &mut Client, channel: &str, n: u64) -> Result<()> {
    for i in 1..=n {
        let (offset, _) = c.publish(channel, json!({ "n": i, "tag": format!("m{i:05}") })).await?;
        ensure!(offset == i, "offset {offset} for message {i}");
    }
    Ok(())
}

/// The last journal file and its last whole batch.
fn last_batch(data: &Path) -> Result<(std::path::PathBuf, BatchAt)> {
    let journals = journal_batches(data)?;
    let (file, batches) = journals.into_iter().rev().find(|(_, b)| !b.is_empty()).context("no journal batch")?;
    Ok((file, *batches.last().context("no batch")?))
}

/// Runs `switchyard store <what> <dir>`: (exit code, stdout).
fn store_cmd(what: &str, dir: &Path) -> Result<(i32, String)> {
    let out = Command::new(router_bin()).args(["store", what]).arg(dir).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code().with_context(|| format!("store {what} was killed"))?;
    ensure!(code != 2, "store {what} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok((code, stdout))
}

/// Writes `n` messages, then kills the node: the messages live only in its journal; the
/// last journal batch must hold the last message (checked).
async fn node_with_journal(channel: &str, n: u64) -> Result<(Node, std::path::PathBuf, BatchAt)> {
    let mut node = Node::start(CONFIG);
    let mut c = node.client().await;
    publish_n(&mut c, channel, n).await?;
    drop(c);
    node.kill9();
    let (file, last) = last_batch(&node.data_dir())?;
    let bytes = std::fs::read(&file)?;
    let batch = &bytes[last.at as usize..last.end as usize];
    let tag = format!("m{n:05}");
    ensure!(batch.windows(tag.len()).any(|w| w == tag.as_bytes()), "the last journal batch is not the last publish");
    Ok((node, file, last))
}

fn flip(file: &Path, at: u64) -> Result<()> {
    let mut bytes = std::fs::read(file)?;
    bytes[at as usize] ^= 0x5a;
    std::fs::write(file, bytes)?;
    Ok(())
}

fn damaged_files(data: &Path) -> Vec<std::path::PathBuf> {
    let Ok(dirs) = std::fs::read_dir(data.join("damaged")) else { return Vec::new() };
    dirs.flatten().flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten().map(|f| f.path())).collect()
}

/// The first `store journal damaged` ERROR line of the node's log.
fn repair_line(node: &Node) -> Option<String> {
    node.stderr().lines().find(|l| l.contains("ERROR") && l.contains("store journal damaged")).map(str::to_string)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flipped_byte_in_the_journal_costs_only_the_damaged_batch() -> Result<()> {
    const N: u64 = 300;
    let (mut node, file, last) = node_with_journal("j:flip", N).await?;
    let (clean, out) = store_cmd("check", &node.data_dir())?;
    ensure!(clean == 0, "check on an intact journal after kill -9 says damaged:\n{out}");
    flip(&file, last.at + (last.end - last.at) / 2)?;

    let (code, out) = store_cmd("check", &node.data_dir())?;
    ensure!(code == 1, "check must exit 1 on a damaged journal:\n{out}");
    ensure!(out.contains("DAMAGED") && out.contains("checksum mismatch"), "check output:\n{out}");
    ensure!(out.contains(&format!("seqnos [{}]", last.seqno)), "check names the dropped seqno:\n{out}");
    ensure!(damaged_files(&node.data_dir()).is_empty(), "check wrote nothing");

    // fjall alone refuses this journal (ChecksumMismatch); start-up repair lets it start.
    node.restart();
    let line = repair_line(&node).context("no ERROR line about the repair")?;
    ensure!(line.contains("dropped_batches=1") && line.contains(&format!("dropped_seqnos=[{}]", last.seqno)), "{line}");
    let mut c = node.client().await;
    let history = c.history_all("j:flip").await?;
    assert_eq!(history.offsets(), (1..N).collect::<Vec<_>>(), "exactly the messages before the damaged batch");
    let damaged = damaged_files(&node.data_dir());
    assert_eq!(damaged.len(), 1, "the damaged journal is kept: {damaged:?}");
    assert_eq!(damaged[0].file_name(), file.file_name());
    let m = metrics(&node).await?;
    assert_eq!(m.value("switchyard_store_journal_dropped_batches_total", &[]), Some(1.0));
    assert!(m.value("switchyard_store_journal_dropped_bytes_total", &[]).unwrap_or(0.0) >= (last.end - last.at) as f64);
    // The channel goes on from where the kept log ends.
    let (offset, _) = c.publish("j:flip", json!("after")).await?;
    assert_eq!(offset, N, "the next offset follows the kept messages");
    drop(c);

    // A clean stop and start: nothing more to repair, nothing more dropped.
    node.restart();
    let repairs = node.stderr().matches("store journal damaged").count();
    assert_eq!(repairs, 1, "the second start found nothing to repair");
    assert_eq!(node.client().await.history_all("j:flip").await?.offsets().len() as u64, N);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_journal_cut_short_is_repaired_by_the_cli_and_says_what_it_dropped() -> Result<()> {
    const N: u64 = 200;
    let (mut node, file, last) = node_with_journal("j:cut", N).await?;
    // Cut inside the last batch (as a lost tail of a file would).
    let cut = last.at + 20;
    std::fs::OpenOptions::new().write(true).open(&file)?.set_len(cut)?;

    let (code, out) = store_cmd("check", &node.data_dir())?;
    ensure!(code == 1 && out.contains("cut short"), "check:\n{out}");
    let (code, out) = store_cmd("repair", &node.data_dir())?;
    ensure!(code == 0, "repair exits 0 once the journal is mended:\n{out}");
    ensure!(out.contains("dropped in all: 1 batch(es), 20 bytes") && out.contains("repaired;"), "repair:\n{out}");
    assert_eq!(std::fs::metadata(&file)?.len(), last.at, "cut at the end of the last whole batch");
    assert_eq!(damaged_files(&node.data_dir()).len(), 1);
    let (code, out) = store_cmd("check", &node.data_dir())?;
    ensure!(code == 0, "intact after the repair:\n{out}");

    node.restart();
    ensure!(repair_line(&node).is_none(), "start-up found nothing left to repair");
    let history = node.client().await.history_all("j:cut").await?;
    assert_eq!(history.offsets(), (1..N).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_journal_cut_short_at_start_up_logs_the_drop() -> Result<()> {
    const N: u64 = 50;
    let (mut node, file, last) = node_with_journal("j:cut2", N).await?;
    std::fs::OpenOptions::new().write(true).open(&file)?.set_len(last.end - 3)?;
    node.restart();
    let line = repair_line(&node).context("no ERROR line: fjall alone would drop the batch silently")?;
    ensure!(line.contains("cut short") && line.contains("dropped_batches=1"), "{line}");
    assert_eq!(node.client().await.history_all("j:cut2").await?.offsets(), (1..N).collect::<Vec<_>>());
    Ok(())
}

/// Two channels in different partitions, one large; returns them.
fn two_channels() -> (String, String) {
    let big = "t:big".to_string();
    let p = partition_of(&big, 64);
    let small = (0..).map(|i| format!("t:small{i}")).find(|c| partition_of(c, 64) != p).expect("some channel");
    (big, small)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_table_answers_unavailable_and_shows_in_healthz() -> Result<()> {
    let (big, small) = two_channels();
    let mut node = Node::start(CONFIG);
    let mut c = node.client().await;
    // About 400 KB of incompressible payloads: many data blocks.
    let payload = |i: u64| {
        let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (0..64)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("{:016x}", x)
            })
            .collect::<String>()
    };
    c.publish_many(&big, (1..=400).map(|i| json!(payload(i)))).await?;
    c.publish_many(&small, (1..=5).map(|i| json!(i))).await?;
    drop(c);
    let status = node.terminate();
    ensure!(status.success(), "clean stop: {status}");

    // Force the messages into a table: open the stopped node's store and flush.
    {
        let db = fjall::Database::builder(node.data_dir()).open()?;
        for name in ["messages", "channels", "consumers", "adopted", "replog"] {
            db.keyspace(name, fjall::KeyspaceCreateOptions::default)?.rotate_memtable_and_wait()?;
        }
    }
    let (code, out) = store_cmd("check", &node.data_dir())?;
    ensure!(code == 0 && out.contains("0 damaged"), "clean tables:\n{out}");
    let table = largest_table(&node.data_dir())?;
    let len = std::fs::metadata(&table)?.len();
    flip(&table, len / 3)?;
    let (code, out) = store_cmd("check", &node.data_dir())?;
    ensure!(code == 1 && out.contains("tables: DAMAGED") && out.contains("block checksum mismatch"), "check:\n{out}");

    node.restart();
    let mut c = node.client().await;
    let reply = c.cmd("history", json!({ "channel": big, "limit": 1000 })).await?;
    assert_eq!(error_code(&reply)?, "unavailable", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default().to_lowercase();
    for leak in ["fjall", "checksum", "lsm", "block", "store:"] {
        assert!(!message.contains(leak), "the client sees library text ({leak}): {message}");
    }
    // A keyed publish needs the channel's idempotency window, read from the damaged
    // messages: refused with `unavailable` rather than stored without deduplication.
    let keyed = c.cmd("publish", json!({ "channel": big, "data": "k", "idempotency_key": "k1" })).await?;
    assert_eq!(error_code(&keyed)?, "unavailable", "{keyed}");
    assert!(!keyed["error"]["message"].as_str().unwrap_or_default().contains("fjall"), "{keyed}");
    // Other channels keep serving, reads and writes.
    assert_eq!(c.history_all(&small).await?.offsets(), vec![1, 2, 3, 4, 5]);
    assert_eq!(c.publish(&small, json!(6)).await?.0, 6);

    let health = http(node.addr(), "GET", "/healthz", None).await?;
    assert_eq!(health.status, 200, "still serving: {}", health.body);
    let body: Value = health.json()?;
    assert_eq!(body["store"], "damaged", "{body}");
    assert_eq!(body["damaged_partitions"], json!([partition_of(&big, 64)]), "{body}");
    let m = metrics(&node).await?;
    assert!(m.value("switchyard_store_read_errors_total", &[]).unwrap_or(0.0) >= 1.0);
    assert_eq!(m.value("switchyard_store_damaged_partitions", &[]), Some(1.0));
    // Repeated failures log one ERROR line per interval, not one per read.
    for _ in 0..20 {
        let reply = c.cmd("history", json!({ "channel": big, "limit": 1000 })).await?;
        assert_eq!(error_code(&reply)?, "unavailable");
    }
    let lines = node.stderr().lines().filter(|l| l.contains("ERROR") && l.contains("store read failed")).count();
    assert!((1..=3).contains(&lines), "{lines} ERROR lines for 21 failed reads: not rate-limited");
    Ok(())
}

fn largest_table(data: &Path) -> Result<std::path::PathBuf> {
    let mut tables = Vec::new();
    for ks in std::fs::read_dir(data.join("keyspaces"))? {
        let dir = ks?.path().join("tables");
        for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            tables.push((f.metadata()?.len(), f.path()));
        }
    }
    tables.into_iter().max().map(|(_, p)| p).context("no table file")
}

#[tokio::test(flavor = "multi_thread")]
async fn store_check_on_a_clean_directory_finds_nothing() -> Result<()> {
    let mut node = Node::start(CONFIG);
    let mut c = node.client().await;
    publish_n(&mut c, "c:clean", 20).await?;
    drop(c);
    let status = node.terminate();
    ensure!(status.success());
    let before = journal_batches(&node.data_dir())?;
    let (code, out) = store_cmd("check", &node.data_dir())?;
    ensure!(code == 0 && out.contains("journal: intact"), "{out}");
    let (code, out) = store_cmd("repair", &node.data_dir())?;
    ensure!(code == 0 && !out.contains("repaired;"), "{out}");
    assert_eq!(journal_batches(&node.data_dir())?, before, "a clean journal comes out untouched");
    ensure!(damaged_files(&node.data_dir()).is_empty());
    // A missing directory is an error (exit 2), not "clean".
    let out = Command::new(router_bin()).args(["store", "check", "/nonexistent/switchyard-data"]).output()?;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

// === cluster (replicas = 2) ===

mod cluster {
    use super::*;
    use switchyard_tests::etcd::{node_config, wait_converged, wait_in_sync, Etcd};

    const P: u32 = 16;

    fn start(etcd: &Etcd, cluster: &str, id: &str) -> Node {
        Node::start(&format!(
            "{}secret = \"corruption-tests-secret\"\nreplicas = 2\n",
            node_config(etcd, cluster, id, P, "fsync = \"batch\"")
        ))
    }

    /// A channel led by `owner` in `map`.
    fn channel_led_by(map: &Value, owner: &str) -> String {
        (0..)
            .map(|i| format!("rc:{i}"))
            .find(|c| map["owners"][partition_of(c, P) as usize] == owner)
            .expect("a channel")
    }

    /// Damages the last batch of `node`'s journal (it must hold the tag `tag`); returns
    /// its seqno.
    fn damage_last_batch(node: &Node, tag: &str) -> Result<u64> {
        let (file, last) = last_batch(&node.data_dir())?;
        let bytes = std::fs::read(&file)?;
        let batch = &bytes[last.at as usize..last.end as usize];
        ensure!(batch.windows(tag.len()).any(|w| w == tag.as_bytes()), "the last journal batch does not hold {tag}");
        flip(&file, last.at + (last.end - last.at) / 2)?;
        Ok(last.seqno)
    }

    /// A follower whose journal lost the last replicated batch restarts, re-fetches it
    /// from the leader and rejoins the ISR; then the leader dies and the follower leads
    /// with every acknowledged message.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_follower_with_a_damaged_journal_refetches_before_it_can_lead() -> Result<()> {
        const N: u64 = 60;
        let etcd = Etcd::start().await;
        let mut nodes = [start(&etcd, "cf", "n1"), start(&etcd, "cf", "n2"), start(&etcd, "cf", "n3")];
        let map = wait_converged(&etcd, "cf", &[&nodes[0], &nodes[1], &nodes[2]], &["n1", "n2", "n3"]).await?;
        let channel = channel_led_by(&map, "n2");
        let p = partition_of(&channel, P) as usize;
        let map = wait_in_sync(&etcd, "cf", p, 2).await?;
        let follower = map["isr"][p][1].as_str().context("a follower")?.to_string();
        let f = follower.trim_start_matches('n').parse::<usize>()? - 1;
        let mut c = nodes[1].client().await;
        publish_n(&mut c, &channel, N).await?;
        drop(c);

        nodes[f].kill9();
        let seqno = damage_last_batch(&nodes[f], &format!("m{N:05}"))?;
        nodes[f].restart();
        let line = repair_line(&nodes[f]).context("the follower logged no repair")?;
        ensure!(line.contains("dropped_batches=1") && line.contains(&format!("[{seqno}]")), "{line}");
        // It lost a batch it had acknowledged: out of the ISR first (so it cannot be elected
        // with the shorter log), then it catches up from the leader and is in sync again.
        let mut left = false;
        wait_until("the repaired follower leaves the ISR and rejoins it", DEADLINE, async || {
            let Some(m) = etcd.map("cf")? else { return Ok(false) };
            let listed = m["isr"][p].as_array().is_some_and(|isr| isr.contains(&json!(follower)));
            left |= !listed;
            Ok(left && listed)
        })
        .await?;
        // The leader dies: the repaired follower takes over with all N messages.
        nodes[1].kill9();
        wait_until("the repaired follower leads", DEADLINE, async || {
            let Some(m) = etcd.map("cf")? else { return Ok(false) };
            Ok(m["owners"][p] == json!(follower))
        })
        .await?;
        // The promotion reloads the partition: history answers once it is served.
        let mut c = nodes[f].client().await;
        let mut history = None;
        wait_until("the promoted follower serves history", DEADLINE, async || {
            history = c.history_all(&channel).await.ok();
            Ok(history.is_some())
        })
        .await?;
        let history = history.context("history")?;
        assert_eq!(
            history.offsets(),
            (1..=N).collect::<Vec<_>>(),
            "every acknowledged message, from the leader's copy"
        );
        let log = nodes[f].stderr();
        let how = log
            .lines()
            .skip_while(|l| !l.contains("store journal damaged"))
            .find(|l| l.contains(&format!("snapshot taken partition={p} ")))
            .map_or("by fetching the dropped batch", |_| "by a snapshot");
        eprintln!("follower {follower}: dropped batch seqno {seqno} at start-up, recovered from n2 {how}; leads with {N} of {N}");
        Ok(())
    }

    /// A leader whose journal lost the last acknowledged batch restarts. Its in-sync
    /// follower holds that batch: it must not be wiped by a resync from the shorter leader,
    /// and every acknowledged message must stay readable somewhere.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_leader_with_a_damaged_journal_never_wipes_its_in_sync_follower() -> Result<()> {
        const N: u64 = 60;
        let etcd = Etcd::start().await;
        let mut nodes = [start(&etcd, "cl", "n1"), start(&etcd, "cl", "n2"), start(&etcd, "cl", "n3")];
        let map = wait_converged(&etcd, "cl", &[&nodes[0], &nodes[1], &nodes[2]], &["n1", "n2", "n3"]).await?;
        let channel = channel_led_by(&map, "n2");
        let p = partition_of(&channel, P) as usize;
        let map = wait_in_sync(&etcd, "cl", p, 2).await?;
        let follower = map["isr"][p][1].as_str().context("a follower")?.to_string();
        let mut c = nodes[1].client().await;
        publish_n(&mut c, &channel, N).await?;
        drop(c);

        nodes[1].kill9();
        let seqno = damage_last_batch(&nodes[1], &format!("m{N:05}"))?;
        nodes[1].restart();
        ensure!(repair_line(&nodes[1]).is_some(), "the leader logged no repair");
        // Whoever leads the partition once things settle, the acknowledged messages are
        // all there: a write goes through at offset N + 1.
        let mut owner = String::new();
        let mut offset = 0;
        wait_until("a write to the channel is acknowledged", DEADLINE * 2, async || {
            let Some(m) = etcd.map("cl")? else { return Ok(false) };
            owner = m["owners"][p].as_str().unwrap_or_default().to_string();
            let i = owner.trim_start_matches('n').parse::<usize>().unwrap_or(1) - 1;
            let Ok(mut c) = Client::connect_to(nodes[i].addr()).await else { return Ok(false) };
            match c.publish(&channel, json!("after")).await {
                Ok((o, _)) => {
                    offset = o;
                    Ok(true)
                }
                Err(_) => Ok(false),
            }
        })
        .await?;
        let i = owner.trim_start_matches('n').parse::<usize>()? - 1;
        let history = nodes[i].client().await.history_all(&channel).await?;
        eprintln!(
            "leader n2 dropped batch seqno {seqno}; partition then led by {owner}; next offset {offset}; history {} messages",
            history.messages.len()
        );
        assert_eq!(offset, N + 1, "the write after the repair follows every acknowledged message");
        assert_eq!(history.offsets(), (1..=N + 1).collect::<Vec<_>>());
        if owner == "n2" {
            ensure!(nodes[1].stderr().contains("lost batches an in-sync follower holds"), "n2 led with a shorter log");
        } else {
            ensure!(owner == follower, "the in-sync follower {follower} leads, not {owner}");
        }
        Ok(())
    }
}

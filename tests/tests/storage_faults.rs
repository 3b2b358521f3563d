//! Storage faults on real filesystems (issue #30): a disk that fills while clients
//! publish and then frees, standalone and on one node of a 3-node cluster, and a
//! filesystem that turns read-only under a running node. Real router processes, real etcd,
//! a real tmpfs and a real ext4 on a loop device.
//!
//! A node's data directory is mounted over after its first start (the node is stopped,
//! the filesystem mounted on its data directory, the node started again): what it wrote
//! before is hidden, and it starts with an empty store on the new filesystem. Mounting
//! needs root: without it (or without `mount`/`losetup`/`mkfs.ext4`) the tests say so and
//! skip. CI runs them as root.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use switchyard_tests::etcd::{node_config, wait_converged, Etcd};
use switchyard_tests::serde_json::{json, Value};
use switchyard_tests::writers::{channels_led_by, check_history, Acked, Writer};
use switchyard_tests::*;
use tokio::time::Instant;

/// The reserve every test configures: 8 MiB, no percentage.
const RESERVE: u64 = 8 << 20;
const STORE: &str = "[store]\nreserve_bytes = 8388608\nreserve_percent = 0\n";
/// The goals of issue #30.
const RESUME_GOAL: Duration = Duration::from_secs(2);
const FAILOVER_GOAL: Duration = Duration::from_secs(3);

// === Filesystems ===

/// False (after saying why) when this process cannot mount filesystems.
fn can_mount(test: &str, tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {test}: needs root to mount a filesystem (run as root, as CI does)");
        return false;
    }
    for tool in tools {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("SKIPPED {test}: `{tool}` is not installed");
            return false;
        }
    }
    true
}

fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    ensure!(out.status.success(), "{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A filesystem mounted on a directory; unmounted (lazily, so a process still holding it
/// cannot keep it) when dropped, with its loop device detached.
struct Mount {
    at: PathBuf,
    loop_dev: Option<String>,
    /// Holds the ext4 image.
    _image_dir: Option<tempfile::TempDir>,
}

impl Mount {
    /// A tmpfs of `mib` MiB on `at`.
    fn tmpfs(at: &Path, mib: u64) -> Result<Mount> {
        run("mount", &["-t", "tmpfs", "-o", &format!("size={mib}m"), "switchyard-test", &at.to_string_lossy()])?;
        Ok(Mount { at: at.to_path_buf(), loop_dev: None, _image_dir: None })
    }

    /// An ext4 of `mib` MiB on a loop device, mounted on `at` with `errors=remount-ro`.
    fn ext4(at: &Path, mib: u64) -> Result<Mount> {
        let dir = tempfile::Builder::new().prefix("switchyard-ext4-").tempdir()?;
        let image = dir.path().join("fs.img");
        std::fs::File::create(&image)?.set_len(mib << 20)?;
        run("mkfs.ext4", &["-q", "-F", &image.to_string_lossy()])?;
        let dev = run("losetup", &["-f", "--show", &image.to_string_lossy()])?;
        let m = Mount { at: at.to_path_buf(), loop_dev: Some(dev.clone()), _image_dir: Some(dir) };
        run("mount", &["-o", "errors=remount-ro", &dev, &at.to_string_lossy()])?;
        Ok(m)
    }

    /// `(free bytes for an unprivileged writer, total bytes)`.
    fn space(&self) -> Result<(u64, u64)> {
        let out = run("stat", &["-f", "-c", "%a %b %S", &self.at.to_string_lossy()])?;
        let v: Vec<u64> = out.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
        Ok((v[0] * v[2], v[1] * v[2]))
    }

    /// Writes a filler file (next to the node's data, on the same filesystem) until about
    /// `leave` bytes stay free; returns its path.
    fn fill(&self, leave: u64) -> Result<PathBuf> {
        let path = self.at.join("filler");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let chunk = vec![0x5a_u8; 256 << 10];
        loop {
            let (free, _) = self.space()?;
            if free <= leave {
                break;
            }
            let n = ((free - leave) as usize).min(chunk.len());
            if let Err(e) = f.write_all(&chunk[..n]) {
                bail!("writing the filler: {e}");
            }
            f.sync_data()?;
        }
        Ok(path)
    }

    /// Makes the filesystem fail the way a disk error does: ext4 aborts its journal and,
    /// with `errors=remount-ro`, turns read-only.
    fn trigger_error(&self) -> Result<()> {
        let dev = self.loop_dev.as_ref().context("not a loop device")?;
        let name = Path::new(dev).file_name().context("device name")?.to_string_lossy().to_string();
        std::fs::write(format!("/sys/fs/ext4/{name}/trigger_fs_error"), "1").context("trigger_fs_error")
    }

    /// Unmounts, checks and repairs the filesystem (as an operator would after the error),
    /// and mounts it again read-write.
    fn repair_and_remount(&self) -> Result<()> {
        let dev = self.loop_dev.as_ref().context("not a loop device")?;
        run("umount", &[&self.at.to_string_lossy()])?;
        // e2fsck exits 1 when it corrected errors.
        let status = Command::new("e2fsck").args(["-f", "-y", dev]).output()?.status;
        ensure!(matches!(status.code(), Some(0 | 1)), "e2fsck {dev}: {status}");
        run("mount", &["-o", "errors=remount-ro", dev, &self.at.to_string_lossy()])?;
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", &self.at.to_string_lossy()]);
        if let Some(dev) = &self.loop_dev {
            let _ = run("losetup", &["-d", dev]);
        }
    }
}

/// Stops `node` (started on an ordinary directory), mounts `mount` on its data directory
/// and starts it again there.
fn move_onto(node: &mut Node, mount: impl FnOnce(&Path) -> Result<Mount>) -> Result<Mount> {
    node.kill9();
    let m = mount(&node.data_dir())?;
    node.restart();
    Ok(m)
}

// === Helpers ===

/// `(offset, data)` of each acknowledged publish, per channel.
type Acks = Vec<(String, u64, String)>;

/// Publishes one 8 KB message; Ok(Some(offset)) when acknowledged, Ok(None) with the
/// error checked to be the reserve's `unavailable`.
async fn publish_8k(c: &mut Client, channel: &str, n: usize) -> Result<(Option<u64>, String)> {
    // Hex of a xorshift stream: compression can win at most half of it back, so the disk
    // really fills.
    let mut x = (n as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let noise: String = (0..1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{x:016x}")[..8].to_string()
        })
        .collect();
    let data = format!("{n:06}-{noise}");
    let reply = c.cmd("publish", json!({ "channel": channel, "data": data })).await?;
    if let Ok(ok) = reply_ok(reply.clone()) {
        return Ok((Some(u64_field(&ok, "offset")?), data));
    }
    let (code, message) = (reply["error"]["code"].as_str(), reply["error"]["message"].as_str().unwrap_or_default());
    ensure!(code == Some("unavailable"), "a full disk must answer unavailable: {reply}");
    ensure!(message.contains("free-space reserve"), "the message must name the cause: {reply}");
    ensure!(!message.to_lowercase().contains("fjall"), "no library text to clients: {reply}");
    Ok((None, data))
}

/// Every acknowledged message is in history at its offset with its data.
async fn check_acked(node: &Node, acked: &Acks) -> Result<()> {
    let mut c = node.client().await;
    let mut channels: Vec<&str> = acked.iter().map(|(ch, _, _)| ch.as_str()).collect();
    channels.sort_unstable();
    channels.dedup();
    for ch in channels {
        let history = c.history_all(ch).await?;
        for (_, offset, data) in acked.iter().filter(|(c, _, _)| c == ch) {
            let found = history.messages.iter().find(|m| m["offset"].as_u64() == Some(*offset));
            ensure!(
                found.is_some_and(|m| m["data"].as_str() == Some(data)),
                "{ch}: acknowledged offset {offset} is missing or differs after restart"
            );
        }
    }
    Ok(())
}

/// The longest time between two consecutive acknowledgements at or after `from`.
fn longest_gap(acked: &[Acked], from: Instant) -> Duration {
    let mut at: Vec<Instant> = acked.iter().map(|a| a.at).filter(|t| *t >= from).collect();
    at.sort_unstable();
    at.insert(0, from);
    at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

async fn health(node: &Node) -> Result<(u16, Value)> {
    get_json(node, "/healthz").await
}

async fn metric(node: &Node, name: &str) -> Result<f64> {
    metrics(node).await?.value(name, &[]).with_context(|| format!("no {name}"))
}

// === Tests ===

/// A disk that fills while clients publish: publishes are refused with `unavailable`
/// naming the reserve before the store hits ENOSPC (so fjall is never poisoned), reads
/// keep working, a `kill -9` and restart while full change nothing, and once the filler is
/// removed publishes resume by themselves within 2 s. Every acknowledged message survives.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_writes_then_resumes_without_a_restart() -> Result<()> {
    if !can_mount("a_full_disk_refuses_writes_then_resumes_without_a_restart", &["mount"]) {
        return Ok(());
    }
    let mut node = Node::start(STORE);
    let disk = move_onto(&mut node, |at| Mount::tmpfs(at, 64))?;
    let filler = disk.fill(RESERVE + (6 << 20))?;
    let mut c = node.client().await;
    let mut acked: Acks = Vec::new();
    let started = Instant::now();
    let mut n = 0;
    loop {
        ensure!(started.elapsed() < DEADLINE * 3, "never refused: {} acked, space {:?}", acked.len(), disk.space()?);
        let ch = format!("disk:{}", n % 4);
        let (offset, data) = publish_8k(&mut c, &ch, n).await?;
        n += 1;
        match offset {
            Some(o) => acked.push((ch, o, data)),
            None => break,
        }
    }
    let (free, _) = disk.space()?;
    eprintln!("refused after {} acknowledged 8 KB publishes, {free} bytes free", acked.len());
    ensure!(acked.len() > 100, "refused too early: {} acknowledged", acked.len());
    let (status, body) = health(&node).await?;
    ensure!(status == 503 && body["status"] == "store_no_space", "healthz while full: {status} {body}");
    ensure!(metric(&node, "switchyard_store_space_low").await? == 1.0, "the low-space gauge is not set");
    ensure!(metric(&node, "switchyard_store_failed").await? == 0.0, "the store failed: the reserve did not hold");
    // Reads still work.
    check_acked(&node, &acked).await?;
    // HTTP publishers get 503 with a Retry-After.
    let body = json!({ "channel": "disk:http", "data": "x" });
    let r = http(node.addr(), "POST", "/api/v1/publish", Some(&body)).await?;
    ensure!(r.status == 503 && r.header("retry-after") == Some("1"), "HTTP publish while full: {r:?}");
    ensure!(r.json()?["error"]["code"] == "unavailable", "HTTP publish while full: {}", r.body);

    // kill -9 while full. Recovery may flush the journal into (compressed) tables and free
    // a little: the filler takes it back, and the node refuses again.
    node.kill9();
    node.restart();
    check_acked(&node, &acked).await?;
    disk.fill(RESERVE / 2)?;
    let mut c = node.client().await;
    poll_for("a refusal after the restart", RESUME_GOAL, async || {
        n += 1;
        let (offset, data) = publish_8k(&mut c, "disk:0", n).await?;
        if let Some(o) = offset {
            acked.push(("disk:0".into(), o, data));
        }
        Ok(offset.is_none().then_some(()))
    })
    .await?;

    // Space comes back: writes resume by themselves.
    std::fs::remove_file(&filler)?;
    let freed = Instant::now();
    let resumed = poll_for("a publish after space came back", DEADLINE, async || {
        n += 1;
        let (offset, data) = publish_8k(&mut c, "disk:1", n).await?;
        if offset.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(offset.map(|o| (o, data)))
    })
    .await?;
    let took = freed.elapsed();
    acked.push(("disk:1".into(), resumed.0, resumed.1));
    eprintln!("writes resumed {took:?} after space came back (goal {RESUME_GOAL:?})");
    ensure!(took <= RESUME_GOAL, "writes resumed after {took:?}, goal {RESUME_GOAL:?}");
    ensure!(health(&node).await?.0 == 200, "healthz after space came back");
    for i in 0..20 {
        let ch = format!("disk:{}", i % 4);
        let (o, data) = publish_8k(&mut c, &ch, n + 1 + i).await?;
        acked.push((ch, o.context("refused after space came back")?, data));
    }
    node.kill9();
    node.restart();
    check_acked(&node, &acked).await?;
    let stderr = node.stderr();
    let errors = stderr.lines().filter(|l| l.contains("ERROR")).count();
    ensure!(errors == 0, "{errors} ERROR lines: the reserve is a state, logged once:\n{stderr}");
    ensure!(stderr.matches("free space is below the reserve").count() >= 1, "no log line for the state change");
    drop(disk);
    drop(node);
    Ok(())
}

// === A cluster of three, n3 on its own filesystem ===

const P: u32 = 6;

/// Three nodes on real etcd (replicas = 2), n3's data on `mount`, every partition in
/// sync, and writers through n1 and n2 to one channel in each partition n3 leads.
struct Trio {
    /// Unmounted first (lazily), so the nodes' temporary directories can go after it.
    disk: Mount,
    etcd: Etcd,
    name: String,
    nodes: Vec<Node>,
    writers: Vec<Writer>,
}

impl Trio {
    async fn start(name: &str, mount: impl FnOnce(&Path) -> Result<Mount>) -> Result<Trio> {
        let etcd = Etcd::start().await;
        let ids = ["n1", "n2", "n3"];
        let mut nodes: Vec<Node> = Vec::new();
        for id in ids {
            let config =
                format!("{}secret = \"{name}-storage-fault-secret\"\n", node_config(&etcd, name, id, P, STORE));
            nodes.push(Node::try_start(&config)?);
        }
        let disk = move_onto(&mut nodes[2], mount)?;
        wait_converged(&etcd, name, &nodes.iter().collect::<Vec<_>>(), &ids).await?;
        // Settled: two replicas per partition, both in sync (no move in flight).
        let two = |v: &Value| v.as_array().is_some_and(|a| a.len() == 2);
        let in_sync = |m: &Value| (0..P as usize).all(|p| two(&m["isr"][p]) && two(&m["replicas"][p]));
        wait_until("every partition in sync on two nodes", DEADLINE * 2, async || {
            Ok(etcd.map(name)?.is_some_and(|m| in_sync(&m)))
        })
        .await?;
        let map = etcd.map(name)?.context("no map")?;
        let channels = channels_led_by(&map, "n3", P, name);
        ensure!(!channels.is_empty(), "n3 leads nothing: {map}");
        let writers: Vec<Writer> = channels
            .iter()
            .enumerate()
            .map(|(k, ch)| Writer::start(nodes[k % 2].addr(), ch.clone(), format!("w{k}-{}", std::process::id())))
            .collect();
        for w in &writers {
            w.progress(20).await?;
        }
        Ok(Trio { disk, etcd, name: name.into(), nodes, writers })
    }

    /// Waits until the map names n3 nowhere (owner, replica or ISR); returns how long
    /// that took from `since`.
    async fn wait_n3_gone(&self, since: Instant) -> Result<Duration> {
        let n3 = json!("n3");
        let holds = |m: &Value| {
            (0..P as usize).any(|p| {
                m["owners"][p] == n3
                    || ["isr", "replicas"].iter().any(|l| m[l][p].as_array().is_some_and(|a| a.contains(&n3)))
            })
        };
        wait_until("n3 leads nothing and holds no replica", FAILOVER_GOAL * 3, async || {
            Ok(self.etcd.map(&self.name)?.is_some_and(|m| !holds(&m)))
        })
        .await?;
        let gone = since.elapsed();
        for w in &self.writers {
            w.progress(20).await?;
        }
        eprintln!("{}: n3 out of every map list {gone:?} after the fault (goal {FAILOVER_GOAL:?})", self.name);
        ensure!(gone <= FAILOVER_GOAL, "n3 still held partitions {gone:?} after the fault");
        Ok(gone)
    }

    /// Stops the writers; checks each channel's unavailability from `since` against the
    /// goal and that every acknowledged message is in history (read through n1).
    async fn finish(self, since: Instant) -> Result<(Vec<Node>, Mount)> {
        // Errors a node repeats are logged once or rate-limited, not once per request.
        let stderr = self.nodes[2].stderr();
        let loud: Vec<&str> = stderr.lines().filter(|l| l.contains(" ERROR ") || l.contains(" WARN ")).collect();
        eprintln!("{}: n3 logged {} WARN/ERROR lines", self.name, loud.len());
        ensure!(loud.len() <= 40, "n3 logged {} WARN/ERROR lines:\n{}", loud.len(), loud.join("\n"));
        let mut all = Vec::new();
        for w in self.writers {
            let ch = w.channel.clone();
            all.push((ch, w.finish().await));
        }
        // The unavailability of each channel: the longest wait between two
        // acknowledgements from the fault on.
        let worst = all.iter().map(|(_, acked)| longest_gap(acked, since)).max().unwrap_or_default();
        eprintln!(
            "{}: publishes to n3's channels: longest wait between acknowledgements {worst:?} (goal {FAILOVER_GOAL:?})",
            self.name
        );
        ensure!(worst <= FAILOVER_GOAL, "publishes to n3's channels were unavailable for {worst:?}");
        for (ch, acked) in &all {
            check_history(&self.nodes[0], ch, acked).await?;
        }
        Ok((self.nodes, self.disk))
    }
}

/// One node of three fills its disk: within 3 s it leads nothing and is in no ISR (idle
/// partitions included), publishes through the other nodes to the channels it led go on,
/// and once space is back it rejoins the ISRs. Nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_a_full_disk_gives_up_its_partitions() -> Result<()> {
    if !can_mount("a_node_with_a_full_disk_gives_up_its_partitions", &["mount"]) {
        return Ok(());
    }
    let trio = Trio::start("full", |at| Mount::tmpfs(at, 64)).await?;
    // The map is timed from the moment the disk is full (the fill itself, about 50 MB
    // with an fsync per 256 KiB, takes a while on a busy machine); the channels'
    // unavailability from the start of the fill.
    let filling = Instant::now();
    let filler = trio.disk.fill(RESERVE / 2)?;
    eprintln!("full: the fill took {:?}", filling.elapsed());
    trio.wait_n3_gone(Instant::now()).await?;
    let (status, body) = health(&trio.nodes[2]).await?;
    ensure!(status == 200 && body["store"] == "no_space", "a full cluster node stays in rotation: {status} {body}");

    // Space back: n3 rejoins.
    std::fs::remove_file(&filler)?;
    let n3 = json!("n3");
    wait_until("n3 is in an ISR again", DEADLINE * 3, async || {
        let back = |m: &Value| (0..P as usize).any(|p| m["isr"][p].as_array().is_some_and(|a| a.contains(&n3)));
        Ok(trio.etcd.map(&trio.name)?.is_some_and(|m| back(&m)))
    })
    .await?;
    let (nodes, disk) = trio.finish(filling).await?;
    drop(disk);
    drop(nodes);
    Ok(())
}

/// One node of three whose filesystem fails (ext4 turns read-only): it exits with status 3,
/// its partitions are led by in-sync followers within 3 s, and nothing acknowledged is
/// lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_filesystem_fails_hands_its_partitions_over() -> Result<()> {
    if !can_mount("a_node_whose_filesystem_fails_hands_its_partitions_over", &["mount", "losetup", "mkfs.ext4"]) {
        return Ok(());
    }
    let mut trio = Trio::start("failed", |at| Mount::ext4(at, 128)).await?;
    trio.disk.trigger_error()?;
    let broke = Instant::now();
    trio.wait_n3_gone(broke).await?;
    let status = tokio::task::block_in_place(|| trio.nodes[2].wait_exit(DEADLINE));
    eprintln!("failed: n3 exited {:?} after the fault: {status}", broke.elapsed());
    ensure!(status.code() == Some(3), "n3 exit status {status}, want 3");
    let (nodes, disk) = trio.finish(broke).await?;
    drop(disk);
    drop(nodes);
    Ok(())
}

/// A filesystem that turns read-only under a running node (ext4 `errors=remount-ro` and
/// its error trigger): the node stops, exits with status 3 and a clear message, and after
/// the operator repairs and remounts the filesystem, starts with every message it
/// acknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn a_filesystem_that_turns_read_only_stops_the_node_and_loses_nothing() -> Result<()> {
    if !can_mount(
        "a_filesystem_that_turns_read_only_stops_the_node_and_loses_nothing",
        &["mount", "losetup", "mkfs.ext4", "e2fsck"],
    ) {
        return Ok(());
    }
    let mut node = Node::start(STORE);
    let disk = move_onto(&mut node, |at| Mount::ext4(at, 128))?;
    let writer = Writer::start(node.addr(), "ro:a".into(), format!("ro-{}", std::process::id()));
    writer.progress(50).await?;
    disk.trigger_error()?;
    let broke = Instant::now();
    let status = tokio::task::block_in_place(|| node.wait_exit(DEADLINE));
    eprintln!("the node exited {:?} after the filesystem turned read-only: {status}", broke.elapsed());
    ensure!(status.code() == Some(3), "exit status {status}, want 3");
    let stderr = node.stderr();
    ensure!(stderr.contains("the store failed a write"), "no clear message:\n{stderr}");
    let acked = writer.finish().await;
    ensure!(acked.len() >= 50, "only {} acknowledged", acked.len());
    disk.repair_and_remount()?;
    node.restart();
    check_history(&node, "ro:a", &acked).await?;
    drop(disk);
    drop(node);
    Ok(())
}

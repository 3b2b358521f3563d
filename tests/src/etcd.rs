//! A real etcd server for cluster tests, and helpers to start router nodes against it.
//!
//! It owns starting `/usr/bin/etcd` on free loopback ports with a temporary data dir,
//! stopping and restarting it on the same ports and data (the "etcd down" tests), reading
//! keys through `etcdctl` (exactly what docs/cluster.md tells operators to run), and the config
//! text of a cluster-mode node. It must never leave a process behind: the server is killed
//! when the value is dropped, and dies with the test process (PR_SET_PDEATHSIG).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::{wait_until, Node, DEADLINE};

/// One etcd server.
pub struct Etcd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    /// Loopback addresses it also serves clients on (same port), for tests that cut one
    /// node's etcd traffic by address.
    also_on: Vec<std::net::Ipv4Addr>,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The etcd binary: `SWITCHYARD_ETCD_BIN`, else `etcd` on PATH.
fn etcd_bin() -> PathBuf {
    std::env::var_os("SWITCHYARD_ETCD_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("etcd"))
}

impl Etcd {
    /// Starts etcd on free ports and waits until it answers.
    pub async fn start() -> Etcd {
        Self::start_also_on(&[]).await
    }

    /// Like [`Etcd::start`], also serving clients on each of the loopback addresses `also`
    /// (at the same port; see [`Etcd::endpoint_on`]).
    pub async fn start_also_on(also: &[std::net::Ipv4Addr]) -> Etcd {
        assert!(also.iter().all(|ip| ip.is_loopback()), "etcd serves loopback addresses only");
        let dir = tempfile::Builder::new().prefix("switchyard-etcd-").tempdir().expect("temp dir");
        let mut etcd = Etcd { dir, child: None, client_port: 0, peer_port: 0, also_on: also.to_vec() };
        // A free port can be taken between probing and binding: try a few pairs.
        for attempt in 0.. {
            etcd.client_port = free_port().expect("free port");
            etcd.peer_port = free_port().expect("free port");
            match etcd.spawn().await {
                Ok(()) => break,
                Err(e) if attempt < 3 => eprintln!("etcd did not start ({e:#}); retrying on other ports"),
                Err(e) => panic!("etcd did not start: {e:#}"),
            }
        }
        etcd
    }

    async fn spawn(&mut self) -> Result<()> {
        use std::os::unix::process::CommandExt as _;
        let client = self.endpoint();
        let listen: Vec<String> =
            std::iter::once(client.clone()).chain(self.also_on.iter().map(|ip| self.endpoint_on(*ip))).collect();
        let listen = listen.join(",");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("etcd.log"))?;
        let mut cmd = Command::new(etcd_bin());
        cmd.arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &listen, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().context("spawning etcd (is it installed? run scripts/setup.sh)")?);
        let ready = wait_until("etcd answers", Duration::from_secs(15), async || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("etcd exited with {status}: {}", self.log());
            }
            Ok(self.ctl(&["endpoint", "health"]).is_ok())
        })
        .await;
        if ready.is_err() {
            self.stop();
        }
        ready
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// `http://IP:PORT`: the client port on one of the addresses given to
    /// [`Etcd::start_also_on`].
    pub fn endpoint_on(&self, ip: std::net::Ipv4Addr) -> String {
        format!("http://{ip}:{}", self.client_port)
    }

    /// etcd's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Kills the server (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await.unwrap_or_else(|e| panic!("etcd restart: {e:#}"));
    }

    /// Runs `etcdctl --endpoints ENDPOINT ARGS...` and returns its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .arg("--command-timeout=3s")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running etcdctl")?;
        if !out.status.success() {
            bail!("etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `etcdctl get KEY --print-value-only`, None when absent.
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let out = self.ctl(&["get", key, "--print-value-only"])?;
        Ok((!out.trim().is_empty()).then(|| out.trim_end().to_string()))
    }

    /// Every key under `prefix` with its value parsed as JSON (`get --prefix --keys-only`,
    /// then each value): fails if any value is not JSON.
    pub fn get_prefix_json(&self, prefix: &str) -> Result<Vec<(String, Value)>> {
        let keys = self.ctl(&["get", "--prefix", prefix, "--keys-only"])?;
        let mut out = Vec::new();
        for key in keys.lines().filter(|l| !l.is_empty()) {
            let Some(text) = self.get(key)? else { continue };
            let value = serde_json::from_str(&text).with_context(|| format!("{key} is not JSON: {text}"))?;
            out.push((key.to_string(), value));
        }
        Ok(out)
    }

    /// The partition map as etcd holds it.
    pub fn map(&self, cluster: &str) -> Result<Option<Value>> {
        match self.get(&format!("/switchyard/{cluster}/partition-map"))? {
            Some(text) => Ok(Some(serde_json::from_str(&text)?)),
            None => Ok(None),
        }
    }

    /// `etcdctl put KEY VALUE`.
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.ctl(&["put", key, value]).map(drop)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Config of a cluster-mode node: fast timings for tests (lease TTL 2 s, a round every
/// second), `partitions` P, plus `extra` TOML.
pub fn node_config(etcd: &Etcd, cluster: &str, id: &str, partitions: u32, extra: &str) -> String {
    format!(
        "node_id = \"{id}\"\npartitions = {partitions}\n{extra}\n[cluster]\netcd = [\"{}\"]\nname = \"{cluster}\"\n\
         lease_ttl = \"2s\"\ncoordination_interval = \"1s\"\nload_interval = \"500ms\"\netcd_timeout = \"1s\"\n",
        etcd.endpoint()
    )
}

/// `/api/v1/cluster` of a node, sent with the admin token [`crate::ADMIN_TOKEN`] (which a
/// node without `[admin] token` ignores; nodes in `jwt` mode without dev tokens need it).
pub async fn cluster_view(node: &Node) -> Result<Value> {
    let bearer = format!("Bearer {}", crate::ADMIN_TOKEN);
    let r = tokio::time::timeout(
        crate::DEADLINE,
        crate::http_request(node.addr(), "GET", "/api/v1/cluster", &[("Authorization", &bearer)], None),
    )
    .await
    .map_err(|_| anyhow::anyhow!("GET /api/v1/cluster timed out"))??;
    anyhow::ensure!(r.status == 200, "/api/v1/cluster answered {}", r.status);
    r.json()
}

/// Waits until every node routes by the same map epoch, that map is etcd's, and its
/// owners are exactly `live` (each owning P/N or P/N+1 partitions). Returns the map.
pub async fn wait_converged(etcd: &Etcd, cluster: &str, nodes: &[&Node], live: &[&str]) -> Result<Value> {
    let mut last = Value::Null;
    let result = wait_until("cluster converges", DEADLINE, async || {
        let Some(map) = etcd.map(cluster)? else { return Ok(false) };
        last = map.clone();
        let owners: Vec<&str> = map["owners"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let mut counts: Vec<usize> = live.iter().map(|n| owners.iter().filter(|o| *o == n).count()).collect();
        counts.sort_unstable();
        if owners.iter().any(|o| !live.contains(o)) || counts.last().unwrap_or(&0) - counts[0] > 1 {
            return Ok(false);
        }
        for node in nodes {
            let Ok(view) = cluster_view(node).await else { return Ok(false) };
            if view["epoch"] != map["epoch"] {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await;
    result.with_context(|| format!("last map seen: {last}"))?;
    Ok(last)
}

/// Waits until etcd's map lists `want` in-sync replicas for partition `p`; returns the map.
pub async fn wait_in_sync(etcd: &Etcd, cluster: &str, p: usize, want: usize) -> Result<Value> {
    let mut last = Value::Null;
    wait_until("the ISR fills", DEADLINE, async || {
        let Some(map) = etcd.map(cluster)? else { return Ok(false) };
        let n = map["isr"][p].as_array().map_or(0, Vec::len);
        last = map;
        Ok(n >= want)
    })
    .await
    .with_context(|| format!("last map: {last}"))?;
    Ok(last)
}

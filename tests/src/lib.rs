//! End-to-end harness: real `switchyard` processes driven over real sockets.
//!
//! It owns starting, restarting and killing router processes ([`Node`]), a WebSocket
//! protocol client ([`Client`]), a tiny HTTP/1.1 client ([`http`], [`Metrics`]) and the
//! polling helpers ([`wait_until`], [`poll_for`]) that every test uses instead of sleeps.
//! It must never sleep for a fixed time to wait for a condition, never bind anything but
//! 127.0.0.1, and never leave a child process behind (a [`Node`] kills its child on drop).
//!
//! The router binary is not built by `cargo test -p switchyard-tests`: build it first with
//! `cargo build -p switchyard`, or point `SWITCHYARD_BIN` at one.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub use serde_json;

pub mod auth;
pub mod etcd;
pub mod writers;

/// How long any single condition may take before a test gives up. Generous, because a
/// loaded CI machine is slow; tests finish long before it when things work.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A `[maintenance]` section that runs retention and compaction every 100 ms, for tests
/// that watch them.
pub const FAST_MAINTENANCE: &str = "[maintenance]\ninterval = \"100ms\"\nidle_recheck = \"200ms\"\n";

/// How often [`wait_until`] and [`poll_for`] re-check their condition.
const POLL_EVERY: Duration = Duration::from_millis(25);

// === Polling ===

/// Polls `check` until it returns true; fails naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    poll_for(what, timeout, async || Ok(check().await?.then_some(()))).await
}

/// Polls `check` until it returns `Some`, and returns that value; fails naming `what`
/// after `timeout`. An `Err` from `check` stops the polling at once.
pub async fn poll_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await.with_context(|| format!("while waiting for {what}"))? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

// === impl Node ===

/// One router process with its own temporary directory (config file, data dir, logs).
pub struct Node {
    /// Holds the config, data dir and logs; removed when the node is dropped.
    dir: tempfile::TempDir,
    /// The running child, if any (None after kill9/terminate).
    child: Option<Child>,
    /// Address from the `switchyard listening on` line of the current process.
    addr: SocketAddr,
}

/// The config file name inside a node's directory.
const CONFIG_FILE: &str = "switchyard.toml";
/// Where the router's stderr is appended (all runs of the node).
const STDERR_FILE: &str = "stderr.log";
/// Where the router's stdout is appended after the listening line is read.
const STDOUT_FILE: &str = "stdout.log";
/// How many lines of stderr a dropped node prints (shown by libtest only on failure).
const STDERR_TAIL_LINES: usize = 60;

/// False (after saying why) when a test that drives outside tools (`node`, Chromium, the
/// Centrifugo SDKs) cannot run here because of `missing`; it fails instead when `CI` or
/// `SWITCHYARD_REQUIRE_BROWSER` is set (as under `make test`, which installs them).
pub fn can_run_with(test: &str, what: &str, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let required = ["CI", "SWITCHYARD_REQUIRE_BROWSER"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty() && s != "0" && s != "false"));
    let missing = missing.join(", ");
    assert!(!required, "{what} cannot run, missing: {missing} (run `make test`, which installs them)");
    eprintln!("SKIPPED {test}: missing {missing}; `make test` installs them");
    false
}

/// The admin token of test nodes that set one (`[admin] token`, see [`admin_section`]);
/// [`etcd::cluster_view`] always sends it.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// An `[admin]` section with [`ADMIN_TOKEN`].
pub fn admin_section() -> String {
    format!("[admin]\ntoken = \"{ADMIN_TOKEN}\"\n")
}

/// The router binary: `SWITCHYARD_BIN`, else `<workspace>/target/debug/switchyard`.
pub fn router_bin() -> PathBuf {
    match std::env::var_os("SWITCHYARD_BIN") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/switchyard"),
    }
}

impl Node {
    /// Starts a router with this config file text; panics (with its stderr) if it does not
    /// print its listening line within [`DEADLINE`].
    pub fn start(config_toml: &str) -> Node {
        Self::try_start(config_toml).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Node::start`], returning the failure instead of panicking.
    pub fn try_start(config_toml: &str) -> Result<Node> {
        Self::try_start_on(config_toml, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Like [`Node::try_start`], listening on `addr` (a port another router just left,
    /// for tests that replace a router behind the same address).
    pub fn try_start_on(config_toml: &str, addr: SocketAddr) -> Result<Node> {
        let dir = tempfile::Builder::new().prefix("switchyard-e2e-").tempdir()?;
        std::fs::write(dir.path().join(CONFIG_FILE), config_toml)?;
        std::fs::create_dir_all(dir.path().join("data"))?;
        let mut node = Node { dir, child: None, addr };
        node.spawn_on(addr)?;
        Ok(node)
    }

    /// The WebSocket/HTTP address of the current process.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://ADDR/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The node's config file (rewrite it, then send SIGHUP, to test reloads).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join(CONFIG_FILE)
    }

    /// The node's data directory (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Everything the router wrote to stderr so far, across restarts.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(STDERR_FILE)).unwrap_or_default()
    }

    /// The process id of the running child.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_file(&self, name: &str) -> Result<File> {
        Ok(OpenOptions::new().create(true).append(true).open(self.dir.path().join(name))?)
    }

    /// Spawns the process on a free port and waits for its listening line.
    fn spawn(&mut self) -> Result<()> {
        self.spawn_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Spawns the process listening on `listen` and waits for its listening line; stdout
    /// keeps being drained into a log file by a background thread so the child never
    /// blocks on it.
    fn spawn_on(&mut self, listen: SocketAddr) -> Result<()> {
        ensure!(self.child.is_none(), "node is already running");
        let mut child = serve_command(self.dir.path(), listen)?
            .stdout(Stdio::piped())
            .stderr(self.log_file(STDERR_FILE)?)
            .spawn()
            .context("spawning the router")?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut log = self.log_file(STDOUT_FILE)?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if let Some(addr) = line.strip_prefix("switchyard listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
            }
        });
        self.child = Some(child);
        let listening = rx.recv_timeout(DEADLINE);
        let addr = match listening {
            Ok(addr) => addr.parse().with_context(|| format!("bad address in listening line: {addr:?}")),
            Err(_) => {
                let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                Err(anyhow!(
                    "router did not print `switchyard listening on ...` (exited: {status:?}; waited at most {DEADLINE:?}); stderr:\n{}",
                    self.stderr()
                ))
            }
        };
        match addr {
            Ok(addr) => {
                self.addr = addr;
                Ok(())
            }
            Err(e) => {
                self.kill9();
                Err(e)
            }
        }
    }

    /// Stops the process gracefully (SIGTERM, waiting for exit) if it runs, and starts it
    /// again on the same config and data dir. The port changes.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            let status = self.terminate();
            assert!(status.success(), "router exited with {status} on SIGTERM before restart");
        }
        self.spawn().unwrap_or_else(|e| panic!("restarting the router: {e:#}"));
    }

    /// SIGKILLs the process if it runs, and starts it again on the same config, data dir
    /// and port (clients reconnect to the address they had).
    pub fn kill9_restart_same_port(&mut self) {
        self.kill9();
        let addr = self.addr;
        self.spawn_on(addr).unwrap_or_else(|e| panic!("restarting the router on {addr}: {e:#}"));
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM without waiting (see [`Node::wait_exit`]).
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends a signal to the running process without waiting.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid().expect("node is running");
        // SAFETY: plain kill(2) on our own child's pid, which is not reaped yet.
        let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed: {}", std::io::Error::last_os_error());
    }

    /// Waits (polling, up to `timeout`) for the process to exit and returns its status.
    /// Panics if it does not exit in time.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("node is running");
        match wait_child(child, timeout).expect("try_wait") {
            Some(status) => {
                self.child = None;
                status
            }
            None => panic!("router did not exit within {timeout:?}; stderr:\n{}", self.stderr()),
        }
    }

    /// SIGTERM, then wait up to [`DEADLINE`] for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.sigterm();
        self.wait_exit(DEADLINE)
    }

    /// Opens a protocol client on this node.
    pub async fn client(&self) -> Client {
        Client::connect(self).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        // libtest shows a test's output only when it fails, so this is free on success.
        let stderr = self.stderr();
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = &lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..];
        if !tail.is_empty() {
            eprintln!("--- router stderr (last {} lines) ---\n{}\n---", tail.len(), tail.join("\n"));
        }
    }
}

/// `switchyard serve` on the config file and data dir inside `dir`, on `listen` (port 0:
/// a free one), stdin closed.
/// The child gets SIGKILL if the thread that spawned it dies (e.g. a test run killed by a
/// timeout), so no router outlives its test.
fn serve_command(dir: &Path, listen: SocketAddr) -> Result<Command> {
    use std::os::unix::process::CommandExt as _;
    let bin = router_bin();
    ensure!(
        bin.exists(),
        "router binary {} not found: run `cargo build -p switchyard` or set SWITCHYARD_BIN",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--config")
        .arg(dir.join(CONFIG_FILE))
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Polls `child` until it exits (returns its status) or `timeout` passes (returns None).
/// It blocks its thread: call it from a synchronous test, or off the runtime.
pub fn wait_child(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        // A synchronous helper: it never runs on a runtime worker.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(POLL_EVERY);
    }
}

/// Runs `switchyard serve` on a config that should be rejected and returns its exit
/// status and stderr. Fails if the router does not exit within [`DEADLINE`]; a router
/// that starts listening instead is killed then and reported.
pub fn run_expecting_exit(config_toml: &str) -> Result<(ExitStatus, String)> {
    let dir = tempfile::Builder::new().prefix("switchyard-e2e-").tempdir()?;
    std::fs::write(dir.path().join(CONFIG_FILE), config_toml)?;
    let mut child = serve_command(dir.path(), SocketAddr::from(([127, 0, 0, 1], 0)))?
        .stdout(File::create(dir.path().join(STDOUT_FILE))?)
        .stderr(File::create(dir.path().join(STDERR_FILE))?)
        .spawn()
        .context("spawning the router")?;
    let Some(status) = wait_child(&mut child, DEADLINE)? else {
        let _ = child.kill();
        let _ = child.wait();
        let stdout = std::fs::read_to_string(dir.path().join(STDOUT_FILE)).unwrap_or_default();
        bail!("router with a bad config did not exit within {DEADLINE:?}; stdout: {stdout}");
    };
    Ok((status, std::fs::read_to_string(dir.path().join(STDERR_FILE))?))
}

// === impl Client ===

/// A WebSocket stream over a plain TCP connection.
type Ws = WebSocketStream<TcpStream>;

/// One frame or event read from the server, classified.
#[derive(Debug, Clone)]
pub enum Event {
    /// A frame with `ok` or `error`: a reply (its `id` may be null).
    Reply(Value),
    /// A frame with `push`.
    Push(Value),
    /// A text frame that is neither (kept so tests can complain about it).
    Other(String),
    /// The server sent a close frame with this code (None: no code).
    Close(Option<u16>),
    /// The stream ended without a close frame, or failed (e.g. reset); the error text.
    Ended(String),
}

/// A protocol client: assigns ids, waits for replies by id, buffers pushes.
pub struct Client {
    ws: Ws,
    /// Next command id to assign.
    next_id: u64,
    /// Pushes read while waiting for something else, oldest first.
    pushes: VecDeque<Value>,
    /// Replies read while waiting for another id, by id.
    replies: HashMap<u64, Value>,
    /// Replies with a null or non-u64 id, oldest first.
    anonymous_replies: VecDeque<Value>,
    /// Set once the connection closed or ended; later reads return it again.
    ended: Option<Event>,
}

/// A `history` reply.
#[derive(Debug, Clone)]
pub struct History {
    pub epoch: String,
    pub offset: u64,
    pub messages: Vec<Value>,
}

impl History {
    /// The offsets of the returned messages.
    pub fn offsets(&self) -> Vec<u64> {
        offsets(&self.messages)
    }
}

/// The `offset` fields of messages.
pub fn offsets(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|m| m["offset"].as_u64().unwrap_or_else(|| panic!("message without offset: {m}"))).collect()
}

/// The `(offset, epoch)` of a publish reply or message, for comparisons that must ignore
/// extra fields.
pub fn position(v: &Value) -> (Value, Value) {
    (v["offset"].clone(), v["epoch"].clone())
}

/// The `data` fields of messages.
pub fn datas(messages: &[Value]) -> Vec<Value> {
    messages.iter().map(|m| m["data"].clone()).collect()
}

/// Reads a u64 field of a JSON object, with context.
pub fn u64_field(v: &Value, field: &str) -> Result<u64> {
    v[field].as_u64().with_context(|| format!("no u64 `{field}` in {v}"))
}

/// Reads a string field of a JSON object, with context.
pub fn str_field(v: &Value, field: &str) -> Result<String> {
    Ok(v[field].as_str().with_context(|| format!("no string `{field}` in {v}"))?.to_string())
}

impl Client {
    /// Connects to `node` with TCP_NODELAY; panics if that fails.
    pub async fn connect(node: &Node) -> Client {
        Self::connect_addr(node.addr(), None).await.unwrap_or_else(|e| panic!("connecting to {}: {e:#}", node.addr()))
    }

    /// Connects to an address (for tasks that do not hold the [`Node`]).
    pub async fn connect_to(addr: SocketAddr) -> Result<Client> {
        Self::connect_addr(addr, None).await
    }

    /// Connects with a small kernel receive buffer, so a client that stops reading backs
    /// up the server quickly (for slow-consumer tests).
    pub async fn connect_with_recv_buffer(node: &Node, bytes: u32) -> Result<Client> {
        Self::connect_addr(node.addr(), Some(bytes)).await
    }

    async fn connect_addr(addr: SocketAddr, recv_buffer: Option<u32>) -> Result<Client> {
        let socket = TcpSocket::new_v4()?;
        if let Some(bytes) = recv_buffer {
            socket.set_recv_buffer_size(bytes)?;
        }
        let stream = tokio::time::timeout(DEADLINE, socket.connect(addr)).await.context("TCP connect timed out")??;
        stream.set_nodelay(true)?;
        let url = format!("ws://{addr}/ws");
        let config = WebSocketConfig::default();
        let (ws, _response) =
            tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async_with_config(url, stream, Some(config)))
                .await
                .context("WebSocket handshake timed out")?
                .context("WebSocket handshake")?;
        Ok(Client {
            ws,
            next_id: 1,
            pushes: VecDeque::new(),
            replies: HashMap::new(),
            anonymous_replies: VecDeque::new(),
            ended: None,
        })
    }

    // --- sending ---

    /// Sends one frame.
    pub async fn send(&mut self, msg: Message) -> Result<()> {
        tokio::time::timeout(DEADLINE, self.ws.send(msg)).await.context("send timed out")?.context("send")
    }

    /// Sends a JSON value as one text frame, as is.
    pub async fn send_json(&mut self, value: &Value) -> Result<()> {
        self.send(Message::text(value.to_string())).await
    }

    /// Sends a raw text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<()> {
        self.send(Message::text(text.into())).await
    }

    /// Sends a raw binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.send(Message::binary(bytes)).await
    }

    /// Sends a command `{id, op, ...fields}` with a fresh id and returns the id.
    pub async fn send_cmd(&mut self, op: &str, fields: Value) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let mut frame = match fields {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => bail!("command fields must be an object, got {other}"),
        };
        frame.insert("id".into(), json!(id));
        frame.insert("op".into(), json!(op));
        self.send_json(&Value::Object(frame)).await?;
        Ok(id)
    }

    /// Sends a command and waits for its reply (the whole frame, `ok` or `error`).
    pub async fn cmd(&mut self, op: &str, fields: Value) -> Result<Value> {
        let id = self.send_cmd(op, fields).await?;
        self.wait_reply(id).await
    }

    /// Sends a command and returns its `ok` object; an `error` reply is an Err.
    pub async fn ok(&mut self, op: &str, fields: Value) -> Result<Value> {
        let reply = self.cmd(op, fields.clone()).await?;
        reply_ok(reply).with_context(|| format!("{op} {fields}"))
    }

    /// Sends a command that must fail and returns the reply's error code.
    pub async fn err(&mut self, op: &str, fields: Value) -> Result<String> {
        let reply = self.cmd(op, fields.clone()).await?;
        error_code(&reply).with_context(|| format!("{op} {fields} should have failed"))
    }

    // --- receiving ---

    /// Reads the next event from the socket, or None when `deadline` passes first.
    pub async fn next_event(&mut self, deadline: Instant) -> Option<Event> {
        if let Some(ended) = &self.ended {
            return Some(ended.clone());
        }
        let event = loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) => break Event::Ended("stream ended without a close frame".into()),
                Ok(Some(Err(e))) => break Event::Ended(e.to_string()),
                Ok(Some(Ok(msg))) => msg,
            };
            match msg {
                Message::Text(text) => break classify(text.as_str()),
                Message::Binary(b) => break Event::Other(format!("binary frame of {} bytes", b.len())),
                Message::Close(frame) => break Event::Close(frame.map(|f| u16::from(f.code))),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            }
        };
        if matches!(event, Event::Close(_) | Event::Ended(_)) {
            self.ended = Some(event.clone());
        }
        Some(event)
    }

    /// Reads events until `take` finds what is wanted in the buffers, within `timeout`.
    /// Every reply and push read is buffered (replies by id); a close, a broken stream or
    /// an unparseable frame fails the wait.
    async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut take: impl FnMut(&mut Self) -> Option<Value>,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = take(self) {
                return Ok(found);
            }
            match self.next_event(deadline).await {
                None => bail!("no {what} within {timeout:?}"),
                Some(Event::Reply(reply)) => match reply["id"].as_u64() {
                    Some(id) => {
                        self.replies.insert(id, reply);
                    }
                    None => self.anonymous_replies.push_back(reply),
                },
                Some(Event::Push(push)) => self.pushes.push_back(push),
                Some(Event::Other(text)) => bail!("unexpected frame while waiting for {what}: {text}"),
                Some(end) => bail!("connection ended while waiting for {what}: {end:?}"),
            }
        }
    }

    /// Waits up to [`DEADLINE`] for the reply with this id, buffering pushes and other
    /// replies.
    pub async fn wait_reply(&mut self, id: u64) -> Result<Value> {
        self.wait_for(&format!("reply to command {id}"), DEADLINE, |c| c.replies.remove(&id)).await
    }

    /// Waits up to [`DEADLINE`] for the next reply whose id is null or not a u64 (the
    /// reply to a frame without a usable id).
    pub async fn next_anonymous_reply(&mut self) -> Result<Value> {
        self.wait_for("reply without an id", DEADLINE, |c| c.anonymous_replies.pop_front()).await
    }

    /// The next push (buffered first), waiting up to `timeout`.
    pub async fn next_push(&mut self, timeout: Duration) -> Result<Value> {
        self.wait_for("push", timeout, |c| c.pushes.pop_front()).await
    }

    /// The next `n` pushes, which must all be `message` pushes of `channel`.
    pub async fn next_messages(&mut self, channel: &str, n: usize) -> Result<Vec<Value>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let push =
                self.next_push(DEADLINE).await.with_context(|| format!("after {} of {n} messages", out.len()))?;
            ensure!(
                push["push"] == "message" && push["channel"] == channel,
                "expected a message push on {channel}, got {push}"
            );
            out.push(push);
        }
        Ok(out)
    }

    /// Reads until the server closes the connection, within `timeout`, and returns the
    /// close code. Frames read on the way are dropped. Fails if the stream ends without
    /// a close frame.
    pub async fn expect_close(&mut self, timeout: Duration) -> Result<u16> {
        match self.read_to_end(timeout).await?.end {
            Event::Close(Some(code)) => Ok(code),
            other => bail!("expected a close frame with a code, got {other:?}"),
        }
    }

    /// Reads everything (buffered pushes first) until the connection closes or ends,
    /// within `timeout`.
    pub async fn read_to_end(&mut self, timeout: Duration) -> Result<Ending> {
        let deadline = Instant::now() + timeout;
        let mut frames: Vec<Value> = self.pushes.drain(..).collect();
        loop {
            match self.next_event(deadline).await {
                None => bail!("connection still open after {timeout:?} ({} frames read)", frames.len()),
                Some(end @ (Event::Close(_) | Event::Ended(_))) => return Ok(Ending { frames, end }),
                Some(Event::Push(v) | Event::Reply(v)) => frames.push(v),
                Some(Event::Other(text)) => frames.push(json!({ "unparsed": text })),
            }
        }
    }

    /// How many pushes are buffered (read while waiting for a reply, not yet taken).
    pub fn buffered_pushes(&self) -> usize {
        self.pushes.len()
    }

    /// Pushes buffered so far (drained).
    pub fn take_pushes(&mut self) -> Vec<Value> {
        self.pushes.drain(..).collect()
    }

    // --- command shorthands ---

    /// `publish` and return `(offset, epoch)`.
    pub async fn publish(&mut self, channel: &str, data: Value) -> Result<(u64, String)> {
        let ok = self.ok("publish", json!({ "channel": channel, "data": data })).await?;
        Ok((u64_field(&ok, "offset")?, str_field(&ok, "epoch")?))
    }

    /// Publishes `data` values pipelined (all sent, then all replies awaited) and returns
    /// the offsets in order, checking they share one epoch.
    pub async fn publish_many(
        &mut self,
        channel: &str,
        data: impl IntoIterator<Item = Value>,
    ) -> Result<(Vec<u64>, String)> {
        let mut ids = Vec::new();
        for d in data {
            ids.push(self.send_cmd("publish", json!({ "channel": channel, "data": d })).await?);
        }
        let mut offsets = Vec::with_capacity(ids.len());
        let mut epoch: Option<String> = None;
        for id in ids {
            let ok = reply_ok(self.wait_reply(id).await?)?;
            let e = str_field(&ok, "epoch")?;
            ensure!(epoch.get_or_insert_with(|| e.clone()) == &e, "epoch changed within one pipelined batch: {ok}");
            offsets.push(u64_field(&ok, "offset")?);
        }
        Ok((offsets, epoch.unwrap_or_default()))
    }

    /// `subscribe` with extra fields (e.g. `from`, `consumer`); returns the ok object.
    pub async fn subscribe(&mut self, channel: &str, extra: Value) -> Result<Value> {
        let mut fields = json!({ "channel": channel });
        merge(&mut fields, extra);
        self.ok("subscribe", fields).await
    }

    /// One `history` page.
    pub async fn history(&mut self, channel: &str, since: Option<u64>, limit: Option<u64>) -> Result<History> {
        let mut fields = json!({ "channel": channel });
        if let Some(since) = since {
            fields["since"] = json!(since);
        }
        if let Some(limit) = limit {
            fields["limit"] = json!(limit);
        }
        parse_history(&self.ok("history", fields).await?)
    }

    /// All retained messages of a channel, paging with `limit = 1000`.
    pub async fn history_all(&mut self, channel: &str) -> Result<History> {
        let mut all = self.history(channel, None, Some(1000)).await?;
        while let Some(last) = all.offsets().last().copied() {
            let page = self.history(channel, Some(last), Some(1000)).await?;
            if page.messages.is_empty() {
                break;
            }
            ensure!(page.epoch == all.epoch, "epoch changed while paging history");
            all.offset = page.offset;
            all.messages.extend(page.messages);
        }
        Ok(all)
    }

    /// `ping` must succeed: proves the connection still works.
    pub async fn ping(&mut self) -> Result<()> {
        self.ok("ping", json!({})).await.map(drop)
    }
}

/// The outcome of reading a connection to its end.
#[derive(Debug)]
pub struct Ending {
    /// Every reply and push frame read, in order.
    pub frames: Vec<Value>,
    /// How it ended: [`Event::Close`] or [`Event::Ended`].
    pub end: Event,
}

fn classify(text: &str) -> Event {
    match serde_json::from_str::<Value>(text) {
        Ok(v) if v.get("push").is_some() => Event::Push(v),
        Ok(v) if v.get("ok").is_some() || v.get("error").is_some() => Event::Reply(v),
        _ => Event::Other(text.to_string()),
    }
}

/// Adds the fields of object `extra` to object `target`.
pub fn merge(target: &mut Value, extra: Value) {
    if let (Value::Object(t), Value::Object(e)) = (target, extra) {
        t.extend(e);
    }
}

/// The `ok` object of a reply, or an Err describing the error reply.
pub fn reply_ok(reply: Value) -> Result<Value> {
    match reply.get("ok") {
        Some(ok) if reply.get("error").is_none() => Ok(ok.clone()),
        _ => bail!("expected an ok reply, got {reply}"),
    }
}

/// The error code of an error reply, or an Err if the reply is ok.
pub fn error_code(reply: &Value) -> Result<String> {
    ensure!(reply.get("ok").is_none(), "expected an error reply, got {reply}");
    let code =
        reply["error"]["code"].as_str().with_context(|| format!("error reply without a string code: {reply}"))?;
    ensure!(reply["error"]["message"].is_string(), "error reply without a string message: {reply}");
    Ok(code.to_string())
}

/// Parses a `history` ok object (WebSocket or HTTP).
pub fn parse_history(ok: &Value) -> Result<History> {
    Ok(History {
        epoch: str_field(ok, "epoch")?,
        offset: u64_field(ok, "offset")?,
        messages: ok["messages"].as_array().with_context(|| format!("history without messages: {ok}"))?.clone(),
    })
}

/// Checks that offsets are exactly `first, first+1, ...`.
pub fn assert_contiguous(offsets: &[u64], first: u64) -> Result<()> {
    for (i, &o) in offsets.iter().enumerate() {
        ensure!(o == first + i as u64, "offsets are not contiguous from {first}: at index {i} got {o}: {offsets:?}");
    }
    Ok(())
}

// === HTTP ===

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("response body is not JSON (status {}): {}", self.status, self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `Connection: close`, read to EOF, within [`DEADLINE`].
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<HttpResponse> {
    tokio::time::timeout(DEADLINE, http_inner(addr, method, path, body))
        .await
        .with_context(|| format!("{method} {path} timed out"))?
        .with_context(|| format!("{method} {path}"))
}

async fn http_inner(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<HttpResponse> {
    http_request(addr, method, path, &[], body).await
}

/// One HTTP/1.1 request with extra headers (`Connection: close`), without a deadline.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Result<HttpResponse> {
    let mut stream = TcpStream::connect(addr).await?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split])?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().context("empty response")?;
    let status = status_line.split(' ').nth(1).context("no status code")?.parse()?;
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_string(), v.trim().to_string())).collect();
    let mut response = HttpResponse { status, headers, body: String::new() };
    let rest = &raw[split + 4..];
    let body = if response.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    response.body = String::from_utf8(body)?;
    Ok(response)
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").context("bad chunk header")?;
        let size_text = std::str::from_utf8(&rest[..eol])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        ensure!(rest.len() >= size, "truncated chunk");
        out.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
}

/// GET a path and parse JSON; returns `(status, body)`.
pub async fn get_json(node: &Node, path: &str) -> Result<(u16, Value)> {
    let r = http(node.addr(), "GET", path, None).await?;
    Ok((r.status, r.json()?))
}

/// POST JSON to a path and parse the JSON answer; returns `(status, body)`.
pub async fn post_json(node: &Node, path: &str, body: &Value) -> Result<(u16, Value)> {
    let r = http(node.addr(), "POST", path, Some(body)).await?;
    Ok((r.status, r.json()?))
}

/// A scraped `/metrics` page.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub text: String,
}

/// GET /metrics, which must answer 200.
pub async fn metrics(node: &Node) -> Result<Metrics> {
    let r = http(node.addr(), "GET", "/metrics", None).await?;
    ensure!(r.status == 200, "/metrics answered {}: {}", r.status, r.body);
    Ok(Metrics { text: r.body })
}

impl Metrics {
    /// The value of the sample `name` whose labels include all of `labels`; None if absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples().find_map(|(n, l, v)| {
            (n == name && labels.iter().all(|(k, val)| l.get(*k).map(String::as_str) == Some(*val))).then_some(v)
        })
    }

    /// The sum over all samples of `name` (any labels); None if there is none.
    pub fn sum(&self, name: &str) -> Option<f64> {
        self.samples().filter(|(n, _, _)| n == name).map(|(_, _, v)| v).reduce(|a, b| a + b)
    }

    /// True when the family `name` appears (as `# TYPE`, or as a sample of it or of its
    /// histogram/summary parts).
    pub fn has(&self, name: &str) -> bool {
        self.text.lines().any(|l| l.starts_with(&format!("# TYPE {name} ")))
            || self
                .samples()
                .any(|(n, _, _)| n == name || ["_bucket", "_sum", "_count"].iter().any(|s| n == format!("{name}{s}")))
    }

    /// `(name, labels, value)` of every sample line.
    fn samples(&self) -> impl Iterator<Item = (String, HashMap<String, String>, f64)> + '_ {
        self.text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_sample)
    }
}

fn parse_sample(line: &str) -> Option<(String, HashMap<String, String>, f64)> {
    let (series, value) = line.trim().rsplit_once(' ')?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        None => (series.to_string(), HashMap::new()),
        Some((name, rest)) => {
            let labels = rest
                .trim_end_matches('}')
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
                .collect();
            (name.to_string(), labels)
        }
    };
    Some((name, labels, value))
}

/// Polls /metrics until `name` (with `labels`) reaches at least `min`; returns the value.
pub async fn wait_metric_at_least(node: &Node, name: &str, labels: &[(&str, &str)], min: f64) -> Result<f64> {
    poll_for(&format!("metric {name}{labels:?} >= {min}"), DEADLINE, async || {
        Ok(metrics(node).await?.value(name, labels).filter(|v| *v >= min))
    })
    .await
}

// === Plugins ===

/// Where `scripts/build-plugins.sh` puts the example plugins: `<workspace>/plugins/dist`.
pub fn plugins_dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist")
}

/// The bytes of example plugin `name` (`keep-last`, `max-age`, ...) from [`plugins_dist`];
/// panics saying how to build it when the file is missing.
pub fn example_plugin(name: &str) -> Vec<u8> {
    let path = plugins_dist().join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "example plugin {} is not readable ({e}): build the plugins first with scripts/build-plugins.sh (`make test` does)",
            path.display()
        )
    })
}

/// Lowercase hex sha256 of `bytes`, as `GET /api/v1/plugins` reports `sha256` and
/// `file_sha256`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A plugin folder of its own for one node, removed when dropped. The node's config must
/// start with [`PluginDir::config_line`] (before any `[table]`).
pub struct PluginDir {
    dir: tempfile::TempDir,
}

impl PluginDir {
    /// An empty folder.
    pub fn new() -> PluginDir {
        let dir = tempfile::Builder::new().prefix("switchyard-plugins-").tempdir().expect("creating a plugin folder");
        PluginDir { dir }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `plugins_dir = "<absolute path>"` and a newline, for the top of a config file.
    pub fn config_line(&self) -> String {
        format!("plugins_dir = {:?}\n", self.path().display().to_string())
    }

    /// The path of plugin `name`: `<folder>/<name>.wasm`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path().join(format!("{name}.wasm"))
    }

    /// Installs `bytes` as `<name>.wasm` in one step: written under a name the router
    /// ignores, then renamed over the target, so the watcher never loads half a file.
    pub fn install(&self, name: &str, bytes: &[u8]) {
        let tmp = self.path().join(format!(".{name}.wasm.tmp"));
        std::fs::write(&tmp, bytes).expect("writing a plugin file");
        std::fs::rename(&tmp, self.file(name)).expect("renaming a plugin file into place");
    }

    /// Installs example plugin `example` (see [`example_plugin`]) as `<name>.wasm`;
    /// returns its bytes.
    pub fn install_example(&self, example: &str, name: &str) -> Vec<u8> {
        let bytes = example_plugin(example);
        self.install(name, &bytes);
        bytes
    }

    /// Deletes `<name>.wasm`.
    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.file(name)).expect("removing a plugin file");
    }
}

impl Default for PluginDir {
    fn default() -> Self {
        Self::new()
    }
}

/// The row of plugin `name` in `GET /api/v1/plugins` (None: not listed).
pub async fn plugin_row(node: &Node, name: &str) -> Result<Option<Value>> {
    let (status, body) = get_json(node, "/api/v1/plugins").await?;
    ensure!(status == 200, "GET /api/v1/plugins answered {status}: {body}");
    let rows = body["plugins"].as_array().with_context(|| format!("no `plugins` array in {body}"))?;
    Ok(rows.iter().find(|r| r["name"] == name).cloned())
}

/// Polls `GET /api/v1/plugins` until the row of `name` exists and satisfies `check`
/// (described by `what`), within [`DEADLINE`]; returns the row.
pub async fn wait_plugin_row(node: &Node, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Result<Value> {
    poll_for(&format!("plugin {name} to be {what}"), DEADLINE, async || {
        Ok(plugin_row(node, name).await?.filter(|row| check(row)))
    })
    .await
}

/// A client that keeps publishing `{"n": i}` to one channel in its own task, one
/// acknowledged publish per `every`, until [`Publisher::stop`].
pub struct Publisher {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<Vec<u64>>>,
}

impl Publisher {
    /// Connects and starts publishing to `channel`.
    pub async fn start(node: &Node, channel: &str, every: Duration) -> Result<Publisher> {
        let mut client = Client::connect_to(node.addr()).await?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let channel = channel.to_string();
        let task = tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut pace = tokio::time::interval(every);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.changed() => return Ok(acked),
                    _ = pace.tick() => {}
                }
                let n = acked.len();
                let (offset, _) = client
                    .publish(&channel, json!({ "n": n }))
                    .await
                    .with_context(|| format!("publish #{n} to {channel}"))?;
                acked.push(offset);
            }
        });
        Ok(Publisher { stop, task })
    }

    /// Stops publishing and returns the acknowledged offsets, in order.
    pub async fn stop(self) -> Result<Vec<u64>> {
        let _ = self.stop.send(true);
        tokio::time::timeout(DEADLINE, self.task).await.context("publisher did not stop")?.context("publisher task")?
    }
}

/// A client subscribed (live) to one channel that reads every push in its own task, so it
/// never becomes a slow consumer; [`Subscriber::finish`] collects what it received.
pub struct Subscriber {
    until: tokio::sync::watch::Sender<Option<u64>>,
    task: tokio::task::JoinHandle<Result<Vec<Value>>>,
}

impl Subscriber {
    /// Connects and subscribes to `channel`; returns once the subscription is acknowledged.
    pub async fn start(node: &Node, channel: &str) -> Result<Subscriber> {
        let mut client = Client::connect_to(node.addr()).await?;
        client.subscribe(channel, json!({})).await?;
        let (until, mut target) = tokio::sync::watch::channel(None::<u64>);
        let channel = channel.to_string();
        let task = tokio::spawn(async move {
            let mut received: Vec<Value> = client.take_pushes();
            let mut give_up: Option<Instant> = None;
            loop {
                if let Some(last) = *target.borrow_and_update() {
                    if received.last().and_then(|m| m["offset"].as_u64()).is_some_and(|o| o >= last) {
                        return Ok(received);
                    }
                    let give_up = *give_up.get_or_insert_with(|| Instant::now() + DEADLINE);
                    if Instant::now() >= give_up {
                        bail!(
                            "subscriber of {channel} did not receive offset {last} within {DEADLINE:?} (got {} messages, last {:?})",
                            received.len(),
                            received.last().map(|m| &m["offset"])
                        );
                    }
                }
                match client.next_event(Instant::now() + POLL_EVERY * 4).await {
                    None | Some(Event::Reply(_)) => {}
                    Some(Event::Push(push)) => {
                        ensure!(
                            push["push"] == "message" && push["channel"] == channel.as_str(),
                            "subscriber of {channel} got an unexpected push: {push}"
                        );
                        received.push(push);
                    }
                    Some(other) => bail!("subscriber of {channel} stopped receiving: {other:?}"),
                }
            }
        });
        Ok(Subscriber { until, task })
    }

    /// Waits until the message with offset `last` arrived (within [`DEADLINE`]) and returns
    /// every message push received, in order.
    pub async fn finish(self, last: u64) -> Result<Vec<Value>> {
        let _ = self.until.send(Some(last));
        tokio::time::timeout(DEADLINE * 2, self.task)
            .await
            .context("subscriber did not finish")?
            .context("subscriber task")?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_metric_samples() {
        let m = Metrics {
            text: "# TYPE a counter\na 3\nb{code=\"bad_request\",x=\"1\"} 2.5\nb{code=\"other\"} 1\nh_bucket{le=\"+Inf\"} 4\n".into(),
        };
        assert_eq!(m.value("a", &[]), Some(3.0));
        assert_eq!(m.value("b", &[("code", "bad_request")]), Some(2.5));
        assert_eq!(m.sum("b"), Some(3.5));
        assert!(m.has("h") && m.has("a") && !m.has("c"));
    }

    #[test]
    fn parses_chunked_response() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let r = parse_response(raw).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "abcde"));
    }

    #[test]
    fn checks_contiguity() {
        assert!(assert_contiguous(&[3, 4, 5], 3).is_ok());
        assert!(assert_contiguous(&[3, 5], 3).is_err());
    }
}

//! The durable store: channel metadata, messages by offset and consumer offsets, in fjall.
//!
//! It owns the on-disk layout (keyspaces for channel metadata, messages, consumer offsets,
//! adoptions and the replication log's bookkeeping, keys prefixed by partition so a
//! partition's data is one key range) and the log writer: one OS thread that commits every partition
//! owner's batches and turns all the batches that queued during one fsync into the next
//! fsync (group commit). fjall holds its journal lock while it fsyncs, so no async task ever
//! commits itself. Batches written during one pass of the async runtime reach the writer
//! together, at the end of the pass ([`Round`]), so one burst of publishes across many
//! partitions becomes one commit group instead of a first tiny group and the rest, and the
//! journal's buffer goes to the OS once per group (fjall would write it once per batch).
//!
//! It also owns the read pool: once the node serves, every read runs through
//! [`Store::read`] on a few OS threads of its own at a lower CPU priority, never on an
//! async runtime worker (the synchronous [`Reader`] is handed out only there, and at
//! start-up through [`Store::startup_reader`]). It must never decide offsets or policy:
//! partition owners write, and the store only makes their batches durable and reads them
//! back.
//!
//! Before fjall opens, [`repair::repair`] checks the journal and cuts it at the first
//! damaged batch (fjall would refuse a bad checksum, or drop a cut tail silently), and a
//! read that fails on bad bytes is recorded ([`Store::damaged`]) and logged, rate-limited.

use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use tokio::time::Instant;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch as WriteBatch, PersistMode};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use switchyard_metrics::Metrics;
use switchyard_proto::partition::PartitionId;
use switchyard_proto::protocol::{ErrorCode, OpError};

/// How eagerly the store syncs acknowledged writes to disk (`fsync` in the config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// fsync each publish batch of each partition on its own before acknowledging it.
    Always,
    /// Group commit: batches from all partitions that arrive while a sync runs share the
    /// next sync; a publish is acknowledged after the sync that covers it.
    #[default]
    Batch,
    /// Never fsync: writes reach the OS before the ack (they survive a process crash,
    /// not a power loss).
    Never,
}

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// fjall failed (I/O, corruption, poisoned after a failed fsync).
    #[error("store: {0}")]
    Fjall(#[from] fjall::Error),
    /// A stored value did not decode.
    #[error("store: corrupt value: {0}")]
    Decode(#[from] postcard::Error),
    /// The data directory could not be created.
    #[error("store: cannot create data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The journal could not be read or repaired before opening ([`repair::repair`]).
    #[error("store: journal repair: {0}")]
    Repair(#[from] repair::RepairError),
    /// The writer thread is gone (the process is stopping).
    #[error("store: writer stopped")]
    WriterGone,
    /// The read pool is closed (the process is stopping).
    #[error("store: read pool closed")]
    ReadPoolGone,
    /// A read on the pool panicked or was cancelled by the runtime shutting down.
    #[error("store: read failed: {0}")]
    ReadPanicked(String),
    /// The log writer's commit or fsync failed; every batch of its group gets the same
    /// cause (and fjall refuses all writes after it).
    #[error("store: sync failed: {0}")]
    Sync(Arc<fjall::Error>),
    /// The filesystem's free space is below the configured reserve: writes are refused
    /// before the store could run out of space (and fjall poison itself on ENOSPC).
    #[error("store: free space {free} bytes is below the reserve of {reserve} bytes")]
    NoSpace {
        /// Bytes free for the node's user when last checked.
        free: u64,
        /// The reserve in bytes.
        reserve: u64,
    },
}

impl StoreError {
    /// What a client is told: always `unavailable` (retry, perhaps on another node) with a
    /// message that names the cause in our words and never a library's internal text (that
    /// goes to the log).
    pub fn to_op_error(&self) -> OpError {
        let message = match self {
            StoreError::NoSpace { .. } => {
                "this node's disk is below its free-space reserve: writes are refused until space is freed; retry, perhaps on another node"
            }
            StoreError::Sync(_) => "this node cannot write to its disk; retry on another node",
            StoreError::Fjall(_) | StoreError::Decode(_) | StoreError::ReadPanicked(_) => {
                "this node cannot read this data from its disk; retry, perhaps on another node"
            }
            StoreError::WriterGone | StoreError::ReadPoolGone => "node shutting down; retry on another node",
            StoreError::DataDir { .. } | StoreError::Repair(_) => {
                "this node's data directory is unusable; retry on another node"
            }
        };
        let err = OpError::new(ErrorCode::Unavailable, message);
        match self {
            StoreError::NoSpace { .. } => err.retry_after(1_000),
            _ => err,
        }
    }
}

/// Per-channel metadata, rewritten in the same batch as the messages it describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelMeta {
    /// The channel's current epoch.
    pub epoch: String,
    /// Highest offset assigned.
    pub top: u64,
    /// Lowest offset that may still be stored.
    pub first: u64,
    /// Stored messages.
    pub count: u64,
    /// Stored bytes.
    pub bytes: u64,
}

/// A replica's durable replication position of one partition: every replicated store
/// batch below `leo` is applied here, and the leader-epoch history says under which leader
/// epoch each run of batches was written (`(leader epoch, first seq)`, oldest first; the
/// KIP-101 leader-epoch cache). Written in the same store batch as the batches it counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplLogMeta {
    /// The next seq: every batch below it is applied here.
    pub leo: u64,
    /// `(leader epoch, first seq written under it)`, oldest first.
    pub epochs: Vec<(u64, u64)>,
}

/// How many batches back a replica keeps the names of the channels each batch touched:
/// a truncation deeper than this takes a full snapshot instead of re-copying channels.
pub const REPL_TOUCHED_WINDOW: u64 = 100_000;

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Accept time, ms since the Unix epoch.
    pub ts: u64,
    /// Compaction key.
    pub key: Option<String>,
    /// Publisher's user id.
    pub from: Option<String>,
    /// Idempotency key, kept so the dedup window survives restarts.
    pub idem: Option<String>,
    /// Raw JSON payload.
    pub data: String,
}

impl StoredMessage {
    /// Bytes this message takes in any encoding that carries it whole (payload, keys, and
    /// a fixed allowance for offsets, timestamps and framing): what byte budgets count.
    pub fn encoded_len(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        self.data.len() + opt(&self.key) + opt(&self.from) + opt(&self.idem) + 32
    }

    /// True for a keyed `null` payload.
    pub fn is_tombstone(&self) -> bool {
        self.data == "null"
    }
}

/// What retention and compaction see of one stored message: [`Store::read_metas`]. The
/// plugin SDK shows policies the same fields as its own `MessageMeta`; the store does not
/// depend on the SDK, and whoever hands these to a policy converts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    /// Offset of the message in its channel.
    pub offset: u64,
    /// Accept time, ms since the Unix epoch ([`StoredMessage::ts`]).
    pub ts: u64,
    /// Stored size in bytes: the length of the encoded [`StoredMessage`].
    pub size: u32,
    /// Compaction key, if any.
    pub key: Option<String>,
    /// True for a `null` payload ([`StoredMessage::is_tombstone`]).
    pub tombstone: bool,
}

/// The store: one fjall database with five keyspaces.
pub struct Store {
    db: Database,
    meta: Keyspace,
    messages: Keyspace,
    consumers: Keyspace,
    /// Per partition: its [`ReplLogMeta`] (key `p, 0`) and, per replicated batch, the
    /// channels it touched (key `p, 1, seq`).
    replog: Keyspace,
    /// Per partition: the map epoch of the move by which this node last adopted it.
    adopted: Keyspace,
    policy: FsyncPolicy,
    metrics: Arc<Metrics>,
    writer: std_mpsc::Sender<Vec<WriteJob>>,
    /// The batches written during the current runtime pass, not yet handed to the writer.
    round: Round,
    /// The data directory.
    dir: std::path::PathBuf,
    /// The store's health and the free-space reserve's flag the writer reads.
    space: Arc<space::Space>,
    /// The read pool's queue ([`Store::read`]).
    reads: std_mpsc::Sender<ReadJob>,
    /// Channels whose reads are held (fault injection for tests).
    #[cfg(any(test, feature = "fault-hooks"))]
    holds: Arc<hooks::Holds>,
    /// Partitions whose reads met damaged data ([`Store::damaged`]).
    damage: damage::Damage,
    /// What start-up repair dropped from the journal (None when it was intact).
    repaired: Option<repair::Report>,
}

/// A read on its way to the read pool: runs the caller's closure and answers it.
type ReadJob = Box<dyn FnOnce() + Send>;

/// How much lower than the rest of the process the read threads run (nice value added).
/// CFS then gives a runnable routing thread about ten times a read thread's share of a
/// busy core, and a read thread what routing leaves.
#[cfg(target_os = "linux")]
const READ_NICE: libc::c_int = 10;

/// Starts `n` read threads sharing one queue; they end when the queue's sender (the
/// store) is dropped.
fn start_read_pool(n: usize) -> std_mpsc::Sender<ReadJob> {
    let (tx, rx) = std_mpsc::channel::<ReadJob>();
    let rx = Arc::new(std::sync::Mutex::new(rx));
    for i in 0..n {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("store-read-{i}"))
            .spawn(move || {
                lower_priority();
                loop {
                    // The lock is held only to take the next job, never while it runs.
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            })
            .expect("spawn store read thread");
    }
    tx
}

/// Lowers the calling thread's CPU priority by [`READ_NICE`] (Linux: the nice value is
/// per thread). Lowering needs no privilege; a failure only leaves the priority as it was.
#[allow(unsafe_code)]
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if libc::setpriority(libc::PRIO_PROCESS, tid, now + READ_NICE) != 0 {
            tracing::debug!("could not lower the priority of a store read thread");
        }
    }
}

/// A batch on its way to the log writer.
struct WriteJob {
    batch: WriteBatch,
    /// Whether the writes must be fsync'd (under the policy) before the answer.
    durable: bool,
    /// Whether the batch stores data (a message or consumer offset): refused below the
    /// free-space reserve. Batches that only remove or rewrite metadata pass.
    grows: bool,
    done: oneshot::Sender<Result<(), StoreError>>,
}

fn channel_prefix(partition: PartitionId, channel: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + channel.len() + 8);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(channel.as_bytes());
    k.push(0);
    k
}

fn message_key(partition: PartitionId, channel: &str, offset: u64) -> Vec<u8> {
    let mut k = channel_prefix(partition, channel);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

fn replog_meta_key(partition: PartitionId) -> Vec<u8> {
    let mut k = partition.to_be_bytes().to_vec();
    k.push(0);
    k
}

fn replog_touched_key(partition: PartitionId, seq: u64) -> Vec<u8> {
    let mut k = partition.to_be_bytes().to_vec();
    k.push(1);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn offset_of_key(key: &[u8]) -> u64 {
    let tail: [u8; 8] = key[key.len() - 8..].try_into().expect("message keys end in 8 offset bytes");
    u64::from_be_bytes(tail)
}

/// A set of writes that become visible together.
pub struct Batch<'a> {
    store: &'a Store,
    inner: WriteBatch,
    /// Stores data ([`WriteJob::grows`]).
    grows: bool,
}

impl Batch<'_> {
    /// Stores a message; returns its stored size.
    pub fn put_message(&mut self, p: PartitionId, channel: &str, offset: u64, msg: &StoredMessage) -> u32 {
        let value = postcard::to_stdvec(msg).expect("messages always encode");
        let size = value.len() as u32;
        self.grows = true;
        self.inner.insert(&self.store.messages, message_key(p, channel, offset), value);
        size
    }

    /// Removes a message.
    pub fn remove_message(&mut self, p: PartitionId, channel: &str, offset: u64) {
        self.inner.remove(&self.store.messages, message_key(p, channel, offset));
    }

    /// Writes a channel's metadata.
    pub fn put_meta(&mut self, p: PartitionId, channel: &str, meta: &ChannelMeta) {
        let value = postcard::to_stdvec(meta).expect("metadata always encodes");
        self.inner.insert(&self.store.meta, channel_prefix(p, channel), value);
    }

    /// Stores a consumer's committed offset.
    pub fn put_consumer(&mut self, p: PartitionId, channel: &str, consumer: &str, offset: u64) {
        let mut k = channel_prefix(p, channel);
        k.extend_from_slice(consumer.as_bytes());
        self.grows = true;
        self.inner.insert(&self.store.consumers, k, offset.to_be_bytes().to_vec());
    }

    /// Records replicated batch `seq` of `p`: the channels it touched, and the replica's
    /// position after it. The record `REPL_TOUCHED_WINDOW` batches back is dropped.
    pub fn put_repl_batch(&mut self, p: PartitionId, seq: u64, touched: &[&str], meta: &ReplLogMeta) {
        let value = postcard::to_stdvec(touched).expect("names always encode");
        self.inner.insert(&self.store.replog, replog_touched_key(p, seq), value);
        if let Some(old) = seq.checked_sub(REPL_TOUCHED_WINDOW) {
            self.inner.remove(&self.store.replog, replog_touched_key(p, old));
        }
        self.put_repl_meta(p, meta);
    }

    /// Writes the replica's position and leader-epoch history of `p`.
    pub fn put_repl_meta(&mut self, p: PartitionId, meta: &ReplLogMeta) {
        let value = postcard::to_stdvec(meta).expect("positions always encode");
        self.inner.insert(&self.store.replog, replog_meta_key(p), value);
    }

    /// Queues the removal of everything stored for one channel (metadata last).
    pub fn clear_channel(&mut self, p: PartitionId, channel: &str) -> Result<(), StoreError> {
        let prefix = channel_prefix(p, channel);
        for ks in [&self.store.messages, &self.store.consumers] {
            for guard in ks.prefix(&prefix) {
                let (k, _) = guard.into_inner()?;
                self.inner.remove(ks, k);
            }
        }
        self.inner.remove(&self.store.meta, prefix);
        Ok(())
    }

    /// Records that this node adopted partition `p` by the move of map epoch `epoch`.
    pub fn put_adopted(&mut self, p: PartitionId, epoch: u64) {
        self.inner.insert(&self.store.adopted, p.to_be_bytes().to_vec(), epoch.to_be_bytes().to_vec());
    }

    /// Queues the removal of up to `limit` of the keys stored for partition `p`
    /// (replication position first, so a copy being cleared never claims a log position;
    /// then messages, consumer offsets, and metadata last, so an interrupted clear never
    /// leaves messages without their channel); returns how many. See
    /// [`Store::clear_partition`].
    pub fn clear_partition(&mut self, p: PartitionId, limit: usize) -> Result<usize, StoreError> {
        let prefix = p.to_be_bytes();
        let mut n = 0;
        for ks in [&self.store.replog, &self.store.messages, &self.store.consumers, &self.store.meta] {
            for guard in ks.prefix(prefix).take(limit - n) {
                let (k, _) = guard.into_inner()?;
                self.inner.remove(ks, k);
                n += 1;
            }
            if n == limit {
                break;
            }
        }
        Ok(n)
    }

    /// Number of writes queued.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// Hands the batch to the log writer and waits until it is committed and, when `durable`,
    /// fsync'd as the policy says (`batch`: the next group fsync; `always`: its own fsync;
    /// `never`: written to the OS only). A batch that stores data is refused with
    /// [`StoreError::NoSpace`] while free space is below the reserve.
    pub async fn write(self, durable: bool) -> Result<(), StoreError> {
        let store = self.store;
        if let Some(refused) = self.grows.then(|| no_space(&store.space, &store.metrics)).flatten() {
            return Err(refused);
        }
        let (done, rx) = oneshot::channel();
        let job = WriteJob { batch: self.inner, durable, grows: self.grows, done };
        if store.policy == FsyncPolicy::Always {
            // Every batch gets its own fsync: nothing to gather.
            store.writer.send(vec![job]).map_err(|_| StoreError::WriterGone)?;
        } else if store.round.add(job, &store.writer) {
            // The first batch of this pass hands the whole pass over once every other task
            // that is ready has run (and queued its batch); dropped early, it hands it over
            // at once.
            let handover = Handover(store);
            tokio::task::yield_now().await;
            drop(handover);
        }
        rx.await.map_err(|_| StoreError::WriterGone)?
    }
}

/// The batches written since the last handover to the log writer. Its lock is held only to
/// append, or to take them all and send them (so rounds reach the writer in order).
#[derive(Default)]
struct Round(std::sync::Mutex<RoundState>);

#[derive(Default)]
struct RoundState {
    jobs: Vec<WriteJob>,
    /// When the round's first batch was queued, and on which thread (worker).
    opened: Option<(Instant, std::thread::ThreadId)>,
}

/// Longest a round waits for its first writer's pass to end. That writer's task runs on one
/// worker, and a long synchronous step there (a large history read) must not hold up the
/// batches other workers queue: the first of those to find the round older than this hands
/// it over itself. (A batch queued on the first writer's own thread means that worker is
/// not stuck: it leaves the round to the end of the pass.)
const ROUND_WAIT: std::time::Duration = std::time::Duration::from_micros(500);

impl Round {
    /// Queues `job`; true when it is the first of a new round (its writer must hand over).
    fn add(&self, job: WriteJob, writer: &std_mpsc::Sender<Vec<WriteJob>>) -> bool {
        let mut round = self.0.lock().unwrap_or_else(|e| e.into_inner());
        round.jobs.push(job);
        if round.jobs.len() == 1 {
            round.opened = Some((Instant::now(), std::thread::current().id()));
            return true;
        }
        let held_up = |(at, thread): (Instant, std::thread::ThreadId)| {
            at.elapsed() >= ROUND_WAIT && thread != std::thread::current().id()
        };
        if round.opened.is_some_and(held_up) {
            Self::send(&mut round, writer);
        }
        false
    }

    /// Sends the round to the log writer, if it holds anything.
    fn hand_over(&self, writer: &std_mpsc::Sender<Vec<WriteJob>>) {
        Self::send(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()), writer);
    }

    /// A send fails only once the writer is gone; the jobs' answer channels then close and
    /// their writers see `WriterGone`.
    fn send(round: &mut RoundState, writer: &std_mpsc::Sender<Vec<WriteJob>>) {
        round.opened = None;
        if !round.jobs.is_empty() {
            let _ = writer.send(std::mem::take(&mut round.jobs));
        }
    }
}

/// Hands the current round to the log writer when dropped.
struct Handover<'a>(&'a Store);

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        self.0.round.hand_over(&self.0.writer);
    }
}

impl Store {
    /// Opens (or creates) the store under `dir` and starts its syncer thread, with the
    /// default read pool ([`default_read_threads`]).
    pub fn open(dir: &Path, policy: FsyncPolicy, metrics: Arc<Metrics>) -> Result<Arc<Self>, StoreError> {
        Self::open_with_readers(dir, policy, metrics, default_read_threads())
    }

    /// [`Store::open`] with a read pool of `read_threads` concurrent reads (at least one).
    pub fn open_with_readers(
        dir: &Path,
        policy: FsyncPolicy,
        metrics: Arc<Metrics>,
        read_threads: usize,
    ) -> Result<Arc<Self>, StoreError> {
        let repaired = repair_journal(dir, &metrics)?;
        let db = Database::builder(dir).open()?;
        let meta = db.keyspace("channels", KeyspaceCreateOptions::default)?;
        let messages = db.keyspace("messages", KeyspaceCreateOptions::default)?;
        let consumers = db.keyspace("consumers", KeyspaceCreateOptions::default)?;
        let adopted = db.keyspace("adopted", KeyspaceCreateOptions::default)?;
        let replog = db.keyspace("replog", KeyspaceCreateOptions::default)?;
        let (writer, jobs) = std_mpsc::channel::<Vec<WriteJob>>();
        let writer_db = db.clone();
        let space = Arc::new(space::Space::new());
        let writer_space = space.clone();
        let writer_metrics = metrics.clone();
        let damage = damage::Damage::new(metrics.clone());
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(writer_db, jobs, policy, writer_metrics, writer_space))
            .expect("spawn store writer thread");
        Ok(Arc::new(Self {
            db,
            meta,
            messages,
            consumers,
            replog,
            adopted,
            policy,
            writer,
            round: Round::default(),
            dir: dir.to_path_buf(),
            space,
            metrics,
            reads: start_read_pool(read_threads.max(1)),
            #[cfg(any(test, feature = "fault-hooks"))]
            holds: Arc::default(),
            damage,
            repaired,
        }))
    }

    /// The partitions whose reads met damaged or unreadable data since the store opened,
    /// each with the first few channels seen failing (empty while none did).
    pub fn damaged(&self) -> Vec<(PartitionId, Vec<String>)> {
        if !self.damage.any() {
            return Vec::new();
        }
        self.damage.partitions()
    }

    /// True once any read met damaged data (a cheap check for `/healthz`).
    pub fn has_damage(&self) -> bool {
        self.damage.any()
    }

    /// What start-up repair dropped from a damaged journal (None when it was intact).
    pub fn journal_repair(&self) -> Option<&repair::Report> {
        self.repaired.as_ref()
    }

    /// The store's health now and every change to it: below the free-space reserve (writes
    /// refused, back by themselves), or failed (for good).
    pub fn health(&self) -> tokio::sync::watch::Receiver<Health> {
        self.space.health()
    }

    /// Starts checking the data directory's free space against `reserve` (a first check
    /// runs before this returns); until it is called nothing is refused for space.
    pub fn guard_space(&self, reserve: Reserve) {
        space::watch_space(&self.dir, reserve, &self.space, self.metrics.clone());
    }

    /// The configured fsync policy.
    pub fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    /// A new empty batch.
    pub fn batch(&self) -> Batch<'_> {
        // No flush of the journal's buffer per batch: the writer flushes once per group
        // (see `commit_group`), before any of the group's batches is answered.
        Batch { store: self, inner: self.db.batch().durability(None), grows: false }
    }

    /// Runs `f` with a [`Reader`] on the read pool and returns what it returns: the only
    /// way to read the store once the node serves. The pool is `read_threads` OS threads
    /// of their own (never a runtime worker), each at a lower CPU priority than the rest
    /// of the process, so reads take only the CPU that routing leaves; reads queue for
    /// them in arrival order. A read whose caller stopped waiting before a thread took it
    /// is skipped; one already running runs to its end, so `f` should read one bounded
    /// page, not loop without end.
    pub async fn read<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Reader<'_>) -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let store = self.clone();
        let job: ReadJob = Box::new(move || {
            if tx.is_closed() {
                return;
            }
            let _ = tx.send(f(store.reader()));
        });
        self.reads.send(job).map_err(|_| StoreError::ReadPoolGone)?;
        rx.await.map_err(|_| StoreError::ReadPanicked("the read did not answer".into()))
    }

    /// Runs `f` on the read pool like a read ([`Store::read`]): for the CPU-heavy part of
    /// answering a read (encoding a large page), which then waits behind routing as the
    /// read itself did.
    pub async fn off_worker<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.read(move |_| f()).await
    }

    /// The synchronous reads, for start-up only: recovery in `Partitions::start`, before
    /// the node serves and before any owner runs. Everything later reads through
    /// [`Store::read`].
    pub fn startup_reader(&self) -> Reader<'_> {
        self.reader()
    }

    pub(crate) fn reader(&self) -> Reader<'_> {
        Reader { store: self }
    }

    /// Holds every read of `channel` (they wait inside the read pool) until the returned
    /// guard is dropped: fault injection for tests, compiled only with the `fault-hooks`
    /// feature.
    #[cfg(any(test, feature = "fault-hooks"))]
    pub fn hold_reads(&self, channel: &str) -> hooks::ReadHold {
        hooks::ReadHold::new(self.holds.clone(), channel)
    }

    /// Waits while reads of `channel` are held (a no-op without the `fault-hooks` feature).
    #[inline]
    fn read_gate(&self, channel: &str) {
        #[cfg(any(test, feature = "fault-hooks"))]
        self.holds.wait(channel);
        let _ = channel;
    }

    /// Flushes and fsyncs everything. Used on shutdown; the writer thread ends with the store.
    pub fn close(&self) -> Result<(), StoreError> {
        Ok(self.db.persist(PersistMode::SyncAll)?)
    }

    /// Removes everything stored for partition `p`, in batches of bounded size so other
    /// partitions' commits are not held up behind one huge batch.
    pub async fn clear_partition(&self, p: PartitionId) -> Result<(), StoreError> {
        const STEP: usize = 10_000;
        loop {
            let mut batch = self.batch();
            let n = batch.clear_partition(p, STEP)?;
            if n == 0 {
                return Ok(());
            }
            batch.write(false).await?;
            if n < STEP {
                return Ok(());
            }
        }
    }

    /// This replica's replication position and leader-epoch history of `p` (None when it
    /// holds no replicated copy: never replicated, or cleared since).
    pub fn repl_meta(&self, p: PartitionId) -> Result<Option<ReplLogMeta>, StoreError> {
        let r = (|| Ok(self.replog.get(replog_meta_key(p))?.map(|v| postcard::from_bytes(&v)).transpose()?))();
        self.seen(Some(p), None, r)
    }

    /// Notes a failed read in the damage record; passes the result on unchanged.
    fn seen<T>(
        &self,
        p: Option<PartitionId>,
        channel: Option<&str>,
        r: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if let Err(e) = &r {
            self.damage.note(p, channel, e);
        }
        r
    }

    /// The channels touched by replicated batches `from..to` of `p`; None when a record is
    /// missing (older than the window, or the copy was replaced since).
    pub fn repl_touched(
        &self,
        p: PartitionId,
        from: u64,
        to: u64,
    ) -> Result<Option<std::collections::BTreeSet<String>>, StoreError> {
        let r = (|| {
            let mut out = std::collections::BTreeSet::new();
            let mut next = from;
            if from >= to {
                return Ok(Some(out));
            }
            for guard in self.replog.range(replog_touched_key(p, from)..replog_touched_key(p, to)) {
                let (k, v) = guard.into_inner()?;
                let seq = offset_of_key(&k);
                if seq != next {
                    return Ok(None);
                }
                next += 1;
                out.extend(postcard::from_bytes::<Vec<String>>(&v)?);
            }
            Ok((next == to).then_some(out))
        })();
        self.seen(Some(p), None, r)
    }

    /// The map epoch of the move by which this node last adopted partition `p`.
    pub fn adopted(&self, p: PartitionId) -> Result<Option<u64>, StoreError> {
        let r = (|| {
            Ok(self
                .adopted
                .get(p.to_be_bytes())?
                .map(|v| u64::from_be_bytes(v[..8].try_into().expect("8-byte epochs"))))
        })();
        self.seen(Some(p), None, r)
    }
}

// === impl Reader ===

/// The synchronous reads of the store. A `Reader` exists only inside a read the pool
/// runs ([`Store::read`]) or at start-up ([`Store::startup_reader`]): these calls may
/// scan many keys and touch the disk, so they never run on an async runtime worker.
#[derive(Clone, Copy)]
pub struct Reader<'a> {
    store: &'a Store,
}

impl Reader<'_> {
    /// Every channel's metadata, for recovery at startup.
    pub fn all_channels(self) -> Result<Vec<(PartitionId, String, ChannelMeta)>, StoreError> {
        let r = (|| {
            let mut out = Vec::new();
            for guard in self.store.meta.iter() {
                let (k, v) = guard.into_inner()?;
                let p = PartitionId::from_be_bytes(k[..4].try_into().expect("meta keys start with a partition"));
                let name = String::from_utf8_lossy(&k[4..k.len() - 1]).into_owned();
                out.push((p, name, postcard::from_bytes(&v)?));
            }
            Ok(out)
        })();
        self.store.seen(None, None, r)
    }

    /// Decodes up to `limit` messages of `channel` with offsets in `from..=upto`, oldest
    /// first (newest first when `newest_first`), each as `f(offset, stored size, message)`.
    fn scan<T>(
        self,
        p: PartitionId,
        channel: &str,
        (from, upto): (u64, u64),
        (limit, newest_first): (usize, bool),
        mut f: impl FnMut(u64, u32, StoredMessage) -> T,
    ) -> Result<Vec<T>, StoreError> {
        self.store.read_gate(channel);
        if from > upto || limit == 0 {
            return Ok(Vec::new());
        }
        let range = self.store.messages.range(message_key(p, channel, from)..=message_key(p, channel, upto));
        let decode = |guard: fjall::Guard| {
            let (k, v) = guard.into_inner()?;
            Ok(f(offset_of_key(&k), v.len() as u32, postcard::from_bytes(&v)?))
        };
        let r = if newest_first {
            range.rev().take(limit).map(decode).collect()
        } else {
            range.take(limit).map(decode).collect()
        };
        self.store.seen(Some(p), Some(channel), r)
    }

    /// Up to `limit` messages with `after < offset <= upto`, oldest first.
    pub fn read_messages(
        self,
        p: PartitionId,
        channel: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StoredMessage)>, StoreError> {
        self.scan(p, channel, (after.saturating_add(1), upto), (limit, false), |offset, _, m| (offset, m))
    }

    /// Up to `limit` messages with `after < offset <= upto`, newest first: the newest
    /// `limit` of the range (a backward history page).
    pub fn read_messages_rev(
        self,
        p: PartitionId,
        channel: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StoredMessage)>, StoreError> {
        self.scan(p, channel, (after.saturating_add(1), upto), (limit, true), |offset, _, m| (offset, m))
    }

    /// `(offset, ts, idempotency key)` of the newest messages back to the first one older
    /// than `cutoff_ms` (at most `limit`), newest first. Payloads are not decoded.
    pub fn recent_idempotency_keys(
        self,
        p: PartitionId,
        channel: &str,
        upto: u64,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64, String)>, StoreError> {
        /// The leading fields of a [`StoredMessage`]; postcard stops before the payload.
        #[derive(Deserialize)]
        struct Head {
            ts: u64,
            _key: Option<String>,
            _from: Option<String>,
            idem: Option<String>,
        }
        self.store.read_gate(channel);
        let r = (|| {
            let mut out = Vec::new();
            let range = self.store.messages.range(message_key(p, channel, 0)..=message_key(p, channel, upto));
            for guard in range.rev().take(limit) {
                let (k, v) = guard.into_inner()?;
                let (head, _) = postcard::take_from_bytes::<Head>(&v)?;
                if head.ts < cutoff_ms {
                    break;
                }
                if let Some(key) = head.idem {
                    out.push((offset_of_key(&k), head.ts, key));
                }
            }
            Ok(out)
        })();
        self.store.seen(Some(p), Some(channel), r)
    }

    /// Policy metadata of up to `limit` messages with `from <= offset <= upto`, oldest first.
    pub fn read_metas(
        self,
        p: PartitionId,
        channel: &str,
        from: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<MessageMeta>, StoreError> {
        self.scan(p, channel, (from, upto), (limit, false), |offset, size, m| MessageMeta {
            offset,
            ts: m.ts,
            size,
            tombstone: m.is_tombstone(),
            key: m.key,
        })
    }

    /// The stored metadata of one channel.
    pub fn channel_meta(self, p: PartitionId, channel: &str) -> Result<Option<ChannelMeta>, StoreError> {
        self.store.read_gate(channel);
        let r =
            (|| Ok(self.store.meta.get(channel_prefix(p, channel))?.map(|v| postcard::from_bytes(&v)).transpose()?))();
        self.store.seen(Some(p), Some(channel), r)
    }

    /// Up to `limit` channels stored for partition `p` with names at or above `from` (from
    /// the first when None), in name order.
    pub fn partition_channels(
        self,
        p: PartitionId,
        from: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, ChannelMeta)>, StoreError> {
        let start = match from {
            Some(name) => channel_prefix(p, name),
            None => p.to_be_bytes().to_vec(),
        };
        // P is at most a few thousand, so p + 1 never overflows.
        let end = (p + 1).to_be_bytes().to_vec();
        let r = (|| {
            let mut out = Vec::new();
            for guard in self.store.meta.range(start..end).take(limit) {
                let (k, v) = guard.into_inner()?;
                let name = String::from_utf8_lossy(&k[4..k.len() - 1]).into_owned();
                out.push((name, postcard::from_bytes(&v)?));
            }
            Ok(out)
        })();
        self.store.seen(Some(p), None, r)
    }

    /// Every consumer offset committed on `channel`.
    pub fn consumers_of(self, p: PartitionId, channel: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.store.read_gate(channel);
        let prefix = channel_prefix(p, channel);
        let r = (|| {
            let mut out = Vec::new();
            for guard in self.store.consumers.prefix(&prefix) {
                let (k, v) = guard.into_inner()?;
                let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                out.push((name, u64::from_be_bytes(v[..8].try_into().expect("8-byte offsets"))));
            }
            Ok(out)
        })();
        self.store.seen(Some(p), Some(channel), r)
    }

    /// A consumer's committed offset.
    pub fn consumer_offset(self, p: PartitionId, channel: &str, consumer: &str) -> Result<Option<u64>, StoreError> {
        self.store.read_gate(channel);
        let mut k = channel_prefix(p, channel);
        k.extend_from_slice(consumer.as_bytes());
        let r = (|| {
            Ok(self.store.consumers.get(k)?.map(|v| u64::from_be_bytes(v[..8].try_into().expect("8-byte offsets"))))
        })();
        self.store.seen(Some(p), Some(channel), r)
    }
}

/// The log writer: commits each queued batch, then fsyncs once for all of them (group
/// commit). With `always` every batch gets its own fsync; with `never` none does.
fn write_loop(
    db: Database,
    jobs: std_mpsc::Receiver<Vec<WriteJob>>,
    policy: FsyncPolicy,
    metrics: Arc<Metrics>,
    space: Arc<space::Space>,
) {
    let commit = |group: Vec<WriteJob>| commit_group(&db, group, policy, &metrics, &space);
    while let Ok(mut group) = jobs.recv() {
        if policy == FsyncPolicy::Always {
            group.into_iter().for_each(|job| commit(vec![job]));
            continue;
        }
        group.extend(jobs.try_iter().flatten());
        commit(group);
    }
}

/// The refusal of a batch that stores data, while free space is below the reserve.
fn no_space(space: &space::Space, metrics: &Metrics) -> Option<StoreError> {
    let (free, reserve) = space.refused()?;
    metrics.store_space_refusals.inc();
    Some(StoreError::NoSpace { free, reserve })
}

/// Commits `group`, fsyncs once if any of it must be durable, and answers every batch.
/// A batch that stores data is refused, uncommitted, while free space is below the reserve
/// (it may have been queued before the state changed).
fn commit_group(db: &Database, group: Vec<WriteJob>, policy: FsyncPolicy, metrics: &Metrics, space: &space::Space) {
    let mut must_sync = false;
    let mut refused = Vec::new();
    let mut answers: Vec<_> = group
        .into_iter()
        .filter_map(|WriteJob { batch, durable, grows, done }| {
            if let Some(e) = grows.then(|| no_space(space, metrics)).flatten() {
                refused.push((done, e));
                return None;
            }
            let r = batch.commit().map_err(Arc::new);
            must_sync |= durable && r.is_ok();
            Some((done, durable, r))
        })
        .collect();
    for (done, e) in refused {
        let _ = done.send(Err(e));
    }
    if must_sync && policy != FsyncPolicy::Never {
        // Flushes the journal's buffer, then fsyncs.
        let started = Instant::now();
        let synced = db.persist(PersistMode::SyncData).map_err(Arc::new);
        metrics.store_sync_seconds.observe(started.elapsed().as_secs_f64());
        metrics.store_syncs.inc();
        if let Err(e) = &synced {
            for (_, _, r) in answers.iter_mut().filter(|(_, durable, _)| *durable) {
                *r = Err(e.clone());
            }
        }
    } else if let Err(e) = db.persist(PersistMode::Buffer) {
        // One write of the journal's buffer to the OS for the whole group: what is
        // answered survives a crash of the process.
        let e = Arc::new(e);
        for (_, _, r) in answers.iter_mut() {
            *r = Err(e.clone());
        }
    }
    let failed = answers.iter().filter(|(_, _, r)| r.is_err()).count();
    if let Some(e) = answers.iter().find_map(|(_, _, r)| r.as_ref().err()) {
        // Logged once, at the failure: every later write fails the same way until the
        // node restarts.
        if space.is_failed() {
            tracing::debug!(error = %e, batches = failed, "store write refused: the store has failed");
        } else {
            tracing::error!(error = %e, batches = failed, "store write or fsync failed: the store refuses every write from now on");
            space.fail();
            metrics.store_failed.set(1);
        }
    }
    for (done, _, r) in answers {
        let _ = done.send(r.map_err(StoreError::Sync));
    }
}

/// The default size of the read pool: twice the cores, at least 4 (`store_read_threads`).
/// Reads mostly decode what the page cache holds, so more would only queue for the same
/// cores, while a few spare threads let a read waiting on the disk overlap the others.
pub fn default_read_threads() -> usize {
    std::thread::available_parallelism().map_or(4, |n| (2 * n.get()).max(4))
}

/// Runs start-up repair on `dir`'s journal ([`repair::repair`]) and says at ERROR what it
/// dropped; None when the journal was intact (it is then not written at all).
fn repair_journal(dir: &Path, metrics: &Metrics) -> Result<Option<repair::Report>, StoreError> {
    let report = repair::repair(dir)?;
    let Some(damage) = &report.damage else {
        return Ok(None);
    };
    let (batches, bytes, seqnos) = (report.dropped_batches(), report.dropped_bytes(), report.dropped_seqnos());
    metrics.store_journal_dropped_batches.inc_by(batches);
    metrics.store_journal_dropped_bytes.inc_by(bytes);
    tracing::error!(
        journal = %damage.file.display(),
        at = damage.at,
        fault = %damage.fault,
        kept_batches = report.kept_batches,
        dropped_batches = batches,
        dropped_bytes = bytes,
        dropped_seqnos = ?seqnos,
        later_journals = report.later.len(),
        moved_to = %report.moved_to.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
        "store journal damaged: kept every batch before the damage, dropped {batches} batch(es) ({bytes} bytes) from it on; the damaged files are kept in the directory named by moved_to"
    );
    Ok(Some(report))
}

mod damage;
pub mod log_limit;
pub mod repair;

#[cfg(any(test, feature = "fault-hooks"))]
pub mod hooks;
mod space;
pub use space::{Health, Reserve, CHECK_EVERY};

#[cfg(test)]
mod tests;

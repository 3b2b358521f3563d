//! The wasmtime sandbox: one engine, one linker, module validation and the ABI v1 and v2
//! calls.
//!
//! It owns everything that touches wasmtime: compiling (with an on-disk cache keyed by
//! the module's sha256 and the engine's compatibility hash), checking a module's imports
//! and exports against its ABI (the version marker selects v1 or v2), and running one call
//! in a fresh store with a memory cap and an epoch deadline, bounds-checking every pointer
//! and index the guest hands back. It must never decide what a failure means for routing
//! (the registry does) and never give a guest any import but `switchyard.log` and, to v2
//! modules, `switchyard.key` and `switchyard.payload` (which reads a payload from the
//! caller's [`Payloads`] only when the guest asks, never up front).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};
use switchyard_core::policy::Payloads;
use switchyard_sdk as abi;
use switchyard_sdk::balance_v2 as v2b;
use switchyard_sdk::v2;
use wasmtime::{
    Caller, Engine, ExternType, InstancePre, Linker, Module, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder,
    Trap, ValType,
};

/// How often the epoch advances; deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(2);
/// Most log lines one call may emit (the rest are dropped).
const LOG_LINES_PER_CALL: u32 = 50;
/// Longest log line kept.
const LOG_LINE_MAX: usize = 1024;

/// The plugin kinds (the same in ABI v1 and v2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `switchyard_retention`.
    Retention,
    /// `switchyard_compaction`.
    Compaction,
    /// `switchyard_balance`.
    Balance,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 3] = [Kind::Retention, Kind::Compaction, Kind::Balance];

    /// The entry point's export name.
    pub fn export(self) -> &'static str {
        match self {
            Kind::Retention => abi::RETENTION_EXPORT,
            Kind::Compaction => abi::COMPACTION_EXPORT,
            Kind::Balance => abi::BALANCE_EXPORT,
        }
    }

    /// Label value for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Retention => "retention",
            Kind::Compaction => "compaction",
            Kind::Balance => "balance",
        }
    }
}

/// Why a module was refused at load time.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not a valid wasm module, or cranelift refused it.
    #[error("not a valid wasm module: {0}")]
    Compile(String),
    /// The ABI marker is missing or names another version.
    #[error("unsupported ABI version: {0}")]
    Abi(String),
    /// A required export is missing or has the wrong type.
    #[error("bad exports: {0}")]
    Exports(String),
    /// The module imports something the host does not give.
    #[error("forbidden import: {0}")]
    Import(String),
    /// Compiling took longer than its deadline, or earlier modules that did still occupy
    /// the compiler.
    #[error("compilation refused: {0}")]
    TooSlow(String),
}

/// Why one call produced no decision. Each maps to a `reason` metric label.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The epoch deadline passed.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The guest tried to grow memory past the cap.
    #[error("memory limit of {0} bytes hit")]
    Memory(usize),
    /// Any other trap.
    #[error("trap: {0}")]
    Trap(String),
    /// A pointer or length outside the guest's memory.
    #[error("out-of-bounds output: {0}")]
    OutOfBounds(String),
    /// Output that does not decode, or a negative status.
    #[error("garbage output: {0}")]
    Garbage(String),
    /// The guest reported its own error.
    #[error("plugin error: {0}")]
    Guest(String),
    /// The decision broke the host's rules.
    #[error("invalid decision: {0}")]
    Invalid(String),
}

impl CallError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            CallError::Timeout(_) => "timeout",
            CallError::Memory(_) => "memory",
            CallError::Trap(_) => "trap",
            CallError::OutOfBounds(_) => "out_of_bounds",
            CallError::Garbage(_) => "garbage",
            CallError::Guest(_) => "guest_error",
            CallError::Invalid(_) => "invalid_output",
        }
    }
}

/// The largest output a decision for this input can honestly need; anything longer is
/// refused before it is decoded, so a guest cannot make the host decode gigabytes.
pub trait OutputBound {
    /// Maximum output length in bytes.
    fn max_output(&self) -> usize;
}

/// One channel of a v2 call: the record kind, `now_ms` and the channel.
pub struct V2Call<'a> {
    /// [`v2::KIND_RETENTION`] or [`v2::KIND_COMPACTION`].
    pub kind: u32,
    /// Current time.
    pub now_ms: u64,
    /// The channel.
    pub channel: v2::ChannelIn<'a>,
}

/// An input the host can send to a plugin: postcard (ABI v1, and balance in v2) or v2
/// records, with the decision type it answers.
pub trait PolicyInput: Serialize + OutputBound {
    /// The decision.
    type Output: DeserializeOwned;
    /// The v2 record form of this input; None when the kind keeps postcard in v2 (balance).
    fn v2(&self) -> Option<V2Call<'_>>;
    /// The decision from a v2 answer for this input.
    fn decision_from_v2(&self, answer: v2::Answer) -> Result<Self::Output, CallError>;
}

/// Compaction inputs carry no counters: v2 sends zeros.
static ZERO_STATS: abi::ChannelStats = abi::ChannelStats { first_offset: 0, last_offset: 0, count: 0, bytes: 0 };

impl PolicyInput for abi::RetentionInput {
    type Output = abi::RetentionDecision;
    fn v2(&self) -> Option<V2Call<'_>> {
        let channel = v2::ChannelIn { name: &self.channel, stats: &self.stats, messages: &self.oldest };
        Some(V2Call { kind: v2::KIND_RETENTION, now_ms: self.now_ms, channel })
    }
    fn decision_from_v2(&self, answer: v2::Answer) -> Result<Self::Output, CallError> {
        match answer {
            v2::Answer::Retention(d) => Ok(d),
            v2::Answer::Compaction(_) => Err(CallError::Garbage("a compaction answer to a retention call".into())),
        }
    }
}

impl PolicyInput for abi::CompactionInput {
    type Output = abi::CompactionDecision;
    fn v2(&self) -> Option<V2Call<'_>> {
        let channel = v2::ChannelIn { name: &self.channel, stats: &ZERO_STATS, messages: &self.window };
        Some(V2Call { kind: v2::KIND_COMPACTION, now_ms: self.now_ms, channel })
    }
    fn decision_from_v2(&self, answer: v2::Answer) -> Result<Self::Output, CallError> {
        match answer {
            v2::Answer::Compaction(r) => Ok(v2::removals_to_decision(&r, &self.window)),
            v2::Answer::Retention(_) => Err(CallError::Garbage("a retention answer to a compaction call".into())),
        }
    }
}

impl PolicyInput for abi::BalanceInput {
    type Output = abi::BalanceDecision;
    fn v2(&self) -> Option<V2Call<'_>> {
        None
    }
    fn decision_from_v2(&self, _: v2::Answer) -> Result<Self::Output, CallError> {
        Err(CallError::Garbage("balance answers are postcard".into()))
    }
}

/// Room for a guest error message on top of any decision.
const ERROR_ROOM: usize = 1024;

impl OutputBound for abi::RetentionInput {
    fn max_output(&self) -> usize {
        ERROR_ROOM + 16
    }
}

impl OutputBound for abi::CompactionInput {
    fn max_output(&self) -> usize {
        ERROR_ROOM + 16 + 10 * self.window.len()
    }
}

impl OutputBound for abi::BalanceInput {
    fn max_output(&self) -> usize {
        let longest_id = self.nodes.iter().map(|n| n.id.len()).max().unwrap_or(0);
        ERROR_ROOM + 16 + self.partitions.len() * (longest_id + 5)
    }
}

/// Per-call store state: wasmtime's `StoreLimits` (memory cap, one instance, small
/// tables, growth failures trap) plus a note of which limit was hit, and the log budget.
struct CallState {
    plugin: Arc<str>,
    /// The host's per-plugin log windows.
    log_budget: Arc<LogBudget>,
    limits: StoreLimits,
    max_memory: usize,
    memory_hit: bool,
    logs_left: u32,
    /// v2: the keys of this call's messages, for `switchyard.key`.
    keys: KeyTable,
    /// v2: where `switchyard.payload` reads this call's messages from (None: the caller
    /// gave no payload source, and every in-range read answers -1).
    payloads: Option<PayloadTable>,
    /// A host import refused the guest's arguments (an index or pointer out of range).
    fault: Option<String>,
}

/// The keys of one v2 call's messages, by message index: one buffer and a span each.
#[derive(Default)]
struct KeyTable {
    bytes: Vec<u8>,
    /// `(start, len)` in `bytes`; `len == u32::MAX` for an unkeyed message.
    spans: Vec<(u32, u32)>,
}

/// The messages of one v2 call, by message index, as `switchyard.payload` reads them: the
/// caller's payload source and what it needs to name each message (owned: the store keeps
/// it for the whole call).
struct PayloadTable {
    /// Reads a payload from the store at the moment the guest asks.
    source: Arc<dyn Payloads>,
    /// Per channel, ascending: the index of its first message and its name.
    channels: Vec<(u32, Arc<str>)>,
    /// Per message index: its offset.
    offsets: Vec<u64>,
    /// The last read, `(index, payload)`: a guest that asks again with a larger buffer gets
    /// the same bytes, without a second store read.
    last: Option<(u32, Option<String>)>,
}

impl PayloadTable {
    /// The table of a v2 call's channels (index = position in the message table).
    fn new(source: &Arc<dyn Payloads>, channels: &[v2::ChannelIn<'_>]) -> Self {
        let total = channels.iter().map(|c| c.messages.len()).sum();
        let mut t = PayloadTable {
            source: source.clone(),
            channels: Vec::with_capacity(channels.len()),
            offsets: Vec::with_capacity(total),
            last: None,
        };
        for c in channels {
            t.channels.push((t.offsets.len() as u32, Arc::from(c.name)));
            t.offsets.extend(c.messages.iter().map(|m| m.offset));
        }
        t
    }

    /// Channel name and offset of message `index` (None past the end).
    fn locate(&self, index: u32) -> Option<(Arc<str>, u64)> {
        let offset = *self.offsets.get(index as usize)?;
        // The last channel starting at or before `index` (empty channels share a start).
        let c = self.channels.partition_point(|(start, _)| *start <= index).checked_sub(1)?;
        Some((self.channels[c].1.clone(), offset))
    }
}

impl ResourceLimiter for CallState {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.memory_hit = true;
        }
        self.limits.memory_growing(current, desired, maximum)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// A compiled, validated module ready to instantiate.
pub struct Compiled {
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
    /// Entry points it exports.
    pub kinds: Vec<Kind>,
    /// ABI version (1 or 2), from its marker export.
    pub abi: u32,
    pre: InstancePre<CallState>,
    /// ABI v2 balance: the last input encoded for this module, updated where it changed.
    balance_cache: std::sync::Mutex<v2b::BalanceEncoder>,
}

impl Compiled {
    /// Drops the cached ABI v2 balance input, so the next balance call encodes from
    /// scratch (for `plugin check`'s cold figure).
    pub(crate) fn forget_balance_input(&self) {
        if let Ok(mut enc) = self.balance_cache.lock() {
            *enc = v2b::BalanceEncoder::default();
        }
    }
}

/// Limits applied to every call.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    /// Deadline per call.
    pub timeout: Duration,
    /// Memory cap per instance, in bytes.
    pub max_memory: usize,
}

impl Default for CallLimits {
    /// The router's defaults (`plugins.call_timeout`, `plugins.memory_limit_bytes`).
    fn default() -> Self {
        Self { timeout: Duration::from_millis(50), max_memory: 32 * 1024 * 1024 }
    }
}

/// Instance slots of the pooling allocator: the most plugin calls that run at once (more
/// wait for a slot; see [`Host::call`]).
const POOL_SLOTS: u32 = 64;

/// Bytes of each pooled memory (and table) kept resident between calls.
const KEEP_RESIDENT: usize = 512 << 10;

/// Compilations past their deadline that may still run before new ones are refused.
pub const MAX_SLOW_COMPILES: usize = 2;

/// The digest file beside a cache entry: sha256 of the artifact's bytes.
fn digest_path(path: &Path) -> PathBuf {
    path.with_extension("cwasm.sha256")
}

/// The artifact at `path` if it may be loaded as native code: a regular file, not group-
/// or world-writable, whose bytes match the digest recorded when it was written. Anything
/// else is ignored (and recompiled over).
fn read_cache_entry(path: &Path) -> Option<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_file() || meta.permissions().mode() & 0o022 != 0 {
        tracing::warn!(path = %path.display(), "plugin cache entry is not a private regular file; recompiling");
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    let recorded = std::fs::read_to_string(digest_path(path)).ok()?;
    if recorded.trim() != crate::host_sha256(&bytes) {
        tracing::warn!(path = %path.display(), "plugin cache entry does not match its digest; recompiling");
        return None;
    }
    Some(bytes)
}

/// Writes an artifact and its digest (each through a temporary file and a rename), private
/// to this user.
fn write_cache_entry(path: &Path, artifact: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let put = |path: &Path, bytes: &[u8]| {
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    put(&digest_path(path), crate::host_sha256(artifact).as_bytes())?;
    put(path, artifact)
}

/// The process's one wasm engine.
pub struct Host {
    engine: Engine,
    linker: Linker<CallState>,
    cache_dir: Option<PathBuf>,
    /// Guest log lines per plugin per second.
    log_budget: Arc<LogBudget>,
    /// Compilations running on their own threads (a timed-out one keeps running: cranelift
    /// cannot be interrupted).
    compiling: Arc<std::sync::atomic::AtomicUsize>,
    /// v2 key hashes: SipHash-1-3 under a key random per process, so a publisher cannot
    /// choose keys whose hashes collide.
    key_hasher: std::collections::hash_map::RandomState,
    /// Free instance slots of the pool: a call waits for one rather than fail.
    slots: Slots,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.slots.ticker.stopped.store(true, std::sync::atomic::Ordering::Release);
        self.slots.ticker.wake();
    }
}

/// A counting semaphore over the pooling allocator's instance slots. Every call holds one,
/// so the epoch ticker runs only while some slot is taken.
struct Slots {
    free: std::sync::Mutex<u32>,
    freed: std::sync::Condvar,
    ticker: Arc<Ticker>,
}

impl Slots {
    fn take(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().expect("slots");
        while *free == 0 {
            free = self.freed.wait(free).expect("slots");
        }
        *free -= 1;
        drop(free);
        self.ticker.call_started();
        SlotGuard(self)
    }
}

/// Gives its slot back on drop (after the call's store is gone).
struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.ticker.calls.fetch_sub(1, std::sync::atomic::Ordering::Release);
        *self.0.free.lock().expect("slots") += 1;
        self.0.freed.notify_one();
    }
}

/// The epoch ticker's thread and what it needs to know: it advances the engine's epoch
/// every [`TICK`] while any call runs and sleeps (parked, no wake-ups) while none does, so
/// an idle node, and the routing threads it shares a core with, pay nothing for it.
struct Ticker {
    calls: std::sync::atomic::AtomicUsize,
    stopped: std::sync::atomic::AtomicBool,
    thread: std::sync::OnceLock<std::thread::Thread>,
}

impl Ticker {
    fn call_started(&self) {
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::AcqRel) == 0 {
            self.wake();
        }
    }

    fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// The ticker thread's loop; `park` keeps a pending unpark, so no call start is missed.
    fn run(&self, engine: wasmtime::EngineWeak) {
        use std::sync::atomic::Ordering;
        loop {
            if self.calls.load(Ordering::Acquire) == 0 {
                std::thread::park();
            }
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            if self.calls.load(Ordering::Acquire) == 0 {
                continue;
            }
            std::thread::sleep(TICK);
            match engine.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        }
    }
}

impl Host {
    /// Builds the engine, the linker (with `switchyard.log` only) and the epoch ticker.
    pub fn new(cache_dir: Option<PathBuf>) -> wasmtime::Result<Arc<Self>> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        // Instances come from a pool of preallocated slots: no mmap/munmap per call. The
        // per-call memory cap is the store limiter's; a slot only bounds the address space.
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_core_instances(POOL_SLOTS).total_memories(POOL_SLOTS).total_tables(POOL_SLOTS);
        // Reset a slot's first pages with memset rather than giving them back to the kernel
        // (which makes the next call fault them in again).
        pool.linear_memory_keep_resident(KEEP_RESIDENT).table_keep_resident(KEEP_RESIDENT);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        linker.func_wrap(
            abi::HOST_MODULE,
            abi::LOG_IMPORT,
            |mut caller: Caller<'_, CallState>, level: i32, ptr: i32, len: i32| {
                guest_log(&mut caller, level, ptr, len);
            },
        )?;
        linker.func_wrap(
            abi::HOST_MODULE,
            abi::KEY_IMPORT,
            |mut caller: Caller<'_, CallState>, index: i32, ptr: i32, cap: i32| guest_key(&mut caller, index, ptr, cap),
        )?;
        linker.func_wrap(
            abi::HOST_MODULE,
            abi::PAYLOAD_IMPORT,
            |mut caller: Caller<'_, CallState>, index: i32, ptr: i32, cap: i32| {
                guest_payload(&mut caller, index, ptr, cap)
            },
        )?;
        if let Some(dir) = &cache_dir {
            // Native code is loaded from here: only this user may write to it.
            use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
            let made = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
            let private = made.and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)));
            if let Err(e) = private {
                tracing::warn!(dir = %dir.display(), error = %e, "plugin cache disabled");
            }
        }
        // The ticker holds only a weak reference to the engine; the host stops it on drop.
        let weak = engine.weak();
        let ticker =
            Arc::new(Ticker { calls: Default::default(), stopped: Default::default(), thread: Default::default() });
        let ticking = ticker.clone();
        let thread = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || ticking.run(weak))
            .map_err(wasmtime::Error::from)?;
        let _ = ticker.thread.set(thread.thread().clone());
        Ok(Arc::new(Self {
            engine,
            linker,
            cache_dir,
            log_budget: Arc::default(),
            compiling: Arc::default(),
            key_hasher: Default::default(),
            slots: Slots { free: std::sync::Mutex::new(POOL_SLOTS), freed: std::sync::Condvar::new(), ticker },
        }))
    }

    fn cache_path(&self, sha256: &str) -> Option<PathBuf> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let dir = self.cache_dir.as_ref()?;
        Some(dir.join(format!("{sha256}-{:016x}.cwasm", h.finish())))
    }

    /// Like [`Host::load`], on a thread of its own and under a deadline, so that a module
    /// built to be slow to compile cannot hold up the caller (the plugin folder's rescan).
    /// Past the deadline the module is refused; its compilation finishes in the background,
    /// and while [`MAX_SLOW_COMPILES`] of those still run, new modules are refused at once.
    pub fn load_within(self: &Arc<Self>, bytes: &[u8], deadline: Duration) -> Result<Compiled, LoadError> {
        use std::sync::atomic::Ordering;
        if self.compiling.fetch_add(1, Ordering::SeqCst) >= MAX_SLOW_COMPILES {
            self.compiling.fetch_sub(1, Ordering::SeqCst);
            return Err(LoadError::TooSlow("earlier modules that ran over their deadline are still compiling".into()));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (host, bytes) = (self.clone(), bytes.to_vec());
        let spawned = std::thread::Builder::new().name("wasm-compile".into()).spawn(move || {
            let r = host.load(&bytes);
            host.compiling.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(r);
        });
        if let Err(e) = spawned {
            self.compiling.fetch_sub(1, Ordering::SeqCst);
            return Err(LoadError::TooSlow(format!("cannot start a compile thread: {e}")));
        }
        rx.recv_timeout(deadline)
            .unwrap_or_else(|_| Err(LoadError::TooSlow(format!("compiling took over {deadline:?}"))))
    }

    /// Compiles (or loads from the cache) and validates a module against its ABI (v1 or v2).
    pub fn load(&self, bytes: &[u8]) -> Result<Compiled, LoadError> {
        let sha256 = crate::host_sha256(bytes);
        let module = self.compile_cached(bytes, &sha256)?;
        let (abi, kinds) = validate(&module)?;
        let pre = self.linker.instantiate_pre(&module).map_err(|e| LoadError::Import(format!("{e:#}")))?;
        Ok(Compiled { sha256, kinds, abi, pre, balance_cache: Default::default() })
    }

    // The one unsafe call of this crate: loading a precompiled module from the cache.
    #[allow(unsafe_code)]
    fn compile_cached(&self, bytes: &[u8], sha256: &str) -> Result<Module, LoadError> {
        let cached = self.cache_path(sha256);
        if let Some(artifact) = cached.as_deref().and_then(read_cache_entry) {
            // SAFETY: the bytes were written by `Module::serialize` of this same engine
            // configuration (the name carries its compatibility hash), into a directory only
            // this user can write, and they still match the digest recorded beside them.
            match unsafe { Module::deserialize(&self.engine, &artifact) } {
                Ok(m) => return Ok(m),
                Err(e) => tracing::warn!(error = %e, "ignoring unusable plugin cache entry"),
            }
        }
        let module = Module::new(&self.engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        if let (Some(path), Ok(serialized)) = (cached, module.serialize()) {
            if let Err(e) = write_cache_entry(&path, &serialized) {
                tracing::debug!(path = %path.display(), error = %e, "could not write plugin cache entry");
            }
        }
        Ok(module)
    }

    /// Runs one call of `kind` on a fresh instance: postcard for an ABI v1 module (and for
    /// balance), records for retention and compaction in an ABI v2 module.
    pub fn call<I: PolicyInput>(
        &self,
        plugin: &Arc<str>,
        compiled: &Compiled,
        kind: Kind,
        params: &str,
        input: &I,
        limits: CallLimits,
    ) -> Result<I::Output, CallError> {
        let mut out = self.call_many(plugin, compiled, kind, params, &[input], limits)?;
        out.pop().ok_or_else(|| CallError::Garbage("no answer".into()))
    }

    /// True when one call of this module can take several inputs (channels): ABI v2, for
    /// inputs that have a v2 record form.
    pub fn batches<I: PolicyInput>(compiled: &Compiled, input: &I) -> bool {
        compiled.abi == 2 && input.v2().is_some()
    }

    /// Runs one call of `kind` on a fresh instance for all `inputs` at once (one decision
    /// each, in order). Several inputs need [`Host::batches`]; the v2 header's `now_ms` is
    /// the latest of the inputs'. A v2 guest's `switchyard.payload` answers -1 (use
    /// [`Host::call_many_with`] to give it payloads).
    pub fn call_many<I: PolicyInput>(
        &self,
        plugin: &Arc<str>,
        compiled: &Compiled,
        kind: Kind,
        params: &str,
        inputs: &[&I],
        limits: CallLimits,
    ) -> Result<Vec<I::Output>, CallError> {
        self.call_many_with(plugin, compiled, kind, params, inputs, limits, None)
    }

    /// [`Host::call_many`] where a v2 guest's `switchyard.payload` reads through `payloads`
    /// (each payload when the guest asks for it, by the input's channel name and the
    /// message's offset).
    #[allow(clippy::too_many_arguments)]
    pub fn call_many_with<I: PolicyInput>(
        &self,
        plugin: &Arc<str>,
        compiled: &Compiled,
        kind: Kind,
        params: &str,
        inputs: &[&I],
        limits: CallLimits,
        payloads: Option<&Arc<dyn Payloads>>,
    ) -> Result<Vec<I::Output>, CallError> {
        if compiled.abi == 2 && kind == Kind::Balance {
            return Err(CallError::Garbage("an ABI v2 balance call goes through Host::balance".into()));
        }
        let v2_calls: Option<Vec<V2Call<'_>>> =
            if compiled.abi == 2 { inputs.iter().map(|i| i.v2()).collect() } else { None };
        let single = match (&v2_calls, inputs) {
            (Some(_), _) => None,
            (None, [one]) => Some(*one),
            (None, _) => return Err(CallError::Garbage(format!("{} inputs for a one-input call", inputs.len()))),
        };
        // Taken before the store, so it is released after the store (and its pool slot) is dropped.
        let _slot = self.slots.take();
        let Running { mut store, memory, alloc, entry } = self.start(plugin, compiled, kind, limits)?;
        let trap = |store: &Store<CallState>, e: wasmtime::Error| classify(store, e, limits);
        let channels: Vec<v2::ChannelIn<'_>> = v2_calls.iter().flatten().map(|c| c.channel).collect();
        let counts: Vec<usize> = channels.iter().map(|c| c.messages.len()).collect();
        let v2_kind = v2_calls.as_ref().and_then(|c| c.first()).map_or(0, |c| c.kind);

        // The input: postcard bytes, or v2 records written straight into the guest's buffer.
        let (ptr, len) = match (&v2_calls, single) {
            (None, Some(input)) => {
                let bytes = postcard::to_stdvec(&abi::Call { params: params.to_string(), input })
                    .map_err(|e| CallError::Garbage(format!("cannot encode input: {e}")))?;
                let len = i32::try_from(bytes.len()).map_err(|_| CallError::Garbage("input over 2 GiB".into()))?;
                let ptr = alloc.call(&mut store, len).map_err(|e| trap(&store, e))?;
                if ptr == 0 {
                    return Err(CallError::Memory(limits.max_memory));
                }
                memory
                    .write(&mut store, ptr as u32 as usize, &bytes)
                    .map_err(|_| CallError::OutOfBounds(format!("alloc returned {ptr:#x} for {len} bytes")))?;
                (ptr, len)
            }
            (None, None) => return Err(CallError::Garbage("no input".into())),
            (Some(calls), _) => {
                let now_ms = calls.iter().map(|c| c.now_ms).max().unwrap_or(0);
                let size = v2::input_len(params, &channels);
                let len = i32::try_from(size).map_err(|_| CallError::Garbage("input over 2 GiB".into()))?;
                let ptr = alloc.call(&mut store, len).map_err(|e| trap(&store, e))?;
                if ptr == 0 {
                    return Err(CallError::Memory(limits.max_memory));
                }
                if ptr % 8 != 0 {
                    return Err(CallError::Garbage(format!("alloc returned {ptr:#x}, not 8-aligned")));
                }
                let start = ptr as u32 as usize;
                let buf = start
                    .checked_add(size)
                    .and_then(|end| memory.data_mut(&mut store).get_mut(start..end))
                    .ok_or_else(|| CallError::OutOfBounds(format!("alloc returned {ptr:#x} for {len} bytes")))?;
                let hasher = &self.key_hasher;
                v2::encode_input(buf, v2_kind, now_ms, params, &channels, |k| {
                    std::hash::BuildHasher::hash_one(hasher, k)
                });
                store.data_mut().keys = key_table(&channels);
                store.data_mut().payloads = payloads.map(|source| PayloadTable::new(source, &channels));
                (ptr, len)
            }
        };

        let r = entry.call(&mut store, (ptr, len)).map_err(|e| trap(&store, e))?;
        if r < 0 {
            return Err(CallError::Garbage(format!("guest returned status {r}")));
        }
        let (out_ptr, out_len) = ((r >> 32) as u32 as usize, (r & 0xffff_ffff) as u32 as usize);
        let max = match single {
            Some(input) => input.max_output(),
            None => ERROR_ROOM + v2::max_output(v2_kind, &counts),
        };
        if out_len > max {
            return Err(CallError::Garbage(format!("output of {out_len} bytes; at most {max} can be valid")));
        }
        let data = memory.data(&store);
        let out = out_ptr.checked_add(out_len).and_then(|end| data.get(out_ptr..end)).ok_or_else(|| {
            CallError::OutOfBounds(format!("output [{out_ptr:#x}, +{out_len}) outside {} bytes", data.len()))
        })?;
        if single.is_some() {
            return decode_output(out).map(|d| vec![d]);
        }
        let answers = v2::decode_output(out, v2_kind, &counts).map_err(|e| match e {
            v2::OutputError::Garbage(m) => CallError::Garbage(m),
            v2::OutputError::Invalid(m) => CallError::Invalid(m),
            v2::OutputError::Guest(m) => CallError::Guest(m),
        })?;
        inputs.iter().zip(answers).map(|(input, answer)| input.decision_from_v2(answer)).collect()
    }
}

/// One call's instance: its store (with limits and deadline), memory, allocator and entry
/// point. The caller holds a pool slot ([`Slots::take`]) from before it until after it.
struct Running {
    store: Store<CallState>,
    memory: wasmtime::Memory,
    alloc: wasmtime::TypedFunc<i32, i32>,
    entry: wasmtime::TypedFunc<(i32, i32), i64>,
}

impl Host {
    /// A fresh instance of `compiled` for one call of `kind`, with the memory cap and the
    /// epoch deadline set.
    fn start(
        &self,
        plugin: &Arc<str>,
        compiled: &Compiled,
        kind: Kind,
        limits: CallLimits,
    ) -> Result<Running, CallError> {
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.max_memory)
            .table_elements(10_000)
            .instances(1)
            .tables(4)
            .memories(1)
            .trap_on_grow_failure(true)
            .build();
        let state = CallState {
            plugin: plugin.clone(),
            limits: store_limits,
            max_memory: limits.max_memory,
            memory_hit: false,
            logs_left: LOG_LINES_PER_CALL,
            log_budget: self.log_budget.clone(),
            keys: KeyTable::default(),
            payloads: None,
            fault: None,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        let ticks = (limits.timeout.as_millis() / TICK.as_millis()).max(1) as u64 + 1;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        let instance = compiled.pre.instantiate(&mut store).map_err(|e| classify(&store, e, limits))?;
        let memory =
            instance.get_memory(&mut store, "memory").ok_or_else(|| CallError::Garbage("no memory export".into()))?;
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, abi::ALLOC_EXPORT)
            .map_err(|e| CallError::Garbage(format!("{e:#}")))?;
        let entry = instance
            .get_typed_func::<(i32, i32), i64>(&mut store, kind.export())
            .map_err(|e| CallError::Garbage(format!("{e:#}")))?;
        Ok(Running { store, memory, alloc, entry })
    }

    /// Runs one balancing call: postcard for an ABI v1 module (which never sees
    /// `replicas` and places no followers), the v2 balance records for an ABI v2 module.
    /// The v2 input comes from the module's [`v2b::BalanceEncoder`], which rewrites only
    /// what changed since the previous round; the answer is checked (live owners, the move
    /// budget, followers on distinct live nodes other than the owner) before it is turned
    /// back into node ids.
    pub fn balance(
        &self,
        plugin: &Arc<str>,
        compiled: &Compiled,
        params: &str,
        input: &abi::BalanceInput,
        replicas: &abi::ReplicaInput,
        limits: CallLimits,
    ) -> Result<abi::BalancePlan, CallError> {
        if compiled.abi == 1 {
            let decision = self.call(plugin, compiled, Kind::Balance, params, input, limits)?;
            return Ok(abi::BalancePlan { decision, followers: None });
        }
        // One encoder per module version; a concurrent caller (rare: one leader) encodes
        // from scratch rather than wait.
        let mut own = v2b::BalanceEncoder::default();
        let mut shared = compiled.balance_cache.try_lock();
        let enc = match shared.as_deref_mut() {
            Ok(enc) => enc,
            Err(_) => &mut own,
        };
        let bytes = enc.encode(params, input, replicas);
        let _slot = self.slots.take();
        let Running { mut store, memory, alloc, entry } = self.start(plugin, compiled, Kind::Balance, limits)?;
        let trap = |store: &Store<CallState>, e: wasmtime::Error| classify(store, e, limits);
        let len = i32::try_from(bytes.len()).map_err(|_| CallError::Garbage("input over 2 GiB".into()))?;
        let ptr = alloc.call(&mut store, len).map_err(|e| trap(&store, e))?;
        if ptr == 0 {
            return Err(CallError::Memory(limits.max_memory));
        }
        if ptr % 8 != 0 {
            return Err(CallError::Garbage(format!("alloc returned {ptr:#x}, not 8-aligned")));
        }
        memory
            .write(&mut store, ptr as u32 as usize, bytes)
            .map_err(|_| CallError::OutOfBounds(format!("alloc returned {ptr:#x} for {len} bytes")))?;
        let r = entry.call(&mut store, (ptr, len)).map_err(|e| trap(&store, e))?;
        if r < 0 {
            return Err(CallError::Garbage(format!("guest returned status {r}")));
        }
        let (out_ptr, out_len) = ((r >> 32) as u32 as usize, (r & 0xffff_ffff) as u32 as usize);
        let max = ERROR_ROOM + v2b::max_output(input.partitions.len(), enc.follower_slots());
        if out_len > max {
            return Err(CallError::Garbage(format!("output of {out_len} bytes; at most {max} can be valid")));
        }
        let data = memory.data(&store);
        let out = out_ptr.checked_add(out_len).and_then(|end| data.get(out_ptr..end)).ok_or_else(|| {
            CallError::OutOfBounds(format!("output [{out_ptr:#x}, +{out_len}) outside {} bytes", data.len()))
        })?;
        let current: Vec<u32> = enc.owner_indices().collect();
        let answer = v2b::decode_output(out, enc.node_ids().len(), &current, enc.follower_slots(), input.max_moves)
            .map_err(|e| match e {
                v2::OutputError::Garbage(m) => CallError::Garbage(m),
                v2::OutputError::Invalid(m) => CallError::Invalid(m),
                v2::OutputError::Guest(m) => CallError::Guest(m),
            })?;
        Ok(v2b::answer_to_plan(&answer, enc.node_ids()))
    }
}

/// The key table of a v2 call's messages (index = position in the message table).
fn key_table(channels: &[v2::ChannelIn<'_>]) -> KeyTable {
    let total = channels.iter().map(|c| c.messages.len()).sum();
    let mut t = KeyTable { bytes: Vec::new(), spans: Vec::with_capacity(total) };
    for m in channels.iter().flat_map(|c| c.messages) {
        match &m.key {
            Some(k) => {
                t.spans.push((t.bytes.len() as u32, k.len() as u32));
                t.bytes.extend_from_slice(k.as_bytes());
            }
            None => t.spans.push((0, u32::MAX)),
        }
    }
    t
}

/// `switchyard.key(index, ptr, cap) -> len`: copies up to `cap` bytes of message `index`'s
/// key to `[ptr, ptr+cap)` and returns the key's full length, or -1 for an unkeyed message.
/// An index out of range, a negative `cap` or a destination outside memory is a fault: the
/// call traps and fails as `out_of_bounds`.
fn guest_key(caller: &mut Caller<'_, CallState>, index: i32, ptr: i32, cap: i32) -> wasmtime::Result<i32> {
    let fault = |caller: &mut Caller<'_, CallState>, why: String| {
        caller.data_mut().fault = Some(why.clone());
        Err(wasmtime::Error::msg(why))
    };
    let count = caller.data().keys.spans.len();
    let Some(&(start, len)) = usize::try_from(index).ok().and_then(|i| caller.data().keys.spans.get(i)) else {
        return fault(caller, format!("switchyard.key index {index} out of range ({count} messages)"));
    };
    if len == u32::MAX {
        return Ok(-1);
    }
    if cap < 0 {
        return fault(caller, format!("switchyard.key cap {cap}"));
    }
    let n = (len as usize).min(cap as usize);
    let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
        return fault(caller, "no memory export".into());
    };
    let (data, state) = memory.data_and_store_mut(&mut *caller);
    let dest = (ptr as u32 as usize).checked_add(n).and_then(|end| data.get_mut(ptr as u32 as usize..end));
    match dest {
        Some(dest) => {
            let s = start as usize;
            dest.copy_from_slice(&state.keys.bytes[s..s + n]);
            Ok(len as i32)
        }
        None => fault(caller, format!("switchyard.key destination [{ptr:#x}, +{n}) outside memory")),
    }
}

/// `switchyard.payload(index, ptr, cap) -> len`: copies up to `cap` bytes of message
/// `index`'s stored JSON payload to `[ptr, ptr+cap)` and returns the payload's full length,
/// or -1 when the message is no longer stored (or cannot be read, or the caller gave no
/// payload source). The payload is read from the store now, at the guest's demand. An index
/// out of range, a negative `cap` or a destination outside memory is a fault, as for
/// [`guest_key`]: the call traps and fails as `out_of_bounds`.
fn guest_payload(caller: &mut Caller<'_, CallState>, index: i32, ptr: i32, cap: i32) -> wasmtime::Result<i32> {
    let fault = |caller: &mut Caller<'_, CallState>, why: String| {
        caller.data_mut().fault = Some(why.clone());
        Err(wasmtime::Error::msg(why))
    };
    // The message table is the one `switchyard.key` indexes, whether or not payloads exist.
    let count = caller.data().keys.spans.len();
    let Some(index) = u32::try_from(index).ok().filter(|&i| (i as usize) < count) else {
        return fault(caller, format!("switchyard.payload index {index} out of range ({count} messages)"));
    };
    if cap < 0 {
        return fault(caller, format!("switchyard.payload cap {cap}"));
    }
    let Some(table) = caller.data().payloads.as_ref() else { return Ok(-1) };
    if table.last.as_ref().is_none_or(|(i, _)| *i != index) {
        let (source, at) = (table.source.clone(), table.locate(index));
        let payload = at.and_then(|(channel, offset)| source.payload(&channel, offset));
        if let Some(table) = caller.data_mut().payloads.as_mut() {
            table.last = Some((index, payload));
        }
    }
    let len = match caller.data().payloads.as_ref().and_then(|t| t.last.as_ref()).and_then(|(_, p)| p.as_ref()) {
        Some(p) => p.len(),
        None => return Ok(-1),
    };
    let Ok(full) = i32::try_from(len) else { return Ok(-1) };
    let n = len.min(cap as usize);
    let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
        return fault(caller, "no memory export".into());
    };
    let (data, state) = memory.data_and_store_mut(&mut *caller);
    let dest = (ptr as u32 as usize).checked_add(n).and_then(|end| data.get_mut(ptr as u32 as usize..end));
    let src = state.payloads.as_ref().and_then(|t| t.last.as_ref()).and_then(|(_, p)| p.as_deref());
    match (dest, src) {
        (Some(dest), Some(src)) => {
            dest.copy_from_slice(&src.as_bytes()[..n]);
            Ok(full)
        }
        _ => fault(caller, format!("switchyard.payload destination [{ptr:#x}, +{n}) outside memory")),
    }
}

/// Decodes a guest's output buffer: exactly one postcard `GuestResult`, nothing after it.
/// Any other byte string is `Garbage` (never a panic, whatever the guest wrote).
fn decode_output<O: DeserializeOwned>(out: &[u8]) -> Result<O, CallError> {
    // The whole buffer must be one value: trailing bytes mean the guest wrote garbage.
    match postcard::take_from_bytes::<abi::GuestResult<O>>(out) {
        Ok((Ok(decision), [])) => Ok(decision),
        Ok((Err(message), [])) => Err(CallError::Guest(message.chars().take(512).collect())),
        Ok((_, rest)) => Err(CallError::Garbage(format!("{} trailing bytes after the output value", rest.len()))),
        Err(e) => Err(CallError::Garbage(format!("undecodable output ({} bytes): {e}", out.len()))),
    }
}

/// Guest log lines one plugin may write per second, over all its calls; the rest are
/// counted and reported in one line when the next second starts.
const LOG_LINES_PER_SECOND: u32 = 20;

/// Per-plugin log windows (a plugin called thousands of times a second must not flood the
/// node's log even though each call stays under its own line cap).
#[derive(Default)]
struct LogBudget {
    windows: std::sync::Mutex<std::collections::HashMap<Arc<str>, (std::time::Instant, u32, u64)>>,
}

impl LogBudget {
    /// True when `plugin` may log one more line now.
    fn admit(&self, plugin: &Arc<str>) -> bool {
        let now = std::time::Instant::now();
        let mut windows = self.windows.lock().expect("log budget");
        let w = windows.entry(plugin.clone()).or_insert((now, 0, 0));
        if now.duration_since(w.0) >= Duration::from_secs(1) {
            if w.2 > 0 {
                tracing::warn!(plugin = %plugin, suppressed = w.2, "guest log lines over {LOG_LINES_PER_SECOND}/s dropped");
            }
            *w = (now, 0, 0);
        }
        if w.1 < LOG_LINES_PER_SECOND {
            w.1 += 1;
            true
        } else {
            w.2 += 1;
            false
        }
    }
}

fn classify(store: &Store<CallState>, e: wasmtime::Error, limits: CallLimits) -> CallError {
    if let Some(why) = &store.data().fault {
        return CallError::OutOfBounds(why.clone());
    }
    if store.data().memory_hit {
        return CallError::Memory(limits.max_memory);
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => CallError::Timeout(limits.timeout),
        Some(t) => CallError::Trap(t.to_string()),
        None => CallError::Trap(format!("{e:#}").chars().take(512).collect()),
    }
}

fn guest_log(caller: &mut Caller<'_, CallState>, level: i32, ptr: i32, len: i32) {
    if caller.data().logs_left == 0 {
        return;
    }
    caller.data_mut().logs_left -= 1;
    let (plugin, budget) = (caller.data().plugin.clone(), caller.data().log_budget.clone());
    if !budget.admit(&plugin) {
        return;
    }
    let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else { return };
    let (start, len) = (ptr as u32 as usize, (len as u32 as usize).min(LOG_LINE_MAX));
    let data = memory.data(&*caller);
    let Some(bytes) = start.checked_add(len).and_then(|end| data.get(start..end)) else { return };
    // Control characters (newlines among them) could forge log lines: show them escaped.
    let line: String = String::from_utf8_lossy(bytes).chars().flat_map(char::escape_default).collect();
    let plugin = caller.data().plugin.clone();
    match level {
        1 => tracing::error!(plugin = %plugin, "{line}"),
        2 => tracing::warn!(plugin = %plugin, "{line}"),
        3 => tracing::info!(plugin = %plugin, "{line}"),
        4 => tracing::debug!(plugin = %plugin, "{line}"),
        _ => tracing::trace!(plugin = %plugin, "{line}"),
    }
}

fn func_is(ty: &ExternType, params: &[fn(&ValType) -> bool], results: &[fn(&ValType) -> bool]) -> bool {
    let Some(f) = ty.func() else { return false };
    f.params().len() == params.len()
        && f.results().len() == results.len()
        && f.params().zip(params).all(|(v, ok)| ok(&v))
        && f.results().zip(results).all(|(v, ok)| ok(&v))
}

/// Checks a module against its ABI: the marker (`switchyard_abi_v1` or `_v2`, exactly
/// one), memory, allocator, at least one well-typed entry point, and no import but
/// `switchyard.log` (and, for v2, `switchyard.key` and `switchyard.payload`). Returns the
/// ABI version and the kinds.
fn validate(module: &Module) -> Result<(u32, Vec<Kind>), LoadError> {
    let exports: std::collections::HashMap<&str, ExternType> = module.exports().map(|e| (e.name(), e.ty())).collect();
    let markers: Vec<&str> = exports.keys().copied().filter(|n| n.starts_with("switchyard_abi_v")).collect();
    let abi = match markers.as_slice() {
        [m] if *m == abi::ABI_V1_MARKER => 1,
        [m] if *m == abi::ABI_V2_MARKER => 2,
        [] => return Err(LoadError::Abi("no `switchyard_abi_v1` or `switchyard_abi_v2` marker export".into())),
        found => {
            let mut found = found.to_vec();
            found.sort_unstable();
            return Err(LoadError::Abi(format!(
                "module is {}; this router speaks switchyard_abi_v1 and switchyard_abi_v2 (one marker)",
                found.join(", ")
            )));
        }
    };
    for import in module.imports() {
        let i32s: [fn(&ValType) -> bool; 3] = [ValType::is_i32, ValType::is_i32, ValType::is_i32];
        let ok = import.module() == abi::HOST_MODULE
            && ((import.name() == abi::LOG_IMPORT && func_is(&import.ty(), &i32s, &[]))
                || (abi == 2
                    && (import.name() == abi::KEY_IMPORT || import.name() == abi::PAYLOAD_IMPORT)
                    && func_is(&import.ty(), &i32s, &[ValType::is_i32])));
        if !ok {
            return Err(LoadError::Import(format!("{}.{}", import.module(), import.name())));
        }
    }
    if exports.get("memory").and_then(|t| t.memory()).is_none() {
        return Err(LoadError::Exports("no `memory` export".into()));
    }
    if !exports.get(abi::ALLOC_EXPORT).is_some_and(|t| func_is(t, &[ValType::is_i32], &[ValType::is_i32])) {
        return Err(LoadError::Exports(format!("`{}` must be (i32) -> i32", abi::ALLOC_EXPORT)));
    }
    let mut kinds = Vec::new();
    for kind in Kind::ALL {
        if let Some(ty) = exports.get(kind.export()) {
            if !func_is(ty, &[ValType::is_i32, ValType::is_i32], &[ValType::is_i64]) {
                return Err(LoadError::Exports(format!("`{}` must be (i32, i32) -> i64", kind.export())));
            }
            kinds.push(kind);
        }
    }
    if kinds.is_empty() {
        return Err(LoadError::Exports("no entry point (switchyard_retention, _compaction or _balance)".into()));
    }
    Ok((abi, kinds))
}

/// Reads a file and loads it.
pub fn load_file(host: &Host, path: &Path) -> Result<Compiled, LoadError> {
    let bytes = std::fs::read(path).map_err(|e| LoadError::Compile(format!("cannot read {}: {e}", path.display())))?;
    host.load(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_modules::{module, GOOD};
    use switchyard_sdk::{ChannelStats, RetentionDecision, RetentionInput};

    fn input() -> RetentionInput {
        RetentionInput {
            channel: "c".into(),
            stats: ChannelStats { first_offset: 1, last_offset: 10, count: 10, bytes: 100 },
            oldest: vec![],
            now_ms: 0,
        }
    }

    fn call(bytes: &[u8]) -> Result<RetentionDecision, CallError> {
        let host = Host::new(None).unwrap();
        let compiled = host.load(bytes).expect("loads");
        let limits = CallLimits { timeout: Duration::from_millis(50), max_memory: 2 * 1024 * 1024 };
        host.call(&Arc::from("t"), &compiled, Kind::Retention, "{}", &input(), limits)
    }

    #[test]
    fn a_well_formed_answer_decodes() {
        assert_eq!(call(&module("", GOOD)).unwrap(), RetentionDecision::DropBelow(5));
    }

    #[test]
    fn hostile_modules_fail_with_the_right_reason() {
        let cases = [
            ("infinite loop", module("", "(loop $l (br $l)) (i64.const 0)"), "timeout"),
            ("memory bomb", module("", "(drop (memory.grow (i32.const 1000))) (i64.const 0)"), "memory"),
            ("trap", module("", "unreachable"), "trap"),
            (
                "out of bounds",
                module("", "(i64.or (i64.shl (i64.const 0x7fff0000) (i64.const 32)) (i64.const 64))"),
                "out_of_bounds",
            ),
            ("garbage", module("", "(i64.or (i64.shl (i64.const 0) (i64.const 32)) (i64.const 9))"), "garbage"),
            ("negative status", module("", "(i64.const -3)"), "garbage"),
        ];
        for (what, bytes, reason) in cases {
            let started = std::time::Instant::now();
            let err = call(&bytes).expect_err(what);
            assert_eq!(err.reason(), reason, "{what}: {err}");
            assert!(started.elapsed() < Duration::from_secs(5), "{what} took {:?}", started.elapsed());
        }
    }

    /// The epoch ticker sleeps between calls and wakes for each: an endless loop is stopped
    /// on a host whose ticker parked after earlier calls, every time.
    #[test]
    fn the_epoch_ticker_wakes_for_every_call() {
        let host = Host::new(None).unwrap();
        let endless = host.load(&module("", "(loop $l (br $l)) (i64.const 0)")).expect("loads");
        let good = host.load(&module("", GOOD)).expect("loads");
        let limits = CallLimits { timeout: Duration::from_millis(20), max_memory: 2 * 1024 * 1024 };
        let call = |compiled: &Compiled| host.call(&Arc::from("t"), compiled, Kind::Retention, "{}", &input(), limits);
        for round in 0..3 {
            assert_eq!(call(&endless).expect_err("endless").reason(), "timeout", "round {round}");
            assert!(call(&good).is_ok(), "round {round}");
        }
        assert_eq!(host.slots.ticker.calls.load(std::sync::atomic::Ordering::Acquire), 0, "no call counted as running");
    }

    #[test]
    fn bad_modules_are_refused_at_load() {
        let host = Host::new(None).unwrap();
        let no_marker = wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap();
        assert!(matches!(host.load(&no_marker), Err(LoadError::Abi(_))));
        let v3 =
            wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "switchyard_abi_v3")))"#).unwrap();
        let err = host.load(&v3).err().expect("refused").to_string();
        assert!(err.contains("switchyard_abi_v3") && err.contains("unsupported ABI version"), "{err}");
        let both = wat::parse_str(
            r#"(module (memory (export "memory") 1) (func (export "switchyard_abi_v1")) (func (export "switchyard_abi_v2")))"#,
        )
        .unwrap();
        assert!(matches!(host.load(&both), Err(LoadError::Abi(_))), "two markers");
        // `switchyard.key` and `switchyard.payload` are v2 imports only.
        let key_v1 = module(r#"(import "switchyard" "key" (func (param i32 i32 i32) (result i32)))"#, GOOD);
        assert!(matches!(host.load(&key_v1), Err(LoadError::Import(_))));
        let payload_v1 = module(r#"(import "switchyard" "payload" (func (param i32 i32 i32) (result i32)))"#, GOOD);
        assert!(matches!(host.load(&payload_v1), Err(LoadError::Import(_))));
        let wasi =
            module(r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#, GOOD);
        assert!(matches!(host.load(&wasi), Err(LoadError::Import(_))));
        let no_entry = wat::parse_str(
            r#"(module (memory (export "memory") 1) (func (export "switchyard_abi_v1"))
                 (func (export "switchyard_alloc") (param i32) (result i32) (i32.const 0)))"#,
        )
        .unwrap();
        assert!(matches!(host.load(&no_entry), Err(LoadError::Exports(_))));
        assert!(matches!(host.load(b"not wasm"), Err(LoadError::Compile(_))));
        let logs = module(r#"(import "switchyard" "log" (func $log (param i32 i32 i32)))"#, GOOD);
        assert_eq!(host.load(&logs).unwrap().kinds, vec![Kind::Retention]);
    }

    #[test]
    fn compiled_modules_are_cached_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(Some(dir.path().to_path_buf())).unwrap();
        let bytes = module("", GOOD);
        host.load(&bytes).unwrap();
        assert_eq!(artifacts(dir.path()).len(), 1, "one artifact (and its digest)");
        let again = Host::new(Some(dir.path().to_path_buf())).unwrap();
        assert_eq!(again.load(&bytes).unwrap().kinds, vec![Kind::Retention]);
    }

    fn artifacts(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .collect();
        v.sort();
        v
    }

    /// A cache entry whose bytes no longer match their digest, or that others may write,
    /// is never loaded as native code: the module is compiled again and the entry rewritten.
    #[test]
    fn a_tampered_or_shared_cache_entry_is_recompiled() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let bytes = module("", GOOD);
        Host::new(Some(dir.path().to_path_buf())).unwrap().load(&bytes).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the cache directory is private");
        let path = artifacts(dir.path()).pop().unwrap();
        let good = std::fs::read(&path).unwrap();
        assert!(read_cache_entry(&path).is_some());

        // Flip one byte in the middle of the artifact: the digest check refuses it.
        let mut bad = good.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        assert!(read_cache_entry(&path).is_none(), "tampered bytes are not loaded");
        let host = Host::new(Some(dir.path().to_path_buf())).unwrap();
        let compiled = host.load(&bytes).unwrap();
        assert_eq!(compiled.kinds, vec![Kind::Retention]);
        assert!(read_cache_entry(&path).is_some(), "recompiled and rewritten");
        let limits = CallLimits::default();
        let d: RetentionDecision =
            host.call(&Arc::from("t"), &compiled, Kind::Retention, "{}", &input(), limits).unwrap();
        assert_eq!(d, RetentionDecision::DropBelow(5));

        // A world-writable entry is refused even with a matching digest.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(read_cache_entry(&path).is_none(), "a shared-writable entry is not loaded");
    }

    proptest::proptest! {
        /// Fuzz-style: any bytes a guest leaves as its output decode to a decision or a
        /// typed error, never a panic; a valid value with trailing bytes is refused.
        #[test]
        fn any_guest_output_decodes_or_is_garbage(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode_output::<RetentionDecision>(&bytes);
            let _ = decode_output::<switchyard_sdk::CompactionDecision>(&bytes);
            let _ = decode_output::<switchyard_sdk::BalanceDecision>(&bytes);
            let mut valid = postcard::to_stdvec(&abi::GuestResult::<RetentionDecision>::Ok(RetentionDecision::DropBelow(3))).unwrap();
            proptest::prop_assert!(decode_output::<RetentionDecision>(&valid).is_ok());
            valid.push(0);
            proptest::prop_assert!(matches!(decode_output::<RetentionDecision>(&valid), Err(CallError::Garbage(_))));
        }
    }

    #[test]
    fn guest_logs_are_rate_limited_per_plugin() {
        let budget = LogBudget::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let admitted = (0..100).filter(|_| budget.admit(&a)).count();
        assert_eq!(admitted, LOG_LINES_PER_SECOND as usize);
        assert!(budget.admit(&b), "another plugin has its own window");
    }

    /// More calls at once than the pool has slots: the extra ones wait, none fails.
    #[test]
    fn calls_beyond_the_pool_slots_wait_for_one() {
        let host = Host::new(None).unwrap();
        // About a million loop iterations, then the good answer.
        let body = format!(
            "(local $i i32) (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1))) \
             (br_if $l (i32.lt_u (local.get $i) (i32.const 1000000)))) {GOOD}"
        );
        let compiled = Arc::new(host.load(&module("", &body)).unwrap());
        let threads: Vec<_> = (0..POOL_SLOTS * 2)
            .map(|_| {
                let (host, compiled) = (host.clone(), compiled.clone());
                std::thread::spawn(move || {
                    let limits = CallLimits { timeout: Duration::from_secs(20), max_memory: 2 << 20 };
                    host.call(&Arc::from("t"), &compiled, Kind::Retention, "{}", &input(), limits)
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().unwrap(), RetentionDecision::DropBelow(5));
        }
    }

    #[test]
    fn a_compile_past_its_deadline_is_refused_without_waiting_for_it() {
        let host = Host::new(None).unwrap();
        let bytes = module("", GOOD);
        let refused = host.load_within(&bytes, Duration::from_nanos(1));
        assert!(matches!(refused, Err(LoadError::TooSlow(_))), "{:?}", refused.err());
        // With time to finish, the same module loads.
        let loaded = host.load_within(&bytes, Duration::from_secs(30)).unwrap();
        assert_eq!(loaded.kinds, vec![Kind::Retention]);
    }
}

//! The engine: the process's one wasmtime `Engine` and `Linker`, the pool of instance
//! slots and the epoch ticker.
//!
//! It owns the engine's configuration (epoch interruption, a pooling allocator of
//! [`POOL_SLOTS`] instance slots), the linker with the host imports, the creation of the
//! cache folder (private to this user), the slot semaphore every call holds, and the ticker
//! thread that advances the epoch every [`TICK`] while a call runs. It must never link an
//! import but `switchyard.log`, `switchyard.key` and `switchyard.payload`, and never tick
//! (or wake anyone) while no call holds a slot.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use switchyard_sdk as abi;
use wasmtime::{Caller, Engine, Linker};

use super::imports::{guest_key, guest_log, guest_payload, LogBudget};
use super::state::CallState;

/// How often the epoch advances; deadlines are counted in these ticks.
pub(super) const TICK: Duration = Duration::from_millis(2);

/// Instance slots of the pooling allocator: the most plugin calls that run at once (more
/// wait for a slot; see [`Host::call`]).
pub(super) const POOL_SLOTS: u32 = 64;

/// Bytes of each pooled memory (and table) kept resident between calls.
const KEEP_RESIDENT: usize = 512 << 10;

/// The process's one wasm engine.
pub struct Host {
    pub(super) engine: Engine,
    pub(super) linker: Linker<CallState>,
    pub(super) cache_dir: Option<PathBuf>,
    /// Guest log lines per plugin per second.
    pub(super) log_budget: Arc<LogBudget>,
    /// Compilations running on their own threads (a timed-out one keeps running: cranelift
    /// cannot be interrupted).
    pub(super) compiling: Arc<std::sync::atomic::AtomicUsize>,
    /// v2 key hashes: SipHash-1-3 under a key random per process, so a publisher cannot
    /// choose keys whose hashes collide.
    pub(super) key_hasher: std::collections::hash_map::RandomState,
    /// Free instance slots of the pool: a call waits for one rather than fail.
    pub(super) slots: Slots,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.slots.ticker.stopped.store(true, std::sync::atomic::Ordering::Release);
        self.slots.ticker.wake();
    }
}

/// A counting semaphore over the pooling allocator's instance slots. Every call holds one,
/// so the epoch ticker runs only while some slot is taken.
pub(super) struct Slots {
    free: std::sync::Mutex<u32>,
    freed: std::sync::Condvar,
    pub(super) ticker: Arc<Ticker>,
}

impl Slots {
    pub(super) fn take(&self) -> SlotGuard<'_> {
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
pub(super) struct SlotGuard<'a>(&'a Slots);

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
pub(super) struct Ticker {
    pub(super) calls: std::sync::atomic::AtomicUsize,
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
            // The ticker is an OS thread of its own, never a runtime worker.
            #[allow(clippy::disallowed_methods)]
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
}

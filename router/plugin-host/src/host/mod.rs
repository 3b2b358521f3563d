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
//! caller's [`Payloads`](switchyard_core::policy::Payloads) only when the guest asks, never
//! up front).
//!
//! Module map: this file holds the vocabulary ([`Kind`], [`LoadError`], [`CallError`],
//! [`Compiled`], [`CallLimits`]); `engine` (the [`Host`]: engine, linker, pool slots, epoch
//! ticker), `compile` (loading under a deadline, the on-disk cache), `validate` (a module
//! against its ABI), `input` (what a call sends: [`PolicyInput`], [`OutputBound`]), `state`
//! (one call's store state and the v2 message tables), `imports` (`switchyard.log`, `.key`,
//! `.payload`) and `call` (one call, from input to decision).

mod call;
mod compile;
mod engine;
mod imports;
mod input;
mod state;
#[cfg(test)]
mod tests;
mod validate;

pub use compile::{load_file, MAX_SLOW_COMPILES};
pub use engine::Host;
pub use input::{OutputBound, PolicyInput, V2Call};

use std::time::Duration;

use switchyard_sdk as abi;
use switchyard_sdk::balance_v2 as v2b;
use wasmtime::InstancePre;

use state::CallState;

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

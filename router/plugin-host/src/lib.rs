//! The WebAssembly plugin host: the only crate that links wasmtime.
//!
//! Module map: [`host`] (the sandbox: one engine, cached `InstancePre`, limits per call),
//! [`registry`] (the hot-reloaded plugin folder, health and quarantine), [`bound`] (the
//! adapters that make a bound plugin one of the core layer's policy traits, and the
//! balancer), [`check`] (`switchyard plugin check`), [`bench`](mod@bench) (`switchyard plugin bench`),
//! [`scaffold`] (`switchyard plugin new`).
//!
//! It owns everything between a `.wasm` file in the plugin folder and a policy decision.
//! It must never run on the publish path; every failure falls back to the built-in policy
//! for that round.

pub mod bench;
pub mod bound;
pub mod check;
pub mod host;
pub mod registry;
pub mod scaffold;

use sha2::{Digest, Sha256};

/// Lowercase hex sha256 of `bytes`.
pub fn host_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Hand-written ABI v1 modules for the unit tests.
#[cfg(test)]
pub(crate) mod test_modules {
    /// Output pointer 16, length 3: postcard `Ok(DropBelow(5))` from the data segment.
    pub(crate) const GOOD: &str = "(i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 3))";

    /// A module skeleton: ABI marker, memory, a bump allocator, and `body` as the
    /// retention entry point (params `$p $l`, result i64); `extra` goes first (imports).
    pub(crate) fn module(extra: &str, body: &str) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(module
                {extra}
                (memory (export "memory") 1)
                (global $bump (mut i32) (i32.const 1024))
                (data (i32.const 16) "\00\01\05")
                (func (export "switchyard_abi_v1"))
                (func (export "switchyard_alloc") (param $n i32) (result i32)
                  (local $p i32) (local.set $p (global.get $bump))
                  (global.set $bump (i32.add (global.get $bump) (local.get $n))) (local.get $p))
                (func (export "switchyard_retention") (param $p i32) (param $l i32) (result i64) {body}))"#
        ))
        .expect("valid wat")
    }
}

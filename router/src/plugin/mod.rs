//! WebAssembly policy plugins: the sandbox ([`host`]), the hot-reloaded folder
//! ([`registry`]) and the adapters that make a bound plugin a retention or compaction
//! policy ([`bound`]).
//!
//! This module owns everything between a `.wasm` file in the plugin folder and a policy
//! decision. It must never run on the publish path; every failure falls back to the
//! built-in policy for that round.

pub mod bound;
pub mod check;
pub mod host;
pub mod registry;

use sha2::{Digest, Sha256};

/// Lowercase hex sha256 of `bytes`.
pub fn host_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

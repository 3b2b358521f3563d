//! ABI v2 for balancing: fixed-size little-endian records for nodes and partitions, node
//! ids interned as indices (nodes sorted by id), each partition's current followers as
//! indices, and a compact answer: an owner index per partition and, optionally, its
//! followers. `README.md` ("ABI v2: balancing") specifies the layout byte for byte; this
//! module is its one implementation, used by both sides:
//!
//! - host side: [`BalanceEncoder`] keeps the last encoded input and rewrites only the
//!   records whose fields changed (a steady cluster re-encodes almost nothing), and
//!   [`decode_output`] reads and checks the guest's answer against it;
//! - guest side: [`parse_input`] views the input without copying (a [`BalanceView`] reads
//!   [`Node`] and [`Partition`] records in place), [`encode_output`] writes a
//!   [`Placement`], and [`export_balance!`](crate::export_balance) glues a plain function to
//!   them;
//! - natively, [`call_balance`] runs a policy through the whole byte path, for plugin tests.
//!
//! It must never do I/O: it is compiled for wasm32 too.
//!
//! The code is split by side, as in [`crate::v2`]. This file holds what both sides share:
//! the layout's constants, the [`Node`] and [`Partition`] records and the little-endian byte
//! helpers. `host` is the router's end ([`BalanceEncoder`], [`decode_output`]); `guest` is
//! the plugin's ([`BalanceView`], [`Placement`], [`handle`]); `native` runs both ends in one
//! process for tests; `glue` holds the [`export_balance!`](crate::export_balance) macro.
//! Every public item is re-exported here, so its path is `balance_v2::NAME` whatever file
//! it lives in.

use crate::balance::NONE;

mod glue;
mod guest;
mod host;
mod native;
#[cfg(test)]
mod tests;

#[doc(hidden)]
pub use glue::check_balance;
pub use guest::{encode_output, handle, parse_input, BalanceView, Placement};
pub use host::{answer_to_plan, decode_output, max_output, Answer, BalanceEncoder};
pub use native::call_balance;

/// `kind` of a balance call in the v2 input header.
pub const KIND_BALANCE: u32 = 3;
/// Input header length.
pub const HEADER_LEN: usize = 48;
/// One node record.
pub const NODE_LEN: usize = 48;
/// One partition record.
pub const PARTITION_LEN: usize = 32;
/// Output header length.
pub const OUTPUT_HEADER_LEN: usize = 16;

/// One live node, exactly as it lies in the input buffer (48 bytes, little-endian).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Node {
    /// Relative capacity (1.0 = a standard node).
    pub weight: f64,
    /// Messages per second over all its partitions.
    pub msg_rate: f64,
    /// Bytes stored.
    pub bytes: u64,
    /// Client connections.
    pub connections: u64,
    /// Where its id lies in the input (read it with [`BalanceView::node_id`]).
    id_off: u32,
    /// Length of its id.
    id_len: u32,
    /// Where its zone lies (read it with [`BalanceView::zone`]).
    zone_off: u32,
    /// Length of its zone.
    zone_len: u32,
}

/// One partition, exactly as it lies in the input buffer (32 bytes, little-endian).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Partition {
    /// Messages per second.
    pub msg_rate: f64,
    /// Bytes stored.
    pub bytes: u64,
    /// Subscribers (connections) on its channels.
    pub connections: u64,
    /// Index of its live owner in the node table, or [`NONE`] (no owner, a departed or a
    /// draining one: it must be placed, and placing it is not a move).
    pub owner: u32,
    /// Zero.
    reserved: u32,
}

const _: () = assert!(std::mem::size_of::<Node>() == NODE_LEN && std::mem::align_of::<Node>() == 8);
const _: () = assert!(std::mem::size_of::<Partition>() == PARTITION_LEN && std::mem::align_of::<Partition>() == 8);

impl Partition {
    /// The live owner's index, if any.
    pub fn owner(&self) -> Option<usize> {
        (self.owner != NONE).then_some(self.owner as usize)
    }
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes `bytes` at `at` unless they are already there; true when it wrote.
fn put(buf: &mut [u8], at: usize, bytes: &[u8]) -> bool {
    let slot = &mut buf[at..at + bytes.len()];
    if slot == bytes {
        return false;
    }
    slot.copy_from_slice(bytes);
    true
}

fn get32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn get64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

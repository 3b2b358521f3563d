//! The message path of one node: partition owners, outboxes, and the policies they apply.
//!
//! Module map:
//! - [`partitions`]: the [`Partitions`] handle, startup recovery and the local operations;
//! - [`owner`]: the single-writer task of one partition (offsets, fan-out, idempotency);
//! - [`outbox`]: one connection's bounded outbound queue (the slow-consumer rule);
//! - [`policy`]: the retention, compaction and balancer policy traits and the built-ins;
//! - [`maintenance`]: background retention and compaction rounds;
//! - [`handovers`]: which partitions are being adopted or sealed;
//! - [`replication`]: the leader's log of store batches, the high watermark and the ISR rules;
//! - [`idempotency`]: each channel's window of recent keys, within a node-wide budget.
//!
//! This crate must never import etcd-client, wasmtime, hyper or tungstenite: the cluster,
//! the plugin host and the sockets sit above it and reach it only through these types.

pub mod handovers;
pub mod idempotency;
pub mod maintenance;
pub mod outbox;
pub mod owner;
pub mod partitions;
pub mod policy;
pub mod replication;
mod shared_reads;
#[cfg(test)]
mod test_support;

pub use partitions::{HistoryPage, HistoryQuery, OwnedMessage, Partitions};

//! Cross-node routing: the [`Router`], peer links, forwarding, upstream subscriptions and
//! partition handover.
//!
//! Module map: [`router`] (the one routing entry point for every client operation),
//! [`wire`] (the binary frames of a peer link), `link` (outgoing links, one per peer, with
//! reconnect), `forward` (running an operation at its owner, and the `/peer` endpoint's
//! side of a link), `upstream` (one subscription per remote channel per gateway),
//! `handover` (moving a partition's state when the map moves it), [`seats`] (the
//! cluster-wide per-user session cap). It must never import etcd-client or read etcd: the
//! map and the member list arrive on `watch` channels, and every remote call has a deadline.

mod forward;
mod handover;
mod link;
mod replica;
pub mod router;
pub mod seats;
mod upstream;
pub mod wire;

pub use forward::serve;
pub use router::{Route, Router, Settings};

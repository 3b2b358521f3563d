//! Cross-node routing: the [`Router`], peer links, forwarding, upstream subscriptions,
//! partition handover and replication transport.
//!
//! Module map, top to bottom (each module imports only modules below it):
//! - [`router`]: the facade the server and the cluster hold; wires the parts together.
//! - `endpoint`: the `/peer` endpoint, the owner's side of an accepted link ([`serve`]).
//! - `upstream`: a gateway's one subscription per remote channel; `seats`: asking a
//!   user's seat holder for a seat; `presence`: presence at the owner, the presence this
//!   node announced, and dropping the presence of nodes that left.
//! - `call`: running an operation where the map puts it, following typed refusals.
//! - `dispatch`: the one dispatcher of operations run as the owner, leader or holder.
//! - `handover`: moving a partition's state when the map moves it; `replica`: followers
//!   fetching from leaders, snapshots, truncation, ISR checks.
//! - `node`: the routing state every part reads, and the routing decision.
//! - `chunks` (a partition's stored state in bounded pieces), `seat_table` (the cap's
//!   arithmetic), `link` (outgoing links, one per peer, with reconnect), [`wire`] (the
//!   binary frames of a peer link, typed refusals included), `reach` (a link to every
//!   member, and the set of peers whose link is up).
//!
//! It must never import etcd-client or read etcd: the map and the member list arrive on
//! `watch` channels, and every remote call has a deadline.

mod call;
mod chunks;
mod dispatch;
mod endpoint;
mod handover;
mod link;
mod node;
mod presence;
mod reach;
mod replica;
pub mod router;
mod seat_table;
pub mod seats;
mod upstream;
pub mod wire;

pub use endpoint::serve;
pub use link::Reachable;
pub use node::Route;
pub use router::{Router, Settings};

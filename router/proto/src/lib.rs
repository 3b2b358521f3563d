//! The client protocol and the partition math: the vocabulary every other layer speaks.
//!
//! Module map: [`protocol`] (frames in and out, error codes, the serialize-once [`Text`]),
//! [`channel`] (names and namespaces), [`partition`] (channel → partition hashing, the
//! partition map and the member list the cluster publishes), [`presence`] (who is subscribed:
//! entries, counts, join and leave pushes), [`refusal`] (the typed reasons
//! a node refuses an operation for, which other layers act on). This crate must never do I/O,
//! spawn tasks or depend on tokio: it is plain data and pure functions.

pub mod centrifugo;
pub mod channel;
pub mod partition;
pub mod presence;
pub mod protocol;
pub mod refusal;
mod text;

pub use text::{ws_text_head, Text};

/// Which client protocol a connection speaks: what its frames look like on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// Switchyard's own protocol at `/ws` (`docs/protocol.md`).
    #[default]
    Native,
    /// Centrifugo's client protocol v2 in JSON at `/connection/websocket`
    /// (`docs/centrifugo.md`).
    Centrifugo,
}

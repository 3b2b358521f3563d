//! The one conversion from a serialize-once [`Text`] frame to a WebSocket text payload.
//!
//! It owns the single `unsafe` of the message path: handing tungstenite bytes that are
//! already known to be UTF-8 without checking them again for every subscriber. It must
//! never accept bytes from anywhere but a [`Text`].

use switchyard_proto::Text;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// The payload of a text frame, sharing `text`'s bytes (no copy, no check).
#[allow(unsafe_code)]
pub(crate) fn text(text: Text) -> Utf8Bytes {
    // SAFETY: a `Text` is only built from a `String` or a `&str` (see its constructors),
    // so its bytes are valid UTF-8, which is all `from_bytes_unchecked` requires.
    unsafe { Utf8Bytes::from_bytes_unchecked(text.into_bytes()) }
}

//! [`Text`]: one serialized JSON frame, shared by every subscriber that receives it.
//!
//! It owns the guarantee that the bytes are UTF-8, so that the socket layer can hand
//! them to the WebSocket as a text frame without checking them again per subscriber.
//! It must never be built from bytes whose encoding is unknown.

use bytes::Bytes;

/// A JSON text frame: cheap to clone (reference counted), UTF-8 by construction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Text(Bytes);

impl Text {
    /// A frame from a static string.
    pub const fn from_static(s: &'static str) -> Self {
        Self(Bytes::from_static(s.as_bytes()))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for an empty frame.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The frame as text.
    pub fn as_str(&self) -> &str {
        // The bytes came from a `String` or a `&str` (see the constructors), so this
        // cannot fail; the check is kept cheap by doing it only where text is read back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Several frames in one, one per line (JSON lines): valid UTF-8, since each part is.
    pub fn join_lines(parts: &[Text]) -> Self {
        let len = parts.iter().map(|p| p.len() + 1).sum::<usize>().saturating_sub(1);
        let mut out = bytes::BytesMut::with_capacity(len);
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b"\n");
            }
            out.extend_from_slice(p);
        }
        Self(out.freeze())
    }

    /// The bytes, known to be UTF-8.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// The bytes, known to be UTF-8.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }
}

/// The header of a server-to-client WebSocket text frame (FIN set, not masked) whose
/// payload is `len` bytes: the buffer and how many of its bytes the header takes.
pub fn ws_text_head(len: usize) -> ([u8; 10], usize) {
    let mut head = [0u8; 10];
    head[0] = 0x81; // FIN, text
    let head_len = if len < 126 {
        head[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        head[1] = 126;
        head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (head, head_len)
}

impl std::ops::Deref for Text {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Self(Bytes::from(s))
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Self(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<Text> for Bytes {
    fn from(t: Text) -> Self {
        t.0
    }
}

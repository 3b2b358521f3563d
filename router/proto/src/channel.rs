//! Channel names: validation and namespaces.
//!
//! It owns the rule for what a channel name may be (1-255 bytes of `[A-Za-z0-9_:.@-]`) and
//! how its namespace is found (the part before the first `:`). It must never hold channel
//! state; that belongs to the partition owners.

/// Longest channel name in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// True when `name` is a valid channel name.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'@' | b'-'))
}

/// The namespace of a channel: the part before the first `:`, if there is one.
pub fn namespace(channel: &str) -> Option<&str> {
    channel.split_once(':').map(|(ns, _)| ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_valid_name("room:1"));
        assert!(is_valid_name("user:alice@example.com"));
        assert!(is_valid_name(&"a".repeat(255)));
        for bad in ["", "a b", "a/b", "é", "x\n", &"a".repeat(256)] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn namespaces() {
        assert_eq!(namespace("chat:room:1"), Some("chat"));
        assert_eq!(namespace("plain"), None);
        assert_eq!(namespace(":x"), Some(""));
    }
}

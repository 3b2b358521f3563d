//! ABI v2, the wasm32 boundary of a plugin: the `switchyard_abi_v2` marker export, [`run`]
//! (the raw `(ptr, len)` entry point the export macros expand to), the
//! [`export_retention!`](crate::export_retention) and
//! [`export_compaction!`](crate::export_compaction) macros themselves (natively they only
//! check a policy's signature), and the host imports `switchyard.key` and
//! `switchyard.payload` a [`ChannelView`] reads through (natively they read nothing). It
//! must never hold policy logic or byte layouts (those are `guest`'s): only the pointer and
//! import plumbing.

use super::{ChannelView, Removals};
use crate::guest::IntoGuestResult;
use crate::RetentionDecision;
use serde::de::DeserializeOwned;

// === wasm32 glue ===

/// The ABI v2 marker export (the host never calls it). Absent with the `abi-v1` feature.
#[cfg(all(target_arch = "wasm32", not(feature = "abi-v1")))]
#[unsafe(no_mangle)]
pub extern "C" fn switchyard_abi_v2() {}

/// Referenced by the v2 export macros: a crate that turns on the `abi-v1` feature cannot
/// use them (the module would carry the wrong marker).
#[cfg(not(feature = "abi-v1"))]
#[doc(hidden)]
pub const fn abi_v2_enabled() {}

/// Runs one v2 call on wasm32: the input at `[ptr, ptr+len)`, the answer leaked and packed
/// as `(ptr << 32) | len`.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub fn run(ptr: i32, len: i32, handle: impl FnOnce(&[u8]) -> Vec<u8>) -> i64 {
    let bytes: &[u8] = if len <= 0 || ptr == 0 {
        &[]
    } else {
        // SAFETY: the host wrote `len` bytes at `ptr`, which `switchyard_alloc` returned.
        unsafe { core::slice::from_raw_parts(ptr as usize as *const u8, len as u32 as usize) }
    };
    crate::guest::pack_out(handle(bytes).leak())
}

/// Type check used by [`export_retention!`](crate::export_retention) natively.
#[doc(hidden)]
pub fn check_retention<P: DeserializeOwned, R: IntoGuestResult<RetentionDecision>>(
    _: impl Fn(&ChannelView<'_>, &P) -> R,
) {
}

/// Type check used by [`export_compaction!`](crate::export_compaction) natively.
#[doc(hidden)]
pub fn check_compaction<P: DeserializeOwned, R: IntoGuestResult<Removals>>(_: impl Fn(&ChannelView<'_>, &P) -> R) {}

/// Exports `$f: fn(&ChannelView, &P) -> RetentionDecision` (or `-> Result<RetentionDecision,
/// E: Display>`) as the ABI v2 entry point `switchyard_retention`, where `P:
/// DeserializeOwned` is the params type. On wasm32 it defines the export; natively it only
/// checks `$f`'s signature, so `cargo test` tests `$f` directly. Use it once per crate.
#[macro_export]
macro_rules! export_retention {
    ($f:path) => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn switchyard_retention(ptr: i32, len: i32) -> i64 {
            const _: () = $crate::v2::abi_v2_enabled();
            $crate::v2::run(ptr, len, |bytes| $crate::v2::handle_retention(bytes, $f))
        }
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            #[allow(dead_code)]
            fn __switchyard_check() {
                $crate::v2::check_retention($f)
            }
        };
    };
}

/// Exports `$f: fn(&ChannelView, &P) -> Removals` (or `-> Result<Removals, E>`) as the ABI
/// v2 entry point `switchyard_compaction`. See [`export_retention!`](crate::export_retention).
#[macro_export]
macro_rules! export_compaction {
    ($f:path) => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn switchyard_compaction(ptr: i32, len: i32) -> i64 {
            const _: () = $crate::v2::abi_v2_enabled();
            $crate::v2::run(ptr, len, |bytes| $crate::v2::handle_compaction(bytes, $f))
        }
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            #[allow(dead_code)]
            fn __switchyard_check() {
                $crate::v2::check_compaction($f)
            }
        };
    };
}
#[cfg(target_arch = "wasm32")]
pub(super) fn host_key(index: u32) -> Option<String> {
    #[link(wasm_import_module = "switchyard")]
    unsafe extern "C" {
        #[link_name = "key"]
        fn switchyard_key(index: i32, ptr: i32, cap: i32) -> i32;
    }
    let mut buf = vec![0u8; 256];
    // SAFETY: the host writes at most `cap` bytes at `ptr`, inside `buf`.
    let len = unsafe { switchyard_key(index as i32, buf.as_mut_ptr() as usize as i32, buf.len() as i32) };
    if len < 0 {
        return None;
    }
    let len = len as usize;
    if len > buf.len() {
        buf = vec![0u8; len];
        // SAFETY: as above, with a buffer of the key's full length.
        unsafe { switchyard_key(index as i32, buf.as_mut_ptr() as usize as i32, buf.len() as i32) };
    }
    buf.truncate(len);
    String::from_utf8(buf).ok()
}

#[cfg(not(target_arch = "wasm32"))]
pub(super) fn host_key(_index: u32) -> Option<String> {
    None
}

/// Reads message `index`'s payload through `switchyard.payload`, first into a buffer of
/// `hint` bytes (the stored size, which holds the payload), again at its full length if it
/// was longer.
#[cfg(target_arch = "wasm32")]
pub(super) fn host_payload(index: u32, hint: u32) -> Option<String> {
    #[link(wasm_import_module = "switchyard")]
    unsafe extern "C" {
        #[link_name = "payload"]
        fn switchyard_payload(index: i32, ptr: i32, cap: i32) -> i32;
    }
    let mut buf = vec![0u8; (hint as usize).clamp(16, 1 << 20)];
    // SAFETY: the host writes at most `cap` bytes at `ptr`, inside `buf`.
    let len = unsafe { switchyard_payload(index as i32, buf.as_mut_ptr() as usize as i32, buf.len() as i32) };
    if len < 0 {
        return None;
    }
    let len = len as usize;
    if len > buf.len() {
        buf = vec![0u8; len];
        // SAFETY: as above, with a buffer of the payload's full length. The host answers
        // the same bytes (it keeps the last payload read), or -1.
        let again = unsafe { switchyard_payload(index as i32, buf.as_mut_ptr() as usize as i32, buf.len() as i32) };
        if again as usize != len {
            return None;
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).ok()
}

#[cfg(not(target_arch = "wasm32"))]
pub(super) fn host_payload(_index: u32, _hint: u32) -> Option<String> {
    None
}

//! Guest-side glue of the postcard entry points of ABI v1 (all kinds). The v2 record glue
//! is in [`crate::v2`] (retention, compaction) and [`crate::balance_v2`] (balance).
//!
//! Plugin authors normally use only the v2 macros [`export_retention!`](crate::export_retention),
//! [`export_compaction!`](crate::export_compaction), [`export_balance!`](crate::export_balance)
//! and [`log!`](macro@crate::log). This module holds what the v1 macros expand to:
//!
//! - [`call`]: the target-independent part of one call (decode the postcard [`Call`], parse
//!   the params JSON, run the policy, wrap its answer in a [`GuestResult`]). It is plain
//!   Rust, so the whole path except the raw pointers is unit-tested natively.
//! - `run` (wasm32 only): reads the input bytes at `(ptr, len)`, runs [`call`], encodes the
//!   answer with postcard into a leaked buffer and packs `(ptr << 32) | len`.
//! - the `switchyard_abi_v1` marker and the `switchyard_alloc` allocator exports, defined
//!   once here (wasm32 only) so that a module exports them exactly once whatever it exports.
//!
//! # Params
//!
//! The host passes a binding's params as JSON object text, `"{}"` when there are none; an
//! empty string is read as `"{}"` too. They are parsed with `serde_json` into the policy's
//! params type `P`:
//!
//! - put `#[serde(default)]` on the params struct (and derive or implement `Default`) when
//!   every param is optional, so that `{}` gives the defaults;
//! - leave a field without a default to make it required: a binding without it then gets
//!   the guest error `invalid params: missing field ...` (the host logs it and falls back);
//! - `#[serde(deny_unknown_fields)]` turns a misspelt param into such an error as well;
//! - a policy without params can take [`NoParams`], which accepts any object.
//!
//! A params error is reported as `Err(message)` in the [`GuestResult`], never as a trap.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{
    BalanceDecision, BalanceInput, Call, CompactionDecision, CompactionInput, GuestResult, RetentionDecision,
    RetentionInput,
};

/// Return codes below zero from an entry point (the host then uses its built-in policy).
pub mod codes {
    /// The answer could not be encoded with postcard.
    pub const ENCODE_FAILED: i64 = -1;
    /// The answer was encoded but lies at an address the packed return value cannot carry.
    pub const OUT_OF_RANGE: i64 = -2;
}

/// Params type for a policy that takes none: accepts any JSON object and ignores it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct NoParams {}

/// What a policy function may return: its decision, or `Result<decision, error>` where the
/// error becomes the guest's own failure report (`Err(message)` on the wire).
pub trait IntoGuestResult<O> {
    /// Converts to what goes on the wire.
    fn into_guest_result(self) -> GuestResult<O>;
}

impl IntoGuestResult<RetentionDecision> for RetentionDecision {
    fn into_guest_result(self) -> GuestResult<RetentionDecision> {
        Ok(self)
    }
}

impl IntoGuestResult<CompactionDecision> for CompactionDecision {
    fn into_guest_result(self) -> GuestResult<CompactionDecision> {
        Ok(self)
    }
}

impl IntoGuestResult<BalanceDecision> for BalanceDecision {
    fn into_guest_result(self) -> GuestResult<BalanceDecision> {
        Ok(self)
    }
}

impl<O, E: std::fmt::Display> IntoGuestResult<O> for Result<O, E> {
    fn into_guest_result(self) -> GuestResult<O> {
        self.map_err(|e| e.to_string())
    }
}

/// Parses a binding's params JSON text into `P` (empty text counts as `{}`).
pub fn parse_params<P: DeserializeOwned>(json: &str) -> Result<P, String> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    serde_json::from_str(json).map_err(|e| format!("invalid params: {e}"))
}

/// One call without the pointers: decodes a postcard [`Call<I>`] from `bytes`, parses its
/// params into `P`, runs `f` and returns its answer. Undecodable input and bad params are
/// `Err(message)`.
pub fn call<I, P, O, R>(bytes: &[u8], f: impl Fn(&I, &P) -> R) -> GuestResult<O>
where
    I: DeserializeOwned,
    P: DeserializeOwned,
    R: IntoGuestResult<O>,
{
    let call: Call<I> = postcard::from_bytes(bytes).map_err(|e| format!("undecodable input: {e}"))?;
    let params: P = parse_params(&call.params)?;
    f(&call.input, &params).into_guest_result()
}

/// Encodes one call's input as the host does (postcard `Call<I>`); for tests of a policy
/// through [`call`].
pub fn encode_call<I: Serialize>(params: &str, input: &I) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(&Call { params: params.to_string(), input })
}

/// Encodes a guest answer as it goes on the wire (postcard `Result<O, String>`).
pub fn encode<O: Serialize>(result: &GuestResult<O>) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(result)
}

/// Runs one call of an entry point: reads the input at `[ptr, ptr+len)`, runs [`call`],
/// encodes its [`GuestResult`] into a leaked buffer and returns `(ptr << 32) | len`, or a
/// negative [`codes`] value if even the answer cannot be encoded.
///
/// The buffers are leaked on purpose: the host instantiates the module afresh per call.
#[cfg(target_arch = "wasm32")]
pub fn run<I, P, O, R>(ptr: i32, len: i32, f: impl Fn(&I, &P) -> R) -> i64
where
    I: DeserializeOwned,
    P: DeserializeOwned,
    O: Serialize,
    R: IntoGuestResult<O>,
{
    let bytes: &[u8] = if len <= 0 || ptr == 0 {
        &[]
    } else {
        // SAFETY: the host wrote `len` bytes at `ptr`, which `switchyard_alloc` returned.
        unsafe { core::slice::from_raw_parts(ptr as usize as *const u8, len as u32 as usize) }
    };
    let result = call::<I, P, O, R>(bytes, f);
    let out = match encode(&result) {
        Ok(out) => out,
        Err(e) => match encode::<O>(&Err(format!("cannot encode the answer: {e}"))) {
            Ok(out) => out,
            Err(_) => return codes::ENCODE_FAILED,
        },
    };
    pack_out(out.leak())
}

/// Packs a leaked output buffer as the entry point's return value.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub fn pack_out(out: &'static mut [u8]) -> i64 {
    let (addr, len) = (out.as_ptr() as usize as u64, out.len() as u64);
    if addr > i32::MAX as u64 || len > u32::MAX as u64 {
        return codes::OUT_OF_RANGE;
    }
    ((addr << 32) | len) as i64
}

/// The ABI v1 marker export (only with the SDK's `abi-v1` feature; without it the module
/// is ABI v2). The host only checks that it exists; it never calls it.
#[cfg(all(target_arch = "wasm32", feature = "abi-v1"))]
#[unsafe(no_mangle)]
pub extern "C" fn switchyard_abi_v1() {}

/// Referenced by the v1 export macros: they need the `abi-v1` feature (the marker).
#[cfg(feature = "abi-v1")]
#[doc(hidden)]
pub const fn abi_v1_enabled() {}

/// The allocator export: the address of `len` writable bytes, 8-aligned (ABI v2 requires
/// it), or 0 when `len < 0` or the memory cannot grow. The buffer is never freed (the
/// instance is discarded after a call).
#[cfg(target_arch = "wasm32")]
#[unsafe(no_mangle)]
pub extern "C" fn switchyard_alloc(len: i32) -> i32 {
    if len < 0 {
        return 0;
    }
    let Ok(layout) = std::alloc::Layout::from_size_align((len as usize).max(8), 8) else { return 0 };
    // SAFETY: the layout has a non-zero size; a null result (out of memory) is returned as 0.
    unsafe { std::alloc::alloc_zeroed(layout) as usize as i32 }
}

/// Type check used by [`export_retention!`](crate::export_retention) on non-wasm targets.
#[doc(hidden)]
pub fn check_retention<P: DeserializeOwned, R: IntoGuestResult<RetentionDecision>>(
    _: impl Fn(&RetentionInput, &P) -> R,
) {
}

/// Type check used by [`export_compaction!`](crate::export_compaction) on non-wasm targets.
#[doc(hidden)]
pub fn check_compaction<P: DeserializeOwned, R: IntoGuestResult<CompactionDecision>>(
    _: impl Fn(&CompactionInput, &P) -> R,
) {
}

/// Type check used by [`export_balance_v1!`](crate::export_balance_v1) on non-wasm targets.
#[doc(hidden)]
pub fn check_balance<P: DeserializeOwned, R: IntoGuestResult<BalanceDecision>>(_: impl Fn(&BalanceInput, &P) -> R) {}

/// ABI v1 (needs the SDK's `abi-v1` feature): exports `$f: fn(&RetentionInput, &P) ->
/// RetentionDecision` (or `-> Result<RetentionDecision, E: Display>`) as the postcard entry
/// point `switchyard_retention`, where `P: DeserializeOwned` is the params type. New
/// plugins use the v2 [`export_retention!`](crate::export_retention).
///
/// On wasm32 it defines `#[no_mangle] extern "C" fn switchyard_retention(ptr: i32, len: i32)
/// -> i64`; elsewhere it only checks `$f`'s signature, so `cargo test` tests `$f` directly.
/// Use it once per crate, at module level.
#[macro_export]
macro_rules! export_retention_v1 {
    ($f:path) => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn switchyard_retention(ptr: i32, len: i32) -> i64 {
            const _: () = $crate::guest::abi_v1_enabled();
            $crate::guest::run::<$crate::RetentionInput, _, $crate::RetentionDecision, _>(ptr, len, $f)
        }
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            #[allow(dead_code)]
            fn __switchyard_check() {
                $crate::guest::check_retention($f)
            }
        };
    };
}

/// ABI v1 (needs the `abi-v1` feature): exports `$f: fn(&CompactionInput, &P) ->
/// CompactionDecision` (or `-> Result<...>`) as `switchyard_compaction`. See
/// [`export_retention_v1!`](crate::export_retention_v1).
#[macro_export]
macro_rules! export_compaction_v1 {
    ($f:path) => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn switchyard_compaction(ptr: i32, len: i32) -> i64 {
            const _: () = $crate::guest::abi_v1_enabled();
            $crate::guest::run::<$crate::CompactionInput, _, $crate::CompactionDecision, _>(ptr, len, $f)
        }
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            #[allow(dead_code)]
            fn __switchyard_check() {
                $crate::guest::check_compaction($f)
            }
        };
    };
}

/// ABI v1 (needs the `abi-v1` feature): exports `$f: fn(&BalanceInput, &P) ->
/// BalanceDecision` (or `-> Result<...>`) as the postcard entry point `switchyard_balance`.
/// New plugins use the v2 [`export_balance!`](crate::export_balance). See
/// [`export_retention_v1!`](crate::export_retention_v1).
#[macro_export]
macro_rules! export_balance_v1 {
    ($f:path) => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn switchyard_balance(ptr: i32, len: i32) -> i64 {
            const _: () = $crate::guest::abi_v1_enabled();
            $crate::guest::run::<$crate::BalanceInput, _, $crate::BalanceDecision, _>(ptr, len, $f)
        }
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            #[allow(dead_code)]
            fn __switchyard_check() {
                $crate::guest::check_balance($f)
            }
        };
    };
}

//! ABI v2 balancing, the wasm32 boundary: the [`export_balance!`](crate::export_balance)
//! macro, which defines the `switchyard_balance` export on wasm32 (through
//! [`crate::v2::run`], which also owns the ABI marker) and natively only checks a policy's
//! signature. It must never hold policy logic or byte layouts (those are `guest`'s).

use serde::de::DeserializeOwned;

use super::{BalanceView, Placement};
use crate::guest::IntoGuestResult;

// === wasm32 glue ===

/// Type check used by [`export_balance!`](crate::export_balance) natively.
#[doc(hidden)]
pub fn check_balance<P: DeserializeOwned, R: IntoGuestResult<Placement>>(_: impl Fn(&BalanceView<'_>, &P) -> R) {}

/// Exports `$f: fn(&BalanceView, &P) -> Placement` (or `-> Result<Placement, E: Display>`)
/// as the ABI v2 entry point `switchyard_balance`, where `P: DeserializeOwned` is the params
/// type. On wasm32 it defines the export; natively it only checks `$f`'s signature, so
/// `cargo test` tests `$f` directly (or through
/// [`call_balance`](crate::balance_v2::call_balance)). Use it once per crate.
#[macro_export]
macro_rules! export_balance {
    ($f:path) => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn switchyard_balance(ptr: i32, len: i32) -> i64 {
            const _: () = $crate::v2::abi_v2_enabled();
            $crate::v2::run(ptr, len, |bytes| $crate::balance_v2::handle(bytes, $f))
        }
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            #[allow(dead_code)]
            fn __switchyard_check() {
                $crate::balance_v2::check_balance($f)
            }
        };
    };
}

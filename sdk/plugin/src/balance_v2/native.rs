//! ABI v2 balancing, natively: [`call_balance`] runs a policy through the whole byte path in
//! one process (the host's encoder, the guest's view and answer, the host's decoding and
//! checks), so a plugin's unit tests exercise exactly the bytes the router would exchange
//! with it. It must never take a shortcut around the encoding or the checks, and never do
//! I/O.

use serde::de::DeserializeOwned;

use super::{answer_to_plan, decode_output, handle, BalanceEncoder, BalanceView, Placement};
use crate::guest::IntoGuestResult;
use crate::{BalanceInput, BalancePlan, GuestResult, ReplicaInput};

// === native: the whole path ===

/// Runs a v2 balancing policy natively through the whole byte path (encode, view, run,
/// answer, decode and check), as the router and the wasm glue would; for plugin unit
/// tests. Errors are the guest's own, or what the host would refuse.
pub fn call_balance<P: DeserializeOwned, R: IntoGuestResult<Placement>>(
    params: &str,
    input: &BalanceInput,
    replicas: &ReplicaInput,
    f: impl Fn(&BalanceView<'_>, &P) -> R,
) -> GuestResult<BalancePlan> {
    let mut enc = BalanceEncoder::default();
    let out = handle(enc.encode(params, input, replicas), f);
    let current: Vec<u32> = enc.owner_indices().collect();
    match decode_output(&out, enc.node_ids().len(), &current, enc.follower_slots(), input.max_moves) {
        Ok(answer) => Ok(answer_to_plan(&answer, enc.node_ids())),
        Err(crate::v2::OutputError::Guest(m)) => Err(m),
        Err(crate::v2::OutputError::Garbage(m) | crate::v2::OutputError::Invalid(m)) => Err(format!("refused: {m}")),
    }
}

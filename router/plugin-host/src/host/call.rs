//! The call path: one call on a fresh instance, from writing the input to a checked
//! decision.
//!
//! It owns taking a pool slot, starting an instance under the memory cap and the epoch
//! deadline, writing the input (postcard, v2 records or v2 balance records) into guest
//! memory, and reading the answer: refused past its [`OutputBound`](super::OutputBound)
//! before it is decoded, checked to lie inside guest memory, then decoded into a decision
//! or a typed [`CallError`] (never a panic), with each trap classified. It must never
//! decide what a failure means for routing (the registry does) and never keep an instance
//! past its call.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use switchyard_core::policy::Payloads;
use switchyard_sdk as abi;
use switchyard_sdk::balance_v2 as v2b;
use switchyard_sdk::v2;
use wasmtime::{ResourceLimiter, Store, StoreLimitsBuilder, Trap};

use super::engine::TICK;
use super::imports::LOG_LINES_PER_CALL;
use super::input::{PolicyInput, V2Call, ERROR_ROOM};
use super::state::{key_table, CallState, KeyTable, PayloadTable};
use super::{CallError, CallLimits, Compiled, Host, Kind};

impl Host {
    /// Runs one call of `kind` on a fresh instance: postcard for an ABI v1 module (and for
    /// balance), records for retention and compaction in an ABI v2 module.
    pub fn call<I: PolicyInput>(
        &self,
        plugin: &Arc<str>,
        compiled: &Compiled,
        kind: Kind,
        params: &str,
        input: &I,
        limits: CallLimits,
    ) -> Result<I::Output, CallError> {
        let mut out = self.call_many(plugin, compiled, kind, params, &[input], limits)?;
        out.pop().ok_or_else(|| CallError::Garbage("no answer".into()))
    }

    /// True when one call of this module can take several inputs (channels): ABI v2, for
    /// inputs that have a v2 record form.
    pub fn batches<I: PolicyInput>(compiled: &Compiled, input: &I) -> bool {
        compiled.abi == 2 && input.v2().is_some()
    }

    /// Runs one call of `kind` on a fresh instance for all `inputs` at once (one decision
    /// each, in order). Several inputs need [`Host::batches`]; the v2 header's `now_ms` is
    /// the latest of the inputs'. A v2 guest's `switchyard.payload` answers -1 (use
    /// [`Host::call_many_with`] to give it payloads).
    pub fn call_many<I: PolicyInput>(
        &self,
        plugin: &Arc<str>,
        compiled: &Compiled,
        kind: Kind,
        params: &str,
        inputs: &[&I],
        limits: CallLimits,
    ) -> Result<Vec<I::Output>, CallError> {
        self.call_many_with(plugin, compiled, kind, params, inputs, limits, None)
    }

    /// [`Host::call_many`] where a v2 guest's `switchyard.payload` reads through `payloads`
    /// (each payload when the guest asks for it, by the input's channel name and the
    /// message's offset).
    #[allow(clippy::too_many_arguments)]
    pub fn call_many_with<I: PolicyInput>(
        &self,
        plugin: &Arc<str>,
        compiled: &Compiled,
        kind: Kind,
        params: &str,
        inputs: &[&I],
        limits: CallLimits,
        payloads: Option<&Arc<dyn Payloads>>,
    ) -> Result<Vec<I::Output>, CallError> {
        if compiled.abi == 2 && kind == Kind::Balance {
            return Err(CallError::Garbage("an ABI v2 balance call goes through Host::balance".into()));
        }
        let v2_calls: Option<Vec<V2Call<'_>>> =
            if compiled.abi == 2 { inputs.iter().map(|i| i.v2()).collect() } else { None };
        let single = match (&v2_calls, inputs) {
            (Some(_), _) => None,
            (None, [one]) => Some(*one),
            (None, _) => return Err(CallError::Garbage(format!("{} inputs for a one-input call", inputs.len()))),
        };
        // Taken before the store, so it is released after the store (and its pool slot) is dropped.
        let _slot = self.slots.take();
        let Running { mut store, memory, alloc, entry } = self.start(plugin, compiled, kind, limits)?;
        let trap = |store: &Store<CallState>, e: wasmtime::Error| classify(store, e, limits);
        let channels: Vec<v2::ChannelIn<'_>> = v2_calls.iter().flatten().map(|c| c.channel).collect();
        let counts: Vec<usize> = channels.iter().map(|c| c.messages.len()).collect();
        let v2_kind = v2_calls.as_ref().and_then(|c| c.first()).map_or(0, |c| c.kind);

        // The input: postcard bytes, or v2 records written straight into the guest's buffer.
        let (ptr, len) = match (&v2_calls, single) {
            (None, Some(input)) => {
                let bytes = postcard::to_stdvec(&abi::Call { params: params.to_string(), input })
                    .map_err(|e| CallError::Garbage(format!("cannot encode input: {e}")))?;
                let len = i32::try_from(bytes.len()).map_err(|_| CallError::Garbage("input over 2 GiB".into()))?;
                let ptr = alloc.call(&mut store, len).map_err(|e| trap(&store, e))?;
                if ptr == 0 {
                    return Err(CallError::Memory(limits.max_memory));
                }
                memory
                    .write(&mut store, ptr as u32 as usize, &bytes)
                    .map_err(|_| CallError::OutOfBounds(format!("alloc returned {ptr:#x} for {len} bytes")))?;
                (ptr, len)
            }
            (None, None) => return Err(CallError::Garbage("no input".into())),
            (Some(calls), _) => {
                let now_ms = calls.iter().map(|c| c.now_ms).max().unwrap_or(0);
                let size = v2::input_len(params, &channels);
                let len = i32::try_from(size).map_err(|_| CallError::Garbage("input over 2 GiB".into()))?;
                let ptr = alloc.call(&mut store, len).map_err(|e| trap(&store, e))?;
                if ptr == 0 {
                    return Err(CallError::Memory(limits.max_memory));
                }
                if ptr % 8 != 0 {
                    return Err(CallError::Garbage(format!("alloc returned {ptr:#x}, not 8-aligned")));
                }
                let start = ptr as u32 as usize;
                let buf = start
                    .checked_add(size)
                    .and_then(|end| memory.data_mut(&mut store).get_mut(start..end))
                    .ok_or_else(|| CallError::OutOfBounds(format!("alloc returned {ptr:#x} for {len} bytes")))?;
                let hasher = &self.key_hasher;
                v2::encode_input(buf, v2_kind, now_ms, params, &channels, |k| {
                    std::hash::BuildHasher::hash_one(hasher, k)
                });
                store.data_mut().keys = key_table(&channels);
                store.data_mut().payloads = payloads.map(|source| PayloadTable::new(source, &channels));
                (ptr, len)
            }
        };

        let r = entry.call(&mut store, (ptr, len)).map_err(|e| trap(&store, e))?;
        if r < 0 {
            return Err(CallError::Garbage(format!("guest returned status {r}")));
        }
        let (out_ptr, out_len) = ((r >> 32) as u32 as usize, (r & 0xffff_ffff) as u32 as usize);
        let max = match single {
            Some(input) => input.max_output(),
            None => ERROR_ROOM + v2::max_output(v2_kind, &counts),
        };
        if out_len > max {
            return Err(CallError::Garbage(format!("output of {out_len} bytes; at most {max} can be valid")));
        }
        let data = memory.data(&store);
        let out = out_ptr.checked_add(out_len).and_then(|end| data.get(out_ptr..end)).ok_or_else(|| {
            CallError::OutOfBounds(format!("output [{out_ptr:#x}, +{out_len}) outside {} bytes", data.len()))
        })?;
        if single.is_some() {
            return decode_output(out).map(|d| vec![d]);
        }
        let answers = v2::decode_output(out, v2_kind, &counts).map_err(|e| match e {
            v2::OutputError::Garbage(m) => CallError::Garbage(m),
            v2::OutputError::Invalid(m) => CallError::Invalid(m),
            v2::OutputError::Guest(m) => CallError::Guest(m),
        })?;
        inputs.iter().zip(answers).map(|(input, answer)| input.decision_from_v2(answer)).collect()
    }
}

/// One call's instance: its store (with limits and deadline), memory, allocator and entry
/// point. The caller holds a pool slot ([`Slots::take`]) from before it until after it.
struct Running {
    store: Store<CallState>,
    memory: wasmtime::Memory,
    alloc: wasmtime::TypedFunc<i32, i32>,
    entry: wasmtime::TypedFunc<(i32, i32), i64>,
}

impl Host {
    /// A fresh instance of `compiled` for one call of `kind`, with the memory cap and the
    /// epoch deadline set.
    fn start(
        &self,
        plugin: &Arc<str>,
        compiled: &Compiled,
        kind: Kind,
        limits: CallLimits,
    ) -> Result<Running, CallError> {
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.max_memory)
            .table_elements(10_000)
            .instances(1)
            .tables(4)
            .memories(1)
            .trap_on_grow_failure(true)
            .build();
        let state = CallState {
            plugin: plugin.clone(),
            limits: store_limits,
            max_memory: limits.max_memory,
            memory_hit: false,
            logs_left: LOG_LINES_PER_CALL,
            log_budget: self.log_budget.clone(),
            keys: KeyTable::default(),
            payloads: None,
            fault: None,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        let ticks = (limits.timeout.as_millis() / TICK.as_millis()).max(1) as u64 + 1;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        let instance = compiled.pre.instantiate(&mut store).map_err(|e| classify(&store, e, limits))?;
        let memory =
            instance.get_memory(&mut store, "memory").ok_or_else(|| CallError::Garbage("no memory export".into()))?;
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, abi::ALLOC_EXPORT)
            .map_err(|e| CallError::Garbage(format!("{e:#}")))?;
        let entry = instance
            .get_typed_func::<(i32, i32), i64>(&mut store, kind.export())
            .map_err(|e| CallError::Garbage(format!("{e:#}")))?;
        Ok(Running { store, memory, alloc, entry })
    }

    /// Runs one balancing call: postcard for an ABI v1 module (which never sees
    /// `replicas` and places no followers), the v2 balance records for an ABI v2 module.
    /// The v2 input comes from the module's [`v2b::BalanceEncoder`], which rewrites only
    /// what changed since the previous round; the answer is checked (live owners, the move
    /// budget, followers on distinct live nodes other than the owner) before it is turned
    /// back into node ids.
    pub fn balance(
        &self,
        plugin: &Arc<str>,
        compiled: &Compiled,
        params: &str,
        input: &abi::BalanceInput,
        replicas: &abi::ReplicaInput,
        limits: CallLimits,
    ) -> Result<abi::BalancePlan, CallError> {
        if compiled.abi == 1 {
            let decision = self.call(plugin, compiled, Kind::Balance, params, input, limits)?;
            return Ok(abi::BalancePlan { decision, followers: None });
        }
        // One encoder per module version; a concurrent caller (rare: one leader) encodes
        // from scratch rather than wait.
        let mut own = v2b::BalanceEncoder::default();
        let mut shared = compiled.balance_cache.try_lock();
        let enc = match shared.as_deref_mut() {
            Ok(enc) => enc,
            Err(_) => &mut own,
        };
        let bytes = enc.encode(params, input, replicas);
        let _slot = self.slots.take();
        let Running { mut store, memory, alloc, entry } = self.start(plugin, compiled, Kind::Balance, limits)?;
        let trap = |store: &Store<CallState>, e: wasmtime::Error| classify(store, e, limits);
        let len = i32::try_from(bytes.len()).map_err(|_| CallError::Garbage("input over 2 GiB".into()))?;
        let ptr = alloc.call(&mut store, len).map_err(|e| trap(&store, e))?;
        if ptr == 0 {
            return Err(CallError::Memory(limits.max_memory));
        }
        if ptr % 8 != 0 {
            return Err(CallError::Garbage(format!("alloc returned {ptr:#x}, not 8-aligned")));
        }
        memory
            .write(&mut store, ptr as u32 as usize, bytes)
            .map_err(|_| CallError::OutOfBounds(format!("alloc returned {ptr:#x} for {len} bytes")))?;
        let r = entry.call(&mut store, (ptr, len)).map_err(|e| trap(&store, e))?;
        if r < 0 {
            return Err(CallError::Garbage(format!("guest returned status {r}")));
        }
        let (out_ptr, out_len) = ((r >> 32) as u32 as usize, (r & 0xffff_ffff) as u32 as usize);
        let max = ERROR_ROOM + v2b::max_output(input.partitions.len(), enc.follower_slots());
        if out_len > max {
            return Err(CallError::Garbage(format!("output of {out_len} bytes; at most {max} can be valid")));
        }
        let data = memory.data(&store);
        let out = out_ptr.checked_add(out_len).and_then(|end| data.get(out_ptr..end)).ok_or_else(|| {
            CallError::OutOfBounds(format!("output [{out_ptr:#x}, +{out_len}) outside {} bytes", data.len()))
        })?;
        let current: Vec<u32> = enc.owner_indices().collect();
        let answer = v2b::decode_output(out, enc.node_ids().len(), &current, enc.follower_slots(), input.max_moves)
            .map_err(|e| match e {
                v2::OutputError::Garbage(m) => CallError::Garbage(m),
                v2::OutputError::Invalid(m) => CallError::Invalid(m),
                v2::OutputError::Guest(m) => CallError::Guest(m),
            })?;
        Ok(v2b::answer_to_plan(&answer, enc.node_ids()))
    }
}

/// Decodes a guest's output buffer: exactly one postcard `GuestResult`, nothing after it.
/// Any other byte string is `Garbage` (never a panic, whatever the guest wrote).
pub(super) fn decode_output<O: DeserializeOwned>(out: &[u8]) -> Result<O, CallError> {
    // The whole buffer must be one value: trailing bytes mean the guest wrote garbage.
    match postcard::take_from_bytes::<abi::GuestResult<O>>(out) {
        Ok((Ok(decision), [])) => Ok(decision),
        Ok((Err(message), [])) => Err(CallError::Guest(message.chars().take(512).collect())),
        Ok((_, rest)) => Err(CallError::Garbage(format!("{} trailing bytes after the output value", rest.len()))),
        Err(e) => Err(CallError::Garbage(format!("undecodable output ({} bytes): {e}", out.len()))),
    }
}

fn classify(store: &Store<CallState>, e: wasmtime::Error, limits: CallLimits) -> CallError {
    if let Some(why) = &store.data().fault {
        return CallError::OutOfBounds(why.clone());
    }
    if store.data().memory_hit {
        return CallError::Memory(limits.max_memory);
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => CallError::Timeout(limits.timeout),
        Some(t) => CallError::Trap(t.to_string()),
        None => CallError::Trap(format!("{e:#}").chars().take(512).collect()),
    }
}

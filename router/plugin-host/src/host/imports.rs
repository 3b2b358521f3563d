//! The host imports a guest may call: `switchyard.log`, and for ABI v2 `switchyard.key` and
//! `switchyard.payload`.
//!
//! It owns each import's checks of the guest's index, pointer and capacity (a bad one is a
//! fault noted in the store: the call traps and fails as `out_of_bounds`) and the log
//! budgets, per call and per plugin. It must never use a guest's index, pointer or length
//! unchecked, and never let a guest's text forge a log line (control characters are shown
//! escaped).

use std::sync::Arc;
use std::time::Duration;

use wasmtime::Caller;

use super::state::CallState;

/// Most log lines one call may emit (the rest are dropped).
pub(super) const LOG_LINES_PER_CALL: u32 = 50;
/// Longest log line kept.
const LOG_LINE_MAX: usize = 1024;

/// `switchyard.key(index, ptr, cap) -> len`: copies up to `cap` bytes of message `index`'s
/// key to `[ptr, ptr+cap)` and returns the key's full length, or -1 for an unkeyed message.
/// An index out of range, a negative `cap` or a destination outside memory is a fault: the
/// call traps and fails as `out_of_bounds`.
pub(super) fn guest_key(caller: &mut Caller<'_, CallState>, index: i32, ptr: i32, cap: i32) -> wasmtime::Result<i32> {
    let fault = |caller: &mut Caller<'_, CallState>, why: String| {
        caller.data_mut().fault = Some(why.clone());
        Err(wasmtime::Error::msg(why))
    };
    let count = caller.data().keys.spans.len();
    let Some(&(start, len)) = usize::try_from(index).ok().and_then(|i| caller.data().keys.spans.get(i)) else {
        return fault(caller, format!("switchyard.key index {index} out of range ({count} messages)"));
    };
    if len == u32::MAX {
        return Ok(-1);
    }
    if cap < 0 {
        return fault(caller, format!("switchyard.key cap {cap}"));
    }
    let n = (len as usize).min(cap as usize);
    let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
        return fault(caller, "no memory export".into());
    };
    let (data, state) = memory.data_and_store_mut(&mut *caller);
    let dest = (ptr as u32 as usize).checked_add(n).and_then(|end| data.get_mut(ptr as u32 as usize..end));
    match dest {
        Some(dest) => {
            let s = start as usize;
            dest.copy_from_slice(&state.keys.bytes[s..s + n]);
            Ok(len as i32)
        }
        None => fault(caller, format!("switchyard.key destination [{ptr:#x}, +{n}) outside memory")),
    }
}

/// `switchyard.payload(index, ptr, cap) -> len`: copies up to `cap` bytes of message
/// `index`'s stored JSON payload to `[ptr, ptr+cap)` and returns the payload's full length,
/// or -1 when the message is no longer stored (or cannot be read, or the caller gave no
/// payload source). The payload is read from the store now, at the guest's demand. An index
/// out of range, a negative `cap` or a destination outside memory is a fault, as for
/// [`guest_key`]: the call traps and fails as `out_of_bounds`.
pub(super) fn guest_payload(
    caller: &mut Caller<'_, CallState>,
    index: i32,
    ptr: i32,
    cap: i32,
) -> wasmtime::Result<i32> {
    let fault = |caller: &mut Caller<'_, CallState>, why: String| {
        caller.data_mut().fault = Some(why.clone());
        Err(wasmtime::Error::msg(why))
    };
    // The message table is the one `switchyard.key` indexes, whether or not payloads exist.
    let count = caller.data().keys.spans.len();
    let Some(index) = u32::try_from(index).ok().filter(|&i| (i as usize) < count) else {
        return fault(caller, format!("switchyard.payload index {index} out of range ({count} messages)"));
    };
    if cap < 0 {
        return fault(caller, format!("switchyard.payload cap {cap}"));
    }
    let Some(table) = caller.data().payloads.as_ref() else { return Ok(-1) };
    if table.last.as_ref().is_none_or(|(i, _)| *i != index) {
        let (source, at) = (table.source.clone(), table.locate(index));
        let payload = at.and_then(|(channel, offset)| source.payload(&channel, offset));
        if let Some(table) = caller.data_mut().payloads.as_mut() {
            table.last = Some((index, payload));
        }
    }
    let len = match caller.data().payloads.as_ref().and_then(|t| t.last.as_ref()).and_then(|(_, p)| p.as_ref()) {
        Some(p) => p.len(),
        None => return Ok(-1),
    };
    let Ok(full) = i32::try_from(len) else { return Ok(-1) };
    let n = len.min(cap as usize);
    let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
        return fault(caller, "no memory export".into());
    };
    let (data, state) = memory.data_and_store_mut(&mut *caller);
    let dest = (ptr as u32 as usize).checked_add(n).and_then(|end| data.get_mut(ptr as u32 as usize..end));
    let src = state.payloads.as_ref().and_then(|t| t.last.as_ref()).and_then(|(_, p)| p.as_deref());
    match (dest, src) {
        (Some(dest), Some(src)) => {
            dest.copy_from_slice(&src.as_bytes()[..n]);
            Ok(full)
        }
        _ => fault(caller, format!("switchyard.payload destination [{ptr:#x}, +{n}) outside memory")),
    }
}

/// Guest log lines one plugin may write per second, over all its calls; the rest are
/// counted and reported in one line when the next second starts.
pub(super) const LOG_LINES_PER_SECOND: u32 = 20;

/// Per-plugin log windows (a plugin called thousands of times a second must not flood the
/// node's log even though each call stays under its own line cap).
#[derive(Default)]
pub(super) struct LogBudget {
    windows: std::sync::Mutex<std::collections::HashMap<Arc<str>, (tokio::time::Instant, u32, u64)>>,
}

impl LogBudget {
    /// True when `plugin` may log one more line now.
    pub(super) fn admit(&self, plugin: &Arc<str>) -> bool {
        let now = tokio::time::Instant::now();
        let mut windows = self.windows.lock().expect("log budget");
        let w = windows.entry(plugin.clone()).or_insert((now, 0, 0));
        if now.duration_since(w.0) >= Duration::from_secs(1) {
            if w.2 > 0 {
                tracing::warn!(plugin = %plugin, suppressed = w.2, "guest log lines over {LOG_LINES_PER_SECOND}/s dropped");
            }
            *w = (now, 0, 0);
        }
        if w.1 < LOG_LINES_PER_SECOND {
            w.1 += 1;
            true
        } else {
            w.2 += 1;
            false
        }
    }
}

pub(super) fn guest_log(caller: &mut Caller<'_, CallState>, level: i32, ptr: i32, len: i32) {
    if caller.data().logs_left == 0 {
        return;
    }
    caller.data_mut().logs_left -= 1;
    let (plugin, budget) = (caller.data().plugin.clone(), caller.data().log_budget.clone());
    if !budget.admit(&plugin) {
        return;
    }
    let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else { return };
    let (start, len) = (ptr as u32 as usize, (len as u32 as usize).min(LOG_LINE_MAX));
    let data = memory.data(&*caller);
    let Some(bytes) = start.checked_add(len).and_then(|end| data.get(start..end)) else { return };
    // Control characters (newlines among them) could forge log lines: show them escaped.
    let line: String = String::from_utf8_lossy(bytes).chars().flat_map(char::escape_default).collect();
    let plugin = caller.data().plugin.clone();
    match level {
        1 => tracing::error!(plugin = %plugin, "{line}"),
        2 => tracing::warn!(plugin = %plugin, "{line}"),
        3 => tracing::info!(plugin = %plugin, "{line}"),
        4 => tracing::debug!(plugin = %plugin, "{line}"),
        _ => tracing::trace!(plugin = %plugin, "{line}"),
    }
}

//! `switchyard plugin check FILE.wasm`: validate a plugin and time it on sample input.
//!
//! It owns the operator's pre-flight: load the module exactly as the router would (ABI
//! v1 checks included), run every kind it exports on generated inputs of several sizes,
//! print the decision and the per-call time, and, for retention and compaction, the time of
//! the built-in native policy on the same input. It must never touch a data dir or a
//! running node.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_sdk::{
    BalanceDecision, BalanceInput, ChannelStats, CompactionDecision, CompactionInput, MessageMeta, NodeInfo,
    PartitionInfo, RetentionDecision, RetentionInput,
};

use crate::host::{load_file, CallLimits, Host, Kind};
use switchyard_core::policy::{CompactionPolicy, KeyedCompaction, LimitsRetention, RetentionPolicy};

/// Sample sizes the check runs with.
const SIZES: [usize; 3] = [100, 1_000, 10_000];

/// What to check.
pub struct CheckArgs<'a> {
    /// The module.
    pub file: &'a Path,
    /// Params JSON object text.
    pub params: &'a str,
    /// Calls per size (the mean is printed).
    pub calls: u32,
}

fn metas(n: usize, keys: usize) -> Vec<MessageMeta> {
    (0..n as u64)
        .map(|i| MessageMeta {
            offset: i + 1,
            ts: 1_000_000 + i * 10,
            size: 120,
            key: (keys > 0).then(|| format!("k{}", i as usize % keys)),
            tombstone: keys > 0 && i % 97 == 0,
        })
        .collect()
}

fn retention_input(n: usize) -> RetentionInput {
    let oldest = metas(n, 0);
    let now_ms = 1_000_000 + n as u64 * 10;
    RetentionInput {
        channel: "check:retention".into(),
        stats: ChannelStats { first_offset: 1, last_offset: n as u64, count: n as u64, bytes: 120 * n as u64 },
        oldest,
        now_ms,
    }
}

fn compaction_input(n: usize) -> CompactionInput {
    CompactionInput {
        channel: "check:compaction".into(),
        window: metas(n, (n / 10).max(1)),
        now_ms: 1_000_000 + n as u64 * 10,
    }
}

fn balance_input(partitions: usize) -> BalanceInput {
    let nodes: Vec<NodeInfo> = (1..=3)
        .map(|i| NodeInfo { id: format!("node-{i}"), zone: String::new(), weight: 1.0, ..Default::default() })
        .collect();
    BalanceInput {
        partitions: (0..partitions as u32)
            .map(|id| PartitionInfo {
                id,
                owner: Some(if id % 5 == 0 { "node-gone".into() } else { "node-1".into() }),
                msg_rate: (id % 7) as f64 * 10.0,
                ..Default::default()
            })
            .collect(),
        nodes,
        max_moves: 8,
        now_ms: 0,
    }
}

fn mean(total: Duration, calls: u32) -> String {
    format!("{:.1} µs", total.as_secs_f64() * 1e6 / calls.max(1) as f64)
}

fn time<T>(calls: u32, mut f: impl FnMut() -> T) -> (T, Duration) {
    let started = Instant::now();
    let mut last = f();
    for _ in 1..calls {
        last = f();
    }
    (last, started.elapsed())
}

/// A decision that passed the router's validation, or the failure it would count.
fn checked<D>(valid: Result<(), switchyard_core::policy::PolicyError>, d: D) -> Result<D, crate::host::CallError> {
    valid.map(|()| d).map_err(|e| crate::host::CallError::Invalid(e.to_string()))
}

/// Runs the check; returns false when the module is refused or any call fails.
pub fn run(args: CheckArgs<'_>) -> bool {
    let host = match Host::new(None) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("cannot start the wasm engine: {e:#}");
            return false;
        }
    };
    let started = Instant::now();
    let compiled = match load_file(&host, args.file) {
        Ok(c) => c,
        Err(e) => {
            println!("REFUSED {}: {e}", args.file.display());
            return false;
        }
    };
    let name: Arc<str> = args.file.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin").into();
    println!("plugin {name}: ABI v1, sha256 {}, compiled in {:?}", compiled.sha256, started.elapsed());
    println!("kinds: {}", compiled.kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "));
    // The router's default limits, so a plugin that passes here also fits there.
    let limits = CallLimits::default();
    println!("limits: {:?} per call, {} MiB memory (the router's defaults)", limits.timeout, limits.max_memory >> 20);
    let mut ok = true;
    for kind in &compiled.kinds {
        for n in SIZES {
            let line = match kind {
                Kind::Retention => {
                    let input = retention_input(n);
                    let (r, took) = time(args.calls, || {
                        host.call::<_, RetentionDecision>(&name, &compiled, *kind, args.params, &input, limits)
                    });
                    let r = r.and_then(|d| checked(switchyard_core::policy::validate_retention(&name, &input, &d), d));
                    let native = LimitsRetention { size: n as u64 / 2, ttl_ms: 0, bytes: 0 };
                    let (_, native_took) = time(args.calls, || native.decide(&input));
                    r.map(|d| {
                        format!(
                            "{d:?}; {} per call (built-in keep-half: {})",
                            mean(took, args.calls),
                            mean(native_took, args.calls)
                        )
                    })
                }
                Kind::Compaction => {
                    let input = compaction_input(n);
                    let (r, took) = time(args.calls, || {
                        host.call::<_, CompactionDecision>(&name, &compiled, *kind, args.params, &input, limits)
                    });
                    let r = r.and_then(|d| checked(switchyard_core::policy::validate_compaction(&name, &input, &d), d));
                    let native = KeyedCompaction { window_ms: None, tombstone_delay_ms: 0 };
                    let (_, native_took) = time(args.calls, || native.decide(&input));
                    r.map(|d| {
                        format!(
                            "removes {} of {n}; {} per call (built-in latest-per-key: {})",
                            d.remove.len(),
                            mean(took, args.calls),
                            mean(native_took, args.calls)
                        )
                    })
                }
                Kind::Balance => {
                    let input = balance_input(n.min(4096));
                    let (r, took) = time(args.calls, || {
                        host.call::<_, BalanceDecision>(&name, &compiled, *kind, args.params, &input, limits)
                    });
                    let r = r.and_then(|d| checked(switchyard_core::policy::validate_balance(&name, &input, &d), d));
                    r.map(|d| {
                        let moved = d
                            .owners
                            .iter()
                            .zip(&input.partitions)
                            .filter(|(o, p)| p.owner.as_ref() != Some(*o))
                            .count();
                        format!("{} owners, {moved} changed; {} per call", d.owners.len(), mean(took, args.calls))
                    })
                }
            };
            match line {
                Ok(text) => println!("  {} n={n}: {text}", kind.as_str()),
                Err(e) => {
                    ok = false;
                    println!("  {} n={n}: FAILED ({}): {e}", kind.as_str(), e.reason());
                }
            }
        }
    }
    ok
}

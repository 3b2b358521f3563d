//! `switchyard plugin check FILE.wasm`: validate a plugin and time it on sample input.
//!
//! It owns the operator's pre-flight: load the module exactly as the router would (ABI v1
//! or v2 checks included), run every kind it exports on generated inputs of several sizes,
//! and report each decision with the median time per call next to the time of the
//! router's native policy on the same input (the built-in limits for retention, with the
//! plugin's `count`/`ttl_ms`/`bytes` params when given; the built-in latest-per-key with
//! its `window_ms`/`tombstone_delay_ms`; the built-in even-spread balancer), plus the fixed
//! cost of one call on an empty input. As text, or as one JSON object with `--json`. It
//! must never touch a data dir or a running node.

use std::path::Path;
use std::sync::Arc;
use tokio::time::Instant;

use serde::Serialize;
use switchyard_sdk::{
    BalanceInput, ChannelStats, CompactionInput, MessageMeta, NodeInfo, PartitionInfo, ReplicaInput, RetentionDecision,
    RetentionInput,
};

use crate::host::{load_file, CallError, CallLimits, Compiled, Host, Kind};
use switchyard_core::policy::{
    validate_balance, validate_compaction, validate_followers, validate_retention, CompactionPolicy, KeyedCompaction,
    LimitsRetention, PolicyError, RetentionPolicy,
};

/// Sample sizes the check runs with.
pub const SIZES: [usize; 3] = [100, 1_000, 10_000];

/// Live nodes in the balance samples.
pub const BALANCE_NODES: usize = 100;
/// Most partitions in a balance sample (the router's largest partition count).
pub const BALANCE_PARTITIONS: usize = 4_096;

/// What to check.
pub struct CheckArgs<'a> {
    /// The module.
    pub file: &'a Path,
    /// Params JSON object text.
    pub params: &'a str,
    /// Calls per size (the median is reported).
    pub calls: u32,
    /// Print one JSON object instead of text.
    pub json: bool,
}

/// The whole report (`--json` prints it as is).
#[derive(Debug, Serialize)]
pub struct Report {
    /// File name stem.
    pub plugin: String,
    /// ABI version of the module.
    pub abi: u32,
    /// Kinds it exports.
    pub kinds: Vec<Kind>,
    /// sha256 of the file.
    pub sha256: String,
    /// Compile (or cache load) time in ns.
    pub compile_ns: u64,
    /// Per kind: median ns of a call on an empty input (instantiation, input, answer).
    pub fixed: Vec<Fixed>,
    /// One row per kind and size.
    pub calls: Vec<CallRow>,
    /// Retention and compaction: one maintenance round of [`ROUND_CHANNELS`] channels of
    /// [`ROUND_MESSAGES`] messages, as the router makes it (one call for all of them with
    /// ABI v2, one call per channel with v1).
    pub rounds: Vec<RoundRow>,
}

/// Channels in the sample round.
pub const ROUND_CHANNELS: usize = 100;
/// Messages per channel in the sample round.
pub const ROUND_MESSAGES: usize = 100;

/// One sample round of a kind.
#[derive(Debug, Serialize)]
pub struct RoundRow {
    /// Kind.
    pub kind: Kind,
    /// Channels in the round.
    pub channels: usize,
    /// Messages per channel.
    pub n: usize,
    /// Plugin calls the round took.
    pub wasm_calls: usize,
    /// Median ns of the whole round.
    pub wasm_ns: u64,
    /// `wasm_ns / channels`.
    pub per_channel_ns: u64,
    /// Median ns of the native built-in policy over the same channels.
    pub native_ns: u64,
}

/// The fixed cost of one call of a kind.
#[derive(Debug, Serialize)]
pub struct Fixed {
    /// Kind.
    pub kind: Kind,
    /// Median ns per call with no messages (retention, compaction) or partitions (balance).
    pub wasm_ns: u64,
}

/// One kind at one size.
#[derive(Debug, Serialize)]
pub struct CallRow {
    /// Kind.
    pub kind: Kind,
    /// Messages (retention, compaction) or partitions (balance, at most 4096).
    pub n: usize,
    /// Median ns per plugin call, through the host as the router makes it.
    pub wasm_ns: u64,
    /// Median ns of the native built-in policy on the same input.
    pub native_ns: u64,
    /// Balance with ABI v2: median ns per call when the input is encoded from scratch (the
    /// first round, or after the nodes changed); `wasm_ns` is a round whose input did not
    /// change since the previous one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_ns: Option<u64>,
    /// Balance: copies per partition shown (1: owners only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// The decision, summarised; or why it failed.
    pub decisions: String,
    /// The failure reason (a metric label), when the call failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<&'static str>,
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

/// [`BALANCE_NODES`] live nodes; every fifth partition's owner is gone, the others sit on
/// node `id % 100` (so the even spread has orphans to place and nothing to shed).
pub(crate) fn balance_input(partitions: usize) -> BalanceInput {
    let nodes: Vec<NodeInfo> = (0..BALANCE_NODES)
        .map(|i| NodeInfo { id: format!("node-{i:03}"), zone: String::new(), weight: 1.0, ..Default::default() })
        .collect();
    BalanceInput {
        partitions: (0..partitions as u32)
            .map(|id| PartitionInfo {
                id,
                owner: Some(if id % 5 == 0 {
                    "node-gone".into()
                } else {
                    format!("node-{:03}", id as usize % BALANCE_NODES)
                }),
                msg_rate: (id % 7) as f64 * 10.0,
                ..Default::default()
            })
            .collect(),
        nodes,
        max_moves: 8,
        now_ms: 0,
    }
}

/// `replicas` copies per partition; the current follower of each is the next node after
/// its owner (none for a partition whose owner is gone).
pub(crate) fn replica_input(input: &BalanceInput, replicas: u32) -> ReplicaInput {
    if replicas <= 1 {
        return ReplicaInput { replicas: 1, followers: Vec::new() };
    }
    let followers = input
        .partitions
        .iter()
        .map(|p| {
            let owner = p.owner.as_deref().and_then(|o| o.strip_prefix("node-")).and_then(|n| n.parse::<usize>().ok());
            owner.map(|o| vec![format!("node-{:03}", (o + 1) % BALANCE_NODES)]).unwrap_or_default()
        })
        .collect();
    ReplicaInput { replicas, followers }
}

/// Runs `f` `calls` times (at least once); its last result and the median ns per call.
pub(crate) fn time<T>(calls: u32, mut f: impl FnMut() -> T) -> (T, u64) {
    let mut samples = Vec::with_capacity(calls.max(1) as usize);
    let mut last = None;
    for _ in 0..calls.max(1) {
        let started = Instant::now();
        last = Some(f());
        samples.push(started.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    (last.expect("ran at least once"), samples[samples.len() / 2])
}

/// A decision that passed the router's validation, or the failure it would count.
fn checked<D>(valid: Result<(), PolicyError>, d: D) -> Result<D, CallError> {
    valid.map(|()| d).map_err(|e| CallError::Invalid(e.to_string()))
}

/// The built-in retention mirroring the params: `count`, `ttl_ms`, `bytes` if present,
/// else keep the newest half.
fn native_retention(params: &serde_json::Value, n: usize) -> LimitsRetention {
    let get = |k: &str| params.get(k).and_then(|v| v.as_u64());
    match (get("count"), get("ttl_ms"), get("bytes")) {
        (None, None, None) => LimitsRetention { size: n as u64 / 2, ttl_ms: 0, bytes: 0 },
        (c, t, b) => LimitsRetention { size: c.unwrap_or(0), ttl_ms: t.unwrap_or(0), bytes: b.unwrap_or(0) },
    }
}

/// The built-in keyed compaction with the params' `window_ms` and `tombstone_delay_ms`.
fn native_compaction(params: &serde_json::Value) -> KeyedCompaction {
    KeyedCompaction {
        window_ms: params.get("window_ms").and_then(|v| v.as_u64()),
        tombstone_delay_ms: params.get("tombstone_delay_ms").and_then(|v| v.as_u64()).unwrap_or(60_000),
    }
}

fn row(kind: Kind, n: usize, wasm_ns: u64, native_ns: u64, r: Result<String, CallError>) -> CallRow {
    let (decisions, failed) = match r {
        Ok(decisions) => (decisions, None),
        Err(e) => (e.to_string(), Some(e.reason())),
    };
    CallRow { kind, n, wasm_ns, native_ns, cold_ns: None, replicas: None, decisions, failed }
}

/// Times a balance call on `partitions` partitions of [`BALANCE_NODES`] nodes with
/// `replicas` copies each, as the leader makes it ([`Host::balance`]), against the native
/// built-in (the even spread, plus the follower placement when `replicas > 1`).
pub(crate) fn balance_row(
    host: &Host,
    name: &Arc<str>,
    compiled: &Compiled,
    args: &CheckArgs<'_>,
    partitions: usize,
    replicas: u32,
) -> CallRow {
    let limits = CallLimits::default();
    let input = balance_input(partitions);
    let shown = replica_input(&input, replicas);
    let (r, wasm) = time(args.calls, || host.balance(name, compiled, args.params, &input, &shown, limits));
    let cold = (compiled.abi == 2).then(|| {
        time(args.calls, || {
            compiled.forget_balance_input();
            host.balance(name, compiled, args.params, &input, &shown, limits)
        })
        .1
    });
    let (_, native_ns) = time(args.calls, || {
        let d = switchyard_sdk::balance::even_spread(&input, input.max_moves).ok()?;
        (replicas > 1).then(|| native_followers(&input, &shown, &d.owners))
    });
    let r = r.and_then(|plan| {
        checked(validate_balance(name, &input, &plan.decision), ())?;
        if let Some(f) = &plan.followers {
            checked(validate_followers(name, &input, &shown, &plan.decision.owners, f), ())?;
        }
        Ok(plan)
    });
    let summary = |plan: switchyard_sdk::BalancePlan| {
        let d = plan.decision;
        let moved = d.owners.iter().zip(&input.partitions).filter(|(o, p)| p.owner.as_ref() != Some(*o)).count();
        let followers = match plan.followers {
            Some(f) => format!(", {} followers placed", f.iter().map(Vec::len).sum::<usize>()),
            None if replicas > 1 => ", followers left to the router".to_string(),
            None => String::new(),
        };
        format!("{} owners, {moved} changed{followers}", d.owners.len())
    };
    let mut row = row(Kind::Balance, input.partitions.len(), wasm, native_ns, r.map(summary));
    row.cold_ns = cold;
    row.replicas = Some(replicas);
    row
}

/// The router's built-in follower placement over the sample (index space, as the leader's
/// `replicas::place` runs it).
fn native_followers(input: &BalanceInput, shown: &ReplicaInput, owners: &[String]) -> Vec<u32> {
    use switchyard_sdk::balance::{place_followers, NONE};
    let index: std::collections::HashMap<&str, u32> =
        input.nodes.iter().enumerate().map(|(i, n)| (n.id.as_str(), i as u32)).collect();
    let at = |id: &str| index.get(id).copied().unwrap_or(NONE);
    let new: Vec<u32> = owners.iter().map(|o| at(o)).collect();
    let candidates = |p: usize| {
        let old = input.partitions[p].owner.as_deref().map_or(NONE, at);
        let moved = (old != new[p]).then_some(old);
        let current = shown.followers.get(p).into_iter().flatten().map(|f| at(f));
        moved.into_iter().chain(current).collect::<Vec<u32>>()
    };
    place_followers(input.nodes.len(), &new, shown.replicas as usize, candidates, |_| false)
}

/// Times one kind at size `n`.
pub(crate) fn measure(
    host: &Host,
    name: &Arc<str>,
    compiled: &Compiled,
    kind: Kind,
    args: &CheckArgs<'_>,
    n: usize,
) -> CallRow {
    let limits = CallLimits::default();
    let params: serde_json::Value = serde_json::from_str(args.params).unwrap_or_default();
    match kind {
        Kind::Retention => {
            let input = retention_input(n);
            let (r, wasm) = time(args.calls, || host.call(name, compiled, kind, args.params, &input, limits));
            let native = native_retention(&params, n);
            let (_, native_ns) = time(args.calls, || native.decide(&input));
            let r = r.and_then(|d| checked(validate_retention(name, &input, &d), d));
            row(kind, n, wasm, native_ns, r.map(|d: RetentionDecision| format!("{d:?}")))
        }
        Kind::Compaction => {
            let input = compaction_input(n);
            let (r, wasm) = time(args.calls, || host.call(name, compiled, kind, args.params, &input, limits));
            let native = native_compaction(&params);
            let (_, native_ns) = time(args.calls, || native.decide(&input));
            let r = r.and_then(|d| checked(validate_compaction(name, &input, &d), d));
            row(kind, n, wasm, native_ns, r.map(|d| format!("removes {} of {n}", d.remove.len())))
        }
        Kind::Balance => balance_row(host, name, compiled, args, n.min(BALANCE_PARTITIONS), 1),
    }
}

/// Times one round of [`ROUND_CHANNELS`] channels (None for balance or a failed call).
pub(crate) fn round(
    host: &Host,
    name: &Arc<str>,
    compiled: &Compiled,
    kind: Kind,
    args: &CheckArgs<'_>,
) -> Option<RoundRow> {
    let limits = CallLimits::default();
    let params: serde_json::Value = serde_json::from_str(args.params).unwrap_or_default();
    fn run<I: crate::host::PolicyInput>(
        host: &Host,
        name: &Arc<str>,
        compiled: &Compiled,
        kind: Kind,
        params: &str,
        inputs: &[I],
        limits: CallLimits,
    ) -> Result<usize, CallError> {
        let refs: Vec<&I> = inputs.iter().collect();
        if Host::batches(compiled, refs[0]) {
            host.call_many(name, compiled, kind, params, &refs, limits).map(|_| 1)
        } else {
            refs.iter().try_for_each(|i| host.call(name, compiled, kind, params, *i, limits).map(|_| ()))?;
            Ok(refs.len())
        }
    }
    let (calls, wasm_ns, native_ns) = match kind {
        Kind::Retention => {
            let inputs: Vec<RetentionInput> = (0..ROUND_CHANNELS).map(|_| retention_input(ROUND_MESSAGES)).collect();
            let (r, wasm) = time(args.calls, || run(host, name, compiled, kind, args.params, &inputs, limits));
            let native = native_retention(&params, ROUND_MESSAGES);
            let (_, native_ns) = time(args.calls, || inputs.iter().map(|i| native.decide(i)).collect::<Vec<_>>());
            (r.ok()?, wasm, native_ns)
        }
        Kind::Compaction => {
            let inputs: Vec<CompactionInput> = (0..ROUND_CHANNELS).map(|_| compaction_input(ROUND_MESSAGES)).collect();
            let (r, wasm) = time(args.calls, || run(host, name, compiled, kind, args.params, &inputs, limits));
            let native = native_compaction(&params);
            let (_, native_ns) = time(args.calls, || inputs.iter().map(|i| native.decide(i)).collect::<Vec<_>>());
            (r.ok()?, wasm, native_ns)
        }
        Kind::Balance => return None,
    };
    Some(RoundRow {
        kind,
        channels: ROUND_CHANNELS,
        n: ROUND_MESSAGES,
        wasm_calls: calls,
        wasm_ns,
        per_channel_ns: wasm_ns / ROUND_CHANNELS as u64,
        native_ns,
    })
}

/// Median ns of a call of `kind` on an empty input.
pub(crate) fn fixed(host: &Host, name: &Arc<str>, compiled: &Compiled, kind: Kind, args: &CheckArgs<'_>) -> u64 {
    let limits = CallLimits::default();
    match kind {
        Kind::Retention => {
            time(args.calls, || host.call(name, compiled, kind, args.params, &retention_input(0), limits)).1
        }
        Kind::Compaction => {
            time(args.calls, || host.call(name, compiled, kind, args.params, &compaction_input(0), limits)).1
        }
        Kind::Balance => {
            let (input, one) = (balance_input(0), ReplicaInput { replicas: 1, followers: Vec::new() });
            time(args.calls, || host.balance(name, compiled, args.params, &input, &one, limits)).1
        }
    }
}

pub(crate) fn us(ns: u64) -> String {
    format!("{:.1} µs", ns as f64 / 1e3)
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
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "file": args.file.display().to_string(), "refused": e.to_string() })
                );
            } else {
                println!("REFUSED {}: {e}", args.file.display());
            }
            return false;
        }
    };
    let compile = started.elapsed();
    let name: Arc<str> = args.file.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin").into();
    if !args.json {
        println!("plugin {name}: ABI v{}, sha256 {}, compiled in {compile:?}", compiled.abi, compiled.sha256);
        println!("kinds: {}", compiled.kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "));
        // The router's default limits, so a plugin that passes here also fits there.
        let limits = CallLimits::default();
        println!(
            "limits: {:?} per call, {} MiB memory (the router's defaults); median of {} calls",
            limits.timeout,
            limits.max_memory >> 20,
            args.calls.max(1)
        );
    }
    let mut report = Report {
        plugin: name.to_string(),
        abi: compiled.abi,
        kinds: compiled.kinds.clone(),
        sha256: compiled.sha256.clone(),
        compile_ns: compile.as_nanos() as u64,
        fixed: Vec::new(),
        calls: Vec::new(),
        rounds: Vec::new(),
    };
    for &kind in &compiled.kinds {
        let wasm_ns = fixed(&host, &name, &compiled, kind, &args);
        if !args.json {
            println!("  {} fixed cost (empty input): {} per call", kind.as_str(), us(wasm_ns));
        }
        report.fixed.push(Fixed { kind, wasm_ns });
        for n in SIZES {
            let r = measure(&host, &name, &compiled, kind, &args, n);
            if !args.json {
                match r.failed {
                    None => println!(
                        "  {} n={}{}: {}; {} per call{} (native built-in: {})",
                        kind.as_str(),
                        r.n,
                        if kind == Kind::Balance { format!(" x {BALANCE_NODES} nodes") } else { String::new() },
                        r.decisions,
                        us(r.wasm_ns),
                        r.cold_ns.map(|c| format!(", {} encoded from scratch", us(c))).unwrap_or_default(),
                        us(r.native_ns)
                    ),
                    Some(reason) => println!("  {} n={}: FAILED ({reason}): {}", kind.as_str(), r.n, r.decisions),
                }
            }
            report.calls.push(r);
        }
        if let Some(r) = round(&host, &name, &compiled, kind, &args) {
            if !args.json {
                println!(
                    "  {} round of {} channels x {} messages: {} call(s), {} ({} per channel; native built-in: {})",
                    kind.as_str(),
                    r.channels,
                    r.n,
                    r.wasm_calls,
                    us(r.wasm_ns),
                    us(r.per_channel_ns),
                    us(r.native_ns)
                );
            }
            report.rounds.push(r);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("a report serializes"));
    }
    report.calls.iter().all(|r| r.failed.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_report_has_every_size_of_every_kind() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("good.wasm");
        std::fs::write(&file, crate::test_modules::module("", crate::test_modules::GOOD)).unwrap();
        // The test module's one page of memory cannot take the 10,000-message input: the
        // check reports that row as failed, and so fails.
        let args = CheckArgs { file: &file, params: "{}", calls: 1, json: true };
        assert!(!run(args));
        let host = Host::new(None).unwrap();
        let compiled = load_file(&host, &file).unwrap();
        let name: Arc<str> = Arc::from("good");
        let args = CheckArgs { file: &file, params: r#"{"count":3}"#, calls: 1, json: true };
        let r = measure(&host, &name, &compiled, Kind::Retention, &args, 100);
        assert_eq!((r.n, r.failed, r.decisions.as_str()), (100, None, "DropBelow(5)"));
        let json = serde_json::to_value(&r).unwrap();
        let big = measure(&host, &name, &compiled, Kind::Retention, &args, 10_000);
        assert_eq!(big.failed, Some("out_of_bounds"), "{big:?}");
        for key in ["kind", "n", "wasm_ns", "native_ns", "decisions"] {
            assert!(json.get(key).is_some(), "{key} in {json}");
        }
    }
}

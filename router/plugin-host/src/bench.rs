//! `switchyard plugin bench V1.wasm V2.wasm`: the ABI v1 and v2 builds of one policy, side
//! by side on the same generated inputs.
//!
//! It owns the comparison table: for every kind both modules export, the fixed cost, the
//! `plugin check` sizes (n = 100, 1,000, 10,000 messages; balance at 100, 1,000 and 4,096
//! partitions of 100 nodes), the maintenance round of 100 channels × 100 messages, and for
//! balance also 4,096 × 100 with two copies per partition; each with the median time per
//! call of either build, the native built-in, and whether both builds decided alike. It
//! reuses `check`'s inputs and timing, so the figures are comparable with `plugin check`.
//! It is a program that prints figures, not a timed test; it must never touch a data dir
//! or a running node.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::check::{self, CheckArgs, BALANCE_NODES, BALANCE_PARTITIONS, SIZES};
use crate::host::{load_file, Compiled, Host, Kind};

/// What to compare.
pub struct BenchArgs<'a> {
    /// The ABI v1 build.
    pub v1: &'a Path,
    /// The ABI v2 build of the same policy.
    pub v2: &'a Path,
    /// Params JSON object text (both builds get the same).
    pub params: &'a str,
    /// Calls per case (the median is reported).
    pub calls: u32,
    /// Print one JSON object instead of the table.
    pub json: bool,
}

/// One module of the comparison.
#[derive(Debug, Serialize)]
pub struct Side {
    /// File name stem.
    pub plugin: String,
    /// ABI version of the module.
    pub abi: u32,
    /// sha256 of the file.
    pub sha256: String,
}

/// One case, both builds.
#[derive(Debug, Serialize)]
pub struct BenchRow {
    /// Kind.
    pub kind: Kind,
    /// The case: `fixed`, `n=…`, `round 100x100`, `4096x100 r=2`.
    pub case: String,
    /// Median ns per call (per round) of the v1 build.
    pub v1_ns: u64,
    /// Median ns per call (per round) of the v2 build.
    pub v2_ns: u64,
    /// Balance: the v2 build with its input encoded from scratch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub v2_cold_ns: Option<u64>,
    /// Median ns of the native built-in on the same input (None for the fixed cost).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_ns: Option<u64>,
    /// `v1_ns / v2_ns`.
    pub speedup: f64,
    /// Both builds' decisions summarised alike (and neither failed).
    pub same_decisions: bool,
    /// The v1 build's decision summary (or its failure).
    pub v1_decisions: String,
    /// The v2 build's decision summary (or its failure).
    pub v2_decisions: String,
}

/// The whole comparison (`--json` prints it as is).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The v1 build.
    pub v1: Side,
    /// The v2 build.
    pub v2: Side,
    /// Calls per case.
    pub calls: u32,
    /// One row per kind and case.
    pub rows: Vec<BenchRow>,
}

fn row(kind: Kind, case: String, a: &check::CallRow, b: &check::CallRow) -> BenchRow {
    BenchRow {
        kind,
        case,
        v1_ns: a.wasm_ns,
        v2_ns: b.wasm_ns,
        v2_cold_ns: b.cold_ns,
        native_ns: Some(b.native_ns),
        speedup: a.wasm_ns as f64 / b.wasm_ns.max(1) as f64,
        same_decisions: a.failed.is_none() && b.failed.is_none() && same(&a.decisions, &b.decisions),
        v1_decisions: a.decisions.clone(),
        v2_decisions: b.decisions.clone(),
    }
}

/// Summaries agree; a v1 balancer leaves followers to the router, which is not a
/// difference of its owners.
fn same(a: &str, b: &str) -> bool {
    let owners = |s: &str| s.split(" changed").next().unwrap_or(s).to_string();
    a == b || owners(a) == owners(b)
}

/// Runs the comparison; false when a module is refused, the two are the same ABI, or a
/// call fails.
pub fn run(args: BenchArgs<'_>) -> bool {
    let host = match Host::new(None) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("cannot start the wasm engine: {e:#}");
            return false;
        }
    };
    let mut loaded = Vec::new();
    for file in [args.v1, args.v2] {
        match load_file(&host, file) {
            Ok(c) => loaded.push(c),
            Err(e) => {
                eprintln!("REFUSED {}: {e}", file.display());
                return false;
            }
        }
    }
    let (c2, c1) = (loaded.pop().expect("two"), loaded.pop().expect("two"));
    if (c1.abi, c2.abi) != (1, 2) {
        eprintln!("expected an ABI v1 and an ABI v2 build; got v{} and v{}", c1.abi, c2.abi);
        return false;
    }
    let name = |p: &Path| -> Arc<str> { p.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin").into() };
    let (n1, n2) = (name(args.v1), name(args.v2));
    let check_args = |file| CheckArgs { file, params: args.params, calls: args.calls, json: true };
    let (a1, a2) = (check_args(args.v1), check_args(args.v2));
    let side = |n: &Arc<str>, c: &Compiled| Side { plugin: n.to_string(), abi: c.abi, sha256: c.sha256.clone() };
    let mut report = BenchReport { v1: side(&n1, &c1), v2: side(&n2, &c2), calls: args.calls.max(1), rows: Vec::new() };
    let kinds: Vec<Kind> = c1.kinds.iter().copied().filter(|k| c2.kinds.contains(k)).collect();
    if kinds.is_empty() {
        eprintln!("the two modules export no kind in common");
        return false;
    }
    for &kind in &kinds {
        let (f1, f2) = (check::fixed(&host, &n1, &c1, kind, &a1), check::fixed(&host, &n2, &c2, kind, &a2));
        report.rows.push(BenchRow {
            kind,
            case: "fixed".into(),
            v1_ns: f1,
            v2_ns: f2,
            v2_cold_ns: None,
            native_ns: None,
            speedup: f1 as f64 / f2.max(1) as f64,
            same_decisions: true,
            v1_decisions: String::new(),
            v2_decisions: String::new(),
        });
        for n in SIZES {
            let (r1, r2) =
                (check::measure(&host, &n1, &c1, kind, &a1, n), check::measure(&host, &n2, &c2, kind, &a2, n));
            let case = match kind {
                Kind::Balance => format!("{}x{BALANCE_NODES}", r1.n),
                _ => format!("n={}", r1.n),
            };
            report.rows.push(row(kind, case, &r1, &r2));
        }
        match kind {
            Kind::Balance => {
                let r1 = check::balance_row(&host, &n1, &c1, &a1, BALANCE_PARTITIONS, 2);
                let r2 = check::balance_row(&host, &n2, &c2, &a2, BALANCE_PARTITIONS, 2);
                report.rows.push(row(kind, format!("{BALANCE_PARTITIONS}x{BALANCE_NODES} r=2"), &r1, &r2));
            }
            _ => {
                let (r1, r2) = (check::round(&host, &n1, &c1, kind, &a1), check::round(&host, &n2, &c2, kind, &a2));
                if let (Some(r1), Some(r2)) = (r1, r2) {
                    report.rows.push(BenchRow {
                        kind,
                        case: format!("round {}x{} ({} vs {} calls)", r1.channels, r1.n, r1.wasm_calls, r2.wasm_calls),
                        v1_ns: r1.wasm_ns,
                        v2_ns: r2.wasm_ns,
                        v2_cold_ns: None,
                        native_ns: Some(r2.native_ns),
                        speedup: r1.wasm_ns as f64 / r2.wasm_ns.max(1) as f64,
                        same_decisions: true,
                        v1_decisions: format!("{} calls", r1.wasm_calls),
                        v2_decisions: format!("{} calls", r2.wasm_calls),
                    });
                }
            }
        }
    }
    let ok = report.rows.iter().all(|r| r.same_decisions);
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("a report serializes"));
        return ok;
    }
    println!(
        "v1: {} (sha256 {}); v2: {} (sha256 {}); median of {} calls",
        report.v1.plugin,
        &report.v1.sha256[..12],
        report.v2.plugin,
        &report.v2.sha256[..12],
        report.calls
    );
    println!(
        "{:<11} {:<28} {:>11} {:>11} {:>13} {:>11} {:>7}  same",
        "kind", "case", "v1", "v2", "v2 cold", "native", "v1/v2"
    );
    for r in &report.rows {
        let opt = |x: Option<u64>| x.map(check::us).unwrap_or_else(|| "-".into());
        println!(
            "{:<11} {:<28} {:>11} {:>11} {:>13} {:>11} {:>6.1}x  {}",
            r.kind.as_str(),
            r.case,
            check::us(r.v1_ns),
            check::us(r.v2_ns),
            opt(r.v2_cold_ns),
            opt(r.native_ns),
            r.speedup,
            if r.same_decisions { "yes" } else { "NO" }
        );
        if !r.same_decisions {
            println!("    v1: {}\n    v2: {}", r.v1_decisions, r.v2_decisions);
        }
    }
    ok
}

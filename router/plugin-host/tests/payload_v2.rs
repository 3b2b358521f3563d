//! ABI v2 lazy payload reads (`switchyard.payload`), through the real wasmtime host.
//!
//! It owns the tests of the payload import: a v2 guest reads a message's stored payload by
//! its call-wide index and decides on it (`tests/plugins/wat/drop-marked.wat`, a WAT
//! compaction plugin that removes messages whose payload contains `DROP`, and its Rust twin
//! `tests/plugins/drop-marked` through the SDK's `ChannelView::payload`); payloads are
//! read only when the guest asks (never up front); a message removed from the store after
//! the round's input was built reads as -1 and the call still succeeds; an out-of-range
//! index, a negative cap or a destination outside memory is an `out_of_bounds` failure that
//! falls back to the built-in policy and counts toward quarantine. The payload source is an
//! in-memory stand-in for the store (the store-backed one is tested in switchyard-core's
//! maintenance module). It must never depend on timing beyond the call deadline.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_core::policy::{CompactionPolicy, KeyedCompaction, Payloads};
use switchyard_metrics::Metrics;
use switchyard_plugin_host::host::{CallError, CallLimits, Compiled, Host, Kind};
use switchyard_plugin_host::registry::{Fallback, Registry};
use switchyard_sdk::{CompactionDecision, CompactionInput, MessageMeta};

use common::{bound_compaction as bound, built, registry_in, repo};

fn limits() -> CallLimits {
    CallLimits { timeout: Duration::from_millis(500), max_memory: 2 << 20 }
}

/// A stand-in for the store: payloads by (channel, offset), removable, reads counted.
#[derive(Default)]
struct Stored {
    payloads: Mutex<HashMap<(String, u64), String>>,
    reads: AtomicUsize,
}

impl Stored {
    fn put(&self, channel: &str, offset: u64, payload: &str) {
        self.payloads.lock().unwrap().insert((channel.into(), offset), payload.into());
    }

    fn remove(&self, channel: &str, offset: u64) {
        self.payloads.lock().unwrap().remove(&(channel.to_string(), offset));
    }

    fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }
}

impl Payloads for Stored {
    fn payload(&self, channel: &str, offset: u64) -> Option<String> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.payloads.lock().unwrap().get(&(channel.to_string(), offset)).cloned()
    }
}

/// A compaction window of `payloads.len()` keyed messages at offsets 10, 11, ..., each
/// stored in `stored` with its payload (None: never stored).
fn window(stored: &Stored, channel: &str, payloads: &[Option<&str>]) -> CompactionInput {
    let window = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let offset = 10 + i as u64;
            if let Some(p) = p {
                stored.put(channel, offset, p);
            }
            MessageMeta { offset, ts: 1_000 + i as u64, size: 64, key: Some(format!("k{i}")), tombstone: false }
        })
        .collect();
    CompactionInput { channel: channel.into(), window, now_ms: 5_000 }
}

fn drop_marked() -> Vec<u8> {
    let text = std::fs::read_to_string(repo().join("tests/plugins/wat/drop-marked.wat")).unwrap();
    wat::parse_str(&text).expect("valid wat")
}

fn source(stored: &Arc<Stored>) -> Arc<dyn Payloads> {
    stored.clone()
}

fn decide(
    host: &Host,
    compiled: &Compiled,
    inputs: &[&CompactionInput],
    payloads: Option<&Arc<dyn Payloads>>,
) -> Result<Vec<Vec<u64>>, CallError> {
    let name: Arc<str> = Arc::from("p");
    let ds: Vec<CompactionDecision> =
        host.call_many_with(&name, compiled, Kind::Compaction, "{}", inputs, limits(), payloads)?;
    Ok(ds.into_iter().map(|d| d.remove).collect())
}

#[test]
fn a_guest_decides_on_payloads_read_by_index() {
    let host = Host::new(None).unwrap();
    let compiled = host.load(&drop_marked()).unwrap();
    assert_eq!((compiled.abi, compiled.kinds.as_slice()), (2, &[Kind::Compaction][..]));
    let stored = Arc::new(Stored::default());
    let a = window(&stored, "kv:a", &[Some(r#"{"n":1}"#), Some(r#"{"note":"DROP me"}"#), Some("2"), Some(r#""DROP""#)]);
    let b = window(&stored, "kv:b", &[Some(r#"{"n":1}"#), Some(r#"{"note":"drop"}"#), Some(r#"["DROP"]"#)]);
    // The same metadata with other payloads gets other decisions: they come from payloads.
    let got = decide(&host, &compiled, &[&a, &b], Some(&source(&stored))).unwrap();
    assert_eq!(got, vec![vec![11, 13], vec![12]]);
    assert_eq!(stored.reads(), 7, "each payload read once, when the guest asked");
    stored.put("kv:a", 10, "DROP");
    stored.put("kv:a", 11, "keep");
    let got = decide(&host, &compiled, &[&a, &b], Some(&source(&stored))).unwrap();
    assert_eq!(got, vec![vec![10, 13], vec![12]]);
    // Without a payload source every read is -1: nothing is marked.
    assert_eq!(decide(&host, &compiled, &[&a, &b], None).unwrap(), vec![Vec::<u64>::new(), vec![]]);
}

/// A v2 compaction module importing `switchyard.payload` as `$payload`, with `body` as its
/// entry point. Data at 128: an answer for 3 messages removing the first; at 192: the same
/// keeping all.
fn payload_module(body: &str) -> Vec<u8> {
    common::v2_module(
        r#"(import "switchyard" "payload" (func $payload (param i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 128) "\00\00\00\00\01\00\00\00\00\00\00\00\03\00\00\00\18\00\00\00\01\00\00\00\01")
           (data (i32.const 192) "\00\00\00\00\01\00\00\00\00\00\00\00\03\00\00\00\18\00\00\00\01\00\00\00\00")"#,
        "switchyard_compaction",
        body,
    )
}

/// `(ptr << 32) | len` of the 25 answer bytes at `ptr`.
fn out(ptr: u64) -> String {
    format!("(i64.const {})", (ptr << 32) | 25)
}

/// Removes message 0 when `test` (an i32 condition) holds, else keeps all.
fn if_then_remove_first(test: &str) -> Vec<u8> {
    payload_module(&format!("(if (result i64) {test} (then {}) (else {}))", out(128), out(192)))
}

#[test]
fn payloads_are_read_only_when_the_guest_asks() {
    let host = Host::new(None).unwrap();
    let stored = Arc::new(Stored::default());
    let input = window(&stored, "kv:a", &[Some("1"), Some("2"), Some("3")]);
    let keeps_all = host.load(&payload_module(&out(192))).unwrap();
    assert_eq!(decide(&host, &keeps_all, &[&input], Some(&source(&stored))).unwrap(), vec![Vec::<u64>::new()]);
    assert_eq!(stored.reads(), 0, "nothing is copied up front");
    // A short buffer gets a prefix and the full length; asking again (with room) reads
    // the same bytes without a second store read.
    stored.put("kv:a", 11, r#"{"long":"payload"}"#);
    let test = r#"(i32.and
        (i32.and (i32.eq (call $payload (i32.const 1) (i32.const 1024) (i32.const 2)) (i32.const 18))
                 (i32.eqz (i32.load8_u (i32.const 1026))))
        (i32.and (i32.eq (call $payload (i32.const 1) (i32.const 2048) (i32.const 64)) (i32.const 18))
                 (i32.eq (i32.load8_u (i32.const 2065)) (i32.const 125))))"#;
    let prefix = host.load(&if_then_remove_first(test)).unwrap();
    assert_eq!(decide(&host, &prefix, &[&input], Some(&source(&stored))).unwrap(), vec![vec![10]]);
    assert_eq!(stored.reads(), 1, "the second read of the same message is not a store read");
}

#[test]
fn a_message_removed_after_the_input_was_built_reads_minus_one() {
    let host = Host::new(None).unwrap();
    let stored = Arc::new(Stored::default());
    let input = window(&stored, "kv:a", &[Some("1"), Some("DROP"), Some("3")]);
    // Retention (or compaction) removes offset 11 after the round's input was built.
    stored.remove("kv:a", 11);
    let gone = host
        .load(&if_then_remove_first(
            "(i32.eq (call $payload (i32.const 1) (i32.const 1024) (i32.const 64)) (i32.const -1))",
        ))
        .unwrap();
    assert_eq!(decide(&host, &gone, &[&input], Some(&source(&stored))).unwrap(), vec![vec![10]]);
    // drop-marked keeps what it cannot read; the call succeeds.
    let compiled = host.load(&drop_marked()).unwrap();
    assert_eq!(decide(&host, &compiled, &[&input], Some(&source(&stored))).unwrap(), vec![Vec::<u64>::new()]);
    // A call without a payload source reads -1 too.
    let name: Arc<str> = Arc::from("p");
    let d: CompactionDecision = host.call(&name, &gone, Kind::Compaction, "{}", &input, limits()).unwrap();
    assert_eq!(d.remove, vec![10]);
}

/// Hostile reads (each an `out_of_bounds` failure) for a call of `m` messages.
fn hostile_cases(m: i32) -> Vec<(&'static str, Vec<u8>)> {
    let read = |index: i32, ptr: i32, cap: i32| {
        payload_module(&format!(
            "(drop (call $payload (i32.const {index}) (i32.const {ptr}) (i32.const {cap}))) {}",
            out(192)
        ))
    };
    vec![
        ("payload index out of range", read(m, 1024, 16)),
        ("negative payload index", read(-1, 1024, 16)),
        ("huge payload index", read(i32::MAX, 1024, 16)),
        ("negative cap", read(0, 1024, -1)),
        ("payload written outside memory", read(0, 65534, 16)),
    ]
}

#[test]
fn hostile_payload_reads_are_out_of_bounds() {
    let host = Host::new(None).unwrap();
    let stored = Arc::new(Stored::default());
    let input = window(&stored, "kv:a", &[Some(r#"{"a":"some payload"}"#), Some("2"), Some("3")]);
    for (what, bytes) in hostile_cases(3) {
        let compiled = host.load(&bytes).unwrap();
        let err = decide(&host, &compiled, &[&input], Some(&source(&stored))).expect_err(what);
        assert_eq!(err.reason(), "out_of_bounds", "{what}: {err}");
        // Without a payload source the arguments are checked all the same.
        if what != "payload written outside memory" {
            let err = decide(&host, &compiled, &[&input], None).expect_err(what);
            assert_eq!(err.reason(), "out_of_bounds", "{what} (no source): {err}");
        }
    }
    // `switchyard.payload` is a v2 import only.
    let v1 = wat::parse_str(
        r#"(module
            (import "switchyard" "payload" (func (param i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "switchyard_abi_v1"))
            (func (export "switchyard_alloc") (param i32) (result i32) (i32.const 0))
            (func (export "switchyard_compaction") (param i32 i32) (result i64) (i64.const 0)))"#,
    )
    .unwrap();
    assert!(host.load(&v1).is_err(), "a v1 module may not import switchyard.payload");
}

fn registry_with(name: &str, bytes: &[u8]) -> (tempfile::TempDir, Arc<Registry>, Arc<Metrics>) {
    registry_in(&[(name, bytes)], limits())
}

/// Through the registry and the bound policy: `decide_many_with` gives the guest the
/// round's payloads (one call for all channels); `decide_many` gives it none.
#[test]
fn a_bound_plugin_reads_the_payloads_of_its_round() {
    let (_dir, registry, metrics) = registry_with("dm", &drop_marked());
    let builtin = KeyedCompaction { window_ms: None, tombstone_delay_ms: 0 };
    let policy = bound(&registry, "dm", &builtin);
    let stored = Arc::new(Stored::default());
    let inputs = vec![
        window(&stored, "kv:a", &[Some("DROP"), Some("1")]),
        window(&stored, "kv:b", &[Some("1"), Some("[\"DROP\"]"), Some("DROP")]),
    ];
    stored.remove("kv:b", 12);
    let got: Vec<Vec<u64>> =
        policy.decide_many_with(&inputs, &source(&stored)).into_iter().map(|d| d.unwrap().remove).collect();
    assert_eq!(got, vec![vec![10], vec![11]]);
    let got: Vec<Vec<u64>> = policy.decide_many(&inputs).into_iter().map(|d| d.unwrap().remove).collect();
    assert_eq!(got, vec![Vec::<u64>::new(), vec![]]);
    // One input alone goes through the single-call path, with its payloads too.
    let got = policy.decide_many_with(&inputs[..1], &source(&stored));
    assert_eq!(got.into_iter().map(|d| d.unwrap().remove).collect::<Vec<_>>(), vec![vec![10]]);
    assert_eq!(metrics.plugin_calls.with_label_values(&["dm", "compaction"]).get(), 3);
}

/// Each hostile read gives the built-in decision for the round, is counted as
/// `out_of_bounds`, and the plugin is quarantined after `quarantine_after` failures.
#[test]
fn hostile_payload_reads_fall_back_and_are_quarantined() {
    let builtin = KeyedCompaction { window_ms: None, tombstone_delay_ms: 0 };
    // Two channels of three messages in one call: indices 0..6.
    for (what, bytes) in hostile_cases(6) {
        let (_dir, registry, metrics) = registry_with("h", &bytes);
        let policy = bound(&registry, "h", &builtin);
        let stored = Arc::new(Stored::default());
        let mut input = window(&stored, "kv:a", &[Some(r#""a longer payload""#), Some("2"), Some("3")]);
        // Keys that the built-in compacts: k, k, k keeps only the last.
        input.window.iter_mut().for_each(|m| m.key = Some("k".into()));
        let inputs = vec![input.clone(), input];
        let expected = builtin.decide(&inputs[0]).unwrap();
        assert_eq!(expected.remove, vec![10, 11]);
        for round in 0..3 {
            let got = policy.decide_many_with(&inputs, &source(&stored));
            for d in got {
                assert_eq!(d.unwrap(), expected, "{what}: round {round} uses the built-in");
            }
        }
        assert_eq!(metrics.plugin_failures.with_label_values(&["h", "compaction", "out_of_bounds"]).get(), 2, "{what}");
        let row = registry.list().into_iter().next().unwrap();
        assert_eq!((row.state, row.calls, row.failures), ("quarantined", 2, 2), "{what}");
        let again = registry.call("h", "kv/compaction", Kind::Compaction, "{}", &inputs[0], |_| Ok(()));
        assert!(matches!(again, Err(Fallback::Quarantined)), "{what}");
    }
}

/// The Rust build (SDK glue: `ChannelView::payload`, which reads into a buffer of the
/// record's `size` and again when the payload is longer) decides as the WAT one does.
#[test]
fn the_rust_and_wat_builds_decide_alike() {
    let host = Host::new(None).unwrap();
    let wat_build = host.load(&drop_marked()).unwrap();
    let rust_build = host.load(&built("tests/plugins/dist/drop-marked.wasm")).unwrap();
    assert_eq!((rust_build.abi, rust_build.kinds.as_slice()), (2, &[Kind::Compaction][..]));
    let stored = Arc::new(Stored::default());
    // Records say 64 bytes: the long payloads need the SDK's second read.
    let long_marked = format!(r#"{{"pad":"{}","x":"DROP"}}"#, "p".repeat(300));
    let long_plain = format!(r#"{{"pad":"{}"}}"#, "q".repeat(300));
    let a = window(&stored, "kv:a", &[Some(&long_marked), Some("1"), Some(r#""DROP""#), Some(&long_plain), None]);
    let b = window(&stored, "kv:b", &[Some("null"), Some(r#"{"DROP":1}"#), Some(r#""gone DROP""#)]);
    stored.remove("kv:b", 12);
    let expected = vec![vec![10, 12], vec![11]];
    assert_eq!(decide(&host, &wat_build, &[&a, &b], Some(&source(&stored))).unwrap(), expected);
    let before = stored.reads();
    assert_eq!(decide(&host, &rust_build, &[&a, &b], Some(&source(&stored))).unwrap(), expected);
    assert_eq!(stored.reads() - before, 8, "one store read per message, the long ones included");
    // A bound Rust build with params: another marker.
    let name: Arc<str> = Arc::from("p");
    let ds: Vec<CompactionDecision> = host
        .call_many_with(
            &name,
            &rust_build,
            Kind::Compaction,
            r#"{"marker":"pad"}"#,
            &[&a, &b],
            limits(),
            Some(&source(&stored)),
        )
        .unwrap();
    assert_eq!(ds.into_iter().map(|d| d.remove).collect::<Vec<_>>(), vec![vec![10, 13], vec![]]);
}

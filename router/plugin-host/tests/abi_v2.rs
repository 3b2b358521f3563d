//! ABI v2 against v1 and against hostile modules, through the real wasmtime host.
//!
//! - The v1 and v2 builds of the same policy (`tests/plugins/dist/*-v1.wasm` and
//!   `plugins/dist/*.wasm`, both from `scripts/build-plugins.sh`) make identical decisions,
//!   equal to the router's built-in policy, on generated inputs.
//! - Hostile v2 modules (hand-written WAT) fail with the right reason, fall back to the
//!   built-in policy for the round and count toward quarantine, exactly as v1 modules do.
//! - The WAT plugin `tests/plugins/wat/keep-last.wat` (a second guest language) loads and
//!   agrees with the Rust `keep-last`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use switchyard_core::policy::{CompactionPolicy, KeyedCompaction, LimitsRetention, RetentionPolicy};
use switchyard_metrics::Metrics;
use switchyard_plugin_host::host::{CallError, CallLimits, Compiled, Host, Kind};
use switchyard_plugin_host::registry::{Fallback, Registry};
use switchyard_sdk::{
    ChannelStats, CompactionDecision, CompactionInput, MessageMeta, RetentionDecision, RetentionInput,
};

use common::{bound_compaction, built, registry_in, repo, small_limits};

fn limits() -> CallLimits {
    CallLimits { timeout: Duration::from_millis(500), max_memory: 32 << 20 }
}

fn load(host: &Arc<Host>, bytes: &[u8]) -> Compiled {
    host.load(bytes).expect("loads")
}

/// The host and the v1/v2 builds of latest-per-key and keep-last, compiled once.
struct Builds {
    host: Arc<Host>,
    lpk_v1: Compiled,
    lpk_v2: Compiled,
    kl_v1: Compiled,
    kl_v2: Compiled,
}

fn builds() -> &'static Builds {
    static BUILDS: std::sync::OnceLock<Builds> = std::sync::OnceLock::new();
    BUILDS.get_or_init(|| {
        let host = Host::new(None).unwrap();
        Builds {
            lpk_v1: load(&host, &built("tests/plugins/dist/latest-per-key-v1.wasm")),
            lpk_v2: load(&host, &built("plugins/dist/latest-per-key.wasm")),
            kl_v1: load(&host, &built("tests/plugins/dist/keep-last-v1.wasm")),
            kl_v2: load(&host, &built("plugins/dist/keep-last.wasm")),
            host,
        }
    })
}

fn metas(specs: &[(u8, u16, bool)]) -> Vec<MessageMeta> {
    specs
        .iter()
        .enumerate()
        .map(|(i, &(key, dt, tombstone))| MessageMeta {
            offset: 10 + 2 * i as u64,
            ts: 1_000 + 7 * i as u64 + dt as u64,
            size: 50 + key as u32,
            // Key 0 stands for "unkeyed" (a retention input may mix them).
            key: (key != 0).then(|| format!("key-{key}")),
            tombstone,
        })
        .collect()
}

#[test]
fn v1_and_v2_modules_both_load_with_their_abi() {
    let host = Host::new(None).unwrap();
    for (path, abi, kind) in [
        ("plugins/dist/keep-last.wasm", 2, Kind::Retention),
        ("plugins/dist/latest-per-key.wasm", 2, Kind::Compaction),
        ("plugins/dist/even-spread.wasm", 2, Kind::Balance),
        ("tests/plugins/dist/keep-last-v1.wasm", 1, Kind::Retention),
        ("tests/plugins/dist/latest-per-key-v1.wasm", 1, Kind::Compaction),
    ] {
        let c = load(&host, &built(path));
        assert_eq!((c.abi, c.kinds.as_slice()), (abi, &[kind][..]), "{path}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// latest-per-key: v1 build == v2 build == the built-in `KeyedCompaction`.
    #[test]
    fn latest_per_key_v1_and_v2_decide_alike(
        specs in proptest::collection::vec((1u8..12, 0u16..40, proptest::bool::weighted(0.2)), 0..300),
        window_ms in proptest::option::of(0u64..30),
        delay in 0u64..3_000,
        now_back in 0u64..2_000,
    ) {
        let Builds { host, lpk_v1: v1, lpk_v2: v2, .. } = builds();
        let window = metas(&specs);
        let now_ms = window.last().map_or(0, |m| m.ts) + 2_000 - now_back;
        let input = CompactionInput { channel: "kv:x".into(), window, now_ms };
        let params = match window_ms {
            Some(w) => format!(r#"{{"window_ms":{w},"tombstone_delay_ms":{delay}}}"#),
            None => format!(r#"{{"tombstone_delay_ms":{delay}}}"#),
        };
        let name: Arc<str> = Arc::from("p");
        let a: CompactionDecision = host.call(&name, v1, Kind::Compaction, &params, &input, limits()).unwrap();
        let b: CompactionDecision = host.call(&name, v2, Kind::Compaction, &params, &input, limits()).unwrap();
        let native = KeyedCompaction { window_ms, tombstone_delay_ms: delay }.decide(&input).unwrap();
        prop_assert_eq!(&a.remove, &b.remove);
        prop_assert_eq!(&a.remove, &native.remove);
    }

    /// keep-last: v1 build == v2 build == the built-in count limit.
    #[test]
    fn keep_last_v1_and_v2_decide_alike(
        specs in proptest::collection::vec((0u8..5, 0u16..10, any::<bool>()), 0..200),
        extra in 0u64..500,
        count in 0u64..400,
    ) {
        let Builds { host, kl_v1: v1, kl_v2: v2, .. } = builds();
        let oldest = metas(&specs);
        let total = oldest.len() as u64 + extra;
        let input = RetentionInput {
            channel: "kl:x".into(),
            stats: ChannelStats { first_offset: 10, last_offset: 10 + 2 * total, count: total, bytes: 60 * total },
            oldest,
            now_ms: 5_000,
        };
        let params = format!(r#"{{"count":{count}}}"#);
        let name: Arc<str> = Arc::from("p");
        let a: RetentionDecision = host.call(&name, v1, Kind::Retention, &params, &input, limits()).unwrap();
        let b: RetentionDecision = host.call(&name, v2, Kind::Retention, &params, &input, limits()).unwrap();
        let native = LimitsRetention { size: count, ttl_ms: 0, bytes: 0 }.decide(&input).unwrap();
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(&a, &native);
    }
}

// === hostile v2 modules ===

/// A v2 compaction module: marker, memory, an 8-aligned bump allocator, the `switchyard.key`
/// import as `$key`, and `body` as the compaction entry point (params `$p $l`, result i64).
/// Data at 64: a bitmap answer of 3 bits (wrong for a 5-message window); at 128: a valid
/// answer for 5 messages removing the first; at 192: the same keeping all.
fn v2_module(body: &str) -> Vec<u8> {
    common::v2_module(
        r#"(import "switchyard" "key" (func $key (param i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 64) "\00\00\00\00\01\00\00\00\00\00\00\00\03\00\00\00\18\00\00\00\01\00\00\00\01")
           (data (i32.const 128) "\00\00\00\00\01\00\00\00\00\00\00\00\05\00\00\00\18\00\00\00\01\00\00\00\01")
           (data (i32.const 192) "\00\00\00\00\01\00\00\00\00\00\00\00\05\00\00\00\18\00\00\00\01\00\00\00\00")"#,
        "switchyard_compaction",
        body,
    )
}

/// `(ptr << 32) | len` of 25 output bytes at `ptr`.
fn out(ptr: u64) -> String {
    format!("(i64.const {})", (ptr << 32) | 25)
}

fn window5() -> CompactionInput {
    let window = metas(&[(1, 0, false), (2, 0, false), (1, 0, false), (3, 0, true), (2, 0, false)]);
    CompactionInput { channel: "kv:h".into(), window, now_ms: 10_000 }
}

fn call_v2(bytes: &[u8]) -> Result<CompactionDecision, CallError> {
    let host = Host::new(None).unwrap();
    let compiled = load(&host, bytes);
    assert_eq!(compiled.abi, 2);
    host.call(&Arc::from("h"), &compiled, Kind::Compaction, "{}", &window5(), small_limits())
}

/// What each hostile body does, and the failure reason it must give.
fn hostile_cases() -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("endless loop", "(loop $l (br $l)) (i64.const 0)".into(), "timeout"),
        ("memory bomb", "(drop (memory.grow (i32.const 1000))) (i64.const 0)".into(), "memory"),
        (
            "key index out of range",
            format!("(drop (call $key (i32.const 5) (i32.const 1024) (i32.const 16))) {}", out(128)),
            "out_of_bounds",
        ),
        (
            "negative key index",
            format!("(drop (call $key (i32.const -1) (i32.const 1024) (i32.const 16))) {}", out(128)),
            "out_of_bounds",
        ),
        (
            "key written outside memory",
            format!("(drop (call $key (i32.const 0) (i32.const 65534) (i32.const 16))) {}", out(128)),
            "out_of_bounds",
        ),
        ("bitmap of the wrong length", out(64), "invalid_output"),
        ("output outside memory", "(i64.const 0x7fff000000000040)".into(), "out_of_bounds"),
        ("trap", "unreachable".into(), "trap"),
    ]
}

#[test]
fn hostile_v2_modules_fail_with_the_right_reason() {
    for (what, body, reason) in hostile_cases() {
        let started = tokio::time::Instant::now();
        let err = call_v2(&v2_module(&body)).expect_err(what);
        assert_eq!(err.reason(), reason, "{what}: {err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{what} took {:?}", started.elapsed());
    }
}

#[test]
fn the_key_import_reads_keys_by_index() {
    // Removes message 0 only if its key reads back as "key-1" (5 bytes, then '1').
    let body = format!(
        r#"(if (result i64)
             (i32.and
               (i32.eq (call $key (i32.const 0) (i32.const 1024) (i32.const 16)) (i32.const 5))
               (i32.eq (i32.load8_u (i32.const 1028)) (i32.const 49)))
             (then {}) (else {}))"#,
        out(128),
        out(192)
    );
    assert_eq!(call_v2(&v2_module(&body)).unwrap().remove, vec![10]);
    // A short buffer gets a prefix; the full length is still returned.
    let body = format!(
        r#"(if (result i64)
             (i32.and
               (i32.eq (call $key (i32.const 4) (i32.const 1024) (i32.const 2)) (i32.const 5))
               (i32.eq (i32.load8_u (i32.const 1026)) (i32.const 0)))
             (then {}) (else {}))"#,
        out(128),
        out(192)
    );
    assert_eq!(call_v2(&v2_module(&body)).unwrap().remove, vec![10]);
}

/// Through the registry and the bound policy, each hostile v2 module gives the built-in
/// decision for the round, is counted under its reason, and is quarantined after
/// `quarantine_after` consecutive failures, as a v1 module is.
#[test]
fn hostile_v2_modules_fall_back_and_are_quarantined() {
    for (what, body, reason) in hostile_cases() {
        let (_dir, registry, metrics) = registry_in(&[("h", &v2_module(&body))], small_limits());
        let builtin = KeyedCompaction { window_ms: None, tombstone_delay_ms: 0 };
        let bound = bound_compaction(&registry, "h", &builtin);
        let input = window5();
        let expected = builtin.decide(&input).unwrap();
        for round in 0..3 {
            assert_eq!(bound.decide(&input).unwrap(), expected, "{what}: round {round} uses the built-in");
        }
        assert_eq!(metrics.plugin_failures.with_label_values(&["h", "compaction", reason]).get(), 2, "{what}");
        let row = registry.list().into_iter().next().unwrap();
        assert_eq!((row.state, row.calls, row.failures, row.abi_version), ("quarantined", 2, 2, Some(2)), "{what}");
        let again = registry.call("h", "kv/compaction", Kind::Compaction, "{}", &input, |_| Ok(()));
        assert!(matches!(again, Err(Fallback::Quarantined)), "{what}");
    }
}

// === a second guest language: WAT ===

#[test]
fn the_wat_keep_last_plugin_agrees_with_the_rust_one() {
    let text = std::fs::read_to_string(repo().join("tests/plugins/wat/keep-last.wat")).unwrap();
    let host = Host::new(None).unwrap();
    let wat_plugin = load(&host, &wat::parse_str(&text).expect("valid wat"));
    assert_eq!((wat_plugin.abi, wat_plugin.kinds.as_slice()), (2, &[Kind::Retention][..]));
    let rust_plugin = load(&host, &built("plugins/dist/keep-last.wasm"));
    let name: Arc<str> = Arc::from("p");
    for (shown, total, count) in
        [(0, 0, 3), (10, 10, 3), (10, 10, 10), (10, 10, 0), (4, 100, 10), (0, 100, 10), (50, 50, 1)]
    {
        let specs: Vec<(u8, u16, bool)> = (0..shown).map(|i| ((i % 3) as u8, 0, false)).collect();
        let input = RetentionInput {
            channel: "kl:w".into(),
            stats: ChannelStats { first_offset: 10, last_offset: 10 + 2 * total, count: total, bytes: 0 },
            oldest: metas(&specs),
            now_ms: 0,
        };
        let params = format!(r#"{{"count": {count}}}"#);
        let a: RetentionDecision = host.call(&name, &wat_plugin, Kind::Retention, &params, &input, limits()).unwrap();
        let b: RetentionDecision = host.call(&name, &rust_plugin, Kind::Retention, &params, &input, limits()).unwrap();
        assert_eq!(a, b, "shown {shown}, total {total}, count {count}");
    }
    // No digits in the params: the WAT plugin reports its own error.
    let input = RetentionInput { channel: "c".into(), stats: ChannelStats::default(), oldest: vec![], now_ms: 0 };
    let err = host.call(&name, &wat_plugin, Kind::Retention, "{}", &input, limits()).unwrap_err();
    assert!(matches!(&err, CallError::Guest(m) if m.contains("count")), "{err}");
}

// === one call per round ===

fn channels(count: usize) -> Vec<RetentionInput> {
    (0..count)
        .map(|c| {
            let n = 5 + c as u64 % 7;
            let specs: Vec<(u8, u16, bool)> = (0..n).map(|i| ((i % 3) as u8, 0, false)).collect();
            RetentionInput {
                channel: format!("kl:c{c}"),
                stats: ChannelStats { first_offset: 10, last_offset: 10 + 2 * n, count: n, bytes: 0 },
                oldest: metas(&specs),
                now_ms: 0,
            }
        })
        .collect()
}

fn registry_with(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Arc<Registry>, Arc<Metrics>) {
    registry_in(files, limits())
}

/// A v2 plugin decides all the channels of a round in one call, exactly as it decides
/// each alone; a v1 plugin is called once per channel.
#[test]
fn a_round_of_channels_is_one_call_of_a_v2_plugin() {
    let (_dir, registry, metrics) = registry_with(&[
        ("v2", &built("plugins/dist/keep-last.wasm")),
        ("v1", &built("tests/plugins/dist/keep-last-v1.wasm")),
    ]);
    let inputs = channels(40);
    let bound = |plugin: &str| switchyard_plugin_host::bound::PluginRetention {
        registry: registry.clone(),
        plugin: plugin.into(),
        binding: "kl/retention".into(),
        params: r#"{"count":4}"#.into(),
        fallback: None,
    };
    let native = LimitsRetention { size: 4, ttl_ms: 0, bytes: 0 };
    let expected: Vec<RetentionDecision> = inputs.iter().map(|i| native.decide(i).unwrap()).collect();
    for plugin in ["v2", "v1"] {
        let got: Vec<RetentionDecision> = bound(plugin).decide_many(&inputs).into_iter().map(Result::unwrap).collect();
        assert_eq!(got, expected, "{plugin}");
    }
    let calls = |p: &str| metrics.plugin_calls.with_label_values(&[p, "retention"]).get();
    assert_eq!((calls("v2"), calls("v1")), (1, 40));
}

/// A hostile v2 module answering for a batch is one failure (toward quarantine), and every
/// channel of the batch gets the built-in decision.
#[test]
fn a_failed_batch_falls_back_for_every_channel() {
    let (_dir, registry, metrics) = registry_with(&[("h", &v2_module(&out(64)))]);
    let builtin = KeyedCompaction { window_ms: None, tombstone_delay_ms: 0 };
    let bound = bound_compaction(&registry, "h", &builtin);
    let inputs = vec![window5(), window5(), window5()];
    let got: Vec<CompactionDecision> = bound.decide_many(&inputs).into_iter().map(Result::unwrap).collect();
    assert_eq!(got, vec![builtin.decide(&inputs[0]).unwrap(); 3]);
    assert_eq!(metrics.plugin_failures.with_label_values(&["h", "compaction", "invalid_output"]).get(), 1);
}

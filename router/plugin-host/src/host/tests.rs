//! The sandbox's unit tests: hostile modules, load-time refusals, the cache, the epoch
//! ticker, the pool slots and the log budget, through the real engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::call::decode_output;
use super::compile::read_cache_entry;
use super::engine::POOL_SLOTS;
use super::imports::{LogBudget, LOG_LINES_PER_SECOND};
use super::*;
use crate::test_modules::{module, GOOD};
use switchyard_sdk::{ChannelStats, RetentionDecision, RetentionInput};

fn input() -> RetentionInput {
    RetentionInput {
        channel: "c".into(),
        stats: ChannelStats { first_offset: 1, last_offset: 10, count: 10, bytes: 100 },
        oldest: vec![],
        now_ms: 0,
    }
}

fn call(bytes: &[u8]) -> Result<RetentionDecision, CallError> {
    let host = Host::new(None).unwrap();
    let compiled = host.load(bytes).expect("loads");
    let limits = CallLimits { timeout: Duration::from_millis(50), max_memory: 2 * 1024 * 1024 };
    host.call(&Arc::from("t"), &compiled, Kind::Retention, "{}", &input(), limits)
}

#[test]
fn a_well_formed_answer_decodes() {
    assert_eq!(call(&module("", GOOD)).unwrap(), RetentionDecision::DropBelow(5));
}

#[test]
fn hostile_modules_fail_with_the_right_reason() {
    let cases = [
        ("infinite loop", module("", "(loop $l (br $l)) (i64.const 0)"), "timeout"),
        ("memory bomb", module("", "(drop (memory.grow (i32.const 1000))) (i64.const 0)"), "memory"),
        ("trap", module("", "unreachable"), "trap"),
        (
            "out of bounds",
            module("", "(i64.or (i64.shl (i64.const 0x7fff0000) (i64.const 32)) (i64.const 64))"),
            "out_of_bounds",
        ),
        ("garbage", module("", "(i64.or (i64.shl (i64.const 0) (i64.const 32)) (i64.const 9))"), "garbage"),
        ("negative status", module("", "(i64.const -3)"), "garbage"),
    ];
    for (what, bytes, reason) in cases {
        let started = tokio::time::Instant::now();
        let err = call(&bytes).expect_err(what);
        assert_eq!(err.reason(), reason, "{what}: {err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{what} took {:?}", started.elapsed());
    }
}

/// The epoch ticker sleeps between calls and wakes for each: an endless loop is stopped
/// on a host whose ticker parked after earlier calls, every time.
#[test]
fn the_epoch_ticker_wakes_for_every_call() {
    let host = Host::new(None).unwrap();
    let endless = host.load(&module("", "(loop $l (br $l)) (i64.const 0)")).expect("loads");
    let good = host.load(&module("", GOOD)).expect("loads");
    let limits = CallLimits { timeout: Duration::from_millis(20), max_memory: 2 * 1024 * 1024 };
    let call = |compiled: &Compiled| host.call(&Arc::from("t"), compiled, Kind::Retention, "{}", &input(), limits);
    for round in 0..3 {
        assert_eq!(call(&endless).expect_err("endless").reason(), "timeout", "round {round}");
        assert!(call(&good).is_ok(), "round {round}");
    }
    assert_eq!(host.slots.ticker.calls.load(std::sync::atomic::Ordering::Acquire), 0, "no call counted as running");
}

#[test]
fn bad_modules_are_refused_at_load() {
    let host = Host::new(None).unwrap();
    let no_marker = wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap();
    assert!(matches!(host.load(&no_marker), Err(LoadError::Abi(_))));
    let v3 = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "switchyard_abi_v3")))"#).unwrap();
    let err = host.load(&v3).err().expect("refused").to_string();
    assert!(err.contains("switchyard_abi_v3") && err.contains("unsupported ABI version"), "{err}");
    let both = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "switchyard_abi_v1")) (func (export "switchyard_abi_v2")))"#,
    )
    .unwrap();
    assert!(matches!(host.load(&both), Err(LoadError::Abi(_))), "two markers");
    // `switchyard.key` and `switchyard.payload` are v2 imports only.
    let key_v1 = module(r#"(import "switchyard" "key" (func (param i32 i32 i32) (result i32)))"#, GOOD);
    assert!(matches!(host.load(&key_v1), Err(LoadError::Import(_))));
    let payload_v1 = module(r#"(import "switchyard" "payload" (func (param i32 i32 i32) (result i32)))"#, GOOD);
    assert!(matches!(host.load(&payload_v1), Err(LoadError::Import(_))));
    let wasi =
        module(r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#, GOOD);
    assert!(matches!(host.load(&wasi), Err(LoadError::Import(_))));
    let no_entry = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "switchyard_abi_v1"))
             (func (export "switchyard_alloc") (param i32) (result i32) (i32.const 0)))"#,
    )
    .unwrap();
    assert!(matches!(host.load(&no_entry), Err(LoadError::Exports(_))));
    assert!(matches!(host.load(b"not wasm"), Err(LoadError::Compile(_))));
    let logs = module(r#"(import "switchyard" "log" (func $log (param i32 i32 i32)))"#, GOOD);
    assert_eq!(host.load(&logs).unwrap().kinds, vec![Kind::Retention]);
}

#[test]
fn compiled_modules_are_cached_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new(Some(dir.path().to_path_buf())).unwrap();
    let bytes = module("", GOOD);
    host.load(&bytes).unwrap();
    assert_eq!(artifacts(dir.path()).len(), 1, "one artifact (and its digest)");
    let again = Host::new(Some(dir.path().to_path_buf())).unwrap();
    assert_eq!(again.load(&bytes).unwrap().kinds, vec![Kind::Retention]);
}

fn artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    v.sort();
    v
}

/// A cache entry whose bytes no longer match their digest, or that others may write,
/// is never loaded as native code: the module is compiled again and the entry rewritten.
#[test]
fn a_tampered_or_shared_cache_entry_is_recompiled() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let bytes = module("", GOOD);
    Host::new(Some(dir.path().to_path_buf())).unwrap().load(&bytes).unwrap();
    let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the cache directory is private");
    let path = artifacts(dir.path()).pop().unwrap();
    let good = std::fs::read(&path).unwrap();
    assert!(read_cache_entry(&path).is_some());

    // Flip one byte in the middle of the artifact: the digest check refuses it.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&path, &bad).unwrap();
    assert!(read_cache_entry(&path).is_none(), "tampered bytes are not loaded");
    let host = Host::new(Some(dir.path().to_path_buf())).unwrap();
    let compiled = host.load(&bytes).unwrap();
    assert_eq!(compiled.kinds, vec![Kind::Retention]);
    assert!(read_cache_entry(&path).is_some(), "recompiled and rewritten");
    let limits = CallLimits::default();
    let d: RetentionDecision = host.call(&Arc::from("t"), &compiled, Kind::Retention, "{}", &input(), limits).unwrap();
    assert_eq!(d, RetentionDecision::DropBelow(5));

    // A world-writable entry is refused even with a matching digest.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(read_cache_entry(&path).is_none(), "a shared-writable entry is not loaded");
}

proptest::proptest! {
    /// Fuzz-style: any bytes a guest leaves as its output decode to a decision or a
    /// typed error, never a panic; a valid value with trailing bytes is refused.
    #[test]
    fn any_guest_output_decodes_or_is_garbage(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
        let _ = decode_output::<RetentionDecision>(&bytes);
        let _ = decode_output::<switchyard_sdk::CompactionDecision>(&bytes);
        let _ = decode_output::<switchyard_sdk::BalanceDecision>(&bytes);
        let mut valid = postcard::to_stdvec(&abi::GuestResult::<RetentionDecision>::Ok(RetentionDecision::DropBelow(3))).unwrap();
        proptest::prop_assert!(decode_output::<RetentionDecision>(&valid).is_ok());
        valid.push(0);
        proptest::prop_assert!(matches!(decode_output::<RetentionDecision>(&valid), Err(CallError::Garbage(_))));
    }
}

#[test]
fn guest_logs_are_rate_limited_per_plugin() {
    let budget = LogBudget::default();
    let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
    let admitted = (0..100).filter(|_| budget.admit(&a)).count();
    assert_eq!(admitted, LOG_LINES_PER_SECOND as usize);
    assert!(budget.admit(&b), "another plugin has its own window");
}

/// More calls at once than the pool has slots: the extra ones wait, none fails.
#[test]
fn calls_beyond_the_pool_slots_wait_for_one() {
    let host = Host::new(None).unwrap();
    // About a million loop iterations, then the good answer.
    let body = format!(
        "(local $i i32) (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1))) \
         (br_if $l (i32.lt_u (local.get $i) (i32.const 1000000)))) {GOOD}"
    );
    let compiled = Arc::new(host.load(&module("", &body)).unwrap());
    let threads: Vec<_> = (0..POOL_SLOTS * 2)
        .map(|_| {
            let (host, compiled) = (host.clone(), compiled.clone());
            std::thread::spawn(move || {
                let limits = CallLimits { timeout: Duration::from_secs(20), max_memory: 2 << 20 };
                host.call(&Arc::from("t"), &compiled, Kind::Retention, "{}", &input(), limits)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), RetentionDecision::DropBelow(5));
    }
}

#[test]
fn a_compile_past_its_deadline_is_refused_without_waiting_for_it() {
    let host = Host::new(None).unwrap();
    let bytes = module("", GOOD);
    let refused = host.load_within(&bytes, Duration::from_nanos(1));
    assert!(matches!(refused, Err(LoadError::TooSlow(_))), "{:?}", refused.err());
    // With time to finish, the same module loads.
    let loaded = host.load_within(&bytes, Duration::from_secs(30)).unwrap();
    assert_eq!(loaded.kinds, vec![Kind::Retention]);
}

//! What the plugin host's integration tests share: the repository's built modules, the
//! skeleton of a hand-written ABI v2 module, the limits and quarantine rules hostile
//! modules run under, and a registry over a temporary plugin folder.
//!
//! It owns only fixtures: every assertion stays in the test that makes it. It must never
//! build the plugins (a missing build panics saying how to make it) and never depend on
//! timing beyond the call deadline.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::policy::KeyedCompaction;
use switchyard_metrics::Metrics;
use switchyard_plugin_host::bound::PluginCompaction;
use switchyard_plugin_host::host::{CallLimits, Host};
use switchyard_plugin_host::registry::{QuarantineRules, Registry};

/// The repository's root.
pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A built module; panics saying how to build it when missing (as the e2e tests do).
pub(crate) fn built(path: &str) -> Vec<u8> {
    let path = repo().join(path);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!("{} is not readable ({e}): build the plugins first with scripts/build-plugins.sh", path.display())
    })
}

/// The limits hostile modules run under: a 50 ms deadline and 2 MiB of memory.
pub(crate) fn small_limits() -> CallLimits {
    CallLimits { timeout: Duration::from_millis(50), max_memory: 2 << 20 }
}

/// Quarantine after two consecutive failures, for a minute at first.
pub(crate) fn quarantine_rules() -> QuarantineRules {
    QuarantineRules {
        after: 2,
        min: Duration::from_secs(60),
        max: Duration::from_secs(120),
        healthy_reset: Duration::from_secs(600),
    }
}

/// A registry over a fresh folder holding `files` (`name.wasm` each), rescanned once, with
/// [`quarantine_rules`]; the folder lives as long as the returned `TempDir`.
pub(crate) fn registry_in(
    files: &[(&str, &[u8])],
    limits: CallLimits,
) -> (tempfile::TempDir, Arc<Registry>, Arc<Metrics>) {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(format!("{name}.wasm")), bytes).unwrap();
    }
    let metrics = Arc::new(Metrics::new());
    let registry =
        Registry::new(Host::new(None).unwrap(), dir.path().to_path_buf(), limits, quarantine_rules(), metrics.clone());
    registry.rescan();
    (dir, registry, metrics)
}

/// Compaction plugin `plugin` bound as `kv/compaction` with params `{}`, falling back to
/// `builtin`.
pub(crate) fn bound_compaction(registry: &Arc<Registry>, plugin: &str, builtin: &KeyedCompaction) -> PluginCompaction {
    PluginCompaction {
        registry: registry.clone(),
        plugin: plugin.into(),
        binding: "kv/compaction".into(),
        params: "{}".into(),
        fallback: Arc::new(builtin.clone()),
    }
}

/// A hand-written ABI v2 module: `imports` first, the marker, memory, an 8-aligned bump
/// allocator from 4096, the `data` segments, and `body` as the entry point `entry` (params
/// `$p $l`, result i64).
pub(crate) fn v2_module(imports: &str, data: &str, entry: &str, body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
            {imports}
            (memory (export "memory") 1)
            (global $bump (mut i32) (i32.const 4096))
            {data}
            (func (export "switchyard_abi_v2"))
            (func (export "switchyard_alloc") (param $n i32) (result i32)
              (local $p i32) (local.set $p (global.get $bump))
              (global.set $bump (i32.and (i32.add (i32.add (local.get $p) (local.get $n)) (i32.const 7)) (i32.const -8)))
              (local.get $p))
            (func (export "{entry}") (param $p i32) (param $l i32) (result i64) {body}))"#
    ))
    .expect("valid wat")
}

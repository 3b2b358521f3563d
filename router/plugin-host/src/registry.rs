//! The plugin folder: which plugins are loaded, their health, and hot reload.
//!
//! It owns the map from plugin name (file stem) to its last good compiled version, swapped
//! atomically (`ArcSwap`) so calls in flight finish on the version they started with; the
//! failure bookkeeping (counts, consecutive failures, quarantine with exponential backoff);
//! and the watcher that rescans the folder when files change. It must never be called from
//! the publish path: policies run in background maintenance, and a missing, rejected or
//! quarantined plugin is an answer (`Fallback`), not an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::host::{CallError, CallLimits, Compiled, Host, Kind, PolicyInput};
use switchyard_core::policy::{Payloads, PolicyError};
use switchyard_metrics::Metrics;

/// A decision the caller's check refused, as the call's failure (its text goes to the log,
/// the listing's `last_error` and the `invalid_output` count).
fn invalid(e: PolicyError) -> CallError {
    CallError::Invalid(e.to_string())
}

/// Quarantine rules.
#[derive(Debug, Clone, Copy)]
pub struct QuarantineRules {
    /// Consecutive failures that put a plugin in quarantine.
    pub after: u32,
    /// First quarantine period; it doubles on each relapse.
    pub min: Duration,
    /// Longest quarantine period.
    pub max: Duration,
    /// A plugin with no failure for this long starts over at `min`.
    pub healthy_reset: Duration,
}

/// Failure bookkeeping of one binding (plugin × namespace × kind): a misconfigured
/// namespace quarantines only its own use of the plugin.
#[derive(Debug)]
struct Health {
    consecutive: u32,
    quarantined_until: Option<Instant>,
    backoff: Duration,
    last_failure: Option<Instant>,
}

/// Largest plugin file read (a wasm module is far smaller; this refuses device files).
const MAX_PLUGIN_FILE: u64 = 64 * 1024 * 1024;

/// Longest a plugin module may take to compile before it is refused (the rescan does not
/// wait for it longer).
const COMPILE_DEADLINE: Duration = Duration::from_secs(60);

/// Why a plugin file was not read (the rescan skips it, logging this).
#[derive(Debug, thiserror::Error)]
pub(crate) enum PluginFileError {
    /// The path is a symlink (opened with `O_NOFOLLOW`).
    #[error("a symlink (plugin files must be regular files)")]
    Symlink,
    /// Opening failed otherwise.
    #[error("cannot open: {0}")]
    Open(std::io::Error),
    /// `fstat` on the opened descriptor failed.
    #[error("cannot stat: {0}")]
    Stat(std::io::Error),
    /// A FIFO, device or directory.
    #[error("not a regular file (a FIFO, device or directory)")]
    NotRegular,
    /// Reading failed.
    #[error("cannot read: {0}")]
    Read(std::io::Error),
    /// Longer than [`MAX_PLUGIN_FILE`].
    #[error("over {} bytes", MAX_PLUGIN_FILE)]
    TooLarge,
}

/// Reads a plugin file safely: opened without following a symlink and without blocking (a
/// FIFO), checked to be a regular file on the opened descriptor (so nothing can be swapped
/// in between the check and the read), and read through a hard cap of
/// [`MAX_PLUGIN_FILE`] bytes.
pub(crate) fn read_plugin_file(path: &std::path::Path) -> Result<Vec<u8>, PluginFileError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
            |e| match e.raw_os_error() {
                Some(libc::ELOOP) => PluginFileError::Symlink,
                _ => PluginFileError::Open(e),
            },
        )?;
    let meta = file.metadata().map_err(PluginFileError::Stat)?;
    if !meta.file_type().is_file() {
        return Err(PluginFileError::NotRegular);
    }
    let mut bytes = Vec::with_capacity(meta.len().min(MAX_PLUGIN_FILE) as usize);
    file.take(MAX_PLUGIN_FILE + 1).read_to_end(&mut bytes).map_err(PluginFileError::Read)?;
    if bytes.len() as u64 > MAX_PLUGIN_FILE {
        return Err(PluginFileError::TooLarge);
    }
    Ok(bytes)
}

/// What a file's metadata said when it was last read: a rescan that finds the same stamp
/// skips reading and hashing the file (the periodic rescan of an unchanged folder then
/// costs a `stat` per file, not a read and a sha256 of every byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

/// A stamp is trusted only once the file's last change is this much older than the stamp
/// (as git does with "racy" index entries): a rewrite within the file system's timestamp
/// granularity of the moment it was read would otherwise leave the stamp unchanged.
const RACY: std::time::Duration = std::time::Duration::from_secs(2);

impl FileStamp {
    /// The stamp of `path` (not following a symlink), if it can be trusted to skip a read.
    fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::symlink_metadata(path).ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos() as i128;
        let stamp = Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        };
        (m.file_type().is_file() && now - stamp.ctime_ns.max(stamp.mtime_ns) > RACY.as_nanos() as i128).then_some(stamp)
    }
}

/// One plugin file and what became of it.
pub struct Entry {
    name: Arc<str>,
    /// sha256 of the file as last read (valid or not).
    file_sha256: String,
    /// The file's metadata when it was read, if old enough to be trusted (rescans only).
    file_stamp: Mutex<Option<FileStamp>>,
    /// The version that serves calls, if any was ever valid.
    active: Option<Arc<Compiled>>,
    calls: AtomicU64,
    failures: AtomicU64,
    /// Per binding.
    health: Mutex<std::collections::HashMap<String, Health>>,
    /// The latest failure or refusal, for the listing.
    last_error: Mutex<Option<String>>,
}

/// Why a call did not produce the plugin's decision.
#[derive(Debug, Clone)]
pub enum Fallback {
    /// No such plugin file (or it was removed).
    NotLoaded,
    /// The file never produced a valid module.
    Rejected,
    /// The plugin does not export this kind.
    NoSuchKind,
    /// In quarantine for a while.
    Quarantined,
    /// This call failed.
    Failed(CallError),
}

/// A plugin's answer, or the reason to use the built-in policy.
pub type Outcome<O> = Result<O, Fallback>;

/// One row of `GET /api/v1/plugins`.
#[derive(Debug, Serialize)]
pub struct PluginInfo {
    /// File stem.
    pub name: String,
    /// Entry points of the serving version.
    pub kinds: Vec<Kind>,
    /// ABI version of the serving version.
    pub abi_version: Option<u32>,
    /// sha256 of the serving version.
    pub sha256: Option<String>,
    /// sha256 of the file on disk (differs from `sha256` when a newer file was refused).
    pub file_sha256: String,
    /// `active`, `quarantined` or `rejected`.
    pub state: &'static str,
    /// Calls made.
    pub calls: u64,
    /// Calls that failed.
    pub failures: u64,
    /// The latest failure or refusal.
    pub last_error: Option<String>,
}

/// The set of loaded plugins.
pub struct Registry {
    host: Arc<Host>,
    dir: PathBuf,
    limits: CallLimits,
    rules: QuarantineRules,
    metrics: Arc<Metrics>,
    plugins: ArcSwap<BTreeMap<String, Arc<Entry>>>,
    rescan_lock: Mutex<()>,
}

impl Registry {
    /// An empty registry over `dir`; call [`Registry::rescan`] to load it.
    pub fn new(
        host: Arc<Host>,
        dir: PathBuf,
        limits: CallLimits,
        rules: QuarantineRules,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self { host, dir, limits, rules, metrics, plugins: ArcSwap::default(), rescan_lock: Mutex::new(()) })
    }

    /// The watched folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Rereads the folder: loads new and changed `.wasm` files (compiling off the hot path),
    /// keeps the last good version when a new file is invalid, drops removed files, then
    /// swaps the whole map in one step. Blocking; run it on a blocking thread.
    pub fn rescan(&self) {
        let _one_at_a_time = self.rescan_lock.lock().expect("rescan lock");
        let current = self.plugins.load_full();
        let mut next = BTreeMap::new();
        let files = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read plugin folder");
                Vec::new()
            }
        };
        for path in files {
            let (Some(stem), Some("wasm")) =
                (path.file_stem().and_then(|s| s.to_str()), path.extension().and_then(|e| e.to_str()))
            else {
                continue;
            };
            let stamp = FileStamp::of(&path);
            if let Some(old) =
                current.get(stem).filter(|o| stamp.is_some() && *o.file_stamp.lock().expect("stamp") == stamp)
            {
                next.insert(stem.to_string(), old.clone());
                continue;
            }
            let bytes = match read_plugin_file(&path) {
                Ok(bytes) => bytes,
                Err(why) => {
                    tracing::warn!(plugin = stem, %why, "skipping plugin file");
                    continue;
                }
            };
            let sha = crate::host_sha256(&bytes);
            let old = current.get(stem);
            if let Some(old) = old.filter(|o| o.file_sha256 == sha) {
                // Same bytes: the same entry, now with a stamp that lets the next rescan skip it.
                *old.file_stamp.lock().expect("stamp") = stamp;
                next.insert(stem.to_string(), old.clone());
                continue;
            }
            let entry = self.load_entry(stem, &bytes, sha, old.map(|o| o.as_ref()));
            *entry.file_stamp.lock().expect("stamp") = stamp;
            next.insert(stem.to_string(), Arc::new(entry));
        }
        for name in current.keys().filter(|n| !next.contains_key(*n)) {
            tracing::info!(plugin = %name, "plugin file removed; its bindings use the built-in policy");
        }
        self.plugins.store(Arc::new(next));
    }

    fn load_entry(&self, name: &str, bytes: &[u8], sha: String, old: Option<&Entry>) -> Entry {
        let started = Instant::now();
        let (active, rejected) = match self.host.load_within(bytes, COMPILE_DEADLINE) {
            Ok(compiled) => {
                tracing::info!(plugin = name, sha256 = %compiled.sha256, kinds = ?compiled.kinds, took = ?started.elapsed(), "plugin loaded");
                (Some(Arc::new(compiled)), None)
            }
            Err(e) => {
                let kept = old.and_then(|o| o.active.clone());
                tracing::warn!(plugin = name, error = %e, kept_previous = kept.is_some(), "plugin file refused");
                (kept, Some(e.to_string()))
            }
        };
        let carry = |f: fn(&Entry) -> &AtomicU64| old.map_or(0, |o| f(o).load(Ordering::Relaxed));
        // A refused file keeps the serving version's health (quarantine included); a new
        // good version starts healthy with no stale error.
        let (health, last_error) = match (&rejected, old) {
            (Some(why), Some(o)) => (std::mem::take(&mut *o.health.lock().expect("health")), Some(why.clone())),
            (Some(why), None) => (Default::default(), Some(why.clone())),
            (None, _) => (Default::default(), None),
        };
        Entry {
            name: name.into(),
            file_sha256: sha,
            file_stamp: Mutex::new(None),
            active,
            calls: AtomicU64::new(carry(|e| &e.calls)),
            failures: AtomicU64::new(carry(|e| &e.failures)),
            health: Mutex::new(health),
            last_error: Mutex::new(last_error),
        }
    }

    /// Calls plugin `name` as `kind` for `binding` (e.g. `chat/retention`: health is kept
    /// per binding). `check` validates the decision against the input; a refused decision
    /// counts as a failure like a trap does.
    pub fn call<I: PolicyInput>(
        &self,
        name: &str,
        binding: &str,
        kind: Kind,
        params: &str,
        input: &I,
        check: impl FnOnce(&I::Output) -> Result<(), PolicyError>,
    ) -> Outcome<I::Output> {
        self.call_one(name, binding, kind, params, input, None, check)
    }

    /// [`Registry::call`], with the payload source a v2 guest's `switchyard.payload` reads.
    #[allow(clippy::too_many_arguments)]
    fn call_one<I: PolicyInput>(
        &self,
        name: &str,
        binding: &str,
        kind: Kind,
        params: &str,
        input: &I,
        payloads: Option<&Arc<dyn Payloads>>,
        check: impl FnOnce(&I::Output) -> Result<(), PolicyError>,
    ) -> Outcome<I::Output> {
        let (entry, compiled) = self.ready(name, binding, kind)?;
        self.counted(&entry, binding, kind, || {
            self.host
                .call_many_with::<I>(&entry.name, &compiled, kind, params, &[input], self.limits, payloads)
                .and_then(|mut ds| ds.pop().ok_or_else(|| CallError::Garbage("no answer".into())))
                .and_then(|d| check(&d).map(|()| d).map_err(invalid))
        })
        .map_err(Fallback::Failed)
    }

    /// Calls balancer plugin `name` for `binding` through [`Host::balance`] (postcard for ABI
    /// v1, the v2 balance records for v2), with the same health bookkeeping as
    /// [`Registry::call`].
    pub(crate) fn call_balance(
        &self,
        name: &str,
        binding: &str,
        params: &str,
        input: &switchyard_sdk::BalanceInput,
        replicas: &switchyard_sdk::ReplicaInput,
        check: impl FnOnce(&switchyard_sdk::BalancePlan) -> Result<(), PolicyError>,
    ) -> Outcome<switchyard_sdk::BalancePlan> {
        let kind = Kind::Balance;
        let (entry, compiled) = self.ready(name, binding, kind)?;
        self.counted(&entry, binding, kind, || {
            self.host
                .balance(&entry.name, &compiled, params, input, replicas, self.limits)
                .and_then(|d| check(&d).map(|()| d).map_err(invalid))
        })
        .map_err(Fallback::Failed)
    }

    /// The serving version of `name` if it may be called as `kind` for `binding` now.
    fn ready(&self, name: &str, binding: &str, kind: Kind) -> Result<(Arc<Entry>, Arc<Compiled>), Fallback> {
        let plugins = self.plugins.load();
        let entry = plugins.get(name).ok_or(Fallback::NotLoaded)?.clone();
        drop(plugins);
        let compiled = entry.active.clone().ok_or(Fallback::Rejected)?;
        if !compiled.kinds.contains(&kind) {
            return Err(Fallback::NoSuchKind);
        }
        let quarantined = |h: &Health| h.quarantined_until.is_some_and(|t| Instant::now() < t);
        if entry.health.lock().expect("health").get(binding).is_some_and(quarantined) {
            return Err(Fallback::Quarantined);
        }
        Ok((entry, compiled))
    }

    /// Calls plugin `name` once for all `inputs` (the channels of one round) when its ABI
    /// allows (v2); a v1 module is called once per input. `check` validates each decision
    /// against its input. One call is one success or one failure for the binding's health:
    /// a refused decision for any input fails the whole call, and every input of a failed
    /// call gets the same `Fallback`.
    pub fn call_many<I: PolicyInput>(
        &self,
        name: &str,
        binding: &str,
        kind: Kind,
        params: &str,
        inputs: &[&I],
        check: impl Fn(&I, &I::Output) -> Result<(), PolicyError>,
    ) -> Vec<Outcome<I::Output>> {
        self.call_many_with(name, binding, kind, params, inputs, None, check)
    }

    /// [`Registry::call_many`] where a v2 guest's `switchyard.payload` reads through
    /// `payloads` (only the payloads it asks for, when it asks).
    #[allow(clippy::too_many_arguments)]
    pub fn call_many_with<I: PolicyInput>(
        &self,
        name: &str,
        binding: &str,
        kind: Kind,
        params: &str,
        inputs: &[&I],
        payloads: Option<&Arc<dyn Payloads>>,
        check: impl Fn(&I, &I::Output) -> Result<(), PolicyError>,
    ) -> Vec<Outcome<I::Output>> {
        let all = |why: Fallback| inputs.iter().map(|_| Err(why.clone())).collect();
        let (entry, compiled) = match self.ready(name, binding, kind) {
            Ok(ready) => ready,
            Err(why) => return all(why),
        };
        if inputs.is_empty() {
            return Vec::new();
        }
        if inputs.len() == 1 || !Host::batches(&compiled, inputs[0]) {
            return inputs
                .iter()
                .map(|i| self.call_one(name, binding, kind, params, *i, payloads, |d| check(i, d)))
                .collect();
        }
        let result = self.counted(&entry, binding, kind, || {
            let ds = self.host.call_many_with(&entry.name, &compiled, kind, params, inputs, self.limits, payloads)?;
            for (i, (input, d)) in inputs.iter().zip(&ds).enumerate() {
                check(input, d).map_err(|e| CallError::Invalid(format!("channel {i} of {}: {e}", inputs.len())))?;
            }
            Ok(ds)
        });
        match result {
            Ok(ds) => ds.into_iter().map(Ok).collect(),
            Err(e) => all(Fallback::Failed(e)),
        }
    }

    /// Runs one call of `entry` for `binding` and keeps the books: counts the call, and
    /// records its success or failure in the binding's health (quarantine included).
    fn counted<T>(
        &self,
        entry: &Entry,
        binding: &str,
        kind: Kind,
        call: impl FnOnce() -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        entry.calls.fetch_add(1, Ordering::Relaxed);
        self.metrics.plugin_calls.with_label_values(&[&entry.name, kind.as_str()]).inc();
        let result = call();
        match &result {
            Ok(_) => self.succeeded(entry, binding),
            Err(e) => self.failed(entry, binding, kind, e),
        }
        result
    }

    fn new_health(&self) -> Health {
        Health { consecutive: 0, quarantined_until: None, backoff: self.rules.min, last_failure: None }
    }

    fn succeeded(&self, entry: &Entry, binding: &str) {
        let mut all = entry.health.lock().expect("health");
        let Some(h) = all.get_mut(binding) else { return };
        if h.quarantined_until.is_some_and(|t| Instant::now() < t) {
            return; // a call that started before the quarantine does not lift it
        }
        h.consecutive = 0;
        h.quarantined_until = None;
        if h.last_failure.is_some_and(|t| t.elapsed() >= self.rules.healthy_reset) {
            h.backoff = self.rules.min;
        }
    }

    fn failed(&self, entry: &Entry, binding: &str, kind: Kind, e: &CallError) {
        entry.failures.fetch_add(1, Ordering::Relaxed);
        self.metrics.plugin_failures.with_label_values(&[&entry.name, kind.as_str(), e.reason()]).inc();
        *entry.last_error.lock().expect("last error") = Some(format!("{binding}: {e}"));
        let mut all = entry.health.lock().expect("health");
        let h = all.entry(binding.to_string()).or_insert_with(|| self.new_health());
        if h.quarantined_until.is_some_and(|t| Instant::now() < t) {
            // A call that started before the quarantine: counted, but no new streak.
            return;
        }
        if h.last_failure.is_some_and(|t| t.elapsed() >= self.rules.healthy_reset) {
            h.backoff = self.rules.min;
        }
        h.consecutive += 1;
        h.last_failure = Some(Instant::now());
        tracing::warn!(plugin = %entry.name, binding, kind = kind.as_str(), reason = e.reason(), error = %e, "plugin call failed; built-in policy used this round");
        if h.consecutive >= self.rules.after {
            let period = h.backoff;
            h.quarantined_until = Some(Instant::now() + period);
            h.backoff = (h.backoff * 2).min(self.rules.max);
            h.consecutive = 0;
            tracing::error!(plugin = %entry.name, binding, ?period, failures = self.rules.after, "plugin quarantined for this binding");
        }
    }

    /// Every plugin with its state, for `GET /api/v1/plugins`.
    pub fn list(&self) -> Vec<PluginInfo> {
        let now = Instant::now();
        self.plugins
            .load()
            .values()
            .map(|e| {
                let quarantined =
                    e.health.lock().expect("health").values().any(|h| h.quarantined_until.is_some_and(|t| now < t));
                let state = match (&e.active, quarantined) {
                    (None, _) => "rejected",
                    (Some(_), true) => "quarantined",
                    _ => "active",
                };
                PluginInfo {
                    name: e.name.to_string(),
                    kinds: e.active.as_ref().map(|c| c.kinds.clone()).unwrap_or_default(),
                    abi_version: e.active.as_ref().map(|c| c.abi),
                    sha256: e.active.as_ref().map(|c| c.sha256.clone()),
                    file_sha256: e.file_sha256.clone(),
                    state,
                    calls: e.calls.load(Ordering::Relaxed),
                    failures: e.failures.load(Ordering::Relaxed),
                    last_error: e.last_error.lock().expect("last error").clone(),
                }
            })
            .collect()
    }

    /// Watches the folder and rescans (debounced) on every change, plus a slow periodic
    /// rescan as a safety net. Runs until `stop` flips.
    pub fn watch(self: &Arc<Self>, debounce: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        use notify::Watcher;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                let _ = tx.send(());
            }
        })
        .and_then(|mut w| w.watch(&self.dir, notify::RecursiveMode::NonRecursive).map(|()| w));
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch plugin folder; rescanning every 30s only");
                None
            }
        };
        let registry = self.clone();
        tokio::spawn(async move {
            let _watcher = watcher;
            let mut periodic = tokio::time::interval(Duration::from_secs(30));
            periodic.tick().await;
            loop {
                tokio::select! {
                    changed = stop.changed() => {
                        if changed.is_err() || *stop.borrow() {
                            return;
                        }
                        continue;
                    }
                    Some(()) = rx.recv() => {
                        // Debounce: a copy is many events; wait for the burst to end.
                        tokio::time::sleep(debounce).await;
                        while rx.try_recv().is_ok() {}
                    }
                    _ = periodic.tick() => {}
                }
                let r = registry.clone();
                let _ = tokio::task::spawn_blocking(move || r.rescan()).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_modules::{module, GOOD};
    use switchyard_sdk::{ChannelStats, RetentionDecision, RetentionInput};

    fn registry(dir: &Path) -> Arc<Registry> {
        let host = Host::new(None).unwrap();
        let limits = CallLimits { timeout: Duration::from_millis(50), max_memory: 2 << 20 };
        let rules = QuarantineRules {
            after: 2,
            min: Duration::from_secs(60),
            max: Duration::from_secs(120),
            healthy_reset: Duration::from_secs(600),
        };
        Registry::new(host, dir.to_path_buf(), limits, rules, Arc::new(Metrics::new()))
    }

    fn call(r: &Registry, name: &str) -> Outcome<RetentionDecision> {
        let input = RetentionInput { channel: "c".into(), stats: ChannelStats::default(), oldest: vec![], now_ms: 0 };
        r.call(name, "ns/retention", Kind::Retention, "{}", &input, |_| Ok(()))
    }

    fn state(r: &Registry, name: &str) -> (&'static str, Option<String>) {
        let info = r.list().into_iter().find(|p| p.name == name).expect("listed");
        (info.state, info.last_error)
    }

    #[test]
    fn reload_keeps_the_last_good_version_and_removal_reverts() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.wasm");
        let r = registry(dir.path());
        assert!(matches!(call(&r, "p"), Err(Fallback::NotLoaded)));
        std::fs::write(&file, module("", GOOD)).unwrap();
        r.rescan();
        assert_eq!(call(&r, "p").unwrap(), RetentionDecision::DropBelow(5));
        std::fs::write(&file, b"garbage, not wasm").unwrap();
        r.rescan();
        assert_eq!(call(&r, "p").unwrap(), RetentionDecision::DropBelow(5), "last good version still serves");
        let (st, err) = state(&r, "p");
        assert_eq!(st, "active");
        assert!(err.unwrap().contains("not a valid wasm module"));
        std::fs::remove_file(&file).unwrap();
        r.rescan();
        assert!(matches!(call(&r, "p"), Err(Fallback::NotLoaded)));
        std::fs::write(dir.path().join("bad.wasm"), b"nope").unwrap();
        r.rescan();
        assert!(matches!(call(&r, "bad"), Err(Fallback::Rejected)));
        assert_eq!(state(&r, "bad").0, "rejected");
    }

    #[test]
    fn repeated_failures_quarantine_the_plugin() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.wasm"), module("", "unreachable")).unwrap();
        let r = registry(dir.path());
        r.rescan();
        assert!(matches!(call(&r, "t"), Err(Fallback::Failed(CallError::Trap(_)))));
        assert!(matches!(call(&r, "t"), Err(Fallback::Failed(_))));
        assert!(matches!(call(&r, "t"), Err(Fallback::Quarantined)));
        // Another binding of the same plugin is not quarantined by this one's failures.
        let input = RetentionInput { channel: "c".into(), stats: ChannelStats::default(), oldest: vec![], now_ms: 0 };
        let other = r.call::<RetentionInput>("t", "other/retention", Kind::Retention, "{}", &input, |_| Ok(()));
        assert!(matches!(other, Err(Fallback::Failed(_))));
        let info = r.list().into_iter().next().unwrap();
        assert_eq!((info.state, info.calls, info.failures), ("quarantined", 3, 3));
        // A fixed file replaces the entry: a fresh start, counters carried over.
        std::fs::write(dir.path().join("t.wasm"), module("", GOOD)).unwrap();
        r.rescan();
        assert!(call(&r, "t").is_ok());
        let info = r.list().into_iter().next().unwrap();
        assert_eq!((info.state, info.calls, info.failures, info.last_error), ("active", 4, 3, None));
    }

    #[test]
    fn an_invalid_decision_is_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.wasm"), module("", GOOD)).unwrap();
        let r = registry(dir.path());
        r.rescan();
        let input = RetentionInput { channel: "c".into(), stats: ChannelStats::default(), oldest: vec![], now_ms: 0 };
        let out = r.call::<RetentionInput>("p", "ns/retention", Kind::Retention, "{}", &input, |_| {
            Err(PolicyError::Invalid { policy: "p".into(), message: "above the top".into() })
        });
        assert!(matches!(out, Err(Fallback::Failed(CallError::Invalid(_)))));
        assert_eq!(r.metrics.plugin_failures.with_label_values(&["p", "retention", "invalid_output"]).get(), 1);
    }

    /// Only regular files are plugins: a symlink (even to a good module) and a FIFO are
    /// skipped without blocking the rescan, and a good file beside them still loads.
    #[test]
    fn symlinks_and_fifos_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.wasm");
        std::fs::write(&good, module("", GOOD)).unwrap();
        std::os::unix::fs::symlink(&good, dir.path().join("linked.wasm")).unwrap();
        let fifo = dir.path().join("fifo.wasm");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success(), "mkfifo");
        assert!(read_plugin_file(&fifo).unwrap_err().to_string().contains("not a regular file"));
        assert!(read_plugin_file(&dir.path().join("linked.wasm")).unwrap_err().to_string().contains("symlink"));
        let r = registry(dir.path());
        r.rescan();
        let names: Vec<String> = r.list().into_iter().map(|p| p.name).collect();
        assert_eq!(names, vec!["good".to_string()], "only the regular file is a plugin");
        assert!(call(&r, "good").is_ok());
    }

    /// A rescan trusts a file's stamp only once its last change is older than [`RACY`]:
    /// a fresh file has none, an old one does, and a rewrite changes it or makes it racy
    /// again, so the changed file is read on the next rescan.
    #[test]
    fn only_settled_files_are_skipped_by_their_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.wasm");
        std::fs::write(&file, module("", GOOD)).unwrap();
        assert_eq!(FileStamp::of(&file), None, "just written: racy");
        let deadline = Instant::now() + RACY * 3;
        let stamp = loop {
            if let Some(s) = FileStamp::of(&file) {
                break s;
            }
            assert!(Instant::now() < deadline, "the stamp never settled");
            // A plain #[test] thread, no runtime: polling the condition, with a deadline.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let r = registry(dir.path());
        r.rescan();
        assert_eq!(*r.plugins.load().get("p").unwrap().file_stamp.lock().unwrap(), Some(stamp));
        // Same length, other bytes: the rewrite is seen (its stamp is racy, so it is read).
        let len = std::fs::metadata(&file).unwrap().len() as usize;
        std::fs::write(&file, vec![b'x'; len]).unwrap();
        assert_ne!(FileStamp::of(&file), Some(stamp));
        r.rescan();
        assert!(state(&r, "p").1.is_some(), "the corrupted rewrite was read and refused");
    }
}

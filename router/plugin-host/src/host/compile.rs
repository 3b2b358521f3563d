//! Loading a module: compiled under a deadline on a thread of its own, through the on-disk
//! cache of native code, then validated and pre-instantiated.
//!
//! It owns the cache entries (named by the module's sha256 and the engine's compatibility
//! hash, each with a digest file beside it, written privately through a rename) and the
//! count of compilations still running past their deadline. It must never load native code
//! from a cache entry that is not a private regular file matching its recorded digest (this
//! is the crate's one `unsafe` call), and never wait for a compilation past its deadline.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::Module;

use super::validate::validate;
use super::{Compiled, Host, LoadError};

/// Compilations past their deadline that may still run before new ones are refused.
pub const MAX_SLOW_COMPILES: usize = 2;

/// The digest file beside a cache entry: sha256 of the artifact's bytes.
fn digest_path(path: &Path) -> PathBuf {
    path.with_extension("cwasm.sha256")
}

/// The artifact at `path` if it may be loaded as native code: a regular file, not group-
/// or world-writable, whose bytes match the digest recorded when it was written. Anything
/// else is ignored (and recompiled over).
pub(super) fn read_cache_entry(path: &Path) -> Option<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_file() || meta.permissions().mode() & 0o022 != 0 {
        tracing::warn!(path = %path.display(), "plugin cache entry is not a private regular file; recompiling");
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    let recorded = std::fs::read_to_string(digest_path(path)).ok()?;
    if recorded.trim() != crate::host_sha256(&bytes) {
        tracing::warn!(path = %path.display(), "plugin cache entry does not match its digest; recompiling");
        return None;
    }
    Some(bytes)
}

/// Writes an artifact and its digest (each through a temporary file and a rename), private
/// to this user.
fn write_cache_entry(path: &Path, artifact: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let put = |path: &Path, bytes: &[u8]| {
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    put(&digest_path(path), crate::host_sha256(artifact).as_bytes())?;
    put(path, artifact)
}

impl Host {
    fn cache_path(&self, sha256: &str) -> Option<PathBuf> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let dir = self.cache_dir.as_ref()?;
        Some(dir.join(format!("{sha256}-{:016x}.cwasm", h.finish())))
    }

    /// Like [`Host::load`], on a thread of its own and under a deadline, so that a module
    /// built to be slow to compile cannot hold up the caller (the plugin folder's rescan).
    /// Past the deadline the module is refused; its compilation finishes in the background,
    /// and while [`MAX_SLOW_COMPILES`] of those still run, new modules are refused at once.
    pub fn load_within(self: &Arc<Self>, bytes: &[u8], deadline: Duration) -> Result<Compiled, LoadError> {
        use std::sync::atomic::Ordering;
        if self.compiling.fetch_add(1, Ordering::SeqCst) >= MAX_SLOW_COMPILES {
            self.compiling.fetch_sub(1, Ordering::SeqCst);
            return Err(LoadError::TooSlow("earlier modules that ran over their deadline are still compiling".into()));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (host, bytes) = (self.clone(), bytes.to_vec());
        let spawned = std::thread::Builder::new().name("wasm-compile".into()).spawn(move || {
            let r = host.load(&bytes);
            host.compiling.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(r);
        });
        if let Err(e) = spawned {
            self.compiling.fetch_sub(1, Ordering::SeqCst);
            return Err(LoadError::TooSlow(format!("cannot start a compile thread: {e}")));
        }
        rx.recv_timeout(deadline)
            .unwrap_or_else(|_| Err(LoadError::TooSlow(format!("compiling took over {deadline:?}"))))
    }

    /// Compiles (or loads from the cache) and validates a module against its ABI (v1 or v2).
    pub fn load(&self, bytes: &[u8]) -> Result<Compiled, LoadError> {
        let sha256 = crate::host_sha256(bytes);
        let module = self.compile_cached(bytes, &sha256)?;
        let (abi, kinds) = validate(&module)?;
        let pre = self.linker.instantiate_pre(&module).map_err(|e| LoadError::Import(format!("{e:#}")))?;
        Ok(Compiled { sha256, kinds, abi, pre, balance_cache: Default::default() })
    }

    // The one unsafe call of this crate: loading a precompiled module from the cache.
    #[allow(unsafe_code)]
    fn compile_cached(&self, bytes: &[u8], sha256: &str) -> Result<Module, LoadError> {
        let cached = self.cache_path(sha256);
        if let Some(artifact) = cached.as_deref().and_then(read_cache_entry) {
            // SAFETY: the bytes were written by `Module::serialize` of this same engine
            // configuration (the name carries its compatibility hash), into a directory only
            // this user can write, and they still match the digest recorded beside them.
            match unsafe { Module::deserialize(&self.engine, &artifact) } {
                Ok(m) => return Ok(m),
                Err(e) => tracing::warn!(error = %e, "ignoring unusable plugin cache entry"),
            }
        }
        let module = Module::new(&self.engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        if let (Some(path), Ok(serialized)) = (cached, module.serialize()) {
            if let Err(e) = write_cache_entry(&path, &serialized) {
                tracing::debug!(path = %path.display(), error = %e, "could not write plugin cache entry");
            }
        }
        Ok(module)
    }
}

/// Reads a file and loads it.
pub fn load_file(host: &Host, path: &Path) -> Result<Compiled, LoadError> {
    let bytes = std::fs::read(path).map_err(|e| LoadError::Compile(format!("cannot read {}: {e}", path.display())))?;
    host.load(&bytes)
}

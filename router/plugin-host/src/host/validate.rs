//! Checking a compiled module against its ABI before it may serve.
//!
//! It owns the rules: exactly one version marker (v1 or v2), a `memory` export, a
//! well-typed allocator, at least one well-typed entry point, and imports only from
//! `switchyard` (`log`, and for v2 `key` and `payload`). It must never instantiate or run
//! the module: it reads only the types of its imports and exports.

use switchyard_sdk as abi;
use wasmtime::{ExternType, Module, ValType};

use super::{Kind, LoadError};

fn func_is(ty: &ExternType, params: &[fn(&ValType) -> bool], results: &[fn(&ValType) -> bool]) -> bool {
    let Some(f) = ty.func() else { return false };
    f.params().len() == params.len()
        && f.results().len() == results.len()
        && f.params().zip(params).all(|(v, ok)| ok(&v))
        && f.results().zip(results).all(|(v, ok)| ok(&v))
}

/// Checks a module against its ABI: the marker (`switchyard_abi_v1` or `_v2`, exactly
/// one), memory, allocator, at least one well-typed entry point, and no import but
/// `switchyard.log` (and, for v2, `switchyard.key` and `switchyard.payload`). Returns the
/// ABI version and the kinds.
pub(super) fn validate(module: &Module) -> Result<(u32, Vec<Kind>), LoadError> {
    let exports: std::collections::HashMap<&str, ExternType> = module.exports().map(|e| (e.name(), e.ty())).collect();
    let markers: Vec<&str> = exports.keys().copied().filter(|n| n.starts_with("switchyard_abi_v")).collect();
    let abi = match markers.as_slice() {
        [m] if *m == abi::ABI_V1_MARKER => 1,
        [m] if *m == abi::ABI_V2_MARKER => 2,
        [] => return Err(LoadError::Abi("no `switchyard_abi_v1` or `switchyard_abi_v2` marker export".into())),
        found => {
            let mut found = found.to_vec();
            found.sort_unstable();
            return Err(LoadError::Abi(format!(
                "module is {}; this router speaks switchyard_abi_v1 and switchyard_abi_v2 (one marker)",
                found.join(", ")
            )));
        }
    };
    for import in module.imports() {
        let i32s: [fn(&ValType) -> bool; 3] = [ValType::is_i32, ValType::is_i32, ValType::is_i32];
        let ok = import.module() == abi::HOST_MODULE
            && ((import.name() == abi::LOG_IMPORT && func_is(&import.ty(), &i32s, &[]))
                || (abi == 2
                    && (import.name() == abi::KEY_IMPORT || import.name() == abi::PAYLOAD_IMPORT)
                    && func_is(&import.ty(), &i32s, &[ValType::is_i32])));
        if !ok {
            return Err(LoadError::Import(format!("{}.{}", import.module(), import.name())));
        }
    }
    if exports.get("memory").and_then(|t| t.memory()).is_none() {
        return Err(LoadError::Exports("no `memory` export".into()));
    }
    if !exports.get(abi::ALLOC_EXPORT).is_some_and(|t| func_is(t, &[ValType::is_i32], &[ValType::is_i32])) {
        return Err(LoadError::Exports(format!("`{}` must be (i32) -> i32", abi::ALLOC_EXPORT)));
    }
    let mut kinds = Vec::new();
    for kind in Kind::ALL {
        if let Some(ty) = exports.get(kind.export()) {
            if !func_is(ty, &[ValType::is_i32, ValType::is_i32], &[ValType::is_i64]) {
                return Err(LoadError::Exports(format!("`{}` must be (i32, i32) -> i64", kind.export())));
            }
            kinds.push(kind);
        }
    }
    if kinds.is_empty() {
        return Err(LoadError::Exports("no entry point (switchyard_retention, _compaction or _balance)".into()));
    }
    Ok((abi, kinds))
}

//! Checks a module against what wafer offers guests before it is deployed.

use std::collections::BTreeSet;

use wasmtime::{ExternType, Module};

use super::RuntimeError;

/// Import modules guests may use.
pub const ALLOWED_IMPORT_MODULES: &[&str] = &["wasi_snapshot_preview1", "wafer"];

/// Rejects `module` unless it is a WASI preview 1 command whose every import is one the
/// host defines (`provided`), and whose initial memory fits in `memory_limit` bytes.
pub fn check_module(
    module: &Module,
    provided: &BTreeSet<(String, String)>,
    memory_limit: u64,
) -> Result<(), RuntimeError> {
    for import in module.imports() {
        let key = (import.module().to_string(), import.name().to_string());
        if !provided.contains(&key) {
            let what = match import.ty() {
                ExternType::Func(_) => "function",
                ExternType::Memory(_) => "memory",
                ExternType::Table(_) => "table",
                ExternType::Global(_) => "global",
                ExternType::Tag(_) => "tag",
            };
            return Err(RuntimeError::ForbiddenImport {
                module: key.0,
                name: key.1,
                kind: what,
            });
        }
    }
    match module.get_export("_start") {
        Some(ExternType::Func(_)) => {}
        _ => return Err(RuntimeError::NotACommand),
    }
    for export in module.exports() {
        if let ExternType::Memory(mem) = export.ty() {
            let min_bytes = mem.minimum().saturating_mul(mem.page_size());
            if min_bytes > memory_limit {
                return Err(RuntimeError::InitialMemoryTooLarge {
                    needed: min_bytes,
                    limit: memory_limit,
                });
            }
        }
    }
    Ok(())
}

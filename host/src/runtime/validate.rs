//! Checks a module against what wafer offers guests before it is deployed.

use std::borrow::Cow;
use std::collections::BTreeSet;

use wasmtime::{ExternType, Module};

use super::RuntimeError;

/// Import modules guests may use.
pub const ALLOWED_IMPORT_MODULES: &[&str] = &["wasi_snapshot_preview1", "wasi_unstable", "wafer"];

/// The WebAssembly binary of an upload: a core module's binary as is, WebAssembly text
/// (`.wat`) assembled. Anything else is refused with a message saying what it is.
pub fn to_binary(upload: &[u8]) -> Result<Cow<'_, [u8]>, RuntimeError> {
    if upload.starts_with(MAGIC) {
        refuse_component(upload)?;
        return Ok(Cow::Borrowed(upload));
    }
    if looks_like_text(upload) {
        let binary = wat::parse_bytes(upload)
            .map_err(|e| RuntimeError::Malformed(format!("invalid WebAssembly text: {e}")))?;
        refuse_component(&binary)?;
        return Ok(binary);
    }
    let start: Vec<String> = upload.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let hint = if upload.trim_ascii_start().starts_with(b"{") {
        "; it looks like JSON: a manifest goes in the `x-wafer-manifest` header, and the \
         body is the module"
    } else {
        ""
    };
    Err(RuntimeError::Malformed(format!(
        "not a WebAssembly module: it does not begin with the `\\0asm` magic bytes \
         (begins with [{}], {} bytes in all){hint}",
        start.join(" "),
        upload.len()
    )))
}

/// The first bytes of every WebAssembly binary, module or component.
const MAGIC: &[u8] = b"\0asm";

/// Refuses a component's binary (`(component ...)` text assembles to one too) with a
/// message that says what to build instead.
fn refuse_component(binary: &[u8]) -> Result<(), RuntimeError> {
    // Bytes 4..8: version 1 with layer 0 is a core module; layer 1 is a component.
    if binary.get(6..8) == Some(&[1, 0]) {
        return Err(RuntimeError::Malformed(
            "this is a WebAssembly component (WASI preview 2); wafer runs core modules for \
             WASI preview 1: build for `wasm32-wasip1`"
                .into(),
        ));
    }
    Ok(())
}

/// Whether `bytes` read as WebAssembly text: UTF-8 whose first token opens an
/// S-expression or a comment.
fn looks_like_text(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    let text = text.trim_start_matches('\u{feff}').trim_start();
    text.starts_with('(') || text.starts_with(";;")
}

/// Bytes in a WebAssembly page (the engine leaves the custom-page-sizes proposal off).
const WASM_PAGE_BYTES: u64 = 64 << 10;

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
        Some(ExternType::Func(ty)) if ty.params().len() == 0 && ty.results().len() == 0 => {}
        Some(ExternType::Func(ty)) => return Err(RuntimeError::StartSignature(ty.to_string())),
        _ => return Err(RuntimeError::NotACommand),
    }
    // Every defined memory, exported or not (imported ones were refused above).
    let needed = module
        .resources_required()
        .max_initial_memory_size
        .unwrap_or(0)
        .saturating_mul(WASM_PAGE_BYTES);
    if needed > memory_limit {
        return Err(RuntimeError::InitialMemoryTooLarge {
            needed,
            limit: memory_limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_pass_text_is_assembled_and_the_rest_is_named() {
        let core = b"\0asm\x01\x00\x00\x00";
        assert!(matches!(to_binary(core), Ok(Cow::Borrowed(_))));

        let text = to_binary(b";; hi\n(module (func (export \"_start\")))").expect("wat");
        assert!(text.starts_with(b"\0asm\x01\x00\x00\x00"));

        let component = to_binary(b"\0asm\x0d\x00\x01\x00").expect_err("component");
        assert!(
            component.to_string().contains("WebAssembly component"),
            "{component}"
        );
        let component_text = to_binary(b"(component)").expect_err("component text");
        assert!(
            component_text.to_string().contains("WebAssembly component"),
            "{component_text}"
        );

        let bad_text = to_binary(b"(module (func (no_such_instruction)))").expect_err("bad wat");
        assert!(
            bad_text.to_string().contains("invalid WebAssembly text"),
            "{bad_text}"
        );

        let json = to_binary(b" {\"memory_mb\": 64}").expect_err("json");
        assert!(json.to_string().contains("x-wafer-manifest"), "{json}");

        let junk = to_binary(b"not wasm at all").expect_err("junk");
        assert!(
            junk.to_string().contains(
                "does not begin with the `\\0asm` magic bytes (begins with [6e 6f 74 20]"
            ),
            "{junk}"
        );
    }
}

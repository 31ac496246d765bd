//! Content-addressed cache of precompiled module code on disk, keyed by the module's
//! digest and the engine's configuration, so a restart does not recompile.
//!
//! A file is `<module digest>-<engine key>.cwasm` and holds the SHA-256 of the
//! serialized code followed by the code. Files are written to a temporary name and
//! renamed, so a crash never leaves a partial entry under a real name; an entry whose
//! checksum does not match is treated as a miss and rewritten.

use std::hash::Hasher;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use wasmtime::{Engine, Module};

use crate::digest::Digest;

/// The on-disk cache of precompiled modules.
#[derive(Debug, Clone)]
pub struct ModuleCache {
    dir: PathBuf,
    engine_key: String,
}

/// Feeds `std::hash::Hash` output into SHA-256, giving a key that is stable across runs.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// A key naming everything about `engine` that precompiled code depends on.
pub fn engine_key(engine: &Engine) -> String {
    let mut hasher = ShaHasher(Sha256::new());
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
    hasher.write(env!("CARGO_PKG_VERSION").as_bytes());
    hex::encode(&hasher.0.finalize()[..12])
}

impl ModuleCache {
    /// A cache in `dir` (created if missing) for code compiled by `engine`.
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<ModuleCache> {
        std::fs::create_dir_all(dir)?;
        Ok(ModuleCache {
            dir: dir.to_path_buf(),
            engine_key: engine_key(engine),
        })
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}-{}.cwasm", digest.to_hex(), self.engine_key))
    }

    /// The cached module for `digest`, or `None` when absent or unusable.
    pub fn load(&self, engine: &Engine, digest: &Digest) -> Option<Module> {
        let path = self.path(digest);
        let bytes = std::fs::read(&path).ok()?;
        if bytes.len() < 32 || Sha256::digest(&bytes[32..]).as_slice() != &bytes[..32] {
            tracing::warn!(path = %path.display(), "ignoring corrupt precompiled module");
            return None;
        }
        // SAFETY: `Module::deserialize` requires bytes produced by `Module::serialize` of
        // a compatible engine. The file lives in this node's private data folder, is
        // written only by `store` below (serialize, then atomic rename), its name carries
        // the engine's compatibility key, and its checksum was just verified, so the
        // bytes are exactly what `serialize` produced. wasmtime also re-checks the
        // header's engine compatibility and fails cleanly on a mismatch.
        match unsafe { Module::deserialize(engine, &bytes[32..]) } {
            Ok(module) => Some(module),
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "ignoring unusable precompiled module");
                None
            }
        }
    }

    /// Stores `module`'s precompiled code under `digest`.
    pub fn store(&self, digest: &Digest, module: &Module) -> Result<(), String> {
        let code = module.serialize().map_err(|e| format!("{e:#}"))?;
        let mut bytes = Vec::with_capacity(32 + code.len());
        bytes.extend_from_slice(&Sha256::digest(&code));
        bytes.extend_from_slice(&code);
        let path = self.path(digest);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &bytes).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
        Ok(())
    }
}

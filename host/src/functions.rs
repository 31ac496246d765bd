//! Deployed functions on this node: records and modules persisted in [`State`], each
//! prepared once for instantiation in the [`Runtime`] and invoked in fresh instances.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::metrics::{FunctionStats, Metrics};
use crate::runtime::{Invocation, InvokeError, Outcome, Prepared, Runtime, RuntimeError};
use crate::state::{FunctionName, FunctionRecord, FunctionSpec, State, StateError};

/// Environment variables the gateway sets for every HTTP invocation; a function's own
/// environment may not use these names (or the `HTTP_` prefix).
pub const RESERVED_ENV: &[&str] = &[
    "REQUEST_METHOD",
    "PATH_INFO",
    "PATH_TRANSLATED",
    "QUERY_STRING",
    "SCRIPT_NAME",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "SERVER_SOFTWARE",
    "GATEWAY_INTERFACE",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "REMOTE_ADDR",
    "X_FULL_URL",
    "X_MATCHED_ROUTE",
];

/// What managing or invoking functions can fail with.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    /// No function has this name.
    #[error("no function named `{0}`")]
    NotFound(FunctionName),
    /// The module or its limits were rejected.
    #[error(transparent)]
    Rejected(#[from] RuntimeError),
    /// The environment uses a reserved name or is malformed.
    #[error("invalid environment variable {name:?}: {reason}")]
    InvalidEnv {
        /// The variable.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// Limits out of range.
    #[error("invalid limit: {0}")]
    InvalidLimit(String),
    /// The module is larger than the node accepts.
    #[error("module of {size} bytes exceeds the limit of {limit} bytes")]
    ModuleTooLarge {
        /// Module size.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// Durable state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The invocation could not start.
    #[error(transparent)]
    Invoke(#[from] InvokeError),
}

/// A deployed function, ready to invoke.
pub struct Deployed {
    /// Its stored record.
    pub record: FunctionRecord,
    prepared: Prepared,
    env: Vec<(String, String)>,
    stats: OnceLock<FunctionStats>,
}

impl Deployed {
    /// The function's environment, as given at deploy.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// The function's metric series, looked up in `metrics` on first use.
    pub fn stats(&self, metrics: &Metrics) -> &FunctionStats {
        self.stats
            .get_or_init(|| metrics.function_stats(self.record.name.as_str()))
    }
}

/// The node's deployed functions.
pub struct Functions {
    state: State,
    runtime: Arc<Runtime>,
    max_module_bytes: u64,
    live: RwLock<HashMap<FunctionName, Arc<Deployed>>>,
    /// Orders "write state, then update `live`" across concurrent deploys and removals,
    /// so `live` always ends as the state does.
    writes: Mutex<()>,
}

impl Functions {
    /// Opens the function set over `state`, preparing every stored function. A function
    /// that no longer prepares is logged and left out, not fatal.
    pub fn load(
        state: State,
        runtime: Arc<Runtime>,
        max_module_bytes: u64,
    ) -> Result<Functions, FunctionError> {
        let mut live = HashMap::new();
        for record in state.list_functions()? {
            let Some(wasm) = state.get_blob(&record.digest)? else {
                tracing::error!(function = %record.name, digest = %record.digest, "module blob missing; skipping");
                continue;
            };
            match runtime.prepare(&wasm, &record.spec.limits) {
                Ok(prepared) => {
                    let deployed = deployed(record, prepared);
                    live.insert(deployed.record.name.clone(), Arc::new(deployed));
                }
                Err(err) => {
                    tracing::error!(function = %record.name, error = %err, "cannot prepare stored function; skipping")
                }
            }
        }
        Ok(Functions {
            state,
            runtime,
            max_module_bytes,
            live: RwLock::new(live),
            writes: Mutex::new(()),
        })
    }

    /// The runtime functions run in.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Largest module accepted, bytes.
    pub fn max_module_bytes(&self) -> u64 {
        self.max_module_bytes
    }

    /// Validates, compiles and stores `wasm` as the new version of `name`. Blocks while
    /// compiling: call from a blocking-capable thread.
    pub fn deploy(
        &self,
        name: &FunctionName,
        wasm: &[u8],
        spec: FunctionSpec,
    ) -> Result<FunctionRecord, FunctionError> {
        if wasm.len() as u64 > self.max_module_bytes {
            return Err(FunctionError::ModuleTooLarge {
                size: wasm.len() as u64,
                limit: self.max_module_bytes,
            });
        }
        check_spec(&spec)?;
        // WebAssembly text is stored as the binary it assembles to.
        let wasm = crate::runtime::to_binary(wasm)?;
        let prepared = self.runtime.prepare(&wasm, &spec.limits)?;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let _writes = self.lock_writes();
        let record = self.state.put_function(name, &wasm, spec, now_ms)?;
        let deployed = Arc::new(deployed(record.clone(), prepared));
        self.write_live().insert(name.clone(), deployed);
        tracing::info!(function = %name, version = record.version, digest = %record.digest, "deployed");
        Ok(record)
    }

    /// Removes function `name`.
    pub fn remove(&self, name: &FunctionName) -> Result<FunctionRecord, FunctionError> {
        let _writes = self.lock_writes();
        let removed = self
            .state
            .delete_function(name)?
            .ok_or_else(|| FunctionError::NotFound(name.clone()))?;
        self.write_live().remove(name);
        tracing::info!(function = %name, "removed");
        Ok(removed)
    }

    /// Every deployed function's record, sorted by name.
    pub fn list(&self) -> Vec<FunctionRecord> {
        let mut records: Vec<FunctionRecord> = self
            .read_live()
            .values()
            .map(|d| d.record.clone())
            .collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records
    }

    /// The deployed function `name`.
    pub fn get(&self, name: &FunctionName) -> Result<Arc<Deployed>, FunctionError> {
        self.read_live()
            .get(name)
            .cloned()
            .ok_or_else(|| FunctionError::NotFound(name.clone()))
    }

    /// Runs `function` once in a fresh instance; ends by its timeout.
    pub async fn invoke(
        &self,
        function: &Deployed,
        invocation: Invocation,
    ) -> Result<Outcome, FunctionError> {
        Ok(self
            .runtime
            .invoke(&function.prepared, &function.record.spec.limits, invocation)
            .await?)
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guard protects no data, only ordering: a poisoned lock is still usable.
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_live(&self) -> std::sync::RwLockReadGuard<'_, HashMap<FunctionName, Arc<Deployed>>> {
        // The map is only ever replaced whole-entry; a poisoned lock still holds a
        // consistent map.
        self.live.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_live(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<FunctionName, Arc<Deployed>>> {
        self.live.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn deployed(record: FunctionRecord, prepared: Prepared) -> Deployed {
    let env = record
        .spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Deployed {
        record,
        prepared,
        env,
        stats: OnceLock::new(),
    }
}

/// Rejects reserved or malformed environment names and out-of-range limits.
fn check_spec(spec: &FunctionSpec) -> Result<(), FunctionError> {
    for name in spec.env.keys() {
        let reason = if name.is_empty() {
            Some("the name is empty")
        } else if name.contains('=') || name.contains('\0') {
            Some("names may not contain '=' or NUL")
        } else if RESERVED_ENV.contains(&name.as_str()) || name.starts_with("HTTP_") {
            Some("the name is reserved for request metadata")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(FunctionError::InvalidEnv {
                name: name.clone(),
                reason,
            });
        }
    }
    let limits = &spec.limits;
    if limits.memory_mb == 0 {
        return Err(FunctionError::InvalidLimit(
            "memory_mb must be at least 1".into(),
        ));
    }
    if limits.timeout_ms == 0 || limits.timeout_ms > 15 * 60 * 1000 {
        return Err(FunctionError::InvalidLimit(
            "timeout_ms must be between 1 and 900000 (15 minutes)".into(),
        ));
    }
    Ok(())
}

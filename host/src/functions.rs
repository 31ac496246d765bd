//! Deployed functions on this node: the replicated [`State`]'s functions, each prepared
//! once for instantiation in the [`Runtime`] and invoked in fresh instances. Kept in step
//! with the state as an [`Observer`] of the state machine.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use crate::guest_logs::GuestLogs;
use crate::metrics::{FunctionStats, Metrics};
use crate::runtime::{Invocation, InvokeError, Outcome, Prepared, Runtime, RuntimeError};
use crate::state::{
    Command, CommandResponse, FunctionName, FunctionRecord, FunctionSpec, Observer, State,
    StateError,
};

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
    /// The function is granted an accelerator, this node has none, and no agent that
    /// could run it with one can now: none holds a serverless lease (none has such a
    /// device, or its lease is not seen yet), or every such agent failed or was busy.
    #[error("no agent with {0} device can run it now (none holds a serverless lease, or none answered): retry later")]
    NoDevice(String),
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
    /// The log index up to which `live` reflects the state.
    synced: tokio::sync::watch::Sender<u64>,
    /// Recent guest logs of the invocations this node's gateway took.
    logs: GuestLogs,
}

impl Functions {
    /// Opens the function set over `state`, preparing every stored function. A function
    /// that no longer prepares is logged and left out, not fatal.
    pub fn load(
        state: State,
        runtime: Arc<Runtime>,
        max_module_bytes: u64,
    ) -> Result<Functions, FunctionError> {
        let functions = Functions {
            state,
            runtime,
            max_module_bytes,
            live: RwLock::new(HashMap::new()),
            synced: tokio::sync::watch::Sender::new(0),
            logs: GuestLogs::default(),
        };
        functions.reload()?;
        Ok(functions)
    }

    /// Prepares every function in the state, replacing `live`.
    fn reload(&self) -> Result<(), FunctionError> {
        let mut live = HashMap::new();
        for record in self.state.list_functions()? {
            if let Some(deployed) = self.prepare_stored(record) {
                live.insert(deployed.record.name.clone(), Arc::new(deployed));
            }
        }
        *self.write_live() = live;
        Ok(())
    }

    /// Prepares a function from its stored record and module. One that no longer
    /// prepares is logged and left out, not fatal.
    fn prepare_stored(&self, record: FunctionRecord) -> Option<Deployed> {
        let wasm = match self.state.get_blob(&record.digest) {
            Ok(Some(wasm)) => wasm,
            Ok(None) => {
                tracing::error!(function = %record.name, digest = %record.digest, "module blob missing; skipping");
                return None;
            }
            Err(err) => {
                tracing::error!(function = %record.name, error = %err, "reading the module; skipping");
                return None;
            }
        };
        match self.runtime.prepare(&wasm, &record.spec.limits) {
            Ok(prepared) => Some(deployed(record, prepared)),
            Err(err) => {
                tracing::error!(function = %record.name, error = %err, "cannot prepare stored function; skipping");
                None
            }
        }
    }

    /// Records that `live` reflects the state as of log index `index` (at start, when the
    /// state was loaded whole).
    pub fn mark_synced(&self, index: u64) {
        self.synced.send_modify(|at| *at = (*at).max(index));
    }

    /// Waits until this node serves the state as of log index `index`; false if that
    /// takes longer than `timeout`.
    pub async fn wait_synced(&self, index: u64, timeout: Duration) -> bool {
        let mut synced = self.synced.subscribe();
        tokio::time::timeout(timeout, synced.wait_for(|&at| at >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Recent guest logs of the invocations this node's gateway took.
    pub fn logs(&self) -> &GuestLogs {
        &self.logs
    }

    /// The runtime functions run in.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Largest module accepted, bytes.
    pub fn max_module_bytes(&self) -> u64 {
        self.max_module_bytes
    }

    /// Validates and compiles `wasm` for function `name` and returns the command that
    /// deploys it. Blocks while compiling: call from a blocking-capable thread.
    pub fn prepare_deploy(
        &self,
        name: &FunctionName,
        wasm: &[u8],
        spec: FunctionSpec,
    ) -> Result<Command, FunctionError> {
        if wasm.len() as u64 > self.max_module_bytes {
            return Err(FunctionError::ModuleTooLarge {
                size: wasm.len() as u64,
                limit: self.max_module_bytes,
            });
        }
        check_spec(&spec)?;
        // WebAssembly text is stored as the binary it assembles to.
        let wasm = crate::runtime::to_binary(wasm)?;
        // Compiling now rejects a bad module before it is replicated, and leaves the
        // compiled code in the cache for when the command is applied.
        self.runtime.prepare(&wasm, &spec.limits)?;
        Ok(Command::DeployFunction {
            name: name.clone(),
            spec,
            module: bytes::Bytes::from(wasm.into_owned()),
            deployed_at_ms: crate::scheduler::now_ms(),
        })
    }

    /// The versions of function `name` the cluster keeps for rollbacks, oldest first, as
    /// this node's state holds them.
    pub fn versions(&self, name: &FunctionName) -> Result<Vec<FunctionRecord>, FunctionError> {
        let versions = self.state.function_versions(name)?;
        if versions.is_empty() {
            return Err(FunctionError::NotFound(name.clone()));
        }
        Ok(versions)
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
        let limits = &function.record.spec.limits;
        let _counted = self.runtime.count_invocation(limits);
        Ok(self
            .runtime
            .invoke(&function.prepared, limits, invocation)
            .await?)
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

impl Observer for Functions {
    fn applied(&self, last_index: u64, changes: &[&CommandResponse]) {
        // A relabeling that a later change of the same function supersedes is skipped
        // (a batch may carry many of them).
        let mut last_change: HashMap<&FunctionName, usize> = HashMap::new();
        for (i, change) in changes.iter().enumerate() {
            if let Some(name) = change.function() {
                last_change.insert(name, i);
            }
        }
        for (i, change) in changes.iter().enumerate() {
            match change {
                CommandResponse::Deployed(record) => {
                    let name = record.name.clone();
                    match self.prepare_stored(record.clone()) {
                        Some(deployed) => {
                            tracing::info!(function = %name, version = record.version, digest = %record.digest, "deployed");
                            self.write_live().insert(name, Arc::new(deployed));
                        }
                        None => {
                            self.write_live().remove(&name);
                        }
                    }
                }
                CommandResponse::Deleted(name) => {
                    tracing::info!(function = %name, "removed");
                    self.write_live().remove(name);
                    self.logs.forget(name);
                }
                CommandResponse::Labeled(name) if last_change.get(name) == Some(&i) => {
                    match self.state.get_function(name) {
                        Ok(Some(record)) => {
                            let mut live = self.write_live();
                            if let Some(current) = live.get(name).cloned() {
                                let relabeled = deployed(record, current.prepared.clone());
                                live.insert(name.clone(), Arc::new(relabeled));
                            }
                        }
                        Ok(None) => {}
                        Err(err) => {
                            tracing::error!(function = %name, error = %err, "reading relabeled function")
                        }
                    }
                }
                // Superseded relabelings; refusals; batches arrive flattened; scheduling
                // changes are the scheduler's.
                _ => {}
            }
        }
        self.synced.send_modify(|at| *at = (*at).max(last_index));
    }

    fn replaced(&self, last_index: u64) {
        if let Err(err) = self.reload() {
            tracing::error!(error = %err, "reloading functions after a snapshot");
        }
        self.synced.send_replace(last_index);
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
    for (name, value) in &spec.env {
        let reason = if name.is_empty() {
            Some("the name is empty")
        } else if name.contains('=') || name.contains('\0') {
            Some("names may not contain '=' or NUL")
        } else if RESERVED_ENV.contains(&name.as_str()) || name.starts_with("HTTP_") {
            Some("the name is reserved for request metadata")
        } else if value.contains('\0') {
            // The guest reads NUL-terminated strings: it would silently see the
            // value cut short.
            Some("values may not contain NUL")
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
    if limits.accel > 1 {
        return Err(FunctionError::InvalidLimit(
            "accel is 0 or 1 (a run is granted at most one device)".into(),
        ));
    }
    if limits.accel_memory_mb == 0 || limits.accel_memory_mb > 65536 {
        return Err(FunctionError::InvalidLimit(
            "accel_memory_mb must be between 1 and 65536".into(),
        ));
    }
    Ok(())
}

//! What an agent runs: job attempts placed on it. It fetches modules (cached, compiled
//! once) and inputs from the servers by digest, runs each attempt in a fresh instance
//! (input on stdin, output from stdout), and reports `RUNNING` and then the result to
//! the cluster, retrying until a server answers. The leader's heartbeat answers list
//! what should run here: the worker starts what it lacks and stops what it should not
//! run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::cluster::ClusterError;
use crate::digest::Digest;
use crate::rpc::{read_failure, RpcError, RpcHandle};
use crate::runtime::{Exit, Invocation, InvokeError, Limits, Outcome, Prepared, Runtime, Stdio};
use crate::scheduler::serverless::AgentLoad;
use crate::scheduler::LaunchSpec;
use crate::state::{write_task_ref, write_task_update, AgentId, TaskRef, TaskUpdate};

/// Why an invocation did not run here.
#[derive(Debug)]
pub enum RunError {
    /// No instance slot free.
    Busy(String),
    /// The module could not be had, or instantiation failed.
    Failed(String),
}

/// Pause between retries of a report or fetch while no server answers.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

struct TaskEntry {
    started: Instant,
    handle: Option<tokio::task::AbortHandle>,
    /// The attempt ended; its result is being reported.
    ended: bool,
}

/// The agent's running work.
pub struct Worker {
    id: AgentId,
    rpc: RpcHandle,
    servers: Vec<String>,
    runtime: Arc<Runtime>,
    /// Where attempts run (the process's main runtime, not the RPC thread's).
    spawner: tokio::runtime::Handle,
    /// Prepared modules by digest and whether they count fuel (limits with a fuel
    /// limit need code compiled for it).
    modules: Mutex<HashMap<(Digest, bool), Prepared>>,
    tasks: Mutex<HashMap<TaskRef, TaskEntry>>,
    /// Which server to try first (the last one that answered).
    preferred: Mutex<usize>,
    /// Invocations running now, and the most at once since the last heartbeat.
    busy: std::sync::atomic::AtomicU32,
    busy_peak: std::sync::atomic::AtomicU32,
}

impl Worker {
    /// A worker for agent `id` that reaches `servers` through `rpc`.
    pub fn new(
        id: AgentId,
        rpc: RpcHandle,
        servers: Vec<String>,
        runtime: Arc<Runtime>,
    ) -> Arc<Worker> {
        Arc::new(Worker {
            id,
            rpc,
            servers,
            runtime,
            spawner: tokio::runtime::Handle::current(),
            modules: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            preferred: Mutex::new(0),
            busy: std::sync::atomic::AtomicU32::new(0),
            busy_peak: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// The most invocations that ran at once since the last call, and the most of
    /// them granted a device (for the heartbeat).
    pub fn take_load(&self) -> AgentLoad {
        use std::sync::atomic::Ordering;
        let now = self.busy.load(Ordering::Relaxed);
        AgentLoad {
            slots: u64::from(self.busy_peak.swap(now, Ordering::Relaxed).max(now)),
            accelerators: self
                .runtime
                .accel()
                .map_or(0, |link| u64::from(link.take_invocation_peak())),
        }
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<TaskRef, TaskEntry>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The attempts it runs (or whose results it still reports).
    pub fn running(&self) -> Vec<TaskRef> {
        let mut running: Vec<TaskRef> = self.tasks().keys().copied().collect();
        running.sort();
        running
    }

    /// Starts `spec` unless it already runs (or ran) here.
    pub fn launch(self: &Arc<Worker>, spec: LaunchSpec) {
        let mut tasks = self.tasks();
        if tasks.contains_key(&spec.task) {
            return;
        }
        let task = spec.task;
        tasks.insert(
            task,
            TaskEntry {
                started: Instant::now(),
                handle: None,
                ended: false,
            },
        );
        let worker = self.clone();
        let handle = self.spawner.spawn(async move { worker.run(spec).await });
        if let Some(entry) = tasks.get_mut(&task) {
            entry.handle = Some(handle.abort_handle());
        }
    }

    /// Stops attempt `task` (its result, if any, is not reported).
    pub fn kill(&self, task: &TaskRef) {
        if let Some(entry) = self.tasks().remove(task) {
            if let Some(handle) = entry.handle {
                handle.abort();
            }
            tracing::info!(agent = %self.id, %task, "attempt stopped");
        }
    }

    /// Runs what the leader lists for this agent and stops what it does not list
    /// (except attempts younger than `grace`, which the leader may not know of yet, and
    /// ended attempts whose results are being reported).
    pub fn reconcile(self: &Arc<Worker>, assigned: Vec<LaunchSpec>, grace: Duration) {
        let listed: std::collections::HashSet<TaskRef> = assigned.iter().map(|s| s.task).collect();
        for spec in assigned {
            self.launch(spec);
        }
        let stale: Vec<TaskRef> = self
            .tasks()
            .iter()
            .filter(|(task, entry)| {
                !listed.contains(task) && !entry.ended && entry.started.elapsed() > grace
            })
            .map(|(task, _)| *task)
            .collect();
        for task in stale {
            self.kill(&task);
        }
    }

    async fn run(self: Arc<Worker>, spec: LaunchSpec) {
        let task = spec.task;
        tracing::info!(agent = %self.id, %task, function = %spec.function, "attempt starting");
        let running = {
            let worker = self.clone();
            self.spawner
                .spawn(async move { worker.report(task, TaskUpdate::Running).await })
        };
        let update = self.execute(&spec).await;
        // Reports go in order: RUNNING first.
        let _ = running.await;
        if let Some(entry) = self.tasks().get_mut(&task) {
            entry.ended = true;
        }
        let outcome = match &update {
            TaskUpdate::Finished { output, .. } => format!("finished, {} bytes out", output.len()),
            TaskUpdate::Failed { reason, .. } => format!("failed: {reason}"),
            TaskUpdate::Running => "running".into(),
        };
        tracing::info!(agent = %self.id, %task, outcome, "attempt ended");
        self.report(task, update).await;
        self.tasks().remove(&task);
    }

    async fn execute(&self, spec: &LaunchSpec) -> TaskUpdate {
        let failed = |reason: String| TaskUpdate::Failed {
            reason,
            exit_code: None,
            log: Bytes::new(),
        };
        let failed_with_log = |reason: String, log: &Bytes| TaskUpdate::Failed {
            reason,
            exit_code: None,
            log: log.clone(),
        };
        let prepared = match self.module(spec).await {
            Ok(prepared) => prepared,
            Err(why) => return failed(why),
        };
        let input = match self.fetch(&spec.input).await {
            Ok(Some(input)) => Bytes::from(input),
            Ok(None) => return failed(format!("input {} is gone", spec.input.short())),
            Err(e) => return failed(format!("fetching the input: {e}")),
        };
        let invocation = Invocation {
            args: vec![spec.function.to_string()],
            env: spec.env.iter().collect(),
            stdio: Stdio::Captured(input),
        };
        let outcome = match self
            .runtime
            .invoke(&prepared, &spec.limits, invocation)
            .await
        {
            Ok(outcome) => outcome,
            Err(e) => return failed(e.to_string()),
        };
        let log = outcome.log;
        match outcome.exit {
            Exit::Code(0) => TaskUpdate::Finished {
                exit_code: 0,
                output: outcome.stdout,
                log,
            },
            Exit::Code(code) => TaskUpdate::Failed {
                reason: format!("exited with code {code}{}", log_tail(&log)),
                exit_code: Some(code),
                log,
            },
            Exit::Timeout => failed_with_log(
                format!("timed out after {} ms", spec.limits.timeout_ms),
                &log,
            ),
            Exit::MemoryLimit => failed_with_log(
                format!("memory limit of {} MiB exceeded", spec.limits.memory_mb),
                &log,
            ),
            Exit::ResponseTooLarge => failed_with_log(
                format!(
                    "output over its limit of {} bytes",
                    spec.limits.max_response_bytes
                ),
                &log,
            ),
            Exit::OutOfFuel => failed_with_log(
                format!("used all of its fuel ({} units)", spec.limits.fuel),
                &log,
            ),
            Exit::Trap(message) => failed_with_log(format!("trapped: {message}"), &log),
        }
    }

    /// Runs one invocation (under a serverless lease) of the module `module`, on the
    /// process's main runtime.
    pub async fn invoke(
        self: &Arc<Worker>,
        module: Digest,
        limits: Limits,
        invocation: Invocation,
    ) -> Result<Outcome, RunError> {
        use std::sync::atomic::Ordering;
        let running = self.busy.fetch_add(1, Ordering::Relaxed) + 1;
        self.busy_peak.fetch_max(running, Ordering::Relaxed);
        let worker = self.clone();
        let run = self.spawner.spawn(async move {
            let _counted = worker.runtime.count_invocation(&limits);
            let prepared = worker
                .prepared(module, limits)
                .await
                .map_err(RunError::Failed)?;
            worker
                .runtime
                .invoke(&prepared, &limits, invocation)
                .await
                .map_err(|e| match e {
                    InvokeError::Busy(why) => RunError::Busy(why),
                    other => RunError::Failed(other.to_string()),
                })
        });
        let result = run
            .await
            .map_err(|e| RunError::Failed(format!("the run was lost: {e}")));
        self.busy.fetch_sub(1, Ordering::Relaxed);
        result?
    }

    /// The prepared module of `spec`: cached, else fetched and compiled.
    async fn module(&self, spec: &LaunchSpec) -> Result<Prepared, String> {
        self.prepared(spec.module, spec.limits)
            .await
            .map_err(|e| format!("`{}`: {e}", spec.function))
    }

    /// The prepared module `digest`: cached, else fetched and compiled.
    async fn prepared(&self, digest: Digest, limits: Limits) -> Result<Prepared, String> {
        let key = (digest, limits.fuel > 0);
        if let Some(prepared) = self
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(prepared.clone());
        }
        let wasm = match self.fetch(&digest).await {
            Ok(Some(wasm)) => wasm,
            Ok(None) => {
                return Err(format!(
                    "module {} is gone (redeployed or deleted)",
                    digest.short()
                ))
            }
            Err(e) => return Err(format!("fetching the module: {e}")),
        };
        if crate::digest::Digest::of(&wasm) != digest {
            return Err("the fetched module does not match its digest".into());
        }
        let runtime = self.runtime.clone();
        let prepared = tokio::task::spawn_blocking(move || runtime.prepare(&wasm, &limits))
            .await
            .map_err(|e| format!("compiling the module: {e}"))?
            .map_err(|e| format!("compiling the module: {e}"))?;
        self.modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, prepared.clone());
        Ok(prepared)
    }

    fn server(&self, attempt: usize) -> String {
        let first = *self.preferred.lock().unwrap_or_else(|p| p.into_inner());
        self.servers[(first + attempt) % self.servers.len()].clone()
    }

    fn answered(&self, attempt: usize) {
        let mut preferred = self.preferred.lock().unwrap_or_else(|p| p.into_inner());
        *preferred = (*preferred + attempt) % self.servers.len();
    }

    /// Fetches a module or job data by digest from any server.
    async fn fetch(&self, digest: &Digest) -> Result<Option<Vec<u8>>, ClusterError> {
        let mut last = None;
        for attempt in 0..self.servers.len() * 3 {
            let addr = self.server(attempt);
            let wanted = digest.to_string();
            let target = addr.clone();
            let result = self
                .rpc
                .run(move |peers| async move {
                    let (node, _) = peers.get(&target).await?;
                    let mut request = node.fetch_request();
                    request.get().set_digest(wanted.as_str());
                    let reply = request.send().promise.await.map_err(|e| {
                        peers.forget(&target);
                        RpcError::from_capnp(&target, e)
                    })?;
                    let fail = |e: capnp::Error| RpcError::from_capnp(&target, e);
                    let r = reply.get().map_err(fail)?;
                    Ok::<_, RpcError>(if r.get_found() {
                        Some(r.get_data().map_err(fail)?.to_vec())
                    } else {
                        None
                    })
                })
                .await
                .and_then(|r| r);
            match result {
                Ok(found) => {
                    self.answered(attempt);
                    return Ok(found);
                }
                Err(e) => {
                    last = Some(ClusterError::from(e));
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| ClusterError::Unavailable("no server".into())))
    }

    /// Reports on `task` through any server until one answers (or the attempt was
    /// stopped here). A stale report (the cluster moved on) is dropped.
    async fn report(&self, task: TaskRef, update: TaskUpdate) {
        let mut attempt = 0usize;
        loop {
            if !self.tasks().contains_key(&task) {
                return;
            }
            let addr = self.server(attempt);
            let (target, change) = (addr.clone(), update.clone());
            let result =
                self.rpc
                    .run(move |peers| async move {
                        let (node, _) = peers.get(&target).await?;
                        let transport =
                            |e: capnp::Error| ClusterError::from(RpcError::from_capnp(&target, e));
                        let mut request = node.task_update_request();
                        write_task_ref(request.get().init_task(), &task);
                        write_task_update(request.get().init_update(), &change);
                        let reply = request.send().promise.await.map_err(|e| {
                            peers.forget(&target);
                            transport(e)
                        })?;
                        let r = reply.get().map_err(transport)?;
                        if r.has_failure() {
                            return Err(read_failure(r.get_failure().map_err(transport)?)
                                .map_err(transport)?);
                        }
                        Ok(r.get_accepted())
                    })
                    .await
                    .map_err(ClusterError::from)
                    .and_then(|r| r);
            match result {
                Ok(accepted) => {
                    self.answered(attempt);
                    if !accepted {
                        tracing::info!(agent = %self.id, %task, "report dropped by the cluster (a later attempt or the job ended)");
                    }
                    return;
                }
                Err(ClusterError::Rejected(why)) => {
                    tracing::warn!(agent = %self.id, %task, error = why, "report refused");
                    return;
                }
                Err(e) => {
                    if attempt.is_multiple_of(10) {
                        tracing::warn!(agent = %self.id, %task, error = %e, "reporting; retrying");
                    }
                    attempt += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }
}

/// The last line of a guest's log, for a failure message.
fn log_tail(log: &[u8]) -> String {
    let text = String::from_utf8_lossy(log);
    match text.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(line) => format!(": {}", line.chars().take(200).collect::<String>()),
        None => String::new(),
    }
}

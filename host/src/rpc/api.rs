//! The public Cap'n Proto API (`capnp/cluster.capnp`): the `Gateway` served on a
//! server's `--api` port, the token-scoped `Cluster` capability it hands out, chunked
//! uploads, and event subscriptions.
//!
//! Every method re-checks its token against the node's token index before it acts, so
//! a revoked token's capabilities stop working at once. The work itself is the REST
//! API's: the same commits, reads and invocation path, and the same errors
//! ([`ApiError`]), answered in the result's `error` field.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::sync::broadcast::error::RecvError;
use wafer_proto::cluster_capnp::{
    cluster, cluster_status, error, event, event_sink, framework_info, function_info, gateway,
    job_info, key_value, node_info, resources, subscription, task_info, token_info, upload,
    Scope as WireScope,
};

use crate::events::{Event, EventKind};
use crate::gateway::extract::Path;
use crate::gateway::{read_job, wait_job, ApiError, ApiErrorInfo, AppState};
use crate::state::{
    Command, Constraint, FunctionName, FunctionRecord, FunctionSpec, JobId, JobRecord, Resources,
    Scope, TaskState, TokenRecord,
};

/// Largest chunk `Upload.write` takes.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
/// Longest `awaitJob` waits.
const MAX_AWAIT: Duration = Duration::from_secs(300);
/// How often a subscription without events re-checks its token.
const TOKEN_RECHECK: Duration = Duration::from_secs(1);
/// Jobs listed when a caller gives no limit.
const DEFAULT_JOB_LIMIT: usize = 100;

/// Reader limits of the public API: a message over 64 MiB, or nested deeper than 64, is
/// refused and its connection closed.
pub fn reader_options() -> capnp::message::ReaderOptions {
    let mut options = capnp::message::ReaderOptions::new();
    options.traversal_limit_in_words(Some(8 << 20));
    options.nesting_limit(64);
    options
}

/// The bootstrap `Gateway`.
pub struct GatewayService {
    app: Arc<AppState>,
}

impl GatewayService {
    /// Serves the node whose gateway state is `app`.
    pub fn new(app: Arc<AppState>) -> GatewayService {
        GatewayService { app }
    }
}

impl gateway::Server for GatewayService {
    async fn login(
        self: Rc<Self>,
        params: gateway::LoginParams,
        mut results: gateway::LoginResults,
    ) -> Result<(), capnp::Error> {
        let token = params.get()?.get_token()?.to_str()?;
        match self.app.tokens.authenticate(Some(token)) {
            Ok(record) => {
                write_token(results.get().init_token(), &record);
                let cluster = ClusterService {
                    app: self.app.clone(),
                    hash: record.hash.clone(),
                };
                results
                    .get()
                    .set_cluster(capnp_rpc::new_client::<cluster::Client, _>(cluster));
            }
            Err(e) => {
                tracing::debug!(error = %e, "API login refused");
                write_error(results.get().init_error(), &ApiError::from(e));
            }
        }
        Ok(())
    }
}

/// A logged-in client's `Cluster`: what its token allows.
struct ClusterService {
    app: Arc<AppState>,
    /// The token's hash, looked up again on every call.
    hash: String,
}

impl ClusterService {
    fn check(&self, scope: Scope) -> Result<Arc<TokenRecord>, ApiError> {
        check(&self.app, &self.hash, scope)
    }
}

fn check(app: &AppState, hash: &str, scope: Scope) -> Result<Arc<TokenRecord>, ApiError> {
    app.tokens
        .authorize_hash(hash, scope)
        .map_err(ApiError::from)
}

/// Answers `$results` with `$outcome`'s error, if any; else runs `$write` on the
/// value.
macro_rules! answer {
    ($results:ident, $outcome:expr, |$value:ident| $write:expr) => {{
        match $outcome {
            Ok($value) => {
                $write;
            }
            Err(e) => write_error($results.get().init_error(), &e),
        }
        Ok(())
    }};
}

impl cluster::Server for ClusterService {
    async fn deploy(
        self: Rc<Self>,
        params: cluster::DeployParams,
        mut results: cluster::DeployResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let outcome = (|| {
            self.check(Scope::Deploy)?;
            let name: FunctionName = params.get_name()?.to_str()?.parse()?;
            let manifest = params.get_manifest()?.to_str()?;
            let spec = if manifest.trim().is_empty() {
                FunctionSpec::default()
            } else {
                serde_json::from_str::<FunctionSpec>(manifest).map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_manifest",
                        format!("invalid manifest: {e}"),
                    )
                })?
            };
            let size = params.get_size();
            let limit = self.app.functions.max_module_bytes();
            if size > limit {
                return Err(too_large(format!(
                    "module of {size} bytes exceeds the limit of {limit} bytes"
                )));
            }
            Ok(UploadService {
                app: self.app.clone(),
                hash: self.hash.clone(),
                name,
                spec,
                size,
                received: RefCell::new(Vec::new()),
                closed: Cell::new(false),
            })
        })();
        answer!(results, outcome, |upload| results
            .get()
            .set_upload(capnp_rpc::new_client::<upload::Client, _>(upload)))
    }

    async fn list_functions(
        self: Rc<Self>,
        _: cluster::ListFunctionsParams,
        mut results: cluster::ListFunctionsResults,
    ) -> Result<(), capnp::Error> {
        let outcome = self.check(Scope::Read).map(|_| self.app.functions.list());
        answer!(results, outcome, |functions| {
            let mut list = results.get().init_functions(functions.len() as u32);
            for (i, record) in functions.iter().enumerate() {
                write_function(list.reborrow().get(i as u32), record);
            }
        })
    }

    async fn get_function(
        self: Rc<Self>,
        params: cluster::GetFunctionParams,
        mut results: cluster::GetFunctionResults,
    ) -> Result<(), capnp::Error> {
        let name = params.get()?.get_name()?.to_str()?.to_string();
        let outcome = (|| {
            self.check(Scope::Read)?;
            let name: FunctionName = name.parse()?;
            Ok::<_, ApiError>(self.app.functions.get(&name)?.record.clone())
        })();
        answer!(results, outcome, |record| write_function(
            results.get().init_function(),
            &record
        ))
    }

    async fn list_versions(
        self: Rc<Self>,
        params: cluster::ListVersionsParams,
        mut results: cluster::ListVersionsResults,
    ) -> Result<(), capnp::Error> {
        let name = params.get()?.get_name()?.to_str()?.to_string();
        let outcome = (|| {
            self.check(Scope::Read)?;
            let name: FunctionName = name.parse()?;
            Ok::<_, ApiError>(self.app.functions.versions(&name)?)
        })();
        answer!(results, outcome, |versions| {
            let mut list = results.get().init_versions(versions.len() as u32);
            for (i, record) in versions.iter().enumerate() {
                write_function(list.reborrow().get(i as u32), record);
            }
        })
    }

    async fn rollback_function(
        self: Rc<Self>,
        params: cluster::RollbackFunctionParams,
        mut results: cluster::RollbackFunctionResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let name = params.get_name()?.to_str()?.to_string();
        let version = Some(params.get_version()).filter(|v| *v != 0);
        let outcome = async {
            self.check(Scope::Deploy)?;
            let name: FunctionName = name.parse()?;
            let command = Command::RollbackFunction {
                name: name.clone(),
                version,
                at_ms: crate::scheduler::now_ms(),
            };
            crate::gateway::commit(&self.app, command).await?;
            Ok::<_, ApiError>(self.app.functions.get(&name)?.record.clone())
        }
        .await;
        answer!(results, outcome, |record| write_function(
            results.get().init_function(),
            &record
        ))
    }

    async fn delete_function(
        self: Rc<Self>,
        params: cluster::DeleteFunctionParams,
        mut results: cluster::DeleteFunctionResults,
    ) -> Result<(), capnp::Error> {
        let name = params.get()?.get_name()?.to_str()?.to_string();
        let outcome = async {
            self.check(Scope::Deploy)?;
            let name: FunctionName = name.parse()?;
            crate::gateway::commit(&self.app, Command::DeleteFunction { name }).await?;
            Ok::<_, ApiError>(())
        }
        .await;
        if let Err(e) = outcome {
            write_error(results.get().init_error(), &e);
        }
        Ok(())
    }

    async fn invoke(
        self: Rc<Self>,
        params: cluster::InvokeParams,
        mut results: cluster::InvokeResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let name = params.get_name()?.to_str()?.to_string();
        let request = params.get_request()?;
        let outcome = async {
            self.check(Scope::Invoke)?;
            let body = bytes::Bytes::copy_from_slice(request.get_body()?);
            let method = match request.get_method()?.to_str()? {
                "" if body.is_empty() => Method::GET,
                "" => Method::POST,
                other => Method::from_bytes(other.as_bytes())
                    .map_err(|_| ApiError::bad_request(format!("bad method {other:?}")))?,
            };
            let target = request.get_path()?.to_str()?;
            let target = if target.starts_with('/') {
                target.to_string()
            } else {
                format!("/{target}")
            };
            let (path, _) = target.split_once('?').unwrap_or((&target, ""));
            let path = path.trim_start_matches('/');
            let uri: Uri = format!("/fn/{name}{target}")
                .parse()
                .map_err(|e| ApiError::bad_request(format!("bad path {target:?}: {e}")))?;
            let mut headers = HeaderMap::new();
            for header in request.get_headers()? {
                let key = header.get_key()?.to_str()?;
                let value = header.get_value()?.to_str()?;
                let (Ok(key), Ok(value)) = (
                    HeaderName::from_bytes(key.as_bytes()),
                    // UTF-8 beyond ASCII passes, as through the HTTP gateway.
                    HeaderValue::from_bytes(value.as_bytes()),
                ) else {
                    return Err(ApiError::bad_request(format!("bad header {key:?}")));
                };
                headers.append(key, value);
            }
            headers.insert(
                axum::http::header::CONTENT_LENGTH,
                HeaderValue::from(body.len()),
            );
            let params = crate::gateway::FnPath::new(
                name.clone(),
                (!path.is_empty()).then(|| path.to_string()),
            );
            let response = crate::gateway::invoke(
                State(self.app.clone()),
                Path(params),
                method,
                uri,
                // Not HTTP on the wire: the guest sees what an HTTP/1.1 call gives it.
                axum::http::Version::HTTP_11,
                headers,
                axum::body::Body::from(body),
            )
            .await;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })?
                .to_bytes();
            Ok::<_, ApiError>((parts, body))
        }
        .await;
        answer!(results, outcome, |answer| {
            let (parts, body) = answer;
            let failure = parts.extensions.get::<ApiErrorInfo>().cloned();
            let mut response = results.get().init_response();
            response.set_status(parts.status.as_u16());
            match &failure {
                Some(_) => {
                    // The body is the error's JSON; its `log` is the guest's.
                    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    response.set_log(json["log"].as_str().unwrap_or_default());
                }
                None => {
                    let mut list = response.reborrow().init_headers(parts.headers.len() as u32);
                    for (i, (key, value)) in parts.headers.iter().enumerate() {
                        let mut kv = list.reborrow().get(i as u32);
                        kv.set_key(key.as_str());
                        kv.set_value(String::from_utf8_lossy(value.as_bytes()).as_ref());
                    }
                    response.set_body(&body);
                }
            }
            if let Some(info) = failure {
                write_error(
                    results.get().init_error(),
                    &ApiError::new(parts.status, info.code, info.message),
                );
            }
        })
    }

    async fn submit_job(
        self: Rc<Self>,
        params: cluster::SubmitJobParams,
        mut results: cluster::SubmitJobResults,
    ) -> Result<(), capnp::Error> {
        let spec = params.get()?.get_job()?;
        let outcome = async {
            self.check(Scope::Invoke)?;
            let function: FunctionName = spec.get_function()?.to_str()?.parse()?;
            let mut constraints = Vec::new();
            for c in spec.get_constraints()? {
                constraints.push(c?.to_str()?.parse::<Constraint>().map_err(|e| {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string())
                })?);
            }
            let max_attempts = match spec.get_max_attempts() {
                0 => crate::gateway::DEFAULT_ATTEMPTS,
                n => n,
            };
            crate::gateway::submit_job(
                &self.app,
                function,
                bytes::Bytes::copy_from_slice(spec.get_input()?),
                constraints,
                max_attempts,
                spec.get_accel(),
            )
            .await
        }
        .await;
        answer!(results, outcome, |job| write_job(
            &self.app,
            results.get().init_job(),
            &job
        ))
    }

    async fn await_job(
        self: Rc<Self>,
        params: cluster::AwaitJobParams,
        mut results: cluster::AwaitJobResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let id = JobId(params.get_id());
        let wait = Duration::from_millis(u64::from(params.get_timeout_ms())).min(MAX_AWAIT);
        // A token revoked while waiting ends the wait.
        let outcome = wait_job(&self.app, id, Instant::now() + wait, || {
            self.check(Scope::Read).map(|_| ())
        })
        .await;
        answer!(results, outcome, |job| write_job(
            &self.app,
            results.get().init_job(),
            &job
        ))
    }

    async fn get_job(
        self: Rc<Self>,
        params: cluster::GetJobParams,
        mut results: cluster::GetJobResults,
    ) -> Result<(), capnp::Error> {
        let id = JobId(params.get()?.get_id());
        let outcome = self
            .check(Scope::Read)
            .and_then(|_| read_job(&self.app, id));
        answer!(results, outcome, |job| write_job(
            &self.app,
            results.get().init_job(),
            &job
        ))
    }

    async fn kill_job(
        self: Rc<Self>,
        params: cluster::KillJobParams,
        mut results: cluster::KillJobResults,
    ) -> Result<(), capnp::Error> {
        let id = JobId(params.get()?.get_id());
        let outcome = async {
            self.check(Scope::Invoke)?;
            crate::gateway::commit(
                &self.app,
                Command::KillJob {
                    job: id,
                    at_ms: crate::scheduler::now_ms(),
                },
            )
            .await?;
            read_job(&self.app, id)
        }
        .await;
        answer!(results, outcome, |job| write_job(
            &self.app,
            results.get().init_job(),
            &job
        ))
    }

    async fn list_jobs(
        self: Rc<Self>,
        params: cluster::ListJobsParams,
        mut results: cluster::ListJobsResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let limit = match params.get_limit() {
            0 => DEFAULT_JOB_LIMIT,
            n => n as usize,
        };
        let state = params.get_state()?.to_str()?.to_uppercase();
        let outcome = (|| {
            self.check(Scope::Read)?;
            let state = if state.is_empty() {
                None
            } else {
                Some(
                    serde_json::from_value::<TaskState>(serde_json::Value::String(state.clone()))
                        .map_err(|_| ApiError::bad_request(format!("unknown state {state:?}")))?,
                )
            };
            self.app
                .scheduler
                .jobs(limit, state)
                .map_err(|e| unavailable(e.to_string()))
        })();
        answer!(results, outcome, |jobs| {
            let mut list = results.get().init_jobs(jobs.len() as u32);
            for (i, job) in jobs.iter().enumerate() {
                write_job(&self.app, list.reborrow().get(i as u32), job);
            }
        })
    }

    async fn list_nodes(
        self: Rc<Self>,
        _: cluster::ListNodesParams,
        mut results: cluster::ListNodesResults,
    ) -> Result<(), capnp::Error> {
        let outcome = self
            .check(Scope::Read)
            .and_then(|_| self.app.scheduler.agents().map_err(ApiError::from));
        answer!(results, outcome, |agents| {
            let mut list = results.get().init_nodes(agents.len() as u32);
            for (i, agent) in agents.iter().enumerate() {
                let mut b: node_info::Builder<'_> = list.reborrow().get(i as u32);
                let record = &agent.record;
                b.set_id(record.id.as_str());
                b.set_rpc(record.rpc.as_str());
                b.set_state(match record.state {
                    crate::state::AgentState::Active => "active",
                    crate::state::AgentState::Unreachable => "unreachable",
                });
                write_amounts(b.reborrow().init_resources(), &record.resources);
                write_amounts(b.reborrow().init_allocated(), &record.allocated);
                write_amounts(b.reborrow().init_free(), &agent.free);
                write_pairs(
                    b.init_attributes(record.attributes.len() as u32),
                    record.attributes.iter(),
                );
            }
        })
    }

    async fn list_tasks(
        self: Rc<Self>,
        _: cluster::ListTasksParams,
        mut results: cluster::ListTasksResults,
    ) -> Result<(), capnp::Error> {
        let outcome = self.check(Scope::Read).and_then(|_| {
            self.app
                .scheduler
                .jobs(1000, None)
                .map_err(|e| unavailable(e.to_string()))
        });
        answer!(results, outcome, |jobs| {
            let count: usize = jobs.iter().map(|j| j.attempts.len()).sum();
            let mut list = results.get().init_tasks(count as u32);
            let mut i = 0;
            for job in &jobs {
                for attempt in job.attempts.iter().rev() {
                    write_task(list.reborrow().get(i), job, attempt);
                    i += 1;
                }
            }
        })
    }

    async fn list_frameworks(
        self: Rc<Self>,
        _: cluster::ListFrameworksParams,
        mut results: cluster::ListFrameworksResults,
    ) -> Result<(), capnp::Error> {
        let outcome = self.check(Scope::Read).and_then(|_| {
            self.app
                .scheduler
                .view()
                .map_err(|e| unavailable(e.to_string()))
        });
        answer!(results, outcome, |view| {
            let total = view
                .agents
                .values()
                .filter(|a| a.state == crate::state::AgentState::Active)
                .fold(Resources::ZERO, |sum, a| sum.plus(&a.resources));
            let mut list = results.get().init_frameworks(view.frameworks.len() as u32);
            for (i, f) in view.frameworks.values().enumerate() {
                let allocated = view
                    .allocations
                    .values()
                    .filter(|a| a.framework == f.id)
                    .fold(Resources::ZERO, |sum, a| sum.plus(&a.resources));
                let mut b: framework_info::Builder<'_> = list.reborrow().get(i as u32);
                b.set_id(f.id.as_str());
                b.set_name(f.name.as_str());
                b.set_role(f.role.as_str());
                b.set_weight(view.role(&f.role).weight);
                b.set_allocated_share(allocated.dominant_share(&total));
                write_amounts(b.init_allocated(), &allocated);
            }
        })
    }

    async fn status(
        self: Rc<Self>,
        _: cluster::StatusParams,
        mut results: cluster::StatusResults,
    ) -> Result<(), capnp::Error> {
        let outcome = self.check(Scope::Read).map(|_| self.app.cluster.status());
        answer!(results, outcome, |status| {
            let mut b: cluster_status::Builder<'_> = results.get().init_status();
            b.set_id(status.id);
            b.set_state(status.state.as_str());
            b.set_leader_id(status.leader_id.unwrap_or(0));
            b.set_term(status.term);
            b.set_last_log_index(status.last_log_index.unwrap_or(0));
            b.set_applied_index(status.applied_index.unwrap_or(0));
            let mut list = b.init_members(status.members.len() as u32);
            for (i, m) in status.members.iter().enumerate() {
                let mut member = list.reborrow().get(i as u32);
                member.set_id(m.id);
                member.set_rpc(m.rpc.as_str());
                member.set_http(m.http.as_str());
                member.set_voter(m.voter);
            }
        })
    }

    async fn watch(
        self: Rc<Self>,
        params: cluster::WatchParams,
        mut results: cluster::WatchResults,
    ) -> Result<(), capnp::Error> {
        let sink = params.get()?.get_sink()?;
        if let Err(e) = self.check(Scope::Read) {
            write_error(results.get().init_error(), &e);
            return Ok(());
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let receiver = self.app.events.subscribe();
        tokio::task::spawn_local(deliver(
            self.app.clone(),
            self.hash.clone(),
            receiver,
            sink,
            stopped,
        ));
        let subscription = SubscriptionService {
            stop: RefCell::new(Some(stop)),
        };
        results
            .get()
            .set_subscription(capnp_rpc::new_client::<subscription::Client, _>(
                subscription,
            ));
        Ok(())
    }
}

/// Sends events to `sink` one at a time (each after the previous one was received)
/// until `stopped` fires, the sink fails or the token stops being valid.
async fn deliver(
    app: Arc<AppState>,
    hash: String,
    mut events: tokio::sync::broadcast::Receiver<Arc<Event>>,
    sink: event_sink::Client,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let mut recheck = tokio::time::interval(TOKEN_RECHECK);
    loop {
        let next = tokio::select! {
            _ = &mut stopped => return,
            next = events.recv() => Some(next),
            _ = recheck.tick() => None,
        };
        let mut request = sink.event_request();
        if let Err(e) = check(&app, &hash, Scope::Read) {
            // Tell the client why the events stop, then stop.
            let mut b = request.get().init_event();
            b.set_at_ms(crate::scheduler::now_ms());
            b.set_ended(e.message.as_str());
            let _ = request.send().promise.await;
            return;
        }
        match next {
            None => continue,
            Some(Ok(event)) => write_event(request.get().init_event(), &event),
            Some(Err(RecvError::Lagged(missed))) => {
                let mut b = request.get().init_event();
                b.set_at_ms(crate::scheduler::now_ms());
                b.set_missed(missed);
            }
            Some(Err(RecvError::Closed)) => return,
        }
        let sent = tokio::select! {
            _ = &mut stopped => return,
            sent = request.send().promise => sent,
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "an event sink failed; ending its subscription");
            return;
        }
    }
}

/// Ends its event delivery when cancelled or dropped.
struct SubscriptionService {
    stop: RefCell<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl subscription::Server for SubscriptionService {
    async fn cancel(
        self: Rc<Self>,
        _: subscription::CancelParams,
        _: subscription::CancelResults,
    ) -> Result<(), capnp::Error> {
        if let Some(stop) = self.stop.borrow_mut().take() {
            let _ = stop.send(());
        }
        Ok(())
    }
}

/// A module being uploaded.
struct UploadService {
    app: Arc<AppState>,
    hash: String,
    name: FunctionName,
    spec: FunctionSpec,
    size: u64,
    received: RefCell<Vec<u8>>,
    /// Failed or finished: no more calls.
    closed: Cell<bool>,
}

impl UploadService {
    fn write_chunk(&self, chunk: &[u8]) -> Result<u64, ApiError> {
        check(&self.app, &self.hash, Scope::Deploy)?;
        if self.closed.get() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "upload_closed",
                "this upload has ended; start another with deploy",
            ));
        }
        if chunk.len() > MAX_CHUNK_BYTES {
            return Err(ApiError::bad_request(format!(
                "a chunk has at most {MAX_CHUNK_BYTES} bytes, this one {}",
                chunk.len()
            )));
        }
        let mut received = self.received.borrow_mut();
        let total = received.len() as u64 + chunk.len() as u64;
        if total > self.size {
            self.closed.set(true);
            *received = Vec::new();
            return Err(too_large(format!(
                "the upload exceeds the {} bytes announced for `{}`; nothing was stored",
                self.size, self.name
            )));
        }
        received.extend_from_slice(chunk);
        Ok(total)
    }

    async fn finish(&self) -> Result<FunctionRecord, ApiError> {
        check(&self.app, &self.hash, Scope::Deploy)?;
        if self.closed.replace(true) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "upload_closed",
                "this upload has ended; start another with deploy",
            ));
        }
        let wasm = std::mem::take(&mut *self.received.borrow_mut());
        if wasm.len() as u64 != self.size {
            return Err(ApiError::bad_request(format!(
                "received {} of the {} bytes announced; nothing was stored",
                wasm.len(),
                self.size
            )));
        }
        let functions = self.app.functions.clone();
        let (name, spec) = (self.name.clone(), self.spec.clone());
        let command =
            tokio::task::spawn_blocking(move || functions.prepare_deploy(&name, &wasm, spec))
                .await
                .map_err(|e| {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })??;
        crate::gateway::commit(&self.app, command).await?;
        Ok(self.app.functions.get(&self.name)?.record.clone())
    }
}

impl upload::Server for UploadService {
    async fn write(
        self: Rc<Self>,
        params: upload::WriteParams,
        mut results: upload::WriteResults,
    ) -> Result<(), capnp::Error> {
        let outcome = self.write_chunk(params.get()?.get_chunk()?);
        answer!(results, outcome, |received| results
            .get()
            .set_received(received))
    }

    async fn finish(
        self: Rc<Self>,
        _: upload::FinishParams,
        mut results: upload::FinishResults,
    ) -> Result<(), capnp::Error> {
        let outcome = UploadService::finish(&self).await;
        answer!(results, outcome, |record| write_function(
            results.get().init_function(),
            &record
        ))
    }
}

fn too_large(message: String) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
}

fn unavailable(message: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
}

impl From<capnp::Error> for ApiError {
    fn from(e: capnp::Error) -> ApiError {
        ApiError::bad_request(format!("malformed request: {e}"))
    }
}

impl From<std::str::Utf8Error> for ApiError {
    fn from(e: std::str::Utf8Error) -> ApiError {
        ApiError::bad_request(format!("text is not UTF-8: {e}"))
    }
}

/// Writes an [`ApiError`] as a capnp `Error`: a stable code from its HTTP status, its
/// REST code as the reason.
pub fn write_error(mut b: error::Builder<'_>, e: &ApiError) {
    let code = match e.status {
        StatusCode::UNAUTHORIZED => error::Code::Unauthorized,
        StatusCode::FORBIDDEN => error::Code::Forbidden,
        StatusCode::NOT_FOUND => error::Code::NotFound,
        StatusCode::PAYLOAD_TOO_LARGE => error::Code::TooLarge,
        StatusCode::CONFLICT => error::Code::Conflict,
        StatusCode::SERVICE_UNAVAILABLE => error::Code::Unavailable,
        StatusCode::GATEWAY_TIMEOUT => error::Code::Timeout,
        s if s.is_client_error() => error::Code::Invalid,
        _ if e.code == "internal" => error::Code::Internal,
        _ => error::Code::Failed,
    };
    b.set_code(code);
    b.set_reason(e.code);
    b.set_message(e.message.as_str());
}

fn write_token(mut b: token_info::Builder<'_>, record: &TokenRecord) {
    b.set_id(record.id.as_str());
    b.set_name(record.name.as_str());
    b.set_expires_at_ms(record.expires_at_ms.unwrap_or(0));
    let mut list = b.init_scopes(record.scopes.len() as u32);
    for (i, s) in record.scopes.iter().enumerate() {
        list.set(
            i as u32,
            match s {
                Scope::Admin => WireScope::Admin,
                Scope::Deploy => WireScope::Deploy,
                Scope::Invoke => WireScope::Invoke,
                Scope::Read => WireScope::Read,
            },
        );
    }
}

fn write_pairs<'a>(
    mut list: capnp::struct_list::Builder<'_, key_value::Owned>,
    pairs: impl Iterator<Item = (&'a String, &'a String)>,
) {
    for (i, (key, value)) in pairs.enumerate() {
        let mut kv = list.reborrow().get(i as u32);
        kv.set_key(key.as_str());
        kv.set_value(value.as_str());
    }
}

fn write_amounts(mut b: resources::Builder<'_>, r: &Resources) {
    b.set_slots(r.slots);
    b.set_memory_mb(r.memory_mb);
    b.set_accelerators(r.accelerators);
}

fn write_function(mut b: function_info::Builder<'_>, record: &FunctionRecord) {
    b.set_name(record.name.as_str());
    b.set_version(record.version);
    b.set_digest(record.digest.to_string().as_str());
    b.set_size(record.size);
    b.set_deployed_at_ms(record.deployed_at_ms);
    b.set_restored_from(record.restored_from.unwrap_or(0));
    let limits = &record.spec.limits;
    let mut l = b.reborrow().init_limits();
    l.set_memory_mb(limits.memory_mb);
    l.set_timeout_ms(limits.timeout_ms);
    l.set_max_request_bytes(limits.max_request_bytes);
    l.set_max_response_bytes(limits.max_response_bytes);
    l.set_max_log_bytes(limits.max_log_bytes);
    l.set_fuel(limits.fuel);
    write_pairs(
        b.reborrow().init_env(record.spec.env.len() as u32),
        record.spec.env.iter(),
    );
    write_pairs(
        b.init_labels(record.labels.len() as u32),
        record.labels.iter(),
    );
}

fn write_task(mut b: task_info::Builder<'_>, job: &JobRecord, attempt: &crate::state::Attempt) {
    b.set_job(job.id.0);
    b.set_attempt(attempt.number);
    b.set_function(job.function.as_str());
    b.set_agent(attempt.agent.as_str());
    b.set_state(attempt.state.to_string().as_str());
    b.set_reason(attempt.reason.as_deref().unwrap_or_default());
    b.set_started_at_ms(attempt.started_at_ms);
    b.set_ended_at_ms(attempt.ended_at_ms.unwrap_or(0));
}

fn write_job(app: &AppState, mut b: job_info::Builder<'_>, job: &JobRecord) {
    b.set_id(job.id.0);
    b.set_function(job.function.as_str());
    b.set_state(job.state.to_string().as_str());
    b.set_reason(job.reason.as_deref().unwrap_or_default());
    b.set_ended(job.state.is_terminal());
    b.set_submitted_at_ms(job.submitted_at_ms);
    if let Some(output) = &job.output {
        match app.scheduler.fetch(&output.digest) {
            Ok(Some(bytes)) => b.set_output(&bytes),
            Ok(None) | Err(_) => {
                tracing::warn!(job = %job.id, "a finished job's output is not on this node")
            }
        }
    }
    let mut list = b.init_attempts(job.attempts.len() as u32);
    for (i, attempt) in job.attempts.iter().enumerate() {
        write_task(list.reborrow().get(i as u32), job, attempt);
    }
}

fn write_event(mut b: event::Builder<'_>, e: &Event) {
    b.set_at_ms(e.at_ms);
    match &e.kind {
        EventKind::Deployed { function } => write_function(b.init_deployed(), function),
        EventKind::Deleted { name } => b.set_deleted(name.as_str()),
        EventKind::TaskChanged {
            job,
            attempt,
            state,
        } => {
            let mut t = b.init_task_changed();
            t.set_job(*job);
            t.set_attempt(*attempt);
            t.set_state(state.as_str());
        }
        EventKind::NodeJoined { agent } => b.set_node_joined(agent.as_str()),
        EventKind::NodeLost { agent } => b.set_node_lost(agent.as_str()),
        EventKind::LeaderChanged { leader_id, term } => {
            let mut l = b.init_leader_changed();
            l.set_leader_id(leader_id.unwrap_or(0));
            l.set_term(*term);
        }
    }
}

//! The REST API for functions: deploy (`PUT`), list, show, remove, labels, kept
//! versions and rollback.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::extract::Path;
use super::{discard, read_body, AppState};
use crate::cluster::Committed;
use crate::state::{
    check_label_key, check_label_value, Command, FunctionName, FunctionRecord, FunctionSpec,
};

/// How long a write waits for this node to serve what it committed.
const SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Header carrying a JSON manifest ([`FunctionSpec`]) with a deploy.
pub const MANIFEST_HEADER: &str = "x-wafer-manifest";

/// `PUT /v1/functions/{name}`: the body is the module; limits come from the
/// `x-wafer-manifest` JSON header and/or the query (`memory_mb`, `timeout_ms`, `fuel`,
/// `max_request_bytes`, `max_response_bytes`, `max_log_bytes`, repeated `env=KEY=VALUE`),
/// the query winning.
pub async fn deploy(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // A rejected deploy still reads the upload, so that the connection stays usable
    // for the client's next request.
    let (name, spec) = match deploy_target(&name, &headers, query.as_deref()) {
        Ok(target) => target,
        Err(err) => {
            discard(body, &headers);
            return Err(err);
        }
    };
    let limit = app.functions.max_module_bytes();
    let wasm = read_body(body, &headers, limit, "module", app.client_timeout).await?;
    let functions = app.functions.clone();
    let target = name.clone();
    let command =
        tokio::task::spawn_blocking(move || functions.prepare_deploy(&target, &wasm, spec))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })??;
    commit(&app, command).await?;
    let record = current_record(&app, &name)?;
    let status = if record.version == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(record)).into_response())
}

/// The function name and spec a deploy asks for, from its path, manifest and query.
fn deploy_target(
    name: &str,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(FunctionName, FunctionSpec), ApiError> {
    let name: FunctionName = name.parse()?;
    let mut spec = match headers.get(MANIFEST_HEADER) {
        Some(value) => {
            let text = std::str::from_utf8(value.as_bytes())
                .map_err(|_| ApiError::bad_request("x-wafer-manifest is not UTF-8 text"))?;
            serde_json::from_str::<FunctionSpec>(text).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_manifest",
                    format!("invalid manifest: {e}"),
                )
            })?
        }
        None => FunctionSpec::default(),
    };
    apply_query(&mut spec, query.unwrap_or(""))?;
    Ok((name, spec))
}

fn apply_query(spec: &mut FunctionSpec, query: &str) -> Result<(), ApiError> {
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let number = || {
            value.parse::<u64>().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_limit",
                    format!("{key} must be a non-negative integer, got {value:?}"),
                )
            })
        };
        match key.as_ref() {
            "memory_mb" => spec.limits.memory_mb = number()?,
            "timeout_ms" => spec.limits.timeout_ms = number()?,
            "fuel" => spec.limits.fuel = number()?,
            "max_request_bytes" => spec.limits.max_request_bytes = number()?,
            "max_response_bytes" => spec.limits.max_response_bytes = number()?,
            "max_log_bytes" => spec.limits.max_log_bytes = number()?,
            "accel" => spec.limits.accel = number()?,
            "accel_memory_mb" => spec.limits.accel_memory_mb = number()?,
            "accel_type" => {
                spec.limits.accel_type = Some(value.parse().map_err(|why: String| {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_limit", why)
                })?)
            }
            "env" => {
                let (k, v) = value.split_once('=').ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_env",
                        format!("env must be KEY=VALUE, got {value:?}"),
                    )
                })?;
                spec.env.insert(k.to_string(), v.to_string());
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?} (expected memory_mb, timeout_ms, \
                     fuel, max_request_bytes, max_response_bytes, max_log_bytes, accel, \
                     accel_memory_mb, accel_type or env)"
                )))
            }
        }
    }
    Ok(())
}

/// `GET /v1/functions[?consistent=true]`.
pub async fn list(
    State(app): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    read_point(&app, query.as_deref()).await?;
    Ok(Json(serde_json::json!({ "functions": app.functions.list() })).into_response())
}

/// `GET /v1/functions/{name}[?consistent=true]`.
pub async fn show(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let name: FunctionName = name.parse()?;
    read_point(&app, query.as_deref()).await?;
    let function = app.functions.get(&name)?;
    Ok(Json(function.record.clone()).into_response())
}

/// Records `GET /v1/functions/{name}/logs` returns when no `limit` is given.
const LOG_RECORDS: u64 = 100;

/// `GET /v1/functions/{name}/logs[?after=SEQ][&limit=N]`: the function's recent guest
/// logs (stderr and `wafer.log` lines, one record per invocation) from the invocations
/// this node's gateway took, oldest first: the newest `limit`, or with `after` the first
/// `limit` after that cursor. `next` is the cursor for what comes next.
pub async fn logs(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let name: FunctionName = name.parse()?;
    app.functions.get(&name)?;
    let number = |key: &str| -> Result<Option<u64>, ApiError> {
        super::jobs::query_value(query.as_deref(), key)
            .map(|text| {
                text.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("{key} is a whole number, got {text:?}"))
                })
            })
            .transpose()
    };
    let after = number("after")?;
    let limit = number("limit")?
        .unwrap_or(LOG_RECORDS)
        .min(crate::guest_logs::RECORDS_PER_FUNCTION as u64);
    let page =
        app.functions
            .logs()
            .read(&name, after, usize::try_from(limit).unwrap_or(usize::MAX));
    let records: Vec<serde_json::Value> = page
        .records
        .iter()
        .map(|r| {
            serde_json::json!({
                "seq": r.seq,
                "at_ms": r.at_ms,
                "version": r.version,
                "status": r.status,
                "agent": r.agent,
                "log": String::from_utf8_lossy(&r.log),
                "dropped": r.dropped,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "function": name,
        "node": app.cluster.id(),
        "next": page.next,
        "records": records,
    }))
    .into_response())
}

/// `DELETE /v1/functions/{name}`.
pub async fn remove(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let name: FunctionName = name.parse()?;
    commit(&app, Command::DeleteFunction { name: name.clone() }).await?;
    Ok(Json(serde_json::json!({ "name": name, "removed": true })).into_response())
}

/// `GET /v1/functions/{name}/versions[?consistent=true]`: the versions the cluster
/// keeps for rollbacks (the newest [`crate::state::VERSIONS_KEPT`]), oldest first; the
/// last is the current one.
pub async fn versions(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let name: FunctionName = name.parse()?;
    read_point(&app, query.as_deref()).await?;
    let current = app.functions.get(&name)?.record.version;
    let versions = app.functions.versions(&name)?;
    Ok(Json(serde_json::json!({
        "name": name,
        "current": current,
        "versions": versions,
    }))
    .into_response())
}

/// Body of `POST /v1/functions/{name}/rollback` (optional).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The kept version to make current again; absent: the one before the current.
    pub version: Option<u64>,
}

/// `POST /v1/functions/{name}/rollback` with an optional `{"version": N}`: makes a kept
/// earlier version current again, as the function's next version (same module and
/// spec; the labels stay). Without a version, the one just before the current.
pub async fn rollback(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let name: FunctionName = name.parse()?;
    let request: RollbackRequest = if body.trim_ascii().is_empty() {
        RollbackRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "expected no body or {{\"version\": N}} with a kept version: {e}"
            ))
        })?
    };
    if request.version == Some(0) {
        return Err(ApiError::bad_request("versions start at 1"));
    }
    let command = Command::RollbackFunction {
        name: name.clone(),
        version: request.version,
        at_ms: crate::scheduler::now_ms(),
    };
    commit(&app, command).await?;
    Ok(Json(current_record(&app, &name)?).into_response())
}

/// Body of `PATCH /v1/functions/{name}/labels`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelChange {
    /// Labels to add or change.
    #[serde(default)]
    pub set: std::collections::BTreeMap<String, String>,
    /// Labels to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `PATCH /v1/functions/{name}/labels` with `{"set": {KEY: VALUE}, "remove": [KEY]}`:
/// changes labels only (the module and its version stay).
pub async fn label(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let name: FunctionName = name.parse()?;
    let change: LabelChange = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "expected {{\"set\": {{\"key\": \"value\"}}, \"remove\": [\"key\"]}}: {e}"
        ))
    })?;
    for key in change.remove.iter().chain(change.set.keys()) {
        check_label_key(key)
            .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "invalid_label", m))?;
    }
    for (key, value) in &change.set {
        check_label_value(key, value)
            .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "invalid_label", m))?;
    }
    let command = Command::SetLabels {
        name: name.clone(),
        set: change.set,
        remove: change.remove,
    };
    commit(&app, command).await?;
    Ok(Json(current_record(&app, &name)?).into_response())
}

/// Commits `command` through the cluster and waits until this node serves its effect,
/// so that the caller's next request to this node sees it.
pub(crate) async fn commit(app: &AppState, command: Command) -> Result<Committed, ApiError> {
    let committed = app.cluster.propose(command).await?;
    let index = committed.index;
    if let Some(why) = committed.rejection.clone() {
        return Err(why.into());
    }
    if !app.functions.wait_synced(index, SYNC_TIMEOUT).await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("committed at log index {index}, but this node has not applied it yet; retry the read"),
        ));
    }
    Ok(committed)
}

/// The record of `name` as this node now serves it (after [`commit`]).
fn current_record(app: &AppState, name: &FunctionName) -> Result<FunctionRecord, ApiError> {
    match app.functions.get(name) {
        Ok(function) => Ok(function.record.clone()),
        Err(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("function `{name}` was removed by a concurrent request"),
        )),
    }
}

/// With `?consistent=true`, waits for a linearizable read point before reading.
pub(super) async fn read_point(app: &AppState, query: Option<&str>) -> Result<(), ApiError> {
    let consistent = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .any(|(k, v)| k == "consistent" && (v == "true" || v == "1" || v.is_empty()));
    if consistent {
        let index = app.cluster.read_index().await?;
        if !app.functions.wait_synced(index, SYNC_TIMEOUT).await {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("this node has not caught up to the read index {index}; retry"),
            ));
        }
    }
    Ok(())
}

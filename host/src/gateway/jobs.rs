//! The REST API for durable jobs (`/v1/jobs`), their attempts (`/v1/tasks`) and the
//! leader's open offers (`/v1/offers`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;

use super::api::{commit, read_point};
use super::error::ApiError;
use super::extract::Path;
use super::AppState;
use crate::events::EventKind;
use crate::scheduler::now_ms;
use crate::state::{Command, Constraint, FunctionName, JobId, JobRecord, TaskState};

/// Longest a `?wait=` read waits.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Attempts a job makes unless it says otherwise.
pub(crate) const DEFAULT_ATTEMPTS: u32 = 3;

/// Body of `POST /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// The function to run.
    pub function: String,
    /// Its stdin, as text.
    #[serde(default)]
    pub input: Option<String>,
    /// Its stdin, base64 (for binary input).
    #[serde(default)]
    pub input_base64: Option<String>,
    /// Placement constraints, `key=value` or `key!=value`.
    #[serde(default)]
    pub constraints: Vec<String>,
    /// Attempts allowed to fail (default 3).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Accelerator devices each attempt is granted (0 or 1; default: as the function
    /// says).
    #[serde(default)]
    pub accel: Option<u64>,
    /// The kind of device (`cpu`, `gpu` ...): a constraint on `accel.type`.
    #[serde(default)]
    pub accel_type: Option<crate::accel::DeviceType>,
}

fn job_id(text: &str) -> Result<JobId, ApiError> {
    text.parse()
        .map(JobId)
        .map_err(|_| ApiError::bad_request(format!("a job id is a number, got {text:?}")))
}

/// The value of `key` in a query string.
pub(crate) fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Largest `POST /v1/jobs` body: the largest input, base64-encoded, and room for the
/// rest.
const MAX_JOB_REQUEST_BYTES: u64 = crate::state::MAX_JOB_INPUT_BYTES * 4 / 3 + (64 << 10);

/// `POST /v1/jobs`: submits a job; answered once committed (201 with the record).
pub async fn submit(
    State(app): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let body = super::read_body(
        body,
        &headers,
        MAX_JOB_REQUEST_BYTES,
        "job request",
        app.client_timeout,
    )
    .await?;
    let request: JobRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "expected {{\"function\": NAME, \"input\": TEXT, \"constraints\": [\"k=v\"], \
             \"max_attempts\": N, \"accel\": 0|1, \"accel_type\": TYPE}}: {e}"
        ))
    })?;
    let function: FunctionName = request.function.parse()?;
    let input = match (request.input, request.input_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give `input` or `input_base64`, not both",
            ))
        }
        (Some(text), None) => bytes::Bytes::from(text),
        (None, Some(b64)) => bytes::Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| ApiError::bad_request(format!("input_base64: {e}")))?,
        ),
        (None, None) => bytes::Bytes::new(),
    };
    let mut constraints = request
        .constraints
        .iter()
        .map(|c| c.parse::<Constraint>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string()))?;
    if let Some(kind) = request.accel_type {
        constraints.push(
            format!("{}={}", crate::accel::ACCEL_TYPE_ATTRIBUTE, kind.as_str())
                .parse::<Constraint>()
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string()))?,
        );
    }
    let record = submit_job(
        &app,
        function,
        input,
        constraints,
        request.max_attempts.unwrap_or(DEFAULT_ATTEMPTS),
        request.accel.unwrap_or(0),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(record)).into_response())
}

/// Submits a job (shared by the REST and Cap'n Proto APIs); answers its record once
/// committed and applied here.
pub(crate) async fn submit_job(
    app: &AppState,
    function: FunctionName,
    input: bytes::Bytes,
    constraints: Vec<Constraint>,
    max_attempts: u32,
    accel: u64,
) -> Result<JobRecord, ApiError> {
    let committed = commit(
        app,
        Command::SubmitJob {
            function,
            input,
            constraints,
            max_attempts,
            at_ms: now_ms(),
            accel,
        },
    )
    .await?;
    let id = committed.created.map(JobId).ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the cluster did not say which job it created",
        )
    })?;
    read_job(app, id)
}

/// Job `id` as this node has applied it (404 when there is none).
pub(crate) fn read_job(app: &AppState, id: JobId) -> Result<JobRecord, ApiError> {
    app.scheduler
        .job(id)
        .map_err(|e| ApiError::from(crate::cluster::ClusterError::Unavailable(e.to_string())))?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no job {id}")))
}

/// `GET /v1/jobs/{id}[?consistent=true][&wait=SECONDS]`: the job; with `wait`, once it
/// has ended or the wait is over.
pub async fn show(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    read_point(&app, query.as_deref()).await?;
    let wait = match query_value(query.as_deref(), "wait") {
        Some(secs) => secs
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or_else(|| ApiError::bad_request(format!("wait is seconds, got {secs:?}")))?
            .min(MAX_WAIT),
        None => Duration::ZERO,
    };
    let record = wait_job(&app, id, Instant::now() + wait, || Ok(())).await?;
    Ok(Json(record).into_response())
}

/// How often a wait for a job re-reads it even without a change event (events can be
/// missed by a receiver that lags), and re-runs its `check`.
const RECHECK: Duration = Duration::from_millis(500);

/// Job `id` once it has ended, or as it is at `until`. The job is read again whenever
/// this node applies a change of it (its `TaskChanged` events) and at least every
/// [`RECHECK`]; `check` runs before each read and can end the wait with its error.
pub(crate) async fn wait_job(
    app: &AppState,
    id: JobId,
    until: Instant,
    check: impl Fn() -> Result<(), ApiError>,
) -> Result<JobRecord, ApiError> {
    use tokio::sync::broadcast::error::RecvError;
    // Subscribed before the first read, so no change after it goes unseen.
    let mut events = app.events.subscribe();
    loop {
        check()?;
        let record = read_job(app, id)?;
        let now = Instant::now();
        if record.state.is_terminal() || now >= until {
            return Ok(record);
        }
        let wake = tokio::time::Instant::from_std(until.min(now + RECHECK));
        loop {
            match tokio::time::timeout_at(wake, events.recv()).await {
                Ok(Ok(event)) => {
                    if matches!(&event.kind, EventKind::TaskChanged { job, .. } if *job == id.0) {
                        break;
                    }
                }
                Ok(Err(RecvError::Lagged(_))) | Err(_) => break,
                Ok(Err(RecvError::Closed)) => {
                    tokio::time::sleep_until(wake).await;
                    break;
                }
            }
        }
    }
}

/// `GET /v1/jobs/{id}/output`: a finished job's stdout, as it was first reported.
pub async fn output(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    read_point(&app, query.as_deref()).await?;
    let record = read_job(&app, id)?;
    let Some(output) = record.output else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_output",
            format!("job {id} is {} and has no output", record.state),
        ));
    };
    let bytes = app
        .scheduler
        .fetch(&output.digest)
        .map_err(ApiError::from)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("the output of job {id} is gone"),
            )
        })?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static("x-wafer-attempt"),
                output.attempt.to_string(),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// `POST /v1/jobs/{id}/kill`.
pub async fn kill(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    commit(
        &app,
        Command::KillJob {
            job: id,
            at_ms: now_ms(),
        },
    )
    .await?;
    Ok(Json(read_job(&app, id)?).into_response())
}

/// `GET /v1/jobs[?state=RUNNING][&limit=N][&consistent=true]`: jobs, newest first.
pub async fn list(
    State(app): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    read_point(&app, query.as_deref()).await?;
    let limit = match query_value(query.as_deref(), "limit") {
        Some(n) => n
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("limit is a number, got {n:?}")))?,
        None => 1000,
    };
    let state = match query_value(query.as_deref(), "state") {
        Some(s) => Some(
            serde_json::from_value::<TaskState>(serde_json::Value::String(s.to_uppercase()))
                .map_err(|_| ApiError::bad_request(format!("unknown state {s:?}")))?,
        ),
        None => None,
    };
    let jobs = app
        .scheduler
        .jobs(limit, state)
        .map_err(|e| ApiError::from(crate::cluster::ClusterError::Unavailable(e.to_string())))?;
    Ok(Json(serde_json::json!({ "jobs": jobs })).into_response())
}

/// `GET /v1/tasks`: every attempt of the newest jobs, newest first.
pub async fn tasks(
    State(app): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    read_point(&app, query.as_deref()).await?;
    let jobs = app
        .scheduler
        .jobs(1000, None)
        .map_err(|e| ApiError::from(crate::cluster::ClusterError::Unavailable(e.to_string())))?;
    let tasks: Vec<serde_json::Value> = jobs
        .iter()
        .flat_map(|job| {
            job.attempts.iter().rev().map(move |a| {
                serde_json::json!({
                    "job": job.id,
                    "attempt": a.number,
                    "function": job.function,
                    "agent": a.agent,
                    "framework": a.framework,
                    "state": a.state,
                    "reason": a.reason,
                    "started_at_ms": a.started_at_ms,
                    "ended_at_ms": a.ended_at_ms,
                })
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "tasks": tasks })).into_response())
}

/// `GET /v1/offers`: the leader's open offers (elsewhere: none, and `leader: false`).
pub async fn offers(State(app): State<Arc<AppState>>) -> Response {
    let offers: Vec<serde_json::Value> = app
        .scheduler
        .open_offers()
        .into_iter()
        .map(|o| {
            serde_json::json!({
                "id": o.id,
                "framework": o.framework,
                "agent": o.agent,
                "resources": o.resources,
                "age_ms": o.made_at.elapsed().as_millis() as u64,
            })
        })
        .collect();
    Json(serde_json::json!({
        "leader": app.cluster.leading_term().is_some(),
        "offers": offers,
    }))
    .into_response()
}

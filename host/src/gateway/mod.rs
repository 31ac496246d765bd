//! The HTTP gateway (axum on hyper): function invocation routes, the REST API, its
//! server-sent event stream, the web console's files, `/healthz` and `/metrics`, behind
//! the bearer-token check of [`auth`].

mod activity;
mod api;
pub mod auth;
mod cluster;
pub mod console;
mod error;
mod events;
pub mod extract;
mod invoke;
mod jobs;
mod openapi;
mod scheduling;
pub mod serve;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use axum::Router;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

pub(crate) use api::commit;
pub use api::MANIFEST_HEADER;
pub use error::{ApiError, ApiErrorInfo};
pub use invoke::{invoke, FnPath};
pub(crate) use jobs::{read_job, submit_job, wait_job, DEFAULT_ATTEMPTS};

use crate::cluster::Cluster;
use crate::functions::Functions;
use crate::metrics::Metrics;

/// What every handler shares.
pub struct AppState {
    /// Deployed functions.
    pub functions: Arc<Functions>,
    /// This node's cluster handle.
    pub cluster: Arc<Cluster>,
    /// This node's scheduler.
    pub scheduler: Arc<crate::scheduler::Scheduler>,
    /// Whether this node runs an agent itself (then it runs invocations itself).
    pub local_agent: bool,
    /// Round-robin position over the leased agents.
    pub next_target: std::sync::atomic::AtomicUsize,
    /// Exported metrics.
    pub metrics: Metrics,
    /// The API tokens.
    pub tokens: Arc<crate::auth::Tokens>,
    /// Whether the invocation routes (`/fn/...`) are open to callers without a token.
    pub public_invoke: bool,
    /// The node's event stream.
    pub events: Arc<crate::events::Events>,
    /// How long a client may pause while sending a request body (and, in
    /// [`serve`], its headers) before it is refused.
    pub client_timeout: std::time::Duration,
}

/// The gateway's router.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(console::index))
        .route("/console/{build}/{file}", get(console::asset))
        .route("/v1/events", get(events::stream))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/functions", get(api::list))
        .route(
            "/v1/functions/{name}",
            get(api::show).put(api::deploy).delete(api::remove),
        )
        .route("/v1/functions/{name}/logs", get(api::logs))
        .route("/v1/functions/{name}/versions", get(api::versions))
        .route(
            "/v1/functions/{name}/rollback",
            axum::routing::post(api::rollback),
        )
        .route(
            "/v1/functions/{name}/labels",
            axum::routing::patch(api::label),
        )
        .route("/v1/cluster", get(cluster::status))
        .route("/v1/nodes", get(scheduling::nodes))
        .route("/v1/jobs", get(jobs::list).post(jobs::submit))
        .route("/v1/jobs/{id}", get(jobs::show))
        .route("/v1/jobs/{id}/output", get(jobs::output))
        .route("/v1/jobs/{id}/kill", axum::routing::post(jobs::kill))
        .route("/v1/tasks", get(jobs::tasks))
        .route("/v1/offers", get(jobs::offers))
        .route("/v1/leases", get(scheduling::leases))
        .route("/v1/frameworks", get(scheduling::frameworks))
        .route("/v1/roles", get(scheduling::roles))
        .route("/v1/roles/{role}", axum::routing::put(scheduling::set_role))
        .route("/v1/cluster/members", axum::routing::post(cluster::add))
        .route(
            "/v1/cluster/members/{id}",
            axum::routing::delete(cluster::remove),
        )
        .route("/v1/openapi.json", get(openapi::document))
        .route("/v1/whoami", get(auth::whoami))
        .route("/v1/tokens", get(auth::list).post(auth::create))
        .route("/v1/tokens/{id}", axum::routing::delete(auth::revoke))
        .route("/fn/{name}", any(invoke::invoke))
        .route("/fn/{name}/", any(invoke::invoke))
        .route("/fn/{name}/{*path}", any(invoke::invoke))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::check,
        ))
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {uri}"),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            app.metrics.observe_cluster(&app.cluster.status());
            app.scheduler.observe_metrics();
            app.functions.runtime().observe_pools();
            app.metrics.render()
        },
    )
}

/// Most bytes of a rejected body read and thrown away after the answer went out, so
/// that a client still sending gets to read the answer instead of a reset connection.
const DRAIN_MAX_BYTES: u64 = 64 << 20;
/// How long the reading and throwing away may go on.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads a request body of at most `limit` bytes; a larger one (by `Content-Length` or
/// as it streams) is a 413 naming `what`. A client that sends nothing of it for `idle`
/// gets a 408: a slow upload is fine, a stalled one does not hold the request for ever.
pub async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: u64,
    what: &str,
    idle: std::time::Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("{what} exceeds the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = body;
    if declared.is_some_and(|len| len > limit) {
        discard(body, headers);
        return Err(too_large());
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    let stalled = |received: usize| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the client sent nothing more of the {what} for {} ms (after {received} bytes)",
                idle.as_millis(),
            ),
        )
    };
    // (A timer is armed only while a frame is not there yet.)
    while let Some(frame) = tokio::time::timeout(idle, body.frame())
        .await
        .map_err(|_| stalled(buf.len()))?
    {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the {what}: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if (buf.len() + data.len()) as u64 > limit {
                drain_after_answer(body);
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Throws away the body of a request that is rejected before its body is needed.
///
/// A client that sent `Expect: 100-continue` has not sent the body yet and will not once
/// it reads the error, so the body is left unread (hyper then closes the connection,
/// and no upload is wasted). Any other body is drained: see [`drain_after_answer`].
pub(crate) fn discard(body: Body, headers: &HeaderMap) {
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects_continue {
        drain_after_answer(body);
    }
}

/// Reads and discards what is left of `body` in a task of its own, within bounds
/// ([`DRAIN_MAX_BYTES`], [`DRAIN_TIMEOUT`]), while the answer goes out at once: a
/// lingering close, as web servers do it.
///
/// hyper writes the answer while it goes on reading the body for this task. A body
/// that ends within the bounds leaves the connection usable for the client's next
/// request (closing it instead would cost the client its keep-alive connection,
/// possibly while it is already sending its next request on it). Past the bounds the
/// body is dropped and hyper closes the connection; the answer went out before, so a
/// client that reads while it sends has it before the reset that unread bytes cause.
fn drain_after_answer(mut body: Body) {
    tokio::spawn(tokio::time::timeout(DRAIN_TIMEOUT, async move {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > DRAIN_MAX_BYTES {
                break;
            }
        }
    }));
}

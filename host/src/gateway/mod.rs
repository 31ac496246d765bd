//! The HTTP gateway (axum on hyper): function invocation routes, the REST API,
//! `/healthz` and `/metrics`.

mod api;
mod error;
mod invoke;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};

pub use api::MANIFEST_HEADER;
pub use error::ApiError;

use crate::functions::Functions;
use crate::metrics::Metrics;

/// What every handler shares.
pub struct AppState {
    /// Deployed functions.
    pub functions: Arc<Functions>,
    /// Exported metrics.
    pub metrics: Metrics,
}

/// The gateway's router.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/functions", get(api::list))
        .route(
            "/v1/functions/{name}",
            get(api::show).put(api::deploy).delete(api::remove),
        )
        .route("/fn/{name}", any(invoke::invoke))
        .route("/fn/{name}/", any(invoke::invoke))
        .route("/fn/{name}/{*path}", any(invoke::invoke))
        .with_state(state)
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
        app.metrics.render(),
    )
}

/// Reads a request body of at most `limit` bytes; a larger one (by `Content-Length` or
/// as it streams) is a 413 naming `what`.
pub async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: u64,
    what: &str,
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
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit_usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(err) => Err(ApiError::bad_request(format!("reading the {what}: {err}"))),
    }
}

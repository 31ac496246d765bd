//! The REST API for the cluster: status and membership.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::Path;
use super::AppState;
use crate::consensus::NodeId;

/// `GET /v1/cluster`: this node's view (id, leader, term, members, log indices).
pub async fn status(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    Json(app.cluster.status())
}

/// Body of `POST /v1/cluster/members`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    /// The new node's Cap'n Proto address (`host:port`).
    pub addr: String,
}

/// `POST /v1/cluster/members`: adds the node at `addr` as a learner, then a voter.
pub async fn add(
    State(app): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let request: AddMember = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("expected {{\"addr\": \"host:port\"}}: {e}")))?;
    let (id, addr) = app.cluster.add_node_at(&request.addr).await?;
    Ok((
        StatusCode::OK,
        Json(serde_json::json!({ "id": id, "rpc": addr.rpc, "http": addr.http })),
    )
        .into_response())
}

/// `DELETE /v1/cluster/members/{id}`.
pub async fn remove(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: NodeId = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("node id must be a number, got {id:?}")))?;
    app.cluster.remove_node(id).await?;
    Ok(Json(serde_json::json!({ "removed": id })).into_response())
}

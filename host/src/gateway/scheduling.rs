//! The REST API for scheduling: agents (`/v1/nodes`) and frameworks.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::Query;
use super::AppState;

/// Query of reads that may ask for a linearizable answer.
#[derive(Debug, Default, Deserialize)]
pub struct ReadQuery {
    /// Wait until this node has applied everything committed before the request.
    #[serde(default)]
    pub consistent: bool,
}

/// The scheduling state as this node has applied it; with `consistent`, after a
/// linearizable read point.
async fn view(app: &AppState, consistent: bool) -> Result<crate::state::SchedulingView, ApiError> {
    if consistent {
        app.cluster.read_index().await?;
    }
    app.scheduler
        .view()
        .map_err(|e| ApiError::from(crate::cluster::ClusterError::Unavailable(e.to_string())))
}

/// `GET /v1/nodes`: the agents, their capacity, what is allocated and free, their
/// attributes and state (`active` or `unreachable`).
pub async fn nodes(
    State(app): State<Arc<AppState>>,
    Query(query): Query<ReadQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if query.consistent {
        app.cluster.read_index().await?;
    }
    let agents = app.scheduler.agents()?;
    Ok(Json(serde_json::json!({ "agents": agents })))
}

/// `GET /v1/frameworks`: registered frameworks: their role's weight and quota, what
/// their committed allocations hold (`allocated`, `allocated_share`, from this node's
/// state) and, on the leader, what the allocator counts them holding with outstanding
/// offers (`held`, `dominant_share`).
pub async fn frameworks(
    State(app): State<Arc<AppState>>,
    Query(query): Query<ReadQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let view = view(&app, query.consistent).await?;
    let shares = app.scheduler.shares();
    let total = view
        .agents
        .values()
        .filter(|a| a.state == crate::state::AgentState::Active)
        .fold(crate::state::Resources::ZERO, |sum, a| {
            sum.plus(&a.resources)
        });
    let frameworks: Vec<serde_json::Value> = view
        .frameworks
        .values()
        .map(|f| {
            let share = shares.iter().find(|s| s.framework == f.id);
            let role = view.role(&f.role);
            let allocated = view
                .allocations
                .values()
                .filter(|a| a.framework == f.id)
                .fold(crate::state::Resources::ZERO, |sum, a| {
                    sum.plus(&a.resources)
                });
            serde_json::json!({
                "id": f.id,
                "name": f.name,
                "role": f.role,
                "weight": role.weight,
                "quota": role.quota,
                "registered_at_ms": f.registered_at_ms,
                "allocated": allocated,
                "allocated_share": allocated.dominant_share(&total),
                "held": share.map(|s| s.held),
                "dominant_share": share.map(|s| s.dominant_share),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "frameworks": frameworks,
        "leader": app.cluster.leading_term().is_some(),
    })))
}

/// Body of `PUT /v1/roles/{role}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRequest {
    /// The role's weight (default 1).
    #[serde(default)]
    pub weight: Option<f64>,
    /// The most its frameworks may hold together (absent or null: no limit).
    #[serde(default)]
    pub quota: Option<crate::state::Resources>,
}

/// `PUT /v1/roles/{role}`: sets a role's weight and quota.
pub async fn set_role(
    State(app): State<Arc<AppState>>,
    super::extract::Path(role): super::extract::Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let role: crate::state::RoleName = role
        .parse()
        .map_err(|e: crate::state::InvalidId| ApiError::bad_request(e.to_string()))?;
    let request: RoleRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "expected {{\"weight\": W, \"quota\": {{\"slots\": N, \"memory_mb\": M}}}}: {e}"
        ))
    })?;
    super::api::commit(
        &app,
        crate::state::Command::SetRole {
            role: role.clone(),
            weight: request.weight.unwrap_or(1.0),
            quota: request.quota,
        },
    )
    .await?;
    let view = view(&app, false).await?;
    Ok(Json(
        serde_json::to_value(view.role(&role)).unwrap_or_default(),
    ))
}

/// `GET /v1/roles`: the configured roles (others have weight 1 and no quota).
pub async fn roles(
    State(app): State<Arc<AppState>>,
    Query(query): Query<ReadQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let view = view(&app, query.consistent).await?;
    let roles: Vec<_> = view.roles.values().collect();
    Ok(Json(serde_json::json!({ "roles": roles })))
}

/// `GET /v1/leases`: the serverless framework's leases (invocation slots on agents),
/// as this node's state has them.
pub async fn leases(
    State(app): State<Arc<AppState>>,
    Query(query): Query<ReadQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let view = view(&app, query.consistent).await?;
    let id = crate::scheduler::serverless::framework_id();
    let leases: Vec<serde_json::Value> = view
        .allocations
        .values()
        .filter(|a| a.framework == id)
        .map(|a| {
            serde_json::json!({
                "id": a.id,
                "agent": a.agent,
                "resources": a.resources,
                "allocated_at_ms": a.allocated_at_ms,
                "rpc": view.agents.get(&a.agent).map(|r| r.rpc.clone()),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "leases": leases })))
}

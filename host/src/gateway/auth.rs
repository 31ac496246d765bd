//! Who may call what over HTTP: the bearer-token check every route but `/healthz` (and,
//! in public mode, the invocation routes) passes through, and the token API
//! (`/v1/tokens`, `/v1/whoami`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::auth::AuthError;
use crate::state::{generate_secret, hash_token, Command, Scope, TokenId, TokenRecord};

/// Largest token request body.
const MAX_TOKEN_REQUEST_BYTES: u64 = 64 << 10;

/// What a route needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    Public,
    /// Any valid token.
    Authenticated,
    /// A valid token with this scope.
    Scope(Scope),
}

/// What a request to `method path` needs. The invocation routes are public when
/// `public_invoke` is set. Anything not listed needs `read` to read and `admin` to
/// change, so a route added later is never open by mistake.
pub fn required(method: &Method, path: &str, public_invoke: bool) -> Access {
    let reads = *method == Method::GET || *method == Method::HEAD;
    // The console's files hold no data: it asks the API, with the user's token.
    if path == "/healthz" || (reads && (path == "/" || path.starts_with("/console/"))) {
        return Access::Public;
    }
    if path == "/fn" || path.starts_with("/fn/") {
        return if public_invoke {
            Access::Public
        } else {
            Access::Scope(Scope::Invoke)
        };
    }
    if path == "/v1/whoami" {
        return Access::Authenticated;
    }
    if path == "/v1/tokens" || path.starts_with("/v1/tokens/") {
        return Access::Scope(Scope::Admin);
    }
    if reads {
        return Access::Scope(Scope::Read);
    }
    let job_action = *method == Method::POST
        && (path == "/v1/jobs" || (path.starts_with("/v1/jobs/") && path.ends_with("/kill")));
    if job_action {
        return Access::Scope(Scope::Invoke);
    }
    if path == "/v1/functions" || path.starts_with("/v1/functions/") {
        return Access::Scope(Scope::Deploy);
    }
    Access::Scope(Scope::Admin)
}

/// The secret of an `Authorization: Bearer` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> ApiError {
        if err.is_forbidden() {
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", err.to_string())
        } else {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", err.to_string())
        }
    }
}

/// Middleware: lets a request through if its token allows the route, else answers 401
/// or 403 (the caller's token record is put in the request's extensions).
pub async fn check(State(app): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    let access = required(request.method(), request.uri().path(), app.public_invoke);
    let secret = bearer(request.headers());
    let verdict = match access {
        Access::Public => return next.run(request).await,
        Access::Authenticated => app.tokens.authenticate(secret),
        Access::Scope(scope) => app.tokens.authorize(secret, scope),
    };
    match verdict {
        Ok(record) => {
            request.extensions_mut().insert(record);
            next.run(request).await
        }
        Err(err) => {
            let (parts, body) = request.into_parts();
            super::discard(body, &parts.headers);
            let unauthorized = !err.is_forbidden();
            let mut response = ApiError::from(err).into_response();
            if unauthorized {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"wafer\""),
                );
            }
            response
        }
    }
}

/// A token as the API shows it (never its hash).
fn show(record: &TokenRecord) -> serde_json::Value {
    let now = crate::scheduler::now_ms();
    serde_json::json!({
        "id": record.id,
        "name": record.name,
        "scopes": record.scopes,
        "created_at_ms": record.created_at_ms,
        "expires_at_ms": record.expires_at_ms,
        "expired": record.expired(now),
    })
}

/// `GET /v1/whoami`: the caller's token.
pub async fn whoami(Extension(record): Extension<Arc<TokenRecord>>) -> Json<serde_json::Value> {
    Json(show(&record))
}

/// `GET /v1/tokens`: every token (ids, names, scopes, expiry; never secrets).
pub async fn list(State(app): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let shown: Vec<_> = app.tokens.list().iter().map(show).collect();
    Json(serde_json::json!({ "tokens": shown }))
}

/// Body of `POST /v1/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    /// What the token allows.
    scopes: Vec<Scope>,
    /// A name for people.
    #[serde(default)]
    name: String,
    /// Lifetime, seconds (none: until revoked).
    ttl_secs: Option<u64>,
}

/// `POST /v1/tokens` (`{"scopes": [...], "name": ..., "ttl_secs": ...}`): creates a
/// token; the answer holds its secret, shown this once.
pub async fn create(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let body = super::read_body(
        body,
        &headers,
        MAX_TOKEN_REQUEST_BYTES,
        "token request",
        app.client_timeout,
    )
    .await?;
    let request: CreateRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "expected {{\"scopes\": [\"read\", ...], \"name\": \"...\", \"ttl_secs\": N}}: {e}"
        ))
    })?;
    let now = crate::scheduler::now_ms();
    let expires_at_ms = match request.ttl_secs {
        Some(0) => return Err(ApiError::bad_request("ttl_secs must be above 0")),
        Some(secs) => Some(
            secs.checked_mul(1000)
                .and_then(|ms| ms.checked_add(now))
                .ok_or_else(|| ApiError::bad_request("ttl_secs is too large"))?,
        ),
        None => None,
    };
    let secret = generate_secret();
    super::api::commit(
        &app,
        Command::CreateToken {
            name: request.name,
            scopes: request.scopes.into_iter().collect(),
            hash: hash_token(&secret),
            at_ms: now,
            expires_at_ms,
        },
    )
    .await?;
    let record = app.tokens.authenticate(Some(&secret)).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
    })?;
    let mut shown = show(&record);
    shown["token"] = serde_json::Value::String(secret);
    Ok((StatusCode::CREATED, Json(shown)))
}

/// `DELETE /v1/tokens/{id}`: revokes a token; it stops working at once.
pub async fn revoke(
    State(app): State<Arc<AppState>>,
    super::extract::Path(id): super::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id: TokenId = id
        .parse()
        .map_err(|e: crate::state::InvalidId| ApiError::bad_request(e.to_string()))?;
    super::api::commit(&app, Command::RevokeToken { id: id.clone() }).await?;
    Ok(Json(serde_json::json!({ "revoked": id })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_needs_the_scope_a_user_would_expect() {
        let get = Method::GET;
        let post = Method::POST;
        let put = Method::PUT;
        let delete = Method::DELETE;
        let cases = [
            (&get, "/healthz", false, Access::Public),
            (&get, "/", false, Access::Public),
            (&get, "/console/b1/wafer_console.js", false, Access::Public),
            (&post, "/", false, Access::Scope(Scope::Admin)),
            (&get, "/v1/events", false, Access::Scope(Scope::Read)),
            (&get, "/fn/hello", false, Access::Scope(Scope::Invoke)),
            (&post, "/fn/hello/x", true, Access::Public),
            (&get, "/metrics", false, Access::Scope(Scope::Read)),
            (&get, "/v1/functions", false, Access::Scope(Scope::Read)),
            (&put, "/v1/functions/f", false, Access::Scope(Scope::Deploy)),
            (
                &delete,
                "/v1/functions/f",
                false,
                Access::Scope(Scope::Deploy),
            ),
            (
                &post,
                "/v1/functions/f/rollback",
                false,
                Access::Scope(Scope::Deploy),
            ),
            (
                &get,
                "/v1/functions/f/versions",
                false,
                Access::Scope(Scope::Read),
            ),
            (&post, "/v1/jobs", false, Access::Scope(Scope::Invoke)),
            (
                &post,
                "/v1/jobs/3/kill",
                false,
                Access::Scope(Scope::Invoke),
            ),
            (&get, "/v1/jobs/3", false, Access::Scope(Scope::Read)),
            (&put, "/v1/roles/batch", false, Access::Scope(Scope::Admin)),
            (
                &post,
                "/v1/cluster/members",
                false,
                Access::Scope(Scope::Admin),
            ),
            (&get, "/v1/tokens", false, Access::Scope(Scope::Admin)),
            (&get, "/v1/whoami", false, Access::Authenticated),
            (
                &post,
                "/v1/something-new",
                false,
                Access::Scope(Scope::Admin),
            ),
        ];
        for (method, path, public, expected) in cases {
            assert_eq!(required(method, path, public), expected, "{method} {path}");
        }
    }

    #[test]
    fn bearer_reads_the_scheme_case_insensitively() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            "bearer abc".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(
            header::AUTHORIZATION,
            "Basic abc".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(bearer(&headers), None);
    }
}

//! The OpenAPI document of the REST API (docs/openapi.json), served at GET /v1/openapi.json.

/// The OpenAPI 3.1 document, as written in `docs/openapi.json`.
pub const DOCUMENT: &str = include_str!("../../../docs/openapi.json");

/// `GET /v1/openapi.json`: the OpenAPI document of the REST API.
pub async fn document() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        DOCUMENT,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The router's paths (`app` in `gateway/mod.rs`), `{*path}` written `{path}`.
    const ROUTES: &[&str] = &[
        "/healthz",
        "/metrics",
        "/v1/openapi.json",
        "/v1/events",
        "/v1/functions",
        "/v1/functions/{name}",
        "/v1/functions/{name}/labels",
        "/v1/functions/{name}/logs",
        "/v1/functions/{name}/versions",
        "/v1/functions/{name}/rollback",
        "/v1/cluster",
        "/v1/nodes",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/output",
        "/v1/jobs/{id}/kill",
        "/v1/tasks",
        "/v1/offers",
        "/v1/leases",
        "/v1/frameworks",
        "/v1/roles",
        "/v1/roles/{role}",
        "/v1/cluster/members",
        "/v1/cluster/members/{id}",
        "/v1/whoami",
        "/v1/tokens",
        "/v1/tokens/{id}",
        "/fn/{name}",
        "/fn/{name}/",
        "/fn/{name}/{path}",
    ];

    /// Keys of a path item that are operations.
    const METHODS: &[&str] = &[
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    #[test]
    fn every_route_is_documented() {
        let document: serde_json::Value =
            serde_json::from_str(DOCUMENT).expect("docs/openapi.json is JSON");
        let paths = document["paths"]
            .as_object()
            .expect("the document has paths");
        for route in ROUTES {
            assert!(paths.contains_key(*route), "{route} is not documented");
        }
        for (path, item) in paths {
            assert!(
                ROUTES.contains(&path.as_str()),
                "{path} is documented but not routed"
            );
            let item = item.as_object().expect("a path item is an object");
            let operations: Vec<_> = item
                .iter()
                .filter(|(key, _)| METHODS.contains(&key.as_str()))
                .collect();
            assert!(!operations.is_empty(), "{path} has no operations");
            for (method, operation) in operations {
                assert!(
                    path == "/healthz" || operation["x-wafer-scope"].is_string(),
                    "{method} {path} has no x-wafer-scope"
                );
            }
        }
    }
}

//! The web console (`web-ui/`), embedded at build time (`host/build.rs`) and served at
//! `/`: `index.html` is revalidated on every load, the files it names live under
//! `/console/{build}/` and are cached for good (a new build has a new id). Where a
//! `.gz` twin was built, clients that accept gzip get it. A binary built without the
//! console answers `/` with how to build it.

use super::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

mod assets {
    include!(concat!(env!("OUT_DIR"), "/console.rs"));
}

/// What `/` says when the console was not built into this binary.
const NOT_BUILT: &str = "<!doctype html>
<html lang=\"en\"><head><meta charset=\"utf-8\"><title>wafer</title></head>
<body style=\"font-family: sans-serif; max-width: 40em; margin: 3em auto\">
<h1>wafer</h1>
<p>This node is running, but its binary was built without the web console.</p>
<p>Build the console with <code>./scripts/console.sh</code>, then build wafer again
(<code>cargo build --release</code>): the console is embedded at build time. The REST
API (<code>/v1/...</code>, see <code>/v1/openapi.json</code>) and invocations
(<code>/fn/NAME</code>) work without it.</p>
</body></html>
";

/// Whether this binary carries the console.
pub fn built() -> bool {
    !assets::BUILD.is_empty() && file("index.html").is_some()
}

fn file(name: &str) -> Option<&'static [u8]> {
    assets::FILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| *bytes)
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let refused = parts.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// Serves `name` with `cache` as its `Cache-Control`, answering 304 when the client's
/// copy is current.
fn serve(name: &str, cache: &'static str, headers: &HeaderMap) -> Response {
    let Some(plain) = file(name) else {
        return (StatusCode::NOT_FOUND, "no such console file").into_response();
    };
    let etag = format!("\"{}-{name}\"", assets::BUILD);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let gzipped = accepts_gzip(headers)
            .then(|| file(&format!("{name}.gz")))
            .flatten();
        let mut response = gzipped.unwrap_or(plain).into_response();
        if gzipped.is_some() {
            response
                .headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(content_type(name)),
        );
        response
    };
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, value);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `GET /`: the console's page, or how to build the console.
pub async fn index(headers: HeaderMap) -> Response {
    if !built() {
        return (
            StatusCode::NOT_FOUND,
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            NOT_BUILT,
        )
            .into_response();
    }
    let mut response = serve("index.html", "no-cache", &headers);
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; \
             style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; \
             frame-ancestors 'none'",
        ),
    );
    response
}

/// `GET /console/{build}/{file}`: one of the console's files, cached for good.
pub async fn asset(Path((build, name)): Path<(String, String)>, headers: HeaderMap) -> Response {
    if build != assets::BUILD || name == "index.html" || name.ends_with(".gz") {
        return (StatusCode::NOT_FOUND, "no such console file").into_response();
    }
    serve(&name, "public, max-age=31536000, immutable", &headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_sent_only_to_clients_that_take_it() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            accepts_gzip(&h)
        };
        assert!(with("gzip, deflate, br"));
        assert!(with("br;q=1.0, GZIP;q=0.5"));
        assert!(with("*"));
        assert!(!with("br, deflate"));
        assert!(!with("gzip;q=0"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(content_type("wafer_console_bg.wasm"), "application/wasm");
        assert_eq!(
            content_type("wafer_console.js"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type("style.css"), "text/css; charset=utf-8");
        assert_eq!(content_type("README"), "application/octet-stream");
    }
}

//! WAGI-style invocation over HTTP: the request becomes stdin and CGI environment
//! variables, the guest's stdout becomes the response.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use wafer_guest::http::CgiHead;

use super::error::ApiError;
use super::extract::Path;
use super::{read_body, AppState};
use crate::functions::Deployed;
use crate::functions::FunctionError;
use crate::guest_logs::LogRecord;
use crate::metrics::ErrorKind;
use crate::runtime::{Environ, Exit, Invocation, InvokeError, Outcome, Stdio};
use crate::state::FunctionName;

/// Most bytes of guest log returned in an error response.
const LOG_TAIL_BYTES: usize = 4096;

/// Route parameters of `/fn/{name}` and `/fn/{name}/{*path}`.
#[derive(Debug, serde::Deserialize)]
pub struct FnPath {
    name: String,
    path: Option<String>,
}

impl FnPath {
    /// Function `name`, and the path below it without its leading `/` (none: `/`).
    pub fn new(name: String, path: Option<String>) -> FnPath {
        FnPath { name, path }
    }
}

/// What the guest learns of a request besides its body.
struct RequestHead {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

/// `ANY /fn/{name}` and `ANY /fn/{name}/{*path}`: runs the function once.
pub async fn invoke(
    State(app): State<Arc<AppState>>,
    Path(params): Path<FnPath>,
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // The guest reads PATH_INFO up to its first NUL: refused rather than cut short.
    if params.path.as_deref().is_some_and(|p| p.contains('\0')) {
        super::discard(body, &headers);
        return ApiError::bad_request(
            "malformed path: it holds a NUL (%00), which the guest would read as the end of PATH_INFO",
        )
        .into_response();
    }
    // Unknown names answer 404 without a metric of their own: callers must not be able
    // to grow the metric families without bound.
    let function = match params
        .name
        .parse::<FunctionName>()
        .map_err(ApiError::from)
        .and_then(|name| app.functions.get(&name).map_err(ApiError::from))
    {
        Ok(function) => function,
        Err(err) => {
            super::discard(body, &headers);
            return err.into_response();
        }
    };
    let name = &function.record.name;
    let head = RequestHead {
        method,
        uri,
        version,
        headers,
    };
    let response = match run(&app, &function, params.path, head, body).await {
        Ok(response) => response,
        Err((kind, err)) => {
            app.metrics.error(name.as_str(), kind);
            err.into_response()
        }
    };
    let stats = function.stats(&app.metrics);
    app.metrics
        .invocation(stats, name.as_str(), response.status().as_u16());
    response
}

type Failure = (ErrorKind, ApiError);

async fn run(
    app: &Arc<AppState>,
    function: &Arc<Deployed>,
    path: Option<String>,
    head: RequestHead,
    body: Body,
) -> Result<Response, Failure> {
    let name = &function.record.name;
    let limits = function.record.spec.limits;
    let input = read_body(
        body,
        &head.headers,
        limits.max_request_bytes,
        "request body",
        app.client_timeout,
    )
    .await
    .map_err(|e| {
        let kind = if e.status == StatusCode::REQUEST_TIMEOUT {
            ErrorKind::ClientTimeout
        } else {
            ErrorKind::RequestTooLarge
        };
        (kind, e)
    })?;
    let path_info = match path {
        Some(p) => format!("/{p}"),
        None => "/".to_string(),
    };
    let env = wagi_env(function, name, &head, &path_info, input.len());
    let invocation = Invocation {
        args: vec![name.to_string()],
        env,
        stdio: Stdio::Captured(input),
    };
    let (outcome, ran_on) = route(app, function, invocation).await.map_err(|e| {
        let kind = match &e {
            FunctionError::Invoke(InvokeError::Busy(_)) | FunctionError::NoDevice(_) => {
                ErrorKind::Busy
            }
            _ => ErrorKind::Instantiate,
        };
        (kind, ApiError::from(e))
    })?;
    function
        .stats(&app.metrics)
        .duration
        .observe(outcome.duration.as_secs_f64());
    if !outcome.log.is_empty() {
        tracing::debug!(function = %name, log = %String::from_utf8_lossy(&outcome.log), "guest log");
    }
    let (log, dropped) = (outcome.log.clone(), outcome.log_dropped);
    let fuel_used = outcome.fuel_used;
    let response = respond(name, function, outcome);
    if !log.is_empty() || dropped > 0 {
        app.functions.logs().record(
            name,
            LogRecord {
                seq: 0,
                at_ms: crate::scheduler::now_ms(),
                version: function.record.version,
                status: match &response {
                    Ok(response) => response.status().as_u16(),
                    Err((_, err)) => err.status.as_u16(),
                },
                agent: ran_on.as_ref().map(|agent| agent.as_str().to_string()),
                log,
                dropped,
            },
        );
    }
    let mut response = response?;
    if let Some(used) = fuel_used {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-wafer-fuel-used"), used.into());
    }
    if let Some(agent) = ran_on {
        if let Ok(value) = HeaderValue::from_str(agent.as_str()) {
            response
                .headers_mut()
                .insert(HeaderName::from_static("x-wafer-agent"), value);
        }
    }
    Ok(response)
}

/// Where an invocation runs: on this node when it runs an agent itself or no agent
/// holds a serverless lease (a cluster without agents still serves); otherwise on an
/// agent under a lease, taken in turn, the next one when an agent cannot be reached or
/// is busy, and here when none can. A function granted an accelerator goes only to
/// agents with a device of its type, first to those whose lease holds a device (the
/// serverless framework leases devices for such invocations once it sees them).
/// Answers the outcome and the agent that ran it.
async fn route(
    app: &Arc<AppState>,
    function: &Arc<Deployed>,
    invocation: Invocation,
) -> Result<(Outcome, Option<crate::state::AgentId>), FunctionError> {
    let all = app.scheduler.lease_targets();
    let limits = &function.record.spec.limits;
    // Agents whose lease holds a device come first for a function granted one.
    let (preferred, others): (Vec<_>, Vec<_>) = all
        .iter()
        .filter(|t| t.serves(limits))
        .partition(|t| limits.accel > 0 && t.leased_accelerators > 0);
    if app.local_agent || (preferred.is_empty() && others.is_empty()) {
        return Ok((run_here(app, function, invocation).await?, None));
    }
    let first = app
        .next_target
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for target in in_turn(preferred, first).chain(in_turn(others, first)) {
        match crate::rpc::remote::run_remote(
            app.cluster.rpc(),
            &target.rpc,
            function.record.digest,
            function.record.spec.limits,
            invocation.clone(),
        )
        .await
        {
            Ok(outcome) => return Ok((outcome, Some(target.agent.clone()))),
            Err(e) => {
                tracing::debug!(agent = %target.agent, error = %e, "invocation not run there; trying the next agent");
            }
        }
    }
    tracing::warn!(function = %function.record.name, "no leased agent could run the invocation; running it here");
    Ok((run_here(app, function, invocation).await?, None))
}

/// Runs an invocation on this node, unless it needs an accelerator this node lacks (a
/// server has devices only through an agent of its own): then `NoDevice`, a 503.
async fn run_here(
    app: &Arc<AppState>,
    function: &Arc<Deployed>,
    invocation: Invocation,
) -> Result<Outcome, FunctionError> {
    let limits = &function.record.spec.limits;
    if limits.accel > 0 && app.functions.runtime().accel().is_none() {
        return Err(FunctionError::NoDevice(match limits.accel_type {
            Some(kind) => format!("a `{}`", kind.as_str()),
            None => "an accelerator".into(),
        }));
    }
    app.functions.invoke(function, invocation).await
}

/// Every item of `list`, starting at the `first`-th (modulo its length) and wrapping
/// around: successive calls with successive `first` take turns.
fn in_turn<T: Copy>(list: Vec<T>, first: usize) -> impl Iterator<Item = T> {
    let n = list.len();
    (0..n).map(move |i| list[(first + i) % n])
}

/// The CGI/WAGI environment of one request, after the function's own variables.
fn wagi_env(
    function: &Deployed,
    name: &FunctionName,
    head: &RequestHead,
    path_info: &str,
    content_length: usize,
) -> Environ {
    let RequestHead {
        method,
        uri,
        version,
        headers,
    } = head;
    let host_header = headers.get(axum::http::header::HOST);
    // HTTP/2's `:authority` and an absolute-form target (`GET http://h/p HTTP/1.1`)
    // name the host in the URI, which then wins over any `Host` (RFC 9112 3.2.2).
    let authority = uri
        .authority()
        .map(|a| a.as_str().rsplit('@').next().unwrap_or(a.as_str()));
    let host = authority
        .or_else(|| host_header.and_then(|h| h.to_str().ok()))
        .unwrap_or("localhost");
    let (server_name, server_port) = match host.rsplit_once(':') {
        // `host:` (an empty port) means the default one.
        Some((h, "")) => (h, "80"),
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, p),
        _ => (host, "80"),
    };
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let query = uri.query().unwrap_or("");
    // Room for the fixed variables and every header (a guess: one allocation usually).
    let bytes = 512
        + function
            .env()
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>()
        + headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 7)
            .sum::<usize>()
        + 2 * (host.len() + uri.path().len() + query.len());
    let mut env = Environ::with_capacity(function.env().len() + headers.len() + 13, bytes);
    for (key, value) in function.env() {
        env.push(key, value);
    }
    env.push("REQUEST_METHOD", method.as_str());
    env.push("PATH_INFO", path_info);
    env.push("QUERY_STRING", query);
    env.push_fmt("X_FULL_URL", format_args!("http://{host}{target}"));
    env.push_fmt("X_MATCHED_ROUTE", format_args!("/fn/{name}/..."));
    env.push_fmt("SCRIPT_NAME", format_args!("/fn/{name}"));
    env.push("SERVER_NAME", server_name);
    env.push("SERVER_PORT", server_port);
    env.push("SERVER_PROTOCOL", protocol(*version));
    env.push(
        "SERVER_SOFTWARE",
        concat!("wafer/", env!("CARGO_PKG_VERSION")),
    );
    env.push("GATEWAY_INTERFACE", "CGI/1.1");
    env.push_fmt("CONTENT_LENGTH", format_args!("{content_length}"));
    // An HTTP/2 request carries its host as `:authority`, not `Host`: the guest gets
    // `HTTP_HOST` either way, as from a CGI server.
    if let (None, Some(authority)) = (host_header, authority) {
        env.push("HTTP_HOST", authority);
    }
    for (key, value) in headers {
        // UTF-8 as sent (`to_str` would take visible ASCII only); a value that is not
        // UTF-8 is left out, since most guests' runtimes cannot read one (Rust's
        // `std::env::vars` panics on it).
        let Ok(value) = std::str::from_utf8(value.as_bytes()) else {
            continue;
        };
        match key.as_str() {
            "content-type" => env.push("CONTENT_TYPE", value),
            // Credentials for wafer itself are not the guest's business.
            "content-length" | "authorization" | "proxy-authorization" | "cookie" => {}
            // httpoxy: `HTTP_PROXY` is read by many HTTP clients as their proxy.
            "proxy" => {}
            // `X_Forwarded_For` would arrive as `HTTP_X_FORWARDED_FOR`, the same as
            // `X-Forwarded-For`, past a proxy that strips or sets only the latter:
            // names with anything but letters, digits and `-` are left out (as Apache's
            // CGI and nginx's default do).
            other
                if !other
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-') => {}
            other => env.push_with(
                |b| {
                    b.push_str("HTTP_");
                    b.extend(other.chars().map(|c| match c {
                        '-' => '_',
                        c => c.to_ascii_uppercase(),
                    }));
                },
                |b| b.push_str(value),
            ),
        }
    }
    env
}

/// `SERVER_PROTOCOL` for an HTTP version, as CGI servers write it.
fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// Turns a finished run into the HTTP response.
fn respond(
    name: &FunctionName,
    function: &Deployed,
    outcome: Outcome,
) -> Result<Response, Failure> {
    let limits = &function.record.spec.limits;
    // The log's tail goes into error responses only (built when one is).
    let fail = |status, code, kind, message: String| {
        Err((
            kind,
            ApiError::new(status, code, message).with_log(log_tail(&outcome.log)),
        ))
    };
    let memory_limit = |how: &str| {
        fail(
            StatusCode::INSUFFICIENT_STORAGE,
            "memory_limit",
            ErrorKind::MemoryLimit,
            format!(
                "function `{name}` exceeded its memory limit of {} MiB{how}",
                limits.memory_mb
            ),
        )
    };
    match outcome.exit {
        Exit::Timeout => fail(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            ErrorKind::Timeout,
            format!(
                "function `{name}` did not finish within its timeout of {} ms{}",
                limits.timeout_ms,
                if outcome.memory_refused {
                    format!(
                        " (earlier, a memory growth was refused by its limit of {} MiB)",
                        limits.memory_mb
                    )
                } else {
                    String::new()
                }
            ),
        ),
        Exit::MemoryLimit => memory_limit(""),
        Exit::OutOfFuel => fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            "fuel_exhausted",
            ErrorKind::FuelExhausted,
            format!(
                "function `{name}` used all of its fuel ({} units) before it finished",
                limits.fuel
            ),
        ),
        Exit::ResponseTooLarge => fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            "response_too_large",
            ErrorKind::ResponseTooLarge,
            format!(
                "function `{name}` wrote more than its response limit of {} bytes",
                limits.max_response_bytes
            ),
        ),
        Exit::Trap(message) => fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            "trap",
            ErrorKind::Trap,
            format!("function `{name}` trapped: {message}"),
        ),
        Exit::Code(code) => match CgiHead::parse(&outcome.stdout) {
            Some(head) => Ok(http_response(name, &head, &outcome.stdout)),
            None if code == 0 => Ok((StatusCode::OK, outcome.stdout).into_response()),
            // A guest that saw its memory growth refused and gave up without a response
            // (a C program whose malloc returned NULL, say) failed for lack of memory.
            None if outcome.memory_refused => memory_limit(&format!(
                ": a memory growth was refused, then it exited with status {code}"
            )),
            None => fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exit_status",
                ErrorKind::ExitStatus,
                format!("function `{name}` exited with status {code}"),
            ),
        },
    }
}

/// Builds the HTTP response from a guest's CGI output, dropping headers that are not
/// valid HTTP or that the server owns.
fn http_response(name: &FunctionName, head: &CgiHead<'_>, stdout: &Bytes) -> Response {
    let status = StatusCode::from_u16(head.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut headers = HeaderMap::with_capacity(head.headers.len());
    for &(key, value) in &head.headers {
        if ["content-length", "transfer-encoding", "connection"]
            .iter()
            .any(|owned| key.eq_ignore_ascii_case(owned))
        {
            continue;
        }
        // `from_bytes` lower-cases the name.
        // `from_bytes` takes UTF-8 beyond ASCII as the guest wrote it (`from_str` would
        // drop such a value) and refuses control characters.
        match (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            (Ok(k), Ok(v)) => {
                headers.append(k, v);
            }
            _ => {
                tracing::debug!(function = %name, header = %key, "dropping invalid response header")
            }
        }
    }
    // 204 and 304 have no body (RFC 9110 15.3.5, 15.4.5): what the guest wrote after
    // the head is dropped, and no Content-Type or Content-Length made up for it.
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return (status, headers).into_response();
    }
    // The body is a view of the captured stdout, not a copy.
    let body = stdout.slice(head.body_offset..);
    (status, headers, body).into_response()
}

fn log_tail(log: &Bytes) -> Option<String> {
    if log.is_empty() {
        return None;
    }
    let start = log.len().saturating_sub(LOG_TAIL_BYTES);
    Some(String::from_utf8_lossy(&log[start..]).into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn targets_take_turns_and_each_is_tried_once() {
        let take = |first| super::in_turn(vec!['a', 'b', 'c'], first).collect::<String>();
        assert_eq!(take(0), "abc");
        assert_eq!(take(4), "bca");
        assert_eq!(super::in_turn(Vec::<char>::new(), 7).count(), 0);
    }
}

//! wafer's end-to-end tests: one binary, real `wafer` processes, real HTTP.

mod accel;
mod accel_rpc;
mod agents;
mod api;
mod auth;
mod browser;
mod cli;
mod clients;
mod cluster;
mod console;
mod deploy;
mod frameworks;
mod invoke;
mod jobs;
mod leases;
mod restart;
mod sdk;

use reqwest::StatusCode;
use tempfile::TempDir;
use wafer_tests::DevServer;

/// A fresh `wafer dev` without examples, and the folder holding its data.
pub fn start(extra: &[&str]) -> (TempDir, DevServer) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut args = vec!["--no-examples"];
    args.extend_from_slice(extra);
    let server = DevServer::start(&dir.path().join("data"), &args).expect("wafer dev starts");
    (dir, server)
}

/// Checks that `response` came over HTTP/2 with a 200; its body as text.
pub async fn h2_ok_text(response: http::Response<hyper::body::Incoming>) -> String {
    use http_body_util::BodyExt;
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// Creates a token with `scopes` over HTTP (as admin); its secret and id.
pub async fn create_token(server_url: &str, scopes: &[&str]) -> (String, String) {
    let created: serde_json::Value = wafer_tests::http()
        .post(format!("{server_url}/v1/tokens"))
        .json(&serde_json::json!({ "scopes": scopes }))
        .send()
        .await
        .expect("create token")
        .json()
        .await
        .expect("json");
    (
        created["token"].as_str().expect("secret").to_string(),
        created["id"].as_str().expect("id").to_string(),
    )
}

/// `POST /v1/jobs` with `body` (as admin); the job as answered.
pub async fn submit_job(server: &DevServer, body: serde_json::Value) -> serde_json::Value {
    wafer_tests::http()
        .post(server.url("/v1/jobs"))
        .json(&body)
        .send()
        .await
        .expect("submit")
        .json()
        .await
        .expect("job JSON")
}

/// `PUT /v1/functions/{name}?{query}` with `wasm`.
pub async fn deploy(
    server: &DevServer,
    name: &str,
    wasm: Vec<u8>,
    query: &str,
) -> reqwest::Response {
    let sep = if query.is_empty() { "" } else { "?" };
    wafer_tests::http()
        .put(server.url(&format!("/v1/functions/{name}{sep}{query}")))
        .body(wasm)
        .send()
        .await
        .expect("deploy request")
}

/// Deploys built example `name` and checks the deploy succeeded.
pub async fn deploy_example(server: &DevServer, name: &str, query: &str) {
    let wasm = wafer_tests::example(name).expect("example built");
    let response = deploy(server, name, wasm, query).await;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert!(
        status == StatusCode::CREATED || status == StatusCode::OK,
        "deploying {name}: {status} {body}"
    );
}

/// The JSON error body of a failed call, after checking its status.
pub async fn expect_error(
    response: reqwest::Response,
    status: StatusCode,
    code: &str,
) -> serde_json::Value {
    let got = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(got, status, "unexpected status; body: {text}");
    let json: serde_json::Value = serde_json::from_str(&text).expect("error body is JSON");
    assert_eq!(json["error"], code, "body: {json}");
    assert!(
        json["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error has a message: {json}"
    );
    json
}

/// [`expect_error`], and a message that says each of `words`.
pub async fn expect_error_saying(
    response: reqwest::Response,
    status: StatusCode,
    code: &str,
    words: &[&str],
) -> serde_json::Value {
    let json = expect_error(response, status, code).await;
    let message = json["message"].as_str().unwrap_or_default();
    assert!(
        words.iter().all(|w| message.contains(w)),
        "the message should say {words:?}: {json}"
    );
    json
}

/// `GET path` with the admin token, and its JSON body.
pub async fn get_json(server: &DevServer, path: &str) -> serde_json::Value {
    wafer_tests::get(server.url(path))
        .await
        .expect("GET request")
        .json()
        .await
        .expect("JSON body")
}

/// The server's `/metrics` text.
pub async fn metrics(server: &DevServer) -> String {
    wafer_tests::get(server.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// Starts `n` concurrent GETs of `path`; each task yields the response status.
pub fn spawn_gets(
    server: &DevServer,
    path: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<reqwest::Result<StatusCode>>> {
    let http = wafer_tests::http();
    (0..n)
        .map(|_| {
            let http = http.clone();
            let url = server.url(path);
            tokio::spawn(async move { http.get(url).send().await.map(|r| r.status()) })
        })
        .collect()
}

/// A WASI command module from WAT text.
pub fn wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("valid WAT")
}

/// A plain WASI program (no CGI headers) that writes `text` to stdout and exits with
/// `code`.
pub fn plain_program(text: &str, code: i32) -> Vec<u8> {
    program_writing_when("(i32.const 1)", text, code)
}

/// A WASI program that, when the WAT expression `condition` is true, writes `text` to
/// stdout and exits with `code` (and otherwise returns from `_start`).
pub fn program_writing_when(condition: &str, text: &str, code: i32) -> Vec<u8> {
    program_writing_to(1, condition, text, code)
}

/// A WASI program that writes `text` to stderr and exits with `code`.
pub fn stderr_program(text: &str, code: i32) -> Vec<u8> {
    program_writing_to(2, "(i32.const 1)", text, code)
}

/// [`program_writing_when`], writing to file descriptor `fd`.
fn program_writing_to(fd: u32, condition: &str, text: &str, code: i32) -> Vec<u8> {
    program_for("wasi_snapshot_preview1", fd, condition, text, code)
}

/// [`plain_program`] built for WASI preview 0 (`wasi_unstable`), as older toolchains
/// emit.
pub fn preview0_program(text: &str, code: i32) -> Vec<u8> {
    program_for("wasi_unstable", 1, "(i32.const 1)", text, code)
}

/// [`program_writing_to`] importing WASI from `wasi`.
fn program_for(wasi: &str, fd: u32, condition: &str, text: &str, code: i32) -> Vec<u8> {
    let escaped: String = text.bytes().map(|b| format!("\\{b:02x}")).collect();
    wat(&format!(
        r#"(module
          (import "{wasi}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (import "{wasi}" "proc_exit" (func $proc_exit (param i32)))
          (memory (export "memory") 1)
          (data (i32.const 64) "{escaped}")
          (func (export "_start")
            (if {condition}
              (then
                (i32.store (i32.const 0) (i32.const 64))
                (i32.store (i32.const 4) (i32.const {len}))
                (drop (call $fd_write (i32.const {fd}) (i32.const 0) (i32.const 1) (i32.const 16)))
                (call $proc_exit (i32.const {code}))))))"#,
        len = text.len()
    ))
}

/// A WASI program that prints its environment, one `NAME=value` a line (no CGI head).
pub fn env_echo() -> Vec<u8> {
    wat(r#"(module
      (import "wasi_snapshot_preview1" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "environ_get" (func $get (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 2)
      (func (export "_start") (local $i i32) (local $end i32)
        (drop (call $sizes (i32.const 0) (i32.const 4)))
        ;; Pointers from 1024 (up to 1792 variables), the strings from 8192.
        (drop (call $get (i32.const 1024) (i32.const 8192)))
        (local.set $i (i32.const 8192))
        (local.set $end (i32.add (i32.const 8192) (i32.load (i32.const 4))))
        (block $done (loop $next
          (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
          (if (i32.eqz (i32.load8_u (local.get $i)))
            (then (i32.store8 (local.get $i) (i32.const 10))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next)))
        (i32.store (i32.const 16) (i32.const 8192))
        (i32.store (i32.const 20) (i32.load (i32.const 4)))
        (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))"#)
}

/// A WASI program that sleeps `ms` (poll_oneoff on the monotonic clock), then echoes
/// its stdin to stdout.
pub fn sleepy_echo(ms: u64) -> Vec<u8> {
    wat(&format!(
        r#"(module
          (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 2)
          (func (export "_start")
            (i64.store (i32.const 0) (i64.const 0))
            (i32.store8 (i32.const 8) (i32.const 0))
            (i32.store (i32.const 16) (i32.const 1))
            (i64.store (i32.const 24) (i64.const {nanos}))
            (i64.store (i32.const 32) (i64.const 0))
            (i32.store16 (i32.const 40) (i32.const 0))
            (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
            (i32.store (i32.const 200) (i32.const 1024))
            (i32.store (i32.const 204) (i32.const 60000))
            (drop (call $read (i32.const 0) (i32.const 200) (i32.const 1) (i32.const 208)))
            (i32.store (i32.const 300) (i32.const 1024))
            (i32.store (i32.const 304) (i32.load (i32.const 208)))
            (drop (call $write (i32.const 1) (i32.const 300) (i32.const 1) (i32.const 308)))))"#,
        nanos = ms * 1_000_000
    ))
}

//! Invoking: every example's output, WAGI details, hostile guests, limits, metrics.

use std::time::{Duration, Instant};

use reqwest::header::HeaderValue;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};

use crate::{
    deploy, deploy_example, env_echo, expect_error, expect_error_saying, metrics, plain_program,
    preview0_program, spawn_gets, start,
};

async fn text(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    (status, response.text().await.expect("body"))
}

/// Checks that `env` (a guest's printed environment) has every line of `lines`.
fn assert_env_has(env: &str, lines: &[String]) {
    for line in lines {
        assert!(env.lines().any(|l| l == line), "no {line:?} in:\n{env}");
    }
}

/// `GET target` over a raw HTTP/1.x connection (`head` ends with its own headers); the
/// response body.
async fn raw_get(server: &wafer_tests::DevServer, request_line: &str, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = server.url("").trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(addr.trim_end_matches('/'))
        .await
        .expect("connect");
    let request = format!("{request_line}\r\n{head}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let response = String::from_utf8_lossy(&response).into_owned();
    let status_line = response.lines().next().unwrap_or_default();
    assert!(
        status_line.starts_with("HTTP/1.") && status_line.contains(" 200 "),
        "{response}"
    );
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// The CGI variables that describe a request follow it: HTTP/1.1, HTTP/1.0, an
/// absolute-form target (whose host wins over `Host`), and HTTP/2, where the host
/// arrives as `:authority` instead of a `Host` header.
#[tokio::test]
async fn the_cgi_variables_describe_each_http_version() {
    let (_dir, server) = start(&["--public-invoke"]);
    let response = deploy(&server, "env", env_echo(), "").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let authority = server
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let (host, port) = authority.rsplit_once(':').expect("host:port");
    let expected = |protocol: &str| {
        vec![
            format!("SERVER_PROTOCOL={protocol}"),
            format!("X_FULL_URL=http://{authority}/fn/env/x?q=1"),
            format!("HTTP_HOST={authority}"),
            format!("SERVER_NAME={host}"),
            format!("SERVER_PORT={port}"),
            "PATH_INFO=/x".to_string(),
            "QUERY_STRING=q=1".to_string(),
        ]
    };

    let (status, env) = text(
        reqwest::Client::new()
            .get(server.url("/fn/env/x?q=1"))
            .send()
            .await
            .expect("HTTP/1.1"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{env}");
    assert_env_has(&env, &expected("HTTP/1.1"));

    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = server.url("/fn/env/x?q=1").parse().expect("uri");
    let response = h2.get(uri).await.expect("HTTP/2 request");
    let body = crate::h2_ok_text(response).await;
    assert_env_has(&body, &expected("HTTP/2.0"));

    let env = raw_get(
        &server,
        "GET /fn/env/x?q=1 HTTP/1.0",
        &format!("Host: {authority}\r\n"),
    )
    .await;
    assert_env_has(&env, &expected("HTTP/1.0"));

    let env = raw_get(
        &server,
        "GET http://example.test:9/fn/env/y?z=2 HTTP/1.1",
        "Host: other.test\r\n",
    )
    .await;
    assert_env_has(
        &env,
        &[
            "X_FULL_URL=http://example.test:9/fn/env/y?z=2".to_string(),
            "SERVER_NAME=example.test".to_string(),
            "SERVER_PORT=9".to_string(),
            "HTTP_HOST=other.test".to_string(),
            "PATH_INFO=/y".to_string(),
        ],
    );
}

#[tokio::test]
async fn every_example_answers() {
    let (_dir, server) = start(&[]);
    for name in ["hello", "wordcount", "markdown", "sha256", "hello-c"] {
        deploy_example(&server, name, "").await;
    }
    let http = wafer_tests::http();

    let response = http
        .get(server.url("/fn/hello/a/b?name=Ada%20L&x=1"))
        .header("X-Test", "yes")
        .header(
            "X-Name",
            HeaderValue::from_bytes("José".as_bytes()).expect("header"),
        )
        .header(
            "X-Latin1",
            HeaderValue::from_bytes(b"caf\xe9").expect("header"),
        )
        .header("X_Forwarded_For", "10.6.6.6")
        .header("Proxy", "http://evil.example")
        .send()
        .await
        .expect("hello");
    assert_eq!(
        response
            .headers()
            .get("x-wafer-example")
            .and_then(|v| v.to_str().ok()),
        Some("hello")
    );
    let (status, body) = text(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("Hello, Ada L!\n"), "{body}");
    assert!(body.contains("method: GET\n"), "{body}");
    assert!(body.contains("path: /a/b\n"), "{body}");
    assert!(body.contains("query: name=Ada L\n"), "{body}");
    assert!(body.contains("query: x=1\n"), "{body}");
    assert!(body.contains("header: x-test: yes\n"), "{body}");
    // UTF-8 beyond ASCII reaches the guest as sent; a value that is not UTF-8 does not.
    assert!(body.contains("header: x-name: José\n"), "{body}");
    assert!(!body.contains("x-latin1"), "{body}");
    // A name with `_` would pass for one with `-`; `Proxy` would set HTTP_PROXY.
    assert!(!body.contains("forwarded"), "{body}");
    assert!(!body.contains("evil.example"), "{body}");

    let (status, body) = text(
        http.get(server.url("/fn/hello"))
            .send()
            .await
            .expect("hello"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.starts_with("Hello, world!\n") && body.contains("path: /\n"),
        "{body}"
    );

    let response = http
        .post(server.url("/fn/wordcount?top=2"))
        .body("The cat saw the other cat.\nThe end")
        .send()
        .await
        .expect("wordcount");
    assert_eq!(response.status(), StatusCode::OK);
    let stats: serde_json::Value = response.json().await.expect("json");
    assert_eq!(stats["words"], 8);
    assert_eq!(stats["lines"], 2);
    assert_eq!(stats["bytes"], 34);
    assert_eq!(stats["top"][0]["word"], "the");
    assert_eq!(stats["top"][0]["count"], 3);
    assert_eq!(stats["top"][1]["word"], "cat");
    assert_eq!(stats["top"].as_array().map(Vec::len), Some(2));

    let response = http
        .post(server.url("/fn/markdown"))
        .body("# Title\n\nSome **bold** text.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
        .send()
        .await
        .expect("markdown");
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/html; charset=utf-8")
    );
    let (status, html) = text(response).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("<h1>Title</h1>"), "{html}");
    assert!(html.contains("<strong>bold</strong>"), "{html}");
    assert!(
        html.contains("<table>") && html.contains("<td>2</td>"),
        "{html}"
    );

    let payload = b"hash me, wafer".repeat(1000);
    let (status, body) = text(
        http.post(server.url("/fn/sha256"))
            .body(payload.clone())
            .send()
            .await
            .expect("sha256"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.trim(), hex::encode(Sha256::digest(&payload)));
    let (status, body) = text(
        http.post(server.url("/fn/sha256?rounds=3"))
            .body("abc")
            .send()
            .await
            .expect("sha256"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let expected = Sha256::digest(Sha256::digest(Sha256::digest(b"abc")));
    assert_eq!(body.trim(), hex::encode(expected));

    let (status, body) = text(
        http.put(server.url("/fn/hello-c/some/where?k=v"))
            .body("12345")
            .send()
            .await
            .expect("hello-c"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("Hello from C!\n"), "{body}");
    assert!(body.contains("method: PUT\n"), "{body}");
    assert!(body.contains("path: /some/where\n"), "{body}");
    assert!(body.contains("query: k=v\n"), "{body}");
    assert!(body.contains("body: 5 bytes\n"), "{body}");
}

#[tokio::test]
async fn handler_errors_become_500_with_the_message() {
    let (_dir, server) = start(&[]);
    deploy_example(&server, "wordcount", "").await;
    let http = wafer_tests::http();
    let (status, body) = text(
        http.post(server.url("/fn/wordcount"))
            .body(vec![0xff, 0xfe, 0x00])
            .send()
            .await
            .expect("wordcount"),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("body is not UTF-8"), "{body}");
    let (status, body) = text(
        http.post(server.url("/fn/wordcount?top=many"))
            .body("a b")
            .send()
            .await
            .expect("wordcount"),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("top must be a number"), "{body}");
}

#[tokio::test]
async fn plain_stdout_programs_and_exit_codes() {
    let (_dir, server) = start(&[]);
    let http = wafer_tests::http();
    let ok = deploy(
        &server,
        "plain",
        plain_program("just text\n\nwith a blank line", 0),
        "",
    )
    .await;
    assert_eq!(ok.status(), StatusCode::CREATED);
    let (status, body) = text(
        http.get(server.url("/fn/plain"))
            .send()
            .await
            .expect("plain"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "just text\n\nwith a blank line");

    let failing = deploy(&server, "failing", plain_program("partial", 3), "").await;
    assert_eq!(failing.status(), StatusCode::CREATED);
    let response = http
        .get(server.url("/fn/failing"))
        .send()
        .await
        .expect("failing");
    let body = expect_error(response, StatusCode::INTERNAL_SERVER_ERROR, "exit_status").await;
    assert!(
        body["message"].as_str().unwrap_or("").contains("status 3"),
        "{body}"
    );
}

#[tokio::test]
async fn preview0_programs_cgi_redirects_statuses_and_header_values() {
    let (_dir, server) = start(&[]);
    // Not following redirects, to see the guest's own answer.
    let http = reqwest::Client::builder()
        .default_headers(wafer_tests::bearer_headers(wafer_tests::ADMIN_TOKEN))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let get = |name: &str| http.get(server.url(&format!("/fn/{name}"))).send();
    let deployed = |name: &'static str, module: Vec<u8>| {
        let server = &server;
        async move {
            let response = deploy(server, name, module, "").await;
            assert_eq!(response.status(), StatusCode::CREATED, "{name}");
        }
    };

    // A module built for WASI preview 0 (`wasi_unstable`) runs like a preview 1 one.
    deployed("old", preview0_program("from wasi_unstable\n", 0)).await;
    let (status, body) = text(get("old").await.expect("old")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "from wasi_unstable\n")
    );

    // A `Location:` without `Status:` is a CGI redirect.
    deployed("moved", plain_program("Location: /fn/old\n\n", 0)).await;
    let response = get("moved").await.expect("moved");
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(
        response.headers().get("location").map(|v| v.as_bytes()),
        Some(&b"/fn/old"[..])
    );

    // A status that is not a final HTTP status is not a CGI head: the output is the body.
    deployed("weird", plain_program("Status: 999 Weird\n\nbody", 0)).await;
    let (status, body) = text(get("weird").await.expect("weird")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "Status: 999 Weird\n\nbody")
    );

    // 204 and 304 have no body: what follows the head is dropped, and no
    // Content-Length or Content-Type is made up for it.
    for (name, code) in [("empty", 204), ("unchanged", 304)] {
        let output = format!("Status: {code}\nX-A: 1\n\nnot a body");
        deployed(name, plain_program(&output, 0)).await;
        let response = get(name).await.expect(name);
        assert_eq!(response.status().as_u16(), code);
        assert_eq!(
            response.headers().get("x-a").map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        for absent in ["content-length", "content-type"] {
            assert!(
                response.headers().get(absent).is_none(),
                "{name}: {absent} in {:?}",
                response.headers()
            );
        }
        assert_eq!(response.text().await.expect("body"), "");
    }

    // A header value in UTF-8 beyond ASCII is passed on as the guest wrote it.
    let output = "Content-Disposition: attachment; filename=\"café.txt\"\n\ndata";
    deployed("utf8", plain_program(output, 0)).await;
    let response = get("utf8").await.expect("utf8");
    assert_eq!(
        response
            .headers()
            .get("content-disposition")
            .map(|v| v.as_bytes()),
        Some("attachment; filename=\"café.txt\"".as_bytes())
    );
}

#[tokio::test]
async fn spin_times_out_and_the_server_keeps_serving() {
    let (_dir, server) = start(&[]);
    deploy_example(&server, "spin", "timeout_ms=400").await;
    deploy_example(&server, "hello", "").await;
    let http = wafer_tests::http();
    let started = Instant::now();
    let response = http.get(server.url("/fn/spin")).send().await.expect("spin");
    let elapsed = started.elapsed();
    let body = expect_error(response, StatusCode::GATEWAY_TIMEOUT, "timeout").await;
    assert!(
        body["message"].as_str().unwrap_or("").contains("400 ms"),
        "{body}"
    );
    // It ran until its timeout, and was stopped by it (not by a client or server limit).
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");

    // Several at once, while other calls go on being served.
    let spins = spawn_gets(&server, "/fn/spin", 3);
    let (status, body) = text(
        http.get(server.url("/fn/hello"))
            .send()
            .await
            .expect("hello"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for spin in spins {
        assert_eq!(
            spin.await.expect("join").expect("spin"),
            StatusCode::GATEWAY_TIMEOUT
        );
    }
    let metrics = metrics(&server).await;
    assert_eq!(
        wafer_tests::metric(
            &metrics,
            "wafer_invocation_errors_total{function=\"spin\",kind=\"Timeout\"}"
        ),
        Some(4.0),
        "{metrics}"
    );
    assert_eq!(
        wafer_tests::metric(&metrics, "wafer_live_instances"),
        Some(0.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn hog_hits_its_memory_limit_and_the_server_keeps_serving() {
    let (_dir, server) = start(&[]);
    deploy_example(&server, "hog", "memory_mb=24").await;
    deploy_example(&server, "hello", "").await;
    let http = wafer_tests::http();
    for _ in 0..3 {
        let response = http.get(server.url("/fn/hog")).send().await.expect("hog");
        let body = expect_error(response, StatusCode::INSUFFICIENT_STORAGE, "memory_limit").await;
        assert!(
            body["message"]
                .as_str()
                .unwrap_or("")
                .contains("memory limit of 24 MiB"),
            "{body}"
        );
        assert!(
            body["log"]
                .as_str()
                .unwrap_or("")
                .contains("memory allocation"),
            "{body}"
        );
    }
    let (status, _) = text(
        http.get(server.url("/fn/hello"))
            .send()
            .await
            .expect("hello"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_function_and_oversize_request() {
    let (_dir, server) = start(&[]);
    let http = wafer_tests::http();
    let response = http
        .get(server.url("/fn/nobody"))
        .send()
        .await
        .expect("invoke");
    let body = expect_error(response, StatusCode::NOT_FOUND, "not_found").await;
    assert!(
        body["message"].as_str().unwrap_or("").contains("nobody"),
        "{body}"
    );
    let response = http.get(server.url("/nowhere")).send().await.expect("get");
    expect_error(response, StatusCode::NOT_FOUND, "not_found").await;
    let response = http
        .post(server.url("/v1/functions"))
        .send()
        .await
        .expect("post");
    expect_error(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    // A path or query string that cannot be decoded is a JSON error like the others.
    for (path, words) in [
        ("/fn/nobody/%ff%fe", ["malformed path", "UTF-8"]),
        ("/fn/nobody/a%00b", ["malformed path", "NUL"]),
        (
            "/v1/nodes?consistent=maybe",
            ["malformed query string", "consistent"],
        ),
    ] {
        let response = http.get(server.url(path)).send().await.expect(path);
        expect_error_saying(response, StatusCode::BAD_REQUEST, "bad_request", &words).await;
    }
    // Unknown names leave no trace in the metrics (callers cannot grow them unboundedly).
    let exported = metrics(&server).await;
    assert!(!exported.contains("nobody"), "{exported}");

    deploy_example(&server, "sha256", "max_request_bytes=1024").await;
    let response = http
        .post(server.url("/fn/sha256"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .expect("invoke");
    let body = expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert!(
        body["message"].as_str().unwrap_or("").contains("1024"),
        "{body}"
    );
    // Streamed without a length, too.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..8).map(|_| Ok(vec![b'y'; 512])).collect();
    let response = http
        .post(server.url("/fn/sha256"))
        .body(reqwest::Body::wrap_stream(futures_stream(chunks)))
        .send()
        .await
        .expect("invoke");
    expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    // Exactly at the limit is fine, and the server keeps serving.
    let (status, _) = text(
        http.post(server.url("/fn/sha256"))
            .body(vec![b'x'; 1024])
            .send()
            .await
            .expect("invoke"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

fn futures_stream(
    chunks: Vec<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::iter(chunks)
}

#[tokio::test]
async fn metrics_count_invocations() {
    let (_dir, server) = start(&[]);
    deploy_example(&server, "hello", "").await;
    let http = wafer_tests::http();
    for _ in 0..5 {
        let (status, _) = text(
            http.get(server.url("/fn/hello"))
                .send()
                .await
                .expect("hello"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let metrics = metrics(&server).await;
    assert_eq!(
        wafer_tests::metric(
            &metrics,
            "wafer_invocations_total{function=\"hello\",status=\"200\"}"
        ),
        Some(5.0),
        "{metrics}"
    );
    assert_eq!(
        wafer_tests::metric(
            &metrics,
            "wafer_invocation_duration_seconds_count{function=\"hello\"}"
        ),
        Some(5.0),
        "{metrics}"
    );
    // The slot `hello` ran in stays warm for it, with the pages it dirtied resident.
    let warm = wafer_tests::metric(&metrics, "wafer_warm_slots").unwrap_or(0.0);
    assert!(warm >= 1.0, "{metrics}");
    let resident = wafer_tests::metric(&metrics, "wafer_warm_resident_bytes").unwrap_or(0.0);
    assert!(resident > 0.0, "{metrics}");
    let health = http
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_guest_parked_in_a_host_call_still_times_out() {
    let (_dir, server) = start(&[]);
    // Sleeps 60 s in `poll_oneoff` (a monotonic-clock subscription), outside wasm code.
    let sleeper = crate::wat(
        r#"(module
          (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "_start")
            (i32.store (i32.const 16) (i32.const 1))
            (i64.store (i32.const 24) (i64.const 60000000000))
            (drop (call $poll (i32.const 0) (i32.const 100) (i32.const 1) (i32.const 200)))))"#,
    );
    let response = deploy(&server, "sleeper", sleeper, "timeout_ms=300").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let started = Instant::now();
    let response = wafer_tests::get(server.url("/fn/sleeper"))
        .await
        .expect("invoke");
    expect_error(response, StatusCode::GATEWAY_TIMEOUT, "timeout").await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let metrics = metrics(&server).await;
    assert_eq!(
        wafer_tests::metric(&metrics, "wafer_live_instances"),
        Some(0.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn oversize_response_is_an_error_not_a_truncated_body() {
    let (_dir, server) = start(&[]);
    // `hog` prints a line per MiB it holds: with a 64-byte response limit it overflows
    // stdout long before it reaches its memory limit.
    deploy_example(&server, "hog", "max_response_bytes=64&memory_mb=256").await;
    let response = wafer_tests::get(server.url("/fn/hog"))
        .await
        .expect("invoke");
    let body = expect_error(
        response,
        StatusCode::INTERNAL_SERVER_ERROR,
        "response_too_large",
    )
    .await;
    assert!(
        body["message"].as_str().unwrap_or("").contains("64 bytes"),
        "{body}"
    );
}

#[tokio::test]
async fn a_guest_that_ignores_write_errors_is_stopped_at_its_response_limit() {
    let (_dir, server) = start(&[]);
    // Writes 64 bytes to stdout forever and ignores what `fd_write` answers, as a C
    // program's unchecked `printf` loop would; a 2-minute timeout.
    let flood = crate::wat(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "_start")
            (i32.store (i32.const 0) (i32.const 64))
            (i32.store (i32.const 4) (i32.const 64))
            (loop $again
              (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
              (br $again))))"#,
    );
    let response = deploy(
        &server,
        "flood",
        flood,
        "max_response_bytes=1000&timeout_ms=120000",
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let started = Instant::now();
    let response = wafer_tests::get(server.url("/fn/flood"))
        .await
        .expect("invoke");
    let body = expect_error(
        response,
        StatusCode::INTERNAL_SERVER_ERROR,
        "response_too_large",
    )
    .await;
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("1000 bytes"),
        "{body}"
    );
    // Stopped at the limit, not at its timeout.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let metrics = metrics(&server).await;
    assert_eq!(
        wafer_tests::metric(&metrics, "wafer_live_instances"),
        Some(0.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn traps_are_reported_and_the_pool_refuses_beyond_its_size() {
    let (_dir, server) = start(&["--max-instances", "2"]);
    let recursive = crate::wat(
        r#"(module (memory (export "memory") 1)
          (func $f (call $f))
          (func (export "_start") (call $f)))"#,
    );
    assert_eq!(
        deploy(&server, "deep", recursive, "").await.status(),
        StatusCode::CREATED
    );
    let response = wafer_tests::get(server.url("/fn/deep"))
        .await
        .expect("invoke");
    let body = expect_error(response, StatusCode::INTERNAL_SERVER_ERROR, "trap").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("call stack exhausted"),
        "{body}"
    );
    // An exception nothing catches: named, without the wasm backtrace.
    let throws = crate::wat(
        r#"(module (tag $oops (param i32)) (memory (export "memory") 1)
          (func (export "_start") (throw $oops (i32.const 42))))"#,
    );
    assert_eq!(
        deploy(&server, "throws", throws, "").await.status(),
        StatusCode::CREATED
    );
    let response = wafer_tests::get(server.url("/fn/throws"))
        .await
        .expect("invoke");
    let body = expect_error(response, StatusCode::INTERNAL_SERVER_ERROR, "trap").await;
    let message = body["message"].as_str().unwrap_or("");
    assert!(message.contains("exception"), "{body}");
    assert!(!message.contains("backtrace"), "{body}");

    // Two slots: of three overlapping calls to a 3 s spinner, one is refused at once,
    // and told when to try again.
    deploy_example(&server, "spin", "timeout_ms=3000").await;
    let http = wafer_tests::http();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let request = http.get(server.url("/fn/spin"));
            tokio::spawn(async move {
                let response = request.send().await?;
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                Ok::<_, reqwest::Error>((response.status(), retry_after))
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("join").expect("spin"));
    }
    answers.sort();
    assert_eq!(
        answers,
        [
            (StatusCode::SERVICE_UNAVAILABLE, Some("1".to_string())),
            (StatusCode::GATEWAY_TIMEOUT, None),
            (StatusCode::GATEWAY_TIMEOUT, None)
        ]
    );
    // Slots come back.
    let response = wafer_tests::get(server.url("/fn/deep"))
        .await
        .expect("invoke");
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

/// A guest that asks for 100 more pages (6.4 MiB); when refused it writes `on_refusal`
/// to stdout and exits with `code`.
fn grow_or_give_up(on_refusal: &str, code: i32) -> Vec<u8> {
    crate::program_writing_when(
        "(i32.eq (memory.grow (i32.const 100)) (i32.const -1))",
        on_refusal,
        code,
    )
}

#[tokio::test]
async fn a_guest_that_gives_up_after_a_refused_growth_reports_the_memory_limit() {
    let (_dir, server) = start(&[]);
    // Gives up with a failure status and no response: the memory limit is the cause.
    let quitter = crate::deploy(&server, "quitter", grow_or_give_up("", 1), "memory_mb=2").await;
    assert_eq!(quitter.status(), StatusCode::CREATED);
    let response = wafer_tests::get(server.url("/fn/quitter"))
        .await
        .expect("invoke");
    let body = expect_error(response, StatusCode::INSUFFICIENT_STORAGE, "memory_limit").await;
    assert!(
        body["message"].as_str().unwrap_or("").contains(
            "memory limit of 2 MiB: a memory growth was refused, then it exited with status 1"
        ),
        "{body}"
    );
    // Copes and answers for itself: its own response stands.
    let coper = grow_or_give_up("Status: 503\n\nsmaller please\n", 0);
    let deployed = crate::deploy(&server, "coper", coper, "memory_mb=2").await;
    assert_eq!(deployed.status(), StatusCode::CREATED);
    let response = wafer_tests::get(server.url("/fn/coper"))
        .await
        .expect("invoke");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.text().await.expect("body"), "smaller please\n");
}

#[tokio::test]
async fn a_fuel_limit_stops_a_guest_where_its_budget_ends_and_leaves_others_unmetered() {
    let (_dir, server) = start(&[]);
    // An endless loop with a long timeout: its fuel ends it, with its own error.
    deploy_example(&server, "spin", "fuel=5000000&timeout_ms=60000").await;
    let shown = crate::get_json(&server, "/v1/functions/spin").await;
    assert_eq!(shown["fuel"], 5_000_000, "{shown}");
    for _ in 0..2 {
        let response = wafer_tests::get(server.url("/fn/spin"))
            .await
            .expect("invoke");
        let body = expect_error(
            response,
            StatusCode::INTERNAL_SERVER_ERROR,
            "fuel_exhausted",
        )
        .await;
        assert!(
            body["message"]
                .as_str()
                .unwrap_or("")
                .contains("5000000 units"),
            "{body}"
        );
    }
    // The same module with enough fuel, one with too little for its start-up, and one
    // without a limit: WASI and the `wafer` imports work in the metered engine too.
    deploy_example(&server, "hello", "fuel=100000000").await;
    let (status, body) = text(
        wafer_tests::get(server.url("/fn/hello?name=fuel"))
            .await
            .expect("invoke"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("Hello, fuel!"), "{body}");
    let wasm = wafer_tests::example("hello").expect("example");
    let response = deploy(&server, "starved", wasm.clone(), "fuel=100").await;
    assert!(response.status().is_success());
    let response = wafer_tests::get(server.url("/fn/starved"))
        .await
        .expect("invoke");
    expect_error(
        response,
        StatusCode::INTERNAL_SERVER_ERROR,
        "fuel_exhausted",
    )
    .await;
    let response = deploy(&server, "free", wasm, "").await;
    assert!(response.status().is_success());
    let (status, body) = text(
        wafer_tests::get(server.url("/fn/free?name=free"))
            .await
            .expect("invoke"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let shown = crate::get_json(&server, "/v1/functions/free").await;
    assert!(shown.get("fuel").is_none(), "unmetered: {shown}");

    let exported = metrics(&server).await;
    assert!(
        exported
            .contains("wafer_invocation_errors_total{function=\"spin\",kind=\"FuelExhausted\"} 2"),
        "{exported}"
    );
    // A metered run says what it used, the same count every time, and that count is a
    // budget it runs under.
    let counted = crate::plain_program("counted\n", 0);
    let response = deploy(&server, "counted", counted.clone(), "fuel=1000000").await;
    assert!(response.status().is_success());
    let mut used = Vec::new();
    for _ in 0..3 {
        let response = wafer_tests::get(server.url("/fn/counted"))
            .await
            .expect("invoke");
        assert_eq!(response.status(), StatusCode::OK);
        let header = response.headers().get("x-wafer-fuel-used").cloned();
        used.push(
            header
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .expect("x-wafer-fuel-used"),
        );
    }
    assert!(
        used[0] > 0 && used.iter().all(|u| *u == used[0]),
        "{used:?}"
    );
    let response = deploy(&server, "counted", counted, &format!("fuel={}", used[0])).await;
    assert!(response.status().is_success());
    let response = wafer_tests::get(server.url("/fn/counted"))
        .await
        .expect("invoke");
    assert_eq!(response.status(), StatusCode::OK);
    // An unmetered run has no such header.
    let response = wafer_tests::get(server.url("/fn/free"))
        .await
        .expect("invoke");
    assert!(response.headers().get("x-wafer-fuel-used").is_none());

    // A job of it fails the same way.
    let job = crate::submit_job(
        &server,
        serde_json::json!({"function": "spin", "max_attempts": 1}),
    )
    .await;
    let id = job["id"].as_u64().expect("id");
    let ended = crate::get_json(&server, &format!("/v1/jobs/{id}?wait=60")).await;
    assert_eq!(ended["state"], "FAILED", "{ended}");
    assert!(
        ended["attempts"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("used all of its fuel (5000000 units)")),
        "{ended}"
    );
    // A bad value is refused at deploy.
    let wasm = wafer_tests::example("spin").expect("example");
    let response = deploy(&server, "spin", wasm, "fuel=lots").await;
    expect_error(response, StatusCode::BAD_REQUEST, "invalid_limit").await;
}

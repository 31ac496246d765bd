//! Deploying: validation, limits, listing, removal.

use reqwest::StatusCode;

use crate::{deploy, deploy_example, expect_error, expect_error_saying, start, wat};

#[tokio::test]
async fn deploy_list_show_and_remove() {
    let (_dir, server) = start(&[]);
    let http = wafer_tests::http();
    let wasm = wafer_tests::example("hello").expect("example");
    let first = deploy(
        &server,
        "greeter",
        wasm.clone(),
        "memory_mb=64&timeout_ms=2500&env=GREETING=hi",
    )
    .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let record: serde_json::Value = first.json().await.expect("record");
    assert_eq!(record["name"], "greeter");
    assert_eq!(record["version"], 1);
    assert_eq!(record["memory_mb"], 64);
    assert_eq!(record["timeout_ms"], 2500);
    assert_eq!(record["env"]["GREETING"], "hi");
    assert_eq!(record["size"], wasm.len());

    let second = deploy(&server, "greeter", wasm, "").await;
    assert_eq!(second.status(), StatusCode::OK);
    let record: serde_json::Value = second.json().await.expect("record");
    assert_eq!(record["version"], 2);

    let list = crate::get_json(&server, "/v1/functions").await;
    let names: Vec<&str> = list["functions"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names, ["greeter"]);

    let shown = http
        .get(server.url("/v1/functions/greeter"))
        .send()
        .await
        .expect("show");
    assert_eq!(shown.status(), StatusCode::OK);

    let removed = http
        .delete(server.url("/v1/functions/greeter"))
        .send()
        .await
        .expect("rm");
    assert_eq!(removed.status(), StatusCode::OK);
    let gone = http
        .get(server.url("/fn/greeter"))
        .send()
        .await
        .expect("invoke");
    expect_error(gone, StatusCode::NOT_FOUND, "not_found").await;
    let again = http
        .delete(server.url("/v1/functions/greeter"))
        .send()
        .await
        .expect("rm");
    expect_error(again, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn malformed_wasm_is_rejected_and_nothing_is_stored() {
    let (_dir, server) = start(&[]);
    let response = deploy(&server, "junk", b"\0asm\x01\0\0\0garbage".to_vec(), "").await;
    let body = expect_error(response, StatusCode::BAD_REQUEST, "malformed_wasm").await;
    assert!(
        body["message"].as_str().unwrap_or("").contains("malformed"),
        "{body}"
    );
    let response = deploy(&server, "junk", b"not wasm at all".to_vec(), "").await;
    expect_error(response, StatusCode::BAD_REQUEST, "malformed_wasm").await;
    let shown = wafer_tests::get(server.url("/v1/functions/junk"))
        .await
        .expect("show");
    expect_error(shown, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn forbidden_import_is_named() {
    let (_dir, server) = start(&[]);
    let module = wat(r#"(module
        (import "env" "system" (func (param i32) (result i32)))
        (memory (export "memory") 1)
        (func (export "_start")))"#);
    let response = deploy(&server, "sneaky", module, "").await;
    let body = expect_error(response, StatusCode::BAD_REQUEST, "forbidden_import").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("env::system"),
        "{body}"
    );

    let sockets = wat(r#"(module
        (import "wasi_snapshot_preview1" "not_a_wasi_call" (func))
        (memory (export "memory") 1)
        (func (export "_start")))"#);
    let response = deploy(&server, "sneaky", sockets, "").await;
    let body = expect_error(response, StatusCode::BAD_REQUEST, "forbidden_import").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("wasi_snapshot_preview1::not_a_wasi_call"),
        "{body}"
    );

    let huge_table = wat(
        r#"(module (table 10000000 funcref) (memory (export "memory") 1) (func (export "_start")))"#,
    );
    let response = deploy(&server, "wide", huge_table, "").await;
    let body = expect_error(response, StatusCode::BAD_REQUEST, "unsupported_module").await;
    assert!(
        body["message"].as_str().unwrap_or("").contains("table"),
        "{body}"
    );

    let library = wat(r#"(module (memory (export "memory") 1) (func (export "helper")))"#);
    let response = deploy(&server, "lib", library, "").await;
    expect_error(response, StatusCode::BAD_REQUEST, "not_a_command").await;

    // A `_start` that wants arguments or returns a value could never be called.
    let odd_start =
        wat(r#"(module (func (export "_start") (param i32) (result i32) i32.const 0))"#);
    let response = deploy(&server, "odd-start", odd_start, "").await;
    let body = expect_error(response, StatusCode::BAD_REQUEST, "not_a_command").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("must take no parameters and return nothing"),
        "{body}"
    );
    let response = wafer_tests::http()
        .get(server.url("/v1/functions/odd-start"))
        .send()
        .await
        .expect("get");
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "a refused module is not kept"
    );
}

#[tokio::test]
async fn bad_names_limits_env_and_manifests_are_rejected() {
    let (_dir, server) = start(&[]);
    let wasm = wafer_tests::example("hello").expect("example");
    let http = wafer_tests::http();
    expect_error(
        deploy(&server, "Bad.Name", wasm.clone(), "").await,
        StatusCode::BAD_REQUEST,
        "invalid_name",
    )
    .await;
    expect_error(
        deploy(&server, "f", wasm.clone(), "memory_mb=lots").await,
        StatusCode::BAD_REQUEST,
        "invalid_limit",
    )
    .await;
    expect_error(
        deploy(&server, "f", wasm.clone(), "memory_mb=1000000").await,
        StatusCode::BAD_REQUEST,
        "invalid_limit",
    )
    .await;
    // A module that needs more memory at start than its limit is refused at deploy,
    // whether or not it exports that memory, instead of failing every call.
    let big_memory = br#"(module (memory 33) (func (export "_start")))"#.to_vec();
    expect_error_saying(
        deploy(&server, "f", big_memory, "memory_mb=2").await,
        StatusCode::BAD_REQUEST,
        "invalid_limit",
        &["2.1 MiB of memory at start", "limit of 2.0 MiB"],
    )
    .await;
    expect_error(
        deploy(&server, "f", wasm.clone(), "timeout_ms=0").await,
        StatusCode::BAD_REQUEST,
        "invalid_limit",
    )
    .await;
    expect_error(
        deploy(&server, "f", wasm.clone(), "env=REQUEST_METHOD=POST").await,
        StatusCode::BAD_REQUEST,
        "invalid_env",
    )
    .await;
    expect_error(
        deploy(&server, "f", wasm.clone(), "env=novalue").await,
        StatusCode::BAD_REQUEST,
        "invalid_env",
    )
    .await;
    // A NUL in a value would end the variable early for the guest: refused, not
    // silently cut short.
    expect_error_saying(
        deploy(
            &server,
            "f",
            wasm.clone(),
            "env=A=x%00REQUEST_METHOD%3DPOST",
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_env",
        &["values may not contain NUL"],
    )
    .await;
    expect_error(
        deploy(&server, "f", wasm.clone(), "memroy_mb=3").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    let bad_manifest = http
        .put(server.url("/v1/functions/f"))
        .header("x-wafer-manifest", "{\"memory_mb\": ")
        .body(wasm.clone())
        .send()
        .await
        .expect("deploy");
    expect_error(bad_manifest, StatusCode::BAD_REQUEST, "invalid_manifest").await;
    // A manifest works (UTF-8 text, not only ASCII), and the query wins over it.
    let good = http
        .put(server.url("/v1/functions/f?timeout_ms=1234"))
        .header(
            "x-wafer-manifest",
            reqwest::header::HeaderValue::from_bytes(
                r#"{"memory_mb": 48, "timeout_ms": 999, "env": {"A": "1", "B": "José"}}"#
                    .as_bytes(),
            )
            .expect("header"),
        )
        .body(wasm)
        .send()
        .await
        .expect("deploy");
    assert_eq!(good.status(), StatusCode::CREATED);
    let record: serde_json::Value = good.json().await.expect("json");
    assert_eq!(record["memory_mb"], 48);
    assert_eq!(record["timeout_ms"], 1234);
    assert_eq!(record["env"]["A"], "1");
    assert_eq!(record["env"]["B"], "José");
}

#[tokio::test]
async fn oversize_module_is_413() {
    let (_dir, server) = start(&["--max-module-mb", "1"]);
    let big = vec![0u8; 2 << 20];
    let response = deploy(&server, "big", big, "").await;
    expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    // The server goes on serving.
    deploy_example(&server, "hello", "").await;
}

/// Sends raw HTTP/1.1 `requests` back to back on one connection and returns each
/// response's status line; a connection the server closed early ends the list.
async fn statuses_on_one_connection(base: &str, requests: &[Vec<u8>]) -> Vec<String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let addr = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut stream = BufReader::new(stream);
    let mut statuses = Vec::new();
    for request in requests {
        if stream.get_mut().write_all(request).await.is_err() {
            break;
        }
        let mut status = String::new();
        if stream.read_line(&mut status).await.unwrap_or(0) == 0 {
            break;
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await.expect("header");
            if line.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().expect("length");
                }
            }
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.expect("body");
        statuses.push(status.trim().to_string());
    }
    statuses
}

#[tokio::test]
async fn rejected_requests_keep_the_connection_usable() {
    let (_dir, server) = start(&[]);
    let wasm = wafer_tests::example("hello").expect("example");
    let auth = format!("authorization: Bearer {}\r\n", wafer_tests::ADMIN_TOKEN);
    let upload = |head: &str, auth: &str| {
        let mut request = format!(
            "{head}\r\nhost: wafer\r\n{auth}content-length: {}\r\n\r\n",
            wasm.len()
        )
        .into_bytes();
        request.extend_from_slice(&wasm);
        request
    };
    let health = b"GET /healthz HTTP/1.1\r\nhost: wafer\r\n\r\n".to_vec();
    // A bad manifest, an unknown function and a missing token are answered before
    // their bodies are needed; the server still reads them, so the next request on the
    // connection works.
    let statuses = statuses_on_one_connection(
        server.base(),
        &[
            upload(
                "PUT /v1/functions/f HTTP/1.1\r\nx-wafer-manifest: {\"memory_mb\": ",
                &auth,
            ),
            health.clone(),
            upload("POST /fn/nope HTTP/1.1", &auth),
            health.clone(),
            upload("PUT /v1/functions/f HTTP/1.1", ""),
            health,
        ],
    )
    .await;
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 404 Not Found",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 401 Unauthorized",
            "HTTP/1.1 200 OK"
        ]
    );
}

#[tokio::test]
async fn an_oversize_upload_is_answered_before_the_client_has_sent_it() {
    let (_dir, server) = start(&["--max-module-mb", "1"]);
    let auth = format!("authorization: Bearer {}\r\n", wafer_tests::ADMIN_TOKEN);
    let size = 3 << 19; // 1.5 MiB: over the limit, well within what the server drains
    let zeros = vec![0u8; size];
    let (first, rest) = zeros.split_at(1024);
    let health: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: wafer\r\n\r\n";
    let declared = format!(
        "PUT /v1/functions/big HTTP/1.1\r\nhost: wafer\r\n{auth}content-length: {size}\r\n\r\n"
    );
    let chunked = format!(
        "PUT /v1/functions/big HTTP/1.1\r\nhost: wafer\r\n{auth}transfer-encoding: chunked\r\n\r\n"
    );
    let whole_chunk = format!("{size:x}\r\n");
    let last_chunks = format!("\r\n{:x}\r\n", first.len());
    // Each element is written whole before its answer is read: the client sends the
    // head and the first part of the body, then waits for the 413 before it sends the
    // rest. A server that read the whole body before answering would not answer until
    // it gave up on the body and closed the connection.
    let statuses = statuses_on_one_connection(
        server.base(),
        &[
            [declared.as_bytes(), first].concat(),
            [rest, health].concat(),
            // Streamed without a length: the 413 goes out once the limit is passed.
            [chunked.as_bytes(), whole_chunk.as_bytes(), &zeros[..]].concat(),
            [last_chunks.as_bytes(), first, &b"\r\n0\r\n\r\n"[..], health].concat(),
        ],
    )
    .await;
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 413 Payload Too Large",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 413 Payload Too Large",
            "HTTP/1.1 200 OK"
        ]
    );
}

#[tokio::test]
async fn a_client_expecting_100_continue_gets_the_rejection_before_uploading() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (_dir, server) = start(&[]);
    let addr = server.base().trim_start_matches("http://").to_string();
    for (head, expected) in [
        // Over the module size limit: 413 at once, no `100 Continue`, no upload.
        (
            "PUT /v1/functions/big HTTP/1.1\r\ncontent-length: 100000000000\r\n",
            "HTTP/1.1 413 Payload Too Large",
        ),
        // Unknown function: 404 without waiting for the body.
        (
            "POST /fn/nope HTTP/1.1\r\ncontent-length: 5000000\r\n",
            "HTTP/1.1 404 Not Found",
        ),
    ] {
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let mut stream = BufReader::new(stream);
        let request = format!(
            "{head}host: wafer\r\nauthorization: Bearer {}\r\nexpect: 100-continue\r\n\r\n",
            wafer_tests::ADMIN_TOKEN
        );
        stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .expect("send head");
        let mut status = String::new();
        stream.read_line(&mut status).await.expect("status");
        assert_eq!(status.trim(), expected, "{head:?}");
    }
}

#[tokio::test]
async fn text_modules_deploy_and_components_are_refused_by_name() {
    let (_dir, server) = start(&[]);
    // WebAssembly text is assembled at deploy and runs like a binary.
    let text = r#"(module
        (import "wasi_snapshot_preview1" "fd_write"
            (func $fd_write (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (data (i32.const 16) "from text\n")
        (func (export "_start")
            (i32.store (i32.const 0) (i32.const 16))
            (i32.store (i32.const 4) (i32.const 10))
            (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;
    let deployed = deploy(&server, "text", text.as_bytes().to_vec(), "").await;
    assert_eq!(deployed.status(), StatusCode::CREATED);
    let record: serde_json::Value = deployed.json().await.expect("record");
    assert!(
        record["size"].as_u64().unwrap_or(0) < text.len() as u64,
        "{record}"
    );
    let answer = wafer_tests::get(server.url("/fn/text"))
        .await
        .expect("invoke");
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.text().await.expect("body"), "from text\n");

    let broken = deploy(
        &server,
        "t2",
        b"(module (func (no_such_instruction)))".to_vec(),
        "",
    )
    .await;
    let body = expect_error(broken, StatusCode::BAD_REQUEST, "malformed_wasm").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("invalid WebAssembly text"),
        "{body}"
    );

    let component = deploy(&server, "c", b"\0asm\x0d\0\x01\0".to_vec(), "").await;
    let body = expect_error(component, StatusCode::BAD_REQUEST, "malformed_wasm").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("wasm32-wasip1"),
        "{body}"
    );
}

/// Sends `request` (possibly nothing, possibly incomplete) on a new connection and
/// reads until the server closes it; what it answered. Fails if the server still holds
/// the connection after 20 s.
async fn answer_before_close(base: &str, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("send");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stream.read_to_end(&mut answer),
    )
    .await;
    assert!(
        read.is_ok(),
        "the server still holds a connection that sent {:?}",
        String::from_utf8_lossy(request)
    );
    // A reset (the server closing with unread bytes) also ends the connection.
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn slow_or_silent_clients_are_disconnected_and_the_server_keeps_serving() {
    let (_dir, server) = start(&["--client-timeout-ms", "500"]);
    deploy_example(&server, "hello", "").await;
    let auth = format!("authorization: Bearer {}\r\n", wafer_tests::ADMIN_TOKEN);

    // Connects and says nothing; starts an HTTP/2 preface and stops; stops in the
    // middle of its headers: each is disconnected without an answer.
    for request in [
        &b""[..],
        b"PRI * HTTP/2.0\r\n",
        b"GET /healthz HTTP/1.1\r\nhost: wafer\r\n",
    ] {
        let answer = answer_before_close(server.base(), request).await;
        assert_eq!(answer, "", "{request:?}");
    }

    // Stops in the middle of a body, with a length or chunked: a 408 that says so.
    for framing in [
        "content-length: 100\r\n\r\nabc",
        "transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
    ] {
        let request = format!("POST /fn/hello HTTP/1.1\r\nhost: wafer\r\n{auth}{framing}");
        let answer = answer_before_close(server.base(), request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(answer.contains(r#""error":"request_timeout""#), "{answer}");
        assert!(answer.contains("after 3 bytes"), "{answer}");
    }
    let exported = crate::metrics(&server).await;
    assert!(
        exported
            .contains("wafer_invocation_errors_total{function=\"hello\",kind=\"ClientTimeout\"} 2"),
        "{exported}"
    );

    // A kept-alive connection is answered, then closed once idle that long.
    let answer = answer_before_close(
        server.base(),
        b"GET /healthz HTTP/1.1\r\nhost: wafer\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");

    // A slow client that keeps sending is served, however long it takes in all (here
    // 8 bytes over 1.4 s, well past the timeout).
    let (status, body) = slow_post(server.base(), &auth, 8).await;
    assert!(status.starts_with("HTTP/1.1 200 OK"), "{status}");
    assert!(body.contains("body: 8 bytes"), "{body}");

    // The same over HTTP/2: a slow upload is served, then the idle connection is closed
    // (before, the server kept it for as long as the client answered its pings).
    h2_slow_post_then_idle(server.base(), 8).await;

    // And the server goes on serving.
    let response = wafer_tests::get(server.url("/fn/hello"))
        .await
        .expect("invoke");
    assert_eq!(response.status(), StatusCode::OK);
}

/// On one HTTP/2 connection (prior knowledge), POSTs `bytes` bytes to `hello`, one
/// every 200 ms (the pace of this slow client), checks the answer, then keeps the
/// connection open from its side; fails unless the server closes it within 20 s.
async fn h2_slow_post_then_idle(base: &str, bytes: usize) {
    use bytes::Bytes;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    let addr = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("HTTP/2 handshake");
    let connection = tokio::spawn(connection);

    let pace = std::time::Duration::from_millis(200);
    let body = StreamBody::new(Box::pin(futures_util::stream::unfold(
        0,
        move |sent| async move {
            if sent == bytes {
                return None;
            }
            tokio::time::sleep(pace).await;
            let frame = Frame::data(Bytes::from_static(b"x"));
            Some((Ok::<_, std::convert::Infallible>(frame), sent + 1))
        },
    )));
    let request = http::Request::post(format!("{base}/fn/hello"))
        .header(
            "authorization",
            format!("Bearer {}", wafer_tests::ADMIN_TOKEN),
        )
        .body(body)
        .expect("request");
    let response = sender.send_request(request).await.expect("HTTP/2 answer");
    let body = crate::h2_ok_text(response).await;
    assert!(body.contains(&format!("body: {bytes} bytes")), "{body}");

    let closed = tokio::time::timeout(std::time::Duration::from_secs(20), connection).await;
    assert!(
        closed.is_ok(),
        "the server still holds an idle HTTP/2 connection"
    );
    drop(sender);
}

/// POSTs `bytes` bytes to `hello`, one every 200 ms (the pace of this slow client, not
/// a wait for the server): the status line and the body.
async fn slow_post(base: &str, auth: &str, bytes: usize) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /fn/hello HTTP/1.1\r\nhost: wafer\r\n{auth}content-length: {bytes}\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let mut pace = tokio::time::interval(std::time::Duration::from_millis(200));
    for _ in 0..bytes {
        pace.tick().await;
        stream.write_all(b"x").await.expect("a byte");
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("answer");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

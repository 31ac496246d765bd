//! What the web console stands on, over plain HTTP: its files served at `/` with the
//! right types and caching, and the server-sent event stream it follows.
//! (tests/tests/all/browser.rs drives the console itself in Chromium.)

use std::time::Duration;

use reqwest::header;
use reqwest::StatusCode;
use serde_json::Value;
use wafer_tests::{http, http_as};

use crate::{create_token, deploy_example, start, submit_job};

/// The console build id that `index.html` names its files under.
fn build_id(index: &str) -> String {
    let start = index
        .find("/console/")
        .map(|i| i + "/console/".len())
        .unwrap_or_else(|| panic!("index.html names no console files; was scripts/console.sh run before the build?\n{index}"));
    index[start..]
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn the_console_is_served_with_content_types_and_caching() {
    let (_dir, server) = start(&[]);
    // No token: the files hold no data.
    let plain = reqwest::Client::new();
    let index = plain.get(server.url("/")).send().await.expect("GET /");
    assert_eq!(
        index.status(),
        StatusCode::OK,
        "this wafer was built without the console: run scripts/console.sh, then cargo build"
    );
    let h = index.headers().clone();
    assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
    assert_eq!(h[header::CACHE_CONTROL], "no-cache");
    assert!(h.contains_key(header::CONTENT_SECURITY_POLICY));
    let etag = h[header::ETAG].to_str().expect("etag").to_string();
    let build = build_id(&index.text().await.expect("index body"));

    for (file, kind) in [
        ("boot.js", "text/javascript; charset=utf-8"),
        ("wafer_console.js", "text/javascript; charset=utf-8"),
        ("wafer_console_bg.wasm", "application/wasm"),
        ("style.css", "text/css; charset=utf-8"),
    ] {
        let url = server.url(&format!("/console/{build}/{file}"));
        let response = plain.get(&url).send().await.expect("asset");
        assert_eq!(response.status(), StatusCode::OK, "{file}");
        let h = response.headers();
        assert_eq!(h[header::CONTENT_TYPE], kind, "{file}");
        assert_eq!(
            h[header::CACHE_CONTROL],
            "public, max-age=31536000, immutable",
            "{file}"
        );
        assert!(
            h.get(header::CONTENT_ENCODING).is_none(),
            "{file}: not asked for gzip"
        );
        let plain_len = response.bytes().await.expect("body").len();
        assert!(plain_len > 0, "{file} is empty");
        // A client that takes gzip gets the smaller twin.
        let zipped = plain
            .get(&url)
            .header(header::ACCEPT_ENCODING, "gzip")
            .send()
            .await
            .expect("asset");
        assert_eq!(zipped.headers()[header::CONTENT_ENCODING], "gzip", "{file}");
        assert_eq!(zipped.headers()[header::VARY], "accept-encoding");
        let zipped_len = zipped.bytes().await.expect("body").len();
        if file.ends_with(".wasm") {
            assert!(
                zipped_len * 2 < plain_len,
                "{file}: {zipped_len} vs {plain_len}"
            );
        }
    }
    // A current copy is not sent again; another build's files are not there.
    let again = plain
        .get(server.url("/"))
        .header(header::IF_NONE_MATCH, &etag)
        .send()
        .await
        .expect("GET /");
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    let stale = plain
        .get(server.url("/console/0000000000000000/boot.js"))
        .send()
        .await
        .expect("GET stale");
    assert_eq!(stale.status(), StatusCode::NOT_FOUND);
    // Only reads are public.
    let post = plain.post(server.url("/")).send().await.expect("POST /");
    assert_eq!(post.status(), StatusCode::UNAUTHORIZED);
}

/// Reads SSE events from `response` until one named `name` satisfies `wanted`.
async fn expect_event(
    response: &mut reqwest::Response,
    buffer: &mut Vec<u8>,
    name: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let mut event = "";
            let mut data = String::new();
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if event == name {
                let json: Value = serde_json::from_str(&data).expect("event data is JSON");
                if wanted(&json) {
                    return json;
                }
            }
        }
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("no `{name}` event in time"))
            .expect("stream read");
        match chunk {
            Some(bytes) => buffer.extend_from_slice(&bytes),
            None => panic!("the stream ended before a `{name}` event"),
        }
    }
}

#[tokio::test]
async fn the_event_stream_pushes_changes_and_ends_when_the_token_is_revoked() {
    let (_dir, server) = start(&[]);
    // Without a token: refused.
    let refused = reqwest::Client::new()
        .get(server.url("/v1/events"))
        .send()
        .await
        .expect("GET /v1/events");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);

    let (secret, id) = create_token(server.base(), &["read"]).await;
    let mut stream = http_as(&secret)
        .get(server.url("/v1/events"))
        .send()
        .await
        .expect("GET /v1/events");
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(stream.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut buffer = Vec::new();

    deploy_example(&server, "hello", "").await;
    let deployed = expect_event(&mut stream, &mut buffer, "deployed", |e| {
        e["function"]["name"] == "hello"
    })
    .await;
    assert_eq!(deployed["function"]["version"], 1);

    // Invocations show in the node's totals.
    for _ in 0..3 {
        let r = http()
            .get(server.url("/fn/hello"))
            .send()
            .await
            .expect("invoke");
        assert_eq!(r.status(), StatusCode::OK);
    }
    let stats = expect_event(&mut stream, &mut buffer, "stats", |s| {
        s["invocations"].as_u64() >= Some(3)
    })
    .await;
    assert_eq!(stats["errors"], 0, "{stats}");

    // A job's life, as task changes.
    deploy_example(&server, "wordcount", "").await;
    let job = submit_job(
        &server,
        serde_json::json!({"function": "wordcount", "input": "one two"}),
    )
    .await;
    let job_id = job["id"].clone();
    expect_event(&mut stream, &mut buffer, "task_changed", |e| {
        e["job"] == job_id && e["state"] == "FINISHED"
    })
    .await;

    // Revoked: the stream says so and ends.
    let revoked = http()
        .delete(server.url(&format!("/v1/tokens/{id}")))
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoked.status(), StatusCode::OK);
    let ended = expect_event(&mut stream, &mut buffer, "ended", |_| true).await;
    assert!(
        ended["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{ended}"
    );
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(rest.is_ok(), "the stream closed after `ended`");
}

#[tokio::test]
async fn each_attempt_of_a_job_keeps_the_tail_of_its_log() {
    let (_dir, server) = start(&[]);
    let wasm = crate::stderr_program("trying hard, then giving up\n", 3);
    let deployed = crate::deploy(&server, "grumpy", wasm, "").await;
    assert_eq!(deployed.status(), StatusCode::CREATED);
    let job = submit_job(
        &server,
        serde_json::json!({"function": "grumpy", "max_attempts": 2}),
    )
    .await;
    let id = job["id"].as_u64().expect("id");
    let url = server.url(&format!("/v1/jobs/{id}?wait=60"));
    let ended: Value = http()
        .get(url)
        .send()
        .await
        .expect("wait")
        .json()
        .await
        .expect("job");
    assert_eq!(ended["state"], "FAILED", "{ended}");
    let attempts = ended["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{ended}");
    for attempt in attempts {
        assert_eq!(attempt["log"], "trying hard, then giving up\n", "{attempt}");
        assert!(
            attempt["reason"]
                .as_str()
                .is_some_and(|r| r.contains("exited with code 3")),
            "{attempt}"
        );
    }
}

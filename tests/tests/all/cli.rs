//! The `wafer` command line against a real server, and `wafer run`.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use wafer_tests::{example, functions_dir, wafer_bin};

use crate::{plain_program, start};

fn wafer(server: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(wafer_bin().expect("wafer binary"))
        .env("WAFER_TOKEN", wafer_tests::ADMIN_TOKEN)
        .args(["--server", server])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wafer");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or_default())
        .expect("write stdin");
    drop(input);
    child.wait_with_output().expect("wafer output")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn deploy_list_invoke_and_remove_with_the_cli() {
    let (dir, server) = start(&[]);
    let base = server.base().to_string();
    let hello = functions_dir().expect("examples").join("hello.wasm");
    let hello = hello.to_str().expect("utf-8 path").to_string();
    let out = tokio::task::spawn_blocking({
        let base = base.clone();
        move || {
            wafer(
                &base,
                &[
                    "deploy",
                    "hi",
                    &hello,
                    "--memory",
                    "32",
                    "--timeout",
                    "2000",
                    "--env",
                    "A=1",
                ],
                None,
            )
        }
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("deployed hi version 1"),
        "{}",
        stdout(&out)
    );

    let b = base.clone();
    let out = tokio::task::spawn_blocking(move || wafer(&b, &["fns"], None))
        .await
        .expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.contains("NAME") && table.contains("hi"), "{table}");
    assert!(
        table.contains("32 MiB") && table.contains("2000 ms"),
        "{table}"
    );

    let b = base.clone();
    let out = tokio::task::spawn_blocking(move || {
        wafer(
            &b,
            &["invoke", "hi", "--path", "/x?name=cli", "--data", "-"],
            Some(b"some input"),
        )
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    let body = stdout(&out);
    assert!(body.starts_with("Hello, cli!"), "{body}");
    assert!(
        body.contains("method: POST") && body.contains("body: 10 bytes"),
        "{body}"
    );

    let file = dir.path().join("input.txt");
    std::fs::write(&file, "from a file").expect("write");
    let at_file = format!("@{}", file.display());
    let b = base.clone();
    let out = tokio::task::spawn_blocking(move || {
        wafer(&b, &["invoke", "hi", "-d", &at_file, "-i"], None)
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("HTTP 200 OK"), "{}", stdout(&out));
    assert!(stdout(&out).contains("body: 11 bytes"), "{}", stdout(&out));

    let b = base.clone();
    let out = tokio::task::spawn_blocking(move || wafer(&b, &["rm", "hi"], None))
        .await
        .expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    let b = base.clone();
    let out = tokio::task::spawn_blocking(move || wafer(&b, &["invoke", "hi"], None))
        .await
        .expect("join");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no function named `hi`"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn cli_reports_errors_clearly() {
    let (dir, server) = start(&[]);
    let base = server.base().to_string();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"definitely not wasm").expect("write");
    let junk = junk.to_str().expect("utf-8").to_string();
    let b = base.clone();
    let out = tokio::task::spawn_blocking(move || wafer(&b, &["deploy", "junk", &junk], None))
        .await
        .expect("join");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("malformed wasm"), "{}", stderr(&out));

    // Nothing listens on port 9 of localhost.
    let out = tokio::task::spawn_blocking(|| wafer("http://127.0.0.1:9", &["fns"], None))
        .await
        .expect("join");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot reach the wafer server"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn run_passes_stdio_and_exit_codes_through() {
    let dir = tempfile::tempdir().expect("temp dir");
    let module = dir.path().join("exit3.wasm");
    std::fs::write(&module, plain_program("bye\n", 3)).expect("write");
    let out = Command::new(wafer_bin().expect("wafer"))
        .arg("run")
        .arg(&module)
        .output()
        .expect("wafer run");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(stdout(&out), "bye\n");

    // Everything after the file is the guest's, as with `wasmtime run`: a module that
    // prints its argv (NUL-separated, as `args_get` lays it out).
    let argv = dir.path().join("argv.wasm");
    std::fs::write(
        &argv,
        crate::wat(
            r#"(module
              (import "wasi_snapshot_preview1" "args_sizes_get" (func $sizes (param i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "args_get" (func $args (param i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
              (memory (export "memory") 1)
              (func (export "_start")
                (drop (call $sizes (i32.const 0) (i32.const 4)))
                (drop (call $args (i32.const 100) (i32.const 1000)))
                (i32.store (i32.const 8) (i32.const 1000))
                (i32.store (i32.const 12) (i32.load (i32.const 4)))
                (drop (call $write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 16)))))"#,
        ),
    )
    .expect("write");
    let out = Command::new(wafer_bin().expect("wafer"))
        .args(["run", "--memory", "16"])
        .arg(&argv)
        .args(["x", "-y", "--timeout", "1"])
        .output()
        .expect("wafer run");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        concat!("argv.wasm\0x\0-y\0--timeout\0", "1\0")
    );

    // A module for WASI preview 0 (`wasi_unstable`) runs as well.
    let old = dir.path().join("old.wasm");
    std::fs::write(&old, crate::preview0_program("old\n", 4)).expect("write");
    let out = Command::new(wafer_bin().expect("wafer"))
        .arg("run")
        .arg(&old)
        .output()
        .expect("wafer run");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(stdout(&out), "old\n");

    // A WAGI function run locally prints its CGI output.
    let hello = dir.path().join("hello.wasm");
    std::fs::write(&hello, example("hello").expect("example")).expect("write");
    let out = Command::new(wafer_bin().expect("wafer"))
        .arg("run")
        .arg(&hello)
        .output()
        .expect("wafer run");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("Hello, world!"), "{}", stdout(&out));

    // Sandbox defaults and limits apply.
    let spin = dir.path().join("spin.wasm");
    std::fs::write(&spin, example("spin").expect("example")).expect("write");
    let out = Command::new(wafer_bin().expect("wafer"))
        .args(["run", "--timeout", "200"])
        .arg(&spin)
        .output()
        .expect("wafer run");
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));

    let hog = dir.path().join("hog.wasm");
    std::fs::write(&hog, example("hog").expect("example")).expect("write");
    let out = Command::new(wafer_bin().expect("wafer"))
        .args(["run", "--memory", "16"])
        .arg(&hog)
        .stdout(Stdio::null())
        .output()
        .expect("wafer run");
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("memory limit of 16 MiB"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn run_reads_stdin() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sha = dir.path().join("sha256.wasm");
    std::fs::write(&sha, example("sha256").expect("example")).expect("write");
    let mut child = Command::new(wafer_bin().expect("wafer"))
        .arg("run")
        .arg(&sha)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wafer run");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"abc")
        .expect("write");
    let out = child.wait_with_output().expect("output");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        "{}",
        stdout(&out)
    );
}

#[tokio::test]
async fn function_logs_are_kept_per_invocation_and_followed_with_the_cli() {
    let (_dir, server) = start(&[]);
    let http = wafer_tests::http();
    crate::deploy_example(&server, "hello", "").await;
    let failing = crate::stderr_program("oops: no luck\n", 3);
    let response = crate::deploy(&server, "failing", failing, "").await;
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    for name in ["ann", "bob"] {
        let response = http
            .get(server.url(&format!("/fn/hello?name={name}")))
            .send()
            .await
            .expect("invoke");
        assert_eq!(response.status(), reqwest::StatusCode::OK);
    }
    let response = http
        .get(server.url("/fn/failing"))
        .send()
        .await
        .expect("invoke");
    assert_eq!(
        response.status(),
        reqwest::StatusCode::INTERNAL_SERVER_ERROR
    );

    let logs = |query: &str| {
        let http = http.clone();
        let url = server.url(&format!("/v1/functions/{query}"));
        async move {
            let response = http.get(url).send().await.expect("logs");
            let status = response.status();
            let body: serde_json::Value = response.json().await.expect("json");
            (status, body)
        }
    };
    let texts = |body: &serde_json::Value| -> Vec<String> {
        body["records"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["log"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let (status, all) = logs("hello/logs").await;
    assert_eq!(status, reqwest::StatusCode::OK, "{all}");
    assert_eq!(
        texts(&all),
        [
            "[info] hello: greeting ann\n",
            "[info] hello: greeting bob\n"
        ],
        "{all}"
    );
    let first = &all["records"][0];
    assert_eq!(
        (first["version"].as_u64(), first["status"].as_u64()),
        (Some(1), Some(200))
    );
    let first_seq = first["seq"].as_u64().expect("seq");
    let (_, newest) = logs("hello/logs?limit=1").await;
    assert_eq!(texts(&newest), ["[info] hello: greeting bob\n"], "{newest}");
    let (_, rest) = logs(&format!("hello/logs?after={first_seq}")).await;
    assert_eq!(texts(&rest), ["[info] hello: greeting bob\n"], "{rest}");
    assert_eq!(rest["next"], all["next"]);
    let (_, failed) = logs("failing/logs").await;
    assert_eq!(texts(&failed), ["oops: no luck\n"], "{failed}");
    assert_eq!(failed["records"][0]["status"], 500, "{failed}");
    let (status, body) = logs("nope/logs").await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND, "{body}");
    let (status, body) = logs("hello/logs?after=soon").await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{body}");

    // The CLI prints each line with its invocation's time, node, version and status.
    let base = server.base().to_string();
    let out = tokio::task::spawn_blocking({
        let base = base.clone();
        move || wafer(&base, &["logs", "hello"], None)
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    let ann = printed.find("v1 200 | [info] hello: greeting ann");
    let bob = printed.find("v1 200 | [info] hello: greeting bob");
    assert!(ann.is_some() && bob.is_some() && ann < bob, "{printed}");

    // `--follow` prints what later invocations write.
    let mut follower = Command::new(wafer_bin().expect("wafer"))
        .env("WAFER_TOKEN", wafer_tests::ADMIN_TOKEN)
        .args([
            "--server", &base, "logs", "hello", "--follow", "--tail", "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("wafer logs --follow");
    let lines = follower.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(lines).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = Vec::new();
    // Invoke until the follower shows carol: it may start after the first invocation.
    while !seen.iter().any(|l: &String| l.contains("greeting carol")) {
        assert!(
            std::time::Instant::now() < deadline,
            "follower printed {seen:?}"
        );
        let response = http
            .get(server.url("/fn/hello?name=carol"))
            .send()
            .await
            .expect("invoke");
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(1500)) {
            seen.push(line);
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(
        !seen.iter().any(|l| l.contains("greeting ann")),
        "--tail 0 starts with new logs: {seen:?}"
    );

    // A removed function's logs go with it.
    let response = http
        .delete(server.url("/v1/functions/hello"))
        .send()
        .await
        .expect("remove");
    assert!(response.status().is_success());
    crate::deploy_example(&server, "hello", "").await;
    let (_, fresh) = logs("hello/logs").await;
    assert!(texts(&fresh).is_empty(), "{fresh}");
}

/// The body `GET /fn/{name}` answers.
async fn invoke_text(server: &wafer_tests::DevServer, name: &str) -> String {
    wafer_tests::http()
        .get(server.url(&format!("/fn/{name}")))
        .send()
        .await
        .expect("invoke")
        .text()
        .await
        .expect("body")
}

#[tokio::test]
async fn rollback_restores_an_earlier_version_and_survives_a_restart() {
    let (dir, server) = start(&[]);
    let base = server.base().to_string();
    let run = |args: &'static [&'static str]| {
        let base = base.clone();
        tokio::task::spawn_blocking(move || wafer(&base, args, None))
    };
    assert!(crate::deploy(
        &server,
        "greet",
        example("hello").expect("hello"),
        "memory_mb=32"
    )
    .await
    .status()
    .is_success());
    assert!(crate::deploy(
        &server,
        "greet",
        example("wordcount").expect("wordcount"),
        ""
    )
    .await
    .status()
    .is_success());
    assert!(!invoke_text(&server, "greet").await.contains("Hello"));

    let out = run(&["versions", "greet"]).await.expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows[0].trim_start().starts_with('1') && rows[0].contains("32 MiB"),
        "{table}"
    );
    assert!(
        rows[1].trim_start().starts_with('2') && rows[1].contains("current"),
        "{table}"
    );

    // Without --to: back to the version before the current one, as version 3.
    let out = run(&["rollback", "greet"]).await.expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("greet is now version 3 (the module and spec of version 1"),
        "{}",
        stdout(&out)
    );
    assert!(invoke_text(&server, "greet")
        .await
        .starts_with("Hello, world!"));
    let record: serde_json::Value = wafer_tests::get(server.url("/v1/functions/greet"))
        .await
        .expect("show")
        .json()
        .await
        .expect("record");
    assert_eq!(record["version"], 3, "{record}");
    assert_eq!(record["memory_mb"], 32, "{record}");
    assert_eq!(record["restored_from"], 1, "{record}");

    // Versions that are not kept, the current one, and bad bodies are refused clearly.
    let rollback = |body: &'static str| {
        wafer_tests::http()
            .post(server.url("/v1/functions/greet/rollback"))
            .body(body)
            .send()
    };
    let refused = rollback(r#"{"version": 9}"#).await.expect("rollback");
    assert_eq!(refused.status(), reqwest::StatusCode::NOT_FOUND);
    let text = refused.text().await.expect("body");
    assert!(
        text.contains("unknown_version") && text.contains("keeps no version 9 (kept: 1, 2, 3)"),
        "{text}"
    );
    let refused = rollback(r#"{"version": 3}"#).await.expect("rollback");
    assert_eq!(refused.status(), reqwest::StatusCode::CONFLICT);
    assert!(refused
        .text()
        .await
        .expect("body")
        .contains("already runs version 3"));
    let refused = rollback(r#"{"versoin": 1}"#).await.expect("rollback");
    assert_eq!(refused.status(), reqwest::StatusCode::BAD_REQUEST);
    let out = run(&["rollback", "nobody"]).await.expect("join");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no function named `nobody`"),
        "{}",
        stderr(&out)
    );

    // The kept versions survive a restart, and any of them can be restored.
    server.kill().expect("stop");
    let server = wafer_tests::DevServer::start(&dir.path().join("data"), &["--no-examples"])
        .expect("restart");
    assert!(invoke_text(&server, "greet")
        .await
        .starts_with("Hello, world!"));
    let response = wafer_tests::http()
        .post(server.url("/v1/functions/greet/rollback"))
        .json(&serde_json::json!({ "version": 2 }))
        .send()
        .await
        .expect("rollback");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert!(!invoke_text(&server, "greet").await.contains("Hello"));
    let versions: serde_json::Value = wafer_tests::get(server.url("/v1/functions/greet/versions"))
        .await
        .expect("versions")
        .json()
        .await
        .expect("JSON");
    assert_eq!(versions["current"], 4, "{versions}");
    let listed: Vec<u64> = versions["versions"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|v| v["version"].as_u64())
        .collect();
    assert_eq!(listed, [1, 2, 3, 4]);
}

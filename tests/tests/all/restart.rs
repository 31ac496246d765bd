//! Durability: a restarted server keeps its functions and serves them from the
//! precompiled-code cache without recompiling.

use anyhow::Context;
use reqwest::StatusCode;
use wafer_tests::{metric, DevServer};

use crate::{deploy_example, metrics};

#[tokio::test]
async fn restart_keeps_functions_and_uses_the_precompiled_cache() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let server = DevServer::start(&data, &["--no-examples"]).expect("start");
    deploy_example(&server, "hello", "timeout_ms=1500").await;
    deploy_example(&server, "markdown", "").await;
    let before = metrics(&server).await;
    assert_eq!(
        metric(&before, "wafer_module_compilations_total"),
        Some(2.0),
        "{before}"
    );
    // The in-process agent runs jobs in the server's runtime: a job of a deployed
    // function loads the code compiled at deploy (a hit of the node's cache) and
    // compiles nothing.
    let job = crate::submit_job(
        &server,
        serde_json::json!({ "function": "hello", "input": "" }),
    )
    .await;
    let id = job["id"].as_u64().expect("job id");
    let ended: serde_json::Value = wafer_tests::get(server.url(&format!("/v1/jobs/{id}?wait=30")))
        .await
        .expect("job")
        .json()
        .await
        .expect("job JSON");
    assert_eq!(ended["state"], "FINISHED", "{ended}");
    let after_job = metrics(&server).await;
    assert_eq!(
        metric(&after_job, "wafer_module_compilations_total"),
        Some(2.0),
        "{after_job}"
    );
    let hits = |text: &str| metric(text, "wafer_module_cache_hits_total").unwrap_or(-1.0);
    assert_eq!(hits(&after_job), hits(&before) + 1.0, "{after_job}");
    // No graceful shutdown: what was acknowledged must be on disk.
    server.kill().expect("kill");

    let server = DevServer::start(&data, &["--no-examples"]).expect("restart");
    let list: serde_json::Value = wafer_tests::get(server.url("/v1/functions"))
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let functions = list["functions"].as_array().expect("array");
    assert_eq!(functions.len(), 2, "{list}");
    assert_eq!(functions[0]["name"], "hello");
    assert_eq!(functions[0]["timeout_ms"], 1500);

    let response = wafer_tests::get(server.url("/fn/hello?name=again"))
        .await
        .expect("invoke");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response
        .text()
        .await
        .expect("body")
        .starts_with("Hello, again!"));

    let after = metrics(&server).await;
    assert_eq!(
        metric(&after, "wafer_module_compilations_total"),
        Some(0.0),
        "{after}"
    );
    assert_eq!(
        metric(&after, "wafer_module_cache_hits_total"),
        Some(2.0),
        "{after}"
    );
    assert_eq!(
        metric(&after, "wafer_module_cache_misses_total"),
        Some(0.0),
        "{after}"
    );
}

#[tokio::test]
async fn corrupt_cache_entries_are_recompiled() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let server = DevServer::start(&data, &["--no-examples"]).expect("start");
    deploy_example(&server, "hello", "").await;
    server.kill().expect("kill");
    for entry in std::fs::read_dir(data.join("cache")).expect("cache folder") {
        let path = entry.expect("entry").path();
        let mut bytes = std::fs::read(&path).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, bytes).expect("write");
    }
    let server = DevServer::start(&data, &["--no-examples"]).expect("restart");
    let response = wafer_tests::get(server.url("/fn/hello"))
        .await
        .expect("invoke");
    assert_eq!(response.status(), StatusCode::OK);
    let after = metrics(&server).await;
    assert_eq!(
        metric(&after, "wafer_module_compilations_total"),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        metric(&after, "wafer_module_cache_misses_total"),
        Some(1.0),
        "{after}"
    );
}

#[tokio::test]
async fn a_second_server_on_the_same_data_folder_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let _server = DevServer::start(&data, &["--no-examples"]).expect("start");
    let second = DevServer::start(&data, &["--no-examples"]);
    let err = match second {
        Ok(_) => panic!("a second server started on the same data folder"),
        Err(err) => format!("{err:#}"),
    };
    assert!(err.contains("wafer.redb"), "{err}");
}

/// A daemon whose stdout reader has gone (`wafer dev | head -1`, a closed pipe) keeps
/// serving: its ready lines are not worth dying for.
#[tokio::test]
async fn a_closed_stdout_does_not_stop_the_server() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = wafer_tests::unused_port()?;
    let args = [
        "dev",
        "--no-examples",
        "--http",
        &format!("127.0.0.1:{port}"),
        "--api",
        "127.0.0.1:0",
        "--data",
        &dir.path().join("data").display().to_string(),
    ]
    .map(String::from);
    let mut child = wafer_tests::spawn_with_closed_stdout(
        &args,
        &dir.path().join("dev.log"),
        "wafer dev ready",
    )
    .await?;
    let answer = wafer_tests::http()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    let _ = child.kill();
    let _ = child.wait();
    anyhow::ensure!(
        answer.is_ok_and(|r| r.status() == StatusCode::OK),
        "wafer dev does not serve after its ready lines met the closed pipe"
    );
    Ok(())
}

/// SIGTERM stops `wafer dev` gracefully: a request in flight is answered, then the
/// process exits with success. (With an accelerator backend in the process, PoCL's LLVM
/// used to turn the signal into an immediate death that dropped the request.)
#[tokio::test]
async fn a_stop_signal_lets_requests_in_flight_finish() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, server) = crate::start(&[]);
    deploy_example(&server, "hello", "").await;

    // A request whose body the server is waiting for: it answers `100 Continue` once
    // the function reads its body, so the request is in flight when it says so.
    let addr = server.base().trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await?;
    let head = format!(
        "POST /fn/hello HTTP/1.1\r\nhost: wafer\r\nauthorization: Bearer {}\r\n\
         content-length: 6\r\nexpect: 100-continue\r\n\r\n",
        wafer_tests::ADMIN_TOKEN
    );
    stream.write_all(head.as_bytes()).await?;
    let mut interim = [0u8; 25];
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stream.read_exact(&mut interim),
    )
    .await??;
    anyhow::ensure!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "{}",
        String::from_utf8_lossy(&interim)
    );

    server.terminate()?;
    stream.write_all(b"abcdef").await?;
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stream.read_to_end(&mut answer),
    )
    .await?
    .context("the server dropped the request in flight")?;
    let answer = String::from_utf8_lossy(&answer);
    anyhow::ensure!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    anyhow::ensure!(answer.contains("body: 6 bytes"), "{answer}");

    let status = server.exited(std::time::Duration::from_secs(20)).await?;
    anyhow::ensure!(status.success(), "wafer dev exited with {status}");
    Ok(())
}

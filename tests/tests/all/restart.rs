//! Durability: a restarted server keeps its functions and serves them from the
//! precompiled-code cache without recompiling.

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

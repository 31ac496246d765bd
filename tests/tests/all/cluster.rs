//! Multi-node clusters of real `wafer server` processes: replication of deploys,
//! leader failure, catch-up from the log and from snapshots, membership changes, and
//! data folders that cannot be used.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use wafer_tests::cluster::{spawn_server, Cluster, Join, Server, SETTLE_DEADLINE};

use crate::plain_program;

/// `PUT /v1/functions/{name}` on `server`; returns the status and JSON body.
async fn deploy_to(server: &Server, name: &str, wasm: Vec<u8>) -> (StatusCode, Value) {
    let response = wafer_tests::http()
        .put(server.url(&format!("/v1/functions/{name}")))
        .body(wasm)
        .send()
        .await
        .expect("deploy request");
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// GETs `path` on `server` until it answers 200 (a follower applies a little after
/// the leader); returns the body.
async fn get_eventually(server: &Server, path: &str) -> String {
    let until = Instant::now() + SETTLE_DEADLINE;
    loop {
        let last = match wafer_tests::get(server.url(path)).await {
            Ok(r) if r.status() == StatusCode::OK => return r.text().await.expect("body"),
            Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < until,
            "GET {path} on node {} never succeeded; last: {last}",
            server.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Names of the functions node `server` lists after a linearizable read.
async fn consistent_names(server: &Server) -> Vec<String> {
    let body = get_eventually(server, "/v1/functions?consistent=true").await;
    let json: Value = serde_json::from_str(&body).expect("JSON list");
    let mut names: Vec<String> = json["functions"]
        .as_array()
        .expect("functions array")
        .iter()
        .filter_map(|f| f["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// Runs `wafer --server <server's gateway> ARGS`, expects success, returns stdout.
fn cli(server: &Server, args: &[&str]) -> String {
    let output = std::process::Command::new(wafer_tests::wafer_bin().expect("wafer"))
        .env("WAFER_TOKEN", wafer_tests::ADMIN_TOKEN)
        .args(["--server", &server.base()])
        .args(args)
        .output()
        .expect("run wafer");
    assert!(
        output.status.success(),
        "wafer {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn follower_of(leader: u64, nodes: &[u64]) -> u64 {
    *nodes.iter().find(|&&n| n != leader).expect("a follower")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_form_a_cluster_and_a_deploy_on_a_follower_is_served_everywhere() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(dir.path(), 3, &[])
        .await
        .expect("cluster starts");
    let leader = cluster.wait_leader(&[1, 2, 3]).await.expect("a leader");
    let follower = follower_of(leader, &[1, 2, 3]);

    let status = cluster.status(follower).await.expect("status");
    assert_eq!(status["id"], follower);
    assert_eq!(status["leader_id"], leader);
    assert!(status["term"].as_u64().is_some_and(|t| t >= 1), "{status}");
    assert_eq!(
        status["members"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );
    assert!(status["last_log_index"].as_u64().is_some(), "{status}");

    // Raft metrics: the node all agree leads reports itself leader, the others do not,
    // and each counts three voters (polled: leadership may move meanwhile).
    let until = Instant::now() + SETTLE_DEADLINE;
    loop {
        let now = cluster.wait_leader(&[1, 2, 3]).await.expect("a leader");
        let mut seen = Vec::new();
        for id in [1, 2, 3] {
            let text = wafer_tests::get(cluster.server(id).url("/metrics"))
                .await
                .expect("metrics")
                .text()
                .await
                .expect("metrics text");
            seen.push((
                wafer_tests::metric(&text, "wafer_raft_is_leader"),
                wafer_tests::metric(&text, "wafer_raft_voters"),
            ));
        }
        let expected: Vec<_> = [1, 2, 3]
            .iter()
            .map(|&id| (Some(if id == now { 1.0 } else { 0.0 }), Some(3.0)))
            .collect();
        if seen == expected {
            break;
        }
        assert!(
            Instant::now() < until,
            "raft metrics {seen:?}, leader {now}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let hello = wafer_tests::example("hello").expect("example built");
    let (code, record) = deploy_to(cluster.server(follower), "hello", hello).await;
    assert_eq!(code, StatusCode::CREATED, "{record}");
    assert_eq!(record["version"], 1);
    // The follower acknowledged after commit and serves its own write at once.
    let body = wafer_tests::get(cluster.server(follower).url("/fn/hello?name=ack"))
        .await
        .expect("invoke")
        .text()
        .await
        .expect("body");
    assert!(body.contains("Hello, ack!"), "{body}");
    for id in [1, 2, 3] {
        let body = get_eventually(cluster.server(id), &format!("/fn/hello?name=node{id}")).await;
        assert!(
            body.contains(&format!("Hello, node{id}!")),
            "node {id}: {body}"
        );
    }
    // Each server keeps the logs of the invocations it took; `wafer logs` asked on one
    // gathers them from all.
    let base = cluster.server(1).base();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(wafer_tests::wafer_bin().expect("wafer"))
            .env("WAFER_TOKEN", wafer_tests::ADMIN_TOKEN)
            .args(["--server", &base, "logs", "hello"])
            .output()
    })
    .await
    .expect("join")
    .expect("wafer logs");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in [1, 2, 3] {
        assert!(
            printed.contains(&format!(
                "node {id} v1 200 | [info] hello: greeting node{id}"
            )),
            "{printed}"
        );
    }

    // Labels are small metadata commands: set through one node, read on another.
    let other = *[1, 2, 3]
        .iter()
        .find(|&&n| n != leader && n != follower)
        .expect("a second follower");
    let http = wafer_tests::http();
    let response = http
        .patch(cluster.server(leader).url("/v1/functions/hello/labels"))
        .json(&serde_json::json!({ "set": { "team": "edge", "tier": "1" } }))
        .send()
        .await
        .expect("label");
    assert_eq!(response.status(), StatusCode::OK);
    let response = http
        .patch(cluster.server(follower).url("/v1/functions/hello/labels"))
        .json(&serde_json::json!({ "remove": ["tier"] }))
        .send()
        .await
        .expect("label");
    assert_eq!(response.status(), StatusCode::OK);
    let shown: Value = serde_json::from_str(
        &get_eventually(cluster.server(other), "/v1/functions/hello?consistent=true").await,
    )
    .expect("JSON record");
    assert_eq!(
        shown["labels"],
        serde_json::json!({ "team": "edge" }),
        "{shown}"
    );
    assert_eq!(
        shown["version"], 1,
        "labels do not make a new version: {shown}"
    );
    let response = http
        .patch(cluster.server(other).url("/v1/functions/hello/labels"))
        .json(&serde_json::json!({ "set": { "Bad Key": "x" } }))
        .send()
        .await
        .expect("label");
    crate::expect_error(response, StatusCode::BAD_REQUEST, "invalid_label").await;

    // A removal through another follower is seen everywhere too.
    let response = wafer_tests::http()
        .delete(cluster.server(other).url("/v1/functions/hello"))
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), StatusCode::OK);
    for id in [1, 2, 3] {
        assert!(
            consistent_names(cluster.server(id)).await.is_empty(),
            "node {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_leader_is_killed_acknowledged_deploys_survive_and_it_catches_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(dir.path(), 3, &[])
        .await
        .expect("cluster starts");
    let leader = cluster.wait_leader(&[1, 2, 3]).await.expect("a leader");

    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let name = format!("f{i}");
        let target = cluster.server((i % 3) + 1);
        let (code, body) = deploy_to(target, &name, plain_program(&format!("out {i}"), 0)).await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
        acknowledged.push(name);
    }

    cluster.kill(leader).expect("kill -9 the leader");
    let survivors: Vec<u64> = cluster.up();
    let new_leader = cluster.wait_leader(&survivors).await.expect("a new leader");
    assert_ne!(new_leader, leader);
    for &id in &survivors {
        assert_eq!(
            consistent_names(cluster.server(id)).await,
            acknowledged,
            "node {id}"
        );
    }

    // Writes continue without the old leader.
    let (code, body) = deploy_to(
        cluster.server(follower_of(new_leader, &survivors)),
        "after",
        plain_program("after", 0),
    )
    .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    acknowledged.insert(0, "after".to_string());

    // The old leader restarts from its data folder and catches up from the log.
    cluster.restart(leader).expect("restart the old leader");
    let target = cluster.status(new_leader).await.expect("status")["last_log_index"]
        .as_u64()
        .expect("an index");
    cluster
        .wait_applied(leader, target)
        .await
        .expect("catches up");
    assert_eq!(consistent_names(cluster.server(leader)).await, acknowledged);
    let body = get_eventually(cluster.server(leader), "/fn/after").await;
    assert_eq!(body, "after");
}

/// Each node in turn is killed (-9) right after deploys it acknowledged, and restarted
/// while the others go on: every acknowledged deploy is on every node at the end
/// (appends are durable through the Raft log's write-ahead file, which a restart
/// replays), and nothing else is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_each_node_in_turn_loses_no_acknowledged_deploy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(dir.path(), 3, &[])
        .await
        .expect("cluster starts");
    let all = [1, 2, 3];
    let mut acknowledged = Vec::new();
    for round in 0..6u64 {
        let leader = cluster.wait_leader(&all).await.expect("a leader");
        // Round by round the leader and each follower are killed.
        let victim = if round % 2 == 0 {
            leader
        } else {
            follower_of(leader, &all)
        };
        for i in 0..3 {
            let name = format!("r{round}-{i}");
            let (code, body) =
                deploy_to(cluster.server(victim), &name, plain_program(&name, 0)).await;
            assert_eq!(code, StatusCode::CREATED, "{body}");
            acknowledged.push(name);
        }
        cluster.kill(victim).expect("kill -9");
        let survivors = cluster.up();
        let leader = cluster.wait_leader(&survivors).await.expect("a leader");
        let name = format!("r{round}-without-{victim}");
        let (code, body) = deploy_to(cluster.server(leader), &name, plain_program(&name, 0)).await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
        acknowledged.push(name);
        cluster.restart(victim).expect("restart");
    }
    let leader = cluster.wait_leader(&all).await.expect("a leader");
    let target = cluster.status(leader).await.expect("status")["last_log_index"]
        .as_u64()
        .expect("an index");
    acknowledged.sort();
    for id in all {
        cluster.wait_applied(id, target).await.expect("caught up");
        assert_eq!(
            consistent_names(cluster.server(id)).await,
            acknowledged,
            "node {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_compacted_entries_catches_up_from_a_snapshot() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(
        dir.path(),
        3,
        &["--snapshot-every", "4", "--keep-logs", "0"],
    )
    .await
    .expect("cluster starts");
    let leader = cluster.wait_leader(&[1, 2, 3]).await.expect("a leader");
    let lagging = follower_of(leader, &[1, 2, 3]);
    cluster.kill(lagging).expect("kill a follower");

    let mut names = Vec::new();
    for i in 0..12 {
        let name = format!("s{i:02}");
        let (code, body) = deploy_to(
            cluster.server(leader),
            &name,
            plain_program(&format!("snap {i}"), 0),
        )
        .await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
        names.push(name);
    }
    // The leader compacted its log past what the stopped node has.
    let status = cluster
        .wait_until(&[leader], "the leader purged its log", |s| {
            s[0]["purged_index"].as_u64().is_some_and(|p| p >= 8)
        })
        .await
        .expect("log compaction");
    let last = status[0]["last_log_index"].as_u64().expect("an index");

    cluster.restart(lagging).expect("restart the follower");
    let caught_up = cluster
        .wait_applied(lagging, last)
        .await
        .expect("catches up");
    assert!(
        caught_up["snapshot_index"].as_u64().is_some_and(|s| s >= 8),
        "the follower installed a snapshot: {caught_up}"
    );
    assert!(
        cluster
            .server(lagging)
            .log()
            .contains("installed a snapshot"),
        "the follower's log mentions the snapshot"
    );
    assert_eq!(consistent_names(cluster.server(lagging)).await, names);
    assert_eq!(
        get_eventually(cluster.server(lagging), "/fn/s11").await,
        "snap 11"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_grows_to_five_and_shrinks_and_keeps_committing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(dir.path(), 3, &[])
        .await
        .expect("cluster starts");
    let via = cluster.server(2).rpc.clone();
    cluster.add_server(4, Join::Via(via)).expect("node 4 joins");
    cluster.add_server(5, Join::Wait).expect("node 5 waits");
    // Node 5 is added from the CLI, through node 3's gateway.
    let added = cli(
        cluster.server(3),
        &["cluster", "add", &cluster.server(5).rpc],
    );
    assert!(added.contains("added node 5"), "{added}");
    let all = [1, 2, 3, 4, 5];
    cluster.wait_voters(&all, &all).await.expect("five voters");

    // A server with another cluster's secret cannot join: it says why and exits.
    let stranger = std::process::Command::new(wafer_tests::wafer_bin().expect("wafer"))
        .env("WAFER_CLUSTER_SECRET", "the-secret-of-another-cluster")
        .args(["server", "--id", "9", "--listen", "127.0.0.1:0"])
        .args(["--http", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .args(["--join", &cluster.server(1).rpc, "--data"])
        .arg(dir.path().join("stranger"))
        .output()
        .expect("run wafer server");
    assert!(!stranger.status.success());
    let stderr = String::from_utf8_lossy(&stranger.stderr);
    assert!(stderr.contains("wrong cluster secret"), "{stderr}");
    // Garbage, or a message over the 1 GiB a node reads, closes only that connection.
    let rpc = cluster.server(1).rpc.clone();
    wafer_tests::assert_connection_closed(&rpc, b"\xff\xff\xff\x7f garbage").await;
    let oversized = wafer_tests::capnp_frame_announcing((1 << 27) + 1);
    wafer_tests::assert_connection_closed(&rpc, &oversized).await;

    let (code, body) = deploy_to(cluster.server(5), "grown", plain_program("five", 0)).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    for id in all {
        assert_eq!(
            get_eventually(cluster.server(id), "/fn/grown").await,
            "five"
        );
    }
    // The CLI through any member: labels, and a linearizable listing.
    let labeled = cli(cluster.server(1), &["label", "grown", "team=edge"]);
    assert!(labeled.contains("team=edge"), "{labeled}");
    let listed = cli(cluster.server(4), &["fns", "--json"]);
    assert!(listed.contains("\"team\": \"edge\""), "{listed}");

    cli(cluster.server(4), &["cluster", "remove", "2"]);
    let rest = [1, 3, 4, 5];
    cluster
        .wait_voters(&rest, &rest)
        .await
        .expect("four voters");
    cluster.kill(2).expect("stop the removed node");
    let (code, body) = deploy_to(cluster.server(1), "shrunk", plain_program("four", 0)).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    for id in rest {
        assert_eq!(
            get_eventually(cluster.server(id), "/fn/shrunk").await,
            "four"
        );
    }

    // `wafer cluster status` names the leader and every member.
    let text = cli(cluster.server(5), &["cluster", "status"]);
    assert!(text.contains("leader:"), "{text}");
    for id in rest {
        assert!(
            text.contains(&cluster.server(id).rpc),
            "status lists node {id}: {text}"
        );
    }
    assert!(!text.contains(&cluster.server(2).rpc), "{text}");
}

/// Runs `wafer server` on `data` and expects it to exit with an error mentioning
/// `expected`.
fn expect_start_failure(id: u64, data: &std::path::Path, expected: &str) {
    let result = spawn_server(
        id,
        data,
        "127.0.0.1:0",
        "127.0.0.1:0",
        "127.0.0.1:0",
        &Join::Bootstrap,
        &[],
    );
    let err = match result {
        Ok((mut child, _, _, _)) => {
            let _ = child.kill();
            panic!("wafer server started on {}", data.display());
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(expected), "expected {expected:?} in: {err}");
    assert!(
        !err.contains("panicked"),
        "a clear error, not a panic: {err}"
    );
}

/// Damages the file at `path`: its first 4 KiB (a redb file's header) overwritten.
fn overwrite_head(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).expect("read the file to damage");
    for b in bytes.iter_mut().take(4096) {
        *b = 0x5a;
    }
    std::fs::write(path, bytes).expect("damage the file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_keeps_its_state_and_unusable_data_folders_fail_clearly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(dir.path(), 1, &[])
        .await
        .expect("server starts");
    let (code, body) = deploy_to(cluster.server(1), "kept", plain_program("kept", 0)).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    // After a graceful stop and after a crash, the server comes back caught up.
    cluster.stop(1).expect("stop");
    cluster.restart(1).expect("restart");
    assert_eq!(get_eventually(cluster.server(1), "/fn/kept").await, "kept");
    cluster.kill(1).expect("kill");
    cluster.restart(1).expect("restart");
    assert_eq!(get_eventually(cluster.server(1), "/fn/kept").await, "kept");
    let log = cluster.server(1).log();
    assert!(log.contains("caught up with the cluster"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "a log written to a file has no terminal colour codes: {log}"
    );
    assert!(!log.contains("without catching up"), "{log}");
    // Deploys acknowledged just before a crash are in the Raft log's write-ahead file
    // only (its redb file is checkpointed once a second): the restart replays them.
    const REPLAYED: &str = "replayed the Raft log's write-ahead file";
    let replays = log.matches(REPLAYED).count();
    for name in ["late-1", "late-2", "late-3"] {
        let (code, body) = deploy_to(cluster.server(1), name, plain_program(name, 0)).await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
    }
    cluster.kill(1).expect("kill");
    cluster.restart(1).expect("restart");
    for name in ["kept", "late-1", "late-2", "late-3"] {
        assert_eq!(
            get_eventually(cluster.server(1), &format!("/fn/{name}")).await,
            name
        );
    }
    let log = cluster.server(1).log();
    assert!(log.matches(REPLAYED).count() > replays, "{log}");
    let data = cluster.server(1).data.clone();
    cluster.kill(1).expect("kill");

    // Another node may not use this folder.
    expect_start_failure(2, &data, "belongs to node 1");
    // A lost write-ahead file of the Raft log (it may hold acknowledged entries).
    let wal = data.join("raft-log.wal");
    std::fs::remove_file(&wal).expect("remove the write-ahead file");
    expect_start_failure(1, &data, "write-ahead file is missing");
    // A damaged Raft log, then a lost one.
    let log_file = data.join("raft-log.redb");
    overwrite_head(&log_file);
    expect_start_failure(1, &data, "opening the Raft log");
    std::fs::remove_file(&log_file).expect("remove the Raft log");
    expect_start_failure(1, &data, "lost its Raft log");
    // A damaged database.
    let db = data.join("wafer.redb");
    overwrite_head(&db);
    expect_start_failure(1, &data, "damaged");
    // A lost database.
    std::fs::remove_file(&db).expect("remove the database");
    expect_start_failure(1, &data, "lost its database");
    // A data folder that cannot be created.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a folder").expect("file");
    let output = std::process::Command::new(wafer_tests::wafer_bin().expect("wafer"))
        .env("WAFER_CLUSTER_SECRET", wafer_tests::CLUSTER_SECRET)
        .args([
            "server",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .arg("--data")
        .arg(file.join("data"))
        .output()
        .expect("run wafer server");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("creating data folder") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// A node whose Raft stops on a storage error it cannot go on from (here its snapshot
/// folder was removed, so the next snapshot cannot be written) exits with the reason
/// instead of serving on without consensus, and a restart recovers from its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_raft_stops_exits_with_the_reason_and_a_restart_recovers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(dir.path(), 1, &["--snapshot-every", "3"])
        .await
        .expect("server starts");
    let (code, body) = deploy_to(cluster.server(1), "before", plain_program("before", 0)).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    // The server may be writing a snapshot into the folder meanwhile.
    let snapshots = cluster.server(1).data.join("snapshots");
    let deadline = Instant::now() + SETTLE_DEADLINE;
    while let Err(e) = std::fs::remove_dir_all(&snapshots) {
        assert!(
            e.kind() == std::io::ErrorKind::DirectoryNotEmpty && Instant::now() < deadline,
            "remove snapshots: {e}"
        );
    }

    // Writes go on until the next snapshot is due and cannot be written.
    let base = cluster.server(1).base();
    let writes = async {
        let client = wafer_tests::http();
        for i in 0..100 {
            let _ = client
                .put(format!("{base}/v1/functions/w{i}"))
                .body(plain_program("w", 0))
                .send()
                .await;
        }
        std::future::pending::<()>().await
    };
    let status = tokio::select! {
        status = cluster.wait_exit(1) => status.expect("the server exits"),
        () = writes => unreachable!("the writes never end"),
    };
    assert!(!status.success(), "exits with an error: {status}");
    let log = cluster.server(1).log();
    assert!(log.contains("Raft stopped"), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    cluster.restart(1).expect("restart");
    assert_eq!(
        get_eventually(cluster.server(1), "/fn/before").await,
        "before"
    );
}

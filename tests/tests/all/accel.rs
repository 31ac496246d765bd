//! Accelerators on real OpenCL (PoCL's CPU device, installed by the bootstrap script):
//! `wafer dev` starts a backend in-process and grants its device to functions and jobs
//! deployed with `accel=1`; in a cluster, `wafer accel --agent` attaches a backend to
//! one agent, and jobs that ask for a device land only there, across a backend restart.

use reqwest::StatusCode;
use serde_json::{json, Value};
use wafer_tests::cluster::{Cluster, Server};
use wafer_tests::{http, DevServer};

use crate::accel_rpc::Backend;
use crate::{deploy, deploy_example, start, submit_job};

async fn probe(server: &DevServer, function: &str, case: &str) -> Value {
    let response = http()
        .get(server.url(&format!("/fn/{function}?case={case}")))
        .send()
        .await
        .expect("probe");
    assert_eq!(response.status(), StatusCode::OK, "{case}");
    response.json().await.expect("probe JSON")
}

fn expect_kind(answer: &Value, kind: &str) {
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["kind"], kind, "{answer}");
    assert!(
        answer["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{answer}"
    );
}

#[tokio::test]
async fn granted_guests_run_kernels_and_bad_calls_get_typed_errors() {
    let (_dir, server) = start(&[]);
    deploy_example(&server, "accel-probe", "accel=1&accel_memory_mb=16").await;

    // The node offers the device, with its attributes (once the agent registered it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let agent = loop {
        let nodes: Value = http()
            .get(server.url("/v1/nodes"))
            .send()
            .await
            .expect("nodes")
            .json()
            .await
            .expect("nodes JSON");
        let agent = nodes["agents"][0].clone();
        if agent["resources"]["accelerators"].as_u64() >= Some(1) {
            break agent;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the device was never offered: {nodes}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(agent["attributes"]["accel.type"], "cpu", "{agent}");

    let device = probe(&server, "accel-probe", "device").await;
    assert_eq!(device["ok"], true, "{device}");
    assert_eq!(device["device"]["type"], "cpu", "{device}");
    assert!(
        device["device"]["compute_units"].as_u64() >= Some(1),
        "{device}"
    );

    // Vector add, checked element by element against the CPU inside the guest.
    let added = probe(&server, "accel-probe", "vecadd&n=100000").await;
    assert_eq!(added["ok"], true, "{added}");
    assert_eq!(added["matches"], true, "{added}");

    // A kernel that does not compile: the build log reaches the guest.
    let broken = probe(&server, "accel-probe", "compile_error").await;
    expect_kind(&broken, "Compile");
    assert!(
        broken["message"]
            .as_str()
            .is_some_and(|m| m.contains("undefined_name")),
        "{broken}"
    );
    expect_kind(
        &probe(&server, "accel-probe", "arg_count").await,
        "ArgCount",
    );
    expect_kind(&probe(&server, "accel-probe", "arg_type").await, "ArgType");
    expect_kind(
        &probe(&server, "accel-probe", "small_buffer").await,
        "BufferTooSmall",
    );
    expect_kind(
        &probe(&server, "accel-probe", "work_size").await,
        "WorkSize",
    );

    // Queued runs: 300 increments (past the 256 that are sent without waiting for a
    // later call) all ran before the read, and a queued chain of two kernels sent by
    // `finish` ran in order.
    let queued = probe(&server, "accel-probe", "queue&runs=300").await;
    assert_eq!(queued["ok"], true, "{queued}");
    assert_eq!(queued["idle_device_ns"], 0, "nothing queued: {queued}");
    assert_eq!(queued["first"], 300, "{queued}");
    assert_eq!(queued["after_runs"], true, "{queued}");
    assert_eq!(queued["chained"], (300 * 2 + 1) * 2, "{queued}");
    assert_eq!(queued["after_chain"], true, "{queued}");
    // A queued run that fails its checks: the error names it, and no run of its batch
    // ran (not even the one before it).
    let failed = probe(&server, "accel-probe", "queue_error").await;
    expect_kind(&failed, "ArgCount");
    assert!(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("run 2 of 3: ")),
        "{failed}"
    );
    assert_eq!(failed["untouched"], true, "{failed}");
    assert_eq!(failed["again_device_ns"], 0, "{failed}");

    // The grant's 16 MiB: 8 buffers of 1 MiB fit, 32 do not.
    let fits = probe(&server, "accel-probe", "memory&mb=8").await;
    assert_eq!(fits["buffers"], 8, "{fits}");
    expect_kind(
        &probe(&server, "accel-probe", "memory&mb=32").await,
        "MemoryLimit",
    );

    // Pointers outside guest memory are refused, not followed.
    let pointers = probe(&server, "accel-probe", "bad_pointer").await;
    assert_eq!(pointers["ok"], true, "{pointers}");
    for code in pointers["codes"].as_array().expect("codes") {
        assert_eq!(
            code, -10,
            "an out-of-range pointer is `invalid`: {pointers}"
        );
    }

    // Two functions on one device: what one wrote, the other never sees (fresh buffers
    // are zeroed, and handles it was not given are refused).
    deploy_example(&server, "accel-probe", "accel=1").await;
    let wasm = wafer_tests::example("accel-probe").expect("built");
    let second = deploy(&server, "accel-probe-2", wasm.clone(), "accel=1").await;
    assert_eq!(second.status(), StatusCode::CREATED);
    for _ in 0..3 {
        let filled = probe(&server, "accel-probe", "fill").await;
        assert_eq!(filled["wrote"], true, "{filled}");
        let other = probe(&server, "accel-probe-2", "leak").await;
        assert_eq!(other["zeroed"], true, "{other}");
        assert_eq!(other["foreign_readable"], 0, "{other}");
    }

    // Without a grant: a clean error, and the node keeps serving.
    let plain = deploy(&server, "ungranted", wasm, "").await;
    assert_eq!(plain.status(), StatusCode::CREATED);
    let refused = probe(&server, "ungranted", "vecadd").await;
    expect_kind(&refused, "NotGranted");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("no accelerator granted")),
        "{refused}"
    );
    let again = probe(&server, "accel-probe", "vecadd&n=64").await;
    assert_eq!(again["matches"], true, "{again}");
}

#[tokio::test]
async fn mandelbrot_renders_a_png_and_matmul_matches_the_cpu() {
    let (_dir, server) = start(&[]);
    deploy_example(&server, "mandelbrot", "accel=1&timeout_ms=60000").await;
    let response = http()
        .get(server.url("/fn/mandelbrot?width=300&height=200&iterations=200&zoom=1.5"))
        .send()
        .await
        .expect("render");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"image/png"[..])
    );
    let bytes = response.bytes().await.expect("png");
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).expect("a frame");
    assert_eq!((frame.width, frame.height), (300, 200));
    let first = &pixels[..4];
    let colours = pixels[..frame.buffer_size()]
        .chunks(4)
        .filter(|p| *p != first)
        .count();
    assert!(
        colours > 1000,
        "the image is not one colour ({colours} pixels differ)"
    );

    // C guests call the same imports (functions/include/wafer_accel.h).
    deploy_example(&server, "saxpy-c", "accel=1").await;
    let saxpy = http()
        .get(server.url("/fn/saxpy-c?n=100000&a=3"))
        .send()
        .await
        .expect("saxpy");
    assert_eq!(saxpy.status(), StatusCode::OK);
    let text = saxpy.text().await.expect("text");
    assert!(
        text.contains("n=100000") && text.contains(" match "),
        "{text}"
    );
    let wasm = wafer_tests::example("saxpy-c").expect("built");
    let plain = deploy(&server, "saxpy-c-ungranted", wasm, "").await;
    assert_eq!(plain.status(), StatusCode::CREATED);
    let refused = http()
        .get(server.url("/fn/saxpy-c-ungranted"))
        .send()
        .await
        .expect("saxpy");
    assert_eq!(refused.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let text = refused.text().await.expect("text");
    assert!(text.contains("no accelerator granted"), "{text}");

    // The serverless framework leased the device for these invocations, so no job is
    // placed on it meanwhile; it gives the device back once they stop. This node has
    // one device: the job below runs only after that.
    let leases_url = server.url("/v1/leases");
    wait_leases(&leases_url, "hold the device", |l| leased_devices(l) == 1)
        .await
        .expect("the device leased for invocations");

    deploy_example(&server, "matmul", "accel=1&memory_mb=256&timeout_ms=120000").await;
    let job = submit_job(
        &server,
        serde_json::json!({"function": "matmul", "input": "{\"n\": 96, \"seed\": 7}"}),
    )
    .await;
    let id = job["id"].as_u64().expect("job id");
    let ended: Value = http()
        .get(server.url(&format!("/v1/jobs/{id}?wait=120")))
        .send()
        .await
        .expect("wait")
        .json()
        .await
        .expect("job");
    assert_eq!(ended["state"], "FINISHED", "{ended}");
    let leases: Value = http()
        .get(&leases_url)
        .send()
        .await
        .expect("leases")
        .json()
        .await
        .expect("leases JSON");
    assert_eq!(leased_devices(&leases), 0, "{leases}");
    let output: Value = http()
        .get(server.url(&format!("/v1/jobs/{id}/output")))
        .send()
        .await
        .expect("output")
        .json()
        .await
        .expect("output JSON");
    assert_eq!(output["n"], 96, "{output}");
    assert_eq!(output["matches"], true, "{output}");
    let (device, cpu) = (
        output["checksum"].as_f64().expect("checksum"),
        output["cpu_checksum"].as_f64().expect("cpu checksum"),
    );
    assert!((device - cpu).abs() < 1e-2, "{output}");

    // A job may ask for the device itself, for a function deployed without one.
    let wasm = wafer_tests::example("matmul").expect("built");
    let plain = deploy(
        &server,
        "matmul-plain",
        wasm,
        "memory_mb=256&timeout_ms=120000",
    )
    .await;
    assert_eq!(plain.status(), StatusCode::CREATED);
    let wait = |id: u64| {
        let url = server.url(&format!("/v1/jobs/{id}?wait=120"));
        async move {
            http()
                .get(url)
                .send()
                .await
                .expect("wait")
                .json::<Value>()
                .await
                .expect("job")
        }
    };
    let asked = submit_job(
        &server,
        serde_json::json!({"function": "matmul-plain", "input": "{\"n\": 32}", "accel": 1, "accel_type": "cpu"}),
    )
    .await;
    let asked = wait(asked["id"].as_u64().expect("id")).await;
    assert_eq!(asked["state"], "FINISHED", "{asked}");
    assert_eq!(asked["resources"]["accelerators"], 1, "{asked}");
    assert_eq!(asked["attempts"][0]["limits"]["accel"], 1, "{asked}");
    let unasked = submit_job(
        &server,
        serde_json::json!({"function": "matmul-plain", "input": "{\"n\": 32}", "max_attempts": 1}),
    )
    .await;
    let unasked = wait(unasked["id"].as_u64().expect("id")).await;
    assert_eq!(unasked["state"], "FAILED", "{unasked}");
    assert!(
        unasked["attempts"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no accelerator granted")),
        "{unasked}"
    );
    let refused = http()
        .post(server.url("/v1/jobs"))
        .json(&serde_json::json!({"function": "matmul-plain", "accel": 2}))
        .send()
        .await
        .expect("submit");
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
}

/// `PUT /v1/functions/{name}?{query}` on a cluster server.
async fn deploy_on(server: &Server, name: &str, query: &str) -> anyhow::Result<()> {
    let wasm = wafer_tests::example(name)?;
    let response = http()
        .put(server.url(&format!("/v1/functions/{name}?{query}")))
        .body(wasm)
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "deploy {name}: {}",
        response.text().await?
    );
    Ok(())
}

async fn submit_on(server: &Server, body: Value) -> anyhow::Result<u64> {
    let response = http()
        .post(server.url("/v1/jobs"))
        .json(&body)
        .send()
        .await?;
    let job: Value = response.json().await?;
    job["id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no job id in {job}"))
}

/// Waits until agent `agent` is registered with `count` accelerators on node 1.
async fn wait_accelerators(cluster: &Cluster, agent: &str, count: u64) -> anyhow::Result<Value> {
    let answers = cluster
        .wait_until_at(
            &[1],
            "/v1/nodes",
            &format!("agent {agent} offers {count} accelerators"),
            |all| {
                all[0]["agents"].as_array().is_some_and(|agents| {
                    agents.iter().any(|a| {
                        a["id"] == agent && a["resources"]["accelerators"].as_u64() == Some(count)
                    })
                })
            },
        )
        .await?;
    Ok(answers[0].clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn accelerator_jobs_land_on_the_node_with_a_device_and_survive_a_backend_restart(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), 3, &["--lease-slots", "0"]).await?;
    let slots = ["--slots", "2"];
    let a = cluster.start_agent("a", &slots)?;
    let b = cluster.start_agent("b", &slots)?;
    let c = cluster.start_agent("c", &slots)?;
    cluster
        .wait_agents(&[1, 2, 3], &[&a.id, &b.id, &c.id], "active")
        .await?;

    // A backend attaches to agent b, which then offers its device.
    let backend = Backend::start(&["--agent", &b.rpc]);
    let nodes = wait_accelerators(&cluster, &b.id, 1).await?;
    for agent in nodes["agents"].as_array().into_iter().flatten() {
        if agent["id"] == b.id.as_str() {
            assert_eq!(agent["attributes"]["accel.type"], "cpu", "{agent}");
            assert_eq!(agent["attributes"]["accel.cpu"], "1", "{agent}");
        } else {
            assert_eq!(agent["resources"]["accelerators"], 0, "{agent}");
        }
    }

    // Jobs of a function that asks for a device run only on b.
    deploy_on(
        cluster.server(2),
        "matmul",
        "accel=1&memory_mb=256&timeout_ms=120000",
    )
    .await?;
    let mut ids = Vec::new();
    for seed in 0..4u64 {
        let input = json!({ "n": 48, "seed": seed }).to_string();
        ids.push(
            submit_on(
                cluster.server(1 + seed % 3),
                json!({ "function": "matmul", "input": input }),
            )
            .await?,
        );
    }
    for id in ids {
        let job = wait_job(&cluster, id, "finishes", |j| j["state"] == "FINISHED").await?;
        for attempt in job["attempts"].as_array().into_iter().flatten() {
            assert_eq!(attempt["agent"], b.id.as_str(), "{job:#}");
        }
        let output: Value = http()
            .get(cluster.server(1).url(&format!("/v1/jobs/{id}/output")))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(output["matches"], true, "{output}");
    }

    // The backend dies mid-job: that attempt fails with a clear error, the agent
    // withdraws the device once the attachment lapses (nothing offers one meanwhile,
    // so the job waits), the job is retried under its policy, and the backend that
    // comes back registers again.
    let input = json!({ "n": 384, "seed": 9, "verify": false, "repeat": 60 }).to_string();
    let id = submit_on(
        cluster.server(1),
        json!({ "function": "matmul", "input": input, "max_attempts": 5 }),
    )
    .await?;
    // Killed once the guest holds a session on the device (it is running kernels).
    wait_session(&backend.addr).await?;
    drop(backend);
    wait_accelerators(&cluster, &b.id, 0).await?;
    let waiting = wait_job(&cluster, id, "is waiting for a device", |j| {
        j["state"] != "RUNNING"
    })
    .await?;
    assert_ne!(waiting["state"], "FINISHED", "{waiting:#}");
    let _backend = Backend::start(&["--agent", &b.rpc]);
    let job = wait_job(&cluster, id, "finishes", |j| j["state"] == "FINISHED").await?;
    let attempts = job["attempts"].as_array().cloned().unwrap_or_default();
    assert!(
        attempts.len() >= 2,
        "the attempt that lost its backend was retried: {job:#}"
    );
    let first = &attempts[0];
    assert_eq!(first["state"], "FAILED", "{job:#}");
    assert!(
        first["reason"]
            .as_str()
            .is_some_and(|r| r.contains("accelerator backend is unreachable")),
        "the failure says what happened: {job:#}"
    );
    let output: Value = http()
        .get(cluster.server(1).url(&format!("/v1/jobs/{id}/output")))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(output["n"], 384, "{output}");
    wait_accelerators(&cluster, &b.id, 1).await?;
    Ok(())
}

/// Invocations granted a device make the serverless framework lease one where they
/// run (and only there), and it gives the device back once they stop.
#[tokio::test(flavor = "multi_thread")]
async fn the_serverless_lease_takes_a_device_while_invocations_use_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), 1, &[]).await?;
    let slots = ["--slots", "4"];
    let a = cluster.start_agent("a", &slots)?;
    let mut b = cluster.start_agent("b", &slots)?;
    cluster.wait_agents(&[1], &[&a.id, &b.id], "active").await?;
    deploy_on(cluster.server(1), "accel-probe", "accel=1").await?;
    // No agent has a device yet: a clear 503, not a guest failing on the server.
    let response = http()
        .get(cluster.server(1).url("/fn/accel-probe?case=vecadd&n=64"))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let answer: Value = response.json().await?;
    assert_eq!(answer["error"], "no_device", "{answer}");
    let _backend = Backend::start(&["--agent", &b.rpc]);
    wait_accelerators(&cluster, &b.id, 1).await?;
    let leases_url = cluster.server(1).url("/v1/leases");
    let on_b = |l: &Value| {
        l["leases"]
            .as_array()
            .is_some_and(|all| all.iter().any(|l| l["agent"] == b.id.as_str()))
    };
    let leases = wait_leases(&leases_url, "include one on b", on_b).await?;
    assert_eq!(leased_devices(&leases), 0, "no device before use: {leases}");

    let invoke = || async {
        let response = http()
            .get(cluster.server(1).url("/fn/accel-probe?case=vecadd&n=64"))
            .send()
            .await?;
        let ran_on = response.headers().get("x-wafer-agent").cloned();
        let answer: Value = response.json().await?;
        anyhow::Ok((ran_on, answer))
    };
    // The gateway routes by the leases it read at its last scheduling tick.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while invoke().await?.0.is_none() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the gateway never routed to b's lease"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for i in 0..30 {
        let (ran_on, answer) = invoke().await?;
        assert_eq!(answer["matches"], true, "invocation {i}: {answer}");
        assert_eq!(
            ran_on.as_ref().map(|v| v.as_bytes()),
            Some(b.id.as_bytes()),
            "invocation {i} ran where the device is"
        );
        if i == 0 {
            let leases =
                wait_leases(&leases_url, "hold a device", |l| leased_devices(l) == 1).await?;
            let with_device: Vec<&Value> = leases["leases"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|l| l["resources"]["accelerators"] == 1)
                .collect();
            assert_eq!(with_device.len(), 1, "{leases}");
            assert_eq!(with_device[0]["agent"], b.id.as_str(), "{leases}");
            assert_eq!(
                with_device[0]["resources"]["slots"], 0,
                "a device lease of its own: {leases}"
            );
        }
    }
    // The device goes back once the invocations stop; the slot leases stay.
    let leases = wait_leases(&leases_url, "give the device back", |l| {
        leased_devices(l) == 0
    })
    .await?;
    assert!(on_b(&leases), "{leases}");
    // b dies: until the leader notices, its lease still routes there, and fails. The
    // server (no device of its own) answers 503 too, instead of running the guest.
    b.kill()?;
    let (ran_on, answer) = invoke().await?;
    assert_eq!(answer["error"], "no_device", "{answer}");
    assert!(ran_on.is_none(), "{answer}");
    Ok(())
}

/// Devices that the serverless framework's leases in a `GET /v1/leases` answer hold.
fn leased_devices(leases: &Value) -> u64 {
    leases["leases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["resources"]["accelerators"].as_u64())
        .sum()
}

/// Polls `GET url` (a `/v1/leases`) until `check` holds for its answer.
async fn wait_leases(
    url: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let leases: Value = http().get(url).send().await?.json().await?;
        if check(&leases) {
            return Ok(leases);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the leases did not {what}: {leases}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits until the backend at `addr` has a session open.
async fn wait_session(addr: &str) -> anyhow::Result<()> {
    let secret = wafer::rpc::ClusterSecret::new(wafer_tests::CLUSTER_SECRET)?;
    tokio::task::LocalSet::new()
        .run_until(async {
            let accel = wafer::accel::client::connect(addr, &secret).await?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let reply = accel.devices_request().send().promise.await?;
                let devices = reply.get()?.get_devices()?;
                let (_, usage) = wafer::accel::backend::read_device(devices.get(0))?;
                if usage.sessions > 0 {
                    return Ok(());
                }
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "no guest opened a session on the backend"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
}

async fn wait_job(
    cluster: &Cluster,
    id: u64,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let answers = cluster
        .wait_until_at(
            &[1],
            &format!("/v1/jobs/{id}?consistent=true"),
            &format!("job {id} {what}"),
            |all| check(&all[0]),
        )
        .await?;
    Ok(answers[0].clone())
}

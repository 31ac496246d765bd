//! Invocations under serverless leases (fast path) on a cluster of real processes:
//! servers without agents of their own route invocations to agents holding leases, and
//! invocations keep succeeding when an agent is killed while the leases move.

use std::collections::BTreeSet;

use serde_json::Value;
use wafer_tests::cluster::Cluster;
use wafer_tests::example;

/// Invokes `hello` `n` times through every server in turn; returns the agents that ran
/// them (every invocation must succeed).
async fn invoke_all(cluster: &Cluster, n: usize) -> anyhow::Result<BTreeSet<String>> {
    let http = wafer_tests::http();
    let servers = cluster.up();
    let mut ran_on = BTreeSet::new();
    for i in 0..n {
        let server = cluster.server(servers[i % servers.len()]);
        let response = http
            .get(server.url(&format!("/fn/hello?name=n{i}")))
            .send()
            .await?;
        let status = response.status();
        let agent = response
            .headers()
            .get("x-wafer-agent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response.text().await?;
        anyhow::ensure!(status.is_success(), "invocation {i}: {status} {body}");
        anyhow::ensure!(
            body.contains(&format!("Hello, n{i}!")),
            "invocation {i}: {body}"
        );
        ran_on.insert(agent.unwrap_or_else(|| "a server".into()));
    }
    Ok(ran_on)
}

fn leased_agents(answer: &Value) -> BTreeSet<String> {
    answer["leases"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|l| l["agent"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn invocations_run_under_leases_and_survive_an_agent_loss() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(
        dir.path(),
        3,
        &["--agent-timeout-ms", "1000", "--lease-slots", "2"],
    )
    .await?;
    let mut a = cluster.start_agent("a", &["--slots", "4"])?;
    let b = cluster.start_agent("b", &["--slots", "4"])?;
    let both: BTreeSet<String> = [a.id.clone(), b.id.clone()].into();
    cluster
        .wait_until_at(
            &[1, 2, 3],
            "/v1/leases?consistent=true",
            "both agents hold leases",
            |all| all.iter().all(|answer| leased_agents(answer) == both),
        )
        .await?;
    cluster.deploy(1, "hello", example("hello")?).await?;
    // Every server serves it (a linearizable read waits until each has applied it).
    for id in [1, 2, 3] {
        cluster
            .get_json(id, "/v1/functions/hello?consistent=true")
            .await?;
    }

    // Every server sends invocations to the leased agents, in turn.
    let ran_on = invoke_all(&cluster, 24).await?;
    assert_eq!(ran_on, both, "invocations ran on the leased agents");

    // A function with a fuel limit runs on an agent too (these servers run none), and
    // running out of fuel there comes back as such, not as a trap or a timeout.
    cluster
        .deploy(1, "spin?fuel=3000000&timeout_ms=60000", example("spin")?)
        .await?;
    cluster
        .get_json(2, "/v1/functions/spin?consistent=true")
        .await?;
    let response = wafer_tests::http()
        .get(cluster.server(2).url("/fn/spin"))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"], "fuel_exhausted", "{body}");
    // One with enough fuel answers, with what it used.
    cluster
        .deploy(1, "metered?fuel=100000000", example("hello")?)
        .await?;
    cluster
        .get_json(3, "/v1/functions/metered?consistent=true")
        .await?;
    let response = wafer_tests::http()
        .get(cluster.server(3).url("/fn/metered"))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-wafer-agent"));
    let used = response
        .headers()
        .get("x-wafer-fuel-used")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    assert!(used.is_some_and(|u| u > 0 && u < 100_000_000), "{used:?}");

    // Agent a dies: every invocation still succeeds (the gateways skip it), and once
    // its lease is gone they all run on b.
    a.kill()?;
    invoke_all(&cluster, 24).await?;
    let only_b: BTreeSet<String> = [b.id.clone()].into();
    cluster
        .wait_until_at(
            &[1, 2, 3],
            "/v1/leases?consistent=true",
            "only b holds a lease",
            |all| all.iter().all(|answer| leased_agents(answer) == only_b),
        )
        .await?;
    assert_eq!(invoke_all(&cluster, 24).await?, only_b);

    // a comes back and gets a lease again.
    a.restart()?;
    cluster
        .wait_until_at(
            &[1],
            "/v1/leases?consistent=true",
            "a holds a lease again",
            |all| leased_agents(&all[0]) == both,
        )
        .await?;
    Ok(())
}

fn leased_slots(answer: &Value) -> u64 {
    answer["leases"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|l| l["resources"]["slots"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_grow_with_load_and_shrink_when_it_goes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(dir.path(), 1, &["--lease-slots", "2"]).await?;
    let agent = cluster.start_agent("a", &["--slots", "16"])?;
    cluster
        .wait_until_at(
            &[1],
            "/v1/leases",
            "the agent holds its first lease",
            |all| leased_slots(&all[0]) == 2,
        )
        .await?;
    let http = wafer_tests::http();
    cluster.deploy(1, "slow", crate::sleepy_echo(300)).await?;

    // Twelve clients keep it busy: the lease grows past its start.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = cluster.server(1).url("/fn/slow");
    let mut clients = Vec::new();
    for _ in 0..12 {
        let (http, url, stop) = (http.clone(), url.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut ran_on = BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let response = http.get(&url).send().await?;
                anyhow::ensure!(response.status().is_success(), "{}", response.status());
                if let Some(agent) = response.headers().get("x-wafer-agent") {
                    ran_on.insert(agent.to_str()?.to_string());
                }
            }
            anyhow::Ok(ran_on)
        }));
    }
    let grown = cluster
        .wait_until_at(&[1], "/v1/leases", "the lease grows with the load", |all| {
            leased_slots(&all[0]) >= 8
        })
        .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut ran_on = BTreeSet::new();
    for client in clients {
        ran_on.extend(client.await??);
    }
    grown?;
    assert_eq!(ran_on, BTreeSet::from([agent.id.clone()]));

    // Idle: it shrinks back to where it started.
    cluster
        .wait_until_at(&[1], "/v1/leases", "the lease shrinks when idle", |all| {
            leased_slots(&all[0]) == 2
        })
        .await?;
    Ok(())
}

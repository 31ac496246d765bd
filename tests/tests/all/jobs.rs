//! Durable jobs on a cluster of real processes (3 servers, 3 agents): jobs finish
//! across the loss of an agent (its attempts go UNREACHABLE and are placed again; each
//! job's output is the first and only result), constraints place only on matching
//! agents or leave the job STAGING with a reason, the agent that comes back reports its
//! attempts GONE, and a batch survives the loss of the leader with no agent ever
//! allocated beyond its capacity on any replica.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use wafer_tests::cluster::{Cluster, Server};

use crate::sleepy_echo;

async fn deploy(server: &Server, name: &str, wasm: Vec<u8>) -> anyhow::Result<()> {
    let response = wafer_tests::http()
        .put(server.url(&format!("/v1/functions/{name}")))
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

/// Submits a job through `server`; returns its id.
async fn submit(server: &Server, body: Value) -> anyhow::Result<u64> {
    let response = wafer_tests::http()
        .post(server.url("/v1/jobs"))
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    let job: Value = response.json().await?;
    anyhow::ensure!(status.as_u16() == 201, "submit: {status} {job}");
    job["id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no id in {job}"))
}

/// Polls `GET /v1/jobs/{id}` on `node` until `check` holds.
async fn wait_job(
    cluster: &Cluster,
    node: u64,
    id: u64,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let answers = cluster
        .wait_until_at(
            &[node],
            &format!("/v1/jobs/{id}?consistent=true"),
            &format!("job {id} {what}"),
            |all| check(&all[0]),
        )
        .await?;
    Ok(answers[0].clone())
}

/// Checks that every job finished once with its input as output (one FINISHED
/// attempt, the output's attempt); returns the jobs.
async fn check_finished_once(
    cluster: &Cluster,
    node: u64,
    jobs: &[(u64, String)],
) -> anyhow::Result<Vec<Value>> {
    let mut records = Vec::new();
    for (id, input) in jobs {
        let job = wait_job(cluster, node, *id, "finishes", |j| j["state"] == "FINISHED").await?;
        let finished: Vec<&Value> = job["attempts"]
            .as_array()
            .map(|a| a.iter().filter(|a| a["state"] == "FINISHED").collect())
            .unwrap_or_default();
        assert_eq!(finished.len(), 1, "one finished attempt: {job:#}");
        assert_eq!(job["output"]["attempt"], finished[0]["number"], "{job:#}");
        let output = wafer_tests::get(cluster.server(node).url(&format!("/v1/jobs/{id}/output")))
            .await?
            .text()
            .await?;
        assert_eq!(&output, input, "job {id}'s output");
        records.push(job);
    }
    Ok(records)
}

/// Per agent, allocated <= capacity and free = capacity - allocated, on `nodes`.
async fn check_invariant(cluster: &Cluster, nodes: &[u64]) -> anyhow::Result<()> {
    for &node in nodes {
        let answer = cluster.get_json(node, "/v1/nodes?consistent=true").await?;
        for agent in answer["agents"].as_array().into_iter().flatten() {
            for kind in ["slots", "memory_mb", "accelerators"] {
                let cap = agent["resources"][kind].as_u64().unwrap_or(0);
                let used = agent["allocated"][kind].as_u64().unwrap_or(u64::MAX);
                assert!(used <= cap, "node {node}: agent over capacity: {agent:#}");
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_survive_agent_and_leader_loss_and_honour_constraints() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(
        dir.path(),
        3,
        &["--agent-timeout-ms", "1000", "--lease-slots", "0"],
    )
    .await?;
    let slots = ["--slots", "2"];
    let a = cluster.start_agent("a", &[&slots[..], &["--attribute", "zone=a"]].concat())?;
    let mut b = cluster.start_agent("b", &[&slots[..], &["--attribute", "zone=b"]].concat())?;
    let c = cluster.start_agent("c", &[&slots[..], &["--attribute", "zone=b"]].concat())?;
    cluster
        .wait_agents(&[1, 2, 3], &[&a.id, &b.id, &c.id], "active")
        .await?;
    deploy(cluster.server(2), "sleepy", sleepy_echo(1500)).await?;

    // Twelve jobs on six slots, through different servers.
    let mut jobs = Vec::new();
    for i in 0..12u64 {
        let input = format!("job input {i}");
        let via = cluster.server(1 + i % 3);
        let id = submit(via, json!({ "function": "sleepy", "input": input })).await?;
        jobs.push((id, input));
    }
    // Kill agent b (SIGKILL) while it runs one of them.
    let b_id = b.id.clone();
    cluster
        .wait_until_at(
            &[1],
            "/v1/tasks?consistent=true",
            "a task runs on b",
            |all| {
                all[0]["tasks"].as_array().is_some_and(|tasks| {
                    tasks
                        .iter()
                        .any(|t| t["agent"] == b_id.as_str() && t["state"] == "RUNNING")
                })
            },
        )
        .await?;
    b.kill()?;
    cluster
        .wait_agents(&[1, 2, 3], &[&b.id], "unreachable")
        .await?;

    // Every job finishes once, with its own output; those that ran on b went
    // UNREACHABLE there and finished elsewhere.
    let records = check_finished_once(&cluster, 3, &jobs).await?;
    let mut moved = 0;
    for job in &records {
        let attempts = job["attempts"].as_array().cloned().unwrap_or_default();
        for attempt in &attempts {
            if attempt["agent"] == b.id.as_str() && attempt["state"] != "FINISHED" {
                assert_eq!(attempt["state"], "UNREACHABLE", "{job:#}");
                moved += 1;
            }
        }
    }
    assert!(moved >= 1, "a job was moved off the lost agent");
    check_invariant(&cluster, &[1, 2, 3]).await?;

    // Constraints: zone=b runs only on c now (b is down); zone=z cannot be placed.
    let on_b = submit(
        cluster.server(1),
        json!({ "function": "sleepy", "input": "zoned", "constraints": ["zone=b"] }),
    )
    .await?;
    let nowhere = submit(
        cluster.server(1),
        json!({ "function": "sleepy", "input": "x", "constraints": ["zone=z"] }),
    )
    .await?;
    let zoned = check_finished_once(&cluster, 2, &[(on_b, "zoned".to_string())]).await?;
    assert_eq!(
        zoned[0]["attempts"][0]["agent"],
        c.id.as_str(),
        "{:#}",
        zoned[0]
    );
    let staged = wait_job(&cluster, 2, nowhere, "says why it waits", |j| {
        j["state"] == "STAGING" && j["reason"].as_str().is_some_and(|r| r.contains("zone=z"))
    })
    .await?;
    assert!(staged["attempts"].as_array().is_some_and(|a| a.is_empty()));
    let killed: Value = wafer_tests::http()
        .post(cluster.server(3).url(&format!("/v1/jobs/{nowhere}/kill")))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(killed["state"], "KILLED", "{killed:#}");

    // b comes back without its attempts: they are GONE now (known not to run).
    b.restart()?;
    cluster.wait_agents(&[1, 2, 3], &[&b.id], "active").await?;
    for job in &records {
        let id = job["id"].as_u64().unwrap_or_default();
        let now = cluster
            .get_json(1, &format!("/v1/jobs/{id}?consistent=true"))
            .await?;
        for attempt in now["attempts"].as_array().into_iter().flatten() {
            if attempt["agent"] == b.id.as_str() && attempt["state"] != "FINISHED" {
                assert_eq!(attempt["state"], "GONE", "{now:#}");
            }
        }
        assert_eq!(now["state"], "FINISHED");
    }

    // A batch, and the leader dies while it runs.
    deploy(cluster.server(1), "quick", sleepy_echo(300)).await?;
    let mut batch = Vec::new();
    for i in 0..20u64 {
        let input = format!("batch {i}");
        let id = submit(
            cluster.server(1 + i % 3),
            json!({ "function": "quick", "input": input }),
        )
        .await?;
        batch.push((id, input));
    }
    let leader = cluster.wait_leader(&[1, 2, 3]).await?;
    cluster.kill(leader)?;
    let rest = cluster.up();
    cluster.wait_leader(&rest).await?;
    for &node in &rest {
        check_finished_once(&cluster, node, &batch).await?;
    }
    check_invariant(&cluster, &rest).await?;
    let ids: BTreeSet<u64> = batch.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), batch.len(), "every submission got its own job");
    Ok(())
}

/// Jobs wait for commits, not for the scheduler's tick: with a tick of an hour, the
/// leader still places each wave of jobs as soon as the previous one ends (it runs a
/// round early when a job arrives or ends), so a batch three times the agent's slots
/// finishes.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_are_placed_when_they_arrive_and_when_slots_free_up() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(
        dir.path(),
        1,
        &["--scheduler-tick-ms", "3600000", "--lease-slots", "0"],
    )
    .await?;
    let agent = cluster.start_agent("a", &["--slots", "2"])?;
    cluster.wait_agents(&[1], &[&agent.id], "active").await?;
    deploy(cluster.server(1), "echo", sleepy_echo(0)).await?;
    let mut jobs = Vec::new();
    for i in 0..6u64 {
        let input = format!("wave job {i}");
        let id = submit(
            cluster.server(1),
            json!({ "function": "echo", "input": input }),
        )
        .await?;
        jobs.push((id, input));
    }
    check_finished_once(&cluster, 1, &jobs).await?;
    check_invariant(&cluster, &[1]).await?;
    Ok(())
}

//! Agents (`wafer agent`) with a cluster of real `wafer server` processes: registration
//! through any server, heartbeats that follow the leader across a leader change, an
//! agent killed with SIGKILL marked unreachable, the same agent back with its id after a
//! restart, and a registration the cluster refuses.

use std::process::Command;

use serde_json::Value;
use wafer_tests::cluster::Cluster;
use wafer_tests::{metric, wafer_bin};

fn agent<'a>(nodes: &'a Value, id: &str) -> &'a Value {
    nodes["agents"]
        .as_array()
        .and_then(|agents| agents.iter().find(|a| a["id"] == id))
        .unwrap_or_else(|| panic!("agent {id} is listed: {nodes:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_register_follow_the_leader_and_go_unreachable() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(
        dir.path(),
        3,
        &["--agent-timeout-ms", "1000", "--lease-slots", "0"],
    )
    .await?;
    let a = cluster.start_agent("a", &["--slots", "4", "--attribute", "zone=a"])?;
    let mut b = cluster.start_agent(
        "b",
        &[
            "--slots",
            "8",
            "--agent-memory",
            "2048",
            "--attribute",
            "zone=b",
            "--attribute",
            "arch=x86_64",
        ],
    )?;
    cluster
        .wait_agents(&[1, 2, 3], &[&a.id, &b.id], "active")
        .await?;

    // Every server lists the same capacity and attributes.
    let nodes = cluster.get_json(3, "/v1/nodes?consistent=true").await?;
    let listed = agent(&nodes, &b.id);
    assert_eq!(listed["resources"]["slots"], 8, "{listed:#}");
    assert_eq!(listed["resources"]["memory_mb"], 2048, "{listed:#}");
    assert_eq!(listed["free"]["slots"], 8, "{listed:#}");
    assert_eq!(listed["attributes"]["zone"], "b", "{listed:#}");
    assert_eq!(listed["attributes"]["arch"], "x86_64", "{listed:#}");
    assert_eq!(listed["rpc"], b.rpc.as_str(), "{listed:#}");
    assert_eq!(agent(&nodes, &a.id)["attributes"]["zone"], "a");

    // `wafer nodes` shows them.
    let output = Command::new(wafer_bin()?)
        .env("WAFER_TOKEN", wafer_tests::ADMIN_TOKEN)
        .args(["--server", &cluster.server(2).base(), "nodes"])
        .output()?;
    assert!(output.status.success(), "{output:?}");
    let table = String::from_utf8(output.stdout)?;
    for id in [&a.id, &b.id] {
        let row = table
            .lines()
            .find(|l| l.contains(id.as_str()))
            .unwrap_or_else(|| panic!("{id} in:\n{table}"));
        assert!(row.contains("active"), "{row}");
    }
    assert!(table.contains("zone=b"), "{table}");

    // The leader dies; the agents follow the new leader, which then notices b's death.
    let leader = cluster.wait_leader(&[1, 2, 3]).await?;
    cluster.kill(leader)?;
    let rest: Vec<u64> = cluster.up();
    let new_leader = cluster.wait_leader(&rest).await?;
    b.kill()?;
    cluster.wait_agents(&rest, &[&b.id], "unreachable").await?;

    // a heartbeats to the new leader (its count grows while a is the only live agent),
    // so a is still active.
    let heartbeats = || async {
        let text = wafer_tests::get(cluster.server(new_leader).url("/metrics"))
            .await?
            .text()
            .await?;
        anyhow::Ok(metric(&text, "wafer_agent_heartbeats_total").unwrap_or(0.0))
    };
    let before = heartbeats().await?;
    let until = std::time::Instant::now() + wafer_tests::cluster::SETTLE_DEADLINE;
    while heartbeats().await? < before + 3.0 {
        assert!(
            std::time::Instant::now() < until,
            "the new leader takes no heartbeats; agent a's log:\n{}",
            a.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let nodes = cluster
        .get_json(new_leader, "/v1/nodes?consistent=true")
        .await?;
    assert_eq!(agent(&nodes, &a.id)["state"], "active", "{nodes:#}");
    let lost = agent(&nodes, &b.id);
    assert_eq!(lost["state"], "unreachable", "{lost:#}");
    assert!(lost["changed_at_ms"].as_u64() >= lost["registered_at_ms"].as_u64());

    // b comes back from its data folder: the same id, active again.
    let old_id = b.id.clone();
    b.restart()?;
    assert_eq!(b.id, old_id);
    cluster.wait_agents(&rest, &[&b.id], "active").await?;

    // The cluster refuses an agent with an invalid attribute: it says why and exits.
    let output = Command::new(wafer_bin()?)
        .env("WAFER_CLUSTER_SECRET", wafer_tests::CLUSTER_SECRET)
        .args([
            "agent",
            "--servers",
            &cluster.server(new_leader).rpc,
            "--listen",
            "127.0.0.1:0",
            "--attribute",
            "Bad Key=x",
            "--data",
        ])
        .arg(dir.path().join("bad"))
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refused") && stderr.contains("Bad Key"),
        "{stderr}"
    );

    // An agent with another cluster's secret is refused, says so and exits; the
    // server logs the refusal.
    let output = Command::new(wafer_bin()?)
        .env("WAFER_CLUSTER_SECRET", "the-secret-of-another-cluster")
        .args([
            "agent",
            "--servers",
            &cluster.server(new_leader).rpc,
            "--listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(dir.path().join("stranger"))
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("wrong cluster secret"), "{stderr}");
    assert!(
        cluster
            .server(new_leader)
            .log()
            .contains("refused a peer: wrong cluster secret"),
        "the server logs the refusal"
    );
    // A secret too short is refused at start.
    let output = Command::new(wafer_bin()?)
        .env("WAFER_CLUSTER_SECRET", "short")
        .args(["agent", "--servers", "127.0.0.1:1", "--data"])
        .arg(dir.path().join("short"))
        .output()?;
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("at least 16 characters"),
        "{output:?}"
    );
    Ok(())
}

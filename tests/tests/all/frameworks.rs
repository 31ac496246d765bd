//! External frameworks over Cap'n Proto (`wafer::scheduler::driver`) on a cluster of
//! real processes: two greedy frameworks in roles of weights 1:2 on a saturated
//! cluster converge to dominant shares of about 1:2, and an example framework runs a
//! batch of 1,000 tiny tasks to completion, told of each by task updates.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wafer::scheduler::driver::{Driver, FrameworkEvent};
use wafer_tests::cluster::{Cluster, SETTLE_DEADLINE};

/// A framework that takes every offer it gets for as many 1-slot tasks of `function`
/// as fit, until `limit` tasks were placed (None: forever). Tasks an accept did not
/// place (its offer was rescinded, say) are placed again from later offers. Returns the
/// driver and a task that ends when `limit` tasks finished, with the finished task ids.
async fn greedy(
    servers: Vec<String>,
    id: &str,
    role: &str,
    function: &'static str,
    limit: Option<usize>,
) -> anyhow::Result<(Arc<Driver>, tokio::task::JoinHandle<HashSet<u64>>)> {
    let secret = wafer::rpc::ClusterSecret::new(wafer_tests::CLUSTER_SECRET)?;
    let (driver, mut events) = Driver::start(servers, secret, id, id, role)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let handle = {
        let driver = driver.clone();
        tokio::spawn(async move {
            // Tasks asked for in accepts, less those the accepts did not place.
            let placed = Arc::new(AtomicUsize::new(0));
            let mut finished = HashSet::new();
            while let Some(event) = events.recv().await {
                match event {
                    // Each offer is answered at once, concurrently (a slow answer
                    // would hold the offer's resources idle).
                    FrameworkEvent::Offers(offers) => {
                        for offer in offers {
                            let want = limit.map_or(usize::MAX, |l| {
                                l.saturating_sub(placed.load(Ordering::SeqCst))
                            });
                            let fit = (offer.resources.slots as usize)
                                .min((offer.resources.memory_mb / 128) as usize)
                                .min(want);
                            let driver = driver.clone();
                            if fit == 0 {
                                tokio::spawn(async move {
                                    let _ = driver.decline(offer.id, Duration::from_secs(5)).await;
                                });
                                continue;
                            }
                            placed.fetch_add(fit, Ordering::SeqCst);
                            let tasks = (0..fit)
                                .map(|i| (function.to_string(), format!("{i}").into_bytes()))
                                .collect();
                            let placed = placed.clone();
                            tokio::spawn(async move {
                                let got =
                                    driver.accept(offer.id, tasks).await.map_or(0, |j| j.len());
                                placed.fetch_sub(fit - got, Ordering::SeqCst);
                            });
                        }
                    }
                    FrameworkEvent::Status(status) if status.state == "FINISHED" => {
                        finished.insert(status.job);
                        if limit.is_some_and(|l| finished.len() >= l) {
                            return finished;
                        }
                    }
                    _ => {}
                }
            }
            finished
        })
    };
    Ok((driver, handle))
}

#[tokio::test(flavor = "multi_thread")]
async fn frameworks_share_by_weight_and_run_a_batch_of_1000_tasks() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(
        dir.path(),
        3,
        &["--agent-timeout-ms", "2000", "--lease-slots", "0"],
    )
    .await?;
    let mut agents = Vec::new();
    for name in ["a", "b", "c"] {
        agents.push(cluster.start_agent(name, &["--slots", "8"])?);
    }
    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    cluster.wait_agents(&[1, 2, 3], &ids, "active").await?;
    let http = wafer_tests::http();
    for (name, ms) in [("sleeper", 1000), ("tiny", 0)] {
        let response = http
            .put(cluster.server(1).url(&format!("/v1/functions/{name}")))
            .body(crate::sleepy_echo(ms))
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "deploy {name}");
    }
    for (role, weight) in [("light", 1.0), ("heavy", 2.0)] {
        let response = http
            .put(cluster.server(2).url(&format!("/v1/roles/{role}")))
            .json(&json!({ "weight": weight }))
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "role {role}");
    }

    // Two greedy frameworks, weights 1:2, on 24 slots.
    let servers = cluster.rpc_addrs();
    let (light, light_run) = greedy(servers.clone(), "light", "light", "sleeper", None).await?;
    let (heavy, heavy_run) = greedy(servers.clone(), "heavy", "heavy", "sleeper", None).await?;
    let leader = cluster.wait_leader(&[1, 2, 3]).await?;
    let shares = |body: &Value| -> (f64, f64) {
        let get = |id: &str| {
            body["frameworks"]
                .as_array()
                .and_then(|f| f.iter().find(|f| f["id"] == id))
                .and_then(|f| f["allocated_share"].as_f64())
                .unwrap_or(0.0)
        };
        (get("light"), get("heavy"))
    };
    // Both hold resources, then sample the shares for a while. Shares move only as
    // tasks end, so the first second (one sleeper's run) is left out of the mean.
    cluster
        .wait_until_at(
            &[leader],
            "/v1/frameworks",
            "both frameworks hold resources",
            |all| {
                let (l, h) = shares(&all[0]);
                l > 0.0 && h > 0.0 && l + h > 0.9
            },
        )
        .await?;
    let (mut sum_light, mut sum_heavy, mut samples) = (0.0, 0.0, 0);
    let mut trace = Vec::new();
    let from = Instant::now() + Duration::from_secs(1);
    let until = from + Duration::from_secs(10);
    while Instant::now() < until {
        let (l, h) = shares(&cluster.get_json(leader, "/v1/frameworks").await?);
        let sample = format!("{:.0}:{:.0}", l * 24.0, h * 24.0);
        if Instant::now() < from {
            trace.push(format!("({sample})"));
        } else {
            trace.push(sample);
            sum_light += l;
            sum_heavy += h;
            samples += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ratio = sum_heavy / sum_light.max(1e-9);
    eprintln!(
        "heavy/light dominant shares: {ratio:.2} over {samples} samples: {}",
        trace.join(" ")
    );
    assert!(
        (1.8..=2.2).contains(&ratio),
        "heavy/light dominant shares {ratio:.2} over {samples} samples (light {:.3}, heavy {:.3})",
        sum_light / samples as f64,
        sum_heavy / samples as f64
    );
    assert!(
        (sum_light + sum_heavy) / samples as f64 > 0.75,
        "the cluster stays saturated"
    );
    light
        .want_offers(false)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    heavy
        .want_offers(false)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    drop((light, heavy));
    light_run.abort();
    heavy_run.abort();

    // An example framework: a batch of 1,000 tiny tasks, each finished exactly once.
    let started = Instant::now();
    let (batch, run) = greedy(servers, "batch", "batch", "tiny", Some(1000)).await?;
    let finished = tokio::time::timeout(SETTLE_DEADLINE * 3, run).await??;
    assert_eq!(finished.len(), 1000);
    let jobs = cluster
        .get_json(3, "/v1/jobs?consistent=true&state=FINISHED&limit=5000")
        .await?;
    let batch_jobs: Vec<&Value> = jobs["jobs"]
        .as_array()
        .map(|j| j.iter().filter(|j| j["owner"] == "batch").collect())
        .unwrap_or_default();
    assert_eq!(batch_jobs.len(), 1000, "1,000 finished tasks of `batch`");
    for job in &batch_jobs {
        let id = job["id"].as_u64().unwrap_or_default();
        assert!(finished.contains(&id), "task {id} was reported finished");
        assert_eq!(job["attempts"].as_array().map(Vec::len), Some(1), "{job:#}");
    }
    eprintln!("1,000 tasks in {:?}", started.elapsed());
    drop(batch);
    Ok(())
}

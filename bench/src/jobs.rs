//! End-to-end durable jobs: a cluster of real processes (3 `wafer server`s, 2 `wafer
//! agent`s of 16 slots), a trivial function (echo stdin), N jobs submitted over HTTP by
//! C concurrent clients; measured from the first submit until every job is FINISHED.
//! The baseline, in the same run on the same cluster: the same function invoked through
//! a server's gateway by the same number of clients (no durability, no placement).

use std::time::{Duration, Instant};

use anyhow::Context;
use wafer_tests::cluster::Cluster;

/// Options of the jobs benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct JobsArgs {
    /// Jobs to run.
    #[arg(long, default_value_t = 2000)]
    pub jobs: usize,
    /// Concurrent submitting clients.
    #[arg(long = "job-clients", default_value_t = 32)]
    pub clients: usize,
}

fn echo() -> anyhow::Result<Vec<u8>> {
    Ok(wat::parse_str(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "_start")
            (i32.store (i32.const 0) (i32.const 1024))
            (i32.store (i32.const 4) (i32.const 4096))
            (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
            (i32.store (i32.const 16) (i32.const 1024))
            (i32.store (i32.const 20) (i32.load (i32.const 8)))
            (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))"#,
    )?)
}

/// Runs the benchmark and prints a Markdown table.
/// Jobs run one at a time for the latency line.
const LATENCY_JOBS: usize = 50;

pub fn run(args: &JobsArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let dir = tempfile::Builder::new().prefix("wafer-bench-jobs-").tempdir()?;
        let cluster = Cluster::start(dir.path(), 3, &[]).await?;
        let a = cluster.start_agent("a", &["--slots", "16"])?;
        let b = cluster.start_agent("b", &["--slots", "16"])?;
        cluster
            .wait_agents(&[1, 2, 3], &[&a.id, &b.id], "active")
            .await?;
        let http = wafer_tests::http();
        let response = http
            .put(cluster.server(1).url("/v1/functions/echo"))
            .body(echo()?)
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "deploying echo");
        let bases: Vec<String> = (1..=3).map(|i| cluster.server(i).base()).collect();

        // Warm-up: one job (compiles the module on an agent).
        let first = submit(&http, &bases[0], 0).await?;
        wait_finished(&http, &bases[0], first).await?;

        // Latency: one job at a time, submit -> FINISHED (seen through a long poll).
        let mut latency = hdrhistogram::Histogram::<u64>::new(3)?;
        for i in 0..LATENCY_JOBS {
            let started = Instant::now();
            let id = submit(&http, &bases[i % bases.len()], i).await?;
            wait_finished(&http, &bases[i % bases.len()], id).await?;
            latency.record(started.elapsed().as_micros() as u64)?;
        }

        // Jobs: submit from C clients (round-robin over the servers), then wait.
        let started = Instant::now();
        let per_client = args.jobs.div_ceil(args.clients);
        let mut submitters = Vec::new();
        for c in 0..args.clients {
            let (http, bases) = (http.clone(), bases.clone());
            submitters.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..per_client {
                    let base = &bases[(c + i) % bases.len()];
                    ids.push(submit(&http, base, c * per_client + i).await?);
                }
                anyhow::Ok(ids)
            }));
        }
        let mut ids = Vec::new();
        for s in submitters {
            ids.extend(s.await??);
        }
        let submitted = started.elapsed();
        for id in &ids {
            wait_finished(&http, &bases[0], *id).await?;
        }
        let elapsed = started.elapsed();
        let jobs_per_sec = ids.len() as f64 / elapsed.as_secs_f64();

        // Baseline: the same function through a gateway, same clients, same count.
        let started = Instant::now();
        let mut invokers = Vec::new();
        for c in 0..args.clients {
            let (http, bases) = (http.clone(), bases.clone());
            invokers.push(tokio::spawn(async move {
                for i in 0..per_client {
                    let base = &bases[(c + i) % bases.len()];
                    let response = http
                        .post(format!("{base}/fn/echo"))
                        .body(format!("{i}"))
                        .send()
                        .await?;
                    anyhow::ensure!(response.status().is_success(), "invoke");
                }
                anyhow::Ok(())
            }));
        }
        for i in invokers {
            i.await??;
        }
        let invokes_per_sec = (per_client * args.clients) as f64 / started.elapsed().as_secs_f64();

        println!("## Durable jobs end to end: 3 servers + 2 agents (16 slots each), {} jobs, {} clients", ids.len(), args.clients);
        println!();
        println!("| what | per second | total time | jobs / invocations |");
        println!("|---|---:|---:|---:|");
        println!(
            "| jobs (submit -> FINISHED, every one) | {jobs_per_sec:.0} | {:.2} s (all submitted after {:.2} s) | {:.2}x |",
            elapsed.as_secs_f64(),
            submitted.as_secs_f64(),
            jobs_per_sec / invokes_per_sec
        );
        println!(
            "| invocations of the same function through the gateways | {invokes_per_sec:.0} | | 1.00x |"
        );
        println!();
        println!(
            "One job at a time ({LATENCY_JOBS} jobs, one client): submit -> FINISHED p50 {:.1} ms, p99 {:.1} ms.",
            latency.value_at_quantile(0.5) as f64 / 1000.0,
            latency.value_at_quantile(0.99) as f64 / 1000.0
        );
        println!();
        Ok(())
    })
}

async fn submit(http: &reqwest::Client, base: &str, i: usize) -> anyhow::Result<u64> {
    let response = http
        .post(format!("{base}/v1/jobs"))
        .json(&serde_json::json!({ "function": "echo", "input": format!("job {i}") }))
        .send()
        .await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await?;
    anyhow::ensure!(status.as_u16() == 201, "submit: {status} {body}");
    body["id"].as_u64().context("no job id")
}

async fn wait_finished(http: &reqwest::Client, base: &str, id: u64) -> anyhow::Result<()> {
    loop {
        let job: serde_json::Value = http
            .get(format!("{base}/v1/jobs/{id}?wait=30"))
            .send()
            .await?
            .json()
            .await?;
        match job["state"].as_str() {
            Some("FINISHED") => return Ok(()),
            Some("FAILED" | "KILLED") => anyhow::bail!("job {id}: {job}"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

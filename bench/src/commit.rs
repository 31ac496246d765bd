//! Commit throughput and latency of small metadata commands: a wafer cluster (real
//! `wafer server` processes; redb fsyncs every log write) against an etcd 3.4 cluster
//! (Debian's `etcd-server`; fsync on), both on loopback, driven by the same closed-loop
//! load generator at the same number of clients.
//!
//! - wafer: each client sets a label on one function (`Command.setLabels` proposed with
//!   `Node.propose` over Cap'n Proto to the leader, answered once applied there);
//! - etcd: each client puts a key (`KV.Put` over gRPC with the `etcd-client` crate to
//!   the leader, answered once applied there).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::bail;
use wafer::state::Command as StateCommand;
use wafer_proto::node_capnp;
use wafer_tests::cluster::Cluster;

use crate::load::Stats;

/// Options of the commit benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct CommitArgs {
    /// Concurrent clients (each waits for its commit before the next).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub clients: Vec<usize>,
    /// Seconds of measured load per configuration (after 1 s of warm-up).
    #[arg(long, default_value_t = 5)]
    pub commit_seconds: u64,
    /// The `etcd` binary (etcd 3.4); without one on the PATH the etcd rows are left out.
    #[arg(long, default_value = "etcd")]
    pub etcd: PathBuf,
}

/// Runs the benchmark and prints a Markdown table.
pub fn run(args: &CommitArgs) -> anyhow::Result<()> {
    let etcd = if cfg!(feature = "etcd") {
        etcd_version(&args.etcd)
    } else {
        None
    };
    println!(
        "## Raft commits of small metadata commands: {} s per configuration, loopback, fsync on",
        args.commit_seconds
    );
    println!();
    match &etcd {
        Some(version) => println!("etcd: {version}"),
        None if cfg!(feature = "etcd") => println!(
            "etcd: not found ({}); its rows are left out",
            args.etcd.display()
        ),
        None => println!("etcd: left out (build wafer-bench with `--features etcd`)"),
    }
    println!();
    println!("| nodes | clients | wafer commits/s | wafer p50 / p99 | etcd commits/s | etcd p50 / p99 | wafer / etcd |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let duration = Duration::from_secs(args.commit_seconds);
        for nodes in [1u64, 3] {
            let mut wafer = Vec::new();
            {
                let dir = tempfile::Builder::new()
                    .prefix("wafer-bench-raft-")
                    .tempdir()?;
                let cluster = Cluster::start(dir.path(), nodes, &[]).await?;
                let ids: Vec<u64> = (1..=nodes).collect();
                let leader = cluster.wait_leader(&ids).await?;
                let addr = cluster.server(leader).rpc.clone();
                deploy_target(&cluster.server(leader).base()).await?;
                for &clients in &args.clients {
                    wafer.push(
                        wafer_load(&addr, wafer_tests::CLUSTER_SECRET, clients, duration).await?,
                    );
                }
            }
            let mut etcd_stats: Vec<Option<Stats>> = Vec::new();
            #[cfg(feature = "etcd")]
            if etcd.is_some() {
                let dir = tempfile::Builder::new()
                    .prefix("wafer-bench-etcd-")
                    .tempdir()?;
                let cluster = etcd::EtcdCluster::start(&args.etcd, dir.path(), nodes as usize)?;
                let endpoint = cluster.leader().await?;
                for &clients in &args.clients {
                    etcd_stats.push(Some(etcd::load(&endpoint, clients, duration).await?));
                }
            }
            etcd_stats.resize_with(args.clients.len(), || None);
            for (i, &clients) in args.clients.iter().enumerate() {
                let w = &wafer[i];
                let (e_rate, e_lat, ratio) = match &etcd_stats[i] {
                    Some(e) => (
                        format!("{:.0}", e.rps()),
                        latencies(e),
                        format!("{:.2}x", w.rps() / e.rps()),
                    ),
                    None => ("-".into(), "-".into(), "-".into()),
                };
                println!(
                    "| {nodes} | {clients} | {:.0} | {} | {e_rate} | {e_lat} | {ratio} |",
                    w.rps(),
                    latencies(w)
                );
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    println!();
    Ok(())
}

/// Drives the node at `addr` (which has a function `meta`) and prints the result.
pub fn load_one(
    addr: &str,
    secret: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let stats = local.block_on(&rt, wafer_load(addr, secret, clients, duration))?;
    println!(
        "{addr}: {:.0} commits/s, p50 / p99 {}",
        stats.rps(),
        latencies(&stats)
    );
    Ok(())
}

fn latencies(stats: &Stats) -> String {
    let ms = |q: f64| stats.hist.value_at_quantile(q) as f64 / 1000.0;
    let errors = if stats.errors > 0 {
        format!(" ({} errors)", stats.errors)
    } else {
        String::new()
    };
    format!("{:.2} / {:.2} ms{errors}", ms(0.5), ms(0.99))
}

/// Runs `clients` closed loops of `op` for 1 s of warm-up plus `duration`, on the
/// current `LocalSet`.
async fn drive<F, Fut>(clients: usize, duration: Duration, op: F) -> anyhow::Result<Stats>
where
    F: Fn(usize, u64) -> Fut + 'static,
    Fut: Future<Output = anyhow::Result<()>> + 'static,
{
    let op = Rc::new(op);
    let start = Instant::now() + Duration::from_secs(1);
    let end = start + duration;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let op = op.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let mut stats = Stats::new()?;
            let mut seq = 0u64;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let result = op(client, seq).await;
                seq += 1;
                if began < start {
                    continue;
                }
                match result {
                    Ok(()) => {
                        let micros = began.elapsed().as_micros() as u64;
                        stats.hist.record(micros.max(1))?;
                    }
                    Err(e) => {
                        if stats.errors == 0 {
                            eprintln!("bench: commit failed: {e:#}");
                        }
                        stats.errors += 1;
                    }
                }
            }
            Ok::<_, anyhow::Error>(stats)
        }));
    }
    let mut total = Stats::new()?;
    for task in tasks {
        total.merge(&task.await??)?;
    }
    total.elapsed = duration;
    // A benchmark of nothing but failures is a broken benchmark, not a result.
    if total.hist.is_empty() && total.errors > 0 {
        bail!(
            "every one of {} commits failed (see the first error above)",
            total.errors
        );
    }
    Ok(total)
}

/// Deploys the function whose labels the wafer clients set.
async fn deploy_target(base: &str) -> anyhow::Result<()> {
    let module =
        wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)?;
    let response = wafer_tests::http()
        .put(format!("{base}/v1/functions/meta"))
        .body(module)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("deploying the label target: {}", response.text().await?);
    }
    Ok(())
}

async fn wafer_load(
    addr: &str,
    secret: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Stats> {
    let door: node_capnp::door::Client = wafer::rpc::connect(addr).await?;
    let mut request = door.node_request();
    request.get().set_secret(secret.as_bytes());
    let node = request.send().pipeline.get_node();
    let name: wafer::state::FunctionName = "meta".parse()?;
    let stats = drive(clients, duration, move |client, seq| {
        let command = StateCommand::SetLabels {
            name: name.clone(),
            set: [(format!("client-{client}"), seq.to_string())].into(),
            remove: Vec::new(),
        };
        let mut request = node.propose_request();
        command.write(request.get().init_command());
        async move {
            let reply = request.send().promise.await?;
            let r = reply.get()?;
            if r.has_failure() {
                bail!("{}", r.get_failure()?.get_message()?.to_str()?);
            }
            Ok(())
        }
    })
    .await;
    stats
}

/// `etcd --version`'s first line, if the binary runs.
fn etcd_version(etcd: &Path) -> Option<String> {
    let output = Command::new(etcd).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().next().map(str::to_string)
}

/// The etcd side: a cluster of `etcd` processes and its load.
#[cfg(feature = "etcd")]
mod etcd {
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context};

    use super::drive;
    use crate::load::Stats;

    /// Drives the etcd leader at `endpoint`.
    pub async fn load(endpoint: &str, clients: usize, duration: Duration) -> anyhow::Result<Stats> {
        let client = etcd_client::Client::connect([endpoint], None).await?;
        drive(clients, duration, move |client_id, seq| {
            let mut kv = client.kv_client();
            async move {
                kv.put(format!("client-{client_id}"), seq.to_string(), None)
                    .await?;
                Ok(())
            }
        })
        .await
    }

    /// An etcd cluster of child processes; killed on drop.
    pub struct EtcdCluster {
        children: Vec<std::process::Child>,
        clients: Vec<String>,
    }

    impl Drop for EtcdCluster {
        fn drop(&mut self) {
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// A free loopback port (bound, then released).
    fn free_port() -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    }

    impl EtcdCluster {
        pub fn start(etcd: &Path, dir: &Path, n: usize) -> anyhow::Result<EtcdCluster> {
            let mut peers = Vec::new();
            let mut clients = Vec::new();
            for _ in 0..n {
                peers.push(format!("http://127.0.0.1:{}", free_port()?));
                clients.push(format!("http://127.0.0.1:{}", free_port()?));
            }
            let initial: Vec<String> = (0..n).map(|i| format!("e{i}={}", peers[i])).collect();
            let mut cluster = EtcdCluster {
                children: Vec::new(),
                clients: clients.clone(),
            };
            for i in 0..n {
                let log = std::fs::File::create(dir.join(format!("e{i}.log")))?;
                let child = Command::new(etcd)
                    .args(["--name", &format!("e{i}")])
                    .arg("--data-dir")
                    .arg(dir.join(format!("e{i}")))
                    .args(["--listen-client-urls", &clients[i]])
                    .args(["--advertise-client-urls", &clients[i]])
                    .args(["--listen-peer-urls", &peers[i]])
                    .args(["--initial-advertise-peer-urls", &peers[i]])
                    .args(["--initial-cluster", &initial.join(",")])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--initial-cluster-token", "wafer-bench"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::from(log))
                    .spawn()
                    .with_context(|| format!("starting {}", etcd.display()))?;
                cluster.children.push(child);
            }
            Ok(cluster)
        }

        /// The client URL of the leader, once the cluster has one.
        pub async fn leader(&self) -> anyhow::Result<String> {
            let until = Instant::now() + Duration::from_secs(60);
            loop {
                for url in &self.clients {
                    if let Ok(mut client) = etcd_client::Client::connect([url.as_str()], None).await
                    {
                        if let Ok(status) = client.status().await {
                            let me = status.header().map(|h| h.member_id());
                            if status.leader() != 0 && Some(status.leader()) == me {
                                return Ok(url.clone());
                            }
                        }
                    }
                }
                if Instant::now() >= until {
                    bail!("the etcd cluster elected no leader");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

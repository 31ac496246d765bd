//! Invocations routed to an agent under a serverless lease (gateway -> `Executor.run`
//! over Cap'n Proto -> the agent's runtime) against invocations run in the gateway's own
//! process (a server with an in-process agent), both on loopback, both driven by the
//! same load generator at the same number of connections.

use std::time::Duration;

use wafer_tests::cluster::Cluster;

use crate::load;

/// Options of the routing benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct RouteArgs {
    /// Seconds of measured load per configuration (after 1 s of warm-up).
    #[arg(long = "route-seconds", default_value_t = 5)]
    pub seconds: u64,
    /// Concurrent keep-alive connections.
    #[arg(long = "route-connections", default_value_t = 32)]
    pub connections: usize,
}

/// Runs the benchmark and prints a Markdown table.
pub fn run(args: &RouteArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let hello = wafer_tests::example("hello")?;
    let duration = Duration::from_secs(args.seconds);
    let http = wafer_tests::http();

    // Local: one server that runs an agent itself: invocations run in its process.
    let local = {
        let dir = tempfile::Builder::new()
            .prefix("wafer-bench-local-")
            .tempdir()?;
        let cluster = rt.block_on(Cluster::start(dir.path(), 1, &["--agent", "--slots", "64"]))?;
        let url = cluster.server(1).url("/fn/hello?name=bench");
        rt.block_on(deploy(
            &http,
            &cluster.server(1).url("/v1/functions/hello"),
            &hello,
        ))?;
        load::run(&url, args.connections, duration)?
    };

    // Routed: a server without an agent, and one agent holding a lease.
    let routed = {
        let dir = tempfile::Builder::new()
            .prefix("wafer-bench-routed-")
            .tempdir()?;
        let cluster = rt.block_on(Cluster::start(dir.path(), 1, &["--lease-slots", "32"]))?;
        let agent = cluster.start_agent("a", &["--slots", "64"])?;
        rt.block_on(
            cluster.wait_until_at(&[1], "/v1/leases", "the agent holds a lease", |all| {
                all[0]["leases"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|l| l["agent"] == agent.id.as_str()))
            }),
        )?;
        rt.block_on(deploy(
            &http,
            &cluster.server(1).url("/v1/functions/hello"),
            &hello,
        ))?;
        let url = cluster.server(1).url("/fn/hello?name=bench");
        // Check that it is routed before measuring.
        let ran_on = rt.block_on(async {
            let response = http.get(&url).send().await?;
            anyhow::Ok(
                response
                    .headers()
                    .get("x-wafer-agent")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            )
        })?;
        anyhow::ensure!(
            ran_on.as_deref() == Some(agent.id.as_str()),
            "the invocation was not routed to the agent"
        );
        load::run(&url, args.connections, duration)?
    };

    println!(
        "## Invocations routed to an agent vs run in the gateway's process: `hello`, {} connections, {} s",
        args.connections, args.seconds
    );
    println!();
    println!("| where it runs | requests/s | p50 | p99 | errors | vs local |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, stats) in [
        ("in the gateway's process (server with --agent)", &local),
        (
            "on an agent under a lease (gateway -> capnp -> agent)",
            &routed,
        ),
    ] {
        println!(
            "| {name} | {:.0} | {} µs | {} µs | {} | {:.2}x |",
            stats.rps(),
            stats.hist.value_at_quantile(0.5),
            stats.hist.value_at_quantile(0.99),
            stats.errors,
            stats.rps() / local.rps()
        );
    }
    println!();
    Ok(())
}

async fn deploy(http: &reqwest::Client, url: &str, wasm: &[u8]) -> anyhow::Result<()> {
    let response = http.put(url).body(wasm.to_vec()).send().await?;
    anyhow::ensure!(
        response.status().is_success(),
        "deploy: {}",
        response.status()
    );
    Ok(())
}

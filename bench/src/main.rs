//! wafer's benchmarks. Every comparison is measured in the same run on the same machine:
//!
//! - `gateway`: requests/s and latency of `hello` through `wafer dev` (a fresh instance
//!   per request) against a plain axum/hyper hello-world server and against
//!   process-per-request (`wafer run` per call), all driven by the same load generator;
//! - `instantiate`: in-process instantiate + run latency of `hello`, with and without the
//!   pooling allocator;
//! - `jobs`: durable jobs end to end on 3 servers + 2 agents, against invocations of the
//!   same function through the gateways;
//! - `route`: invocations routed to an agent under a lease vs run in the gateway;
//! - `allocator`: the allocator alone with 1,000 and 10,000 simulated agents:
//!   placements/s and allocation-round latency;
//! - `accel`: accelerator calls through wafer (guest -> host -> capnp -> OpenCL) against
//!   direct `ocl` calls, small-kernel calls per second, and what pipelining saves;
//! - `commit`: Raft commits of small metadata commands on 1- and 3-node wafer clusters
//!   against etcd 3.4 clusters of the same size, at the same numbers of clients.
//!
//! `cargo run --release -p wafer-bench -- all` prints a Markdown report.

mod accel;
mod allocator;
mod commit;
mod jobs;
mod load;
mod route;

// The same allocator as the `wafer` binary, so in-process numbers match the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use wafer::runtime::{Invocation, Limits, Runtime, RuntimeConfig};

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

// Parsed once at start: `All`'s size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Gateway vs plain hyper vs process-per-request.
    Gateway(GatewayArgs),
    /// In-process instantiate + run, pooling on and off.
    Instantiate(InstantiateArgs),
    /// Raft commits: wafer vs etcd.
    Commit(commit::CommitArgs),
    /// The allocator alone, with simulated agents.
    Allocator(allocator::AllocatorArgs),
    /// Durable jobs end to end on 3 servers + 2 agents.
    Jobs(jobs::JobsArgs),
    /// Accelerator calls through wafer vs direct OpenCL.
    Accel(accel::AccelArgs),
    /// Invocations routed to an agent vs run in the gateway's process.
    Route(route::RouteArgs),
    /// Sets labels on function `meta` through the node at ADDR (its --listen address)
    /// from N clients (for profiling a server by hand).
    CommitLoad {
        /// The node's Cap'n Proto address.
        addr: String,
        /// Concurrent clients.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// The cluster's secret (as given to `wafer server --secret`).
        #[arg(long, env = "WAFER_CLUSTER_SECRET")]
        secret: String,
        /// Seconds of measured load (after 1 s of warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// All of the above.
    All {
        #[command(flatten)]
        gateway: GatewayArgs,
        #[command(flatten)]
        instantiate: InstantiateArgs,
        #[command(flatten)]
        commit: commit::CommitArgs,
        #[command(flatten)]
        allocator: allocator::AllocatorArgs,
        #[command(flatten)]
        jobs: jobs::JobsArgs,
        #[command(flatten)]
        route: route::RouteArgs,
        #[command(flatten)]
        accel: accel::AccelArgs,
    },
    /// (internal) a plain axum hello-world server; prints its address.
    PlainServer,
    /// Drives one URL with the load generator (for profiling a server by hand).
    Load {
        /// The URL to GET.
        url: String,
        /// Concurrent keep-alive connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Seconds of measured load (after 1 s of warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Replace `{n}` in the URL with 0 to N-1 in turn (to drive N functions).
        #[arg(long, value_name = "N", default_value_t = 1)]
        spread: usize,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct GatewayArgs {
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds of measured load per target (after 1 s of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// `wasmtime` (wasmtime-cli 48) for the `wasmtime serve` baseline; without it (or
    /// without --wasi-http-hello) that row is left out.
    #[arg(long)]
    wasmtime: Option<std::path::PathBuf>,
    /// Core module of the wasi:http hello (bench/wasi-http-hello, built for
    /// wasm32-wasip1); made a component here with the proxy adapter.
    #[arg(long)]
    wasi_http_hello: Option<std::path::PathBuf>,
    /// Rounds the measured seconds are split into, alternating the targets.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds of process-per-request load.
    #[arg(long, default_value_t = 5)]
    process_seconds: u64,
}

#[derive(Debug, Clone, clap::Args)]
struct InstantiateArgs {
    /// Invocations per configuration.
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Which allocators to measure.
    #[arg(long, value_enum, default_value_t = Allocators::Both)]
    allocators: Allocators,
    /// Measure these modules (WASI commands) instead of `hello` and an empty `_start`;
    /// repeat to compare several in one run.
    #[arg(long = "wasm", value_name = "FILE")]
    modules: Vec<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Allocators {
    Both,
    Pooling,
    OnDemand,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Cmd::PlainServer => plain_server(),
        Cmd::Load {
            url,
            connections,
            seconds,
            spread,
        } => {
            let stats = load::run_spread(&url, spread, connections, Duration::from_secs(seconds))?;
            println!(
                "{url}: {:.0} requests/s, p50 {} µs, p99 {} µs, {} errors",
                stats.rps(),
                stats.hist.value_at_quantile(0.5),
                stats.hist.value_at_quantile(0.99),
                stats.errors
            );
            Ok(())
        }
        Cmd::Gateway(g) => {
            print_header();
            gateway(&g)
        }
        Cmd::Instantiate(i) => {
            print_header();
            instantiate(&i)
        }
        Cmd::CommitLoad {
            addr,
            clients,
            secret,
            seconds,
        } => commit::load_one(&addr, &secret, clients, Duration::from_secs(seconds)),
        Cmd::Commit(c) => {
            print_header();
            commit::run(&c)
        }
        Cmd::Allocator(a) => {
            print_header();
            allocator::run(&a)
        }
        Cmd::Jobs(j) => {
            print_header();
            jobs::run(&j)
        }
        Cmd::Route(r) => {
            print_header();
            route::run(&r)
        }
        Cmd::Accel(a) => {
            print_header();
            accel::run(&a)
        }
        Cmd::All {
            gateway: g,
            instantiate: i,
            commit: c,
            allocator: a,
            jobs: j,
            route: r,
            accel: x,
        } => {
            print_header();
            gateway(&g)?;
            instantiate(&i)?;
            commit::run(&c)?;
            allocator::run(&a)?;
            jobs::run(&j)?;
            route::run(&r)?;
            accel::run(&x)
        }
    }
}

fn print_header() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("machine: {cpu}, {cores} cores");
    println!();
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` and waits for a stdout line starting with `prefix`; returns the rest.
fn spawn_and_wait(mut cmd: Command, prefix: &str) -> anyhow::Result<(Proc, String)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning server")?;
    let stdout = child.stdout.take().context("stdout")?;
    let proc = Proc(child);
    let mut lines = BufReader::new(stdout).lines();
    while let Some(line) = lines.next() {
        let line = line?;
        if let Some(rest) = line.strip_prefix(prefix) {
            let rest = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return Ok((proc, rest));
        }
    }
    bail!("server exited before printing {prefix:?}")
}

fn plain_server() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let app =
            axum::Router::new().route("/", axum::routing::get(|| async { "Hello, world!\n" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("plain: listening on http://{}", listener.local_addr()?);
        axum::serve(listener, app).await?;
        Ok(())
    })
}

fn gateway(args: &GatewayArgs) -> anyhow::Result<()> {
    let wafer = wafer_tests::wafer_bin()?;
    let hello = wafer_tests::functions_dir()?.join("hello.wasm");
    // Removed when it goes out of scope, after the servers using it (declared later).
    let data = tempfile::Builder::new().prefix("wafer-bench-").tempdir()?;

    let mut dev = Command::new(&wafer);
    dev.env("WAFER_ADMIN_TOKEN", wafer_tests::ADMIN_TOKEN)
        .args([
            "dev",
            "--http",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--no-examples",
            "--data",
        ])
        .arg(data.path().join("data"))
        // Logging as a user gets it.
        .env_remove("RUST_LOG");
    let (_dev, dev_url) = spawn_and_wait(dev, "wafer dev: listening on ")?;
    deploy(&wafer, &dev_url, "hello", &hello, &[])?;

    let mut plain = Command::new(std::env::current_exe()?);
    plain.arg("plain-server");
    let (_plain, plain_url) = spawn_and_wait(plain, "plain: listening on ")?;

    let duration = Duration::from_secs(args.seconds);
    println!(
        "## HTTP hello: {} keep-alive connections, {} s per target in {} alternating rounds, one load generator thread",
        args.connections, args.seconds, args.rounds
    );
    println!();
    println!("| target | requests/s | p50 | p99 | errors | ratio vs plain hyper |");
    println!("|---|---:|---:|---:|---:|---:|");
    let serve = match (&args.wasmtime, &args.wasi_http_hello) {
        (Some(wasmtime), Some(core)) => Some(wasmtime_serve(wasmtime, core, data.path())?),
        _ => None,
    };

    // Alternate the targets in rounds so that drifting machine noise hits all alike.
    let rounds = args.rounds.max(1);
    let round = duration / rounds;
    let mut plain_stats = load::Stats::new()?;
    let mut wafer_stats = load::Stats::new()?;
    let mut serve_stats = load::Stats::new()?;
    for _ in 0..rounds {
        plain_stats.merge(&load::run(
            &format!("{plain_url}/"),
            args.connections,
            round,
        )?)?;
        wafer_stats.merge(&load::run(
            &format!("{dev_url}/fn/hello?name=bench"),
            args.connections,
            round,
        )?)?;
        if let Some((_, serve_url)) = &serve {
            serve_stats.merge(&load::run(
                &format!("{serve_url}/?name=bench"),
                args.connections,
                round,
            )?)?;
        }
    }
    let process_stats =
        process_per_request(&wafer, &hello, Duration::from_secs(args.process_seconds))?;
    let mut rows = vec![
        ("plain axum/hyper hello", &plain_stats),
        (
            "wafer gateway, `hello` (fresh instance per request)",
            &wafer_stats,
        ),
    ];
    if serve.is_some() {
        rows.push((
            "`wasmtime serve` 48, wasi:http hello (fresh instance per request)",
            &serve_stats,
        ));
    }
    rows.push((
        "process per request (`wafer run hello.wasm`, 2 at a time)",
        &process_stats,
    ));
    for (name, stats) in rows {
        print_row(name, stats, &plain_stats);
    }
    println!();
    if serve.is_some() {
        println!(
            "wafer gateway / `wasmtime serve`: {:.3} (requests/s)",
            wafer_stats.rps() / serve_stats.rps()
        );
        println!();
    }
    noisy_neighbours(&wafer, &dev_url, &wafer_stats)
}

/// Guests that spin for as long as they may, run alongside the `hello` load.
const SPINNERS: usize = 8;

/// `hello` through the gateway while [`SPINNERS`] guests burn CPU until their timeout:
/// how much of the machine short requests still get, and how long they wait.
fn noisy_neighbours(
    wafer: &std::path::Path,
    dev_url: &str,
    quiet: &load::Stats,
) -> anyhow::Result<()> {
    let measured = Duration::from_secs(2);
    // Long enough to cover the load's 1 s warm-up and the measured time, with margin.
    let timeout_ms = (measured + Duration::from_secs(3)).as_millis().to_string();
    let spin = wafer_tests::functions_dir()?.join("spin.wasm");
    deploy(
        wafer,
        dev_url,
        "spinner",
        &spin,
        &["--timeout", &timeout_ms],
    )?;
    let addr = dev_url.trim_start_matches("http://").to_string();
    let spinners: Vec<_> = (0..SPINNERS)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || http_get(&addr, "/fn/spinner"))
        })
        .collect();
    // Measure once every spinner is running.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = http_get(&addr, "/metrics")?;
        let live = metrics
            .lines()
            .find_map(|l| l.strip_prefix("wafer_live_instances "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if live >= SPINNERS as f64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the spinning guests did not start (live instances: {live})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let busy = load::run(
        &format!("{dev_url}/fn/hello?name=bench"),
        SPINNERS,
        measured,
    )?;
    for spinner in spinners {
        let _ = spinner.join();
    }
    println!(
        "## Noisy neighbours: `hello` while {SPINNERS} guests spin until their timeout ({SPINNERS} connections, {} s)",
        measured.as_secs()
    );
    println!();
    println!("| target | requests/s | p50 | p99 | errors | ratio vs quiet gateway |");
    println!("|---|---:|---:|---:|---:|---:|");
    print_row(
        &format!("wafer gateway, `hello`, {SPINNERS} `spin` guests running"),
        &busy,
        quiet,
    );
    println!();
    Ok(())
}

/// `wafer deploy NAME FILE EXTRA...` against `server`.
fn deploy(
    wafer: &std::path::Path,
    server: &str,
    name: &str,
    file: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<()> {
    let status = Command::new(wafer)
        .env("WAFER_TOKEN", wafer_tests::ADMIN_TOKEN)
        .args(["--server", server, "deploy", name])
        .arg(file)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("deploying {name} failed");
    }
    Ok(())
}

/// One Markdown table row: requests/s, p50, p99, errors and the ratio to `baseline`.
fn print_row(name: &str, stats: &load::Stats, baseline: &load::Stats) {
    println!(
        "| {name} | {:.0} | {} | {} | {} | {:.3} |",
        stats.rps(),
        fmt_us(stats.hist.value_at_quantile(0.5)),
        fmt_us(stats.hist.value_at_quantile(0.99)),
        stats.errors,
        stats.rps() / baseline.rps()
    );
}

/// A blocking `GET path` on a fresh connection, with the admin token (every route but
/// `/healthz` asks for one); the response as text.
fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
        wafer_tests::ADMIN_TOKEN
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// Makes `core` a wasi:http proxy component and serves it with `wasmtime serve` on a
/// free loopback port; returns the process and its URL once it accepts connections.
fn wasmtime_serve(
    wasmtime: &std::path::Path,
    core: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<(Proc, String)> {
    use wasi_preview1_component_adapter_provider::{
        WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_PROXY_ADAPTER,
    };
    let module = std::fs::read(core).with_context(|| format!("reading {}", core.display()))?;
    let component = wit_component::ComponentEncoder::default()
        .module(&module)?
        .adapter(
            WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            WASI_SNAPSHOT_PREVIEW1_PROXY_ADAPTER,
        )?
        .validate(true)
        .encode()?;
    let path = dir.join("wasi-http-hello.component.wasm");
    std::fs::write(&path, component)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(wasmtime)
        .args(["serve", "--addr", &format!("127.0.0.1:{port}")])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", wasmtime.display()))?;
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("wasmtime serve did not listen on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((proc, format!("http://127.0.0.1:{port}")))
}

/// Runs `wafer run hello.wasm` repeatedly, two at a time, for `duration`.
fn process_per_request(
    wafer: &std::path::Path,
    hello: &std::path::Path,
    duration: Duration,
) -> anyhow::Result<load::Stats> {
    let end = Instant::now() + duration;
    let started = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let wafer = wafer.to_path_buf();
            let hello = hello.to_path_buf();
            std::thread::spawn(move || -> anyhow::Result<(Histogram<u64>, u64)> {
                let mut hist = Histogram::<u64>::new(3)?;
                let mut errors = 0;
                while Instant::now() < end {
                    let t = Instant::now();
                    let out = Command::new(&wafer)
                        .arg("run")
                        .arg(&hello)
                        .stdin(Stdio::null())
                        .output()?;
                    if !out.status.success() {
                        errors += 1;
                    }
                    hist.record(t.elapsed().as_micros() as u64)?;
                }
                Ok((hist, errors))
            })
        })
        .collect();
    let mut stats = load::Stats::new()?;
    for w in workers {
        let (hist, errors) = w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        stats.hist.add(&hist)?;
        stats.errors += errors;
    }
    stats.elapsed = started.elapsed();
    Ok(stats)
}

fn instantiate(args: &InstantiateArgs) -> anyhow::Result<()> {
    if !args.modules.is_empty() {
        for path in &args.modules {
            let wasm =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            instantiate_one(args, &path.display().to_string(), &wasm)?;
        }
        return Ok(());
    }
    for (label, wasm) in [
        ("hello", wafer_tests::example("hello")?),
        (
            "empty `_start` (runtime floor)",
            wat::parse_str(EMPTY_COMMAND)?,
        ),
    ] {
        instantiate_one(args, label, &wasm)?;
    }
    Ok(())
}

/// The smallest WASI command: shows the runtime's own cost per invocation.
const EMPTY_COMMAND: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;

/// One allocator's runtime, prepared module and measurements.
struct Setup {
    pooling: bool,
    runtime: Runtime,
    prepared: wafer::runtime::Prepared,
    hist: Histogram<u64>,
    busy: Duration,
}

fn instantiate_one(args: &InstantiateArgs, label: &str, wasm: &[u8]) -> anyhow::Result<()> {
    const ROUNDS: usize = 5;
    println!(
        "## In-process instantiate + run of {label} ({} runs each in {ROUNDS} alternating rounds, one thread)",
        args.iterations
    );
    println!();
    println!("| allocator | p50 | p99 | mean | runs/s |");
    println!("|---|---:|---:|---:|---:|");
    let configs: &[bool] = match args.allocators {
        Allocators::Both => &[true, false],
        Allocators::Pooling => &[true],
        Allocators::OnDemand => &[false],
    };
    let limits = Limits::default();
    let invocation = Invocation {
        args: vec!["hello".into()],
        env: [
            ("REQUEST_METHOD", "GET"),
            ("PATH_INFO", "/"),
            ("QUERY_STRING", "name=bench"),
            ("HTTP_HOST", "localhost"),
        ]
        .into_iter()
        .collect(),
        stdio: wafer::runtime::Stdio::Captured(bytes::Bytes::new()),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut setups = Vec::new();
    for &pooling in configs {
        let runtime = Runtime::new(&RuntimeConfig {
            pooling,
            max_instances: 64,
            ..RuntimeConfig::default()
        })?;
        let prepared = runtime.prepare(wasm, &limits)?;
        for _ in 0..1000 {
            rt.block_on(runtime.invoke(&prepared, &limits, invocation.clone()))?;
        }
        setups.push(Setup {
            pooling,
            runtime,
            prepared,
            hist: Histogram::new(3)?,
            busy: Duration::ZERO,
        });
    }
    // Alternate the allocators in rounds so that drifting machine noise hits both alike.
    for _ in 0..ROUNDS {
        for setup in &mut setups {
            let started = Instant::now();
            for _ in 0..args.iterations / ROUNDS {
                let t = Instant::now();
                let outcome = rt.block_on(setup.runtime.invoke(
                    &setup.prepared,
                    &limits,
                    invocation.clone(),
                ))?;
                setup.hist.record(t.elapsed().as_nanos() as u64)?;
                if outcome.exit != wafer::runtime::Exit::Code(0) {
                    bail!("{label} failed: {:?}", outcome.exit);
                }
            }
            setup.busy += started.elapsed();
        }
    }
    for setup in &setups {
        println!(
            "| {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.0} |",
            if setup.pooling {
                "pooling"
            } else {
                "on-demand (mmap)"
            },
            setup.hist.value_at_quantile(0.5) as f64 / 1000.0,
            setup.hist.value_at_quantile(0.99) as f64 / 1000.0,
            setup.hist.mean() / 1000.0,
            setup.hist.len() as f64 / setup.busy.as_secs_f64()
        );
    }
    println!();
    Ok(())
}

fn fmt_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

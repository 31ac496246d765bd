//! `accel`: the cost of an accelerator call through wafer (guest -> host -> capnp ->
//! OpenCL, `functions/accel-bench` in a real instance under a grant) against the same
//! kernel called directly with `ocl` in this process, on every device type present, in
//! the same run: a 16M-float saxpy and a 1024x1024 matmul (wall time per call,
//! including the kernel), small-kernel calls per second, the same calls queued in
//! chains (`Kernel::enqueue` + one `accel::finish`, against enqueue x N + one finish
//! directly), and what promise pipelining saves on a compile -> kernel -> run -> read
//! chain over capnp.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use wafer::accel::backend::{Backend, BackendConfig};
use wafer::accel::client::AccelLink;
use wafer::accel::{DeviceInfoSummary, DeviceType};
use wafer::rpc::{ClusterSecret, RpcHandle};
use wafer::runtime::{Invocation, Limits, Runtime, RuntimeConfig, Stdio};

const KERNELS: &str = include_str!("../../functions/accel-bench/src/kernels.cl");

#[derive(Debug, Clone, clap::Args)]
pub struct AccelArgs {
    /// Timed calls per case and path.
    #[arg(long = "accel-runs", default_value_t = 20)]
    runs: usize,
    /// Floats in the saxpy.
    #[arg(long = "accel-saxpy-n", default_value_t = 1 << 24)]
    saxpy_n: usize,
    /// Side of the matmul's matrices.
    #[arg(long = "accel-matmul-n", default_value_t = 1024)]
    matmul_n: usize,
    /// Calls of the one-item kernel.
    #[arg(long = "accel-tiny-runs", default_value_t = 2000)]
    tiny_runs: usize,
    /// Timed chains of queued calls per case and path (each of `--accel-runs` calls,
    /// of `--accel-tiny-runs` for the one-item kernel).
    #[arg(long = "accel-chains", default_value_t = 5)]
    chains: usize,
    /// Folder of the built guests (accel-bench, accel-probe, matmul; scripts/bootstrap.sh).
    #[arg(long = "accel-guests", default_value = "target/functions")]
    guests: std::path::PathBuf,
}

/// What a check expects of an `accel-probe` answer.
type Expect = fn(&serde_json::Value) -> bool;

/// The accelerator checks of the test suite, run here on every device type (for
/// machines where the suite cannot run, such as a GPU machine without a toolchain).
const PROBES: [(&str, Expect); 10] = [
    ("device", |v| v["ok"] == true),
    ("vecadd&n=1000000", |v| v["matches"] == true),
    ("compile_error", |v| {
        v["kind"] == "Compile"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("undefined_name"))
    }),
    ("arg_count", |v| v["kind"] == "ArgCount"),
    ("arg_type", |v| v["kind"] == "ArgType"),
    ("small_buffer", |v| v["kind"] == "BufferTooSmall"),
    ("work_size", |v| v["kind"] == "WorkSize"),
    ("memory&mb=32", |v| v["kind"] == "MemoryLimit"),
    ("leak", |v| {
        v["zeroed"] == true && v["foreign_readable"] == 0
    }),
    ("bad_pointer", |v| {
        v["codes"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c == -10))
    }),
];

fn grant(kind: DeviceType, memory_mb: u64) -> Limits {
    Limits {
        memory_mb: 1024,
        timeout_ms: 600_000,
        accel: 1,
        accel_memory_mb: memory_mb,
        accel_type: Some(kind),
        ..Limits::default()
    }
}

/// Runs the probe cases and a verified matmul on a device of `kind`; prints a row per
/// check and answers how many failed.
async fn checks(
    runtime: &Runtime,
    guests: &std::path::Path,
    device: &DeviceInfoSummary,
) -> anyhow::Result<usize> {
    let probe_limits = grant(device.kind, 16);
    let probe = runtime.prepare(
        &std::fs::read(guests.join("accel-probe.wasm"))?,
        &probe_limits,
    )?;
    let label = format!("{} ({})", device.name, device.kind.as_str());
    let mut failed = 0;
    for (case, expect) in PROBES {
        let outcome = runtime
            .invoke(
                &probe,
                &probe_limits,
                Invocation {
                    args: vec!["accel-probe".into()],
                    env: [
                        ("REQUEST_METHOD", "GET".to_string()),
                        ("PATH_INFO", "/".to_string()),
                        ("QUERY_STRING", format!("case={case}")),
                    ]
                    .into_iter()
                    .collect(),
                    stdio: Stdio::Captured(Vec::new().into()),
                },
            )
            .await?;
        let text = String::from_utf8_lossy(&outcome.stdout).to_string();
        // After the CGI header block: the JSON body.
        let body = text.find('{').map_or("", |at| &text[at..]);
        let answer: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or_default();
        let ok = expect(&answer);
        failed += usize::from(!ok);
        let shown: String = answer.to_string().chars().take(100).collect();
        println!(
            "| {label} | {case} | {} | `{shown}` |",
            if ok { "pass" } else { "FAIL" }
        );
    }
    let matmul_limits = grant(device.kind, 256);
    let matmul = runtime.prepare(&std::fs::read(guests.join("matmul.wasm"))?, &matmul_limits)?;
    let outcome = runtime
        .invoke(
            &matmul,
            &matmul_limits,
            Invocation {
                args: vec!["matmul".into()],
                env: Default::default(),
                stdio: Stdio::Captured(br#"{"n": 512, "seed": 3}"#.to_vec().into()),
            },
        )
        .await?;
    let answer: serde_json::Value = serde_json::from_slice(&outcome.stdout).unwrap_or_default();
    let ok = answer["matches"] == true;
    failed += usize::from(!ok);
    println!(
        "| {label} | matmul 512 vs CPU | {} | `{}` |",
        if ok { "pass" } else { "FAIL" },
        answer.to_string().chars().take(100).collect::<String>()
    );
    Ok(failed)
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// Times `runs` calls of a kernel straight through `ocl` on the device named `name`,
/// each waited for; or, with `chains` > 0, `chains` times `runs` calls enqueued and
/// waited for once (answering the time per call of each chain). `profiled`: on a
/// queue with profiling on, the first and last call of a chain with an event, as the
/// backend enqueues a chain.
fn direct(
    device: &DeviceInfoSummary,
    case: &str,
    n: usize,
    runs: usize,
    chains: usize,
    profiled: bool,
) -> anyhow::Result<Vec<u64>> {
    let (platform, dev) = ocl::Platform::list()
        .into_iter()
        .flat_map(|p| {
            ocl::Device::list_all(p)
                .unwrap_or_default()
                .into_iter()
                .map(move |d| (p, d))
        })
        .find(|(_, d)| d.name().map(|s| s.trim() == device.name).unwrap_or(false))
        .context("the device is not visible to ocl")?;
    let items = if case == "matmul" { n * n } else { n };
    let pq = ocl::ProQue::builder()
        .platform(platform)
        .device(dev)
        .src(KERNELS)
        .dims(items)
        .queue_properties(if profiled {
            ocl::flags::QUEUE_PROFILING_ENABLE
        } else {
            ocl::flags::CommandQueueProperties::empty()
        })
        .build()?;
    let buffer = |value: f32| -> anyhow::Result<ocl::Buffer<f32>> {
        Ok(ocl::Buffer::builder()
            .queue(pq.queue().clone())
            .len(items)
            .fill_val(value)
            .build()?)
    };
    let kernel = match case {
        "saxpy" => {
            let (x, y) = (buffer(1.0)?, buffer(2.0)?);
            pq.kernel_builder("saxpy")
                .arg(&x)
                .arg(&y)
                .arg(0.5f32)
                .build()?
        }
        "matmul" => {
            let (a, b, c) = (buffer(0.5)?, buffer(0.25)?, buffer(0.0)?);
            pq.kernel_builder("matmul")
                .global_work_size([n, n])
                .arg(&a)
                .arg(&b)
                .arg(&c)
                .arg(n as u32)
                .build()?
        }
        _ => {
            let x = buffer(0.0)?;
            pq.kernel_builder("tiny")
                .global_work_size(1)
                .arg(&x)
                .build()?
        }
    };
    let mut times = Vec::with_capacity(runs);
    if chains > 0 {
        // SAFETY: as below.
        unsafe { kernel.enq()? };
        pq.queue().finish()?;
        for _ in 0..chains {
            let started = Instant::now();
            for i in 0..runs {
                // SAFETY: every argument is set, with buffers sized for the work size.
                if profiled && (i == 0 || i + 1 == runs) {
                    let mut event = ocl::Event::empty();
                    unsafe { kernel.cmd().enew(&mut event).enq()? };
                } else {
                    unsafe { kernel.enq()? };
                }
            }
            pq.queue().finish()?;
            times.push(started.elapsed().as_nanos() as u64 / runs.max(1) as u64);
        }
        return Ok(times);
    }
    // One untimed call first, as the guest's first call also pays for warm-up.
    for i in 0..=runs {
        let started = Instant::now();
        // SAFETY: every argument is set, with buffers sized for the work size.
        unsafe { kernel.enq()? };
        pq.queue().finish()?;
        if i > 0 {
            times.push(started.elapsed().as_nanos() as u64);
        }
    }
    Ok(times)
}

/// Runs the guest once for `case`; answers each timed call's wall time, ns (with
/// `chains` > 0: each chain's wall time per call).
async fn through_wafer(
    runtime: &Runtime,
    prepared: &wafer::runtime::Prepared,
    kind: DeviceType,
    case: &str,
    n: usize,
    runs: usize,
    chains: usize,
) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    let limits = grant(kind, 8192);
    // One untimed call or chain first (skipped below), which pays for warm-up.
    let (runs, chains) = if chains > 0 {
        (runs, chains + 1)
    } else {
        (runs + 1, 0)
    };
    let input =
        serde_json::json!({ "case": case, "n": n, "runs": runs, "chains": chains }).to_string();
    let outcome = runtime
        .invoke(
            prepared,
            &limits,
            Invocation {
                args: vec!["accel-bench".into()],
                env: Default::default(),
                stdio: Stdio::Captured(input.into_bytes().into()),
            },
        )
        .await?;
    let answer: serde_json::Value = serde_json::from_slice(&outcome.stdout).with_context(|| {
        format!(
            "the guest failed ({:?}): {}",
            outcome.exit,
            String::from_utf8_lossy(&outcome.log)
        )
    })?;
    let timed = |key: &str| -> anyhow::Result<Vec<u64>> {
        Ok(answer[key]
            .as_array()
            .with_context(|| format!("no {key}"))?
            .iter()
            .filter_map(|v| v.as_u64())
            .skip(1)
            .collect())
    };
    Ok((timed("wall_ns")?, timed("device_ns")?))
}

/// The latency of compile (cached) -> kernel -> run -> done.buffer -> read of a one-item
/// kernel over capnp: waiting for each answer, and pipelined.
async fn chains(
    addr: &str,
    secret: &ClusterSecret,
    device: u32,
    rounds: usize,
) -> anyhow::Result<(u64, u64)> {
    let accel = wafer::accel::client::connect(addr, secret).await?;
    let mut open = accel.open_request();
    open.get().set_device(device);
    let session = open.send().pipeline.get_session();
    let mut alloc = session.alloc_request();
    alloc.get().set_bytes(4);
    let buffer = alloc.send().promise.await?.get()?.get_buffer()?;
    let mut timings = [Vec::new(), Vec::new()];
    for round in 0..rounds * 2 {
        let pipelined = round % 2 == 1;
        let started = Instant::now();
        let mut compile = session.compile_request();
        compile.get().set_source(KERNELS);
        let compiled = compile.send();
        let program = if pipelined {
            compiled.pipeline.get_program()
        } else {
            compiled.promise.await?.get()?.get_program()?
        };
        let mut k = program.kernel_request();
        k.get().set_name("tiny");
        let found = k.send();
        let kernel = if pipelined {
            found.pipeline.get_kernel()
        } else {
            found.promise.await?.get()?.get_kernel()?
        };
        let mut r = kernel.run_request();
        r.get().init_args(1).get(0).set_buffer(buffer.clone());
        r.get().init_global(1).set(0, 1);
        let ran = r.send();
        let done = if pipelined {
            ran.pipeline.get_done()
        } else {
            ran.promise.await?.get()?.get_done()?
        };
        let mut pick = done.buffer_request();
        pick.get().set_index(0);
        let picked = pick.send();
        let output = if pipelined {
            picked.pipeline.get_buffer()
        } else {
            picked.promise.await?.get()?.get_buffer()?
        };
        let mut read = output.read_request();
        read.get().set_length(4);
        read.send().promise.await?;
        if round >= 2 {
            timings[usize::from(pipelined)].push(started.elapsed().as_nanos() as u64);
        }
    }
    let [sequential, pipelined] = timings;
    Ok((median(sequential), median(pipelined)))
}

pub fn run(args: &AccelArgs) -> anyhow::Result<()> {
    let guest = args.guests.join("accel-bench.wasm");
    let wasm = std::fs::read(&guest)
        .with_context(|| format!("reading {} (run scripts/bootstrap.sh)", guest.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let config = BackendConfig {
            default_session_memory: 1 << 30,
            max_session_memory: 16 << 30,
            default_timeout: Duration::from_secs(600),
            max_timeout: Duration::from_secs(600),
        };
        let backend = Arc::new(tokio::task::spawn_blocking(move || Backend::discover(config)).await??);
        let devices = backend.devices();
        anyhow::ensure!(!devices.is_empty(), "no OpenCL device (install pocl-opencl-icd)");
        let secret = ClusterSecret::new(&ClusterSecret::generate())?;
        let addr = backend
            .clone()
            .start("127.0.0.1:0".parse()?, secret.clone())
            .await?;
        let link = AccelLink::new(RpcHandle::start(secret.clone())?);
        // Renewed as `wafer accel --agent` does, so the attachment never lapses.
        let renew = (link.clone(), addr.to_string(), devices.clone());
        tokio::spawn(async move {
            loop {
                renew.0.attach(renew.1.clone(), renew.2.clone());
                tokio::time::sleep(wafer::accel::backend::ATTACH_EVERY).await;
            }
        });
        let runtime = Runtime::new(&RuntimeConfig {
            pooling: false,
            max_memory_mb: 4096,
            ..RuntimeConfig::default()
        })?;
        runtime.set_accel(link);
        let limits = Limits {
            memory_mb: 1024,
            ..Limits::default()
        };
        let prepared = runtime.prepare(&wasm, &limits)?;

        println!("## Accelerator checks");
        println!();
        println!("| device | check | result | answer |");
        println!("|---|---|---|---|");
        let mut failed = 0;
        let mut kinds = Vec::new();
        for device in &devices {
            if !kinds.contains(&device.kind) {
                kinds.push(device.kind);
                failed += checks(&runtime, &args.guests, device).await?;
            }
        }
        println!();
        anyhow::ensure!(failed == 0, "{failed} accelerator checks failed");

        println!("## Accelerator calls: through wafer vs direct `ocl`");
        println!();
        println!("Per call, median wall time including the kernel (guest -> host -> capnp -> OpenCL, the guest's own clock; direct: enqueue + finish in this process). {} timed calls each.", args.runs);
        println!();
        println!("| device | case | direct | through wafer | ratio |");
        println!("|---|---|---|---|---|");
        let mut seen = Vec::new();
        // Chains straight through `ocl` on a profiling queue, as the backend enqueues them.
        let mut profiled_rows = Vec::new();
        for device in &devices {
            if seen.contains(&device.kind) {
                continue;
            }
            seen.push(device.kind);
            let label = format!("{} ({})", device.name, device.kind.as_str());
            for chains in [0, args.chains] {
                for (case, n, runs, what) in [
                    ("saxpy", args.saxpy_n, args.runs, format!("saxpy {}M floats", args.saxpy_n >> 20)),
                    ("matmul", args.matmul_n, args.runs.min(10), format!("matmul {0}x{0}", args.matmul_n)),
                    ("tiny", 1, args.tiny_runs, "one-item kernel".to_string()),
                ] {
                    let direct_ns = {
                        let device = device.clone();
                        tokio::task::spawn_blocking(move || direct(&device, case, n, runs, chains, false)).await??
                    };
                    let (wafer_ns, device_ns) = through_wafer(&runtime, &prepared, device.kind, case, n, runs, chains).await?;
                    let (d, w) = (median(direct_ns.clone()), median(wafer_ns.clone()));
                    let shown = |ns: u64| {
                        if ns >= 1_000_000 {
                            format!("{:.2} ms", ns as f64 / 1e6)
                        } else {
                            format!("{:.1} µs", ns as f64 / 1e3)
                        }
                    };
                    let ratio = w as f64 / d.max(1) as f64;
                    let what = if chains > 0 {
                        format!("{what}, queued in chains of {runs} (per call)")
                    } else {
                        what
                    };
                    if case == "tiny" {
                        let per_s = |ns: u64| 1e9 / ns.max(1) as f64;
                        println!(
                            "| {label} | {what}: calls/s | {:.0} | {:.0} | {ratio:.2}x |",
                            per_s(d),
                            per_s(w)
                        );
                    } else {
                        println!(
                            "| {label} | {what} | {} | {} (device {}) | {ratio:.2}x |",
                            shown(d),
                            shown(w),
                            shown(median(device_ns))
                        );
                    }
                    if chains > 0 {
                        let device = device.clone();
                        let profiled = median(
                            tokio::task::spawn_blocking(move || direct(&device, case, n, runs, chains, true)).await??,
                        );
                        profiled_rows.push(format!(
                            "| {label} | {what} | {} | {} | {:.2}x |",
                            shown(d),
                            shown(profiled),
                            profiled as f64 / d.max(1) as f64
                        ));
                    }
                }
            }
        }
        println!();
        println!("Direct chains on a queue with profiling on and an event on the first and last call (as the backend enqueues a chain) vs the plain direct chains above:");
        println!();
        println!("| device | case | direct | direct, profiled | ratio |");
        println!("|---|---|---|---|---|");
        for row in profiled_rows {
            println!("{row}");
        }
        println!();
        println!("## Pipelining over capnp");
        println!();
        println!("compile (cached) -> kernel -> run -> done.buffer -> read of a one-item kernel, median of 200 chains.");
        println!();
        println!("| device | waiting for each answer | pipelined | saved |");
        println!("|---|---|---|---|");
        let local = tokio::task::LocalSet::new();
        for device in &devices {
            let (sequential, pipelined) = local
                .run_until(chains(&addr.to_string(), &secret, device.index, 200))
                .await?;
            println!(
                "| {} ({}) | {:.1} µs | {:.1} µs | {:.1} µs (4 round trips) |",
                device.name,
                device.kind.as_str(),
                sequential as f64 / 1e3,
                pipelined as f64 / 1e3,
                sequential.saturating_sub(pipelined) as f64 / 1e3
            );
        }
        println!();
        Ok(())
    })
}

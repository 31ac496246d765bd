//! `accel-bench`: the guest side of `wafer-bench accel`. Input (stdin, JSON):
//! `{"case": "saxpy" | "matmul" | "tiny", "n": N, "runs": R, "chains": C}`. It prepares
//! the buffers once, then times R kernel calls one by one (each call goes guest -> host
//! -> capnp -> OpenCL and waits for the kernel), and answers JSON with every call's wall
//! time and device time in ns. `tiny` runs a one-item kernel R times (calls per
//! second). With `chains` > 0 it times C chains of R calls queued with
//! `Kernel::enqueue` and sent by one `accel::finish` each, and answers each chain's
//! wall and device time per call.

use std::io::Read;
use std::time::Instant;

use serde_json::json;
use wafer_guest::accel::{self, Arg, Buffer, Kernel};

/// The kernels, shared with `wafer-bench accel`'s direct OpenCL baseline.
const SOURCE: &str = include_str!("kernels.cl");

fn filled(n: usize, value: f32) -> Result<Buffer, accel::Error> {
    let buffer = accel::alloc((n * 4) as u64)?;
    let data = vec![value; n];
    buffer.write_f32(0, &data)?;
    Ok(buffer)
}

fn time_runs(
    kernel: &Kernel,
    args: &[Arg<'_>],
    global: &[u64],
    runs: usize,
) -> Result<(Vec<u64>, Vec<u64>), accel::Error> {
    let (mut wall, mut device) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        let started = Instant::now();
        let info = kernel.run(args, global, None)?;
        wall.push(started.elapsed().as_nanos() as u64);
        device.push(info.device_ns);
    }
    Ok((wall, device))
}

fn time_chains(
    kernel: &Kernel,
    args: &[Arg<'_>],
    global: &[u64],
    runs: usize,
    chains: usize,
) -> Result<(Vec<u64>, Vec<u64>), accel::Error> {
    let (mut wall, mut device) = (Vec::with_capacity(chains), Vec::with_capacity(chains));
    let per_call = |ns: u64| ns / runs.max(1) as u64;
    for _ in 0..chains {
        let started = Instant::now();
        for _ in 0..runs {
            kernel.enqueue(args, global, None)?;
        }
        let info = accel::finish()?;
        wall.push(per_call(started.elapsed().as_nanos() as u64));
        device.push(per_call(info.device_ns));
    }
    Ok((wall, device))
}

fn run() -> Result<serde_json::Value, String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| e.to_string())?;
    let spec: serde_json::Value = serde_json::from_str(&input).map_err(|e| e.to_string())?;
    let case = spec["case"].as_str().unwrap_or("saxpy").to_string();
    let n = spec["n"].as_u64().unwrap_or(1 << 24) as usize;
    let runs = spec["runs"].as_u64().unwrap_or(10) as usize;
    let chains = spec["chains"].as_u64().unwrap_or(0) as usize;
    let time = |kernel: &Kernel, args: &[Arg<'_>], global: &[u64]| {
        if chains > 0 {
            time_chains(kernel, args, global, runs, chains)
        } else {
            time_runs(kernel, args, global, runs)
        }
    };
    let e = |e: accel::Error| format!("{:?}: {}", e.kind, e.message);
    let program = accel::compile(SOURCE, "").map_err(e)?;
    let (wall, device) = match case.as_str() {
        "saxpy" => {
            let kernel = program.kernel("saxpy").map_err(e)?;
            let x = filled(n, 1.0).map_err(e)?;
            let y = filled(n, 2.0).map_err(e)?;
            time(
                &kernel,
                &[Arg::Buffer(&x), Arg::Buffer(&y), Arg::Float(0.5)],
                &[n as u64],
            )
            .map_err(e)?
        }
        "matmul" => {
            let kernel = program.kernel("matmul").map_err(e)?;
            let a = filled(n * n, 0.5).map_err(e)?;
            let b = filled(n * n, 0.25).map_err(e)?;
            let c = filled(n * n, 0.0).map_err(e)?;
            time(
                &kernel,
                &[
                    Arg::Buffer(&a),
                    Arg::Buffer(&b),
                    Arg::Buffer(&c),
                    Arg::Uint(n as u32),
                ],
                &[n as u64, n as u64],
            )
            .map_err(e)?
        }
        "tiny" => {
            let kernel = program.kernel("tiny").map_err(e)?;
            let x = filled(1, 0.0).map_err(e)?;
            time(&kernel, &[Arg::Buffer(&x)], &[1]).map_err(e)?
        }
        other => return Err(format!("unknown case {other:?}")),
    };
    Ok(json!({ "case": case, "n": n, "wall_ns": wall, "device_ns": device }))
}

fn main() {
    match run() {
        Ok(out) => println!("{out}"),
        Err(why) => {
            eprintln!("accel-bench: {why}");
            std::process::exit(1);
        }
    }
}

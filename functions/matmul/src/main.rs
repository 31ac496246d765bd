//! `matmul`: a job that multiplies two N×N matrices on the granted accelerator and
//! checks the result against the CPU. Input (stdin, JSON, every field optional):
//! `{"n": 256, "seed": 1, "verify": true, "repeat": 1}` (`repeat`: how many times the
//! product is computed on the device, for long-running jobs). Output: JSON with the checksum (sum of the
//! product's elements) from the device and from the CPU, the largest difference, and
//! the device time.

use std::io::{Read, Write};

use wafer_guest::accel::{self, Arg};

const KERNEL: &str = r#"
__kernel void matmul(__global const float* a, __global const float* b,
                     __global float* c, uint n) {
    uint row = get_global_id(1);
    uint col = get_global_id(0);
    float sum = 0.0f;
    for (uint k = 0; k < n; k++) {
        sum += a[row * n + k] * b[k * n + col];
    }
    c[row * n + col] = sum;
}
"#;

/// A small deterministic generator (xorshift), so every run checks the same matrices.
fn matrix(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n * n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn cpu(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let mut c = vec![0f32; n * n];
    for row in 0..n {
        for k in 0..n {
            let x = a[row * n + k];
            for col in 0..n {
                c[row * n + col] += x * b[k * n + col];
            }
        }
    }
    c
}

fn run() -> Result<serde_json::Value, String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| e.to_string())?;
    let spec: serde_json::Value = if input.trim().is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_str(&input).map_err(|e| format!("the input is not JSON: {e}"))?
    };
    let n = spec["n"].as_u64().unwrap_or(256) as usize;
    if !(1..=4096).contains(&n) {
        return Err(format!("n is 1 to 4096, not {n}"));
    }
    let seed = spec["seed"].as_u64().unwrap_or(1);
    let verify = spec["verify"].as_bool().unwrap_or(true);
    let repeat = spec["repeat"].as_u64().unwrap_or(1).clamp(1, 100_000);
    let (a, b) = (matrix(n, seed), matrix(n, seed + 1));
    let program = accel::compile(KERNEL, "").map_err(|e| e.to_string())?;
    let kernel = program.kernel("matmul").map_err(|e| e.to_string())?;
    let bytes = (n * n * 4) as u64;
    let (da, db, dc) = (
        accel::alloc(bytes).map_err(|e| e.to_string())?,
        accel::alloc(bytes).map_err(|e| e.to_string())?,
        accel::alloc(bytes).map_err(|e| e.to_string())?,
    );
    da.write_f32(0, &a).map_err(|e| e.to_string())?;
    db.write_f32(0, &b).map_err(|e| e.to_string())?;
    let mut device_ns = 0;
    for _ in 0..repeat {
        let info = kernel
            .run(
                &[
                    Arg::Buffer(&da),
                    Arg::Buffer(&db),
                    Arg::Buffer(&dc),
                    Arg::Uint(n as u32),
                ],
                &[n as u64, n as u64],
                None,
            )
            .map_err(|e| e.to_string())?;
        device_ns += info.device_ns;
    }
    let c = dc.read_f32(0, n * n).map_err(|e| e.to_string())?;
    let checksum: f64 = c.iter().map(|x| f64::from(*x)).sum();
    let mut out = serde_json::json!({
        "n": n,
        "checksum": checksum,
        "device_ns": device_ns,
        "repeat": repeat,
    });
    if verify {
        let reference = cpu(&a, &b, n);
        let cpu_checksum: f64 = reference.iter().map(|x| f64::from(*x)).sum();
        let max_diff = c
            .iter()
            .zip(&reference)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        // Sums of n products in a different order differ by rounding only.
        let tolerance = 1e-4 * n as f32;
        out["cpu_checksum"] = serde_json::json!(cpu_checksum);
        out["max_abs_diff"] = serde_json::json!(max_diff);
        out["matches"] = serde_json::json!(max_diff <= tolerance);
    }
    Ok(out)
}

fn main() {
    match run() {
        Ok(out) => {
            let _ = writeln!(std::io::stdout(), "{out}");
        }
        Err(why) => {
            eprintln!("matmul: {why}");
            std::process::exit(1);
        }
    }
}

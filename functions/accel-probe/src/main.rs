//! `accel-probe`: a test fixture that exercises the accelerator imports one case at a
//! time (`?case=NAME`) and answers JSON: `{"ok": true, ...}` or
//! `{"ok": false, "kind": "ArgCount", "message": "..."}`.
//!
//! Cases: `device`, `vecadd` (`n`), `compile_error`, `arg_count`, `arg_type`,
//! `small_buffer`, `work_size`, `memory` (`mb`: allocate 1 MiB buffers up to that),
//! `fill` (writes 0xAB into a buffer), `leak` (a fresh buffer is all zero, and handles
//! it did not get are refused), `bad_pointer` (raw imports with ranges outside memory),
//! `queue` (`runs` queued increments, then a queued chain of two kernels, read back),
//! `queue_error` (a queued run that fails its checks between two good ones).

use serde_json::{json, Value};
use wafer_guest::accel::{self, Arg, Error};
use wafer_guest::http::{serve, Request, Response};

const ADD: &str =
    "__kernel void add(__global const float* a, __global const float* b, __global float* c) {
    size_t i = get_global_id(0);
    c[i] = a[i] + b[i];
}";

#[link(wasm_import_module = "wafer")]
extern "C" {
    fn accel_write(buffer: u32, offset: u64, ptr: *const u8, len: usize) -> i32;
    fn accel_read(buffer: u32, offset: u64, ptr: *mut u8, len: usize) -> i32;
    fn accel_compile(src: *const u8, src_len: usize, opt: *const u8, opt_len: usize) -> i32;
}

fn failure(e: Error) -> Value {
    json!({ "ok": false, "kind": format!("{:?}", e.kind), "message": e.message })
}

fn vecadd(n: usize) -> Result<Value, Error> {
    let program = accel::compile(ADD, "")?;
    let kernel = program.kernel("add")?;
    let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..n).map(|i| 1000.0 - i as f32).collect();
    let bytes = (n * 4) as u64;
    let (da, db, dc) = (
        accel::alloc(bytes)?,
        accel::alloc(bytes)?,
        accel::alloc(bytes)?,
    );
    da.write_f32(0, &a)?;
    db.write_f32(0, &b)?;
    let info = kernel.run(
        &[Arg::Buffer(&da), Arg::Buffer(&db), Arg::Buffer(&dc)],
        &[n as u64],
        None,
    )?;
    let c = dc.read_f32(0, n)?;
    let matches = c.iter().enumerate().all(|(i, x)| *x == a[i] + b[i]);
    Ok(json!({ "ok": true, "matches": matches, "n": n, "device_ns": info.device_ns }))
}

const STEPS: &str = "__kernel void inc(__global int* x) { x[get_global_id(0)] += 1; }
__kernel void twice(__global int* x) { x[get_global_id(0)] *= 2; }";

/// Reads `n` ints of `buffer`.
fn ints(buffer: &accel::Buffer, n: usize) -> Result<Vec<i32>, Error> {
    let mut bytes = vec![0u8; n * 4];
    buffer.read(0, &mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// `runs` queued increments of every element, read back; then twice, inc, twice queued
/// and sent by `finish`.
fn queue(runs: u64) -> Result<Value, Error> {
    const N: usize = 1024;
    let program = accel::compile(STEPS, "")?;
    let (inc, twice) = (program.kernel("inc")?, program.kernel("twice")?);
    let x = accel::alloc((N * 4) as u64)?;
    let idle = accel::finish()?;
    for _ in 0..runs {
        inc.enqueue(&[Arg::Buffer(&x)], &[N as u64], None)?;
    }
    let after_runs = ints(&x, N)?;
    twice.enqueue(&[Arg::Buffer(&x)], &[N as u64], None)?;
    inc.enqueue(&[Arg::Buffer(&x)], &[N as u64], None)?;
    twice.enqueue(&[Arg::Buffer(&x)], &[N as u64], None)?;
    let finished = accel::finish()?;
    let after_chain = ints(&x, N)?;
    Ok(json!({
        "ok": true,
        "idle_device_ns": idle.device_ns,
        "after_runs": after_runs.iter().all(|v| i64::from(*v) == runs as i64),
        "first": after_runs[0],
        "after_chain": after_chain.iter().all(|v| *v == after_chain[0]),
        "chained": after_chain[0],
        "chain_device_ns": finished.device_ns,
    }))
}

/// inc, a run with too few arguments, inc: queued, then sent by `finish`.
fn queue_error() -> Result<Value, Error> {
    let program = accel::compile(STEPS, "")?;
    let inc = program.kernel("inc")?;
    let x = accel::alloc(64)?;
    inc.enqueue(&[Arg::Buffer(&x)], &[16], None)?;
    inc.enqueue(&[], &[16], None)?;
    inc.enqueue(&[Arg::Buffer(&x)], &[16], None)?;
    let e = accel::finish().err();
    // Nothing of the three ran, and the queue is empty again.
    let untouched = ints(&x, 16)?.iter().all(|v| *v == 0);
    let again = accel::finish()?;
    Ok(json!({
        "ok": e.is_none(),
        "kind": e.as_ref().map(|e| format!("{:?}", e.kind)),
        "message": e.map(|e| e.message),
        "untouched": untouched,
        "again_device_ns": again.device_ns,
    }))
}

fn case(req: &Request) -> Result<Value, Error> {
    let name = req.query_param("case").unwrap_or_default();
    let number = |key: &str, default: u64| {
        req.query_param(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    match name.as_str() {
        "device" => {
            let device: Value = serde_json::from_str(&accel::device()?).unwrap_or(Value::Null);
            Ok(json!({ "ok": true, "device": device }))
        }
        "vecadd" => vecadd(number("n", 1024) as usize),
        "compile_error" => {
            accel::compile(
                "__kernel void broken(__global float* a) { a[0] = undefined_name; }",
                "",
            )?;
            Ok(json!({ "ok": true }))
        }
        "arg_count" | "arg_type" | "small_buffer" | "work_size" => {
            let kernel = accel::compile(ADD, "")?.kernel("add")?;
            let (a, b, c) = (accel::alloc(64)?, accel::alloc(64)?, accel::alloc(64)?);
            let info = match name.as_str() {
                "arg_count" => kernel.run(&[Arg::Buffer(&a), Arg::Buffer(&b)], &[16], None)?,
                "arg_type" => kernel.run(
                    &[Arg::Buffer(&a), Arg::Float(1.0), Arg::Buffer(&c)],
                    &[16],
                    None,
                )?,
                // 64 bytes hold 16 floats, not 32.
                "small_buffer" => kernel.run(
                    &[Arg::Buffer(&a), Arg::Buffer(&b), Arg::Buffer(&c)],
                    &[32],
                    None,
                )?,
                _ => kernel.run(
                    &[Arg::Buffer(&a), Arg::Buffer(&b), Arg::Buffer(&c)],
                    &[16],
                    Some(&[1 << 20]),
                )?,
            };
            Ok(json!({ "ok": true, "device_ns": info.device_ns }))
        }
        "memory" => {
            let mut held = Vec::new();
            for _ in 0..number("mb", 64) {
                held.push(accel::alloc(1 << 20)?);
            }
            Ok(json!({ "ok": true, "buffers": held.len() }))
        }
        "fill" => {
            let buffer = accel::alloc(1 << 20)?;
            buffer.write(0, &vec![0xAB; 1 << 20])?;
            let mut back = vec![0u8; 16];
            buffer.read(0, &mut back)?;
            Ok(json!({ "ok": true, "wrote": back.iter().all(|b| *b == 0xAB) }))
        }
        "leak" => {
            let buffer = accel::alloc(1 << 20)?;
            let mut data = vec![1u8; 1 << 20];
            buffer.read(0, &mut data)?;
            let zero = data.iter().all(|b| *b == 0);
            // Handles this instance never got: every read must be refused.
            let mut foreign_readable = 0;
            for handle in 2..256u32 {
                let mut byte = [0u8; 1];
                // SAFETY: `byte` is a live one-byte buffer.
                if unsafe { accel_read(handle, 0, byte.as_mut_ptr(), 1) } >= 0 {
                    foreign_readable += 1;
                }
            }
            Ok(json!({ "ok": true, "zeroed": zero, "foreign_readable": foreign_readable }))
        }
        "bad_pointer" => {
            let buffer = accel::alloc(64)?;
            drop(accel::compile(ADD, "")?);
            let far = 0xFFFF_0000usize as *const u8;
            // SAFETY: the host checks these ranges against guest memory and refuses them.
            let codes = unsafe {
                [
                    accel_write(1, 0, far, 64),
                    accel_read(1, 0, far as *mut u8, 64),
                    accel_compile(far, 1 << 20, far, 0),
                    accel_write(1, 0, std::ptr::null(), usize::MAX),
                ]
            };
            drop(buffer);
            Ok(json!({ "ok": true, "codes": codes }))
        }
        "queue" => queue(number("runs", 300)),
        "queue_error" => queue_error(),
        other => Ok(
            json!({ "ok": false, "kind": "Usage", "message": format!("unknown case {other:?}") }),
        ),
    }
}

fn main() {
    serve(|req: Request| -> Result<Response, String> {
        let body = case(&req).unwrap_or_else(failure);
        Ok(Response::text(200, format!("{body}\n")).header("content-type", "application/json"))
    })
}

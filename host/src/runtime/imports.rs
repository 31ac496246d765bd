//! Host functions of the `wafer` import module: `log`, and the accelerator calls of a
//! guest granted a device (`accel_*`), forwarded to the node's backend.

use wasmtime::{Caller, Extern, Linker, Memory};

use super::InstanceState;
use crate::accel::client::{GuestAccel, GuestArg, GuestRun};
use crate::accel::{AccelError, ErrorKind};

/// Adds `wafer.log(level: i32, ptr: i32, len: i32)`: one UTF-8 log line from guest
/// memory, appended to the invocation's bounded log.
pub fn add_to_linker(linker: &mut Linker<InstanceState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "wafer",
        "log",
        |mut caller: Caller<'_, InstanceState>,
         level: u32,
         ptr: u32,
         len: u32|
         -> wasmtime::Result<()> {
            let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
                wasmtime::bail!("wafer.log: the module exports no memory");
            };
            let start = ptr as usize;
            let end = start
                .checked_add(len as usize)
                .filter(|end| *end <= memory.data_size(&caller))
                .ok_or_else(|| {
                    wasmtime::format_err!("wafer.log: message out of bounds of memory")
                })?;
            let level = match level {
                1 => "debug",
                2 => "info",
                3 => "warn",
                _ => "error",
            };
            let (data, state) = memory.data_and_store_mut(&mut caller);
            let text = String::from_utf8_lossy(&data[start..end]);
            let line = format!("[{level}] {text}\n");
            state.log.append(line.as_bytes());
            Ok(())
        },
    )?;
    Ok(())
}

/// What an accelerator import fails with before it reaches the backend.
fn not_granted() -> AccelError {
    AccelError::new(
        ErrorKind::NotGranted,
        "no accelerator granted: deploy the function with accel=1 (its leases and jobs then hold a device)",
    )
}

fn out_of_range(what: &str) -> AccelError {
    AccelError::new(
        ErrorKind::Invalid,
        format!("{what}: pointer and length out of range of the guest's memory"),
    )
}

/// The guest's memory (every accelerator import needs it).
fn memory(caller: &mut Caller<'_, InstanceState>) -> Result<Memory, AccelError> {
    match caller.get_export("memory") {
        Some(Extern::Memory(memory)) => Ok(memory),
        _ => Err(AccelError::new(
            ErrorKind::Invalid,
            "the module exports no memory",
        )),
    }
}

/// Copies `len` bytes at `ptr` out of guest memory, checking the range.
fn read_guest(
    caller: &mut Caller<'_, InstanceState>,
    ptr: u32,
    len: u32,
    what: &str,
) -> Result<Vec<u8>, AccelError> {
    let memory = memory(caller)?;
    let data = memory.data(&caller);
    let start = ptr as usize;
    let end = start
        .checked_add(len as usize)
        .filter(|end| *end <= data.len())
        .ok_or_else(|| out_of_range(what))?;
    Ok(data[start..end].to_vec())
}

fn read_text(
    caller: &mut Caller<'_, InstanceState>,
    ptr: u32,
    len: u32,
    what: &str,
) -> Result<String, AccelError> {
    String::from_utf8(read_guest(caller, ptr, len, what)?)
        .map_err(|_| AccelError::new(ErrorKind::Invalid, format!("{what} is not UTF-8")))
}

/// Checks that `len` bytes at `ptr` lie in guest memory (before a call whose answer
/// goes there).
fn check_guest(
    caller: &mut Caller<'_, InstanceState>,
    ptr: u32,
    len: u64,
    what: &str,
) -> Result<(), AccelError> {
    let size = memory(caller)?.data_size(&caller) as u64;
    match u64::from(ptr).checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(out_of_range(what)),
    }
}

/// Copies `bytes` into guest memory at `ptr`, checking the range.
fn write_guest(
    caller: &mut Caller<'_, InstanceState>,
    ptr: u32,
    bytes: &[u8],
    what: &str,
) -> Result<(), AccelError> {
    let memory = memory(caller)?;
    let data = memory.data_mut(caller);
    let start = ptr as usize;
    let end = start
        .checked_add(bytes.len())
        .filter(|end| *end <= data.len())
        .ok_or_else(|| out_of_range(what))?;
    data[start..end].copy_from_slice(bytes);
    Ok(())
}

fn granted<'a>(
    caller: &'a mut Caller<'_, InstanceState>,
) -> Result<&'a mut GuestAccel, AccelError> {
    caller.data_mut().accel.as_mut().ok_or_else(not_granted)
}

/// Turns a result into the import's return value: the value, or the error's negative
/// code (its message kept for `accel_error`).
fn finish(caller: &mut Caller<'_, InstanceState>, result: Result<i64, AccelError>) -> i64 {
    match result {
        Ok(value) => value,
        Err(e) => {
            let code = e.kind.code();
            caller.data_mut().accel_error = e.message;
            i64::from(code)
        }
    }
}

/// Size of one argument record of `accel_run`: kind (u32), padding (u32), value (u64).
const ARG_RECORD: usize = 16;

fn decode_args(bytes: &[u8]) -> Result<Vec<GuestArg>, AccelError> {
    bytes
        .chunks_exact(ARG_RECORD)
        .enumerate()
        .map(|(i, record)| {
            let kind = u32::from_le_bytes([record[0], record[1], record[2], record[3]]);
            let mut value = [0u8; 8];
            value.copy_from_slice(&record[8..16]);
            let bits = u64::from_le_bytes(value);
            Ok(match kind {
                0 => GuestArg::Buffer(bits as u32),
                1 => GuestArg::Int(bits as u32 as i32),
                2 => GuestArg::Uint(bits as u32),
                3 => GuestArg::Long(bits as i64),
                4 => GuestArg::Ulong(bits),
                5 => GuestArg::Float(f32::from_bits(bits as u32)),
                6 => GuestArg::Double(f64::from_bits(bits)),
                7 => GuestArg::Local(bits),
                other => {
                    return Err(AccelError::new(
                        ErrorKind::ArgType,
                        format!("argument {i} has unknown kind {other}"),
                    ))
                }
            })
        })
        .collect()
}

/// Reads the run that `accel_run` and `accel_enqueue` describe out of guest memory:
/// `nargs` argument records at `args_ptr`, `dims` global sizes at `global_ptr` and as
/// many local sizes at `local_ptr` (0: none).
fn read_run(
    caller: &mut Caller<'_, InstanceState>,
    kernel: u32,
    args_ptr: u32,
    nargs: u32,
    global_ptr: u32,
    local_ptr: u32,
    dims: u32,
) -> Result<GuestRun, AccelError> {
    if !(1..=3).contains(&dims) {
        return Err(AccelError::new(
            ErrorKind::WorkSize,
            format!("a run has 1 to 3 dimensions, not {dims}"),
        ));
    }
    let nargs = nargs.min(1024);
    let args = read_guest(
        caller,
        args_ptr,
        nargs * ARG_RECORD as u32,
        "the run's arguments",
    )?;
    let global = read_guest(caller, global_ptr, dims * 8, "the run's global size")?;
    let local = if local_ptr == 0 {
        Vec::new()
    } else {
        decode_sizes(&read_guest(
            caller,
            local_ptr,
            dims * 8,
            "the run's local size",
        )?)
    };
    Ok(GuestRun {
        kernel,
        args: decode_args(&args)?,
        global: decode_sizes(&global),
        local,
    })
}

fn decode_sizes(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut v = [0u8; 8];
            v.copy_from_slice(c);
            u64::from_le_bytes(v)
        })
        .collect()
}

/// Adds an async accelerator import `name` to `linker`: `body`, an async block over
/// `caller` and the arguments, answers `Result<i64, AccelError>`, which [`finish`]
/// turns into the import's return value (`ret`).
macro_rules! accel_import {
    (
        $linker:ident,
        $name:literal,
        |$caller:ident, ($($arg:ident: $ty:ty),*)| -> $ret:ty $body:block
    ) => {
        $linker.func_wrap_async(
            "wafer",
            $name,
            |mut $caller: Caller<'_, InstanceState>, ($($arg,)*): ($($ty,)*)| {
                Box::new(async move {
                    let result: Result<i64, AccelError> = async $body.await;
                    finish(&mut $caller, result) as $ret
                })
            },
        )?;
    };
}

/// Adds the accelerator imports of the `wafer` module (see `wafer_guest::accel` for
/// their contract). Each returns a handle, a size or 0 on success and a negative
/// error code on failure, whose message `accel_error` copies out. Every pointer and
/// length is checked against the guest's memory: out of range is an `invalid` error,
/// never a host access.
pub fn add_accel_to_linker(linker: &mut Linker<InstanceState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "wafer",
        "accel_error",
        |mut caller: Caller<'_, InstanceState>, ptr: u32, cap: u32| -> i32 {
            let message = caller.data().accel_error.clone().into_bytes();
            let n = message.len().min(cap as usize);
            match write_guest(&mut caller, ptr, &message[..n], "accel_error") {
                Ok(()) => message.len().min(i32::MAX as usize) as i32,
                Err(e) => e.kind.code(),
            }
        },
    )?;
    accel_import!(linker, "accel_device", |caller, (ptr: u32, cap: u32)| -> i32 {
        check_guest(&mut caller, ptr, 0, "accel_device")?;
        let json = granted(&mut caller)?.device().await?;
        let n = json.len().min(cap as usize);
        write_guest(&mut caller, ptr, &json.as_bytes()[..n], "accel_device")?;
        Ok(json.len() as i64)
    });
    accel_import!(linker, "accel_compile", |caller, (sp: u32, sl: u32, op: u32, ol: u32)| -> i32 {
        let source = read_text(&mut caller, sp, sl, "accel_compile source")?;
        let options = read_text(&mut caller, op, ol, "accel_compile options")?;
        let handle = granted(&mut caller)?.compile(source, options).await?;
        Ok(i64::from(handle))
    });
    accel_import!(linker, "accel_kernel", |caller, (program: u32, np: u32, nl: u32)| -> i32 {
        let name = read_text(&mut caller, np, nl, "accel_kernel name")?;
        let handle = granted(&mut caller)?.kernel(program, name).await?;
        Ok(i64::from(handle))
    });
    accel_import!(linker, "accel_alloc", |caller, (bytes: u64)| -> i32 {
        let handle = granted(&mut caller)?.alloc(bytes).await?;
        Ok(i64::from(handle))
    });
    accel_import!(linker, "accel_write", |caller,
        (buffer: u32, offset: u64, ptr: u32, len: u32)| -> i32 {
        let data = read_guest(&mut caller, ptr, len, "accel_write")?;
        granted(&mut caller)?.write(buffer, offset, data).await?;
        Ok(0)
    });
    accel_import!(linker, "accel_read", |caller,
        (buffer: u32, offset: u64, ptr: u32, len: u32)| -> i32 {
        check_guest(&mut caller, ptr, u64::from(len), "accel_read")?;
        let data = granted(&mut caller)?
            .read(buffer, offset, u64::from(len))
            .await?;
        write_guest(&mut caller, ptr, &data, "accel_read")?;
        Ok(0)
    });
    accel_import!(linker, "accel_run", |caller,
        (kernel: u32, args_ptr: u32, nargs: u32, global_ptr: u32, local_ptr: u32, dims: u32)|
        -> i64 {
        let run = read_run(&mut caller, kernel, args_ptr, nargs, global_ptr, local_ptr, dims)?;
        let ns = granted(&mut caller)?.run(run).await?;
        Ok(ns.min(i64::MAX as u64) as i64)
    });
    accel_import!(linker, "accel_enqueue", |caller,
        (kernel: u32, args_ptr: u32, nargs: u32, global_ptr: u32, local_ptr: u32, dims: u32)|
        -> i32 {
        let run = read_run(&mut caller, kernel, args_ptr, nargs, global_ptr, local_ptr, dims)?;
        granted(&mut caller)?.enqueue(run).await?;
        Ok(0)
    });
    accel_import!(linker, "accel_finish", |caller, ()| -> i64 {
        let ns = granted(&mut caller)?.finish().await?;
        Ok(ns.min(i64::MAX as u64) as i64)
    });
    accel_import!(linker, "accel_release", |caller, (handle: u32)| -> i32 {
        granted(&mut caller)?.release(handle).await?;
        Ok(0)
    });
    Ok(())
}

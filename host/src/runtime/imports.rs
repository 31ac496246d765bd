//! Host functions of the `wafer` import module.

use wasmtime::{Caller, Extern, Linker};

use super::InstanceState;

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

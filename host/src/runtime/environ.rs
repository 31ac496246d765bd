//! The guest's environment variables. wafer answers WASI's `environ_sizes_get` and
//! `environ_get` itself (preview 1 and preview 0 alike) from one block built per run:
//! wasmtime-wasi's versions copy every variable twice per call (two allocations a
//! variable, on each of the two calls), which was a sixth of the allocations of a WAGI
//! request to `hello`. What the guest sees is the same: `KEY=VALUE\0` strings and a
//! pointer to each, in the order given; a pointer out of bounds or misaligned traps,
//! as WASI asks.

use wasmtime::{Caller, Extern, Linker};

use super::InstanceState;

/// `errno` success.
const ERRNO_SUCCESS: i32 = 0;
/// `errno` overflow: the sizes do not fit in the guest's 32 bits.
const ERRNO_OVERFLOW: i32 = 61;

/// The two WASI modules that define the environment calls.
const MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];

/// One run's environment as `environ_get` hands it out.
#[derive(Debug, Default)]
pub struct Environ {
    /// `KEY=VALUE\0` for each variable, back to back.
    block: Vec<u8>,
    /// Where each variable starts in `block`.
    starts: Vec<usize>,
}

impl Environ {
    /// The environment of `vars`, in their order.
    pub fn new(vars: &[(String, String)]) -> Environ {
        let len = vars.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        let mut block = Vec::with_capacity(len);
        let mut starts = Vec::with_capacity(vars.len());
        for (key, value) in vars {
            starts.push(block.len());
            block.extend_from_slice(key.as_bytes());
            block.push(b'=');
            block.extend_from_slice(value.as_bytes());
            block.push(0);
        }
        Environ { block, starts }
    }
}

/// Defines `environ_sizes_get` and `environ_get` of both WASI modules in `linker`, in
/// place of wasmtime-wasi's (added before).
pub fn add_to_linker(linker: &mut Linker<InstanceState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    for module in MODULES {
        linker.func_wrap(
            module,
            "environ_sizes_get",
            |mut caller: Caller<'_, InstanceState>,
             count_at: u32,
             size_at: u32|
             -> wasmtime::Result<i32> {
                let memory = guest_memory(&mut caller)?;
                let (data, state) = memory.data_and_store_mut(&mut caller);
                let env = &state.environ;
                let (Ok(count), Ok(size)) = (
                    u32::try_from(env.starts.len()),
                    u32::try_from(env.block.len()),
                ) else {
                    return Ok(ERRNO_OVERFLOW);
                };
                put_u32(data, count_at, count)?;
                put_u32(data, size_at, size)?;
                Ok(ERRNO_SUCCESS)
            },
        )?;
        linker.func_wrap(
            module,
            "environ_get",
            |mut caller: Caller<'_, InstanceState>,
             pointers_at: u32,
             block_at: u32|
             -> wasmtime::Result<i32> {
                let memory = guest_memory(&mut caller)?;
                let (data, state) = memory.data_and_store_mut(&mut caller);
                let env = &state.environ;
                let target = range(data.len(), block_at, env.block.len())?;
                data[target].copy_from_slice(&env.block);
                for (i, start) in env.starts.iter().enumerate() {
                    let slot = u32::try_from(i)
                        .ok()
                        .and_then(|i| i.checked_mul(4))
                        .and_then(|offset| pointers_at.checked_add(offset))
                        .ok_or_else(|| wasmtime::format_err!("environ_get: pointer overflow"))?;
                    let pointer = u32::try_from(*start)
                        .ok()
                        .and_then(|start| block_at.checked_add(start))
                        .ok_or_else(|| wasmtime::format_err!("environ_get: pointer overflow"))?;
                    put_u32(data, slot, pointer)?;
                }
                Ok(ERRNO_SUCCESS)
            },
        )?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// The guest's exported memory (WASI calls need one, as wasmtime-wasi's do).
fn guest_memory(caller: &mut Caller<'_, InstanceState>) -> wasmtime::Result<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(memory)) => Ok(memory),
        _ => wasmtime::bail!("missing required memory export"),
    }
}

/// `len` bytes at guest address `at`, checked against memory of `size` bytes.
fn range(size: usize, at: u32, len: usize) -> wasmtime::Result<std::ops::Range<usize>> {
    let start = at as usize;
    start
        .checked_add(len)
        .filter(|end| *end <= size)
        .map(|end| start..end)
        .ok_or_else(|| wasmtime::format_err!("pointer out of bounds: {len} bytes at {at}"))
}

/// Writes `value` at guest address `at`, which must be 4-byte aligned.
fn put_u32(data: &mut [u8], at: u32, value: u32) -> wasmtime::Result<()> {
    if !at.is_multiple_of(4) {
        wasmtime::bail!("pointer not aligned: {at}");
    }
    let target = range(data.len(), at, 4)?;
    data[target].copy_from_slice(&value.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_is_each_variable_nul_terminated_in_order() {
        let env = Environ::new(&[
            ("A".into(), "1".into()),
            ("EMPTY".into(), String::new()),
            ("B".into(), "x=y".into()),
        ]);
        assert_eq!(env.block, b"A=1\0EMPTY=\0B=x=y\0");
        assert_eq!(env.starts, vec![0, 4, 11]);
        let none = Environ::new(&[]);
        assert!(none.block.is_empty() && none.starts.is_empty());
    }

    #[test]
    fn writes_are_bounds_and_alignment_checked() {
        let mut data = vec![0u8; 16];
        assert!(put_u32(&mut data, 12, 7).is_ok());
        assert_eq!(&data[12..], &7u32.to_le_bytes());
        assert!(put_u32(&mut data, 16, 7).is_err(), "out of bounds");
        assert!(put_u32(&mut data, 6, 7).is_err(), "misaligned");
        assert!(put_u32(&mut data, u32::MAX - 3, 7).is_err());
        assert_eq!(range(16, 10, 6).ok(), Some(10..16));
        assert!(range(16, 10, 7).is_err());
    }
}

//! The guest's environment variables. wafer answers WASI's `environ_sizes_get` and
//! `environ_get` itself (preview 1 and preview 0 alike) from one block per run, which
//! the gateway writes the WAGI variables straight into. wasmtime-wasi's versions clone
//! the whole list on each call (two allocations a variable, per call), and its context
//! builder copies it once more: together a third of a `hello` request's allocations
//! (215 before, 137 after; see docs/benchmarks.md). What the guest sees is the same:
//! `KEY=VALUE\0` strings and a pointer to each, in the order given; a pointer out of
//! bounds or misaligned traps, as WASI asks.

use wasmtime::{Caller, Extern, Linker};

use super::InstanceState;

/// `errno` success.
const ERRNO_SUCCESS: i32 = 0;
/// `errno` overflow: the sizes do not fit in the guest's 32 bits.
const ERRNO_OVERFLOW: i32 = 61;

/// The two WASI modules that define the environment calls.
const MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];

/// One run's environment variables, kept as `environ_get` hands them out: the callers
/// that build one per request (the gateway's WAGI variables) write straight into it,
/// one allocation instead of two per variable.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Environ {
    /// `KEY=VALUE\0` for each variable, back to back.
    block: String,
    /// Where each variable starts in `block`, and its key's length.
    vars: Vec<(usize, usize)>,
}

impl Environ {
    /// An empty environment with room for `vars` variables of `bytes` in all.
    pub fn with_capacity(vars: usize, bytes: usize) -> Environ {
        Environ {
            block: String::with_capacity(bytes),
            vars: Vec::with_capacity(vars),
        }
    }

    /// Adds `key=value`.
    pub fn push(&mut self, key: &str, value: &str) {
        self.push_with(|b| b.push_str(key), |b| b.push_str(value));
    }

    /// Adds `key=` the formatted `value`.
    pub fn push_fmt(&mut self, key: &str, value: std::fmt::Arguments<'_>) {
        self.push_with(
            |b| b.push_str(key),
            |b| {
                // Writing to a `String` cannot fail.
                let _ = std::fmt::Write::write_fmt(b, value);
            },
        );
    }

    /// Adds a variable whose key and value `key` and `value` append to the buffer
    /// they are given.
    pub fn push_with(&mut self, key: impl FnOnce(&mut String), value: impl FnOnce(&mut String)) {
        let start = self.block.len();
        key(&mut self.block);
        let key_len = self.block.len() - start;
        self.block.push('=');
        value(&mut self.block);
        self.block.push('\0');
        self.vars.push((start, key_len));
    }

    /// How many variables there are.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// The variables as `(key, value)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.vars.iter().enumerate().map(|(i, &(start, key_len))| {
            let end = self.vars.get(i + 1).map_or(self.block.len(), |next| next.0);
            let key = &self.block[start..start + key_len];
            // Between the `=` and the terminating NUL.
            let value = &self.block[start + key_len + 1..end - 1];
            (key, value)
        })
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Environ {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(vars: I) -> Environ {
        let mut env = Environ::default();
        for (key, value) in vars {
            env.push(key.as_ref(), value.as_ref());
        }
        env
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
                    u32::try_from(env.vars.len()),
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
                data[target].copy_from_slice(env.block.as_bytes());
                for (i, (start, _)) in env.vars.iter().enumerate() {
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
        let mut env: Environ = [("A", "1"), ("EMPTY", "")].into_iter().collect();
        env.push_fmt("B", format_args!("x={}", "y"));
        env.push_with(|b| b.push_str("HTTP_X"), |b| b.push('v'));
        assert_eq!(env.block, "A=1\0EMPTY=\0B=x=y\0HTTP_X=v\0");
        assert_eq!(env.vars, vec![(0, 1), (4, 5), (11, 1), (17, 6)]);
        assert_eq!(
            env.iter().collect::<Vec<_>>(),
            vec![("A", "1"), ("EMPTY", ""), ("B", "x=y"), ("HTTP_X", "v")]
        );
        assert_eq!(env.len(), 4);
        let none = Environ::default();
        assert!(none.is_empty() && none.iter().next().is_none());
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

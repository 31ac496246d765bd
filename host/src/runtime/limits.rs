//! Per-function resource limits and the store limiter that enforces memory limits.

use serde::{Deserialize, Serialize};
use wasmtime::ResourceLimiter;

/// `n` bytes for people: `512 B`, `4.0 KiB`, `2.1 MiB`.
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Default linear-memory limit of a function, in MiB.
pub const DEFAULT_MEMORY_MB: u64 = 128;
/// Default wall-clock limit of one invocation, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Default limit of a request body, in bytes.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 8 << 20;
/// Default limit of a response (everything the guest writes to stdout), in bytes.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 16 << 20;
/// Default limit of captured log output (stderr and `wafer.log`), in bytes.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 64 << 10;
/// Default device memory of an accelerator grant, in MiB.
pub const DEFAULT_ACCEL_MEMORY_MB: u64 = 256;
/// Most table elements a guest may grow a table to.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Resource limits of one function; every invocation runs under them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Accelerator devices each run is granted (0 or 1): a function's leases and a
    /// job's attempts then hold one, and its guest may call the `wafer.accel_*`
    /// imports.
    #[serde(skip_serializing_if = "is_zero")]
    pub accel: u64,
    /// Device memory the grant's buffers may hold together, MiB.
    #[serde(skip_serializing_if = "is_default_accel_memory")]
    pub accel_memory_mb: u64,
    /// The kind of device asked for (none: any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel_type: Option<crate::accel::DeviceType>,
    /// Linear memory, MiB.
    pub memory_mb: u64,
    /// Wall-clock time of one invocation, ms.
    pub timeout_ms: u64,
    /// Request body, bytes.
    pub max_request_bytes: u64,
    /// Response (stdout), bytes.
    pub max_response_bytes: u64,
    /// Captured log (stderr and `wafer.log`), bytes; output beyond it is dropped.
    pub max_log_bytes: u64,
    /// Fuel for one run, about one unit per WebAssembly instruction executed, the same
    /// count on every node and every run (0: unmetered, bounded by the timeout alone).
    /// A run that uses it all ends with `fuel_exhausted`. Metered functions run in a
    /// second engine whose code counts fuel as it goes (tight loops run up to ~2x
    /// slower), so unmetered ones never pay for it.
    #[serde(skip_serializing_if = "is_zero")]
    pub fuel: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory_mb: DEFAULT_MEMORY_MB,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            accel: 0,
            accel_memory_mb: DEFAULT_ACCEL_MEMORY_MB,
            accel_type: None,
            fuel: 0,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_default_accel_memory(n: &u64) -> bool {
    *n == DEFAULT_ACCEL_MEMORY_MB
}

impl Limits {
    /// What one run holds: a slot, its memory and its accelerators.
    pub fn resources(&self) -> crate::state::Resources {
        crate::state::Resources {
            slots: 1,
            memory_mb: self.memory_mb,
            accelerators: self.accel,
        }
    }

    /// Linear-memory limit in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mb.saturating_mul(1 << 20)
    }
}

/// Refuses memory growth beyond the function's limit and remembers that it did, so a
/// trap that follows can be reported as "memory limit exceeded".
#[derive(Debug)]
pub struct MemoryLimiter {
    max_memory_bytes: usize,
    refused: bool,
}

impl MemoryLimiter {
    /// A limiter allowing `max_memory_bytes` of linear memory per memory.
    pub fn new(max_memory_bytes: u64) -> MemoryLimiter {
        MemoryLimiter {
            max_memory_bytes: usize::try_from(max_memory_bytes).unwrap_or(usize::MAX),
            refused: false,
        }
    }

    /// Whether a memory growth was refused during this instance's life.
    pub fn refused(&self) -> bool {
        self.refused
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Refusal is not failure: `memory.grow` returns -1 and the guest decides.
        let allowed = desired <= self.max_memory_bytes;
        if !allowed {
            self.refused = true;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

//! Structured log lines sent to the host through the `wafer` import module.

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum Level {
    /// Fine-grained diagnostics.
    Debug = 1,
    /// Normal operation.
    Info = 2,
    /// Something unexpected that the function recovered from.
    Warn = 3,
    /// A failure.
    Error = 4,
}

impl Level {
    /// The lower-case name of the level, as the host prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

#[cfg(all(target_arch = "wasm32", not(feature = "plain-wasi")))]
mod host {
    #[link(wasm_import_module = "wafer")]
    extern "C" {
        /// `wafer.log(level, ptr, len)`: the host copies `len` bytes at `ptr` (UTF-8).
        #[link_name = "log"]
        pub fn wafer_log(level: u32, ptr: *const u8, len: usize);
    }
}

/// Sends one log line to the host.
///
/// On wafer the line goes to the function's log (bounded in size): `wafer logs NAME`
/// and `GET /v1/functions/{name}/logs` show it, and so does a failed invocation's error;
/// with the `plain-wasi` feature, or outside WebAssembly, it is written to stderr.
pub fn log(level: Level, message: &str) {
    #[cfg(all(target_arch = "wasm32", not(feature = "plain-wasi")))]
    {
        // SAFETY: the pointer and length describe `message`, a live, initialised byte
        // slice; the host only reads `len` bytes from guest memory during the call.
        unsafe { host::wafer_log(level as u32, message.as_ptr(), message.len()) }
    }
    #[cfg(not(all(target_arch = "wasm32", not(feature = "plain-wasi"))))]
    {
        eprintln!("[{}] {}", level.as_str(), message);
    }
}

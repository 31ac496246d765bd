//! wafer: a WebAssembly serverless compute fabric. This crate is the node daemon (runtime,
//! state, gateway) and the command-line client; `wafer dev` runs all of it in one process.
#![warn(missing_docs)]

/// `println!` for a daemon's ready lines that ignores a closed stdout: whoever read
/// them may have gone (`wafer server | head -1`), and that must not stop the daemon.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod accel;
pub mod agent;
pub mod auth;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod consensus;
pub mod dev;
pub mod digest;
pub mod events;
pub mod functions;
pub mod gateway;
pub mod guest_logs;
pub mod metrics;
pub mod rpc;
pub mod runtime;
pub mod scheduler;
pub mod server;
pub mod signals;
pub mod state;

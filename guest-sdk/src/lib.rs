//! The guest SDK: what wafer function authors link to write WAGI-style HTTP functions
//! and plain stdin -> stdout functions in idiomatic Rust.
//!
//! wafer runs WASI preview 1 command modules. For an HTTP invocation the request body
//! arrives on stdin, the method, path, query and headers arrive as environment variables
//! (WAGI), and the response is written to stdout as a CGI-style header block (`Status:`
//! and `Name: value` lines, a blank line) followed by the body. This crate hides that
//! plumbing behind [`http::Request`], [`http::Response`] and [`http::serve`].
//!
//! # A complete HTTP function
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "greeter"
//! version = "0.1.0"
//! edition = "2021"
//!
//! [dependencies]
//! wafer-guest = { path = "../../guest-sdk" }
//! ```
//!
//! `src/main.rs` (this is `examples/greeter.rs` of this crate):
//!
//! ```no_run
#![doc = include_str!("../examples/greeter.rs")]
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip1` (see the project's
//! `scripts/bootstrap.sh` for machines without a rustup wasm target), then
//! `wafer deploy greeter target/wasm32-wasip1/release/greeter.wasm` and
//! `curl 'http://127.0.0.1:8080/fn/greeter?name=ada'`.
//!
//! # A plain stdin -> stdout function
//!
//! ```no_run
//! fn main() {
//!     wafer_guest::stdio::run(|input: Vec<u8>| -> Result<Vec<u8>, String> {
//!         Ok(input.to_ascii_uppercase())
//!     })
//! }
//! ```
//!
//! Such a function also runs unchanged under `wafer run`, `wasmtime run` (with the
//! `plain-wasi` feature, which sends [`log`] to stderr instead of the `wafer` import
//! module) and any other WASI host.
//!
//! # Panics and errors
//!
//! A handler that returns `Err` produces a `500` response with the error's message; a
//! handler that panics produces a `500` whose body names the panic, and the instance
//! exits with status 70 (as `EX_SOFTWARE`).
#![warn(missing_docs)]
// The examples are complete programs, `main` included, on purpose.
#![allow(clippy::needless_doctest_main)]

pub mod accel;
pub mod http;
mod logging;
pub mod stdio;

pub use logging::{log, Level};

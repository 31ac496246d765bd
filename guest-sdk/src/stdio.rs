//! Plain stdin -> stdout functions: read all input, write all output.

use std::fmt::Display;
use std::io::{Read, Write};

/// Reads all of stdin, calls `handler`, and writes its output to stdout.
///
/// An `Err` is printed to stderr and the process exits with status 1, so the host (or a
/// shell) sees the failure.
pub fn run<F, E>(handler: F)
where
    F: FnOnce(Vec<u8>) -> Result<Vec<u8>, E>,
    E: Display,
{
    let mut input = Vec::new();
    if let Err(err) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("error: reading stdin: {err}");
        std::process::exit(1);
    }
    match handler(input) {
        Ok(output) => {
            let mut stdout = std::io::stdout().lock();
            if let Err(err) = stdout.write_all(&output).and_then(|()| stdout.flush()) {
                eprintln!("error: writing stdout: {err}");
                std::process::exit(1);
            }
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    }
}

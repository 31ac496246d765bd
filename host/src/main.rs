//! The `wafer` binary.

fn main() -> std::process::ExitCode {
    wafer::cli::main()
}

//! The `wafer` binary.

// The gateway allocates many small, short-lived buffers per request from several
// threads; mimalloc handles that pattern markedly better than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    wafer::cli::main()
}

//! The `tpo` command-line tool.

mod cli;

/// mimalloc keeps freed memory for reuse: `tpo reproduce control` frees and allocates candle
/// tensors of a few MB at every gradient step, which glibc's malloc hands back to the kernel
/// each time (most of the run then went to page faults).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}

//! The `kubetx` binary: parses the command line and hands over to the library.

use clap::Parser;

/// mimalloc instead of glibc's malloc: about a tenth of kubetx's instructions per transaction
/// went to `malloc`/`free` (BENCHMARKS.md, issue 15). Built without transparent huge pages
/// (`no_thp`), which would round the idle heap up to 2 MiB pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match kubetx::cli::run(kubetx::cli::Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kubetx: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

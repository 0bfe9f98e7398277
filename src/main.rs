//! The `kubetx` binary: parses the command line and hands over to the library.

use clap::Parser;

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

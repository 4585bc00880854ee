//! `peerlink-sim`: the reference client's command line — account, chat, inbox, contacts,
//! TURN check, a local fleet launcher and the end-to-end `demo`. Behaviour lives in the
//! library (`peerlink_sim::{signal_client, fleet, demo}`); this is parsing and printing.

mod cli;

use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PEERLINK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = cli::Cli::parse();
    match cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peerlink-sim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! `peerlink-sim`: the reference client's command line — account, chat, inbox, contacts,
//! TURN check, a local fleet launcher and the end-to-end `demo`. Behaviour lives in the
//! library (`peerlink_sim::{fleet, demo}`, `peerlink_api::signaling_client`); this is parsing and printing.

mod cli;

use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    if let Err(e) = peerlink_cli::log::init(
        &args.log.filter("PEERLINK_LOG", "warn"),
        args.log.log_format.unwrap_or_default(),
    ) {
        eprintln!("peerlink-sim: {e}");
        return std::process::ExitCode::from(2);
    }
    match cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peerlink-sim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

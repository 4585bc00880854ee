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
    // SIGINT or SIGTERM ends any command by dropping it: a local fleet's drop kills its
    // children and removes its directory (children of a launcher killed outright get SIGTERM
    // from the kernel, see `peerlink_cli::process`).
    tokio::select! {
        r = cli::run(args) => match r {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("peerlink-sim: {e:#}");
                let (code, hint) = cli::failure(&e);
                if let Some(h) = hint {
                    eprintln!("peerlink-sim: hint: {h}");
                }
                std::process::ExitCode::from(code)
            }
        },
        signal = terminated() => std::process::ExitCode::from(128 + signal),
    }
}

/// The first SIGINT or SIGTERM, as its number (pending forever if neither can be watched).
async fn terminated() -> u8 {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => 2,
            _ = term.recv() => 15,
        },
        _ => std::future::pending().await,
    }
}

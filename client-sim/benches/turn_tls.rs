//! MOS of a call whose caller can reach the relay only over TURN/TLS, against the same call
//! over TURN/UDP in the same run (`docs/BENCHMARKS.md`, "TURN over TLS"), in a netlab lab
//! with the real services.
//!
//! A plain program (`harness = false`), needs root (network namespaces):
//! `cargo bench -p peerlink-sim --bench turn_tls [-- --rounds 3 --seconds 8]` (release client
//! and services; `--profile dev` runs the debug ones).
//! For each loss rate (0 % and 1 %, an nftables drop on the caller's router in both
//! directions, NETLAB.md) it runs rounds of two calls to the same callee (behind a clean
//! port-restricted NAT), alternating, the first round discarded:
//! - baseline: the caller behind a port-restricted NAT that passes UDP, `--relay-only`, so the
//!   media goes through its TURN allocation over UDP;
//! - TLS: the caller behind a router that lets only TCP to 443 (and to signaling's 8443) out,
//!   so the ladder ends on TURN/TLS on 443 and the media rides that TLS connection, where a
//!   lost segment stalls everything behind it until TCP retransmits.
//!
//! It prints each side's E-model MOS (what that side heard: the caller hears the callee's
//! media through the lossy link, the callee the caller's), frames concealed, and the ratio of
//! TLS to UDP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/lab/mod.rs"]
mod lab;

use std::time::Duration;

use lab::{Client, World, run_call};
use peerlink_netlab::{Egress, LinkConditions, NatKind};
use serde_json::Value;

struct Args {
    rounds: usize,
    seconds: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        rounds: 3,
        seconds: 8,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = argv.get(i + 1).cloned().unwrap_or_default();
        let used = match argv[i].as_str() {
            "--rounds" => val.parse().map(|v| a.rounds = v).is_ok(),
            "--seconds" => val.parse().map(|v| a.seconds = v).is_ok(),
            _ => false, // e.g. `--bench` passed by cargo
        };
        i += if used { 2 } else { 1 };
    }
    a
}

/// One call's figures: (caller MOS, callee MOS, frames concealed on both sides).
fn figures(caller: &Value, callee: &Value) -> (f64, f64, u64) {
    let mos = |r: &Value| r["media"]["mos"].as_f64().unwrap_or(f64::NAN);
    let conc = |r: &Value| r["media"]["concealed"].as_u64().unwrap_or(0);
    (mos(caller), mos(callee), conc(caller) + conc(callee))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// One call from `caller` to `callee`; its figures, or why it does not count.
fn one(
    caller: &Client,
    callee: &Client,
    secs: u64,
    extra: &[&str],
    transport: &str,
) -> Result<(f64, f64, u64), String> {
    let out = run_call(caller, callee, Duration::from_secs(secs), extra)?;
    if out.caller["transport"] != transport || out.caller["path"] != "relay" {
        return Err(format!(
            "caller on {} {} (wanted relay over {transport}): {}",
            out.caller["path"], out.caller["transport"], out.caller
        ));
    }
    Ok(figures(&out.caller, &out.callee))
}

fn main() {
    let args = parse_args();
    if !peerlink_netlab::root_or_skip("turn_tls bench") {
        return;
    }
    let world = World::start();
    let callee_router = world.router(NatKind::PortRestricted);
    let callee = world.client(&callee_router, "callee", "bench-callee");
    let mut table = String::new();
    for loss in [0u8, 1] {
        let udp_router = world
            .lab
            .add_nat_with(
                NatKind::PortRestricted,
                LinkConditions {
                    loss_percent: loss,
                    seed: 7,
                    ..Default::default()
                },
            )
            .expect("router");
        let tls_router = world
            .lab
            .add_nat_with(
                NatKind::PortRestricted,
                LinkConditions {
                    loss_percent: loss,
                    seed: 7,
                    egress: Egress::TcpPorts(&[lab::TLS_PORT, 8443]),
                    ..Default::default()
                },
            )
            .expect("router");
        let udp_caller = world.client(&udp_router, &format!("u{loss}"), &format!("udp-{loss}"));
        let tls_caller = world.client(&tls_router, &format!("t{loss}"), &format!("tls-{loss}"));
        let (mut udp, mut tls) = (Vec::new(), Vec::new());
        for round in 0..=args.rounds {
            let a = one(&udp_caller, &callee, args.seconds, &["--relay-only"], "udp");
            let b = one(&tls_caller, &callee, args.seconds, &[], "tls");
            match (a, b) {
                (Ok(a), Ok(b)) if round > 0 => {
                    udp.push(a);
                    tls.push(b);
                }
                (Ok(_), Ok(_)) => {} // the first round warms up and is discarded
                (a, b) => {
                    for e in [a.err(), b.err()].into_iter().flatten() {
                        eprintln!("loss {loss} %, round {round}: {e}");
                    }
                }
            }
        }
        let col = |v: &[(f64, f64, u64)], f: fn(&(f64, f64, u64)) -> f64| {
            mean(&v.iter().map(f).collect::<Vec<_>>())
        };
        let (uc, ue, un) = (
            col(&udp, |x| x.0),
            col(&udp, |x| x.1),
            col(&udp, |x| x.2 as f64),
        );
        let (tc, te, tn) = (
            col(&tls, |x| x.0),
            col(&tls, |x| x.1),
            col(&tls, |x| x.2 as f64),
        );
        table.push_str(&format!(
            "{loss:>4} %  {:>5}  UDP  caller {uc:.2}  callee {ue:.2}  concealed {un:>6.1}\n\
             {:>7}  {:>5}  TLS  caller {tc:.2}  callee {te:.2}  concealed {tn:>6.1}   \
             TLS/UDP MOS: caller {:.3}, callee {:.3}\n",
            udp.len(),
            "",
            tls.len(),
            tc / uc,
            te / ue,
        ));
    }
    println!(
        "\nTURN/TLS vs TURN/UDP, {} s calls, {} counted round(s) per loss rate (first discarded)\n\
         loss    calls  relay  MOS (what each side heard)     frames concealed per call\n{table}",
        args.seconds, args.rounds
    );
}

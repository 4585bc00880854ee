//! `peerlink-sim demo`: end-to-end work through a real fleet, with a report.
//!
//! It starts a local fleet on loopback ([`crate::fleet`]) or uses a running signaling node,
//! then: registers and logs in two fresh users; opens a WebSocket session for each; presence
//! (alice adds bob as a contact and sees him online, then away); a chat message delivered live,
//! durably acknowledged and acked by the recipient; a second message sent while bob is offline
//! and delivered when he reconnects with `resume_from`; a call from alice to bob over real UDP
//! sockets (invite/accept and trickled candidates through signaling, the connectivity agent's
//! checks, Opus/AES-GCM media on the selected path, both sides recorded to WAV);
//! the same call again with relay-only candidates, so its media goes through the TURN relay; a
//! file session: a generated 1 MiB file from alice to bob over QUIC on the session's path,
//! BLAKE3-verified and compared byte for byte; TURN credentials from signaling and a real TURN
//! allocation for each user on the relay (over real UDP sockets); a channel between the two
//! allocations; a full-duplex Opus/AES-GCM media exchange through the relay with 20 ms
//! pacing, recorded to WAV and scored (loss, jitter, RTT, MOS, spectral distance); finally the
//! relay's own latency percentiles from its `/stats`.
//!
//! What it does NOT do (said in the report too): NAT traversal or the agent's timed relay
//! fallback (on loopback the call's direct pair always validates — the NAT lab covers those).
//! The fixed-relay media exchange exchanges its X25519 keys in-process.

pub mod turn_path;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use peerlink_api::signaling::{ClientMsg, PresenceStatus, ResumeOutcome, ServerMsg};
use rand::RngCore as _;

use crate::call::{self, CallError, CallOptions, CallReport, FileReport, SessionReport};
use crate::fleet::{Fleet, FleetError, FleetOptions, RelayStats, relay_stats};
use crate::media::{KeyExchange, MediaConfig, MediaSession, Role, SAMPLE_RATE, audio, quality};
use crate::turn::TurnConfig;
use peerlink_api::signaling_client::{HttpApi, SignalError, SignalSession, parse_turn_uri};
use turn_path::{Allocation, MediaSide, TurnEndpoint, TurnPathError};

/// Bound on any single wait of the demo.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Demo failures, each naming the step.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The local fleet did not start.
    #[error("starting the fleet: {0}")]
    Fleet(#[from] FleetError),
    /// A signaling step failed.
    #[error("{step}: {source}")]
    Signal {
        /// Step.
        step: &'static str,
        /// Cause.
        source: SignalError,
    },
    /// A TURN/media step failed.
    #[error("{step}: {source}")]
    Turn {
        /// Step.
        step: &'static str,
        /// Cause.
        source: TurnPathError,
    },
    /// The call failed.
    #[error("call: {0}")]
    Call(#[from] CallError),
    /// Something else (unexpected answer, audio I/O).
    #[error("{step}: {detail}")]
    Other {
        /// Step.
        step: &'static str,
        /// Detail.
        detail: String,
    },
}

fn sig(step: &'static str) -> impl FnOnce(SignalError) -> DemoError {
    move |source| DemoError::Signal { step, source }
}
fn turn_err(step: &'static str) -> impl FnOnce(TurnPathError) -> DemoError {
    move |source| DemoError::Turn { step, source }
}
fn other(step: &'static str, detail: impl Into<String>) -> DemoError {
    DemoError::Other {
        step,
        detail: detail.into(),
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Use this running signaling node instead of starting a fleet (`http://` or `https://`).
    pub server: Option<String>,
    /// CA certificate files (PEM) trusted for an `https://` server besides the system's roots.
    pub ca: Vec<PathBuf>,
    /// Metrics address of the relay (for `/stats`) when using a running fleet.
    pub relay_metrics: Option<SocketAddr>,
    /// TURN relay of the fixed-relay media exchange (default: the first one signaling offers).
    /// It must accept signaling's TURN credentials (share its TURN secret): with a running
    /// fleet of several relays, this picks the one to exercise.
    pub relay: Option<SocketAddr>,
    /// Where the recorded WAVs go.
    pub out_dir: PathBuf,
    /// Seconds of media in the call and through the relay (0 disables both).
    pub media_seconds: f64,
    /// Signaling's STUN responder when using a running fleet.
    pub stun: Option<SocketAddr>,
    /// Audio alice sends (48 kHz mono 16-bit WAV); default: the speech-like generator.
    pub audio: Option<PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            server: None,
            ca: Vec::new(),
            relay_metrics: None,
            relay: None,
            out_dir: PathBuf::from("."),
            media_seconds: 4.0,
            stun: None,
            audio: None,
        }
    }
}

/// One timed step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepReport {
    /// What was done.
    pub step: String,
    /// How long it took, ms.
    pub ms: f64,
    /// Result detail.
    pub detail: String,
}

/// One direction of the relayed media.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DirectionReport {
    /// Media packets sent.
    pub packets_sent: u64,
    /// Media packets received.
    pub packets_received: u64,
    /// Packets lost (receiver's count).
    pub packets_lost: i64,
    /// Frames recovered from in-band FEC.
    pub recovered_fec: u64,
    /// Frames concealed.
    pub concealed: u64,
    /// Interarrival jitter, ms.
    pub jitter_ms: f64,
    /// Round-trip time from control reports, ms.
    pub rtt_ms: Option<f64>,
    /// Session start -> first frame played from a received packet, ms.
    pub first_media_ms: Option<f64>,
    /// E-model MOS.
    pub mos: f64,
    /// RMS log-spectral distance of what was heard vs what was sent, dB (lower is better).
    pub lsd_rms_db: f64,
    /// WAV of what the receiver heard.
    pub recording: String,
}

/// The relayed media exchange.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MediaReport {
    /// Seconds of audio each side sent.
    pub seconds: f64,
    /// alice -> bob.
    pub alice_to_bob: DirectionReport,
    /// bob -> alice.
    pub bob_to_alice: DirectionReport,
}

/// Everything the demo did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoReport {
    /// "local" (started here) or "running".
    pub fleet: String,
    /// Signaling URL.
    pub signaling: String,
    /// The relay's TURN address, if any.
    pub relay: Option<String>,
    /// The two users.
    pub users: [String; 2],
    /// Steps in order.
    pub steps: Vec<StepReport>,
    /// The call as the caller (alice) saw it.
    pub call: Option<CallReport>,
    /// The call as the callee (bob) saw it.
    pub call_callee: Option<CallReport>,
    /// A second call with relay-only candidates (alice's report, then bob's).
    pub call_relay_only: Option<[CallReport; 2]>,
    /// A 1 MiB file sent from alice to bob in a file session (sender's report, receiver's).
    pub file: Option<[FileReport; 2]>,
    /// Allocations (alice, bob).
    pub allocations: Vec<Allocation>,
    /// Media through the relay.
    pub media: Option<MediaReport>,
    /// Relay `/stats` after the exchange.
    pub relay_stats: Option<RelayStats>,
    /// What the demo did not do, and why.
    pub not_done: Vec<String>,
}

struct Steps {
    list: Vec<StepReport>,
    verbose: bool,
}

impl Steps {
    fn push(&mut self, step: &str, t0: Instant, detail: impl Into<String>) {
        let r = StepReport {
            step: step.to_owned(),
            ms: t0.elapsed().as_secs_f64() * 1e3,
            detail: detail.into(),
        };
        if self.verbose {
            eprintln!("  [{:>8.1} ms] {:<28} {}", r.ms, r.step, r.detail);
        }
        self.list.push(r);
    }
}

const PASSWORD: &str = "demo-password-123";

/// Run the demo. `verbose` prints each step to stderr as it completes.
pub async fn run(opts: DemoOptions, verbose: bool) -> Result<DemoReport, DemoError> {
    let mut steps = Steps {
        list: Vec::new(),
        verbose,
    };
    let t0 = Instant::now();
    let (fleet, server, relay_metrics, stun) = match &opts.server {
        Some(s) => (None, s.clone(), opts.relay_metrics, opts.stun),
        None => {
            let f = Fleet::start(FleetOptions::default()).await?;
            let s = f.signaling_url.clone();
            let m = f.relay.map(|r| r.metrics);
            steps.push(
                "start local fleet",
                t0,
                format!(
                    "directory {}, signaling {}, relay {}",
                    f.directory_url,
                    s,
                    f.relay
                        .map(|r| format!("{} (metrics {})", r.turn, r.metrics))
                        .unwrap_or_else(|| "none".into())
                ),
            );
            let stun = f.stun;
            (Some(f), s, m, stun)
        }
    };
    let mut result = run_with(&opts, &server, relay_metrics, stun, &mut steps).await;
    if let Some(mut f) = fleet {
        // A failure is often a service that died: say so instead of only "timed out".
        if let Err(e) = &result {
            let dead = f.exited();
            if !dead.is_empty() {
                result = Err(DemoError::Other {
                    step: "fleet",
                    detail: format!("{e}\n(a fleet service died: {})", dead.join("\n")),
                });
            }
        }
        f.stop().await;
    }
    let (users, relay, allocations, media, relay_stats, calls, relay_calls, file) = result?;
    let (call, call_callee) = match calls {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    Ok(DemoReport {
        fleet: if opts.server.is_some() {
            "running".into()
        } else {
            "local".into()
        },
        signaling: server,
        relay,
        users,
        steps: steps.list,
        call,
        call_callee,
        call_relay_only: relay_calls,
        file,
        allocations,
        media,
        relay_stats,
        not_done: vec![
            "NAT traversal / the agent's timed relay fallback: on loopback a direct pair always \
             validates (the NAT lab exercises those); the relay path is exercised by the \
             relay-only call and by the fixed-relay media exchange (whose X25519 keys are \
             exchanged in-process)"
                .into(),
        ],
    })
}

type RunOut = (
    [String; 2],
    Option<String>,
    Vec<Allocation>,
    Option<MediaReport>,
    Option<RelayStats>,
    Option<(CallReport, CallReport)>,
    Option<[CallReport; 2]>,
    Option<[FileReport; 2]>,
);

async fn run_with(
    opts: &DemoOptions,
    server: &str,
    relay_metrics: Option<SocketAddr>,
    stun: Option<SocketAddr>,
    steps: &mut Steps,
) -> Result<RunOut, DemoError> {
    let trust = peerlink_api::tls::Trust::with_ca_files(&opts.ca)
        .map_err(|e| sig("server URL")(e.into()))?;
    let api = HttpApi::with_trust(server, STEP_TIMEOUT, &trust).map_err(sig("server URL"))?;
    let mut tag = [0u8; 3];
    rand::rng().fill_bytes(&mut tag);
    let tag = hex::encode(tag);
    let (alice_name, bob_name) = (format!("alice-{tag}"), format!("bob-{tag}"));

    // Accounts.
    let t = Instant::now();
    api.register(&alice_name, PASSWORD)
        .await
        .map_err(sig("register alice"))?;
    api.register(&bob_name, PASSWORD)
        .await
        .map_err(sig("register bob"))?;
    steps.push(
        "register",
        t,
        format!("{alice_name}, {bob_name} (Argon2id)"),
    );
    let t = Instant::now();
    let alice_tokens = api
        .login(&alice_name, PASSWORD)
        .await
        .map_err(sig("login alice"))?;
    let bob_tokens = api
        .login(&bob_name, PASSWORD)
        .await
        .map_err(sig("login bob"))?;
    steps.push("login", t, "access + refresh tokens for both");

    // Sessions.
    let t = Instant::now();
    let mut alice = SignalSession::connect(api.clone(), alice_tokens, "demo-alice", None)
        .await
        .map_err(sig("alice connects /v1/ws"))?;
    let mut bob = SignalSession::connect(api.clone(), bob_tokens, "demo-bob", None)
        .await
        .map_err(sig("bob connects /v1/ws"))?;
    steps.push(
        "WebSocket sessions",
        t,
        format!("both welcomed by node {}", alice.welcome().node),
    );

    // Presence.
    let t = Instant::now();
    alice
        .send(&ClientMsg::AddContact {
            username: bob_name.clone(),
        })
        .await
        .map_err(sig("add contact"))?;
    let bn = bob_name.clone();
    let m = alice
        .wait_for(STEP_TIMEOUT, "contacts", None, |m| {
            matches!(m, ServerMsg::Contacts { contacts } if contacts.iter().any(|c| c.username == bn))
        })
        .await
        .map_err(sig("contact list"))?;
    let status = match m {
        ServerMsg::Contacts { contacts } => contacts
            .into_iter()
            .find(|c| c.username == bob_name)
            .map(|c| c.status),
        _ => None,
    };
    if status != Some(PresenceStatus::Online) {
        return Err(other(
            "presence",
            format!("bob shows as {status:?}, expected online"),
        ));
    }
    bob.send(&ClientMsg::SetPresence {
        status: PresenceStatus::Away,
    })
    .await
    .map_err(sig("bob sets away"))?;
    let bn = bob_name.clone();
    alice
        .wait_for(STEP_TIMEOUT, "presence away", None, |m| {
            matches!(m, ServerMsg::Presence { user, status: PresenceStatus::Away } if *user == bn)
        })
        .await
        .map_err(sig("presence away"))?;
    bob.send(&ClientMsg::SetPresence {
        status: PresenceStatus::Online,
    })
    .await
    .map_err(sig("bob sets online"))?;
    steps.push(
        "presence",
        t,
        "alice added bob: online in her contact list; bob went away -> alice got the presence event",
    );

    // Live chat.
    let t = Instant::now();
    let (id, stored_at) = alice
        .send_message(&bob_name, "hello bob, this is alice", STEP_TIMEOUT)
        .await
        .map_err(sig("send chat"))?;
    let want = id.clone();
    let m = bob
        .wait_for(
            STEP_TIMEOUT,
            "chat message",
            None,
            |m| matches!(m, ServerMsg::Message { id, .. } if *id == want),
        )
        .await
        .map_err(sig("receive chat"))?;
    let ServerMsg::Message { seq, body, .. } = m else {
        return Err(other("receive chat", "not a message"));
    };
    bob.ack(seq).await.map_err(sig("ack chat"))?;
    steps.push(
        "chat (live)",
        t,
        format!("durable ack at {stored_at} ms; bob got seq {seq} {body:?} and acked it"),
    );

    // Offline message + resume.
    let t = Instant::now();
    let bob_tokens = bob.tokens().clone();
    let bob_acked = bob.acked_seq();
    bob.close().await;
    let bn = bob_name.clone();
    alice
        .wait_for(STEP_TIMEOUT, "presence offline", None, |m| {
            matches!(m, ServerMsg::Presence { user, status: PresenceStatus::Offline } if *user == bn)
        })
        .await
        .map_err(sig("bob offline"))?;
    let (id2, _) = alice
        .send_message(&bob_name, "sent while you were offline", STEP_TIMEOUT)
        .await
        .map_err(sig("send offline chat"))?;
    let mut bob = SignalSession::connect(api.clone(), bob_tokens, "demo-bob", Some(bob_acked))
        .await
        .map_err(sig("bob reconnects"))?;
    let resume = bob.welcome().resume;
    let want = id2.clone();
    let m = bob
        .wait_for(
            STEP_TIMEOUT,
            "offline message",
            None,
            |m| matches!(m, ServerMsg::Message { id, .. } if *id == want),
        )
        .await
        .map_err(sig("offline message replay"))?;
    let ServerMsg::Message { seq: seq2, .. } = m else {
        return Err(other("offline message", "not a message"));
    };
    bob.ack(seq2).await.map_err(sig("ack offline chat"))?;
    if resume != ResumeOutcome::Resumed {
        return Err(other("resume", format!("server answered {resume:?}")));
    }
    steps.push(
        "chat (offline + resume)",
        t,
        format!(
            "bob offline; stored; reconnect resume_from={bob_acked} -> resumed, got seq {seq2}"
        ),
    );

    // A call over real UDP sockets, then the same call with relay-only candidates: media
    // through the TURN relay.
    let (calls, relay_calls) = if opts.media_seconds > 0.0 {
        std::fs::create_dir_all(&opts.out_dir)
            .map_err(|e| other("output dir", format!("{}: {e}", opts.out_dir.display())))?;
        let [ra, rb] = demo_call(&mut alice, &mut bob, &bob_name, opts, stun, false, steps).await?;
        let relay = demo_call(&mut alice, &mut bob, &bob_name, opts, stun, true, steps).await?;
        (Some((ra, rb)), Some(relay))
    } else {
        (None, None)
    };

    // A file session: 1 MiB from alice to bob over QUIC on the session's path.
    let file = Some(demo_file(&mut alice, &mut bob, &bob_name, stun, steps).await?);

    // TURN.
    let t = Instant::now();
    let ca = alice
        .turn_credentials()
        .await
        .map_err(sig("alice TURN credentials"))?;
    let cb = bob
        .turn_credentials()
        .await
        .map_err(sig("bob TURN credentials"))?;
    let Some(relay) = opts
        .relay
        .or_else(|| ca.uris.iter().find_map(|u| parse_turn_uri(u)))
    else {
        return Err(other(
            "TURN credentials",
            format!("no usable relay URI in {:?}", ca.uris),
        ));
    };
    steps.push(
        "TURN credentials",
        t,
        format!(
            "{} (ttl {} s) relays {:?}; media through {relay}",
            ca.username, ca.ttl, ca.uris
        ),
    );
    let t = Instant::now();
    let mut seed = [0u8; 8];
    rand::rng().fill_bytes(&mut seed);
    let seed = u64::from_le_bytes(seed);
    let mut ea =
        TurnEndpoint::bind(TurnConfig::new(relay, ca.username, ca.password).with_seed(seed))
            .await
            .map_err(turn_err("alice TURN socket"))?;
    let mut eb = TurnEndpoint::bind(
        TurnConfig::new(relay, cb.username, cb.password).with_seed(seed ^ 0x5a5a),
    )
    .await
    .map_err(turn_err("bob TURN socket"))?;
    let aa = ea
        .allocate(STEP_TIMEOUT)
        .await
        .map_err(turn_err("alice Allocate"))?;
    let ab = eb
        .allocate(STEP_TIMEOUT)
        .await
        .map_err(turn_err("bob Allocate"))?;
    steps.push(
        "TURN allocations",
        t,
        format!(
            "alice {} -> relayed {} ({:.1} ms); bob {} -> relayed {} ({:.1} ms)",
            aa.local, aa.relayed, aa.took_ms, ab.local, ab.relayed, ab.took_ms
        ),
    );
    let t = Instant::now();
    let cha = ea
        .open_channel(ab.relayed, STEP_TIMEOUT)
        .await
        .map_err(turn_err("alice permission + channel"))?;
    let chb = eb
        .open_channel(aa.relayed, STEP_TIMEOUT)
        .await
        .map_err(turn_err("bob permission + channel"))?;
    steps.push(
        "permissions + channels",
        t,
        format!(
            "alice channel 0x{cha:04x} -> {}, bob channel 0x{chb:04x} -> {}",
            ab.relayed, aa.relayed
        ),
    );

    // Media through the relay.
    let media = if opts.media_seconds > 0.0 {
        let t = Instant::now();
        let r = media_over_relay(opts, &mut ea, &mut eb, &aa, &ab, &alice_name, &bob_name).await?;
        steps.push(
            "media through relay",
            t,
            format!(
                "{:.1} s each way; alice->bob MOS {:.2}, bob->alice MOS {:.2}",
                r.seconds, r.alice_to_bob.mos, r.bob_to_alice.mos
            ),
        );
        Some(r)
    } else {
        None
    };

    let t = Instant::now();
    ea.deallocate(STEP_TIMEOUT)
        .await
        .map_err(turn_err("alice deallocate"))?;
    eb.deallocate(STEP_TIMEOUT)
        .await
        .map_err(turn_err("bob deallocate"))?;
    steps.push("deallocate", t, "both allocations released");

    let stats = match relay_metrics {
        Some(m) => {
            let t = Instant::now();
            // The relay merges worker metrics once a second: poll (bounded) until the
            // packets we relayed are counted.
            let want = media
                .as_ref()
                .map(|r| r.alice_to_bob.packets_sent + r.bob_to_alice.packets_sent)
                .unwrap_or(0);
            let deadline = Instant::now() + Duration::from_secs(4);
            let mut fetched = relay_stats(m, STEP_TIMEOUT).await;
            while let Ok(s) = &fetched {
                if s.latency_total_us.count >= want || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                fetched = relay_stats(m, STEP_TIMEOUT).await;
            }
            match fetched {
                Ok(s) => {
                    steps.push(
                        "relay /stats",
                        t,
                        format!(
                            "in-relay latency p50 {} µs p99 {} µs over {} packets",
                            s.latency_total_us.p50,
                            s.latency_total_us.p99,
                            s.latency_total_us.count
                        ),
                    );
                    Some(s)
                }
                Err(e) => {
                    steps.push("relay /stats", t, format!("unavailable: {e}"));
                    None
                }
            }
        }
        None => None,
    };
    alice.close().await;
    bob.close().await;
    Ok((
        [alice_name, bob_name],
        Some(relay.to_string()),
        vec![aa, ab],
        media,
        stats,
        calls,
        relay_calls,
        file,
    ))
}

/// One demo call alice -> bob over real UDP sockets (`relay_only`: only relayed candidates are
/// signalled, so media goes through the TURN relay); records what each side heard.
async fn demo_call(
    alice: &mut SignalSession,
    bob: &mut SignalSession,
    bob_name: &str,
    opts: &DemoOptions,
    stun: Option<SocketAddr>,
    relay_only: bool,
    steps: &mut Steps,
) -> Result<[CallReport; 2], DemoError> {
    let (prefix, step) = if relay_only {
        ("relay-call", "call alice -> bob (relay-only)")
    } else {
        ("call", "call alice -> bob")
    };
    let t = Instant::now();
    let base = CallOptions {
        stun,
        relay_only,
        duration: Duration::from_secs_f64(opts.media_seconds.clamp(0.5, 600.0)),
        audio: opts.audio.clone(),
        ..CallOptions::default()
    };
    let oa = CallOptions {
        record: Some(opts.out_dir.join(format!("{prefix}-heard-by-alice.wav"))),
        ..base.clone()
    };
    let ob = CallOptions {
        record: Some(opts.out_dir.join(format!("{prefix}-heard-by-bob.wav"))),
        audio: None,
        ..base
    };
    let (ra, rb) = tokio::join!(
        call::call(alice, bob_name, &oa),
        call::answer_next(bob, STEP_TIMEOUT, Duration::from_secs(600), &ob)
    );
    let (ra, rb) = (ra?, rb?);
    steps.push(
        step,
        t,
        format!(
            "path {} ({} -> {}), answer->first media {:.1} ms, MOS {:.2}/{:.2}",
            ra.path.as_deref().unwrap_or("none"),
            ra.local.as_deref().unwrap_or("?"),
            ra.remote.as_deref().unwrap_or("?"),
            ra.answer_to_first_media_ms.unwrap_or(f64::NAN),
            ra.media.mos,
            rb.media.mos
        ),
    );
    Ok([ra, rb])
}

/// Alice sends bob a generated 1 MiB file in a file session; the copy must be identical.
async fn demo_file(
    alice: &mut SignalSession,
    bob: &mut SignalSession,
    bob_name: &str,
    stun: Option<SocketAddr>,
    steps: &mut Steps,
) -> Result<[FileReport; 2], DemoError> {
    let t = Instant::now();
    let dir = tempfile::tempdir().map_err(|e| other("file session temp dir", e.to_string()))?;
    let src = dir.path().join("demo-1MiB.bin");
    let save = dir.path().join("received");
    std::fs::create_dir_all(&save).map_err(|e| other("file session save dir", e.to_string()))?;
    let mut data = vec![0u8; 1 << 20];
    rand::rng().fill_bytes(&mut data);
    std::fs::write(&src, &data).map_err(|e| other("file session source", e.to_string()))?;
    let oa = CallOptions {
        stun,
        duration: STEP_TIMEOUT,
        ..CallOptions::default()
    };
    let ob = CallOptions {
        save_dir: Some(save.clone()),
        ..oa.clone()
    };
    let (ra, rb) = tokio::join!(
        call::send_file(alice, bob_name, &src, &oa),
        call::answer_session(bob, STEP_TIMEOUT, STEP_TIMEOUT, &ob)
    );
    let ra = ra?;
    let rb = match rb? {
        SessionReport::File(f) => f,
        other => {
            return Err(self::other(
                "file session",
                format!("bob's side was not a file session: {other:?}"),
            ));
        }
    };
    let got = std::fs::read(&rb.file).map_err(|e| other("file session result", e.to_string()))?;
    if got != data {
        return Err(other(
            "file session",
            "the received file differs from the sent one",
        ));
    }
    steps.push(
        "file alice -> bob",
        t,
        format!(
            "{} bytes over {} path in {:.0} ms ({:.1} Mbit/s), BLAKE3 {}… verified, identical",
            rb.size,
            ra.path.as_deref().unwrap_or("?"),
            ra.duration_s * 1e3,
            ra.throughput_bps / 1e6,
            &rb.blake3[..16.min(rb.blake3.len())]
        ),
    );
    Ok([ra, rb])
}

#[allow(clippy::too_many_arguments)]
async fn media_over_relay(
    opts: &DemoOptions,
    ea: &mut TurnEndpoint,
    eb: &mut TurnEndpoint,
    aa: &Allocation,
    ab: &Allocation,
    alice_name: &str,
    bob_name: &str,
) -> Result<MediaReport, DemoError> {
    let seconds = opts.media_seconds.clamp(0.5, 600.0);
    let input_a = match &opts.audio {
        Some(p) => audio::read_wav(p).map_err(|e| other("reading --audio", e.to_string()))?,
        None => audio::speech_like(seconds, 1),
    };
    let seconds = if opts.audio.is_some() {
        (input_a.len() as f64 / f64::from(SAMPLE_RATE)).min(seconds)
    } else {
        seconds
    };
    let input_b = audio::speech_like(seconds, 2);
    let frames = (seconds * 50.0).round() as usize;

    let mut rng = rand::rng();
    let ka = KeyExchange::generate(&mut rng);
    let kb = KeyExchange::generate(&mut rng);
    let context = format!("peerlink-demo:{alice_name}:{bob_name}");
    let keys_a = ka
        .derive(&kb.public_key(), Role::Caller, context.as_bytes())
        .map_err(|e| other("media keys", e.to_string()))?;
    let keys_b = kb
        .derive(&ka.public_key(), Role::Callee, context.as_bytes())
        .map_err(|e| other("media keys", e.to_string()))?;
    let cfg = MediaConfig::default();
    let now = Instant::now();
    let sa = MediaSession::new(&cfg, keys_a, now, &mut rng)
        .map_err(|e| other("media session", e.to_string()))?;
    let sb = MediaSession::new(&cfg, keys_b, now, &mut rng)
        .map_err(|e| other("media session", e.to_string()))?;
    let mut a = MediaSide {
        endpoint: ea,
        session: sa,
        peer: ab.relayed,
        input: &input_a,
        heard: Vec::new(),
        sent_packets: 0,
    };
    let mut b = MediaSide {
        endpoint: eb,
        session: sb,
        peer: aa.relayed,
        input: &input_b,
        heard: Vec::new(),
        sent_packets: 0,
    };
    turn_path::exchange_media(&mut a, &mut b, frames, Duration::from_secs(2))
        .await
        .map_err(turn_err("media exchange"))?;

    std::fs::create_dir_all(&opts.out_dir)
        .map_err(|e| other("output dir", format!("{}: {e}", opts.out_dir.display())))?;
    let wav_b = opts.out_dir.join("demo-heard-by-bob.wav");
    let wav_a = opts.out_dir.join("demo-heard-by-alice.wav");
    audio::write_wav(&wav_b, &b.heard).map_err(|e| other("writing WAV", e.to_string()))?;
    audio::write_wav(&wav_a, &a.heard).map_err(|e| other("writing WAV", e.to_string()))?;
    let max_lag = SAMPLE_RATE as usize / 2;
    let sent_a = &input_a[..input_a.len().min(frames * crate::media::FRAME_SAMPLES)];
    let q_ab = quality::compare_tracking(sent_a, &b.heard, max_lag);
    let q_ba = quality::compare_tracking(&input_b, &a.heard, max_lag);
    let dir = |sender: &MediaSide<'_>, receiver: &MediaSide<'_>, lsd: f64, wav: &PathBuf| {
        let s = receiver.session.stats();
        DirectionReport {
            packets_sent: sender.sent_packets,
            packets_received: s.packets_received,
            packets_lost: s.packets_lost,
            recovered_fec: s.recovered_fec,
            concealed: s.concealed,
            jitter_ms: s.jitter.as_secs_f64() * 1e3,
            rtt_ms: s.rtt.map(|d| d.as_secs_f64() * 1e3),
            first_media_ms: s.time_to_first_media.map(|d| d.as_secs_f64() * 1e3),
            mos: s.mos,
            lsd_rms_db: lsd,
            recording: wav.display().to_string(),
        }
    };
    Ok(MediaReport {
        seconds,
        alice_to_bob: dir(&a, &b, q_ab.score(), &wav_b),
        bob_to_alice: dir(&b, &a, q_ba.score(), &wav_a),
    })
}

fn indent(t: &str) -> String {
    t.lines().map(|l| format!("  {l}\n")).collect()
}

/// Human-readable file session report.
pub fn render_file(r: &FileReport) -> String {
    format!(
        "file {:?} ({} bytes) {} {} ({}): path {}, {} bytes in {:.2} s = {:.1} Mbit/s{}, RTT {:.1} ms, lost {}\n\
         BLAKE3 {} verified; file {}\n\
         restarts {}, path changes {}; ended: {}",
        r.name,
        r.size,
        if r.role == "sender" { "to" } else { "from" },
        r.peer,
        r.role,
        r.path.as_deref().unwrap_or("none"),
        r.bytes,
        r.duration_s,
        r.throughput_bps / 1e6,
        if r.resumed {
            format!(" (resumed from {})", r.resumed_from)
        } else {
            String::new()
        },
        r.rtt_ms,
        r.lost_packets,
        r.blake3,
        r.file,
        r.restarts,
        r.path_changes,
        r.ended
    )
}

/// Human-readable call report.
pub fn render_call(r: &CallReport) -> String {
    let f = |v: Option<f64>| {
        v.map(|x| format!("{x:.1} ms"))
            .unwrap_or_else(|| "n/a".into())
    };
    let m = &r.media;
    format!(
        "call {} with {} ({}): path {} {} {} -> {} (changes {})\n\
         setup: invite->answer {}, answer->connected {}, answer->first media {} (agent: {} checks, checks->connected {})\n\
         candidates: local {:?}, remote {}; unused relay allocations released {}\n\
         media: sent {} recv {} lost {} fec {} concealed {} | jitter {:.2} ms | RTT {} | MOS {:.2} | recorded {:.1} s{}\n\
         recovery: restarts {}, longest media gap {:.0} ms | dropped: garbage {} auth {} replay {} unknown source {}\n\
         ended: {}",
        r.call_id,
        r.peer,
        r.role,
        r.path.as_deref().unwrap_or("none"),
        r.family.as_deref().unwrap_or(""),
        r.local.as_deref().unwrap_or("?"),
        r.remote.as_deref().unwrap_or("?"),
        r.path_changes,
        f(r.invite_to_answer_ms),
        f(r.answer_to_connected_ms),
        f(r.answer_to_first_media_ms),
        r.checks_sent,
        f(r.checks_to_connected_ms),
        r.local_candidates,
        r.remote_candidates,
        r.unused_relay_released,
        m.packets_sent,
        m.packets_received,
        m.packets_lost,
        m.recovered_fec,
        m.concealed,
        m.jitter_ms,
        f(m.rtt_ms),
        m.mos,
        m.recorded_s,
        r.recording
            .as_deref()
            .map(|p| format!(" -> {p}"))
            .unwrap_or_default(),
        r.restarts,
        r.max_media_gap_ms,
        m.dropped_garbage,
        m.dropped_auth,
        m.dropped_replay,
        m.dropped_unknown_source,
        r.ended
    )
}

/// Human-readable report.
pub fn render(r: &DemoReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "peerlink-sim demo — {} fleet, signaling {}",
        r.fleet, r.signaling
    );
    let _ = writeln!(s, "users: {} and {}", r.users[0], r.users[1]);
    let _ = writeln!(s, "\nsteps (all against the real services):");
    for st in &r.steps {
        let _ = writeln!(s, "  {:<26} {:>8.1} ms  {}", st.step, st.ms, st.detail);
    }
    if let Some(c) = &r.call {
        let _ = writeln!(s, "\ncall (alice's report):\n{}", indent(&render_call(c)));
    }
    if let Some(c) = &r.call_callee {
        let _ = writeln!(s, "call (bob's report):\n{}", indent(&render_call(c)));
    }
    if let Some([a, b]) = &r.call_relay_only {
        let _ = writeln!(
            s,
            "relay-only call (alice's report):\n{}",
            indent(&render_call(a))
        );
        let _ = writeln!(
            s,
            "relay-only call (bob's report):\n{}",
            indent(&render_call(b))
        );
    }
    if let Some([a, b]) = &r.file {
        let _ = writeln!(
            s,
            "file session (alice's report):\n{}",
            indent(&render_file(a))
        );
        let _ = writeln!(
            s,
            "file session (bob's report):\n{}",
            indent(&render_file(b))
        );
    }
    if let Some(m) = &r.media {
        let _ = writeln!(
            s,
            "\nmedia through the TURN relay {} ({:.1} s each way, Opus 32 kbps + AES-GCM, 20 ms frames):",
            r.relay.as_deref().unwrap_or("?"),
            m.seconds
        );
        for (name, d) in [
            ("alice -> bob", &m.alice_to_bob),
            ("bob -> alice", &m.bob_to_alice),
        ] {
            let _ = writeln!(
                s,
                "  {name}: sent {} recv {} lost {} fec {} concealed {} | jitter {:.2} ms | RTT {} | first media {} | MOS {:.2} | LSD {:.2} dB",
                d.packets_sent,
                d.packets_received,
                d.packets_lost,
                d.recovered_fec,
                d.concealed,
                d.jitter_ms,
                d.rtt_ms
                    .map(|v| format!("{v:.2} ms"))
                    .unwrap_or_else(|| "n/a".into()),
                d.first_media_ms
                    .map(|v| format!("{v:.0} ms"))
                    .unwrap_or_else(|| "n/a".into()),
                d.mos,
                d.lsd_rms_db
            );
            let _ = writeln!(s, "    recording: {}", d.recording);
        }
    }
    if let Some(st) = &r.relay_stats {
        let l = &st.latency_total_us;
        let c = |k: &str| st.counters.get(k).copied().unwrap_or(0);
        let _ = writeln!(
            s,
            "\nrelay /stats ({} backend): in-relay latency over {} packets p50 {} µs, p90 {} µs, p99 {} µs, max {} µs",
            st.io, l.count, l.p50, l.p90, l.p99, l.max
        );
        let _ = writeln!(
            s,
            "  forwarded {} packets, allocations created {} (active at the last metrics merge: {})",
            st.counters
                .iter()
                .filter(|(k, _)| k.starts_with("forwarded_packets_"))
                .map(|(_, v)| *v)
                .sum::<u64>(),
            c("allocations_created"),
            st.allocations_active
        );
    }
    let _ = writeln!(s, "\nnot done in this demo:");
    for n in &r.not_done {
        let _ = writeln!(s, "  - {n}");
    }
    s
}

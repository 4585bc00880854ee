//! End-to-end file transfer over QUIC on in-memory and emulated datagram paths.
//!
//! Run: `cargo nextest run -p peerlink-sim --test transfer_e2e`
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use peerlink_sim::transfer::link::LinkConfig;
use peerlink_sim::transfer::path::{VIRTUAL_CLIENT_ADDR, VIRTUAL_SERVER_ADDR};
use peerlink_sim::transfer::protocol::{
    HashHex, Message, Offer, PROTOCOL_VERSION, PartialState, encode_message,
};
use peerlink_sim::transfer::session::partial_paths;
use peerlink_sim::transfer::{
    DatagramPath, EndpointError, EndpointOptions, MAX_QUIC_UDP_PAYLOAD, PeerConnection, Progress,
    TransferError, TransferIdentity, TransferOptions, TransferRole, emulated_pair, endpoint,
    receive_file_with, send_file_with,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TEST_LIMIT: Duration = Duration::from_secs(90);

fn options() -> EndpointOptions {
    EndpointOptions {
        idle_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(20),
        ..EndpointOptions::default()
    }
}

fn transfer_options() -> TransferOptions {
    TransferOptions {
        step_timeout: Duration::from_secs(20),
    }
}

fn make_file(dir: &Path, name: &str, size: usize, seed: u64) -> PathBuf {
    let mut data = vec![0u8; size];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut data);
    let p = dir.join(name);
    std::fs::write(&p, &data).unwrap();
    p
}

fn hash_of(p: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(p).unwrap())
}

async fn connect(client: DatagramPath, server: DatagramPath) -> (PeerConnection, PeerConnection) {
    let ci = TransferIdentity::generate().unwrap();
    let si = TransferIdentity::generate().unwrap();
    let opts = options();
    let (c, s) = tokio::join!(
        endpoint(client, &ci, si.fingerprint(), TransferRole::Client, &opts),
        endpoint(server, &si, ci.fingerprint(), TransferRole::Server, &opts),
    );
    (c.unwrap(), s.unwrap())
}

/// Sends `src` from the client to `dst_dir` on the server; returns (sender, receiver) results.
async fn run_transfer(
    c: &PeerConnection,
    s: &PeerConnection,
    src: &Path,
    dst_dir: &Path,
    on_receive_progress: impl FnMut(&Progress) + Send,
) -> (
    Result<peerlink_sim::transfer::TransferReport, TransferError>,
    Result<peerlink_sim::transfer::TransferReport, TransferError>,
) {
    let topts = transfer_options();
    tokio::join!(
        send_file_with(&c.connection, src, |_: &Progress| {}, &topts),
        receive_file_with(&s.connection, dst_dir, on_receive_progress, &topts),
    )
}

async fn clean_transfer(size: usize) {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let src = make_file(src_dir.path(), "clean.bin", size, 1);
    let (cp, sp) = DatagramPath::pair();
    let (c, s) = connect(cp, sp).await;
    let mut events = 0u32;
    let mut last_done = 0;
    let (sent, recvd) = run_transfer(&c, &s, &src, dst_dir.path(), |p: &Progress| {
        events += 1;
        assert!(p.done >= last_done, "progress never goes backwards");
        last_done = p.done;
    })
    .await;
    let (sent, recvd) = (sent.unwrap(), recvd.unwrap());
    assert_eq!(recvd.path, dst_dir.path().join("clean.bin"));
    assert_eq!(hash_of(&recvd.path), hash_of(&src));
    assert_eq!(recvd.blake3, hash_of(&src).to_hex().to_string());
    assert_eq!(sent.bytes, size as u64);
    assert_eq!(recvd.bytes, size as u64);
    assert_eq!(sent.resumed_from, 0);
    let min_events = if size == 0 { 1 } else { 2 };
    assert!(
        events >= min_events,
        "a first (per data) and a final progress event"
    );
    assert_eq!(last_done, size as u64);
    // No temp file or sidecar left behind.
    let left: Vec<_> = std::fs::read_dir(dst_dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1);
    c.close().await;
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_1mib_clean_path_intact() {
    tokio::time::timeout(TEST_LIMIT, clean_transfer(1 << 20))
        .await
        .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_5mib_clean_path_intact() {
    tokio::time::timeout(TEST_LIMIT, clean_transfer(5 * (1 << 20) + 12345))
        .await
        .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_empty_file_intact() {
    tokio::time::timeout(TEST_LIMIT, clean_transfer(0))
        .await
        .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_over_20ms_rtt_1pct_loss_intact() {
    tokio::time::timeout(TEST_LIMIT, async {
        let src_dir = tempfile::tempdir().unwrap();
        let dst_dir = tempfile::tempdir().unwrap();
        let size = 3 << 20;
        let src = make_file(src_dir.path(), "lossy.bin", size, 2);
        let (cp, sp, link) = emulated_pair(
            LinkConfig::lossy(Duration::from_millis(10), 0.01, 7),
            LinkConfig::lossy(Duration::from_millis(10), 0.01, 8),
        );
        let (c, s) = connect(cp, sp).await;
        let (sent, recvd) = run_transfer(&c, &s, &src, dst_dir.path(), |_: &Progress| {}).await;
        let (sent, recvd) = (sent.unwrap(), recvd.unwrap());
        assert_eq!(hash_of(&recvd.path), hash_of(&src));
        assert_eq!(sent.bytes, size as u64);
        let fwd = link.forward_stats();
        assert!(
            fwd.dropped_loss > 0,
            "the link really lost packets: {fwd:?}"
        );
        assert!(sent.lost_packets > 0, "QUIC saw and repaired losses");
        assert!(
            sent.rtt_ms >= 19.0,
            "RTT reflects the emulated 20 ms: {}",
            sent.rtt_ms
        );
        c.close().await;
        s.close().await;
    })
    .await
    .expect("bounded");
}

/// Interrupts a transfer by cutting the link once the receiver holds ~40 %, optionally
/// corrupts the partial file, then resumes on a fresh connection.
async fn interrupt_and_resume(corrupt: bool) {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let size: u64 = 4 << 20;
    let src = make_file(src_dir.path(), "resume.bin", size as usize, 3);

    // First attempt on a 20 Mbit/s link (so the transfer takes ~2 s), cut at 40 %.
    let (cp, sp, link) = emulated_pair(
        LinkConfig::bottleneck(20_000_000, Duration::from_millis(5), 0.0, 1),
        LinkConfig::bottleneck(20_000_000, Duration::from_millis(5), 0.0, 2),
    );
    let (c, s) = connect(cp, sp).await;
    let cut = AtomicBool::new(false);
    let (sent, recvd) = run_transfer(&c, &s, &src, dst_dir.path(), |p: &Progress| {
        if p.done >= size * 2 / 5 && !cut.swap(true, Ordering::SeqCst) {
            link.set_up(false);
        }
    })
    .await;
    assert!(cut.load(Ordering::SeqCst), "the link was cut mid-transfer");
    assert!(sent.is_err(), "sender noticed the interruption");
    assert!(recvd.is_err(), "receiver noticed the interruption");
    drop((c, s, link));
    assert!(
        !dst_dir.path().join("resume.bin").exists(),
        "no final file yet"
    );

    // The partial file and its sidecar are there.
    let offer = peerlink_sim::transfer::session::build_offer(&src).unwrap();
    let (part, sidecar) = partial_paths(dst_dir.path(), &offer);
    assert!(part.exists());
    let state: PartialState = serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
    let claimed: u64 = state
        .have
        .iter()
        .flat_map(|&(a, b)| a..b)
        .map(|i| offer.span(i).1)
        .sum();
    assert!(claimed > 0 && claimed < size, "claimed {claimed}");
    assert!(
        state.have.first().is_some_and(|r| r.0 == 0),
        "chunk 0 is held"
    );
    if corrupt {
        let mut data = std::fs::read(&part).unwrap();
        data[100] ^= 0xff;
        std::fs::write(&part, &data).unwrap();
    }

    // Resume on a new connection.
    let (cp, sp) = DatagramPath::pair();
    let (c, s) = connect(cp, sp).await;
    let (sent, recvd) = run_transfer(&c, &s, &src, dst_dir.path(), |_: &Progress| {}).await;
    let (sent, recvd) = (sent.unwrap(), recvd.unwrap());
    assert_eq!(hash_of(&recvd.path), hash_of(&src), "resumed file verifies");
    let expected_resumed = if corrupt {
        claimed - offer.chunk_size
    } else {
        claimed
    };
    assert_eq!(recvd.resumed_from, expected_resumed);
    assert_eq!(sent.resumed_from, expected_resumed);
    assert_eq!(sent.bytes, size - expected_resumed, "only the rest is sent");
    assert!(sent.bytes < size);
    assert!(
        sent.udp_tx_bytes < size,
        "second connection carried less than the file: {}",
        sent.udp_tx_bytes
    );
    assert!(!part.exists() && !sidecar.exists(), "temp state cleaned up");
    c.close().await;
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_transfer_resumes_sending_only_the_rest() {
    tokio::time::timeout(TEST_LIMIT, interrupt_and_resume(false))
        .await
        .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_partial_chunk_is_detected_and_refetched() {
    tokio::time::timeout(TEST_LIMIT, interrupt_and_resume(true))
        .await
        .expect("bounded");
}

async fn handshake_with(
    client_expects_right: bool,
    server_expects_right: bool,
) -> (
    Result<PeerConnection, EndpointError>,
    Result<PeerConnection, EndpointError>,
) {
    let ci = TransferIdentity::generate().unwrap();
    let si = TransferIdentity::generate().unwrap();
    let mallory = TransferIdentity::generate().unwrap();
    let opts = EndpointOptions {
        handshake_timeout: Duration::from_secs(5),
        ..options()
    };
    let (cp, sp) = DatagramPath::pair();
    let c_exp = if client_expects_right {
        si.fingerprint()
    } else {
        mallory.fingerprint()
    };
    let s_exp = if server_expects_right {
        ci.fingerprint()
    } else {
        mallory.fingerprint()
    };
    tokio::join!(
        endpoint(cp, &ci, c_exp, TransferRole::Client, &opts),
        endpoint(sp, &si, s_exp, TransferRole::Server, &opts),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_fingerprint_fails_handshake() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (c, s) = handshake_with(false, true).await;
        assert!(matches!(c, Err(EndpointError::Handshake(_))), "{c:?}");
        assert!(s.is_err());
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_client_fingerprint_fails_handshake() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (c, s) = handshake_with(true, false).await;
        assert!(
            s.is_err(),
            "server refuses an unexpected client certificate"
        );
        // The client learns it from the server's close (or its first use of the connection).
        if let Ok(c) = c {
            let err = tokio::time::timeout(Duration::from_secs(10), c.connection.closed())
                .await
                .expect("closed promptly");
            assert!(
                matches!(
                    err,
                    quinn::ConnectionError::ConnectionClosed(_)
                        | quinn::ConnectionError::TransportError(_)
                ),
                "{err:?}"
            );
        }
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_fingerprints_handshake() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (c, s) = handshake_with(true, true).await;
        let (c, s) = (c.unwrap(), s.unwrap());
        c.close().await;
        s.close().await;
    })
    .await
    .expect("bounded");
}

fn spray_garbage(path: &DatagramPath, seed: u64, count: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let incoming = path.handle().incoming;
    for i in 0..count {
        let len = rng.random_range(0..1500);
        let mut d = vec![0u8; len];
        rng.fill_bytes(&mut d);
        if let Some(b) = d.first_mut() {
            *b = (i % 256) as u8; // every first-byte class, QUIC long and short headers included
        }
        let _ = incoming.try_push(d);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_never_panic_and_transfer_survives() {
    tokio::time::timeout(TEST_LIMIT, async {
        let src_dir = tempfile::tempdir().unwrap();
        let dst_dir = tempfile::tempdir().unwrap();
        let src = make_file(src_dir.path(), "g.bin", 1 << 20, 4);
        let (cp, sp) = DatagramPath::pair();
        // Garbage before the handshake, at both sides.
        spray_garbage(&cp, 1, 500);
        spray_garbage(&sp, 2, 500);
        let (cpath, spath) = (cp.clone(), sp.clone());
        let (c, s) = connect(cp, sp).await;
        // And during the transfer.
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let sprayer = tokio::spawn(async move {
            for round in 0..200u64 {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                spray_garbage(&cpath, 100 + round, 20);
                spray_garbage(&spath, 1000 + round, 20);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let (sent, recvd) = run_transfer(&c, &s, &src, dst_dir.path(), |_: &Progress| {}).await;
        stop.store(true, Ordering::SeqCst);
        sprayer.await.unwrap();
        assert_eq!(hash_of(&recvd.unwrap().path), hash_of(&src));
        sent.unwrap();
        c.close().await;
        s.close().await;
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_datagrams_fit_first_byte_demux_and_relay_mtu() {
    tokio::time::timeout(TEST_LIMIT, async {
        let src_dir = tempfile::tempdir().unwrap();
        let dst_dir = tempfile::tempdir().unwrap();
        let src = make_file(src_dir.path(), "d.bin", 512 * 1024, 5);
        // Two paths joined by taps that check every datagram, like the call's demux would.
        let (cp, ch) = DatagramPath::new(VIRTUAL_CLIENT_ADDR, VIRTUAL_SERVER_ADDR);
        let (sp, sh) = DatagramPath::new(VIRTUAL_SERVER_ADDR, VIRTUAL_CLIENT_ADDR);
        let bad = Arc::new(std::sync::Mutex::new(Vec::<(u8, usize)>::new()));
        let tap = |from: peerlink_sim::transfer::Pipe, to: peerlink_sim::transfer::Pipe| {
            let bad = bad.clone();
            tokio::spawn(async move {
                while let Some(d) = from.pop().await {
                    let quic_class = d
                        .first()
                        .is_some_and(|&b| (64..=127).contains(&b) || b >= 192);
                    if !quic_class || d.len() > usize::from(MAX_QUIC_UDP_PAYLOAD) {
                        bad.lock()
                            .unwrap()
                            .push((d.first().copied().unwrap_or(0), d.len()));
                    }
                    let _ = to.try_push(d);
                }
            })
        };
        let t1 = tap(ch.outgoing.clone(), sh.incoming.clone());
        let t2 = tap(sh.outgoing.clone(), ch.incoming.clone());
        let (c, s) = connect(cp, sp).await;
        let (sent, recvd) = run_transfer(&c, &s, &src, dst_dir.path(), |_: &Progress| {}).await;
        sent.unwrap();
        recvd.unwrap();
        c.close().await;
        s.close().await;
        ch.close();
        sh.close();
        let _ = tokio::join!(t1, t2);
        assert!(bad.lock().unwrap().is_empty(), "{:?}", bad.lock().unwrap());
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_offer_is_rejected_and_nothing_written() {
    tokio::time::timeout(TEST_LIMIT, async {
        let dst_dir = tempfile::tempdir().unwrap();
        let (cp, sp) = DatagramPath::pair();
        let (c, s) = connect(cp, sp).await;
        let evil = Message::Offer(Offer {
            version: PROTOCOL_VERSION,
            name: "../escape.bin".into(),
            size: 10,
            blake3: HashHex([0; 32]),
            chunk_size: 256 * 1024,
            chunk_hashes: vec![HashHex([0; 32])],
        });
        let topts = transfer_options();
        let conn = c.connection.clone();
        let attacker = async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&encode_message(&evil)).await.unwrap();
            let mut all = recv.read_to_end(1 << 16).await.unwrap();
            let body = all.split_off(4);
            peerlink_sim::transfer::protocol::decode_message(&body).unwrap()
        };
        let (answer, recvd) = tokio::join!(
            attacker,
            receive_file_with(&s.connection, dst_dir.path(), |_: &Progress| {}, &topts)
        );
        assert!(matches!(answer, Message::Reject { .. }), "{answer:?}");
        assert!(
            matches!(recvd, Err(TransferError::Protocol(_))),
            "{recvd:?}"
        );
        assert_eq!(std::fs::read_dir(dst_dir.path()).unwrap().count(), 0);
        c.close().await;
        s.close().await;
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_sender_chunk_is_detected() {
    tokio::time::timeout(TEST_LIMIT, async {
        let dst_dir = tempfile::tempdir().unwrap();
        let (cp, sp) = DatagramPath::pair();
        let (c, s) = connect(cp, sp).await;
        let data = vec![7u8; 5000];
        let lie = Message::Offer(Offer {
            version: PROTOCOL_VERSION,
            name: "lie.bin".into(),
            size: data.len() as u64,
            blake3: blake3::hash(&data).into(),
            chunk_size: 256 * 1024,
            chunk_hashes: vec![HashHex([0; 32])],
        });
        let topts = transfer_options();
        let conn = c.connection.clone();
        let liar = async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&encode_message(&lie)).await.unwrap();
            let mut prefix = [0u8; 4];
            recv.read_exact(&mut prefix).await.unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
            recv.read_exact(&mut body).await.unwrap();
            send.write_all(&data).await.unwrap();
            send.finish().unwrap();
            let mut rest = recv.read_to_end(1 << 16).await.unwrap();
            let body = rest.split_off(4);
            peerlink_sim::transfer::protocol::decode_message(&body).unwrap()
        };
        let (verdict, recvd) = tokio::join!(
            liar,
            receive_file_with(&s.connection, dst_dir.path(), |_: &Progress| {}, &topts)
        );
        assert!(
            matches!(verdict, Message::Done { ok: false, .. }),
            "{verdict:?}"
        );
        assert!(
            matches!(recvd, Err(TransferError::ChunkMismatch(0))),
            "{recvd:?}"
        );
        assert!(!dst_dir.path().join("lie.bin").exists());
        c.close().await;
        s.close().await;
    })
    .await
    .expect("bounded");
}

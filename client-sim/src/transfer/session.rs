//! `send_file` / `receive_file`: the I/O driver of the transfer protocol over one QUIC
//! connection (see [`crate::transfer::protocol`] for the flow).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::transfer::progress::{Progress, ProgressTracker};
use crate::transfer::protocol::{
    HashHex, Message, Offer, PROTOCOL_VERSION, PartialState, ProtocolError, bits_from_ranges,
    check_length, chunk_count, chunk_size_for, decode_message, encode_message, is_safe_name,
    ranges_from_bits,
};

/// Default bound on any single wait for the peer (a message, a chunk, an acknowledgement).
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Minimum interval between two sidecar saves while receiving.
const SIDECAR_SAVE_INTERVAL: Duration = Duration::from_millis(250);
/// Read size when hashing files.
const HASH_BUF: usize = 256 * 1024;

/// Tunables of a transfer. `Default`: 30 s per step.
#[derive(Debug, Clone)]
pub struct TransferOptions {
    /// Bound on each wait for the peer.
    pub step_timeout: Duration,
}

impl Default for TransferOptions {
    fn default() -> Self {
        Self {
            step_timeout: DEFAULT_STEP_TIMEOUT,
        }
    }
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Local file I/O failed.
    #[error("file I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The QUIC connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to the stream failed.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from the stream failed (includes the stream ending early).
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The stream was closed by the peer.
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The local file name cannot be offered (not a plain UTF-8 name).
    #[error("file name cannot be sent: {0}")]
    BadLocalName(PathBuf),
    /// The receiver declined or failed the transfer.
    #[error("rejected by peer: {0}")]
    Rejected(String),
    /// A received chunk does not match its announced hash.
    #[error("chunk {0} does not match its announced BLAKE3 hash")]
    ChunkMismatch(u64),
    /// The assembled file does not match the announced BLAKE3 hash.
    #[error("file does not match its announced BLAKE3 hash")]
    IntegrityMismatch,
    /// The peer did not answer within the step timeout.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// A blocking file task panicked or was cancelled.
    #[error("background file task failed")]
    Task,
}

/// Which side a report is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// This side sent the file.
    Send,
    /// This side received the file.
    Receive,
}

/// Outcome of a completed transfer (serialisable for `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct TransferReport {
    /// Which side this is.
    pub direction: Direction,
    /// File name as offered.
    pub name: String,
    /// Local path (source for the sender, final stored file for the receiver).
    pub path: PathBuf,
    /// File size.
    pub size: u64,
    /// File bytes carried on this connection.
    pub bytes: u64,
    /// Time from the offer answer to the final verdict.
    #[serde(serialize_with = "as_secs")]
    pub duration: Duration,
    /// `bytes * 8 / duration`.
    pub goodput_bps: f64,
    /// Bytes the receiver already held, verified, before this connection.
    pub resumed_from: u64,
    /// BLAKE3 of the whole file (hex), verified by the receiver.
    pub blake3: String,
    /// UDP bytes this side sent on the connection (QUIC overhead and retransmissions included).
    pub udp_tx_bytes: u64,
    /// Packets QUIC declared lost.
    pub lost_packets: u64,
    /// Smoothed round-trip time at the end, in milliseconds.
    pub rtt_ms: f64,
    /// "direct" or "relay", filled in by the call layer.
    pub path_kind: Option<String>,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

async fn timed<T, E>(
    limit: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, TransferError>
where
    TransferError: From<E>,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(TransferError::from),
        Err(_) => Err(TransferError::Timeout(what)),
    }
}

async fn write_message(
    send: &mut SendStream,
    m: &Message,
    limit: Duration,
) -> Result<(), TransferError> {
    timed(
        limit,
        "the peer to accept a message",
        send.write_all(&encode_message(m)),
    )
    .await
}

async fn read_message(
    recv: &mut RecvStream,
    limit: Duration,
    what: &'static str,
) -> Result<Message, TransferError> {
    let mut prefix = [0u8; 4];
    timed(limit, what, recv.read_exact(&mut prefix)).await?;
    let len = check_length(prefix)?;
    let mut body = vec![0u8; len];
    timed(limit, what, recv.read_exact(&mut body)).await?;
    Ok(decode_message(&body)?)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| TransferError::Task)?
}

/// Builds the offer for a local file: whole-file and per-chunk BLAKE3.
pub fn build_offer(path: &Path) -> Result<Offer, TransferError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| is_safe_name(n))
        .ok_or_else(|| TransferError::BadLocalName(path.to_path_buf()))?
        .to_string();
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let chunk_size = chunk_size_for(size);
    let mut whole = blake3::Hasher::new();
    let mut chunk_hashes = Vec::with_capacity(chunk_count(size, chunk_size) as usize);
    let mut buf = vec![0u8; HASH_BUF];
    let mut chunk = blake3::Hasher::new();
    let mut in_chunk = 0u64;
    let mut total = 0u64;
    while total < size {
        let want = (chunk_size - in_chunk)
            .min(buf.len() as u64)
            .min(size - total) as usize;
        file.read_exact(&mut buf[..want])?;
        whole.update(&buf[..want]);
        chunk.update(&buf[..want]);
        in_chunk += want as u64;
        total += want as u64;
        if in_chunk == chunk_size || total == size {
            chunk_hashes.push(HashHex::from(chunk.finalize()));
            chunk.reset();
            in_chunk = 0;
        }
    }
    Ok(Offer {
        version: PROTOCOL_VERSION,
        name,
        size,
        blake3: whole.finalize().into(),
        chunk_size,
        chunk_hashes,
    })
}

/// Sends the file at `path` to the peer on `conn` (opens one stream), sending only the chunks
/// the receiver does not already hold verified. Returns when the receiver confirmed the hash.
pub async fn send_file(
    conn: &Connection,
    path: &Path,
    progress: impl FnMut(&Progress) + Send,
) -> Result<TransferReport, TransferError> {
    send_file_with(conn, path, progress, &TransferOptions::default()).await
}

/// [`send_file`] with explicit options.
pub async fn send_file_with(
    conn: &Connection,
    path: &Path,
    mut progress: impl FnMut(&Progress) + Send,
    options: &TransferOptions,
) -> Result<TransferReport, TransferError> {
    let limit = options.step_timeout;
    let p = path.to_path_buf();
    let offer = blocking(move || build_offer(&p)).await?;
    let (mut send, mut recv) = timed(limit, "a stream", conn.open_bi()).await?;
    write_message(&mut send, &Message::Offer(offer.clone()), limit).await?;
    let have = match read_message(&mut recv, limit, "the offer answer").await? {
        Message::Resume { have } => bits_from_ranges(&have, offer.chunks())?,
        Message::Reject { reason } => return Err(TransferError::Rejected(reason)),
        _ => return Err(ProtocolError::Unexpected("resume or reject").into()),
    };
    let resumed_from: u64 = (0..offer.chunks())
        .filter(|&i| have[i as usize])
        .map(|i| offer.span(i).1)
        .sum();
    let start = Instant::now();
    let mut tracker = ProgressTracker::new(offer.size, resumed_from, start);
    let mut file = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; offer.chunk_size as usize];
    let mut bytes = 0u64;
    for i in (0..offer.chunks()).filter(|&i| !have[i as usize]) {
        let (off, len) = offer.span(i);
        let data = &mut buf[..len as usize];
        file.seek(SeekFrom::Start(off)).await?;
        file.read_exact(data).await?;
        timed(limit, "send window", send.write_all(data)).await?;
        bytes += len;
        if let Some(p) = tracker.add(len, Instant::now()) {
            progress(&p);
        }
    }
    send.finish()?;
    match read_message(&mut recv, limit, "the receiver's verdict").await? {
        Message::Done { ok: true, .. } => {}
        Message::Done { ok: false, reason } => {
            return Err(TransferError::Rejected(reason.unwrap_or_default()));
        }
        _ => return Err(ProtocolError::Unexpected("done").into()),
    }
    let now = Instant::now();
    progress(&tracker.snapshot(now, true));
    Ok(report(
        Direction::Send,
        &offer,
        path.to_path_buf(),
        bytes,
        now - start,
        resumed_from,
        conn,
    ))
}

fn report(
    direction: Direction,
    offer: &Offer,
    path: PathBuf,
    bytes: u64,
    duration: Duration,
    resumed_from: u64,
    conn: &Connection,
) -> TransferReport {
    let stats = conn.stats();
    let secs = duration.as_secs_f64();
    TransferReport {
        direction,
        name: offer.name.clone(),
        path,
        size: offer.size,
        bytes,
        duration,
        goodput_bps: if secs > 0.0 {
            bytes as f64 * 8.0 / secs
        } else {
            0.0
        },
        resumed_from,
        blake3: offer.blake3.to_string(),
        udp_tx_bytes: stats.udp_tx.bytes,
        lost_packets: stats.path.lost_packets,
        rtt_ms: stats.path.rtt.as_secs_f64() * 1000.0,
        path_kind: None,
    }
}

/// Temp file and sidecar paths of a partial download of `offer` in `dir`.
pub fn partial_paths(dir: &Path, offer: &Offer) -> (PathBuf, PathBuf) {
    let tag = &offer.blake3.to_string()[..16];
    let base = format!(".{}.{tag}.part", offer.name);
    (dir.join(&base), dir.join(format!("{base}.state.json")))
}

/// Loads the sidecar, re-hashes every chunk it claims and keeps the ones that match; creates
/// the temp file if needed. Returns the verified chunk bits.
fn prepare_partial(part: &Path, sidecar: &Path, offer: &Offer) -> Result<Vec<bool>, TransferError> {
    let claimed = std::fs::read(sidecar)
        .ok()
        .and_then(|b| serde_json::from_slice::<PartialState>(&b).ok())
        .map(|s| s.claimed_for(offer))
        .unwrap_or_else(|| vec![false; offer.chunks() as usize]);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(part)?;
    let on_disk = file.metadata()?.len();
    let mut have = vec![false; claimed.len()];
    let mut buf = vec![0u8; offer.chunk_size as usize];
    for (i, claim) in claimed.iter().enumerate() {
        let (off, len) = offer.span(i as u64);
        if !*claim || off + len > on_disk {
            continue;
        }
        let data = &mut buf[..len as usize];
        file.seek(SeekFrom::Start(off))?;
        file.read_exact(data)?;
        have[i] = HashHex::from(blake3::hash(data)) == offer.chunk_hashes[i];
        if !have[i] {
            tracing::info!(chunk = i, "partial chunk failed verification, re-fetching");
        }
    }
    file.set_len(offer.size)?;
    Ok(have)
}

fn save_sidecar(sidecar: &Path, offer: &Offer, have: &[bool]) -> Result<(), TransferError> {
    let state = PartialState::new(offer, ranges_from_bits(have));
    let tmp = sidecar.with_extension("json.tmp");
    let body = serde_json::to_vec(&state).map_err(|e| std::io::Error::other(e.to_string()))?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, sidecar)?;
    Ok(())
}

fn hash_file(path: &Path) -> Result<HashHex, TransferError> {
    let mut file = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; HASH_BUF];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// A free name for `name` in `dir`: `name`, else `stem (1).ext`, `stem (2).ext`, ...
fn destination(dir: &Path, name: &str) -> PathBuf {
    let first = dir.join(name);
    if !first.exists() {
        return first;
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s, format!(".{e}")),
        _ => (name, String::new()),
    };
    for n in 1..10_000 {
        let p = dir.join(format!("{stem} ({n}){ext}"));
        if !p.exists() {
            return p;
        }
    }
    dir.join(format!("{stem} ({}){ext}", std::process::id()))
}

/// Receives one file offered by the peer on `conn` into `dir`, resuming a partial download of
/// the same file if one is there (after re-verifying it). The file is written under a hidden
/// temp name with a sidecar state file and renamed once its BLAKE3 matches the offer.
pub async fn receive_file(
    conn: &Connection,
    dir: &Path,
    progress: impl FnMut(&Progress) + Send,
) -> Result<TransferReport, TransferError> {
    receive_file_with(conn, dir, progress, &TransferOptions::default()).await
}

/// [`receive_file`] with explicit options.
pub async fn receive_file_with(
    conn: &Connection,
    dir: &Path,
    mut progress: impl FnMut(&Progress) + Send,
    options: &TransferOptions,
) -> Result<TransferReport, TransferError> {
    let limit = options.step_timeout;
    let (mut send, mut recv) = timed(limit, "the sender's stream", conn.accept_bi()).await?;
    let offer = match read_message(&mut recv, limit, "the offer").await? {
        Message::Offer(o) => o,
        _ => return Err(ProtocolError::Unexpected("offer").into()),
    };
    if let Err(e) = offer.validate() {
        let reject = Message::Reject {
            reason: e.to_string(),
        };
        let _ = write_message(&mut send, &reject, limit).await;
        let _ = send.finish();
        return Err(e.into());
    }
    let (part, sidecar) = partial_paths(dir, &offer);
    let have = {
        let (p, s, o) = (part.clone(), sidecar.clone(), offer.clone());
        blocking(move || {
            let have = prepare_partial(&p, &s, &o)?;
            save_sidecar(&s, &o, &have)?;
            Ok(have)
        })
        .await?
    };
    let resumed_from: u64 = (0..offer.chunks())
        .filter(|&i| have[i as usize])
        .map(|i| offer.span(i).1)
        .sum();
    write_message(
        &mut send,
        &Message::Resume {
            have: ranges_from_bits(&have),
        },
        limit,
    )
    .await?;

    let start = Instant::now();
    let mut state = Receiving {
        have,
        bytes: 0,
        tracker: ProgressTracker::new(offer.size, resumed_from, start),
        last_save: start,
    };
    let result = receive_chunks(
        &offer,
        &part,
        &sidecar,
        &mut recv,
        &mut state,
        &mut progress,
        limit,
    )
    .await;
    // Persist what was received even when the connection broke, so a resume skips it.
    let (s, o, h) = (sidecar.clone(), offer.clone(), state.have.clone());
    let saved = blocking(move || save_sidecar(&s, &o, &h)).await;
    if let Err(e) = result {
        if let TransferError::ChunkMismatch(_) = e {
            let verdict = Message::Done {
                ok: false,
                reason: Some(e.to_string()),
            };
            let _ = write_message(&mut send, &verdict, limit).await;
        }
        return Err(e);
    }
    saved?;

    let p = part.clone();
    let got = blocking(move || hash_file(&p)).await?;
    if got != offer.blake3 {
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_file(&sidecar);
        let verdict = Message::Done {
            ok: false,
            reason: Some(TransferError::IntegrityMismatch.to_string()),
        };
        let _ = write_message(&mut send, &verdict, limit).await;
        return Err(TransferError::IntegrityMismatch);
    }
    let dest = destination(dir, &offer.name);
    std::fs::rename(&part, &dest)?;
    let _ = std::fs::remove_file(&sidecar);
    write_message(
        &mut send,
        &Message::Done {
            ok: true,
            reason: None,
        },
        limit,
    )
    .await?;
    send.finish()?;
    // Wait (bounded) until the verdict is acknowledged so closing right after cannot lose it.
    let _ = tokio::time::timeout(limit, send.stopped()).await;
    let now = Instant::now();
    progress(&state.tracker.snapshot(now, true));
    Ok(report(
        Direction::Receive,
        &offer,
        dest,
        state.bytes,
        now - start,
        resumed_from,
        conn,
    ))
}

struct Receiving {
    have: Vec<bool>,
    bytes: u64,
    tracker: ProgressTracker,
    last_save: Instant,
}

async fn receive_chunks(
    offer: &Offer,
    part: &Path,
    sidecar: &Path,
    recv: &mut RecvStream,
    st: &mut Receiving,
    progress: &mut (impl FnMut(&Progress) + Send),
    limit: Duration,
) -> Result<(), TransferError> {
    let mut file = tokio::fs::OpenOptions::new().write(true).open(part).await?;
    let mut buf = vec![0u8; offer.chunk_size as usize];
    let missing: Vec<u64> = (0..offer.chunks())
        .filter(|&i| !st.have[i as usize])
        .collect();
    for i in missing {
        let (off, len) = offer.span(i);
        let data = &mut buf[..len as usize];
        timed(limit, "file data", recv.read_exact(data)).await?;
        if HashHex::from(blake3::hash(data)) != offer.chunk_hashes[i as usize] {
            return Err(TransferError::ChunkMismatch(i));
        }
        file.seek(SeekFrom::Start(off)).await?;
        file.write_all(data).await?;
        st.have[i as usize] = true;
        st.bytes += len;
        let now = Instant::now();
        if let Some(p) = st.tracker.add(len, now) {
            progress(&p);
        }
        if now.duration_since(st.last_save) >= SIDECAR_SAVE_INTERVAL {
            file.flush().await?;
            save_sidecar(sidecar, offer, &st.have)?;
            st.last_save = now;
        }
    }
    file.flush().await?;
    file.sync_all().await?;
    // Anything after the last chunk is a protocol violation.
    let mut extra = [0u8; 1];
    match timed(limit, "end of data", async {
        recv.read(&mut extra)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
    .await?
    {
        None => Ok(()),
        Some(_) => Err(ProtocolError::Unexpected("end of stream after the last chunk").into()),
    }
}

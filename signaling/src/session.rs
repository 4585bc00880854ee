//! WebSocket sessions on `/v1/ws`: authentication, limits (frame size, rate, idle, slow
//! consumer), the frame dispatcher, durable message replay and presence.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::Instrument;

use crate::auth::{Claims, TokenKind, normalize_username};
use crate::calls::{self, err};
use crate::cluster::Party;
use crate::hub::{CLOSE_POLICY, IpGuard, LocalSession, SessionCtl, encode};
use crate::metrics::Metrics;
use crate::state::{AppState, now_unix, now_unix_ms};
use crate::store::{SendOutcome, StoreError};
use peerlink_api::signaling::{
    ClientMsg, ContactEntry, ErrorCode, PresenceStatus, ResumeOutcome, ServerMsg,
};

/// Close code: message too big.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: invalid payload data (bad UTF-8).
pub const CLOSE_INVALID_DATA: u16 = 1007;
/// Close code: unsupported data (binary frames).
pub const CLOSE_UNSUPPORTED: u16 = 1003;
/// Close code: protocol error.
pub const CLOSE_PROTOCOL: u16 = 1002;
/// Messages read from the store per replay batch.
const REPLAY_BATCH: usize = 64;
/// Most contacts per user.
pub const MAX_CONTACTS: usize = 1000;
/// Longest client message id.
const MAX_CLIENT_ID: usize = 64;

/// Query of `/v1/ws`.
#[derive(Debug, Deserialize)]
pub struct WsQuery {
    /// Access token (otherwise the first frame must be `auth`).
    pub token: Option<String>,
    /// Device id ([A-Za-z0-9_-], 1-64; default "default").
    pub device: Option<String>,
    /// Last message `seq` this device processed.
    pub resume_from: Option<u64>,
}

fn refuse(st: &AppState, status: StatusCode, code: &str, msg: &str) -> Response {
    Metrics::inc(&st.metrics.upgrades_refused_total);
    crate::http::error_response(status, code, msg)
}

/// A device name: 1-64 of `[A-Za-z0-9_-]`.
pub(crate) fn valid_device(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 64
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `GET /v1/ws`: check token, device and limits, then upgrade.
pub async fn ws_upgrade(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    if st.is_draining() {
        let mut r = refuse(
            &st,
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "server shutting down; reconnect later",
        );
        r.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        return r;
    }
    let device = q.device.unwrap_or_else(|| "default".to_owned());
    if !valid_device(&device) {
        return refuse(
            &st,
            StatusCode::BAD_REQUEST,
            "invalid_device",
            "device must be 1-64 of [A-Za-z0-9_-]",
        );
    }
    let claims = match q.token {
        Some(t) => match st.tokens.verify(TokenKind::Access, &t, now_unix()) {
            Ok(c) => Some(c),
            Err(e) => {
                return refuse(
                    &st,
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    &e.to_string(),
                );
            }
        },
        None => None,
    };
    let Some(guard) = st.hub.acquire_ip(peer.ip(), st.cfg.max_conns_per_ip) else {
        return refuse(
            &st,
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            "too many connections from this address",
        );
    };
    let max = st.cfg.max_ws_message;
    let tracker = st.tasks.clone();
    ws.read_buffer_size(st.cfg.ws_read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(max * 4)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            tracker.track_future(run(st, socket, guard, device, claims, q.resume_from, peer))
        })
        .into_response()
}

async fn close_now(sink: &mut SplitSink<WebSocket, Message>, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.to_owned()),
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        sink.send(Message::Close(Some(frame))),
    )
    .await;
}

async fn first_frame_auth(
    st: &AppState,
    stream: &mut SplitStream<WebSocket>,
) -> Result<Claims, &'static str> {
    let frame = tokio::time::timeout(st.cfg.auth_timeout, stream.next()).await;
    let Ok(Some(Ok(Message::Text(t)))) = frame else {
        return Err("authentication required: first frame must be auth");
    };
    match serde_json::from_str::<ClientMsg>(t.as_str()) {
        Ok(ClientMsg::Auth { token }) => st
            .tokens
            .verify(TokenKind::Access, &token, now_unix())
            .map_err(|_| "invalid token"),
        _ => Err("authentication required: first frame must be auth"),
    }
}

/// Token-bucket limiter of client frames.
struct RateLimit {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
    strikes: u32,
}

impl RateLimit {
    fn allow(&mut self, now: Instant) -> bool {
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            true
        } else {
            self.strikes += 1;
            false
        }
    }
}

/// One session's context while it runs.
struct Sess {
    st: AppState,
    user: String,
    device: String,
    me: LocalSession,
    token_exp: u64,
    sent_upto: u64,
}

impl Sess {
    fn reply(&self, msg: &ServerMsg) {
        self.st.hub.push(&self.me, encode(msg), &self.st.metrics);
    }
    fn error(&self, code: ErrorCode, message: impl Into<String>, id: Option<String>) {
        Metrics::inc(&self.st.metrics.frame_errors_total);
        self.reply(&err(code, message, id));
    }
    fn party(&self) -> Party {
        Party {
            user: self.user.clone(),
            device: self.device.clone(),
            node: None,
        }
    }

    /// Queue every stored message after `sent_upto`, in order; waits for queue space (bounded
    /// by the write timeout, after which the session counts as a slow consumer).
    async fn pump(&mut self) -> Result<(), StoreError> {
        loop {
            let (user, after) = (self.user.clone(), self.sent_upto);
            let batch = self
                .st
                .db
                .call(move |s| s.pending(&user, after, REPLAY_BATCH))
                .await?;
            let n = batch.len();
            for m in batch {
                let frame = encode(&ServerMsg::Message {
                    seq: m.seq,
                    id: m.client_id,
                    from: m.sender,
                    body: m.body,
                    sent_at_ms: m.stored_ms,
                });
                match tokio::time::timeout(self.st.cfg.write_timeout, self.me.tx.send(frame)).await
                {
                    Ok(Ok(())) => Metrics::inc(&self.st.metrics.frames_out_total),
                    Ok(Err(_)) => return Ok(()),
                    Err(_) => {
                        Metrics::inc(&self.st.metrics.slow_consumer_closes_total);
                        self.me
                            .ctl
                            .close(CLOSE_POLICY, "slow consumer: outbound queue full");
                        return Ok(());
                    }
                }
                self.sent_upto = m.seq;
            }
            if n < REPLAY_BATCH {
                return Ok(());
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    st: AppState,
    socket: WebSocket,
    _guard: IpGuard,
    device: String,
    claims: Option<Claims>,
    resume_from: Option<u64>,
    peer: SocketAddr,
) {
    let (mut sink, mut stream) = socket.split();
    let claims = match claims {
        Some(c) => c,
        None => match Box::pin(first_frame_auth(&st, &mut stream)).await {
            Ok(c) => c,
            Err(reason) => {
                Metrics::inc(&st.metrics.upgrades_refused_total);
                close_now(&mut sink, CLOSE_POLICY, reason).await;
                return;
            }
        },
    };
    let conn_id = st.hub.next_conn_id();
    let span =
        tracing::info_span!("session", conn = conn_id, user = %claims.sub, device = %device, %peer);
    async move {
        let (tx, rx) = mpsc::channel(st.cfg.outbound_queue);
        let me = LocalSession {
            conn_id,
            device: device.clone(),
            tx,
            ctl: Arc::new(SessionCtl::default()),
            status: Arc::new(AtomicU8::new(0)),
            inbox: Arc::new(Notify::new()),
        };
        let writer = tokio::spawn(
            writer_loop(
                sink,
                rx,
                me.ctl.clone(),
                st.cfg.ping_interval,
                st.cfg.write_timeout,
            )
            .in_current_span(),
        );
        let user = claims.sub.clone();
        let (u2, d2) = (user.clone(), device.clone());
        let cursor = match st
            .db
            .call(move |s| s.open_device(&u2, &d2, now_unix_ms()))
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "device registration failed");
                me.ctl.close(1011, "storage unavailable");
                let _ = writer.await;
                return;
            }
        };

        // Order: publish presence (a client that got its welcome is findable), queue the
        // welcome, then register for live events (so the welcome is always the first frame).
        if let Some(c) = st.cluster.as_ref() {
            Box::pin(c.publish(&user, &device, PresenceStatus::Online)).await;
        }
        // Resume point.
        let (outcome, from_seq) = match resume_from {
            None => (ResumeOutcome::Fresh, cursor.acked_seq),
            Some(r) if r > cursor.last_seq || r < cursor.acked_seq => {
                (ResumeOutcome::Resync, cursor.acked_seq)
            }
            Some(r) => {
                let (u2, d2) = (user.clone(), device.clone());
                let _ = st.db.call(move |s| s.ack(&u2, &d2, r)).await;
                (ResumeOutcome::Resumed, r)
            }
        };
        let mut sess = Sess {
            st: st.clone(),
            user: user.clone(),
            device: device.clone(),
            me,
            token_exp: claims.exp,
            sent_upto: from_seq,
        };
        sess.reply(&ServerMsg::Welcome {
            user: user.clone(),
            device: device.clone(),
            node: st.cfg.node_id.clone(),
            resume: outcome,
            acked_seq: from_seq,
            max_message_bytes: st.cfg.max_ws_message,
            token_expires_at: claims.exp,
        });
        if outcome == ResumeOutcome::Resync {
            let reason = match resume_from {
                Some(r) if r > cursor.last_seq => format!(
                    "resume_from {r} is ahead of the server ({})",
                    cursor.last_seq
                ),
                Some(r) => format!(
                    "resume_from {r} is behind this device's acknowledged {}",
                    cursor.acked_seq
                ),
                None => String::new(),
            };
            sess.reply(&ServerMsg::Resync { reason, from_seq });
        }
        st.metrics.sessions_open.fetch_add(1, Ordering::Relaxed);
        Metrics::inc(&st.metrics.sessions_total);
        let first_here = st.hub.register(&user, sess.me.clone());
        // Back within a call grace: the calls continue; frames queued meanwhile follow.
        calls::on_reconnect(&st, &user, &device);
        tracing::debug!("session open");
        if first_here {
            Box::pin(announce_presence(&st, &user)).await;
        }
        if let Err(e) = Box::pin(sess.pump()).await {
            tracing::warn!(error = %e, "message replay failed");
        }

        reader_loop(&mut sess, &mut stream).await;

        // Teardown.
        let last_here = st.hub.unregister(&user, conn_id);
        sess.me.ctl.close(1000, "session ended");
        st.metrics.sessions_open.fetch_sub(1, Ordering::Relaxed);
        // A session replaced by a newer one of the same device keeps its calls.
        if !st.hub.has_device(&user, &device) {
            Box::pin(calls::on_disconnect(&st, &user, &device)).await;
        }
        if let Some(c) = st.cluster.as_ref()
            && !st.hub.has_device(&user, &device)
        {
            Box::pin(c.unpublish(&user, &device)).await;
        }
        if last_here {
            Box::pin(announce_presence(&st, &user)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
        tracing::debug!("session closed");
    }
    .instrument(span)
    .await
}

async fn writer_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Utf8Bytes>,
    ctl: Arc<SessionCtl>,
    ping_interval: Duration,
    write_timeout: Duration,
) {
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    loop {
        tokio::select! {
            biased;
            _ = ctl.closed() => break,
            m = rx.recv() => {
                let Some(frame) = m else { break };
                let mut send = std::pin::pin!(tokio::time::timeout(
                    write_timeout,
                    sink.send(Message::Text(frame)),
                ));
                let r = tokio::select! {
                    biased;
                    r = &mut send => r,
                    // A close while this frame is being written: a slow consumer is cut off at
                    // once; any other close (shutdown, policy) lets the frame, already taken
                    // off the queue, finish (bounded by the write timeout) ahead of the rest.
                    _ = ctl.closed() => {
                        if is_slow_consumer(&ctl) {
                            break;
                        }
                        send.await
                    }
                };
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => { ctl.close(1000, "write failed"); return; }
                    Err(_) => { ctl.close(CLOSE_POLICY, "slow consumer: write timed out"); break; }
                }
            }
            _ = ping.tick() => {
                match tokio::time::timeout(write_timeout, sink.send(Message::Ping(Default::default()))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => { ctl.close(1000, "write failed"); return; }
                    Err(_) => { ctl.close(CLOSE_POLICY, "slow consumer: write timed out"); break; }
                }
            }
        }
    }
    let (code, reason) = ctl.reason().unwrap_or((1000, String::new()));
    if !is_slow_consumer(&ctl) {
        // Flush what is already queued (e.g. `goodbye`) before the close frame.
        while let Ok(frame) = rx.try_recv() {
            match tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Text(frame)))
                .await
            {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
    }
    close_now(&mut sink, code, &reason).await;
}

/// Whether the session was closed for not keeping up (its queue is then dropped, not flushed).
fn is_slow_consumer(ctl: &SessionCtl) -> bool {
    ctl.reason()
        .is_some_and(|(_, r)| r.starts_with("slow consumer"))
}

fn classify_read_error(e: axum::Error) -> (u16, String) {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let inner = e.into_inner();
    match inner.downcast::<WsError>() {
        Ok(ws) => match *ws {
            WsError::Capacity(c) => (CLOSE_TOO_BIG, format!("message too big: {c}")),
            WsError::Utf8(_) => (CLOSE_INVALID_DATA, "invalid UTF-8 in text frame".into()),
            WsError::Protocol(p) => (CLOSE_PROTOCOL, format!("protocol error: {p}")),
            other => (1000, format!("read error: {other}")),
        },
        Err(other) => (1000, format!("read error: {other}")),
    }
}

async fn reader_loop(sess: &mut Sess, stream: &mut SplitStream<WebSocket>) {
    let st = sess.st.clone();
    let ctl = sess.me.ctl.clone();
    let inbox = sess.me.inbox.clone();
    let mut shutdown = std::pin::pin!(st.shutdown.clone().cancelled_owned());
    let mut limiter = RateLimit {
        tokens: f64::from(st.cfg.msg_burst),
        rate: f64::from(st.cfg.msg_rate),
        burst: f64::from(st.cfg.msg_burst),
        last: Instant::now(),
        strikes: 0,
    };
    let mut last_rx = Instant::now();
    loop {
        let exp_in = Duration::from_secs(sess.token_exp.saturating_sub(now_unix()));
        tokio::select! {
            _ = ctl.closed() => break,
            _ = &mut shutdown => {
                // State::drain queues the goodbye and closes; wait for that here.
                ctl.closed().await;
                break;
            }
            _ = tokio::time::sleep(exp_in) => {
                sess.reply(&ServerMsg::Goodbye { reason: "token expired".into(), reconnect_after_ms: 0 });
                ctl.close(CLOSE_POLICY, "token expired");
                break;
            }
            _ = tokio::time::sleep_until(last_rx + st.cfg.idle_timeout) => {
                Metrics::inc(&st.metrics.idle_closes_total);
                ctl.close(1000, "idle timeout");
                break;
            }
            _ = inbox.notified() => {
                if let Err(e) = Box::pin(sess.pump()).await {
                    tracing::warn!(error = %e, "message delivery failed");
                }
            }
            r = stream.next() => {
                last_rx = Instant::now();
                match r {
                    None => break,
                    Some(Err(e)) => {
                        let (code, reason) = classify_read_error(e);
                        if code != 1000 {
                            Metrics::inc(&st.metrics.protocol_closes_total);
                        }
                        ctl.close(code, &reason);
                        break;
                    }
                    Some(Ok(Message::Text(t))) => {
                        Metrics::inc(&st.metrics.frames_in_total);
                        if !limiter.allow(last_rx) {
                            if limiter.strikes >= st.cfg.flood_close_after {
                                Metrics::inc(&st.metrics.flood_closes_total);
                                ctl.close(CLOSE_POLICY, "message flood");
                                break;
                            }
                            if limiter.strikes == 1 {
                                sess.error(ErrorCode::RateLimited, "too many frames; slow down", None);
                            }
                            continue;
                        }
                        Box::pin(handle_text(sess, t.as_str())).await;
                    }
                    Some(Ok(Message::Binary(_))) => {
                        Metrics::inc(&st.metrics.protocol_closes_total);
                        ctl.close(CLOSE_UNSUPPORTED, "binary frames are not supported");
                        break;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) => break,
                }
            }
        }
    }
}

async fn handle_text(sess: &mut Sess, text: &str) {
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return sess.error(ErrorCode::BadJson, format!("invalid JSON: {e}"), None),
    };
    let Some(ty) = v.get("type").and_then(|t| t.as_str()) else {
        return sess.error(
            ErrorCode::BadJson,
            "frame must be a JSON object with a string `type`",
            None,
        );
    };
    if !ClientMsg::TYPES.contains(&ty) {
        let shown: String = ty.chars().take(32).collect();
        return sess.error(
            ErrorCode::UnknownType,
            format!("unknown message type `{shown}`"),
            None,
        );
    }
    let ty = ty.to_owned();
    let msg: ClientMsg = match serde_json::from_value(v) {
        Ok(m) => m,
        Err(e) => {
            return sess.error(
                ErrorCode::Invalid,
                format!("invalid `{ty}` frame: {e}"),
                None,
            );
        }
    };
    dispatch(sess, msg).await;
}

async fn dispatch(sess: &mut Sess, msg: ClientMsg) {
    let st = sess.st.clone();
    match msg {
        ClientMsg::Auth { token } => {
            match st.tokens.verify(TokenKind::Access, &token, now_unix()) {
                Ok(c) if c.sub == sess.user => {
                    sess.token_exp = c.exp;
                    sess.reply(&ServerMsg::AuthOk {
                        token_expires_at: c.exp,
                    });
                }
                Ok(_) => sess.error(ErrorCode::Unauthorized, "token is for another user", None),
                Err(e) => sess.error(ErrorCode::Unauthorized, e.to_string(), None),
            }
        }
        m @ (ClientMsg::Invite { .. }
        | ClientMsg::Ringing { .. }
        | ClientMsg::Accept { .. }
        | ClientMsg::Decline { .. }
        | ClientMsg::Cancel { .. }
        | ClientMsg::Hangup { .. }
        | ClientMsg::Candidate { .. }
        | ClientMsg::EndOfCandidates { .. }
        | ClientMsg::IceRestart { .. }) => {
            for r in calls::client_msg(&st, sess.party(), m).await {
                if matches!(r, ServerMsg::Error { .. }) {
                    Metrics::inc(&st.metrics.frame_errors_total);
                }
                sess.reply(&r);
            }
        }
        ClientMsg::SendMessage { id, to, from, body } => {
            let r = send_message(&st, &sess.user, id, to, from, body).await;
            if matches!(r, ServerMsg::Error { .. }) {
                Metrics::inc(&st.metrics.frame_errors_total);
            }
            sess.reply(&r);
        }
        ClientMsg::Ack { seq } => {
            let (u, d) = (sess.user.clone(), sess.device.clone());
            if let Err(e) = st.db.call(move |s| s.ack(&u, &d, seq)).await {
                sess.error(ErrorCode::Storage, e.to_string(), None);
            }
        }
        ClientMsg::AddContact { username } => {
            let Ok(c) = normalize_username(&username) else {
                return sess.error(ErrorCode::NoSuchUser, "no such user", None);
            };
            let owner = sess.user.clone();
            let r = st
                .db
                .call(move |s| {
                    if s.contacts(&owner)?.len() >= MAX_CONTACTS {
                        return Ok(false);
                    }
                    s.add_contact(&owner, &c).map(|()| true)
                })
                .await;
            match r {
                Ok(true) => send_contacts(sess).await,
                Ok(false) => sess.error(
                    ErrorCode::NotAllowed,
                    format!("at most {MAX_CONTACTS} contacts"),
                    None,
                ),
                Err(StoreError::NoSuchUser) => {
                    sess.error(ErrorCode::NoSuchUser, "no such user", None)
                }
                Err(e) => sess.error(ErrorCode::Storage, e.to_string(), None),
            }
        }
        ClientMsg::RemoveContact { username } => {
            let Ok(c) = normalize_username(&username) else {
                return sess.error(ErrorCode::NoSuchUser, "no such user", None);
            };
            let owner = sess.user.clone();
            match st.db.call(move |s| s.remove_contact(&owner, &c)).await {
                Ok(()) => send_contacts(sess).await,
                Err(e) => sess.error(ErrorCode::Storage, e.to_string(), None),
            }
        }
        ClientMsg::ListContacts => send_contacts(sess).await,
        ClientMsg::SetPresence { status } => {
            let v = match status {
                PresenceStatus::Online => 0,
                PresenceStatus::Away => 1,
                PresenceStatus::Offline => {
                    return sess.error(
                        ErrorCode::Invalid,
                        "offline cannot be set; close the session",
                        None,
                    );
                }
            };
            sess.me.status.store(v, Ordering::Relaxed);
            if let Some(c) = st.cluster.as_ref() {
                c.publish(&sess.user, &sess.device, status).await;
            }
            announce_presence(&st, &sess.user).await;
        }
    }
}

async fn presence_of(st: &AppState, user: &str) -> PresenceStatus {
    let local = st.hub.local_presence(user);
    if local == PresenceStatus::Online {
        return local;
    }
    match st.cluster.as_ref() {
        Some(c) => match (local, c.presence(user).await) {
            (_, PresenceStatus::Online) => PresenceStatus::Online,
            (PresenceStatus::Away, _) | (_, PresenceStatus::Away) => PresenceStatus::Away,
            _ => PresenceStatus::Offline,
        },
        None => local,
    }
}

async fn send_contacts(sess: &mut Sess) {
    let owner = sess.user.clone();
    let list = match sess.st.db.call(move |s| s.contacts(&owner)).await {
        Ok(l) => l,
        Err(e) => return sess.error(ErrorCode::Storage, e.to_string(), None),
    };
    let mut contacts = Vec::with_capacity(list.len());
    for username in list {
        let status = presence_of(&sess.st, &username).await;
        contacts.push(ContactEntry { username, status });
    }
    sess.reply(&ServerMsg::Contacts { contacts });
}

/// Push `user`'s current presence to every user who has them as a contact.
///
/// Deliveries to other nodes are sent once, not retried like call frames: a presence event
/// carries the status at the time it was read, so one sent again after a failure could arrive
/// after a newer event and leave the watcher with a stale status, which is worse than a missed
/// one. A missed event is corrected by the next change and by the contact list, which carries
/// every contact's status as the directory has it and is what clients read when they connect
/// (`list_contacts`, `add_contact`); the delivery fails mostly when the watcher's node is down,
/// and then the watcher reconnects to another node and reads that list anyway. Nothing
/// depends on the event arriving: invites look the callee up in the directory.
async fn announce_presence(st: &AppState, user: &str) {
    let u = user.to_owned();
    let Ok(watchers) = st.db.call(move |s| s.watchers(&u)).await else {
        return;
    };
    let status = presence_of(st, user).await;
    let msg = ServerMsg::Presence {
        user: user.to_owned(),
        status,
    };
    for w in watchers.into_iter().take(MAX_CONTACTS) {
        st.hub.send_user(&w, None, &msg, &st.metrics);
        if let Some(c) = st.cluster.as_ref() {
            for url in c.nodes_of(&w).await {
                let req = crate::cluster::DeliverRequest {
                    user: w.clone(),
                    device: None,
                    except_device: None,
                    msg: msg.clone(),
                    arbiter: None,
                    id: None,
                };
                let _ = c.deliver(&url, &req).await;
            }
        }
    }
}

fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CLIENT_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// Store a message durably, then wake the recipient's sessions (here and on other nodes).
pub async fn send_message(
    st: &AppState,
    sender: &str,
    id: String,
    to: String,
    claimed_from: Option<String>,
    body: String,
) -> ServerMsg {
    if !valid_client_id(&id) {
        return err(
            ErrorCode::Invalid,
            "message id must be 1-64 of [A-Za-z0-9._:-]",
            None,
        );
    }
    if claimed_from.as_deref().is_some_and(|f| f != sender) {
        return err(
            ErrorCode::ForgedFrom,
            "`from` must be the authenticated user",
            Some(id),
        );
    }
    if body.len() > st.cfg.max_body_bytes {
        return err(
            ErrorCode::Invalid,
            format!("body over {} bytes", st.cfg.max_body_bytes),
            Some(id),
        );
    }
    let Ok(to) = normalize_username(&to) else {
        return err(ErrorCode::NoSuchUser, "no such user", Some(id));
    };
    let (s2, to2, id2) = (sender.to_owned(), to.clone(), id.clone());
    let r = st
        .db
        .call(move |s| s.store_message(&s2, &to2, &id2, &body, now_unix_ms()))
        .await;
    match r {
        Ok(SendOutcome::Stored { stored_ms, .. }) => {
            Metrics::inc(&st.metrics.messages_stored_total);
            st.hub.notify_inbox(&to);
            if let Some(c) = st.cluster.as_ref() {
                for url in c.nodes_of(&to).await {
                    // Retried in the background: the sender's ack does not wait for it.
                    let (st, to) = (st.clone(), to.clone());
                    tokio::spawn(async move {
                        let Some(c) = st.cluster.as_ref() else { return };
                        if let Err(e) = c.nudge_inbox_reliably(&url, &to).await {
                            tracing::warn!(error = %e, "inbox nudge failed");
                        }
                    });
                }
            }
            ServerMsg::MessageAck {
                id,
                stored_at_ms: stored_ms,
            }
        }
        Ok(SendOutcome::Duplicate { stored_ms }) => {
            Metrics::inc(&st.metrics.message_duplicates_total);
            ServerMsg::MessageAck {
                id,
                stored_at_ms: stored_ms,
            }
        }
        Ok(SendOutcome::Conflict) => err(
            ErrorCode::Conflict,
            "message id already used for different content",
            Some(id),
        ),
        Err(StoreError::NoSuchUser) => err(ErrorCode::NoSuchUser, "no such user", Some(id)),
        Err(e) => {
            Metrics::inc(&st.metrics.message_store_errors_total);
            tracing::warn!(error = %e, "message not stored");
            err(
                ErrorCode::Storage,
                format!("message not stored: {e}"),
                Some(id),
            )
        }
    }
}

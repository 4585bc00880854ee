//! The loop both roles run once the call is set up: datagrams, signaling frames, media
//! ticks, recovery deadlines and the file transfer, until the call ends; then hang-up and
//! the report.

use super::*;

/// What the shared loop should do on a call event.
pub(super) enum Flow {
    Continue,
    Ended(EndReason),
}

/// The transfer task of a file session.
pub(super) type TransferTask = tokio::task::JoinHandle<Result<TransferReport, String>>;

/// Next datagram QUIC wants sent (pending forever without a transfer).
pub(super) async fn next_out(pipe: Option<&Pipe>) -> Option<Vec<u8>> {
    match pipe {
        Some(p) => p.pop().await,
        None => std::future::pending().await,
    }
}

/// The transfer's outcome (pending forever without a transfer).
pub(super) async fn transfer_done(
    task: Option<&mut TransferTask>,
) -> Result<TransferReport, String> {
    match task {
        Some(t) => t
            .await
            .unwrap_or_else(|e| Err(format!("transfer task failed: {e}"))),
        None => std::future::pending().await,
    }
}

/// Why the call loop returned.
pub(super) enum LoopEnd {
    /// The file transfer finished (its result is in the leg).
    FileDone,
    /// The media duration (caller) or the hard deadline passed.
    TimeUp,
    /// Signaling ended the call.
    Peer(EndReason),
    /// Nothing from the peer for the consent timeout.
    ConsentExpired,
    /// Signaling could not be reopened within the grace.
    SignalLost,
}

/// A reconnect attempt in flight (owns everything it needs; the call goes on meanwhile).
pub(super) type Reopening = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<Result<Reopened, SignalError>, tokio::time::error::Elapsed>,
            > + Send,
    >,
>;

/// Handle one signaling frame of the call.
pub(super) async fn on_signal(
    leg: &mut Leg,
    sess: &mut SignalSession,
    m: ServerMsg,
) -> Result<Flow, CallError> {
    let ours = |id: &CallId| leg.call_id.as_ref() == Some(id);
    match m {
        ServerMsg::Candidate { call_id, candidate } if ours(&call_id) => {
            if let Ok(c) = Candidate::try_from(&candidate) {
                leg.agent.add_remote_candidate(c, Instant::now());
                leg.remote_cands += 1;
            }
        }
        ServerMsg::EndOfCandidates { call_id } if ours(&call_id) => {
            leg.agent.end_of_remote_candidates();
        }
        ServerMsg::IceRestart { call_id, desc } if ours(&call_id) => {
            leg.on_remote_restart(sess, &desc).await?;
        }
        ServerMsg::CallEnded { call_id, reason } if ours(&call_id) => {
            return Ok(Flow::Ended(reason));
        }
        _ => {}
    }
    Ok(Flow::Continue)
}

/// Drive the call until `deadline` (media for the caller's duration), a `call_ended`, or
/// consent expiry. `connect_deadline` bounds the time to the first selected path.
pub(super) async fn run_loop(
    leg: &mut Leg,
    sess: &mut SignalSession,
    media_duration: Option<Duration>,
    hard_deadline: Instant,
    connect_deadline: Instant,
) -> Result<LoopEnd, CallError> {
    let mut buf = vec![0u8; 65536];
    let mut xfer: Option<(Pipe, TransferTask)> = None;
    // Receiver: after the transfer, wait this long for the sender's hangup.
    let mut linger: Option<Instant> = None;
    let mut reopening: Option<(Reopening, Duration)> = None;
    loop {
        leg.flush().await?;
        leg.handle_events(sess).await?;
        leg.flush().await?;
        let now = Instant::now();
        match leg.rec.poll_signal(now) {
            SignalNext::Fine => {}
            SignalNext::Lost => return Ok(LoopEnd::SignalLost),
            SignalNext::Reconnect(bound) => {
                reopening = Some((Box::pin(tokio::time::timeout(bound, sess.reopen())), bound));
            }
            SignalNext::ResendRestart => {
                if let Some(call_id) = leg.call_id.clone() {
                    tracing::info!("re-sending our unanswered ICE restart after the reconnect");
                    let desc = leg.full_desc();
                    leg.signal(sess, ClientMsg::IceRestart { call_id, desc })
                        .await;
                }
            }
            SignalNext::Restart(why) => {
                leg.restart(sess, why).await?;
                continue;
            }
        }
        if leg.t_connected.is_none() && now >= connect_deadline {
            return Err(CallError::Timeout("a connected path"));
        }
        if linger.is_some_and(|t| now >= t) {
            return Ok(LoopEnd::FileDone);
        }
        if xfer.is_none()
            && leg.t_connected.is_some()
            && leg.file.as_ref().is_some_and(|f| f.result.is_none())
        {
            xfer = Some(leg.start_transfer()?);
        }
        if let (Some(d), Some(tc)) = (media_duration, leg.t_connected)
            && now >= tc + d
        {
            return Ok(LoopEnd::TimeUp);
        }
        if now >= hard_deadline {
            return Ok(LoopEnd::TimeUp);
        }
        match leg
            .rec
            .poll_path(now, leg.agent.selected_last_rx(), leg.file.is_some())
        {
            PathNext::Fine => {}
            PathNext::ConsentExpired => return Ok(LoopEnd::ConsentExpired),
            PathNext::Restart(why) => {
                leg.restart(sess, why).await?;
                continue;
            }
        }
        leg.media_tick(true).await?;
        let mut deadline = hard_deadline;
        if leg.t_connected.is_none() {
            deadline = deadline.min(connect_deadline);
        }
        if let (Some(d), Some(tc)) = (media_duration, leg.t_connected) {
            deadline = deadline.min(tc + d);
        }
        if let Some(t) = linger {
            deadline = deadline.min(t);
        }
        if let Some(t) = leg.rec.signal_timeout() {
            deadline = deadline.min(t);
        }
        let sig_up = !leg.rec.signal_down();
        let wake = tokio::time::Instant::from_std(leg.wake(true, deadline).max(now));
        let out = xfer.as_ref().map(|x| x.0.clone());
        tokio::select! {
            r = recv_any(&leg.sock, leg.sock6.as_ref(), &mut buf) => {
                match r {
                    Ok((i, n, from)) => leg.on_datagram_at(i, n, from, &buf),
                    // ICMP-induced errors (port unreachable) on UDP are not fatal.
                    Err(e) => tracing::debug!("recv: {e}"),
                }
            }
            (server, ev) = leg.streams.recv() => leg.on_stream(server, ev),
            Some(d) = next_out(out.as_ref()) => {
                leg.send_app(&d).await?;
            }
            r = transfer_done(xfer.as_mut().map(|x| &mut x.1)) => {
                xfer = None;
                if let Some(p) = leg.quic_in.take() {
                    p.close();
                }
                let ok = r.is_ok();
                if let Some(f) = leg.file.as_mut() {
                    f.result = Some(r);
                }
                if leg.role == IceRole::Controlling || !ok {
                    return Ok(LoopEnd::FileDone);
                }
                linger = Some(Instant::now() + Duration::from_secs(3));
            }
            r = reopened(reopening.as_mut().map(|(f, _)| f)) => {
                let bound = reopening.take().map_or(Duration::ZERO, |(_, b)| b);
                leg.reconnected(sess, r, bound).await;
            }
            m = sess.recv(), if sig_up => {
                let m = match m {
                    Ok(ServerMsg::Goodbye { reason, reconnect_after_ms }) => {
                        let at = Instant::now() + Duration::from_millis(reconnect_after_ms);
                        leg.signal_lost(format!("goodbye: {reason}"), at);
                        continue;
                    }
                    Ok(m) => m,
                    Err(e) if signal_fatal(&e) => return Err(e.into()),
                    Err(e) => {
                        leg.signal_lost(e.to_string(), Instant::now());
                        continue;
                    }
                };
                if let Flow::Ended(r) = on_signal(leg, sess, m).await? {
                    if let Some((_, task)) = xfer.take() {
                        // The sender hangs up after our verdict: let the task finish.
                        let r = tokio::time::timeout(Duration::from_secs(5), task)
                            .await
                            .map_err(|_| "transfer did not finish after hangup".to_owned())
                            .and_then(|j| j.unwrap_or_else(|e| Err(e.to_string())));
                        if let Some(f) = leg.file.as_mut() {
                            f.result = Some(r);
                        }
                    }
                    return Ok(LoopEnd::Peer(r));
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                leg.agent.handle_timeout(Instant::now());
            }
        }
    }
}

pub(super) async fn hangup(
    sess: &mut SignalSession,
    call_id: Option<&CallId>,
) -> Result<(), SignalError> {
    match call_id {
        Some(c) => tokio::time::timeout(
            SIG_WRITE,
            sess.send(&ClientMsg::Hangup { call_id: c.clone() }),
        )
        .await
        .map_err(|_| SignalError::Timeout(SIG_WRITE, "hangup"))?,
        None => Ok(()),
    }
}

/// Runs the connected part of a call, hangs up as needed, releases the relay allocation and
/// says how the call ended: (machine-readable end, text).
pub(super) async fn run_and_end(
    leg: &mut Leg,
    sess: &mut SignalSession,
    media_duration: Option<Duration>,
    hard_deadline: Instant,
    connect_deadline: Instant,
) -> Result<(&'static str, String), CallError> {
    let res = run_loop(leg, sess, media_duration, hard_deadline, connect_deadline).await;
    let call_id = leg.call_id.clone();
    // Ending while signaling is down: get it back (within the grace) to say so.
    if matches!(&res, Ok(e) if !matches!(e, LoopEnd::SignalLost))
        && leg.rec.signal_down()
        && !leg.restore_signal_now(sess).await
    {
        tracing::warn!("signaling still down at the end of the call; the server ends it");
    }
    let out = match res {
        Ok(LoopEnd::SignalLost) => {
            let why = leg.rec.last_signal_error().unwrap_or_default().to_owned();
            Ok((
                "signaling_lost",
                format!(
                    "signaling lost: not reconnected within {:.1} s ({why})",
                    leg.rec.signal_grace().as_secs_f64()
                ),
            ))
        }
        Ok(LoopEnd::Peer(EndReason::Hangup)) => Ok((
            "peer_hangup",
            format!("peer ended the call ({:?})", EndReason::Hangup),
        )),
        Ok(LoopEnd::Peer(r)) => Ok(("peer_ended", format!("peer ended the call ({r:?})"))),
        Ok(LoopEnd::ConsentExpired) => {
            let _ = hangup(sess, call_id.as_ref()).await;
            Ok((
                "consent_expired",
                format!(
                    "consent expired: no packets from peer for {} s",
                    leg.rec.consent_timeout().as_secs_f64()
                ),
            ))
        }
        Ok(LoopEnd::FileDone) => match hangup(sess, call_id.as_ref()).await {
            Ok(()) => Ok(("hangup", "hung up after the transfer".to_owned())),
            Err(e) => Err(e.into()),
        },
        Ok(LoopEnd::TimeUp) => match hangup(sess, call_id.as_ref()).await {
            Ok(()) if media_duration.is_some() => {
                Ok(("hangup", "hung up after the media duration".to_owned()))
            }
            Ok(()) => Ok(("time_limit", "hung up at the time limit".to_owned())),
            Err(e) => Err(e.into()),
        },
        Err(e) => {
            // Best effort: the peer must not wait for consent expiry.
            let _ = hangup(sess, call_id.as_ref()).await;
            Err(e)
        }
    };
    leg.close().await;
    out
}

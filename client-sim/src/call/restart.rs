//! ICE restarts of a call: ours (fresh TURN credentials, ICE credentials and gathering) and the
//! peer's (restart too unless it answers ours). When to restart is [`Recovery`]'s decision.

use super::*;

impl Leg {
    /// ICE restart: fresh TURN credentials, new ICE credentials, fresh gathering; our new
    /// description goes to the peer as `ice_restart`.
    pub(super) async fn restart(
        &mut self,
        sess: &mut SignalSession,
        reason: &str,
    ) -> Result<(), CallError> {
        let Some(call_id) = self.call_id.clone() else {
            return Ok(());
        };
        if self.use_turn {
            match tokio::time::timeout(Duration::from_secs(2), sess.turn_credentials()).await {
                Ok(Ok(c)) => self.agent.set_turn_servers(turn_configs(&c)),
                Ok(Err(e)) => tracing::warn!("restart without fresh TURN credentials: {e}"),
                Err(_) => tracing::warn!("restart without fresh TURN credentials: timed out"),
            }
        }
        self.ufrag = random_token(8);
        self.pwd = random_token(24);
        let now = Instant::now();
        self.agent
            .restart(now, (self.ufrag.clone(), self.pwd.clone()));
        self.sent_cands.clear();
        self.pending.clear();
        self.gathered_all = false;
        self.sent_eoc = false;
        self.rec.on_restart(now);
        let restarts = self.rec.restarts();
        tracing::info!("ICE restart #{restarts} ({reason})");
        self.emit(CallEvent::Restarted {
            restarts,
            reason: reason.to_owned(),
        });
        let desc = self.desc();
        self.signal(sess, ClientMsg::IceRestart { call_id, desc })
            .await;
        Ok(())
    }

    /// The peer restarted: restart too unless this is the answer to our own restart, then
    /// apply its credentials and candidates.
    pub(super) async fn on_remote_restart(
        &mut self,
        sess: &mut SignalSession,
        d: &SessionDesc,
    ) -> Result<(), CallError> {
        let key = decode_key(&d.public_key)?;
        if self.peer_key.is_some_and(|k| k != key) {
            return Err(CallError::BadDesc(
                "the peer's public key changed in an ICE restart".into(),
            ));
        }
        if self.rec.peer_restart_needs_ours() {
            self.restart(sess, "peer restarted").await?;
        }
        self.rec.on_peer_description();
        self.add_remote_ice(d);
        Ok(())
    }
}

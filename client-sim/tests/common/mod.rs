//! Helpers shared by the loopback fleet tests.
#![allow(clippy::unwrap_used, dead_code)]

use std::time::Duration;

use peerlink_api::signaling_client::{HttpApi, SignalSession};
use peerlink_sim::fleet::Fleet;

/// Registers `a` and `b` on the fleet's signaling node and connects one session each
/// (devices "a" and "b").
pub async fn two_users(fleet: &Fleet, a: &str, b: &str) -> (SignalSession, SignalSession) {
    let api = HttpApi::new(&fleet.signaling_url, Duration::from_secs(30)).unwrap();
    for u in [a, b] {
        api.register(u, "password-123").await.unwrap();
    }
    let ta = api.login(a, "password-123").await.unwrap();
    let tb = api.login(b, "password-123").await.unwrap();
    let sa = SignalSession::connect(api.clone(), ta, "a", None)
        .await
        .unwrap();
    let sb = SignalSession::connect(api, tb, "b", None).await.unwrap();
    (sa, sb)
}

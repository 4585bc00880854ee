//! The login throttle shared by every node of a fleet: with `throttle_store = "redis://…"` the
//! failed-login counts per account and per client IP live in Redis, so an attacker spreading
//! guesses over the nodes behind a load balancer meets one limit, not one per node.
//!
//! Each key counts failures in a fixed window that starts with its first failure (the same
//! rule as the node's own table, [`crate::auth::Throttle`]): one Lua script increments the
//! count and, on the first failure, sets the key to expire after the window. A login is refused
//! while either count has reached its limit; a successful login deletes its account's count.
//!
//! Keys (`P` is the prefix, default [`DEFAULT_PREFIX`]): `P:login:ip:<ip>` and
//! `P:login:account:<hex SHA-256 of the normalised name>` (a bounded key whatever was typed).
//!
//! Redis down or slow (every command bounded by the response timeout): the node's own table
//! keeps throttling as it does without Redis, the failure is counted in
//! `peerlink_signaling_throttle_store_errors_total` and logged once per outage, and the shared
//! counts resume by themselves when Redis answers again. An unreachable Redis at start is an
//! error before any port is bound.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use peerlink_cli::redis_url::{RedisUrl, redact};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::{Digest, Sha256};

/// Key prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "peerlink:signaling";
/// Bound of one connection attempt and of one command's answer.
pub const TIMEOUT: Duration = Duration::from_secs(1);

/// Increment KEYS[1] and KEYS[2]; on a key's first failure it expires after ARGV[1] ms.
const FAIL_SCRIPT: &str = r"
for i, k in ipairs(KEYS) do
  if redis.call('INCR', k) == 1 then redis.call('PEXPIRE', k, ARGV[1]) end
end
return 0
";

/// Where the shared throttle lives.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ThrottleLocation(RedisUrl);

impl ThrottleLocation {
    /// Parse `redis://[user:password@]HOST:PORT[/DB][?prefix=P]` ([`peerlink_cli::redis_url`]);
    /// the rest must be a URL the Redis client accepts.
    pub fn parse(text: &str) -> Result<Self, String> {
        let u = RedisUrl::parse(text, "throttle store", DEFAULT_PREFIX)?;
        redis::Client::open(u.url.as_str())
            .map_err(|e| format!("throttle store {:?}: {e}", redact(text)))?;
        Ok(Self(u))
    }

    /// The location without its password, for logs and errors.
    pub fn redacted(&self) -> String {
        self.0.redacted()
    }
}

/// The failed-login counts of the fleet, in Redis.
pub struct SharedThrottle {
    conn: ConnectionManager,
    prefix: String,
    per_account: u32,
    per_ip: u32,
    window: Duration,
    script: redis::Script,
    /// Whether the last command failed (one log line per outage).
    failing: AtomicBool,
}

impl std::fmt::Debug for SharedThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedThrottle")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl SharedThrottle {
    /// Connect (bounded) and check that Redis answers; an error when it does not.
    pub async fn connect(
        location: &ThrottleLocation,
        per_account: u32,
        per_ip: u32,
        window: Duration,
    ) -> Result<Self, String> {
        let shown = location.redacted();
        let client = redis::Client::open(location.0.url.as_str())
            .map_err(|e| format!("throttle store {shown}: {e}"))?;
        let mc = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let mut conn =
            tokio::time::timeout(TIMEOUT * 3, ConnectionManager::new_with_config(client, mc))
                .await
                .map_err(|_| format!("throttle store {shown}: no answer within {:?}", TIMEOUT * 3))?
                .map_err(|e| format!("throttle store {shown}: {e}"))?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("throttle store {shown}: {e}"))?;
        Ok(Self {
            conn,
            prefix: location.0.prefix.clone(),
            per_account,
            per_ip,
            window,
            script: redis::Script::new(FAIL_SCRIPT),
            failing: AtomicBool::new(false),
        })
    }

    fn ip_key(&self, ip: IpAddr) -> String {
        format!("{}:login:ip:{ip}", self.prefix)
    }

    fn account_key(&self, account: &str) -> String {
        let digest = Sha256::digest(account.as_bytes());
        format!("{}:login:account:{}", self.prefix, hex::encode(digest))
    }

    /// Whether the fleet has seen too many failures from `ip` or for `account`; `false` when
    /// Redis does not answer (counted in `errors`).
    pub async fn blocked(&self, ip: IpAddr, account: &str, errors: &AtomicU64) -> bool {
        let keys = [self.ip_key(ip), self.account_key(account)];
        let counts: Result<Vec<Option<u32>>, _> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn.clone())
            .await;
        self.settle(counts, errors).is_some_and(|counts| {
            let ip_n = counts.first().copied().flatten().unwrap_or(0);
            let account_n = counts.get(1).copied().flatten().unwrap_or(0);
            ip_n >= self.per_ip || account_n >= self.per_account
        })
    }

    /// Count one failure from `ip` for `account` (a Redis error is counted in `errors`).
    pub async fn fail(&self, ip: IpAddr, account: &str, errors: &AtomicU64) {
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        let r = self
            .script
            .key(self.ip_key(ip))
            .key(self.account_key(account))
            .arg(window_ms.max(1))
            .invoke_async::<i64>(&mut self.conn.clone())
            .await;
        self.settle(r, errors);
    }

    /// Forget `account`'s failures (a successful login; a Redis error is counted in `errors`).
    pub async fn reset(&self, account: &str, errors: &AtomicU64) {
        let r = redis::cmd("DEL")
            .arg(self.account_key(account))
            .query_async::<i64>(&mut self.conn.clone())
            .await;
        self.settle(r, errors);
    }

    /// The value of a command, or `None` on an error, which is counted in `errors`; one
    /// warning when Redis starts failing, one info line when it answers again.
    fn settle<T>(&self, r: Result<T, redis::RedisError>, errors: &AtomicU64) -> Option<T> {
        match r {
            Ok(v) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("throttle store answering again; shared login counts resume");
                }
                Some(v)
            }
            Err(e) => {
                errors.fetch_add(1, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "throttle store unavailable; this node's own login throttle applies meanwhile"
                    );
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_hide_their_password() {
        let l =
            ThrottleLocation::parse("redis://u:secret@127.0.0.1:6379/2?prefix=fleet-a").unwrap();
        assert_eq!(l.0.prefix, "fleet-a");
        assert!(!format!("{l:?}").contains("secret"));
        assert_eq!(
            ThrottleLocation::parse("redis://127.0.0.1:6379")
                .unwrap()
                .0
                .prefix,
            DEFAULT_PREFIX
        );
        for bad in [
            "127.0.0.1:6379",
            "rediss://127.0.0.1:6379",
            "redis://",
            "redis://127.0.0.1:6379?db=2",
            "redis://127.0.0.1:6379?prefix=",
            "redis://127.0.0.1:6379?prefix=a%20b c",
        ] {
            assert!(ThrottleLocation::parse(bad).is_err(), "{bad}");
        }
        let e = ThrottleLocation::parse("http://u:secret@h:1").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }
}

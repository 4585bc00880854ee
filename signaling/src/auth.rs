//! Accounts: username rule, Argon2id password hashing off the runtime with bounded concurrency,
//! HS256 access/refresh tokens with pinned algorithm, audience and issuer, login throttling.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm as ArgonAlg, Argon2, Params, Version};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

/// Shortest allowed username.
pub const USERNAME_MIN: usize = 3;
/// Longest allowed username.
pub const USERNAME_MAX: usize = 32;
/// Shortest allowed password, bytes.
pub const PASSWORD_MIN: usize = 8;
/// Longest allowed password, bytes (bounds hashing work per request).
pub const PASSWORD_MAX: usize = 256;

/// Why a username was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsernameError {
    /// Fewer than 3 or more than 32 characters after trimming.
    #[error("username must be {USERNAME_MIN}-{USERNAME_MAX} characters")]
    Length,
    /// A character outside [a-z0-9._-] (after ASCII lowercasing).
    #[error("username may only contain a-z, 0-9, '.', '_' and '-'")]
    Charset,
}

/// Normalise a username: trim, lowercase ASCII, then require [a-z0-9._-]{3,32}.
pub fn normalize_username(raw: &str) -> Result<String, UsernameError> {
    let s = raw.trim().to_ascii_lowercase();
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(UsernameError::Charset);
    }
    if s.len() < USERNAME_MIN || s.len() > USERNAME_MAX {
        return Err(UsernameError::Length);
    }
    Ok(s)
}

fn new_salt() -> Result<SaltString, HashError> {
    let bytes: [u8; 16] = rand::random();
    SaltString::encode_b64(&bytes).map_err(|e| HashError::Hash(e.to_string()))
}

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Argon2Cost {
    /// Memory, KiB (OWASP minimum 19456).
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl Default for Argon2Cost {
    fn default() -> Self {
        // OWASP password storage cheat sheet: m=19 MiB, t=2, p=1.
        Self {
            m_kib: 19_456,
            t: 2,
            p: 1,
        }
    }
}

/// Password hashing failures.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// The cost parameters are invalid.
    #[error("invalid argon2 parameters: {0}")]
    Params(String),
    /// Hashing failed.
    #[error("hashing failed: {0}")]
    Hash(String),
    /// All hashing slots stayed busy for too long.
    #[error("password hashing is overloaded")]
    Overloaded,
}

/// Argon2id hasher that runs on the blocking pool, at most `permits` at once.
pub struct PasswordHasher {
    argon: Argon2<'static>,
    permits: Arc<Semaphore>,
    dummy_hash: String,
    queue_timeout: Duration,
}

impl PasswordHasher {
    /// Build a hasher; computes a dummy hash (used for unknown users) with the same cost.
    pub fn new(cost: Argon2Cost, concurrency: usize) -> Result<Self, HashError> {
        let params = Params::new(cost.m_kib, cost.t, cost.p, None)
            .map_err(|e| HashError::Params(e.to_string()))?;
        let argon = Argon2::new(ArgonAlg::Argon2id, Version::V0x13, params);
        let salt = new_salt()?;
        let dummy_hash = argon
            .hash_password(b"peerlink-dummy-password", &salt)
            .map_err(|e| HashError::Hash(e.to_string()))?
            .to_string();
        Ok(Self {
            argon,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            dummy_hash,
            queue_timeout: Duration::from_secs(10),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Argon2<'static>) -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let permit = tokio::time::timeout(self.queue_timeout, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| HashError::Overloaded)?
            .map_err(|_| HashError::Overloaded)?;
        let argon = self.argon.clone();
        let out = tokio::task::spawn_blocking(move || {
            let r = f(&argon);
            drop(permit);
            r
        })
        .await
        .map_err(|e| HashError::Hash(e.to_string()))?;
        Ok(out)
    }

    /// Hash a new password (PHC string).
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        self.run(move |a| {
            let salt = new_salt()?;
            a.hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| HashError::Hash(e.to_string()))
        })
        .await?
    }

    /// Verify `password` against `stored`, or against the dummy hash when the user is unknown
    /// (same cost either way), returning false then.
    pub async fn verify(
        &self,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, HashError> {
        let known = stored.is_some();
        let phc = stored.unwrap_or_else(|| self.dummy_hash.clone());
        let ok = self
            .run(move |a| match PasswordHash::new(&phc) {
                Ok(parsed) => a.verify_password(password.as_bytes(), &parsed).is_ok(),
                Err(_) => false,
            })
            .await?;
        Ok(ok && known)
    }
}

/// Token kinds, each with its own audience so one cannot stand in for the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// Short-lived access token for the API and WebSocket.
    Access,
    /// Longer-lived token accepted only by `/v1/refresh`.
    Refresh,
}

/// JWT claims.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// Username.
    pub sub: String,
    /// Audience.
    pub aud: String,
    /// Issuer.
    pub iss: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Token id: refresh tokens only, the key (hashed) of the token's record in the store,
    /// through which it is rotated and revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// Token verification failures.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Expired.
    #[error("token expired")]
    Expired,
    /// Any other defect (signature, algorithm, audience, issuer, shape).
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Issues and checks HS256 tokens.
pub struct Tokens {
    enc: EncodingKey,
    dec: DecodingKey,
    issuer: String,
    access_audience: String,
    refresh_audience: String,
    /// Access token lifetime.
    pub access_ttl: Duration,
    /// Refresh token lifetime.
    pub refresh_ttl: Duration,
}

impl Tokens {
    /// New issuer with the given secret and lifetimes.
    pub fn new(secret: &[u8], issuer: &str, access_ttl: Duration, refresh_ttl: Duration) -> Self {
        Self {
            enc: EncodingKey::from_secret(secret),
            dec: DecodingKey::from_secret(secret),
            issuer: issuer.to_owned(),
            access_audience: "peerlink-signaling".to_owned(),
            refresh_audience: "peerlink-refresh".to_owned(),
            access_ttl,
            refresh_ttl,
        }
    }

    /// The audience of access tokens.
    pub fn access_audience(&self) -> &str {
        &self.access_audience
    }

    /// Issue a token for `user` at `now_unix`: the token and its expiry. A refresh token
    /// carries a fresh random id ([`Claims::jti`]); see [`Tokens::issue_refresh`].
    pub fn issue(
        &self,
        kind: TokenKind,
        user: &str,
        now_unix: u64,
    ) -> Result<(String, u64), TokenError> {
        self.issue_claims(kind, user, now_unix)
            .map(|(t, c)| (t, c.exp))
    }

    /// Issue a refresh token: the token and its claims (whose `jti` the store keeps).
    pub fn issue_refresh(&self, user: &str, now_unix: u64) -> Result<(String, Claims), TokenError> {
        self.issue_claims(TokenKind::Refresh, user, now_unix)
    }

    fn issue_claims(
        &self,
        kind: TokenKind,
        user: &str,
        now_unix: u64,
    ) -> Result<(String, Claims), TokenError> {
        let (aud, ttl) = match kind {
            TokenKind::Access => (&self.access_audience, self.access_ttl),
            TokenKind::Refresh => (&self.refresh_audience, self.refresh_ttl),
        };
        let exp = now_unix + ttl.as_secs();
        let jti = (kind == TokenKind::Refresh).then(|| hex::encode(rand::random::<[u8; 16]>()));
        let claims = Claims {
            sub: user.to_owned(),
            aud: aud.clone(),
            iss: self.issuer.clone(),
            exp,
            iat: now_unix,
            jti,
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.enc)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        Ok((t, claims))
    }

    /// Verify a token of `kind`: HS256 only, audience and issuer pinned, expiry enforced
    /// (no leeway) against `now_unix`.
    pub fn verify(
        &self,
        kind: TokenKind,
        token: &str,
        now_unix: u64,
    ) -> Result<Claims, TokenError> {
        let aud = match kind {
            TokenKind::Access => &self.access_audience,
            TokenKind::Refresh => &self.refresh_audience,
        };
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&[aud]);
        v.set_issuer(&[&self.issuer]);
        v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        v.leeway = 0;
        // Expiry is checked below against the caller's clock, so tests can pass `now`.
        v.validate_exp = false;
        let data = jsonwebtoken::decode::<Claims>(token, &self.dec, &v)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        if data.claims.exp <= now_unix {
            return Err(TokenError::Expired);
        }
        if normalize_username(&data.claims.sub).as_deref() != Ok(data.claims.sub.as_str()) {
            return Err(TokenError::Invalid("bad subject".into()));
        }
        if kind == TokenKind::Refresh && data.claims.jti.as_deref().is_none_or(str::is_empty) {
            return Err(TokenError::Invalid("refresh token without an id".into()));
        }
        Ok(data.claims)
    }
}

/// Failure throttle: at most `limit` failures per key in a sliding `window`.
pub struct Throttle {
    limit: u32,
    window: Duration,
    max_keys: usize,
    entries: Mutex<HashMap<ThrottleKey, (Instant, u32)>>,
}

/// What a throttle counts by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ThrottleKey {
    /// A normalised account name (whether or not it exists).
    Account(String),
    /// A client IP.
    Ip(IpAddr),
}

impl Throttle {
    /// `limit` failures per `window`; the table keeps at most `max_keys` keys.
    pub fn new(limit: u32, window: Duration, max_keys: usize) -> Self {
        Self {
            limit,
            window,
            max_keys,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key` is currently blocked.
    pub fn blocked(&self, key: &ThrottleKey, now: Instant) -> bool {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some((start, n)) => now.duration_since(*start) < self.window && *n >= self.limit,
            None => false,
        }
    }

    /// Count one failure for `key`.
    pub fn fail(&self, key: ThrottleKey, now: Instant) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.max_keys && !map.contains_key(&key) {
            let window = self.window;
            map.retain(|_, (start, _)| now.duration_since(*start) < window);
            if map.len() >= self.max_keys {
                // Still full of live entries: keep the table bounded; this key is not tracked.
                return;
            }
        }
        let e = map.entry(key).or_insert((now, 0));
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    /// Forget `key` (after a successful login).
    pub fn reset(&self, key: &ThrottleKey) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert_eq!(normalize_username("  Alice_1 ").unwrap(), "alice_1");
        assert_eq!(normalize_username("ab"), Err(UsernameError::Length));
        assert_eq!(normalize_username("a b c"), Err(UsernameError::Charset));
        assert_eq!(normalize_username("ÄBC"), Err(UsernameError::Charset));
        assert_eq!(
            normalize_username(&"a".repeat(33)),
            Err(UsernameError::Length)
        );
        assert_eq!(normalize_username("a.b-c_d").unwrap(), "a.b-c_d");
    }

    #[test]
    fn tokens_pin_audience_and_expiry() {
        let t = Tokens::new(
            b"secret-secret-secret-secret-1234",
            "iss",
            Duration::from_secs(60),
            Duration::from_secs(600),
        );
        let (a, exp) = t.issue(TokenKind::Access, "alice", 1000).unwrap();
        assert_eq!(exp, 1060);
        assert_eq!(t.verify(TokenKind::Access, &a, 1059).unwrap().sub, "alice");
        assert!(matches!(
            t.verify(TokenKind::Access, &a, 1060),
            Err(TokenError::Expired)
        ));
        assert!(matches!(
            t.verify(TokenKind::Refresh, &a, 1000),
            Err(TokenError::Invalid(_))
        ));
        let other = Tokens::new(
            b"other-secret-other-secret-123456",
            "iss",
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        assert!(other.verify(TokenKind::Access, &a, 1000).is_err());
    }

    #[test]
    fn throttle_window() {
        let th = Throttle::new(2, Duration::from_secs(10), 2);
        let now = Instant::now();
        let k = ThrottleKey::Account("a".into());
        th.fail(k.clone(), now);
        assert!(!th.blocked(&k, now));
        th.fail(k.clone(), now);
        assert!(th.blocked(&k, now));
        assert!(!th.blocked(&k, now + Duration::from_secs(11)));
        th.reset(&k);
        assert!(!th.blocked(&k, now));
    }
}

//! Credentials: STUN long-term and short-term keys, constant-time comparison, and TURN REST
//! ephemeral credentials compatible with coturn's `use-auth-secret`.
//!
//! Long-term (RFC 8489 section 9.2): key = MD5(username ":" realm ":" password), used as the
//! HMAC key of MESSAGE-INTEGRITY. Short-term (ICE, section 9.1): key = the password itself.
//! Strings are used as given: SASLprep/OpaqueString is the identity for printable ASCII, which
//! is what this project issues; callers holding other input must prepare it first.

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;
use subtle::ConstantTimeEq;

/// The long-term credential key: MD5(username ":" realm ":" password).
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    long_term_key_bytes(username.as_bytes(), realm.as_bytes(), password.as_bytes())
}

/// [`long_term_key`] over raw bytes (e.g. a USERNAME taken from a message).
pub fn long_term_key_bytes(username: &[u8], realm: &[u8], password: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(username);
    h.update(b":");
    h.update(realm);
    h.update(b":");
    h.update(password);
    h.finalize().into()
}

/// The short-term credential key (ICE): the password bytes. OpaqueString preparation is the
/// identity for the ASCII passwords ICE generates (`ice-pwd` is restricted to ice-chars).
pub fn short_term_key(password: &str) -> &[u8] {
    password.as_bytes()
}

/// Compares two byte strings in constant time (for equal lengths; the length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// TURN REST API ephemeral credentials, as coturn's `use-auth-secret` / `static-auth-secret`.
///
/// The username is `<expiry-unix-time>:<user>`; the password is
/// base64(HMAC-SHA1(shared secret, username)). The relay recomputes the password from the
/// username and each configured secret (several during rotation), then checks
/// MESSAGE-INTEGRITY with `long_term_key(username, realm, password)`.
pub mod rest {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    use super::{Hmac, Mac, Sha1};
    use crate::attrs::MAX_USERNAME_BYTES;

    /// Most secrets [`validate`] accepts at once (current and previous ones during rotation).
    pub const MAX_SECRETS: usize = 4;
    /// Length of a password: base64 of a 20-byte HMAC-SHA1.
    pub const PASSWORD_LEN: usize = 28;

    /// Why a REST username was refused.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
    pub enum RestError {
        /// No `:` separating the expiry from the user.
        #[error("username has no '<expiry>:' prefix")]
        NoTimestamp,
        /// The expiry is empty, not decimal digits, or overflows.
        #[error("username expiry is not a number")]
        NotNumeric,
        /// The expiry is in the past.
        #[error("credentials expired at {expiry} (now {now})")]
        Expired {
            /// Expiry from the username.
            expiry: u64,
            /// Current time.
            now: u64,
        },
        /// The expiry is further ahead than the maximum TTL.
        #[error("credentials expire at {expiry}, beyond now {now} + max ttl {max_ttl}")]
        TooFarInFuture {
            /// Expiry from the username.
            expiry: u64,
            /// Current time.
            now: u64,
            /// The maximum TTL.
            max_ttl: u64,
        },
        /// The username is longer than USERNAME allows.
        #[error("username of {len} bytes exceeds {max}")]
        UsernameTooLong {
            /// Username length.
            len: usize,
            /// Maximum.
            max: usize,
        },
        /// No secret configured.
        #[error("no shared secret configured")]
        NoSecrets,
        /// More than [`MAX_SECRETS`] secrets.
        #[error("more than {max} shared secrets")]
        TooManySecrets {
            /// Maximum.
            max: usize,
        },
    }

    /// The username for a user and expiry: `"<expiry>:<user>"`.
    pub fn username(expiry_unix: u64, user: &str) -> String {
        format!("{expiry_unix}:{user}")
    }

    /// The raw password bytes: base64(HMAC-SHA1(secret, username)) without allocating.
    pub fn password_bytes(secret: &[u8], username: &str) -> [u8; PASSWORD_LEN] {
        let mut out = [0u8; PASSWORD_LEN];
        // HMAC accepts keys of any length; base64 of 20 bytes is exactly 28 bytes.
        if let Ok(mut mac) = <Hmac<Sha1> as Mac>::new_from_slice(secret) {
            mac.update(username.as_bytes());
            let tag = mac.finalize().into_bytes();
            let _ = STANDARD.encode_slice(tag, &mut out);
        }
        out
    }

    /// The password: base64(HMAC-SHA1(secret, username)).
    pub fn password(secret: &[u8], username: &str) -> String {
        String::from_utf8_lossy(&password_bytes(secret, username)).into_owned()
    }

    /// Fresh credentials `(username, password)` for `user`, valid until `now_unix + ttl_secs`.
    pub fn credentials(
        secret: &[u8],
        user: &str,
        now_unix: u64,
        ttl_secs: u64,
    ) -> (String, String) {
        let name = username(now_unix.saturating_add(ttl_secs), user);
        let pass = password(secret, &name);
        (name, pass)
    }

    /// The expiry time in a REST username.
    pub fn expiry(username: &str) -> Result<u64, RestError> {
        let (ts, _user) = username.split_once(':').ok_or(RestError::NoTimestamp)?;
        if ts.is_empty() || ts.len() > 20 || !ts.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RestError::NotNumeric);
        }
        ts.parse::<u64>().map_err(|_| RestError::NotNumeric)
    }

    /// The candidate passwords for a username, one per secret, in the secrets' order.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct RestPassword {
        passwords: [[u8; PASSWORD_LEN]; MAX_SECRETS],
        count: usize,
        expiry: u64,
    }

    impl RestPassword {
        /// The password for the first secret.
        pub fn first(&self) -> &str {
            as_str(&self.passwords[0])
        }
        /// All candidate passwords (try each during secret rotation).
        pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
            self.passwords[..self.count].iter().map(as_str)
        }
        /// Number of candidates (= number of secrets).
        pub fn len(&self) -> usize {
            self.count
        }
        /// Never true for a value returned by [`validate`].
        pub fn is_empty(&self) -> bool {
            self.count == 0
        }
        /// The expiry time from the username.
        pub fn expiry(&self) -> u64 {
            self.expiry
        }
        /// The long-term keys to check MESSAGE-INTEGRITY with, one per candidate password.
        pub fn long_term_keys<'s>(
            &'s self,
            username: &'s str,
            realm: &'s str,
        ) -> impl Iterator<Item = [u8; 16]> + 's {
            self.iter()
                .map(move |p| super::long_term_key(username, realm, p))
        }
    }

    fn as_str(p: &[u8; PASSWORD_LEN]) -> &str {
        // Base64 output is ASCII.
        core::str::from_utf8(p).unwrap_or("")
    }

    /// Checks a REST username's expiry (not expired, not beyond `now + max_ttl_secs`, numeric)
    /// and computes the candidate password for each secret.
    pub fn validate<'s>(
        secrets: impl IntoIterator<Item = &'s [u8]>,
        username: &str,
        now_unix: u64,
        max_ttl_secs: u64,
    ) -> Result<RestPassword, RestError> {
        if username.len() > MAX_USERNAME_BYTES {
            return Err(RestError::UsernameTooLong {
                len: username.len(),
                max: MAX_USERNAME_BYTES,
            });
        }
        let expiry = expiry(username)?;
        if expiry < now_unix {
            return Err(RestError::Expired {
                expiry,
                now: now_unix,
            });
        }
        if expiry > now_unix.saturating_add(max_ttl_secs) {
            return Err(RestError::TooFarInFuture {
                expiry,
                now: now_unix,
                max_ttl: max_ttl_secs,
            });
        }
        let mut out = RestPassword {
            passwords: [[0; PASSWORD_LEN]; MAX_SECRETS],
            count: 0,
            expiry,
        };
        for secret in secrets {
            let slot = out
                .passwords
                .get_mut(out.count)
                .ok_or(RestError::TooManySecrets { max: MAX_SECRETS })?;
            *slot = password_bytes(secret, username);
            out.count += 1;
        }
        if out.count == 0 {
            return Err(RestError::NoSecrets);
        }
        Ok(out)
    }
}

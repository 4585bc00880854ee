//! Durable storage behind the [`Store`] trait: accounts, contacts, devices and their message
//! cursors, the per-recipient message inbox and refresh tokens. Two implementations:
//!
//! - [`SqliteStore`]: the embedded default, one file (WAL, `synchronous=FULL`: a commit is
//!   fsync'd before it returns). The nodes of a fleet on one host can share the file.
//! - [`PgStore`]: PostgreSQL, for a fleet whose nodes run on several hosts (`--store
//!   postgres://...`), with a bounded connection pool and `synchronous_commit = on` on every
//!   connection.
//!
//! Both apply versioned migrations embedded in the binary when they open, and refuse a
//! database whose schema is newer than the binary knows. Methods block; async code calls them
//! through [`Db`], which runs them on the blocking pool. [`StoreLocation`] parses the `store`
//! setting and [`open`] opens either.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

mod postgres;
mod sqlite;

pub use self::postgres::{PG_SCHEMA_VERSION, PgOptions, PgStore};
pub use self::sqlite::{SQLITE_SCHEMA_VERSION, SqliteStore};

/// Most devices remembered per user; the least recently seen is forgotten beyond this.
pub const MAX_DEVICES_PER_USER: usize = 16;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O error, disk full, corrupt database...). Nothing was committed.
    #[error("storage failure: {0}")]
    Backend(String),
    /// The backend cannot be reached right now (database server down, no pooled connection
    /// within the checkout timeout, statement timeout). Nothing was committed; the same call
    /// may succeed later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The username is taken.
    #[error("user already exists")]
    UserExists,
    /// The user does not exist.
    #[error("no such user")]
    NoSuchUser,
}

/// A message as stored for its recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Per-recipient sequence.
    pub seq: u64,
    /// Sender username.
    pub sender: String,
    /// Sender's client message id.
    pub client_id: String,
    /// Text.
    pub body: String,
    /// When it was stored, unix ms.
    pub stored_ms: u64,
}

/// Result of storing a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Newly stored with this recipient sequence.
    Stored {
        /// Recipient sequence.
        seq: u64,
        /// Stored at, unix ms.
        stored_ms: u64,
    },
    /// The same sender already stored this id with identical content: nothing new stored.
    Duplicate {
        /// When the original was stored, unix ms.
        stored_ms: u64,
    },
    /// The same sender used this id for different content.
    Conflict,
}

/// A device's message cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCursor {
    /// Highest sequence this device acknowledged.
    pub acked_seq: u64,
    /// Highest sequence ever assigned to the user.
    pub last_seq: u64,
}

/// What presenting a refresh token to [`Store::rotate_refresh_token`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The token was live: it is revoked now and its successor is stored for the same user
    /// and device.
    Rotated {
        /// The token's user.
        user: String,
        /// The token's device (its chain).
        device: String,
    },
    /// The token had been revoked already (used before, or logged out): every token of its
    /// device is revoked now, the successor is not stored.
    Reused {
        /// The token's user.
        user: String,
        /// The token's device, whose chain is revoked.
        device: String,
    },
    /// The token is past its expiry.
    Expired,
    /// No such token (never issued by this store, or pruned).
    Unknown,
}

/// Storage operations (blocking).
pub trait Store: Send + Sync + 'static {
    /// Create an account; `UserExists` if the name is taken.
    fn create_user(&self, username: &str, pw_hash: &str, now_ms: u64) -> Result<(), StoreError>;
    /// The password hash of a user, if the user exists.
    fn password_hash(&self, username: &str) -> Result<Option<String>, StoreError>;
    /// Whether the user exists.
    fn user_exists(&self, username: &str) -> Result<bool, StoreError>;
    /// Add `contact` to `owner`'s buddy list (idempotent); `NoSuchUser` if it does not exist.
    fn add_contact(&self, owner: &str, contact: &str) -> Result<(), StoreError>;
    /// Remove `contact` from `owner`'s buddy list (idempotent).
    fn remove_contact(&self, owner: &str, contact: &str) -> Result<(), StoreError>;
    /// `owner`'s buddy list, sorted (bytewise).
    fn contacts(&self, owner: &str) -> Result<Vec<String>, StoreError>;
    /// Users that have `user` in their buddy list, sorted (bytewise).
    fn watchers(&self, user: &str) -> Result<Vec<String>, StoreError>;
    /// Register (or touch) a device of `user`; returns its cursor.
    fn open_device(
        &self,
        user: &str,
        device: &str,
        now_ms: u64,
    ) -> Result<DeviceCursor, StoreError>;
    /// Store a message durably (committed and synced on return), deduplicated by
    /// (sender, client_id).
    fn store_message(
        &self,
        sender: &str,
        recipient: &str,
        client_id: &str,
        body: &str,
        now_ms: u64,
    ) -> Result<SendOutcome, StoreError>;
    /// Messages of `user` with sequence above `after`, oldest first, at most `limit`.
    fn pending(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError>;
    /// Forget message ids (the deduplication record) stored before `before_ms`; returns how
    /// many. Resends older than that are stored again as new messages.
    fn prune_message_ids(&self, before_ms: u64) -> Result<u64, StoreError>;
    /// Move a device's cursor to `seq` (never backwards, never past the last sequence) and
    /// delete messages every device has acknowledged. Returns the new cursor.
    fn ack(&self, user: &str, device: &str, seq: u64) -> Result<u64, StoreError>;
    /// Remember a newly issued refresh token (by the hash of its id) for `user`'s `device`.
    fn add_refresh_token(
        &self,
        token_hash: &[u8],
        user: &str,
        device: &str,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(), StoreError>;
    /// Rotate: if `old_hash` is live, revoke it and store `new_hash` (same user and device,
    /// expiring at `new_expires_ms`) in one transaction. A revoked `old_hash` revokes its
    /// whole device chain instead (a stolen token was used twice).
    fn rotate_refresh_token(
        &self,
        old_hash: &[u8],
        new_hash: &[u8],
        new_expires_ms: u64,
        now_ms: u64,
    ) -> Result<RefreshOutcome, StoreError>;
    /// Revoke every refresh token of the device that `token_hash` belongs to (logout).
    /// Returns whether the token was known.
    fn revoke_refresh_chain(&self, token_hash: &[u8]) -> Result<bool, StoreError>;
    /// Forget refresh tokens that expired before `before_ms`; returns how many.
    fn prune_refresh_tokens(&self, before_ms: u64) -> Result<u64, StoreError>;
}

/// The content digest messages are deduplicated by (recipient and body).
pub(crate) fn content_digest(recipient: &str, body: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update((recipient.len() as u64).to_be_bytes());
    h.update(recipient.as_bytes());
    h.update(body.as_bytes());
    h.finalize().to_vec()
}

/// The hash a refresh token id is stored under (the id itself never is).
pub fn refresh_token_hash(jti: &str) -> Vec<u8> {
    Sha256::digest(jti.as_bytes()).to_vec()
}

pub(crate) fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The refusal of a database whose schema is newer than this binary.
pub(crate) fn newer_schema(found: i64, known: i64) -> StoreError {
    StoreError::Backend(format!(
        "database schema version {found} is newer than this binary supports ({known}): \
         upgrade peerlink-signaling"
    ))
}

/// Where the store lives: the `store` setting (`--store`, `PEERLINK_STORE`).
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// An SQLite database file (`sqlite:PATH` or a bare path).
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://user:password@host:port/db`, or `postgresql://`).
    Postgres(String),
}

impl std::fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl StoreLocation {
    /// Parse a `store` value: `sqlite:PATH`, `postgres://...` / `postgresql://...`, or a bare
    /// path (SQLite). A PostgreSQL URL is checked here (syntax only), so a malformed one is
    /// refused before anything starts. Errors never repeat a password.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("store is empty (use sqlite:PATH or postgres://...)".into());
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            s.parse::<::postgres::Config>()
                .map_err(|e| format!("bad PostgreSQL URL {}: {e}", redact_url(s)))?;
            return Ok(Self::Postgres(s.to_owned()));
        }
        if let Some(path) = s.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("sqlite: needs a path (sqlite:/var/lib/peerlink/signaling.db)".into());
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!(
                "unknown store scheme {scheme:?} (use sqlite:PATH or postgres://...)"
            ));
        }
        Ok(Self::Sqlite(PathBuf::from(s)))
    }

    /// The location with any password replaced by `***`, for logs and errors.
    pub fn redacted(&self) -> String {
        match self {
            Self::Sqlite(p) => format!("sqlite:{}", p.display()),
            Self::Postgres(url) => redact_url(url),
        }
    }
}

/// `scheme://user:***@host...`: the URL without its password.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, tail) = match rest.find('/') {
        Some(n) => rest.split_at(n),
        None => (rest, ""),
    };
    match auth.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Open the store at `location` (creating or migrating its schema): SQLite, or PostgreSQL
/// with `pg` (pool and timeouts). A PostgreSQL server that cannot be reached, refuses the
/// credentials or holds a newer schema is an error here, before the node starts.
pub fn open(location: &StoreLocation, pg: &PgOptions) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match location {
        StoreLocation::Sqlite(path) => Arc::new(SqliteStore::open(path)?),
        StoreLocation::Postgres(url) => Arc::new(PgStore::connect(url, pg)?),
    })
}

/// Async handle to a [`Store`]: every call runs on the blocking pool, its duration recorded
/// in the store latency histogram.
#[derive(Clone)]
pub struct Db(pub Arc<dyn Store>, pub Arc<crate::metrics::StoreLatency>);

impl Db {
    /// Run `f` against the store off the async runtime.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let s = self.0.clone();
        let started = std::time::Instant::now();
        let r = tokio::task::spawn_blocking(move || f(s.as_ref()))
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?;
        self.1.record(started.elapsed());
        r
    }
}

/// Default pool and timeout settings, shared by the settings and [`PgOptions::default`].
pub(crate) const DEFAULT_POOL_SIZE: u32 = 8;
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_redact() {
        assert_eq!(
            StoreLocation::parse("sqlite:/var/x.db").unwrap(),
            StoreLocation::Sqlite("/var/x.db".into())
        );
        assert_eq!(
            StoreLocation::parse("sqlite:///var/x.db").unwrap(),
            StoreLocation::Sqlite("/var/x.db".into())
        );
        assert_eq!(
            StoreLocation::parse("rel/x.db").unwrap(),
            StoreLocation::Sqlite("rel/x.db".into())
        );
        let pg = StoreLocation::parse("postgres://u:secret@127.0.0.1:5432/db").unwrap();
        assert_eq!(pg.redacted(), "postgres://u:***@127.0.0.1:5432/db");
        assert!(!format!("{pg:?}").contains("secret"));
        let e = StoreLocation::parse("postgres://u:secret@127.0.0.1:notaport/db").unwrap_err();
        assert!(e.starts_with("bad PostgreSQL URL"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let e = StoreLocation::parse("mysql://x/y").unwrap_err();
        assert!(e.contains("unknown store scheme \"mysql\""), "{e}");
        assert!(StoreLocation::parse("").is_err());
        assert!(StoreLocation::parse("sqlite:").is_err());
    }
}

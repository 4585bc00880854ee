//! Durable storage behind the [`Store`] trait: accounts, contacts, devices and their message
//! cursors, and the per-recipient message inbox. [`SqliteStore`] is the embedded default (WAL,
//! `synchronous=FULL`: a commit is fsync'd before it returns). Methods block; async code calls
//! them through [`Db`], which runs them on the blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sha2::{Digest, Sha256};

/// Most devices remembered per user; the least recently seen is forgotten beyond this.
pub const MAX_DEVICES_PER_USER: usize = 16;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O error, disk full, corrupt database...). Nothing was committed.
    #[error("storage failure: {0}")]
    Backend(String),
    /// The username is taken.
    #[error("user already exists")]
    UserExists,
    /// The user does not exist.
    #[error("no such user")]
    NoSuchUser,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
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
    /// `owner`'s buddy list, sorted.
    fn contacts(&self, owner: &str) -> Result<Vec<String>, StoreError>;
    /// Users that have `user` in their buddy list.
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
}

/// SQLite implementation.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn content_digest(recipient: &str, body: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update((recipient.len() as u64).to_be_bytes());
    h.update(recipient.as_bytes());
    h.update(body.as_bytes());
    h.finalize().to_vec()
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory database (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL: readers do not block the writer; synchronous=FULL: the WAL is fsync'd at every
        // commit, so an acknowledged message survives kill -9 and power loss.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS users(
                 username TEXT PRIMARY KEY, pw_hash TEXT NOT NULL, created_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS contacts(
                 owner TEXT NOT NULL, contact TEXT NOT NULL, PRIMARY KEY(owner, contact));
             CREATE INDEX IF NOT EXISTS contacts_by_contact ON contacts(contact);
             CREATE TABLE IF NOT EXISTS devices(
                 username TEXT NOT NULL, device TEXT NOT NULL, acked_seq INTEGER NOT NULL,
                 last_seen_ms INTEGER NOT NULL, PRIMARY KEY(username, device));
             CREATE TABLE IF NOT EXISTS inbox_seq(
                 username TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS messages(
                 recipient TEXT NOT NULL, seq INTEGER NOT NULL, sender TEXT NOT NULL,
                 client_id TEXT NOT NULL, body TEXT NOT NULL, stored_ms INTEGER NOT NULL,
                 PRIMARY KEY(recipient, seq));
             CREATE TABLE IF NOT EXISTS message_ids(
                 sender TEXT NOT NULL, client_id TEXT NOT NULL, digest BLOB NOT NULL,
                 stored_ms INTEGER NOT NULL, PRIMARY KEY(sender, client_id));",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// Cap the database at its current size plus `extra_pages` pages (`max_page_count`):
    /// writes needing more space then fail as on a full disk. For quotas and fault tests.
    pub fn cap_size(&self, extra_pages: u64) -> Result<(), StoreError> {
        let c = self.conn();
        let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        c.pragma_update(None, "max_page_count", pages.saturating_add(i(extra_pages)))?;
        Ok(())
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cleanup(tx: &rusqlite::Transaction<'_>, user: &str) -> Result<(), StoreError> {
        tx.execute(
            "DELETE FROM messages WHERE recipient = ?1 AND seq <=
                 (SELECT MIN(acked_seq) FROM devices WHERE username = ?1)",
            params![user],
        )?;
        Ok(())
    }

    fn last_seq(tx: &rusqlite::Transaction<'_>, user: &str) -> Result<u64, StoreError> {
        let v: Option<i64> = tx
            .query_row(
                "SELECT last_seq FROM inbox_seq WHERE username = ?1",
                params![user],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.map(u).unwrap_or(0))
    }
}

impl Store for SqliteStore {
    fn create_user(&self, username: &str, pw_hash: &str, now_ms: u64) -> Result<(), StoreError> {
        let conn = self.conn();
        match conn.execute(
            "INSERT INTO users(username, pw_hash, created_ms) VALUES (?1, ?2, ?3)",
            params![username, pw_hash, i(now_ms)],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::UserExists)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn password_hash(&self, username: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT pw_hash FROM users WHERE username = ?1",
                params![username],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn user_exists(&self, username: &str) -> Result<bool, StoreError> {
        Ok(self.password_hash(username)?.is_some())
    }

    fn add_contact(&self, owner: &str, contact: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        let exists: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM users WHERE username = ?1",
                params![contact],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_none() {
            return Err(StoreError::NoSuchUser);
        }
        conn.execute(
            "INSERT OR IGNORE INTO contacts(owner, contact) VALUES (?1, ?2)",
            params![owner, contact],
        )?;
        Ok(())
    }

    fn remove_contact(&self, owner: &str, contact: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM contacts WHERE owner = ?1 AND contact = ?2",
            params![owner, contact],
        )?;
        Ok(())
    }

    fn contacts(&self, owner: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut st =
            conn.prepare("SELECT contact FROM contacts WHERE owner = ?1 ORDER BY contact")?;
        let rows = st.query_map(params![owner], |r| r.get(0))?;
        Ok(rows.collect::<Result<Vec<String>, _>>()?)
    }

    fn watchers(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut st =
            conn.prepare("SELECT owner FROM contacts WHERE contact = ?1 ORDER BY owner")?;
        let rows = st.query_map(params![user], |r| r.get(0))?;
        Ok(rows.collect::<Result<Vec<String>, _>>()?)
    }

    fn open_device(
        &self,
        user: &str,
        device: &str,
        now_ms: u64,
    ) -> Result<DeviceCursor, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO devices(username, device, acked_seq, last_seen_ms) VALUES (?1, ?2, 0, ?3)
             ON CONFLICT(username, device) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
            params![user, device, i(now_ms)],
        )?;
        let count: i64 = tx.query_row(
            "SELECT COUNT(*) FROM devices WHERE username = ?1",
            params![user],
            |r| r.get(0),
        )?;
        let excess = u(count).saturating_sub(MAX_DEVICES_PER_USER as u64);
        if excess > 0 {
            tx.execute(
                "DELETE FROM devices WHERE rowid IN (SELECT rowid FROM devices
                     WHERE username = ?1 AND device <> ?2 ORDER BY last_seen_ms LIMIT ?3)",
                params![user, device, i(excess)],
            )?;
            Self::cleanup(&tx, user)?;
        }
        let acked: i64 = tx.query_row(
            "SELECT acked_seq FROM devices WHERE username = ?1 AND device = ?2",
            params![user, device],
            |r| r.get(0),
        )?;
        let last_seq = Self::last_seq(&tx, user)?;
        tx.commit()?;
        Ok(DeviceCursor {
            acked_seq: u(acked),
            last_seq,
        })
    }

    fn store_message(
        &self,
        sender: &str,
        recipient: &str,
        client_id: &str,
        body: &str,
        now_ms: u64,
    ) -> Result<SendOutcome, StoreError> {
        let digest = content_digest(recipient, body);
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let prior: Option<(Vec<u8>, i64)> = tx
            .query_row(
                "SELECT digest, stored_ms FROM message_ids WHERE sender = ?1 AND client_id = ?2",
                params![sender, client_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((d, stored_ms)) = prior {
            return Ok(if d == digest {
                SendOutcome::Duplicate {
                    stored_ms: u(stored_ms),
                }
            } else {
                SendOutcome::Conflict
            });
        }
        let exists: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM users WHERE username = ?1",
                params![recipient],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_none() {
            return Err(StoreError::NoSuchUser);
        }
        let seq = Self::last_seq(&tx, recipient)? + 1;
        tx.execute(
            "INSERT INTO inbox_seq(username, last_seq) VALUES (?1, ?2)
             ON CONFLICT(username) DO UPDATE SET last_seq = excluded.last_seq",
            params![recipient, i(seq)],
        )?;
        tx.execute(
            "INSERT INTO messages(recipient, seq, sender, client_id, body, stored_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![recipient, i(seq), sender, client_id, body, i(now_ms)],
        )?;
        tx.execute(
            "INSERT INTO message_ids(sender, client_id, digest, stored_ms) VALUES (?1, ?2, ?3, ?4)",
            params![sender, client_id, digest, i(now_ms)],
        )?;
        tx.commit()?;
        Ok(SendOutcome::Stored {
            seq,
            stored_ms: now_ms,
        })
    }

    fn pending(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT seq, sender, client_id, body, stored_ms FROM messages
             WHERE recipient = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = st.query_map(params![user, i(after), i(limit as u64)], |r| {
            Ok(StoredMessage {
                seq: u(r.get(0)?),
                sender: r.get(1)?,
                client_id: r.get(2)?,
                body: r.get(3)?,
                stored_ms: u(r.get(4)?),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn prune_message_ids(&self, before_ms: u64) -> Result<u64, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM message_ids WHERE stored_ms < ?1",
            params![i(before_ms)],
        )?;
        Ok(n as u64)
    }

    fn ack(&self, user: &str, device: &str, seq: u64) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let last = Self::last_seq(&tx, user)?;
        let seq = seq.min(last);
        tx.execute(
            "UPDATE devices SET acked_seq = MAX(acked_seq, ?3) WHERE username = ?1 AND device = ?2",
            params![user, device, i(seq)],
        )?;
        Self::cleanup(&tx, user)?;
        let cur: Option<i64> = tx
            .query_row(
                "SELECT acked_seq FROM devices WHERE username = ?1 AND device = ?2",
                params![user, device],
                |r| r.get(0),
            )
            .optional()?;
        tx.commit()?;
        Ok(cur.map(u).unwrap_or(0))
    }
}

/// Async handle to a [`Store`]: every call runs on the blocking pool.
#[derive(Clone)]
pub struct Db(pub Arc<dyn Store>);

impl Db {
    /// Run `f` against the store off the async runtime.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let s = self.0.clone();
        tokio::task::spawn_blocking(move || f(s.as_ref()))
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> SqliteStore {
        let s = SqliteStore::in_memory().unwrap();
        for u in ["alice", "bob"] {
            s.create_user(u, "h", 1).unwrap();
        }
        s
    }

    #[test]
    fn users_unique() {
        let s = store();
        assert!(matches!(
            s.create_user("alice", "x", 2),
            Err(StoreError::UserExists)
        ));
        assert_eq!(s.password_hash("alice").unwrap().as_deref(), Some("h"));
        assert_eq!(s.password_hash("carol").unwrap(), None);
    }

    #[test]
    fn dedup_conflict_and_deletion_after_all_devices_ack() {
        let s = store();
        s.open_device("bob", "phone", 1).unwrap();
        s.open_device("bob", "laptop", 1).unwrap();
        let a = s.store_message("alice", "bob", "m1", "hi", 10).unwrap();
        assert_eq!(
            a,
            SendOutcome::Stored {
                seq: 1,
                stored_ms: 10
            }
        );
        assert_eq!(
            s.store_message("alice", "bob", "m1", "hi", 20).unwrap(),
            SendOutcome::Duplicate { stored_ms: 10 }
        );
        assert_eq!(
            s.store_message("alice", "bob", "m1", "other", 20).unwrap(),
            SendOutcome::Conflict
        );
        assert_eq!(
            s.store_message("alice", "bob", "m2", "second", 30).unwrap(),
            SendOutcome::Stored {
                seq: 2,
                stored_ms: 30
            }
        );
        assert!(matches!(
            s.store_message("alice", "nobody", "m3", "x", 1),
            Err(StoreError::NoSuchUser)
        ));
        assert_eq!(s.pending("bob", 0, 10).unwrap().len(), 2);
        assert_eq!(s.ack("bob", "phone", 99).unwrap(), 2, "clamped to last seq");
        assert_eq!(
            s.pending("bob", 0, 10).unwrap().len(),
            2,
            "laptop has not acked"
        );
        assert_eq!(s.ack("bob", "laptop", 1).unwrap(), 1);
        let left = s.pending("bob", 0, 10).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].seq, 2);
        // Dedup survives deletion of the message itself.
        s.ack("bob", "laptop", 2).unwrap();
        assert!(s.pending("bob", 0, 10).unwrap().is_empty());
        assert_eq!(
            s.store_message("alice", "bob", "m1", "hi", 40).unwrap(),
            SendOutcome::Duplicate { stored_ms: 10 }
        );
        // Pruning the dedup record of m1 (stored at 10) but not m2 (stored at 30).
        assert_eq!(s.prune_message_ids(20).unwrap(), 1);
        assert!(matches!(
            s.store_message("alice", "bob", "m1", "hi", 50).unwrap(),
            SendOutcome::Stored { seq: 3, .. }
        ));
        assert_eq!(
            s.store_message("alice", "bob", "m2", "x", 50).unwrap(),
            SendOutcome::Conflict
        );
    }

    #[test]
    fn disk_full_is_an_error_and_commits_nothing() {
        let s = store();
        // Make the database unable to grow: the next insert needing a page fails SQLITE_FULL.
        {
            let c = s.conn();
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
            c.pragma_update(None, "max_page_count", pages).unwrap();
        }
        let big = "x".repeat(64 * 1024);
        let r = s.store_message("alice", "bob", "m1", &big, 1);
        assert!(matches!(r, Err(StoreError::Backend(_))), "{r:?}");
        assert!(s.pending("bob", 0, 10).unwrap().is_empty());
    }

    #[test]
    fn contacts_and_watchers() {
        let s = store();
        s.add_contact("alice", "bob").unwrap();
        s.add_contact("alice", "bob").unwrap();
        assert!(matches!(
            s.add_contact("alice", "zed"),
            Err(StoreError::NoSuchUser)
        ));
        assert_eq!(s.contacts("alice").unwrap(), vec!["bob".to_string()]);
        assert_eq!(s.watchers("bob").unwrap(), vec!["alice".to_string()]);
        s.remove_contact("alice", "bob").unwrap();
        assert!(s.contacts("alice").unwrap().is_empty());
    }
}

//! The SQLite store: one database file, WAL, `synchronous=FULL` (a commit is fsync'd before
//! it returns), every write transaction `BEGIN IMMEDIATE` (one writer at a time, also across
//! the processes sharing the file). The schema version is `PRAGMA user_version`; a database
//! made before versioning (version 0, tables present) is taken over as version 1, since
//! migration 1 is that schema.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    DeviceCursor, MAX_DEVICES_PER_USER, RefreshOutcome, SendOutcome, Store, StoreError,
    StoredMessage, content_digest, i, newer_schema, u,
};

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// The migrations, in order: entry `n` takes the schema from version `n` to `n + 1`. Never
/// edit one that has shipped; add the next.
const MIGRATIONS: &[&str] = &[
    // 1: accounts, contacts, devices and their cursors, the inbox and the message ids. `IF NOT
    // EXISTS`: databases made before versioning already have these tables.
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
    // 2: refresh tokens (by the hash of their id), with their device chain and revocation.
    "CREATE TABLE refresh_tokens(
         token_hash BLOB PRIMARY KEY, username TEXT NOT NULL, device TEXT NOT NULL,
         expires_ms INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0,
         created_ms INTEGER NOT NULL);
     CREATE INDEX refresh_tokens_by_device ON refresh_tokens(username, device);
     CREATE INDEX refresh_tokens_by_expiry ON refresh_tokens(expires_ms);",
];

/// The schema version this binary writes and reads (`PRAGMA user_version`).
pub const SQLITE_SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// SQLite implementation.
pub struct SqliteStore {
    conn: Mutex<Connection>,
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

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL: readers do not block the writer; synchronous=FULL: the WAL is fsync'd at every
        // commit, so an acknowledged message survives kill -9 and power loss.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Self::migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// Apply the migrations the database lacks, in one IMMEDIATE transaction (a second
    /// process opening the file meanwhile waits, then finds the work done).
    fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SQLITE_SCHEMA_VERSION {
            return Err(newer_schema(version, SQLITE_SCHEMA_VERSION));
        }
        let from = usize::try_from(version).unwrap_or(0);
        for (n, sql) in MIGRATIONS.iter().enumerate().skip(from) {
            tx.execute_batch(sql)
                .map_err(|e| StoreError::Backend(format!("schema migration {}: {e}", n + 1)))?;
        }
        if version < SQLITE_SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", SQLITE_SCHEMA_VERSION)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The database's schema version (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
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

    fn add_refresh_token(
        &self,
        token_hash: &[u8],
        user: &str,
        device: &str,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO refresh_tokens(token_hash, username, device, expires_ms, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![token_hash, user, device, i(expires_ms), i(now_ms)],
        )?;
        Ok(())
    }

    fn rotate_refresh_token(
        &self,
        old_hash: &[u8],
        new_hash: &[u8],
        new_expires_ms: u64,
        now_ms: u64,
    ) -> Result<RefreshOutcome, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<(String, String, i64, bool)> = tx
            .query_row(
                "SELECT username, device, expires_ms, revoked FROM refresh_tokens
                 WHERE token_hash = ?1",
                params![old_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((user, device, expires_ms, revoked)) = row else {
            return Ok(RefreshOutcome::Unknown);
        };
        if u(expires_ms) <= now_ms {
            return Ok(RefreshOutcome::Expired);
        }
        if revoked {
            tx.execute(
                "UPDATE refresh_tokens SET revoked = 1 WHERE username = ?1 AND device = ?2",
                params![user, device],
            )?;
            tx.commit()?;
            return Ok(RefreshOutcome::Reused { user, device });
        }
        tx.execute(
            "UPDATE refresh_tokens SET revoked = 1 WHERE token_hash = ?1",
            params![old_hash],
        )?;
        tx.execute(
            "INSERT INTO refresh_tokens(token_hash, username, device, expires_ms, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![new_hash, user, device, i(new_expires_ms), i(now_ms)],
        )?;
        tx.commit()?;
        Ok(RefreshOutcome::Rotated { user, device })
    }

    fn revoke_refresh_chain(&self, token_hash: &[u8]) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE refresh_tokens SET revoked = 1 WHERE (username, device) IN
                 (SELECT username, device FROM refresh_tokens WHERE token_hash = ?1)",
            params![token_hash],
        )?;
        Ok(n > 0)
    }

    fn prune_refresh_tokens(&self, before_ms: u64) -> Result<u64, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM refresh_tokens WHERE expires_ms < ?1",
            params![i(before_ms)],
        )?;
        Ok(n as u64)
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

    /// A database made before schema versioning: the tables of migration 1 and
    /// `user_version` 0.
    #[test]
    fn a_database_from_before_versioning_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.execute(
                "INSERT INTO users(username, pw_hash, created_ms) VALUES ('old', 'h', 1)",
                [],
            )
            .unwrap();
            c.execute(
                "INSERT INTO inbox_seq(username, last_seq) VALUES ('old', 7)",
                [],
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SQLITE_SCHEMA_VERSION);
        assert_eq!(s.password_hash("old").unwrap().as_deref(), Some("h"));
        assert_eq!(s.open_device("old", "d", 2).unwrap().last_seq, 7);
        s.add_refresh_token(b"h1", "old", "d", 100, 2).unwrap();
        drop(s);
        // Opening again changes nothing.
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SQLITE_SCHEMA_VERSION);
    }
}

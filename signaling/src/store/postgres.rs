//! The PostgreSQL store, for fleets whose nodes share one database server.
//!
//! **Why the sync `postgres` crate and r2d2.** [`Store`] is a blocking trait that async code
//! calls through [`super::Db`] on tokio's blocking pool, and the SQLite store is blocking by
//! nature. The sync `postgres` client (tokio-postgres driven by a small runtime of its own)
//! fits that trait as it is: one implementation of the trait, one calling convention, no
//! async trait objects, and the tests drive both stores the same way. `r2d2` (with
//! `r2d2_postgres`) is the matching bounded pool: at most `pool_size` connections, a checkout
//! waits at most `checkout_timeout` and then fails, broken connections are detected on
//! checkout (`SELECT` of nothing) and on return (`is_closed`) and replaced, so the pool
//! reconnects by itself when the server comes back.
//!
//! **Every connection** is opened with `synchronous_commit=on` (a commit returns only once its
//! WAL record is flushed on the server: an acknowledged message is durable, whatever the
//! server's or the role's default) and `statement_timeout` (a slow or locked server fails a
//! request instead of hanging it), as startup options, which take precedence over the
//! server's, the database's and the role's settings. The TCP connect is bounded by
//! `connect_timeout`; `tcp_user_timeout` bounds waiting on a peer that vanished without a
//! reset. TLS to the server is not supported: reach it on loopback, a Unix socket or a
//! private network.
//!
//! **Transactions.** READ COMMITTED, with the user's `inbox_seq` row locked (`SELECT ... FOR
//! UPDATE` after an insert-if-missing) at the start of every transaction that changes a
//! user's inbox, devices or cursors: two nodes storing messages for one user take turns, so
//! no sequence is assigned twice and no message is lost, and the deduplication check runs
//! under the lock. A transaction that loses a race (serialization failure, deadlock, unique
//! violation) is retried.
//!
//! **Migrations** are embedded ([`MIGRATIONS`]) and applied by [`PgStore::connect`] in one
//! transaction holding an advisory lock, so nodes starting together apply them once; each
//! applied version is a row of `schema_migrations`.

use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, NoTls, Transaction};
use r2d2_postgres::PostgresConnectionManager;

use super::{
    DEFAULT_CHECKOUT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_POOL_SIZE,
    DEFAULT_STATEMENT_TIMEOUT, DeviceCursor, MAX_DEVICES_PER_USER, RefreshOutcome, SendOutcome,
    Store, StoreError, StoredMessage, content_digest, i, newer_schema, redact_url, u,
};

/// The migrations, in order: entry `n` takes the schema from version `n` to `n + 1`. Never
/// edit one that has shipped; add the next.
const MIGRATIONS: &[&str] = &[
    // 1: accounts, contacts, devices and their cursors, the inbox and the message ids.
    "CREATE TABLE users(
         username TEXT PRIMARY KEY, pw_hash TEXT NOT NULL, created_ms BIGINT NOT NULL);
     CREATE TABLE contacts(
         owner TEXT NOT NULL, contact TEXT NOT NULL, PRIMARY KEY(owner, contact));
     CREATE INDEX contacts_by_contact ON contacts(contact);
     CREATE TABLE devices(
         username TEXT NOT NULL, device TEXT NOT NULL, acked_seq BIGINT NOT NULL,
         last_seen_ms BIGINT NOT NULL, PRIMARY KEY(username, device));
     CREATE TABLE inbox_seq(username TEXT PRIMARY KEY, last_seq BIGINT NOT NULL);
     CREATE TABLE messages(
         recipient TEXT NOT NULL, seq BIGINT NOT NULL, sender TEXT NOT NULL,
         client_id TEXT NOT NULL, body TEXT NOT NULL, stored_ms BIGINT NOT NULL,
         PRIMARY KEY(recipient, seq));
     CREATE TABLE message_ids(
         sender TEXT NOT NULL, client_id TEXT NOT NULL, digest BYTEA NOT NULL,
         stored_ms BIGINT NOT NULL, PRIMARY KEY(sender, client_id));
     CREATE INDEX message_ids_by_time ON message_ids(stored_ms);",
    // 2: refresh tokens (by the hash of their id), with their device chain and revocation.
    "CREATE TABLE refresh_tokens(
         token_hash BYTEA PRIMARY KEY, username TEXT NOT NULL, device TEXT NOT NULL,
         expires_ms BIGINT NOT NULL, revoked BOOLEAN NOT NULL DEFAULT FALSE,
         created_ms BIGINT NOT NULL);
     CREATE INDEX refresh_tokens_by_device ON refresh_tokens(username, device);
     CREATE INDEX refresh_tokens_by_expiry ON refresh_tokens(expires_ms);",
];

/// The schema version this binary writes and reads (the highest `schema_migrations.version`).
pub const PG_SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The advisory lock key that serializes migrations across nodes ("peerlink" in ASCII).
const MIGRATION_LOCK: i64 = 0x7065_6572_6c69_6e6b;

/// Attempts of a transaction that loses a race with another node before the error is
/// returned.
const ATTEMPTS: usize = 5;

/// Pool and timeout settings of [`PgStore`].
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Most connections open at once (default 8).
    pub pool_size: u32,
    /// TCP connect and startup of one connection (default 5 s).
    pub connect_timeout: Duration,
    /// Longest wait for a pooled connection; then the call fails `Unavailable` (default 5 s).
    pub checkout_timeout: Duration,
    /// Server-side `statement_timeout` of every statement (default 5 s).
    pub statement_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            checkout_timeout: DEFAULT_CHECKOUT_TIMEOUT,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
        }
    }
}

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// PostgreSQL implementation.
pub struct PgStore {
    pool: Pool,
    checkout_timeout: Duration,
}

/// Whether `e` is a lost race worth retrying.
fn retryable(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::UNIQUE_VIOLATION
    })
}

/// The error with its cause: the server's message for a database error, the I/O error for a
/// connection failure (`postgres::Error`'s own text is only "db error" / "error connecting").
fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn pg_err(e: postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // 08: connection exception; 53: insufficient resources; 57: operator intervention
        // (shutdown, statement timeout, cannot connect now).
        return if code.starts_with("08") || code.starts_with("53") || code.starts_with("57") {
            StoreError::Unavailable(format!("{}: {}", code, db.message()))
        } else {
            StoreError::Backend(format!("{}: {}", code, db.message()))
        };
    }
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed() || io {
        StoreError::Unavailable(describe(&e))
    } else {
        StoreError::Backend(describe(&e))
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        pg_err(e)
    }
}

/// Logs the pool's connection failures (r2d2 reports them through this, not to the caller).
#[derive(Debug)]
struct LogErrors;

impl r2d2::HandleError<postgres::Error> for LogErrors {
    fn handle_error(&self, e: postgres::Error) {
        tracing::warn!(error = %e, "postgres: connection failed");
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis().max(1)
}

impl PgStore {
    /// Connect to `url`: check the server and the credentials with one connection (an error
    /// names the redacted URL and the cause), apply the migrations, then build the pool.
    pub fn connect(url: &str, opts: &PgOptions) -> Result<Self, StoreError> {
        let shown = redact_url(url);
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Backend(format!("bad PostgreSQL URL {shown}: {e}")))?;
        let ours = format!(
            "-c synchronous_commit=on -c statement_timeout={}",
            ms(opts.statement_timeout)
        );
        let options = match config.get_options() {
            Some(theirs) if !theirs.is_empty() => format!("{theirs} {ours}"),
            _ => ours,
        };
        config
            .options(&options)
            .connect_timeout(opts.connect_timeout)
            .tcp_user_timeout(opts.statement_timeout + opts.connect_timeout)
            .application_name("peerlink-signaling");
        if config.get_dbname().is_none() {
            return Err(StoreError::Backend(format!(
                "PostgreSQL URL {shown} names no database (postgres://user:password@host:port/DB)"
            )));
        }
        let mut client = config.connect(NoTls).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {shown}: {}",
                describe(&e)
            ))
        })?;
        let sync: String = client
            .query_one("SHOW synchronous_commit", &[])
            .map_err(pg_err)?
            .get(0);
        if sync != "on" {
            return Err(StoreError::Backend(format!(
                "PostgreSQL at {shown} runs with synchronous_commit={sync}, not on"
            )));
        }
        migrate(&mut client).map_err(|e| match e {
            StoreError::Backend(m) => StoreError::Backend(format!("PostgreSQL at {shown}: {m}")),
            other => other,
        })?;
        drop(client);
        let pool = r2d2::Pool::builder()
            .max_size(opts.pool_size.max(1))
            .min_idle(Some(1))
            .connection_timeout(opts.checkout_timeout)
            .test_on_check_out(true)
            .error_handler(Box::new(LogErrors))
            .build_unchecked(PostgresConnectionManager::new(config, NoTls));
        Ok(Self {
            pool,
            checkout_timeout: opts.checkout_timeout,
        })
    }

    /// The database's schema version (the highest applied migration).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let mut c = self.client()?;
        Ok(c.query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )?
        .get(0))
    }

    fn client(
        &self,
    ) -> Result<r2d2::PooledConnection<PostgresConnectionManager<NoTls>>, StoreError> {
        self.pool.get().map_err(|e| {
            StoreError::Unavailable(format!(
                "no PostgreSQL connection within {:?}: {e}",
                self.checkout_timeout
            ))
        })
    }

    /// Run `f` in a transaction, committing when it returns `Ok((value, true))`, rolling
    /// back on `Ok((value, false))` or an error; a lost race is retried.
    fn tx<T>(
        &self,
        mut f: impl FnMut(&mut Transaction<'_>) -> Result<(T, bool), postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut client = self.client()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut run = |c: &mut Client| -> Result<T, postgres::Error> {
                let mut tx = c.transaction()?;
                let (v, commit) = f(&mut tx)?;
                if commit {
                    tx.commit()?;
                } else {
                    tx.rollback()?;
                }
                Ok(v)
            };
            match run(&mut client) {
                Ok(v) => return Ok(v),
                Err(e) if attempt < ATTEMPTS && retryable(&e) => {
                    tracing::debug!(error = %e, attempt, "postgres: transaction retried");
                }
                Err(e) => return Err(pg_err(e)),
            }
        }
    }
}

/// Apply the missing migrations in one transaction under an advisory lock.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations(
             version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )?;
    let version: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )?
        .get(0);
    if version > PG_SCHEMA_VERSION {
        return Err(newer_schema(version, PG_SCHEMA_VERSION));
    }
    let from = usize::try_from(version).unwrap_or(0);
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(from) {
        let v = i64::try_from(n + 1).unwrap_or(i64::MAX);
        tx.batch_execute(sql)
            .map_err(|e| StoreError::Backend(format!("schema migration {v}: {e}")))?;
        tx.execute("INSERT INTO schema_migrations(version) VALUES ($1)", &[&v])?;
    }
    tx.commit()?;
    if version < PG_SCHEMA_VERSION {
        tracing::info!(
            from = version,
            to = PG_SCHEMA_VERSION,
            "postgres: schema migrated"
        );
    }
    Ok(())
}

/// Lock the user's inbox row (creating it at 0) for the rest of the transaction; returns the
/// user's last sequence.
fn lock_user(tx: &mut Transaction<'_>, user: &str) -> Result<u64, postgres::Error> {
    tx.execute(
        "INSERT INTO inbox_seq(username, last_seq) VALUES ($1, 0) ON CONFLICT DO NOTHING",
        &[&user],
    )?;
    let last: i64 = tx
        .query_one(
            "SELECT last_seq FROM inbox_seq WHERE username = $1 FOR UPDATE",
            &[&user],
        )?
        .get(0);
    Ok(u(last))
}

fn cleanup(tx: &mut Transaction<'_>, user: &str) -> Result<(), postgres::Error> {
    tx.execute(
        "DELETE FROM messages WHERE recipient = $1 AND seq <=
             (SELECT MIN(acked_seq) FROM devices WHERE username = $1)",
        &[&user],
    )?;
    Ok(())
}

impl Store for PgStore {
    fn create_user(&self, username: &str, pw_hash: &str, now_ms: u64) -> Result<(), StoreError> {
        let n = self.client()?.execute(
            "INSERT INTO users(username, pw_hash, created_ms) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
            &[&username, &pw_hash, &i(now_ms)],
        )?;
        if n == 0 {
            return Err(StoreError::UserExists);
        }
        Ok(())
    }

    fn password_hash(&self, username: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .client()?
            .query_opt(
                "SELECT pw_hash FROM users WHERE username = $1",
                &[&username],
            )?
            .map(|r| r.get(0)))
    }

    fn user_exists(&self, username: &str) -> Result<bool, StoreError> {
        Ok(self.password_hash(username)?.is_some())
    }

    fn add_contact(&self, owner: &str, contact: &str) -> Result<(), StoreError> {
        // The contact must exist: one statement checks and inserts.
        let n = self.client()?.execute(
            "INSERT INTO contacts(owner, contact)
             SELECT $1, username FROM users WHERE username = $2
             ON CONFLICT DO NOTHING",
            &[&owner, &contact],
        )?;
        if n == 0 && !self.user_exists(contact)? {
            return Err(StoreError::NoSuchUser);
        }
        Ok(())
    }

    fn remove_contact(&self, owner: &str, contact: &str) -> Result<(), StoreError> {
        self.client()?.execute(
            "DELETE FROM contacts WHERE owner = $1 AND contact = $2",
            &[&owner, &contact],
        )?;
        Ok(())
    }

    fn contacts(&self, owner: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .client()?
            .query(
                "SELECT contact FROM contacts WHERE owner = $1 ORDER BY contact COLLATE \"C\"",
                &[&owner],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn watchers(&self, user: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .client()?
            .query(
                "SELECT owner FROM contacts WHERE contact = $1 ORDER BY owner COLLATE \"C\"",
                &[&user],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn open_device(
        &self,
        user: &str,
        device: &str,
        now_ms: u64,
    ) -> Result<DeviceCursor, StoreError> {
        self.tx(|tx| {
            let last_seq = lock_user(tx, user)?;
            tx.execute(
                "INSERT INTO devices(username, device, acked_seq, last_seen_ms)
                 VALUES ($1, $2, 0, $3)
                 ON CONFLICT (username, device) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
                &[&user, &device, &i(now_ms)],
            )?;
            let count: i64 = tx
                .query_one("SELECT COUNT(*) FROM devices WHERE username = $1", &[&user])?
                .get(0);
            let excess = u(count).saturating_sub(MAX_DEVICES_PER_USER as u64);
            if excess > 0 {
                tx.execute(
                    "DELETE FROM devices WHERE username = $1 AND device IN
                         (SELECT device FROM devices WHERE username = $1 AND device <> $2
                          ORDER BY last_seen_ms LIMIT $3)",
                    &[&user, &device, &i(excess)],
                )?;
                cleanup(tx, user)?;
            }
            let acked: i64 = tx
                .query_one(
                    "SELECT acked_seq FROM devices WHERE username = $1 AND device = $2",
                    &[&user, &device],
                )?
                .get(0);
            Ok((
                DeviceCursor {
                    acked_seq: u(acked),
                    last_seq,
                },
                true,
            ))
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
        self.tx(|tx| {
            let prior = |tx: &mut Transaction<'_>| -> Result<Option<SendOutcome>, postgres::Error> {
                let row = tx.query_opt(
                    "SELECT digest, stored_ms FROM message_ids WHERE sender = $1 AND client_id = $2",
                    &[&sender, &client_id],
                )?;
                Ok(row.map(|r| {
                    let d: Vec<u8> = r.get(0);
                    if d == digest {
                        SendOutcome::Duplicate {
                            stored_ms: u(r.get(1)),
                        }
                    } else {
                        SendOutcome::Conflict
                    }
                }))
            };
            if let Some(o) = prior(tx)? {
                return Ok((Ok(o), false));
            }
            let exists = tx
                .query_opt("SELECT 1 FROM users WHERE username = $1", &[&recipient])?
                .is_some();
            if !exists {
                return Ok((Err(StoreError::NoSuchUser), false));
            }
            // Under the recipient's lock: a concurrent resend to the same recipient has
            // committed by now, and is found.
            let seq = lock_user(tx, recipient)? + 1;
            if let Some(o) = prior(tx)? {
                return Ok((Ok(o), false));
            }
            tx.execute(
                "UPDATE inbox_seq SET last_seq = $2 WHERE username = $1",
                &[&recipient, &i(seq)],
            )?;
            tx.execute(
                "INSERT INTO messages(recipient, seq, sender, client_id, body, stored_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&recipient, &i(seq), &sender, &client_id, &body, &i(now_ms)],
            )?;
            // A resend of the same id to another recipient may race this one: the loser's
            // insert is a unique violation, and its retry finds the winner's record.
            tx.execute(
                "INSERT INTO message_ids(sender, client_id, digest, stored_ms)
                 VALUES ($1, $2, $3, $4)",
                &[&sender, &client_id, &digest, &i(now_ms)],
            )?;
            Ok((
                Ok(SendOutcome::Stored {
                    seq,
                    stored_ms: now_ms,
                }),
                true,
            ))
        })?
    }

    fn pending(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        Ok(self
            .client()?
            .query(
                "SELECT seq, sender, client_id, body, stored_ms FROM messages
                 WHERE recipient = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&user, &i(after), &i(limit as u64)],
            )?
            .iter()
            .map(|r| StoredMessage {
                seq: u(r.get(0)),
                sender: r.get(1),
                client_id: r.get(2),
                body: r.get(3),
                stored_ms: u(r.get(4)),
            })
            .collect())
    }

    fn prune_message_ids(&self, before_ms: u64) -> Result<u64, StoreError> {
        Ok(self.client()?.execute(
            "DELETE FROM message_ids WHERE stored_ms < $1",
            &[&i(before_ms)],
        )?)
    }

    fn ack(&self, user: &str, device: &str, seq: u64) -> Result<u64, StoreError> {
        self.tx(|tx| {
            let last = lock_user(tx, user)?;
            let seq = seq.min(last);
            tx.execute(
                "UPDATE devices SET acked_seq = GREATEST(acked_seq, $3)
                 WHERE username = $1 AND device = $2",
                &[&user, &device, &i(seq)],
            )?;
            cleanup(tx, user)?;
            let cur: Option<i64> = tx
                .query_opt(
                    "SELECT acked_seq FROM devices WHERE username = $1 AND device = $2",
                    &[&user, &device],
                )?
                .map(|r| r.get(0));
            Ok((cur.map(u).unwrap_or(0), true))
        })
    }

    fn add_refresh_token(
        &self,
        token_hash: &[u8],
        user: &str,
        device: &str,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.client()?.execute(
            "INSERT INTO refresh_tokens(token_hash, username, device, expires_ms, created_ms)
             VALUES ($1, $2, $3, $4, $5)",
            &[&token_hash, &user, &device, &i(expires_ms), &i(now_ms)],
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
        self.tx(|tx| {
            // FOR UPDATE: of two nodes presenting the same token at once, one rotates and the
            // other sees it revoked (a reuse).
            let Some(row) = tx.query_opt(
                "SELECT username, device, expires_ms, revoked FROM refresh_tokens
                 WHERE token_hash = $1 FOR UPDATE",
                &[&old_hash],
            )?
            else {
                return Ok((RefreshOutcome::Unknown, false));
            };
            let (user, device): (String, String) = (row.get(0), row.get(1));
            let (expires_ms, revoked): (i64, bool) = (row.get(2), row.get(3));
            if u(expires_ms) <= now_ms {
                return Ok((RefreshOutcome::Expired, false));
            }
            if revoked {
                tx.execute(
                    "UPDATE refresh_tokens SET revoked = TRUE WHERE username = $1 AND device = $2",
                    &[&user, &device],
                )?;
                return Ok((RefreshOutcome::Reused { user, device }, true));
            }
            tx.execute(
                "UPDATE refresh_tokens SET revoked = TRUE WHERE token_hash = $1",
                &[&old_hash],
            )?;
            tx.execute(
                "INSERT INTO refresh_tokens(token_hash, username, device, expires_ms, created_ms)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&new_hash, &user, &device, &i(new_expires_ms), &i(now_ms)],
            )?;
            Ok((RefreshOutcome::Rotated { user, device }, true))
        })
    }

    fn revoke_refresh_chain(&self, token_hash: &[u8]) -> Result<bool, StoreError> {
        let n = self.client()?.execute(
            "UPDATE refresh_tokens SET revoked = TRUE WHERE (username, device) IN
                 (SELECT username, device FROM refresh_tokens WHERE token_hash = $1)",
            &[&token_hash],
        )?;
        Ok(n > 0)
    }

    fn prune_refresh_tokens(&self, before_ms: u64) -> Result<u64, StoreError> {
        Ok(self.client()?.execute(
            "DELETE FROM refresh_tokens WHERE expires_ms < $1",
            &[&i(before_ms)],
        )?)
    }
}

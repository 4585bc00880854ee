//! The store suite, written once against the `Store` trait and run on both implementations:
//! `sqlite::*` on a temporary SQLite file, `postgres::*` on a real PostgreSQL server
//! (`peerlink_testkit::postgres`: Debian's binaries, one server per test process, a database
//! per test). Each test is a function taking a [`Fixture`], which opens the store (twice for
//! "two nodes on one database") and can reach behind it (the schema version).
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use peerlink_signaling::store::{
    self, MAX_DEVICES_PER_USER, PG_SCHEMA_VERSION, PgOptions, RefreshOutcome,
    SQLITE_SCHEMA_VERSION, SendOutcome, Store, StoreError, StoreLocation,
};
use peerlink_testkit::postgres::PgServer;

/// A fresh, empty store location and what keeps it alive.
pub struct Fixture {
    location: StoreLocation,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<PgServer>,
}

fn options() -> PgOptions {
    PgOptions {
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
        checkout_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(10),
    }
}

impl Fixture {
    fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        Fixture {
            location: StoreLocation::Sqlite(dir.path().join("store.db")),
            _dir: Some(dir),
            _pg: None,
        }
    }

    fn postgres() -> Fixture {
        let pg = PgServer::start();
        let url = pg.create_database();
        Fixture {
            location: StoreLocation::Postgres(url),
            _dir: None,
            _pg: Some(pg),
        }
    }

    /// Open the store (again: a second node on the same database).
    fn open(&self) -> Arc<dyn Store> {
        store::open(&self.location, &options()).unwrap()
    }

    /// Open with `alice` and `bob` created.
    fn with_users(&self) -> Arc<dyn Store> {
        let s = self.open();
        for u in ["alice", "bob"] {
            s.create_user(u, "h", 1).unwrap();
        }
        s
    }

    /// Pretend a newer binary migrated the database to `version`.
    fn set_schema_version(&self, version: i64) {
        match &self.location {
            StoreLocation::Sqlite(p) => {
                let c = rusqlite::Connection::open(p).unwrap();
                c.pragma_update(None, "user_version", version).unwrap();
            }
            StoreLocation::Postgres(url) => PgServer::execute(
                url,
                &format!("INSERT INTO schema_migrations(version) VALUES ({version})"),
            ),
        }
    }

    fn known_version(&self) -> i64 {
        match &self.location {
            StoreLocation::Sqlite(_) => SQLITE_SCHEMA_VERSION,
            StoreLocation::Postgres(_) => PG_SCHEMA_VERSION,
        }
    }
}

fn users_unique(f: Fixture) {
    let s = f.with_users();
    assert!(matches!(
        s.create_user("alice", "x", 2),
        Err(StoreError::UserExists)
    ));
    assert_eq!(s.password_hash("alice").unwrap().as_deref(), Some("h"));
    assert_eq!(s.password_hash("carol").unwrap(), None);
    assert!(s.user_exists("bob").unwrap());
    assert!(!s.user_exists("carol").unwrap());
}

fn dedup_conflict_and_deletion_after_all_devices_ack(f: Fixture) {
    let s = f.with_users();
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
    // The digest covers the recipient: the same id and text to someone else is a conflict.
    assert_eq!(
        s.store_message("alice", "alice", "m1", "hi", 20).unwrap(),
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
    // Another sender's "m1" is its own.
    assert!(matches!(
        s.store_message("bob", "alice", "m1", "hi", 31).unwrap(),
        SendOutcome::Stored { seq: 1, .. }
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
    assert_eq!(
        (
            left[0].sender.as_str(),
            left[0].client_id.as_str(),
            left[0].body.as_str()
        ),
        ("alice", "m2", "second")
    );
    assert_eq!(left[0].stored_ms, 30);
    // Dedup survives deletion of the message itself.
    s.ack("bob", "laptop", 2).unwrap();
    assert!(s.pending("bob", 0, 10).unwrap().is_empty());
    assert_eq!(
        s.store_message("alice", "bob", "m1", "hi", 40).unwrap(),
        SendOutcome::Duplicate { stored_ms: 10 }
    );
    // Pruning the dedup record of m1 (stored at 10) but not m2 (stored at 30); bob's m1 at 31
    // stays too.
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

fn cursors_never_move_backwards_and_paging(f: Fixture) {
    let s = f.with_users();
    let c = s.open_device("bob", "phone", 1).unwrap();
    assert_eq!((c.acked_seq, c.last_seq), (0, 0));
    for n in 1..=7 {
        s.store_message(
            "alice",
            "bob",
            &format!("m{n}"),
            &format!("body {n}"),
            10 + n,
        )
        .unwrap();
    }
    let c = s.open_device("bob", "phone", 2).unwrap();
    assert_eq!((c.acked_seq, c.last_seq), (0, 7));
    let page: Vec<u64> = s
        .pending("bob", 2, 3)
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(page, [3, 4, 5]);
    assert_eq!(s.ack("bob", "phone", 4).unwrap(), 4);
    assert_eq!(s.ack("bob", "phone", 2).unwrap(), 4, "never backwards");
    assert_eq!(s.ack("nobody", "x", 3).unwrap(), 0, "no such device");
    let c = s.open_device("bob", "phone", 3).unwrap();
    assert_eq!((c.acked_seq, c.last_seq), (4, 7));
    // The only device acked 4: 1-4 are gone.
    let left: Vec<u64> = s
        .pending("bob", 0, 100)
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(left, [5, 6, 7]);
    // A new device starts at 0 and sees what is left.
    let c = s.open_device("bob", "tablet", 4).unwrap();
    assert_eq!((c.acked_seq, c.last_seq), (0, 7));
    assert_eq!(s.pending("bob", 0, 100).unwrap().len(), 3);
}

fn the_least_recently_seen_device_is_forgotten(f: Fixture) {
    let s = f.with_users();
    s.store_message("alice", "bob", "m1", "x", 1).unwrap();
    // "old" acks nothing and would hold message 1 for ever; it is seen first.
    s.open_device("bob", "old", 1).unwrap();
    for n in 0..MAX_DEVICES_PER_USER - 1 {
        let d = format!("d{n}");
        s.open_device("bob", &d, 10 + n as u64).unwrap();
        s.ack("bob", &d, 1).unwrap();
    }
    assert_eq!(s.pending("bob", 0, 10).unwrap().len(), 1, "old holds it");
    // One device more: "old" is forgotten, and with it the hold on message 1.
    s.open_device("bob", "new", 100).unwrap();
    s.ack("bob", "new", 1).unwrap();
    assert!(s.pending("bob", 0, 10).unwrap().is_empty());
    // "old" comes back as a new device at 0.
    let c = s.open_device("bob", "old", 200).unwrap();
    assert_eq!((c.acked_seq, c.last_seq), (0, 1));
}

fn contacts_and_watchers(f: Fixture) {
    let s = f.open();
    for u in ["alice", "bob", "b.c", "b_c", "b-c", "carol"] {
        s.create_user(u, "h", 1).unwrap();
    }
    s.add_contact("alice", "bob").unwrap();
    s.add_contact("alice", "bob").unwrap();
    assert!(matches!(
        s.add_contact("alice", "zed"),
        Err(StoreError::NoSuchUser)
    ));
    for c in ["b_c", "carol", "b-c", "b.c"] {
        s.add_contact("alice", c).unwrap();
    }
    // Bytewise order: '-' < '.' < '_' < letters, whatever the database's collation.
    assert_eq!(
        s.contacts("alice").unwrap(),
        ["b-c", "b.c", "b_c", "bob", "carol"]
    );
    s.add_contact("carol", "bob").unwrap();
    s.add_contact("b_c", "bob").unwrap();
    assert_eq!(s.watchers("bob").unwrap(), ["alice", "b_c", "carol"]);
    s.remove_contact("alice", "bob").unwrap();
    s.remove_contact("alice", "bob").unwrap();
    assert_eq!(s.watchers("bob").unwrap(), ["b_c", "carol"]);
    assert_eq!(s.contacts("alice").unwrap().len(), 4);
    assert!(s.contacts("nobody").unwrap().is_empty());
}

fn refresh_tokens_rotate_reuse_and_revoke(f: Fixture) {
    let s = f.with_users();
    s.add_refresh_token(b"t0", "alice", "phone", 1000, 1)
        .unwrap();
    s.add_refresh_token(b"l0", "alice", "laptop", 1000, 1)
        .unwrap();
    assert_eq!(
        s.rotate_refresh_token(b"t0", b"t1", 2000, 10).unwrap(),
        RefreshOutcome::Rotated {
            user: "alice".into(),
            device: "phone".into()
        }
    );
    assert!(matches!(
        s.rotate_refresh_token(b"t1", b"t2", 2000, 20).unwrap(),
        RefreshOutcome::Rotated { .. }
    ));
    // t1 again: reuse; the phone's chain (t2 included) is revoked, the laptop's is not.
    assert_eq!(
        s.rotate_refresh_token(b"t1", b"t3", 2000, 30).unwrap(),
        RefreshOutcome::Reused {
            user: "alice".into(),
            device: "phone".into()
        }
    );
    assert!(matches!(
        s.rotate_refresh_token(b"t2", b"t4", 2000, 40).unwrap(),
        RefreshOutcome::Reused { .. }
    ));
    assert_eq!(
        s.rotate_refresh_token(b"t3", b"t5", 2000, 40).unwrap(),
        RefreshOutcome::Unknown,
        "a reuse stores no successor"
    );
    assert_eq!(
        s.rotate_refresh_token(b"zz", b"t6", 2000, 40).unwrap(),
        RefreshOutcome::Unknown
    );
    assert!(matches!(
        s.rotate_refresh_token(b"l0", b"l1", 2000, 50).unwrap(),
        RefreshOutcome::Rotated { .. }
    ));
    // Logout: the laptop's chain ends.
    assert!(s.revoke_refresh_chain(b"l1").unwrap());
    assert!(!s.revoke_refresh_chain(b"nope").unwrap());
    assert!(matches!(
        s.rotate_refresh_token(b"l1", b"l2", 2000, 60).unwrap(),
        RefreshOutcome::Reused { .. }
    ));
    // Expiry, then pruning.
    s.add_refresh_token(b"e0", "bob", "d", 100, 1).unwrap();
    assert_eq!(
        s.rotate_refresh_token(b"e0", b"e1", 2000, 100).unwrap(),
        RefreshOutcome::Expired
    );
    assert_eq!(s.prune_refresh_tokens(101).unwrap(), 1);
    assert_eq!(
        s.rotate_refresh_token(b"e0", b"e1", 2000, 100).unwrap(),
        RefreshOutcome::Unknown
    );
    assert_eq!(s.prune_refresh_tokens(5000).unwrap(), 5, "t0 t1 t2 l0 l1");
}

/// Two "nodes" (two store handles on one database), four threads each, storing for one
/// recipient at once: every message gets its own sequence, none is lost, the sequence has
/// no gap; resends of one id racing on both nodes store it once.
fn two_nodes_never_share_a_sequence_or_lose_a_message(f: Fixture) {
    let a = f.with_users();
    let b = f.open();
    s_concurrently(&[a.clone(), b.clone()], 4, 25);
    let all = a.pending("bob", 0, 1000).unwrap();
    let seqs: Vec<u64> = all.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>(), "1..=200, in order");
    let ids: BTreeSet<&str> = all.iter().map(|m| m.client_id.as_str()).collect();
    assert_eq!(ids.len(), 200, "every message once");
    assert_eq!(b.open_device("bob", "x", 1).unwrap().last_seq, 200);

    // Eight resends of one id, four per node, at once: one is stored, seven are duplicates.
    let outcomes = race(&[a.clone(), b.clone()], 4, |s, _| {
        s.store_message("alice", "bob", "same", "same body", 5)
            .unwrap()
    });
    let stored = outcomes
        .iter()
        .filter(|o| matches!(o, SendOutcome::Stored { .. }))
        .count();
    assert_eq!(stored, 1, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| matches!(
        o,
        SendOutcome::Stored { .. } | SendOutcome::Duplicate { .. }
    )));
    // One id, each thread to a different recipient (different digests): one is stored, the
    // others conflict.
    for n in 0..8 {
        a.create_user(&format!("r{n}"), "h", 1).unwrap();
    }
    let outcomes = race(&[a.clone(), b.clone()], 4, |s, n| {
        s.store_message("alice", &format!("r{n}"), "shared-id", "x", 5)
            .unwrap()
    });
    let stored = outcomes
        .iter()
        .filter(|o| matches!(o, SendOutcome::Stored { .. }))
        .count();
    assert_eq!(stored, 1, "{outcomes:?}");
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, SendOutcome::Conflict))
            .count(),
        7
    );
}

fn s_concurrently(nodes: &[Arc<dyn Store>], threads: usize, each: usize) {
    std::thread::scope(|sc| {
        for (k, node) in nodes.iter().enumerate() {
            for t in 0..threads {
                let node = node.clone();
                sc.spawn(move || {
                    for n in 0..each {
                        let id = format!("n{k}-t{t}-m{n}");
                        let r = node.store_message("alice", "bob", &id, &id, 1).unwrap();
                        assert!(matches!(r, SendOutcome::Stored { .. }), "{id}: {r:?}");
                    }
                });
            }
        }
    });
}

/// Run `f` on `threads` threads per node, all released at once; their results.
fn race<T: Send + std::fmt::Debug>(
    nodes: &[Arc<dyn Store>],
    threads: usize,
    f: impl Fn(&dyn Store, usize) -> T + Sync,
) -> Vec<T> {
    let barrier = std::sync::Barrier::new(nodes.len() * threads);
    std::thread::scope(|sc| {
        let handles: Vec<_> = nodes
            .iter()
            .flat_map(|node| (0..threads).map(move |_| node.clone()))
            .enumerate()
            .map(|(n, node)| {
                let (barrier, f) = (&barrier, &f);
                sc.spawn(move || {
                    barrier.wait();
                    f(node.as_ref(), n)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn data_survives_reopening_and_migrations_run_once(f: Fixture) {
    let s = f.with_users();
    s.store_message("alice", "bob", "m1", "kept", 5).unwrap();
    s.add_refresh_token(b"r", "bob", "d", 1000, 1).unwrap();
    drop(s);
    let s = f.open();
    assert_eq!(s.pending("bob", 0, 10).unwrap()[0].body, "kept");
    assert!(matches!(
        s.rotate_refresh_token(b"r", b"r2", 1000, 2).unwrap(),
        RefreshOutcome::Rotated { .. }
    ));
    assert!(matches!(
        s.create_user("alice", "x", 1),
        Err(StoreError::UserExists)
    ));
}

fn a_newer_schema_is_refused(f: Fixture) {
    drop(f.open());
    let newer = f.known_version() + 1;
    f.set_schema_version(newer);
    let e = match store::open(&f.location, &options()) {
        Ok(_) => panic!("a database of schema {newer} was opened"),
        Err(e) => e.to_string(),
    };
    let want = format!(
        "database schema version {newer} is newer than this binary supports ({}): upgrade \
         peerlink-signaling",
        f.known_version()
    );
    assert!(e.contains(&want), "{e}");
}

/// Both stores, one `#[test]` per suite function.
macro_rules! suite {
    ($fixture:expr) => {
        use super::*;
        #[test]
        fn users_unique() {
            super::users_unique($fixture);
        }
        #[test]
        fn dedup_conflict_and_deletion_after_all_devices_ack() {
            super::dedup_conflict_and_deletion_after_all_devices_ack($fixture);
        }
        #[test]
        fn cursors_never_move_backwards_and_paging() {
            super::cursors_never_move_backwards_and_paging($fixture);
        }
        #[test]
        fn the_least_recently_seen_device_is_forgotten() {
            super::the_least_recently_seen_device_is_forgotten($fixture);
        }
        #[test]
        fn contacts_and_watchers() {
            super::contacts_and_watchers($fixture);
        }
        #[test]
        fn refresh_tokens_rotate_reuse_and_revoke() {
            super::refresh_tokens_rotate_reuse_and_revoke($fixture);
        }
        #[test]
        fn two_nodes_never_share_a_sequence_or_lose_a_message() {
            super::two_nodes_never_share_a_sequence_or_lose_a_message($fixture);
        }
        #[test]
        fn data_survives_reopening_and_migrations_run_once() {
            super::data_survives_reopening_and_migrations_run_once($fixture);
        }
        #[test]
        fn a_newer_schema_is_refused() {
            super::a_newer_schema_is_refused($fixture);
        }
    };
}

mod sqlite {
    suite!(Fixture::sqlite());
}

mod postgres {
    suite!(Fixture::postgres());
}

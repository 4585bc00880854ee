//! Harness for tests that run the real `peerlink-signaling` binary on loopback and drive it
//! with a WebSocket client. Children are killed on drop; every wait is bounded.
// Test helpers outside #[test] fns: a panic is the failure report.
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use peerlink_testkit::proc::Service;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const TOKEN_SECRET: &str = "integration-token-secret-0123456789";
pub const TURN_SECRET: &str = "integration-turn-secret";
/// Bound on any single wait for a frame.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running signaling node (killed on drop).
pub struct Node {
    proc: Service,
    pub http: SocketAddr,
    pub stun: Vec<SocketAddr>,
    /// The IPv6 STUN responder (its `stun6=` line, printed before `stun=`).
    pub stun6: Option<SocketAddr>,
    pub db: PathBuf,
}

/// The store a test's nodes run on: a temporary SQLite file, or a database of its own on a
/// real PostgreSQL server (`peerlink_testkit::postgres`, stopped and removed on drop).
pub enum TestStore {
    /// `--db PATH`.
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    /// `--store postgres://...`.
    Postgres {
        server: peerlink_testkit::postgres::PgServer,
        url: String,
    },
}

impl TestStore {
    pub fn sqlite() -> TestStore {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sig.db");
        TestStore::Sqlite { _dir: dir, path }
    }

    pub fn postgres() -> TestStore {
        let server = peerlink_testkit::postgres::PgServer::start();
        let url = server.create_database();
        TestStore::Postgres { server, url }
    }

    /// The flags that select this store.
    pub fn args(&self) -> Vec<String> {
        match self {
            TestStore::Sqlite { path, .. } => vec!["--db".into(), path.display().to_string()],
            TestStore::Postgres { url, .. } => vec![
                "--store".into(),
                url.clone(),
                "--store-checkout-timeout".into(),
                "2s".into(),
                "--store-statement-timeout".into(),
                "5s".into(),
            ],
        }
    }

    /// The SQLite file (empty for PostgreSQL).
    pub fn path(&self) -> PathBuf {
        match self {
            TestStore::Sqlite { path, .. } => path.clone(),
            TestStore::Postgres { .. } => PathBuf::new(),
        }
    }

    /// The PostgreSQL server (panics on SQLite).
    pub fn server(&mut self) -> &mut peerlink_testkit::postgres::PgServer {
        match self {
            TestStore::Postgres { server, .. } => server,
            TestStore::Sqlite { .. } => panic!("not a PostgreSQL store"),
        }
    }
}

/// One `#[tokio::test]` per store for `async fn $name(store: TestStore)`: `$name::sqlite` and
/// `$name::postgres`.
#[macro_export]
macro_rules! on_both_stores {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::TestStore::sqlite()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::common::TestStore::postgres()).await;
            }
        }
    };
}

/// Arguments every test node gets on `store` (cheap Argon2 for debug builds).
pub fn store_args(store: &TestStore) -> Vec<String> {
    let mut args = fixed_args();
    args.extend(store.args());
    args
}

/// Arguments every test node gets (cheap Argon2 for debug builds).
pub fn base_args(db: &Path) -> Vec<String> {
    let mut args = fixed_args();
    args.extend(["--db".to_string(), db.display().to_string()]);
    args
}

fn fixed_args() -> Vec<String> {
    [
        "--listen",
        "127.0.0.1:0",
        "--stun",
        "127.0.0.1:0",
        "--argon2-m-kib",
        "64",
        "--argon2-t",
        "1",
        "--log",
        "warn",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Node {
    /// Start the binary on `store` with `store_args` plus `extra`.
    pub fn start_on(store: &TestStore, extra: &[&str]) -> Node {
        let mut args = store_args(store);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_raw(&store.path(), &args)
    }

    /// Start the binary with `base_args(db)` plus `extra`; waits for its `http=` line.
    pub fn start(db: &Path, extra: &[&str]) -> Node {
        let mut args = base_args(db);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_raw(db, &args)
    }

    /// Start with exactly `args`.
    pub fn start_raw(db: &Path, args: &[String]) -> Node {
        Self::start_raw_with(db, args, |_| {})
    }

    /// Start with exactly `args`, after `configure` adjusted the command (e.g. a `pre_exec`).
    pub fn start_raw_with(
        db: &Path,
        args: &[String],
        configure: impl FnOnce(&mut Command),
    ) -> Node {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_peerlink-signaling"));
        cmd.args(args)
            .env("PEERLINK_TOKEN_SECRET", TOKEN_SECRET)
            .env("PEERLINK_TURN_SECRET", TURN_SECRET)
            .stderr(Stdio::inherit());
        configure(&mut cmd);
        let mut proc = Service::start("peerlink-signaling", cmd);
        let http = proc.wait_for(Duration::from_secs(60), |l| {
            l.strip_prefix("http=")
                .map(|a| a.parse().expect("http addr"))
        });
        let mut stun6 = None;
        let stun = if args.iter().any(|a| a == "--no-stun") {
            Vec::new()
        } else {
            proc.wait_for(Duration::from_secs(60), |l| {
                if let Some(a) = l.strip_prefix("stun6=") {
                    stun6 = Some(a.parse().expect("stun6 addr"));
                }
                l.strip_prefix("stun=").map(|a| {
                    a.split(',')
                        .map(|s| s.parse().expect("stun addr"))
                        .collect()
                })
            })
        };
        Node {
            proc,
            http,
            stun,
            stun6,
            db: db.to_path_buf(),
        }
    }

    /// The node's process.
    pub fn child(&mut self) -> &mut Child {
        self.proc.child()
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/v1/ws?{}", self.http, query)
    }

    /// Register (ignoring "taken") and log in; returns the access token.
    pub async fn token(&self, user: &str) -> String {
        let c = reqwest::Client::new();
        let body = json!({"username": user, "password": "password-123"});
        let r = tokio::time::timeout(WAIT, c.post(self.url("/v1/register")).json(&body).send())
            .await
            .expect("register timeout")
            .expect("register");
        assert!(
            r.status().is_success() || r.status() == 409,
            "register {user}: {}",
            r.status()
        );
        let r = tokio::time::timeout(WAIT, c.post(self.url("/v1/login")).json(&body).send())
            .await
            .expect("login timeout")
            .expect("login");
        assert!(r.status().is_success(), "login {user}: {}", r.status());
        let v: Value = r.json().await.expect("login json");
        v["access_token"].as_str().expect("access_token").to_owned()
    }

    /// Connect a device of `user` (registering/logging in first).
    pub async fn connect(&self, user: &str, device: &str) -> Ws {
        let token = self.token(user).await;
        let mut ws = Ws::connect(&self.ws_url(&format!("token={token}&device={device}"))).await;
        let w = ws.recv_type("welcome").await;
        assert_eq!(w["user"], user);
        ws
    }

    pub async fn metric(&self, name: &str) -> u64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("peerlink_signaling_{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

pub type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client.
pub struct Ws {
    pub s: Stream,
}

/// What the server did instead of sending a frame.
#[derive(Debug)]
pub enum Ended {
    Closed(Option<(u16, String)>),
    Gone,
}

impl Ws {
    pub async fn connect(url: &str) -> Ws {
        let (s, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timeout")
            .expect("connect");
        Ws { s }
    }

    /// Drop the connection abruptly, as a NAT reset does: no close frame, and the TCP
    /// connection is reset (zero linger) rather than closed.
    pub fn abort(self) {
        if let MaybeTlsStream::Plain(tcp) = self.s.get_ref() {
            tcp.set_zero_linger().expect("set zero linger");
        }
        drop(self);
    }

    /// Next frame that is not `presence` (presence changes interleave with call frames when
    /// parties drop and come back).
    pub async fn recv_skip_presence(&mut self) -> Value {
        for _ in 0..100 {
            let v = self.recv().await;
            if v["type"] != "presence" {
                return v;
            }
        }
        panic!("only presence frames")
    }

    /// Next frame other than `presence`, which must be of type `ty` (a contact's presence may
    /// overtake the answer to the request that subscribed to it).
    pub async fn recv_type_skip_presence(&mut self, ty: &str) -> Value {
        let v = self.recv_skip_presence().await;
        assert_eq!(v["type"], ty, "expected {ty}, got {v}");
        v
    }

    /// Skip frames until `presence{user, status}`; any `call_ended` on the way fails.
    pub async fn wait_presence(&mut self, user: &str, status: &str) {
        for _ in 0..100 {
            let v = self.recv().await;
            assert_ne!(v["type"], "call_ended", "call ended while waiting: {v}");
            if v["type"] == "presence" && v["user"] == user && v["status"] == status {
                return;
            }
        }
        panic!("no presence {user} {status}")
    }

    pub async fn send(&mut self, v: Value) {
        tokio::time::timeout(WAIT, self.s.send(Message::Text(v.to_string().into())))
            .await
            .expect("send timeout")
            .expect("send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        let _ = tokio::time::timeout(WAIT, self.s.send(m))
            .await
            .expect("send timeout");
    }

    /// Next JSON frame, or how the connection ended.
    pub async fn next(&mut self) -> Result<Value, Ended> {
        loop {
            let m = tokio::time::timeout(WAIT, self.s.next())
                .await
                .expect("no frame within the wait");
            match m {
                Some(Ok(Message::Text(t))) => {
                    return Ok(serde_json::from_str(t.as_str()).expect("server sent JSON"));
                }
                Some(Ok(Message::Close(c))) => {
                    return Err(Ended::Closed(c.map(|CloseFrame { code, reason }| {
                        (u16::from(code), reason.to_string())
                    })));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(Ended::Gone),
            }
        }
    }

    /// Next frame, which must exist.
    pub async fn recv(&mut self) -> Value {
        match self.next().await {
            Ok(v) => v,
            Err(e) => panic!("connection ended: {e:?}"),
        }
    }

    /// Next frame, which must be of type `ty`.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(v["type"], ty, "expected {ty}, got {v}");
        v
    }

    /// Skip frames until the connection closes; returns the close code and reason.
    pub async fn closed(&mut self) -> Option<(u16, String)> {
        for _ in 0..100_000 {
            match self.next().await {
                Ok(_) => continue,
                Err(Ended::Closed(c)) => return c,
                Err(Ended::Gone) => return None,
            }
        }
        panic!("connection did not close")
    }
}

/// A valid session description with `n` candidates on `ip`.
pub fn desc(ip: &str, n: usize) -> Value {
    let cands: Vec<Value> = (0..n)
        .map(|i| {
            json!({"foundation": format!("f{i}"), "component": 1, "transport": "udp",
                   "priority": 2130706431u32 - i as u32, "address": ip, "port": 40000 + i, "type": "host"})
        })
        .collect();
    json!({
        "ice_ufrag": "ufrg",
        "ice_pwd": "abcdefghijklmnopqrstuvwx",
        "public_key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "candidates": cands,
        "end_of_candidates": false,
    })
}

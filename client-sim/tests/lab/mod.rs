//! The NAT-lab harness shared by the `lab_*` tests and the `lab` bench: the real service
//! binaries (`peerlink-directory`, `peerlink-signaling`, two `peerlink-relay`s) on public
//! hosts of a [`peerlink_netlab::Lab`] internet, and real `peerlink-sim` processes on hosts
//! behind NAT routers of every kind.
//!
//! Address plan (the lab's, see the `peerlink_netlab` crate doc): services sit at 203.0.113.200 (directory + signaling, STUN on
//! 3479 and the RFC 5780 alternate on 3480) and 203.0.113.210/.211 (relays: TURN over UDP and
//! TCP on 3478, over TLS on 443 with a certificate of the lab's own CA, which every client
//! trusts with `--ca`); router WAN
//! addresses are allocated by the lab from 203.0.113.1 upwards, LANs from 100.64.0.0/10.
//! Every child is started with [`peerlink_netlab::Netns::spawn_piped`] and is killed by pid
//! when its handle (or the lab) drops; service logs go to files in a temp dir and their tails
//! are printed when something fails.
//!
//! What it is not: a fleet launcher for anything but these tests (see `peerlink_sim::fleet`).
#![allow(dead_code)] // each test binary uses a different subset
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use peerlink_netlab::{Host, Lab, NatKind, Netns, NsChild, Router};
use serde_json::Value;

/// Password of every lab account.
pub const PASSWORD: &str = "lab-password-123";
/// Directory + signaling host.
pub const SVC_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
/// Second address of the directory + signaling host: signaling's alternate STUN address, so
/// RFC 5780 tests (`peerlink-sim nat-check`) have another IP to compare against.
pub const SVC_ALT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 201);
/// TURN over TLS port of the lab's relays.
pub const TLS_PORT: u16 = 443;
/// Relay hosts.
pub const RELAY_IPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(203, 0, 113, 210),
    Ipv4Addr::new(203, 0, 113, 211),
];
/// The services host's IPv6 address in a dual-stack world ([`World::start_dual_stack`]).
pub const SVC_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x200);
/// The relay hosts' IPv6 addresses in a dual-stack world (their IPv6 relayed addresses).
pub const RELAY_IPS6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x210),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x211),
];
/// The IPv6 internet's range, which relays deny as peers by default like the IPv4 ones.
pub const LAB_RANGE6: &str = "2001:db8::/32";
/// The lab's "internet": documentation ranges, which relays deny as peers by default (no
/// real peer has such an address). The LANs behind the NATs stay denied, as in production.
pub const LAB_RANGES: [&str; 2] = ["203.0.113.0/24", "198.51.100.0/24"];
/// Bound on each service's start-up.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Directory liveness TTL for nodes and relays (heartbeats every TTL/4): a killed relay leaves
/// the relay choice quickly.
pub const NODE_TTL_S: &str = "2";

/// A fresh lab, or a clear failure when not root (CI runs these tests as root).
pub fn lab() -> Lab {
    match Lab::new() {
        Ok(lab) => lab,
        Err(e) => panic!(
            "the NAT-lab tests need root with ip/nft/tc/conntrack installed \
             (scripts/setup.sh; CI runs them as root): {e}"
        ),
    }
}

/// Run `body` on a thread and fail if it takes longer than `limit`.
pub fn with_deadline<T: Send + 'static>(
    limit: Duration,
    body: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let out = body();
        let _ = tx.send(());
        out
    });
    match rx.recv_timeout(limit) {
        Ok(()) => handle.join().expect("test body panicked"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(_) => unreachable!("body finished without signalling"),
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("test exceeded its deadline of {limit:?}")
        }
    }
}

/// The `peerlink-sim` binary cargo built for this test or bench.
pub fn sim_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_peerlink-sim"))
}

/// A service binary of another workspace crate (see `peerlink_testkit::proc::workspace_bin`).
pub fn service_bin(name: &str) -> PathBuf {
    peerlink_testkit::proc::workspace_bin(name)
}

fn random_secret() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// A child process in a lab namespace whose stdout and stderr are collected by threads.
pub struct Proc {
    /// What it is (for messages).
    pub what: String,
    child: NsChild,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
    lines: Option<Mutex<mpsc::Receiver<String>>>,
    started: Instant,
}

/// A finished (or timed-out and killed) [`Proc`].
#[derive(Debug)]
pub struct Finished {
    /// What it was.
    pub what: String,
    /// Exit status (`None`: it was killed at the time limit).
    pub status: Option<ExitStatus>,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// Start -> exit.
    pub elapsed: Duration,
}

impl Finished {
    /// Whether it exited with status 0.
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// The last stdout line parsed as JSON (what `--json` prints).
    pub fn json(&self) -> Result<Value, String> {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .ok_or_else(|| self.describe("printed nothing on stdout"))?;
        serde_json::from_str(line).map_err(|e| self.describe(&format!("stdout is not JSON: {e}")))
    }

    /// The JSON report of a successful run, else a description of the failure.
    pub fn report(&self) -> Result<Value, String> {
        if !self.ok() {
            return Err(self.describe("failed"));
        }
        self.json()
    }

    /// Every stdout line parsed as JSON (`listen --sessions N --json` prints one per session)
    /// of a successful run.
    pub fn reports(&self) -> Result<Vec<Value>, String> {
        if !self.ok() {
            return Err(self.describe("failed"));
        }
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .map_err(|e| self.describe(&format!("printed a non-JSON line ({e}): {l}")))
            })
            .collect()
    }

    /// A failure message with the exit status and the output tails.
    pub fn describe(&self, why: &str) -> String {
        format!(
            "{} {why} (status {:?} after {:.1} s)\n--- stdout:\n{}\n--- stderr (tail):\n{}",
            self.what,
            self.status,
            self.elapsed.as_secs_f64(),
            tail_str(&self.stdout, 20),
            tail_str(&self.stderr, 30)
        )
    }
}

/// Both sides' reports of one exchange (`what`, e.g. "call a -> b"), or one error that
/// describes both processes (the side that succeeded as "ok").
fn both_reports(
    what: &str,
    (fa, a): (&Finished, Result<Value, String>),
    (fb, b): (&Finished, Result<Value, String>),
) -> Result<(Value, Value), String> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (a, b) => Err(format!(
            "{what} failed:\n{}\n{}",
            a.err().unwrap_or_else(|| fa.describe("ok")),
            b.err().unwrap_or_else(|| fb.describe("ok"))
        )),
    }
}

fn tail_str(s: &str, n: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(n)..].join("\n")
}

impl Proc {
    /// Start `cmd` in `ns`, collecting its output (stdout lines are also streamed to
    /// [`Proc::next_line`]); with `log` stderr goes to that file instead of memory.
    pub fn start(ns: &Netns, what: &str, cmd: Command, log: Option<&Path>) -> Proc {
        let mut child = ns
            .spawn_piped(cmd)
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let stdout = child.child_mut().stdout.take().expect("piped stdout");
        let stderr = child.child_mut().stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        let out = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let log = log.map(Path::to_path_buf);
        let err = std::thread::spawn(move || {
            let mut stderr = stderr;
            match log {
                Some(p) => {
                    let mut f = std::fs::File::create(&p).expect("creating a log file");
                    let _ = std::io::copy(&mut stderr, &mut f);
                    String::new()
                }
                None => {
                    let mut s = String::new();
                    let _ = stderr.read_to_string(&mut s);
                    s
                }
            }
        });
        Proc {
            what: what.to_owned(),
            child,
            out: Some(out),
            err: Some(err),
            lines: Some(Mutex::new(rx)),
            started: Instant::now(),
        }
    }

    /// The process id (inside the lab: `ip netns exec` execs in place).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Since start.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// The next stdout line, waiting at most until `deadline`.
    pub fn next_line(&mut self, deadline: Instant) -> Option<String> {
        let rx = self
            .lines
            .as_ref()?
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    }

    /// Whether it has exited (reaping it if so).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.child_mut().try_wait().ok().flatten()
    }

    /// SIGKILL it now (by pid; it is our own child).
    pub fn kill(&mut self) {
        let _ = self.child.child_mut().kill();
    }

    /// Wait for it to exit, at most `limit`; kill it at the limit.
    pub fn wait(mut self, limit: Duration) -> Finished {
        let deadline = Instant::now() + limit;
        let mut status = None;
        loop {
            if let Some(s) = self.exited() {
                status = Some(s);
                break;
            }
            if Instant::now() >= deadline {
                self.kill();
                let _ = self.child.child_mut().wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let elapsed = self.started.elapsed();
        self.lines = None;
        let stdout = self
            .out
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let stderr = self
            .err
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        Finished {
            what: self.what.clone(),
            status,
            stdout,
            stderr,
            elapsed,
        }
    }
}

/// A blocking HTTP/1.0 GET from inside `ns` (bounded by `timeout`): status and body.
pub fn http_get(
    ns: &Netns,
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let mut s = ns
        .tcp_connect(addr, timeout)
        .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
    let mut resp = Vec::new();
    s.take(8 << 20)
        .read_to_end(&mut resp)
        .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET http://{addr}{path}: no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET http://{addr}{path}: bad status line"))?;
    Ok((status, body.to_owned()))
}

/// One relay of the lab.
pub struct Relay {
    /// Its public host.
    pub host: Host,
    /// TURN address (UDP; TCP listens on the same address).
    pub turn: SocketAddr,
    /// TURN over TLS address.
    pub turn_tls: SocketAddr,
    /// Metrics HTTP address (`/stats`).
    pub metrics: SocketAddr,
    /// The process (`None` once killed).
    pub proc: Option<Proc>,
    log: PathBuf,
}

impl Relay {
    /// The relay's `/stats` document (fetched from inside its host).
    pub fn stats(&self) -> Result<Value, String> {
        let (code, body) = http_get(
            &self.host,
            self.metrics,
            "/stats",
            None,
            Duration::from_secs(5),
        )?;
        if code != 200 {
            return Err(format!("relay /stats: HTTP {code}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("relay /stats JSON: {e}"))
    }

    /// Sum of the relay's forwarding counters (packets that entered it to be relayed).
    pub fn forwarded(&self) -> u64 {
        let Ok(st) = self.stats() else { return 0 };
        [
            "received_packets_relayed",
            "forwarded_packets_client_to_client",
            "forwarded_packets_client_to_peer",
        ]
        .iter()
        .map(|k| st["counters"][*k].as_u64().unwrap_or(0))
        .sum()
    }

    /// Live allocations.
    pub fn allocations(&self) -> u64 {
        self.stats()
            .ok()
            .and_then(|s| s["allocations_active"].as_u64())
            .unwrap_or(0)
    }

    /// SIGKILL the relay (kill -9 of its pid).
    pub fn kill(&mut self) {
        if let Some(p) = self.proc.take() {
            let f = {
                let mut p = p;
                p.kill();
                p.wait(Duration::from_secs(5))
            };
            eprintln!("lab: relay {} killed ({:?})", self.turn, f.status);
        }
    }
}

/// The services of one lab: directory, signaling and two relays on public hosts.
pub struct World {
    /// Relays (index 0 and 1).
    pub relays: Vec<Relay>,
    directory: Option<Proc>,
    signaling: Option<Proc>,
    /// Signaling base URL as clients use it.
    pub signaling_url: String,
    /// Signaling's STUN responder.
    pub stun: SocketAddr,
    /// Signaling's second STUN address (RFC 5780).
    pub stun_alt: SocketAddr,
    /// Signaling's IPv6 STUN responder, in a dual-stack world.
    pub stun6: Option<SocketAddr>,
    /// Signaling's base URL over IPv6, in a dual-stack world.
    pub signaling_url6: Option<String>,
    /// The services' host.
    pub svc: Host,
    /// Temp dir: logs, database, client state files.
    pub dir: tempfile::TempDir,
    /// The lab CA's certificate (what clients trust with `--ca`).
    pub ca: PathBuf,
    cluster_token: String,
    /// The lab (dropped last: it kills whatever is left and deletes the namespaces).
    pub lab: Lab,
    clients: Mutex<u32>,
}

impl World {
    /// Build a lab and start the services in it (bounded by [`START_TIMEOUT`] each).
    pub fn start() -> World {
        Self::start_with(false)
    }

    /// [`World::start`] on a dual-stack internet: the services' hosts have IPv6 addresses too;
    /// signaling and the directory listen on both families (`[::]`), signaling answers STUN on
    /// both ([`SVC_IP6`] port 3479 beside the IPv4 one), and the relays (UDP listener on IPv4)
    /// relay both families (`--relay-ip` of each, IPv6 peers allowed).
    pub fn start_dual_stack() -> World {
        Self::start_with(true)
    }

    fn start_with(dual: bool) -> World {
        let lab = lab();
        if dual {
            lab.enable_ipv6().expect("IPv6 in the lab");
        }
        let dir = tempfile::Builder::new()
            .prefix("peerlink-lab-")
            .tempdir()
            .expect("temp dir");
        let cluster_token = random_secret();
        let token_secret = random_secret();
        let turn_secret = random_secret();
        let svc = if dual {
            lab.add_public_host_v6("svc", Some(SVC_IP), SVC_IP6)
        } else {
            lab.add_public_host("svc", SVC_IP)
        }
        .expect("svc host");
        svc.ns()
            .exec(&[
                "ip",
                "addr",
                "add",
                &format!("{SVC_ALT_IP}/24"),
                "dev",
                "eth0",
            ])
            .expect("second address of the svc host");
        let dir_addr = SocketAddr::from((SVC_IP, 8500));
        let directory_url = format!("http://{dir_addr}");
        let dir_listen = if dual {
            "[::]:8500".to_owned()
        } else {
            dir_addr.to_string()
        };

        let mut cmd = Command::new(service_bin("peerlink-directory"));
        cmd.args(["--listen", &dir_listen, "--node-ttl", NODE_TTL_S])
            .env("PEERLINK_CLUSTER_TOKEN", &cluster_token)
            .env("RUST_LOG", "warn");
        let mut directory = Proc::start(
            &svc,
            "peerlink-directory",
            cmd,
            Some(&dir.path().join("directory.log")),
        );
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match directory.next_line(deadline) {
                Some(l) if l.starts_with("listening on") => break,
                Some(_) => {}
                None => panic!(
                    "directory did not announce its address; log:\n{}",
                    log_tail(&dir.path().join("directory.log"))
                ),
            }
        }

        let ca = peerlink_testkit::tls::TestCa::new("peerlink lab CA");
        let ca_file = ca.write_cert(&dir.path().join("lab-ca.pem"));
        let mut relays = Vec::new();
        for (i, ip) in RELAY_IPS.iter().enumerate() {
            let name = format!("relay{}", i + 1);
            let host = if dual {
                lab.add_public_host_v6(&name, Some(*ip), RELAY_IPS6[i])
            } else {
                lab.add_public_host(&name, *ip)
            }
            .expect("relay host");
            let turn = SocketAddr::from((*ip, 3478));
            let turn_tls = SocketAddr::from((*ip, TLS_PORT));
            let metrics = SocketAddr::from((*ip, 9641));
            let files = ca.write_server(dir.path(), &format!("relay{}", i + 1), &[&ip.to_string()]);
            let mut cmd = Command::new(service_bin("peerlink-relay"));
            cmd.args(["--listen", &turn.to_string()])
                .args(["--listen-tcp", &turn.to_string()])
                .args(["--listen-tls", &turn_tls.to_string()])
                .arg("--tls-cert")
                .arg(&files.cert)
                .arg("--tls-key")
                .arg(&files.key)
                .args(["--relay-ip", &ip.to_string(), "--realm", "peerlink"])
                .args(["--metrics", &metrics.to_string(), "--workers", "1"])
                .args(["--log", "warn"])
                .args(["--directory", &directory_url])
                .args(["--relay-id", &format!("lab-relay{}", i + 1)])
                .args(["--public-addr", &turn.to_string()])
                .env("PEERLINK_RELAY_AUTH_SECRET", &turn_secret)
                .env("PEERLINK_CLUSTER_TOKEN", &cluster_token);
            for r in LAB_RANGES {
                cmd.args(["--allow-peer", r]);
            }
            if dual {
                cmd.args(["--relay-ip", &RELAY_IPS6[i].to_string()])
                    .args(["--allow-peer", LAB_RANGE6]);
            }
            let log = dir.path().join(format!("relay{}.log", i + 1));
            let proc = Proc::start(&host, &format!("relay{}", i + 1), cmd, Some(&log));
            relays.push(Relay {
                host,
                turn,
                turn_tls,
                metrics,
                proc: Some(proc),
                log,
            });
        }

        let sig_addr = SocketAddr::from((SVC_IP, 8443));
        let stun = SocketAddr::from((SVC_IP, 3479));
        let stun_alt = SocketAddr::from((SVC_ALT_IP, 3480));
        let stun6 = dual.then(|| SocketAddr::from((SVC_IP6, 3479)));
        let mut cmd = Command::new(service_bin("peerlink-signaling"));
        if let Some(s6) = stun6 {
            // One socket for both families; other services know the node by its IPv4 URL.
            cmd.args(["--listen", "[::]:8443", "--stun6", &s6.to_string()])
                .args(["--internal-url", &format!("http://{sig_addr}")]);
        } else {
            cmd.args(["--listen", &sig_addr.to_string()]);
        }
        cmd.args([
            "--stun",
            &stun.to_string(),
            "--stun-alt",
            &stun_alt.to_string(),
        ])
        .args(["--directory", &directory_url])
        .args(["--ring-timeout", "60s"])
        // Cheap password hashing: dozens of lab accounts on a 2-core machine.
        .args(["--argon2-m-kib", "1024", "--argon2-t", "1"])
        .args(["--log", "warn"])
        .arg("--db")
        .arg(dir.path().join("signaling.db"))
        .env("PEERLINK_TOKEN_SECRET", &token_secret)
        .env("PEERLINK_TURN_SECRET", &turn_secret)
        .env("PEERLINK_CLUSTER_TOKEN", &cluster_token);
        for r in &relays {
            // Static fallback when the directory has no live relay to offer.
            cmd.args(["--relay", &r.turn.to_string()]);
        }
        let sig_log = dir.path().join("signaling.log");
        let mut signaling = Proc::start(&svc, "peerlink-signaling", cmd, Some(&sig_log));
        let mut seen = 0;
        while seen < 2 {
            match signaling.next_line(deadline.max(Instant::now() + START_TIMEOUT)) {
                Some(l) if l.starts_with("http=") || l.starts_with("stun=") => seen += 1,
                Some(_) => {}
                None => panic!(
                    "signaling did not announce its addresses; log:\n{}",
                    log_tail(&sig_log)
                ),
            }
        }

        let world = World {
            relays,
            directory: Some(directory),
            signaling: Some(signaling),
            signaling_url: format!("http://{sig_addr}"),
            stun,
            stun_alt,
            stun6,
            signaling_url6: dual.then(|| format!("http://[{SVC_IP6}]:8443")),
            svc,
            dir,
            ca: ca_file,
            cluster_token,
            lab,
            clients: Mutex::new(0),
        };
        world.wait_relays_registered(2, START_TIMEOUT);
        world
    }

    /// Wait until the directory lists `n` live relays.
    pub fn wait_relays_registered(&self, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last;
        loop {
            match http_get(
                &self.svc,
                SocketAddr::from((SVC_IP, 8500)),
                "/v1/relays",
                Some(&self.cluster_token),
                Duration::from_secs(5),
            ) {
                Ok((200, body)) => {
                    let live = self
                        .relays
                        .iter()
                        .filter(|r| body.contains(&r.turn.to_string()))
                        .count();
                    if live >= n {
                        return;
                    }
                    last = body;
                }
                Ok((code, body)) => last = format!("HTTP {code}: {body}"),
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                panic!(
                    "the directory lists fewer than {n} relays: {last}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Tails of every service log.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["directory.log", "signaling.log", "relay1.log", "relay2.log"] {
            s.push_str(&format!(
                "--- {f}:\n{}\n",
                log_tail(&self.dir.path().join(f))
            ));
        }
        s
    }

    /// Add a router of `kind` (clean link).
    pub fn router(&self, kind: NatKind) -> Router {
        self.lab.add_nat(kind).expect("router")
    }

    /// A client host named `name` behind `router`, with an account `user` registered and
    /// logged in through the real CLI (run inside the host's namespace).
    pub fn client(&self, router: &Router, name: &str, user: &str) -> Client {
        let host = router.add_host(name).expect("client host");
        let mut bind: Vec<IpAddr> = vec![host.ip().into()];
        bind.extend(host.ip6().map(IpAddr::from));
        let c = Client {
            stun6: host.ip6().and(self.stun6),
            bind,
            state: self.dir.path().join(format!("{user}.state.json")),
            host,
            user: user.to_owned(),
            server: self.signaling_url.clone(),
            stun: self.stun,
            ca: self.ca.clone(),
        };
        self.register_and_login(c)
    }

    /// An IPv6-only client host `name` on the internet at `ip6` (dual-stack world), with an
    /// account `user`: it reaches signaling, STUN and peers over IPv6 only.
    pub fn client_v6_only(&self, name: &str, user: &str, ip6: Ipv6Addr) -> Client {
        let (Some(url6), Some(s6)) = (self.signaling_url6.clone(), self.stun6) else {
            panic!("an IPv6-only client needs World::start_dual_stack");
        };
        let host = self
            .lab
            .add_public_host_v6(name, None, ip6)
            .expect("IPv6-only host");
        let c = Client {
            stun6: None,
            bind: vec![ip6.into()],
            state: self.dir.path().join(format!("{user}.state.json")),
            host,
            user: user.to_owned(),
            server: url6,
            stun: s6,
            ca: self.ca.clone(),
        };
        self.register_and_login(c)
    }

    fn register_and_login(&self, c: Client) -> Client {
        let user = c.user.clone();
        let user = user.as_str();
        // One retry each: an HTTP request lost under heavy load (several labs on two cores)
        // is printed, not hidden; a second failure fails the test. A register that did land
        // the first time makes the retry fail ("taken"), which the login then settles.
        let reg = c.run(&["register", user], Duration::from_secs(60));
        if !reg.ok() {
            eprintln!("lab: retrying once: {}", reg.describe("failed"));
            let _ = c.run(&["register", user], Duration::from_secs(60));
        }
        let login = c.run(&["login", user], Duration::from_secs(60));
        if !login.ok() {
            eprintln!("lab: retrying once: {}", login.describe("failed"));
            c.run_ok(&["login", user], Duration::from_secs(60));
        }
        c
    }
}

fn log_tail(p: &Path) -> String {
    tail_str(&std::fs::read_to_string(p).unwrap_or_default(), 25)
}

impl Drop for World {
    fn drop(&mut self) {
        // Children first (by pid), then the lab deletes the namespaces.
        for r in &mut self.relays {
            if let Some(mut p) = r.proc.take() {
                p.kill();
            }
        }
        if let Some(mut p) = self.signaling.take() {
            p.kill();
        }
        if let Some(mut p) = self.directory.take() {
            p.kill();
        }
    }
}

/// A `peerlink-sim` user on a lab host.
pub struct Client {
    /// The host it runs on.
    pub host: Host,
    /// Its account.
    pub user: String,
    /// Signaling's IPv6 STUN address beside `stun`, for a dual-stack host.
    stun6: Option<SocketAddr>,
    /// The addresses the call's sockets bind on (one per family it has).
    bind: Vec<IpAddr>,
    state: PathBuf,
    server: String,
    stun: SocketAddr,
    ca: PathBuf,
}

impl Client {
    /// `peerlink-sim --server .. --state .. --json ARGS`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(sim_bin());
        c.args(["--server", &self.server])
            .arg("--state")
            .arg(&self.state)
            .arg("--ca")
            .arg(&self.ca)
            .arg("--json")
            .args(args)
            .env("PEERLINK_PASSWORD", PASSWORD)
            // LAB_CLIENT_LOG=info shows the clients' recovery steps in failure output.
            .env(
                "PEERLINK_LOG",
                std::env::var("LAB_CLIENT_LOG").unwrap_or_else(|_| "warn".into()),
            );
        c
    }

    /// The network flags of `call`/`listen` for this host.
    pub fn net_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        for b in &self.bind {
            v.extend(["--bind".into(), b.to_string()]);
        }
        for s in std::iter::once(self.stun).chain(self.stun6) {
            v.extend(["--stun".into(), s.to_string()]);
        }
        v
    }

    /// Start `peerlink-sim ARGS` in the client's namespace.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        let what = format!(
            "{}@{}: peerlink-sim {}",
            self.user,
            self.host.name(),
            args.join(" ")
        );
        Proc::start(&self.host, &what, self.command(args), None)
    }

    /// Run `peerlink-sim ARGS` to completion (bounded).
    pub fn run(&self, args: &[&str], limit: Duration) -> Finished {
        self.spawn(args).wait(limit)
    }

    /// Run and require success; returns the JSON it printed.
    pub fn run_ok(&self, args: &[&str], limit: Duration) -> Value {
        let f = self.run(args, limit);
        f.report().unwrap_or_else(|e| panic!("{e}"))
    }

    /// `listen` (auto-answer) with the host's network flags plus `extra`.
    pub fn listen(&self, extra: &[&str]) -> Proc {
        let mut args: Vec<String> = vec!["listen".into(), "--wait".into(), "120s".into()];
        args.extend(self.net_args());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(&refs)
    }

    /// `call PEER --duration D` with the host's network flags plus `extra`.
    pub fn call(&self, peer: &str, duration: Duration, extra: &[&str]) -> Proc {
        let mut args: Vec<String> = vec![
            "call".into(),
            peer.into(),
            "--duration".into(),
            format!("{}ms", duration.as_millis()),
        ];
        args.extend(self.net_args());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(&refs)
    }

    /// Wait until `peer` shows online in this user's contact list (the explicit signal that
    /// the peer's `listen` has its signaling session up), polling `contacts --add PEER`.
    pub fn wait_online(&self, peer: &str, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        while Instant::now() < deadline {
            let f = self.run(&["contacts", "--add", peer], Duration::from_secs(30));
            match f.report() {
                Ok(v) => {
                    let online = v.as_array().is_some_and(|a| {
                        a.iter()
                            .any(|c| c["username"] == peer && c["status"] == "online")
                    });
                    if online {
                        return Ok(());
                    }
                    last = v.to_string();
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "{peer} not online for {} within {limit:?}: {last}",
            self.user
        ))
    }
}

/// What one call between two lab clients produced.
#[derive(Debug, Clone)]
pub struct CallOutcome {
    /// Caller's report (JSON of `call --json`).
    pub caller: Value,
    /// Callee's report (JSON of `listen --json`).
    pub callee: Value,
}

impl CallOutcome {
    /// The caller's final path ("direct"/"relay").
    pub fn path(&self) -> Option<&str> {
        self.caller["path"].as_str()
    }

    /// Caller's answer -> first media, ms.
    pub fn answer_to_first_media_ms(&self) -> Option<f64> {
        self.caller["answer_to_first_media_ms"].as_f64()
    }
}

/// One call: `callee` listens, `caller` waits for it to be online, calls for `duration`.
/// Both processes are bounded; a failure returns both sides' output.
pub fn run_call(
    caller: &Client,
    callee: &Client,
    duration: Duration,
    caller_extra: &[&str],
) -> Result<CallOutcome, String> {
    let listener = callee.listen(&[]);
    if let Err(e) = caller.wait_online(&callee.user, Duration::from_secs(60)) {
        let f = listener.wait(Duration::ZERO);
        return Err(format!("{e}\n{}", f.describe("(listener)")));
    }
    let call = caller.call(&callee.user, duration, caller_extra);
    let limit = duration + Duration::from_secs(75);
    let fc = call.wait(limit);
    let fl = listener.wait(Duration::from_secs(20));
    let what = format!("call {} -> {}", caller.user, callee.user);
    both_reports(&what, (&fc, fc.report()), (&fl, fl.report()))
        .map(|(caller, callee)| CallOutcome { caller, callee })
}

/// Wait until `router` has forwarded at least `at_least` more inbound UDP datagrams than
/// `since` (media is flowing through it), bounded by `limit`; fails early if `proc` exits.
pub fn wait_inbound_udp(
    router: &Router,
    since: u64,
    at_least: u64,
    limit: Duration,
    proc: &mut Proc,
) -> Result<u64, String> {
    let deadline = Instant::now() + limit;
    loop {
        let (inbound, _) = router.udp_forwarded().map_err(|e| e.to_string())?;
        if inbound >= since + at_least {
            return Ok(inbound);
        }
        if let Some(s) = proc.exited() {
            return Err(format!("{} exited ({s}) before media flowed", proc.what));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "only {} inbound UDP datagrams through {router:?} within {limit:?}",
                inbound - since
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A numeric field of a call report, or a failure naming the field (a missing field is a
/// contract violation, not a pass).
pub fn field_f64(report: &Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("call report lacks numeric `{key}`: {report}"))
}

/// What one file transfer between two lab clients produced.
#[derive(Debug, Clone)]
pub struct TransferOutcome {
    /// Sender's report (JSON of `send-file --json`).
    pub sender: Value,
    /// Receiver's report (the `"kind": "file"` line of `listen --save-dir .. --json`).
    pub receiver: Value,
    /// File bytes * 8 / transfer time, bit/s (the receiver's figure).
    pub throughput_bps: f64,
    /// Transfer time (offer answered -> verdict), s (the receiver's figure).
    pub seconds: f64,
    /// "direct" or "relay" (the receiver's path at the end).
    pub path: Option<String>,
}

/// A file of `size` random bytes in the world's temp dir, and a fresh directory to save it in.
pub fn make_file(world: &World, tag: &str, size: usize) -> (PathBuf, Vec<u8>, PathBuf) {
    use rand::RngCore as _;
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let src = world.dir.path().join(format!("{tag}-{n}.bin"));
    let mut data = vec![0u8; size];
    rand::rng().fill_bytes(&mut data);
    std::fs::write(&src, &data).expect("writing a test file");
    let save = world.dir.path().join(format!("saved-{tag}-{n}"));
    std::fs::create_dir_all(&save).expect("creating a save dir");
    (src, data, save)
}

/// Start `send-file RECEIVER SRC` on `sender`.
pub fn send_file(sender: &Client, receiver: &str, src: &Path) -> Proc {
    let mut args: Vec<String> = vec![
        "send-file".into(),
        receiver.into(),
        src.display().to_string(),
        "--timeout".into(),
        "120s".into(),
    ];
    args.extend(sender.net_args());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    sender.spawn(&refs)
}

/// Check the pair of reports of one file session and that the stored file is byte-for-byte
/// `data`.
pub fn check_transfer(
    sender: Value,
    receiver: Value,
    data: &[u8],
) -> Result<TransferOutcome, String> {
    if receiver["kind"] != "file" {
        return Err(format!(
            "receiver's session was not a file session: {receiver}"
        ));
    }
    let stored = receiver["file"]
        .as_str()
        .ok_or_else(|| format!("receiver report names no stored file: {receiver}"))?;
    let got = std::fs::read(stored).map_err(|e| format!("reading {stored}: {e}"))?;
    if got != data {
        return Err(format!(
            "stored file {stored} differs from the original ({} vs {} bytes)",
            got.len(),
            data.len()
        ));
    }
    Ok(TransferOutcome {
        throughput_bps: receiver["throughput_bps"].as_f64().unwrap_or(0.0),
        seconds: receiver["duration_s"].as_f64().unwrap_or(0.0),
        path: receiver["path"].as_str().map(str::to_owned),
        sender,
        receiver,
    })
}

/// Send a fresh file of `size` random bytes from `sender` to `receiver` with the real CLI
/// (`listen --save-dir` on one side, `send-file` on the other) and check the stored file is
/// byte-for-byte the original.
pub fn transfer(
    world: &World,
    sender: &Client,
    receiver: &Client,
    size: usize,
) -> Result<TransferOutcome, String> {
    let (src, data, save) = make_file(world, &sender.user, size);
    let save_arg = save.display().to_string();
    let listener = receiver.listen(&["--save-dir", &save_arg]);
    if let Err(e) = sender.wait_online(&receiver.user, Duration::from_secs(60)) {
        let f = listener.wait(Duration::ZERO);
        return Err(format!("{e}\n{}", f.describe("(listener)")));
    }
    let fs = send_file(sender, &receiver.user, &src).wait(Duration::from_secs(150));
    let fl = listener.wait(Duration::from_secs(30));
    let what = format!("transfer {} -> {}", sender.user, receiver.user);
    both_reports(&what, (&fs, fs.report()), (&fl, fl.report()))
        .and_then(|(s, r)| check_transfer(s, r, &data))
}

/// A call of `duration` and then a transfer of `size` random bytes from caller to callee,
/// answered by one `listen --sessions 2 --save-dir` process (sessions one after another).
pub fn call_then_transfer(
    world: &World,
    caller: &Client,
    callee: &Client,
    duration: Duration,
    size: usize,
) -> (Result<CallOutcome, String>, Result<TransferOutcome, String>) {
    let (src, data, save) = make_file(world, &caller.user, size);
    let save_arg = save.display().to_string();
    let listener = callee.listen(&["--sessions", "2", "--save-dir", &save_arg]);
    if let Err(e) = caller.wait_online(&callee.user, Duration::from_secs(60)) {
        let f = listener.wait(Duration::ZERO);
        let e = format!("{e}\n{}", f.describe("(listener)"));
        return (Err(e.clone()), Err(e));
    }
    let fc = caller
        .call(&callee.user, duration, &[])
        .wait(duration + Duration::from_secs(75));
    let fs = send_file(caller, &callee.user, &src).wait(Duration::from_secs(150));
    let fl = listener.wait(Duration::from_secs(30));
    let lines = fl.reports();
    let line = |kind: &str| -> Result<Value, String> {
        let lines = lines.as_ref().map_err(Clone::clone)?;
        lines
            .iter()
            .find(|l| l["kind"] == kind)
            .cloned()
            .ok_or_else(|| fl.describe(&format!("printed no {kind} report")))
    };
    let what = format!("call {} -> {}", caller.user, callee.user);
    let call = both_reports(&what, (&fc, fc.report()), (&fl, line("call")))
        .map(|(caller, callee)| CallOutcome { caller, callee });
    let what = format!("transfer {} -> {}", caller.user, callee.user);
    let file = both_reports(&what, (&fs, fs.report()), (&fl, line("file")))
        .and_then(|(s, r)| check_transfer(s, r, &data));
    (call, file)
}

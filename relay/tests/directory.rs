//! Directory registration against the real `peerlink-directory` binary on loopback:
//! the relay appears in `GET /v1/relays` with its TURN address, metrics address, capacity and
//! region; allocations show up in the heartbeats; `choose_relays` returns it until a SIGTERM
//! drain, which the directory sees as `draining = true`; a clean exit deregisters; after a
//! SIGKILL + restart of the directory on the same port the relay re-registers within a heartbeat
//! interval plus margin; a relay started while the directory is down serves anyway and registers
//! once the directory comes up. Each relay test runs on both backends.
//!
//! Takes `peerlink-directory` from the same target directory (built when missing).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Relay, STEP, TurnClient, free_tcp_port};
use peerlink_api::directory::{ChooseRelaysRequest, RelayInfo};
use peerlink_api::directory_client::DirectoryClient;
use peerlink_proto::Method;
use peerlink_proto::attrs::{AlternateServer, RequestedTransport};
use peerlink_testkit::proc::{Service, workspace_bin};

const TOKEN: &str = "relay-directory-test-token";
const REGION: &str = "test-region";
const CAPACITY: u64 = 50;
/// Directory relay TTL in seconds; it recommends heartbeats every TTL / 3 (1 s here).
const NODE_TTL_S: f64 = 3.0;
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Slack for a loaded 2-core machine on top of protocol-given delays.
const MARGIN: Duration = Duration::from_secs(6);

/// A running directory process, killed (SIGKILL) and reaped on drop.
struct Directory {
    proc: Service,
    addr: SocketAddr,
}

impl Directory {
    fn start(port: u16) -> Directory {
        let mut cmd = Command::new(workspace_bin("peerlink-directory"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--node-ttl", &NODE_TTL_S.to_string()])
            .env("PEERLINK_CLUSTER_TOKEN", TOKEN)
            .env("RUST_LOG", "warn");
        let mut proc = Service::start("peerlink-directory", cmd);
        let addr: SocketAddr = proc.wait_for(STEP, |l| {
            l.strip_prefix("listening on ").map(|a| a.parse().unwrap())
        });
        assert_eq!(addr.port(), port);
        Directory { proc, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn kill9(mut self) {
        assert!(self.proc.kill().is_some());
    }
}

/// Synchronous view of the directory API for the test thread (every call bounded by STEP).
struct Api {
    rt: tokio::runtime::Runtime,
    client: DirectoryClient,
}

impl Api {
    fn new(url: &str) -> Api {
        Api {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            client: DirectoryClient::with_timeout(url, TOKEN, Duration::from_secs(3)).unwrap(),
        }
    }

    fn run<T, E: std::fmt::Debug>(&self, f: impl Future<Output = Result<T, E>>) -> Option<T> {
        match self
            .rt
            .block_on(async { tokio::time::timeout(STEP, f).await })
        {
            Ok(Ok(v)) => Some(v),
            _ => None,
        }
    }

    /// The relay's entry, if listed (None also when the directory does not answer).
    fn relay(&self, id: &str) -> Option<RelayInfo> {
        self.run(self.client.list_relays())?
            .into_iter()
            .find(|r| r.relay_id == id)
    }

    /// Whether `choose_relays` for our region returns `id`.
    fn chosen(&self, id: &str) -> bool {
        let req = ChooseRelaysRequest {
            caller_region: REGION.into(),
            callee_region: None,
            count: 8,
        };
        self.run(self.client.choose_relays(&req))
            .is_some_and(|v| v.iter().any(|r| r.relay_id == id))
    }
}

/// True when the directory at `url` does not answer.
fn api_down(url: &str) -> bool {
    let addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
}

fn start_relay(io: &str, dir_url: &str, id: &str) -> Relay {
    Relay::start(
        io,
        &[
            "--directory",
            dir_url,
            "--cluster-token",
            TOKEN,
            "--relay-id",
            id,
            "--region",
            REGION,
            "--max-allocations",
            &CAPACITY.to_string(),
            "--drain-timeout",
            "60",
        ],
    )
}

/// Registration with the right figures, heartbeated allocations, choice, drain, deregistration.
fn registers_heartbeats_drains_and_deregisters(io: &str) {
    let dir = Directory::start(free_tcp_port());
    let api = Api::new(&dir.url());
    let id = format!("relay-main-{io}");
    let mut relay = start_relay(io, &dir.url(), &id);

    relay.wait_until("registration", STEP, || api.relay(&id).is_some());
    let info = api.relay(&id).unwrap();
    assert_eq!(
        info.turn_addr, relay.listen,
        "public address defaults to listen"
    );
    assert_eq!(info.metrics_addr, relay.metrics);
    assert_eq!(info.capacity, CAPACITY);
    assert_eq!(info.region, REGION);
    assert!(info.healthy && !info.draining, "{info:?}");
    assert_eq!(info.allocations, 0);
    assert!(api.chosen(&id), "a fresh healthy relay is chosen");

    // Two allocations (two 5-tuples) show up in a later heartbeat, with the load figure.
    let mut a = TurnClient::new(relay.listen, "user", "pass");
    let mut b = TurnClient::new(relay.listen, "user", "pass");
    a.allocate().unwrap();
    b.allocate().unwrap();
    relay.wait_until("allocations in a heartbeat", STEP + MARGIN, || {
        api.relay(&id).is_some_and(|r| r.allocations == 2)
    });
    let info = api.relay(&id).unwrap();
    assert!(
        (info.load - 2.0 / CAPACITY as f64).abs() < 1e-9,
        "load is allocations / capacity: {info:?}"
    );

    // SIGTERM: draining reaches the directory (allocations keep the relay alive meanwhile) and
    // the relay is no longer chosen, also after later regular heartbeats.
    relay.signal(libc::SIGTERM);
    relay.wait_until("draining in the directory", STEP, || {
        api.relay(&id).is_some_and(|r| r.draining)
    });
    relay.wait_until("no longer chosen", STEP, || !api.chosen(&id));
    // Stays excluded across later regular heartbeats (observed over 2.5 intervals).
    let window = Instant::now() + HEARTBEAT * 5 / 2;
    while Instant::now() < window {
        let info = api.relay(&id).unwrap();
        assert!(info.draining && info.healthy, "{info:?}");
        assert!(!api.chosen(&id), "a draining relay was chosen");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        relay
            .log_text()
            .contains("drain announced to the directory"),
        "the drain is heartbeated at once:\n{}",
        relay.log_text()
    );

    // Last allocations end -> drain completes -> clean exit -> deregistered.
    a.refresh(0).unwrap();
    b.refresh(0).unwrap();
    let status = relay
        .wait_exit(STEP + MARGIN)
        .expect("relay exits after drain");
    assert!(status.success(), "{status:?}\n{}", relay.log_text());
    assert!(
        api.relay(&id).is_none(),
        "deregistered on exit:\n{}",
        relay.log_text()
    );
    assert!(relay.log_text().contains("deregistered from the directory"));
}

/// SIGKILL the directory, restart it on the same port: the relay registers again within one
/// heartbeat interval plus margin, with its current figures; SIGINT exit deregisters.
fn reregisters_after_directory_restart(io: &str) {
    let port = free_tcp_port();
    let dir = Directory::start(port);
    let url = dir.url();
    let api = Api::new(&url);
    let id = format!("relay-restart-{io}");
    let mut relay = start_relay(io, &url, &id);
    let mut c = TurnClient::new(relay.listen, "user", "pass");
    c.allocate().unwrap();
    relay.wait_until("registration with the allocation", STEP + MARGIN, || {
        api.relay(&id).is_some_and(|r| r.allocations == 1)
    });

    dir.kill9();
    let dir = Directory::start(port);
    let restarted = Instant::now();
    relay.wait_until("re-registration", HEARTBEAT + MARGIN, || {
        api.relay(&id).is_some()
    });
    let info = api.relay(&id).unwrap();
    assert_eq!(info.turn_addr, relay.listen);
    assert_eq!(info.allocations, 1, "registration carries current figures");
    assert!(info.healthy && !info.draining);
    assert!(api.chosen(&id));
    eprintln!("re-registered {:?} after restart", restarted.elapsed());

    relay.signal(libc::SIGINT);
    assert!(relay.wait_exit(STEP).expect("exit on SIGINT").success());
    assert!(api.relay(&id).is_none(), "deregistered on SIGINT exit");
    drop(dir);
}

/// Directory down at start: the relay serves, says so once, keeps retrying, and registers once
/// the directory comes up.
fn registers_once_directory_comes_up(io: &str) {
    let port = free_tcp_port();
    let url = format!("http://127.0.0.1:{port}");
    let id = format!("relay-late-{io}");
    let relay = start_relay(io, &url, &id);
    // Serving without the directory.
    let mut c = TurnClient::new(relay.listen, "user", "pass");
    c.allocate()
        .expect("relay serves while the directory is down");
    relay.wait_until("the outage log line", STEP, || {
        relay.log_text().contains("directory unreachable")
    });

    // An observation window, not synchronisation: the loop retries every second meanwhile,
    // and the outage must still be one log line.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(api_down(&url), "nothing listens on the directory port yet");

    let dir = Directory::start(port);
    let api = Api::new(&dir.url());
    relay.wait_until(
        "registration after the directory came up",
        STEP + MARGIN,
        || api.relay(&id).is_some_and(|r| r.allocations == 1),
    );
    assert!(api.chosen(&id));
    let log = relay.log_text();
    assert_eq!(
        log.matches("directory unreachable").count(),
        1,
        "one line per outage, not per retry:\n{log}"
    );
    assert!(log.contains("directory answering again"), "{log}");
}

/// A full relay answers Allocate with 300 Try Alternate naming the healthy relay the directory
/// lists, the client allocates there, and once that relay is gone the full one answers 508.
/// Stream listeners are announced to the directory.
fn full_relay_redirects_to_a_healthy_alternate(io: &str) {
    let dir = Directory::start(free_tcp_port());
    let api = Api::new(&dir.url());
    let (full_id, alt_id) = (format!("relay-full-{io}"), format!("relay-alt-{io}"));
    let tcp: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let url = dir.url();
    let with_dir = |id: &str, extra: &[&str]| {
        let mut args = vec![
            "--directory",
            &url,
            "--cluster-token",
            TOKEN,
            "--relay-id",
            id,
        ];
        args.extend_from_slice(extra);
        Relay::start(io, &args)
    };
    let full = with_dir(&full_id, &["--max-allocations", "1"]);
    let tcp_flag = tcp.to_string();
    let mut alt = with_dir(&alt_id, &["--listen-tcp", &tcp_flag]);
    full.wait_until("both registered", STEP, || {
        api.relay(&full_id).is_some() && api.relay(&alt_id).is_some()
    });
    let info = api.relay(&alt_id).unwrap();
    assert_eq!(info.turn_tcp_addr, Some(tcp), "{info:?}");
    assert_eq!(info.turn_tls_addr, None);

    let mut first = TurnClient::new(full.listen, "user", "pass");
    first.allocate().unwrap();
    // Full now. Once it has read the relay list (every 5 s) it names the other relay.
    let mut second = TurnClient::new(full.listen, "user", "pass");
    let deadline = Instant::now() + Duration::from_secs(5) + MARGIN;
    let named = loop {
        let r = second
            .request(Method::ALLOCATE, &|b| {
                b.add(&RequestedTransport::UDP).unwrap()
            })
            .expect("an answer");
        match r.error_code() {
            Some(300) => break r.msg().get::<AlternateServer>().unwrap().unwrap().0,
            Some(508) if Instant::now() < deadline => std::thread::sleep(STEP / 20),
            other => panic!("expected 300, got {other:?}\n{}", full.log_text()),
        }
    };
    assert_eq!(named, alt.listen);
    second.server = named;
    second.allocate().expect("allocated on the alternate");
    alt.wait_until("the allocation on the alternate", STEP, || {
        alt.stat("allocations_active") == 1
    });
    full.wait_until("the redirect counted", STEP, || {
        full.stat("allocations_redirected") >= 1
    });

    // The alternate dies: unhealthy after the directory's TTL, dropped at the next read.
    alt.signal(libc::SIGKILL);
    assert!(alt.wait_exit(STEP).is_some());
    let mut third = TurnClient::new(full.listen, "user", "pass");
    let deadline = Instant::now() + Duration::from_secs_f64(NODE_TTL_S + 5.0) + MARGIN;
    loop {
        match third.allocate() {
            Err(508) => break,
            Err(300) if Instant::now() < deadline => std::thread::sleep(STEP / 20),
            other => panic!("expected 508 once the alternate is gone, got {other:?}"),
        }
    }
}

#[test]
fn full_relay_redirects_to_a_healthy_alternate_uring() {
    full_relay_redirects_to_a_healthy_alternate("uring");
}

#[test]
fn full_relay_redirects_to_a_healthy_alternate_epoll() {
    full_relay_redirects_to_a_healthy_alternate("epoll");
}

#[test]
fn registers_heartbeats_drains_and_deregisters_uring() {
    registers_heartbeats_drains_and_deregisters("uring");
}

#[test]
fn registers_heartbeats_drains_and_deregisters_epoll() {
    registers_heartbeats_drains_and_deregisters("epoll");
}

#[test]
fn reregisters_after_directory_restart_uring() {
    reregisters_after_directory_restart("uring");
}

#[test]
fn reregisters_after_directory_restart_epoll() {
    reregisters_after_directory_restart("epoll");
}

#[test]
fn registers_once_directory_comes_up_uring() {
    registers_once_directory_comes_up("uring");
}

#[test]
fn registers_once_directory_comes_up_epoll() {
    registers_once_directory_comes_up("epoll");
}

#[test]
fn directory_without_token_is_refused_before_binding() {
    let out = Command::new(common::bin())
        .args(["--listen", "127.0.0.1:3478", "--user", "u:p"])
        .args(["--directory", "http://127.0.0.1:1"])
        .env_remove("PEERLINK_CLUSTER_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster token"), "{err}");
}

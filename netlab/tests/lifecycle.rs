//! Lab lifecycle: addresses and names, running code inside namespaces, cleanup on drop and
//! on panic, and the sweep of stale namespaces.
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns, unwrap

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{lab, with_deadline};
use peerlink_netlab::{LabError, LinkConditions, NatKind, sweep_stale};

fn netns_list() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn ours(prefix: &str) -> Vec<String> {
    netns_list()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Threads of this process whose name starts with `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with(name))
        })
        .count()
}

#[test]
fn drop_removes_every_namespace_thread_and_child() {
    if !peerlink_netlab::root_or_skip("drop_removes_every_namespace_thread_and_child") {
        return;
    }
    with_deadline(Duration::from_secs(40), || {
        let lab = lab();
        let prefix = lab.prefix().to_owned();
        let server = lab
            .add_public_host("server", "198.51.100.20".parse().unwrap())
            .unwrap();
        let slow = LinkConditions {
            delay: Duration::from_millis(5),
            ..Default::default()
        };
        let router = lab.add_nat_with(NatKind::Symmetric, slow).unwrap();
        let alice = router.add_host("alice").unwrap();
        let created = lab.namespaces();
        let mut sorted = created.clone();
        sorted.sort();
        let mut listed = ours(&prefix);
        listed.sort();
        assert_eq!(
            sorted, listed,
            "lab.namespaces() is what `ip netns list` shows"
        );
        assert_eq!(
            created.len(),
            5,
            "inet, server, router, wire, alice: {created:?}"
        );
        assert_eq!(threads_named("netlab-wire"), 1);

        // Addresses and names.
        assert_eq!(server.ip().to_string(), "198.51.100.20");
        assert!(router.wan_ip().octets()[..3] == [203, 0, 113]);
        assert_eq!(alice.ip().octets()[..2], [100, 64]);
        assert_eq!(alice.gateway(), router.lan_gateway());
        assert_eq!(alice.behind(), Some(NatKind::Symmetric));
        assert!(alice.name() == "alice" && alice.ns().name().starts_with(&prefix));
        assert!(matches!(
            lab.add_public_host("server", "203.0.113.9".parse().unwrap()),
            Err(LabError::InvalidName(_))
        ));
        assert!(matches!(
            lab.add_public_host("rogue", "192.0.2.1".parse().unwrap()),
            Err(LabError::AddressNotAllowed(_))
        ));
        assert!(matches!(
            lab.add_public_host("dup", router.wan_ip()),
            Err(LabError::AddressInUse(_))
        ));

        // A child process inside alice's namespace sees alice's address, and the lab kills it.
        let mut show = Command::new("ip");
        show.args(["-4", "-o", "addr", "show", "dev", "eth0"]);
        let mut probe = alice.spawn_piped(show).unwrap();
        let out = {
            let c = probe.child_mut();
            let mut s = String::new();
            std::io::Read::read_to_string(c.stdout.as_mut().unwrap(), &mut s).unwrap();
            s
        };
        assert!(
            out.contains(&alice.ip().to_string()),
            "ip addr inside alice: {out}"
        );
        drop(probe);
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let mut sleeper = alice.spawn(sleep).unwrap();
        let sleeper_pid = sleeper.pid();

        // Code on a thread inside the namespace, and a socket made there.
        // Threads spawned from there (a tokio runtime's workers) stay in it too.
        let netns_of_thread = || std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let alice_ino = std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(format!("/run/netns/{}", alice.ns().name())).unwrap(),
        );
        let (direct, nested) = alice
            .run(|| {
                let nested = std::thread::spawn(netns_of_thread).join().unwrap();
                (netns_of_thread(), nested)
            })
            .unwrap();
        let want = std::path::PathBuf::from(format!("net:[{alice_ino}]"));
        assert_eq!(direct, want, "run() executes inside the namespace");
        assert_eq!(
            nested, want,
            "threads spawned inside run() inherit the namespace"
        );
        assert_ne!(
            netns_of_thread(),
            want,
            "the test thread itself never moves"
        );
        let sock = alice.udp_socket("0.0.0.0:0".parse().unwrap()).unwrap();
        let bound: SocketAddr = sock.local_addr().unwrap();
        assert_ne!(bound.port(), 0);
        drop(sock);

        drop(lab);
        assert!(ours(&prefix).is_empty(), "left behind: {:?}", ours(&prefix));
        assert_eq!(
            threads_named("netlab-wire"),
            0,
            "delay-line thread not joined"
        );
        // The sleeper was killed by the lab's drop (it still needs reaping by its guard).
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(st) = sleeper.child_mut().try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "child {sleeper_pid} survived the lab"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(!status.success());
        // Handles outlive the lab but refuse to work.
        assert!(matches!(
            alice.udp_socket("0.0.0.0:0".parse().unwrap()),
            Err(LabError::Closed)
        ));
    });
}

#[test]
fn a_panic_inside_a_test_still_cleans_up() {
    if !peerlink_netlab::root_or_skip("a_panic_inside_a_test_still_cleans_up") {
        return;
    }
    with_deadline(Duration::from_secs(30), || {
        let names = std::sync::Arc::new(std::sync::Mutex::new((String::new(), Vec::new())));
        let names_in = std::sync::Arc::clone(&names);
        let result = std::panic::catch_unwind(move || {
            let lab = lab();
            let r = lab.add_nat(NatKind::PortRestricted).unwrap();
            let h = r.add_host("victim").unwrap();
            *names_in.lock().unwrap() = (lab.prefix().to_owned(), lab.namespaces());
            // Panic inside a closure running in the namespace, as a buggy test would.
            h.run(|| panic!("boom inside the namespace")).unwrap();
        });
        assert!(result.is_err(), "the closure panicked");
        let (prefix, created) = names.lock().unwrap().clone();
        assert_eq!(created.len(), 3);
        assert!(
            ours(&prefix).is_empty(),
            "left behind after panic: {:?}",
            ours(&prefix)
        );
    });
}

#[test]
fn sweep_removes_only_dead_runs_of_our_family() {
    if !peerlink_netlab::root_or_skip("sweep_removes_only_dead_runs_of_our_family") {
        return;
    }
    with_deadline(Duration::from_secs(30), || {
        // A pid that is certainly dead: above the kernel's largest possible pid_max (2^22), so
        // no process can hold it (a reaped child's pid can be reused at once when the lab
        // tests running beside this one churn through a small pid space).
        let dead: u32 = 4_000_000_000;
        let me = std::process::id();
        let stale = format!("pl{dead}x0-stale");
        let alive = format!("pl{me}x999999-alive");
        let foreign = format!("plz{me}-foreign");
        for n in [&stale, &alive, &foreign] {
            let ok = Command::new("ip")
                .args(["netns", "add", n])
                .status()
                .unwrap();
            assert!(ok.success(), "ip netns add {n}");
        }
        let swept = sweep_stale();
        let list = netns_list();
        // Clean up our decoys before asserting.
        for n in [&alive, &foreign] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        let swept = swept.unwrap();
        // Another test process may have swept it first; either way it must be gone.
        assert!(!list.contains(&stale), "stale namespace survived: {list:?}");
        assert!(list.contains(&alive), "a live run's namespace was swept");
        assert!(list.contains(&foreign), "a foreign namespace was swept");
        assert!(
            !swept.contains(&alive) && !swept.contains(&foreign),
            "{swept:?}"
        );

        // Lab::new sweeps too.
        let ok = Command::new("ip")
            .args(["netns", "add", &stale])
            .status()
            .unwrap();
        assert!(ok.success());
        let lab = lab();
        assert!(
            !netns_list().contains(&stale),
            "Lab::new did not sweep {stale}"
        );
        drop(lab);
    });
}

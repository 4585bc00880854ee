//! The layering rules of the workspace, read from cargo's own view of the crate graph:
//! clients and tools never link a server, services never link each other, `proto` links
//! nothing of ours, and the reference client pulls in no server-side storage, hashing or HTTP
//! framework. Services meet each other and their clients only through `peerlink-api` types,
//! over the wire.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use peerlink_testkit::workspace::{DepKind, crates, normal_tree};

/// Every workspace crate, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Wire formats and API types: depend on nothing but each other (and `proto` on nothing).
    Wire,
    /// A server: signaling, directory, relay.
    Service,
    /// The client's sans-IO protocol logic: depends only on wire crates.
    ClientCore,
    /// A client or tool that talks to the servers over the wire.
    Client,
    /// Test infrastructure, dev-only.
    TestSupport,
    /// What every binary shares (log flags, durations): depends on no crate of ours.
    Common,
}

fn role(name: &str) -> Option<Role> {
    Some(match name {
        "peerlink-proto" | "peerlink-api" => Role::Wire,
        "peerlink-signaling" | "peerlink-directory" | "peerlink-relay" => Role::Service,
        "peerlink-client-core" => Role::ClientCore,
        "peerlink-sim" | "peerlink-loadtest" => Role::Client,
        "peerlink-netlab" | "peerlink-testkit" => Role::TestSupport,
        "peerlink-cli" => Role::Common,
        _ => return None,
    })
}

#[test]
fn every_crate_has_a_role_and_keeps_to_its_layer() {
    let crates = crates();
    assert!(
        crates.len() >= 9,
        "cargo metadata listed only {:?}",
        crates.keys()
    );
    let mut broken = Vec::new();
    for c in crates.values() {
        let Some(me) = role(&c.name) else {
            broken.push(format!(
                "{} has no role: add it to `role` in this test",
                c.name
            ));
            continue;
        };
        for (dep, kind) in &c.deps {
            let Some(them) = role(dep) else { continue };
            let linked = *kind != DepKind::Dev;
            let why = match (me, them) {
                _ if c.name == "peerlink-proto" => Some("proto depends on no crate of ours"),
                (Role::Common, _) => Some("peerlink-cli depends on no crate of ours"),
                (Role::Wire, r) if r != Role::Wire => {
                    Some("wire and API types depend only on wire crates")
                }
                (Role::ClientCore, r) if linked && r != Role::Wire => {
                    Some("the client core depends only on wire crates")
                }
                (Role::Client, Role::Service) if linked => {
                    Some("a client or tool must not link a server crate")
                }
                (Role::Service, Role::Service) if linked => {
                    Some("a service must not link another service crate")
                }
                (
                    Role::Service | Role::Client | Role::ClientCore | Role::Wire,
                    Role::TestSupport,
                ) if linked => Some("test support is for dev-dependencies only"),
                _ => None,
            };
            if let Some(why) = why {
                broken.push(format!("{} -> {dep} ({kind:?}): {why}", c.name));
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

#[test]
fn the_reference_client_links_no_server_side_storage_hashing_or_http_framework() {
    let tree = normal_tree("peerlink-sim");
    assert!(
        tree.iter().any(|p| p == "peerlink-api") && tree.iter().any(|p| p == "opus"),
        "cargo tree did not list the client's own dependencies: {tree:?}"
    );
    let forbidden = [
        "rusqlite",
        "libsqlite3-sys",
        "argon2",
        "jsonwebtoken",
        "axum",
        "peerlink-signaling",
        "peerlink-directory",
        "peerlink-relay",
    ];
    let found: Vec<&str> = forbidden
        .iter()
        .copied()
        .filter(|f| tree.iter().any(|p| p == f))
        .collect();
    assert!(found.is_empty(), "peerlink-sim links {found:?}");
}

#[test]
fn api_without_its_client_feature_is_serde_only() {
    let tree = normal_tree("peerlink-api");
    for io in ["tokio", "reqwest", "hyper", "mio"] {
        assert!(
            !tree.iter().any(|p| p == io),
            "peerlink-api without `client` links {io}: {tree:?}"
        );
    }
}

#[test]
fn the_client_core_is_sans_io_and_its_media_is_optional() {
    let io = [
        "tokio",
        "mio",
        "socket2",
        "reqwest",
        "quinn",
        "tokio-tungstenite",
    ];
    let core = normal_tree("peerlink-client-core");
    assert!(
        core.iter().any(|p| p == "peerlink-proto") && core.iter().any(|p| p == "opus"),
        "cargo tree did not list the client core's own dependencies: {core:?}"
    );
    let found: Vec<&str> = io
        .iter()
        .copied()
        .filter(|f| core.iter().any(|p| p == f))
        .collect();
    assert!(found.is_empty(), "peerlink-client-core links {found:?}");

    // The load tester takes the core without `media`: the TURN client, no codec, no QUIC.
    let loadtest = normal_tree("peerlink-loadtest");
    assert!(
        loadtest.iter().any(|p| p == "peerlink-client-core"),
        "cargo tree did not list the load tester's dependencies: {loadtest:?}"
    );
    for heavy in ["opus", "audiopus_sys", "quinn", "peerlink-sim"] {
        assert!(
            !loadtest.iter().any(|p| p == heavy),
            "peerlink-loadtest links {heavy}"
        );
    }
}

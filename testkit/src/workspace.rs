//! The workspace's crates and their dependencies, as cargo resolves them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// What a dependency edge is for (`[dependencies]`, `[build-dependencies]`,
/// `[dev-dependencies]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DepKind {
    /// Linked into the crate's library and binaries.
    Normal,
    /// Used by its build script.
    Build,
    /// Used by its tests, benches and examples only.
    Dev,
}

/// One workspace crate and the workspace crates it depends on.
#[derive(Clone, Debug)]
pub struct Crate {
    /// Package name, e.g. `peerlink-sim`.
    pub name: String,
    /// Workspace crates it depends on, with the kind of each edge.
    pub deps: Vec<(String, DepKind)>,
}

/// The workspace root (the directory holding the top `Cargo.toml`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits one level below the workspace root")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(mut c: Command) -> String {
    let out = c.output().expect("running cargo");
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("cargo prints UTF-8")
}

/// Every workspace crate with its dependencies on other workspace crates, by name.
pub fn crates() -> BTreeMap<String, Crate> {
    let mut c = cargo();
    c.args([
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
        "--offline",
    ]);
    let meta: Value = serde_json::from_str(&run(c)).expect("cargo metadata prints JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let ours: Vec<String> = packages
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    packages
        .iter()
        .map(|p| {
            let name = p["name"].as_str().expect("package name").to_owned();
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter_map(|d| {
                    let dep = d["name"].as_str()?;
                    ours.iter().any(|o| o == dep).then(|| {
                        let kind = match d["kind"].as_str() {
                            Some("dev") => DepKind::Dev,
                            Some("build") => DepKind::Build,
                            _ => DepKind::Normal,
                        };
                        (dep.to_owned(), kind)
                    })
                })
                .collect();
            (name.clone(), Crate { name, deps })
        })
        .collect()
}

/// The names of every package in `cargo tree -p PACKAGE -e normal`: what the crate's library
/// and binaries link, with the crate's own features resolved as for a build of it alone.
pub fn normal_tree(package: &str) -> Vec<String> {
    let mut c = cargo();
    c.args([
        "tree",
        "-p",
        package,
        "-e",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
        "--offline",
    ]);
    let mut names: Vec<String> = run(c)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    names
}

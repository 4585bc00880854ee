//! The layering rule end to end, with clap flags and real environment variables: the TOML
//! file, then the environment, then the flags.
//!
//! Environment variables belong to the process, so each case runs this test binary again as a
//! child with the case's environment and arguments (the `child` test below), which loads the
//! settings the way a service does and prints them.
// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

const CHILD_ARGS: &str = "PEERLINK_CLI_LAYERING_ARGS";
const TOKEN_ENV: &str = "PEERLINK_CLI_LAYERING_TOKEN";
const PEERS_ENV: &str = "PEERLINK_CLI_LAYERING_PEERS";
const TIMEOUT_ENV: &str = "PEERLINK_CLI_LAYERING_TIMEOUT";

/// A service's settings: the file format, with its defaults.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    token: Option<String>,
    region: String,
    peers: Vec<String>,
    #[serde(with = "peerlink_cli::config::duration")]
    timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            token: None,
            region: "local".into(),
            peers: vec!["default-peer".into()],
            timeout: Duration::from_secs(30),
        }
    }
}

/// Its flags, environment variables through clap.
#[derive(Debug, Parser, Serialize)]
struct Flags {
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    #[arg(long, env = TOKEN_ENV)]
    token: Option<String>,
    #[arg(long)]
    region: Option<String>,
    #[arg(long = "peer", env = PEERS_ENV, value_delimiter = ',')]
    #[serde(rename = "peers", skip_serializing_if = "Vec::is_empty")]
    peer: Vec<String>,
    #[arg(long, env = TIMEOUT_ENV, value_parser = peerlink_cli::parse_duration)]
    #[serde(with = "peerlink_cli::config::duration::option")]
    timeout: Option<Duration>,
}

/// Run in a child process only (with `CHILD_ARGS` set): parse, load, print.
#[test]
fn child() {
    let Ok(args) = std::env::var(CHILD_ARGS) else {
        return;
    };
    let args: Vec<&str> = args.split('\u{1f}').filter(|a| !a.is_empty()).collect();
    let flags = match Flags::try_parse_from(std::iter::once("svc").chain(args)) {
        Ok(f) => f,
        Err(e) => return println!("ERROR {}", e.to_string().lines().next().unwrap_or_default()),
    };
    match peerlink_cli::config::load::<Settings>(flags.config.as_deref(), &flags) {
        Ok(s) => println!(
            "SETTINGS {}",
            toml::to_string(&s).unwrap().replace('\n', "\u{1f}")
        ),
        Err(e) => println!("ERROR {e}"),
    }
}

/// Load in a child with these arguments and environment variables.
fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Settings, String> {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child", "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ARGS, args.join("\u{1f}"));
    for var in [TOKEN_ENV, PEERS_ENV, TIMEOUT_ENV] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // libtest may print `test child ... ` on the same line, before the child's output.
    for line in stdout.lines() {
        if let Some((_, s)) = line.split_once("SETTINGS ") {
            return Ok(toml::from_str(&s.replace('\u{1f}', "\n")).unwrap());
        }
        if let Some((_, e)) = line.split_once("ERROR ") {
            return Err(e.to_owned());
        }
    }
    panic!("the child printed no result: {stdout}");
}

fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.display().to_string();
    (dir, path)
}

const FILE: &str =
    "token = \"from-file\"\nregion = \"file-region\"\npeers = [\"f1\", \"f2\"]\ntimeout = \"1m\"\n";

#[test]
fn defaults_without_file_env_or_flags() {
    assert_eq!(load(&[], &[]).unwrap(), Settings::default());
}

#[test]
fn the_file_alone() {
    let (_d, path) = config_file(FILE);
    let s = load(&["--config", &path], &[]).unwrap();
    assert_eq!(s.token.as_deref(), Some("from-file"));
    assert_eq!(s.region, "file-region");
    assert_eq!(s.peers, ["f1", "f2"]);
    assert_eq!(s.timeout, Duration::from_secs(60));
}

#[test]
fn the_environment_beats_the_file() {
    let (_d, path) = config_file(FILE);
    let s = load(
        &["--config", &path],
        &[
            (TOKEN_ENV, "from-env"),
            (PEERS_ENV, "e1,e2,e3"),
            (TIMEOUT_ENV, "5s"),
        ],
    )
    .unwrap();
    assert_eq!(s.token.as_deref(), Some("from-env"));
    assert_eq!(
        s.peers,
        ["e1", "e2", "e3"],
        "the variable's list replaces the file's"
    );
    assert_eq!(s.timeout, Duration::from_secs(5));
    assert_eq!(
        s.region, "file-region",
        "what the environment leaves is the file's"
    );
    // Without a file the environment beats the defaults.
    let s = load(&[], &[(TOKEN_ENV, "from-env")]).unwrap();
    assert_eq!(s.token.as_deref(), Some("from-env"));
    assert_eq!(s.peers, ["default-peer"]);
}

#[test]
fn a_flag_beats_the_environment_and_the_file() {
    let (_d, path) = config_file(FILE);
    let env = [
        (TOKEN_ENV, "from-env"),
        (PEERS_ENV, "e1,e2"),
        (TIMEOUT_ENV, "5s"),
    ];
    let s = load(
        &[
            "--config",
            &path,
            "--token",
            "from-flag",
            "--peer",
            "c1",
            "--timeout",
            "250ms",
            "--region",
            "flag-region",
        ],
        &env,
    )
    .unwrap();
    assert_eq!(s.token.as_deref(), Some("from-flag"));
    assert_eq!(
        s.peers,
        ["c1"],
        "the flags' list replaces the environment's and the file's"
    );
    assert_eq!(s.timeout, Duration::from_millis(250));
    assert_eq!(s.region, "flag-region");
}

#[test]
fn errors_name_the_file_and_the_key() {
    let (_d, path) = config_file("region = \"r\"\nregoin = \"typo\"\n");
    let e = load(&["--config", &path], &[]).unwrap_err();
    assert!(
        e.starts_with(&format!(
            "config {path}: unknown key `regoin`, expected one of "
        )),
        "{e}"
    );
    let (_d, path) = config_file("timeout = \"soon\"\n");
    let e = load(&["--config", &path], &[]).unwrap_err();
    assert!(
        e.starts_with(&format!(
            "config {path}: key `timeout`: bad duration \"soon\""
        )),
        "{e}"
    );
    // The file must be valid on its own, also where the environment replaces the value.
    let e = load(&["--config", &path], &[(TIMEOUT_ENV, "2s")]).unwrap_err();
    assert!(
        e.starts_with(&format!("config {path}: key `timeout`: ")),
        "{e}"
    );
    // A bad value in the environment is refused by the parser, naming the variable's flag.
    let e = load(&[], &[(TIMEOUT_ENV, "soon")]).unwrap_err();
    assert!(
        e.contains("invalid value 'soon' for '--timeout <TIMEOUT>'"),
        "{e}"
    );
}

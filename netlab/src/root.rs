//! Whether this process may build labs: network namespaces need root.

use std::io::Write as _;

/// The effective user id of this process, from `/proc/self/status` (`Uid:` real, effective,
/// saved, filesystem).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// True when this process runs as root and can build labs. Otherwise prints one line saying
/// that `test` is skipped and why, and returns false: a root-only test starts with
/// `if !peerlink_netlab::root_or_skip("name") { return; }`.
pub fn root_or_skip(test: &str) -> bool {
    if effective_uid() == Some(0) {
        return true;
    }
    // Straight to the stream, past the test harness's capture: the line shows in every run.
    let _ = writeln!(
        std::io::stderr(),
        "skipped {test}: needs root (network namespaces); CI runs it as root"
    );
    false
}

//! Running the helper programs (`ip`, `nft`, `tc`, `conntrack`) with their errors captured.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::error::{LabError, Result};

/// Render a command line for error messages.
fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run `cmd`, feeding `stdin` if given; return its stdout or a typed error with its stderr.
pub(crate) fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<String> {
    let line = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
        cmd: line.clone(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| LabError::Io {
                what: format!("writing stdin of `{line}`"),
                source,
            })?;
        // Dropping `pipe` closes stdin so the program sees EOF.
    }
    let out = child.wait_with_output().map_err(|source| LabError::Io {
        what: format!("waiting for `{line}`"),
        source,
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let what = match stdin {
            Some(input) => format!("{line} <<EOF\n{input}EOF"),
            None => line,
        };
        Err(LabError::Command {
            cmd: what,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Run a batch of `ip` commands (one per line) inside namespace `ns`, or in the caller's
/// namespace when `ns` is `None`.
pub(crate) fn ip_batch(ns: Option<&str>, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    let mut input = lines.join("\n");
    input.push('\n');
    run(&mut cmd, Some(&input)).map(drop)
}

/// Run a program inside namespace `ns` via `ip netns exec`.
pub(crate) fn ns_exec(ns: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    run(&mut cmd, stdin)
}

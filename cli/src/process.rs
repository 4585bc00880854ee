//! Child processes that never outlive the process that started them.
//!
//! A launcher (the local fleet, the demo, the load tester, test harnesses) kills its children
//! when it exits normally or is dropped; [`die_with_parent`] covers the rest: a launcher killed
//! by a signal (SIGTERM, SIGINT, SIGKILL) or a panic that aborts. The kernel sends the child
//! SIGTERM when the launcher goes (Linux `PR_SET_PDEATHSIG`), so no service is left running,
//! orphaned, holding its ports.
//!
//! The kernel ties the signal to the *thread* that started the child: start children from a
//! thread that lives as long as they should (the main thread, a runtime's worker threads),
//! never from a short-lived helper thread.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// Makes the child `cmd` starts receive SIGTERM when this process (the thread calling
/// `spawn`) ends. A child whose launcher is already gone by the time it starts exits at once.
pub fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (prctl, getppid, kill/getpid) on plain integers.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died between fork and prctl: then nobody would signal us.
            if libc::getppid() as u32 != parent {
                libc::kill(libc::getpid(), libc::SIGTERM);
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The launcher is a thread here: when the thread that spawned the child ends, the kernel
    /// sends the child SIGTERM, exactly as when a launcher process dies.
    #[test]
    fn the_child_gets_sigterm_when_its_launching_thread_ends() {
        let child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            die_with_parent(&mut cmd);
            cmd.spawn().expect("spawn sleep")
        })
        .join()
        .expect("launcher thread");
        let mut child = child;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                use std::os::unix::process::ExitStatusExt as _;
                assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the child outlived its launcher by 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

//! Running one command with a given environment, working directory and
//! optional timeout. Shared by native runs on the host and by the guest agent
//! (compiled into both, see `build.rs`), so it uses `std` only.

use crate::wire::WireStatus;
use std::ffi::OsString;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn setsid() -> i32;
    fn ioctl(fd: i32, req: u64, ...) -> i32;
}
const SIGKILL: i32 = 9;
const TIOCSCTTY: u64 = 0x540e;

/// The process group (and session) the command runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Ours: it shares our terminal (a background group would get SIGTTIN
    /// on reading it).
    Same,
    /// Its own, so that a timeout also kills whatever it forked.
    Own,
    /// A new session whose controlling terminal is this fd of the child
    /// (after the stdio set-up): a pty slave in the guest. Its group is its
    /// own, as with `Own`.
    Session { ctty: i32 },
}

pub struct Stdios {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

/// Runs `argv` to completion. `Ok((status, timed_out))`; `Err` only when the
/// command could not be started (see [`spawn_failure`]).
///
/// `creds` switches to that (uid, gid) first (the guest agent runs as root).
///
/// `group` says which process group it runs in, see [`Group`].
pub fn run(
    argv: &[OsString],
    env: &[(OsString, OsString)],
    cwd: &Path,
    timeout: Option<Duration>,
    stdios: Stdios,
    group: Group,
    creds: Option<(u32, u32)>,
) -> io::Result<(WireStatus, bool)> {
    let Some((prog, args)) = argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    };
    if !cwd.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("working directory {} does not exist", cwd.display()),
        ));
    }
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(stdios.stdin)
        .stdout(stdios.stdout)
        .stderr(stdios.stderr);
    match group {
        Group::Same => {}
        Group::Own => {
            cmd.process_group(0);
        }
        Group::Session { ctty } => {
            // SAFETY: setsid and ioctl are async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    if setsid() < 0 || ioctl(ctty, TIOCSCTTY, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
    let own_group = group != Group::Same;
    if let Some((uid, gid)) = creds {
        cmd.uid(uid).gid(gid);
    }
    let mut child = cmd.spawn()?;
    let pid = child.id() as i32;
    let (status, timed_out) = match timeout {
        None => (child.wait()?, false),
        Some(limit) => {
            // Waiting in a thread lets the main thread sleep on a channel
            // instead of polling, which matters in a slow TCG guest.
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(child.wait());
            });
            match rx.recv_timeout(limit) {
                Ok(r) => (r?, false),
                Err(_) => {
                    // SAFETY: plain syscall; the child is not reaped yet
                    // (the waiter thread has not sent), so `pid` is ours.
                    unsafe { kill(if own_group { -pid } else { pid }, SIGKILL) };
                    let r = rx
                        .recv()
                        .map_err(|_| io::Error::other("waiter thread vanished"))?;
                    (r?, true)
                }
            }
        }
    };
    let status = match (status.code(), status.signal()) {
        (Some(c), _) => WireStatus::Exited(c),
        (None, Some(s)) => WireStatus::Signaled(s),
        (None, None) => WireStatus::Exited(255),
    };
    Ok((status, timed_out))
}

/// What a shell would report for a command that could not be started:
/// 127 when it is not found, 126 otherwise, with a message for stderr.
pub fn spawn_failure(argv: &[OsString], err: &io::Error) -> (WireStatus, String) {
    let name = argv
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let code = if err.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    (
        WireStatus::Exited(code),
        format!("ia2run: cannot run '{name}': {err}\n"),
    )
}

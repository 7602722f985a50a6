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
}
const SIGKILL: i32 = 9;

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
/// With `own_group` the command gets its own process group so that a timeout
/// also kills whatever it forked. Not wanted when it shares our terminal:
/// a background process group would get SIGTTIN on reading it.
pub fn run(
    argv: &[OsString],
    env: &[(OsString, OsString)],
    cwd: &Path,
    timeout: Option<Duration>,
    stdios: Stdios,
    own_group: bool,
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
    if own_group {
        cmd.process_group(0);
    }
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

//! One command in the guest with its stdio streamed: `ia2run --vm -- CMD`.
//!
//! The command's stdin, stdout and stderr travel as frames ([`wire::Frame`])
//! over a virtio-serial port whose host end is a Unix socket. Both
//! directions have backpressure: QEMU reads the socket only when the guest
//! has buffers, and the guest's writes block while we do not read.
//!
//! Where ia2run's own stdin, stdout or stderr is a terminal, the command's
//! same fd is the slave of a pty in the guest, ia2run's terminal is put in
//! raw mode for the run (the guest's line discipline echoes, edits lines
//! and turns ^C into SIGINT), and the terminal's size follows ours.

use super::{start_guest, Guest};
use crate::wire::{self, Frame, StreamSpec};
use crate::{Error, Job, Status, VmOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `write` on a socket without SIGPIPE: a library caller may not ignore it.
struct SockWriter(RawFd);

impl Write for SockWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `len` bytes; the fd outlives us.
        let n = unsafe { libc::send(self.0, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn isatty(fd: RawFd) -> bool {
    // SAFETY: plain query.
    unsafe { libc::isatty(fd) == 1 }
}

/// Writes all of `data` to one of our own fds, unbuffered so that output
/// shows as it comes. `false` once the fd is gone (a closed pipe): the
/// rest is discarded so that the guest never blocks on us.
fn write_fd(fd: RawFd, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        // SAFETY: `data` is valid for its length.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n > 0 {
            data = &data[n as usize..];
            continue;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) => {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 100) };
            }
            _ => return false,
        }
    }
    true
}

/// Raw mode on a terminal for as long as this lives.
struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: RawFd) -> Option<RawMode> {
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers.
        unsafe {
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(fd, libc::TCSADRAIN, &raw) != 0 {
                return None;
            }
        }
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores what tcgetattr gave us.
        unsafe { libc::tcsetattr(self.fd, libc::TCSADRAIN, &self.saved) };
    }
}

fn winsize(fd: RawFd) -> Option<[u16; 2]> {
    // SAFETY: winsize is plain data, filled by the ioctl.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one struct winsize.
    let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0).then_some([ws.ws_row, ws.ws_col])
}

/// Carries ia2run's stdin to the guest, and the terminal's size while it
/// changes, until `stop`. Polls with a short timeout so that it ends when
/// the run does without leaving a reader on our stdin behind.
fn pump_stdin(sock: RawFd, tty: Option<RawFd>, stop: &AtomicBool) {
    let mut w = SockWriter(sock);
    let mut last_size = None;
    let mut eof = false;
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if let Some(t) = tty {
            let size = winsize(t);
            if let Some([r, c]) = size.filter(|_| size != last_size) {
                last_size = size;
                let mut d = r.to_le_bytes().to_vec();
                d.extend_from_slice(&c.to_le_bytes());
                if wire::put_frame(&mut w, Frame::Winsize, &d).is_err() {
                    return;
                }
            }
        }
        if eof {
            if tty.is_none() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let mut p = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 100) } <= 0 {
            continue;
        }
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        let sent = if n > 0 {
            wire::put_frame(&mut w, Frame::Stdin, &buf[..n as usize])
        } else if n < 0
            && matches!(
                io::Error::last_os_error().raw_os_error(),
                Some(libc::EINTR | libc::EAGAIN)
            )
        {
            Ok(())
        } else {
            // End of input, or a stdin we cannot read (closed): the
            // command sees the end of its input.
            eof = true;
            wire::put_frame(&mut w, Frame::StdinEof, &[])
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Writes what the guest sends to our stdout, stderr or terminal until the
/// guest closes the port; returns the `Exit` frame's text if one came.
fn pump_output(mut sock: UnixStream, tty_out: RawFd) -> Option<String> {
    let mut live = [true; 3];
    let mut exit = None;
    while let Ok(Some((kind, data))) = wire::read_frame(&mut sock) {
        let fd = match kind {
            Frame::Stdout => 1,
            Frame::Stderr => 2,
            Frame::Tty => tty_out,
            Frame::Exit => {
                exit = Some(String::from_utf8_lossy(&data).into_owned());
                continue;
            }
            _ => continue,
        };
        let i = fd as usize;
        if live[i] {
            live[i] = write_fd(fd, &data);
        }
    }
    exit
}

/// Boots one guest and runs `job` in it with ia2run's own stdin, stdout and
/// stderr, streamed both ways while it runs (see the module docs). Returns
/// its status and whether its `timeout` killed it, as
/// [`run_native_inherit`](crate::run_native_inherit) does.
///
/// Meant for a command-line tool: it reads this process's fd 0 while the
/// command runs and writes fds 1 and 2 directly.
pub fn run_vm_stream(opts: &VmOptions, job: &Job) -> Result<(Status, bool), Error> {
    let tty = [0, 1, 2].map(isatty);
    let jobs = std::slice::from_ref(job);
    let mut g = start_guest(opts, jobs, Some(StreamSpec { tty }))?;
    let sock = accept(&mut g, opts, jobs)?;
    let sock = match sock {
        Some(s) => s,
        // QEMU ended before connecting: say why.
        None => {
            g.wait(opts, jobs)?;
            return Err(g.guest_err("qemu ended without opening the streaming port".into()));
        }
    };
    // The terminal the pty's output goes to, and whose size it follows.
    let term = [1, 2, 0].into_iter().find(|&fd| tty[fd as usize]);
    let raw = if tty[0] { RawMode::enter(0) } else { None };

    let stop = Arc::new(AtomicBool::new(false));
    let sock_fd = sock.as_raw_fd();
    let pump = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || pump_stdin(sock_fd, term, &stop))
    };
    let reader = {
        let s = sock.try_clone().map_err(super::io_err("socket"))?;
        std::thread::spawn(move || pump_output(s, term.unwrap_or(1)))
    };
    let waited = g.wait(opts, jobs);
    stop.store(true, Ordering::Relaxed);
    let _ = sock.shutdown(std::net::Shutdown::Both);
    let _ = pump.join();
    let exit = reader.join().ok().flatten();
    drop(raw);
    waited?;
    match exit.as_deref().and_then(wire::parse_status) {
        Some((st, timed_out)) => {
            let _ = g.job_status(0, jobs);
            Ok((super::to_status(st), timed_out))
        }
        None => g.job_status(0, jobs),
    }
}

/// Waits for QEMU to connect to the streaming port. `Ok(None)` if QEMU
/// ended first.
fn accept(g: &mut Guest, opts: &VmOptions, jobs: &[Job]) -> Result<Option<UnixStream>, Error> {
    let l = g.listener.take().expect("a streamed guest has a listener");
    l.set_nonblocking(true).map_err(super::io_err("socket"))?;
    let deadline = Instant::now() + opts.timeout;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(super::io_err("socket"))?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(super::io_err("accepting QEMU's connection")(e)),
        }
        if g.child
            .try_wait()
            .map_err(super::io_err("waiting for qemu"))?
            .is_some()
        {
            return Ok(None);
        }
        if Instant::now() >= deadline {
            return Err(g.timeout_error(opts, jobs));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

//! The guest agent: runs inside the VM, chrooted into the host's root, after
//! the initramfs `/init` has mounted everything. It mounts the writable host
//! directories, runs each job and writes `N.out`, `N.err` and `N.status` into
//! the shared job directory, which the host reads after the guest powers off.
//! A streamed job (one command, `ia2run --vm -- CMD`) instead has its stdio
//! carried by frames on a virtio-serial port while it runs (`stream_job`).
//!
//! `build.rs` compiles this file (with `wire.rs` and `exec.rs`) into a
//! standalone binary with `std` only, so that library users get a guest agent
//! without having to build the `ia2run` binary first.

use crate::exec::{self, Stdios};
use crate::wire::{self, WireStatus};
use std::ffi::{CString, OsString};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

extern "C" {
    fn mount(
        src: *const std::ffi::c_char,
        target: *const std::ffi::c_char,
        fstype: *const std::ffi::c_char,
        flags: std::ffi::c_ulong,
        data: *const std::ffi::c_void,
    ) -> i32;
    fn sync();
    fn open(path: *const std::ffi::c_char, flags: i32, ...) -> i32;
    fn ioctl(fd: i32, req: u64, ...) -> i32;
    fn fchown(fd: i32, uid: u32, gid: u32) -> i32;
    fn pipe2(fds: *mut i32, flags: i32) -> i32;
}

const O_RDWR: i32 = 2;
const O_NOCTTY: i32 = 0o400;
const O_CLOEXEC: i32 = 0o2000000;
const TIOCSPTLCK: u64 = 0x4004_5431;
const TIOCGPTPEER: u64 = 0x5441;
const TIOCSWINSZ: u64 = 0x5414;

/// 9p options for the writable exports. No page cache (`cache=none` is the
/// default): the host must see every byte once the guest is gone.
pub const RW_9P_OPTS: &str = "trans=virtio,version=9p2000.L,msize=262144";

fn mount_9p(tag: &str, at: &Path) -> Result<(), String> {
    // The mount point may lie on a tmpfs (/tmp) where it does not exist yet;
    // on the read-only host root it must exist already, and does, since it
    // is a host directory.
    let _ = fs::create_dir_all(at);
    let c = |b: &[u8]| CString::new(b).map_err(|e| e.to_string());
    let (src, target, fstype, data) = (
        c(tag.as_bytes())?,
        c(at.as_os_str().as_bytes())?,
        c(b"9p")?,
        c(RW_9P_OPTS.as_bytes())?,
    );
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mounting host directory {} (tag {tag}) failed: {}",
            at.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn fail(dir: &Path, msg: &str) -> i32 {
    let _ = fs::write(dir.join("agent-error"), msg);
    eprintln!("ia2run-agent: {msg}");
    // SAFETY: no arguments.
    unsafe { sync() };
    1
}

/// Entry point: `agent JOBDIR`.
pub fn main(args: Vec<OsString>) -> i32 {
    let Some(dir) = args.get(1).map(PathBuf::from) else {
        eprintln!("usage: ia2run-agent JOBDIR");
        return 2;
    };
    let batch = match fs::read(dir.join("jobs.bin")).and_then(|b| wire::decode(&b)) {
        Ok(b) => b,
        Err(e) => return fail(&dir, &format!("cannot read the job file: {e}")),
    };
    for (tag, at) in &batch.mounts {
        if let Err(e) = mount_9p(tag, at) {
            return fail(&dir, &e);
        }
    }
    let _ = fs::write(dir.join("started"), b"");
    if let (Some(spec), [job]) = (batch.stream, batch.jobs.as_slice()) {
        let status = stream_job(job, batch.creds, spec);
        let _ = fs::write(dir.join("0.status"), status);
        // SAFETY: no arguments.
        unsafe { sync() };
        return 0;
    }
    // Workers take the jobs in order; with one worker that is plain
    // sequential execution.
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..batch.parallel.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(job) = batch.jobs.get(i) else { break };
                let t = std::time::Instant::now();
                // The guest's own timing of each job, for `--verbose`.
                let status = run_job(&dir, i, job, batch.creds)
                    + &format!("ms {}\n", t.elapsed().as_millis());
                let _ = fs::write(dir.join(format!("{i}.status")), status);
            });
        }
    });
    // SAFETY: no arguments.
    unsafe { sync() };
    0
}

fn run_job(dir: &Path, i: usize, job: &wire::WireJob, creds: Option<(u32, u32)>) -> String {
    let open = |ext: &str| File::create(dir.join(format!("{i}.{ext}")));
    let (out, err) = match (open("out"), open("err")) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            return wire::format_status(WireStatus::Exited(125), false) + &format!("error {e}\n")
        }
    };
    let mut err_copy = err.try_clone().ok();
    let stdios = Stdios {
        stdin: Stdio::null(),
        stdout: out.into(),
        stderr: err.into(),
    };
    match exec::run(
        &job.argv,
        &job.env,
        &job.cwd,
        job.timeout,
        stdios,
        exec::Group::Own,
        creds,
    ) {
        Ok((status, timed_out)) => wire::format_status(status, timed_out),
        Err(e) => {
            let (status, msg) = exec::spawn_failure(&job.argv, &e);
            if let Some(f) = err_copy.as_mut() {
                let _ = f.write_all(msg.as_bytes());
            }
            wire::format_status(status, false)
        }
    }
}

/// The device of the streaming port: `/dev/vportNpM` whose sysfs name is
/// [`wire::STREAM_PORT`] (no udev in the guest for the by-name link).
fn find_port() -> Option<PathBuf> {
    for _ in 0..100 {
        if let Ok(rd) = fs::read_dir("/sys/class/virtio-ports") {
            for e in rd.flatten() {
                let name = fs::read_to_string(e.path().join("name")).unwrap_or_default();
                let dev = Path::new("/dev").join(e.file_name());
                if name.trim_end() == wire::STREAM_PORT && dev.exists() {
                    return Some(dev);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

fn last_err(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A new pty: (master, slave), the slave owned by `creds` so that the
/// command may reopen its terminal.
fn open_pty(creds: Option<(u32, u32)>) -> std::io::Result<(File, File)> {
    use std::os::fd::FromRawFd;
    let path = CString::new("/dev/ptmx").unwrap();
    // SAFETY: a valid path; plain syscalls on fds we own.
    unsafe {
        let m = open(path.as_ptr(), O_RDWR | O_NOCTTY | O_CLOEXEC);
        if m < 0 {
            return Err(last_err("/dev/ptmx"));
        }
        let master = File::from_raw_fd(m);
        let unlock: i32 = 0;
        if ioctl(m, TIOCSPTLCK, &unlock as *const i32) < 0 {
            return Err(last_err("unlocking the pty"));
        }
        let s = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if s < 0 {
            return Err(last_err("opening the pty slave"));
        }
        let slave = File::from_raw_fd(s);
        if let Some((uid, gid)) = creds {
            fchown(s, uid, gid);
        }
        Ok((master, slave))
    }
}

/// (read end, write end), both close-on-exec.
fn pipe() -> std::io::Result<(File, File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for two fds, which we then own.
    unsafe {
        if pipe2(fds.as_mut_ptr(), O_CLOEXEC) < 0 {
            return Err(last_err("pipe2"));
        }
        Ok((File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])))
    }
}

/// How long output may still arrive after the command has exited: what it
/// wrote is already in the pipes, so this only bounds the wait for a child
/// that it left running with our pipes open.
const DRAIN_AFTER_EXIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs the one job of a streamed batch: its stdin from `Stdin` frames, its
/// output as `Stdout`/`Stderr`/`Tty` frames while it runs, then an `Exit`
/// frame. Returns the status text.
fn stream_job(job: &wire::WireJob, creds: Option<(u32, u32)>, spec: wire::StreamSpec) -> String {
    match stream_job_inner(job, creds, spec) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ia2run-agent: {e}");
            wire::format_status(WireStatus::Exited(125), false) + &format!("error {e}\n")
        }
    }
}

fn stream_job_inner(
    job: &wire::WireJob,
    creds: Option<(u32, u32)>,
    spec: wire::StreamSpec,
) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::sync::{mpsc, Arc, Mutex};
    use wire::Frame;

    let dev = find_port().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no virtio port named {}", wire::STREAM_PORT),
        )
    })?;
    let port = fs::OpenOptions::new().read(true).write(true).open(&dev)?;
    let out = Arc::new(Mutex::new(port.try_clone()?));

    let pty = if spec.tty.iter().any(|&t| t) {
        Some(open_pty(creds)?)
    } else {
        None
    };
    // The command's three fds, and our ends: where stdin goes, and what
    // to read output from (with the frame kind it travels as).
    let mut child_fds: Vec<Stdio> = Vec::new();
    let mut stdin_w: Option<File> = None;
    let mut readers: Vec<(File, Frame)> = Vec::new();
    for (fd, &tty) in spec.tty.iter().enumerate() {
        if let (true, Some((_, slave))) = (tty, &pty) {
            child_fds.push(slave.try_clone()?.into());
            continue;
        }
        let (r, w) = pipe()?;
        if fd == 0 {
            child_fds.push(r.into());
            stdin_w = Some(w);
        } else {
            child_fds.push(w.into());
            readers.push((
                r,
                if fd == 1 {
                    Frame::Stdout
                } else {
                    Frame::Stderr
                },
            ));
        }
    }
    let mut master_w = None;
    let mut master_fd = -1;
    if let Some((master, slave)) = pty {
        drop(slave);
        master_fd = master.as_raw_fd();
        master_w = Some(master.try_clone()?);
        readers.push((master, Frame::Tty));
        if spec.tty[0] {
            stdin_w = master_w.take();
        }
    }

    // Host to guest. Runs until the agent exits.
    std::thread::spawn(move || {
        let mut port = port;
        let mut stdin_w = stdin_w;
        let _keep = master_w;
        while let Ok(Some((kind, data))) = wire::read_frame(&mut port) {
            match kind {
                // A command that closed its stdin: discard the rest.
                Frame::Stdin
                    if stdin_w
                        .as_mut()
                        .is_some_and(|w| w.write_all(&data).is_err()) =>
                {
                    stdin_w = None
                }
                // A terminal has no end of input (^D is a byte in it).
                Frame::StdinEof if !spec.tty[0] => stdin_w = None,
                Frame::Winsize if data.len() == 4 && master_fd >= 0 => {
                    let ws: [u16; 4] = [
                        u16::from_le_bytes([data[0], data[1]]),
                        u16::from_le_bytes([data[2], data[3]]),
                        0,
                        0,
                    ];
                    // SAFETY: `ws` is a struct winsize; the master is open
                    // (held by `_keep` or the readers) while the agent runs.
                    unsafe { ioctl(master_fd, TIOCSWINSZ, ws.as_ptr()) };
                }
                _ => {}
            }
        }
    });

    // Guest to host: one thread per output; each says when it hit the end.
    let (done_tx, done_rx) = mpsc::channel();
    let n_readers = readers.len();
    for (mut r, kind) in readers {
        let out = Arc::clone(&out);
        let done = done_tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
                        if wire::put_frame(&mut *w, kind, &buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // EIO: the pty's last slave fd was closed.
                    Err(_) => break,
                }
            }
            let _ = done.send(());
        });
    }
    drop(done_tx);

    let ctty = spec.tty.iter().position(|&t| t);
    let group = match ctty {
        Some(fd) => exec::Group::Session { ctty: fd as i32 },
        None => exec::Group::Own,
    };
    let mut fds = child_fds.into_iter();
    let stdios = Stdios {
        stdin: fds.next().unwrap(),
        stdout: fds.next().unwrap(),
        stderr: fds.next().unwrap(),
    };
    let status = match exec::run(
        &job.argv,
        &job.env,
        &job.cwd,
        job.timeout,
        stdios,
        group,
        creds,
    ) {
        Ok((status, timed_out)) => wire::format_status(status, timed_out),
        Err(e) => {
            let (status, msg) = exec::spawn_failure(&job.argv, &e);
            let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
            let kind = if spec.tty[2] {
                Frame::Tty
            } else {
                Frame::Stderr
            };
            let _ = wire::put_frame(&mut *w, kind, msg.as_bytes());
            wire::format_status(status, false)
        }
    };
    let deadline = std::time::Instant::now() + DRAIN_AFTER_EXIT;
    for _ in 0..n_readers {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
    wire::put_frame(&mut *w, Frame::Exit, status.as_bytes())?;
    w.flush()?;
    Ok(status)
}

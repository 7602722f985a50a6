//! The job file the host writes and the guest agent reads, and the status
//! lines the agent writes back.
//!
//! This module is compiled twice: into the library and, by `build.rs`, into
//! the standalone guest agent. It must therefore use `std` only.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::Duration;

const MAGIC: &[u8; 8] = b"IA2RUNJ2";

/// One command as the agent sees it: the environment is final (LD_PRELOAD
/// already applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireJob {
    pub argv: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    pub timeout: Option<Duration>,
}

/// Everything the guest needs besides the boot itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WireBatch {
    /// (9p mount tag, guest path) of each writable host directory.
    pub mounts: Vec<(String, PathBuf)>,
    /// (uid, gid) to run the jobs as; `None` for root.
    pub creds: Option<(u32, u32)>,
    /// How many jobs run at once.
    pub parallel: u32,
    /// Run the one job with its stdio on the streaming port (see
    /// [`Frame`]) instead of files in the job directory.
    pub stream: Option<StreamSpec>,
    pub jobs: Vec<WireJob>,
}

/// How a streamed job's stdio is set up in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamSpec {
    /// Which of the command's fds 0, 1, 2 are a terminal (the slave of one
    /// pty in the guest) because ia2run's own are; the others are pipes.
    pub tty: [bool; 3],
}

/// The name of the virtio-serial port that carries a streamed job's stdio.
pub const STREAM_PORT: &str = "ia2run.io";

/// The frames on the streaming port: a kind byte, a little-endian u32
/// length, the payload. One port in both directions keeps the host side to
/// one socket and preserves the order of stdout and stderr as the agent
/// read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Frame {
    /// host to guest: bytes for the command's stdin.
    Stdin = 0,
    /// host to guest: ia2run's stdin reached its end.
    StdinEof = 1,
    /// host to guest: the terminal's size, rows and columns as two u16.
    Winsize = 2,
    /// guest to host: bytes the command wrote to its stdout pipe.
    Stdout = 3,
    /// guest to host: bytes the command wrote to its stderr pipe.
    Stderr = 4,
    /// guest to host: bytes from the pty master (the command's terminal
    /// output and the line discipline's echo).
    Tty = 5,
    /// guest to host: how the command ended, as [`format_status`] writes it.
    Exit = 6,
}

impl Frame {
    pub fn from_u8(b: u8) -> Option<Frame> {
        Some(match b {
            0 => Frame::Stdin,
            1 => Frame::StdinEof,
            2 => Frame::Winsize,
            3 => Frame::Stdout,
            4 => Frame::Stderr,
            5 => Frame::Tty,
            6 => Frame::Exit,
            _ => return None,
        })
    }
}

/// Writes one frame with a single `write_all`, so that frames from several
/// threads sharing a writer (behind a lock) never interleave.
pub fn put_frame(w: &mut impl io::Write, kind: Frame, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(5 + data.len());
    buf.push(kind as u8);
    buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf)
}

/// The largest payload a reader accepts: writers send at most 64 KiB.
const MAX_FRAME: usize = 1 << 20;

/// Reads one frame; `Ok(None)` at a clean end of the stream.
pub fn read_frame(r: &mut impl io::Read) -> io::Result<Option<(Frame, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let kind = Frame::from_u8(head[0]).ok_or_else(|| bad("unknown frame kind"))?;
    let len = u32::from_le_bytes(head[1..].try_into().unwrap()) as usize;
    if len > MAX_FRAME {
        return Err(bad("frame too long"));
    }
    let mut data = vec![0; len];
    r.read_exact(&mut data)?;
    Ok(Some((kind, data)))
}

/// How a command ended, in the agent's own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireStatus {
    Exited(i32),
    Signaled(i32),
}

// Length-prefixed byte strings: paths, arguments and environment values may
// hold any byte except NUL, so no text format with quoting is needed.
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub fn encode(batch: &WireBatch) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    put_u32(&mut out, batch.mounts.len() as u32);
    for (tag, path) in &batch.mounts {
        put_bytes(&mut out, tag.as_bytes());
        put_bytes(&mut out, path.as_os_str().as_bytes());
    }
    let (has, uid, gid) = batch.creds.map_or((0, 0, 0), |(u, g)| (1, u, g));
    let stream = batch.stream.map_or(0, |s| {
        1 | s
            .tty
            .iter()
            .enumerate()
            .fold(0, |m, (i, &t)| m | (u32::from(t) << (i + 1)))
    });
    for v in [has, uid, gid, batch.parallel, stream] {
        put_u32(&mut out, v);
    }
    put_u32(&mut out, batch.jobs.len() as u32);
    for job in &batch.jobs {
        put_u32(&mut out, job.argv.len() as u32);
        for a in &job.argv {
            put_bytes(&mut out, a.as_bytes());
        }
        put_u32(&mut out, job.env.len() as u32);
        for (k, v) in &job.env {
            put_bytes(&mut out, k.as_bytes());
            put_bytes(&mut out, v.as_bytes());
        }
        put_bytes(&mut out, job.cwd.as_os_str().as_bytes());
        let ms = job
            .timeout
            .map_or(0, |t| t.as_millis().clamp(1, u64::MAX as u128) as u64);
        out.extend_from_slice(&ms.to_le_bytes());
    }
    out
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.buf.len() < n {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated job file",
            ));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn os(&mut self) -> io::Result<OsString> {
        Ok(OsString::from_vec(self.bytes()?))
    }
}

pub fn decode(buf: &[u8]) -> io::Result<WireBatch> {
    let mut r = Reader { buf };
    if r.take(MAGIC.len())? != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad job file magic",
        ));
    }
    let mut batch = WireBatch::default();
    for _ in 0..r.u32()? {
        let tag = String::from_utf8_lossy(&r.bytes()?).into_owned();
        batch.mounts.push((tag, PathBuf::from(r.os()?)));
    }
    let (has, uid, gid) = (r.u32()?, r.u32()?, r.u32()?);
    batch.creds = (has != 0).then_some((uid, gid));
    batch.parallel = r.u32()?;
    let stream = r.u32()?;
    batch.stream = (stream & 1 != 0).then(|| StreamSpec {
        tty: [0, 1, 2].map(|i| stream & (2 << i) != 0),
    });
    for _ in 0..r.u32()? {
        let argv = (0..r.u32()?).map(|_| r.os()).collect::<io::Result<_>>()?;
        let env = (0..r.u32()?)
            .map(|_| Ok((r.os()?, r.os()?)))
            .collect::<io::Result<_>>()?;
        let cwd = PathBuf::from(r.os()?);
        let ms = r.u64()?;
        let timeout = (ms != 0).then(|| Duration::from_millis(ms));
        batch.jobs.push(WireJob {
            argv,
            env,
            cwd,
            timeout,
        });
    }
    Ok(batch)
}

/// `exit N` / `signal N`, plus a `timeout` line when the agent killed it.
pub fn format_status(status: WireStatus, timed_out: bool) -> String {
    let mut s = match status {
        WireStatus::Exited(c) => format!("exit {c}\n"),
        WireStatus::Signaled(s) => format!("signal {s}\n"),
    };
    if timed_out {
        s.push_str("timeout\n");
    }
    s
}

pub fn parse_status(text: &str) -> Option<(WireStatus, bool)> {
    let mut lines = text.lines();
    let (kind, num) = lines.next()?.split_once(' ')?;
    let num: i32 = num.trim().parse().ok()?;
    let status = match kind {
        "exit" => WireStatus::Exited(num),
        "signal" => WireStatus::Signaled(num),
        _ => return None,
    };
    Some((status, lines.any(|l| l == "timeout")))
}

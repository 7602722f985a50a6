//! Run programs under `libia2shim.so`, natively when the host has PKU and in
//! a PKU-emulating QEMU/TCG guest otherwise.
//!
//! A test harness typically builds its fixtures, describes each case as a
//! [`Job`] and runs them all in one boot:
//!
//! ```no_run
//! use ia2run::{Job, Mode, VmOptions};
//! let shim = ia2run::find_shim(None)?;
//! let jobs = vec![
//!     Job::new(["target/fixtures/hello"]).preload(&shim).env("IA2_PKU", "require"),
//!     Job::new(["target/fixtures/fault"]).preload(&shim),
//! ];
//! for (job, out) in jobs.iter().zip(ia2run::run_batch(Mode::Auto, &VmOptions::default(), &jobs)?) {
//!     println!("{}: {} {}", job, out.status, out.stdout_lossy());
//! }
//! # Ok::<(), ia2run::Error>(())
//! ```

// The guest agent's code is compiled into the library too (see build.rs)
// so that it is type-checked, linted and unit-tested with everything else.
#[allow(dead_code)]
mod agent;
mod cpio;
mod exec;
pub mod learn;
pub mod map;
pub mod tlslayout;
mod vm;
mod wire;

pub use vm::{run_batch_vm, run_vm_stream, VmOptions};

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// One command to run: the complete environment, the working directory, an
/// optional library to preload and an optional time limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub argv: Vec<OsString>,
    /// The complete environment of the command (nothing is inherited).
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    /// Set as `LD_PRELOAD`, replacing any value in `env`. `None` leaves
    /// `env` as it is.
    pub preload: Option<PathBuf>,
    /// Kill the command (and its process group) after this long.
    pub timeout: Option<Duration>,
}

impl Job {
    /// A job that starts from ia2run's own environment and working
    /// directory, with no preload and no timeout.
    pub fn new<I, S>(argv: I) -> Job
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Job {
            argv: argv.into_iter().map(Into::into).collect(),
            env: std::env::vars_os().collect(),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            preload: None,
            timeout: None,
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Job {
        self.argv.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Job {
        self.argv.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets (or replaces) one variable.
    pub fn env(mut self, key: impl Into<OsString>, val: impl Into<OsString>) -> Job {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, val.into()));
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Job {
        self.env.retain(|(k, _)| k != key.as_ref());
        self
    }

    /// Starts from an empty environment.
    pub fn env_clear(mut self) -> Job {
        self.env.clear();
        self
    }

    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Job {
        self.cwd = dir.into();
        self
    }

    /// Preloads `lib` (made absolute, since the command may change directory).
    pub fn preload(mut self, lib: impl AsRef<Path>) -> Job {
        let lib = lib.as_ref();
        self.preload = Some(std::path::absolute(lib).unwrap_or_else(|_| lib.to_path_buf()));
        self
    }

    /// Removes any preload, including an `LD_PRELOAD` inherited in `env`.
    pub fn no_preload(mut self) -> Job {
        self.preload = None;
        self.env_remove("LD_PRELOAD")
    }

    pub fn timeout(mut self, limit: Duration) -> Job {
        self.timeout = Some(limit);
        self
    }

    /// The environment the command actually gets (`env` plus `preload`).
    pub fn effective_env(&self) -> Vec<(OsString, OsString)> {
        let mut env = self.env.clone();
        if let Some(p) = &self.preload {
            env.retain(|(k, _)| k != "LD_PRELOAD");
            env.push(("LD_PRELOAD".into(), p.clone().into_os_string()));
        }
        env
    }
}

impl fmt::Display for Job {
    /// The command line, shell-quoted where needed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&vm::describe(&self.argv))
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl Status {
    /// The shell's convention: the exit code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            Status::Exited(c) => c,
            Status::Signaled(s) => 128 + s,
        }
    }

    pub fn success(self) -> bool {
        self == Status::Exited(0)
    }

    pub fn signal(self) -> Option<i32> {
        match self {
            Status::Signaled(s) => Some(s),
            Status::Exited(_) => None,
        }
    }
}

/// `SIGSEGV` for 11, and so on; `None` for numbers without a name.
pub fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        16 => "SIGSTKFLT",
        17 => "SIGCHLD",
        18 => "SIGCONT",
        19 => "SIGSTOP",
        20 => "SIGTSTP",
        21 => "SIGTTIN",
        22 => "SIGTTOU",
        23 => "SIGURG",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        26 => "SIGVTALRM",
        27 => "SIGPROF",
        28 => "SIGWINCH",
        29 => "SIGIO",
        30 => "SIGPWR",
        31 => "SIGSYS",
        _ => return None,
    })
}

impl fmt::Display for Status {
    /// `exit 3` or `signal 11 (SIGSEGV)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Status::Exited(c) => write!(f, "exit {c}"),
            Status::Signaled(s) => match signal_name(s) {
                Some(n) => write!(f, "signal {s} ({n})"),
                None => write!(f, "signal {s}"),
            },
        }
    }
}

/// A finished command: its status and everything it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The job's timeout expired and it was killed (`status` is then
    /// `Signaled(9)`).
    pub timed_out: bool,
}

impl Outcome {
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// What can go wrong in ia2run itself (as opposed to in the command).
#[derive(Debug)]
pub enum Error {
    /// A tool or file ia2run needs is missing; `package` is the Debian
    /// package that provides it.
    MissingTool {
        what: String,
        path: PathBuf,
        package: &'static str,
    },
    /// `libia2shim.so` was not found in any of these places.
    ShimNotFound { searched: Vec<PathBuf> },
    /// The guest CPU lacks `pku` or `ospke`; holds its `/proc/cpuinfo` flags.
    NoPku(String),
    /// The guest did not finish in time and was killed. `during` says what
    /// it was doing (booting, or which job).
    Timeout {
        after: Duration,
        during: String,
        console: String,
    },
    /// The guest failed; `console` holds the end of its console log.
    Guest { msg: String, console: String },
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let console = |f: &mut fmt::Formatter<'_>, c: &str| {
            if c.trim().is_empty() {
                Ok(())
            } else {
                write!(f, "\n--- end of the guest console log ---\n{c}")
            }
        };
        match self {
            Error::MissingTool { what, path, package } => write!(
                f,
                "{what} not found (looked for {}); install the Debian package `{package}`",
                path.display()
            ),
            Error::ShimNotFound { searched } => {
                write!(f, "libia2shim.so not found; build it with `cargo build -p ia2shim`, or pass --shim PATH or --no-shim. Searched:")?;
                for p in searched {
                    write!(f, "\n  {}", p.display())?;
                }
                Ok(())
            }
            Error::NoPku(flags) => write!(
                f,
                "the guest CPU reports no `pku`/`ospke` (is this QEMU too old for `-cpu max` with PKU?); guest flags: {flags}"
            ),
            Error::Timeout { after, during, console: c } => {
                write!(f, "timed out after {} s {during}; the guest was killed", after.as_secs_f64())?;
                console(f, c)
            }
            Error::Guest { msg, console: c } => {
                write!(f, "{msg}")?;
                console(f, c)
            }
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Natively if [`host_has_pku`], else in the VM; `IA2RUN_MODE=vm` or
    /// `native` overrides the detection.
    #[default]
    Auto,
    Native,
    Vm,
}

impl Mode {
    /// `Auto` decided: `$IA2RUN_MODE` if it says `vm` or `native` (so a
    /// test suite can be sent to the VM on a PKU machine), else `Native`
    /// when [`host_has_pku`], else `Vm`.
    pub fn resolve(self) -> Mode {
        match self {
            Mode::Auto => match std::env::var("IA2RUN_MODE").as_deref() {
                Ok("vm") => Mode::Vm,
                Ok("native") => Mode::Native,
                _ if host_has_pku() => Mode::Native,
                _ => Mode::Vm,
            },
            m => m,
        }
    }
}

/// Whether this machine can enforce protection keys: CPUID reports PKU and
/// OSPKE, and the kernel hands out a key.
pub fn host_has_pku() -> bool {
    // CPUID became a safe function in newer Rust; older ones need `unsafe`.
    #[cfg(target_arch = "x86_64")]
    #[allow(unused_unsafe)]
    {
        // SAFETY: CPUID is always available on x86-64.
        let leaf0 = unsafe { std::arch::x86_64::__cpuid(0) };
        if leaf0.eax < 7 {
            return false;
        }
        // SAFETY: as above; leaf 7 exists (checked).
        let ecx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.ecx;
        if ecx & (1 << 3) == 0 || ecx & (1 << 4) == 0 {
            return false;
        }
        // SAFETY: pkey_alloc/pkey_free take plain integers.
        let key = unsafe { libc::syscall(libc::SYS_pkey_alloc, 0, 0) };
        if key < 0 {
            return false;
        }
        unsafe { libc::syscall(libc::SYS_pkey_free, key) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The places [`find_shim`] looks, in order.
pub fn shim_candidates() -> Vec<PathBuf> {
    const NAME: &str = "libia2shim.so";
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        // Test binaries live in target/<profile>/deps, the shim one up.
        if dir.file_name() == Some(OsStr::new("deps")) {
            if let Some(up) = dir.parent() {
                dirs.push(up.to_path_buf());
            }
        }
        // Installed (scripts/install.sh): PREFIX/bin/ia2run, PREFIX/lib.
        if let Some(prefix) = dir.parent() {
            dirs.push(prefix.join("lib"));
        }
        dirs.push(dir);
    }
    let mut targets = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR").filter(|t| !t.is_empty()) {
        targets.push(PathBuf::from(t));
    }
    targets.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    for t in targets {
        dirs.push(t.join("release"));
        dirs.push(t.join("debug"));
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let p = d.join(NAME);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Finds `libia2shim.so`: `explicit` if given, else `$IA2RUN_SHIM`, else
/// in `../lib` of the running executable's directory (an installed
/// `PREFIX/bin/ia2run` finds `PREFIX/lib/libia2shim.so`), else next to it,
/// else in Cargo's target directory (release, then debug). The result is
/// absolute.
pub fn find_shim(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let given = explicit.map(Path::to_path_buf).or_else(|| {
        std::env::var_os("IA2RUN_SHIM")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let candidates = match given {
        Some(p) => vec![p],
        None => shim_candidates(),
    };
    for c in &candidates {
        if c.is_file() {
            return Ok(fs::canonicalize(c).unwrap_or_else(|_| c.clone()));
        }
    }
    Err(Error::ShimNotFound {
        searched: candidates,
    })
}

fn temp_file(tag: &str) -> Result<(fs::File, PathBuf), Error> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("ia2run-{}-{n}.{tag}", std::process::id()));
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .map_err(|source| Error::Io {
            context: format!("cannot create {}", p.display()),
            source,
        })?;
    Ok((f, p))
}

fn to_status(s: wire::WireStatus) -> Status {
    match s {
        wire::WireStatus::Exited(c) => Status::Exited(c),
        wire::WireStatus::Signaled(s) => Status::Signaled(s),
    }
}

/// Runs one job on this machine and captures its output. Standard input is
/// `/dev/null`. A command that cannot be started gives status 127 (not
/// found) or 126, with a message on its stderr, as in a shell.
pub fn run_native(job: &Job) -> Result<Outcome, Error> {
    let job = &tlslayout::arranged(job);
    // Files rather than pipes: no reader threads, and a forked grandchild
    // that keeps stdout open cannot make us wait.
    let (out, out_path) = temp_file("out")?;
    let (err, err_path) = temp_file("err")?;
    let _ = (fs::remove_file(&out_path), fs::remove_file(&err_path));
    let dup = |f: &fs::File| {
        f.try_clone().map_err(|source| Error::Io {
            context: "dup".into(),
            source,
        })
    };
    let (mut out_r, mut err_r) = (dup(&out)?, dup(&err)?);
    let stdios = exec::Stdios {
        stdin: Stdio::null(),
        stdout: out.into(),
        stderr: err.into(),
    };
    let (status, timed_out, extra) = match exec::run(
        &job.argv,
        &job.effective_env(),
        &job.cwd,
        job.timeout,
        stdios,
        exec::Group::Own,
        None,
    ) {
        Ok((s, t)) => (s, t, String::new()),
        Err(e) => {
            let (s, msg) = exec::spawn_failure(&job.argv, &e);
            (s, false, msg)
        }
    };
    let read = |f: &mut fs::File| -> Result<Vec<u8>, Error> {
        use std::io::{Read, Seek};
        let mut v = Vec::new();
        f.seek(std::io::SeekFrom::Start(0))
            .and_then(|_| f.read_to_end(&mut v))
            .map_err(|source| Error::Io {
                context: "reading the command's output".into(),
                source,
            })?;
        Ok(v)
    };
    let stdout = read(&mut out_r)?;
    let mut stderr = read(&mut err_r)?;
    stderr.extend_from_slice(extra.as_bytes());
    Ok(Outcome {
        status: to_status(status),
        stdout,
        stderr,
        timed_out,
    })
}

/// Runs one job on this machine with ia2run's own stdin, stdout and stderr
/// (so output streams, and a terminal stays a terminal). Returns the status
/// and whether the timeout killed it.
pub fn run_native_inherit(job: &Job) -> Result<(Status, bool), Error> {
    let job = &tlslayout::arranged(job);
    let stdios = exec::Stdios {
        stdin: Stdio::inherit(),
        stdout: Stdio::inherit(),
        stderr: Stdio::inherit(),
    };
    match exec::run(
        &job.argv,
        &job.effective_env(),
        &job.cwd,
        job.timeout,
        stdios,
        exec::Group::Same,
        None,
    ) {
        Ok((s, t)) => Ok((to_status(s), t)),
        Err(e) => {
            let (s, msg) = exec::spawn_failure(&job.argv, &e);
            eprint!("{msg}");
            Ok((to_status(s), false))
        }
    }
}

/// Runs `jobs` in order, natively or in one VM boot, as `mode` says
/// (`opts` only matters for the VM).
pub fn run_batch(mode: Mode, opts: &VmOptions, jobs: &[Job]) -> Result<Vec<Outcome>, Error> {
    match mode.resolve() {
        Mode::Vm => {
            let jobs: Vec<Job> = jobs.iter().map(tlslayout::arranged).collect();
            run_batch_vm(opts, &jobs)
        }
        _ => jobs.iter().map(run_native).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes() {
        assert_eq!(Status::Exited(3).code(), 3);
        assert_eq!(Status::Signaled(11).code(), 139);
        assert_eq!(Status::Signaled(11).to_string(), "signal 11 (SIGSEGV)");
        assert!(Status::Exited(0).success());
    }

    #[test]
    fn preload_replaces_env() {
        let j = Job::new(["true"])
            .env("LD_PRELOAD", "/old.so")
            .preload("/new.so");
        let env = j.effective_env();
        let pre: Vec<_> = env.iter().filter(|(k, _)| k == "LD_PRELOAD").collect();
        assert_eq!(pre.len(), 1);
        assert_eq!(pre[0].1, "/new.so");
    }

    #[test]
    fn wire_roundtrip() {
        let b = wire::WireBatch {
            mounts: vec![("rw0".into(), "/a b".into())],
            creds: Some((1000, 100)),
            parallel: 2,
            stream: Some(wire::StreamSpec {
                tty: [true, false, true],
            }),
            jobs: vec![wire::WireJob {
                argv: vec!["x".into(), "".into(), "é\n".into()],
                env: vec![("K".into(), "V=W".into())],
                cwd: "/tmp".into(),
                timeout: Some(Duration::from_millis(1500)),
            }],
        };
        assert_eq!(wire::decode(&wire::encode(&b)).unwrap(), b);
        let mut frames = Vec::new();
        wire::put_frame(&mut frames, wire::Frame::Stdout, b"\0\xff").unwrap();
        wire::put_frame(&mut frames, wire::Frame::Exit, b"exit 0\n").unwrap();
        let mut r = frames.as_slice();
        assert_eq!(
            wire::read_frame(&mut r).unwrap(),
            Some((wire::Frame::Stdout, b"\0\xff".to_vec()))
        );
        assert_eq!(
            wire::read_frame(&mut r).unwrap().unwrap().0,
            wire::Frame::Exit
        );
        assert_eq!(wire::read_frame(&mut r).unwrap(), None);
        assert_eq!(
            wire::parse_status(&wire::format_status(wire::WireStatus::Signaled(9), true)),
            Some((wire::WireStatus::Signaled(9), true))
        );
    }

    #[test]
    fn native_capture_and_status() {
        let o = run_native(&Job::new(["sh", "-c", "echo out; echo err >&2; exit 3"])).unwrap();
        assert_eq!(o.status, Status::Exited(3));
        assert_eq!(o.stdout, b"out\n");
        assert_eq!(o.stderr, b"err\n");
        let o = run_native(&Job::new(["sh", "-c", "kill -SEGV $$"])).unwrap();
        assert_eq!(o.status, Status::Signaled(11));
        let o = run_native(&Job::new(["/nonexistent/prog"])).unwrap();
        assert_eq!(o.status, Status::Exited(127));
        let o = run_native(&Job::new(["sleep", "10"]).timeout(Duration::from_millis(200))).unwrap();
        assert!(o.timed_out);
        assert_eq!(o.status, Status::Signaled(9));
    }
}

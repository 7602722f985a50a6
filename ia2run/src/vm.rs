//! Running a batch of jobs in a QEMU/TCG guest that emulates PKU.
//!
//! The guest boots the host's Debian kernel with a busybox initramfs built
//! (and cached) here, mounts the host root read-only over virtio-9p and
//! chroots into it, so that every path is the same as on the host. A third
//! kind of 9p export, a host temp directory, carries the job file and the
//! guest agent in and the results out.

use crate::cpio::Cpio;
use crate::wire::{self, StreamSpec, WireBatch, WireJob, WireStatus};
use crate::{Error, Job, Outcome, Status};
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The guest agent, compiled by `build.rs`.
static AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ia2run-agent"));
static INIT: &str = include_str!("init.sh");

/// The modules that make virtio-9p work, in load order. Their dependencies
/// from `modules.dep` are loaded first; modules that are built in (or absent)
/// are skipped.
const MODULES: [&str; 11] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    // The streaming port of `ia2run --vm -- CMD` (virtio-serial).
    "virtio_console",
];

/// Settings for the guest. `Default` gives 1024 MB, 2 CPUs, 300 s, and the
/// tools found on the host (each may be overridden by an `IA2RUN_*`
/// environment variable, see the field docs).
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Guest memory in MB.
    pub mem_mb: u32,
    /// Guest CPU count.
    pub cpus: u32,
    /// Hard limit for boot plus the whole batch; QEMU is killed after it.
    pub timeout: Duration,
    /// Kernel image. Else `$IA2RUN_KERNEL`, else the newest `/boot/vmlinuz-*`.
    pub kernel: Option<PathBuf>,
    /// Module directory. Else `$IA2RUN_MODULES`, else `/lib/modules/<kernel version>`.
    pub modules_dir: Option<PathBuf>,
    /// QEMU binary. Else `$IA2RUN_QEMU`, else `qemu-system-x86_64` from `PATH`.
    pub qemu: Option<PathBuf>,
    /// A statically linked busybox. Else `$IA2RUN_BUSYBOX`, else `busybox` from `PATH`.
    pub busybox: Option<PathBuf>,
    /// Where the initramfs and the uncompressed kernel (about 70 MB) are
    /// cached. Else `$IA2RUN_CACHE_DIR`, else `$XDG_CACHE_HOME/ia2run`, else
    /// `~/.cache/ia2run`, else (if none is writable) one in the temp dir.
    pub cache_dir: Option<PathBuf>,
    /// Host directories the guest may write to (mounted read-write at the
    /// same path). Each job's working directory is added automatically
    /// unless it is `/`. Everything else of the host is read-only, and
    /// `/tmp`, `/run` and `/dev/shm` are fresh tmpfs mounts.
    pub writable: Vec<PathBuf>,
    /// How many jobs the guest runs at once (default 1: one after the
    /// other). More can pay off with `cpus` > 1 when the host has idle
    /// cores; the jobs must then not depend on each other.
    pub parallel: u32,
    /// Keep the host temp directory (job file, results, console log) and
    /// report its path on stderr. Also set by `IA2RUN_KEEP=1`.
    pub keep_temp: bool,
    /// Print timings and paths on stderr. Also set by `IA2RUN_VERBOSE=1`.
    pub verbose: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            mem_mb: 1024,
            cpus: 2,
            timeout: Duration::from_secs(300),
            kernel: None,
            modules_dir: None,
            qemu: None,
            busybox: None,
            cache_dir: None,
            writable: Vec::new(),
            parallel: 1,
            keep_temp: false,
            verbose: false,
        }
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// `name` in `PATH`, else in the directories Debian installs it to (a test
/// runner may have trimmed `PATH`).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn missing(what: &str, path: PathBuf, package: &'static str) -> Error {
    Error::MissingTool {
        what: what.into(),
        path,
        package,
    }
}

fn resolve_tool(
    opt: &Option<PathBuf>,
    var: &str,
    name: &str,
    package: &'static str,
) -> Result<PathBuf, Error> {
    let p = opt.clone().or_else(|| env_path(var));
    match p {
        Some(p) if p.is_file() => Ok(p),
        Some(p) => Err(missing(name, p, package)),
        None => which(name).ok_or_else(|| missing(name, PathBuf::from(name), package)),
    }
}

/// Compares kernel release strings by their numeric runs ("6.10" > "6.9").
fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

fn newest_boot_kernel() -> Option<PathBuf> {
    fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let ver = name.strip_prefix("vmlinuz-")?.to_owned();
            Some((version_key(&ver), e.path()))
        })
        .max()
        .map(|(_, p)| p)
}

/// The release string inside a bzImage: the setup header holds, at 0x20e,
/// the offset (minus 0x200) of "6.1.0-56-amd64 (debian-kernel@...) #1 ...".
fn bzimage_release(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let off = u16::from_le_bytes(image.get(0x20e..0x210)?.try_into().ok()?) as usize + 0x200;
    let tail = image.get(off..)?;
    let end = tail.iter().position(|&b| b == 0 || b == b' ')?;
    let s = std::str::from_utf8(&tail[..end]).ok()?;
    (!s.is_empty()).then(|| s.to_owned())
}

/// Reads `n` (≤ 8) little-endian bytes at `o`.
fn le(data: &[u8], o: usize, n: usize) -> Option<u64> {
    let b = data.get(o..o.checked_add(n)?)?;
    Some(b.iter().rev().fold(0u64, |v, x| (v << 8) | *x as u64))
}

/// The file offsets of an ELF64's program headers, or `None` if `data` is
/// not an ELF64 with a readable header.
fn elf64_program_headers(data: &[u8]) -> Option<impl Iterator<Item = usize>> {
    if data.get(..5) != Some(b"\x7fELF\x02") {
        return None;
    }
    let (phoff, phentsize, phnum) = (le(data, 0x20, 8)?, le(data, 0x36, 2)?, le(data, 0x38, 2)?);
    Some((0..phnum).map(move |i| (phoff + i * phentsize) as usize))
}

/// Whether an ELF64 has a Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY),
/// which QEMU needs to boot it directly.
fn elf_has_pvh_note(data: &[u8]) -> bool {
    let Some(mut phdrs) = elf64_program_headers(data) else {
        return false;
    };
    phdrs.any(|ph| {
        if le(data, ph, 4) != Some(4) {
            return false; // not PT_NOTE
        }
        let (Some(off), Some(size)) = (le(data, ph + 8, 8), le(data, ph + 32, 8)) else {
            return false;
        };
        let (mut p, end) = (off as usize, (off + size) as usize);
        while p + 12 <= end {
            let (Some(namesz), Some(descsz), Some(ty)) =
                (le(data, p, 4), le(data, p + 4, 4), le(data, p + 8, 4))
            else {
                return false;
            };
            let name = data
                .get(p + 12..p + 12 + namesz as usize)
                .unwrap_or_default();
            if name.starts_with(b"Xen") && ty == 18 {
                return true;
            }
            p += 12 + (namesz as usize).next_multiple_of(4) + (descsz as usize).next_multiple_of(4);
        }
        false
    })
}

/// The uncompressed kernel inside a bzImage, via the setup header's
/// payload_offset/length and the matching decompressor. `None` if anything
/// is missing; the caller then boots the bzImage itself.
fn extract_vmlinux(image: &[u8]) -> Option<Vec<u8>> {
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => n as usize,
    };
    let off = (setup_sects + 1) * 512 + le(image, 0x248, 4)? as usize;
    let payload = image.get(off..off + le(image, 0x24c, 4)? as usize)?;
    let args: &[&str] = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => &["xz", "-dcq"],
        [0x5d, 0, 0, ..] => &["xz", "--format=lzma", "-dcq"],
        [0x1f, 0x8b, ..] => &["gzip", "-dcq"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dcq"],
        _ => return None,
    };
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let payload = payload.to_vec();
    // Feed from a thread so that a full stdout pipe cannot deadlock us.
    let feeder = std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut stdin, &payload);
    });
    let out = child.wait_with_output().ok()?;
    let _ = feeder.join();
    // The payload ends with the decompressed size, which some tools call
    // trailing garbage: judge by the result, not the exit status.
    elf_has_pvh_note(&out.stdout).then_some(out.stdout)
}

fn elf_is_static(data: &[u8]) -> bool {
    // ELF64: static means no PT_INTERP (3) program header.
    elf64_program_headers(data)
        .is_some_and(|mut phdrs| phdrs.all(|ph| le(data, ph, 4).is_some_and(|t| t != 3)))
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

struct Kernel {
    image: PathBuf,
    release: String,
    modules: PathBuf,
}

fn resolve_kernel(opts: &VmOptions) -> Result<Kernel, Error> {
    let image = match opts.kernel.clone().or_else(|| env_path("IA2RUN_KERNEL")) {
        Some(p) if p.is_file() => p,
        Some(p) => return Err(missing("kernel", p, "linux-image-amd64")),
        None => newest_boot_kernel().ok_or_else(|| {
            missing(
                "kernel",
                PathBuf::from("/boot/vmlinuz-*"),
                "linux-image-amd64",
            )
        })?,
    };
    let bytes = fs::read(&image).map_err(io_err(format!(
        "cannot read the kernel {} (set IA2RUN_KERNEL to a readable copy)",
        image.display()
    )))?;
    let from_name = image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .map(str::to_owned);
    let release = bzimage_release(&bytes).or(from_name).unwrap_or_default();
    let modules = opts
        .modules_dir
        .clone()
        .or_else(|| env_path("IA2RUN_MODULES"))
        .unwrap_or_else(|| Path::new("/lib/modules").join(&release));
    Ok(Kernel {
        image,
        release,
        modules,
    })
}

/// The kernel to hand to QEMU: a cached uncompressed `vmlinux` when the
/// bzImage holds one with a PVH entry, since QEMU then boots it directly and
/// the guest skips decompressing itself under TCG (about 3 s of a 6 s boot).
/// Otherwise the bzImage.
fn boot_image(opts: &VmOptions, kernel: &Kernel, verbose: bool) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    env!("CARGO_PKG_VERSION").hash(&mut h);
    stamp(&mut h, &kernel.image);
    let dir = cache_dir(opts);
    let path = dir.join(format!("vmlinux-{}-{:016x}", kernel.release, h.finish()));
    let none = dir.join(format!(
        "vmlinux-{}-{:016x}.none",
        kernel.release,
        h.finish()
    ));
    if path.is_file() {
        return path;
    }
    if none.exists() {
        return kernel.image.clone();
    }
    let vmlinux = fs::read(&kernel.image)
        .ok()
        .and_then(|b| extract_vmlinux(&b));
    let _ = fs::create_dir_all(&dir);
    let tmp = tmp_name(&path);
    match vmlinux {
        Some(v) if fs::write(&tmp, &v).is_ok() && fs::rename(&tmp, &path).is_ok() => path,
        _ => {
            if verbose {
                eprintln!(
                    "ia2run: booting the compressed kernel (no PVH vmlinux could be extracted)"
                );
            }
            let _ = fs::remove_file(&tmp);
            let _ = fs::write(&none, b"");
            kernel.image.clone()
        }
    }
}

/// name -> (file, dependency files), from `modules.dep`.
fn read_modules_dep(dir: &Path) -> HashMap<String, (PathBuf, Vec<PathBuf>)> {
    let mut map = HashMap::new();
    let Ok(text) = fs::read_to_string(dir.join("modules.dep")) else {
        return map;
    };
    for line in text.lines() {
        let Some((file, deps)) = line.split_once(':') else {
            continue;
        };
        let deps = deps.split_whitespace().map(|d| dir.join(d)).collect();
        map.insert(module_name(Path::new(file)), (dir.join(file), deps));
    }
    map
}

fn module_name(file: &Path) -> String {
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    let base = name.split(".ko").next().unwrap_or(&name);
    base.replace('-', "_")
}

/// The module files to load, dependencies first.
fn module_files(dir: &Path) -> Vec<PathBuf> {
    fn visit(
        name: &str,
        deps: &HashMap<String, (PathBuf, Vec<PathBuf>)>,
        seen: &mut HashSet<String>,
        out: &mut Vec<PathBuf>,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        let Some((file, needs)) = deps.get(name) else {
            return;
        };
        for d in needs.iter().rev() {
            visit(&module_name(d), deps, seen, out);
        }
        out.push(file.clone());
    }
    let deps = read_modules_dep(dir);
    let (mut seen, mut out) = (HashSet::new(), Vec::new());
    for m in MODULES {
        visit(m, &deps, &mut seen, &mut out);
    }
    out
}

/// Module contents, decompressed: busybox `insmod` wants a plain ELF.
fn read_module(file: &Path) -> Result<Vec<u8>, Error> {
    let name = file.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some(("xz", "xz-utils"))
    } else if name.ends_with(".ko.zst") {
        Some(("zstd", "zstd"))
    } else if name.ends_with(".ko.gz") {
        Some(("gzip", "gzip"))
    } else {
        None
    };
    let Some((tool, package)) = tool else {
        return fs::read(file).map_err(io_err(format!("cannot read module {name}")));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(file)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|_| missing(tool, PathBuf::from(tool), package))?;
    if !out.status.success() {
        return Err(Error::Guest {
            msg: format!("`{tool} -dc {name}` failed"),
            console: String::new(),
        });
    }
    Ok(out.stdout)
}

/// The first usable cache directory: the one asked for, else the user's
/// cache, else one in the temp dir (a read-only HOME must not stop us).
fn cache_dir(opts: &VmOptions) -> PathBuf {
    let asked = opts
        .cache_dir
        .clone()
        .or_else(|| env_path("IA2RUN_CACHE_DIR"));
    let user = env_path("XDG_CACHE_HOME")
        .map(|p| p.join("ia2run"))
        .or_else(|| env_path("HOME").map(|p| p.join(".cache/ia2run")));
    // SAFETY: plain getter.
    let tmp = std::env::temp_dir().join(format!("ia2run-cache-{}", unsafe { libc::geteuid() }));
    let candidates: Vec<PathBuf> = asked.into_iter().chain(user).chain([tmp.clone()]).collect();
    candidates
        .into_iter()
        .find(|d| {
            fs::create_dir_all(d).is_ok()
                // SAFETY: the path is a valid C string for the call.
                && std::ffi::CString::new(d.as_os_str().as_bytes())
                    .is_ok_and(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0)
        })
        .unwrap_or(tmp)
}

/// A name for writing `dest` atomically: unique per process and per call,
/// since several threads may build the same cache entry at once.
fn tmp_name(dest: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    dest.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

fn stamp(h: &mut impl Hasher, p: &Path) {
    p.hash(h);
    if let Ok(m) = fs::metadata(p) {
        (m.len(), m.mtime(), m.mtime_nsec(), m.ino()).hash(h);
    }
}

/// Builds the initramfs, or reuses the cached one. The key covers the kernel
/// release, the module and busybox files (path, size, mtime), the init script
/// and ia2run's version.
fn initramfs(opts: &VmOptions, kernel: &Kernel, busybox: &Path) -> Result<PathBuf, Error> {
    let modules = module_files(&kernel.modules);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (env!("CARGO_PKG_VERSION"), INIT, &kernel.release).hash(&mut h);
    stamp(&mut h, busybox);
    for m in &modules {
        stamp(&mut h, m);
    }
    let dir = cache_dir(opts);
    let path = dir.join(format!(
        "initramfs-{}-{:016x}.cpio",
        kernel.release,
        h.finish()
    ));
    if path.is_file() {
        return Ok(path);
    }

    let bb = fs::read(busybox).map_err(io_err(format!("cannot read {}", busybox.display())))?;
    if !elf_is_static(&bb) {
        return Err(Error::MissingTool {
            what: "statically linked busybox".into(),
            path: busybox.to_path_buf(),
            package: "busybox-static",
        });
    }
    let mut c = Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        c.dir(d);
    }
    c.char_dev("dev/console", 0o600, 5, 1);
    c.char_dev("dev/null", 0o666, 1, 3);
    c.file("bin/busybox", 0o755, &bb);
    c.file("init", 0o755, INIT.as_bytes());
    let mut list = String::new();
    for m in &modules {
        let name = module_name(m);
        c.file(&format!("modules/{name}.ko"), 0o644, &read_module(m)?);
        list.push_str(&name);
        list.push('\n');
    }
    c.file("modules.list", 0o644, list.as_bytes());

    fs::create_dir_all(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let tmp = tmp_name(&path);
    fs::write(&tmp, c.finish()).map_err(io_err(format!("cannot write {}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(io_err(format!("cannot write {}", path.display())))?;
    Ok(path)
}

/// `quiet` keeps the console log short; `IA2RUN_KERNEL_ARGS` adds more
/// (e.g. `loglevel=7` to debug a boot). `no_timer_check`: on a loaded host
/// the emulated CPU can miss the kernel's IO-APIC timer check, which then
/// panics the boot ("IO-APIC + timer doesn't work"); the timer works.
fn kernel_args() -> String {
    let mut a = String::from("console=ttyS0 quiet panic=-1 mitigations=off no_timer_check");
    if let Ok(extra) = std::env::var("IA2RUN_KERNEL_ARGS") {
        a.push(' ');
        a.push_str(&extra);
    }
    a
}

/// QEMU's option syntax doubles commas inside values.
fn qemu_escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

fn make_temp_dir() -> Result<PathBuf, Error> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let base = std::env::temp_dir();
    loop {
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = base.join(format!("ia2run-{}-{n}-{nanos:x}", std::process::id()));
        match fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("cannot create {}", p.display()))(e)),
        }
    }
}

/// The directories to export read-write: those asked for plus each job's
/// cwd, without duplicates or directories inside another one.
fn writable_dirs(opts: &VmOptions, jobs: &[Job]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = opts
        .writable
        .iter()
        .chain(jobs.iter().map(|j| &j.cwd))
        .filter_map(|d| fs::canonicalize(d).ok())
        .filter(|d| d.as_os_str() != "/" && d.is_dir())
        .collect();
    dirs.sort();
    dirs.dedup();
    let all = dirs.clone();
    dirs.retain(|d| !all.iter().any(|o| o != d && d.starts_with(o)));
    dirs
}

/// The last lines of the console log, without the terminal escapes that
/// SeaBIOS writes.
fn tail(text: &str, lines: usize) -> String {
    let mut clean = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // ESC c, or ESC [ parameters final-letter.
                if chars.next() == Some('[') {
                    while chars.next().is_some_and(|c| !c.is_ascii_alphabetic()) {}
                }
            }
            '\n' | '\t' => clean.push(c),
            c if c.is_control() => {}
            c => clean.push(c),
        }
    }
    let v: Vec<&str> = clean.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("ia2run: kept the VM's files in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A started guest: QEMU running, the job directory shared with it.
struct Guest {
    child: std::process::Child,
    tmp: TempDir,
    share: PathBuf,
    console: PathBuf,
    qemu_log: PathBuf,
    /// Listening for QEMU's connection to the streaming port.
    listener: Option<UnixListener>,
    image: PathBuf,
    t0: Instant,
    t_boot: Instant,
    verbose: bool,
}

impl Guest {
    fn guest_err(&self, msg: String) -> Error {
        let log = fs::read_to_string(&self.console).unwrap_or_default();
        Error::Guest {
            msg,
            console: tail(&log, 20),
        }
    }

    /// What the guest was doing, for a timeout message.
    fn during(&self, jobs: &[Job]) -> String {
        if !self.share.join("started").exists() {
            return "while booting".to_string();
        }
        let i = (0..jobs.len())
            .find(|i| !self.share.join(format!("{i}.status")).exists())
            .unwrap_or(0);
        format!(
            "while running job {} of {} ({})",
            i + 1,
            jobs.len(),
            jobs[i]
        )
    }

    fn timeout_error(&mut self, opts: &VmOptions, jobs: &[Job]) -> Error {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = fs::read_to_string(&self.console).unwrap_or_default();
        Error::Timeout {
            after: opts.timeout,
            during: self.during(jobs),
            console: tail(&log, 20),
        }
    }

    /// Waits for the guest to power off (or kills it at the deadline), then
    /// turns what the guest left behind into an error if it failed before
    /// running the jobs.
    fn wait(&mut self, opts: &VmOptions, jobs: &[Job]) -> Result<(), Error> {
        let deadline = self.t_boot + opts.timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().map_err(io_err("waiting for qemu"))? {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error(opts, jobs));
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        if self.verbose {
            eprintln!(
                "ia2run: VM ran {} job(s) in {:.2} s (setup {:.2} s), kernel {}",
                jobs.len(),
                self.t_boot.elapsed().as_secs_f64(),
                (self.t_boot - self.t0).as_secs_f64(),
                self.image.display()
            );
        }
        let log = fs::read_to_string(&self.console).unwrap_or_default();
        if let Ok(flags) = fs::read_to_string(self.share.join("nopku")) {
            let flags = flags.split_once(':').map_or(flags.as_str(), |(_, f)| f);
            return Err(Error::NoPku(flags.trim().to_owned()));
        }
        if let Some(line) = log
            .lines()
            .find_map(|l| l.split_once("IA2RUN-INIT-ERROR: "))
        {
            return Err(self.guest_err(format!("guest init failed: {}", line.1.trim())));
        }
        if let Ok(msg) = fs::read_to_string(self.share.join("agent-error")) {
            return Err(self.guest_err(format!("guest agent failed: {}", msg.trim())));
        }
        if !self.share.join("started").exists() {
            let qlog = fs::read_to_string(&self.qemu_log).unwrap_or_default();
            let msg = if !status.success() && !qlog.trim().is_empty() {
                format!("qemu failed ({status}): {}", tail(&qlog, 10))
            } else {
                format!("the guest stopped before running anything ({status})")
            };
            return Err(self.guest_err(msg));
        }
        Ok(())
    }

    /// The status line file of job `i`, parsed; with its guest timing.
    fn job_status(&self, i: usize, jobs: &[Job]) -> Result<(Status, bool), Error> {
        let text = fs::read(self.share.join(format!("{i}.status")))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .ok();
        let Some((st, timed_out)) = text.as_deref().and_then(wire::parse_status) else {
            return Err(self.guest_err(format!(
                "job {} of {} ({}) did not finish: the guest crashed or powered off",
                i + 1,
                jobs.len(),
                jobs[i]
            )));
        };
        if self.verbose {
            let ms = text
                .as_deref()
                .and_then(|t| t.lines().find_map(|l| l.strip_prefix("ms ")));
            eprintln!(
                "ia2run: job {} ({}) took {} ms in the guest",
                i + 1,
                jobs[i],
                ms.unwrap_or("?")
            );
        }
        Ok((to_status(st), timed_out))
    }
}

fn to_status(st: WireStatus) -> Status {
    match st {
        WireStatus::Exited(c) => Status::Exited(c),
        WireStatus::Signaled(s) => Status::Signaled(s),
    }
}

/// Boots QEMU with `jobs` in the job directory; with `stream`, also with
/// the streaming port, whose host end is a Unix socket QEMU connects to.
fn start_guest(opts: &VmOptions, jobs: &[Job], stream: Option<StreamSpec>) -> Result<Guest, Error> {
    let verbose = opts.verbose || env_flag("IA2RUN_VERBOSE");
    let t0 = Instant::now();
    let qemu = resolve_tool(
        &opts.qemu,
        "IA2RUN_QEMU",
        "qemu-system-x86_64",
        "qemu-system-x86",
    )?;
    let kernel = resolve_kernel(opts)?;
    let busybox = resolve_tool(&opts.busybox, "IA2RUN_BUSYBOX", "busybox", "busybox-static")?;
    let initrd = initramfs(opts, &kernel, &busybox)?;
    let image = boot_image(opts, &kernel, verbose);

    let tmp = TempDir {
        path: make_temp_dir()?,
        keep: opts.keep_temp || env_flag("IA2RUN_KEEP"),
    };
    let share = tmp.path.join("share");
    fs::create_dir(&share).map_err(io_err("cannot create the job directory"))?;
    let agent = share.join("agent");
    fs::write(&agent, AGENT).map_err(io_err("cannot write the guest agent"))?;
    fs::set_permissions(&agent, fs::Permissions::from_mode(0o755))
        .map_err(io_err("cannot make the guest agent executable"))?;

    let writable = writable_dirs(opts, jobs);
    let batch = WireBatch {
        mounts: writable
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("rw{i}"), d.clone()))
            .collect(),
        // The guest runs as root; commands run as the host user, as natively.
        // SAFETY: plain getters.
        creds: match unsafe { (libc::geteuid(), libc::getegid()) } {
            (0, _) => None,
            ids => Some(ids),
        },
        parallel: opts.parallel.max(1),
        stream,
        jobs: jobs
            .iter()
            .map(|j| WireJob {
                argv: j.argv.clone(),
                env: j.effective_env(),
                cwd: j.cwd.clone(),
                timeout: j.timeout,
            })
            .collect(),
    };
    fs::write(share.join("jobs.bin"), wire::encode(&batch))
        .map_err(io_err("cannot write the job file"))?;

    let console = tmp.path.join("console.log");
    let qemu_log = tmp.path.join("qemu.log");
    let qemu_log_file = fs::File::create(&qemu_log).map_err(io_err("cannot create qemu.log"))?;
    let mut cmd = Command::new(&qemu);
    cmd.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
    ])
    .args([
        "-smp",
        &opts.cpus.max(1).to_string(),
        "-m",
        &opts.mem_mb.to_string(),
    ])
    .arg("-kernel")
    .arg(&image)
    .arg("-initrd")
    .arg(&initrd)
    // The console goes to a log file: `quiet` keeps it short, and the
    // command's output travels through the job directory (or the
    // streaming port) instead.
    .arg("-append")
    .arg(kernel_args())
    .arg("-serial")
    .arg(format!("file:{}", qemu_escape(&console)))
    .args(["-monitor", "none", "-nic", "none"])
    .arg("-virtfs")
    .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
    .arg("-virtfs")
    .arg(format!(
        "local,path={},mount_tag=ia2job,security_model=none",
        qemu_escape(&share)
    ));
    for (tag, dir) in &batch.mounts {
        cmd.arg("-virtfs").arg(format!(
            "local,path={},mount_tag={tag},security_model=none,multidevs=remap",
            qemu_escape(dir)
        ));
    }
    let listener = match stream {
        None => None,
        Some(_) => {
            // We listen and QEMU connects (its chardev's client mode), so
            // the connection exists once QEMU has started, with no retries.
            let sock = tmp.path.join("io.sock");
            let l = UnixListener::bind(&sock).map_err(io_err(format!(
                "cannot listen on {} (set TMPDIR to a shorter path?)",
                sock.display()
            )))?;
            cmd.arg("-chardev")
                .arg(format!("socket,id=ia2io,path={}", qemu_escape(&sock)))
                .args(["-device", "virtio-serial-pci,id=ia2ser", "-device"])
                .arg(format!(
                    "virtserialport,bus=ia2ser.0,chardev=ia2io,name={}",
                    wire::STREAM_PORT
                ));
            Some(l)
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(qemu_log_file.try_clone().map_err(io_err("qemu.log"))?)
        .stderr(qemu_log_file);
    // SAFETY: prctl is async-signal-safe. If ia2run dies, the guest goes too.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
            missing("qemu-system-x86_64", qemu.clone(), "qemu-system-x86")
        }
        _ => io_err(format!("cannot start {}", qemu.display()))(e),
    })?;
    Ok(Guest {
        child,
        tmp,
        share,
        console,
        qemu_log,
        listener,
        image,
        t0,
        t_boot: Instant::now(),
        verbose,
    })
}

/// Boots one guest, runs `jobs` in order inside it and returns one
/// [`Outcome`] per job. Fails if the guest cannot be started, has no PKU,
/// or does not finish within `opts.timeout`.
pub fn run_batch_vm(opts: &VmOptions, jobs: &[Job]) -> Result<Vec<Outcome>, Error> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut g = start_guest(opts, jobs, None)?;
    g.wait(opts, jobs)?;
    let mut outcomes = Vec::with_capacity(jobs.len());
    for i in 0..jobs.len() {
        let (status, timed_out) = g.job_status(i, jobs)?;
        let read = |ext: &str| fs::read(g.share.join(format!("{i}.{ext}")));
        outcomes.push(Outcome {
            status,
            stdout: read("out").unwrap_or_default(),
            stderr: read("err").unwrap_or_default(),
            timed_out,
        });
    }
    drop(g.tmp);
    Ok(outcomes)
}

mod stream;
pub use stream::run_vm_stream;

pub(crate) fn describe(argv: &[OsString]) -> String {
    let words: Vec<String> = argv
        .iter()
        .map(|a| {
            let s = a.to_string_lossy();
            if !s.is_empty()
                && a.as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:+,@%".contains(b))
            {
                s.into_owned()
            } else {
                format!("'{}'", s.replace('\'', r"'\''"))
            }
        })
        .collect();
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order() {
        assert!(version_key("6.10.0-1-amd64") > version_key("6.9.0-3-amd64"));
        assert!(version_key("6.1.0-56-amd64") > version_key("6.1.0-9-amd64"));
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name(Path::new("kernel/net/9p/9pnet_virtio.ko.xz")),
            "9pnet_virtio"
        );
        assert_eq!(module_name(Path::new("a/virtio-ring.ko")), "virtio_ring");
    }

    #[test]
    fn static_check() {
        // Rust links its test binaries dynamically on GNU targets.
        let exe = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!elf_is_static(&exe));
        assert!(!elf_is_static(b"#!/bin/sh\n"));
    }
}

//! A `log` backend that formats each record into a stack buffer and emits it
//! with one `write(2)`: no allocation (the malloc family may be ours), no
//! buffering to lose at `_exit`, and lines from threads never interleave.

use crate::stackfmt::{pid, StackBuf};
use core::fmt::Write;
use core::sync::atomic::{AtomicI32, Ordering};

static LOG_FD: AtomicI32 = AtomicI32::new(2);

struct FdLogger;

static LOGGER: FdLogger = FdLogger;

impl log::Log for FdLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = StackBuf::<2048>::new();
        let _ = write!(
            line,
            "ia2shim[{}]: {}: {}",
            pid(),
            level_name(record.level()),
            record.args()
        );
        line.push_bytes(b"\n");
        line.write_to_fd(LOG_FD.load(Ordering::Relaxed));
    }

    fn flush(&self) {}
}

fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "error",
        log::Level::Warn => "warning",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace",
    }
}

/// Install the logger with `level`, writing to `file` (`%p` → pid) or stderr.
/// Returns the path that could not be opened, if any (the caller fails closed).
pub fn init(level: log::LevelFilter, file: Option<&str>) -> Result<(), i32> {
    if let Some(path) = file {
        LOG_FD.store(open_output_file(path)?, Ordering::Relaxed);
    }
    // A second init (e.g. a test harness) keeps the first logger; harmless.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
    Ok(())
}

/// Open `path` for appending, expanding `%p` to the pid, without allocating.
/// Returns the fd or the errno.
pub fn open_output_file(path: &str) -> Result<i32, i32> {
    let mut expanded = StackBuf::<4096>::new();
    let mut rest = path;
    while let Some(i) = rest.find("%p") {
        expanded.push_bytes(&rest.as_bytes()[..i]);
        let _ = write!(expanded, "{}", pid());
        rest = &rest[i + 2..];
    }
    expanded.push_bytes(rest.as_bytes());
    expanded.push_bytes(b"\0");
    // Truncation would drop the NUL terminator.
    if expanded.as_bytes().last() != Some(&0) {
        return Err(libc::ENAMETOOLONG);
    }
    // SAFETY: a valid NUL-terminated path; flags and mode are plain integers.
    let fd = unsafe {
        libc::open(
            expanded.as_bytes().as_ptr().cast(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        Err(crate::stackfmt::errno())
    } else {
        Ok(fd)
    }
}

//! Helpers shared by the ia2run integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A per-test directory under Cargo's target dir: visible to the guest
/// through the host root (unlike /tmp, which is a tmpfs there).
pub fn work_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("ia2run-tests")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compiles `tests/fixtures/<src>` into `dir/<out>`.
pub fn cc(dir: &Path, src: &str, out: &str, flags: &[&str]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(src);
    let out = dir.join(out);
    let o = Command::new("cc")
        .args(["-O1", "-Wall", "-Werror"])
        .args(flags)
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("running cc");
    assert!(
        o.status.success(),
        "cc {}: {}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// The VM tests need QEMU, a kernel and busybox-static. Set
/// `IA2RUN_SKIP_VM_TESTS=1` to skip them on a machine without those.
pub fn skip_vm() -> bool {
    let skip = std::env::var_os("IA2RUN_SKIP_VM_TESTS").is_some_and(|v| v != "0");
    if skip {
        eprintln!("skipped: IA2RUN_SKIP_VM_TESTS is set");
    }
    skip
}

pub fn ia2run() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ia2run"));
    // The tests choose the mode themselves.
    c.env_remove("IA2RUN_MODE");
    c
}

pub fn show(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub const MINUTE: Duration = Duration::from_secs(60);

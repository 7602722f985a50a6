//! Shared test harness: builds C fixtures with `cc`, finds the shim, runs
//! programs natively under `LD_PRELOAD`, and runs every enforcement case of
//! a test binary in one VM boot (`ia2run`) when the host lacks PKU.
#![allow(dead_code)]

use ia2run::{Job, Mode, Outcome, VmOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The small committed AV1 clip (64x64, 10 frames; `demo/make_clips.sh`).
pub fn clip() -> String {
    root()
        .join("demo/clips/clip64.ivf")
        .to_str()
        .unwrap()
        .to_string()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Where fixtures are built: under the repository so the VM guest sees them
/// at the same path.
pub fn fixture_dir() -> PathBuf {
    let d = target_dir().join("ia2-fixtures");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn newest_mtime(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return newest; // an optional directory that a clean clone lacks
    };
    for e in entries.flatten() {
        let m = e.metadata().unwrap();
        let t = if m.is_dir() {
            newest_mtime(&e.path())
        } else {
            m.modified().unwrap()
        };
        newest = newest.max(t);
    }
    newest
}

/// The shim under test: `$IA2SHIM_LIB`, else `target/release/libia2shim.so`,
/// which must be newer than every source file, or the test fails (the
/// README's test command builds it first; `cargo test` alone does not
/// rebuild a cdylib).
pub fn shim() -> PathBuf {
    if let Some(p) = std::env::var_os("IA2SHIM_LIB") {
        return PathBuf::from(p);
    }
    let p = target_dir().join("release/libia2shim.so");
    let built = std::fs::metadata(&p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} is missing: run `cargo build --release` first",
                p.display()
            )
        });
    let src = newest_mtime(&root().join("src")).max(
        std::fs::metadata(root().join("shim.map"))
            .unwrap()
            .modified()
            .unwrap(),
    );
    // A stale shim would test old code and pass or fail for the wrong reason.
    assert!(
        built >= src,
        "{} is older than the sources: run `cargo build --release --workspace` first",
        p.display()
    );
    p
}

static CC_LOCK: Mutex<()> = Mutex::new(());

/// Compile `srcs` (relative to tests/fixtures) into `target/ia2-fixtures/out`
/// with `cc`, unless the output is newer than the sources and the headers.
pub fn cc(out: &str, srcs: &[&str], flags: &[&str]) -> PathBuf {
    let _g = CC_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = fixture_dir();
    let out_path = dir.join(out);
    let fixtures = root().join("tests/fixtures");
    let inputs: Vec<PathBuf> = srcs.iter().map(|s| fixtures.join(s)).collect();
    let newest_input = inputs
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .modified()
                .unwrap()
        })
        .max()
        .unwrap()
        .max(newest_mtime(&root().join("include")))
        .max(newest_mtime(&fixtures.join("include")));
    // Rebuild when a source is newer or the command line changed.
    let stamp_path = dir.join(format!("{out}.cmd"));
    let stamp = format!("{srcs:?} {flags:?}");
    let fresh = std::fs::metadata(&out_path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t >= newest_input)
        && std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp);
    if !fresh {
        let mut cmd = Command::new("cc");
        cmd.args([
            "-g",
            "-O1",
            "-fno-omit-frame-pointer",
            "-Wall",
            "-Werror",
            "-Wno-unused-result",
        ])
        .arg(format!("-I{}", root().join("include").display()))
        .arg(format!("-I{}", fixtures.join("include").display()))
        .args(&inputs)
        .args(["-L", dir.to_str().unwrap()])
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .args(flags)
        .arg("-o")
        .arg(&out_path);
        let o = cmd.output().expect("running cc");
        assert!(
            o.status.success(),
            "cc failed for {out}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::write(&stamp_path, stamp).unwrap();
    }
    out_path
}

/// A shared library fixture `lib{name}.so`.
pub fn cc_lib(name: &str, srcs: &[&str], flags: &[&str]) -> PathBuf {
    let mut f = vec!["-shared", "-fPIC", "-Wl,-z,now,-z,relro"];
    f.extend_from_slice(flags);
    cc(&format!("lib{name}.so"), srcs, &f)
}

/// An executable fixture: PIE, exporting its symbols so reports can name
/// them, and bound now with full RELRO like distro binaries (a lazily bound
/// executable's `.got.plt` is writable data and so carries its key).
pub fn cc_exe(name: &str, srcs: &[&str], flags: &[&str]) -> PathBuf {
    let mut f = vec!["-rdynamic", "-Wl,-z,now,-z,relro"];
    f.extend_from_slice(flags);
    cc(name, srcs, &f)
}

/// A job with a clean environment (PATH only), the shim preloaded, and `vars`.
pub fn job(argv: &[&str], vars: &[(&str, &str)]) -> Job {
    let mut j = Job::new(argv.iter().copied())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .preload(shim())
        .timeout(Duration::from_secs(120));
    for (k, v) in vars {
        j = j.env(*k, *v);
    }
    j
}

/// The same job without the shim (baselines).
pub fn job_unshimmed(argv: &[&str]) -> Job {
    Job::new(argv.iter().copied())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .no_preload()
        .timeout(Duration::from_secs(120))
}

/// Run natively (this host; use `IA2_PKU=sim` or `off` without PKU).
pub fn native(j: &Job) -> Outcome {
    ia2run::run_native(j).unwrap_or_else(|e| panic!("running {j}: {e}"))
}

/// Run every job in one batch where keys are enforced: natively when the
/// host has PKU, else in one VM boot. Results keep the names given.
pub fn enforced_batch(cases: Vec<(&'static str, Job)>) -> HashMap<&'static str, Outcome> {
    let opts = VmOptions {
        timeout: Duration::from_secs(900),
        ..VmOptions::default()
    };
    let jobs: Vec<Job> = cases.iter().map(|(_, j)| j.clone()).collect();
    let outs =
        ia2run::run_batch(Mode::Auto, &opts, &jobs).unwrap_or_else(|e| panic!("batch failed: {e}"));
    cases.into_iter().map(|(n, _)| n).zip(outs).collect()
}

pub fn out_text(o: &Outcome) -> String {
    format!(
        "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        o.stdout_lossy(),
        o.stderr_lossy()
    )
}

/// Exit code as a shell reports it (128+N for death by signal N).
pub fn code(o: &Outcome) -> i32 {
    o.status.code()
}

#[track_caller]
pub fn assert_code(o: &Outcome, expected: i32) {
    assert_eq!(code(o), expected, "unexpected status\n{}", out_text(o));
}

#[track_caller]
pub fn assert_stdout_has(o: &Outcome, needle: &str) {
    assert!(
        o.stdout_lossy().contains(needle),
        "stdout lacks {needle:?}\n{}",
        out_text(o)
    );
}

#[track_caller]
pub fn assert_stderr_has(o: &Outcome, needle: &str) {
    assert!(
        o.stderr_lossy().contains(needle),
        "stderr lacks {needle:?}\n{}",
        out_text(o)
    );
}

#[track_caller]
pub fn assert_stderr_lacks(o: &Outcome, needle: &str) {
    assert!(
        !o.stderr_lossy().contains(needle),
        "stderr has {needle:?}\n{}",
        out_text(o)
    );
}

pub const SIGSEGV_CODE: i32 = 128 + 11;
pub const SIGABRT_CODE: i32 = 128 + 6;

//! The guest agent: runs inside the VM, chrooted into the host's root, after
//! the initramfs `/init` has mounted everything. It mounts the writable host
//! directories, runs each job and writes `N.out`, `N.err` and `N.status` into
//! the shared job directory, which the host reads after the guest powers off.
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
}

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
        true,
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

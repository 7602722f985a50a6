//! The library API in the VM: one boot runs a batch of jobs, and each job's
//! status, stdout and stderr come back separately. One VM boot.
//!
//! Set `IA2RUN_SKIP_VM_TESTS=1` to skip the VM tests where QEMU, a kernel
//! or busybox-static is missing.

mod support;
use ia2run::{Job, Status, VmOptions};
use std::time::{Duration, Instant};
use support::*;

#[test]
fn batch_in_one_boot() {
    if skip_vm() {
        return;
    }
    let dir = work_dir("vm_batch");
    let pkfault = cc(&dir, "pkfault.c", "pkfault", &[]);
    let preload = cc(&dir, "preload.c", "libpreload.so", &["-shared", "-fPIC"]);
    let sh = |script: &str| Job::new(["sh", "-c", script]).cwd(&dir);

    let jobs = vec![
        // 0: a PKU fault, reported with SEGV_PKUERR and the key.
        Job::new([&pkfault]).cwd(&dir),
        // 1: stdout, stderr and the exit code stay apart.
        sh("echo to-out; echo to-err >&2; exit 3"),
        // 2: exit 0, and the environment is exactly the job's.
        Job::new(["/usr/bin/env"]).env_clear().env("IA2_TEST", "a b").env("OTHER", "x"),
        // 3: the working directory is the same path, and writable.
        sh("pwd; echo from-guest > written.txt"),
        // 4: the host root is read-only and /tmp is the guest's own.
        sh("touch /usr/ia2run-test 2>/dev/null && echo rw || echo ro; stat -f -c %T /tmp; grep -ow -m1 pku /proc/cpuinfo"),
        // 5: a preload reaches the command.
        Job::new(["true"]).preload(&preload),
        // 6: a command that does not exist: 127 as in a shell.
        Job::new(["/nonexistent/program"]),
        // 7: a per-job timeout kills it and the batch goes on.
        Job::new(["sleep", "1000"]).timeout(Duration::from_secs(2)),
        // 8: death by a signal.
        sh("echo before; kill -ABRT $$"),
        // 9: the batch went on after the timeout.
        sh("echo last"),
    ];
    let t = Instant::now();
    // Two at a time: outputs must still land with the right job.
    let opts = VmOptions {
        parallel: 2,
        ..VmOptions::default()
    };
    let outs = ia2run::run_batch_vm(&opts, &jobs).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "batch of {} jobs took {:.1} s",
        jobs.len(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(outs.len(), jobs.len());
    let show = |i: usize| {
        format!(
            "job {i}: {:?}\n{}\n{}",
            outs[i].status,
            outs[i].stdout_lossy(),
            outs[i].stderr_lossy()
        )
    };

    // The fixture prints the key it got, then its handler prints what the
    // kernel reported, then it dies of the re-raised fault.
    let o = &outs[0];
    assert_eq!(o.status, Status::Signaled(11), "{}", show(0));
    assert_eq!(o.status.code(), 139);
    let out = o.stdout_lossy();
    let pkey: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("pkey="))
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("{}", show(0)));
    assert!(pkey >= 1, "{}", show(0));
    assert!(
        out.contains(&format!("handler: sig=11 si_code=4 si_pkey={pkey}\n")),
        "{}",
        show(0)
    );
    assert!(!out.contains("not reached"), "{}", show(0));
    assert_eq!(o.stderr_lossy(), "denying access\n");

    assert_eq!(outs[1].status, Status::Exited(3), "{}", show(1));
    assert_eq!(outs[1].stdout, b"to-out\n");
    assert_eq!(outs[1].stderr, b"to-err\n");

    assert_eq!(outs[2].status, Status::Exited(0), "{}", show(2));
    let mut env: Vec<String> = outs[2].stdout_lossy().lines().map(str::to_owned).collect();
    env.sort();
    assert_eq!(env, ["IA2_TEST=a b", "OTHER=x"]);

    assert_eq!(outs[3].status, Status::Exited(0), "{}", show(3));
    assert_eq!(outs[3].stdout_lossy().trim_end(), dir.to_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("written.txt")).unwrap(),
        "from-guest\n"
    );

    assert_eq!(outs[4].status, Status::Exited(0), "{}", show(4));
    assert_eq!(outs[4].stdout_lossy(), "ro\ntmpfs\npku\n");

    assert_eq!(outs[5].status, Status::Exited(0), "{}", show(5));
    assert_eq!(outs[5].stderr_lossy(), "preload: loaded\n");

    assert_eq!(outs[6].status, Status::Exited(127), "{}", show(6));
    assert!(
        outs[6].stderr_lossy().contains("/nonexistent/program"),
        "{}",
        show(6)
    );

    assert!(outs[7].timed_out, "{}", show(7));
    assert_eq!(outs[7].status, Status::Signaled(9));

    assert_eq!(outs[8].status, Status::Signaled(6), "{}", show(8));
    assert_eq!(outs[8].stdout_lossy(), "before\n");
    assert!(!outs[8].timed_out);

    assert_eq!(outs[9].status, Status::Exited(0), "{}", show(9));
    assert_eq!(outs[9].stdout_lossy(), "last\n");
}

/// Missing pieces fail before anything boots, naming the Debian package.
#[test]
fn missing_tools_are_named() {
    let jobs = [Job::new(["true"])];
    let with = |f: &dyn Fn(&mut VmOptions)| {
        let mut o = VmOptions::default();
        f(&mut o);
        let t = Instant::now();
        let e = ia2run::run_batch_vm(&o, &jobs).expect_err("should fail");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "took {:?}",
            t.elapsed()
        );
        e.to_string()
    };
    let e = with(&|o| o.qemu = Some("/nonexistent/qemu-system-x86_64".into()));
    assert!(
        e.contains("qemu-system-x86") && e.contains("/nonexistent/qemu"),
        "{e}"
    );
    let e = with(&|o| o.kernel = Some("/nonexistent/vmlinuz".into()));
    assert!(e.contains("linux-image-amd64"), "{e}");
    // A dynamically linked program cannot be the initramfs's busybox.
    let e = with(&|o| o.busybox = Some(std::env::current_exe().unwrap()));
    assert!(e.contains("busybox-static"), "{e}");
}

#[test]
fn native_jobs() {
    let dir = work_dir("native_jobs");
    let preload = cc(&dir, "preload.c", "libpreload.so", &["-shared", "-fPIC"]);
    let o = ia2run::run_native(&Job::new(["sh", "-c", "echo o; echo e >&2; exit 4"])).unwrap();
    assert_eq!(
        (o.status, o.stdout.as_slice(), o.stderr.as_slice()),
        (Status::Exited(4), &b"o\n"[..], &b"e\n"[..])
    );
    let o =
        ia2run::run_native(&Job::new(["sh", "-c", "echo $LD_PRELOAD"]).preload(&preload)).unwrap();
    assert_eq!(o.stdout_lossy().trim_end(), preload.to_str().unwrap());
    assert_eq!(o.stderr_lossy(), "preload: loaded\n");
    let o = ia2run::run_native(&Job::new(["sh", "-c", "kill -SEGV $$"])).unwrap();
    assert_eq!(o.status, Status::Signaled(11));
    assert_eq!(o.status.to_string(), "signal 11 (SIGSEGV)");
    let t = Instant::now();
    let o = ia2run::run_native(
        &Job::new(["sh", "-c", "sleep 1000 & sleep 1000"]).timeout(Duration::from_millis(300)),
    )
    .unwrap();
    assert!(o.timed_out && t.elapsed() < Duration::from_secs(10));
}

#[test]
fn pku_detection_matches_cpuinfo() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    if !(has("pku") && has("ospke")) {
        assert!(!ia2run::host_has_pku());
    }
}

#[test]
fn shim_lookup() {
    let e = ia2run::find_shim(Some("/nonexistent/libia2shim.so".as_ref())).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/libia2shim.so"), "{e}");
    let dir = work_dir("shim_lookup");
    let lib = dir.join("libia2shim.so");
    std::fs::write(&lib, b"").unwrap();
    assert_eq!(ia2run::find_shim(Some(&lib)).unwrap(), lib);
    // Without an explicit path the candidates include the target dir.
    let c = ia2run::shim_candidates();
    assert!(
        c.iter().any(|p| p.ends_with("target/debug/libia2shim.so")),
        "{c:?}"
    );
}

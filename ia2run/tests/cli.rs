//! The `ia2run` binary: status propagation natively and in the VM, the batch
//! form, errors for missing tools and the timeout. Three VM boots.

mod support;
use std::time::Instant;
use support::*;

fn run(args: &[&str]) -> std::process::Output {
    ia2run().args(args).output().expect("running ia2run")
}

#[test]
fn native_status_propagation() {
    let o = run(&["--native", "--no-shim", "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = run(&[
        "--native",
        "--no-shim",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert_eq!(o.stdout, b"out\n");
    assert_eq!(o.stderr, b"err\n");
    let o = run(&["--native", "--no-shim", "--", "sh", "-c", "kill -SEGV $$"]);
    assert_eq!(o.status.code(), Some(139), "{}", show(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "ia2run: command killed by signal 11 (SIGSEGV)\n"
    );
    let o = run(&[
        "--native",
        "--no-shim",
        "--cmd-timeout",
        "0.5",
        "--",
        "sleep",
        "100",
    ]);
    assert_eq!(o.status.code(), Some(124), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("timed out"),
        "{}",
        show(&o)
    );
}

#[test]
fn environment_and_shim() {
    let dir = work_dir("cli_env");
    let shim = cc(&dir, "preload.c", "libia2shim.so", &["-shared", "-fPIC"]);
    let o = ia2run()
        .env("IA2_FROM_PARENT", "yes")
        .args([
            "--native",
            "--shim",
            shim.to_str().unwrap(),
            "--env",
            "EXTRA=1=2",
            "--",
        ])
        .args(["sh", "-c", "echo $IA2_FROM_PARENT $EXTRA $LD_PRELOAD"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("yes 1=2 {}\n", shim.display())
    );
    assert_eq!(String::from_utf8_lossy(&o.stderr), "preload: loaded\n");

    // --no-shim also drops an inherited LD_PRELOAD.
    let o = ia2run()
        .env("LD_PRELOAD", &shim)
        .args([
            "--native",
            "--no-shim",
            "sh",
            "-c",
            "echo \"[$LD_PRELOAD]\"",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "[]\n", "{}", show(&o));

    let o = run(&["--native", "--shim", "/nonexistent/libia2shim.so", "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("libia2shim.so not found"),
        "{}",
        show(&o)
    );
}

#[test]
fn usage() {
    let o = run(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--vm",
        "--native",
        "--auto",
        "--shim",
        "--no-shim",
        "--env",
        "--timeout",
        "--mem",
        "--cpus",
        "--batch",
        "IA2RUN_QEMU",
        "IA2RUN_KERNEL",
        "IA2_*",
    ] {
        assert!(help.contains(opt), "--help lacks {opt}");
    }
    let o = run(&["--bogus"]);
    assert_eq!(o.status.code(), Some(125));
    let o = run(&["--native"]);
    assert_eq!(o.status.code(), Some(125));
}

#[test]
fn missing_tools() {
    for (var, val, package) in [
        ("IA2RUN_QEMU", "/nonexistent/qemu", "qemu-system-x86"),
        ("IA2RUN_KERNEL", "/nonexistent/vmlinuz", "linux-image-amd64"),
        (
            "IA2RUN_BUSYBOX",
            env!("CARGO_BIN_EXE_ia2run"),
            "busybox-static",
        ),
    ] {
        let o = ia2run()
            .env(var, val)
            .args(["--vm", "--no-shim", "true"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(125), "{var}: {}", show(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(package), "{var}: {}", show(&o));
    }
}

/// Boot 1: one command in the VM, killed by a signal, output forwarded.
#[test]
fn vm_signal_status() {
    if skip_vm() {
        return;
    }
    let o = run(&[
        "--vm",
        "--no-shim",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; kill -SEGV $$",
    ]);
    assert_eq!(o.status.code(), Some(139), "{}", show(&o));
    assert_eq!(o.stdout, b"out\n");
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "err\nia2run: command killed by signal 11 (SIGSEGV)\n"
    );
}

/// Boot 2: the whole-run timeout kills a hung guest promptly.
#[test]
fn vm_timeout() {
    if skip_vm() {
        return;
    }
    let t = Instant::now();
    let o = run(&[
        "--vm",
        "--no-shim",
        "--timeout",
        "20",
        "--",
        "sleep",
        "1000",
    ]);
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(124), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("timed out after 20 s"), "{}", show(&o));
    assert!(
        err.contains("sleep 1000") || err.contains("while booting"),
        "{}",
        show(&o)
    );
    assert!(took < MINUTE * 3 / 4, "took {took:?}");
}

/// Boot 3: a batch file, in the VM unless the host has PKU (`--auto`).
#[test]
fn batch_file() {
    if skip_vm() {
        return;
    }
    let dir = work_dir("cli_batch");
    let batch = dir.join("jobs.txt");
    std::fs::write(
        &batch,
        "# comment, then an empty line\n\
         \n\
         echo 'first job'\n\
         GREETING=\"hello there\" sh -c 'echo \"$GREETING\"; echo to-stderr >&2; exit 3'\n\
         sh -c 'kill -SEGV $$'\n\
         grep -ow -m1 pku /proc/cpuinfo\n",
    )
    .unwrap();
    let o = ia2run()
        .args(["-v", "--no-shim", "--batch"])
        .arg(&batch)
        .current_dir(&dir)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    // The first failing command's status.
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    let expected = "\
=== [1/4] echo 'first job'
first job
=== [1/4] exit 0
=== [2/4] sh -c 'echo \"$GREETING\"; echo to-stderr >&2; exit 3'
hello there
=== [2/4] exit 3
=== [3/4] sh -c 'kill -SEGV $$'
=== [3/4] signal 11 (SIGSEGV)
=== [4/4] grep -ow -m1 pku /proc/cpuinfo
pku
=== [4/4] exit 0
";
    assert_eq!(out, expected, "{}", show(&o));
    assert!(
        err.contains(
            "=== [2/4] sh -c 'echo \"$GREETING\"; echo to-stderr >&2; exit 3'\nto-stderr\n"
        ),
        "{}",
        show(&o)
    );
    let where_ = if ia2run::host_has_pku() {
        "natively"
    } else {
        "in the VM"
    };
    assert!(err.contains(&format!("running {where_}")), "{}", show(&o));
}

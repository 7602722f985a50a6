//! The shared allocator ABI and the per-compartment heaps (`IA2_HEAP`):
//! natively under `IA2_PKU=sim` (semantics, stress, fork, reports), and
//! under real keys in one batch (in the PKU VM when the host has none).

mod common;
use common::*;
use ia2run::Outcome;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// `alloc` (compartment 1) linked against `liballocx.so` (compartment 2).
fn fixture() -> PathBuf {
    cc_lib("allocx", &["alloc/libx.c"], &[]);
    cc_exe("alloc", &["alloc/main.c"], &["-lallocx", "-lpthread"])
}

const MODES: [&str; 3] = ["libc", "shared", "compartment"];

fn sim(args: &[&str], heap: &str) -> Outcome {
    let exe = fixture();
    let mut argv = vec![exe.to_str().unwrap()];
    argv.extend_from_slice(args);
    native(&job(&argv, &[("IA2_PKU", "sim"), ("IA2_HEAP", heap)]))
}

/// Stress iterations per thread in the VM: the same 4 x 100k as natively
/// (about 15 s under TCG for the malloc run, 10 s for the shared_* run).
const VM_STRESS: &str = "100000";

/// Every enforcement case of this file, run in one batch (one VM boot).
fn enforced() -> &'static HashMap<&'static str, Outcome> {
    static R: OnceLock<HashMap<&'static str, Outcome>> = OnceLock::new();
    R.get_or_init(|| {
        let exe = fixture();
        let exe = exe.to_str().unwrap();
        let c = |args: &[&str], heap: &str| {
            let mut argv = vec![exe];
            argv.extend_from_slice(args);
            job(&argv, &[("IA2_HEAP", heap)])
        };
        enforced_batch(vec![
            ("own", c(&["own"], "compartment")),
            ("cross-read", c(&["cross-read"], "compartment")),
            ("cross-write", c(&["cross-write"], "compartment")),
            ("lib-cross", c(&["lib-cross"], "compartment")),
            ("cross-free", c(&["cross-free"], "compartment")),
            ("cross-read shared heap", c(&["cross-read"], "shared")),
            ("shared libc", c(&["shared"], "libc")),
            ("shared shared", c(&["shared"], "shared")),
            ("shared compartment", c(&["shared"], "compartment")),
            ("foreign-free", c(&["foreign-free"], "compartment")),
            ("early", c(&["early"], "compartment")),
            (
                "stress compartment",
                c(&["stress", VM_STRESS, "malloc"], "compartment"),
            ),
            (
                "stress shared api",
                c(&["stress", VM_STRESS, "shared"], "compartment"),
            ),
        ])
    })
}

// ---------------------------------------------------------------- under real keys

#[test]
fn compartment_heap_memory_faults_in_another_compartment() {
    let r = enforced();
    for case in ["cross-read", "cross-write", "lib-cross"] {
        let o = &r[case];
        assert_code(o, SIGSEGV_CODE);
        assert_stderr_has(o, "protection-key fault (SEGV_PKUERR)");
        assert_stdout_has(o, "allocated as compartment");
        assert!(
            !o.stdout_lossy().contains("NOT ENFORCED"),
            "{case}\n{}",
            out_text(o)
        );
    }
}

#[test]
fn compartment_heap_memory_is_usable_by_its_owner_and_freeable_by_anyone() {
    let r = enforced();
    assert_code(&r["own"], 0);
    assert_stdout_has(&r["own"], "own ok");
    assert_code(&r["cross-free"], 0);
    assert_stdout_has(&r["cross-free"], "cross free ok");
    assert_code(&r["early"], 0);
    assert_stdout_has(&r["early"], "early ok");
}

#[test]
fn shared_heap_serves_every_compartment_under_real_keys() {
    let r = enforced();
    // IA2_HEAP=shared: malloc'd memory is on pkey 0, so nothing faults.
    assert_code(&r["cross-read shared heap"], 0);
    assert_stdout_has(&r["cross-read shared heap"], "NOT ENFORCED");
    for mode in MODES {
        let o = &r[format!("shared {mode}").as_str()];
        assert_code(o, 0);
        assert_stdout_has(o, "shared ok");
    }
}

#[test]
fn foreign_shared_free_is_reported_under_real_keys() {
    let o = &enforced()["foreign-free"];
    assert_code(o, 128 + 6);
    assert_stderr_has(o, "this pointer was not allocated by the shared heap");
    assert_stderr_has(o, "free_foreign+");
}

#[test]
fn stress_under_real_keys() {
    let r = enforced();
    for case in ["stress compartment", "stress shared api"] {
        let o = &r[case];
        assert_code(o, 0);
        assert_stdout_has(o, &format!("stress ok: 4 threads x {VM_STRESS} ops"));
    }
}

// ---------------------------------------------------------------- natively, simulated keys

#[test]
fn the_fixture_builds_and_runs_without_the_shim() {
    let exe = fixture();
    for (args, expect) in [
        (&["shared"][..], "no shim"),
        (&["own"], "own ok"),
        (&["stress", "2000"], "stress ok"),
    ] {
        let mut argv = vec![exe.to_str().unwrap()];
        argv.extend_from_slice(args);
        let o = native(&job_unshimmed(&argv));
        assert_code(&o, 0);
        assert_stdout_has(&o, expect);
    }
}

#[test]
fn shared_allocator_works_in_every_mode() {
    for mode in MODES {
        let o = sim(&["shared"], mode);
        assert_code(&o, 0);
        assert_stdout_has(&o, "shared ok");
    }
}

#[test]
fn malloc_family_semantics_in_every_mode() {
    for mode in MODES {
        for (cmd, expect) in [
            ("own", "own ok"),
            ("cross-free", "cross free ok"),
            ("early", "early ok"),
            ("fork", "fork ok"),
        ] {
            let o = sim(&[cmd], mode);
            assert_code(&o, 0);
            assert_stdout_has(&o, expect);
        }
    }
}

#[test]
fn foreign_pointer_to_shared_free_is_reported() {
    for mode in MODES {
        let o = sim(&["foreign-free"], mode);
        assert_code(&o, 128 + 6);
        assert_stderr_has(&o, "shared_free(0x");
        assert_stderr_has(&o, "this pointer was not allocated by the shared heap");
        assert_stderr_has(&o, "called from free_foreign+0x");
        assert_stderr_has(&o, "aborting");
        assert!(
            !o.stdout_lossy().contains("NOT REPORTED"),
            "{}",
            out_text(&o)
        );
    }
    // A malloc'd block is foreign to the shared heap unless malloc is served by it.
    for mode in ["libc", "compartment"] {
        let o = sim(&["foreign-free-malloc"], mode);
        assert_code(&o, 128 + 6);
        assert_stderr_has(&o, "this pointer was not allocated by the shared heap");
    }
}

#[test]
fn stress_four_threads_natively() {
    for (mode, api) in [
        ("compartment", "malloc"),
        ("shared", "malloc"),
        ("libc", "shared"),
        ("compartment", "shared"),
    ] {
        let o = sim(&["stress", "100000", api], mode);
        assert_code(&o, 0);
        assert_stdout_has(&o, "stress ok: 4 threads x 100000 ops");
    }
}

#[test]
fn real_programs_run_on_the_shim_heaps() {
    for mode in ["shared", "compartment"] {
        let o = native(&job(
            &["/bin/sh", "-c", "ls / | sort -r | head -3; echo done"],
            &[("IA2_PKU", "sim"), ("IA2_HEAP", mode)],
        ));
        assert_code(&o, 0);
        assert_stdout_has(&o, "done");
    }
}

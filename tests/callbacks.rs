//! Every function runs with its own compartment's rights however it is
//! reached (issue 14): callbacks from libc and from another compartment,
//! tables of function pointers, `dlsym`'d pointers, recursion across
//! compartments through pointers, a callback that calls `pthread_exit`, a
//! callback entered from several threads, C++ virtual calls across objects
//! and an exception thrown through a gated callback. No GOT slot names any
//! of these ways in: the callee's entry gate switches.
//!
//! Each mode asserts inside the fixture (`ia2_get_compartment()` in the
//! callee and back in the caller, and writes to each side's own data) and
//! prints "MODE ok". Each has a "-bad" twin whose callee reads the other
//! compartment's data, which must still fault with the report; and a run
//! with `IA2_GATES=got` (entry gates off) that must fail.

mod common;
use common::*;
use ia2run::Outcome;
use std::collections::HashMap;
use std::sync::OnceLock;

struct Fixtures {
    /// Bound now (-z now, full RELRO), with libcb2.so.
    now: String,
    /// Lazily bound executable and library (`-z lazy`).
    lazy: String,
    cpp: String,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        cc_lib("cb2", &["callbacks/cblib.c"], &[]);
        cc_lib("cb2lazy", &["callbacks/cblib.c"], &["-Wl,-z,lazy"]);
        cc_lib("cbpp", &["callbacks/cbpp_lib.cpp"], &["-lstdc++"]);
        let s = |p: std::path::PathBuf| p.to_str().unwrap().to_string();
        Fixtures {
            now: s(cc_exe(
                "callbacks",
                &["callbacks/cbmain.c"],
                &["-lcb2", "-ldl", "-lpthread"],
            )),
            lazy: s(cc_exe(
                "callbacks_lazy",
                &["callbacks/cbmain.c"],
                &["-lcb2lazy", "-ldl", "-lpthread", "-Wl,-z,lazy"],
            )),
            cpp: s(cc_exe(
                "callbacks_cpp",
                &["callbacks/cbpp_main.cpp"],
                &["-lcbpp", "-lstdc++"],
            )),
        }
    })
}

const C_MODES: [&str; 7] = [
    "qsort",
    "register",
    "table",
    "dlsym",
    "recursion",
    "pthread_exit",
    "threads",
];
const CPP_MODES: [&str; 2] = ["vcall", "exception"];

/// Case names: "MODE", "MODE lazy", "MODE-bad", "MODE entry off".
fn enforced() -> &'static HashMap<String, Outcome> {
    static R: OnceLock<HashMap<String, Outcome>> = OnceLock::new();
    R.get_or_init(|| {
        let f = fixtures();
        let mut cases: Vec<(String, ia2run::Job)> = Vec::new();
        let mut add = |exe: &str, mode: &str| {
            cases.push((mode.to_string(), job(&[exe, mode], &[])));
            let bad = format!("{mode}-bad");
            cases.push((bad.clone(), job(&[exe, &bad], &[])));
            cases.push((
                format!("{mode} entry off"),
                job(&[exe, mode], &[("IA2_GATES", "got")]),
            ));
            // The other cross paths records inline: unhardened, and
            // counting (IA2_REPORT=gates).
            cases.push((
                format!("{mode} unhardened"),
                job(&[exe, mode], &[("IA2_HARDEN", "off")]),
            ));
            cases.push((
                format!("{mode} counting"),
                job(&[exe, mode], &[("IA2_REPORT", "gates")]),
            ));
            cases.push((
                format!("{mode}-bad unhardened"),
                job(&[exe, &bad], &[("IA2_HARDEN", "off")]),
            ));
        };
        for m in C_MODES {
            add(&f.now, m);
        }
        for m in CPP_MODES {
            add(&f.cpp, m);
        }
        for m in C_MODES {
            cases.push((format!("{m} lazy"), job(&[&f.lazy, m], &[])));
        }
        cases.push((
            "report".to_string(),
            job(&[&f.now, "register"], &[("IA2_REPORT", "plan,gates")]),
        ));
        // Fault-driven gating: libcb2's static comparator, 320 sorts
        // (over 100,000 calls).
        // (Opt-in: IA2_GATES=1 is got,entry.)
        let fault = ("IA2_GATES", "got,entry,fault");
        cases.push((
            "static".to_string(),
            job(&[&f.now, "static"], &[("IA2_REPORT", "gates"), fault]),
        ));
        cases.push((
            "static lazy".to_string(),
            job(&[&f.lazy, "static"], &[fault]),
        ));
        cases.push((
            "static-bad".to_string(),
            job(&[&f.now, "static-bad"], &[fault]),
        ));
        cases.push((
            "static fault off".to_string(),
            job(&[&f.now, "static"], &[]),
        ));
        let named: Vec<(&'static str, ia2run::Job)> = cases
            .into_iter()
            .map(|(n, j)| (&*Box::leak(n.into_boxed_str()), j))
            .collect();
        enforced_batch(named)
            .into_iter()
            .map(|(n, o)| (n.to_string(), o))
            .collect()
    })
}

fn sim(argv: &[&str], vars: &[(&str, &str)]) -> Outcome {
    let mut v = vec![("IA2_PKU", "sim")];
    v.extend_from_slice(vars);
    native(&job(argv, &v))
}

#[track_caller]
fn assert_ok(name: &str, mode: &str) {
    let o = &enforced()[name];
    assert_code(o, 0);
    assert_stdout_has(o, &format!("{mode} ok"));
    assert_stderr_lacks(o, "SEGV_PKUERR");
}

/// The callee read the other compartment's data: a fault, reported.
#[track_caller]
fn assert_faults(name: &str, data_of: u8, running_as: u8) {
    let o = &enforced()[name];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "protection-key fault (SEGV_PKUERR)");
    assert_stderr_has(o, &format!("= compartment {data_of}"));
    assert_stderr_has(o, &format!("running as  compartment {running_as} "));
}

/// Without entry gates the callee runs with its caller's rights: it faults
/// on its own data or fails its own compartment check.
#[track_caller]
fn assert_fails_without_entry_gates(name: &str) {
    let o = &enforced()[name];
    assert_ne!(code(o), 0, "{}", out_text(o));
}

/// The same with the unhardened and the counting cross paths.
fn check_variants(mode: &str, bad_data_of: u8, bad_running_as: u8) {
    assert_ok(&format!("{mode} unhardened"), mode);
    assert_ok(&format!("{mode} counting"), mode);
    assert_faults(
        &format!("{mode}-bad unhardened"),
        bad_data_of,
        bad_running_as,
    );
}

fn check_c_mode(mode: &str, bad_data_of: u8, bad_running_as: u8) {
    assert_ok(mode, mode);
    assert_ok(&format!("{mode} lazy"), mode);
    assert_faults(&format!("{mode}-bad"), bad_data_of, bad_running_as);
    check_variants(mode, bad_data_of, bad_running_as);
    if mode == "qsort" {
        // The shim's qsort wrapper (src/callbacks.rs) runs comparators in
        // their own compartment without entry gates too.
        assert_ok(&format!("{mode} entry off"), mode);
    } else {
        assert_fails_without_entry_gates(&format!("{mode} entry off"));
    }
}

#[test]
fn a_libc_callback_runs_in_the_comparators_compartment() {
    // qsort (libc, with the executable's rights) calls libcb2's comparator.
    check_c_mode("qsort", 1, 2);
}

#[test]
fn a_library_calls_back_into_the_application_through_a_registered_pointer() {
    check_c_mode("register", 2, 1);
}

#[test]
fn a_table_of_function_pointers_reaches_each_callee_in_its_compartment() {
    check_c_mode("table", 1, 2);
}

#[test]
fn a_dlsym_pointer_is_the_function_itself_and_switches_compartments() {
    check_c_mode("dlsym", 1, 2);
}

#[test]
fn recursion_through_pointers_switches_at_every_level() {
    check_c_mode("recursion", 1, 2);
    assert_stdout_has(&enforced()["recursion"], "recursion A->B->A->B depth 40: ");
}

#[test]
fn a_callback_that_calls_pthread_exit_unwinds_through_its_gates() {
    check_c_mode("pthread_exit", 2, 1);
}

#[test]
fn a_callback_entered_from_several_threads_at_once() {
    check_c_mode("threads", 1, 2);
}

#[test]
fn a_cpp_virtual_call_runs_in_the_methods_compartment() {
    assert_ok("vcall", "vcall");
    assert_faults("vcall-bad", 1, 2);
    check_variants("vcall", 1, 2);
    assert_fails_without_entry_gates("vcall entry off");
}

#[test]
fn a_cpp_exception_thrown_by_a_gated_callback_is_caught_by_its_caller() {
    assert_ok("exception", "exception");
    assert_stdout_has(&enforced()["exception"], "lib_try: 2005");
    assert_faults("exception-bad", 1, 2);
    check_variants("exception", 1, 2);
    assert_stdout_has(&enforced()["exception unhardened"], "lib_try: 2005");
    assert_fails_without_entry_gates("exception entry off");
}

#[test]
fn the_report_lists_entry_gates_and_their_calls() {
    let o = &enforced()["report"];
    assert_code(o, 0);
    let err = o.stderr_lossy();
    for f in ["main_on_event", "cb2_fire", "cb2_register"] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!(": {f} in ")) && l.ends_with(": exported entry")),
            "no entry gate for {f}\n{err}"
        );
    }
    // The callback was called once from compartment 2, through its entry.
    assert!(
        err.lines().any(|l| l.contains(": main_on_event in ")
            && l.contains("exported entry): 1 calls from outside")),
        "{err}"
    );
    // The executable's direct call to cb2_fire takes a GOT gate to the
    // relocated body (no entry check); its address is left alone.
    assert!(
        err.lines().any(|l| l.contains(": cb2_fire in ")
            && l.contains(": 1 calls from ")
            && l.ends_with("/callbacks")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("(compartment 1) -> cb2_fire in ")
                && l.contains("(compartment 2) via JUMP_SLOT at ")),
        "{err}"
    );
}

// ---------------------------------------------------------------- native, IA2_PKU=sim

#[test]
fn sim_mode_runs_every_way_in_through_entry_gates_and_fails_without_them() {
    let f = fixtures();
    for (exe, modes) in [
        (&f.now, &C_MODES[..]),
        (&f.lazy, &C_MODES[..]),
        (&f.cpp, &CPP_MODES[..]),
    ] {
        for m in modes {
            let o = sim(&[exe, m], &[]);
            assert_code(&o, 0);
            assert_stdout_has(&o, &format!("{m} ok"));
            // qsort's comparator runs in its compartment through the shim's
            // qsort wrapper, with or without entry gates.
            if *m != "qsort" {
                let off = sim(&[exe, m], &[("IA2_GATES", "got")]);
                assert_code(&off, 1);
                assert_stdout_has(&off, "FAIL ");
            }
        }
    }
}

#[test]
fn the_fixtures_pass_without_the_shim() {
    let f = fixtures();
    for (exe, modes) in [(&f.now, &C_MODES[..]), (&f.cpp, &CPP_MODES[..])] {
        for m in modes {
            let o = native(&job_unshimmed(&[exe, m]));
            assert_code(&o, 0);
            assert_stdout_has(&o, &format!("{m} ok"));
        }
    }
}

#[test]
fn a_static_callback_is_gated_on_its_first_fault_and_never_faults_again() {
    assert_ok("static", "static");
    assert_ok("static lazy", "static");
    let o = &enforced()["static"];
    let err = o.stderr_lossy();
    // One fault for the first of 100,000+ comparisons; an entry gate for
    // every other.
    assert!(
        err.lines()
            .any(|l| l.contains("fault-driven: 1 invocations gated by a fault")),
        "{err}"
    );
    assert!(
        err.lines().any(|l| l.contains(": libcb2.so+0x")
            && l.contains("(compartment 2, fault-driven): ")
            && l.contains(" calls from outside the compartment")),
        "{err}"
    );
    // Its own data first (gated), then the executable's: a violation.
    assert_faults("static-bad", 1, 2);
    // Without fault-driven gating (the default) it runs with the caller's
    // rights.
    let o = &enforced()["static fault off"];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "running as  compartment 1 ");
    assert_stderr_has(o, "libcb2.so writable data");
}

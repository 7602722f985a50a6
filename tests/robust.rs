//! Correct programs keep working under the shim (issue 18): concurrent
//! `dlopen`/`dlclose`, `fork` with shim locks held elsewhere, every way to
//! install a signal handler, cancellation inside gated calls, threads the
//! shim did not start, simultaneous faults, and `IA2_PKU=off` doing
//! nothing. main = compartment 1, librob2.so = 2. Hangs are failures: every
//! job has a short timeout.

mod common;
use common::*;
use ia2run::{Job, Outcome};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

fn fixture() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let d = fixture_dir();
        for sub in ["dupA", "dupB"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
            cc(
                &format!("{sub}/libdup.so"),
                &["robust/dup.c"],
                &["-shared", "-fPIC", "-Wl,-soname,libdup.so"],
            );
        }
        cc_lib("rob2", &["robust/lib2.c"], &["-pthread", "-ldl"]);
        cc_lib("plain", &["robust/plain.c"], &["-lrob2"]);
        cc_lib("plain2", &["robust/plain.c"], &["-lrob2"]);
        cc_lib("cctor", &["robust/cctor.c"], &["-pthread"]);
        let rpath = format!("-Wl,-rpath,{}", d.join("dupB").display());
        cc_exe(
            "robust",
            &["robust/main.c"],
            &["-lrob2", "-pthread", "-ldl", &rpath],
        )
    })
    .clone()
}

fn dir() -> String {
    fixture_dir().to_str().unwrap().to_string()
}

/// A job for case `args` with a short timeout (a hang is a failure).
fn rob(args: &[&str], vars: &[(&str, &str)], secs: u64) -> Job {
    let exe = fixture();
    let mut argv = vec![exe.to_str().unwrap()];
    argv.extend_from_slice(args);
    let d = dir();
    let mut v = vec![("ROB_DIR", d.as_str())];
    v.extend_from_slice(vars);
    job(&argv, &v).timeout(Duration::from_secs(secs))
}

fn sim(args: &[&str], secs: u64) -> Outcome {
    native(&rob(args, &[("IA2_PKU", "sim")], secs))
}

#[track_caller]
fn assert_clean(o: &Outcome) {
    assert_code(o, 0);
    assert_stderr_lacks(o, "SEGV_PKUERR");
    assert_stderr_lacks(o, "panicked");
}

// ---------------------------------------------------------------- dlopen

/// A constructor inside the real dlopen starts a thread while another thread
/// finishes its own dlopen: the shim once held its census lock while asking
/// ld.so, and the two threads deadlocked on every run.
#[test]
fn concurrent_dlopens_with_a_thread_starting_constructor_do_not_deadlock() {
    let o = sim(&["race-ctor", "2"], 30);
    assert_clean(&o);
    assert_stdout_has(&o, "race ok a b");
}

/// Two threads open and close the same library: the shim once patched an
/// object the other thread was unloading.
#[test]
fn concurrent_dlopen_and_dlclose_do_not_crash() {
    let o = sim(&["race-close", "2"], 30);
    assert_clean(&o);
    assert_stdout_has(&o, "race ok a b");
}

/// A library loaded by absolute path is found again by its SONAME, as
/// without the shim; the shim once searched the caller's RUNPATH itself and
/// loaded a second copy.
#[test]
fn dlopen_by_soname_finds_the_loaded_copy() {
    for mode in ["sim", "off"] {
        let o = native(&rob(&["dup"], &[("IA2_PKU", mode)], 30));
        assert_clean(&o);
        assert_stdout_has(&o, "dup: same copy");
    }
    let exe = fixture();
    let base = native(
        &job_unshimmed(&[exe.to_str().unwrap(), "dup"])
            .env("ROB_DIR", dir())
            .timeout(Duration::from_secs(30)),
    );
    assert_stdout_has(&base, "dup: same copy");
}

/// The loader's own debug output about a dlopen (search path, RUNPATH of
/// the caller, files tried) is the same with the shim as without it: in
/// `off` mode the shim changes nothing, and in `sim` mode the real dlopen
/// still sees the program as its caller (with the shim as the caller,
/// `libplain.so` is not found: only the program's RUNPATH names its
/// directory). The whole output is compared for `off` and for `sim` with
/// `IA2_TLS_LAYOUT=off`; under ia2run's TLS layout (`sim`'s default) every
/// start-up object is preloaded by path, so start-up searches nothing and
/// only the dlopen's lines are compared.
#[test]
fn ld_debug_libs_of_a_dlopen_is_unchanged() {
    let exe = fixture();
    let exe = exe.to_str().unwrap();
    let pick = |o: &Outcome| -> Vec<String> {
        o.stderr_lossy()
            .lines()
            .filter(|l| l.contains("libplain") || l.contains("search path"))
            .filter(|l| !l.contains("ia2shim") && !l.contains("libgcc_s"))
            .map(|l| l.split_once(':').map_or(l, |(_, r)| r).trim().to_string())
            .collect()
    };
    // The dlopen's lines; a search path by its source only (which of its
    // directories are listed depends on which ones start-up already found
    // missing).
    let from_dlopen = |v: Vec<String>| -> Vec<String> {
        let at = v
            .iter()
            .position(|l| l.starts_with("find library=libplain.so"));
        v[at.unwrap_or(v.len())..]
            .iter()
            .map(|l| match l.strip_prefix("search path=") {
                Some(r) => format!("search path from {}", r.rsplit('\t').next().unwrap_or(r)),
                None => l.clone(),
            })
            .collect()
    };
    let base = native(
        &job_unshimmed(&[exe, "idle"])
            .env("ROB_DIR", dir())
            .env("LD_DEBUG", "libs")
            .timeout(Duration::from_secs(30)),
    );
    assert_stdout_has(&base, "idle loaded");
    let want = pick(&base);
    let want_dlopen = from_dlopen(want.clone());
    assert!(
        want_dlopen.iter().any(|l| l.contains("RUNPATH from file")),
        "{}",
        out_text(&base)
    );
    let cases: [(&[(&str, &str)], bool); 3] = [
        (&[("IA2_PKU", "off")], true),
        (&[("IA2_PKU", "sim"), ("IA2_TLS_LAYOUT", "off")], true),
        (&[("IA2_PKU", "sim")], false),
    ];
    for (vars, whole) in cases {
        let mut v = vars.to_vec();
        v.push(("LD_DEBUG", "libs"));
        let o = native(&rob(&["idle"], &v, 30));
        assert_stdout_has(&o, "idle loaded");
        let got = pick(&o);
        if whole {
            assert_eq!(got, want, "{vars:?}\n{}", out_text(&o));
        } else {
            assert_eq!(from_dlopen(got), want_dlopen, "{vars:?}\n{}", out_text(&o));
        }
    }
}

/// glibc dlopens a gconv module for iconv; the next dlopen, from
/// compartment 2, must not claim it.
#[test]
fn objects_glibc_loads_itself_are_not_assigned_to_the_next_dlopen() {
    let o = sim(&["gconv"], 30);
    assert_clean(&o);
    assert_stdout_has(&o, "gconv module data in compartment 0");
}

// ---------------------------------------------------------------- fork

/// Children forked while another thread is inside the shim's dlopen work
/// start threads and dlopen: once they could inherit a held census lock and
/// hang forever.
#[test]
fn fork_children_never_inherit_a_held_shim_lock() {
    let o = sim(&["fork-race", "3"], 60);
    assert_clean(&o);
    assert_stdout_has(&o, "fork race ok forked");
}

/// `posix_spawn` file actions that open files, under the syscall filter:
/// glibc's child runs them with every signal blocked and the filter's trap
/// on its `openat` killed it (SIGSYS); the shim opens them in the parent.
/// An open action of /proc/self/mem is still refused.
#[track_caller]
fn assert_spawned(o: &Outcome) {
    assert_clean(o);
    assert_stdout_has(o, "spawn: 0, status 0\n");
    assert_stdout_has(o, "file: spawned\n");
    assert_stdout_has(o, "proc-self-mem spawn: 13 (Permission denied)");
    assert_stderr_has(o, "refused: /proc/*/mem");
}

#[test]
fn posix_spawn_file_actions_that_open_files_work_under_the_filter() {
    assert_spawned(&sim(&["spawn-open"], 30));
}

/// The same under real keys, also in strict mode (glibc's spawn runs with
/// the libc compartment's rights).
#[test]
fn posix_spawn_file_actions_under_real_keys() {
    assert_spawned(&enforced()["spawn-open"]);
    assert_spawned(&enforced()["spawn-open strict"]);
}

// ---------------------------------------------------------------- signals

/// A SIGSEGV sent with kill/raise and the default action ends the process
/// by SIGSEGV, as without the shim (it was once swallowed, and the shim's
/// handler removed); SIG_IGN ignores a sent one.
#[test]
fn a_sent_sigsegv_gets_the_programs_disposition() {
    for case in ["raise-segv", "kill-segv"] {
        let o = sim(&[case], 30);
        assert_code(&o, SIGSEGV_CODE);
        assert!(!o.stdout_lossy().contains("survived"), "{}", out_text(&o));
    }
    let o = sim(&["segv-ign"], 30);
    assert_code(&o, SIGSEGV_CODE);
    assert_stdout_has(&o, "ignored");
}

/// The program's SA_RESETHAND and sa_mask for SIGSEGV are honoured.
#[test]
fn sigsegv_resethand_and_mask_are_honoured() {
    let o = sim(&["resethand"], 30);
    assert_code(&o, SIGSEGV_CODE);
    assert_stdout_has(&o, "handler 1:");
    assert!(!o.stdout_lossy().contains("handler 2"), "{}", out_text(&o));
    let o = sim(&["segv-mask"], 30);
    assert_clean(&o);
    assert_stdout_has(&o, "handler 1: SIGUSR1 masked");
    assert_stdout_has(&o, "handler 2: SIGUSR1 masked");
    assert_stdout_has(&o, "after two raises: 2 calls");
}

/// Every way to install a handler (signal, bsd_signal, sysv_signal,
/// __sysv_signal, sigset, ssignal) gets the handler run in its own
/// compartment, SIGSEGV included (chained by the shim's handler).
#[test]
fn every_way_to_install_a_handler_runs_it_in_its_compartment() {
    let o = sim(&["sigapis"], 30);
    assert_clean(&o);
    for api in [
        "signal",
        "bsd_signal",
        "sysv_signal",
        "__sysv_signal",
        "sigset",
        "ssignal",
    ] {
        for sig in ["SIGUSR1", "SIGSEGV"] {
            assert_stdout_has(&o, &format!("{api}({sig}): handler ran as 2, 1 calls"));
        }
    }
}

/// A handler that a library constructor installed before the shim's
/// constructor ran is wrapped too: through libc's `sigaction` (the shim's
/// hook) and with the bare syscall, which only the constructor's query of
/// the kernel finds.
#[test]
fn handlers_installed_before_the_shim_are_wrapped() {
    for how in ["1", "raw"] {
        let o = native(&rob(
            &["early-handler"],
            &[("IA2_PKU", "sim"), ("ROB_EARLY_HANDLER", how)],
            30,
        ));
        assert_clean(&o);
        assert_stdout_has(&o, "early handler ran as 2, 1 calls");
    }
}

// ---------------------------------------------------------------- cancellation

/// `pthread_exit` and `pthread_cancel` inside a gated call into
/// compartment 2, under a caller's `pthread_cleanup_push`: the cleanup runs
/// as the caller's compartment 1 (glibc longjmps over the gate frame).
#[test]
fn cleanup_handlers_run_in_the_callers_compartment_after_cancellation() {
    for case in ["cancel-exit", "cancel"] {
        let o = sim(&[case], 30);
        assert_clean(&o);
        assert_stdout_has(
            &o,
            &format!("{case}: cleanup ran 1 time(s) as 1, main continues as 1"),
        );
    }
}

// ---------------------------------------------------------------- foreign threads

/// Threads started with glibc's own pthread_create (not the shim's) get a
/// gate-frame stack on their first gate; it is freed when they exit.
#[test]
fn gate_stacks_of_threads_the_shim_did_not_start_are_freed() {
    let o = sim(&["foreign-threads", "100"], 60);
    assert_clean(&o);
    let out = o.stdout_lossy();
    let grew: i64 = out
        .split("maps grew by ")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}", out_text(&o)));
    assert!(grew < 10, "the map count grew by {grew}\n{}", out_text(&o));
}

// ---------------------------------------------------------------- under real keys (one VM boot)

fn enforced() -> &'static HashMap<&'static str, Outcome> {
    static R: OnceLock<HashMap<&'static str, Outcome>> = OnceLock::new();
    R.get_or_init(|| {
        let cases = vec![
            ("fork-tls", rob(&["fork-tls"], &[], 120)),
            ("spawn-open", rob(&["spawn-open"], &[], 120)),
            (
                "spawn-open strict",
                rob(&["spawn-open"], &[("IA2_LIBC_COMPARTMENT", "1")], 120),
            ),
            ("altstack", rob(&["altstack"], &[], 120)),
            (
                "ctor-thread",
                rob(&["ctor-thread"], &[("ROB_EARLY_THREAD", "1")], 120),
            ),
            ("two-faults", rob(&["two-faults"], &[], 120)),
            ("cancel-exit", rob(&["cancel-exit"], &[], 120)),
            ("cancel", rob(&["cancel"], &[], 120)),
            ("sigapis", rob(&["sigapis"], &[], 120)),
            ("race-close", rob(&["race-close", "2"], &[], 120)),
            ("race-ctor", rob(&["race-ctor", "2"], &[], 120)),
            ("onstack", rob(&["onstack"], &[], 120)),
            ("tagged-stack", rob(&["tagged-stack"], &[], 120)),
            ("stress-0", rob(&["stress", VM_STRESS_SECS], &[], 120)),
            ("stress-1", rob(&["stress", VM_STRESS_SECS], &[], 120)),
            ("stress-2", rob(&["stress", VM_STRESS_SECS], &[], 120)),
            ("stress-3", rob(&["stress", VM_STRESS_SECS], &[], 120)),
            ("stress-4", rob(&["stress", VM_STRESS_SECS], &[], 120)),
        ];
        enforced_batch(cases)
    })
}

/// A fork child whose parent had compartment-2 threads (with tagged TLS in
/// their stacks) starts threads: glibc reuses those stacks, whose TLS
/// pages the child puts back on key 0 (they once made its first
/// pthread_create fault).
#[test]
fn a_fork_childs_threads_do_not_fault_on_other_threads_tls() {
    let o = &enforced()["fork-tls"];
    assert_clean(o);
    assert_stdout_has(o, "fork tls child status 0");
}

/// The program's alternate signal stack lies in compartment 1's .bss; a
/// fault in compartment 2 is still reported (the shim's handler runs on
/// its own key-0 stack), and the program sees its own stack.
#[test]
fn a_fault_is_reported_when_the_programs_altstack_is_tagged() {
    let o = &enforced()["altstack"];
    assert_code(o, SIGSEGV_CODE);
    assert_stdout_has(o, "altstack kept");
    assert_stderr_has(o, "protection-key fault (SEGV_PKUERR)");
    assert_stderr_has(o, "running as  compartment 2");
}

#[track_caller]
fn assert_onstack(o: &Outcome) {
    assert_clean(o);
    for l in [
        "none, SA_ONSTACK: on program altstack no, near the thread's stack yes, SS_ONSTACK no",
        "altstack, SA_ONSTACK: on program altstack yes, near the thread's stack no, SS_ONSTACK yes",
        "altstack, plain: on program altstack no, near the thread's stack yes, SS_ONSTACK no",
        "near the thread's stack no, SS_ONSTACK yes",
        "disabled: yes",
        "disabled, SA_ONSTACK: on program altstack no, near the thread's stack yes, SS_ONSTACK no",
    ] {
        assert_stdout_has(o, l);
    }
    assert_stdout_has(o, "altstack, SIGSEGV SA_ONSTACK: on program altstack");
}

/// The kernel keeps the shim's stack; the program's alternate stack is
/// still where its `SA_ONSTACK` handlers run (and `sigaltstack` reports
/// it, with `SS_ONSTACK` inside them); a handler without `SA_ONSTACK`, or
/// with no alternate stack set, runs on the thread's stack. The program's
/// SIGSEGV handler, chained from the shim's, runs on an alternate stack
/// (the shim's).
#[test]
fn program_handlers_run_on_the_stack_the_program_asked_for() {
    assert_onstack(&sim(&["onstack"], 30));
    assert_onstack(&enforced()["onstack"]);
}

/// The program runs on a stack in compartment 1's .bss (makecontext) and
/// calls compartment 2, whose first push faults: the kernel cannot write a
/// signal frame there with compartment 2's PKRU, so without the shim's own
/// key-0 alternate stack the process died without a report.
#[test]
fn a_fault_is_reported_when_the_programs_stack_is_tagged() {
    let o = &enforced()["tagged-stack"];
    assert_code(o, SIGSEGV_CODE);
    assert_stdout_has(o, "on compartment 1's stack as 1");
    assert_stderr_has(o, "protection-key fault (SEGV_PKUERR)");
    assert_stderr_has(o, "running as  compartment 2");
}

/// A thread that a library constructor started before the shim's
/// constructor ran reads compartment 2's data with the default PKRU: the
/// fault is reported (the handler is installed before tagging).
#[test]
fn a_thread_started_before_the_shim_gets_a_report() {
    let o = &enforced()["ctor-thread"];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "protection-key fault (SEGV_PKUERR)");
    assert_stderr_has(o, "running as  no compartment");
    assert_stderr_has(o, "librob2.so writable data");
}

/// Four threads fault at once: every report is complete, with the full
/// instruction (operands), not a bare mnemonic.
#[test]
fn simultaneous_faults_each_get_a_full_report() {
    let o = &enforced()["two-faults"];
    assert_code(o, SIGSEGV_CODE);
    let err = o.stderr_lossy();
    let reports = err.matches("==== protection-key fault").count();
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("  instruction "))
        .collect();
    assert!(reports >= 2, "{reports} reports\n{}", out_text(o));
    assert_eq!(lines.len(), reports, "{}", out_text(o));
    for l in lines {
        assert!(
            l.contains('['),
            "instruction without operands: {l}\n{}",
            out_text(o)
        );
    }
}

#[test]
fn cancellation_and_handlers_under_real_keys() {
    let r = enforced();
    for case in ["cancel-exit", "cancel"] {
        assert_clean(&r[case]);
        assert_stdout_has(
            &r[case],
            &format!("{case}: cleanup ran 1 time(s) as 1, main continues as 1"),
        );
    }
    assert_clean(&r["sigapis"]);
    assert_stdout_has(&r["sigapis"], "sigset(SIGSEGV): handler ran as 2, 1 calls");
}

#[test]
fn concurrent_dlopen_dlclose_under_real_keys() {
    let r = enforced();
    for case in ["race-close", "race-ctor"] {
        assert_clean(&r[case]);
        assert_stdout_has(&r[case], "race ok a b");
    }
}

// ---------------------------------------------------------------- stress

/// Issue 18: 8 threads doing dlopen/dlclose/pthread_create/fork for 10 s
/// natively in sim mode and for 30 s under real keys, 5 runs each (the VM
/// runs are jobs of the one boot above, each with its own timeout).
const SIM_STRESS_SECS: &str = "10";
const VM_STRESS_SECS: &str = "30";
const STRESS_RUNS: usize = 5;

#[track_caller]
fn assert_stress_run(o: &Outcome, what: &str) {
    assert_clean(o);
    assert!(
        o.stdout_lossy().contains("stress ok: ops done"),
        "{what}\n{}",
        out_text(o)
    );
    let line = o.stdout_lossy();
    let line = line
        .lines()
        .find(|l| l.starts_with("stress ok"))
        .unwrap_or("");
    eprintln!("{what}: {line}");
}

/// Eight threads doing dlopen/dlclose, pthread_create and fork for a
/// bounded time: no hang (each run has a timeout), crash or fault, over
/// five runs natively (sim) and five under real keys.
#[test]
fn stress_dlopen_dlclose_threads_and_fork() {
    for run in 0..STRESS_RUNS {
        let o = sim(&["stress", SIM_STRESS_SECS], 60);
        assert_stress_run(&o, &format!("sim run {run}"));
    }
    for run in 0..STRESS_RUNS {
        let o = &enforced()[format!("stress-{run}").as_str()];
        assert_stress_run(o, &format!("enforced run {run}"));
    }
}

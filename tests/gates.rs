//! Call gates: ABI preservation, nesting and recursion, isolation,
//! unwinding, destructors, dlopen, the WRPKRU scanner and dav1d. Cases that
//! need real keys run in one batch (one VM boot when the host has no PKU);
//! the same programs also run natively under `IA2_PKU=sim`.

mod common;
use common::*;
use ia2run::Outcome;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

struct Fixtures {
    gates: PathBuf,
    /// The same program, lazily bound (`-z lazy`): its `.got.plt` slots
    /// still point at its PLT when the shim patches them.
    lazy: PathBuf,
    exc: PathBuf,
    wrpkru: PathBuf,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        cc_lib("gt2", &["gates/lib2.c"], &[]);
        cc_lib("gt3", &["gates/lib3.c"], &[]);
        cc_lib("gtplug", &["gates/plug.c"], &[]);
        cc_lib("gtplug2", &["gates/plug.c"], &["-DPLUG2"]);
        cc_lib("gtexc", &["gates/exc_lib.cpp"], &["-lstdc++"]);
        cc_lib("gtwrpkru", &["gates/wrpkru.c"], &[]);
        Fixtures {
            gates: cc_exe(
                "gates",
                &["gates/main.c", "gates/cs_check.S"],
                &["-lgt2", "-lgt3", "-ldl", "-lpthread"],
            ),
            lazy: cc_exe(
                "gates_lazy",
                &["gates/main.c", "gates/cs_check.S"],
                &["-lgt2", "-lgt3", "-ldl", "-lpthread", "-Wl,-z,lazy"],
            ),
            exc: cc_exe(
                "gates_exc",
                &["gates/exc_main.cpp"],
                &["-lgtexc", "-lstdc++"],
            ),
            wrpkru: cc_exe("gates_wrpkru", &["gates/wrpkru_main.c"], &["-lgtwrpkru"]),
        }
    })
}

fn gates_exe() -> &'static str {
    fixtures().gates.to_str().unwrap()
}

fn dav1d_args() -> Vec<String> {
    [
        "dav1d",
        "-q",
        "--threads",
        "1",
        "-i",
        &clip(),
        "--muxer",
        "md5",
        "-o",
        "-",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

const COMMANDS: [&str; 6] = ["abi", "nested", "backtrace", "thread", "dlopen", "exit"];

/// Every enforcement case of this file, in one batch.
fn enforced() -> &'static HashMap<&'static str, Outcome> {
    static R: OnceLock<HashMap<&'static str, Outcome>> = OnceLock::new();
    R.get_or_init(|| {
        let f = fixtures();
        let exe = gates_exe();
        let mut cases: Vec<(&'static str, ia2run::Job)> = Vec::new();
        for c in COMMANDS {
            cases.push((c, job(&[exe, c], &[("GATES_DTOR", "1")])));
        }
        cases.push(("peek", job(&[exe, "peek"], &[])));
        cases.push((
            "lazy",
            job(
                &[f.lazy.to_str().unwrap(), "nested"],
                &[("IA2_REPORT", "plan")],
            ),
        ));
        cases.push((
            "report",
            job(&[exe, "abi"], &[("IA2_REPORT", "plan,gates")]),
        ));
        cases.push(("exceptions", job(&[f.exc.to_str().unwrap()], &[])));
        let d = dav1d_args();
        let d: Vec<&str> = d.iter().map(String::as_str).collect();
        cases.push(("dav1d", job(&d, &[("IA2_REPORT", "plan,gates")])));
        cases.push(("dav1d no gates", job(&d, &[("IA2_GATES", "0")])));
        enforced_batch(cases)
    })
}

fn sim(argv: &[&str], vars: &[(&str, &str)]) -> Outcome {
    let mut v = vec![("IA2_PKU", "sim")];
    v.extend_from_slice(vars);
    native(&job(argv, &v))
}

// ---------------------------------------------------------------- enforced (VM)

#[test]
fn abi_is_preserved_through_gates() {
    let o = &enforced()["abi"];
    assert_code(o, 0);
    assert_stdout_has(o, "abi ok");
}

#[test]
fn nested_calls_and_recursion_switch_compartments_at_every_level() {
    let o = &enforced()["nested"];
    assert_code(o, 0);
    assert_stdout_has(o, "recursion depth 100:");
    assert_stdout_has(o, "nested ok");
}

#[test]
fn lazily_bound_slots_are_resolved_and_gated() {
    let o = &enforced()["lazy"];
    assert_code(o, 0);
    assert_stdout_has(o, "nested ok");
    assert_stderr_has(o, "gates_lazy (compartment 1) -> lib2_rec in ");
    let o = sim(&[fixtures().lazy.to_str().unwrap(), "abi"], &[]);
    assert_code(&o, 0);
    assert_stdout_has(&o, "abi ok");
}

#[test]
fn a_callee_reading_the_callers_data_faults() {
    let o = &enforced()["peek"];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "protection-key fault (SEGV_PKUERR)");
    assert_stderr_has(o, "= compartment 1");
    assert_stderr_has(o, "running as  compartment 2 ");
    assert_stderr_has(o, "lib2_peek");
}

#[test]
fn backtrace_from_a_callee_shows_the_callers_frames() {
    let o = &enforced()["backtrace"];
    assert_code(o, 0);
    assert_stdout_has(o, "lib2_backtrace");
    assert_stdout_has(o, "gates_bt_caller");
    assert_stdout_has(o, "(main+");
}

#[test]
fn gated_calls_work_from_a_second_thread() {
    let o = &enforced()["thread"];
    assert_code(o, 0);
    assert_stdout_has(o, "thread sum 501500");
    assert_stdout_has(o, "thread ok");
}

#[test]
fn destructors_run_in_their_own_compartment_when_another_calls_exit() {
    let o = &enforced()["exit"];
    assert_code(o, 3);
    assert_stdout_has(o, "lib2 calls exit as compartment 1");
    assert_stdout_has(o, "main destructor ran as compartment 1");
}

#[test]
fn dlopened_objects_join_the_callers_compartment_and_are_patched() {
    let o = &enforced()["dlopen"];
    assert_code(o, 0);
    assert_stdout_has(
        o,
        "plugin of main: data in compartment 1, runs as 1, its call to lib3 runs as 3",
    );
    assert_stdout_has(o, "plugin of lib2: 221");
    assert_stdout_has(o, "dlopen ok");
}

#[test]
fn a_cpp_exception_crosses_a_gate_and_restores_the_callers_rights() {
    let o = &enforced()["exceptions"];
    assert_code(o, 0);
    assert_stdout_has(o, "caught \"from compartment 2\" as compartment 1");
    assert_stdout_has(o, "after: main runs as 1, lib as 2, caught 3");
}

#[test]
fn the_report_lists_gates_data_imports_and_call_counts() {
    let o = &enforced()["report"];
    assert_code(o, 0);
    assert_stderr_has(o, "==== gates (IA2_GATES=1) ====");
    assert_stderr_has(o, "gates (compartment 1) -> a10 in ");
    assert_stderr_has(o, "libgt2.so (compartment 2) via JUMP_SLOT");
    assert_stderr_has(o, "libgt3.so (compartment 3) -> lib2_rec in ");
    assert_stderr_has(o, "libgt2.so (compartment 2) -> main_rec in ");
    assert_stderr_has(o, "ld.so (exit) -> DT_FINI_ARRAY[");
    assert_stderr_has(o, "cross-compartment data import (not gated): ");
    assert!(
        o.stderr_lossy().lines().any(|l| l
            .contains("libgt3.so (compartment 3) imports lib2_bad at ")
            // Shared by the data_imports carveout (IA2_SHARE_DATA_IMPORTS).
            && l.contains("libgt2.so (compartment 2); page shared (key 0)")),
        "{}",
        out_text(o)
    );
    assert_stderr_has(o, "==== gate calls ====");
    assert_stderr_has(o, "a10 in ");
    assert!(
        o.stderr_lossy()
            .lines()
            .any(|l| l.contains(": a0 in ") && l.contains(": 1 calls from ")),
        "{}",
        out_text(o)
    );
}

#[test]
fn dav1d_decodes_the_same_under_gates_and_reports_its_imports() {
    let r = enforced();
    let d = dav1d_args();
    let d: Vec<&str> = d.iter().map(String::as_str).collect();
    let base = native(&job_unshimmed(&d));
    assert_code(&base, 0);
    let want = base.stdout_lossy();
    assert_eq!(want.trim().len(), 32, "{}", out_text(&base));
    let o = &r["dav1d"];
    assert_code(o, 0);
    assert_eq!(o.stdout_lossy(), want, "{}", out_text(o));
    let err = o.stderr_lossy();
    let gates: Vec<&str> = err
        .lines()
        .filter(|l| {
            l.contains("(compartment 1) -> dav1d_")
                && l.contains("libdav1d.so.6 (compartment 2) via JUMP_SLOT")
        })
        .collect();
    // The Debian dav1d 1.0.0 CLI imports eleven dav1d_* functions.
    for f in [
        "dav1d_open",
        "dav1d_close",
        "dav1d_version",
        "dav1d_default_settings",
        "dav1d_send_data",
        "dav1d_get_picture",
        "dav1d_picture_unref",
        "dav1d_data_create",
        "dav1d_data_unref",
        "dav1d_parse_sequence_header",
        "dav1d_set_cpu_flags_mask",
    ] {
        assert!(
            gates.iter().any(|l| l.contains(&format!("-> {f} in "))),
            "no gate for {f}\n{err}"
        );
    }
    assert_eq!(gates.len(), 11, "{err}");
    // libdav1d's stderr is the executable's copy (a copy relocation), kept
    // shared by the copy_relocs carveout.
    assert!(
        err.lines()
            .any(|l| l.contains("libdav1d.so.6 (compartment 2) imports stderr at ")),
        "{err}"
    );
    assert!(
        err.contains("dav1d_send_data in /") && err.contains(": 10 calls from "),
        "{err}"
    );
}

#[test]
fn without_gates_dav1d_faults_in_libdav1d_data() {
    let o = &enforced()["dav1d no gates"];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "running as  compartment 1");
    assert_stderr_has(o, "libdav1d.so.6 writable data");
}

// ---------------------------------------------------------------- native, IA2_PKU=sim

#[test]
fn sim_mode_runs_every_case_through_gates() {
    let exe = gates_exe();
    for c in COMMANDS {
        let o = sim(&[exe, c], &[("GATES_DTOR", "1")]);
        if c == "exit" {
            assert_code(&o, 3);
            assert_stdout_has(&o, "main destructor ran as compartment 1");
        } else {
            assert_code(&o, 0);
            assert_stdout_has(&o, &format!("{c} ok"));
        }
    }
    let o = sim(&[fixtures().exc.to_str().unwrap()], &[]);
    assert_code(&o, 0);
    assert_stdout_has(&o, "caught \"from compartment 2\" as compartment 1");
}

#[test]
fn sim_mode_counts_gate_calls() {
    let o = sim(&[gates_exe(), "loop", "1000"], &[("IA2_REPORT", "gates")]);
    assert_code(&o, 0);
    assert!(
        o.stderr_lossy()
            .lines()
            .any(|l| l.contains(": nop1 in ") && l.contains(": 1000 calls from ")),
        "{}",
        out_text(&o)
    );
}

#[test]
fn gates_off_patches_nothing() {
    let o = sim(
        &[gates_exe(), "loop", "10"],
        &[("IA2_GATES", "0"), ("IA2_REPORT", "plan,gates")],
    );
    assert_code(&o, 0);
    assert_stderr_has(&o, "==== gates (off: IA2_GATES=0) ====");
    assert_stderr_has(&o, "0 gates, 0 patched slots");
}

#[test]
fn json_report_has_gate_lines() {
    let o = sim(
        &[gates_exe(), "loop", "3"],
        &[("IA2_REPORT", "plan,gates"), ("IA2_REPORT_FORMAT", "json")],
    );
    assert_code(&o, 0);
    let err = o.stderr_lossy();
    assert!(
        err.lines()
            .any(|l| l.starts_with("{\"type\":\"gate\"") && l.contains("\"symbol\":\"nop1\"")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with("{\"type\":\"gate_calls\"") && l.contains("\"calls\":3")),
        "{err}"
    );
}

#[test]
fn the_wrpkru_scanner_finds_planted_sequences() {
    let exe = fixtures().wrpkru.to_str().unwrap();
    let warn = sim(&[exe], &[]);
    assert_code(&warn, 0);
    assert_stderr_has(&warn, "IA2_SCAN_WRPKRU: WRPKRU (0f 01 ef) at ");
    assert_stderr_has(&warn, "libgtwrpkru.so+0x");
    assert_stderr_has(&warn, "XRSTOR with REX prefix");
    let deny = sim(&[exe], &[("IA2_SCAN_WRPKRU", "deny")]);
    assert_code(&deny, 1);
    assert_stderr_has(&deny, "fatal: IA2_SCAN_WRPKRU=deny: WRPKRU (0f 01 ef) at ");
    // Refused before main: the program printed nothing.
    assert!(deny.stdout.is_empty(), "{}", out_text(&deny));
    let off = sim(&[exe], &[("IA2_SCAN_WRPKRU", "off")]);
    assert_code(&off, 0);
    assert_stderr_lacks(&off, "IA2_SCAN_WRPKRU");
    // The offset printed is where the bytes are.
    let line = warn
        .stderr_lossy()
        .lines()
        .find(|l| l.contains("WRPKRU (0f 01 ef) at "))
        .unwrap()
        .to_string();
    let off_hex = line
        .rsplit("+0x")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let off = usize::from_str_radix(off_hex, 16).unwrap();
    let lib = fixture_dir().join("libgtwrpkru.so");
    let nm = std::process::Command::new("nm").arg(&lib).output().unwrap();
    let nm = String::from_utf8_lossy(&nm.stdout);
    let sym = nm
        .lines()
        .find(|l| l.ends_with(" planted_wrpkru"))
        .expect("planted_wrpkru in nm");
    assert_eq!(
        usize::from_str_radix(sym.split(' ').next().unwrap(), 16).unwrap(),
        off,
        "{line}"
    );
}

#[test]
fn binding_at_start_up_gets_past_versioned_and_missing_references() {
    // A lazily bound compartment library referencing a compat-only
    // versioned symbol (__atan2_finite@GLIBC_2.15, as libraries ffmpeg
    // loads do) and a function nothing defines: the first is bound, the
    // second stays lazy, and the program runs (it died in glibc's lookup
    // before main when the binder used the library's link_map as a dlsym
    // handle).
    cc_lib("gtlazyref", &["gates/lazyref.c"], &["-Wl,-z,lazy", "-lm"]);
    let exe = cc_exe(
        "gates_lazyref",
        &["gates/lazyref_main.c"],
        &["-lgtlazyref", "-Wl,--allow-shlib-undefined"],
    );
    let o = sim(&[exe.to_str().unwrap()], &[("IA2_REPORT", "plan")]);
    assert_code(&o, 0);
    assert_stdout_has(&o, "0.785398");
    assert_stderr_has(&o, "(1 unresolvable left lazy");
}

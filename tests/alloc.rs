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

/// The allocation-site fixture: `sites` (compartment 1) using
/// `libcodec.so` (compartment 2) through its API, built three ways, because
/// the gate is identified by decoding the caller's call: bound now through
/// the PLT, lazily bound (its `.got.plt` carries the executable's key), and
/// without a PLT (`call [rip+GOT]`).
fn sites_fixtures() -> [PathBuf; 3] {
    cc_lib("codec", &["alloc/libcodec.c"], &[]);
    [
        cc_exe("sites", &["alloc/sites.c"], &["-lcodec"]),
        cc_exe(
            "sites-lazy",
            &["alloc/sites.c"],
            &["-lcodec", "-Wl,-z,lazy"],
        ),
        cc_exe("sites-noplt", &["alloc/sites.c"], &["-lcodec", "-fno-plt"]),
    ]
}

/// The sites of `sites use` as the shim records them (natively, simulated
/// keys, `IA2_REPORT=heap`): term -> (bytes, blocks).
fn recorded_sites(exe: &str, vars: &[(&str, &str)]) -> HashMap<String, (u64, u64)> {
    let mut v = vec![
        ("IA2_PKU", "sim"),
        ("IA2_HEAP", "compartment"),
        ("IA2_REPORT", "heap"),
        ("IA2_REPORT_FORMAT", "json"),
    ];
    v.extend_from_slice(vars);
    let o = native(&job(&[exe, "use"], &v));
    assert_code(&o, 0);
    o.stderr_lossy()
        .lines()
        .filter_map(|l| ia2run::learn::Json::parse(l).ok())
        .filter(|j| j.get("type").and_then(|t| t.as_str()) == Some("heap_site"))
        .map(|j| {
            let n = |k: &str| j.get(k).and_then(|v| v.as_u64()).unwrap();
            (
                j.get("site").unwrap().as_str().unwrap().to_string(),
                (n("bytes"), n("blocks")),
            )
        })
        .collect()
}

/// The one code site of libcodec (its internal allocator) inside the gate
/// `gate`: `libcodec.so+0xOFF@gate:GATE`.
fn codec_site(gate: &str) -> String {
    static SITES: OnceLock<HashMap<String, (u64, u64)>> = OnceLock::new();
    let sites = SITES.get_or_init(|| {
        let exe = sites_fixtures()[0].clone();
        recorded_sites(exe.to_str().unwrap(), &[])
    });
    let suffix = format!("@gate:{gate}");
    let found: Vec<&String> = sites.keys().filter(|k| k.ends_with(&suffix)).collect();
    assert_eq!(found.len(), 1, "{gate}: {sites:?}");
    found[0].clone()
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
        let [now, lazy, noplt] = sites_fixtures();
        let (now, lazy, noplt) = (
            now.to_str().unwrap().to_string(),
            lazy.to_str().unwrap().to_string(),
            noplt.to_str().unwrap().to_string(),
        );
        let buffers = codec_site("codec_buffer");
        let site = |exe: &str, cmd: &str, policy: &str| {
            let mut v = vec![("IA2_HEAP", "compartment"), ("IA2_REPORT", "heap")];
            if !policy.is_empty() {
                v.push(("IA2_HEAP_SHARED", policy));
            }
            job(&[exe, cmd], &v)
        };
        let audit = job(
            &[&now, "use"],
            &[
                ("IA2_HEAP", "compartment"),
                ("IA2_ON_FAULT", "audit"),
                ("IA2_REPORT_FORMAT", "json"),
            ],
        );
        enforced_batch(vec![
            ("sites use, no policy", site(&now, "use", "")),
            ("sites use, policy", site(&now, "use", &buffers)),
            ("sites use, policy, lazy", site(&lazy, "use", &buffers)),
            ("sites use, policy, no plt", site(&noplt, "use", &buffers)),
            (
                "sites use, gate policy",
                site(&now, "use", "gate:codec_buffer"),
            ),
            (
                "sites use, wrong gate",
                site(&now, "use", &codec_site("codec_work")),
            ),
            ("sites peek, policy", site(&now, "peek", &buffers)),
            ("sites peek, policy, lazy", site(&lazy, "peek", &buffers)),
            ("sites audit", audit),
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

/// Without a policy, the application's first write into a buffer that the
/// codec handed out faults, and the report names the block, the site and
/// the gate, and the policy term that would share the site.
#[test]
fn a_buffer_handed_across_faults_and_the_report_names_its_site() {
    let o = &enforced()["sites use, no policy"];
    let site = codec_site("codec_buffer");
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "running as  compartment 1");
    assert_stderr_has(
        o,
        "owner       compartment 2's heap (IA2_HEAP=compartment): block 0x",
    );
    let code = site.split('@').next().unwrap();
    assert_stderr_has(
        o,
        &format!("allocated at {code} inside gate:codec_buffer (called from main:use_codec+0x"),
    );
    assert_stderr_has(o, &format!("to share    IA2_HEAP_SHARED={site}\n"));
    assert!(!o.stdout_lossy().contains("sites ok"), "{}", out_text(o));
}

/// With the buffers' site shared, the application fills, reads, reallocs
/// and frees them; the codec's state and scratch blocks stay private. The
/// gate is found however the executable calls the library.
#[test]
fn shared_site_policy_lets_the_application_use_the_buffers() {
    for case in [
        "sites use, policy",
        "sites use, policy, lazy",
        "sites use, policy, no plt",
        "sites use, gate policy",
    ] {
        let o = &enforced()[case];
        assert_code(o, 0);
        assert_stdout_has(o, "sites ok");
        assert_stderr_lacks(o, "SEGV_PKUERR");
        // The exit report: the codec's own blocks stayed private.
        assert_stderr_has(o, "heap: compartment 2: ");
        for gate in ["codec_open", "codec_work"] {
            assert!(
                o.stderr_lossy()
                    .lines()
                    .any(|l| l.contains("private ") && l.ends_with(&format!("@gate:{gate}"))),
                "{case}: {gate}\n{}",
                out_text(o)
            );
        }
        assert!(
            o.stderr_lossy().lines().any(
                |l| l.contains("shared (IA2_HEAP_SHARED)") && l.ends_with("@gate:codec_buffer")
            ),
            "{case}\n{}",
            out_text(o)
        );
    }
}

/// The policy is per site: sharing the codec's scratch blocks instead of
/// its buffers leaves the buffers private, and the application faults.
#[test]
fn a_wrong_policy_still_faults() {
    let o = &enforced()["sites use, wrong gate"];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "inside gate:codec_buffer");
    assert_stderr_has(
        o,
        &format!("to share    IA2_HEAP_SHARED={}", codec_site("codec_buffer")),
    );
}

/// The attack: the application reads the codec's private state through the
/// pointer the API returned. Denied, and the report names the block's site
/// (the codec's allocator inside `codec_open`).
#[test]
fn reading_the_codecs_private_state_faults_and_names_the_site_and_gate() {
    for case in ["sites peek, policy", "sites peek, policy, lazy"] {
        let o = &enforced()[case];
        assert_code(o, SIGSEGV_CODE);
        assert_stdout_has(o, "sites ok");
        assert_stdout_has(o, "reading the codec's private state");
        assert!(
            !o.stdout_lossy().contains("NOT ENFORCED"),
            "{}",
            out_text(o)
        );
        assert_stderr_has(o, "protection-key fault (SEGV_PKUERR)");
        assert_stderr_has(o, "page key ");
        assert_stderr_has(o, "running as  compartment 1");
        assert_stderr_has(o, "bytes, allocated at libcodec.so+0x");
        assert_stderr_has(o, "inside gate:codec_open (called from main:main+0x");
        assert_stderr_has(
            o,
            &format!("to share    IA2_HEAP_SHARED={}", codec_site("codec_open")),
        );
    }
}

/// Audit mode learns exactly the buffers' site: the state and scratch
/// sites, which only the codec touches, stay private.
#[test]
fn audit_mode_learns_the_shared_site_only() {
    let o = &enforced()["sites audit"];
    assert_code(o, 0);
    assert_stdout_has(o, "sites ok");
    let summary = o
        .stderr_lossy()
        .lines()
        .filter_map(|l| ia2run::learn::Json::parse(l).ok())
        .find(|j| j.get("type").and_then(|t| t.as_str()) == Some("audit_summary"))
        .unwrap_or_else(|| panic!("no summary\n{}", out_text(o)));
    let heap: Vec<&str> = summary
        .get("heap_shared")
        .and_then(|a| a.as_array())
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(
        heap,
        [codec_site("codec_buffer").as_str()],
        "{}",
        out_text(o)
    );
    assert_eq!(summary.get("share").unwrap().as_array().unwrap().len(), 0);
}

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

/// Natively, simulated keys: every block records its site; the policy moves
/// exactly the named site's bytes to the shared heap, for each way of
/// naming it; an entry that names nothing is refused before `main`.
#[test]
fn sites_are_recorded_and_the_policy_selects_them() {
    let exe = sites_fixtures()[0].clone();
    let exe = exe.to_str().unwrap();
    let all = recorded_sites(exe, &[]);
    assert_eq!(all.len(), 3, "{all:?}");
    let buffers = codec_site("codec_buffer");
    // 50 buffers, 17 of them moved by realloc (a realloc counts its new block).
    assert_eq!(all[&buffers].1, 67, "{all:?}");
    assert_eq!(all[&codec_site("codec_work")].1, 50, "{all:?}");
    assert_eq!(all[&codec_site("codec_open")].1, 1, "{all:?}");
    let code = buffers.split('@').next().unwrap();
    for policy in [
        buffers.as_str(),
        "gate:codec_buffer",
        "gate:libcodec.so:codec_buffer",
    ] {
        let o = native(&job(
            &[exe, "use"],
            &[
                ("IA2_PKU", "sim"),
                ("IA2_HEAP", "compartment"),
                ("IA2_REPORT", "heap"),
                ("IA2_HEAP_SHARED", policy),
            ],
        ));
        assert_code(&o, 0);
        let err = o.stderr_lossy();
        assert_eq!(
            err.matches("shared (IA2_HEAP_SHARED)").count(),
            1,
            "{policy}\n{err}"
        );
        assert_eq!(err.matches(":   private ").count(), 2, "{policy}\n{err}");
        assert_stderr_has(&o, "1 shared site");
    }
    // The code site alone shares every allocation of libcodec.
    let o = native(&job(
        &[exe, "use"],
        &[
            ("IA2_PKU", "sim"),
            ("IA2_HEAP", "compartment"),
            ("IA2_REPORT", "heap"),
            ("IA2_HEAP_SHARED", code),
        ],
    ));
    assert_stderr_has(&o, "0.0% of its heap bytes stayed private");
    for bad in [
        "libcodec.so:no_such_symbol+0x10",
        "gate:no_such_gate",
        "libnothere.so+0x10",
    ] {
        let o = native(&job(
            &[exe, "use"],
            &[
                ("IA2_PKU", "sim"),
                ("IA2_HEAP", "compartment"),
                ("IA2_HEAP_SHARED", bad),
            ],
        ));
        assert_code(&o, 1);
        assert_stderr_has(&o, "IA2_HEAP_SHARED=");
        assert!(!o.stdout_lossy().contains("sites ok"), "{bad}");
    }
    let o = native(&job(
        &[exe, "use"],
        &[("IA2_PKU", "sim"), ("IA2_HEAP_SHARED", "libcodec.so")],
    ));
    assert_code(&o, 1);
    assert_stderr_has(&o, "IA2_HEAP_SHARED=\"libcodec.so\": invalid entry");
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

/// `ia2run --learn` with `IA2_HEAP=compartment` (two VM boots without PKU
/// on the host): the audit run learns the buffers' site and nothing else,
/// the confirming run is clean and reports what stayed private.
#[test]
fn ia2run_learns_the_shared_site_and_confirms() {
    let ia2run = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("release/ia2run");
    assert!(ia2run.exists(), "build ia2run first");
    let exe = sites_fixtures()[1].clone(); // lazily bound
    let o = std::process::Command::new(ia2run)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .current_dir(root())
        .arg("--shim")
        .arg(shim())
        .args([
            "--timeout",
            "300",
            "--learn",
            "--env",
            "IA2_HEAP=compartment",
            "--",
        ])
        .arg(&exe)
        .arg("use")
        .output()
        .expect("running ia2run");
    let err = String::from_utf8_lossy(&o.stderr);
    let learned = err
        .lines()
        .find_map(|l| l.strip_prefix("ia2run: learned: "))
        .unwrap_or_else(|| panic!("no learned line\n{err}"));
    assert_eq!(
        learned,
        format!("IA2_HEAP_SHARED='{}'", codec_site("codec_buffer")),
        "{err}"
    );
    assert!(
        err.contains("ia2run: learn: the confirming run was clean"),
        "{err}"
    );
    assert!(!err.contains("SEGV_PKUERR"), "{err}");
    assert_eq!(o.status.code(), Some(0), "{err}");
    // IA2_REPORT=heap in the confirming run: the codec's state and scratch
    // blocks stayed private, its buffers were shared.
    let line = err
        .lines()
        .find(|l| l.contains("heap: compartment 2: "))
        .unwrap_or_else(|| panic!("no heap report\n{err}"));
    assert!(line.contains("1 shared site"), "{line}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .matches("sites ok")
            .count(),
        2,
        "both runs finished"
    );
}

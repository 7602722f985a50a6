//! The real Debian dav1d under the shim, with real keys (in the PKU VM when
//! the host has none): dav1d = compartment 1, libdav1d = 2. Every decode's
//! md5 must equal the decode without the shim. In strict mode, the
//! carveouts found on dav1d fault when turned off.

mod common;
use common::*;
use ia2run::Outcome;
use std::collections::HashMap;
use std::sync::OnceLock;

fn decode(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["dav1d", "-q", "-i", &clip(), "--muxer", "md5", "-o", "-"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn dav1d_job(extra: &[&str], vars: &[(&str, &str)]) -> ia2run::Job {
    let argv = decode(extra);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    job(&argv, vars)
}

const ONE: &[&str] = &["--threads", "1"];
const FOUR: &[&str] = &["--threads", "4", "--framedelay", "4"];
const STRICT: (&str, &str) = ("IA2_LIBC_COMPARTMENT", "1");

/// The carveouts that exist only for the hot list's ungated calls into
/// libc. The others stay even with every libc call gated, because the
/// shim's own code, which compartments call ungated (malloc, the thread
/// trampoline), calls libc with their rights: memcpy/memset (libc_tuning),
/// `__tls_get_addr` for Rust's global-dynamic thread-locals (tls_generation,
/// dtv) and `pthread_getspecific` (`__pthread_keys`, on the mutex_elision
/// page).
const LIBC_CARVEOUTS_OFF: &[(&str, &str)] = &[
    ("IA2_SHARE_PTHREAD_ONCE", "0"),
    ("IA2_SHARE_LIBC_SINGLE_THREADED", "0"),
];

fn expected_md5() -> String {
    let argv = decode(ONE);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let o = native(&job_unshimmed(&argv));
    assert_code(&o, 0);
    o.stdout_lossy().trim().to_string()
}

fn enforced() -> &'static HashMap<&'static str, Outcome> {
    static R: OnceLock<HashMap<&'static str, Outcome>> = OnceLock::new();
    R.get_or_init(|| {
        enforced_batch(vec![
            ("default 1", dav1d_job(ONE, &[("IA2_REPORT", "plan")])),
            ("default 4", dav1d_job(FOUR, &[])),
            ("strict 1", dav1d_job(ONE, &[STRICT])),
            ("strict 4", dav1d_job(FOUR, &[STRICT])),
            (
                "strict no pthread_once",
                dav1d_job(ONE, &[STRICT, ("IA2_SHARE_PTHREAD_ONCE", "0")]),
            ),
            (
                "strict no mutex_elision",
                dav1d_job(ONE, &[STRICT, ("IA2_SHARE_MUTEX_ELISION", "0")]),
            ),
            (
                "strict all gates, two carveouts off, 4",
                dav1d_job(
                    FOUR,
                    &[STRICT, ("IA2_LIBC_GATES", "all")]
                        .iter()
                        .copied()
                        .chain(LIBC_CARVEOUTS_OFF.iter().copied())
                        .collect::<Vec<_>>(),
                ),
            ),
            (
                "compartment heap",
                dav1d_job(ONE, &[("IA2_HEAP", "compartment")]),
            ),
        ])
    })
}

#[test]
fn default_mode_decodes_identically_with_one_and_four_threads() {
    let want = expected_md5();
    assert_eq!(want.len(), 32, "{want}");
    for case in ["default 1", "default 4"] {
        let o = &enforced()[case];
        assert_code(o, 0);
        assert_eq!(o.stdout_lossy().trim(), want, "{case}\n{}", out_text(o));
    }
    let o = &enforced()["default 1"];
    assert_stderr_has(o, "/usr/bin/dav1d base");
    assert_stderr_has(o, "Main: compartment 1");
    assert_stderr_has(o, "libdav1d.so.6 base");
    assert_stderr_has(o, "Application: compartment 2");
    let gates = o
        .stderr_lossy()
        .lines()
        .filter(|l| l.contains("-> dav1d_") && l.contains("(compartment 2) via JUMP_SLOT"))
        .count();
    assert_eq!(
        gates,
        11,
        "dav1d 1.0.0 imports eleven dav1d_* functions\n{}",
        out_text(o)
    );
}

#[test]
fn strict_mode_decodes_identically_with_one_and_four_threads() {
    let want = expected_md5();
    for case in ["strict 1", "strict 4"] {
        let o = &enforced()[case];
        assert_code(o, 0);
        assert_eq!(o.stdout_lossy().trim(), want, "{case}\n{}", out_text(o));
        assert_stderr_lacks(o, "SEGV_PKUERR");
    }
}

/// With every call into libc gated (`IA2_LIBC_GATES=all`), the carveouts
/// that exist for the hot list's ungated libc calls are unnecessary: dav1d
/// decodes with those two off (at about 550 gated libc calls per frame).
#[test]
fn strict_dav1d_with_every_libc_call_gated_needs_neither_pthread_once_nor_libc_single_threaded() {
    let want = expected_md5();
    let o = &enforced()["strict all gates, two carveouts off, 4"];
    assert_code(o, 0);
    assert_eq!(o.stdout_lossy().trim(), want, "{}", out_text(o));
    assert_stderr_lacks(o, "SEGV_PKUERR");
}

/// Found on dav1d: `dav1d_open` initialises through `pthread_once`, whose
/// slow path reads libc's hidden `__fork_generation`.
#[test]
fn strict_dav1d_without_pthread_once_faults_in_pthread_once() {
    let o = &enforced()["strict no pthread_once"];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "running as  compartment 2");
    assert_stderr_has(o, "this is the pthread_once page");
    assert_stderr_has(o, "to share    IA2_SHARE_PTHREAD_ONCE=1");
}

/// Found on dav1d: libdav1d's mutexes make `pthread_mutex_lock` read libc's
/// hidden lock-elision tunable `__pthread_force_elision`.
#[test]
fn strict_dav1d_without_mutex_elision_faults_in_pthread_mutex_lock() {
    let o = &enforced()["strict no mutex_elision"];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "instruction pthread_mutex_lock+");
    assert_stderr_has(o, "this is the mutex_elision page");
    assert_stderr_has(o, "to share    IA2_SHARE_MUTEX_ELISION=1");
}

/// Per-compartment heaps on dav1d without a policy: the CLI (compartment 1)
/// copies the file into a buffer that `dav1d_data_create` allocated in
/// libdav1d (2), so the CLI faults on compartment 2's heap (IA2's port
/// allocates such buffers with `shared_malloc` in the source). The report
/// names the block, its allocation site inside the gate `dav1d_data_create`,
/// and the `IA2_HEAP_SHARED` term that shares that site.
#[test]
fn dav1d_with_compartment_heaps_faults_on_a_buffer_handed_across() {
    let o = &enforced()["compartment heap"];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "running as  compartment 1");
    assert_stderr_has(
        o,
        "owner       compartment 2's heap (IA2_HEAP=compartment): block 0x",
    );
    assert_stderr_has(o, "allocated at libdav1d.so.6+0x");
    assert_stderr_has(o, "inside gate:dav1d_data_create (called from main+0x");
    assert_stderr_has(o, "to share    IA2_HEAP_SHARED=libdav1d.so.6+0x");
    assert_stderr_has(o, "@gate:dav1d_data_create\n");
}

// ---------------------------------------------------------------- compartment heaps with learned sites

const HEAP: (&str, &str) = ("IA2_HEAP", "compartment");

/// The four decodes: default and strict mode, one and four threads.
const CONFIGS: [(&str, bool, &[&str]); 4] = [
    ("default 1", false, ONE),
    ("default 4", false, FOUR),
    ("strict 1", true, ONE),
    ("strict 4", true, FOUR),
];

fn heap_job(threads: &[&str], strict: bool, vars: &[(&str, &str)]) -> ia2run::Job {
    let mut v = vec![HEAP];
    if strict {
        v.push(STRICT);
    }
    v.extend_from_slice(vars);
    dav1d_job(threads, &v)
}

/// Audit mode on each decode (one VM boot): the `IA2_HEAP_SHARED` sites
/// that each summary learned, in the order first seen, without repeats.
fn learned_sites() -> &'static Vec<String> {
    static R: OnceLock<Vec<String>> = OnceLock::new();
    R.get_or_init(|| {
        let audit = [("IA2_ON_FAULT", "audit"), ("IA2_REPORT_FORMAT", "json")];
        let cases = CONFIGS
            .iter()
            .map(|&(name, strict, threads)| (name, heap_job(threads, strict, &audit)))
            .collect();
        let want = expected_md5();
        let mut sites: Vec<String> = Vec::new();
        let runs = enforced_batch(cases);
        for (name, ..) in CONFIGS {
            let o = &runs[name];
            assert_code(o, 0);
            assert_eq!(
                o.stdout_lossy().trim(),
                want,
                "audit {name}\n{}",
                out_text(o)
            );
            let p = ia2run::learn::Policy::from_report(&o.stderr_lossy()).unwrap();
            assert_eq!(p.summaries, 1, "audit {name}\n{}", out_text(o));
            assert!(
                p.toggles.is_empty() && p.share.is_empty(),
                "audit {name}: {p}"
            );
            assert!(!p.heap_shared.is_empty(), "audit {name}\n{}", out_text(o));
            eprintln!("dav1d {name}, audit: learned {p}");
            for s in p.heap_shared {
                if !sites.contains(&s) {
                    sites.push(s);
                }
            }
        }
        sites
    })
}

/// Each decode with the learned policy, and with the policy broken.
fn heap_runs() -> &'static HashMap<String, Outcome> {
    static R: OnceLock<HashMap<String, Outcome>> = OnceLock::new();
    R.get_or_init(|| {
        let sites = learned_sites();
        let policy = sites.join(",");
        let data_only: Vec<&String> = sites
            .iter()
            .filter(|s| s.ends_with("@gate:dav1d_data_create"))
            .collect();
        assert_eq!(data_only.len(), 1, "{sites:?}");
        let mut cases: Vec<(String, ia2run::Job)> = CONFIGS
            .iter()
            .map(|&(name, strict, threads)| {
                (
                    format!("{name} policy"),
                    heap_job(
                        threads,
                        strict,
                        &[("IA2_HEAP_SHARED", &policy), ("IA2_REPORT", "heap")],
                    ),
                )
            })
            .collect();
        // Broken: the data buffers shared, every other learned site dropped.
        cases.push((
            "default 1 data only".into(),
            heap_job(ONE, false, &[("IA2_HEAP_SHARED", data_only[0])]),
        ));
        cases.push((
            "strict 4 data only".into(),
            heap_job(FOUR, true, &[("IA2_HEAP_SHARED", data_only[0])]),
        ));
        // Removed: no policy at all, strict mode.
        cases.push(("strict 4 no policy".into(), heap_job(FOUR, true, &[])));
        let names: Vec<String> = cases.iter().map(|(n, _)| n.clone()).collect();
        let leaked: Vec<(&'static str, ia2run::Job)> = cases
            .into_iter()
            .map(|(n, j)| (&*Box::leak(n.into_boxed_str()), j))
            .collect();
        let out = enforced_batch(leaked);
        names
            .into_iter()
            .map(|n| {
                let o = out[n.as_str()].clone();
                (n, o)
            })
            .collect()
    })
}

/// The case: dav1d with per-compartment heaps and the sites audit
/// mode learned, in default and strict mode, with one and four threads,
/// decodes to the md5 of the decode without the shim. The exit report
/// gives the share of libdav1d's heap bytes that stayed private.
#[test]
fn dav1d_with_compartment_heaps_and_learned_sites_decodes_identically() {
    let want = expected_md5();
    let runs = heap_runs();
    for (name, ..) in CONFIGS {
        let o = &runs[&format!("{name} policy")];
        assert_code(o, 0);
        assert_eq!(o.stdout_lossy().trim(), want, "{name}\n{}", out_text(o));
        assert_stderr_lacks(o, "SEGV_PKUERR");
        let line = o
            .stderr_lossy()
            .lines()
            .find(|l| l.contains("heap: compartment 2: "))
            .unwrap_or_else(|| panic!("{name}: no heap report\n{}", out_text(o)))
            .to_string();
        // Most of libdav1d's state (the decoder context from dav1d_open, its
        // tile and frame state) stays private.
        assert!(
            line.contains("% of its heap bytes stayed private"),
            "{line}"
        );
        let private: f64 = line
            .split("compartment 2: ")
            .nth(1)
            .and_then(|r| r.split('%').next())
            .and_then(|p| p.parse().ok())
            .unwrap();
        assert!(private > 25.0, "{name}: {line}");
        eprintln!("dav1d {name} with learned sites: {line}");
        assert!(
            o.stderr_lossy()
                .lines()
                .any(|l| l.contains("private ") && l.ends_with("@gate:dav1d_open")),
            "{name}: the decoder context is private\n{}",
            out_text(o)
        );
    }
}

/// The policy is needed and each learned site matters: with only the data
/// buffers' site shared, or with none, the CLI faults on libdav1d's heap.
#[test]
fn dav1d_with_compartment_heaps_faults_without_the_learned_sites() {
    let runs = heap_runs();
    for name in [
        "default 1 data only",
        "strict 4 data only",
        "strict 4 no policy",
    ] {
        let o = &runs[name];
        assert_code(o, SIGSEGV_CODE);
        assert_stderr_has(
            o,
            "owner       compartment 2's heap (IA2_HEAP=compartment): block 0x",
        );
        assert_stderr_has(o, "to share    IA2_HEAP_SHARED=libdav1d.so.6+0x");
    }
}

//! Per-compartment static TLS for unmodified programs (the TLS layout: pad
//! objects that `ia2run` preloads, README "TLS layout"). Three compartments,
//! the executable (1), libtlsa (2) and libtlsb (3), each with one 4-byte
//! `__thread` secret, built with `-z now`, lazily, with
//! `-mtls-dialect=gnu2`, and as C++ `thread_local` objects with constructors. Every cross-compartment TLS read or write, made by
//! the other compartment's code reached through a gate, must fault in the
//! main thread and in threads created before and after a `dlopen`.

mod common;
use common::*;
use ia2run::Outcome;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::OnceLock;

/// Build variants: (name, extra flags for every object, bind now?, source
/// suffix). `cxx` compiles the same sources as C++, where each secret is a
/// `thread_local` object with a constructor (run on first use in a thread)
/// and a destructor (run by libc at thread exit).
const VARIANTS: [(&str, &[&str], bool, &str); 4] = [
    ("now", &[], true, "c"),
    ("lazy", &[], false, "c"),
    ("gnu2", &["-mtls-dialect=gnu2"], true, "c"),
    ("cxx", &["-lstdc++"], true, "cpp"),
];

/// The fixture of one variant: `tls-V` linked against `libtlsa_V.so` and
/// `libtlsb_V.so`; it dlopens `libtlsd.so`.
fn fixture(variant: &str) -> PathBuf {
    let (_, extra, now, ext) = VARIANTS.iter().find(|v| v.0 == variant).unwrap();
    let bind: &[&str] = if *now {
        &["-Wl,-z,now,-z,relro"]
    } else {
        &["-Wl,-z,lazy"]
    };
    cc_lib("tlsd", &["tls/libd.c"], &[]);
    for l in ["a", "b"] {
        let mut f = vec!["-shared", "-fPIC"];
        f.extend_from_slice(bind);
        f.extend_from_slice(extra);
        cc(
            &format!("libtls{l}_{variant}.so"),
            &[&format!("tls/lib{l}.{ext}")],
            &f,
        );
    }
    let (la, lb) = (format!("-ltlsa_{variant}"), format!("-ltlsb_{variant}"));
    let mut f = vec!["-rdynamic", la.as_str(), lb.as_str(), "-lpthread"];
    f.extend_from_slice(bind);
    f.extend_from_slice(extra);
    cc(&format!("tls-{variant}"), &[&format!("tls/main.{ext}")], &f)
}

const OWNERS: [(&str, u8); 3] = [("main", 1), ("a", 2), ("b", 3)];
const THREADS: [&str; 3] = ["main", "before", "after"];

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// `IA2_TLS_LAYOUT` for the cases that expect the layout:
/// `IA2_TEST_TLS_LAYOUT=off cargo test --test tls` shows them fail.
fn layout() -> &'static str {
    leak(std::env::var("IA2_TEST_TLS_LAYOUT").unwrap_or_else(|_| "auto".into()))
}

/// Every enforcement case, in one batch (one VM boot).
fn enforced() -> &'static HashMap<&'static str, Outcome> {
    static R: OnceLock<HashMap<&'static str, Outcome>> = OnceLock::new();
    R.get_or_init(|| {
        let mut cases = Vec::new();
        for (v, _, _, _) in VARIANTS {
            let exe = fixture(v);
            let exe = exe.to_str().unwrap();
            cases.push((
                leak(format!("{v} own")),
                job(
                    &[exe, "own"],
                    &[("IA2_REPORT", "plan"), ("IA2_TLS_LAYOUT", layout())],
                ),
            ));
            for (owner, _) in OWNERS {
                for (actor, _) in OWNERS.iter().filter(|(a, _)| *a != owner) {
                    for rw in ["r", "w"] {
                        for t in THREADS {
                            cases.push((
                                leak(format!("{v} {owner} {actor} {rw} {t}")),
                                job(&[exe, owner, actor, rw, t], &[("IA2_TLS_LAYOUT", layout())]),
                            ));
                        }
                    }
                }
            }
        }
        // The old behaviour, for comparison: without the layout the small
        // blocks share pages and cross-compartment accesses go through.
        let exe = fixture("now");
        let exe = exe.to_str().unwrap();
        let off = [("IA2_TLS_LAYOUT", "off")];
        cases.push((
            "off own",
            job(
                &[exe, "own"],
                &[("IA2_TLS_LAYOUT", "off"), ("IA2_REPORT", "plan")],
            ),
        ));
        for (owner, _) in OWNERS {
            for (actor, _) in OWNERS.iter().filter(|(a, _)| *a != owner) {
                cases.push((
                    leak(format!("off {owner} {actor} r main")),
                    job(&[exe, owner, actor, "r", "main"], &off),
                ));
            }
        }
        enforced_batch(cases)
    })
}

fn object_name(owner: &str, variant: &str) -> String {
    match owner {
        "main" => format!("tls-{variant}"),
        l => format!("libtls{l}_{variant}.so"),
    }
}

#[test]
fn each_compartment_reads_and_writes_its_own_tls_in_every_thread() {
    for (v, _, _, _) in VARIANTS {
        let o = &enforced()[format!("{v} own").as_str()];
        assert_code(o, 0);
        for t in ["main", "before", "after", "main again"] {
            assert_stdout_has(o, &format!("{t}: own ok"));
        }
        // Each module's TLS page carries its compartment's key, in the
        // main thread and in both threads.
        for (owner, _) in OWNERS {
            let name = object_name(owner, v);
            let lines = o
                .stderr_lossy()
                .lines()
                .filter(|l| l.contains("TLS of ") && l.contains(&format!("/{name} (module")))
                .count();
            assert!(
                lines >= 3,
                "{v}: {name}: {lines} TLS plan lines\n{}",
                out_text(o)
            );
        }
        // 4 bytes per secret in C, 8 in C++ (the object and its guard).
        let want = if v == "cxx" { 24 } else { 12 };
        assert_stderr_has(
            o,
            &format!("TLS of thread 0: {want} bytes of compartment modules private"),
        );
        assert_stderr_has(o, "; 0 bytes of compartment modules shared");
        assert_stderr_has(o, "TLS layout on");
        // The shim put the original LD_PRELOAD back for programs this one runs.
        assert_stdout_has(o, &format!("LD_PRELOAD={}\n", shim().display()));
    }
}

#[test]
fn every_cross_compartment_tls_access_faults_naming_the_module_tls() {
    let r = enforced();
    let mut failures = Vec::new();
    for (v, _, _, _) in VARIANTS {
        for (owner, own) in OWNERS {
            for (actor, as_c) in OWNERS.iter().filter(|(a, _)| *a != owner) {
                for rw in ["r", "w"] {
                    for t in THREADS {
                        let name = format!("{v} {owner} {actor} {rw} {t}");
                        let o = &r[name.as_str()];
                        let err = o.stderr_lossy();
                        let ok = code(o) == SIGSEGV_CODE
                            && err.contains("protection-key fault (SEGV_PKUERR)")
                            && err.contains(&format!("= compartment {own}"))
                            && err.contains(&format!("running as  compartment {as_c} "))
                            && err.contains("owner       TLS block of module ")
                            && err.contains(&format!("/{}) in thread", object_name(owner, v)))
                            && o.stdout_lossy().contains(&format!("{t}: {actor} "))
                            && !o.stdout_lossy().contains("NOT STOPPED");
                        if !ok {
                            failures.push(format!("{name}\n{}", out_text(o)));
                        }
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases not stopped as expected; first:\n{}",
        failures.len(),
        VARIANTS.len() * 36,
        failures.first().map(String::as_str).unwrap_or("")
    );
}

/// Without the layout (`IA2_TLS_LAYOUT=off`) the old behaviour: the small
/// blocks share pages, which stay on key 0, and nothing is stopped.
#[test]
fn without_the_layout_small_tls_blocks_stay_shared() {
    let r = enforced();
    let o = &r["off own"];
    assert_code(o, 0);
    assert_stderr_has(o, "stays shared");
    assert_stderr_has(o, "TLS layout off (IA2_TLS_LAYOUT=off)");
    assert_stderr_lacks(
        o,
        "TLS of thread 0: 12 bytes of compartment modules private",
    );
    for (owner, _) in OWNERS {
        for (actor, _) in OWNERS.iter().filter(|(a, _)| *a != owner) {
            let o = &r[format!("off {owner} {actor} r main").as_str()];
            assert_code(o, 0);
            assert_stdout_has(o, "NOT STOPPED");
        }
    }
}

/// `(from, to, symbol)` of every `LD_DEBUG=bindings` line.
fn bindings(o: &Outcome) -> BTreeSet<(String, String, String)> {
    o.stderr_lossy()
        .lines()
        .filter_map(|l| {
            let rest = l.split("binding file ").nth(1)?;
            let (from, rest) = rest.split_once(" [")?;
            let to = rest.split(" to ").nth(1)?.split(" [").next()?;
            let sym = rest.split('`').nth(1)?.split('\'').next()?;
            Some((from.to_string(), to.to_string(), sym.to_string()))
        })
        .collect()
}

/// Preloading the link map in order with pads between keeps every symbol
/// binding: the same (object, definition, symbol) triples as without the
/// layout, and, apart from what the shim interposes, as without the shim.
#[test]
fn the_layout_leaves_every_binding_unchanged() {
    for (v, _, _, _) in VARIANTS {
        let exe = fixture(v);
        let exe = exe.to_str().unwrap();
        let dbg = [
            ("IA2_PKU", "sim"),
            ("LD_DEBUG", "bindings"),
            ("IA2_REPORT", "plan"),
        ];
        let on = native(&job(&[exe, "own"], &dbg));
        let off = native(&job(
            &[exe, "own"],
            &[dbg[0], dbg[1], dbg[2], ("IA2_TLS_LAYOUT", "off")],
        ));
        let bare = native(&job_unshimmed(&[exe, "own"]).env("LD_DEBUG", "bindings"));
        for o in [&on, &off, &bare] {
            assert_code(o, 0);
        }
        // The arranged run really had the layout.
        assert_stderr_has(&on, "TLS layout on");
        assert_stderr_has(&off, "TLS layout off");
        let (b_on, b_off, b_bare) = (bindings(&on), bindings(&off), bindings(&bare));
        let diff: Vec<_> = b_on.symmetric_difference(&b_off).collect();
        assert!(
            b_on.len() > 20 && diff.is_empty(),
            "{v}: bindings differ with and without the layout: {diff:?}"
        );
        // Against the unshimmed run: every binding made from the program's
        // own objects, except to what the shim interposes.
        let shim_syms: BTreeSet<&str> = b_on
            .iter()
            .filter(|(_, t, _)| t.contains("libia2shim"))
            .map(|(_, _, s)| s.as_str())
            .collect();
        let own = |b: &BTreeSet<(String, String, String)>| -> BTreeSet<(String, String, String)> {
            b.iter()
                .filter(|(f, _, s)| f.contains("/ia2-fixtures/") && !shim_syms.contains(s.as_str()))
                .cloned()
                .collect()
        };
        // Lazy slots that the shim's gates take over are never bound by the
        // loader, so compare the definition chosen wherever both runs bound
        // the same (object, symbol).
        let to = |b: &BTreeSet<(String, String, String)>| -> HashMap<(String, String), String> {
            own(b).into_iter().map(|(f, t, s)| ((f, s), t)).collect()
        };
        let (on_to, bare_to) = (to(&b_on), to(&b_bare));
        let both: Vec<_> = on_to.keys().filter(|k| bare_to.contains_key(*k)).collect();
        let differ: Vec<_> = both.iter().filter(|k| on_to[**k] != bare_to[**k]).collect();
        assert!(
            both.len() > 15 && differ.is_empty(),
            "{v}: {} bindings in both runs, differing: {differ:?}",
            both.len()
        );
    }
}

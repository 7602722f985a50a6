//! Strict mode on programs that use libc the ordinary way, under real keys:
//! a library (compartment 2) calling printf, stdio, getenv, localtime,
//! strerror, getpwnam, iconv, setlocale, qsort, dladdr, dl_iterate_phdr,
//! backtrace and dlsym(RTLD_NEXT); a C++ library (3) throwing inside itself
//! and across a gate; exit() from main and from a library; atexit handlers,
//! destructors and C++ static destructors of three compartments, each
//! printing the compartment it ran as. Every fixture is built twice: lazily
//! bound (gcc's default) and with `-z now`. With the libc compartment shared
//! with main (N = 1, IA2's layout) and separate (N = 4).

mod common;
use common::*;
use ia2run::Outcome;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// `main` and its two libraries, bound lazily or now.
fn fixture(now: bool) -> PathBuf {
    let (tag, z): (&str, &[&str]) = if now {
        ("now", &["-Wl,-z,now,-z,relro"])
    } else {
        ("lazy", &[])
    };
    let lib = |name: &str, src: &str, extra: &[&str]| {
        let mut f = vec!["-shared", "-fPIC"];
        f.extend_from_slice(z);
        f.extend_from_slice(extra);
        cc(&format!("lib{name}_{tag}.so"), &[src], &f)
    };
    lib("ia2calls", "libc/calls.c", &["-ldl"]);
    lib("ia2cxx", "libc/cxx.cpp", &["-lstdc++"]);
    let mut f = vec!["-rdynamic"];
    f.extend_from_slice(z);
    let calls = format!("-lia2calls_{tag}");
    let cxx = format!("-lia2cxx_{tag}");
    f.extend_from_slice(&[&calls, &cxx, "-lstdc++"]);
    cc(&format!("libc-main-{tag}"), &["libc/main.cpp"], &f)
}

const CALLS: &[&str] = &[
    "printf",
    "strlen",
    "qsort-main",
    "setjmp",
    "fork",
    "stdio",
    "getenv",
    "localtime",
    "strerror",
    "getpwnam",
    "iconv",
    "setlocale",
    "qsort",
    "dladdr",
    "dl_iterate_phdr",
    "backtrace",
    "dlsym",
    "cxx",
    "throw",
];

/// What each case prints when it works (compartment 2 checks, in the qsort
/// and dl_iterate_phdr lines, that its callbacks ran as 2: the last 0).
const EXPECTED: &[&str] = &[
    "printf ok 42",
    "strlen ok 6",
    "callbacks from main ok 0 511 0",
    "setjmp ok 3 3",
    "fork child 101",
    "fork ok 110 0",
    "stdio ok hello file",
    "getenv ok visible",
    "localtime ok 1971-01-01",
    "strerror ok No such file or directory",
    "getpwnam ok /root 0",
    "iconv ok 0 4",
    "setlocale ok C.UTF-8",
    "qsort ok 0 2047 1000 0",
    "dladdr ok libia2calls_",
    "dl_iterate_phdr ok 1 0",
    "backtrace ok 1 1",
    "dlsym ok 1 1",
    "cxx caught inside 3 (40)",
    "cxx inside 1",
    "main caught \"from compartment 3 5\" as 1",
];

/// The exit path: each handler and destructor ran as its own compartment
/// and read its own data.
const EXIT_LINES: &[&str] = &[
    "main atexit ran as 1 state 11",
    "lib atexit ran as 2 state 7",
    "lib destructor ran as 2 state 7",
    "cxx static destructor ran as 3: global of compartment 3",
];

fn s(p: &std::path::Path) -> &'static str {
    Box::leak(p.to_str().unwrap().to_string().into_boxed_str())
}

fn argv(exe: &'static str, cases: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec![exe];
    v.extend_from_slice(cases);
    v
}

const VAR: (&str, &str) = ("FIXTURE_VAR", "visible");

fn enforced() -> &'static HashMap<&'static str, Outcome> {
    static R: OnceLock<HashMap<&'static str, Outcome>> = OnceLock::new();
    R.get_or_init(|| {
        let lazy = s(&fixture(false));
        let now = s(&fixture(true));
        let n1 = ("IA2_LIBC_COMPARTMENT", "1");
        let n4 = ("IA2_LIBC_COMPARTMENT", "4");
        let plan = ("IA2_REPORT", "plan");
        enforced_batch(vec![
            ("lazy n1", job(&argv(lazy, CALLS), &[n1, VAR, plan])),
            ("now n1", job(&argv(now, CALLS), &[n1, VAR, plan])),
            ("lazy n4", job(&argv(lazy, CALLS), &[n4, VAR])),
            ("now n4", job(&argv(now, CALLS), &[n4, VAR])),
            ("lazy default", job(&argv(lazy, CALLS), &[VAR])),
            (
                "lazy all gates",
                job(&argv(lazy, CALLS), &[n1, VAR, ("IA2_LIBC_GATES", "all")]),
            ),
            ("exit main lazy", job(&argv(lazy, &["exit-main"]), &[n1])),
            ("exit lib lazy", job(&argv(lazy, &["exit-lib"]), &[n1])),
            ("exit main now n4", job(&argv(now, &["exit-main"]), &[n4])),
            ("exit lib now n4", job(&argv(now, &["exit-lib"]), &[n4])),
            ("exit main default", job(&argv(now, &["exit-main"]), &[])),
            ("exit lib default", job(&argv(lazy, &["exit-lib"]), &[])),
            // copy_relocs: main's copy of libc's `stdout` is main's data,
            // which printf reads with the libc compartment's rights: fine
            // when libc shares main's key, a fault with its own.
            (
                "n1 without copy_relocs",
                job(
                    &argv(now, &["printf"]),
                    &[n1, ("IA2_SHARE_COPY_RELOCS", "0")],
                ),
            ),
            (
                "n4 without copy_relocs",
                job(
                    &argv(now, &["printf"]),
                    &[n4, ("IA2_SHARE_COPY_RELOCS", "0")],
                ),
            ),
            ("stdin", job(&argv(now, &["stdin"]), &[n1])),
            (
                "stdin with libc_data_imports",
                job(
                    &argv(lazy, &["stdin"]),
                    &[n1, ("IA2_SHARE_LIBC_DATA_IMPORTS", "1"), plan],
                ),
            ),
            // The fixes turned off.
            (
                "lazy without binding",
                job(&argv(lazy, &["strlen"]), &[n1, ("IA2_BIND_NOW", "0")]),
            ),
            (
                "now without binding",
                job(&argv(now, &["strlen"]), &[n1, ("IA2_BIND_NOW", "0")]),
            ),
            (
                "without libc gates",
                job(&argv(now, &["printf"]), &[n1, ("IA2_LIBC_GATES", "none")]),
            ),
            (
                "printf left ungated",
                job(&argv(now, &["printf"]), &[n1, ("IA2_LIBC_GATES", "printf")]),
            ),
        ])
    })
}

#[track_caller]
fn assert_all_calls_work(case: &str) {
    let o = &enforced()[case];
    assert_code(o, 0);
    for l in EXPECTED {
        assert_stdout_has(o, l);
    }
    for l in EXIT_LINES {
        assert_stdout_has(o, l);
    }
    assert_stdout_has(o, "main returns as 1");
    assert_stderr_lacks(o, "SEGV_PKUERR");
    assert_stderr_lacks(o, "ran as compartment");
}

#[test]
fn strict_mode_runs_libc_heavy_code_bound_lazily_and_now() {
    for case in ["lazy n1", "now n1", "lazy n4", "now n4", "lazy all gates"] {
        assert_all_calls_work(case);
    }
}

#[test]
fn default_mode_runs_the_same_code() {
    assert_all_calls_work("lazy default");
}

/// The plan says how many lazy slots were bound (none to bind in the
/// `-z now` build's own objects, but libstdc++, libgcc_s and libc are lazy)
/// and prints the hot list with the carveouts each group needs.
#[test]
fn the_plan_shows_binding_and_the_hot_list() {
    let bound = |case: &str| -> usize {
        let err = enforced()[case].stderr_lossy();
        let line = err
            .lines()
            .find(|l| l.contains("lazy binding: "))
            .unwrap_or_else(|| panic!("no lazy binding line\n{err}"));
        line.split("lazy binding: ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (lazy, now) = (bound("lazy n1"), bound("now n1"));
    assert!(now > 0, "libstdc++ and libc are lazy too");
    assert!(lazy > now, "the lazy build binds more: {lazy} vs {now}");
    let o = &enforced()["lazy n1"];
    assert_stderr_has(o, "==== libc gates (IA2_LIBC_GATES=hot");
    assert_stderr_has(o, "hot memcpy memmove memset");
    assert_stderr_has(o, "carveouts: libc_tuning");
    assert_stderr_has(o, "hot __tls_get_addr");
    assert_stderr_has(o, "never gated setjmp _setjmp");
    assert_stderr_has(
        o,
        "-> printf in /lib/x86_64-linux-gnu/libc.so.6 (compartment 1)",
    );
    assert_stderr_lacks(o, "-> memcpy in /lib/x86_64-linux-gnu/libc.so.6");
}

#[test]
fn exit_from_main_or_a_library_runs_each_handler_in_its_compartment() {
    for case in [
        "exit main lazy",
        "exit lib lazy",
        "exit main now n4",
        "exit lib now n4",
        "exit main default",
        "exit lib default",
    ] {
        let o = &enforced()[case];
        assert_code(o, 0);
        for l in EXIT_LINES {
            assert_stdout_has(o, l);
        }
        assert_stderr_lacks(o, "SEGV_PKUERR");
        assert_stderr_lacks(o, "ran as compartment");
    }
}

/// Without binding, the lazily built library's first call to a hot
/// (ungated) function runs `_dl_fixup` with compartment 2's rights, which
/// reads the library's `link_map` on the loader heap. The `-z now` build
/// does not need it.
#[test]
fn without_binding_the_lazy_resolver_faults_on_the_loader_heap() {
    let o = &enforced()["lazy without binding"];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "running as  compartment 2");
    assert_stderr_has(o, "owner       loader heap");
    assert_stderr_has(o, "instruction /lib64/ld-linux-x86-64.so.2+0x");
    let o = &enforced()["now without binding"];
    assert_code(o, 0);
    assert_stdout_has(o, "strlen ok 6");
}

/// Without libc gates (the old default), printf from compartment 2 faults
/// on libc's own stdout FILE; leaving only printf ungated does the same.
#[test]
fn without_libc_gates_printf_faults_on_libcs_stdout() {
    for case in ["without libc gates", "printf left ungated"] {
        let o = &enforced()[case];
        assert_code(o, SIGSEGV_CODE);
        assert_stderr_has(o, "running as  compartment 2");
        assert_stderr_has(o, "symbol      _IO_2_1_stdout_+");
    }
}

/// The `copy_relocs` carveout is still needed with gated libc calls when
/// libc has a compartment of its own: printf from compartment 2 (through a
/// union gate: 2 plus 4) reads main's copy of `stdout`. With N = 1 (libc
/// shares main's key) it is not.
#[test]
fn copy_relocs_is_needed_only_with_a_separate_libc_compartment() {
    let o = &enforced()["n1 without copy_relocs"];
    assert_code(o, 0);
    assert_stdout_has(o, "printf ok 42");
    let o = &enforced()["n4 without copy_relocs"];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "symbol      stdout");
}

/// Library code that reads libc's `stdin` itself (jq, libpython do)
/// faults in strict mode: the variable is in libc's data and the load is
/// compartment 2's own instruction. The report names the carveout that
/// shares it, off by default because its page holds libc's stdio state.
#[test]
fn a_librarys_read_of_stdin_needs_libc_data_imports() {
    let o = &enforced()["stdin"];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "running as  compartment 2");
    assert_stderr_has(o, "symbol      stdin");
    assert_stderr_has(o, "instruction calls_stdin+");
    assert_stderr_has(o, "IA2_SHARE_LIBC_DATA_IMPORTS=1");
    let o = &enforced()["stdin with libc_data_imports"];
    assert_code(o, 0);
    assert_stdout_has(o, "stdin ok 1");
    assert_stderr_has(
        o,
        "carveout libc_data_imports (IA2_SHARE_LIBC_DATA_IMPORTS=1)",
    );
    assert_stderr_has(o, "libc.so.6:stdin");
}

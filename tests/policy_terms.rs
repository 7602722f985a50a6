//! Policy terms that survive a new run: a fault report on an object's data
//! suggests `object:symbol` or `object+0xOFFSET+LEN` (never a raw address),
//! the executable is named `main` (and its file name is accepted too), and
//! the suggested term makes a *second, fresh* run (new ASLR layout) clean.

mod common;
use common::*;
use ia2run::Outcome;

fn fixture() -> String {
    cc_lib("pol2", &["policy/lib.c"], &[]);
    // Stripped PIE: `hidden` has no symbol anywhere; `exported_secret` stays
    // in dynsym through -rdynamic.
    cc_exe(
        "policy",
        &["policy/main.c"],
        &["-s", "-pie", "-fPIE", "-rdynamic", "-lpol2"],
    )
    .to_str()
    .unwrap()
    .to_string()
}

/// The `to share` line of a fault report.
fn share_line(o: &Outcome) -> String {
    o.stderr_lossy()
        .lines()
        .find(|l| l.contains("to share    "))
        .unwrap_or_else(|| panic!("no 'to share' line:\n{}", out_text(o)))
        .split("to share    ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn learned_terms_survive_a_new_run() {
    let exe = fixture();
    let first = enforced_batch(vec![
        ("hidden", job(&[&exe], &[])),
        ("exported", job(&[&exe, "exported"], &[])),
    ]);
    let (hidden, exported) = (&first["hidden"], &first["exported"]);
    // The library's read of the executable's data faults under the key.
    assert_stderr_has(hidden, "protection-key fault");
    assert_stderr_has(exported, "protection-key fault");
    let h = share_line(hidden);
    let e = share_line(exported);
    // Offset form for the stripped static, relative to the executable.
    assert!(
        h.starts_with("IA2_SHARE=main+0x") && h.ends_with("+4096"),
        "{h}"
    );
    // Symbol form for the exported one, naming the executable `main`.
    assert_eq!(e, "IA2_SHARE=main:exported_secret");
    // A second, fresh process (new ASLR layout) with each term runs clean;
    // the executable's file name is accepted as well as `main`.
    let term = |s: &str| s.trim_start_matches("IA2_SHARE=").to_string();
    let (ht, et) = (term(&h), term(&e));
    let by_file = et.replace("main:", "policy:");
    let second = enforced_batch(vec![
        ("hidden", job(&[&exe], &[("IA2_SHARE", &ht)])),
        ("exported", job(&[&exe, "exported"], &[("IA2_SHARE", &et)])),
        (
            "exported by file name",
            job(&[&exe, "exported"], &[("IA2_SHARE", &by_file)]),
        ),
        (
            "wrong object",
            job(&[&exe], &[("IA2_SHARE", "libpol2.so+0x0+4096")]),
        ),
    ]);
    assert_code(&second["hidden"], 0);
    assert_stdout_has(&second["hidden"], "read 4242");
    assert_code(&second["exported"], 0);
    assert_stdout_has(&second["exported"], "read 1717");
    assert_code(&second["exported by file name"], 0);
    // Sharing some other page does not help: the term is exact.
    assert_stderr_has(&second["wrong object"], "protection-key fault");
}

#[test]
fn an_offset_outside_the_object_is_refused() {
    // Checked natively in sim mode: start-up refuses the term, fail closed.
    let exe = fixture();
    let o = native(&job(
        &[&exe],
        &[("IA2_PKU", "sim"), ("IA2_SHARE", "libpol2.so+0x7fff0000")],
    ));
    assert_code(&o, 1);
    assert_stderr_has(
        &o,
        "IA2_SHARE=libpol2.so+0x7fff0000+0x1: outside libpol2.so",
    );
}

/// `ia2run --learn -o FILE` on the stripped PIE: the file names the page
/// relative to the executable, says why, confirms clean through
/// `IA2_POLICY`, reports the private fraction; then a separate, fresh run
/// with `IA2_POLICY=FILE` is clean too.
#[test]
fn learn_writes_a_policy_file_that_a_fresh_run_uses() {
    let exe = fixture();
    let policy = fixture_dir().join(format!("policy-{}.policy", std::process::id()));
    let bin = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("release/ia2run");
    let o = std::process::Command::new(&bin)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .current_dir(root())
        .arg("--shim")
        .arg(shim())
        .args(["--timeout", "600", "--learn", "-o"])
        .arg(&policy)
        .args(["--", &exe])
        .output()
        .expect("running ia2run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("ia2run: learn: the confirming run was clean"),
        "{err}"
    );
    assert!(
        err.contains("ia2run: learn: kept private: compartment 2 (libpol2.so)"),
        "{err}"
    );
    let text = std::fs::read_to_string(&policy).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("IA2_SHARE=main+0x"))
        .unwrap_or_else(|| panic!("no offset entry in\n{text}"));
    assert!(
        line.contains("  # policy .data/.bss: touched by compartment 2 at pol_read+0x0"),
        "the reason is a comment: {line}"
    );
    let p = policy.to_str().unwrap();
    let r = enforced_batch(vec![
        ("with policy", job(&[&exe], &[("IA2_POLICY", p)])),
        ("without", job(&[&exe], &[])),
    ]);
    assert_code(&r["with policy"], 0);
    assert_stdout_has(&r["with policy"], "read 4242");
    assert_stderr_has(&r["without"], "protection-key fault");
    std::fs::remove_file(&policy).unwrap();
}

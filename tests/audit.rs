//! Audit mode (`IA2_ON_FAULT=audit`) under real keys, and `ia2run --learn`:
//! every distinct (page, key, RIP) is logged once, the program runs to the
//! end with nothing lost, and the summary's policy makes the next run clean.

mod common;
use common::*;
use ia2run::learn::{Json, Policy};
use ia2run::Outcome;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn fixture() -> PathBuf {
    cc_lib("audx", &["audit/libaudx.c"], &[]);
    // The executable finds libaudx's data with dlsym, so it needs the
    // library without referring to it.
    cc_exe(
        "audit",
        &["audit/main.c"],
        &["-Wl,--no-as-needed", "-laudx"],
    )
}

fn strict_fixture() -> PathBuf {
    cc_lib("strict2", &["strict/lib2.c"], &["-fstack-protector-all"]);
    cc_lib("strict3", &["strict/lib3.c"], &[]);
    cc_exe(
        "strict-pad16",
        &["strict/main.c"],
        &["-lstrict2", "-lstrict3", "-DMAIN_TLS_PAD=16"],
    )
}

const AUDIT: (&str, &str) = ("IA2_ON_FAULT", "audit");
const JSON: (&str, &str) = ("IA2_REPORT_FORMAT", "json");

/// Every carveout off, in strict mode.
const STRICT_ALL_OFF: [(&str, &str); 11] = [
    ("IA2_LIBC_COMPARTMENT", "1"),
    ("IA2_SHARE_TCB", "0"),
    ("IA2_SHARE_RSEQ", "0"),
    ("IA2_SHARE_LIBC_SINGLE_THREADED", "0"),
    ("IA2_SHARE_PTHREAD_ONCE", "0"),
    ("IA2_SHARE_MUTEX_ELISION", "0"),
    ("IA2_SHARE_BELOW_TCB", "0"),
    ("IA2_SHARE_DTV", "0"),
    ("IA2_SHARE_TLS_GENERATION", "0"),
    ("IA2_SHARE_LIBC_TUNING", "0"),
    ("IA2_SHARE_COPY_RELOCS", "0"),
];

/// The JSON report file of the "sites json" case (the working directory,
/// and so the fixture directory under it, is writable in the VM).
fn json_file() -> PathBuf {
    fixture_dir().join("audit-sites.jsonl")
}

/// Whether the shim accepts non-default values of `var` (its `IA2_HELP=1`
/// entry lacks "[not yet implemented]"). Tests must not link the shim's
/// crate: its constructor and its malloc would run in the test process.
fn implemented(var: &str) -> bool {
    static HELP: OnceLock<String> = OnceLock::new();
    let help =
        HELP.get_or_init(|| native(&job(&["/bin/true"], &[("IA2_HELP", "1")])).stdout_lossy());
    let entry = help
        .split("\n  IA2_")
        .find(|e| e.split_whitespace().next() == var.strip_prefix("IA2_"))
        .unwrap_or_else(|| panic!("{var} not in IA2_HELP output"));
    !entry.contains("[not yet implemented]")
}

/// Every enforcement case of this file, run in one batch (one VM boot).
fn enforced() -> &'static HashMap<&'static str, Outcome> {
    static R: OnceLock<HashMap<&'static str, Outcome>> = OnceLock::new();
    R.get_or_init(|| {
        let exe = fixture();
        let exe = exe.to_str().unwrap();
        let _ = std::fs::remove_file(json_file());
        let file = json_file();
        let file = ("IA2_REPORT_FILE", file.to_str().unwrap());
        let mut cases = vec![
            ("sites", job(&[exe, "sites"], &[AUDIT])),
            ("sites json", job(&[exe, "sites"], &[AUDIT, JSON, file])),
            ("sites report", job(&[exe, "sites"], &[])),
            ("threads", job(&[exe, "threads"], &[AUDIT])),
            ("trap", job(&[exe, "trap"], &[AUDIT])),
            ("abort", job(&[exe, "abort"], &[AUDIT])),
            (
                "copyreloc",
                job(
                    &[exe, "copyreloc"],
                    &[AUDIT, ("IA2_SHARE_COPY_RELOCS", "0")],
                ),
            ),
            ("clean", job(&[exe, "clean"], &[AUDIT, JSON])),
        ];
        if implemented("IA2_LIBC_COMPARTMENT") {
            let strict = strict_fixture();
            let mut vars = STRICT_ALL_OFF.to_vec();
            vars.push(AUDIT);
            cases.push((
                "strict all off",
                job(&[strict.to_str().unwrap(), "all"], &vars),
            ));
        }
        enforced_batch(cases)
    })
}

/// `N` in the text summary's `==== audit summary (...): F faults at N sites`.
fn summary_counts(o: &Outcome) -> (u64, usize) {
    let err = o.stderr_lossy();
    let line = err
        .lines()
        .find(|l| l.contains("==== audit summary ("))
        .unwrap_or_else(|| panic!("no audit summary\n{}", out_text(o)));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = |w: &str| words.iter().position(|x| *x == w).unwrap();
    let faults = words[at("protection-key") - 1].parse().unwrap();
    let sites = words[at("distinct") - 1].parse().unwrap();
    (faults, sites)
}

/// The text summary's group lines, by symbol: (faults, sites, pages, fix).
fn text_groups(o: &Outcome) -> BTreeMap<String, (u64, usize, usize, String)> {
    let err = o.stderr_lossy();
    let mut groups = BTreeMap::new();
    for l in err
        .lines()
        .filter(|l| l.contains("]   [") || l.contains("]:   ["))
    {
        let sym = l
            .split(", symbol ")
            .nth(1)
            .map(|s| s.split(':').next().unwrap().to_string())
            .unwrap_or_else(|| l.split("] ").nth(1).unwrap().to_string());
        let num = |unit: &str| -> u64 {
            let before = l.split(&format!(" {unit}")).next().unwrap();
            before.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let fix = l.split("; fix ").nth(1).unwrap_or("").to_string();
        groups.insert(
            sym,
            (
                num("fault"),
                num("site") as usize,
                num("page") as usize,
                fix,
            ),
        );
    }
    groups
}

fn policy_line(o: &Outcome) -> String {
    o.stderr_lossy()
        .lines()
        .find_map(|l| l.split("to run clean: ").nth(1).map(str::to_string))
        .unwrap_or_else(|| panic!("no policy line\n{}", out_text(o)))
}

const SITES_POLICY: &str =
    "IA2_SHARE='libaudx.so:ax_a,libaudx.so:ax_b,libaudx.so:ax_c,libaudx.so:ax_pair'";

#[test]
fn each_distinct_site_is_logged_once_and_the_program_completes() {
    let o = &enforced()["sites"];
    assert_code(o, 0);
    // Nothing lost to the faults: every read saw its value, every write landed.
    assert_stdout_has(o, "running as 1; ax_a is compartment 2");
    assert_stdout_has(o, "read a0=1 a1=2 b2=6; wrote b0=42 b1=43 c5=7; copy ok");
    assert_stdout_has(o, "done");
    let err = o.stderr_lossy();
    // K = 6: ax_a by read_int; ax_b by write_int and read_int; ax_c by
    // write_int; ax_pair's two pages by the rep movsb.
    let site_lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains(": audit: site "))
        .collect();
    assert_eq!(site_lines.len(), 6, "{}", out_text(o));
    let (faults, sites) = summary_counts(o);
    assert_eq!(sites, 6, "{}", out_text(o));
    for (n, (access, insn, sym)) in [
        ("read", "read_int+0x0", "ax_a+0x0"),
        ("write", "write_int+0x0", "ax_b+0x0"),
        ("read", "read_int+0x0", "ax_b+0x8"),
        ("write", "write_int+0x0", "ax_c+0x14"),
        ("read", "copy_rep+", "ax_pair+0xfe0"),
        ("read", "copy_rep+", "ax_pair+0x1000"),
    ]
    .iter()
    .enumerate()
    {
        let l = site_lines[n];
        assert!(l.contains(&format!("site {}: {access} ", n + 1)), "{l}");
        assert!(l.contains(&format!("at {insn}")), "{l}");
        assert!(l.contains(&format!("symbol {sym};")), "{l}");
        assert!(l.contains("= compartment 2 by compartment 1"), "{l}");
        assert!(l.contains("libaudx.so .data/.bss"), "{l}");
    }
    assert!(site_lines[4].contains("rep movsb"), "{}", site_lines[4]);
    // Groups: one per symbol; repeated hits count, distinct sites once.
    let g = text_groups(o);
    assert_eq!(g.len(), 4, "{}", out_text(o));
    let fix = |s: &str| format!("IA2_SHARE=libaudx.so:{s}");
    assert_eq!(g["ax_a"], (2, 1, 1, fix("ax_a")));
    assert_eq!(g["ax_b"], (3, 2, 1, fix("ax_b")));
    assert_eq!(g["ax_c"], (1, 1, 1, fix("ax_c")));
    let pair = &g["ax_pair"];
    assert_eq!((pair.1, pair.2, &pair.3), (2, 2, &fix("ax_pair")));
    // A rep movsb faults (and is stepped) once per iteration that touches a
    // denied page: 32 bytes from each page.
    assert!(pair.0 >= 2, "{pair:?}");
    assert_eq!(faults, 2 + 3 + 1 + pair.0);
    assert_eq!(policy_line(o), SITES_POLICY);
    assert_stderr_has(o, "first at read_int+0x0");
}

#[test]
fn without_audit_the_same_program_dies_at_the_first_site() {
    let o = &enforced()["sites report"];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_has(o, "protection-key fault (SEGV_PKUERR)");
    assert_stderr_has(o, "instruction read_int+0x0");
    assert_stderr_lacks(o, "audit summary");
    assert!(!o.stdout_lossy().contains("done"), "{}", out_text(o));
}

/// Parse every line of a JSON-lines text (each must parse).
fn json_lines(text: &str) -> Vec<Json> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Json::parse(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn of_type<'a>(lines: &'a [Json], t: &str) -> Vec<&'a Json> {
    lines
        .iter()
        .filter(|v| v.get("type").and_then(Json::as_str) == Some(t))
        .collect()
}

fn s<'a>(v: &'a Json, k: &str) -> &'a str {
    v.get(k)
        .and_then(Json::as_str)
        .unwrap_or_else(|| panic!("{k} in {v:?}"))
}

fn n(v: &Json, k: &str) -> u64 {
    v.get(k)
        .and_then(Json::as_u64)
        .unwrap_or_else(|| panic!("{k} in {v:?}"))
}

#[test]
fn json_lines_parse_and_carry_the_same_facts_as_the_text() {
    let o = &enforced()["sites json"];
    assert_code(o, 0);
    assert_stdout_has(o, "copy ok");
    // The report went to IA2_REPORT_FILE, not to stderr.
    assert_stderr_lacks(o, "audit");
    let text = std::fs::read_to_string(json_file()).expect("the report file");
    let lines = json_lines(&text);
    let faults = of_type(&lines, "audit_fault");
    let groups = of_type(&lines, "audit_group");
    let summary = of_type(&lines, "audit_summary");
    assert_eq!(
        (faults.len(), groups.len(), summary.len()),
        (6, 4, 1),
        "{text}"
    );
    let t = &enforced()["sites"];
    let t_err = t.stderr_lossy();
    let t_sites: Vec<&str> = t_err
        .lines()
        .filter(|l| l.contains(": audit: site "))
        .collect();
    for (f, l) in faults.iter().zip(&t_sites) {
        let head = format!("site {}: {} ", n(f, "site"), s(f, "access"));
        assert!(l.contains(&head), "{l} / {f:?}");
        let sym = format!("symbol {}+{:#x};", s(f, "symbol"), n(f, "symbol_offset"));
        assert!(l.contains(&sym), "{l} / {f:?}");
        let rip = s(f, "rip_symbol").split(' ').next().unwrap();
        assert!(l.contains(&format!("at {rip}")), "{l} / {f:?}");
        assert!(l.contains(s(f, "insn")), "{l} / {f:?}");
        assert!(l.ends_with(&format!("fix {}", s(f, "fix"))), "{l} / {f:?}");
        assert_eq!((s(f, "class"), n(f, "page_compartment")), ("data", 2));
        assert_eq!(n(f, "running_compartment"), 1);
    }
    let tg = text_groups(t);
    for g in &groups {
        let (faults, sites, pages, fix) = &tg[s(g, "symbol")];
        assert_eq!(n(g, "sites"), *sites as u64, "{g:?}");
        assert_eq!(n(g, "pages"), *pages as u64, "{g:?}");
        assert_eq!(s(g, "fix"), fix, "{g:?}");
        if s(g, "symbol") != "ax_pair" {
            assert_eq!(n(g, "faults"), *faults, "{g:?}");
        }
    }
    let sum = summary[0];
    assert_eq!(n(sum, "sites"), 6);
    assert_eq!(n(sum, "groups"), 4);
    assert_eq!(s(sum, "reason"), "exit");
    assert_eq!(sum.get("clean").and_then(Json::as_bool), Some(false));
    assert_eq!(s(sum, "env"), SITES_POLICY);
    let p = Policy::from_report(&text).unwrap();
    assert_eq!(p.to_string(), SITES_POLICY);
    assert!(p.toggles.is_empty());
}

#[test]
fn many_threads_share_the_site_table() {
    let o = &enforced()["threads"];
    assert_code(o, 0);
    assert_stdout_has(o, "threads: 4 threads, total 200, ok");
    // 4 threads x 50 rounds x 2 sites, every fault counted, 2 sites logged once.
    assert_eq!(summary_counts(o), (400, 2), "{}", out_text(o));
    let err = o.stderr_lossy();
    assert_eq!(err.matches(": audit: site ").count(), 2, "{}", out_text(o));
    let g = text_groups(o);
    assert_eq!(g["ax_a"].0, 200);
    assert_eq!(g["ax_c"].0, 200);
    assert_eq!(
        policy_line(o),
        "IA2_SHARE='libaudx.so:ax_a,libaudx.so:ax_c'"
    );
}

#[test]
fn the_programs_own_sigtrap_and_sigsegv_handlers_keep_working() {
    // int3 reaches the program's SIGTRAP handler; the program single-steps
    // (TF) over a violation and gets exactly its three traps; a NULL-page
    // fault reaches its SIGSEGV handler.
    let o = &enforced()["trap"];
    assert_code(o, 0);
    assert_stdout_has(o, "trap: value=1 traps=3 int3=1 segv=1");
    assert_eq!(summary_counts(o), (1, 1), "{}", out_text(o));
}

#[test]
fn a_fatal_signal_prints_the_summary() {
    let o = &enforced()["abort"];
    assert_code(o, 128 + 6);
    assert_stdout_has(o, "read 1, aborting");
    assert_stderr_has(
        o,
        "==== audit summary (signal 6): 1 protection-key fault at 1 distinct",
    );
    assert_eq!(policy_line(o), "IA2_SHARE='libaudx.so:ax_a'");
}

#[test]
fn a_disabled_carveout_is_learned_as_its_toggle() {
    let o = &enforced()["copyreloc"];
    assert_code(o, 0);
    assert_stdout_has(o, "stdout read as compartment 2");
    assert_stderr_has(o, "carveout copy_relocs, symbol stdout+0x0");
    assert_stderr_has(o, "= compartment 1 by compartment 2");
    assert_eq!(policy_line(o), "IA2_SHARE_COPY_RELOCS=1");
}

#[test]
fn a_clean_run_says_so() {
    let o = &enforced()["clean"];
    assert_code(o, 0);
    let lines = json_lines(
        &o.stderr_lossy()
            .lines()
            .filter(|l| l.starts_with('{'))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let sum = of_type(&lines, "audit_summary");
    assert_eq!(sum.len(), 1, "{}", out_text(o));
    assert_eq!(sum[0].get("clean").and_then(Json::as_bool), Some(true));
    assert_eq!(n(sum[0], "faults"), 0);
    assert!(of_type(&lines, "audit_fault").is_empty());
}

#[test]
fn strict_mode_with_every_carveout_off_learns_the_carveouts() {
    if !implemented("IA2_LIBC_COMPARTMENT") {
        eprintln!("IA2_LIBC_COMPARTMENT is not implemented yet: skipped");
        return;
    }
    let o = &enforced()["strict all off"];
    assert_code(o, 0);
    assert_stdout_has(o, "tls ok 639");
    assert_stdout_has(o, "strings ok 198657");
    // The rseq area (in struct pthread, on the TCB page) is written by the
    // kernel: audit mode keeps it shared and lists it.
    assert_stderr_has(o, "first at the kernel (rseq area update)");
    let line = policy_line(o);
    // The TCB page also holds the rseq area here: either toggle shares it.
    assert!(
        line.contains("IA2_SHARE_TCB=1") || line.contains("IA2_SHARE_RSEQ=1"),
        "{line}"
    );
    for t in [
        "IA2_SHARE_DTV=1",
        "IA2_SHARE_TLS_GENERATION=1",
        "IA2_SHARE_LIBC_TUNING=1",
    ] {
        assert!(line.contains(t), "{t} in {line}");
    }
    assert!(!line.contains("IA2_SHARE="), "{line}");
}

/// Audit mode natively without PKU (sim): nothing faults, the summary says
/// so, and the interposed SIGTRAP and SIGSEGV dispositions still reach the
/// program.
#[test]
fn sim_mode_audit_runs_natively() {
    let exe = fixture();
    let exe = exe.to_str().unwrap();
    let o = native(&job(&[exe, "trap"], &[("IA2_PKU", "sim"), AUDIT]));
    assert_code(&o, 0);
    assert_stdout_has(&o, "trap: value=1 traps=3 int3=1 segv=1");
    assert_stderr_has(&o, "audit: the run was clean: no protection-key faults");
    let o = native(&job(&[exe, "abort"], &[("IA2_PKU", "sim"), AUDIT, JSON]));
    assert_code(&o, 128 + 6);
    assert_stderr_has(&o, "\"type\":\"audit_summary\"");
    assert_stderr_has(&o, "\"reason\":\"signal 6\"");
}

fn ia2run_bin() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    dir.join("release/ia2run")
}

/// What `ia2run --learn` said.
struct Learned {
    code: i32,
    /// The `ia2run: learned:` line's value.
    line: String,
    stdout: String,
    stderr: String,
}

/// `ia2run --learn` (two VM boots without PKU on the host).
fn learn(vars: &[(&str, &str)], argv: &[&str]) -> Learned {
    let mut cmd = Command::new(ia2run_bin());
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .current_dir(root())
        .arg("--shim")
        .arg(shim())
        .args(["--timeout", "600", "--learn"]);
    for (k, v) in vars {
        cmd.arg("--env").arg(format!("{k}={v}"));
    }
    let child = cmd
        .arg("--")
        .args(argv)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running ia2run");
    let report = root().join(format!(".ia2run-learn-{}.jsonl", child.id()));
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!report.exists(), "{} left behind", report.display());
    let learned = err
        .lines()
        .find_map(|l| l.strip_prefix("ia2run: learned: "))
        .unwrap_or_else(|| panic!("no learned line\n{err}"))
        .to_string();
    Learned {
        code: o.status.code().unwrap_or(-1),
        line: learned,
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: err,
    }
}

#[test]
fn learn_recovers_a_policy_that_runs_clean() {
    assert!(Path::new(&ia2run_bin()).exists(), "build ia2run first");
    let exe = fixture();
    let exe = exe.to_str().unwrap();
    let l = learn(&[("IA2_SHARE_COPY_RELOCS", "0")], &[exe, "learn"]);
    let err = &l.stderr;
    assert_eq!(
        l.line,
        format!("IA2_SHARE_COPY_RELOCS=1 {SITES_POLICY}"),
        "{err}"
    );
    if implemented("IA2_SHARE") {
        assert_eq!(l.code, 0, "{err}");
        assert!(
            err.contains("ia2run: learn: the confirming run was clean"),
            "{err}"
        );
        assert!(!err.contains("SEGV_PKUERR"), "{err}");
        // Both runs printed everything.
        assert_eq!(l.stdout.matches("copy ok").count(), 2, "{}", l.stdout);
    } else {
        // The confirming run is refused until IA2_SHARE exists; a toggle
        // alone still confirms.
        assert_eq!(l.code, 1, "{err}");
        assert!(err.contains("not yet implemented"), "{err}");
        let l = learn(&[("IA2_SHARE_COPY_RELOCS", "0")], &[exe, "copyreloc"]);
        assert_eq!(l.line, "IA2_SHARE_COPY_RELOCS=1", "{}", l.stderr);
        assert_eq!(l.code, 0, "{}", l.stderr);
    }
}

/// The end-to-end case: the real dav1d in strict mode with every
/// carveout off. Audit mode learns the carveouts it needs, and the
/// confirming run decodes to the same md5 as without the shim.
#[test]
fn learn_on_dav1d_in_strict_mode_with_every_carveout_off() {
    let clip = root().join("demo/clips/clip64.ivf");
    let have_dav1d = Command::new("dav1d").arg("--version").output().is_ok();
    if !implemented("IA2_LIBC_COMPARTMENT") || !have_dav1d || !clip.exists() {
        eprintln!("strict mode, dav1d or {} missing: skipped", clip.display());
        return;
    }
    let clip = clip.to_str().unwrap();
    let argv = [
        "dav1d",
        "-q",
        "--threads",
        "1",
        "-i",
        clip,
        "--muxer",
        "md5",
        "-o",
        "-",
    ];
    let plain = Command::new("dav1d").args(&argv[1..]).output().unwrap();
    let md5 = String::from_utf8_lossy(&plain.stdout).trim().to_string();
    assert_eq!(md5.len(), 32, "{plain:?}");
    let l = learn(&STRICT_ALL_OFF, &argv);
    let (learned, err) = (&l.line, &l.stderr);
    assert_eq!(l.code, 0, "{err}");
    // The audit run and the confirming run decode what dav1d alone does.
    assert_eq!(l.stdout.matches(&md5).count(), 2, "{}\n{err}", l.stdout);
    assert!(
        err.contains("ia2run: learn: the confirming run was clean"),
        "{err}"
    );
    assert!(
        learned.contains("IA2_SHARE_TCB=1") || learned.contains("IA2_SHARE_RSEQ=1"),
        "{learned}"
    );
    for t in ["IA2_SHARE_TLS_GENERATION=1", "IA2_SHARE_LIBC_TUNING=1"] {
        assert!(learned.contains(t), "{t} in {learned}");
    }
    assert!(!learned.contains("IA2_SHARE="), "{learned}");
    eprintln!("dav1d, strict, every carveout off: learned {learned}");
}

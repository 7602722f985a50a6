//! Behaviour on this host (no PKU needed): the three PKU modes, IA2_HELP,
//! fail-closed configuration errors and logging. Real programs, real preload.

mod common;
use common::*;

const TRUE: &str = "/bin/true";

fn host_has_pku() -> bool {
    ia2run::host_has_pku()
}

#[test]
fn require_without_pku_fails_closed_with_a_suggestion() {
    if host_has_pku() {
        eprintln!("host has PKU: the no-PKU message cannot be shown here");
        return;
    }
    let o = native(&job(&["/bin/echo", "program ran"], &[]));
    assert_code(&o, 1);
    assert!(
        o.stdout.is_empty(),
        "the program must not run\n{}",
        out_text(&o)
    );
    assert_stderr_has(
        &o,
        "fatal: IA2_PKU=require: no usable memory protection keys",
    );
    assert_stderr_has(&o, "PKU");
    assert_stderr_has(&o, "ia2run --vm");
    assert_stderr_has(&o, "IA2_PKU=sim");
}

#[test]
fn off_runs_the_program_with_one_notice() {
    let o = native(&job(&["/bin/echo", "program ran"], &[("IA2_PKU", "off")]));
    assert_code(&o, 0);
    assert_stdout_has(&o, "program ran");
    let notices = o
        .stderr_lossy()
        .lines()
        .filter(|l| l.contains("ia2shim"))
        .count();
    assert_eq!(notices, 1, "{}", out_text(&o));
    assert_stderr_has(
        &o,
        "IA2_PKU=off: the shim is disabled; nothing is protected",
    );
}

#[test]
fn sim_runs_the_program_with_a_banner() {
    let o = native(&job(&["/bin/echo", "program ran"], &[("IA2_PKU", "sim")]));
    assert_code(&o, 0);
    assert_stdout_has(&o, "program ran");
    assert_stderr_has(
        &o,
        "IA2_PKU=sim: protection keys are SIMULATED; nothing is enforced",
    );
}

#[test]
fn help_prints_every_variable_and_exits_zero_before_main() {
    let o = native(&job(&["/bin/echo", "program ran"], &[("IA2_HELP", "1")]));
    assert_code(&o, 0);
    let text = o.stdout_lossy();
    assert!(!text.contains("program ran"), "{text}");
    for var in readme_variables() {
        assert!(text.contains(&var), "IA2_HELP lacks {var}\n{text}");
    }
    assert!(text.contains("default: require"), "{text}");
}

#[test]
fn bad_values_abort_before_main_naming_variable_value_and_accepted() {
    let cases: &[(&str, &str, &str)] = &[
        ("IA2_PKU", "maybe", "require, sim, off"),
        ("IA2_COMPARTMENTS", "x=main", "N=glob"),
        ("IA2_COMPARTMENTS", "16=main", "out of range"),
        ("IA2_COMPARTMENTS", "1=main;1=libfoo.so", "twice"),
        (
            "IA2_COMPARTMENTS",
            "1=main,,libfoo.so",
            "empty object pattern",
        ),
        ("IA2_SHARE_DTV", "2", "1, 0"),
        ("IA2_LOG", "loud", "warn, off, error"),
        ("IA2_REPORT", "plan,everything", "plan, maps, gates"),
        ("IA2_SHARE_TBC", "0", "unknown variable"),
    ];
    for (var, val, accepted) in cases {
        // IA2_PKU=sim so that only the bad variable can stop the program.
        let mut vars = vec![(*var, *val)];
        if *var != "IA2_PKU" {
            vars.push(("IA2_PKU", "sim"));
        }
        let o = native(&job(&["/bin/echo", "program ran"], &vars));
        assert_code(&o, 1);
        assert!(
            o.stdout.is_empty(),
            "the program must not run\n{}",
            out_text(&o)
        );
        let err = o.stderr_lossy();
        let line = err
            .lines()
            .find(|l| l.contains("fatal:"))
            .unwrap_or_else(|| panic!("{}", out_text(&o)));
        assert!(line.contains(&format!("{var}=\"{val}\"")), "{line}");
        assert!(line.contains(accepted), "{line}");
        assert_eq!(
            err.lines().filter(|l| l.contains("fatal")).count(),
            1,
            "{err}"
        );
    }
}

#[test]
fn log_level_and_file() {
    let dir = fixture_dir().join("logs");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("shim-%p.log");
    for f in std::fs::read_dir(&dir).unwrap().flatten() {
        std::fs::remove_file(f.path()).unwrap();
    }
    let o = native(&job(
        &[TRUE],
        &[
            ("IA2_PKU", "sim"),
            ("IA2_LOG", "debug"),
            ("IA2_LOG_FILE", path.to_str().unwrap()),
            ("IA2_COMPARTMENTS", "1=main;2=libnothere.so"),
        ],
    ));
    assert_code(&o, 0);
    let logs: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(logs.len(), 1, "one log file, named by pid");
    let text = std::fs::read_to_string(logs[0].path()).unwrap();
    assert!(text.lines().all(|l| l.starts_with("ia2shim[")), "{text}");
    assert!(
        text.contains("warning: IA2_COMPARTMENTS: pattern \"libnothere.so\" (compartment 2) matches no loaded object; loaded objects: main,"),
        "{text}"
    );
    assert!(text.contains("libc.so.6"), "{text}");
    // The warning went to the file, not to stderr.
    assert_stderr_lacks(&o, "matches no loaded object");

    let o = native(&job(
        &[TRUE],
        &[
            ("IA2_PKU", "sim"),
            ("IA2_LOG", "off"),
            ("IA2_COMPARTMENTS", "1=main;2=libnothere.so"),
        ],
    ));
    assert_stderr_lacks(&o, "matches no loaded object");
    let o = native(&job(
        &[TRUE],
        &[
            ("IA2_PKU", "sim"),
            ("IA2_COMPARTMENTS", "1=main;2=libnothere.so"),
        ],
    ));
    assert_stderr_has(&o, "ia2shim[");
    assert_stderr_has(
        &o,
        "]: warning: IA2_COMPARTMENTS: pattern \"libnothere.so\"",
    );
}

#[test]
fn exit_status_and_output_pass_through_in_sim_mode() {
    let o = native(&job(
        &["/bin/sh", "-c", "echo out; echo err >&2; exit 3"],
        &[("IA2_PKU", "sim")],
    ));
    assert_code(&o, 3);
    assert_stdout_has(&o, "out");
    assert_stderr_has(&o, "err");
}

/// The variables in the README's table (between the markers).
fn readme_variables() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let table = readme
        .split("<!-- variables:begin -->")
        .nth(1)
        .and_then(|s| s.split("<!-- variables:end -->").next())
        .expect("README variable table markers");
    table
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

/// The README's table is the `IA2_HELP=1` table: same variables, same
/// defaults, same values. They cannot drift apart.
#[test]
fn readme_variable_table_matches_the_shim() {
    let o = native(&job(&[TRUE], &[("IA2_HELP", "1")]));
    let help = o.stdout_lossy();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut names_in_help: Vec<String> = help
        .lines()
        .filter(|l| l.starts_with("  IA2_"))
        .map(|l| l.trim().to_string())
        .collect();
    let mut names_in_readme = readme_variables();
    names_in_help.sort();
    names_in_readme.sort();
    assert_eq!(
        names_in_help, names_in_readme,
        "README table and IA2_HELP differ"
    );
    // Each README row carries the help's values and default verbatim.
    let lines: Vec<&str> = help.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if let Some(name) = l.strip_prefix("  IA2_") {
            let values = lines[i + 1].trim().strip_prefix("values: ").unwrap();
            let default = lines[i + 2].trim().strip_prefix("default: ").unwrap();
            let row = readme
                .lines()
                .find(|r| r.starts_with(&format!("| `IA2_{name}`")))
                .unwrap();
            assert!(
                row.contains(values),
                "README row for IA2_{name} lacks values {values:?}: {row}"
            );
            assert!(
                row.contains(default),
                "README row for IA2_{name} lacks default {default:?}: {row}"
            );
        }
    }
}

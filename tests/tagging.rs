//! The tagging engine under real keys (in the PKU VM when the host has none):
//! a main program and two libraries in compartments 1, 2 and 3. Each access
//! "as compartment N" runs in N's own code, entered through a call gate.

mod common;
use common::*;
use ia2run::Outcome;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

fn fixture() -> PathBuf {
    cc_lib("tag2", &["tagging/lib2.c"], &[]);
    cc_lib("tag3", &["tagging/lib3.c"], &[]);
    cc_exe("tagging", &["tagging/main.c"], &["-ltag2", "-ltag3"])
}

const OBJECTS: [(&str, u8); 3] = [("main", 1), ("lib2", 2), ("lib3", 3)];

/// Every enforcement case of this file, run in one batch (one VM boot).
fn enforced() -> &'static HashMap<&'static str, Outcome> {
    static R: OnceLock<HashMap<&'static str, Outcome>> = OnceLock::new();
    R.get_or_init(|| {
        let exe = fixture();
        let exe = exe.to_str().unwrap();
        let mut cases: Vec<(&'static str, ia2run::Job)> = Vec::new();
        for (owner, own) in OBJECTS {
            for section in ["data", "bss"] {
                let target: &'static str = Box::leak(format!("{owner}_{section}").into_boxed_str());
                for (_, as_c) in OBJECTS {
                    for rw in ["r", "w"] {
                        let name: &'static str =
                            Box::leak(format!("{target} as {as_c} {rw}").into_boxed_str());
                        let _ = own;
                        cases.push((name, job(&[exe, &as_c.to_string(), target, rw], &[])));
                    }
                }
            }
            let ro: &'static str = Box::leak(format!("{owner}_rodata").into_boxed_str());
            for (_, as_c) in OBJECTS {
                let name: &'static str = Box::leak(format!("{ro} as {as_c} r").into_boxed_str());
                cases.push((name, job(&[exe, &as_c.to_string(), ro, "r"], &[])));
            }
        }
        cases.push(("relro as 1", job(&[exe, "1", "lib2_relro", "r"], &[])));
        cases.push(("keys", job(&[exe, "keys"], &[])));
        cases.push((
            "reports",
            job(&[exe, "keys"], &[("IA2_REPORT", "plan,maps")]),
        ));
        cases.push((
            "reports json",
            job(
                &[exe, "keys"],
                &[("IA2_REPORT", "plan,maps"), ("IA2_REPORT_FORMAT", "json")],
            ),
        ));
        cases.push(("segv handler", job(&[exe, "segv-handler"], &[])));
        cases.push((
            "silent",
            job(&[exe, "1", "lib2_data", "r"], &[("IA2_ON_FAULT", "silent")]),
        ));
        enforced_batch(cases)
    })
}

#[test]
fn each_compartment_reaches_its_own_data_and_bss() {
    let r = enforced();
    for (owner, c) in OBJECTS {
        for section in ["data", "bss"] {
            for rw in ["r", "w"] {
                let o = &r[format!("{owner}_{section} as {c} {rw}").as_str()];
                assert_code(o, 0);
                let verb = if rw == "w" { "wrote" } else { "read" };
                assert_stdout_has(o, &format!("{verb} {owner}_{section} as {c}"));
            }
        }
    }
}

#[test]
fn other_compartments_fault_with_a_report_naming_the_owner() {
    let r = enforced();
    for (owner, own) in OBJECTS {
        for section in ["data", "bss"] {
            for (_, as_c) in OBJECTS.iter().filter(|(_, c)| *c != own) {
                for rw in ["r", "w"] {
                    let o = &r[format!("{owner}_{section} as {as_c} {rw}").as_str()];
                    assert_code(o, SIGSEGV_CODE);
                    assert_stderr_has(o, "protection-key fault (SEGV_PKUERR)");
                    assert_stderr_has(o, &format!("= compartment {own}"));
                    assert_stderr_has(o, &format!("running as  compartment {as_c} "));
                    let object = if owner == "main" {
                        "tagging".to_string()
                    } else {
                        format!("libtag{own}.so")
                    };
                    assert_stderr_has(o, &format!("{object} writable data"));
                    // Compartments 2 and 3 access through their own
                    // library's accessor, entered through a gate.
                    let lib = if *as_c == 1 {
                        String::new()
                    } else {
                        format!("lib{as_c}_")
                    };
                    let insn = if rw == "w" {
                        format!("{lib}touch_write+")
                    } else {
                        format!("{lib}touch_read+")
                    };
                    assert_stderr_has(o, &format!("instruction {insn}"));
                    assert!(
                        o.stdout.is_empty(),
                        "nothing after the fault runs\n{}",
                        out_text(o)
                    );
                }
            }
        }
    }
}

#[test]
fn the_report_names_key_symbol_and_a_share_hint() {
    let o = &enforced()["lib2_data as 1 r"];
    let keys = &enforced()["keys"];
    let key2 = keys
        .stdout_lossy()
        .lines()
        .find(|l| l.starts_with("lib2_data "))
        .and_then(|l| l.split("pkey=").nth(1))
        .and_then(|s| s.split(' ').next())
        .map(str::to_string)
        .expect("keys output");
    assert_stderr_has(o, &format!("page key {key2} = compartment 2"));
    assert_stderr_has(o, "symbol      lib2_data+0x0");
    assert_stderr_has(o, "IA2_SHARE=libtag2.so:lib2_data");
    assert_stderr_has(o, "mov ");
}

#[test]
fn read_only_data_and_relro_stay_shared() {
    let r = enforced();
    for (owner, _) in OBJECTS {
        for (_, as_c) in OBJECTS {
            assert_code(&r[format!("{owner}_rodata as {as_c} r").as_str()], 0);
        }
    }
    assert_code(&r["relro as 1"], 0);
}

#[test]
fn smaps_keys_match_the_api_and_the_plan() {
    let o = &enforced()["keys"];
    assert_code(o, 0);
    let text = o.stdout_lossy();
    let mut seen = 0;
    for line in text.lines().filter(|l| l.contains("smaps=")) {
        let field = |k: &str| -> i32 {
            line.split(&format!("{k}="))
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let (c, pkey, smaps) = (field("compartment"), field("pkey"), field("smaps"));
        assert_eq!(pkey, smaps, "{line}");
        if line.contains("rodata") || line.contains("relro") {
            assert_eq!((c, smaps), (0, 0), "{line}");
        } else {
            let want = if line.starts_with("main") {
                1
            } else if line.starts_with("lib2") {
                2
            } else {
                3
            };
            assert_eq!(c, want, "{line}");
            assert!(smaps > 0, "{line}");
        }
        seen += 1;
    }
    assert_eq!(seen, 10, "{text}");
    assert_stdout_has(o, "running as 1");
    // Three compartments, three distinct keys.
    let keys: std::collections::BTreeSet<_> = text
        .lines()
        .filter(|l| l.contains("_data "))
        .map(|l| l.split("smaps=").nth(1).unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), 3, "{text}");
}

#[test]
fn plan_and_maps_reports_agree_with_smaps() {
    let o = &enforced()["reports"];
    assert_code(o, 0);
    assert_stderr_has(o, "==== census ====");
    assert_stderr_has(o, "libtag2.so base");
    assert_stderr_has(o, "Application: compartment 2");
    assert_stderr_has(o, "data of /");
    assert_stderr_has(o, "==== maps (ProtectionKey from /proc/self/smaps) ====");
    assert_stderr_has(o, " 0 mismatches");
    assert_stderr_lacks(o, "error: maps:");
    let planned: usize = o
        .stderr_lossy()
        .lines()
        .find(|l| l.contains("planned ranges checked"))
        .and_then(|l| l.split("maps: ").nth(1))
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(planned >= 3, "{}", out_text(o));
}

#[test]
fn json_reports_are_one_object_per_line() {
    let o = &enforced()["reports json"];
    assert_code(o, 0);
    let lines: Vec<String> = o
        .stderr_lossy()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(str::to_string)
        .collect();
    assert!(lines.iter().any(|l| l.contains("\"type\":\"object\"")
        && l.contains("libtag3.so")
        && l.contains("\"compartment\":3")));
    assert!(lines
        .iter()
        .any(|l| l.contains("\"type\":\"range\"") && l.contains("\"compartment\":2")));
    assert!(lines.iter().any(|l| l.contains("\"type\":\"mapping\"")));
    assert!(
        !lines.iter().any(|l| l.contains("\"type\":\"mismatch\"")),
        "{}",
        out_text(o)
    );
    for l in &lines {
        assert!(l.ends_with('}') && l.matches('"').count() % 2 == 0, "{l}");
    }
}

#[test]
fn a_program_sigsegv_handler_still_gets_its_non_pku_faults() {
    let o = &enforced()["segv handler"];
    assert_code(o, 7);
    assert_stdout_has(o, "own handler: signal 11 code 1 addr 0x10");
    assert_stderr_lacks(o, "SEGV_PKUERR");
}

#[test]
fn silent_mode_dies_without_a_report() {
    let o = &enforced()["silent"];
    assert_code(o, SIGSEGV_CODE);
    assert_stderr_lacks(o, "protection-key fault");
}

/// The same fixtures natively in sim mode: plan and reports work, nothing is enforced.
#[test]
fn sim_mode_plans_and_reports_natively() {
    let exe = fixture();
    let exe = exe.to_str().unwrap();
    let o = native(&job(
        &[exe, "keys"],
        &[("IA2_PKU", "sim"), ("IA2_REPORT", "plan,maps")],
    ));
    assert_code(&o, 0);
    assert_stderr_has(&o, "protection keys are SIMULATED; nothing is enforced");
    assert_stderr_has(&o, "libtag2.so base");
    assert_stderr_has(&o, "Application: compartment 2");
    assert_stderr_has(&o, "Application: compartment 3");
    assert_stderr_has(&o, "ia2-fixtures/tagging base");
    assert_stderr_has(&o, "Main: compartment 1");
    assert_stderr_has(&o, "libc.so.6 base");
    assert_stderr_has(&o, "System: shared (pkey 0)");
    assert_stderr_has(&o, "carveout tcb (IA2_SHARE_TCB=1)");
    assert_stderr_has(&o, "keys are simulated, so smaps shows none");
    assert_stdout_has(&o, "lib2_data compartment=2");
    assert_stdout_has(&o, "lib3_bss compartment=3");
    assert_stdout_has(&o, "main_data compartment=1");
    assert_stdout_has(&o, "lib2_rodata compartment=0");
    assert_stdout_has(&o, "running as 1");
    // Nothing is enforced: a cross-compartment access just works.
    let o = native(&job(&[exe, "1", "lib2_data", "w"], &[("IA2_PKU", "sim")]));
    assert_code(&o, 0);
    assert_stdout_has(&o, "wrote lib2_data as 1: 99");
}

/// A report with what varies between runs replaced: the pid, addresses
/// (9 or more hex digits; offsets and PKRU values stay), the fixture path.
fn normalized_report(stderr: &str) -> String {
    let dir = fixture_dir();
    let mut out = String::new();
    let mut inside = false;
    for line in stderr.lines() {
        inside |= line.contains("==== protection-key fault");
        if !inside {
            continue;
        }
        let line = line.replace(dir.to_str().unwrap(), "FIXTURES");
        let line = match (line.find("ia2shim["), line.find("]:")) {
            (Some(a), Some(b)) if a < b => format!("{}ia2shim[PID{}", &line[..a], &line[b..]),
            _ => line,
        };
        // Long hex numbers are addresses.
        let mut rest = line.as_str();
        while let Some(i) = rest.find("0x") {
            let digits = rest[i + 2..]
                .bytes()
                .take_while(u8::is_ascii_hexdigit)
                .count();
            out += &rest[..i];
            out += if digits >= 9 {
                "0xADDR"
            } else {
                &rest[i..i + 2 + digits]
            };
            rest = &rest[i + 2 + digits..];
        }
        out += rest;
        out.push('\n');
        if line.contains("to share") {
            break;
        }
    }
    out
}

/// Fault reports are as precise as before the start-up work moved to the
/// first report (decoder tables and formatter built then, in the arena):
/// line for line the text the shim printed before, kept in
/// `tests/fixtures/tagging/reports/` (made with `IA2_BLESS=1` and
/// `IA2SHIM_LIB` pointing at a build of the earlier commit).
#[test]
fn fault_reports_keep_every_line() {
    let dir = root().join("tests/fixtures/tagging/reports");
    for case in ["lib2_data as 1 r", "main_bss as 3 w", "lib3_data as 2 w"] {
        let got = normalized_report(&enforced()[case].stderr_lossy());
        let path = dir.join(format!("{}.txt", case.replace(' ', "_")));
        if std::env::var_os("IA2_BLESS").is_some() {
            assert!(
                !got.is_empty(),
                "{case}: no report\n{}",
                out_text(&enforced()[case])
            );
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &got).unwrap();
            continue;
        }
        let want =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(got, want, "{case}: the report changed");
        assert_eq!(got.lines().count(), 7, "{case}: header and six fields");
    }
}

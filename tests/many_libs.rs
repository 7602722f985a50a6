//! A program with 200 application libraries (more than the 14 keys left
//! beside the shim's own): auto
//! mode groups them by dependency instead of refusing, and the program runs
//! with every library's data under its group's key, calls crossing groups
//! through gates. The libraries are generated and linked lazily (gcc's
//! default), as distro libraries often are.

mod common;
use common::*;
use std::fmt::Write as _;

const DIRECT: usize = 20;
const PRIVATE: usize = 9;

/// Write the sources under the fixture directory and build them (cached).
fn fixture() -> String {
    let gen = fixture_dir().join("manylibs-src");
    std::fs::create_dir_all(&gen).unwrap();
    let write = |name: &str, text: String| {
        let p = gen.join(name);
        if std::fs::read_to_string(&p).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&p, text).unwrap();
        }
        p.to_str().unwrap().to_string()
    };
    let mut main_libs = Vec::new();
    let mut main_c = String::from("#include <stdio.h>\n");
    for d in 0..DIRECT {
        let mut c = String::from("static volatile int n;\n");
        let mut libs = Vec::new();
        for p in 0..PRIVATE {
            let src = write(
                &format!("p{d}_{p}.c"),
                format!(
                    "static volatile int n;\nint p{d}_{p}(void) {{ return n += {}; }}\n",
                    p + 1
                ),
            );
            cc(&format!("libmp{d}_{p}.so"), &[&src], &["-shared", "-fPIC"]);
            libs.push(format!("-lmp{d}_{p}"));
            let _ = writeln!(c, "int p{d}_{p}(void);");
        }
        let _ = write!(c, "int d{d}(void) {{ n++; return n");
        for p in 0..PRIVATE {
            let _ = write!(c, " + p{d}_{p}()");
        }
        c.push_str("; }\n");
        let src = write(&format!("d{d}.c"), c);
        let mut flags: Vec<&str> = vec!["-shared", "-fPIC"];
        flags.extend(libs.iter().map(String::as_str));
        cc(&format!("libmd{d}.so"), &[&src], &flags);
        main_libs.push(format!("-lmd{d}"));
        let _ = writeln!(main_c, "int d{d}(void);");
    }
    main_c.push_str("int main(void) {\n    long sum = 0;\n    for (int r = 0; r < 3; r++) {\n");
    for d in 0..DIRECT {
        let _ = writeln!(main_c, "        sum += d{d}();");
    }
    main_c.push_str("    }\n    printf(\"sum %ld\\n\", sum);\n    return 0;\n}\n");
    let src = write("main.c", main_c);
    let mut flags: Vec<&str> = Vec::new();
    flags.extend(main_libs.iter().map(String::as_str));
    cc("manylibs", &[&src], &flags)
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn two_hundred_libraries_start_grouped_and_run() {
    let exe = fixture();
    let native_out = native(&job_unshimmed(&[&exe]));
    assert_code(&native_out, 0);
    let expect = native_out.stdout_lossy().to_string();
    assert!(expect.starts_with("sum "), "{expect}");
    let r = enforced_batch(vec![(
        "grouped",
        job(&[&exe], &[("IA2_REPORT", "plan,gates")]),
    )]);
    let o = &r["grouped"];
    assert_code(o, 0);
    assert_eq!(o.stdout_lossy(), expect, "{}", out_text(o));
    assert_stderr_has(
        o,
        "201 application objects for 14 keys: grouped by dependency",
    );
    assert_stderr_has(o, "compartment 2: libmd0.so with libmp0_0.so");
    // IA2_HARDEN=on (the default) keeps one key for the shim: 14 here.
    assert_stderr_has(o, "compartment 14: the rest (libmd12.so");
    // Calls from the executable into the groups went through gates.
    assert_stderr_has(o, "-> d0 in");
}

//! Stock Debian programs with application libraries in strict mode
//! (`IA2_LIBC_COMPARTMENT=1`, automatic compartments: each application
//! library its own), under real keys: stdout and exit status equal the run
//! without the shim. C and C++ (aomdec with libaom/libyuv, derb and uconv
//! with ICU), threads (zstd -T2), Perl's eval/die (setjmp/longjmp), Python
//! loading extension modules with dlopen. Programs that are not installed
//! are skipped and named.

mod common;
use common::*;
use std::process::Command;

fn installed(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn stock_programs_run_in_strict_mode_as_they_do_without_the_shim() {
    let readme = root().join("README.md");
    let cargo = root().join("Cargo.toml");
    let (r, c) = (readme.to_str().unwrap(), cargo.to_str().unwrap());
    let clip = clip();
    // (program that must be installed, shell command, needs the
    // libc_data_imports carveout: the library reads libc's `stdin` itself)
    let cases: Vec<(&str, String, bool)> = vec![
        ("bzip2", format!("bzip2 -c {r} | bzip2 -dc | md5sum"), false),
        ("zstd", format!("zstd -q -T2 -c {r} | zstd -q -dc | md5sum"), false),
        ("file", format!("file {r} {c}"), false),
        ("tar", format!("tar -cf - {r} {c} 2>/dev/null | tar -tvf - | wc -l"), false),
        ("gawk", "gawk 'BEGIN{ x = 2^100; printf \"%d %s %.3g\\n\", length(\"abc\"), substr(\"hello\",2,3), x }'".to_string(), false),
        ("git", format!("git hash-object {r}"), false),
        ("perl", "perl -e 'print join(\",\", sort { $a <=> $b } (3,1,2)), \"\\n\"; eval { die \"x\\n\" }; print \"caught $@\"'".to_string(), false),
        ("jq", "jq -n '[1,2,3] | map(.*2) | add'".to_string(), true),
        ("python3", "python3 -c 'import json,zlib,hashlib; print(zlib.crc32(b\"abc\"), json.dumps({\"a\":[1,2]}), hashlib.sha1(b\"x\").hexdigest())'".to_string(), true),
        ("bsdtar", format!("bsdtar -cf - {r} {c} 2>/dev/null | bsdtar -tf -"), false),
        ("aomdec", format!("aomdec --md5 -o - {clip}"), false),
        ("derb", "derb --version".to_string(), false),
        ("uconv", format!("uconv -f utf-8 -t utf-16le {r} | md5sum"), false),
    ];
    let cases: Vec<_> = cases
        .into_iter()
        .filter(|(p, _, _)| {
            let ok = installed(p);
            if !ok {
                eprintln!("{p} is not installed: skipped");
            }
            ok
        })
        .collect();
    let mut batch = Vec::new();
    let mut expected = Vec::new();
    for (p, cmd, data_imports) in &cases {
        let name: &'static str = Box::leak(p.to_string().into_boxed_str());
        let native = native(&job_unshimmed(&["sh", "-c", cmd]));
        assert_code(&native, 0);
        expected.push((name, native.stdout_lossy().to_string()));
        let mut vars = vec![("IA2_LIBC_COMPARTMENT", "1")];
        if *data_imports {
            vars.push(("IA2_SHARE_LIBC_DATA_IMPORTS", "1"));
        }
        batch.push((name, job(&["sh", "-c", cmd], &vars)));
    }
    assert!(batch.len() >= 10, "fewer than ten programs installed");
    let out = enforced_batch(batch);
    for (name, want) in expected {
        let o = &out[name];
        assert_code(o, 0);
        assert_eq!(o.stdout_lossy(), want, "{name}\n{}", out_text(o));
        assert_stderr_lacks(o, "SEGV_PKUERR");
    }
}

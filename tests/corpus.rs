//! The compatibility corpus: stock Debian programs run under the shim in the
//! PKU VM, in the default mode, each compared with its native run (stdout md5
//! and exit status, both taken from an unshimmed run of the same command in
//! the same test). A case runs with no policy, or with the learned policy
//! file `tests/corpus/NAME.policy` (made by `ia2run --learn -o`), whose
//! confirming run here is a second, fresh process with a new ASLR layout.
//!
//! Every case also runs with `IA2_REPORT=summary` (JSON, one file per
//! process): the table's "kept private" column is the private fraction of
//! writable static data and TLS over every compartment of every process of
//! the run, and a case that matches without any summary fails (the shim did
//! not run in it).
//!
//! Each case states what it is expected to do; the test fails when a case
//! that should match does not, and also when a case listed as a known
//! failure starts to match (so the table in the README stays true). The
//! table is written to `target/corpus-table.md` and printed by
//! `scripts/test.sh`.

mod common;
use common::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a case is expected to do under the shim.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Matches the native run (with its policy file if it has one).
    Match,
    /// Does not match yet, for the reason given (no case today; kept so a
    /// new case that fails can be listed honestly).
    #[allow(dead_code)]
    Known(&'static str),
}

struct Case {
    name: &'static str,
    /// What the case covers.
    covers: &'static str,
    argv: Vec<String>,
    expect: Expect,
}

fn inputs() -> PathBuf {
    let d = fixture_dir().join("corpus-inputs");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sh(script: &str, dir: &Path) {
    let o = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "making corpus inputs failed (run scripts/setup.sh): {script}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Deterministic inputs, made once.
fn make_inputs() -> PathBuf {
    let d = inputs();
    if d.join("done").exists() {
        return d;
    }
    let mut xml = String::from("<?xml version=\"1.0\"?>\n<root>\n");
    for i in 0..50 {
        let _ = writeln!(xml, "  <item id=\"{i}\" sq=\"{}\">name {i}</item>", i * i);
    }
    xml.push_str("</root>\n");
    std::fs::write(d.join("doc.xml"), xml).unwrap();
    std::fs::write(
        d.join("style.xsl"),
        "<xsl:stylesheet version=\"1.0\" xmlns:xsl=\"http://www.w3.org/1999/XSL/Transform\">\n\
         <xsl:output method=\"text\"/>\n\
         <xsl:template match=\"/\"><xsl:for-each select=\"//item\"><xsl:sort select=\"@sq\" data-type=\"number\" order=\"descending\"/><xsl:value-of select=\"@id\"/>,</xsl:for-each></xsl:template>\n\
         </xsl:stylesheet>\n",
    )
    .unwrap();
    let mut text = String::new();
    for i in 0..20000 {
        let _ = writeln!(text, "line {i} {}", (i * 7919) % 10007);
    }
    std::fs::write(d.join("text.txt"), &text).unwrap();
    std::fs::write(
        d.join("data.json"),
        "{\"a\":[1,2,3],\"b\":{\"c\":\"x\",\"d\":[{\"e\":1},{\"e\":2}]}}\n",
    )
    .unwrap();
    std::fs::write(d.join("calc.bc"), "scale=30\n4*a(1)\nsqrt(2)\nquit\n").unwrap();
    std::fs::write(
        d.join("script.tcl"),
        "puts [expr {6*7}]\nputs [lsort {c a b}]\nputs [string map {a A} banana]\n",
    )
    .unwrap();
    std::fs::write(
        d.join("prog.awk"),
        "@load \"filefuncs\"\nBEGIN { stat(\"calc.bc\", s); print s[\"size\"] } { n += $3 } END { print NR, n }\n",
    )
    .unwrap();
    sh("mkdir -p tree/sub && cp doc.xml tree/ && cp data.json tree/sub/ && tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf archive.tar tree && gzip -n -c archive.tar > archive.tar.gz", &d);
    sh("xz -k -c text.txt > text.txt.xz && zstd -q -c text.txt > text.txt.zst && bzip2 -k -c text.txt > text.txt.bz2", &d);
    sh("convert-im6.q16 -size 16x16 gradient:red-blue -depth 8 image.png && convert-im6.q16 -size 16x16 xc:green -quality 90 image.jpg", &d);
    sh(
        "qpdf --empty --pages image.pdf 1 -- doc.pdf 2>/dev/null || qpdf --empty doc.pdf",
        &d,
    );
    std::fs::write(d.join("done"), "").unwrap();
    d
}

fn cases(d: &Path) -> Vec<Case> {
    let p = |f: &str| d.join(f).to_str().unwrap().to_string();
    let c = |name, covers, argv: &[&str], expect| Case {
        name,
        covers,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        expect,
    };
    vec![
        c("xmllint-format", "C library (libxml2), I/O callbacks", &["xmllint", "--format", &p("doc.xml")], Expect::Match),
        c("xmllint-xpath", "C library (libxml2), XPath", &["xmllint", "--xpath", "count(//item[@sq>100])", &p("doc.xml")], Expect::Match),
        c("xsltproc", "libxslt calling back into libxml2", &["xsltproc", &p("style.xsl"), &p("doc.xml")], Expect::Match),
        c("xmlstarlet", "libxml2 + libxslt + libexslt", &["xmlstarlet", "sel", "-t", "-v", "sum(//item/@sq)", &p("doc.xml")], Expect::Match),
        c("bsdtar-list", "libarchive read callbacks", &["bsdtar", "-tvf", &p("archive.tar")], Expect::Match),
        c("bsdtar-gz", "libarchive + libz", &["bsdtar", "-xOf", &p("archive.tar.gz"), "tree/doc.xml"], Expect::Match),
        c("curl-file", "libcurl, file:// URL", &["curl", "-s", &format!("file://{}", p("data.json"))], Expect::Match),
        c("python-ext", "interpreter, C extension modules (dlopen)", &["python3", "-c", "import json,zlib,hashlib,math; print(json.dumps({'z': zlib.crc32(b'ia2'), 'h': hashlib.sha256(b'ia2').hexdigest(), 'm': math.factorial(20)}))"], Expect::Match),
        c("python-sqlite", "interpreter, extension module driving libsqlite3 with callbacks", &["python3", "-c", "import sqlite3; c=sqlite3.connect(':memory:'); c.create_function('sq',1,lambda x:x*x); print(c.execute('select sum(sq(value)) from json_each(\"[1,2,3,4]\")').fetchone())"], Expect::Match),
        c("perl-xs", "interpreter, XS modules (dlopen)", &["perl", "-MDigest::MD5=md5_hex", "-MPOSIX=floor", "-e", "print md5_hex('ia2'), ' ', floor(7.5), qq(\\n)"], Expect::Match),
        c("sqlite3", "C library (libsqlite3)", &["sqlite3", ":memory:", "with recursive c(x) as (select 1 union all select x+1 from c where x<1000) select count(*), sum(x) from c;"], Expect::Match),
        c("jq", "libjq + libonig", &["jq", "-c", ".b.d | map(.e * 10)", &p("data.json")], Expect::Match),
        c("openssl-dgst", "libcrypto", &["openssl", "dgst", "-sha256", "-r", &p("text.txt")], Expect::Match),
        c("lua", "interpreter", &["lua5.4", "-e", "local t={} for i=1,100 do t[#t+1]=i*i end table.sort(t, function(a,b) return a>b end) print(t[1], #t)"], Expect::Match),
        c("xz-threads", "liblzma, worker threads", &["xz", "-T2", "-dc", &p("text.txt.xz")], Expect::Match),
        c("zstd", "libzstd", &["zstd", "-q", "-dc", &p("text.txt.zst")], Expect::Match),
        c("bzip2", "libbz2", &["bzip2", "-dc", &p("text.txt.bz2")], Expect::Match),
        c("file-seccomp", "libmagic, seccomp sandbox", &["file", "-b", "--mime", &p("doc.xml"), &p("image.png")], Expect::Match),
        c("pigz-threads", "libz, worker threads", &["pigz", "-n", "-p", "2", "-c", &p("text.txt")], Expect::Match),
        c("qpdf", "C++ library (libqpdf): vtables, exceptions", &["qpdf", "--check", &p("doc.pdf")], Expect::Match),
        c("exiv2", "C++ library (libexiv2)", &["exiv2", "-pS", &p("image.jpg")], Expect::Match),
        c("imagemagick", "30+ libraries, lazily bound, modules", &["convert-im6.q16", &p("image.png"), "-resize", "4x4", "-depth", "8", "ppm:-"], Expect::Match),
        c("ffmpeg-lavfi", "200+ libraries (grouped), threads", &["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=32x32:r=5:d=1", "-f", "md5", "-"], Expect::Match),
        c("tclsh", "interpreter (libtcl)", &["tclsh", &p("script.tcl")], Expect::Match),
        c("gawk-ext", "extension loaded with dlopen, libmpfr/libgmp", &["sh", "-c", &format!("cd {} && gawk -f prog.awk text.txt", d.display())], Expect::Match),
        c("bc", "libreadline, stripped PIE", &["bc", "-lq", &p("calc.bc")], Expect::Match),
        c("tar-fork-exec", "fork and exec of a helper (gzip)", &["sh", "-c", &format!("tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C {} --use-compress-program='gzip -n' -cf - tree | md5sum", d.display())], Expect::Match),
        c("dav1d", "the demo program, 4 threads", &["dav1d", "-q", "-i", &clip(), "-o", "-", "--muxer", "md5", "--threads", "4", "--framedelay", "4"], Expect::Match),
    ]
}

fn md5(b: &[u8]) -> String {
    let mut c = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(b).unwrap();
    let o = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&o.stdout)[..32].to_string()
}

/// Where each case's processes write their `IA2_REPORT=summary` (JSON,
/// one file per process: `NAME.PID.jsonl`).
fn summaries(d: &Path) -> PathBuf {
    d.join("summaries")
}

/// The private fraction of a case's run, from its summaries: private bytes
/// of writable static data and TLS over all of them, summed over every
/// compartment of every process, and the least private compartment.
fn private_fraction(d: &Path, name: &str) -> String {
    let prefix = format!("{name}.");
    let mut all = Vec::new();
    for e in std::fs::read_dir(summaries(d))
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            all.extend(ia2run::learn::privacy_from_report(&text));
        }
    }
    let Some(least) = all
        .iter()
        .min_by(|a, b| a.private_percent.total_cmp(&b.private_percent))
    else {
        return "no summary".into();
    };
    let private: u64 = all.iter().map(|p| p.private_bytes).sum();
    let total: u64 = all.iter().map(|p| p.private_bytes + p.shared_bytes).sum();
    let who = match least.objects.as_slice() {
        [] => "?".to_string(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first} +{}", rest.len()),
    };
    // Rounded down, so that a run sharing anything never shows 100.0%.
    let down = |x: f64| (x * 10.0).floor() / 10.0;
    format!(
        "{:.1}% (least: {who} {:.1}%)",
        down(100.0 * private as f64 / total.max(1) as f64),
        down(least.private_percent)
    )
}

fn policy_of(name: &str) -> Option<PathBuf> {
    let p = root().join("tests/corpus").join(format!("{name}.policy"));
    p.exists().then_some(p)
}

#[test]
fn corpus_matches_the_native_runs() {
    let d = make_inputs();
    let cases = cases(&d);
    assert!(cases.len() >= 25);
    fn argv(c: &Case) -> Vec<&str> {
        c.argv.iter().map(String::as_str).collect()
    }
    let natives: Vec<_> = cases
        .iter()
        .map(|c| native(&job_unshimmed(&argv(c)).cwd(&d)))
        .collect();
    for (c, n) in cases.iter().zip(&natives) {
        assert!(
            !n.stdout.is_empty(),
            "{}: the native run printed nothing\n{}",
            c.name,
            out_text(n)
        );
    }
    let _ = std::fs::remove_dir_all(summaries(&d));
    std::fs::create_dir_all(summaries(&d)).unwrap();
    let jobs: Vec<(&'static str, ia2run::Job)> = cases
        .iter()
        .map(|c| {
            let file = summaries(&d).join(format!("{}.%p.jsonl", c.name));
            let mut vars: Vec<(&str, String)> = vec![
                ("IA2_REPORT", "summary".into()),
                ("IA2_REPORT_FORMAT", "json".into()),
                ("IA2_REPORT_FILE", file.to_str().unwrap().to_string()),
            ];
            if let Some(p) = policy_of(c.name) {
                vars.push(("IA2_POLICY", p.to_str().unwrap().to_string()));
            }
            let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            (c.name, job(&argv(c), &vars).cwd(&d))
        })
        .collect();
    let mut jobs = jobs;
    // The data-import carveout is what lets xsltproc run: without it,
    // libxslt's read of libxml2's exported allocator hook faults.
    let xsl: Vec<String> = cases
        .iter()
        .find(|c| c.name == "xsltproc")
        .unwrap()
        .argv
        .clone();
    let xsl: Vec<&str> = xsl.iter().map(String::as_str).collect();
    jobs.push((
        "xsltproc without data imports",
        job(&xsl, &[("IA2_SHARE_DATA_IMPORTS", "0")]).cwd(&d),
    ));
    let shimmed = enforced_batch(jobs);
    assert_stderr_has(
        &shimmed["xsltproc without data imports"],
        "protection-key fault",
    );
    let mut table =
        String::from("| case | covers | policy | kept private | result |\n|---|---|---|---|---|\n");
    let mut wrong = Vec::new();
    for (c, n) in cases.iter().zip(&natives) {
        let s = &shimmed[c.name];
        let same = s.status == n.status && md5(&s.stdout) == md5(&n.stdout);
        let result = if same {
            "matches".to_string()
        } else {
            let why = s
                .stderr_lossy()
                .lines()
                .find(|l| l.contains("instruction") || l.contains("fatal") || l.contains("killed"))
                .unwrap_or("")
                .trim()
                .to_string();
            format!("differs: {:?} vs native {:?} {why}", s.status, n.status)
        };
        let policy = if policy_of(c.name).is_some() {
            "learned"
        } else {
            "none"
        };
        // A summary proves the shim ran with compartments in that process
        // (a match without one would say nothing about the shim).
        let private = private_fraction(&d, c.name);
        if same && private == "no summary" {
            wrong.push(format!(
                "{}: matches, but no process wrote a summary: did the shim run?",
                c.name
            ));
        }
        let _ = writeln!(
            table,
            "| {} | {} | {policy} | {private} | {} |",
            c.name,
            c.covers,
            match c.expect {
                Expect::Match => result.clone(),
                Expect::Known(why) => format!("known failure ({why}): {result}"),
            }
        );
        match (c.expect, same) {
            (Expect::Match, false) => wrong.push(format!("{}: {result}\n{}", c.name, out_text(s))),
            (Expect::Known(_), true) => wrong.push(format!(
                "{}: listed as a known failure but matches now: update the case",
                c.name
            )),
            _ => {}
        }
    }
    let out = fixture_dir().join("../corpus-table.md");
    std::fs::write(&out, &table).unwrap();
    println!("{table}");
    assert!(wrong.is_empty(), "{}\n\n{table}", wrong.join("\n\n"));
}

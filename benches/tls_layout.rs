//! The TLS layout's costs (README "TLS layout"), natively in sim mode, the
//! sides alternating in one run: the layout step alone (`ia2run`'s
//! `arrange_job`: two `ld.so --list` runs, the `PT_TLS` reads, the pads),
//! exec to exit of the three-compartment TLS fixture with the shim without
//! and with the layout, and, for the alternative design where the shim
//! re-executes the program, one more exec of the same program up to `main`
//! (its usage path). Also prints the pad bytes, the extra static TLS per
//! thread. `cargo bench --bench tls_layout` (build the release shim first).

use ia2run::tlslayout::arrange_job;
use ia2run::Job;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn cc(out: &Path, args: &[&str]) {
    let st = Command::new("cc")
        .args(["-O1", "-o"])
        .arg(out)
        .args(args)
        .status()
        .expect("cc");
    assert!(st.success());
}

fn run(job: &Job) -> Duration {
    let mut c = Command::new(&job.argv[0]);
    c.args(&job.argv[1..])
        .env_clear()
        .envs(job.effective_env())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let t = Instant::now();
    c.status().expect("spawn");
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shim = root.join("target/release/libia2shim.so");
    assert!(shim.exists(), "build the shim first: cargo build --release");
    let dir = root.join("target/ia2-fixtures/bench-tls");
    std::fs::create_dir_all(&dir).unwrap();
    let f = root.join("tests/fixtures/tls");
    let d = dir.to_str().unwrap();
    for l in ["a", "b", "d"] {
        let src = f.join(format!("lib{l}.c"));
        cc(
            &dir.join(format!("libtls{l}.so")),
            &["-shared", "-fPIC", src.to_str().unwrap()],
        );
    }
    let exe = dir.join("tls");
    let rpath = format!("-Wl,-rpath,{d}");
    cc(
        &exe,
        &[
            "-rdynamic",
            f.join("main.c").to_str().unwrap(),
            "-L",
            d,
            &rpath,
            "-ltlsa",
            "-ltlsb",
            "-lpthread",
        ],
    );
    let iters: usize = std::env::var("IA2_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let base = |args: &[&str]| {
        Job::new([exe.to_str().unwrap()])
            .args(args.iter().copied())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("IA2_PKU", "sim")
            .preload(&shim)
    };
    let off = base(&["own"]).env("IA2_TLS_LAYOUT", "off");
    let arranged = arrange_job(&base(&["own"]))
        .expect("layout")
        .expect("the fixture has compartment TLS");
    let on = arranged.job.clone();
    let usage = base(&[]);
    // The loader's share of the difference: the shim disabled (IA2_PKU=off).
    let off_pku = off.clone().env("IA2_PKU", "off");
    let on_pku = on.clone().env("IA2_PKU", "off");
    let bare = base(&["own"]).no_preload();
    let (mut t_step, mut t_off, mut t_on, mut t_usage, mut t_bare) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut t_off_pku, mut t_on_pku) = (vec![], vec![]);
    for i in 0..iters + 5 {
        let t = Instant::now();
        let a = arrange_job(&base(&["own"])).unwrap().unwrap();
        let step = t.elapsed();
        assert_eq!(a.pad_bytes, arranged.pad_bytes);
        let (b, x, y, u) = (run(&bare), run(&off), run(&on), run(&usage));
        let (xp, yp) = (run(&off_pku), run(&on_pku));
        if i >= 5 {
            t_off_pku.push(xp);
            t_on_pku.push(yp);
            t_step.push(step);
            t_bare.push(b);
            t_off.push(x);
            t_on.push(y);
            t_usage.push(u);
        }
    }
    let (step, b, x, y, u) = (
        median(t_step),
        median(t_bare),
        median(t_off),
        median(t_on),
        median(t_usage),
    );
    println!(
        "tls layout: {} pads, {} pad bytes = extra static TLS per thread (three 4-byte secrets)",
        arranged.pads, arranged.pad_bytes
    );
    println!("tls layout step (ia2run, pads cached): {step:.3} ms (median of {iters})");
    println!(
        "exec to exit, fixture `own` (3 threads, a dlopen): unshimmed {b:.3} ms, shim without layout {x:.3} ms, shim with layout {y:.3} ms: layout/no-layout ratio {:.3}x, +{:.3} ms",
        y / x,
        y - x
    );
    let (xp, yp) = (median(t_off_pku), median(t_on_pku));
    println!(
        "of which the loader (shim disabled, IA2_PKU=off): without layout {xp:.3} ms, with layout {yp:.3} ms, +{:.3} ms",
        yp - xp
    );
    println!(
        "re-exec alternative: one more exec of the shimmed program up to main (usage path) {u:.3} ms, that is {:.2}x the layout step",
        u / step
    );
}

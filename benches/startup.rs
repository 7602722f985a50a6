//! Start-up cost: exec to exit of a small program with the shim (sim mode,
//! natively) against without, the two sides alternating in one run.
//! `cargo bench --bench startup` (build the release shim first).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(prog: &[&str], shim: Option<&PathBuf>) -> Duration {
    let mut c = Command::new(prog[0]);
    c.args(&prog[1..]);
    c.env_clear().stdout(Stdio::null()).stderr(Stdio::null());
    if let Some(s) = shim {
        c.env("LD_PRELOAD", s).env("IA2_PKU", "sim");
    }
    let t = Instant::now();
    let st = c.status().expect("spawn");
    let d = t.elapsed();
    assert!(st.success(), "{prog:?} failed");
    d
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let shim = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/libia2shim.so");
    assert!(shim.exists(), "build the shim first: cargo build --release");
    let iters: usize = std::env::var("IA2_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    for prog in [&["/bin/true"][..], &["/usr/bin/dav1d", "--version"][..]] {
        if !std::path::Path::new(prog[0]).exists() {
            continue;
        }
        let args_prog = prog;
        let (mut base, mut with) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            run(args_prog, None);
            run(args_prog, Some(&shim));
        }
        for _ in 0..iters {
            base.push(run(args_prog, None));
            with.push(run(args_prog, Some(&shim)));
        }
        let (b, w) = (median(base), median(with));
        println!(
            "startup {}: without {:.3} ms, with shim (sim) {:.3} ms, ratio {:.2}x, difference {:.3} ms (median of {iters}, alternating)",
            prog.join(" "),
            b.as_secs_f64() * 1e3,
            w.as_secs_f64() * 1e3,
            w.as_secs_f64() / b.as_secs_f64(),
            (w.as_secs_f64() - b.as_secs_f64()) * 1e3
        );
    }
}

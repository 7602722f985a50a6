//! The syscall filter's cost (`IA2_SYSCALLS=filter`) on syscall-heavy loops
//! and on `grep -r` over /usr/include (one openat per file), against the
//! same program without the shim and with the shim but `IA2_SYSCALLS=off`,
//! in one run. Sides alternate; each figure is the median, and each ratio
//! is the shim's time over the unshimmed time (1.00 = no cost). Natively,
//! with `IA2_PKU=sim` (the filter needs no PKU). `cargo bench --bench
//! syscalls` (build the release shim first; `IA2_BENCH_ROUNDS`,
//! `IA2_BENCH_ITERS` tune the run).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::time::Instant;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median of `rounds` runs of each side, sides rotating.
fn measure(
    sides: &[(&str, ia2run::Job)],
    rounds: usize,
    f: impl Fn(&ia2run::Job) -> f64,
) -> Vec<f64> {
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    for r in 0..rounds {
        for i in 0..sides.len() {
            let s = (i + r) % sides.len();
            times[s].push(f(&sides[s].1));
        }
    }
    times.into_iter().map(median).collect()
}

fn print(sides: &[(&str, ia2run::Job)], med: &[f64], unit: &str) {
    for (i, (name, _)) in sides.iter().enumerate() {
        println!(
            "  {name:<32} {:10.1} {unit}  ratio {:.2}x",
            med[i],
            med[i] / med[0]
        );
    }
}

fn main() {
    let bench = cc_exe("syscall_bench", &["escapes/syscall_bench.c"], &["-O2"]);
    let bench = bench.to_str().unwrap();
    let rounds = env_num("IA2_BENCH_ROUNDS", 5);
    let iters = env_num("IA2_BENCH_ITERS", 100_000).to_string();
    let sim = ("IA2_PKU", "sim");
    println!("syscall filter cost (ratio = time / unshimmed time; median of {rounds}, sides alternating, IA2_PKU=sim)");
    for how in [
        "open",
        "mprotect",
        "mmap",
        "madvise",
        "madvise-raw",
        "willneed",
        "pread",
    ] {
        let argv = [bench, how, iters.as_str()];
        let sides = vec![
            ("no shim", job_unshimmed(&argv)),
            (
                "shim, IA2_SYSCALLS=off",
                job(&argv, &[sim, ("IA2_SYSCALLS", "off")]),
            ),
            ("shim, IA2_SYSCALLS=filter", job(&argv, &[sim])),
        ];
        let med = measure(&sides, rounds, |j| {
            let o = native(j);
            assert_code(&o, 0);
            o.stdout_lossy().trim().parse().unwrap()
        });
        println!("{how}:");
        print(&sides, &med, "ns/iter");
    }
    let argv = ["/bin/grep", "-r", "-c", "xyzzy-not-there", "/usr/include"];
    let sides = vec![
        ("no shim", job_unshimmed(&argv)),
        (
            "shim, IA2_SYSCALLS=off",
            job(&argv, &[sim, ("IA2_SYSCALLS", "off")]),
        ),
        ("shim, IA2_SYSCALLS=filter", job(&argv, &[sim])),
    ];
    let med = measure(&sides, rounds, |j| {
        let t = Instant::now();
        let o = native(j);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        // grep exits 1 when nothing matches.
        assert_code(&o, 1);
        ms
    });
    println!("grep -r over /usr/include (whole program, wall time):");
    print(&sides, &med, "ms     ");
}

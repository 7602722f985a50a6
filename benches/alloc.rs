//! Allocator throughput: the malloc family under `IA2_HEAP=compartment`, the
//! `shared_*` ABI, and the `IA2_HEAP=libc` pass-through, each against glibc's
//! malloc without the shim, with one and two threads. The sides alternate
//! (the order rotates every round) and each ratio is glibc's median time
//! over the shim's: 1.00 = as fast as glibc, higher = faster. Natively, with
//! `IA2_PKU=sim`. `cargo bench --bench alloc` (build the release shim first;
//! `IA2_BENCH_ROUNDS`, `IA2_BENCH_STEPS` tune the run).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ns_per_step(j: &ia2run::Job) -> f64 {
    let o = native(j);
    assert_code(&o, 0);
    o.stdout_lossy()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad output\n{}", out_text(&o)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let bench = cc_exe("alloc_bench", &["alloc/bench.c"], &["-O2", "-lpthread"]);
    let bench = bench.to_str().unwrap();
    let rounds = env_num("IA2_BENCH_ROUNDS", 7);
    let steps = env_num("IA2_BENCH_STEPS", 3_000_000).to_string();
    let sim = [("IA2_PKU", "sim")];
    println!("allocator throughput vs glibc malloc (ratio = glibc time / shim time; median of {rounds}, sides alternating, IA2_PKU=sim)");
    for workload in ["small", "mixed"] {
        for threads in ["1", "2"] {
            let args = |api: &'static str| vec![bench, api, threads, steps.as_str(), workload];
            let sides: Vec<(&str, ia2run::Job)> = vec![
                ("glibc malloc (no shim)", job_unshimmed(&args("malloc"))),
                (
                    "malloc, IA2_HEAP=compartment",
                    job(&args("malloc"), &[sim[0], ("IA2_HEAP", "compartment")]),
                ),
                ("shared_malloc/shared_free", job(&args("shared"), &sim)),
                (
                    "malloc, IA2_HEAP=libc (pass-through)",
                    job(&args("malloc"), &sim),
                ),
            ];
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
            for r in 0..rounds {
                for i in 0..sides.len() {
                    let s = (i + r) % sides.len();
                    times[s].push(ns_per_step(&sides[s].1));
                }
            }
            let med: Vec<f64> = times.into_iter().map(median).collect();
            println!("{workload} blocks, {threads} thread(s):");
            for (i, (name, _)) in sides.iter().enumerate() {
                println!(
                    "  {name:<38} {:7.2} ns/step  ratio {:.2}x",
                    med[i],
                    med[0] / med[i]
                );
            }
        }
    }
}

//! Allocator throughput: the malloc family under `IA2_HEAP=compartment`
//! (every block records its allocation site; also with `IA2_REPORT=heap`,
//! which counts bytes per site and compartment), the `shared_*` ABI, and the
//! `IA2_HEAP=libc` pass-through, each against glibc's malloc without the
//! shim, with one and two threads. The sides alternate (the order rotates
//! every round) and each ratio is glibc's median time over the shim's: 1.00
//! = as fast as glibc, higher = faster. Natively, with `IA2_PKU=sim`.
//!
//! Then dav1d decoding `demo/clips/clip360.ivf` with compartment heaps and
//! the sites that `tests/dav1d.rs` learns on Debian 12's libdav1d 1.0.0
//! (`IA2_BENCH_HEAP_SHARED` overrides them), against the decode without the
//! shim and with the shim's default heap (glibc's), `IA2_PKU=sim`.
//!
//! `cargo bench --bench alloc` (build the release shim first;
//! `IA2_BENCH_ROUNDS`, `IA2_BENCH_STEPS` tune the run, `IA2_BENCH_DAV1D=0`
//! skips dav1d, `IA2_BENCH_ALLOC=0` the throughput part).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (wall, CPU) nanoseconds per step.
fn ns_per_step(j: &ia2run::Job) -> (f64, f64) {
    let o = native(j);
    assert_code(&o, 0);
    let out = o.stdout_lossy();
    let v: Vec<f64> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match v[..] {
        [wall, cpu] => (wall, cpu),
        _ => panic!("bad output\n{}", out_text(&o)),
    }
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
    if std::env::var("IA2_BENCH_ALLOC").as_deref() == Ok("0") {
        dav1d(rounds);
        return;
    }
    let sim = [("IA2_PKU", "sim")];
    println!("allocator throughput vs glibc malloc (ratio = glibc time / shim time, by wall clock and by the process's CPU time; median of {rounds}, sides alternating, IA2_PKU=sim)");
    for workload in ["small", "mixed"] {
        for threads in ["1", "2"] {
            let args = |api: &'static str| vec![bench, api, threads, steps.as_str(), workload];
            let sides: Vec<(&str, ia2run::Job)> = vec![
                ("glibc malloc (no shim)", job_unshimmed(&args("malloc"))),
                (
                    "malloc, IA2_HEAP=shared (no sites)",
                    job(&args("malloc"), &[sim[0], ("IA2_HEAP", "shared")]),
                ),
                (
                    "malloc, IA2_HEAP=compartment (sites)",
                    job(&args("malloc"), &[sim[0], ("IA2_HEAP", "compartment")]),
                ),
                (
                    "  + IA2_REPORT=heap (byte counts)",
                    job(
                        &args("malloc"),
                        &[sim[0], ("IA2_HEAP", "compartment"), ("IA2_REPORT", "heap")],
                    ),
                ),
                ("shared_malloc/shared_free", job(&args("shared"), &sim)),
                (
                    "malloc, IA2_HEAP=libc (pass-through)",
                    job(&args("malloc"), &sim),
                ),
            ];
            let mut wall: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
            let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
            for r in 0..rounds {
                for i in 0..sides.len() {
                    let s = (i + r) % sides.len();
                    let (w, c) = ns_per_step(&sides[s].1);
                    wall[s].push(w);
                    cpu[s].push(c);
                }
            }
            let wall: Vec<f64> = wall.into_iter().map(median).collect();
            let cpu: Vec<f64> = cpu.into_iter().map(median).collect();
            println!("{workload} blocks, {threads} thread(s):");
            for (i, (name, _)) in sides.iter().enumerate() {
                println!(
                    "  {name:<38} {:7.2} ns/step  ratio {:.2}x   CPU {:7.2} ns/step  ratio {:.2}x",
                    wall[i],
                    wall[0] / wall[i],
                    cpu[i],
                    cpu[0] / cpu[i]
                );
            }
        }
    }
    if std::env::var("IA2_BENCH_DAV1D").as_deref() != Ok("0") {
        dav1d(rounds);
    }
}

/// What `tests/dav1d.rs` learns on Debian 12's libdav1d.so.6 (1.0.0).
const DAV1D_SITES: &str = "libdav1d.so.6+0x156b53@gate:dav1d_data_create,\
     libdav1d.so.6+0x151529@gate:dav1d_send_data,\
     libdav1d.so.6+0x151529@gate:dav1d_get_picture";

/// dav1d's closing "Decoded N/N frames (100.0%) - X/25.00 fps" line.
fn fps(o: &ia2run::Outcome) -> f64 {
    let text = o.stderr_lossy();
    text.rsplit(['\r', '\n'])
        .find(|l| l.contains(" fps"))
        .and_then(|l| l.split(" - ").nth(1))
        .and_then(|l| l.split('/').next())
        .and_then(|f| f.trim().parse().ok())
        .unwrap_or_else(|| panic!("no fps\n{}", out_text(o)))
}

fn dav1d(rounds: usize) {
    let clip = root().join("demo/clips/clip360.ivf");
    let clip = clip.to_str().unwrap();
    let argv = [
        "dav1d",
        "-i",
        clip,
        "-o",
        "/dev/null",
        "--muxer",
        "null",
        "--threads",
        "1",
    ];
    let policy = std::env::var("IA2_BENCH_HEAP_SHARED").unwrap_or_else(|_| DAV1D_SITES.to_string());
    let sim = ("IA2_PKU", "sim");
    let sides = [
        ("without the shim", job_unshimmed(&argv)),
        ("shim, IA2_HEAP=libc", job(&argv, &[sim])),
        (
            "shim, IA2_HEAP=shared",
            job(&argv, &[sim, ("IA2_HEAP", "shared")]),
        ),
        (
            "shim, IA2_HEAP=compartment, no policy",
            job(&argv, &[sim, ("IA2_HEAP", "compartment")]),
        ),
        (
            "shim, IA2_HEAP=compartment + sites",
            job(
                &argv,
                &[
                    sim,
                    ("IA2_HEAP", "compartment"),
                    ("IA2_HEAP_SHARED", policy.as_str()),
                ],
            ),
        ),
    ];
    let mut f: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    for r in 0..rounds {
        for i in 0..sides.len() {
            let s = (i + r) % sides.len();
            let before = children_cpu_ms();
            let o = native(&sides[s].1);
            cpu[s].push(children_cpu_ms() - before);
            assert_code(&o, 0);
            f[s].push(fps(&o));
        }
    }
    let med: Vec<f64> = f.into_iter().map(median).collect();
    let cpu: Vec<f64> = cpu.into_iter().map(median).collect();
    println!("dav1d 640x360x60 --threads 1, IA2_PKU=sim; median of {rounds}, alternating. fps: dav1d's own (wall clock, decode only); CPU: the process's user+system time, start-up included. Ratios: time / time without the shim");
    for (i, (name, _)) in sides.iter().enumerate() {
        println!(
            "  {name:<38} {:7.1} fps  ratio {:.3}x   CPU {:6.1} ms  ratio {:.3}x",
            med[i],
            med[0] / med[i],
            cpu[i],
            cpu[i] / cpu[0]
        );
    }
}

/// User + system time of the waited-for children so far, in milliseconds
/// (a shared machine makes wall-clock time noisy).
fn children_cpu_ms() -> f64 {
    // SAFETY: a zeroed rusage is valid for getrusage to fill.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(u.ru_utime) + ms(u.ru_stime)
}

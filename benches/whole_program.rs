//! Whole-program benchmarks that print ratios against the unshimmed program,
//! the sides alternating in one run:
//!
//! - dav1d decoding `demo/clips/clip360.ivf` (640x360, 60 frames): natively
//!   with the shim in sim mode (default and strict), and in the PKU VM with
//!   real keys, both sides in the VM. dav1d's own fps figure is the measure.
//! - `pthread_create` + `pthread_join` round trips: natively in sim mode and
//!   in the VM.
//!
//! `cargo bench --bench whole_program` (build the release shim first).
//! `IA2_BENCH_ROUNDS` sets the native rounds (default 9), `IA2_BENCH_VM=0`
//! skips the VM part.

use ia2run::{Job, Mode, VmOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shim() -> PathBuf {
    let p = root().join("target/release/libia2shim.so");
    assert!(p.exists(), "build the shim first: cargo build --release");
    p
}

fn job(argv: &[&str], vars: &[(&str, &str)], preload: bool) -> Job {
    let mut j = Job::new(argv.iter().copied())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .timeout(Duration::from_secs(600));
    j = if preload {
        j.preload(shim())
    } else {
        j.no_preload()
    };
    for (k, v) in vars {
        j = j.env(*k, *v);
    }
    j
}

/// dav1d's closing "Decoded N/N frames (100.0%) - X/25.00 fps" line.
fn fps(stderr: &[u8]) -> Option<f64> {
    let text = String::from_utf8_lossy(stderr);
    let line = text.rsplit(['\r', '\n']).find(|l| l.contains(" fps"))?;
    line.split(" - ")
        .nth(1)?
        .split('/')
        .next()?
        .trim()
        .parse()
        .ok()
}

fn ns_per(stdout: &[u8]) -> Option<f64> {
    String::from_utf8_lossy(stdout)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Runs `sides` alternately `rounds` times (natively or in one VM batch) and
/// returns each side's measurements.
fn alternate(
    mode: Mode,
    sides: &[Job],
    rounds: usize,
    measure: fn(&ia2run::Outcome) -> Option<f64>,
) -> Vec<Vec<f64>> {
    let mut jobs = Vec::new();
    for _ in 0..rounds {
        jobs.extend(sides.iter().cloned());
    }
    let outs = match mode {
        Mode::Native => jobs
            .iter()
            .map(|j| ia2run::run_native(j).expect("run"))
            .collect(),
        _ => ia2run::run_batch(
            Mode::Vm,
            &VmOptions {
                timeout: Duration::from_secs(1500),
                ..VmOptions::default()
            },
            &jobs,
        )
        .expect("VM batch"),
    };
    let mut per_side = vec![Vec::new(); sides.len()];
    for (i, o) in outs.iter().enumerate() {
        match measure(o) {
            Some(v) => per_side[i % sides.len()].push(v),
            None => panic!(
                "no measurement from {}: {:?}\n{}",
                jobs[i],
                o.status,
                o.stderr_lossy()
            ),
        }
    }
    per_side
}

fn thread_bench() -> PathBuf {
    let out = root().join("target/ia2-fixtures/thread_bench");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let st = std::process::Command::new("cc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(root().join("benches/fixtures/thread_bench.c"))
        .status()
        .expect("cc");
    assert!(st.success());
    out
}

fn main() {
    let clip = root().join("demo/clips/clip360.ivf");
    let clip = clip.to_str().unwrap();
    let dav1d = [
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
    let rounds: usize = std::env::var("IA2_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    let fps_of = |o: &ia2run::Outcome| fps(&o.stderr);
    let tb = thread_bench();
    let tb = tb.to_str().unwrap();

    // Natively, sim mode.
    let sim = ("IA2_PKU", "sim");
    let n1 = ("IA2_LIBC_COMPARTMENT", "1");
    let n4 = ("IA2_LIBC_COMPARTMENT", "4");
    let all = ("IA2_LIBC_GATES", "all");
    let sides = [
        job(&dav1d, &[], false),
        job(&dav1d, &[sim], true),
        job(&dav1d, &[sim, n1], true),
        job(&dav1d, &[sim, n4], true),
        job(&dav1d, &[sim, n1, all], true),
    ];
    let r: Vec<f64> = alternate(Mode::Native, &sides, rounds, fps_of)
        .into_iter()
        .map(median)
        .collect();
    println!(
        "dav1d 640x360x60 --threads 1, native, IA2_PKU=sim: {:.1} fps without, {:.1} fps with shim (time ratio {:.3}x), {:.1} fps strict N=1 (time ratio {:.3}x), {:.1} fps strict N=4, a separate libc compartment (time ratio {:.3}x), {:.1} fps strict with every libc call gated (time ratio {:.3}x); median of {rounds}, alternating",
        r[0], r[1], r[0] / r[1], r[2], r[0] / r[2], r[3], r[0] / r[3], r[4], r[0] / r[4]
    );
    let mut dav1d4 = dav1d.to_vec();
    dav1d4[8] = "4";
    dav1d4.extend_from_slice(&["--framedelay", "4"]);
    let sides = [
        job(&dav1d4, &[], false),
        job(&dav1d4, &[sim, n1], true),
        job(&dav1d4, &[sim, n4], true),
    ];
    let r: Vec<f64> = alternate(Mode::Native, &sides, rounds, fps_of)
        .into_iter()
        .map(median)
        .collect();
    println!(
        "dav1d 640x360x60 --threads 4 --framedelay 4, native, IA2_PKU=sim: {:.1} fps without, {:.1} fps strict N=1 (time ratio {:.3}x), {:.1} fps strict N=4 (time ratio {:.3}x); median of {rounds}, alternating",
        r[0], r[1], r[0] / r[1], r[2], r[0] / r[2]
    );
    let ns = |o: &ia2run::Outcome| ns_per(&o.stdout);
    let sides = [
        job(&[tb, "2000"], &[], false),
        job(&[tb, "2000"], &[sim], true),
    ];
    let t: Vec<f64> = alternate(Mode::Native, &sides, rounds, ns)
        .into_iter()
        .map(median)
        .collect();
    println!(
        "pthread_create+join, native, IA2_PKU=sim: {:.0} ns without, {:.0} ns with shim, ratio {:.2}x; median of {rounds}, alternating",
        t[0], t[1], t[1] / t[0]
    );

    if std::env::var("IA2_BENCH_VM").as_deref() == Ok("0")
        || !Path::new("/usr/bin/qemu-system-x86_64").exists()
    {
        println!("VM part skipped");
        return;
    }
    let vm_rounds = 3;
    let sides = [
        job(&dav1d, &[], false),
        job(&dav1d, &[], true),
        job(&dav1d, &[("IA2_LIBC_COMPARTMENT", "1")], true),
        job(&[tb, "300"], &[], false),
        job(&[tb, "300"], &[], true),
    ];
    let measure = |o: &ia2run::Outcome| fps(&o.stderr).or_else(|| ns_per(&o.stdout));
    let v: Vec<f64> = alternate(Mode::Auto.resolve(), &sides, vm_rounds, measure)
        .into_iter()
        .map(median)
        .collect();
    println!(
        "dav1d 640x360x60 --threads 1, PKU VM (TCG, relative only), real keys: {:.2} fps without, {:.2} fps with shim (time ratio {:.3}x), {:.2} fps strict (time ratio {:.3}x); median of {vm_rounds}",
        v[0], v[1], v[0] / v[1], v[2], v[0] / v[2]
    );
    println!(
        "pthread_create+join, PKU VM (TCG, relative only), real keys: {:.0} ns without, {:.0} ns with shim, ratio {:.2}x; median of {vm_rounds}",
        v[3], v[4], v[4] / v[3]
    );
}

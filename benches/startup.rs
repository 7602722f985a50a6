//! Start-up cost: exec to exit with the shim (sim mode, natively) against
//! without, the two sides alternating in one run, medians of the pairs.
//! `cargo bench --bench startup` (build the release shim first).
//!
//! 1. `/bin/true` and `dav1d --version`, default and strict mode
//!    (`IA2_LIBC_COMPARTMENT=1`); targets 1.5× and 1.7×.
//! 2. The floor: `/bin/true` and `dav1d --version` with an empty C
//!    library preloaded, with `benches/floor.c` (a C constructor making
//!    only the system calls the shim cannot avoid), and with the shim off
//!    and in sim mode, alternating with the program alone.
//! 3. `ffmpeg -version` (Debian's, 215 shared objects), with libavcodec,
//!    libavformat and libavutil in compartments 2-4; target 1.3×.
//! 4. Entry gates: `curl --version`, `curl file://…` and `python3 -c
//!    pass` with their libraries in compartments (`IA2_COMPARTMENTS=auto`),
//!    warm and with `IA2_CACHE_DIR=off`, and the added CPU time per gate.
//! 5. Added time against the number of loaded objects: a fixture executable
//!    linked against N tiny libraries (each with data and a function the
//!    executable calls), all in compartment 2, for N from 0 to 200, with a
//!    least-squares line through the added times.
//!
//! Each case prints the medians of the wall time and of the child's CPU
//! time (user + system, from `wait4`): on a shared machine the wall time
//! also counts waiting for a core. Strict mode's locator cache lives in
//! `target/bench-home/.cache/ia2shim` (warm after the warm-up runs).
//!
//! `IA2_BENCH_ITERS` sets the pairs per small program (default 200; the
//! large ones take a fifth, at least 30). `IA2SHIM_LIB` benchmarks another
//! build of the shim (an older commit's, for before/after figures).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Case {
    label: String,
    argv: Vec<String>,
    /// Variables for the shimmed side (IA2_PKU=sim is always set).
    env: Vec<(&'static str, String)>,
    target: Option<f64>,
}

/// One exec-to-exit: (wall time, the child's CPU time, user + system, from
/// `wait4`'s rusage). On a busy machine the wall time includes waiting for
/// a core; the CPU time does not.
fn run(argv: &[String], shim: Option<(&Path, &[(&'static str, String)])>) -> (Duration, Duration) {
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c.env_clear().stdout(Stdio::null()).stderr(Stdio::null());
    if let Some((s, env)) = shim {
        // HOME for the default IA2_CACHE_DIR (strict mode's decoded
        // locators): warm after the first run, as for a user.
        c.env("LD_PRELOAD", s)
            .env("IA2_PKU", "sim")
            .env("HOME", home());
        for (k, v) in env {
            c.env(k, v);
        }
    }
    let t = Instant::now();
    // Reaped below by wait4, which also gives the child's rusage.
    #[allow(clippy::zombie_processes)]
    let child = c.spawn().expect("spawn");
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid for wait4 to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child, with valid out pointers.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let d = t.elapsed();
    assert!(
        r > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{argv:?} failed (shim: {})",
        shim.is_some()
    );
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (d, tv(ru.ru_utime) + tv(ru.ru_stime))
}

fn home() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-home")
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

/// Medians (ms) of `iters` alternating pairs, wall and CPU:
/// ((without, with), (without, with)).
fn measure(shim: &Path, case: &Case, iters: usize) -> ((f64, f64), (f64, f64)) {
    for _ in 0..5 {
        run(&case.argv, None);
        run(&case.argv, Some((shim, &case.env)));
    }
    let (mut base, mut with) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        base.push(run(&case.argv, None));
        with.push(run(&case.argv, Some((shim, &case.env))));
    }
    let wall = |v: &[(Duration, Duration)]| median(v.iter().map(|x| x.0).collect());
    let cpu = |v: &[(Duration, Duration)]| median(v.iter().map(|x| x.1).collect());
    ((wall(&base), wall(&with)), (cpu(&base), cpu(&with)))
}

fn report(case: &Case, iters: usize, ((b, w), (bc, wc)): ((f64, f64), (f64, f64))) {
    let ratio = w / b;
    let cpu_ratio = wc / bc;
    let verdict = |r: f64| match case.target {
        Some(t) if r <= t => format!(" (target <= {t}x: met)"),
        Some(t) => format!(" (target <= {t}x: NOT met)"),
        None => String::new(),
    };
    println!(
        "startup {}, median of {iters} alternating pairs:\n  wall: without {b:.3} ms, with shim (sim) {w:.3} ms, ratio {ratio:.2}x{}, added {:.3} ms\n  cpu:  without {bc:.3} ms, with shim (sim) {wc:.3} ms, ratio {cpu_ratio:.2}x{}, added {:.3} ms",
        case.label,
        verdict(ratio),
        w - b,
        verdict(cpu_ratio),
        wc - bc
    );
}

/// Why one shimmed run of `case` fails, if it does.
fn fails(shim: &Path, case: &Case) -> Option<String> {
    let mut c = Command::new(&case.argv[0]);
    c.args(&case.argv[1..])
        .env_clear()
        .env("LD_PRELOAD", shim)
        .env("IA2_PKU", "sim")
        .env("HOME", home());
    for (k, v) in &case.env {
        c.env(k, v);
    }
    let out = c.output().expect("spawn");
    (!out.status.success()).then(|| out.status.to_string())
}

/// Entry gates installed in one run of `case` (the shim's info lines).
fn entry_gates(shim: &Path, case: &Case) -> usize {
    let mut c = Command::new(&case.argv[0]);
    c.args(&case.argv[1..])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LD_PRELOAD", shim)
        .env("IA2_PKU", "sim")
        .env("IA2_LOG", "info")
        .env("HOME", home());
    for (k, v) in &case.env {
        c.env(k, v);
    }
    let out = c.output().expect("spawn");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| l.split("entry gates: ").nth(1))
        .filter_map(|r| r.split(' ').next()?.parse::<usize>().ok())
        .sum()
}

/// The floor libraries, built once into `target/bench-floor/`: an empty C
/// library (what preloading anything costs) and `benches/floor.c` (a C
/// constructor making only the system calls the shim cannot avoid).
fn floor_libraries(root: &Path) -> [PathBuf; 2] {
    let dir = root.join("target/bench-floor");
    std::fs::create_dir_all(&dir).unwrap();
    let empty_c = dir.join("empty.c");
    std::fs::write(&empty_c, "int floor_empty;\n").unwrap();
    let out = [dir.join("libempty.so"), dir.join("libfloor.so")];
    for (src, so) in [(empty_c, &out[0]), (root.join("benches/floor.c"), &out[1])] {
        let o = Command::new("cc")
            .args(["-O2", "-shared", "-fPIC", "-o"])
            .arg(so)
            .arg(&src)
            .output()
            .expect("running cc");
        assert!(
            o.status.success(),
            "cc {}: {}",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    out
}

/// CPU medians (ms) of `iters` rounds, each running `argv` once without a
/// preload and once with each of `preloads` (library, variables).
fn measure_floor(
    argv: &[String],
    preloads: &[(&Path, Vec<(&'static str, String)>)],
    iters: usize,
) -> (f64, Vec<f64>) {
    let mut base = Vec::new();
    let mut with = vec![Vec::new(); preloads.len()];
    for i in 0..iters + 5 {
        let b = run(argv, None).1;
        let w: Vec<Duration> = preloads
            .iter()
            .map(|(lib, env)| run(argv, Some((lib, env))).1)
            .collect();
        // The first five rounds warm the caches.
        if i >= 5 {
            base.push(b);
            for (v, d) in with.iter_mut().zip(w) {
                v.push(d);
            }
        }
    }
    (median(base), with.into_iter().map(median).collect())
}

/// The N-library fixture: `libmanyK.so` for K < n (an initialised global and
/// a function reading it) and an executable calling each; built once into
/// `target/bench-many/`.
fn many_fixture(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let cc = |args: &[&str]| {
        let o = Command::new("cc").args(args).output().expect("running cc");
        assert!(
            o.status.success(),
            "cc {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    for k in 0..n {
        let so = dir.join(format!("libmany{k}.so"));
        if so.exists() {
            continue;
        }
        let c = dir.join(format!("many{k}.c"));
        std::fs::write(
            &c,
            format!("int many_d{k} = {k};\nint many_f{k}(int x) {{ return x + many_d{k}++; }}\n"),
        )
        .unwrap();
        cc(&[
            "-O1",
            "-shared",
            "-fPIC",
            "-Wl,-z,now,-z,relro",
            c.to_str().unwrap(),
            "-o",
            so.to_str().unwrap(),
        ]);
    }
    let exe = dir.join(format!("many_main{n}"));
    if !exe.exists() {
        let mut src = String::new();
        for k in 0..n {
            src += &format!("int many_f{k}(int);\n");
        }
        src += "int main(void) {\n  int s = 0;\n";
        for k in 0..n {
            src += &format!("  s += many_f{k}(s);\n");
        }
        src += "  return s == -1;\n}\n";
        let c = dir.join(format!("many_main{n}.c"));
        std::fs::write(&c, src).unwrap();
        let mut args: Vec<String> = vec![
            "-O1".into(),
            "-Wl,-z,now,-z,relro".into(),
            c.to_str().unwrap().into(),
            "-L".into(),
            dir.to_str().unwrap().into(),
            format!("-Wl,-rpath,{}", dir.display()),
        ];
        args.extend((0..n).map(|k| format!("-lmany{k}")));
        args.extend(["-o".into(), exe.to_str().unwrap().into()]);
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        cc(&refs);
    }
    exe
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // IA2SHIM_LIB: another build of the shim (as in the tests), e.g. an
    // older commit's, for before/after figures.
    let built = std::env::var_os("IA2SHIM_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/libia2shim.so"));
    assert!(
        built.exists(),
        "build the shim first: cargo build --release"
    );
    // Measured from a fresh copy: how the library's file sits in the page
    // cache (large folios after a fresh write, smaller ones once memory
    // pressure has reclaimed and re-read it) moved the same build's
    // start-up by 50 µs and 6 page faults here, more than a round of
    // changes; a copy puts every build measured in the same state.
    let shim = root.join("target/bench-floor/shim/libia2shim.so");
    std::fs::create_dir_all(shim.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&shim);
    std::fs::copy(&built, &shim).expect("copying the shim");
    let iters: usize = std::env::var("IA2_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let big_iters = (iters / 5).max(30);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let strict = || vec![("IA2_LIBC_COMPARTMENT", "1".to_string())];

    let mut cases = Vec::new();
    for argv in [s(&["/bin/true"]), s(&["/usr/bin/dav1d", "--version"])] {
        if !Path::new(&argv[0]).exists() {
            println!("startup {}: skipped (not installed)", argv[0]);
            continue;
        }
        cases.push(Case {
            label: argv.join(" "),
            argv: argv.clone(),
            env: vec![],
            target: Some(1.5),
        });
        cases.push(Case {
            label: format!("{} (strict)", argv.join(" ")),
            argv,
            env: strict(),
            target: Some(1.7),
        });
    }
    for case in &cases {
        report(case, iters, measure(&shim, case, iters));
    }

    // The floor: what preloading any library costs, and what the shim's
    // unavoidable system calls cost when a C constructor makes only them;
    // the rest of the shim's ratio is its own design and implementation.
    let [empty, floor] = floor_libraries(&root);
    println!("start-up floor (cpu, median of {iters} rounds, ratio against no preload):");
    println!("| program | without (ms) | an empty C library | the floor (benches/floor.c) | the shim, IA2_PKU=off | the shim, sim |");
    println!("|---|---|---|---|---|---|");
    let off = || vec![("IA2_PKU", "off".to_string())];
    for argv in [s(&["/bin/true"]), s(&["/usr/bin/dav1d", "--version"])] {
        if !Path::new(&argv[0]).exists() {
            continue;
        }
        let preloads = [
            (empty.as_path(), vec![]),
            (floor.as_path(), vec![]),
            (shim.as_path(), off()),
            (shim.as_path(), vec![]),
        ];
        let (b, w) = measure_floor(&argv, &preloads, iters);
        let cells: Vec<String> = w
            .iter()
            .map(|x| format!("{:.2}x (+{:.3} ms)", x / b, x - b))
            .collect();
        println!("| {} | {b:.3} | {} |", argv.join(" "), cells.join(" | "));
    }

    let ffmpeg = "/usr/bin/ffmpeg";
    if Path::new(ffmpeg).exists() {
        let comps = "1=main;2=libavcodec.so*;3=libavformat.so*;4=libavutil.so*".to_string();
        for (label, extra) in [
            ("", vec![]),
            (" (strict)", vec![("IA2_LIBC_COMPARTMENT", "5".to_string())]),
        ] {
            let mut env = vec![("IA2_COMPARTMENTS", comps.clone())];
            env.extend(extra);
            let case = Case {
                label: format!("ffmpeg -version{label}, 215 objects"),
                argv: s(&[ffmpeg, "-version"]),
                env,
                target: (label.is_empty()).then_some(1.3),
            };
            if let Some(why) = fails(&shim, &case) {
                println!(
                    "startup {}: skipped, the shimmed run fails ({why})",
                    case.label
                );
                continue;
            }
            report(&case, big_iters, measure(&shim, &case, big_iters));
        }
    } else {
        println!("startup ffmpeg: skipped (apt-get install ffmpeg)");
    }

    // Entry gates: programs with many exported functions in compartments
    // (IA2_COMPARTMENTS=auto), the added CPU time per gate installed; warm
    // (the analyses cached under HOME) and without the cache.
    println!("entry-gate install cost (default mode, median of {big_iters} pairs):");
    for argv in [
        s(&["/usr/bin/curl", "--version"]),
        s(&["/usr/bin/curl", "-s", "file:///etc/hostname"]),
        s(&["/usr/bin/python3", "-c", "pass"]),
    ] {
        if !Path::new(&argv[0]).exists() {
            println!("startup {}: skipped (not installed)", argv[0]);
            continue;
        }
        for (label, env) in [
            ("", vec![]),
            (
                " (IA2_CACHE_DIR=off)",
                vec![("IA2_CACHE_DIR", "off".to_string())],
            ),
        ] {
            let case = Case {
                label: format!("{}{label}", argv.join(" ")),
                argv: argv.clone(),
                env,
                target: None,
            };
            let gates = entry_gates(&shim, &case);
            let m = measure(&shim, &case, big_iters);
            report(&case, big_iters, m);
            let (bc, wc) = m.1;
            println!(
                "  {gates} entry gates: {:.2} us of added cpu per gate (all of the added time)",
                (wc - bc) * 1e3 / gates.max(1) as f64
            );
        }
    }

    // Added time against the number of loaded objects.
    let dir = root.join("target/bench-many");
    let mut points = Vec::new();
    println!("added time against loaded objects (fixture: N libraries in compartment 2, default mode, median of {big_iters} pairs):");
    println!("| N libraries | loaded objects | wall without (ms) | wall with (ms) | wall added (ms) | cpu without (ms) | cpu with (ms) | cpu added (ms) |");
    println!("|---|---|---|---|---|---|---|---|");
    for n in [0, 50, 100, 150, 200] {
        let exe = many_fixture(&dir, n);
        let case = Case {
            label: format!("many {n}"),
            argv: vec![exe.to_str().unwrap().to_string()],
            env: vec![("IA2_COMPARTMENTS", "1=main;2=libmany*.so".to_string())],
            target: None,
        };
        let ((b, w), (bc, wc)) = measure(&shim, &case, big_iters);
        // main, the N libraries, libc, ld.so, the vdso and the shim.
        let objects = n + 5;
        println!(
            "| {n} | {objects} | {b:.3} | {w:.3} | {:.3} | {bc:.3} | {wc:.3} | {:.3} |",
            w - b,
            wc - bc
        );
        points.push((objects as f64, wc - bc));
    }
    let k = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / k, sy / k);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let syy: f64 = points.iter().map(|(_, y)| (y - my) * (y - my)).sum();
    let slope = sxy / sxx;
    let r2 = if syy > 0.0 {
        sxy * sxy / (sxx * syy)
    } else {
        1.0
    };
    println!(
        "least squares over the cpu column: added = {:.3} ms + {:.2} us per object, R^2 = {r2:.3}",
        my - slope * mx,
        slope * 1e3
    );
}

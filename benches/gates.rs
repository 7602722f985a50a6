//! Call-gate cost. `cargo bench --bench gates` (build the release shim first).
//!
//! 1. Instructions per gate round trip, natively under `IA2_PKU=sim`, counted
//!    by callgrind: the fixture's loop of N calls from the executable
//!    (compartment 1) into `nop1` in libgt2.so (compartment 2), at two values
//!    of N, gated and with `IA2_GATES=0`; the per-call difference is the
//!    gate. The `sim` variant is the hardware variant plus a call counter
//!    (`lock inc`) and with RDPKRU/WRPKRU replaced by TLS moves, so the
//!    hardware count is printed next to it, as
//!    decoded from the shim's own code.
//! 2. Calls per second, gated vs direct (no shim), in the PKU VM (or
//!    natively when the host has PKU). The VM's WRPKRU flushes the emulated
//!    TLB, so the ratio is relative to that machine only.
//!
//! 3. Entry gates (callgrind, `IA2_PKU=sim`): N calls through a function
//!    pointer, from the executable into its own exported function (the
//!    same-compartment path: entry `jmp`, check, `jmp` back) and into
//!    libcb2.so (compartment 2: the cross path), each against
//!    `IA2_GATES=0`.
//!
//! `IA2_BENCH_CALLS` sets N for the VM part (default 200000).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::process::Command;

fn fixture() -> String {
    cc_lib("gt2", &["gates/lib2.c"], &[]);
    cc_lib("gt3", &["gates/lib3.c"], &[]);
    cc_exe(
        "gates",
        &["gates/main.c", "gates/cs_check.S"],
        &["-lgt2", "-lgt3", "-ldl", "-lpthread"],
    )
    .to_str()
    .unwrap()
    .to_string()
}

fn callbacks_fixture() -> String {
    cc_lib("cb2", &["callbacks/cblib.c"], &[]);
    cc_exe(
        "callbacks",
        &["callbacks/cbmain.c"],
        &["-lcb2", "-ldl", "-lpthread"],
    )
    .to_str()
    .unwrap()
    .to_string()
}

/// Callgrind's total instruction count of `argv` under the shim in sim mode.
fn callgrind(argv: &[&str], gates: &str) -> Option<u64> {
    callgrind_with(argv, gates, "on")
}

/// As [`callgrind`], with `IA2_HARDEN=harden`.
fn callgrind_with(argv: &[&str], gates: &str, harden: &str) -> Option<u64> {
    let out = std::env::temp_dir().join(format!(
        "ia2-gates-bench-{}-{}.cg",
        std::process::id(),
        argv.join("-").replace('/', "_")
    ));
    let o = Command::new("valgrind")
        .args(["--tool=callgrind", "--quiet"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .args(argv)
        .env("LD_PRELOAD", shim())
        .env("IA2_PKU", "sim")
        .env("IA2_GATES", gates)
        .env("IA2_HARDEN", harden)
        // Both runs of a pair must do the same start-up work: a cache that
        // the first run fills would make it the costlier one.
        .env("IA2_CACHE_DIR", "off")
        .output()
        .ok()?;
    if !o.status.success() {
        eprintln!("valgrind failed: {}", String::from_utf8_lossy(&o.stderr));
        return None;
    }
    let text = std::fs::read_to_string(&out).ok()?;
    let _ = std::fs::remove_file(&out);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary: ")
                .or_else(|| l.strip_prefix("totals: "))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Extra instructions per loop iteration of `args N` (gated with
/// `IA2_GATES=gates`, `IA2_HARDEN=harden`) over `IA2_GATES=0`.
fn path_cost(exe: &str, args: &[&str], gates: &str, harden: &str) -> Option<f64> {
    let (lo, hi) = (1_000u64, 21_000u64);
    let run = |n: u64, gates: &str| {
        let n = n.to_string();
        let mut argv = vec![exe];
        argv.extend_from_slice(args);
        argv.push(&n);
        callgrind_with(&argv, gates, harden)
    };
    let per = |a: u64, b: u64| (b - a) as f64 / (hi - lo) as f64;
    let gated = per(run(lo, gates)?, run(hi, gates)?);
    let direct = per(run(lo, "0")?, run(hi, "0")?);
    Some(gated - direct)
}

/// Extra instructions per call through an entry gate (`same` or `cross`).
fn entry_gate_cost(exe: &str, which: &str) -> Option<(f64, f64)> {
    let (lo, hi) = (1_000u64, 21_000u64);
    let run = |n: u64, gates: &str| callgrind(&[exe, "loop", which, &n.to_string()], gates);
    let per = |a: u64, b: u64| (b - a) as f64 / (hi - lo) as f64;
    let gated = per(run(lo, "1")?, run(hi, "1")?);
    let direct = per(run(lo, "0")?, run(hi, "0")?);
    Some((gated - direct, gated / direct))
}

/// Total instructions (callgrind's Ir) of `exe loop n` under the shim.
fn instructions(exe: &str, n: u64, gates: bool) -> Option<u64> {
    callgrind(
        &[exe, "loop", &n.to_string()],
        if gates { "1" } else { "0" },
    )
}

/// The hardware variant's instructions (the stub's `lea` and `jmp`, then
/// `ia2shim_gate_hw` up to its `ret`), from `objdump -d` of the shim:
/// (outside RDPKRU/WRPKRU, RDPKRU/WRPKRU).
fn hardware_round_trip(variant: &str) -> Option<(usize, usize)> {
    let o = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(shim())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&o.stdout);
    let start = text.find(&format!("<{variant}>:"))?;
    let (mut n, mut pkru) = (2, 0);
    for line in text[start..].lines().skip(1) {
        let Some(insn) = line.split('\t').nth(1) else {
            continue;
        };
        let mnemonic = insn.split_whitespace().next().unwrap_or("");
        if mnemonic == "rdpkru" || mnemonic == "wrpkru" {
            pkru += 1;
        } else {
            n += 1;
        }
        if mnemonic == "ret" {
            return Some((n, pkru));
        }
    }
    None
}

fn ns_per_call(o: &ia2run::Outcome) -> f64 {
    assert_code(o, 0);
    let s = o.stdout_lossy();
    s.split(", ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("bad output\n{}", out_text(o)))
}

fn main() {
    let exe = fixture();
    for (variant, what) in [
        ("ia2shim_gate_hw", "IA2_HARDEN=off"),
        ("ia2shim_gate_hwh", "IA2_HARDEN=on"),
    ] {
        // An entry gate's cross path is generated per function (its record,
        // counted by the unit test `entry_gate_instruction_counts`, which
        // builds one); its return half is the variant's.
        let ret = format!("{variant}_ret");
        if let Some((n, pkru)) = hardware_round_trip(&ret) {
            println!(
                "entry gate's return half ({ret}), hardware, {what} (objdump): {} instructions outside RDPKRU/WRPKRU, plus {pkru} WRPKRU; the record's part: `cargo test --release --lib entry_gate_instruction_counts -- --nocapture`",
                n - 2
            );
        }
        match hardware_round_trip(variant) {
            Some((n, pkru)) => println!(
                "gate round trip, hardware variant, {what} (objdump of the shim, stub included): {n} instructions outside RDPKRU/WRPKRU, plus {pkru} RDPKRU/WRPKRU"
            ),
            None => println!("objdump of the shim failed; hardware count skipped"),
        }
    }

    // Each way into another compartment, callgrind in sim mode: extra
    // instructions per call over IA2_GATES=0. The sim variants count the
    // call (`lock inc`) and move the simulated PKRU with as many
    // instructions as the xors around RDPKRU/WRPKRU take; the hardened ones move it three
    // times (open, callee, caller) where hardware runs RDPKRU + 3 WRPKRU.
    let cb = callbacks_fixture();
    let paths: [(&str, &str, Vec<&str>, &str); 4] = [
        (
            "direct (PLT) call, GOT gate into the function (libgt2's nop1, too short for an entry gate)",
            &exe,
            vec!["loop"],
            "1",
        ),
        (
            "direct (PLT) call into an entry-gated function: GOT gate to its relocated body",
            &cb,
            vec!["loop", "direct"],
            "1",
        ),
        (
            "function pointer into another compartment's entry gate",
            &cb,
            vec!["loop", "cross"],
            "1",
        ),
        (
            "function pointer into the same compartment's entry gate",
            &cb,
            vec!["loop", "same"],
            "1",
        ),
    ];
    for (what, x, args, gates) in &paths {
        let on = path_cost(x, args, gates, "on");
        let off = path_cost(x, args, gates, "off");
        match (on, off) {
            (Some(on), Some(off)) => println!(
                "callgrind, IA2_PKU=sim, {what}: {off:.1} extra instructions per call with IA2_HARDEN=off, {on:.1} with IA2_HARDEN=on (+{:.1})",
                on - off
            ),
            _ => println!("callgrind: {what} skipped (valgrind not available or failed)"),
        }
    }

    let (lo, hi) = (1_000u64, 21_000u64);
    match (
        instructions(&exe, lo, true),
        instructions(&exe, hi, true),
        instructions(&exe, lo, false),
        instructions(&exe, hi, false),
    ) {
        (Some(g0), Some(g1), Some(d0), Some(d1)) => {
            let per_gated = (g1 - g0) as f64 / (hi - lo) as f64;
            let per_direct = (d1 - d0) as f64 / (hi - lo) as f64;
            let gate = per_gated - per_direct;
            println!(
                "callgrind, IA2_PKU=sim: {per_gated:.1} instructions per loop iteration gated, {per_direct:.1} with IA2_GATES=0: \
                 {gate:.1} per gate round trip (sim variant; minus its counter and the extra simulated-PKRU move: {:.1}); ratio {:.2}",
                gate - 2.0,
                per_gated / per_direct
            );
        }
        _ => println!("callgrind: valgrind not available or failed; skipped"),
    }

    match (entry_gate_cost(&cb, "same"), entry_gate_cost(&cb, "cross")) {
        (Some((same, rs)), Some((cross, rc))) => println!(
            "callgrind, IA2_PKU=sim, calls through a function pointer: entry gate, same compartment: \
             {same:.1} extra instructions per call (ratio {rs:.2}); another compartment: {cross:.1} extra \
             (ratio {rc:.2}; sim counts calls and moves the simulated PKRU; on hardware the check takes \
             11 instructions and an RDPKRU on the same-compartment path, and its cross path is printed above)"
        ),
        _ => println!("callgrind: entry-gate part skipped (valgrind not available or failed)"),
    }

    let n = std::env::var("IA2_BENCH_CALLS").unwrap_or_else(|_| "200000".into());
    let jobs = vec![
        ("gated", job(&[&exe, "loop", &n], &[])),
        ("direct", job_unshimmed(&[&exe, "loop", &n])),
        ("gated again", job(&[&exe, "loop", &n], &[])),
        ("direct again", job_unshimmed(&[&exe, "loop", &n])),
    ];
    let r = enforced_batch(jobs);
    let gated = ns_per_call(&r["gated"]).min(ns_per_call(&r["gated again"]));
    let direct = ns_per_call(&r["direct"]).min(ns_per_call(&r["direct again"]));
    println!(
        "enforced ({}), {n} calls: gated {:.0} calls/s ({gated:.1} ns/call), direct {:.0} calls/s ({direct:.1} ns/call): \
         direct/gated throughput ratio {:.1}",
        if ia2run::host_has_pku() { "native PKU" } else { "PKU VM, TCG: relative only" },
        1e9 / gated,
        1e9 / direct,
        gated / direct
    );
}

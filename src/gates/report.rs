//! Gate reports (plan listing, per-gate call counts) and introspection for tests and benches.

use super::*;

// ---------------------------------------------------------------- reports

pub(super) fn comp_str(c: Option<u8>) -> String {
    c.map_or_else(|| "shared".to_string(), |c| format!("compartment {c}"))
}

/// The gate section of the start-up report (`IA2_REPORT=plan`).
pub fn report(rt: &Runtime) -> String {
    let st = state();
    let mut o = String::new();
    let json = rt.config.report_format == ReportFormat::Json;
    let p = crate::stackfmt::pid();
    if !json {
        let _ = writeln!(
            o,
            "ia2shim[{p}]: ==== gates ({}) ====",
            match (
                st.enabled,
                st.got,
                st.entry,
                fault_gate::ENABLED.load(Ordering::Relaxed)
            ) {
                (false, ..) => "off: IA2_GATES=0",
                (true, true, true, false) => "IA2_GATES=1",
                (true, true, true, true) => "IA2_GATES=got,entry,fault",
                (true, true, false, false) => "IA2_GATES=got",
                (true, false, true, false) => "IA2_GATES=entry",
                (true, true, false, true) => "IA2_GATES=got,fault",
                (true, false, true, true) => "IA2_GATES=entry,fault",
                _ => "IA2_GATES=fault",
            }
        );
    }
    for (i, e) in st.entries.iter().enumerate() {
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"entry_gate\",\"gate\":\"e{i}\",\"symbol\":{},\"callee\":{},\"callee_compartment\":{},\"address\":\"{:#x}\",\"record\":\"{:#x}\",\"found\":\"{}\"}}",
                crate::report::json_str(&e.symbol),
                crate::report::json_str(&e.callee),
                e.compartment,
                e.function,
                e.record,
                e.found
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]:   gate e{i}: {} in {} (compartment {}) at {:#x}: {}",
                e.symbol, e.callee, e.compartment, e.function, e.found
            );
        }
    }
    for s in &st.entry_slots {
        let e = &st.entries[s.entry];
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"gate\",\"gate\":\"e{}\",\"caller\":{},\"caller_compartment\":{},\"symbol\":{},\"callee\":{},\"callee_compartment\":{},\"via\":\"{}\",\"slot\":\"{:#x}\",\"target\":\"{:#x}\",\"found\":\"{}\"}}",
                s.entry,
                crate::report::json_str(&s.caller),
                s.caller_compartment,
                crate::report::json_str(&e.symbol),
                crate::report::json_str(&e.callee),
                e.compartment,
                s.via,
                s.slot,
                e.function,
                e.found
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]:   gate e{}: {} (compartment {}) -> {} in {} (compartment {}) via {} at {:#x}, left as is: the {} switches",
                s.entry, s.caller, s.caller_compartment, e.symbol, e.callee, e.compartment, s.via, s.slot, e.found
            );
        }
    }
    for r in &st.refusals {
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"entry_gate_refused\",\"symbol\":{},\"object\":{},\"compartment\":{},\"address\":\"{:#x}\",\"reason\":{}}}",
                crate::report::json_str(&r.symbol),
                crate::report::json_str(&r.object),
                r.compartment,
                r.address,
                crate::report::json_str(&r.reason)
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]:   no entry gate for {} in {} (compartment {}) at {:#x}: {}",
                r.symbol, r.object, r.compartment, r.address, r.reason
            );
        }
    }
    for pt in &st.patches {
        let g = &st.gates[pt.gate];
        let caller = match pt.via {
            Via::Fini | Via::FiniArray(_) => "ld.so (exit)".to_string(),
            _ => format!("{} ({})", pt.caller, comp_str(pt.caller_compartment)),
        };
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"gate\",\"gate\":{},\"caller\":{},\"caller_compartment\":{},\"symbol\":{},\"callee\":{},\"callee_compartment\":{},\"via\":\"{}\",\"slot\":\"{:#x}\",\"target\":\"{:#x}\",\"stub\":\"{:#x}\"}}",
                g.index,
                crate::report::json_str(&pt.caller),
                pt.caller_compartment.map_or("null".to_string(), |c| c.to_string()),
                crate::report::json_str(&g.symbol),
                crate::report::json_str(&g.callee),
                g.compartment,
                pt.via,
                pt.slot,
                g.target,
                stub_address(g.index)
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]:   gate {}: {caller} -> {} in {} (compartment {}) via {} at {:#x}",
                g.index, g.symbol, g.callee, g.compartment, pt.via, pt.slot
            );
        }
    }
    for d in &st.data_imports {
        let page = match d.page_compartment {
            Some(c) => format!("page tagged for compartment {c}"),
            None => "page shared (key 0)".to_string(),
        };
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"data_import\",\"importer\":{},\"importer_compartment\":{},\"symbol\":{},\"owner\":{},\"owner_compartment\":{},\"address\":\"{:#x}\",\"page_compartment\":{}}}",
                crate::report::json_str(&d.importer),
                d.importer_compartment,
                crate::report::json_str(&d.symbol),
                crate::report::json_str(&d.owner),
                d.owner_compartment,
                d.address,
                d.page_compartment.map_or("null".to_string(), |c| c.to_string())
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]:   cross-compartment data import (not gated): {} (compartment {}) imports {} at {:#x} from {} (compartment {}); {page}",
                d.importer, d.importer_compartment, d.symbol, d.address, d.owner, d.owner_compartment
            );
        }
    }
    for h in &st.scan_hits {
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"wrpkru_scan\",\"object\":{},\"offset\":\"{:#x}\",\"what\":\"{}\"}}",
                crate::report::json_str(&h.object),
                h.offset,
                h.what
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]:   IA2_SCAN_WRPKRU: {} at {}+{:#x}",
                h.what, h.object, h.offset
            );
        }
    }
    if !json {
        let _ = writeln!(
            o,
            "ia2shim[{p}]:   {} gates, {} patched slots, {} entry gates ({} functions refused, {} weak ones left out), {} cross-compartment data imports, {} WRPKRU/XRSTOR sequences",
            st.gates.len(),
            st.patches.len(),
            st.entries.len(),
            st.refusals.len(),
            st.weak_skipped,
            st.data_imports.len(),
            st.scan_hits.len()
        );
    }
    o
}

/// Per-gate call counts (`IA2_REPORT=gates`, printed at exit).
pub fn exit_report(rt: &Runtime) -> String {
    let st = match STATE.try_lock() {
        Ok(s) => s,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return String::new(),
    };
    let mut o = String::new();
    let json = rt.config.report_format == ReportFormat::Json;
    let p = crate::stackfmt::pid();
    if !json {
        let _ = writeln!(o, "ia2shim[{p}]: ==== gate calls ====");
    }
    let mut total = 0u64;
    for g in &st.gates {
        let n = calls(g.index);
        total += n;
        let mut callers: Vec<&str> = st
            .patches
            .iter()
            .filter(|pt| pt.gate == g.index)
            .map(|pt| match pt.via {
                Via::Fini | Via::FiniArray(_) => "ld.so (exit)",
                _ => pt.caller.as_str(),
            })
            .collect();
        callers.dedup();
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"gate_calls\",\"gate\":{},\"symbol\":{},\"callee\":{},\"compartment\":{},\"calls\":{n},\"callers\":[{}]}}",
                g.index,
                crate::report::json_str(&g.symbol),
                crate::report::json_str(&g.callee),
                g.compartment,
                callers.iter().map(|c| crate::report::json_str(c)).collect::<Vec<_>>().join(",")
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]:   gate {}: {} in {} (compartment {}{}): {n} calls from {}",
                g.index,
                g.symbol,
                g.callee,
                g.compartment,
                if g.dead { ", unloaded" } else { "" },
                callers.join(", ")
            );
        }
    }
    for (i, e) in st.entries.iter().enumerate() {
        let n = entry_calls(e);
        total += n;
        if n == 0 {
            continue;
        }
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"gate_calls\",\"gate\":\"e{i}\",\"symbol\":{},\"callee\":{},\"compartment\":{},\"calls\":{n},\"found\":\"{}\"}}",
                crate::report::json_str(&e.symbol),
                crate::report::json_str(&e.callee),
                e.compartment,
                e.found
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]:   gate e{i}: {} in {} (compartment {}, {}{}): {n} calls from outside the compartment",
                e.symbol,
                e.callee,
                e.compartment,
                e.found,
                if e.dead { ", unloaded" } else { "" },
            );
        }
    }
    let faults = FAULT_GATED.load(Ordering::Relaxed);
    if faults > 0 && !json {
        let _ = writeln!(
            o,
            "ia2shim[{p}]:   fault-driven: {faults} invocations gated by a fault"
        );
    }
    if !json {
        let _ = writeln!(
            o,
            "ia2shim[{p}]:   {} gates, {} entry gates, {total} calls",
            st.gates.len(),
            st.entries.len()
        );
    }
    o
}

pub(super) extern "C" fn exit_report_hook(_: *mut c_void) {
    if let Some(rt) = runtime::get() {
        let text = exit_report(rt);
        crate::stackfmt::write_all_fd(
            crate::fault::REPORT_FD.load(Ordering::Relaxed),
            text.as_bytes(),
        );
    }
}

// ---------------------------------------------------------------- introspection for tests and benches

/// The instructions of a variant's round trip (entry through `call`, then
/// return point through `ret`), decoded from the code itself. Used to
/// check the instruction budget.
pub fn round_trip_instructions(variant: Variant) -> Vec<iced_x86::Instruction> {
    round_trip_of(variant, false)
}

/// The same for the hardened variant (`IA2_HARDEN=on`).
pub fn hardened_round_trip_instructions(variant: Variant) -> Vec<iced_x86::Instruction> {
    round_trip_of(variant, true)
}

/// The hardware variant's return half (from its return point, which an
/// entry gate's cross path pushes, through `ret`).
pub fn entry_return_instructions(hardened: bool) -> Vec<iced_x86::Instruction> {
    let ret = if hardened {
        addr(ia2shim_gate_hwh_ret)
    } else {
        addr(ia2shim_gate_hw_ret)
    };
    decode_pieces(&[(ret, iced_x86::Mnemonic::Ret)])
}

/// A cross-compartment call through an entry gate on hardware, beyond the
/// function's own instructions: (instructions outside RDPKRU/WRPKRU, RDPKRU
/// and WRPKRU), decoded from a record built for a small function (entry
/// `jmp`, check, cross path, `jmp` back) and the variant's return half.
pub fn entry_round_trip(hardened: bool) -> (usize, usize) {
    let (n, pkru) = record_cross_path(hardened);
    let back = entry_return_instructions(hardened);
    let back_pkru = back
        .iter()
        .filter(|i| {
            matches!(
                i.mnemonic(),
                iced_x86::Mnemonic::Rdpkru | iced_x86::Mnemonic::Wrpkru
            )
        })
        .count();
    (n + back.len() - back_pkru, pkru + back_pkru)
}

/// A cross path for tests and counts: no counting, the hardware (or sim)
/// variant's return point, a made-up TLS offset.
pub(super) fn test_cross(backend: Backend, hardened: bool) -> CrossPath {
    let (code, ret) = match backend {
        Backend::Sim => Variant::Sim.entry_variant(),
        _ => Variant::Hardware.entry_variant(),
    };
    CrossPath {
        backend,
        tp: -0x68,
        count: false,
        open: hardened.then_some(!0b1100),
        code,
        ret,
    }
}

/// The instructions a cross-compartment call runs in a hardware record
/// outside RDPKRU/WRPKRU, beyond the function's own: the entry `jmp`, the
/// check up to its `jne`, the cross path through its `push`, and the `jmp`
/// back after the relocated instructions. Also the RDPKRU/WRPKRU count.
fn record_cross_path(hardened: bool) -> (usize, usize) {
    let f = 0x40_0000;
    let p = analyze(
        &[0x53, 0x48, 0x89, 0xfb, 0x48, 0x8d, 0x04, 0x5b, 0x5b, 0xc3],
        f,
        false,
    )
    .unwrap();
    let rec = 0x40_1000;
    let r = build_record(rec, &p, &test_cross(Backend::Hardware, hardened), 0x55, 1)
        .unwrap()
        .bytes;
    let decode_from = |at: usize| {
        iced_x86::Decoder::with_ip(
            64,
            &r[at - rec..],
            at as u64,
            iced_x86::DecoderOptions::NONE,
        )
        .into_iter()
    };
    let (mut n, mut pkru) = (1, 0); // the entry jmp
    let mut cross = 0;
    for i in decode_from(rec + 40) {
        match i.mnemonic() {
            iced_x86::Mnemonic::Rdpkru => pkru += 1,
            iced_x86::Mnemonic::Jne => {
                n += 1;
                cross = i.near_branch_target() as usize;
                break;
            }
            _ => n += 1,
        }
    }
    let mut relocated = 0;
    for i in decode_from(cross) {
        match i.mnemonic() {
            iced_x86::Mnemonic::Wrpkru => pkru += 1,
            iced_x86::Mnemonic::Jmp => {
                n += 1;
                assert_eq!(
                    i.near_branch_target() as usize,
                    p.end,
                    "back into the function"
                );
                break;
            }
            _ if (i.ip() as usize) > cross && relocated > 0 => {
                relocated += 1;
            }
            iced_x86::Mnemonic::Push if i.memory_base() == iced_x86::Register::RIP => {
                n += 1;
                relocated = 1;
            }
            _ => n += 1,
        }
    }
    assert_eq!(
        relocated - 1,
        p.insns.len(),
        "one copy of the relocated instructions"
    );
    (n, pkru)
}

fn decode_pieces(pieces: &[(usize, iced_x86::Mnemonic)]) -> Vec<iced_x86::Instruction> {
    let mut out = Vec::new();
    for &(from, stop_at) in pieces {
        // SAFETY: reading our own text; each piece is well under 256 bytes.
        let bytes = unsafe { core::slice::from_raw_parts(from as *const u8, 256) };
        let mut dec =
            iced_x86::Decoder::with_ip(64, bytes, from as u64, iced_x86::DecoderOptions::NONE);
        loop {
            let insn = dec.decode();
            out.push(insn);
            if insn.mnemonic() == stop_at {
                break;
            }
        }
    }
    out
}

fn round_trip_of(variant: Variant, hardened: bool) -> Vec<iced_x86::Instruction> {
    let (start, ret) = match (variant, hardened) {
        (Variant::Hardware, false) => (addr(ia2shim_gate_hw), addr(ia2shim_gate_hw_ret)),
        (Variant::HardwareCounting, false) => {
            (addr(ia2shim_gate_hwcount), addr(ia2shim_gate_hwcount_ret))
        }
        (Variant::Sim, false) => (addr(ia2shim_gate_sim), addr(ia2shim_gate_sim_ret)),
        (Variant::HardwareUnion, false) => {
            (addr(ia2shim_gate_hwunion), addr(ia2shim_gate_hwunion_ret))
        }
        (Variant::SimUnion, false) => {
            (addr(ia2shim_gate_simunion), addr(ia2shim_gate_simunion_ret))
        }
        (Variant::Hardware, true) => (addr(ia2shim_gate_hwh), addr(ia2shim_gate_hwh_ret)),
        (Variant::HardwareCounting, true) => {
            (addr(ia2shim_gate_hwcounth), addr(ia2shim_gate_hwcounth_ret))
        }
        (Variant::Sim, true) => (addr(ia2shim_gate_simh), addr(ia2shim_gate_simh_ret)),
        (Variant::HardwareUnion, true) => {
            (addr(ia2shim_gate_hwunionh), addr(ia2shim_gate_hwunionh_ret))
        }
        (Variant::SimUnion, true) => (
            addr(ia2shim_gate_simunionh),
            addr(ia2shim_gate_simunionh_ret),
        ),
    };
    // The stub (lea + jmp), the way in up to its call, the way out.
    decode_pieces(&[
        (stub_address(0), iced_x86::Mnemonic::Jmp),
        (start, iced_x86::Mnemonic::Call),
        (ret, iced_x86::Mnemonic::Ret),
    ])
}

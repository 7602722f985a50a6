//! Entry gates: prologue analysis, records built for synthetic functions in
//! mapped memory and run in sim mode, and the instruction counts.

use super::entry::*;
use super::tests::LOCK;
use super::*;
use crate::pku::{set_sim_pkru, sim_pkru};
use iced_x86::{Decoder, DecoderOptions, Mnemonic};

const ENDBR: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

#[test]
fn analysis_keeps_endbr64_and_refuses_what_it_cannot_patch() {
    let f = 0x10_0000;
    // endbr64; push rbx; mov rbx, rdi; lea rax, [rbx+rbx*2]; pop rbx; ret
    let mut ok = ENDBR.to_vec();
    ok.extend_from_slice(&[0x53, 0x48, 0x89, 0xfb, 0x48, 0x8d, 0x04, 0x5b, 0x5b, 0xc3]);
    let p = analyze(&ok, f, false).expect("patchable");
    assert_eq!(p.at, f + 4, "the jmp goes after endbr64");
    assert_eq!(p.end, f + 12, "push rbx, mov rbx, rdi (4 bytes), lea");
    // mov rax, rdi; ret: shorter than the jmp.
    let e = analyze(&[0x48, 0x89, 0xf8, 0xc3], f, false).err().unwrap();
    assert!(e.contains("too short"), "{e}");
    // push rbx; call rel32 (ends the window: relocated as push + jmp).
    let call = [0x53, 0xe8, 0, 0, 0, 0, 0x5b, 0xc3];
    assert_eq!(analyze(&call, f, false).unwrap().end, f + 6);
    // A loop back to the second instruction lands inside the jmp.
    // top: dec edi (2); test edi, edi (2); jne top+2 (2); ret
    let lp = [0xff, 0xcf, 0x85, 0xff, 0x75, 0xfc, 0xc3];
    let e = analyze(&lp, f, false).err().unwrap();
    assert!(e.contains("targets its first bytes"), "{e}");
    assert!(analyze(&[], f, false)
        .err()
        .unwrap()
        .contains("size is unknown"));
    // push rbp; mov rbp, rsp; mov eax, [rdi]: in audit mode a data access
    // would run (and be logged) from the record.
    let data = [0x55, 0x48, 0x89, 0xe5, 0x8b, 0x07, 0x5d, 0xc3];
    assert!(analyze(&data, f, false).is_ok());
    let e = analyze(&data, f, true).err().unwrap();
    assert!(e.contains("read or write memory"), "{e}");
    // Stack, RIP-relative and TLS accesses are fine: push rbp; mov rax,
    // fs:[28h]; mov [rsp+8], rax; ret.
    let ok = [
        0x55, 0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0, 0x48, 0x89, 0x44, 0x24, 0x08, 0xc3,
    ];
    assert!(analyze(&ok, f, true).is_ok());
}

/// Map `func` and an arena (code region, then counters) next to it, build
/// the record, patch the function's entry. Returns (function, record).
fn install(func: &[u8], code_len: usize, pkru: u32) -> (usize, usize) {
    let total = PAGE + 2 * TABLE_BYTES;
    // SAFETY: a fresh private anonymous mapping.
    let m = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as usize;
    assert_ne!(m as *mut c_void, libc::MAP_FAILED);
    let (f, rec) = (m, m + PAGE);
    // SAFETY: our fresh mapping.
    unsafe { core::ptr::copy_nonoverlapping(func.as_ptr(), f as *mut u8, func.len()) };
    // SAFETY: as above.
    // Only the code: data after it would decode as stray branches.
    let bytes = unsafe { core::slice::from_raw_parts(f as *const u8, code_len) };
    let p = analyze(bytes, f, false).unwrap();
    patch_tls();
    let tp = i32::try_from(frame_top_tpoff()).unwrap();
    let r = build_record(rec, &p, &CrossPath::current(Variant::Sim, tp), pkru, 1)
        .unwrap()
        .bytes;
    // SAFETY: our mapping; the record, then the jmp to its check.
    unsafe {
        core::ptr::copy_nonoverlapping(r.as_ptr(), rec as *mut u8, r.len());
        let rel = (rec + 40) as i64 - (p.at + 5) as i64;
        *(p.at as *mut u8) = 0xe9;
        core::ptr::write_unaligned((p.at + 1) as *mut i32, rel as i32);
        assert_eq!(
            libc::mprotect(
                m as *mut c_void,
                PAGE + TABLE_BYTES,
                libc::PROT_READ | libc::PROT_EXEC
            ),
            0
        );
    }
    (f, rec)
}

fn counter(rec: usize) -> u64 {
    // SAFETY: the record's counter word in the arena's counter region.
    unsafe { (*((rec + TABLE_BYTES) as *const AtomicU64)).load(Ordering::Relaxed) }
}

#[test]
fn an_entry_gate_switches_only_when_the_pkru_differs() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    pku::set_backend(Backend::Sim);
    thread_start();
    // endbr64; push rbx; mov rbx, rdi; lea rax, [rbx+rbx*2]; pop rbx; ret
    let mut code = ENDBR.to_vec();
    code.extend_from_slice(&[0x53, 0x48, 0x89, 0xfb, 0x48, 0x8d, 0x04, 0x5b, 0x5b, 0xc3]);
    let callee = pku::pkru_allowing(5);
    let (f, rec) = install(&code, code.len(), callee);
    // SAFETY: the patched function keeps the signature of the bytes above.
    let func: extern "C" fn(i64) -> i64 = unsafe { core::mem::transmute(f) };
    let top = stack_top();
    set_sim_pkru(callee);
    assert_eq!(func(7), 21, "same compartment: through the relocated body");
    assert_eq!(counter(rec), 0, "no gate on the same-compartment path");
    let caller = pku::pkru_allowing(9);
    set_sim_pkru(caller);
    assert_eq!(func(8), 24, "another compartment: through the gate");
    assert_eq!(counter(rec), 1);
    assert_eq!(sim_pkru(), caller, "the caller's PKRU is back");
    assert_eq!(stack_top(), top, "the gate frame was popped");
}

#[test]
fn a_call_in_the_overwritten_bytes_returns_into_the_function() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    pku::set_backend(Backend::Sim);
    thread_start();
    extern "C" fn plus_one(x: i64) -> i64 {
        x + 1
    }
    // The function and its callee are far apart, so build: push rbx;
    // mov rax, imm64 (plus_one); call rax... that is 12+ bytes before the
    // call: instead push rbx (1); call [rip+8] (6); pop rbx; ret; dq plus_one.
    let mut code = vec![0x53, 0xff, 0x15, 0x02, 0, 0, 0, 0x5b, 0xc3];
    code.extend_from_slice(&(plus_one as *const () as usize).to_le_bytes());
    let (f, rec) = install(&code, 9, pku::pkru_allowing(5));
    // SAFETY: push rbx; call plus_one; pop rbx; ret.
    let func: extern "C" fn(i64) -> i64 = unsafe { core::mem::transmute(f) };
    set_sim_pkru(pku::pkru_allowing(5));
    assert_eq!(func(41), 42);
    set_sim_pkru(pku::pkru_allowing(2));
    assert_eq!(func(1), 2);
    assert_eq!(counter(rec), 1);
}

/// Instructions a call runs through an entry gate beyond the function's
/// own: the entry `jmp`, the check, and the `jmp` back (same compartment);
/// the cross path adds the record's `lea`/`jmp` and the variant's round
/// trip in place of a pool stub's.
fn same_path(backend: Backend) -> (usize, usize) {
    let p = analyze(
        &[0x53, 0x48, 0x89, 0xfb, 0x48, 0x8d, 0x04, 0x5b, 0x5b, 0xc3],
        0x40_0000,
        false,
    )
    .unwrap();
    let rec = 0x40_1000;
    let r = build_record(rec, &p, &test_cross(backend, false), 0x55, 1)
        .unwrap()
        .bytes;
    let mut dec = Decoder::with_ip(64, &r[40..], (rec + 40) as u64, DecoderOptions::NONE);
    let (mut n, mut pkru) = (1, 0); // the entry jmp
    loop {
        let i = dec.decode();
        match i.mnemonic() {
            Mnemonic::Rdpkru => pkru += 1,
            Mnemonic::Jmp => {
                n += 1;
                break;
            }
            _ => n += 1,
        }
    }
    // Minus the relocated instructions, which the function runs anyway.
    (n - p.insns.len(), pkru)
}

#[test]
fn entry_gate_instruction_counts() {
    let (sim, sim_pkru_ops) = same_path(Backend::Sim);
    let (hw, hw_pkru_ops) = same_path(Backend::Hardware);
    eprintln!("same-compartment call through an entry gate: {sim} extra instructions (sim), {hw} + RDPKRU (hardware)");
    assert_eq!((sim, sim_pkru_ops), (4, 0));
    assert_eq!((hw, hw_pkru_ops), (11, 1));
    assert!(sim <= 8);
    // Cross path: the entry jmp, the check up to its jne, the record's
    // cross path (its relocated instructions are the function's own), the
    // jmp back, and the variant's return half.
    for hardened in [false, true] {
        let (cross, pkru_ops) = entry_round_trip(hardened);
        assert_eq!(
            pkru_ops,
            if hardened { 4 } else { 3 },
            "RDPKRU, WRPKRU (twice hardened) in; WRPKRU out"
        );
        let gate = if hardened {
            hardened_round_trip_instructions(Variant::Hardware)
        } else {
            round_trip_instructions(Variant::Hardware)
        };
        let gate = gate.len() - 3 - usize::from(hardened);
        eprintln!(
            "hardened {hardened}: cross-compartment call through an entry gate (hardware): {cross} outside \
             RDPKRU/WRPKRU; through a JUMP_SLOT GOT gate to its body: {}",
            gate + 1
        );
        assert_eq!(cross, if hardened { 36 } else { 30 });
        if !hardened {
            assert!(cross <= 30, "issue 14's budget");
        }
        assert_eq!(gate + 1, if hardened { 35 } else { 29 });
    }
}

/// A record whose prologue is copied by hand (`build_copied_record`, the
/// install's path without iced's encoder) holds the same instructions,
/// with the same targets, as the one iced's block encoder makes.
#[test]
fn copied_records_match_the_encoder() {
    let f = 0x7f00_0010_0000usize;
    let rec = f + 0x1000_0000;
    let cases: &[(&str, &[u8])] = &[
        // push rbp; mov rbp, rsp; sub rsp, 20h
        ("plain", &[0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x20]),
        // endbr64; push rbx; mov rax, [rip+1234h]
        (
            "rip",
            &[
                0xf3, 0x0f, 0x1e, 0xfa, 0x53, 0x48, 0x8b, 0x05, 0x34, 0x12, 0, 0,
            ],
        ),
        // cmp byte ptr [rip+100h], 0 (an immediate after the disp32)
        ("rip+imm", &[0x80, 0x3d, 0, 1, 0, 0, 0, 0x75, 0x10]),
        // test edi, edi; jne +10h; push rbx
        ("jcc rel8", &[0x85, 0xff, 0x75, 0x10, 0x53]),
        // jmp rel32 (a thunk)
        ("jmp rel32", &[0xe9, 0x00, 0x10, 0, 0]),
        // jmp rel8 after a nop
        ("jmp rel8", &[0x66, 0x90, 0x90, 0x90, 0xeb, 0x20]),
        // push rbx; call rel32
        ("call", &[0x53, 0xe8, 0x00, 0x20, 0, 0]),
        // test edi, edi; je rel32
        ("jcc rel32", &[0x85, 0xff, 0x0f, 0x84, 0x00, 0x01, 0, 0]),
        // xor eax, eax; nop; nop; ret
        ("ret", &[0x31, 0xc0, 0x90, 0x90, 0xc3]),
        // mov rax, [rdi]; jmp rax
        ("jmp reg", &[0x48, 0x8b, 0x07, 0x90, 0xff, 0xe0]),
    ];
    for &(what, prologue) in cases {
        let mut bytes = prologue.to_vec();
        bytes.extend_from_slice(&[0x5b, 0xc3]); // pop rbx; ret
        bytes.resize(0x300, 0xcc);
        let p = analyze(&bytes, f, false).unwrap_or_else(|e| panic!("{what}: {e}"));
        let shape = p
            .copy
            .clone()
            .unwrap_or_else(|| panic!("{what}: not copyable"));
        let cross = test_cross(Backend::Sim, false);
        let a = build_record(rec, &p, &cross, 0x55, 1).unwrap();
        let b = build_copied_record(
            rec,
            p.at,
            &bytes[p.at - f..p.end - f],
            &shape,
            &cross,
            0x55,
            1,
        )
        .unwrap();
        let decode = |r: &[u8]| {
            Decoder::with_ip(64, &r[40..], (rec + 40) as u64, DecoderOptions::NONE)
                .into_iter()
                .take_while(|i| i.mnemonic() != Mnemonic::Int3)
                .collect::<Vec<_>>()
        };
        assert_eq!(decode(&a.bytes), decode(&b.bytes), "{what}");
        assert_eq!(a.bytes[..40], b.bytes[..40], "{what}: entry and literal");
        let from = |r: &Record| r.origins.iter().map(|o| o.1).collect::<Vec<_>>();
        assert_eq!(from(&a), from(&b), "{what}: origins");
        // Origins name each instruction's start in both.
        let starts = |r: &Record| {
            let d = decode(&r.bytes);
            r.origins
                .iter()
                .filter(|o| o.1 != COPY_END)
                .all(|o| d.iter().any(|i| i.ip() as usize == o.0))
        };
        assert!(starts(&a) && starts(&b), "{what}");
    }
    // Forms the copy does not handle go to the encoder: call [rip+x].
    let mut bytes = vec![0x53, 0xff, 0x15, 0, 1, 0, 0, 0x5b, 0xc3];
    bytes.resize(0x40, 0xcc);
    assert!(analyze(&bytes, f, false).unwrap().copy.is_none());
}

//! Entry gates: callee-side gates on the exported functions of compartment
//! objects, so a function runs with its own compartment's rights however it
//! is reached (PLT/GOT, function pointer, vtable, `dlsym`, a callback from
//! libc or another compartment).
//!
//! For each exported (`STT_FUNC`, defined, not weak) function `F` of a
//! compartment object, the first instructions after an optional `endbr64`
//! are replaced by a `jmp rel32` to a per-function *record* in an arena
//! mapped within ±2 GiB of the object:
//!
//! | offset | contents |
//! |---|---|
//! | 0 | a gate table [`Entry`]: target = the relocated body below, variant, callee PKRU; then the variant's return point (the cross path's literal) |
//! | 32 | the return address of a relocated `call` (the original code after it) |
//! | 40 | the check: is PKRU the callee's? `jne cross` |
//! | | the relocated body: the overwritten instructions, `jmp F+n` |
//! | | cross: push a gate frame, switch PKRU, push the variant's return point, then the overwritten instructions again and `jmp F+n` |
//!
//! Same compartment: the check falls through into the relocated body and
//! back into `F` (sim: `jmp`, `cmp fs:[pkru], imm32`, `jne`, `jmp` back = 4
//! extra instructions; hardware: RDPKRU needs `eax`, `ecx`, `edx`, so three
//! registers are parked in the red zone and restored, every other register
//! untouched, because callers in the same object may rely on that: 11).
//! Another compartment: the cross path does inline what a gate variant
//! does, with the gate TLS offset and the callee's PKRU as constants: the
//! caller's return address, PKRU and `rbx` go to the gate-frame stack,
//! PKRU becomes the callee's, the arguments the check parked come back,
//! and the *variant's* return point is pushed as the callee's return
//! address before the overwritten instructions run and jump back into `F`.
//! So the return (the caller's PKRU back, the frame popped), unwinding and
//! the personality routine are the variant's, whose unwind tables describe
//! that frame, and records need no unwind tables of their own. Hardware:
//! 30 instructions in all outside RDPKRU/WRPKRU, 36 hardened (the record's
//! `lea`/`jmp` into a shared variant and its GOT-relative TLS loads cost 4
//! more before). A thread's first gate faults on the cross path's first
//! frame store when it has no gate-frame stack yet, as the variants' do,
//! and the SIGSEGV handler recognises the store by its bytes inside an
//! arena ([`record_fix_register`]).
//! The counting variants find the record's call counter at
//! `record + TABLE_BYTES`: an arena is a code region of `TABLE_BYTES`
//! followed by a counter region of the same size.
//!
//! A function is refused (and listed in the plan with the reason) when its
//! size is unknown, it is shorter than the `jmp`, its first bytes hold a
//! call, jump or return, a direct branch of the function targets the
//! overwritten bytes past their first, or the relocated code cannot be
//! encoded. Calls into a refused function through another compartment's
//! GOT keep a GOT gate. Weak definitions (mostly C++ vague linkage, bound
//! to one object's copy for every object) and the executable's entry point
//! (`_start`, entered after the shim's constructor without a return
//! address) are left alone.
//!
//! Arena pages are written while read-write and then made read-execute,
//! and never written again (each batch starts on a fresh page). While the
//! process has never created a thread (start-up, and `dlopen` in a
//! single-threaded program) a batch's text pages are made read-write (not
//! executable) for its writes, with signals blocked, since no code can run
//! from them meanwhile ([`TextWindow`]). Otherwise text is patched through
//! `/proc/self/mem`, which writes through the page's protection without
//! ever making it writable, so a thread running other code on the same
//! page never faults; the 5-byte `jmp` is written as one aligned 8-byte
//! word where it fits in one. Without `/proc/self/mem` the page is made
//! read-write (not executable) for the write.
//!
//! Installing needs no iced tables on a warm run: the analysis of each
//! function is kept by build-id (`entry_cache.rs`), and prologues whose
//! instructions are plain, RIP-relative or direct branches are copied
//! into the record by hand ([`build_copied_record`]).

use super::*;
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Instruction,
    InstructionBlock, MemoryOperand, Register,
};

const JMP_LEN: usize = 5;
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// The code region of an arena; the counters follow at `+TABLE_BYTES`.
const ARENA_CODE: usize = TABLE_BYTES;
const ARENA_BYTES: usize = 2 * TABLE_BYTES;
/// How far a `rel32` may reach, with a margin.
const REACH: usize = (1 << 31) - (1 << 20);
const ENTRY_BYTES: usize = core::mem::size_of::<Entry>();
const RECORD_ALIGN: usize = 32;

/// How an entry gate was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// An exported function (`.dynsym`).
    Exported,
    /// A function whose code faulted on its own compartment's data while
    /// running with another's rights (`fault_gate.rs`).
    FaultDriven,
}

impl core::fmt::Display for Found {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Found::Exported => write!(f, "exported entry"),
            Found::FaultDriven => write!(f, "fault-driven"),
        }
    }
}

/// One entry gate.
#[derive(Clone, Debug)]
pub struct EntryGate {
    /// The function's address (unchanged: pointers to it stay equal).
    pub function: usize,
    /// Its record in an arena (the gate table entry; the check follows).
    pub record: usize,
    /// The relocated first instructions (then a `jmp` into the function):
    /// the record's gate target, and the target of `JUMP_SLOT` GOT gates.
    pub body: usize,
    pub compartment: u8,
    pub symbol: String,
    /// The object's name, one allocation shared by its gates.
    pub callee: std::sync::Arc<str>,
    pub found: Found,
    pub variant: Variant,
    pub dead: bool,
    /// (address in the record, address in the function) per relocated instruction.
    pub origins: Vec<(usize, usize)>,
}

/// A GOT slot of another compartment that reaches an entry gate (not
/// patched: the callee switches).
#[derive(Clone, Debug)]
pub struct EntrySlot {
    pub entry: usize,
    pub caller: String,
    pub caller_compartment: u8,
    pub slot: usize,
    pub via: Via,
}

/// An exported function that did not get an entry gate, and why.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub symbol: String,
    pub object: String,
    pub compartment: u8,
    pub address: usize,
    pub reason: String,
}

/// A mapping that holds records (code region, then counters).
pub(super) struct Arena {
    base: usize,
    /// Bytes of the code region handed out (page-rounded after each batch).
    used: usize,
}

/// The cross-compartment calls made through an entry gate so far.
pub fn entry_calls(e: &EntryGate) -> u64 {
    // SAFETY: the counter word of a record lies in its arena's counter
    // region (read-write; arenas are never unmapped).
    unsafe { (*((e.record + TABLE_BYTES) as *const AtomicU64)).load(Ordering::Relaxed) }
}

// ---------------------------------------------------------------- analysis

/// The overwritten instructions of a function.
pub(super) struct Prologue {
    /// Where the `jmp` goes: the entry, or right after `endbr64`.
    pub(super) at: usize,
    pub(super) insns: Vec<Instruction>,
    /// The first byte after them.
    pub(super) end: usize,
    /// When no overwritten instruction branches: (length, offset of its
    /// RIP-relative disp32 or 0) of each, so the record can hold a copy
    /// with only displacements adjusted, without iced's encoder.
    pub(super) copy: Option<Vec<(u8, u8)>>,
}

/// An instruction of the function at `f` (whose text is `bytes`) as its
/// bytes in hex, for a plan line. Not iced's `Debug` names: those tables
/// are ~110 KB of relocated pointers that every process would load.
fn insn_bytes(bytes: &[u8], f: usize, i: &Instruction) -> String {
    let at = i.ip() as usize - f;
    let b = bytes.get(at..at + i.len()).unwrap_or_default();
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("bytes {}", hex.join(" "))
}

/// Can the function at `f` (of `size` bytes, readable) take a `jmp`, and
/// which instructions does it overwrite?
///
/// `exact_sites` (audit mode) refuses first instructions that access data
/// through a register: their copies run from the arena, and audit mode
/// logs each site by its instruction address. (Fault reports name the
/// function's code through [`relocated_origin`].)
pub(super) fn analyze(bytes: &[u8], f: usize, exact_sites: bool) -> Result<Prologue, String> {
    let size = bytes.len();
    if size == 0 {
        return Err("its size is unknown (st_size 0)".into());
    }
    let skip = if bytes.starts_with(&ENDBR64) { 4 } else { 0 };
    let at = f + skip;
    let mut dec = Decoder::with_ip(64, &bytes[skip..], at as u64, DecoderOptions::NONE);
    let mut insns = Vec::new();
    let mut copy = Some(Vec::new());
    let mut end = at;
    while end < at + JMP_LEN {
        if !dec.can_decode() {
            return Err(format!("too short ({size} bytes) for a {JMP_LEN}-byte jmp"));
        }
        let i = dec.decode();
        if i.is_invalid() {
            return Err("its first bytes do not decode".into());
        }
        let next = i.next_ip() as usize;
        match i.flow_control() {
            FlowControl::Next | FlowControl::ConditionalBranch => {}
            // A call, jump or return can end the overwritten bytes: a call
            // is relocated as `push F+n; jmp target`, so the callee returns
            // into the original code and unwinds through it.
            FlowControl::Call
            | FlowControl::IndirectCall
            | FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::Return
                if next >= at + JMP_LEN =>
            {
                if matches!(
                    i.flow_control(),
                    FlowControl::Call | FlowControl::IndirectCall
                ) && !matches!(i.code(), Code::Call_rel32_64 | Code::Call_rm64)
                {
                    return Err(format!(
                        "its first bytes hold a call it cannot relocate ({})",
                        insn_bytes(bytes, f, &i)
                    ));
                }
            }
            _ => {
                return Err(format!(
                    "too short for a {JMP_LEN}-byte jmp before its first branch or return ({})",
                    insn_bytes(bytes, f, &i)
                ))
            }
        }
        // The relocated copies run from the arena: in audit mode, a site
        // there would be logged at an address that is in no object.
        if exact_sites && touches_data(&i) {
            return Err(format!(
                "its first bytes read or write memory through a register ({})",
                insn_bytes(bytes, f, &i)
            ));
        }
        if let Some(c) = copy.as_mut() {
            match copyable(&dec, &i) {
                Some(disp) => c.push((i.len() as u8, disp)),
                None => copy = None,
            }
        }
        end = next;
        insns.push(i);
    }
    // A direct branch into the overwritten bytes, past their first, would
    // land inside the jmp. (Indirect branches into a prologue are not
    // something compilers emit.)
    let mut dec = Decoder::with_ip(64, bytes, f as u64, DecoderOptions::NONE);
    while dec.can_decode() {
        let i = dec.decode();
        if i.is_invalid() {
            continue;
        }
        if matches!(
            i.flow_control(),
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
        ) {
            let t = i.near_branch_target() as usize;
            if t > at && t < end {
                return Err(format!(
                    "the branch at +{:#x} targets its first bytes (+{:#x})",
                    i.ip() as usize - f,
                    t - f
                ));
            }
        }
    }
    Ok(Prologue {
        at,
        insns,
        end,
        copy,
    })
}

/// How an overwritten instruction moves into a record without iced's
/// encoder ([`Prologue::copy`]'s second number): [`COPY_AS_IS`], `1..=15`
/// (a RIP-relative disp32 at that offset in the instruction, adjusted),
/// [`COPY_REL32`], [`COPY_REL8`] or [`COPY_ENDS`].
pub(super) const COPY_AS_IS: u8 = 0;
/// `jmp`/`jcc`/`call rel32` (no prefix): the rel32 adjusted; a `call`
/// becomes `push [return literal]; jmp`, as the encoder path does.
pub(super) const COPY_REL32: u8 = 0x80;
/// `jmp`/`jcc rel8` (no prefix): widened to rel32.
pub(super) const COPY_REL8: u8 = 0x81;
/// A return or an indirect jump that is not IP-relative: copied, and no
/// `jmp` back follows it.
pub(super) const COPY_ENDS: u8 = 0x82;

/// Can `i` run from a copy of its bytes elsewhere, and how (the `COPY_*`
/// kinds)? `None`: another IP-dependent form, for iced's encoder.
fn copyable(dec: &Decoder<'_>, i: &Instruction) -> Option<u8> {
    let len = i.len();
    match i.flow_control() {
        FlowControl::Next if !i.is_ip_rel_memory_operand() => Some(COPY_AS_IS),
        FlowControl::Next => {
            let co = dec.get_constant_offsets(i);
            (i.memory_base() == Register::RIP
                && co.has_displacement()
                && co.displacement_size() == 4)
                .then_some(co.displacement_offset() as u8)
                .filter(|&k| (1..=15).contains(&k))
        }
        FlowControl::Return | FlowControl::IndirectBranch if !i.is_ip_rel_memory_operand() => {
            Some(COPY_ENDS)
        }
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call => {
            let c = i.code();
            if (c == Code::Jmp_rel32_64 || c == Code::Call_rel32_64) && len == 5
                || c.is_jcc_near() && len == 6
            {
                Some(COPY_REL32)
            } else if c == Code::Jmp_rel8_64 || c.is_jcc_short() && len == 2 {
                (len == 2).then_some(COPY_REL8)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Does `i` access memory other than the stack (`rsp`), RIP-relative data
/// or TLS (`fs`/`gs`)?
fn touches_data(i: &Instruction) -> bool {
    use iced_x86::OpKind;
    if i.mnemonic() == iced_x86::Mnemonic::Lea || i.mnemonic() == iced_x86::Mnemonic::Nop {
        return false;
    }
    (0..i.op_count()).any(|k| match i.op_kind(k) {
        OpKind::Memory => {
            let seg = i.memory_segment();
            let base = i.memory_base();
            !(seg == Register::FS
                || seg == Register::GS
                || base == Register::RSP
                || base == Register::RIP)
        }
        OpKind::MemorySegSI
        | OpKind::MemorySegESI
        | OpKind::MemorySegRSI
        | OpKind::MemorySegDI
        | OpKind::MemorySegEDI
        | OpKind::MemorySegRDI
        | OpKind::MemoryESDI
        | OpKind::MemoryESEDI
        | OpKind::MemoryESRDI => true,
        _ => false,
    })
}

// ---------------------------------------------------------------- records

/// The check's bytes for the backend, the rel32 of its `jne cross` zero
/// (see [`jne_end`]).
fn check_bytes(backend: Backend, pkru: u32, sim_tpoff: i32) -> Vec<u8> {
    let mut c = Vec::with_capacity(48);
    match backend {
        Backend::Sim => {
            // cmp dword ptr fs:[tpoff], imm32
            c.extend_from_slice(&[0x64, 0x81, 0x3c, 0x25]);
            c.extend_from_slice(&sim_tpoff.to_le_bytes());
            c.extend_from_slice(&pkru.to_le_bytes());
        }
        _ => {
            // Every register survives the check, r10 and r11 included:
            // with GCC's interprocedural register allocation (-fipa-ra) a
            // caller in the same object keeps values in registers the ABI
            // calls clobbered when it knows the callee leaves them alone
            // (python3's interpreter does). The red zone below the return
            // address is the callee's to use.
            c.extend_from_slice(&[0x48, 0x89, 0x44, 0x24, 0xf8]); // mov [rsp-8], rax
            c.extend_from_slice(&[0x48, 0x89, 0x4c, 0x24, 0xf0]); // mov [rsp-16], rcx
            c.extend_from_slice(&[0x48, 0x89, 0x54, 0x24, 0xe8]); // mov [rsp-24], rdx
            c.extend_from_slice(&[0x31, 0xc9]); // xor ecx, ecx
            c.extend_from_slice(&[0x0f, 0x01, 0xee]); // rdpkru
            c.push(0x3d); // cmp eax, imm32
            c.extend_from_slice(&pkru.to_le_bytes());
            // The cross path keeps them parked and eax = the caller's PKRU
            // for the cross path; the same-compartment path restores.
            c.extend_from_slice(&[0x0f, 0x85, 0, 0, 0, 0]); // jne cross
            c.extend_from_slice(&[0x48, 0x8b, 0x44, 0x24, 0xf8]); // mov rax, [rsp-8]
            c.extend_from_slice(&[0x48, 0x8b, 0x4c, 0x24, 0xf0]); // mov rcx, [rsp-16]
            c.extend_from_slice(&[0x48, 0x8b, 0x54, 0x24, 0xe8]); // mov rdx, [rsp-24]
            return c;
        }
    }
    c.extend_from_slice(&[0x0f, 0x85, 0, 0, 0, 0]); // jne cross
    c
}

/// Where the `jne cross` of [`check_bytes`] ends (its rel32 is the 4 bytes
/// before): last in sim mode, before the three restores on hardware.
fn jne_end(backend: Backend, check: &[u8]) -> usize {
    match backend {
        Backend::Sim => check.len(),
        _ => check.len() - 15,
    }
}

/// How a record's cross path switches compartments, and where it returns.
#[derive(Clone, Copy, Debug)]
pub(super) struct CrossPath {
    pub(super) backend: Backend,
    /// The `fs:` offset of the gate TLS words: the frame-stack top, then
    /// the simulated PKRU at `+ 8`.
    pub(super) tp: i32,
    /// Count calls in the record's counter (`IA2_REPORT=gates`; sim always).
    pub(super) count: bool,
    /// `IA2_HARDEN=on` (hardware): the mask that opens the shim key for
    /// the frame writes.
    pub(super) open: Option<u32>,
    /// The variant whose return point the cross path pushes: its head (the
    /// record's `Entry::code`, for reports) and that return point.
    pub(super) code: usize,
    pub(super) ret: usize,
}

impl CrossPath {
    /// The cross path for `variant` (never a union one) as installed now.
    pub(super) fn current(variant: Variant, tp: i32) -> CrossPath {
        let backend = pku::backend();
        let hardened = HARDEN.load(Ordering::Relaxed);
        let (code, ret) = variant.entry_variant();
        CrossPath {
            backend,
            tp,
            count: variant.counts(),
            open: (hardened && backend != Backend::Sim).then(open_mask),
            code,
            ret,
        }
    }
}

/// `rel32` from the end of an instruction at `next` to `target`.
fn rel32_to(target: usize, next: usize) -> i32 {
    (target as i64 - next as i64) as i32
}

/// The cross path's code up to the relocated instructions, for a record at
/// `rec` whose cross path starts at `at`: count, push a gate frame (the
/// caller's return address, `rbx` and PKRU), switch to the callee's PKRU,
/// take the parked arguments back, and push the variant's return point as
/// the callee's return address, so that the return, unwinding and the
/// personality routine are the variant's (whose unwind tables describe
/// this frame). The relocated instructions and `jmp F+n` follow. What the
/// shared entry variants did after the record's `lea r11`/`jmp [r11 + 8]`,
/// with the TLS offset and PKRU as constants (4 instructions fewer).
fn cross_bytes(c: &CrossPath, rec: usize, at: usize, pkru: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(96);
    let tp = c.tp.to_le_bytes();
    let sim = c.backend == Backend::Sim;
    if c.count || sim {
        // lock inc qword ptr [rip + counter]
        b.extend_from_slice(&[0xf0, 0x48, 0xff, 0x05]);
        let next = at + b.len() + 4;
        b.extend_from_slice(&rel32_to(rec + TABLE_BYTES, next).to_le_bytes());
    }
    let hardened = c.open.filter(|_| !sim);
    if let Some(mask) = hardened {
        // Check left eax = the caller's PKRU, ecx = edx = 0: open the shim
        // key (the frame region's) for the frame writes.
        b.extend_from_slice(&[0x41, 0x89, 0xc2]); // mov r10d, eax
        b.push(0x25); // and eax, imm32
        b.extend_from_slice(&mask.to_le_bytes());
        b.extend_from_slice(&[0x0f, 0x01, 0xef]); // wrpkru
    }
    b.extend_from_slice(&[0x64, 0x48, 0x83, 0x04, 0x25]); // add qword ptr fs:[tp], FRAME
    b.extend_from_slice(&tp);
    b.push(FRAME as u8);
    if hardened.is_some() {
        b.extend_from_slice(&[0x64, 0x48, 0x8b, 0x04, 0x25]); // mov rax, fs:[tp]
        b.extend_from_slice(&tp);
        b.extend_from_slice(&RECORD_FIX_RAX); // mov [rax - FRAME + 40], rbx
        b.extend_from_slice(&[0x48, 0x8d, 0x58, 0xc0]); // lea rbx, [rax - FRAME]
    } else {
        b.extend_from_slice(&[0x64, 0x4c, 0x8b, 0x14, 0x25]); // mov r10, fs:[tp]
        b.extend_from_slice(&tp);
        b.extend_from_slice(&RECORD_FIX_R10); // mov [r10 - FRAME + 40], rbx
        b.extend_from_slice(&[0x49, 0x8d, 0x5a, 0xc0]); // lea rbx, [r10 - FRAME]
    }
    b.extend_from_slice(&[0x8f, 0x03]); // pop qword ptr [rbx]
    if sim {
        b.extend_from_slice(&[0x48, 0x89, 0x43, 0x08]); // mov [rbx + 8], rax
        b.extend_from_slice(&[0x64, 0x8b, 0x04, 0x25]); // mov eax, fs:[tp + 8]
        b.extend_from_slice(&(c.tp + 8).to_le_bytes());
        b.extend_from_slice(&[0x89, 0x43, 0x20]); // mov [rbx + 32], eax
        b.extend_from_slice(&[0x64, 0xc7, 0x04, 0x25]); // mov dword ptr fs:[tp + 8], imm32
        b.extend_from_slice(&(c.tp + 8).to_le_bytes());
        b.extend_from_slice(&pkru.to_le_bytes());
        b.extend_from_slice(&[0x48, 0x8b, 0x43, 0x08]); // mov rax, [rbx + 8]
    } else {
        if hardened.is_some() {
            b.extend_from_slice(&[0x44, 0x89, 0x53, 0x20]); // mov [rbx + 32], r10d
        } else {
            b.extend_from_slice(&[0x89, 0x43, 0x20]); // mov [rbx + 32], eax
        }
        b.push(0xb8); // mov eax, imm32
        b.extend_from_slice(&pkru.to_le_bytes());
        b.extend_from_slice(&[0x0f, 0x01, 0xef]); // wrpkru
                                                  // The check parked rax, rcx, rdx at [rsp - 8/16/24] before the pop.
        b.extend_from_slice(&[0x48, 0x8b, 0x44, 0x24, 0xf0]); // mov rax, [rsp - 16]
        b.extend_from_slice(&[0x48, 0x8b, 0x4c, 0x24, 0xe8]); // mov rcx, [rsp - 24]
        b.extend_from_slice(&[0x48, 0x8b, 0x54, 0x24, 0xe0]); // mov rdx, [rsp - 32]
    }
    // push qword ptr [rip + record + RET_LIT]: the variant's return point
    b.extend_from_slice(&[0xff, 0x35]);
    let next = at + b.len() + 4;
    b.extend_from_slice(&rel32_to(rec + RET_LIT, next).to_le_bytes());
    b
}

/// The cross path's first frame store (`mov [r10 - 24], rbx`; hardened
/// hardware: `mov [rax - 24], rbx`), which faults on a thread's first gate
/// when it has no gate-frame stack yet ([`record_fix_register`]).
const RECORD_FIX_R10: [u8; 4] = [0x49, 0x89, 0x5a, 0xe8];
const RECORD_FIX_RAX: [u8; 4] = [0x48, 0x89, 0x58, 0xe8];
const _: () = assert!(
    FRAME == 64,
    "the fix stores encode [reg - FRAME + 40] as disp8 -24"
);

/// Where a record keeps the variant return point its cross path pushes
/// (the `Entry`'s reserved word).
const RET_LIT: usize = 24;

/// The shim key's open mask (the meta page's; fixed before any record).
fn open_mask() -> u32 {
    // SAFETY: written once by `frames::harden` before the first gate.
    unsafe { (*GATE_MEM.meta.get()).open_mask }
}

/// Code regions of the arenas that hold records, for the fault handler:
/// arenas are never unmapped, so this only grows. (base, end) pairs.
// Large: with the other large statics (sealed.ld).
#[link_section = ".bss.ia2shim_large"]
static ARENA_RANGES: [[core::sync::atomic::AtomicUsize; 2]; 256] = [const {
    [
        core::sync::atomic::AtomicUsize::new(0),
        core::sync::atomic::AtomicUsize::new(0),
    ]
}; 256];
static ARENA_COUNT: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

fn note_arena(base: usize, end: usize) {
    let i = ARENA_COUNT.load(Ordering::Relaxed);
    if i < ARENA_RANGES.len() {
        ARENA_RANGES[i][0].store(base, Ordering::Relaxed);
        ARENA_RANGES[i][1].store(end, Ordering::Relaxed);
        ARENA_COUNT.store(i + 1, Ordering::Release);
    }
}

/// Is `rip` a record's cross-path first frame store, and which register
/// holds the reserved top there? For the first-gate fix-up in the SIGSEGV
/// handler: never blocks, never allocates.
pub(super) fn record_fix_register(rip: usize, tp: i32) -> Option<usize> {
    let n = ARENA_COUNT.load(Ordering::Acquire);
    let inside = ARENA_RANGES[..n.min(ARENA_RANGES.len())].iter().any(|r| {
        let (lo, hi) = (r[0].load(Ordering::Relaxed), r[1].load(Ordering::Relaxed));
        rip >= lo + 9 && rip + 4 <= hi
    });
    if !inside {
        return None;
    }
    // SAFETY: rip and the 9 bytes before it lie in an arena's code region
    // (mapped, readable: sealed read-execute).
    let (load, store) = unsafe {
        (
            core::slice::from_raw_parts((rip - 9) as *const u8, 9),
            core::slice::from_raw_parts(rip as *const u8, 4),
        )
    };
    if load[5..9] != tp.to_le_bytes() {
        return None;
    }
    match (&load[..5], store) {
        ([0x64, 0x4c, 0x8b, 0x14, 0x25], s) if s == RECORD_FIX_R10 => Some(libc::REG_R10 as usize),
        ([0x64, 0x48, 0x8b, 0x04, 0x25], s) if s == RECORD_FIX_RAX => Some(libc::REG_RAX as usize),
        _ => None,
    }
}

/// A record's bytes, and where each relocated instruction came from.
pub(super) struct Record {
    pub(super) bytes: Vec<u8>,
    /// (address in the record, address in the function) per relocated
    /// instruction, so that a fault report names the function's code.
    pub(super) origins: Vec<(usize, usize)>,
}

/// The record for a function at address `rec` (entry, check, relocated
/// body, cross path), padded to [`RECORD_ALIGN`].
pub(super) fn build_record(
    rec: usize,
    p: &Prologue,
    cross: &CrossPath,
    pkru: u32,
    compartment: u8,
) -> Result<Record, String> {
    let head = RecordHead {
        rec,
        end: p.end,
        cross: *cross,
        pkru,
        compartment,
    };
    head.assemble(|body, ret_lit| {
        let mut block = p.insns.clone();
        let bad =
            |e: iced_x86::IcedError| format!("its first instructions cannot be relocated: {e}");
        let last = *block.last().expect("at least one instruction");
        let back = match last.flow_control() {
            FlowControl::Call | FlowControl::IndirectCall => {
                // call X  =>  push qword ptr [ret_lit]; jmp X
                let mut jmp = last;
                jmp.set_code(if last.code() == Code::Call_rel32_64 {
                    Code::Jmp_rel32_64
                } else {
                    Code::Jmp_rm64
                });
                let push = Instruction::with1(
                    Code::Push_rm64,
                    MemoryOperand::with_base_displ(Register::RIP, ret_lit as i64),
                )
                .map_err(bad)?;
                let n = block.len();
                block[n - 1] = push;
                block.push(jmp);
                false
            }
            FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::Return => false,
            _ => true,
        };
        let enc = BlockEncoder::encode(
            64,
            InstructionBlock::new(&block, body as u64),
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .map_err(bad)?;
        let mut origins = Vec::with_capacity(p.insns.len() + 1);
        for (k, &off) in enc.new_instruction_offsets.iter().enumerate() {
            // The last original instruction may have become two (push + jmp).
            let from = p.insns[k.min(p.insns.len() - 1)].ip() as usize;
            if off != u32::MAX {
                origins.push((body + off as usize, from));
            }
        }
        let mut code = enc.code_buffer;
        if back {
            // `jmp F+n`, encoded here: iced's `Instruction::with_branch`
            // builds a 2.7 M-instruction table on first use. Named, as
            // before, by the last relocated instruction.
            origins.push((body + code.len(), p.insns[p.insns.len() - 1].ip() as usize));
            push_jmp(&mut code, body, p.end);
        }
        Ok((code, origins))
    })
}

/// The record for a function whose overwritten instructions are copied
/// ([`Prologue::copy`]: `shape`, `original` their bytes from `at`), each
/// RIP-relative displacement and branch adjusted by the distance moved,
/// then `jmp F+n` unless the last one ends the flow. What iced's encoder
/// does for these forms, without its tables (2.7 M instructions).
#[allow(clippy::too_many_arguments)]
pub(super) fn build_copied_record(
    rec: usize,
    at: usize,
    original: &[u8],
    shape: &[(u8, u8)],
    cross: &CrossPath,
    pkru: u32,
    compartment: u8,
) -> Result<Record, String> {
    let end = at + original.len();
    let head = RecordHead {
        rec,
        end,
        cross: *cross,
        pkru,
        compartment,
    };
    let far = || "its first instructions cannot be relocated: a target out of reach".to_string();
    let rel32 =
        |target: usize, next: usize| i32::try_from(target as i64 - next as i64).map_err(|_| far());
    head.assemble(|body, ret_lit| {
        let mut code = Vec::with_capacity(original.len() + 16);
        let mut origins = Vec::with_capacity(shape.len() + 1);
        let (mut from, mut back) = (0usize, true);
        for &(len, kind) in shape {
            let len = len as usize;
            let insn = original.get(from..from + len).ok_or_else(|| {
                "its first instructions cannot be relocated: lengths disagree".to_string()
            })?;
            let (old_ip, new_ip) = (at + from, body + code.len());
            origins.push((new_ip, old_ip));
            match kind {
                COPY_AS_IS => code.extend_from_slice(insn),
                COPY_ENDS => {
                    code.extend_from_slice(insn);
                    back = false;
                }
                COPY_REL32 | COPY_REL8 => {
                    let rel = if kind == COPY_REL32 {
                        i32::from_le_bytes(insn[len - 4..].try_into().expect("4 bytes")) as i64
                    } else {
                        insn[1] as i8 as i64
                    };
                    let target = (old_ip + len).wrapping_add_signed(rel as isize);
                    let op = insn[0];
                    if op == 0xe8 {
                        // call X  =>  push qword ptr [ret_lit]; jmp X
                        let disp = rel32(ret_lit, new_ip + 6)?;
                        code.extend_from_slice(&[0xff, 0x35]);
                        code.extend_from_slice(&disp.to_le_bytes());
                        origins.push((body + code.len(), old_ip));
                        let r = rel32(target, body + code.len() + 5)?;
                        code.push(0xe9);
                        code.extend_from_slice(&r.to_le_bytes());
                        back = false;
                    } else if op == 0xe9 || op == 0xeb {
                        let r = rel32(target, new_ip + 5)?;
                        code.push(0xe9);
                        code.extend_from_slice(&r.to_le_bytes());
                        back = false;
                    } else {
                        // jcc: 0f 8x rel32 (from 7x rel8 or 0f 8x rel32)
                        let cc = if op == 0x0f {
                            insn[1] & 0x0f
                        } else {
                            op & 0x0f
                        };
                        let r = rel32(target, new_ip + 6)?;
                        code.extend_from_slice(&[0x0f, 0x80 | cc]);
                        code.extend_from_slice(&r.to_le_bytes());
                    }
                }
                d => {
                    let d = d as usize;
                    let mut copy = insn.to_vec();
                    let old = i32::from_le_bytes(copy[d..d + 4].try_into().expect("4 bytes"));
                    // Same length, so the target moves by the distance moved.
                    let new = i32::try_from(i64::from(old) + old_ip as i64 - new_ip as i64)
                        .map_err(|_| far())?;
                    copy[d..d + 4].copy_from_slice(&new.to_le_bytes());
                    code.extend_from_slice(&copy);
                }
            }
            from += len;
        }
        if from != original.len() {
            return Err("its first instructions cannot be relocated: lengths disagree".into());
        }
        if back {
            // Named, as in the encoder path, by the last relocated instruction.
            let last = origins.last().map_or(at, |o| o.1);
            origins.push((body + code.len(), last));
            push_jmp(&mut code, body, end);
        }
        Ok((code, origins))
    })
}

/// Append `jmp rel32` to `target`, for code placed at `code_at`.
fn push_jmp(code: &mut Vec<u8>, code_at: usize, target: usize) {
    let next = code_at + code.len() + JMP_LEN;
    let rel = (target as i64 - next as i64) as i32;
    code.push(0xe9);
    code.extend_from_slice(&rel.to_le_bytes());
}

/// What a record holds besides its relocated body.
struct RecordHead {
    rec: usize,
    /// The first byte after the overwritten instructions.
    end: usize,
    cross: CrossPath,
    pkru: u32,
    compartment: u8,
}

/// An `origins` entry that ends a copy of the relocated instructions.
pub(super) const COPY_END: usize = usize::MAX;

impl RecordHead {
    /// The record, with `body(address, return-literal address)`'s code and
    /// origins as its relocated instructions, twice: the body that the
    /// check falls through to (and `JUMP_SLOT` GOT gates target), and the
    /// end of the cross path.
    fn assemble(
        &self,
        body: impl Fn(usize, usize) -> Result<(Vec<u8>, Vec<(usize, usize)>), String>,
    ) -> Result<Record, String> {
        let rec = self.rec;
        let c = &self.cross;
        // The entry (its reserved word: the variant's return point), then
        // the return address of a relocated call. Sized for a typical
        // record at once: growing it cost a reallocation per step.
        let mut out = Vec::with_capacity(256);
        out.resize(ENTRY_BYTES, 0u8);
        let ret_lit = rec + out.len();
        out.extend_from_slice(&self.end.to_le_bytes());
        let check = check_bytes(c.backend, self.pkru, c.tp + 8);
        out.extend_from_slice(&check);
        let jne_end = out.len() - check.len() + jne_end(c.backend, &check);
        let body_at = rec + out.len();
        let (code, mut origins) = body(body_at, ret_lit)?;
        out.extend_from_slice(&code);
        origins.push((rec + out.len(), COPY_END));
        let cross = out.len();
        let rel = (cross - jne_end) as i32;
        out[jne_end - 4..jne_end].copy_from_slice(&rel.to_le_bytes());
        out.extend_from_slice(&cross_bytes(c, rec, rec + cross, self.pkru));
        let (code, more) = body(rec + out.len(), ret_lit)?;
        out.extend_from_slice(&code);
        origins.extend(more);
        origins.push((rec + out.len(), COPY_END));
        while out.len() % RECORD_ALIGN != 0 {
            out.push(0xcc);
        }
        let e = Entry {
            target: body_at,
            code: c.code,
            pkru: self.pkru,
            compartment: self.compartment as u32,
            _reserved: 0,
        };
        out[0..8].copy_from_slice(&e.target.to_le_bytes());
        out[8..16].copy_from_slice(&e.code.to_le_bytes());
        out[16..20].copy_from_slice(&e.pkru.to_le_bytes());
        out[20..24].copy_from_slice(&e.compartment.to_le_bytes());
        out[RET_LIT..RET_LIT + 8].copy_from_slice(&c.ret.to_le_bytes());
        Ok(Record {
            bytes: out,
            origins,
        })
    }
}

/// The function address that the relocated instruction at `addr` (in an
/// entry gate's record) was copied from, for fault reports. Never blocks
/// (a signal handler asks).
pub fn relocated_origin(addr: usize) -> Option<usize> {
    let st = STATE.try_lock().ok()?;
    let (_, &i) = st.entry_by_record.range(..=addr).next_back()?;
    let e = st.entries.get(i)?;
    e.origins
        .iter()
        .rev()
        .find(|&&(at, _)| at <= addr)
        .filter(|&&(_, from)| from != COPY_END)
        .map(|&(at, from)| from + (addr - at))
}

/// The function whose relocated body starts at `body` (a gate's target for
/// `JUMP_SLOT` calls into entry-gated functions), for naming the gate.
/// Never blocks.
pub fn function_of_body(body: usize) -> Option<usize> {
    let st = STATE.try_lock().ok()?;
    let (_, &i) = st.entry_by_record.range(..=body).next_back()?;
    let e = st.entries.get(i)?;
    (e.body == body).then_some(e.function)
}

/// Does `function` have an entry gate? (A caller's GOT slot that points at
/// it directly reaches the gate through its entry.) Never blocks.
pub fn entry_gated(function: usize) -> bool {
    STATE
        .try_lock()
        .is_ok_and(|st| st.entries.iter().any(|e| e.function == function && !e.dead))
}

// ---------------------------------------------------------------- arenas

fn within(a: usize, b: usize) -> bool {
    a.abs_diff(b) < REACH
}

/// An arena reachable from all of `[lo, hi)` with `need` free bytes:
/// placed by the census's reading of `/proc/self/maps` (`snapshot`), and
/// only when none of its gaps is still free, by a fresh one.
fn arena_for(
    st: &mut State,
    lo: usize,
    hi: usize,
    need: usize,
    exe: objects::Range,
    snapshot: &[crate::maps::Mapping],
) -> Option<usize> {
    if let Some(i) = st.arenas.iter().position(|a| {
        within(a.base, lo)
            && within(a.base + ARENA_CODE, hi)
            && within(a.base + ARENA_CODE, lo)
            && within(a.base, hi)
            && ARENA_CODE - a.used >= need
    }) {
        return Some(i);
    }
    // Arenas mapped since the snapshot are in it as well (MAP_FIXED_NOREPLACE
    // refuses any other newer mapping, and a fresh read follows).
    if let Some(i) = new_arena(st, lo, hi, exe, snapshot) {
        return Some(i);
    }
    let maps = crate::maps::read_self_maps().ok()?;
    new_arena(st, lo, hi, exe, &maps)
}

fn new_arena(
    st: &mut State,
    lo: usize,
    hi: usize,
    exe: objects::Range,
    maps: &[crate::maps::Mapping],
) -> Option<usize> {
    let mut ranges: Vec<(usize, usize, &str)> = maps
        .iter()
        .map(|m| (m.start, m.end, m.path.as_str()))
        .chain(st.arenas.iter().map(|a| (a.base, a.base + ARENA_BYTES, "")))
        .collect();
    ranges.sort_unstable();
    // Candidates: the top of each gap (just below a mapping that is not a
    // stack) and its bottom (just above a mapping, unless brk may grow
    // there: above the heap or the executable).
    let mut cands: Vec<usize> = Vec::new();
    for w in ranges.windows(2) {
        let (g0, g1) = (w[0].1, w[1].0);
        if g1 < g0 + ARENA_BYTES + 2 * PAGE {
            continue;
        }
        if w[1].2 != "[stack]" {
            cands.push(g1 - ARENA_BYTES - PAGE);
        }
        // (The executable's anonymous .bss tail overlaps its last segment.)
        let after_exe = w[0].0 < exe.end && w[0].1 > exe.start;
        if w[0].2 != "[heap]" && !after_exe {
            cands.push(g0 + PAGE);
        }
    }
    cands.retain(|&c| {
        within(c, lo) && within(c, hi) && within(c + ARENA_CODE, lo) && within(c + ARENA_CODE, hi)
    });
    cands.sort_by_key(|&c| c.abs_diff(lo).max(c.abs_diff(hi)));
    for c in cands {
        const MAP_FIXED_NOREPLACE: c_int = 0x100000;
        // SAFETY: a fresh anonymous mapping at an address no mapping uses
        // (MAP_FIXED_NOREPLACE fails rather than replace one).
        let p = unsafe {
            libc::mmap(
                c as *mut c_void,
                ARENA_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            continue;
        }
        if p as usize != c {
            // An old kernel that ignores the flag: not where we need it.
            // SAFETY: our own fresh mapping.
            unsafe { libc::munmap(p, ARENA_BYTES) };
            continue;
        }
        st.arenas.push(Arena { base: c, used: 0 });
        note_arena(c, c + ARENA_CODE);
        return Some(st.arenas.len() - 1);
    }
    None
}

// ---------------------------------------------------------------- text writes

/// Writes to text without making it writable (`/proc/self/mem`), or, if
/// that is unavailable, by making the page read-write for the moment.
/// One serves a whole pass over the objects (`State::text_writer`, opened
/// on its first write): opening `/proc/self/mem` for each object with a
/// single gated function cost 200 libraries 1.3 ms.
pub(super) struct TextWriter {
    fd: c_int,
}

impl TextWriter {
    fn open() -> TextWriter {
        // From the shim's own syscall instruction: the syscall filter
        // (`crate::syscalls`) refuses opens of `/proc/self/mem` from code
        // it traps, libc's `open` wrapper included.
        // SAFETY: openat with a NUL-terminated path; no memory is written.
        let r = unsafe {
            crate::syscalls::raw::syscall6(
                libc::SYS_openat,
                [
                    libc::AT_FDCWD as usize,
                    c"/proc/self/mem".as_ptr() as usize,
                    (libc::O_RDWR | libc::O_CLOEXEC) as usize,
                    0,
                    0,
                    0,
                ],
            )
        };
        TextWriter {
            fd: if r < 0 { -1 } else { r as c_int },
        }
    }

    /// Write `bytes` (at most 8) at `addr`, as one aligned word where they fit in one.
    fn write(&self, addr: usize, bytes: &[u8]) -> bool {
        let (start, buf, len) = {
            let a = addr & !7;
            if addr + bytes.len() <= a + 8 {
                // SAFETY: an aligned word of mapped, readable text.
                let mut w = unsafe { core::ptr::read_volatile(a as *const [u8; 8]) };
                w[addr - a..addr - a + bytes.len()].copy_from_slice(bytes);
                (a, w, 8)
            } else {
                let mut w = [0u8; 8];
                w[..bytes.len()].copy_from_slice(bytes);
                (addr, w, bytes.len())
            }
        };
        if self.fd >= 0 {
            // SAFETY: writing our own process's memory at a text address.
            let n = unsafe { libc::pwrite(self.fd, buf.as_ptr().cast(), len, start as i64) };
            if n == len as isize {
                return true;
            }
        }
        self.write_mprotect(start, &buf[..len])
    }

    fn write_mprotect(&self, addr: usize, bytes: &[u8]) -> bool {
        let first = page_down(addr);
        let last = page_down(addr + bytes.len() - 1);
        let len = last + PAGE - first;
        // SAFETY: the pages of a loaded object's text: read-write (not
        // executable) for the copy, then read-execute again.
        unsafe {
            if libc::mprotect(
                first as *mut c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
            ) != 0
            {
                return false;
            }
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len());
            libc::mprotect(first as *mut c_void, len, libc::PROT_READ | libc::PROT_EXEC) == 0
        }
    }
}

/// A write window over a range of an object's text: while only this
/// thread exists (`__libc_single_threaded`: no thread was ever created),
/// the pages are made read-write, not executable, with every asynchronous
/// signal blocked, so no code runs from them until they are read-execute
/// again; the `jmp`s are then plain stores, one copy-on-write fault per
/// page instead of one `/proc/self/mem` write per function (curl with
/// OpenSSL: 13,600 writes, 44 ms). With other threads, which may be
/// running that code, the writer's `/proc/self/mem` path is used instead.
struct TextWindow {
    first: usize,
    len: usize,
    mask: libc::sigset_t,
}

extern "C" {
    /// glibc ≥ 2.32: non-zero until the process creates a thread.
    static __libc_single_threaded: core::ffi::c_char;
}

impl TextWindow {
    /// A window over the pages of `[lo, hi)`, or `None` (other threads,
    /// or `mprotect` refused).
    fn open(lo: usize, hi: usize) -> Option<TextWindow> {
        // SAFETY: a byte that libc exports for exactly this question.
        if unsafe { core::ptr::read_volatile(&raw const __libc_single_threaded) } == 0 {
            return None;
        }
        let first = page_down(lo);
        let len = page_down(hi - 1) + PAGE - first;
        // SAFETY: sigset_t is plain data that sigfillset/sigdelset fill.
        let mut all: libc::sigset_t = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        let mut mask: libc::sigset_t = unsafe { core::mem::zeroed() };
        // SAFETY: valid sigset pointers; blocking signals in this thread only.
        unsafe {
            libc::sigfillset(&mut all);
            // A seccomp trap while SIGSYS is blocked kills the process, and
            // so does a fault while its signal is: those stay deliverable
            // (none comes from the window's code, which nothing runs).
            for sig in [
                libc::SIGSYS,
                libc::SIGSEGV,
                libc::SIGBUS,
                libc::SIGILL,
                libc::SIGFPE,
                libc::SIGTRAP,
            ] {
                libc::sigdelset(&mut all, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut mask);
        }
        // SAFETY: text pages of a loaded object: read-write (not
        // executable) while nothing can run them (above).
        let r = unsafe {
            libc::mprotect(
                first as *mut c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        let w = TextWindow { first, len, mask };
        if r != 0 {
            w.unblock();
            return None;
        }
        Some(w)
    }

    /// Write `bytes` at `addr`, inside the window.
    fn write(&self, addr: usize, bytes: &[u8]) -> bool {
        if addr < self.first || addr + bytes.len() > self.first + self.len {
            return false;
        }
        // SAFETY: read-write pages of the window, which no code runs.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        true
    }

    fn unblock(&self) {
        // SAFETY: restores this thread's mask as it was.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.mask, core::ptr::null_mut()) };
    }
}

impl Drop for TextWindow {
    fn drop(&mut self) {
        // SAFETY: back to read-execute, as the loader mapped text.
        let r = unsafe {
            libc::mprotect(
                self.first as *mut c_void,
                self.len,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
        if r != 0 {
            crate::lifecycle::fatal(format_args!(
                "entry gates: mprotect({:#x}, read-execute) after writing text failed (errno {})",
                self.first,
                crate::stackfmt::errno()
            ));
        }
        self.unblock();
    }
}

impl Drop for TextWriter {
    fn drop(&mut self) {
        if self.fd >= 0 {
            // SAFETY: our own descriptor.
            unsafe { libc::close(self.fd) };
        }
    }
}

// ---------------------------------------------------------------- dynsym

/// The exported functions of `obj`: (address, size, name), deduplicated by
/// address; and how many weak ones were left out.
fn exported_functions(obj: &LoadedObject) -> (Vec<(usize, usize, String)>, usize) {
    let Some(d) = obj.dynamic_info() else {
        return (Vec::new(), 0);
    };
    if d.symtab == 0 || d.strtab == 0 {
        return (Vec::new(), 0);
    }
    let mut seen: BTreeMap<usize, (usize, String)> = BTreeMap::new();
    let mut weak = 0;
    for i in 1..d.symbol_count().unwrap_or(0) {
        // SAFETY: i is below the symbol count of this object's hash table.
        let s = unsafe { &*(d.symtab as *const elf::Sym64<object::LittleEndian>).add(i) };
        let le = object::LittleEndian;
        if s.st_info & 0xf != elf::STT_FUNC || s.st_shndx.get(le) == 0 || s.st_value.get(le) == 0 {
            continue;
        }
        // Weak definitions are mostly vague linkage (C++ inline functions
        // and templates emitted in every object that uses them): the
        // loader binds every object's calls to one copy, so that copy is
        // not its object's own API. They keep their caller's rights.
        if s.st_info >> 4 == elf::STB_WEAK {
            weak += 1;
            continue;
        }
        let addr = obj.base + s.st_value.get(le) as usize;
        if !in_text(obj, addr) {
            continue;
        }
        let off = s.st_name.get(le) as usize;
        if off >= d.strsz {
            continue;
        }
        // SAFETY: st_name indexes the NUL-terminated string table.
        let name = unsafe { CStr::from_ptr((d.strtab + off) as *const libc::c_char) }
            .to_string_lossy()
            .into_owned();
        seen.entry(addr)
            .or_insert((s.st_size.get(le) as usize, name));
    }
    (
        seen.into_iter().map(|(a, (s, n))| (a, s, n)).collect(),
        weak,
    )
}

// ---------------------------------------------------------------- installing

/// Install entry gates on the exported functions of census object `i`
/// (a compartment's application object). PKRU allows every key.
pub(super) fn gate_exports(
    st: &mut State,
    rt: &Runtime,
    census: &Census,
    i: usize,
    variant: Variant,
) {
    if census.compartment_of.get(i).copied().flatten().is_none() {
        return;
    }
    let obj = &census.objects[i];
    if !is_app(obj) || obj.segments.is_empty() {
        return;
    }
    let (funcs, weak) = exported_functions(obj);
    st.weak_skipped += weak;
    gate_functions(st, rt, census, i, funcs, Found::Exported, variant);
}

/// A function that can take an entry gate: where the `jmp` goes, what it
/// overwrites and how that moves (from the analysis or the cache).
struct Planned {
    at: usize,
    end: usize,
    copy: Option<Vec<(u8, u8)>>,
    /// The analysis, when it ran in this process.
    prologue: Option<Prologue>,
    /// The function's bytes.
    bytes: &'static [u8],
}

impl Planned {
    /// The overwritten instructions, for iced's block encoder: decoded from
    /// `[at, end)` for a cached analysis (the whole function's check ran
    /// when it was made), else analysed again.
    fn prologue(&self, f: usize, exact_sites: bool) -> Result<Prologue, String> {
        if let Some(p) = &self.prologue {
            return Ok(Prologue {
                at: p.at,
                insns: p.insns.clone(),
                end: p.end,
                copy: p.copy.clone(),
            });
        }
        let window = &self.bytes[self.at - f..self.end - f];
        let mut dec = Decoder::with_ip(64, window, self.at as u64, DecoderOptions::NONE);
        let insns: Vec<Instruction> = (&mut dec).into_iter().collect();
        if insns.iter().any(Instruction::is_invalid)
            || insns.last().map(|i| i.next_ip() as usize) != Some(self.end)
        {
            return analyze(self.bytes, f, exact_sites);
        }
        Ok(Prologue {
            at: self.at,
            insns,
            end: self.end,
            copy: None,
        })
    }
}

/// Install entry gates on `funcs` (address, size, name) of census object
/// `i`, a compartment's application object. PKRU allows every key, or the
/// pages written are key 0 (arenas, text through `/proc/self/mem`).
pub(super) fn gate_functions(
    st: &mut State,
    rt: &Runtime,
    census: &Census,
    i: usize,
    funcs: Vec<(usize, usize, String)>,
    found: Found,
    variant: Variant,
) {
    let Some(own) = census.compartment_of.get(i).copied().flatten() else {
        return;
    };
    // Nothing to gate (an executable that exports no function): no cache
    // file to name, open and read.
    if funcs.is_empty() {
        return;
    }
    let obj = &census.objects[i];
    // The executable's entry point (`_start`) runs after the shim's
    // constructor, without a return address: never gate it.
    // SAFETY: getauxval has no preconditions.
    let entry_point = unsafe { libc::getauxval(libc::AT_ENTRY) } as usize;
    let exact_sites = rt.config.on_fault == crate::config::OnFault::Audit;
    let mut cache = super::entry_cache::EntryCache::open(rt.config.cache_dir(), obj, exact_sites);
    let mut planned: Vec<(usize, String, Planned)> = Vec::with_capacity(funcs.len());
    for (f, size, name) in funcs {
        if st.entry_by_function.contains_key(&f) || f == entry_point {
            continue;
        }
        // Clamp to the executable segment that holds it.
        let seg_end = obj
            .segments
            .iter()
            .find(|s| s.executable() && s.range.contains(f))
            .map_or(f, |s| s.range.end);
        let size = size.min(seg_end - f);
        // SAFETY: [f, f + size) lies in an executable (readable) segment of
        // the loaded object.
        let bytes = unsafe { core::slice::from_raw_parts(f as *const u8, size) };
        let off = f - obj.base;
        let (known, prologue) = match cache.get(off, size) {
            Some(k) => (k.clone(), None),
            None => {
                let r = analyze(bytes, f, exact_sites);
                let k = super::entry_cache::Known::of(f, &r);
                cache.put(off, size, &k);
                (k, r.ok())
            }
        };
        match known {
            super::entry_cache::Known::Shape { skip, end, copy } => planned.push((
                f,
                name,
                Planned {
                    at: f + skip,
                    end: f + end,
                    copy,
                    prologue,
                    bytes,
                },
            )),
            super::entry_cache::Known::Refused(reason) => st.refusals.push(Refusal {
                symbol: name,
                object: obj.display_name().to_string(),
                compartment: own,
                address: f,
                reason,
            }),
        }
    }
    cache.flush();
    if planned.is_empty() {
        return;
    }
    let span = |o: &LoadedObject| {
        objects::Range::new(
            o.segments.iter().map(|s| s.range.start).min().unwrap_or(0),
            o.segments.iter().map(|s| s.range.end).max().unwrap_or(0),
        )
    };
    let exe = census
        .objects
        .iter()
        .find(|o| o.kind == ObjectKind::Main)
        .map_or(objects::Range::new(0, 0), span);
    let lo = obj
        .segments
        .iter()
        .map(|s| s.range.start)
        .min()
        .unwrap_or(0);
    let hi = obj.segments.iter().map(|s| s.range.end).max().unwrap_or(0);
    let tpoff = frame_top_tpoff();
    let Ok(tpoff) = i32::try_from(tpoff) else {
        crate::lifecycle::fatal(format_args!(
            "entry gates: the shim's TLS offset {tpoff:#x} does not fit a 32-bit displacement"
        ));
    };
    patch_tls();
    let cross = CrossPath::current(variant, tpoff);
    let callee: std::sync::Arc<str> = obj.display_name().into();
    let pkru = rt.pkru_for(own);
    let mut k = 0;
    while k < planned.len() {
        // One batch per arena: fill what fits, then seal its pages.
        let Some(a) = arena_for(st, lo, hi, PAGE, exe, &census.maps) else {
            for (f, name, _) in &planned[k..] {
                st.refusals.push(Refusal {
                    symbol: name.clone(),
                    object: obj.display_name().to_string(),
                    compartment: own,
                    address: *f,
                    reason: "no free address range within 2 GiB for its record".into(),
                });
            }
            return;
        };
        let (base, start) = (st.arenas[a].base, st.arenas[a].used);
        let mut at = start;
        // (function, record, name, jmp at, origins)
        type Made = (usize, usize, String, usize, Vec<(usize, usize)>);
        let mut made: Vec<Made> = Vec::with_capacity(planned.len() - k);
        while k < planned.len() {
            let (f, _, p) = &planned[k];
            let (f, p_at) = (*f, p.at);
            let rec = base + at;
            let record = match &p.copy {
                Some(shape) => build_copied_record(
                    rec,
                    p.at,
                    &p.bytes[p.at - f..p.end - f],
                    shape,
                    &cross,
                    pkru,
                    own,
                ),
                None => p
                    .prologue(f, exact_sites)
                    .and_then(|pro| build_record(rec, &pro, &cross, pkru, own)),
            };
            // The name moves on (into the gate or the refusal): no copy.
            let name = &mut planned[k].1;
            match record {
                Ok(Record { bytes, origins }) => {
                    if at + bytes.len() > ARENA_CODE {
                        break;
                    }
                    // SAFETY: unsealed bytes of our arena's code region (read-write).
                    unsafe {
                        core::ptr::copy_nonoverlapping(bytes.as_ptr(), rec as *mut u8, bytes.len())
                    };
                    at += bytes.len();
                    made.push((f, rec, std::mem::take(name), p_at, origins));
                }
                Err(reason) => st.refusals.push(Refusal {
                    symbol: std::mem::take(name),
                    object: obj.display_name().to_string(),
                    compartment: own,
                    address: f,
                    reason,
                }),
            }
            k += 1;
        }
        let sealed_end = (at + PAGE - 1) & !(PAGE - 1);
        if at > start {
            // SAFETY: the batch's pages of our arena: code written, now read-execute.
            let r = unsafe {
                libc::mprotect(
                    (base + start) as *mut c_void,
                    sealed_end - start,
                    libc::PROT_READ | libc::PROT_EXEC,
                )
            };
            if r != 0 {
                crate::lifecycle::fatal(format_args!(
                    "entry gates: mprotect of records failed (errno {})",
                    crate::stackfmt::errno()
                ));
            }
        }
        st.arenas[a].used = if sealed_end > ARENA_CODE {
            ARENA_CODE
        } else {
            sealed_end
        };
        // One window over the sites when they lie in one executable segment.
        let lo_site = made.iter().map(|m| m.3).min().unwrap_or(0);
        let hi_site = made.iter().map(|m| m.3 + JMP_LEN).max().unwrap_or(0);
        let window = obj
            .segments
            .iter()
            .find(|s| s.executable() && s.range.contains(lo_site))
            .filter(|s| made.len() > 1 && hi_site <= s.range.end)
            .and_then(|_| TextWindow::open(lo_site, hi_site));
        for (f, rec, name, jmp_at, origins) in made {
            let check = rec + ENTRY_BYTES + 8;
            let rel = (check as i64 - (jmp_at + JMP_LEN) as i64) as i32;
            let mut jmp = [0xe9u8, 0, 0, 0, 0];
            jmp[1..].copy_from_slice(&rel.to_le_bytes());
            let written = match &window {
                Some(w) => w.write(jmp_at, &jmp),
                // Opened on first use: a window usually does the writes.
                None => st
                    .text_writer
                    .get_or_insert_with(TextWriter::open)
                    .write(jmp_at, &jmp),
            };
            if !written {
                st.refusals.push(Refusal {
                    symbol: name,
                    object: obj.display_name().to_string(),
                    compartment: own,
                    address: f,
                    reason: format!(
                        "writing its text failed (errno {})",
                        crate::stackfmt::errno()
                    ),
                });
                continue;
            }
            st.entry_by_function.insert(f, st.entries.len());
            st.entry_by_record.insert(rec, st.entries.len());
            // SAFETY: the record's first word is its entry's target.
            let body = unsafe { core::ptr::read(rec as *const usize) };
            st.entries.push(EntryGate {
                function: f,
                record: rec,
                body,
                compartment: own,
                symbol: name,
                callee: callee.clone(),
                found,
                variant,
                dead: false,
                origins,
            });
        }
    }
}

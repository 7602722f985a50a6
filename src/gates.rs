//! Call gates and GOT patching (DESIGN.md, "Call gates").
//!
//! # Gates
//!
//! A gate is a stub from a pool written at build time (`global_asm!` below,
//! [`MAX_GATES`] stubs of 16 bytes in `.text`). Stub `i` loads the address
//! of table entry `i` into `r11` and jumps to the variant code that the
//! entry names. An entry holds the target, the variant and the callee's
//! PKRU. The table lives in the shim's `.bss`, on key 0, and is read-only
//! except while the shim writes a new entry. No page is ever writable and
//! executable at once.
//!
//! The variant code (hardware, hardware with a call counter, simulated)
//! keeps every argument register (`rdi rsi rdx rcx r8 r9`, `al`, `xmm0-7`)
//! and the stack arguments at their offsets. It moves the caller's return
//! address to a per-thread gate-frame stack, together with the caller's
//! PKRU and `rbx`, switches PKRU to the callee's, `call`s the target with
//! `rbx` pointing at the frame, then restores the caller's PKRU, `rbx` and
//! return address and returns. The return values (`rax rdx xmm0 xmm1`)
//! pass through untouched. A gate frame is 48 bytes:
//!
//! | offset | contents |
//! |---|---|
//! | 0 | caller's return address |
//! | 8, 16, 24 | `rax`, `rdx`, `rcx` while PKRU is switched |
//! | 32 | caller's PKRU |
//! | 40 | caller's `rbx` |
//!
//! The frame stack is reserved before it is written and released after it
//! has been read, so a signal handler that crosses a gate in between uses
//! the frames above. Its top lives in the shim's static TLS
//! (`ia2shim_gate_tls`, initial-exec model, a page the plan never tags
//! because it holds a shared module's block). The simulated PKRU of
//! `IA2_PKU=sim` is the next TLS word, so the `sim` variant switches it with
//! plain moves.
//!
//! Because `rbx` holds the frame while the callee runs, the variant code's
//! CFI can say where the caller's return address and `rbx` are
//! (`DW_CFA_expression` on `rbx`), so unwinders, `backtrace(3)` and
//! debuggers walk through gates. The gate's FDE names a personality routine.
//! In the search phase of an exception it adds the caller's rights to the
//! thread's PKRU (the unwinder is about to read the caller's unwind data,
//! whose `DW.ref.*` personality and type-info pointers sit in the caller's
//! tagged .data); so cleanups in the callee's frames run with both rights.
//! In the cleanup phase (exceptions and forced unwinds such as
//! `pthread_exit`) it lands in a pad that restores the caller's exact PKRU,
//! pops the gate frame and resumes unwinding in the caller: a C++ exception
//! thrown in one compartment and caught in another leaves PKRU right.
//!
//! A thread that has no gate-frame stack yet (one not started through the
//! shim's thread trampoline) faults on its first gate's first frame store;
//! [`fixup_fault`], called first thing by the SIGSEGV handler, allocates
//! the stack and resumes. This keeps a null check off the hot path.
//!
//! # GOT patching
//!
//! At start-up and after each `dlopen`, [`patch_objects`] walks each
//! compartment object's `R_X86_64_JUMP_SLOT` and `R_X86_64_GLOB_DAT`
//! relocations. A slot whose value lies in another compartment's object is
//! pointed at the gate for (target, callee compartment) if the target is a
//! function (`STT_FUNC`, `STT_GNU_IFUNC`, or an untyped symbol in an
//! executable segment); otherwise it is recorded as a cross-compartment data
//! import, which cannot be gated. Lazily bound slots that still point into
//! the importer's own PLT are resolved first with `dlsym`. Read-only pages
//! (RELRO) are made writable with plain `mprotect`, which keeps the page's
//! key, and restored. `DT_FINI` and every `DT_FINI_ARRAY` entry of a
//! compartment object are pointed at gates into its own compartment, so
//! destructors run with their own rights whichever thread calls `exit`.
//!
//! Only the executable and application libraries take part: calls into
//! system objects (libc, ld.so, … even when strict mode puts them in a
//! compartment) keep the caller's rights, and system objects' own slots are
//! not patched or scanned. In strict mode destructors are not gated either
//! (each object's first destructor calls `__cxa_finalize`, whose list is
//! libc-compartment data). Calls from shared code (libc, callbacks through
//! function pointers) into compartments are not gated: they run with the
//! caller's rights, as under IA2's `IA2_IGNORE`. Patching `GLOB_DAT` slots
//! makes `&function` taken in another compartment the gate's address, so
//! function pointers compare unequal across compartments. Relocations other
//! than `JUMP_SLOT` and `GLOB_DAT` (say `R_X86_64_64` in a table of function
//! pointers) are not gated. Lazily bound slots are resolved with
//! `dlsym(RTLD_DEFAULT)`, which ignores symbol versions. `longjmp` out of a
//! gated call leaves the callee's PKRU and a stale gate frame behind (not
//! supported, as in IA2); 21845 leaked frames overflow the gate-frame stack,
//! which is then reported.

use crate::config::{ReportFormat, ScanWrpkru};
use crate::objects::{self, page_down, LoadedObject, ObjectKind, PAGE};
use crate::pku::{self, Backend};
use crate::runtime::{self, Census, Runtime};
use core::cell::UnsafeCell;
use core::ffi::{c_int, c_void, CStr};
use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use object::elf;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Number of stubs in the pool, i.e. the most distinct (target, callee
/// compartment) pairs a process can have.
pub const MAX_GATES: usize = 4096;
/// Bytes per table entry (and per counter).
const STRIDE: usize = 32;
/// Bytes per gate frame.
pub const FRAME: usize = 48;
/// Usable bytes of each thread's gate-frame stack (guard pages on both sides).
pub const STACK_BYTES: usize = 1 << 20;
const TABLE_BYTES: usize = MAX_GATES * STRIDE;

/// One gate: what the stub's `r11` points at.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Entry {
    target: usize,
    /// The variant code the stub jumps to.
    code: usize,
    pkru: u32,
    compartment: u32,
    _reserved: u64,
}

/// The gate table (read-only once written) followed by the call counters
/// (same stride, so the counting variants address a counter as
/// `[r11 + TABLE_BYTES]`).
#[repr(C, align(4096))]
struct GateMem {
    table: UnsafeCell<[Entry; MAX_GATES]>,
    counts: [[AtomicU64; STRIDE / 8]; MAX_GATES],
}

// SAFETY: the table is written only under `STATE`'s lock (and read-only in
// between); the gate code only reads it. The counters are atomics.
unsafe impl Sync for GateMem {}

const ZERO_ENTRY: Entry = Entry {
    target: 0,
    code: 0,
    pkru: 0,
    compartment: 0,
    _reserved: 0,
};

static GATE_MEM: GateMem = GateMem {
    table: UnsafeCell::new([ZERO_ENTRY; MAX_GATES]),
    counts: [const { [const { AtomicU64::new(0) }; STRIDE / 8] }; MAX_GATES],
};

const _: () = assert!(core::mem::size_of::<Entry>() == STRIDE);
const _: () = assert!(TABLE_BYTES % PAGE == 0);

// The stub pool, the three variants, the unwind pads and the TLS words.
// Intel syntax. DWARF registers: 3 = rbx, 10 = r10, 16 = return address;
// `.cfi_escape 0x10, REG, 2, DW_OP_bregN, OFF` is DW_CFA_expression "REG is
// saved at [bregN + OFF]".
core::arch::global_asm!(
    // ---- per-thread words: gate-frame stack top, then the simulated PKRU
    ".pushsection .tdata.ia2shim_gate_tls,\"awT\",@progbits",
    ".balign 8",
    ".globl ia2shim_gate_tls",
    ".hidden ia2shim_gate_tls",
    ".type ia2shim_gate_tls,@object",
    ".size ia2shim_gate_tls, 24",
    "ia2shim_gate_tls:",
    ".quad 0",
    ".long {default_pkru}",
    ".long 0",
    ".quad 0",
    ".popsection",
    // ---- the stub pool
    ".pushsection .text.ia2shim_gates,\"ax\",@progbits",
    ".balign 64",
    ".globl ia2shim_gate_pool",
    ".hidden ia2shim_gate_pool",
    ".type ia2shim_gate_pool,@function",
    "ia2shim_gate_pool:",
    ".cfi_startproc",
    ".set ia2shim_gate_i, 0",
    ".rept {max_gates}",
    ".balign 16",
    "lea r11, [rip + {mem} + {stride} * ia2shim_gate_i]",
    "jmp qword ptr [r11 + 8]",
    ".set ia2shim_gate_i, ia2shim_gate_i + 1",
    ".endr",
    ".cfi_endproc",
    ".size ia2shim_gate_pool, . - ia2shim_gate_pool",
    // ---- hardware variant (and, with `lock inc` first, the counting one)
    ".macro ia2shim_gate_body name, count, union",
    ".balign 16",
    ".globl ia2shim_gate_\\name",
    ".hidden ia2shim_gate_\\name",
    ".type ia2shim_gate_\\name,@function",
    "ia2shim_gate_\\name:",
    ".cfi_startproc",
    ".cfi_personality 0x1b, {personality}",
    ".if \\count",
    "lock inc qword ptr [r11 + {table_bytes}]",
    ".endif",
    "mov r10, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
    "add qword ptr fs:[r10], {frame}",
    "mov r10, qword ptr fs:[r10]",
    ".globl ia2shim_gate_\\name\\()_fix",
    ".hidden ia2shim_gate_\\name\\()_fix",
    "ia2shim_gate_\\name\\()_fix:",
    "mov qword ptr [r10 - 8], rbx",
    ".cfi_escape 0x10, 0x03, 0x02, 0x7a, 0x78",
    "lea rbx, [r10 - {frame}]",
    ".cfi_escape 0x10, 0x03, 0x02, 0x73, 0x28",
    "pop qword ptr [rbx]",
    ".cfi_def_cfa_offset 0",
    ".cfi_escape 0x10, 0x10, 0x02, 0x73, 0x00",
    "mov qword ptr [rbx + 8], rax",
    "mov qword ptr [rbx + 16], rdx",
    "mov qword ptr [rbx + 24], rcx",
    "xor ecx, ecx",
    "rdpkru",
    "mov dword ptr [rbx + 32], eax",
    ".if \\union",
    "and eax, dword ptr [r11 + 16]",
    ".else",
    "mov eax, dword ptr [r11 + 16]",
    ".endif",
    "wrpkru",
    "mov rax, qword ptr [rbx + 8]",
    "mov rdx, qword ptr [rbx + 16]",
    "mov rcx, qword ptr [rbx + 24]",
    "call qword ptr [r11]",
    ".globl ia2shim_gate_\\name\\()_ret",
    ".hidden ia2shim_gate_\\name\\()_ret",
    "ia2shim_gate_\\name\\()_ret:",
    "mov r11, rax",
    "mov r10, rdx",
    "push qword ptr [rbx]",
    ".cfi_def_cfa_offset 8",
    ".cfi_offset 16, -8",
    "mov eax, dword ptr [rbx + 32]",
    "mov rbx, qword ptr [rbx + 40]",
    ".cfi_restore rbx",
    "mov rcx, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
    "sub qword ptr fs:[rcx], {frame}",
    "xor ecx, ecx",
    "xor edx, edx",
    "wrpkru",
    "mov rax, r11",
    "mov rdx, r10",
    "ret",
    ".cfi_endproc",
    ".size ia2shim_gate_\\name, . - ia2shim_gate_\\name",
    ".endm",
    "ia2shim_gate_body hw, 0, 0",
    "ia2shim_gate_body hwcount, 1, 0",
    "ia2shim_gate_body hwunion, 1, 1",
    // ---- simulated variant: the same with RDPKRU/WRPKRU replaced by moves
    // from and to the TLS word after the frame-stack top; always counts.
    ".macro ia2shim_gate_sim_body name, union",
    ".balign 16",
    ".globl ia2shim_gate_\\name",
    ".hidden ia2shim_gate_\\name",
    ".type ia2shim_gate_\\name,@function",
    "ia2shim_gate_\\name:",
    ".cfi_startproc",
    ".cfi_personality 0x1b, {personality}",
    "lock inc qword ptr [r11 + {table_bytes}]",
    "mov r10, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
    "add qword ptr fs:[r10], {frame}",
    "mov r10, qword ptr fs:[r10]",
    ".globl ia2shim_gate_\\name\\()_fix",
    ".hidden ia2shim_gate_\\name\\()_fix",
    "ia2shim_gate_\\name\\()_fix:",
    "mov qword ptr [r10 - 8], rbx",
    ".cfi_escape 0x10, 0x03, 0x02, 0x7a, 0x78",
    "lea rbx, [r10 - {frame}]",
    ".cfi_escape 0x10, 0x03, 0x02, 0x73, 0x28",
    "pop qword ptr [rbx]",
    ".cfi_def_cfa_offset 0",
    ".cfi_escape 0x10, 0x10, 0x02, 0x73, 0x00",
    "mov qword ptr [rbx + 8], rax",
    "mov qword ptr [rbx + 16], rdx",
    "mov qword ptr [rbx + 24], rcx",
    "mov rcx, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
    "mov eax, dword ptr fs:[rcx + 8]",
    "mov dword ptr [rbx + 32], eax",
    ".if \\union",
    "and eax, dword ptr [r11 + 16]",
    ".else",
    "mov eax, dword ptr [r11 + 16]",
    ".endif",
    "mov dword ptr fs:[rcx + 8], eax",
    "mov rax, qword ptr [rbx + 8]",
    "mov rdx, qword ptr [rbx + 16]",
    "mov rcx, qword ptr [rbx + 24]",
    "call qword ptr [r11]",
    ".globl ia2shim_gate_\\name\\()_ret",
    ".hidden ia2shim_gate_\\name\\()_ret",
    "ia2shim_gate_\\name\\()_ret:",
    "mov r11, rax",
    "mov r10, rdx",
    "push qword ptr [rbx]",
    ".cfi_def_cfa_offset 8",
    ".cfi_offset 16, -8",
    "mov eax, dword ptr [rbx + 32]",
    "mov rbx, qword ptr [rbx + 40]",
    ".cfi_restore rbx",
    "mov rcx, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
    "sub qword ptr fs:[rcx], {frame}",
    "mov dword ptr fs:[rcx + 8], eax",
    "mov rax, r11",
    "mov rdx, r10",
    "ret",
    ".cfi_endproc",
    ".size ia2shim_gate_\\name, . - ia2shim_gate_\\name",
    ".endm",
    "ia2shim_gate_sim_body sim, 0",
    "ia2shim_gate_sim_body simunion, 1",
    // ---- unwind pads: entered by the unwinder's install-context with the
    // gate's frame state (rsp as after the call, rbx = gate frame) and the
    // exception in rax. Restore the caller's PKRU, drop the frame (and any
    // left above it), put the return address back and resume unwinding.
    ".macro ia2shim_gate_pad name, sim",
    ".balign 16",
    ".globl ia2shim_gate_pad_\\name",
    ".hidden ia2shim_gate_pad_\\name",
    ".type ia2shim_gate_pad_\\name,@function",
    "ia2shim_gate_pad_\\name:",
    ".cfi_startproc",
    ".cfi_def_cfa_offset 0",
    ".cfi_escape 0x10, 0x10, 0x02, 0x73, 0x00",
    ".cfi_escape 0x10, 0x03, 0x02, 0x73, 0x28",
    "mov rdi, rax",
    "push qword ptr [rbx]",
    ".cfi_def_cfa_offset 8",
    ".cfi_offset 16, -8",
    "mov eax, dword ptr [rbx + 32]",
    "mov rcx, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
    "mov qword ptr fs:[rcx], rbx",
    "mov rbx, qword ptr [rbx + 40]",
    ".cfi_restore rbx",
    ".if \\sim",
    "mov dword ptr fs:[rcx + 8], eax",
    ".else",
    "xor ecx, ecx",
    "xor edx, edx",
    "wrpkru",
    ".endif",
    "sub rsp, 8",
    ".cfi_def_cfa_offset 16",
    "call {resume}@PLT",
    "ud2",
    ".cfi_endproc",
    ".size ia2shim_gate_pad_\\name, . - ia2shim_gate_pad_\\name",
    ".endm",
    "ia2shim_gate_pad hw, 0",
    "ia2shim_gate_pad sim, 1",
    ".popsection",
    default_pkru = const pku::DEFAULT_PKRU,
    max_gates = const MAX_GATES,
    stride = const STRIDE,
    table_bytes = const TABLE_BYTES,
    frame = const FRAME,
    mem = sym GATE_MEM,
    personality = sym gate_personality,
    resume = sym _Unwind_Resume,
);

extern "C" {
    fn ia2shim_gate_pool();
    fn ia2shim_gate_hw();
    fn ia2shim_gate_hw_fix();
    fn ia2shim_gate_hw_ret();
    fn ia2shim_gate_hwcount();
    fn ia2shim_gate_hwcount_fix();
    fn ia2shim_gate_hwcount_ret();
    fn ia2shim_gate_hwunion();
    fn ia2shim_gate_hwunion_fix();
    fn ia2shim_gate_hwunion_ret();
    fn ia2shim_gate_simunion();
    fn ia2shim_gate_simunion_fix();
    fn ia2shim_gate_simunion_ret();
    fn ia2shim_gate_sim();
    fn ia2shim_gate_sim_fix();
    fn ia2shim_gate_sim_ret();
    fn ia2shim_gate_pad_hw();
    fn ia2shim_gate_pad_sim();
    fn _Unwind_Resume(exc: *mut c_void) -> !;
    fn _Unwind_GetIP(ctx: *mut c_void) -> usize;
    fn _Unwind_GetGR(ctx: *mut c_void, reg: c_int) -> usize;
    fn _Unwind_SetIP(ctx: *mut c_void, ip: usize);
    fn _Unwind_SetGR(ctx: *mut c_void, reg: c_int, value: usize);
}

fn addr(f: unsafe extern "C" fn()) -> usize {
    f as usize
}

/// Which variant code a gate runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// RDPKRU/WRPKRU, no counting: the fast path.
    Hardware,
    /// RDPKRU/WRPKRU plus a call counter (`IA2_REPORT=gates`).
    HardwareCounting,
    /// The simulated PKRU of `IA2_PKU=sim`; always counts.
    Sim,
    /// Union gates (`IA2_LIBC_GATES=union`, `IA2_TLS_GET_ADDR_GATE=1`): the
    /// callee runs with the caller's PKRU ANDed with the entry's mask,
    /// i.e. the caller's rights plus one more key; always counts.
    HardwareUnion,
    SimUnion,
}

impl Variant {
    /// The variant for the current backend and report settings.
    pub fn current(count: bool) -> Variant {
        match (pku::backend(), count) {
            (Backend::Sim, _) => Variant::Sim,
            (_, true) => Variant::HardwareCounting,
            _ => Variant::Hardware,
        }
    }

    /// The union variant for the current backend.
    pub fn union() -> Variant {
        match pku::backend() {
            Backend::Sim => Variant::SimUnion,
            _ => Variant::HardwareUnion,
        }
    }

    fn is_union(self) -> bool {
        matches!(self, Variant::HardwareUnion | Variant::SimUnion)
    }

    fn code(self) -> usize {
        match self {
            Variant::Hardware => addr(ia2shim_gate_hw),
            Variant::HardwareCounting => addr(ia2shim_gate_hwcount),
            Variant::Sim => addr(ia2shim_gate_sim),
            Variant::HardwareUnion => addr(ia2shim_gate_hwunion),
            Variant::SimUnion => addr(ia2shim_gate_simunion),
        }
    }

    /// Does this variant count calls?
    pub fn counts(self) -> bool {
        self != Variant::Hardware
    }
}

/// The code address of stub `i`.
pub fn stub_address(i: usize) -> usize {
    addr(ia2shim_gate_pool) + 16 * i
}

/// The code range of the stub pool.
pub fn pool_range() -> objects::Range {
    let s = addr(ia2shim_gate_pool);
    objects::Range::new(s, s + 16 * MAX_GATES)
}

/// The personality routine of the variant code's FDEs, at a gate's return
/// point. Search phase: add the caller's rights (the unwinder is about to
/// read the caller's unwind data). Cleanup phase (exceptions and forced
/// unwinds): land in the variant's pad.
unsafe extern "C" fn gate_personality(
    _version: c_int,
    actions: c_int,
    _class: u64,
    exc: *mut c_void,
    ctx: *mut c_void,
) -> c_int {
    const UA_SEARCH_PHASE: c_int = 1;
    const UA_CLEANUP_PHASE: c_int = 2;
    const URC_INSTALL_CONTEXT: c_int = 7;
    const URC_CONTINUE_UNWIND: c_int = 8;
    // SAFETY: ctx is the unwinder's context for this frame.
    let ip = unsafe { _Unwind_GetIP(ctx) };
    let pad = if ip == addr(ia2shim_gate_hw_ret)
        || ip == addr(ia2shim_gate_hwcount_ret)
        || ip == addr(ia2shim_gate_hwunion_ret)
    {
        addr(ia2shim_gate_pad_hw)
    } else if ip == addr(ia2shim_gate_sim_ret) || ip == addr(ia2shim_gate_simunion_ret) {
        addr(ia2shim_gate_pad_sim)
    } else {
        return URC_CONTINUE_UNWIND;
    };
    if actions & UA_SEARCH_PHASE != 0 {
        // The search goes on into the caller's frames, whose unwind data
        // (personality and type-info pointers, `DW.ref.*`) may sit in the
        // caller's tagged .data. Add the caller's rights to the thread's
        // for the rest of the unwind; the pad restores the caller's exact
        // PKRU in the cleanup phase.
        // SAFETY: DWARF register 3 is rbx, which holds the gate frame at
        // the gate's return point.
        let frame = unsafe { _Unwind_GetGR(ctx, 3) };
        if frame != 0 {
            // SAFETY: a live gate frame of this thread (on key 0).
            let caller = unsafe { core::ptr::read_volatile((frame + 32) as *const u32) };
            pku::write_pkru(pku::read_pkru() & caller);
        }
        return URC_CONTINUE_UNWIND;
    }
    if actions & UA_CLEANUP_PHASE == 0 {
        return URC_CONTINUE_UNWIND;
    }
    // SAFETY: DWARF register 0 is rax, which the pad reads; the pad is code
    // that expects exactly this frame state.
    unsafe {
        _Unwind_SetGR(ctx, 0, exc as usize);
        _Unwind_SetIP(ctx, pad);
    }
    URC_INSTALL_CONTEXT
}

// ---------------------------------------------------------------- per-thread state

/// The calling thread's copy of the quadword at byte `OFF` of the shim's
/// gate TLS words (`ia2shim_gate_tls`: 0 frame-stack top, 16 stack base).
fn tls_quad<const OFF: usize>() -> usize {
    let v: usize;
    // SAFETY: reads this thread's copy of a TLS word of the shim (initial
    // exec: the shim is in the static TLS set); OFF is inside the 24 bytes.
    unsafe {
        core::arch::asm!(
            "mov {t}, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
            "mov {v}, qword ptr fs:[{t} + {off}]",
            t = out(reg) _,
            v = out(reg) v,
            off = const OFF,
            options(nostack, readonly, preserves_flags)
        );
    }
    v
}

fn set_tls_quad<const OFF: usize>(value: usize) {
    // SAFETY: writes this thread's copy of the shim's TLS word at OFF.
    unsafe {
        core::arch::asm!(
            "mov {t}, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
            "mov qword ptr fs:[{t} + {off}], {v}",
            t = out(reg) _,
            v = in(reg) value,
            off = const OFF,
            options(nostack, preserves_flags)
        );
    }
}

/// The calling thread's gate-frame stack top (0: none yet).
pub fn stack_top() -> usize {
    tls_quad::<0>()
}

fn set_stack_top(top: usize) {
    set_tls_quad::<0>(top)
}

/// The base of the calling thread's gate-frame stack (0: none).
fn stack_base() -> usize {
    tls_quad::<16>()
}

fn set_stack_base(base: usize) {
    set_tls_quad::<16>(base)
}

/// The calling thread's simulated PKRU (`IA2_PKU=sim`), which the `sim`
/// gates switch.
pub fn sim_pkru() -> u32 {
    let v: u32;
    // SAFETY: reads this thread's copy of the shim's TLS word.
    unsafe {
        core::arch::asm!(
            "mov {t}, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
            "mov {v:e}, dword ptr fs:[{t} + 8]",
            t = out(reg) _,
            v = out(reg) v,
            options(nostack, readonly, preserves_flags)
        );
    }
    v
}

/// Set the calling thread's simulated PKRU.
pub fn set_sim_pkru(pkru: u32) {
    // SAFETY: writes this thread's copy of the shim's TLS word.
    unsafe {
        core::arch::asm!(
            "mov {t}, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
            "mov dword ptr fs:[{t} + 8], {v:e}",
            t = out(reg) _,
            v = in(reg) pkru,
            options(nostack, preserves_flags)
        );
    }
}

/// Map a gate-frame stack: a guard page, [`STACK_BYTES`], a guard page.
/// Async-signal-safe. Returns the base of the usable part.
fn map_stack() -> Option<usize> {
    let total = STACK_BYTES + 2 * PAGE;
    // SAFETY: a fresh anonymous mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    let base = p as usize + PAGE;
    // SAFETY: the middle of the mapping we just made; key 0 (the default).
    if unsafe {
        libc::mprotect(
            base as *mut c_void,
            STACK_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    } != 0
    {
        return None;
    }
    Some(base)
}

/// Give the calling thread a gate-frame stack if it has none. Call it at
/// thread start (the thread trampoline); a thread that never does gets one
/// on its first gate, through [`fixup_fault`].
pub fn thread_start() {
    if stack_top() == 0 {
        match map_stack() {
            Some(base) => {
                set_stack_base(base);
                set_stack_top(base);
            }
            None => runtime::fatal(format_args!(
                "cannot map a {} KiB gate-frame stack for this thread (errno {})",
                STACK_BYTES >> 10,
                crate::stackfmt::errno()
            )),
        }
    }
}

/// Release the calling thread's gate-frame stack (thread exit). No gate
/// may be active in this thread any more.
pub fn thread_exit() {
    let base = stack_base();
    if base == 0 {
        return;
    }
    set_stack_top(0);
    set_stack_base(0);
    // SAFETY: unmapping the stack this thread owns, guards included.
    unsafe { libc::munmap((base - PAGE) as *mut c_void, STACK_BYTES + 2 * PAGE) };
}

/// Called first by the SIGSEGV handler. A gate entered by a thread without
/// a gate-frame stack faults at its `_fix` label with `r10 == FRAME`: map a
/// stack, move the reservation onto it and resume. Returns `true` when the
/// fault was that and has been fixed.
///
/// # Safety
/// `info` and `ctx` must be the kernel's arguments to a SIGSEGV handler
/// running on the faulting thread.
pub unsafe fn fixup_fault(info: *const libc::siginfo_t, ctx: *mut c_void) -> bool {
    const SEGV_MAPERR: c_int = 1;
    const SEGV_ACCERR: c_int = 2;
    // SAFETY: valid siginfo from the kernel.
    let code = unsafe { (*info).si_code };
    if code == SEGV_ACCERR {
        // SAFETY: valid siginfo from the kernel.
        let a = unsafe { (*info).si_addr() } as usize;
        let base = stack_base();
        if base != 0 && a >= base + STACK_BYTES && a < base + STACK_BYTES + PAGE {
            let mut b = crate::stackfmt::StackBuf::<256>::new();
            let _ = writeln!(
                b,
                "ia2shim[{}]: gate-frame stack overflow ({} nested cross-compartment calls): \
                 unbounded recursion across compartments, or longjmp out of gated calls",
                crate::stackfmt::pid(),
                STACK_BYTES / FRAME
            );
            b.write_to_fd(crate::fault::REPORT_FD.load(Ordering::Relaxed));
        }
        return false;
    }
    if code != SEGV_MAPERR {
        return false;
    }
    let uc = ctx as *mut libc::ucontext_t;
    // SAFETY: valid ucontext from the kernel.
    let gregs = unsafe { &mut (*uc).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as usize;
    let at_fix = rip == addr(ia2shim_gate_hw_fix)
        || rip == addr(ia2shim_gate_hwcount_fix)
        || rip == addr(ia2shim_gate_hwunion_fix)
        || rip == addr(ia2shim_gate_sim_fix)
        || rip == addr(ia2shim_gate_simunion_fix);
    if !at_fix || gregs[libc::REG_R10 as usize] as usize != FRAME || stack_top() != FRAME {
        return false;
    }
    let Some(base) = map_stack() else {
        return false;
    };
    set_stack_base(base);
    set_stack_top(base + FRAME);
    gregs[libc::REG_R10 as usize] = (base + FRAME) as i64;
    true
}

// ---------------------------------------------------------------- the table

/// Why a gate exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    JumpSlot,
    GlobDat,
    /// `DT_FINI_ARRAY[index]`.
    FiniArray(usize),
    Fini,
}

impl core::fmt::Display for Via {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Via::JumpSlot => write!(f, "JUMP_SLOT"),
            Via::GlobDat => write!(f, "GLOB_DAT"),
            Via::FiniArray(i) => write!(f, "DT_FINI_ARRAY[{i}]"),
            Via::Fini => write!(f, "DT_FINI"),
        }
    }
}

/// One patched slot: a caller object's way into a gate.
#[derive(Clone, Debug)]
pub struct Patch {
    pub gate: usize,
    /// The importing object (for fini entries: the object itself, called by ld.so).
    pub caller: String,
    pub caller_compartment: Option<u8>,
    pub slot: usize,
    pub via: Via,
}

/// One gate (one stub).
#[derive(Clone, Debug)]
pub struct Gate {
    pub index: usize,
    pub target: usize,
    pub compartment: u8,
    pub symbol: String,
    pub callee: String,
    pub variant: Variant,
    /// The gate's object was unloaded by `dlclose`.
    pub dead: bool,
}

/// A `GLOB_DAT` import of data owned by another compartment.
#[derive(Clone, Debug)]
pub struct DataImport {
    pub importer: String,
    pub importer_compartment: u8,
    pub symbol: String,
    pub owner: String,
    pub owner_compartment: u8,
    pub address: usize,
    /// The compartment key that tags the page holding it (`None`: the page
    /// is shared, e.g. by a carveout or because it is read-only).
    pub page_compartment: Option<u8>,
}

/// WRPKRU/XRSTOR byte sequences found in compartment code.
#[derive(Clone, Debug)]
pub struct ScanHit {
    pub object: String,
    pub offset: usize,
    pub what: &'static str,
}

#[derive(Default)]
struct State {
    enabled: bool,
    installed: bool,
    gates: Vec<Gate>,
    by_target: BTreeMap<(usize, u8), usize>,
    patches: Vec<Patch>,
    data_imports: Vec<DataImport>,
    scan_hits: Vec<ScanHit>,
}

static STATE: Mutex<State> = Mutex::new(State {
    enabled: false,
    installed: false,
    gates: Vec::new(),
    by_target: BTreeMap::new(),
    patches: Vec::new(),
    data_imports: Vec::new(),
    scan_hits: Vec::new(),
});

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

static TABLE_READ_ONLY: AtomicBool = AtomicBool::new(false);

fn protect_table(writable: bool) {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: the table is a page-aligned, page-multiple part of the shim's
    // .bss that only this module uses; read-only protection is what the
    // gate code needs.
    let r = unsafe { libc::mprotect(GATE_MEM.table.get().cast(), TABLE_BYTES, prot) };
    if r != 0 {
        runtime::fatal(format_args!(
            "mprotect of the gate table failed (errno {})",
            crate::stackfmt::errno()
        ));
    }
    TABLE_READ_ONLY.store(!writable, Ordering::Release);
}

/// Write table entry `i`. Holds `STATE`'s lock (the caller's guard).
fn write_entry(_st: &mut State, i: usize, e: Entry) {
    let ro = TABLE_READ_ONLY.load(Ordering::Acquire);
    if ro {
        protect_table(true);
    }
    // SAFETY: i < MAX_GATES; the table is writable now and the lock
    // serialises writers; the gate code reads only entries already handed out.
    unsafe { (*GATE_MEM.table.get())[i] = e };
    if ro {
        protect_table(false);
    }
}

/// The gate for (`target`, `compartment`), made on first request. Returns
/// its stub's index.
fn gate_for(
    st: &mut State,
    rt: &Runtime,
    target: usize,
    compartment: u8,
    symbol: &str,
    callee: &str,
    variant: Variant,
) -> usize {
    // Union gates are keyed apart from plain gates into the same compartment.
    let key = (
        target,
        if variant.is_union() {
            compartment | 0x80
        } else {
            compartment
        },
    );
    if let Some(&i) = st.by_target.get(&key) {
        return i;
    }
    let i = st.gates.len();
    if i >= MAX_GATES {
        runtime::fatal(format_args!(
            "more than {MAX_GATES} cross-compartment call targets: the gate pool is full \
             (gating {symbol} in {callee}); set IA2_GATES=0 or merge compartments"
        ));
    }
    write_entry(
        st,
        i,
        Entry {
            target,
            code: variant.code(),
            // A union gate ANDs this mask into the caller's PKRU: clear the
            // AD and WD bits of the callee compartment's key.
            pkru: if variant.is_union() {
                !(3u32 << (2 * rt.key_of(compartment)))
            } else {
                rt.pkru_for(compartment)
            },
            compartment: compartment as u32,
            _reserved: 0,
        },
    );
    st.gates.push(Gate {
        index: i,
        target,
        compartment,
        symbol: symbol.to_string(),
        callee: callee.to_string(),
        variant,
        dead: false,
    });
    st.by_target.insert(key, i);
    i
}

/// Calls made through gate `i` so far (0 for the non-counting variant).
pub fn calls(i: usize) -> u64 {
    GATE_MEM
        .counts
        .get(i)
        .map_or(0, |c| c[0].load(Ordering::Relaxed))
}

// ---------------------------------------------------------------- slot writes

/// Write `value` into each `slot`, making read-only pages writable for the
/// moment (plain `mprotect` keeps each page's key) and restoring them.
fn write_slots(writes: &[(usize, usize)], maps: &[crate::maps::Mapping]) {
    let mut by_page: Vec<(usize, usize, usize)> =
        writes.iter().map(|&(s, v)| (page_down(s), s, v)).collect();
    by_page.sort_unstable();
    let mut i = 0;
    while i < by_page.len() {
        let page = by_page[i].0;
        let mut j = i;
        while j < by_page.len() && by_page[j].0 == page {
            j += 1;
        }
        let prot = maps
            .iter()
            .find(|m| m.contains(page))
            .map(|m| m.prot)
            .unwrap_or_else(|| runtime::fatal(format_args!("GOT page {page:#x} is in no mapping")));
        let writable = prot & libc::PROT_WRITE != 0;
        if !writable {
            // SAFETY: a page of a loaded object's GOT/RELRO; writable only
            // for the writes below, then back to its protection. No page is
            // made executable.
            let r = unsafe {
                libc::mprotect(
                    page as *mut c_void,
                    PAGE,
                    (prot | libc::PROT_WRITE) & !libc::PROT_EXEC,
                )
            };
            if r != 0 {
                runtime::fatal(format_args!(
                    "mprotect({page:#x}, writable) for GOT patching failed (errno {})",
                    crate::stackfmt::errno()
                ));
            }
        }
        for &(_, slot, value) in &by_page[i..j] {
            // SAFETY: slot is an aligned GOT/fini slot of a loaded object,
            // now writable; the compartment keys are all accessible here
            // (start-up, or the dlopen hook's all-keys section).
            unsafe { core::ptr::write_volatile(slot as *mut usize, value) };
        }
        if !writable {
            // SAFETY: back to the protection the page had.
            let r = unsafe { libc::mprotect(page as *mut c_void, PAGE, prot) };
            if r != 0 {
                runtime::fatal(format_args!(
                    "mprotect({page:#x}) restoring protection after GOT patching failed (errno {})",
                    crate::stackfmt::errno()
                ));
            }
        }
        i = j;
    }
}

// ---------------------------------------------------------------- patching

/// The executable and application libraries: the objects whose calls gates
/// switch (system objects may be in a compartment only in strict mode,
/// where calls into them keep the caller's rights).
fn is_app(o: &LoadedObject) -> bool {
    matches!(o.kind, ObjectKind::Main | ObjectKind::Application)
}

/// Is `addr` inside an executable segment of `o`?
fn in_text(o: &LoadedObject, addr: usize) -> bool {
    o.segments
        .iter()
        .any(|s| s.executable() && s.range.contains(addr))
}

fn symbol_name_at(addr: usize) -> Option<String> {
    // SAFETY: zeroed Dl_info is valid for dladdr to fill.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: dladdr only reads loader data.
    if unsafe { libc::dladdr(addr as *const c_void, &mut info) } != 0 && !info.dli_sname.is_null() {
        // SAFETY: a NUL-terminated string owned by the loader.
        let name = unsafe { CStr::from_ptr(info.dli_sname) }.to_string_lossy();
        let off = addr.wrapping_sub(info.dli_saddr as usize);
        if off == 0 {
            return Some(name.into_owned());
        }
        return Some(format!("{name}+{off:#x}"));
    }
    None
}

/// Resolve `name` as the dynamic linker would for a lazily bound slot.
fn resolve_lazy(name: &str) -> usize {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) as usize }
}

/// Patch the GOT slots and destructors of census objects `which` (those in
/// a compartment), and scan their code for WRPKRU/XRSTOR. Called at
/// start-up for every object and by the dlopen hook for new ones. PKRU must
/// allow every compartment key.
pub fn patch_objects(rt: &Runtime, census: &Census, which: core::ops::Range<usize>) {
    let mut st = state();
    let count = rt.config.reports.gates;
    let variant = Variant::current(count);
    let maps = crate::maps::read_self_maps().unwrap_or_else(|e| {
        runtime::fatal(format_args!(
            "reading /proc/self/maps for GOT patching: {e}"
        ))
    });
    let gating = st.enabled;
    let mut writes: Vec<(usize, usize)> = Vec::new();
    for i in which {
        let Some(own) = census.compartment_of.get(i).copied().flatten() else {
            continue;
        };
        let obj = &census.objects[i];
        // System objects (ld.so, libc, … in strict mode's compartment) are
        // trusted code, as in IA2: not scanned, not gated, their callers'
        // rights unchanged.
        if !is_app(obj) || obj.segments.is_empty() {
            continue;
        }
        scan_object(&mut st, rt, obj);
        if !gating {
            continue;
        }
        let Some(dynamic) = obj.dynamic_info() else {
            continue;
        };
        let lazy = !dynamic.bind_now();
        for r in dynamic.relocations(obj.base) {
            let via = match r.r_type {
                elf::R_X86_64_JUMP_SLOT => Via::JumpSlot,
                elf::R_X86_64_GLOB_DAT => Via::GlobDat,
                _ => continue,
            };
            if r.sym == 0 || !obj.contains(r.slot) {
                continue;
            }
            // SAFETY: the index comes from this object's own relocation.
            let Some(sym) = (unsafe { dynamic.symbol(r.sym) }) else {
                continue;
            };
            // SAFETY: the slot is an aligned GOT word of this loaded object.
            let mut value = unsafe { core::ptr::read_volatile(r.slot as *const usize) };
            if lazy && via == Via::JumpSlot && obj.contains(value) {
                // Still the lazy PLT stub (or a function of the object itself).
                let resolved = resolve_lazy(sym.name);
                if resolved == 0 || obj.contains(resolved) {
                    continue;
                }
                value = resolved;
            }
            if value == 0 {
                continue;
            }
            let Some((owner_index, owner)) = census.object_at(value) else {
                continue;
            };
            let Some(theirs) = census.compartment_of[owner_index] else {
                continue;
            };
            // Strict mode's system objects: gated only as union gates, for
            // `__tls_get_addr` with IA2_TLS_GET_ADDR_GATE=1 or for everything
            // with IA2_LIBC_GATES=union.
            let union = !is_app(owner)
                && theirs != own
                && (rt.config.libc_gates == crate::config::LibcGates::Union
                    || (rt.config.tls_get_addr_gate
                        && sym.name == "__tls_get_addr"
                        && owner.kind == ObjectKind::Loader));
            if theirs == own || owner_index == i || (!is_app(owner) && !union) {
                continue;
            }
            let is_function = match sym.st_type {
                elf::STT_FUNC | elf::STT_GNU_IFUNC => true,
                elf::STT_NOTYPE => in_text(owner, value),
                _ => false,
            };
            if !is_function {
                st.data_imports.push(DataImport {
                    importer: obj.display_name().to_string(),
                    importer_compartment: own,
                    symbol: sym.name.to_string(),
                    owner: owner.display_name().to_string(),
                    owner_compartment: theirs,
                    address: value,
                    page_compartment: census.plan.lookup(value).and_then(|e| e.compartment),
                });
                continue;
            }
            let g = gate_for(
                &mut st,
                rt,
                value,
                theirs,
                sym.name,
                owner.display_name(),
                if union { Variant::union() } else { variant },
            );
            writes.push((r.slot, stub_address(g)));
            st.patches.push(Patch {
                gate: g,
                caller: obj.display_name().to_string(),
                caller_compartment: Some(own),
                slot: r.slot,
                via,
            });
        }
        // Strict mode: every object's first destructor calls libc's
        // `__cxa_finalize`, whose atexit list is libc-compartment data, so
        // destructors keep the rights of the thread that calls `exit`.
        if rt.config.libc_compartment.is_none() {
            patch_fini(&mut st, rt, obj, own, variant, &mut writes);
        }
    }
    write_slots(&writes, &maps);
}

/// Point `DT_FINI` and each `DT_FINI_ARRAY` entry of `obj` at gates into
/// its own compartment.
fn patch_fini(
    st: &mut State,
    rt: &Runtime,
    obj: &LoadedObject,
    own: u8,
    variant: Variant,
    writes: &mut Vec<(usize, usize)>,
) {
    let Some(d) = obj.dynamic_info() else { return };
    if d.fini_array != 0 && d.fini_arraysz != 0 {
        for k in 0..d.fini_arraysz / 8 {
            let slot = d.fini_array + 8 * k;
            // SAFETY: DT_FINI_ARRAY describes an array of function pointers
            // in this object's (mapped) image.
            let f = unsafe { core::ptr::read_volatile(slot as *const usize) };
            if f == 0 || f == usize::MAX || !in_text(obj, f) {
                continue;
            }
            let name = symbol_name_at(f).unwrap_or_else(|| format!("DT_FINI_ARRAY[{k}]"));
            let g = gate_for(st, rt, f, own, &name, obj.display_name(), variant);
            writes.push((slot, stub_address(g)));
            st.patches.push(Patch {
                gate: g,
                caller: obj.display_name().to_string(),
                caller_compartment: None,
                slot,
                via: Via::FiniArray(k),
            });
        }
    }
    // DT_FINI's d_ptr stays relative to the load address (glibc does not
    // rebase it), and ld.so reads it from the dynamic section at exit.
    let Some(dynamic) = obj.dynamic else { return };
    let mut p = dynamic as *const elf::Dyn64<object::LittleEndian>;
    loop {
        // SAFETY: the object's DT_NULL-terminated dynamic section.
        let e = unsafe { &*p };
        let tag = e.d_tag.get(object::LittleEndian) as u32;
        if tag == elf::DT_NULL {
            break;
        }
        if tag == elf::DT_FINI {
            let f = obj
                .base
                .wrapping_add(e.d_val.get(object::LittleEndian) as usize);
            if in_text(obj, f) {
                let name = symbol_name_at(f).unwrap_or_else(|| "DT_FINI".to_string());
                let g = gate_for(st, rt, f, own, &name, obj.display_name(), variant);
                let slot = p as usize + 8;
                writes.push((slot, stub_address(g).wrapping_sub(obj.base)));
                st.patches.push(Patch {
                    gate: g,
                    caller: obj.display_name().to_string(),
                    caller_compartment: None,
                    slot,
                    via: Via::Fini,
                });
            }
        }
        // SAFETY: not past DT_NULL yet.
        p = unsafe { p.add(1) };
    }
}

fn scan_object(st: &mut State, rt: &Runtime, obj: &LoadedObject) {
    if rt.config.scan_wrpkru == ScanWrpkru::Off {
        return;
    }
    let mut hits = Vec::new();
    for s in obj.segments.iter().filter(|s| s.executable()) {
        // SAFETY: an executable PT_LOAD segment of a loaded object: mapped
        // and readable (text is never tagged).
        let bytes =
            unsafe { core::slice::from_raw_parts(s.range.start as *const u8, s.range.len()) };
        for h in crate::scan::scan(bytes) {
            hits.push(ScanHit {
                object: obj.display_name().to_string(),
                offset: s.range.start - obj.base + h.offset,
                what: h.kind.describe(),
            });
        }
    }
    const SHOWN: usize = 16;
    for h in hits.iter().take(SHOWN) {
        log::warn!(
            "IA2_SCAN_WRPKRU: {} at {}+{:#x} (compartment code can change its own rights)",
            h.what,
            h.object,
            h.offset
        );
    }
    if hits.len() > SHOWN {
        log::warn!(
            "IA2_SCAN_WRPKRU: … and {} more in {}",
            hits.len() - SHOWN,
            obj.display_name()
        );
    }
    if rt.config.scan_wrpkru == ScanWrpkru::Deny {
        if let Some(h) = hits.first() {
            runtime::fatal(format_args!(
                "IA2_SCAN_WRPKRU=deny: {} at {}+{:#x} ({} such sequence(s) in this object)",
                h.what,
                h.object,
                h.offset,
                hits.len()
            ));
        }
    }
    st.scan_hits.extend(hits);
}

/// Start-up: map the main thread's gate-frame stack, patch every
/// compartment object and scan their code. Called by `runtime::init` after
/// the plan is applied, with every key accessible.
pub fn install(rt: &Runtime) {
    {
        let mut st = state();
        if st.installed {
            return;
        }
        st.installed = true;
        st.enabled = rt.config.gates;
    }
    if rt.config.gates {
        thread_start();
    }
    let census = match rt.census.read() {
        Ok(c) => c,
        Err(e) => e.into_inner(),
    };
    patch_objects(rt, &census, 0..census.objects.len());
    crate::dl::startup_done(&census);
    drop(census);
    if rt.config.gates {
        protect_table(false);
    }
    if rt.config.reports.gates {
        extern "C" {
            fn __cxa_atexit(
                f: extern "C" fn(*mut c_void),
                arg: *mut c_void,
                dso: *mut c_void,
            ) -> c_int;
        }
        // Registered with no DSO handle, so that no `__cxa_finalize` (the
        // shim's own destructor) runs it early; registered before
        // `__libc_start_main` registers `_dl_fini`, so it runs after every
        // object's destructors and counts their gates too.
        // SAFETY: registering a plain function; the handle may be null.
        unsafe {
            __cxa_atexit(
                exit_report_hook,
                core::ptr::null_mut(),
                core::ptr::null_mut(),
            )
        };
    }
}

/// Mark the gates into objects that `dlclose` unmapped.
pub fn forget_range(range: objects::Range) {
    let mut st = state();
    for g in st.gates.iter_mut().filter(|g| range.contains(g.target)) {
        g.dead = true;
    }
}

// ---------------------------------------------------------------- reports

fn comp_str(c: Option<u8>) -> String {
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
            if st.enabled {
                "IA2_GATES=1"
            } else {
                "off: IA2_GATES=0"
            }
        );
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
            "ia2shim[{p}]:   {} gates, {} patched slots, {} cross-compartment data imports, {} WRPKRU/XRSTOR sequences",
            st.gates.len(),
            st.patches.len(),
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
    if !json {
        let _ = writeln!(o, "ia2shim[{p}]:   {} gates, {total} calls", st.gates.len());
    }
    o
}

extern "C" fn exit_report_hook(_: *mut c_void) {
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
    let (start, ret) = match variant {
        Variant::Hardware => (addr(ia2shim_gate_hw), addr(ia2shim_gate_hw_ret)),
        Variant::HardwareCounting => (addr(ia2shim_gate_hwcount), addr(ia2shim_gate_hwcount_ret)),
        Variant::Sim => (addr(ia2shim_gate_sim), addr(ia2shim_gate_sim_ret)),
        Variant::HardwareUnion => (addr(ia2shim_gate_hwunion), addr(ia2shim_gate_hwunion_ret)),
        Variant::SimUnion => (addr(ia2shim_gate_simunion), addr(ia2shim_gate_simunion_ret)),
    };
    let mut out = Vec::new();
    // The stub: lea + jmp.
    for (from, stop_at) in [
        (stub_address(0), iced_x86::Mnemonic::Jmp),
        (start, iced_x86::Mnemonic::Call),
        (ret, iced_x86::Mnemonic::Ret),
    ] {
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

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::Mnemonic;

    /// Sim-mode tests share the process-wide table and backend.
    static LOCK: Mutex<()> = Mutex::new(());

    fn sim_gate(target: usize, pkru: u32) -> usize {
        pku::set_backend(Backend::Sim);
        thread_start();
        let mut st = state();
        st.enabled = true;
        if let Some(&i) = st.by_target.get(&(target, 1)) {
            return i;
        }
        let i = st.gates.len();
        write_entry(
            &mut st,
            i,
            Entry {
                target,
                code: Variant::Sim.code(),
                pkru,
                compartment: 1,
                _reserved: 0,
            },
        );
        st.gates.push(Gate {
            index: i,
            target,
            compartment: 1,
            symbol: "test".into(),
            callee: "test".into(),
            variant: Variant::Sim,
            dead: false,
        });
        st.by_target.insert((target, 1), i);
        i
    }

    #[test]
    fn hardware_round_trip_is_within_budget() {
        let insns = round_trip_instructions(Variant::Hardware);
        let pkru = insns
            .iter()
            .filter(|i| matches!(i.mnemonic(), Mnemonic::Rdpkru | Mnemonic::Wrpkru))
            .count();
        assert_eq!(pkru, 3, "one RDPKRU and two WRPKRU");
        let n = insns.len() - pkru;
        eprintln!("hardware gate round trip: {n} instructions outside RDPKRU/WRPKRU");
        assert!(n <= 30, "{n} instructions outside RDPKRU/WRPKRU");
        let counting = round_trip_instructions(Variant::HardwareCounting).len() - pkru;
        assert_eq!(counting, n + 1);
        let sim = round_trip_instructions(Variant::Sim);
        assert!(sim
            .iter()
            .all(|i| !matches!(i.mnemonic(), Mnemonic::Rdpkru | Mnemonic::Wrpkru)));
        assert_eq!(
            sim.len(),
            n + 2,
            "sim = hardware + counter + one more simulated PKRU move"
        );
    }

    static SEEN_PKRU: AtomicU64 = AtomicU64::new(0);

    extern "C" fn ten(
        a: i64,
        b: i64,
        c: i64,
        d: i64,
        e: i64,
        f: i64,
        g: i64,
        h: i64,
        i: i64,
        j: i64,
    ) -> i64 {
        SEEN_PKRU.store(sim_pkru() as u64, Ordering::Relaxed);
        a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h + 9 * i + 10 * j
    }

    #[repr(C)]
    #[derive(Debug, PartialEq, Clone, Copy)]
    struct Pair {
        x: f64,
        y: f64,
    }

    extern "C" fn doubles(
        a: f64,
        b: f64,
        c: f64,
        d: f64,
        e: f64,
        f: f64,
        g: f64,
        h: f64,
        i: f64,
        k: i64,
    ) -> Pair {
        Pair {
            x: a + b + c + d + e + f + g + h + i,
            y: k as f64 * h,
        }
    }

    #[repr(C)]
    #[derive(Debug, PartialEq, Clone, Copy)]
    struct Big {
        v: [u64; 9],
    }

    extern "C" fn big(seed: u64, s: Big) -> Big {
        let mut o = s;
        for (k, x) in o.v.iter_mut().enumerate() {
            *x = *x * 2 + seed + k as u64;
        }
        o
    }

    extern "C" fn two() -> u128 {
        (7u128 << 64) | 9
    }

    #[test]
    fn sim_gates_keep_the_abi_and_switch_the_simulated_pkru() {
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let callee_pkru = pku::pkru_allowing(5);
        let before = 0x1234_5678;
        let g = sim_gate(ten as *const () as usize, callee_pkru);
        set_sim_pkru(before);
        let top = stack_top();
        assert_ne!(top, 0);
        let f: extern "C" fn(i64, i64, i64, i64, i64, i64, i64, i64, i64, i64) -> i64 =
            // SAFETY: the stub forwards to `ten`, whose type this is.
            unsafe { core::mem::transmute(stub_address(g)) };
        assert_eq!(f(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 385);
        assert_eq!(SEEN_PKRU.load(Ordering::Relaxed) as u32, callee_pkru);
        assert_eq!(sim_pkru(), before);
        assert_eq!(stack_top(), top);
        assert!(calls(g) >= 1);

        let g = sim_gate(doubles as *const () as usize, callee_pkru);
        let f: extern "C" fn(f64, f64, f64, f64, f64, f64, f64, f64, f64, i64) -> Pair =
            // SAFETY: as above.
            unsafe { core::mem::transmute(stub_address(g)) };
        assert_eq!(
            f(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 3),
            Pair { x: 45.0, y: 24.0 }
        );

        let g = sim_gate(big as *const () as usize, callee_pkru);
        let f: extern "C" fn(u64, Big) -> Big =
            // SAFETY: as above.
            unsafe { core::mem::transmute(stub_address(g)) };
        let r = f(
            1,
            Big {
                v: [1, 2, 3, 4, 5, 6, 7, 8, 9],
            },
        );
        assert_eq!(r.v, [3, 6, 9, 12, 15, 18, 21, 24, 27]);

        let g = sim_gate(two as *const () as usize, callee_pkru);
        // SAFETY: as above.
        let f: extern "C" fn() -> u128 = unsafe { core::mem::transmute(stub_address(g)) };
        assert_eq!(f(), (7u128 << 64) | 9);
        assert_eq!(stack_top(), top);
    }

    #[test]
    fn a_new_thread_gets_its_own_stack() {
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let main_top = stack_top();
        let t = std::thread::spawn(|| {
            assert_eq!(stack_top(), 0);
            assert_eq!(sim_pkru(), pku::DEFAULT_PKRU);
            thread_start();
            let t = stack_top();
            assert_ne!(t, 0);
            thread_exit();
            assert_eq!(stack_top(), 0);
            t
        })
        .join()
        .unwrap();
        assert_ne!(t, main_top);
    }

    #[test]
    fn a_panic_through_a_sim_gate_restores_pkru_and_the_frame_stack() {
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        extern "C-unwind" fn boom(x: i64) -> i64 {
            if x > 0 {
                std::panic::panic_any(x * 3);
            }
            x
        }
        let g = sim_gate(boom as *const () as usize, pku::pkru_allowing(4));
        // SAFETY: the stub forwards to `boom`, whose type this is.
        let f: extern "C-unwind" fn(i64) -> i64 = unsafe { core::mem::transmute(stub_address(g)) };
        let before = 0x0bad_cafe;
        set_sim_pkru(before);
        let top = stack_top();
        let r = std::panic::catch_unwind(|| f(7));
        let payload = r.expect_err("the panic crosses the gate");
        assert_eq!(payload.downcast_ref::<i64>(), Some(&21));
        assert_eq!(sim_pkru(), before, "the pad restored the caller's PKRU");
        assert_eq!(stack_top(), top, "the pad popped the gate frame");
        assert_eq!(f(-1), -1, "the gate still works afterwards");
    }

    extern "C" fn fixup_only(_sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
        // SAFETY: the kernel's arguments, on the faulting thread.
        if !unsafe { fixup_fault(info, ctx) } {
            // SAFETY: async-signal-safe; the test failed.
            unsafe { libc::abort() };
        }
    }

    #[test]
    fn a_thread_without_a_gate_stack_gets_one_on_its_first_gate() {
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        extern "C" fn add(a: i64, b: i64) -> i64 {
            a + b
        }
        let g = sim_gate(add as *const () as usize, pku::pkru_allowing(6));
        // SAFETY: zeroed sigaction structs are valid; installing a handler
        // that only runs the gate fix-up, and restoring the old one after.
        let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
        sa.sa_sigaction = fixup_only as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        // SAFETY: valid sigaction structs.
        assert_eq!(unsafe { libc::sigaction(libc::SIGSEGV, &sa, &mut old) }, 0);
        let r = std::thread::spawn(move || {
            assert_eq!(stack_top(), 0, "a fresh thread has no gate-frame stack");
            // SAFETY: the stub forwards to `add`.
            let f: extern "C" fn(i64, i64) -> i64 =
                unsafe { core::mem::transmute(stub_address(g)) };
            let r = f(40, 2);
            let top = stack_top();
            assert_ne!(top, 0);
            assert_eq!(top, stack_base(), "the frame was popped on the new stack");
            assert_eq!(f(1, 2), 3);
            thread_exit();
            r
        })
        .join()
        .unwrap();
        // SAFETY: restoring the previous disposition.
        unsafe { libc::sigaction(libc::SIGSEGV, &old, core::ptr::null_mut()) };
        assert_eq!(r, 42);
    }

    #[test]
    fn unwinding_passes_through_sim_gates() {
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        extern "C" fn frames() -> usize {
            let mut n = 0;
            backtrace_walk(&mut n);
            n
        }
        fn backtrace_walk(n: &mut usize) {
            let bt = std::backtrace::Backtrace::force_capture();
            let s = format!("{bt:?}");
            if s.contains("unwinding_passes_through_sim_gates") {
                *n = 1;
            }
        }
        let g = sim_gate(frames as *const () as usize, pku::pkru_allowing(3));
        // SAFETY: the stub forwards to `frames`.
        let f: extern "C" fn() -> usize = unsafe { core::mem::transmute(stub_address(g)) };
        assert_eq!(
            f(),
            1,
            "the backtrace from inside the gate reaches the test function"
        );
    }
}

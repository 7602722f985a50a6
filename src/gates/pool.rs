//! The stub pool: build-time stubs, the variant code (asm), the gate table's memory, and the variants.

use super::*;

/// Number of stubs in the pool, i.e. the most distinct (target, callee
/// compartment) pairs a process can have.
pub const MAX_GATES: usize = 4096;
/// Bytes per table entry (and per counter).
pub(super) const STRIDE: usize = 32;
/// Bytes per gate frame (a power of two: hardened gates check a frame
/// pointer's alignment).
pub const FRAME: usize = 64;
/// Usable bytes of each thread's gate-frame stack (guard pages on both sides).
pub const STACK_BYTES: usize = 1 << 20;
pub(super) const TABLE_BYTES: usize = MAX_GATES * STRIDE;

/// One gate: what the stub's `r11` points at.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct Entry {
    pub(super) target: usize,
    /// The variant code the stub jumps to.
    pub(super) code: usize,
    pub(super) pkru: u32,
    pub(super) compartment: u32,
    pub(super) _reserved: u64,
}

/// What hardened gates read besides the table, on the shim key with it:
/// the frame region's base and the mask that opens the shim key.
#[repr(C, align(4096))]
pub(super) struct Meta {
    pub(super) region: usize,
    pub(super) open_mask: u32,
    _pad: [u8; PAGE - 12],
}

pub(super) const META_BYTES: usize = core::mem::size_of::<Meta>();
pub(super) const META_REGION: usize = 0;
pub(super) const META_OPEN: usize = 8;
/// The frame region: every thread's gate-frame stack when hardened.
pub const REGION_BYTES: usize = 1 << 30;
/// `test rcx, REGION_CHECK` (sign-extended) after `rcx = rbx ^ region`:
/// zero iff rbx is a 64-byte slot inside the region.
const REGION_CHECK: i32 = !((REGION_BYTES - 1) as i32) | (FRAME as i32 - 1);

/// The meta page and the gate table (the shim key once hardened; the
/// table read-only once written), followed by the call counters (key 0;
/// same stride, so the counting variants address a counter as
/// `[r11 + TABLE_BYTES]`).
#[repr(C, align(4096))]
pub(super) struct GateMem {
    pub(super) meta: UnsafeCell<Meta>,
    pub(super) table: UnsafeCell<[Entry; MAX_GATES]>,
    pub(super) counts: [[AtomicU64; STRIDE / 8]; MAX_GATES],
}

// SAFETY: the table is written only under `STATE`'s lock (and read-only in
// between); the gate code only reads it. The counters are atomics.
unsafe impl Sync for GateMem {}

pub(super) const ZERO_ENTRY: Entry = Entry {
    target: 0,
    code: 0,
    pkru: 0,
    compartment: 0,
    _reserved: 0,
};

pub(super) static GATE_MEM: GateMem = GateMem {
    meta: UnsafeCell::new(Meta {
        region: 0,
        open_mask: !0,
        _pad: [0; PAGE - 12],
    }),
    table: UnsafeCell::new([ZERO_ENTRY; MAX_GATES]),
    counts: [const { [const { AtomicU64::new(0) }; STRIDE / 8] }; MAX_GATES],
};

const _: () = assert!(core::mem::size_of::<Entry>() == STRIDE);
const _: () = assert!(TABLE_BYTES % PAGE == 0);
const _: () = assert!(META_BYTES == PAGE && FRAME.is_power_of_two());

// The stub pool, the three variants, the unwind pads and the TLS words.
// Intel syntax. DWARF registers: 3 = rbx, 10 = r10, 16 = return address;
// `.cfi_escape 0x10, REG, 2, DW_OP_bregN, OFF` is DW_CFA_expression "REG is
// saved at [bregN + OFF]".
core::arch::global_asm!(
    // ---- per-thread words: gate-frame stack top, then the simulated PKRU
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
    "lea r11, [rip + {mem} + {meta_bytes} + {stride} * ia2shim_gate_i]",
    "jmp qword ptr [r11 + 8]",
    ".set ia2shim_gate_i, ia2shim_gate_i + 1",
    ".endr",
    ".cfi_endproc",
    ".size ia2shim_gate_pool, . - ia2shim_gate_pool",
    ".popsection",
    // ---- the variants, on pages of their own: `patch_tls` writes the
    // gate TLS words' offset into their `fs:` displacements once, before
    // the first gate is made (see `TP_MAGIC`).
    ".pushsection .text.ia2shim_gate_variants,\"ax\",@progbits",
    ".balign 4096",
    ".globl ia2shim_gate_variants",
    ".hidden ia2shim_gate_variants",
    "ia2shim_gate_variants:",
    // add qword ptr fs:[TP], FRAME
    ".macro ia2tp_push_frame",
    ".byte 0x64, 0x48, 0x83, 0x04, 0x25",
    ".long {tp_magic}",
    ".byte {frame}",
    ".endm",
    // sub qword ptr fs:[TP], FRAME
    ".macro ia2tp_pop_frame",
    ".byte 0x64, 0x48, 0x83, 0x2c, 0x25",
    ".long {tp_magic}",
    ".byte {frame}",
    ".endm",
    // mov r10, qword ptr fs:[TP]
    ".macro ia2tp_top_r10",
    ".byte 0x64, 0x4c, 0x8b, 0x14, 0x25",
    ".long {tp_magic}",
    ".endm",
    // mov rax, qword ptr fs:[TP]
    ".macro ia2tp_top_rax",
    ".byte 0x64, 0x48, 0x8b, 0x04, 0x25",
    ".long {tp_magic}",
    ".endm",
    // mov eax, dword ptr fs:[TP + 8] (the simulated PKRU)
    ".macro ia2tp_sim_get",
    ".byte 0x64, 0x8b, 0x04, 0x25",
    ".long {tp_magic} + 8",
    ".endm",
    // mov dword ptr fs:[TP + 8], eax
    ".macro ia2tp_sim_set",
    ".byte 0x64, 0x89, 0x04, 0x25",
    ".long {tp_magic} + 8",
    ".endm",
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
    "ia2tp_push_frame",
    "ia2tp_top_r10",
    ".globl ia2shim_gate_\\name\\()_fix",
    ".hidden ia2shim_gate_\\name\\()_fix",
    "ia2shim_gate_\\name\\()_fix:",
    "mov qword ptr [r10 - {frame} + 40], rbx",
    ".cfi_escape 0x10, 0x03, 0x02, 0x7a, {rbx_at_top}",
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
    "ia2tp_pop_frame",
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
    // ---- hardened variants (`IA2_HARDEN=on`): the frame stack carries the
    // shim key, which the caller's PKRU write-disables. The arguments wait
    // in the red zone while a first WRPKRU opens the shim key (caller's
    // rights ANDed with the meta page's mask), the frame is written, and
    // the second installs the callee's PKRU. On return the frame pointer
    // (rbx, which the callee could have changed) must be a 64-byte slot of
    // the frame region (1 GiB, aligned on 1 GiB, all of it on the shim key):
    // `(rbx ^ region) & 0xffffffffc000003f == 0`. Only gates write there,
    // so the return address and PKRU read back are ones a gate saved.
    // `sim`: the simulated PKRU word stands in for RDPKRU/WRPKRU.
    ".macro ia2shim_gate_hbody name, count, union, sim",
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
    "mov qword ptr [rsp - 8], rax",
    "mov qword ptr [rsp - 16], rdx",
    "mov qword ptr [rsp - 24], rcx",
    ".if \\sim",
    "ia2tp_sim_get",
    "mov r10d, eax",
    "and eax, dword ptr [rip + {mem} + {meta_open}]",
    "ia2tp_sim_set",
    ".else",
    "xor ecx, ecx",
    "rdpkru",
    "mov r10d, eax",
    "and eax, dword ptr [rip + {mem} + {meta_open}]",
    "wrpkru",
    ".endif",
    "ia2tp_push_frame",
    "ia2tp_top_rax",
    ".globl ia2shim_gate_\\name\\()_fix",
    ".hidden ia2shim_gate_\\name\\()_fix",
    "ia2shim_gate_\\name\\()_fix:",
    "mov qword ptr [rax - {frame} + 40], rbx",
    ".cfi_escape 0x10, 0x03, 0x02, 0x70, {rbx_at_top}",
    "lea rbx, [rax - {frame}]",
    ".cfi_escape 0x10, 0x03, 0x02, 0x73, 0x28",
    "pop qword ptr [rbx]",
    ".cfi_def_cfa_offset 0",
    ".cfi_escape 0x10, 0x10, 0x02, 0x73, 0x00",
    "mov dword ptr [rbx + 32], r10d",
    ".if \\union",
    "mov eax, r10d",
    "and eax, dword ptr [r11 + 16]",
    ".else",
    "mov eax, dword ptr [r11 + 16]",
    ".endif",
    ".if \\sim",
    "ia2tp_sim_set",
    ".else",
    "wrpkru",
    ".endif",
    "mov rax, qword ptr [rsp - 16]",
    "mov rdx, qword ptr [rsp - 24]",
    "mov rcx, qword ptr [rsp - 32]",
    "call qword ptr [r11]",
    ".globl ia2shim_gate_\\name\\()_ret",
    ".hidden ia2shim_gate_\\name\\()_ret",
    "ia2shim_gate_\\name\\()_ret:",
    "mov r11, rax",
    "mov r10, rdx",
    "mov rcx, rbx",
    "xor rcx, qword ptr [rip + {mem} + {meta_region}]",
    "test rcx, {region_check}",
    "jnz {bad_frame}",
    "push qword ptr [rbx]",
    ".cfi_def_cfa_offset 8",
    ".cfi_offset 16, -8",
    "mov eax, dword ptr [rbx + 32]",
    "mov rbx, qword ptr [rbx + 40]",
    ".cfi_restore rbx",
    "ia2tp_pop_frame",
    ".if \\sim",
    "ia2tp_sim_set",
    ".else",
    "xor ecx, ecx",
    "xor edx, edx",
    "wrpkru",
    ".endif",
    "mov rax, r11",
    "mov rdx, r10",
    "ret",
    ".cfi_endproc",
    ".size ia2shim_gate_\\name, . - ia2shim_gate_\\name",
    ".endm",
    "ia2shim_gate_hbody hwh, 0, 0, 0",
    "ia2shim_gate_hbody hwcounth, 1, 0, 0",
    "ia2shim_gate_hbody hwunionh, 1, 1, 0",
    "ia2shim_gate_hbody simh, 1, 0, 1",
    "ia2shim_gate_hbody simunionh, 1, 1, 1",
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
    "ia2tp_push_frame",
    "ia2tp_top_r10",
    ".globl ia2shim_gate_\\name\\()_fix",
    ".hidden ia2shim_gate_\\name\\()_fix",
    "ia2shim_gate_\\name\\()_fix:",
    "mov qword ptr [r10 - {frame} + 40], rbx",
    ".cfi_escape 0x10, 0x03, 0x02, 0x7a, {rbx_at_top}",
    "lea rbx, [r10 - {frame}]",
    ".cfi_escape 0x10, 0x03, 0x02, 0x73, 0x28",
    "pop qword ptr [rbx]",
    ".cfi_def_cfa_offset 0",
    ".cfi_escape 0x10, 0x10, 0x02, 0x73, 0x00",
    "mov qword ptr [rbx + 8], rax",
    "mov qword ptr [rbx + 16], rdx",
    "mov qword ptr [rbx + 24], rcx",
    "ia2tp_sim_get",
    "mov dword ptr [rbx + 32], eax",
    ".if \\union",
    "and eax, dword ptr [r11 + 16]",
    ".else",
    "mov eax, dword ptr [r11 + 16]",
    ".endif",
    "ia2tp_sim_set",
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
    "ia2tp_pop_frame",
    "ia2tp_sim_set",
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
    ".balign 4096",
    ".globl ia2shim_gate_variants_end",
    ".hidden ia2shim_gate_variants_end",
    "ia2shim_gate_variants_end:",
    ".popsection",
    max_gates = const MAX_GATES,
    stride = const STRIDE,
    table_bytes = const TABLE_BYTES,
    frame = const FRAME,
    mem = sym GATE_MEM,
    meta_bytes = const META_BYTES,
    meta_region = const META_REGION,
    meta_open = const META_OPEN,
    region_check = const REGION_CHECK,
    rbx_at_top = const (40 - FRAME as i64) & 0x7f,
    tp_magic = const TP_MAGIC,
    bad_frame = sym bad_frame,
    personality = sym gate_personality,
    resume = sym _Unwind_Resume,
);

extern "C" {
    pub(super) fn ia2shim_gate_pool();
    pub(super) fn ia2shim_gate_hw();
    pub(super) fn ia2shim_gate_hw_fix();
    pub(super) fn ia2shim_gate_hw_ret();
    pub(super) fn ia2shim_gate_hwcount();
    pub(super) fn ia2shim_gate_hwcount_fix();
    pub(super) fn ia2shim_gate_hwcount_ret();
    pub(super) fn ia2shim_gate_hwunion();
    pub(super) fn ia2shim_gate_hwunion_fix();
    pub(super) fn ia2shim_gate_hwunion_ret();
    pub(super) fn ia2shim_gate_simunion();
    pub(super) fn ia2shim_gate_simunion_fix();
    pub(super) fn ia2shim_gate_simunion_ret();
    pub(super) fn ia2shim_gate_sim();
    pub(super) fn ia2shim_gate_sim_fix();
    pub(super) fn ia2shim_gate_sim_ret();
    pub(super) fn ia2shim_gate_hwh();
    pub(super) fn ia2shim_gate_hwh_fix();
    pub(super) fn ia2shim_gate_hwh_ret();
    pub(super) fn ia2shim_gate_hwcounth();
    pub(super) fn ia2shim_gate_hwcounth_fix();
    pub(super) fn ia2shim_gate_hwcounth_ret();
    pub(super) fn ia2shim_gate_hwunionh();
    pub(super) fn ia2shim_gate_hwunionh_fix();
    pub(super) fn ia2shim_gate_hwunionh_ret();
    pub(super) fn ia2shim_gate_simh();
    pub(super) fn ia2shim_gate_simh_fix();
    pub(super) fn ia2shim_gate_simh_ret();
    pub(super) fn ia2shim_gate_simunionh();
    pub(super) fn ia2shim_gate_simunionh_fix();
    pub(super) fn ia2shim_gate_simunionh_ret();
    pub(super) fn ia2shim_gate_pad_hw();
    pub(super) fn ia2shim_gate_pad_sim();
    pub(super) fn _Unwind_Resume(exc: *mut c_void) -> !;
    pub(super) fn _Unwind_GetIP(ctx: *mut c_void) -> usize;
    pub(super) fn _Unwind_GetGR(ctx: *mut c_void, reg: c_int) -> usize;
    pub(super) fn _Unwind_SetIP(ctx: *mut c_void, ip: usize);
    pub(super) fn _Unwind_SetGR(ctx: *mut c_void, reg: c_int, value: usize);
}

extern "C" {
    fn ia2shim_gate_variants();
    fn ia2shim_gate_variants_end();
}

/// The `fs:` displacement the variants carry for the gate TLS words
/// (`ia2shim_gate_tls`) until [`patch_tls`] writes the real offset; `+ 8`
/// for the simulated PKRU. The shim's TLS offset is known only at load
/// (initial-exec: a GOT entry), and reading it there costs each gate a
/// `mov` on the way in and one on the way out.
const TP_MAGIC: u32 = 0x7a5e_b1a0;

/// Write the gate TLS words' `fs:` offset into the variants, once, before
/// the first gate is made (their pages hold nothing else, and no thread can
/// be running them yet). Returns the number of displacements written.
pub fn patch_tls() -> usize {
    static DONE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *DONE.get_or_init(|| {
        let tp = frame_top_tpoff();
        let (lo, hi) = (addr(ia2shim_gate_variants), addr(ia2shim_gate_variants_end));
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: the variants' own page-aligned pages (section padded to
        // pages); nothing runs them before the first gate exists.
        if unsafe { libc::mprotect(lo as *mut c_void, hi - lo, rw) } != 0 {
            crate::lifecycle::fatal(format_args!(
                "gates: mprotect of the gate variants failed (errno {})",
                crate::stackfmt::errno()
            ));
        }
        let mut n = 0;
        let mut a = lo + 1;
        while a + 4 <= hi {
            // SAFETY: inside the variants' pages, readable and writable now.
            let (sib, v) = unsafe {
                (
                    *((a - 1) as *const u8),
                    core::ptr::read_unaligned(a as *const u32),
                )
            };
            if sib == 0x25 && (v == TP_MAGIC || v == TP_MAGIC + 8) {
                let off = tp + i64::from(v - TP_MAGIC);
                let Ok(off) = i32::try_from(off) else {
                    crate::lifecycle::fatal(format_args!(
                        "gates: the shim's TLS offset {off:#x} does not fit a 32-bit displacement"
                    ));
                };
                // SAFETY: as above.
                unsafe { core::ptr::write_unaligned(a as *mut i32, off) };
                n += 1;
                a += 4;
            } else {
                a += 1;
            }
        }
        // SAFETY: as above; back to read-execute.
        if unsafe {
            libc::mprotect(
                lo as *mut c_void,
                hi - lo,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        } != 0
        {
            crate::lifecycle::fatal(format_args!(
                "gates: mprotect of the gate variants failed (errno {})",
                crate::stackfmt::errno()
            ));
        }
        n
    })
}

/// The `fs`-relative offset of the gate TLS words (the frame-stack top;
/// the simulated PKRU is 8 bytes further).
pub(super) fn frame_top_tpoff() -> i64 {
    let t: i64;
    // SAFETY: reads the shim's own GOT entry for its initial-exec TLS block.
    unsafe {
        core::arch::asm!(
            "mov {t}, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
            t = out(reg) t,
            options(nostack, readonly, preserves_flags)
        );
    }
    t
}

pub(super) fn addr(f: unsafe extern "C" fn()) -> usize {
    f as usize
}

/// Gates run the hardened variants (`IA2_HARDEN=on`); set once at install,
/// before the first gate is made.
#[link_section = ".ia2shim_sealed"]
pub(super) static HARDEN: AtomicBool = AtomicBool::new(false);

/// The `_fix` labels: a gate's first frame store, and the register that
/// holds the reserved top there (r10, or rax in hardened variants).
pub(super) fn fix_labels() -> [(usize, usize); 10] {
    let (r10, rax) = (libc::REG_R10 as usize, libc::REG_RAX as usize);
    [
        (addr(ia2shim_gate_hw_fix), r10),
        (addr(ia2shim_gate_hwcount_fix), r10),
        (addr(ia2shim_gate_hwunion_fix), r10),
        (addr(ia2shim_gate_sim_fix), r10),
        (addr(ia2shim_gate_simunion_fix), r10),
        (addr(ia2shim_gate_hwh_fix), rax),
        (addr(ia2shim_gate_hwcounth_fix), rax),
        (addr(ia2shim_gate_hwunionh_fix), rax),
        (addr(ia2shim_gate_simh_fix), rax),
        (addr(ia2shim_gate_simunionh_fix), rax),
    ]
}

/// Is `ip` a gate's return point, and is it a simulated variant's?
pub(super) fn return_point(ip: usize) -> Option<bool> {
    let hw = [
        ia2shim_gate_hw_ret,
        ia2shim_gate_hwcount_ret,
        ia2shim_gate_hwunion_ret,
        ia2shim_gate_hwh_ret,
        ia2shim_gate_hwcounth_ret,
        ia2shim_gate_hwunionh_ret,
    ];
    let sim = [
        ia2shim_gate_sim_ret,
        ia2shim_gate_simunion_ret,
        ia2shim_gate_simh_ret,
        ia2shim_gate_simunionh_ret,
    ];
    if hw.iter().any(|&f| addr(f) == ip) {
        Some(false)
    } else if sim.iter().any(|&f| addr(f) == ip) {
        Some(true)
    } else {
        None
    }
}

// A hardened gate's return found a frame pointer outside the frame region:
// the callee changed rbx. Report and die; never return through it.
core::arch::global_asm!(
    ".pushsection .text.ia2shim_gate_bad_frame,\"ax\",@progbits",
    ".balign 16",
    ".globl ia2shim_gate_bad_frame",
    ".hidden ia2shim_gate_bad_frame",
    ".type ia2shim_gate_bad_frame,@function",
    "ia2shim_gate_bad_frame:",
    "and rsp, -16",
    "mov rdi, rbx",
    "call {report}",
    "ud2",
    ".size ia2shim_gate_bad_frame, . - ia2shim_gate_bad_frame",
    ".popsection",
    report = sym bad_frame_report,
);

extern "C" {
    fn ia2shim_gate_bad_frame();
}

/// The target of the hardened variants' failed frame check.
pub(super) unsafe extern "C" fn bad_frame() {
    // SAFETY: only ever jumped to, never called: this is its address.
    unsafe { ia2shim_gate_bad_frame() }
}

extern "C" fn bad_frame_report(rbx: usize) -> ! {
    let mut b = crate::stackfmt::StackBuf::<256>::new();
    let _ = writeln!(
        b,
        "ia2shim[{}]: gate return through a forged frame pointer {rbx:#x} (not a slot of the \
         gate-frame region): the callee changed rbx; killed",
        crate::stackfmt::pid()
    );
    b.write_to_fd(crate::fault::REPORT_FD.load(Ordering::Relaxed));
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
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

    pub(super) fn is_union(self) -> bool {
        matches!(self, Variant::HardwareUnion | Variant::SimUnion)
    }

    pub(super) fn code(self) -> usize {
        let f: unsafe extern "C" fn() = match (self, HARDEN.load(Ordering::Relaxed)) {
            (Variant::Hardware, false) => ia2shim_gate_hw,
            (Variant::HardwareCounting, false) => ia2shim_gate_hwcount,
            (Variant::Sim, false) => ia2shim_gate_sim,
            (Variant::HardwareUnion, false) => ia2shim_gate_hwunion,
            (Variant::SimUnion, false) => ia2shim_gate_simunion,
            (Variant::Hardware, true) => ia2shim_gate_hwh,
            (Variant::HardwareCounting, true) => ia2shim_gate_hwcounth,
            (Variant::Sim, true) => ia2shim_gate_simh,
            (Variant::HardwareUnion, true) => ia2shim_gate_hwunionh,
            (Variant::SimUnion, true) => ia2shim_gate_simunionh,
        };
        addr(f)
    }

    /// The variant whose return an entry gate's record uses: its head
    /// (named in the record's `Entry`, for reports) and the return point
    /// that the record's cross path pushes, whose unwind tables describe
    /// the gate frame the record wrote. The record does the way in itself
    /// (and its own counting), so any variant of the backend and hardening
    /// with that frame layout serves: the plain ones.
    pub(super) fn entry_variant(self) -> (usize, usize) {
        let (head, ret): (unsafe extern "C" fn(), unsafe extern "C" fn()) =
            match (self, HARDEN.load(Ordering::Relaxed)) {
                (Variant::Hardware, false) => (ia2shim_gate_hw, ia2shim_gate_hw_ret),
                (Variant::HardwareCounting, false) => {
                    (ia2shim_gate_hwcount, ia2shim_gate_hwcount_ret)
                }
                (Variant::Hardware, true) => (ia2shim_gate_hwh, ia2shim_gate_hwh_ret),
                (Variant::HardwareCounting, true) => {
                    (ia2shim_gate_hwcounth, ia2shim_gate_hwcounth_ret)
                }
                (_, false) => (ia2shim_gate_sim, ia2shim_gate_sim_ret),
                (_, true) => (ia2shim_gate_simh, ia2shim_gate_simh_ret),
            };
        (addr(head), addr(ret))
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

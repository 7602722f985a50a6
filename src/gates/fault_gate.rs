//! Fault-driven entry gates, for the functions no table names (a static
//! callback passed as a pointer to another compartment).
//!
//! A protection-key fault whose instruction lies in the text of
//! compartment A's object, on a page tagged for A, while the thread runs
//! with other rights, means that A's code was entered without a gate. The
//! SIGSEGV handler then ([`fault_driven_entry`]):
//!
//! 1. finds the interrupted frame's CFA by unwinding from the handler
//!    through the signal frame (`_Unwind_Backtrace`, `_Unwind_GetCFA`), so
//!    the function's return address is at `CFA - 8`;
//! 2. pushes a gate frame (that return address, the interrupted PKRU) and
//!    replaces the return address with `ia2shim_fault_ret`, which pops the
//!    frame, restores the caller's PKRU and returns where the function would
//!    have;
//! 3. sets the signal frame's PKRU to A's, so the faulting instruction runs
//!    again with A's rights;
//! 4. queues the function (its start from `.eh_frame`, `_Unwind_Find_FDE`)
//!    for an entry gate, which `ia2shim_fault_ret` installs on its way out
//!    (outside the signal handler), so later calls do not fault.
//!
//! A fault by code of the compartment that is running (or by shared code),
//! or on a page that is not the code's own compartment's, is not this: it
//! stays a violation and is reported as before. What the function did
//! before its first access to its own data ran with its caller's rights.
//! An exception thrown through the first (fault-gated) invocation cannot
//! unwind through `ia2shim_fault_ret` (no CFI): that invocation only.

use super::*;
use core::sync::atomic::AtomicUsize;

/// Functions waiting for an entry gate (0 = free slot).
static PENDING: [AtomicUsize; 64] = [const { AtomicUsize::new(0) }; 64];
/// Non-zero while [`PENDING`] holds something (read by the asm).
static IA2SHIM_FAULT_PENDING: AtomicBool = AtomicBool::new(false);
/// Invocations gated by a fault.
pub static FAULT_GATED: AtomicU64 = AtomicU64::new(0);
/// Fault-driven gating is on (`IA2_GATES` includes `fault`).
#[link_section = ".ia2shim_sealed"]
pub(super) static ENABLED: AtomicBool = AtomicBool::new(false);

core::arch::global_asm!(
    ".pushsection .text.ia2shim_fault_ret,\"ax\",@progbits",
    ".balign 16",
    ".globl ia2shim_fault_ret",
    ".hidden ia2shim_fault_ret",
    ".type ia2shim_fault_ret,@function",
    "ia2shim_fault_ret:",
    "mov r11, rax",
    "mov r10, rdx",
    "mov rcx, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
    "mov rdx, qword ptr fs:[rcx]",
    "sub qword ptr fs:[rcx], {frame}",
    "push qword ptr [rdx - {frame}]",
    "mov eax, dword ptr [rdx - {frame} + 32]",
    "xor ecx, ecx",
    "xor edx, edx",
    "wrpkru",
    "cmp byte ptr [rip + {pending}], 0",
    "jne 2f",
    "mov rax, r11",
    "mov rdx, r10",
    "ret",
    "2:",
    "push r11",
    "push r10",
    "sub rsp, 40",
    "movdqu xmmword ptr [rsp], xmm0",
    "movdqu xmmword ptr [rsp + 16], xmm1",
    "call {install}",
    "movdqu xmm0, xmmword ptr [rsp]",
    "movdqu xmm1, xmmword ptr [rsp + 16]",
    "add rsp, 40",
    "pop rdx",
    "pop rax",
    "ret",
    ".size ia2shim_fault_ret, . - ia2shim_fault_ret",
    ".popsection",
    frame = const FRAME,
    install = sym install_pending,
    pending = sym IA2SHIM_FAULT_PENDING,
);

extern "C" {
    fn ia2shim_fault_ret();
    fn _Unwind_Backtrace(
        cb: extern "C" fn(*mut c_void, *mut c_void) -> c_int,
        arg: *mut c_void,
    ) -> c_int;
    fn _Unwind_GetIPInfo(ctx: *mut c_void, before: *mut c_int) -> usize;
    fn _Unwind_GetCFA(ctx: *mut c_void) -> usize;
    fn _Unwind_Find_FDE(pc: *mut c_void, bases: *mut [usize; 3]) -> *const u8;
}

struct Walk {
    rip: usize,
    /// The interrupted frame was the last one seen.
    found: bool,
    /// Its CFA, read in its caller's context (libgcc gives each context
    /// the CFA of the frame below it), and the return address there.
    cfa: usize,
    ret: usize,
}

extern "C" fn walk_frame(ctx: *mut c_void, arg: *mut c_void) -> c_int {
    const URC_NO_REASON: c_int = 0;
    const URC_END_OF_STACK: c_int = 5;
    // SAFETY: arg is our Walk; ctx the unwinder's.
    let w = unsafe { &mut *(arg as *mut Walk) };
    let mut before = 0;
    // SAFETY: a live unwind context.
    let ip = unsafe { _Unwind_GetIPInfo(ctx, &mut before) };
    if w.found {
        // SAFETY: as above.
        w.cfa = unsafe { _Unwind_GetCFA(ctx) };
        w.ret = ip;
        return URC_END_OF_STACK;
    }
    // The interrupted frame is a signal frame: its IP is the faulting
    // instruction itself.
    if ip == w.rip && before != 0 {
        w.found = true;
    }
    URC_NO_REASON
}

/// The start and size of the function holding `pc`, from its FDE
/// (pointer encoding `pcrel|sdata4`, what GCC and Clang emit on x86-64).
fn function_of(pc: usize) -> Option<(usize, usize)> {
    let mut bases = [0usize; 3];
    // SAFETY: the unwinder reads the loaded objects' .eh_frame.
    let fde = unsafe { _Unwind_Find_FDE(pc as *mut c_void, &mut bases) };
    if fde.is_null() || bases[2] == 0 {
        return None;
    }
    // FDE: length (4), CIE pointer (4), pc_begin, pc_range.
    // SAFETY: the FDE the unwinder found, in mapped .eh_frame.
    let (begin_rel, range) = unsafe {
        (
            core::ptr::read_unaligned(fde.add(8) as *const i32),
            core::ptr::read_unaligned(fde.add(12) as *const u32),
        )
    };
    let begin = (fde as usize + 8).wrapping_add(begin_rel as isize as usize);
    if begin != bases[2] || !(begin..begin + range as usize).contains(&pc) {
        return None; // another encoding
    }
    Some((begin, range as usize))
}

/// Called by the SIGSEGV handler for a `SEGV_PKUERR`, before reporting it.
/// Returns `true` when the fault was compartment code entered without a
/// gate, now running with its own rights (the handler returns and the
/// instruction runs again).
///
/// # Safety
/// `info` and `ctx` are the kernel's arguments to a SIGSEGV handler on the
/// faulting thread; `pkru` is the interrupted PKRU.
pub unsafe fn fault_driven_entry(
    info: *const libc::siginfo_t,
    ctx: *mut c_void,
    pkru: u32,
) -> bool {
    if !ENABLED.load(Ordering::Relaxed) || pku::backend() != Backend::Hardware {
        return false;
    }
    let Some(rt) = runtime::get() else {
        return false;
    };
    let uc = ctx as *mut libc::ucontext_t;
    // SAFETY: the kernel's siginfo and ucontext.
    let (addr, rip) = unsafe {
        (
            (*info).si_addr() as usize,
            (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] as usize,
        )
    };
    let own = {
        let Ok(c) = rt.census.try_read() else {
            return false;
        };
        let Some((i, obj)) = c.object_at(rip) else {
            return false;
        };
        let Some(a) = c.compartment_of[i] else {
            return false;
        };
        if !is_app(obj) || !in_text(obj, rip) {
            return false;
        }
        if c.plan.lookup(addr).and_then(|e| e.compartment) != Some(a) {
            return false; // not its own data: a violation
        }
        a
    };
    let theirs = rt.pkru_for(own);
    if pkru == theirs {
        return false;
    }
    let Some((start, _)) = function_of(rip) else {
        return false;
    };
    let mut w = Walk {
        rip,
        found: false,
        cfa: 0,
        ret: 0,
    };
    // SAFETY: walking this thread's stack through the signal frame.
    unsafe { _Unwind_Backtrace(walk_frame, (&mut w as *mut Walk).cast()) };
    // SAFETY: CFA - 8 is on this thread's stack when the walk found it.
    if w.cfa == 0 || unsafe { core::ptr::read((w.cfa - 8) as *const usize) } != w.ret {
        return false;
    }
    // SAFETY: the kernel's ucontext.
    let Some(slot) = (unsafe { crate::sigframe::pkru_slot(uc) }) else {
        return false;
    };
    if stack_top() == 0 {
        match map_stack() {
            Some(base) => {
                set_stack_base(base);
                set_stack_top(base);
            }
            None => return false,
        }
    }
    let ret_slot = (w.cfa - 8) as *mut usize;
    let top = stack_top();
    if top + FRAME > stack_base() + STACK_BYTES {
        return false;
    }
    // SAFETY: the return-address slot of the interrupted frame (its CFA
    // minus 8, on this thread's stack), and a fresh frame on this thread's
    // gate-frame stack (the shim key once hardened: opened for the write).
    unsafe {
        let frame = top as *mut u8;
        let ret = core::ptr::read(ret_slot);
        pku::with_shim_writes(|| {
            core::ptr::write(frame as *mut usize, ret);
            core::ptr::write(frame.add(32) as *mut u32, pkru);
        });
        set_stack_top(top + FRAME);
        core::ptr::write(ret_slot, addr_of_fault_ret());
        // The instruction runs again with the function's own rights.
        crate::sigframe::set_frame_pkru(slot, theirs);
    }
    FAULT_GATED.fetch_add(1, Ordering::Relaxed);
    for p in &PENDING {
        if p.load(Ordering::Relaxed) == start {
            break;
        }
        if p.compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            break;
        }
    }
    IA2SHIM_FAULT_PENDING.store(true, Ordering::Release);
    true
}

fn addr_of_fault_ret() -> usize {
    ia2shim_fault_ret as *const () as usize
}

/// Install entry gates for the queued functions. Called by
/// `ia2shim_fault_ret` (normal context, the caller's PKRU).
extern "C" fn install_pending() {
    IA2SHIM_FAULT_PENDING.store(false, Ordering::Release);
    let Some(rt) = runtime::get() else { return };
    let census = match rt.census.read() {
        Ok(c) => c,
        Err(e) => e.into_inner(),
    };
    let mut st = state();
    let variant = Variant::current(rt.config.reports.gates);
    for p in &PENDING {
        let f = p.swap(0, Ordering::AcqRel);
        if f == 0 || st.entry_by_function.contains_key(&f) {
            continue;
        }
        let Some((i, obj)) = census.object_at(f) else {
            continue;
        };
        let Some((start, size)) = function_of(f) else {
            continue;
        };
        // Usually static: name it by its offset in the object.
        let name = format!("{}+{:#x}", obj.basename, start - obj.base);
        gate_functions(
            &mut st,
            rt,
            &census,
            i,
            vec![(start, size, name)],
            Found::FaultDriven,
            variant,
        );
    }
    // The pass's /proc/self/mem, if a write needed it.
    st.text_writer = None;
}

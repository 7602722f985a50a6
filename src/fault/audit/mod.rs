//! Audit mode (`IA2_ON_FAULT=audit`): log each distinct (page, key, RIP)
//! once, let the faulting instruction complete, and print at exit (or on a
//! fatal signal) the minimal set of carveout toggles and `IA2_SHARE`
//! entries that would have made the run clean.
//!
//! The mechanism is IA2's permissive mode. In the SIGSEGV handler the
//! interrupted PKRU sits in the signal frame's XSAVE area; the handler
//! writes a value that also allows the faulting key there (bit 9 of
//! XSTATE_BV makes the kernel restore it) and sets TF. The faulting
//! instruction completes, the CPU traps, and the SIGTRAP handler writes the
//! saved PKRU back and clears TF, so the next access faults again.
//!
//! Everything here runs in signal handlers or at exit and allocates
//! nothing: the site table and the step table are fixed arrays of atomics
//! in the shim's `.bss` (key 0), and output goes through stack buffers.
//!
//! - Per-thread state: the step table, keyed by the kernel thread id (not
//!   TLS: in strict mode the page holding the shim's TLS block may carry a
//!   compartment key, and the handlers run with key 0 only). A thread can
//!   have several pending steps when a signal handler that the program
//!   installed faults between our fault and our trap; the trap restores
//!   the newest one.
//! - A program that uses TF itself still gets its traps: a step that began
//!   with TF already set in the interrupted flags keeps TF and is passed on
//!   to the program's SIGTRAP handler, or to the default action. SIGTRAP
//!   dispositions are interposed in audit mode, as SIGSEGV dispositions
//!   always are. Limitation: a debugger that single-steps the thread with
//!   ptrace consumes the trap, so that step's PKRU is not put back until
//!   the thread's next audit trap.
//! - `rep movs`/`stos` single-step per iteration, so each iteration that
//!   touches a denied page faults and traps once: counted as hits of the
//!   same site.

use super::{interrupted_pkru, write_instruction, REPORT_FD, SI_PKEY_OFFSET};
use crate::config::{OnFault, ReportFormat};
use crate::objects::{page_down, Range, PAGE};
use crate::plan::Reason;
use crate::runtime::{self, Census, Runtime};
use crate::signals::Chained;
use crate::stackfmt::{pid, StackBuf};
use core::ffi::{c_int, c_void, CStr};
use core::fmt::{self, Write};
use core::sync::atomic::{
    AtomicBool, AtomicI32, AtomicIsize, AtomicU32, AtomicU64, AtomicUsize, Ordering::*,
};

mod classify;
mod output;
mod rseq;
mod sites;
mod steps;
mod summary;
#[cfg(test)]
mod tests;

pub(in crate::fault) use classify::*;
pub(in crate::fault) use output::*;
pub(in crate::fault) use rseq::*;
pub(in crate::fault) use sites::*;
pub(in crate::fault) use steps::*;
pub(in crate::fault) use summary::*;

/// `EFLAGS.TF`.
pub(in crate::fault) const TF: i64 = 0x100;
/// `si_code` of a single-step trap.
pub(in crate::fault) const TRAP_TRACE: i32 = 2;
/// Page-fault error code bit: the access was a write.
pub(in crate::fault) const PF_WRITE: i64 = 2;

// ---------------------------------------------------------------- the fault

/// Audit a `SEGV_PKUERR`: record it, log a new site, and arrange for the
/// faulting instruction to complete with the key allowed. Returns `false`
/// when it cannot (no usable XSAVE frame, a full step table, or the access
/// still faults with the key allowed): the caller then reports and dies.
///
/// # Safety
/// `info` and `uc` must be the kernel's arguments to a SIGSEGV handler.
pub(in crate::fault) unsafe fn on_pku_fault(
    info: *const libc::siginfo_t,
    uc: *mut libc::ucontext_t,
) -> bool {
    // SAFETY: valid siginfo from the kernel.
    let addr = unsafe { (*info).si_addr() } as usize;
    // SAFETY: si_pkey lies inside siginfo_t at a fixed offset.
    let pkey = unsafe { *((info as *const u8).add(SI_PKEY_OFFSET) as *const u32) };
    // SAFETY: valid ucontext from the kernel.
    let gregs = unsafe { &mut (*uc).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as usize;
    let write = gregs[libc::REG_ERR as usize] & PF_WRITE != 0;
    let eflags = gregs[libc::REG_EFL as usize];
    // SAFETY: a signal frame's ucontext.
    let (Some(slot), Some(pkru)) = (unsafe { pkru_slot(uc) }, unsafe { interrupted_pkru(uc) })
    else {
        return false;
    };
    if pkey >= 16 {
        return false;
    }
    let allow = pkru & !(3 << (2 * pkey));
    let page_key = page_down(addr) | pkey as usize;
    let tid = gettid();
    // The same instruction faulting again on another page (a string move
    // from one compartment into another) extends the pending step.
    let cont = newest_step(tid).filter(|s| {
        eflags & TF != 0 && s.rip.load(Relaxed) == rip && s.allow.load(Relaxed) == pkru
    });
    let looping = match cont {
        Some(s) => s.page_key.load(Relaxed) == page_key,
        None => false,
    };
    if looping || allow == pkru {
        return false; // allowed and still faulting: not a key problem we can step over
    }
    // Compartment-heap memory: the block's allocation site is learned
    // (its later allocations come from the shared heap, as the learned
    // IA2_HEAP_SHARED will make them).
    let heap = crate::alloc::heap_fault(addr).and_then(|h| Some((h.heap, h.block?)));
    if let Some((_, b)) = heap {
        crate::alloc::sites::learn_shared(b.site);
    }
    let hits = match record(page_key, rip, addr, pkru, write) {
        Some((n, true, _)) => {
            if let (Some((h, b)), Some(s)) = (heap, site_by_order(n)) {
                s.heap_site.store(b.site as u32 | (h as u32) << 16, Relaxed);
            }
            log_site(n, addr, pkey, pkru, rip, write);
            1
        }
        Some((_, false, hits)) => hits,
        None => 0,
    };
    // A page wholly inside the block goes on key 0 at once (until the block
    // is freed): a buffer handed across is read and written many times.
    if let Some((_, b)) = heap {
        if crate::alloc::heap::share_page_for_audit(&b, page_down(addr)) {
            return true;
        }
    }
    // Sample the page's total every 32nd fault (hot pages are sampled often).
    if hits > 0
        && FAULTS.fetch_add(1, Relaxed) % 32 == 0
        && page_hits(page_key) >= HOT_PAGE
        && promote(addr, page_key)
    {
        // The page is on key 0 now: the instruction runs again and succeeds.
        return true;
    }
    match cont {
        Some(s) => {
            s.allow.store(allow, Relaxed);
            s.page_key.store(page_key, Relaxed);
        }
        None => {
            let Some(s) = claim_step(tid) else {
                return false;
            };
            s.saved.store(pkru, Relaxed);
            s.allow.store(allow, Relaxed);
            s.rip.store(rip, Relaxed);
            s.page_key.store(page_key, Relaxed);
            s.program_tf.store(eflags & TF != 0, Relaxed);
        }
    }
    // SAFETY: `slot` points into this handler's frame.
    unsafe { set_frame_pkru(slot, allow) };
    gregs[libc::REG_EFL as usize] = eflags | TF;
    true
}

/// The SIGTRAP handler (installed in audit mode only).
pub(in crate::fault) extern "C" fn trap_handler(
    sig: c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut c_void,
) {
    // The kernel entered with key 0 only; what follows reads sealed state.
    crate::pku::open_shim_reads();
    let uc = ctx as *mut libc::ucontext_t;
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let code = unsafe { (*info).si_code };
    if code == TRAP_TRACE {
        if let Some(s) = newest_step(gettid()) {
            let saved = s.saved.load(Relaxed);
            let program_tf = s.program_tf.load(Relaxed);
            s.tid.store(0, Release);
            // SAFETY: a signal frame's ucontext.
            if let Some(slot) = unsafe { pkru_slot(uc) } {
                // SAFETY: `slot` points into this handler's frame.
                unsafe { set_frame_pkru(slot, saved) };
            }
            if !program_tf {
                // SAFETY: valid ucontext from the kernel.
                unsafe { (*uc).uc_mcontext.gregs[libc::REG_EFL as usize] &= !TF };
                return;
            }
            // The program was single-stepping: this trap is its own too.
        }
    }
    let (h, flags) = crate::signals::chained(Chained::Trap);
    // A trap the kernel raised kills even when ignored (force_sig); one
    // sent with kill(2) (si_code <= 0) honours SIG_IGN.
    if h == libc::SIG_IGN && code <= 0 {
        return;
    }
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        summary(Some(sig));
        resignal(sig);
        return;
    }
    super::call_program_handler(h, flags, sig, info, ctx);
}

/// Handlers for fatal signals whose disposition was the default: print the
/// summary, then die by the same signal.
pub(in crate::fault) extern "C" fn fatal_handler(
    sig: c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut c_void,
) {
    // The kernel entered with key 0 only; the summary reads sealed state.
    crate::pku::open_shim_reads();
    summary(Some(sig));
    resignal(sig);
}

/// Restore the default action and raise `sig` again; it is delivered when
/// the handler returns (synchronous faults also re-execute and fault).
pub(in crate::fault) fn resignal(sig: c_int) {
    // SAFETY: a zeroed sigaction with SIG_DFL is valid.
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = libc::SIG_DFL;
    // SAFETY: valid arguments; sigaction and raise are async-signal-safe.
    unsafe {
        crate::real::sigaction(sig, &sa, core::ptr::null_mut());
        libc::raise(sig);
    }
}

// The program's SIGTRAP disposition (recorded by the `sigaction` hook in
// audit mode) is in the signal table (`signals::chained`).
pub(in crate::fault) static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Is audit mode on (and SIGTRAP interposed)?
pub fn active() -> bool {
    ACTIVE.load(Relaxed)
}

/// Signals whose default action kills: with the default disposition they
/// get a handler that prints the summary first.
pub(in crate::fault) const FATAL: [c_int; 6] = [
    libc::SIGABRT,
    libc::SIGBUS,
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGTERM,
    libc::SIGINT,
];

extern "C" {
    pub(in crate::fault) fn __cxa_atexit(
        f: extern "C" fn(*mut c_void),
        arg: *mut c_void,
        dso: *mut c_void,
    ) -> c_int;
}

pub(in crate::fault) extern "C" fn at_exit(_: *mut c_void) {
    summary(None);
}

/// Install the SIGTRAP handler, the fatal-signal handlers and the exit
/// summary. Runs in the constructor, after the SIGSEGV handler.
/// Once the plan is applied: keep the rseq page shared (see `rseq`).
pub(in crate::fault) fn after_apply() {
    if ACTIVE.load(Relaxed) {
        share_rseq_page();
    }
}

pub(in crate::fault) fn install() {
    ACTIVE.store(true, Relaxed);
    let install_one = |sig: c_int, handler: usize| -> libc::sigaction {
        // SAFETY: zeroed sigaction structs are valid; we set what we use.
        let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
        sa.sa_sigaction = handler;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: as above.
        let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
        // SAFETY: valid sigaction structs.
        if unsafe { crate::real::sigaction(sig, &sa, &mut old) } != 0 {
            crate::lifecycle::fatal(format_args!("IA2_ON_FAULT=audit: sigaction({sig}) failed"));
        }
        old
    };
    let old = install_one(libc::SIGTRAP, trap_handler as *const () as usize);
    // A handler installed before us (by a library constructor) is the program's.
    if old.sa_sigaction != libc::SIG_DFL {
        crate::signals::set_chained(Chained::Trap, old.sa_sigaction, old.sa_flags);
    }
    for sig in FATAL {
        // SAFETY: querying only.
        let mut cur: libc::sigaction = unsafe { core::mem::zeroed() };
        // SAFETY: valid out pointer.
        unsafe { crate::real::sigaction(sig, core::ptr::null(), &mut cur) };
        if cur.sa_sigaction == libc::SIG_DFL {
            install_one(sig, fatal_handler as *const () as usize);
        }
    }
    // Registered before `__libc_start_main` registers `_dl_fini`, so it runs
    // after every destructor (exit handlers run in reverse order).
    // SAFETY: a plain function with no argument and no owning DSO.
    unsafe { __cxa_atexit(at_exit, core::ptr::null_mut(), core::ptr::null_mut()) };
}

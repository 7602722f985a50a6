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

use super::{interrupted_pkru, write_instruction, PKRU_XSAVE_OFFSET, REPORT_FD, SI_PKEY_OFFSET};
use crate::config::{OnFault, ReportFormat};
use crate::objects::{page_down, Range, PAGE};
use crate::plan::Reason;
use crate::runtime::{self, Census, Runtime};
use crate::stackfmt::{pid, StackBuf};
use core::ffi::{c_int, c_void, CStr};
use core::fmt::{self, Write};
use core::sync::atomic::{
    AtomicBool, AtomicI32, AtomicIsize, AtomicU32, AtomicU64, AtomicUsize, Ordering::*,
};

/// `EFLAGS.TF`.
const TF: i64 = 0x100;
/// `si_code` of a single-step trap.
const TRAP_TRACE: i32 = 2;
/// Page-fault error code bit: the access was a write.
const PF_WRITE: i64 = 2;
/// `FP_XSTATE_MAGIC1`: the frame's FP state is in XSAVE format.
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
/// XSAVE feature bit of PKRU.
const XFEATURE_PKRU: u64 = 1 << 9;

// ---------------------------------------------------------------- the site table

const SITE_CAP: usize = 4096;
const EMPTY: u32 = 0;
const CLAIMED: u32 = 1;
const READY: u32 = 2;

/// One distinct (page, key, RIP). Written once by the thread that claims
/// it; afterwards only `hits` changes, and the summary's scratch fields.
struct Site {
    state: AtomicU32,
    /// Page address | key.
    page_key: AtomicUsize,
    rip: AtomicUsize,
    /// The first faulting address.
    addr: AtomicUsize,
    /// The interrupted PKRU at the first fault.
    pkru: AtomicU32,
    write: AtomicBool,
    hits: AtomicU64,
    // Summary scratch: group key, the page range of this site's fix, and
    // whether it leads a group whose fix is emitted.
    gkey: [AtomicUsize; 3],
    fix: [AtomicUsize; 2],
    emitted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const NEW_SITE: Site = Site {
    state: AtomicU32::new(EMPTY),
    page_key: AtomicUsize::new(0),
    rip: AtomicUsize::new(0),
    addr: AtomicUsize::new(0),
    pkru: AtomicU32::new(0),
    write: AtomicBool::new(false),
    hits: AtomicU64::new(0),
    gkey: [
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ],
    fix: [AtomicUsize::new(0), AtomicUsize::new(0)],
    emitted: AtomicBool::new(false),
};

static SITES: [Site; SITE_CAP] = [NEW_SITE; SITE_CAP];
/// `ORDER[n]` = 1 + the slot of the n-th site seen (0: being written).
#[allow(clippy::declare_interior_mutable_const)]
const NO_ORDER: AtomicU32 = AtomicU32::new(0);
static ORDER: [AtomicU32; SITE_CAP] = [NO_ORDER; SITE_CAP];
static ORDER_LEN: AtomicUsize = AtomicUsize::new(0);
/// Faults not recorded because the table was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);
static SUMMARY_DONE: AtomicBool = AtomicBool::new(false);

fn hash(page_key: usize, rip: usize) -> usize {
    let h = (page_key ^ rip.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 40) & (SITE_CAP - 1)
}

/// Record a fault; returns the site's first-seen number (1-based; 0 for a
/// site seen before), whether it is new and its hits so far, or `None` when
/// the table is full.
fn record(
    page_key: usize,
    rip: usize,
    addr: usize,
    pkru: u32,
    write: bool,
) -> Option<(usize, bool, u64)> {
    let mut i = hash(page_key, rip);
    let mut probes = 0;
    let mut spins = 0u32;
    while probes < SITE_CAP {
        let s = &SITES[i];
        match s.state.load(Acquire) {
            EMPTY => {
                if s.state
                    .compare_exchange(EMPTY, CLAIMED, AcqRel, Acquire)
                    .is_ok()
                {
                    s.page_key.store(page_key, Relaxed);
                    s.rip.store(rip, Relaxed);
                    s.addr.store(addr, Relaxed);
                    s.pkru.store(pkru, Relaxed);
                    s.write.store(write, Relaxed);
                    s.hits.store(1, Relaxed);
                    let n = ORDER_LEN.fetch_add(1, AcqRel);
                    if let Some(o) = ORDER.get(n) {
                        o.store(i as u32 + 1, Release);
                    }
                    s.state.store(READY, Release);
                    return Some((n + 1, true, 1));
                }
                continue; // lost the race: look at this slot again
            }
            CLAIMED if spins < 100_000 => {
                // Another thread is filling it in (a few stores).
                spins += 1;
                core::hint::spin_loop();
                continue;
            }
            READY if s.page_key.load(Relaxed) == page_key && s.rip.load(Relaxed) == rip => {
                let hits = s.hits.fetch_add(1, Relaxed) + 1;
                return Some((0, false, hits));
            }
            _ => {}
        }
        spins = 0;
        probes += 1;
        i = (i + 1) & (SITE_CAP - 1);
    }
    DROPPED.fetch_add(1, Relaxed);
    None
}

/// The recorded sites in first-seen order.
fn sites() -> impl Iterator<Item = &'static Site> {
    let n = ORDER_LEN.load(Acquire).min(SITE_CAP);
    (0..n).filter_map(|k| {
        let slot = ORDER[k].load(Acquire);
        let s = SITES.get((slot as usize).checked_sub(1)?)?;
        (s.state.load(Acquire) == READY).then_some(s)
    })
}

// ---------------------------------------------------------------- hot pages

/// Faults on one page after which audit mode shares it (key 0) for the rest
/// of the run. Sharing is per page, so once a page has faulted the learned
/// policy shares it whatever else touches it: later faults could only add
/// counts and sites, at the price of two signals each (a hot loop in the
/// emulated guest would otherwise run for hours).
pub const HOT_PAGE: u64 = 1000;
const PROMOTED_CAP: usize = 256;
#[allow(clippy::declare_interior_mutable_const)]
const NO_PAGE: AtomicUsize = AtomicUsize::new(0);
/// Page | key of each page shared early.
static PROMOTED: [AtomicUsize; PROMOTED_CAP] = [NO_PAGE; PROMOTED_CAP];
static PROMOTED_LEN: AtomicUsize = AtomicUsize::new(0);

/// Faults seen (sampling clock for `page_hits`).
static FAULTS: AtomicU64 = AtomicU64::new(0);

fn page_hits(page_key: usize) -> u64 {
    sites()
        .filter(|s| s.page_key.load(Relaxed) == page_key)
        .map(|s| s.hits.load(Relaxed))
        .sum()
}

fn promoted(page_key: usize) -> bool {
    let n = PROMOTED_LEN.load(Acquire).min(PROMOTED_CAP);
    PROMOTED[..n].iter().any(|p| p.load(Relaxed) == page_key)
}

/// Share a hot page: put it on key 0 with the protection the plan recorded.
fn promote(addr: usize, page_key: usize) -> bool {
    if promoted(page_key) {
        return true; // another thread did it; this fault raced with it
    }
    let Some(rt) = runtime::get() else {
        return false;
    };
    let Ok(c) = rt.census.try_read() else {
        return false;
    };
    let Some(e) = c.plan.lookup(addr) else {
        return false;
    };
    let n = PROMOTED_LEN.fetch_add(1, AcqRel);
    if n >= PROMOTED_CAP || crate::pku::protect(page_down(addr), PAGE, e.prot, 0).is_err() {
        return false;
    }
    PROMOTED[n].store(page_key, Release);
    true
}

// ---------------------------------------------------------------- the step table

const STEP_CAP: usize = 512;

/// A pending single step: claimed by one thread (by tid) between its fault
/// and its trap. Only the owning thread writes the fields.
struct Step {
    tid: AtomicI32,
    seq: AtomicU64,
    saved: AtomicU32,
    allow: AtomicU32,
    rip: AtomicUsize,
    page_key: AtomicUsize,
    /// TF was set before we set it: the program (or a debugger) is
    /// single-stepping, so the trap is theirs too.
    program_tf: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const NEW_STEP: Step = Step {
    tid: AtomicI32::new(0),
    seq: AtomicU64::new(0),
    saved: AtomicU32::new(0),
    allow: AtomicU32::new(0),
    rip: AtomicUsize::new(0),
    page_key: AtomicUsize::new(0),
    program_tf: AtomicBool::new(false),
};

static STEPS: [Step; STEP_CAP] = [NEW_STEP; STEP_CAP];
static STEP_SEQ: AtomicU64 = AtomicU64::new(1);

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// The calling thread's newest pending step.
fn newest_step(tid: i32) -> Option<&'static Step> {
    STEPS
        .iter()
        .filter(|s| s.tid.load(Acquire) == tid)
        .max_by_key(|s| s.seq.load(Relaxed))
}

fn claim_step(tid: i32) -> Option<&'static Step> {
    let s = STEPS.iter().find(|s| {
        s.tid.load(Relaxed) == 0 && s.tid.compare_exchange(0, tid, AcqRel, Relaxed).is_ok()
    })?;
    s.seq.store(STEP_SEQ.fetch_add(1, Relaxed), Relaxed);
    Some(s)
}

// ---------------------------------------------------------------- XSAVE access

/// The PKRU slot in the signal frame's XSAVE area, if the frame has one
/// that the kernel will restore on `sigreturn`.
///
/// # Safety
/// `uc` must be the ucontext passed to a signal handler.
unsafe fn pkru_slot(uc: *mut libc::ucontext_t) -> Option<(*mut u32, *mut u64)> {
    let off = PKRU_XSAVE_OFFSET.load(Relaxed);
    // SAFETY: the kernel passes a valid ucontext.
    let fp = unsafe { (*uc).uc_mcontext.fpregs } as *mut u8;
    if off == 0 || fp.is_null() {
        return None;
    }
    // SAFETY: the legacy FXSAVE area is 512 bytes; its software-reserved
    // bytes 464.. hold `struct _fpx_sw_bytes` (magic1, extended_size,
    // xfeatures, xstate_size).
    let (magic, xfeatures, size) = unsafe {
        (
            core::ptr::read_unaligned(fp.add(464) as *const u32),
            core::ptr::read_unaligned(fp.add(472) as *const u64),
            core::ptr::read_unaligned(fp.add(480) as *const u32) as usize,
        )
    };
    if magic != FP_XSTATE_MAGIC1 || xfeatures & XFEATURE_PKRU == 0 || size < off + 4 {
        return None;
    }
    // SAFETY: the XSAVE header follows the legacy area, and the PKRU
    // component lies inside the frame's xstate_size (checked above).
    Some(unsafe { (fp.add(off) as *mut u32, fp.add(512) as *mut u64) })
}

/// # Safety
/// `slot` must come from [`pkru_slot`] for a live signal frame.
unsafe fn set_frame_pkru(slot: (*mut u32, *mut u64), pkru: u32) {
    // SAFETY: both pointers lie in the frame (see `pkru_slot`).
    unsafe {
        core::ptr::write_unaligned(slot.0, pkru);
        let bv = core::ptr::read_unaligned(slot.1);
        core::ptr::write_unaligned(slot.1, bv | XFEATURE_PKRU);
    }
}

// ---------------------------------------------------------------- the fault

/// Audit a `SEGV_PKUERR`: record it, log a new site, and arrange for the
/// faulting instruction to complete with the key allowed. Returns `false`
/// when it cannot (no usable XSAVE frame, a full step table, or the access
/// still faults with the key allowed): the caller then reports and dies.
///
/// # Safety
/// `info` and `uc` must be the kernel's arguments to a SIGSEGV handler.
pub(super) unsafe fn on_pku_fault(info: *const libc::siginfo_t, uc: *mut libc::ucontext_t) -> bool {
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
    let hits = match record(page_key, rip, addr, pkru, write) {
        Some((n, true, _)) => {
            log_site(n, addr, pkey, pkru, rip, write);
            1
        }
        Some((_, false, hits)) => hits,
        None => 0,
    };
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
extern "C" fn trap_handler(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
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
    let h = TRAP_HANDLER.load(Relaxed);
    let flags = TRAP_FLAGS.load(Relaxed);
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
extern "C" fn fatal_handler(sig: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    summary(Some(sig));
    resignal(sig);
}

/// Restore the default action and raise `sig` again; it is delivered when
/// the handler returns (synchronous faults also re-execute and fault).
fn resignal(sig: c_int) {
    // SAFETY: a zeroed sigaction with SIG_DFL is valid.
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = libc::SIG_DFL;
    // SAFETY: valid arguments; sigaction and raise are async-signal-safe.
    unsafe {
        crate::hooks::real_sigaction(sig, &sa, core::ptr::null_mut());
        libc::raise(sig);
    }
}

/// The program's SIGTRAP disposition (recorded by the `sigaction` hook in
/// audit mode).
pub(super) static TRAP_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
pub(super) static TRAP_FLAGS: AtomicI32 = AtomicI32::new(0);
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Is audit mode on (and SIGTRAP interposed)?
pub fn active() -> bool {
    ACTIVE.load(Relaxed)
}

/// Signals whose default action kills: with the default disposition they
/// get a handler that prints the summary first.
const FATAL: [c_int; 6] = [
    libc::SIGABRT,
    libc::SIGBUS,
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGTERM,
    libc::SIGINT,
];

extern "C" {
    fn __cxa_atexit(f: extern "C" fn(*mut c_void), arg: *mut c_void, dso: *mut c_void) -> c_int;
}

extern "C" fn at_exit(_: *mut c_void) {
    summary(None);
}

/// Install the SIGTRAP handler, the fatal-signal handlers and the exit
/// summary. Runs in the constructor, after the SIGSEGV handler.
pub(super) fn install() {
    ACTIVE.store(true, Relaxed);
    share_rseq_page();
    let install_one = |sig: c_int, handler: usize| -> libc::sigaction {
        // SAFETY: zeroed sigaction structs are valid; we set what we use.
        let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
        sa.sa_sigaction = handler;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: as above.
        let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
        // SAFETY: valid sigaction structs.
        if unsafe { crate::hooks::real_sigaction(sig, &sa, &mut old) } != 0 {
            runtime::fatal(format_args!("IA2_ON_FAULT=audit: sigaction({sig}) failed"));
        }
        old
    };
    let old = install_one(libc::SIGTRAP, trap_handler as *const () as usize);
    // A handler installed before us (by a library constructor) is the program's.
    if old.sa_sigaction != libc::SIG_DFL {
        TRAP_HANDLER.store(old.sa_sigaction, Relaxed);
        TRAP_FLAGS.store(old.sa_flags, Relaxed);
    }
    for sig in FATAL {
        // SAFETY: querying only.
        let mut cur: libc::sigaction = unsafe { core::mem::zeroed() };
        // SAFETY: valid out pointer.
        unsafe { crate::hooks::real_sigaction(sig, core::ptr::null(), &mut cur) };
        if cur.sa_sigaction == libc::SIG_DFL {
            install_one(sig, fatal_handler as *const () as usize);
        }
    }
    // Registered before `__libc_start_main` registers `_dl_fini`, so it runs
    // after every destructor (exit handlers run in reverse order).
    // SAFETY: a plain function with no argument and no owning DSO.
    unsafe { __cxa_atexit(at_exit, core::ptr::null_mut(), core::ptr::null_mut()) };
}

// ---------------------------------------------------------------- kernel SIGSEGVs

/// glibc's `__rseq_offset` (from the thread pointer) and `__rseq_size` (0:
/// rseq not registered, e.g. `GLIBC_TUNABLES=glibc.pthread.rseq=0`).
static RSEQ_OFFSET: AtomicIsize = AtomicIsize::new(0);
static RSEQ_SIZE: AtomicUsize = AtomicUsize::new(0);

/// Read glibc's rseq ABI variables (constructor time).
pub(super) fn read_rseq_abi() {
    let get = |name: &CStr| -> Option<usize> {
        // SAFETY: dlsym with a NUL-terminated name.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as *const usize;
        // SAFETY: a non-null result points at the variable, plain data in
        // libc (an `unsigned int` size, a `ptrdiff_t` offset: 8 bytes are
        // readable either way, and the caller masks the size).
        (!p.is_null()).then(|| unsafe { core::ptr::read_unaligned(p) })
    };
    let size = get(c"__rseq_size").map_or(0, |v| v & 0xffff_ffff);
    if let Some(off) = get(c"__rseq_offset") {
        RSEQ_OFFSET.store(off as isize, Relaxed);
        RSEQ_SIZE.store(size, Relaxed);
    }
}

/// The page of the main thread's rseq area, if the plan gave it a key:
/// `(area, page entry's compartment, its key, its protection)`.
fn tagged_rseq_page(rt: &Runtime, c: &Census) -> Option<(usize, u8, u32, i32)> {
    if RSEQ_SIZE.load(Relaxed) == 0 {
        return None;
    }
    let area = crate::tls::thread_pointer().wrapping_add_signed(RSEQ_OFFSET.load(Relaxed));
    let e = c.plan.lookup(area)?;
    let comp = e.compartment?;
    Some((area, comp, rt.key_of(comp), e.prot))
}

/// Audit mode cannot let the kernel's own writes through: when the kernel
/// fails to update a thread's rseq area on preemption or signal delivery,
/// no fault reaches the shim, the kernel kills the process (when the write
/// was for delivering a SIGSEGV, without running any handler). So when the
/// plan tagged the page of the main thread's rseq area, audit mode keeps it
/// on key 0 and records it as a site (RIP 0: the kernel), so that the
/// summary's policy shares it.
fn share_rseq_page() {
    let Some(rt) = runtime::get() else { return };
    let Ok(c) = rt.census.read() else { return };
    let Some((area, _, key, prot)) = tagged_rseq_page(rt, &c) else {
        return;
    };
    if crate::pku::protect(page_down(area), PAGE, prot, 0).is_ok() {
        record(
            page_down(area) | key as usize,
            0,
            area,
            crate::pku::pkru_allowing(0),
            true,
        );
    }
}

/// A SIGSEGV that the kernel raised itself (`SI_KERNEL`). The likeliest
/// cause under the shim: on preemption and signal delivery the kernel
/// writes the thread's rseq area (in glibc's `struct pthread`, next to the
/// TCB) with the thread's PKRU, and fails when that page carries a key the
/// running compartment lacks. Say so, with the fix, and in audit mode add
/// it to the summary's policy. Call with every key allowed.
///
/// # Safety
/// `uc` must be the ucontext passed to a SIGSEGV handler.
pub(super) unsafe fn kernel_segv(uc: *const libc::ucontext_t) {
    let rt = runtime::get();
    let census = rt.and_then(|r| r.census.try_read().ok());
    let Some((rt, c)) = rt.zip(census.as_deref()) else {
        return;
    };
    let Some((area, comp, key, _)) = tagged_rseq_page(rt, c) else {
        return;
    };
    // SAFETY: the caller's signal frame.
    let pkru = unsafe { interrupted_pkru(uc) }.unwrap_or(0);
    if crate::pku::pkru_allows(pkru, key, true) {
        return;
    }
    // SAFETY: valid ucontext from the kernel.
    let rip = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] } as usize;
    let class = classify(Some(c), area);
    let fix = Fix::for_site(Some(c), class, area);
    let n = if configured() {
        record(page_down(area) | key as usize, rip, area, pkru, true).map(|(n, _, _)| n)
    } else {
        None
    };
    let p = pid();
    let mut b = StackBuf::<1024>::new();
    if json() {
        let _ = writeln!(
            b,
            "{{\"type\":\"kernel_fault\",\"pid\":{p},\"site\":{},\"cause\":\"rseq\",\"addr\":\"{area:#x}\",\"page\":\"{:#x}\",\"pkey\":{key},\"page_compartment\":{comp},\"running_compartment\":{},\"pkru\":\"{pkru:#010x}\",\"rip\":\"{rip:#x}\",\"class\":\"{}\",\"fix\":\"{}\"}}",
            N(n),
            page_down(area),
            N(running_compartment(Some(rt), pkru)),
            class.kind(),
            share_assignment(&fix).as_str(),
        );
    } else {
        let _ = writeln!(
            b,
            "ia2shim[{p}]: SIGSEGV from the kernel (SI_KERNEL): the thread's rseq area at {area:#x} \
             (in glibc's struct pthread) lies on a page with key {key} = compartment {comp}, which \
             the running code (PKRU {pkru:#010x}) may not write, so the kernel cannot update it; \
             fix {} (or GLIBC_TUNABLES=glibc.pthread.rseq=0)",
            share_assignment(&fix).as_str()
        );
    }
    emit(&b);
}

// ---------------------------------------------------------------- classification

/// Where a faulting address lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// A page of a disabled carveout (index into `Census::carveouts`).
    Carveout(usize),
    /// Writable data of an object.
    Data(usize),
    Tls {
        object: usize,
        thread: usize,
    },
    /// Inside an object, but not tagged by the plan.
    Object(usize),
    /// No object: heap, `mmap`, a stack, the loader heap.
    Anonymous,
    /// The shim's state was busy.
    Unknown,
}

fn classify(c: Option<&Census>, addr: usize) -> Class {
    let Some(c) = c else { return Class::Unknown };
    let covers = |l: &crate::carveouts::Located| {
        l.carveout
            .ranges
            .iter()
            .any(|r: &Range| r.pages_out().contains(addr))
    };
    if let Some(i) = c.carveouts.iter().position(|l| !l.enabled && covers(l)) {
        return Class::Carveout(i);
    }
    match c.plan.lookup(addr).map(|e| &e.reason) {
        Some(Reason::Data { object }) => Class::Data(*object),
        Some(Reason::Tls { object, thread }) => Class::Tls {
            object: *object,
            thread: *thread,
        },
        _ => match c.object_at(addr) {
            Some((i, _)) => Class::Object(i),
            None => Class::Anonymous,
        },
    }
}

impl Class {
    fn kind(self) -> &'static str {
        match self {
            Class::Carveout(_) => "carveout",
            Class::Data(_) => "data",
            Class::Tls { .. } => "tls",
            Class::Object(_) => "object",
            Class::Anonymous => "anonymous",
            Class::Unknown => "unknown",
        }
    }

    fn code(self) -> usize {
        match self {
            Class::Carveout(_) => 1,
            Class::Data(_) => 2,
            Class::Tls { .. } => 3,
            Class::Object(_) => 4,
            Class::Anonymous => 5,
            Class::Unknown => 6,
        }
    }

    fn object(self) -> Option<usize> {
        match self {
            Class::Data(o) | Class::Object(o) | Class::Tls { object: o, .. } => Some(o),
            _ => None,
        }
    }

    /// The owning object's name, and what part of it (or of memory) this is.
    fn describe(self, c: Option<&Census>) -> (&str, Section) {
        let name = |o: usize| {
            c.and_then(|c| c.objects.get(o))
                .map_or("?", |o| o.display_name())
        };
        match self {
            Class::Carveout(i) => (
                "",
                Section::Carveout(
                    c.and_then(|c| c.carveouts.get(i))
                        .map_or("?", |l| l.carveout.name),
                ),
            ),
            Class::Data(o) => (name(o), Section::Data),
            Class::Tls { object, thread } => {
                let modid = c
                    .and_then(|c| c.objects.get(object))
                    .and_then(|o| o.tls)
                    .map_or(0, |t| t.modid);
                (name(object), Section::Tls { modid, thread })
            }
            Class::Object(o) => (name(o), Section::Untagged),
            Class::Anonymous => ("", Section::Anonymous),
            Class::Unknown => ("", Section::Unknown),
        }
    }
}

#[derive(Clone, Copy)]
enum Section {
    Carveout(&'static str),
    Data,
    Tls { modid: usize, thread: usize },
    Untagged,
    Anonymous,
    Unknown,
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Section::Carveout(n) => write!(f, "carveout {n}"),
            Section::Data => f.write_str(".data/.bss"),
            Section::Tls { modid, thread } => write!(f, "TLS of module {modid} in thread {thread}"),
            Section::Untagged => f.write_str("not tagged by the plan"),
            Section::Anonymous => {
                f.write_str("anonymous memory (heap, mmap, stack or loader heap)")
            }
            Section::Unknown => f.write_str("unknown (shim state busy)"),
        }
    }
}

/// A symbol from `dladdr1`: only when `addr` lies inside it.
struct SymInfo {
    name: &'static str,
    addr: usize,
    size: usize,
    /// The defining object's path.
    object: &'static str,
}

impl SymInfo {
    fn object_base(&self) -> &'static str {
        self.object.rsplit('/').next().unwrap_or(self.object)
    }
}

const RTLD_DL_SYMENT: c_int = 1;

fn sym_info(addr: usize) -> Option<SymInfo> {
    // SAFETY: zeroed Dl_info is valid for dladdr1 to fill.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    let mut sym: *mut c_void = core::ptr::null_mut();
    // SAFETY: dladdr1 only reads loader data and fills the out pointers.
    if unsafe { libc::dladdr1(addr as *const c_void, &mut info, &mut sym, RTLD_DL_SYMENT) } == 0
        || info.dli_sname.is_null()
    {
        return None;
    }
    let cstr = |p: *const libc::c_char| {
        if p.is_null() {
            ""
        } else {
            // SAFETY: NUL-terminated strings owned by the loader.
            unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("?")
        }
    };
    let size = if sym.is_null() {
        0
    } else {
        // SAFETY: RTLD_DL_SYMENT yields the ElfW(Sym); st_size is at offset 16.
        unsafe { core::ptr::read_unaligned((sym as *const u8).add(16) as *const u64) as usize }
    };
    let name = cstr(info.dli_sname);
    (!name.is_empty()).then(|| SymInfo {
        name,
        addr: info.dli_saddr as usize,
        size,
        object: cstr(info.dli_fname),
    })
}

/// The pages an `obj:symbol` entry shares.
fn symbol_pages(s: &SymInfo) -> Range {
    Range::new(s.addr, s.addr + s.size.max(1)).pages_out()
}

/// The fix for one site: a toggle, or an `IA2_SHARE` entry.
enum Fix {
    Toggle(&'static str),
    Symbol(SymInfo),
    Page(usize),
}

impl Fix {
    fn for_site(c: Option<&Census>, class: Class, addr: usize) -> Fix {
        if let Class::Carveout(i) = class {
            if let Some(l) = c.and_then(|c| c.carveouts.get(i)) {
                return Fix::Toggle(l.carveout.toggle);
            }
        }
        match sym_info(addr) {
            Some(s) => Fix::Symbol(s),
            None => Fix::Page(page_down(addr)),
        }
    }

    /// The group key part that this fix contributes: (kind, id).
    fn id(&self) -> (usize, usize) {
        match self {
            Fix::Toggle(_) => (0, 0),
            Fix::Symbol(s) => (1, s.addr),
            Fix::Page(p) => (2, *p),
        }
    }

    /// The pages it shares (carveouts: empty; see `covers`).
    fn pages(&self) -> Range {
        match self {
            Fix::Toggle(_) => Range::new(0, 0),
            Fix::Symbol(s) => symbol_pages(s),
            Fix::Page(p) => Range::new(*p, *p + PAGE),
        }
    }

    /// As an environment assignment or an `IA2_SHARE` entry.
    fn entry(&self) -> Entry<'_> {
        Entry(self)
    }
}

struct Entry<'a>(&'a Fix);

impl fmt::Display for Entry<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Fix::Toggle(t) => write!(f, "{t}=1"),
            Fix::Symbol(s) => write!(f, "{}:{}", s.object_base(), s.name),
            Fix::Page(p) => write!(f, "{p:#x}+{PAGE}"),
        }
    }
}

// ---------------------------------------------------------------- output

/// A JSON string literal, escaped while formatting.
struct J<'a>(&'a str);

impl fmt::Display for J<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for ch in self.0.chars() {
            match ch {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')
    }
}

/// A JSON number or `null`.
struct N<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for N<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("null"),
        }
    }
}

fn json() -> bool {
    runtime::get().is_some_and(|r| r.config.report_format == ReportFormat::Json)
}

fn emit<const L: usize>(b: &StackBuf<L>) {
    b.write_to_fd(REPORT_FD.load(Relaxed));
}

/// `name+0xoff (object)` of a code address, into a small buffer.
fn sym_text(addr: usize) -> StackBuf<512> {
    let mut b = StackBuf::new();
    if addr == 0 {
        let _ = write!(b, "the kernel (rseq area update)");
    } else {
        super::write_sym(&mut b, addr);
    }
    b
}

fn insn_text(rip: usize) -> StackBuf<256> {
    let mut b = StackBuf::<256>::new();
    write_instruction(&mut b, rip);
    b
}

/// The compartment whose key a PKRU value allows (the running one).
fn running_compartment(rt: Option<&Runtime>, pkru: u32) -> Option<u8> {
    rt?.running_compartment(pkru)
}

/// One line for a new site, as it happens.
fn log_site(n: usize, addr: usize, pkey: u32, pkru: u32, rip: usize, write: bool) {
    let rt = runtime::get();
    let census = rt.and_then(|r| r.census.try_read().ok());
    let c = census.as_deref();
    let class = classify(c, addr);
    let (object, section) = class.describe(c);
    let sym = sym_info(addr);
    let fix = Fix::for_site(c, class, addr);
    let page_c = rt.and_then(|r| r.compartment_of_key(pkey));
    let run_c = running_compartment(rt, pkru);
    let access = if write { "write" } else { "read" };
    let (rip_sym, insn) = (sym_text(rip), insn_text(rip));
    let mut b = StackBuf::<2048>::new();
    let p = pid();
    if json() {
        let _ = writeln!(
            b,
            "{{\"type\":\"audit_fault\",\"pid\":{p},\"site\":{n},\"access\":\"{access}\",\"addr\":\"{addr:#x}\",\"page\":\"{:#x}\",\"pkey\":{pkey},\"page_compartment\":{},\"running_compartment\":{},\"pkru\":\"{pkru:#010x}\",\"rip\":\"{rip:#x}\",\"rip_symbol\":{},\"insn\":{},\"class\":\"{}\",\"object\":{},\"section\":{},\"symbol\":{},\"symbol_offset\":{},\"fix\":\"{}\"}}",
            page_down(addr),
            N(page_c),
            N(run_c),
            J(rip_sym.as_str()),
            J(insn.as_str()),
            class.kind(),
            J(object),
            J(section_text(section).as_str()),
            sym.as_ref().map_or(J(""), |s| J(s.name)),
            N(sym.as_ref().map(|s| addr - s.addr)),
            share_assignment(&fix).as_str(),
        );
    } else {
        let _ = write!(
            b,
            "ia2shim[{p}]: audit: site {n}: {access} {addr:#x} (page {:#x}) key {pkey}",
            page_down(addr)
        );
        if let Some(c) = page_c {
            let _ = write!(b, " = compartment {c}");
        }
        match run_c {
            Some(c) => {
                let _ = write!(b, " by compartment {c}");
            }
            None => {
                let _ = write!(b, " by no compartment");
            }
        }
        let _ = write!(
            b,
            " (PKRU {pkru:#010x}) at {}: {}; ",
            rip_sym.as_str(),
            insn.as_str()
        );
        if !object.is_empty() {
            let _ = write!(b, "{object} ");
        }
        let _ = write!(b, "{section}");
        if let Some(s) = &sym {
            let _ = write!(b, ", symbol {}+{:#x}", s.name, addr - s.addr);
        }
        let _ = writeln!(b, "; fix {}", share_assignment(&fix).as_str());
    }
    emit(&b);
}

fn section_text(s: Section) -> StackBuf<128> {
    let mut b = StackBuf::new();
    let _ = write!(b, "{s}");
    b
}

/// `IA2_SHARE_X=1` or `IA2_SHARE=entry`.
fn share_assignment(fix: &Fix) -> StackBuf<512> {
    let mut b = StackBuf::new();
    match fix {
        Fix::Toggle(_) => {
            let _ = write!(b, "{}", fix.entry());
        }
        _ => {
            let _ = write!(b, "IA2_SHARE={}", fix.entry());
        }
    }
    b
}

// ---------------------------------------------------------------- the summary

fn gkey(s: &Site) -> [usize; 3] {
    [
        s.gkey[0].load(Relaxed),
        s.gkey[1].load(Relaxed),
        s.gkey[2].load(Relaxed),
    ]
}

fn page_of(s: &Site) -> usize {
    page_down(s.page_key.load(Relaxed))
}

/// Is `page` shared by the fix of an emitted group before `leader`?
fn covered_before(c: Option<&Census>, leader: *const Site, page: usize) -> bool {
    for s in sites() {
        if core::ptr::eq(s, leader) {
            return false;
        }
        if !s.emitted.load(Relaxed) {
            continue;
        }
        let [code, arg, _] = gkey(s);
        if code == Class::Carveout(0).code() && s.fix[1].load(Relaxed) == 0 {
            // A toggle: its carveout's ranges.
            if let Some(l) = c.and_then(|c| c.carveouts.get(arg)) {
                if l.carveout
                    .ranges
                    .iter()
                    .any(|r: &Range| r.pages_out().contains(page))
                {
                    return true;
                }
            }
        } else if Range::new(s.fix[0].load(Relaxed), s.fix[1].load(Relaxed)).contains(page) {
            return true;
        }
    }
    false
}

/// Print the summary once: at exit, or on a fatal signal (`sig`).
pub fn summary(sig: Option<c_int>) {
    if !active() || SUMMARY_DONE.swap(true, AcqRel) {
        return;
    }
    // In strict mode libc's and ld.so's state (dladdr's) carries the libc
    // compartment's key: the shim is trusted, so allow every key meanwhile.
    let hw = crate::pku::backend() == crate::pku::Backend::Hardware;
    let before = crate::pku::read_pkru();
    if hw {
        crate::pku::write_pkru(0);
    }
    print_summary(sig);
    if hw {
        crate::pku::write_pkru(before);
    }
}

fn print_summary(sig: Option<c_int>) {
    let rt = runtime::get();
    // At exit nothing else holds the lock for long; in a signal handler
    // only try.
    let census = rt.and_then(|r| {
        if sig.is_none() {
            r.census.read().ok()
        } else {
            r.census.try_read().ok()
        }
    });
    let c = census.as_deref();
    let json = json();
    let p = pid();

    // Pass 1: classify each site and compute its group key and fix pages.
    for s in sites() {
        let addr = s.addr.load(Relaxed);
        let class = classify(c, addr);
        let fix = Fix::for_site(c, class, addr);
        let (fk, fid) = fix.id();
        let arg = match class {
            Class::Carveout(i) => i,
            other => other.object().unwrap_or(0),
        };
        s.gkey[0].store(class.code(), Relaxed);
        s.gkey[1].store(arg, Relaxed);
        s.gkey[2].store(fk << 62 | fid, Relaxed);
        let pages = fix.pages();
        s.fix[0].store(pages.start, Relaxed);
        s.fix[1].store(pages.end, Relaxed);
        s.emitted.store(false, Relaxed);
    }

    // Pass 2: one line per group, in first-seen order.
    let (mut faults, mut nsites, mut groups) = (0u64, 0usize, 0usize);
    for s in sites() {
        faults += s.hits.load(Relaxed);
        nsites += 1;
    }
    let when = When(sig);
    if !json {
        let mut b = StackBuf::<512>::new();
        let _ = writeln!(
            b,
            "ia2shim[{p}]: ==== audit summary ({when}): {faults} protection-key fault{} at {nsites} distinct (page, key, RIP) site{} ====",
            plural(faults as usize),
            plural(nsites)
        );
        emit(&b);
    }
    for (k, lead) in sites().enumerate() {
        let key = gkey(lead);
        if sites().take(k).any(|e| gkey(e) == key) {
            continue;
        }
        groups += 1;
        let (mut g_faults, mut g_sites, mut g_pages) = (0u64, 0usize, 0usize);
        let mut covered = true;
        let mut hot = false;
        let members = || sites().skip(k).filter(move |e| gkey(e) == key);
        for (j, e) in members().enumerate() {
            g_faults += e.hits.load(Relaxed);
            g_sites += 1;
            hot |= promoted(e.page_key.load(Relaxed));
            if !members().take(j).any(|x| page_of(x) == page_of(e)) {
                g_pages += 1;
                covered &= covered_before(c, lead, page_of(e));
            }
        }
        lead.emitted.store(!covered, Relaxed);
        let addr = lead.addr.load(Relaxed);
        let pkey = (lead.page_key.load(Relaxed) & (PAGE - 1)) as u32;
        let class = classify(c, addr);
        let (object, section) = class.describe(c);
        let sym = sym_info(addr);
        let fix = Fix::for_site(c, class, addr);
        let rip = lead.rip.load(Relaxed);
        let rip_sym = sym_text(rip);
        let page_c = rt.and_then(|r| r.compartment_of_key(pkey));
        let run_c = running_compartment(rt, lead.pkru.load(Relaxed));
        let mut b = StackBuf::<2048>::new();
        if json {
            let _ = writeln!(
                b,
                "{{\"type\":\"audit_group\",\"pid\":{p},\"group\":{groups},\"class\":\"{}\",\"object\":{},\"section\":{},\"symbol\":{},\"pkey\":{pkey},\"page_compartment\":{},\"running_compartment\":{},\"faults\":{g_faults},\"sites\":{g_sites},\"pages\":{g_pages},\"first_rip\":\"{rip:#x}\",\"first_rip_symbol\":{},\"fix\":\"{}\",\"covered\":{covered},\"shared_early\":{hot}}}",
                class.kind(),
                J(object),
                J(section_text(section).as_str()),
                sym.as_ref().map_or(J(""), |s| J(s.name)),
                N(page_c),
                N(run_c),
                J(rip_sym.as_str()),
                share_assignment(&fix).as_str(),
            );
        } else {
            let _ = write!(b, "ia2shim[{p}]:   [{groups}] ");
            if !object.is_empty() {
                let _ = write!(b, "{object} ");
            }
            let _ = write!(b, "{section}");
            if let Some(s) = &sym {
                let _ = write!(b, ", symbol {}", s.name);
            } else if !matches!(class, Class::Carveout(_)) {
                let _ = write!(b, ", page {:#x}", page_down(addr));
            }
            let _ = write!(
                b,
                ": {g_faults} fault{}, {g_sites} site{}, {g_pages} page{}, key {pkey}",
                plural(g_faults as usize),
                plural(g_sites),
                plural(g_pages)
            );
            if let Some(c) = page_c {
                let _ = write!(b, " = compartment {c}");
            }
            if let Some(c) = run_c {
                let _ = write!(b, ", by compartment {c}");
            }
            let _ = write!(b, "; first at {}", rip_sym.as_str());
            if hot {
                let _ = write!(
                    b,
                    "; shared after {HOT_PAGE} faults on a page (later accesses not counted)"
                );
            }
            if covered {
                let _ = writeln!(b, "; already shared by an entry above");
            } else {
                let _ = writeln!(b, "; fix {}", share_assignment(&fix).as_str());
            }
        }
        emit(&b);
    }

    // The policy: toggles (space-separated), then the IA2_SHARE entries
    // (comma-separated). Kept small: this may run on a signal stack.
    let dropped = DROPPED.load(Relaxed);
    let mut toggles = StackBuf::<512>::new();
    let mut list = StackBuf::<4096>::new();
    for s in sites().filter(|s| s.emitted.load(Relaxed)) {
        let addr = s.addr.load(Relaxed);
        let fix = Fix::for_site(c, classify(c, addr), addr);
        let (buf, sep): (&mut dyn Write, &str) = match fix {
            Fix::Toggle(_) if toggles.as_bytes().is_empty() => (&mut toggles, ""),
            Fix::Toggle(_) => (&mut toggles, " "),
            _ if list.as_bytes().is_empty() => (&mut list, ""),
            _ => (&mut list, ","),
        };
        let _ = write!(buf, "{sep}{}", fix.entry());
    }
    let (toggles, list) = (toggles.as_str(), list.as_str());
    let mut env = StackBuf::<4608>::new();
    let _ = write!(env, "{toggles}");
    if !list.is_empty() {
        let sep = if toggles.is_empty() { "" } else { " " };
        let _ = write!(env, "{sep}IA2_SHARE='{list}'");
    }
    let clean = faults == 0 && dropped == 0;
    let mut b = StackBuf::<10240>::new();
    if json {
        let _ = write!(
            b,
            "{{\"type\":\"audit_summary\",\"pid\":{p},\"reason\":\"{when}\",\"faults\":{faults},\"sites\":{nsites},\"groups\":{groups},\"dropped\":{dropped},\"clean\":{clean},\"toggles\":["
        );
        for (i, t) in toggles.split(' ').filter(|t| !t.is_empty()).enumerate() {
            let _ = write!(b, "{}{}", if i > 0 { "," } else { "" }, J(t));
        }
        let _ = write!(b, "],\"share\":[");
        for (i, e) in list.split(',').filter(|e| !e.is_empty()).enumerate() {
            let _ = write!(b, "{}{}", if i > 0 { "," } else { "" }, J(e));
        }
        let _ = writeln!(b, "],\"env\":{}}}", J(env.as_str()));
    } else {
        if dropped > 0 {
            let _ = writeln!(
                b,
                "ia2shim[{p}]: audit: the site table was full: {dropped} more faults were let through unrecorded"
            );
        }
        if clean {
            let _ = writeln!(
                b,
                "ia2shim[{p}]: audit: the run was clean: no protection-key faults"
            );
        } else {
            let _ = writeln!(
                b,
                "ia2shim[{p}]: audit: {groups} group{}; to run clean: {}",
                plural(groups),
                env.as_str()
            );
        }
    }
    emit(&b);
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Why the summary is printed.
struct When(Option<c_int>);

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("exit"),
            Some(sig) => write!(f, "signal {sig}"),
        }
    }
}

/// Is audit mode configured?
pub(super) fn configured() -> bool {
    runtime::get().is_some_and(|r| r.config.on_fault == OnFault::Audit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        let mut b = StackBuf::<64>::new();
        let _ = write!(b, "{}", J("a\"b\\c\n"));
        assert_eq!(b.as_str(), "\"a\\\"b\\\\c\\u000a\"");
    }

    #[test]
    fn hash_stays_in_the_table() {
        for i in 0..1000usize {
            assert!(hash(i << 12 | 3, 0x5555_0000 + i) < SITE_CAP);
        }
    }
}

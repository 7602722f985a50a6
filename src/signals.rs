//! Signal handlers in their own compartment (DESIGN.md, "Threads, signals,
//! fork"). The kernel runs every handler with only key 0 accessible, so the
//! shim installs one trampoline in place of each program handler: it
//! switches PKRU to the compartment that owns the handler (shared code: the
//! PKRU of the code it interrupted), calls the handler, and puts the
//! interrupted PKRU back (the kernel would restore a real PKRU from the
//! signal frame anyway; the simulated one needs it). `SIG_IGN` and `SIG_DFL`
//! are installed as they are. SIGSEGV and SIGTRAP belong to `fault`.

use crate::pku;
use crate::runtime;
use core::cell::Cell;
use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};

const NSIG: usize = 65;

#[allow(clippy::declare_interior_mutable_const)]
const NO_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
#[allow(clippy::declare_interior_mutable_const)]
const NO_FLAGS: AtomicI32 = AtomicI32::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const NO_PKRU: AtomicU32 = AtomicU32::new(0);

/// Which program handler a [`Chained`] slot holds: those of the signals
/// whose handler is the shim's own (`fault`: SIGSEGV, and SIGTRAP in audit
/// mode; `syscalls`: SIGSYS), which chain to the program's.
#[derive(Clone, Copy)]
pub enum Chained {
    Segv = 0,
    Sys = 1,
    Trap = 2,
}

/// What decides which function a signal runs and with which rights, on a
/// page of its own that `IA2_HARDEN=on` puts on the shim key: a compartment
/// that rewrote an entry would pick the function (another compartment's
/// internal one: the deputy rule bypassed) or the rights it runs with.
#[repr(C, align(4096))]
struct Table {
    /// The program's handler and flags for each signal the trampoline serves.
    handlers: [AtomicUsize; NSIG],
    flags: [AtomicI32; NSIG],
    /// The PKRU decided for a handler when it was registered (see
    /// `crate::deputy`): `decided_pkru[sig]` holds for the handler at
    /// `decided_for[sig]` (0: none decided).
    decided_for: [AtomicUsize; NSIG],
    decided_pkru: [AtomicU32; NSIG],
    /// The program's SIGSEGV, SIGSYS and SIGTRAP handlers ([`Chained`]).
    chained: [AtomicUsize; 3],
    chained_flags: [AtomicI32; 3],
    /// Their `sa_mask` (the kernel's 64 signals), blocked while they run.
    chained_mask: [AtomicU64; 3],
}
static TABLE: Table = Table {
    handlers: [NO_HANDLER; NSIG],
    flags: [NO_FLAGS; NSIG],
    decided_for: [NO_HANDLER; NSIG],
    decided_pkru: [NO_PKRU; NSIG],
    chained: [NO_HANDLER; 3],
    chained_flags: [NO_FLAGS; 3],
    chained_mask: [const { AtomicU64::new(0) }; 3],
};
const _: () = assert!(core::mem::size_of::<Table>() == 4096);

/// Put the table on the shim key (`IA2_HARDEN=on`, at install).
pub fn harden(key: u32) {
    pku::seal_static(&TABLE, key, "signal-handler table");
}

/// The program's handler and flags behind a shim-owned signal.
pub fn chained(which: Chained) -> (usize, c_int) {
    let i = which as usize;
    (
        TABLE.chained[i].load(Ordering::Acquire),
        TABLE.chained_flags[i].load(Ordering::Relaxed),
    )
}

/// Record the program's handler behind a shim-owned signal.
pub fn set_chained(which: Chained, handler: usize, flags: c_int) {
    let i = which as usize;
    pku::with_shim_writes(|| {
        TABLE.chained_flags[i].store(flags, Ordering::Relaxed);
        TABLE.chained[i].store(handler, Ordering::Release);
    });
}

/// The `sa_mask` of the program's handler behind a shim-owned signal.
pub fn chained_mask(which: Chained) -> u64 {
    TABLE.chained_mask[which as usize].load(Ordering::Relaxed)
}

/// Record that mask.
pub fn set_chained_mask(which: Chained, mask: u64) {
    pku::with_shim_writes(|| TABLE.chained_mask[which as usize].store(mask, Ordering::Relaxed));
}

/// A one-shot (`SA_RESETHAND`) chained handler has run: the next signal
/// gets the default action, unless the program installed another meanwhile.
pub fn reset_chained(which: Chained, handler: usize) {
    let i = which as usize;
    pku::with_shim_writes(|| {
        if TABLE.chained[i]
            .compare_exchange(handler, libc::SIG_DFL, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            TABLE.chained_flags[i].store(0, Ordering::Relaxed);
        }
    });
}

fn set_handler(i: usize, handler: usize, flags: c_int) {
    pku::with_shim_writes(|| {
        TABLE.flags[i].store(flags, Ordering::Relaxed);
        TABLE.handlers[i].store(handler, Ordering::Release);
    });
}

/// Decide, at registration, the rights `handler` for `sig` will run with
/// (the registrant is the calling code). Called by the `sigaction` and
/// `signal` hooks for every signal, SIGSEGV included.
pub fn decide(sig: c_int, handler: usize) {
    let Some(rt) = runtime::active() else { return };
    let i = sig as usize;
    if i >= NSIG || handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        return;
    }
    let pkru = crate::deputy::entry_pkru(rt, handler, pku::read_pkru());
    set_decided(i, handler, pkru);
}

fn set_decided(i: usize, handler: usize, pkru: u32) {
    pku::with_shim_writes(|| {
        TABLE.decided_for[i].store(0, Ordering::Release);
        TABLE.decided_pkru[i].store(pkru, Ordering::Relaxed);
        TABLE.decided_for[i].store(handler, Ordering::Release);
    });
}

/// Signals whose handlers the trampoline wraps.
pub fn wraps(sig: c_int) -> bool {
    (1..NSIG as c_int).contains(&sig)
        && sig != libc::SIGKILL
        && sig != libc::SIGSTOP
        && !crate::fault::intercepts(sig)
}

fn trampoline_addr() -> usize {
    trampoline as *const () as usize
}

extern "C" fn trampoline(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // The kernel entered with only key 0 accessible: the table is on the
    // shim key once hardened.
    pku::open_shim_reads();
    let i = sig as usize;
    let h = TABLE.handlers[i].load(Ordering::Acquire);
    let flags = TABLE.flags[i].load(Ordering::Relaxed);
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        return;
    }
    if flags & libc::SA_RESETHAND != 0 {
        pku::with_shim_writes(|| TABLE.handlers[i].store(libc::SIG_DFL, Ordering::Release));
    }
    run_in_compartment(h, flags, sig, info, ctx);
}

/// Run the program's handler `h` for `sig` with the PKRU of the compartment
/// that owns it (shared code: the PKRU of the code it interrupted), then put
/// the interrupted PKRU back. Shared with the SIGSEGV, SIGTRAP and SIGSYS
/// chaining in `fault` and `syscalls`. The caller has made the shim key
/// readable (the table is on it): each shim handler does so on entry.
pub(crate) fn run_in_compartment(
    h: usize,
    flags: c_int,
    sig: c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut c_void,
) {
    let saved = pku::read_pkru();
    // SAFETY: the kernel's ucontext for this signal.
    let interrupted = unsafe { crate::fault::interrupted_pkru(ctx as *const libc::ucontext_t) };
    let decided =
        (sig as usize) < NSIG && TABLE.decided_for[sig as usize].load(Ordering::Acquire) == h;
    let own = if decided {
        Some(TABLE.decided_pkru[sig as usize].load(Ordering::Relaxed))
    } else {
        runtime::get().and_then(|r| {
            let c = r.census.try_read().ok()?;
            let comp = c.object_at(h).and_then(|(i, _)| c.compartment_of[i])?;
            Some(r.pkru_for(comp))
        })
    };
    // In sim mode nothing is in the frame; the thread's simulated PKRU is
    // still the interrupted one.
    let interrupted = if pku::backend() == pku::Backend::Sim {
        Some(saved)
    } else {
        interrupted
    };
    // SAFETY: the kernel's ucontext for this signal.
    let frame = unsafe { crate::sigframe::Snapshot::take(ctx as *const libc::ucontext_t) };
    let run = own.or(interrupted);
    on_handler_stack(flags, &mut || {
        if let Some(p) = run {
            pku::write_pkru(p);
        }
        if flags & libc::SA_SIGINFO != 0 {
            // SAFETY: the program registered an SA_SIGINFO handler.
            let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) =
                unsafe { core::mem::transmute(h) };
            f(sig, info, ctx);
        } else {
            // SAFETY: the program registered a plain handler.
            let f: extern "C" fn(c_int) = unsafe { core::mem::transmute(h) };
            f(sig);
        }
        // Back to the handler's own rights before leaving the program's stack.
        pku::write_pkru(saved);
    });
    // sigreturn installs the frame's PKRU: never more than was interrupted.
    if let Some(f) = frame {
        // SAFETY: the same ucontext, after the handler returned.
        if let Some(w) = unsafe { f.enforce(ctx as *mut libc::ucontext_t) } {
            log::warn!(
                "signal {sig}: the handler at {h:#x} set PKRU {w:#x} in its signal frame, wider than the interrupted {:#x}; restored",
                f.pkru()
            );
        }
    }
    pku::write_pkru(interrupted.unwrap_or(saved));
}

/// Replace what the kernel holds by what the program installed.
fn translate(sig: usize, real: &mut libc::sigaction) {
    if real.sa_sigaction == trampoline_addr() {
        real.sa_sigaction = TABLE.handlers[sig].load(Ordering::Acquire);
        real.sa_flags = TABLE.flags[sig].load(Ordering::Relaxed);
    }
}

/// `sigaction` for a signal that [`wraps`].
///
/// # Safety
/// As `sigaction(2)`.
pub unsafe fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    let i = sig as usize;
    // SAFETY: zeroed sigaction is valid.
    let mut prev: libc::sigaction = unsafe { core::mem::zeroed() };
    let r = if act.is_null() {
        // SAFETY: querying only.
        unsafe { crate::real::sigaction(sig, core::ptr::null(), &mut prev) }
    } else {
        // SAFETY: the caller passes a valid sigaction.
        let a = unsafe { *act };
        let wrap = a.sa_sigaction != libc::SIG_DFL && a.sa_sigaction != libc::SIG_IGN;
        let mut installed = a;
        if wrap {
            installed.sa_sigaction = trampoline_addr();
            installed.sa_flags |= libc::SA_SIGINFO;
            // The kernel's alternate stack is the shim's: the trampoline
            // moves the handler onto the program's (`on_handler_stack`).
            installed.sa_flags &= !libc::SA_ONSTACK;
        }
        let before = (
            TABLE.handlers[i].load(Ordering::Acquire),
            TABLE.flags[i].load(Ordering::Relaxed),
        );
        // Publish the handler before the trampoline can run for it.
        if wrap {
            set_handler(i, a.sa_sigaction, a.sa_flags);
        }
        // SAFETY: a valid sigaction for the real call.
        let r = unsafe { crate::real::sigaction(sig, &installed, &mut prev) };
        if r != 0 && wrap {
            set_handler(i, before.0, before.1);
        }
        if r == 0 && prev.sa_sigaction == trampoline_addr() {
            prev.sa_sigaction = before.0;
            prev.sa_flags = before.1;
        }
        r
    };
    if r == 0 && !old.is_null() {
        translate(i, &mut prev);
        // SAFETY: the caller passes a valid out pointer.
        unsafe { *old = prev };
    }
    r
}

/// Every way to install a handler comes here once the shim is active:
/// SIGSEGV (and SIGTRAP in audit mode) is recorded for the shim's handler
/// to chain to, other catchable signals get the trampoline, the rest go to
/// the kernel as they are.
///
/// # Safety
/// As `sigaction(2)`.
pub unsafe fn dispatch(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    if crate::fault::intercepts(sig) {
        // SAFETY: pointers are the caller's, valid as sigaction(2) requires.
        unsafe { crate::fault::intercept_sigaction(sig, act, old) };
        return 0;
    }
    if wraps(sig) {
        // SAFETY: forwarded contract.
        return unsafe { sigaction(sig, act, old) };
    }
    // SAFETY: forwarded contract.
    unsafe { crate::real::sigaction(sig, act, old) }
}

/// Install `handler` with `flags` and an empty mask through [`dispatch`];
/// the previous handler, or `SIG_ERR`.
fn install(sig: c_int, handler: libc::sighandler_t, flags: c_int) -> libc::sighandler_t {
    // SAFETY: zeroed sigaction is valid.
    let mut act: libc::sigaction = unsafe { core::mem::zeroed() };
    act.sa_sigaction = handler;
    act.sa_flags = flags;
    // SAFETY: zeroed sigaction is valid.
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: both structs are valid.
    if unsafe { dispatch(sig, &act, &mut old) } != 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}

/// `signal(3)`, `bsd_signal(3)`, `ssignal`: BSD semantics (restart, the
/// handler stays installed, the signal is blocked while it runs).
pub fn bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    install(sig, handler, libc::SA_RESTART)
}

/// `sysv_signal(3)` and `__sysv_signal` (what `signal` is under
/// `-std=c99`): one-shot, not blocked while it runs, no restart.
pub fn sysv_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    install(sig, handler, libc::SA_RESETHAND | libc::SA_NODEFER)
}

/// `SIG_HOLD` (`sigset(3)`).
pub const SIG_HOLD: libc::sighandler_t = 2;

/// `sigset(3)`, as glibc implements it, over [`dispatch`].
pub fn sigset(sig: c_int, disp: libc::sighandler_t) -> libc::sighandler_t {
    // SAFETY: zeroed sigsets are valid.
    let (mut set, mut oset): (libc::sigset_t, libc::sigset_t) = unsafe { core::mem::zeroed() };
    // SAFETY: valid sigset pointers.
    unsafe {
        libc::sigemptyset(&mut set);
        if libc::sigaddset(&mut set, sig) != 0 {
            return libc::SIG_ERR;
        }
    }
    if disp == SIG_HOLD {
        // SAFETY: valid sigsets.
        if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, &mut oset) } != 0 {
            return libc::SIG_ERR;
        }
        // SAFETY: valid sigset.
        if unsafe { libc::sigismember(&oset, sig) } == 1 {
            return SIG_HOLD;
        }
        // SAFETY: zeroed sigaction is valid.
        let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
        // SAFETY: querying only.
        if unsafe { dispatch(sig, core::ptr::null(), &mut old) } != 0 {
            return libc::SIG_ERR;
        }
        return old.sa_sigaction;
    }
    let old = install(sig, disp, 0);
    if old == libc::SIG_ERR {
        return old;
    }
    // SAFETY: valid sigsets.
    if unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, &set, &mut oset) } != 0 {
        return libc::SIG_ERR;
    }
    // SAFETY: valid sigset.
    if unsafe { libc::sigismember(&oset, sig) } == 1 {
        SIG_HOLD
    } else {
        old
    }
}

/// Is `addr` in the shim itself (audit mode's own handlers)?
fn own_code(addr: usize) -> bool {
    runtime::get().is_some_and(|rt| {
        rt.census.read().is_ok_and(|c| {
            c.object_at(addr)
                .is_some_and(|(_, o)| o.kind == crate::objects::ObjectKind::Shim)
        })
    })
}

/// Wrap the handlers installed before the shim's constructor ran (by
/// library constructors, which run first): read each with `sigaction` and
/// install it again through the trampoline. Called by the constructor.
pub fn adopt_installed() {
    for sig in 1..NSIG as c_int {
        // One bare query per signal, the kernel's handler word only: ~60
        // of them cost a fresh process half of what reading `SigCgt` from
        // /proc/self/status did (10 µs against 20, cold), and allocate
        // nothing. Only a signal with a handler takes glibc's full view.
        if !wraps(sig) || !has_handler(sig) {
            continue;
        }
        // SAFETY: zeroed sigaction is valid.
        let mut cur: libc::sigaction = unsafe { core::mem::zeroed() };
        // SAFETY: querying only (glibc refuses its internal signals).
        if unsafe { crate::real::sigaction(sig, core::ptr::null(), &mut cur) } != 0 {
            continue;
        }
        let h = cur.sa_sigaction;
        if h == libc::SIG_DFL || h == libc::SIG_IGN || h == trampoline_addr() || own_code(h) {
            continue;
        }
        // SAFETY: re-installing what the kernel holds, wrapped.
        if unsafe { sigaction(sig, &cur, core::ptr::null_mut()) } != 0 {
            log::warn!("signals: cannot wrap the handler installed earlier for signal {sig}");
        }
    }
}

/// Does the kernel hold a handler for `sig` (neither `SIG_DFL` nor `SIG_IGN`)?
fn has_handler(sig: c_int) -> bool {
    // The kernel's struct sigaction: handler, flags, restorer, mask.
    let mut old = [0usize; 4];
    // SAFETY: rt_sigaction with no new action and a 32-byte buffer for the
    // old one (sigsetsize 8, the kernel's).
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            core::ptr::null::<c_void>(),
            old.as_mut_ptr(),
            8usize,
        )
    };
    r == 0 && old[0] != libc::SIG_DFL && old[0] != libc::SIG_IGN
}

// ---------------------------------------------------------------- alternate signal stacks

/// The shim's per-thread alternate signal stack (key 0, committed lazily).
/// The kernel holds it for every thread the shim knows (the main thread,
/// threads started through the interposed `pthread_create`, others from
/// their first gate or `sigaltstack` call), so the shim's SIGSEGV handler
/// (`SA_ONSTACK`) always runs on key-0 memory: the kernel writes a signal
/// frame with the interrupted thread's PKRU, and a frame on a stack in
/// another compartment's memory (a tagged program stack, or the program's
/// alternate stack there) could not be written, so the fault would end the
/// process without a report.
///
/// The program's own alternate stack is kept in this stack's header and
/// never given to the kernel. Program handlers are installed without
/// `SA_ONSTACK` (the kernel runs the trampoline on the interrupted stack),
/// and the trampoline moves a handler that asked for `SA_ONSTACK` onto the
/// program's alternate stack when the thread has one and is not on it yet:
/// where the kernel would have run it.
const ALT_BYTES: usize = 256 << 10;
const MINSIGSTKSZ: usize = 2048;
const SS_AUTODISARM: c_int = 1 << 31;

std::thread_local! {
    /// Base of this thread's shim stack (0: none yet). Its first words hold
    /// the program's alternate stack: sp (0: none), size, flags. (Kept out
    /// of the shim's static TLS, whose size shifts every thread's TLS
    /// layout.)
    static ALT: Cell<usize> = const { Cell::new(0) };
}

/// The program's alternate stack (sp, size, `SS_AUTODISARM` flag), from the
/// header of this thread's shim stack.
fn program_alt(base: usize) -> Option<(usize, usize, c_int)> {
    // SAFETY: the header words of this thread's own shim stack.
    let (sp, size, flags) = unsafe {
        (
            *(base as *const usize),
            *((base + 8) as *const usize),
            *((base + 16) as *const usize),
        )
    };
    (sp != 0).then_some((sp, size, flags as c_int))
}

fn set_program_alt(base: usize, v: Option<(usize, usize, c_int)>) {
    let (sp, size, flags) = v.unwrap_or((0, 0, 0));
    // SAFETY: as above.
    unsafe {
        *(base as *mut usize) = sp;
        *((base + 8) as *mut usize) = size;
        *((base + 16) as *mut usize) = flags as u32 as usize;
    }
}

/// Bytes at the bottom of the shim stack kept for the header (the kernel
/// is given the rest).
const ALT_HEADER: usize = 64;

fn sys_sigaltstack(ss: *const libc::stack_t, old: *mut libc::stack_t) -> c_int {
    // SAFETY: the raw syscall (the libc symbol is the shim's own hook).
    unsafe { libc::syscall(libc::SYS_sigaltstack, ss, old) as c_int }
}

fn stack(sp: usize, size: usize, flags: c_int) -> libc::stack_t {
    libc::stack_t {
        ss_sp: sp as *mut c_void,
        ss_flags: flags,
        ss_size: size,
    }
}

fn current_sp() -> usize {
    let sp: usize;
    // SAFETY: reads RSP only.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    sp
}

/// The part of the shim stack the kernel gets.
fn shim_stack(base: usize) -> libc::stack_t {
    stack(base + ALT_HEADER, ALT_BYTES - ALT_HEADER, 0)
}

/// This thread's shim stack, mapped and given to the kernel on first need.
/// A stack the kernel held before (set by a constructor before the shim's,
/// or with a raw syscall) becomes the program's. `None`: the thread runs
/// on it now, or no memory.
fn ensure_alt() -> Option<usize> {
    let base = ALT.get();
    if base != 0 {
        return Some(base);
    }
    // SAFETY: zeroed stack_t is valid.
    let mut cur: libc::stack_t = unsafe { core::mem::zeroed() };
    if sys_sigaltstack(core::ptr::null(), &mut cur) != 0 || cur.ss_flags & libc::SS_ONSTACK != 0 {
        return None;
    }
    // The lowest page stays a guard.
    let base = crate::anon::guarded_stack(ALT_BYTES, false)?;
    let held = (cur.ss_flags & libc::SS_DISABLE == 0).then_some((
        cur.ss_sp as usize,
        cur.ss_size,
        cur.ss_flags & SS_AUTODISARM,
    ));
    set_program_alt(base, held);
    if sys_sigaltstack(&shim_stack(base), core::ptr::null_mut()) != 0 {
        crate::anon::unmap_guarded(base, ALT_BYTES, false);
        return None;
    }
    ALT.set(base);
    Some(base)
}

/// At thread start (and for the main thread at start-up): give the kernel
/// the shim's stack.
pub fn thread_start() {
    if ensure_alt().is_none() {
        log::debug!("signals: no shim alternate stack for this thread");
    }
}

/// A thread the shim did not start, on its first gate (from the SIGSEGV
/// handler, which then runs on the thread's own stack): give it the shim's
/// stack too. Async-signal-safe: syscalls and this thread's TLS only.
pub fn foreign_thread_start() {
    let _ = ensure_alt();
}

/// Drop the shim's stack at thread exit.
pub fn thread_exit() {
    let base = ALT.replace(0);
    if base == 0 {
        return;
    }
    // SAFETY: zeroed stack_t is valid.
    let mut cur: libc::stack_t = unsafe { core::mem::zeroed() };
    sys_sigaltstack(core::ptr::null(), &mut cur);
    if cur.ss_sp as usize == base + ALT_HEADER {
        sys_sigaltstack(&stack(0, 0, libc::SS_DISABLE), core::ptr::null_mut());
    }
    // This thread's own stack; no handler runs on it now.
    crate::anon::unmap_guarded(base, ALT_BYTES, false);
}

// `ia2shim_call_on_stack(f, arg, top)`: call `f(arg)` with the stack pointer
// at `top` (16-byte aligned down), then return on the caller's stack. The
// CFI keeps unwinders and backtraces walking through to the caller.
core::arch::global_asm!(
    ".pushsection .text.ia2shim_call_on_stack,\"ax\",@progbits",
    ".globl ia2shim_call_on_stack",
    ".hidden ia2shim_call_on_stack",
    ".type ia2shim_call_on_stack,@function",
    ".p2align 4",
    "ia2shim_call_on_stack:",
    ".cfi_startproc",
    "push rbp",
    ".cfi_def_cfa_offset 16",
    ".cfi_offset rbp, -16",
    "mov rbp, rsp",
    ".cfi_def_cfa_register rbp",
    "mov rsp, rdx",
    "and rsp, -16",
    "mov rax, rdi",
    "mov rdi, rsi",
    "call rax",
    "mov rsp, rbp",
    "pop rbp",
    ".cfi_def_cfa rsp, 8",
    "ret",
    ".cfi_endproc",
    ".size ia2shim_call_on_stack, .-ia2shim_call_on_stack",
    ".popsection",
);

extern "C" {
    fn ia2shim_call_on_stack(f: usize, arg: usize, top: usize);
}

/// Run `f` where the kernel would have run a handler with `flags`: on the
/// program's alternate stack for `SA_ONSTACK` when the thread has one and
/// is on neither it nor the shim's stack (a handler the shim's own SIGSEGV
/// or SIGSYS handler chains to stays on the shim's stack, which holds that
/// handler's frame and would be overwritten by the next signal there),
/// else right here.
fn on_handler_stack(flags: c_int, f: &mut dyn FnMut()) {
    if flags & libc::SA_ONSTACK == 0 {
        return f();
    }
    // The handler entered with key 0 only; the shim's TLS goes through
    // `__tls_get_addr`, whose DTV is libc compartment data in strict mode.
    let base = runtime::with_libc_rights(|| ALT.get());
    let here = current_sp();
    let target = (base != 0)
        .then(|| program_alt(base))
        .flatten()
        .filter(|&(sp, size, _)| {
            !(sp..sp + size).contains(&here) && !(base..base + ALT_BYTES).contains(&here)
        });
    let Some((sp, size, disarm)) = target else {
        return f();
    };
    // SS_AUTODISARM: no alternate stack while the handler runs.
    if disarm != 0 {
        set_program_alt(base, None);
    }
    extern "C" fn run(arg: usize) {
        // SAFETY: `arg` is the `&mut dyn FnMut()` below, live for this call.
        let f = unsafe { &mut *(arg as *mut &mut dyn FnMut()) };
        f();
    }
    let mut r: &mut dyn FnMut() = f;
    // SAFETY: the program's alternate stack, which it registered for its
    // handlers; `run` returns before `r` goes out of scope.
    unsafe {
        ia2shim_call_on_stack(
            run as *const () as usize,
            (&mut r as *mut &mut dyn FnMut()) as usize,
            sp + size,
        )
    };
    if disarm != 0 {
        set_program_alt(base, Some((sp, size, disarm)));
    }
}

fn set_errno(e: c_int) -> c_int {
    // SAFETY: this thread's errno.
    unsafe { *libc::__errno_location() = e };
    -1
}

/// `sigaltstack(2)` on the program's alternate stack, as the shim keeps it
/// for its handlers (the kernel keeps the shim's stack). Without a shim
/// stack (none could be made), the kernel's call.
///
/// # Safety
/// As `sigaltstack(2)`.
pub unsafe fn sigaltstack(ss: *const libc::stack_t, old: *mut libc::stack_t) -> c_int {
    if runtime::active().is_none() {
        return sys_sigaltstack(ss, old);
    }
    // The shim's TLS (the DTV) and the exit key's value (libc data) carry
    // the libc compartment's key in strict mode.
    // SAFETY: forwarded contract.
    runtime::with_libc_rights(|| unsafe { program_sigaltstack(ss, old) })
}

/// [`sigaltstack`] once the shim is active.
///
/// # Safety
/// As `sigaltstack(2)`.
unsafe fn program_sigaltstack(ss: *const libc::stack_t, old: *mut libc::stack_t) -> c_int {
    let Some(base) = ensure_alt() else {
        return sys_sigaltstack(ss, old);
    };
    // A thread the shim did not start frees the stack at exit.
    crate::threads::adopt_foreign();
    let here = current_sp();
    let prog = program_alt(base);
    // On the program's stack, or on the shim's in a handler chained from
    // the shim's (where the kernel would have put it): SS_ONSTACK.
    let on_alt = prog.is_some_and(|(sp, size, _)| {
        (sp..sp + size).contains(&here) || (base..base + ALT_BYTES).contains(&here)
    });
    let view = match prog {
        Some((sp, size, fl)) => stack(sp, size, fl | if on_alt { libc::SS_ONSTACK } else { 0 }),
        None => stack(0, 0, libc::SS_DISABLE),
    };
    if !ss.is_null() {
        // SAFETY: the caller's valid stack_t.
        let new = unsafe { *ss };
        let mode = new.ss_flags & !SS_AUTODISARM;
        if on_alt {
            return set_errno(libc::EPERM);
        }
        if mode != 0 && mode != libc::SS_DISABLE && mode != libc::SS_ONSTACK {
            return set_errno(libc::EINVAL);
        }
        if mode == libc::SS_DISABLE {
            set_program_alt(base, None);
        } else if new.ss_size < MINSIGSTKSZ {
            return set_errno(libc::ENOMEM);
        } else {
            set_program_alt(
                base,
                Some((
                    new.ss_sp as usize,
                    new.ss_size,
                    new.ss_flags & SS_AUTODISARM,
                )),
            );
        }
    }
    if !old.is_null() {
        // SAFETY: the caller's valid out pointer.
        unsafe { *old = view };
    }
    0
}

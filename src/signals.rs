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
use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};

const NSIG: usize = 65;

#[allow(clippy::declare_interior_mutable_const)]
const NO_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
#[allow(clippy::declare_interior_mutable_const)]
const NO_FLAGS: AtomicI32 = AtomicI32::new(0);
/// The program's handler and flags for each signal the trampoline serves.
static HANDLERS: [AtomicUsize; NSIG] = [NO_HANDLER; NSIG];
static FLAGS: [AtomicI32; NSIG] = [NO_FLAGS; NSIG];

/// The PKRU decided for a handler when it was registered (see
/// `crate::deputy`): `DECIDED_PKRU[sig]` holds for the handler at
/// `DECIDED_FOR[sig]` (0: none decided).
static DECIDED_FOR: [AtomicUsize; NSIG] = [NO_HANDLER; NSIG];
#[allow(clippy::declare_interior_mutable_const)]
const NO_PKRU: AtomicU32 = AtomicU32::new(0);
static DECIDED_PKRU: [AtomicU32; NSIG] = [NO_PKRU; NSIG];

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
    DECIDED_FOR[i].store(0, Ordering::Release);
    DECIDED_PKRU[i].store(pkru, Ordering::Relaxed);
    DECIDED_FOR[i].store(handler, Ordering::Release);
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
    let i = sig as usize;
    let h = HANDLERS[i].load(Ordering::Acquire);
    let flags = FLAGS[i].load(Ordering::Relaxed);
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        return;
    }
    if flags & libc::SA_RESETHAND != 0 {
        HANDLERS[i].store(libc::SIG_DFL, Ordering::Release);
    }
    run_in_compartment(h, flags, sig, info, ctx);
}

/// Run the program's handler `h` for `sig` with the PKRU of the compartment
/// that owns it (shared code: the PKRU of the code it interrupted), then put
/// the interrupted PKRU back. Shared with the SIGSEGV chaining in `fault`.
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
    let decided = (sig as usize) < NSIG && DECIDED_FOR[sig as usize].load(Ordering::Acquire) == h;
    let own = if decided {
        Some(DECIDED_PKRU[sig as usize].load(Ordering::Relaxed))
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
    if let Some(p) = own.or(interrupted) {
        pku::write_pkru(p);
    }
    // SAFETY: the kernel's ucontext for this signal.
    let frame = unsafe { crate::sigframe::Snapshot::take(ctx as *const libc::ucontext_t) };
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
        real.sa_sigaction = HANDLERS[sig].load(Ordering::Acquire);
        real.sa_flags = FLAGS[sig].load(Ordering::Relaxed);
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
        }
        let before = (
            HANDLERS[i].load(Ordering::Acquire),
            FLAGS[i].load(Ordering::Relaxed),
        );
        // Publish the handler before the trampoline can run for it.
        if wrap {
            FLAGS[i].store(a.sa_flags, Ordering::Relaxed);
            HANDLERS[i].store(a.sa_sigaction, Ordering::Release);
        }
        // SAFETY: a valid sigaction for the real call.
        let r = unsafe { crate::real::sigaction(sig, &installed, &mut prev) };
        if r != 0 && wrap {
            HANDLERS[i].store(before.0, Ordering::Release);
            FLAGS[i].store(before.1, Ordering::Relaxed);
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

/// `signal(3)` (BSD semantics) for a signal that [`wraps`].
///
/// # Safety
/// As `signal(3)`.
pub unsafe fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    // SAFETY: zeroed sigaction is valid.
    let mut act: libc::sigaction = unsafe { core::mem::zeroed() };
    act.sa_sigaction = handler;
    act.sa_flags = libc::SA_RESTART;
    // SAFETY: zeroed sigaction is valid.
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: both structs are valid.
    if unsafe { sigaction(sig, &act, &mut old) } != 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}

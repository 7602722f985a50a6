//! C++ exceptions: every landing pad runs with exactly the rights of the
//! compartment whose code it is, and nothing after a failed search keeps
//! rights the thrower did not have.
//!
//! The gate's personality routine (`gates::unwind`) adds the caller's rights
//! during the search phase, because the unwinder reads the caller's unwind
//! data (`DW.ref.*` pointers in its tagged .data). So the shim narrows again:
//!
//! - `_Unwind_RaiseException` (and `_Unwind_Resume_or_Rethrow`) are
//!   interposed: they record the thrower's PKRU as the thread's *unwind
//!   rights* and, when the search finds no handler and they return to
//!   `__cxa_throw` (which then calls `std::terminate` and the program's
//!   terminate handler), put that PKRU back. The handler itself runs with
//!   the rights decided when it was registered (`callbacks`: in strict mode
//!   the thrower's PKRU includes the libc compartment's key).
//! - `__gxx_personality_v0` and `__gcc_personality_v0` are interposed (every
//!   object's CIE names them through a `DW.ref` that the loader binds to the
//!   first definition, the shim's). When the search finds a handler, PKRU
//!   goes back to the unwind rights before phase 2 starts. When phase 2
//!   lands in a cleanup or catch pad, PKRU becomes the rights of the pad's
//!   compartment (application code), or the unwind rights (shared code such
//!   as libstdc++). libgcc reads its own data to install the pad's context
//!   after the routine returns: in strict mode the `libgcc` carveout keeps
//!   that data shared, so application pads get their compartment's rights
//!   alone; with `IA2_SHARE_LIBGCC=0` they run with N's key added until
//!   their `_Unwind_Resume` or `__cxa_begin_catch` (shared-code pads
//!   always do).
//! - `_Unwind_Resume`, which every cleanup pad and the gate's own pad call,
//!   records the caller's PKRU as the unwind rights, then (strict mode)
//!   adds the libc compartment's key for libgcc.
//! - `__cxa_begin_catch`, which every catch handler calls first, runs the
//!   real one with the libc compartment's key added (strict mode: libstdc++'s
//!   exception globals are its TLS) and returns with the catching
//!   compartment's rights.
//!
//! Not covered: landing pads of frames whose personality routine is neither
//! of the two (another language runtime) land with the PKRU the unwinder
//! has; an unwinder linked into the program (`-static-libgcc`) is not
//! interposed; forced unwinds (`pthread_exit`, cancellation) go through
//! glibc's private handle on libgcc, so shared-code pads keep the PKRU the
//! unwinder has there (application pads still get their own rights).

use crate::objects::ObjectKind;
use crate::pku;
use crate::real::RealFn;
use crate::runtime::{self, Runtime};
use core::cell::Cell;
use core::ffi::{c_int, c_void};

/// libgcc's `_Unwind_Resume`, for the stub in hooks.rs.
#[link_section = ".ia2shim_sealed"]
static REAL_UNWIND_RESUME: RealFn = RealFn::new(c"_Unwind_Resume");
#[link_section = ".ia2shim_sealed"]
static REAL_BEGIN_CATCH: RealFn = RealFn::new(c"__cxa_begin_catch");
#[link_section = ".ia2shim_sealed"]
static REAL_RAISE: RealFn = RealFn::new(c"_Unwind_RaiseException");
#[link_section = ".ia2shim_sealed"]
static REAL_RETHROW: RealFn = RealFn::new(c"_Unwind_Resume_or_Rethrow");
#[link_section = ".ia2shim_sealed"]
static REAL_GXX_PERSONALITY: RealFn = RealFn::new(c"__gxx_personality_v0");
#[link_section = ".ia2shim_sealed"]
static REAL_GCC_PERSONALITY: RealFn = RealFn::new(c"__gcc_personality_v0");

const UA_SEARCH_PHASE: c_int = 1;
const UA_CLEANUP_PHASE: c_int = 2;
const UA_FORCE_UNWIND: c_int = 8;
const URC_HANDLER_FOUND: c_int = 6;
const URC_INSTALL_CONTEXT: c_int = 7;
const URC_FATAL_PHASE1_ERROR: c_int = 3;

std::thread_local! {
    /// The PKRU of the code that last entered the unwinder on this thread
    /// (the thrower, a cleanup pad, a gate's pad); `None` outside an unwind.
    static UNWIND_RIGHTS: Cell<Option<u32>> = const { Cell::new(None) };
}

extern "C" {
    fn _Unwind_GetIP(ctx: *mut c_void) -> usize;
}

/// Resolve `_Unwind_Resume` before any exception (the stub needs it, in
/// glibc's SIGCANCEL handler too) once `objects` include `libgcc_s`, at
/// start-up and after each `dlopen`. Without it a lookup would fail (a
/// failed `dlsym` costs a start-up 10 µs of formatting an error nobody
/// reads); a process that never loads it resolves on first use, or takes
/// the shim's private copy (`crate::unwinder`).
pub fn resolve<'a>(mut objects: impl Iterator<Item = &'a crate::objects::LoadedObject>) {
    if objects.any(|o| o.basename.starts_with("libgcc_s.so")) {
        REAL_UNWIND_RESUME.get_or(0);
    }
}

/// The libc compartment's key bits cleared from `pkru` (strict mode).
fn with_libc_key(rt: &Runtime, pkru: u32) -> u32 {
    match rt.config.libc_compartment {
        Some(n) => pkru & !(3 << (2 * rt.key_of(n))),
        None => pkru,
    }
}

/// Called by the `_Unwind_Resume` stub: record the caller's rights, add the
/// libc compartment's key (strict mode); returns the real `_Unwind_Resume`.
pub extern "C" fn unwind_resume_enter() -> usize {
    // Unwinding may run in glibc's SIGCANCEL handler (key 0 alone).
    pku::open_shim_reads();
    if let Some(rt) = runtime::active() {
        let pkru = pku::read_pkru();
        UNWIND_RIGHTS.set(Some(pkru));
        pku::write_pkru(with_libc_key(rt, pkru));
    }
    crate::unwinder::ready();
    REAL_UNWIND_RESUME.get_or(crate::unwinder::private_resume())
}

type Raise = unsafe extern "C" fn(*mut c_void) -> c_int;

/// `_Unwind_RaiseException` or `_Unwind_Resume_or_Rethrow`: returns only
/// when no handler was found (or on an error); then with the thrower's PKRU.
///
/// # Safety
/// As `_Unwind_RaiseException`.
pub unsafe fn raise(exc: *mut c_void, rethrow: bool) -> c_int {
    // Unwinding may run in glibc's SIGCANCEL handler (key 0 alone).
    pku::open_shim_reads();
    crate::unwinder::ready();
    let f = if rethrow {
        REAL_RETHROW.get_or(crate::unwinder::private_rethrow())
    } else {
        REAL_RAISE.get_or(crate::unwinder::private_raise())
    };
    let saved = runtime::active().map(|_| {
        let p = pku::read_pkru();
        UNWIND_RIGHTS.set(Some(p));
        p
    });
    // SAFETY: libgcc's function of this type, with the caller's exception.
    let r = unsafe { core::mem::transmute::<usize, Raise>(f)(exc) };
    if let Some(p) = saved {
        // The search may have added other compartments' rights (the gate's
        // personality); the thrower goes on (to std::terminate) with its own.
        pku::write_pkru(p);
        UNWIND_RIGHTS.set(None);
    }
    r
}

type Personality = unsafe extern "C" fn(c_int, c_int, u64, *mut c_void, *mut c_void) -> c_int;

/// The rights a landing pad at `ip` runs with.
fn landing_pkru(rt: &Runtime, ip: usize, forced: bool) -> Option<u32> {
    let c = rt.census.read().ok()?;
    let app = c.object_at(ip).and_then(|(i, o)| {
        matches!(o.kind, ObjectKind::Main | ObjectKind::Application)
            .then_some(c.compartment_of[i])
            .flatten()
    });
    // Strict mode: libgcc's `uw_install_context`, which runs after the
    // personality routine returns, reads libgcc's own data: N's key unless
    // the `libgcc` carveout keeps that data shared.
    match app {
        Some(k) if rt.config.share_libgcc => Some(rt.pkru_for(k)),
        Some(k) => Some(with_libc_key(rt, rt.pkru_for(k))),
        None if forced => None,
        None => UNWIND_RIGHTS.get().map(|u| with_libc_key(rt, u)),
    }
}

/// The interposed personality routines: the real one, then the PKRU that
/// the next step needs (see the module comment).
///
/// # Safety
/// As a personality routine, called by the unwinder.
pub unsafe fn personality(
    gcc: bool,
    version: c_int,
    actions: c_int,
    class: u64,
    exc: *mut c_void,
    ctx: *mut c_void,
) -> c_int {
    // Unwinding may run in glibc's SIGCANCEL handler (key 0 alone).
    pku::open_shim_reads();
    let f = if gcc {
        REAL_GCC_PERSONALITY.get_or(crate::unwinder::private_gcc_personality())
    } else {
        REAL_GXX_PERSONALITY.get()
    };
    if f == 0 {
        return URC_FATAL_PHASE1_ERROR;
    }
    // SAFETY: libstdc++'s / libgcc's personality routine, same arguments.
    let r =
        unsafe { core::mem::transmute::<usize, Personality>(f)(version, actions, class, exc, ctx) };
    let Some(rt) = runtime::active() else {
        return r;
    };
    if actions & UA_SEARCH_PHASE != 0 && r == URC_HANDLER_FOUND {
        // Phase 2 starts over at the thrower's frames: the thrower's rights.
        if let Some(u) = UNWIND_RIGHTS.get() {
            pku::write_pkru(u);
        }
    } else if actions & UA_CLEANUP_PHASE != 0 && r == URC_INSTALL_CONTEXT {
        // SAFETY: the unwinder's context for this frame; the routine has
        // just set the pad's address.
        let ip = unsafe { _Unwind_GetIP(ctx) };
        if let Some(p) = landing_pkru(rt, ip, actions & UA_FORCE_UNWIND != 0) {
            pku::write_pkru(p);
        }
    }
    r
}

type BeginCatch = unsafe extern "C" fn(*mut c_void) -> *mut c_void;

/// `__cxa_begin_catch(exc)` called from `caller`: the real one (with the
/// libc compartment's key in strict mode), then the catching compartment's
/// rights.
///
/// # Safety
/// As `__cxa_begin_catch`.
pub unsafe fn begin_catch(exc: *mut c_void, caller: usize) -> *mut c_void {
    // Unwinding may run in glibc's SIGCANCEL handler (key 0 alone).
    pku::open_shim_reads();
    let f = REAL_BEGIN_CATCH.get();
    let rt = runtime::active();
    if let Some(rt) = rt {
        pku::write_pkru(with_libc_key(rt, pku::read_pkru()));
        UNWIND_RIGHTS.set(None);
    }
    // SAFETY: libstdc++'s __cxa_begin_catch.
    let r = unsafe { core::mem::transmute::<usize, BeginCatch>(f)(exc) };
    if let Some(rt) = rt {
        let pkru = rt.census.read().ok().and_then(|c| {
            c.object_at(caller).and_then(|(i, o)| {
                matches!(o.kind, ObjectKind::Main | ObjectKind::Application)
                    .then_some(c.compartment_of[i])
                    .flatten()
            })
        });
        if let Some(k) = pkru {
            pku::write_pkru(rt.pkru_for(k));
        }
    }
    r
}

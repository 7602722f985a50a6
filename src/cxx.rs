//! C++ exceptions in strict mode. The unwinder (libgcc_s), the personality
//! routine (libstdc++) and `_dl_find_object` (ld.so) are libc-compartment
//! code and data, but a gate's cleanup pad resumes unwinding with the
//! gate's caller's exact rights, and every cleanup landing pad of
//! compartment code calls `_Unwind_Resume` with its own. So:
//!
//! - `_Unwind_Resume` is interposed: in strict mode it adds the libc
//!   compartment's key to the thread's PKRU before glibc's… libgcc's
//!   `_Unwind_Resume` continues the unwind (it never returns).
//! - `__cxa_begin_catch`, which every catch handler calls first, is
//!   interposed: after the real one, PKRU becomes the rights of the
//!   compartment of the catching code (its return address), dropping the
//!   libc key that the unwind added. Between landing and that call (and in
//!   cleanup pads, until their `_Unwind_Resume`) compartment code runs with
//!   the libc compartment's key added: a documented window.

use crate::objects::ObjectKind;
use crate::pku;
use crate::real::RealFn;
use crate::runtime;
use core::ffi::c_void;

/// libgcc's `_Unwind_Resume`, for the stub in hooks.rs.
static REAL_UNWIND_RESUME: RealFn = RealFn::new(c"_Unwind_Resume");
static REAL_BEGIN_CATCH: RealFn = RealFn::new(c"__cxa_begin_catch");

/// Resolve `_Unwind_Resume` (before any exception: the stub needs it).
pub fn resolve() {
    REAL_UNWIND_RESUME.get();
}

/// Called by the `_Unwind_Resume` stub: add the libc compartment's key
/// (strict mode); returns the real `_Unwind_Resume`.
pub extern "C" fn unwind_resume_enter() -> usize {
    if let Some(rt) = runtime::active() {
        if let Some(n) = rt.config.libc_compartment {
            pku::write_pkru(pku::read_pkru() & !(3 << (2 * rt.key_of(n))));
        }
    }
    REAL_UNWIND_RESUME.get()
}

type BeginCatch = unsafe extern "C" fn(*mut c_void) -> *mut c_void;

/// `__cxa_begin_catch(exc)` called from `caller`: the real one, then the
/// catching compartment's rights (strict mode).
///
/// # Safety
/// As `__cxa_begin_catch`.
pub unsafe fn begin_catch(exc: *mut c_void, caller: usize) -> *mut c_void {
    let f = REAL_BEGIN_CATCH.get();
    // SAFETY: libstdc++'s __cxa_begin_catch.
    let r = unsafe { core::mem::transmute::<usize, BeginCatch>(f)(exc) };
    if let Some(rt) = runtime::active() {
        if rt.config.libc_compartment.is_some() {
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
    }
    r
}

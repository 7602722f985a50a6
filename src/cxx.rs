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
use crate::runtime;
use core::ffi::c_void;
use core::sync::atomic::{AtomicUsize, Ordering};

/// libgcc's `_Unwind_Resume`, for the stub in hooks.rs.
pub static REAL_UNWIND_RESUME: AtomicUsize = AtomicUsize::new(0);
static REAL_BEGIN_CATCH: AtomicUsize = AtomicUsize::new(0);

fn real(slot: &AtomicUsize, name: &core::ffi::CStr) -> usize {
    let a = slot.load(Ordering::Acquire);
    if a != 0 {
        return a;
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    let a = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    slot.store(a, Ordering::Release);
    a
}

/// Resolve `_Unwind_Resume` (before any exception: the stub needs it).
pub fn resolve() {
    if real(&REAL_UNWIND_RESUME, c"_Unwind_Resume") == 0 {
        crate::lifecycle::fatal(format_args!(
            "dlsym(RTLD_NEXT, \"_Unwind_Resume\") returned NULL"
        ));
    }
}

/// Called by the `_Unwind_Resume` stub: add the libc compartment's key
/// (strict mode); returns the real `_Unwind_Resume`.
pub extern "C" fn unwind_resume_enter() -> usize {
    if let Some(rt) = runtime::active() {
        if let Some(n) = rt.config.libc_compartment {
            pku::write_pkru(pku::read_pkru() & !(3 << (2 * rt.key_of(n))));
        }
    }
    real(&REAL_UNWIND_RESUME, c"_Unwind_Resume")
}

type BeginCatch = unsafe extern "C" fn(*mut c_void) -> *mut c_void;

/// `__cxa_begin_catch(exc)` called from `caller`: the real one, then the
/// catching compartment's rights (strict mode).
///
/// # Safety
/// As `__cxa_begin_catch`.
pub unsafe fn begin_catch(exc: *mut c_void, caller: usize) -> *mut c_void {
    let f = real(&REAL_BEGIN_CATCH, c"__cxa_begin_catch");
    if f == 0 {
        crate::lifecycle::fatal(format_args!(
            "__cxa_begin_catch called but no libstdc++ defines it"
        ));
    }
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

//! The exit path: no exit handler runs compartment code with rights that
//! are not its compartment's, in strict and default mode alike.
//!
//! - `atexit`, `__cxa_atexit` (C++ static destructors) and
//!   `__cxa_thread_atexit_impl` (`thread_local` destructors) are
//!   interposed. Each handler is registered with glibc as a trampoline and a
//!   record `{handler, argument, registrant}`; glibc keeps the DSO handle, so
//!   `__cxa_finalize` (every object's first destructor, and `dlclose`) still
//!   finds it. When the handler runs, the trampoline picks its rights: the
//!   handler's compartment if the handler is application code (a call into
//!   it from elsewhere would go through a gate), else the registrant's (the
//!   object whose `__dso_handle` was passed, so `std::string`'s destructor
//!   in libstdc++, registered by a library's static initialiser for its own
//!   global string, runs with that library's rights), else the rights it was
//!   called with. Records are decided at run time, because libraries'
//!   constructors (which register their static destructors) run before the
//!   shim's.
//! - Returning from `main` no longer restores the all-keys PKRU of
//!   start-up: the exit path continues with `main`'s rights, plus the libc
//!   compartment's key in strict mode, exactly as if `main` had called
//!   `exit` through its union gate.
//! - `DT_FINI`/`DT_FINI_ARRAY` entries are gated into their own compartment
//!   (`gates::patch_fini`); in strict mode the `__cxa_finalize` they call
//!   is a gated libc call.

use crate::objects::ObjectKind;
use crate::pku;
use crate::real::RealFn;
use crate::runtime;
use core::ffi::{c_int, c_void};
use std::sync::Mutex;

/// One registered handler.
#[repr(C)]
struct Record {
    func: usize,
    arg: usize,
    /// An address in the registering object (its `__dso_handle`), or 0.
    registrant: usize,
}

const PER_CHUNK: usize = 4096 / core::mem::size_of::<Record>();

/// Records live in `mmap`ed pages on key 0 and are never freed (glibc
/// keeps no pointer to free them by); no `malloc`, which may not be up
/// when the first libraries' constructors register their destructors.
static POOL: Mutex<(usize, usize)> = Mutex::new((0, PER_CHUNK));

fn new_record(func: usize, arg: usize, registrant: usize) -> Option<*mut Record> {
    let mut p = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if p.1 == PER_CHUNK {
        // SAFETY: an anonymous private mapping; nothing else uses it.
        let m = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if m == libc::MAP_FAILED {
            return None;
        }
        *p = (m as usize, 0);
    }
    let r = (p.0 + p.1 * core::mem::size_of::<Record>()) as *mut Record;
    p.1 += 1;
    // SAFETY: a fresh, aligned slot of our mapping.
    unsafe {
        r.write(Record {
            func,
            arg,
            registrant,
        })
    };
    Some(r)
}

/// The PKRU to run handler `func`, registered by the object containing
/// `registrant`, with; `None`: keep the current rights.
pub fn handler_pkru(func: usize, registrant: usize) -> Option<u32> {
    let rt = runtime::active()?;
    let c = rt.census.read().ok()?;
    let own = |addr: usize| {
        c.object_at(addr)
            .and_then(|(i, o)| c.compartment_of[i].map(|k| (k, o.kind)))
    };
    match own(func) {
        Some((k, ObjectKind::Main | ObjectKind::Application)) => Some(rt.pkru_for(k)),
        theirs => match own(registrant) {
            // System code run for an application object: the registrant's
            // rights, plus the libc compartment's when the code is in it
            // (strict mode), as a union gate from the registrant gives.
            Some((k, ObjectKind::Main | ObjectKind::Application)) => {
                let mut p = rt.pkru_for(k);
                if let Some((n, _)) = theirs {
                    if rt.config.libc_compartment == Some(n) {
                        p &= !(3 << (2 * rt.key_of(n)));
                    }
                }
                Some(p)
            }
            _ => None,
        },
    }
}

/// Run `f` with `pkru` (if any), then restore the caller's PKRU.
pub fn with_pkru<R>(pkru: Option<u32>, f: impl FnOnce() -> R) -> R {
    let Some(p) = pkru else { return f() };
    let saved = pku::read_pkru();
    pku::write_pkru(p);
    let r = f();
    pku::write_pkru(saved);
    r
}

extern "C" fn run_record(rec: *mut c_void) {
    // SAFETY: glibc passes back the record we registered.
    let r = unsafe { &*(rec as *const Record) };
    let pkru = handler_pkru(r.func, r.registrant);
    // SAFETY: the handler and argument the program registered.
    let f: extern "C" fn(*mut c_void) =
        unsafe { core::mem::transmute::<usize, extern "C" fn(*mut c_void)>(r.func) };
    with_pkru(pkru, || f(r.arg as *mut c_void));
}

static REAL_CXA_ATEXIT: RealFn = RealFn::new(c"__cxa_atexit");
static REAL_THREAD_ATEXIT: RealFn = RealFn::new(c"__cxa_thread_atexit_impl");

type CxaAtexitFn =
    unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, *mut c_void) -> c_int;

/// `__cxa_atexit(func, arg, dso)`: registered through a record, so the
/// handler runs with its compartment's rights.
///
/// # Safety
/// As `__cxa_atexit`.
pub unsafe fn cxa_atexit(func: usize, arg: *mut c_void, dso: *mut c_void) -> c_int {
    register(&REAL_CXA_ATEXIT, func, arg, dso)
}

/// `__cxa_thread_atexit_impl(func, obj, dso_symbol)`: the same for
/// `thread_local` destructors.
///
/// # Safety
/// As `__cxa_thread_atexit_impl`.
pub unsafe fn cxa_thread_atexit(func: usize, arg: *mut c_void, dso: *mut c_void) -> c_int {
    register(&REAL_THREAD_ATEXIT, func, arg, dso)
}

fn register(slot: &RealFn, func: usize, arg: *mut c_void, dso: *mut c_void) -> c_int {
    // SAFETY: the slot holds glibc's function of this type.
    let f: CxaAtexitFn = unsafe { core::mem::transmute::<usize, CxaAtexitFn>(slot.get()) };
    // The shim's own handlers (the gate-call report) need no record.
    if is_shim_code(func) {
        // SAFETY: forwarding the program's arguments.
        return unsafe {
            f(
                core::mem::transmute::<usize, extern "C" fn(*mut c_void)>(func),
                arg,
                dso,
            )
        };
    }
    let Some(rec) = new_record(func, arg as usize, dso as usize) else {
        return -1;
    };
    // SAFETY: our trampoline and record, with the caller's DSO handle.
    unsafe { f(run_record, rec.cast(), dso) }
}

/// Is `addr` in the shim's own object?
pub fn is_shim_code(addr: usize) -> bool {
    let here = is_shim_code as fn(usize) -> bool as usize;
    // SAFETY: zeroed Dl_info is valid for dladdr to fill.
    let mut a: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: zeroed Dl_info is valid for dladdr to fill.
    let mut b: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: dladdr only reads loader data.
    unsafe {
        libc::dladdr(addr as *const c_void, &mut a) != 0
            && libc::dladdr(here as *const c_void, &mut b) != 0
            && a.dli_fbase == b.dli_fbase
    }
}

/// `main` returned: the exit path keeps `main`'s rights (not start-up's
/// all-keys PKRU), plus the libc compartment's key in strict mode, as a
/// union gate into `exit` would give.
pub fn after_main() {
    let Some(rt) = runtime::active() else { return };
    let Some(c) = rt.main_compartment() else {
        return;
    };
    let mut pkru = rt.pkru_for(c);
    if let Some(n) = rt.config.libc_compartment {
        pkru &= !(3 << (2 * rt.key_of(n)));
    }
    pku::write_pkru(pkru);
}

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
use core::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// One registered handler.
#[repr(C)]
struct Record {
    func: usize,
    arg: usize,
    /// An address in the registering object (its `__dso_handle`), or 0.
    registrant: usize,
    /// The PKRU the registering code ran with ([`NO_PKRU`]: registered
    /// before the shim was ready, when no compartment existed yet).
    pkru: u64,
}

const NO_PKRU: u64 = u64::MAX;
const CHUNK: usize = 64 * 1024;
const PER_CHUNK: usize = CHUNK / core::mem::size_of::<Record>();
const MAX_CHUNKS: usize = 500;

/// Records live in `mmap`ed chunks that are never freed (glibc keeps no
/// pointer to free them by); no `malloc`, which may not be up when the
/// first libraries' constructors register their destructors. The chunks
/// and this table (the lock, the cursor and every chunk's address) go on
/// the shim key once hardened ([`harden`]): a compartment that rewrote a
/// record's handler, argument, registrant or PKRU would have it run at
/// exit with another compartment's rights, and one that moved the cursor
/// would have the next records written where it can rewrite them.
#[repr(C, align(4096))]
struct Pool {
    /// (current chunk, records used in it).
    cursor: Mutex<(usize, usize)>,
    chunks: [AtomicUsize; MAX_CHUNKS],
    count: AtomicUsize,
}
const _: () = assert!(core::mem::size_of::<Pool>() == 4096);

static POOL: Pool = Pool {
    cursor: Mutex::new((0, PER_CHUNK)),
    chunks: [const { AtomicUsize::new(0) }; MAX_CHUNKS],
    count: AtomicUsize::new(0),
};

/// Put the record table and every chunk made so far on the shim key;
/// later chunks are sealed as they are made.
pub fn harden(key: u32) {
    pku::with_shim_writes(|| {
        let _cursor = POOL.cursor.lock().unwrap_or_else(|e| e.into_inner());
        for c in &POOL.chunks[..POOL.count.load(Ordering::Acquire)] {
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            pku::seal(
                c.load(Ordering::Relaxed),
                CHUNK,
                rw,
                key,
                "exit-handler records",
            );
        }
    });
    pku::seal_static(&POOL, key, "exit-handler table");
}

fn new_record(func: usize, arg: usize, registrant: usize, pkru: u64) -> Option<*mut Record> {
    // Lock, cursor and record are all shim state: written with the key open,
    // and nothing in here runs program code.
    pku::with_shim_writes(|| {
        let mut p = POOL.cursor.lock().unwrap_or_else(|e| e.into_inner());
        if p.1 == PER_CHUNK {
            let n = POOL.count.load(Ordering::Relaxed);
            if n == MAX_CHUNKS {
                return None;
            }
            // SAFETY: an anonymous private mapping; nothing else uses it.
            let m = unsafe {
                libc::mmap(
                    core::ptr::null_mut(),
                    CHUNK,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if m == libc::MAP_FAILED {
                return None;
            }
            let key = pku::shim_key();
            if key != 0 {
                let rw = libc::PROT_READ | libc::PROT_WRITE;
                pku::seal(m as usize, CHUNK, rw, key, "exit-handler records");
            }
            POOL.chunks[n].store(m as usize, Ordering::Relaxed);
            POOL.count.store(n + 1, Ordering::Release);
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
                pkru,
            })
        };
        Some(r)
    })
}

/// Is `rec` one of the records [`new_record`] handed glibc? The argument
/// glibc passes back lies in glibc's exit list, which compartment code can
/// write: a record it forged in its own memory must not run.
fn is_record(rec: usize) -> bool {
    let n = POOL.count.load(Ordering::Acquire);
    POOL.chunks[..n].iter().any(|c| {
        let base = c.load(Ordering::Relaxed);
        (base..base + CHUNK).contains(&rec) && (rec - base) % core::mem::size_of::<Record>() == 0
    })
}

/// The PKRU to run handler `func`, registered by the object containing
/// `registrant` from code running with `registered` (its PKRU; `None`:
/// before any compartment existed), with; `None`: keep the current rights.
///
/// The deputy rule (`crate::deputy`) holds: application code runs as its
/// compartment only if the registering code held that compartment's key
/// or `func` is an exported function (a gate would enter it anyway);
/// other code runs as the registering object's compartment only if the
/// registering code held that key (the object is named by an argument,
/// which any caller can forge). Otherwise the handler gets no more than
/// the registering code's rights.
pub fn handler_pkru(func: usize, registrant: usize, registered: Option<u32>) -> Option<u32> {
    let rt = runtime::active()?;
    let c = rt.census.read().ok()?;
    let own = |addr: usize| {
        c.object_at(addr)
            .and_then(|(i, o)| c.compartment_of[i].map(|k| (k, o.kind)))
    };
    let held = |k: u8| registered.is_none_or(|p| pku::pkru_allows(p, rt.key_of(k), true));
    // The registering code's rights; start-up's all-keys PKRU (constructors
    // after the shim's) keeps the current rights instead.
    let every_key =
        |p: u32| (1..16u8).all(|c| rt.key_of(c) == 0 || pku::pkru_allows(p, rt.key_of(c), true));
    let registrants = || registered.filter(|&p| !every_key(p));
    match own(func) {
        Some((k, ObjectKind::Main | ObjectKind::Application)) => {
            if held(k) || crate::deputy::exported_function(func) {
                Some(rt.pkru_for(k))
            } else {
                log::info!(
                    "{func:#x} is an internal function of compartment {k}: \
                     it runs with its registrant's rights"
                );
                registrants()
            }
        }
        theirs => match own(registrant) {
            // System code run for an application object: the registrant's
            // rights, plus the libc compartment's when the code is in it
            // (strict mode), as a union gate from the registrant gives.
            Some((k, ObjectKind::Main | ObjectKind::Application)) if held(k) => {
                let mut p = rt.pkru_for(k);
                if let Some((n, _)) = theirs {
                    if rt.config.libc_compartment == Some(n) {
                        p &= !(3 << (2 * rt.key_of(n)));
                    }
                }
                Some(p)
            }
            _ => registrants(),
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
    if !is_record(rec as usize) {
        crate::lifecycle::fatal(format_args!(
            "exit handler record {rec:p} is not one of the shim's (glibc's exit list was \
             rewritten): refused"
        ));
    }
    // SAFETY: one of our records (checked above), which glibc passed back.
    let r = unsafe { &*(rec as *const Record) };
    let registered = (r.pkru != NO_PKRU).then_some(r.pkru as u32);
    let pkru = handler_pkru(r.func, r.registrant, registered);
    // SAFETY: the handler and argument the program registered.
    let f: extern "C" fn(*mut c_void) =
        unsafe { core::mem::transmute::<usize, extern "C" fn(*mut c_void)>(r.func) };
    with_pkru(pkru, || f(r.arg as *mut c_void));
}

#[link_section = ".ia2shim_sealed"]
static REAL_CXA_ATEXIT: RealFn = RealFn::new(c"__cxa_atexit");
#[link_section = ".ia2shim_sealed"]
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
    // The registering code's rights: the most its handler may get.
    let pkru = match runtime::active() {
        Some(_) => u64::from(pku::read_pkru()),
        None => NO_PKRU,
    };
    let Some(rec) = new_record(func, arg as usize, dso as usize, pkru) else {
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

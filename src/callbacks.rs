//! Callbacks that libc and ld.so run on a compartment's behalf run with
//! their own compartment's rights, never libc's: the shim interposes the
//! functions that take them, runs the real function with the loader's or
//! libc's rights added (`with_libc_rights`, strict mode) and hands it a
//! trampoline that switches to the callback's rights for each call.
//!
//! - `qsort`, `qsort_r`: glibc's merge sort keeps `phys_pages` in libc's
//!   `.bss` (libc-compartment data in strict mode); comparators run with
//!   the comparator's compartment's rights (application code), else the
//!   caller's.
//! - `dl_iterate_phdr`: takes ld.so's `dl_load_write_lock` and walks the
//!   link maps on the loader heap; the callback runs with the caller's
//!   rights (or its own compartment's).
//! - `std::set_terminate`, `std::set_unexpected`: libstdc++ calls the
//!   terminate handler after a failed search with the thrower's rights,
//!   which in strict mode include the libc compartment's key (the throw
//!   went through a union gate into libstdc++), and a handler registered by
//!   one compartment runs when another throws. libstdc++ keeps a stub that
//!   runs the handler with the rights decided at registration (the deputy
//!   rule of `crate::deputy`); `std::get_terminate` shows application code
//!   its own handler.
//!
//! The rights come from `exit::handler_pkru`: a callback that is
//! application code runs as its compartment, anything else with the
//! caller's PKRU. (Fork, exit and terminate handlers follow the deputy
//! rule of `crate::deputy`; a comparator does not, see README's threat
//! model.)

use crate::exit::{handler_pkru, with_pkru};
use crate::objects::ObjectKind;
use crate::pku;
use crate::real::RealFn;
use crate::runtime::{self, Runtime};
use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[link_section = ".ia2shim_sealed"]
static QSORT_R: RealFn = RealFn::new(c"qsort_r");
#[link_section = ".ia2shim_sealed"]
static DL_ITERATE_PHDR: RealFn = RealFn::new(c"dl_iterate_phdr");

/// Resolve the real functions (the fault path must not call `dlsym`).
pub fn resolve() {
    QSORT_R.get();
    DL_ITERATE_PHDR.get();
}

/// glibc's `dl_iterate_phdr`, bypassing the hook (the callback sees the
/// loader's own names).
///
/// # Safety
/// As `dl_iterate_phdr(3)`.
pub unsafe fn real_dl_iterate_phdr(cb: PhdrCb, data: *mut c_void) -> c_int {
    // SAFETY: the slot holds glibc's dl_iterate_phdr.
    let real: DlIteratePhdr =
        unsafe { core::mem::transmute::<usize, DlIteratePhdr>(DL_ITERATE_PHDR.get()) };
    // SAFETY: forwarded.
    unsafe { real(cb, data) }
}

/// The rights a callback runs with: its compartment's (application code)
/// or the caller's.
fn callback_pkru(cb: usize, caller_pkru: u32) -> u32 {
    if crate::exit::is_shim_code(cb) {
        return caller_pkru;
    }
    // Not the deputy rule: a library that hands the program its internal
    // comparator expects it to run as the library (`tests/libc.rs`).
    handler_pkru(cb, 0, None).unwrap_or(caller_pkru)
}

type Cmp = unsafe extern "C" fn(*const c_void, *const c_void) -> c_int;
type CmpR = unsafe extern "C" fn(*const c_void, *const c_void, *mut c_void) -> c_int;
type QsortR = unsafe extern "C" fn(*mut c_void, usize, usize, CmpR, *mut c_void);

#[repr(C)]
struct SortCtx {
    cmp: usize,
    arg: *mut c_void,
    pkru: u32,
    with_arg: bool,
}

unsafe extern "C" fn sort_tramp(a: *const c_void, b: *const c_void, ctx: *mut c_void) -> c_int {
    // SAFETY: the context `qsort_r` below passes back.
    let c = unsafe { &*(ctx as *const SortCtx) };
    with_pkru(Some(c.pkru), || {
        if c.with_arg {
            // SAFETY: the program's three-argument comparator.
            unsafe { core::mem::transmute::<usize, CmpR>(c.cmp)(a, b, c.arg) }
        } else {
            // SAFETY: the program's two-argument comparator.
            unsafe { core::mem::transmute::<usize, Cmp>(c.cmp)(a, b) }
        }
    })
}

/// `qsort` and `qsort_r` (`arg` is `None` for `qsort`).
///
/// # Safety
/// As `qsort(3)`.
pub unsafe fn qsort(
    base: *mut c_void,
    n: usize,
    size: usize,
    cmp: usize,
    arg: Option<*mut c_void>,
) {
    // SAFETY: the slot holds glibc's qsort_r.
    let real: QsortR = unsafe { core::mem::transmute::<usize, QsortR>(QSORT_R.get()) };
    let caller = pku::read_pkru();
    let strict = runtime::active().is_some_and(|rt| rt.config.libc_compartment.is_some());
    let pkru = if runtime::active().is_some() {
        callback_pkru(cmp, caller)
    } else {
        caller
    };
    if !strict && pkru == caller {
        let (f, a) = match arg {
            // SAFETY: a three-argument comparator, as qsort_r takes.
            Some(a) => (unsafe { core::mem::transmute::<usize, CmpR>(cmp) }, a),
            None => {
                let ctx = SortCtx {
                    cmp,
                    arg: core::ptr::null_mut(),
                    pkru,
                    with_arg: false,
                };
                // SAFETY: forwarded, with our trampoline and context.
                unsafe {
                    real(
                        base,
                        n,
                        size,
                        sort_tramp,
                        &ctx as *const SortCtx as *mut c_void,
                    )
                };
                return;
            }
        };
        // SAFETY: forwarded.
        unsafe { real(base, n, size, f, a) };
        return;
    }
    let ctx = SortCtx {
        cmp,
        arg: arg.unwrap_or(core::ptr::null_mut()),
        pkru,
        with_arg: arg.is_some(),
    };
    // SAFETY: forwarded, with our trampoline and context.
    runtime::with_libc_rights(|| unsafe {
        real(
            base,
            n,
            size,
            sort_tramp,
            &ctx as *const SortCtx as *mut c_void,
        )
    });
}

pub type PhdrCb = unsafe extern "C" fn(*mut libc::dl_phdr_info, usize, *mut c_void) -> c_int;
type DlIteratePhdr = unsafe extern "C" fn(PhdrCb, *mut c_void) -> c_int;

#[repr(C)]
struct PhdrCtx {
    cb: usize,
    data: *mut c_void,
    pkru: u32,
}

unsafe extern "C" fn phdr_tramp(
    info: *mut libc::dl_phdr_info,
    size: usize,
    ctx: *mut c_void,
) -> c_int {
    // SAFETY: the context `dl_iterate_phdr` below passes back.
    let c = unsafe { &*(ctx as *const PhdrCtx) };
    // The callback gets a copy whose name is the shim's shared copy (the
    // loader's is libc-compartment data).
    // SAFETY: glibc's info, `size` bytes of it (at most the struct).
    let mut copy: libc::dl_phdr_info = unsafe { core::mem::zeroed() };
    let n = size.min(core::mem::size_of::<libc::dl_phdr_info>());
    // SAFETY: both hold at least `n` bytes.
    unsafe {
        core::ptr::copy_nonoverlapping(
            info as *const u8,
            (&mut copy as *mut libc::dl_phdr_info).cast::<u8>(),
            n,
        )
    };
    copy.dlpi_name = crate::dl::shared_name(copy.dlpi_name);
    // SAFETY: the program's callback with glibc's arguments.
    with_pkru(Some(c.pkru), || unsafe {
        core::mem::transmute::<usize, PhdrCb>(c.cb)(&mut copy, n, c.data)
    })
}

/// `dl_iterate_phdr` with the loader's rights; the callback with the
/// caller's (or its own compartment's).
///
/// # Safety
/// As `dl_iterate_phdr(3)`.
pub unsafe fn dl_iterate_phdr(cb: usize, data: *mut c_void) -> c_int {
    // SAFETY: the slot holds glibc's dl_iterate_phdr.
    let real: DlIteratePhdr =
        unsafe { core::mem::transmute::<usize, DlIteratePhdr>(DL_ITERATE_PHDR.get()) };
    let Some(rt) = runtime::active() else {
        // SAFETY: forwarded.
        return unsafe { real(core::mem::transmute::<usize, PhdrCb>(cb), data) };
    };
    let caller = pku::read_pkru();
    let pkru = callback_pkru(cb, caller);
    if rt.config.libc_compartment.is_none() && pkru == caller {
        // SAFETY: forwarded.
        return unsafe { real(core::mem::transmute::<usize, PhdrCb>(cb), data) };
    }
    let ctx = PhdrCtx { cb, data, pkru };
    // SAFETY: forwarded, with our trampoline and context.
    runtime::with_libc_rights(|| unsafe { real(phdr_tramp, &ctx as *const PhdrCtx as *mut c_void) })
}

// ---------------------------------------------------------------- fork handlers

/// How many `pthread_atfork` handlers can be wrapped (three per call at
/// most); later ones are registered as they are, with a warning.
pub const ATFORK_SLOTS: usize = 96;

/// The wrapped fork handlers, on a page of their own that `IA2_HARDEN=on`
/// puts on the shim key: a compartment that rewrote an entry would pick the
/// function a stub runs and its rights (`tests/escapes.rs`, `atfork-table`).
#[repr(C, align(4096))]
struct Atfork {
    func: [AtomicUsize; ATFORK_SLOTS],
    /// Each handler's PKRU, decided at registration (`NO_PKRU`: keep
    /// fork's rights): during a fork the shim's own prepare handler holds
    /// the census lock, so the handlers must not ask the census then.
    pkru: [AtomicU64; ATFORK_SLOTS],
    /// The registrants of the UNDECIDED handlers.
    dso: [AtomicUsize; ATFORK_SLOTS],
    /// Slots handed out (past `ATFORK_SLOTS`, handlers are registered
    /// unwrapped: so it is protected too).
    next: AtomicUsize,
}
static ATFORK: Atfork = Atfork {
    func: [const { AtomicUsize::new(0) }; ATFORK_SLOTS],
    pkru: [const { AtomicU64::new(NO_PKRU) }; ATFORK_SLOTS],
    dso: [const { AtomicUsize::new(0) }; ATFORK_SLOTS],
    next: AtomicUsize::new(0),
};
const _: () = assert!(core::mem::size_of::<Atfork>() == 4096);
const NO_PKRU: u64 = u64::MAX;
/// Registered before the shim was ready (a library constructor): decided
/// by [`decide_pending`] at the end of start-up.
const UNDECIDED: u64 = u64::MAX - 1;

/// Decide the rights of the fork handlers (and C++ terminate and
/// unexpected handlers) registered before the shim was ready (start-up,
/// once the census exists).
pub fn decide_pending() {
    for i in 0..ATFORK_SLOTS.min(ATFORK.next.load(Ordering::Acquire)) {
        if ATFORK.pkru[i].load(Ordering::Acquire) == UNDECIDED {
            let f = ATFORK.func[i].load(Ordering::Acquire);
            let p = handler_pkru(f, ATFORK.dso[i].load(Ordering::Acquire), None);
            pku::with_shim_writes(|| {
                ATFORK.pkru[i].store(p.map_or(NO_PKRU, u64::from), Ordering::Release)
            });
        }
    }
    decide_pending_cxx();
}

// Handlers take no argument, so each wrapped one gets a stub of its own:
// stub i puts i in edi and jumps to `atfork_dispatch`.
#[cfg(not(test))]
core::arch::global_asm!(
    ".pushsection .text.ia2shim_atfork_stubs,\"ax\",@progbits",
    ".p2align 4",
    ".globl ia2shim_atfork_stubs",
    ".hidden ia2shim_atfork_stubs",
    "ia2shim_atfork_stubs:",
    ".set ia2shim_atfork_i, 0",
    ".rept {n}",
    "mov edi, ia2shim_atfork_i",
    "jmp {dispatch}",
    ".p2align 4",
    ".set ia2shim_atfork_i, ia2shim_atfork_i + 1",
    ".endr",
    ".popsection",
    n = const ATFORK_SLOTS,
    dispatch = sym atfork_dispatch,
);

#[cfg(not(test))]
extern "C" {
    fn ia2shim_atfork_stubs();
}

#[cfg_attr(test, allow(dead_code))]
extern "C" fn atfork_dispatch(i: u32) {
    let i = i as usize;
    let f = ATFORK.func[i].load(Ordering::Acquire);
    if f == 0 {
        return;
    }
    let pkru = match ATFORK.pkru[i].load(Ordering::Acquire) {
        NO_PKRU | UNDECIDED => None,
        p => Some(p as u32),
    };
    // SAFETY: the handler the program registered.
    with_pkru(pkru, || unsafe {
        core::mem::transmute::<usize, extern "C" fn()>(f)()
    });
}

/// A stub that runs `f` (registered by the object of `dso`) in its
/// compartment, or `f` itself when none is left.
#[cfg(not(test))]
fn atfork_stub(f: usize, dso: usize) -> usize {
    // The shim's own handlers (which take its locks for the fork) run as
    // registered: a stub would ask the census for their rights while the
    // shim's prepare handler holds its lock.
    let own = atfork_stub as *const () as usize;
    // SAFETY: zeroed Dl_info is valid for dladdr to fill.
    let mut a: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: zeroed Dl_info is valid for dladdr to fill.
    let mut b: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: dladdr only reads loader data.
    let same = unsafe {
        libc::dladdr(f as *const c_void, &mut a) != 0
            && libc::dladdr(own as *const c_void, &mut b) != 0
            && a.dli_fbase == b.dli_fbase
    };
    if f == 0 || same {
        return f;
    }
    let i = pku::with_shim_writes(|| ATFORK.next.fetch_add(1, Ordering::AcqRel));
    if i >= ATFORK_SLOTS {
        log::warn!(
            "pthread_atfork: more than {ATFORK_SLOTS} handlers; {f:#x} runs with fork's rights"
        );
        return f;
    }
    let pkru = if runtime::active().is_some() {
        handler_pkru(f, dso, Some(pku::read_pkru())).map_or(NO_PKRU, u64::from)
    } else {
        UNDECIDED
    };
    pku::with_shim_writes(|| {
        ATFORK.dso[i].store(dso, Ordering::Release);
        ATFORK.pkru[i].store(pkru, Ordering::Release);
        ATFORK.func[i].store(f, Ordering::Release);
    });
    ia2shim_atfork_stubs as *const () as usize + 16 * i
}

#[cfg_attr(test, allow(dead_code))]
type RegisterAtfork = unsafe extern "C" fn(usize, usize, usize, *mut c_void) -> c_int;

/// `__register_atfork(prepare, parent, child, dso)` (what
/// `pthread_atfork` calls): each handler through a stub that runs it in its
/// compartment (fork runs them with the caller's rights plus libc's).
///
/// # Safety
/// As `pthread_atfork(3)`.
#[cfg(not(test))]
pub unsafe fn register_atfork(
    prepare: usize,
    parent: usize,
    child: usize,
    dso: *mut c_void,
) -> c_int {
    // SAFETY: the slot holds glibc's __register_atfork.
    let real: RegisterAtfork = unsafe {
        core::mem::transmute::<usize, RegisterAtfork>(crate::real::REGISTER_ATFORK.get())
    };
    let d = dso as usize;
    // SAFETY: forwarded, each handler replaced by its stub.
    unsafe {
        real(
            atfork_stub(prepare, d),
            atfork_stub(parent, d),
            atfork_stub(child, d),
            dso,
        )
    }
}

// ------------------------------------------------- terminate and unexpected handlers

/// How many distinct (handler, rights) pairs `std::set_terminate` and
/// `std::set_unexpected` can wrap; one more is fatal (fail closed: the
/// handler would otherwise run with whatever rights `std::terminate` has).
pub const CXX_HANDLER_SLOTS: usize = 64;

/// The wrapped handlers, on a page of their own that `IA2_HARDEN=on` puts
/// on the shim key: a compartment that rewrote an entry would pick the
/// function a stub runs (another compartment's internal one) or its rights.
#[repr(C, align(4096))]
struct CxxHandlers {
    func: [AtomicUsize; CXX_HANDLER_SLOTS],
    /// The PKRU decided at registration (`NO_PKRU`: keep the caller's;
    /// `UNDECIDED`: registered before the shim was ready).
    pkru: [AtomicU64; CXX_HANDLER_SLOTS],
    used: AtomicUsize,
}
static CXX_HANDLERS: CxxHandlers = CxxHandlers {
    func: [const { AtomicUsize::new(0) }; CXX_HANDLER_SLOTS],
    pkru: [const { AtomicU64::new(NO_PKRU) }; CXX_HANDLER_SLOTS],
    used: AtomicUsize::new(0),
};
const _: () = assert!(core::mem::size_of::<CxxHandlers>() == 4096);

/// Put the handler table on the shim key (`IA2_HARDEN=on`, once the gates
/// have allocated it).
pub fn harden() {
    let key = pku::shim_key();
    if key == 0 {
        return;
    }
    pku::seal_static(&CXX_HANDLERS, key, "C++ handler table");
    pku::seal_static(&ATFORK, key, "fork handler table");
}

/// Which libstdc++ handler: `std::terminate`'s or `std::unexpected`'s.
#[derive(Clone, Copy)]
pub enum CxxHandler {
    Terminate,
    Unexpected,
}

#[cfg_attr(test, allow(dead_code))]
#[link_section = ".ia2shim_sealed"]
static SET_TERMINATE: RealFn = RealFn::new(c"_ZSt13set_terminatePFvvE");
#[cfg_attr(test, allow(dead_code))]
#[link_section = ".ia2shim_sealed"]
static GET_TERMINATE: RealFn = RealFn::new(c"_ZSt13get_terminatev");
#[cfg_attr(test, allow(dead_code))]
#[link_section = ".ia2shim_sealed"]
static SET_UNEXPECTED: RealFn = RealFn::new(c"_ZSt14set_unexpectedPFvvE");
#[cfg_attr(test, allow(dead_code))]
#[link_section = ".ia2shim_sealed"]
static GET_UNEXPECTED: RealFn = RealFn::new(c"_ZSt14get_unexpectedv");

// Stub i puts i in edi and jumps to `cxx_handler_dispatch` (handlers take
// no argument). Registered handlers are these stubs, so whatever calls the
// handler (`std::terminate` after a failed search, with the thrower's
// rights plus, in strict mode, the libc compartment's) goes through them.
#[cfg(not(test))]
core::arch::global_asm!(
    ".pushsection .text.ia2shim_cxx_handler_stubs,\"ax\",@progbits",
    ".p2align 4",
    ".globl ia2shim_cxx_handler_stubs",
    ".hidden ia2shim_cxx_handler_stubs",
    "ia2shim_cxx_handler_stubs:",
    ".set ia2shim_cxx_i, 0",
    ".rept {n}",
    "mov edi, ia2shim_cxx_i",
    "jmp {dispatch}",
    ".p2align 4",
    ".set ia2shim_cxx_i, ia2shim_cxx_i + 1",
    ".endr",
    ".popsection",
    n = const CXX_HANDLER_SLOTS,
    dispatch = sym cxx_handler_dispatch,
);

#[cfg(not(test))]
extern "C" {
    fn ia2shim_cxx_handler_stubs();
}

#[cfg(not(test))]
fn cxx_stubs() -> usize {
    ia2shim_cxx_handler_stubs as *const () as usize
}
#[cfg(test)]
fn cxx_stubs() -> usize {
    0
}

// "C-unwind": a handler may throw (libstdc++'s `__terminate` catches it).
#[cfg_attr(test, allow(dead_code))]
extern "C-unwind" fn cxx_handler_dispatch(i: u32) {
    let i = i as usize;
    let f = CXX_HANDLERS.func[i].load(Ordering::Acquire);
    let pkru = match CXX_HANDLERS.pkru[i].load(Ordering::Acquire) {
        NO_PKRU | UNDECIDED => None,
        p => Some(p as u32),
    };
    // Handlers usually end the process (`[[noreturn]]`): nothing here
    // relies on the call returning; if it does, libstdc++ aborts.
    // SAFETY: the handler the program registered (a stub is handed out
    // only once its slot holds it).
    with_pkru(pkru, || unsafe {
        core::mem::transmute::<usize, unsafe extern "C-unwind" fn()>(f)()
    });
}

/// The program's handler behind `addr` if it is one of the stubs, else `addr`.
pub fn unwrap_cxx_handler(addr: usize) -> usize {
    let base = cxx_stubs();
    let off = addr.wrapping_sub(base);
    if base == 0 || off >= 16 * CXX_HANDLER_SLOTS || off % 16 != 0 {
        return addr;
    }
    match CXX_HANDLERS.func[off / 16].load(Ordering::Acquire) {
        0 => addr,
        f => f,
    }
}

/// The rights handler `f`, registered by code running with `registrant`,
/// runs with: application code by the deputy rule (its compartment's if
/// the registrant could have entered it, else the registrant's); system
/// code with the registrant's, plus the libc compartment's key when the
/// code is in it (strict mode), as a union gate from the registrant gives.
fn cxx_handler_pkru(rt: &Runtime, f: usize, registrant: u32) -> u32 {
    let owner = rt
        .census
        .read()
        .ok()
        .and_then(|c| c.object_at(f).map(|(i, o)| (c.compartment_of[i], o.kind)));
    match owner {
        Some((Some(_), ObjectKind::Main | ObjectKind::Application)) => {
            crate::deputy::entry_pkru(rt, f, registrant)
        }
        Some((Some(c), _)) if rt.config.libc_compartment == Some(c) => {
            registrant & !(3 << (2 * rt.key_of(c)))
        }
        _ => registrant,
    }
}

/// The stub that runs handler `f` with the rights decided for it now (the
/// caller is the registrant). A stub passed back is unwrapped first, so the
/// decision is always the current registrant's.
#[cfg_attr(test, allow(dead_code))]
fn wrap_cxx_handler(f: usize) -> usize {
    let f = unwrap_cxx_handler(f);
    if f == 0 || cxx_stubs() == 0 {
        return f;
    }
    let pkru = match runtime::active() {
        Some(rt) => u64::from(cxx_handler_pkru(rt, f, pku::read_pkru())),
        None => UNDECIDED,
    };
    let t = &CXX_HANDLERS;
    let used = t.used.load(Ordering::Acquire).min(CXX_HANDLER_SLOTS);
    // Programs that register the same handler again (or save and restore
    // one) reuse its stub.
    if let Some(i) = (0..used).find(|&i| {
        t.func[i].load(Ordering::Acquire) == f && t.pkru[i].load(Ordering::Acquire) == pkru
    }) {
        return cxx_stubs() + 16 * i;
    }
    let i = pku::with_shim_writes(|| t.used.fetch_add(1, Ordering::AcqRel));
    if i >= CXX_HANDLER_SLOTS {
        crate::lifecycle::fatal(format_args!(
            "std::set_terminate/std::set_unexpected: more than {CXX_HANDLER_SLOTS} distinct \
             handlers; {f:#x} cannot be run with its compartment's rights"
        ));
    }
    pku::with_shim_writes(|| {
        t.pkru[i].store(pkru, Ordering::Release);
        t.func[i].store(f, Ordering::Release);
    });
    cxx_stubs() + 16 * i
}

/// Decide the rights of the handlers registered before the shim was ready
/// (the registrant is unknown then: application code runs as its
/// compartment, anything else with the caller's rights).
fn decide_pending_cxx() {
    let t = &CXX_HANDLERS;
    for i in 0..t.used.load(Ordering::Acquire).min(CXX_HANDLER_SLOTS) {
        if t.pkru[i].load(Ordering::Acquire) == UNDECIDED {
            let p = handler_pkru(t.func[i].load(Ordering::Acquire), 0, None);
            pku::with_shim_writes(|| {
                t.pkru[i].store(p.map_or(NO_PKRU, u64::from), Ordering::Release)
            });
        }
    }
}

#[cfg_attr(test, allow(dead_code))]
type SetHandler = unsafe extern "C" fn(usize) -> usize;
#[cfg_attr(test, allow(dead_code))]
type GetHandler = unsafe extern "C" fn() -> usize;

#[cfg_attr(test, allow(dead_code))]
fn cxx_slots(which: CxxHandler) -> (&'static RealFn, &'static RealFn) {
    match which {
        CxxHandler::Terminate => (&SET_TERMINATE, &GET_TERMINATE),
        CxxHandler::Unexpected => (&SET_UNEXPECTED, &GET_UNEXPECTED),
    }
}

/// `std::set_terminate(h)` / `std::set_unexpected(h)`: libstdc++ keeps a
/// stub that runs `h` with its rights; the previous handler is returned as
/// the program registered it.
///
/// # Safety
/// As `std::set_terminate`; `h` is a handler or null.
#[cfg(not(test))]
pub unsafe fn set_cxx_handler(which: CxxHandler, h: usize) -> usize {
    let (set, _) = cxx_slots(which);
    // SAFETY: the slot holds libstdc++'s function of this type.
    let real = unsafe { core::mem::transmute::<usize, SetHandler>(set.get()) };
    let stub = wrap_cxx_handler(h);
    // libstdc++'s handler word is libc-compartment data in strict mode.
    // SAFETY: forwarded, with the stub for the handler.
    let prev = runtime::with_libc_rights(|| unsafe { real(stub) });
    unwrap_cxx_handler(prev)
}

/// `std::get_terminate()` / `std::get_unexpected()` called from `caller`:
/// application code gets the handler it registered (pointers compare
/// equal); libstdc++ itself, which calls what it gets (`std::terminate`,
/// `__cxa_throw`), and other system code get the stub.
///
/// # Safety
/// As `std::get_terminate`.
#[cfg(not(test))]
pub unsafe fn get_cxx_handler(which: CxxHandler, caller: usize) -> usize {
    let (_, get) = cxx_slots(which);
    // SAFETY: the slot holds libstdc++'s function of this type.
    let real = unsafe { core::mem::transmute::<usize, GetHandler>(get.get()) };
    // SAFETY: forwarded.
    let raw = runtime::with_libc_rights(|| unsafe { real() });
    let own = unwrap_cxx_handler(raw);
    if own == raw {
        return raw;
    }
    let app = runtime::active().is_some_and(|rt| {
        rt.census.read().is_ok_and(|c| {
            c.object_at(caller)
                .is_some_and(|(_, o)| matches!(o.kind, ObjectKind::Main | ObjectKind::Application))
        })
    });
    if app {
        own
    } else {
        raw
    }
}

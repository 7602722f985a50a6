//! The real libc functions behind our interposed symbols, resolved once with
//! `dlsym(RTLD_NEXT)` into atomics. A hook that runs before the constructor
//! resolves its own slot on first use. A null result is fatal: there is no
//! silent fallback that could bypass the protection.

use core::ffi::{c_int, c_void, CStr};
use core::sync::atomic::{AtomicUsize, Ordering};

pub struct RealFn {
    name: &'static CStr,
    addr: AtomicUsize,
}

impl RealFn {
    /// A slot for `name`, resolved on first use (features declare their own).
    pub const fn new(name: &'static CStr) -> Self {
        Self {
            name,
            addr: AtomicUsize::new(0),
        }
    }

    /// The real function's address; resolves it on first use.
    pub fn get(&self) -> usize {
        match self.addr.load(Ordering::Acquire) {
            0 => self.resolve(),
            a => a,
        }
    }

    /// The real function, or `fallback` while no object after the shim
    /// defines it (not kept: one loaded later is found on a later call).
    pub fn get_or(&self, fallback: usize) -> usize {
        match self.addr.load(Ordering::Acquire) {
            0 => self.try_resolve().unwrap_or(fallback),
            a => a,
        }
    }

    fn resolve(&self) -> usize {
        self.try_resolve().unwrap_or_else(|| {
            crate::lifecycle::fatal(format_args!(
                "dlsym(RTLD_NEXT, \"{}\") returned NULL: cannot find the real function",
                self.name.to_str().unwrap_or("?")
            ))
        })
    }

    fn try_resolve(&self) -> Option<usize> {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
        let a = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) } as usize;
        if a == 0 {
            return None;
        }
        // The slot is in the sealed section (on the shim key once hardened).
        crate::pku::with_shim_writes(|| self.addr.store(a, Ordering::Release));
        Some(a)
    }

    pub fn name(&self) -> &'static str {
        self.name.to_str().unwrap_or("?")
    }
}

#[link_section = ".ia2shim_sealed"]
pub static LIBC_START_MAIN: RealFn = RealFn::new(c"__libc_start_main");
#[link_section = ".ia2shim_sealed"]
pub static SIGACTION: RealFn = RealFn::new(c"sigaction");
#[link_section = ".ia2shim_sealed"]
pub static SIGNAL: RealFn = RealFn::new(c"signal");
#[link_section = ".ia2shim_sealed"]
pub static DLOPEN: RealFn = RealFn::new(c"dlopen");
#[link_section = ".ia2shim_sealed"]
pub static DLCLOSE: RealFn = RealFn::new(c"dlclose");
#[link_section = ".ia2shim_sealed"]
pub static PTHREAD_CREATE: RealFn = RealFn::new(c"pthread_create");
#[link_section = ".ia2shim_sealed"]
pub static FORK: RealFn = RealFn::new(c"fork");
// The other ways to install a handler, resolved on first use (only while
// the shim is not active do the hooks call them).
#[link_section = ".ia2shim_sealed"]
pub static BSD_SIGNAL: RealFn = RealFn::new(c"bsd_signal");
#[link_section = ".ia2shim_sealed"]
pub static SSIGNAL: RealFn = RealFn::new(c"ssignal");
#[link_section = ".ia2shim_sealed"]
pub static SYSV_SIGNAL: RealFn = RealFn::new(c"sysv_signal");
#[link_section = ".ia2shim_sealed"]
pub static SYSV_SIGNAL_INTERNAL: RealFn = RealFn::new(c"__sysv_signal");
#[link_section = ".ia2shim_sealed"]
pub static SIGSET: RealFn = RealFn::new(c"sigset");
#[link_section = ".ia2shim_sealed"]
pub static REGISTER_CANCEL: RealFn = RealFn::new(c"__pthread_register_cancel");
#[link_section = ".ia2shim_sealed"]
pub static UNREGISTER_CANCEL: RealFn = RealFn::new(c"__pthread_unregister_cancel");
// libc's protection-key API (see `crate::keyguard`).
#[link_section = ".ia2shim_sealed"]
pub static PKEY_SET: RealFn = RealFn::new(c"pkey_set");
#[link_section = ".ia2shim_sealed"]
pub static PKEY_GET: RealFn = RealFn::new(c"pkey_get");
#[link_section = ".ia2shim_sealed"]
pub static PKEY_ALLOC: RealFn = RealFn::new(c"pkey_alloc");
#[link_section = ".ia2shim_sealed"]
pub static PKEY_FREE: RealFn = RealFn::new(c"pkey_free");
#[link_section = ".ia2shim_sealed"]
pub static PKEY_MPROTECT: RealFn = RealFn::new(c"pkey_mprotect");
// SIGEV_THREAD notifications (see `crate::threads::wrap_sigevent`).
#[link_section = ".ia2shim_sealed"]
pub static TIMER_CREATE: RealFn = RealFn::new(c"timer_create");
#[link_section = ".ia2shim_sealed"]
pub static MQ_NOTIFY: RealFn = RealFn::new(c"mq_notify");
// The same for asynchronous I/O and name lookup (`aiocb`s and a `sigevent`);
// resolved on first use (older glibc keeps them in librt and libanl).
#[link_section = ".ia2shim_sealed"]
pub static AIO_READ: RealFn = RealFn::new(c"aio_read");
#[link_section = ".ia2shim_sealed"]
pub static AIO_READ64: RealFn = RealFn::new(c"aio_read64");
#[link_section = ".ia2shim_sealed"]
pub static AIO_WRITE: RealFn = RealFn::new(c"aio_write");
#[link_section = ".ia2shim_sealed"]
pub static AIO_WRITE64: RealFn = RealFn::new(c"aio_write64");
#[link_section = ".ia2shim_sealed"]
pub static AIO_FSYNC: RealFn = RealFn::new(c"aio_fsync");
#[link_section = ".ia2shim_sealed"]
pub static AIO_FSYNC64: RealFn = RealFn::new(c"aio_fsync64");
#[link_section = ".ia2shim_sealed"]
pub static LIO_LISTIO: RealFn = RealFn::new(c"lio_listio");
#[link_section = ".ia2shim_sealed"]
pub static LIO_LISTIO64: RealFn = RealFn::new(c"lio_listio64");
#[link_section = ".ia2shim_sealed"]
pub static GETADDRINFO_A: RealFn = RealFn::new(c"getaddrinfo_a");
/// libc's `madvise`, `mprotect` and `munmap` entries, redirected to the
/// shim's check (`crate::keyguard`).
#[link_section = ".ia2shim_sealed"]
pub static MADVISE: RealFn = RealFn::new(c"madvise");
#[link_section = ".ia2shim_sealed"]
pub static MPROTECT: RealFn = RealFn::new(c"mprotect");
#[link_section = ".ia2shim_sealed"]
pub static MUNMAP: RealFn = RealFn::new(c"munmap");
// Signal masks (see `crate::syscalls::unblockable`).
#[link_section = ".ia2shim_sealed"]
pub static SIGPROCMASK: RealFn = RealFn::new(c"sigprocmask");
#[link_section = ".ia2shim_sealed"]
pub static PTHREAD_SIGMASK: RealFn = RealFn::new(c"pthread_sigmask");

// The malloc family (see `crate::alloc`). glibc exports its allocator under
// internal names too; the hooks call those directly, because `dlsym` itself
// calls malloc and calloc and would recurse into hooks that have no real
// function yet. The rest have no such alias and are resolved as usual
// (dlsym never calls them).
extern "C" {
    pub fn __libc_malloc(size: usize) -> *mut c_void;
    pub fn __libc_free(p: *mut c_void);
    pub fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    pub fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void;
    pub fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
    pub fn __libc_valloc(size: usize) -> *mut c_void;
    pub fn __libc_pvalloc(size: usize) -> *mut c_void;
}
#[link_section = ".ia2shim_sealed"]
pub static POSIX_MEMALIGN: RealFn = RealFn::new(c"posix_memalign");
#[link_section = ".ia2shim_sealed"]
pub static ALIGNED_ALLOC: RealFn = RealFn::new(c"aligned_alloc");
#[link_section = ".ia2shim_sealed"]
pub static MALLOC_USABLE_SIZE: RealFn = RealFn::new(c"malloc_usable_size");

/// glibc's `posix_memalign`.
///
/// # Safety
/// As `posix_memalign(3)`.
pub unsafe fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> core::ffi::c_int {
    // SAFETY: the slot holds glibc's posix_memalign.
    let f: unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> core::ffi::c_int =
        unsafe { as_fn(&POSIX_MEMALIGN) };
    // SAFETY: forwarded contract.
    unsafe { f(out, align, size) }
}

/// glibc's `aligned_alloc`.
///
/// # Safety
/// As `aligned_alloc(3)`.
pub unsafe fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    // SAFETY: the slot holds glibc's aligned_alloc.
    let f: unsafe extern "C" fn(usize, usize) -> *mut c_void = unsafe { as_fn(&ALIGNED_ALLOC) };
    // SAFETY: forwarded contract.
    unsafe { f(align, size) }
}

/// glibc's `malloc_usable_size`.
///
/// # Safety
/// As `malloc_usable_size(3)`: `p` is null or a live glibc block.
pub unsafe fn malloc_usable_size(p: *mut c_void) -> usize {
    // SAFETY: the slot holds glibc's malloc_usable_size.
    let f: unsafe extern "C" fn(*mut c_void) -> usize = unsafe { as_fn(&MALLOC_USABLE_SIZE) };
    // SAFETY: forwarded contract.
    unsafe { f(p) }
}

/// Every slot, resolved together by the constructor.
pub static ALL: &[&RealFn] = &[
    &LIBC_START_MAIN,
    &SIGACTION,
    &SIGNAL,
    &DLOPEN,
    &DLCLOSE,
    &PTHREAD_CREATE,
    &FORK,
    &PKEY_SET,
    &MADVISE,
    &MPROTECT,
    &MUNMAP,
    &PKEY_GET,
    &PKEY_ALLOC,
    &PKEY_FREE,
    &PKEY_MPROTECT,
    &SIGPROCMASK,
    &PTHREAD_SIGMASK,
    &POSIX_MEMALIGN,
    &ALIGNED_ALLOC,
    &MALLOC_USABLE_SIZE,
];

/// glibc's `__register_atfork`, which `pthread_atfork` calls.
#[link_section = ".ia2shim_sealed"]
pub static REGISTER_ATFORK: RealFn = RealFn::new(c"__register_atfork");

/// Register the shim's own fork handlers with glibc directly: through
/// `pthread_atfork` they would reach the shim's `__register_atfork` hook,
/// which asks `dladdr` (twice per handler, about 7 k instructions each)
/// whether they are the shim's. No DSO handle: the shim is never unloaded.
/// Returns glibc's result (0 or an errno).
pub fn own_atfork(
    prepare: unsafe extern "C" fn(),
    parent: unsafe extern "C" fn(),
    child: unsafe extern "C" fn(),
) -> c_int {
    type F = unsafe extern "C" fn(usize, usize, usize, *mut c_void) -> c_int;
    // SAFETY: the slot holds glibc's __register_atfork.
    let real: F = unsafe { as_fn(&REGISTER_ATFORK) };
    // SAFETY: plain functions of the shim that never unwind.
    unsafe {
        real(
            prepare as usize,
            parent as usize,
            child as usize,
            core::ptr::null_mut(),
        )
    }
}

pub fn resolve_all() {
    for f in ALL {
        f.get();
    }
}

/// Cast helper: the resolved address as a function pointer of type `F`.
///
/// # Safety
/// `F` must be the real function's exact type.
pub unsafe fn as_fn<F: Copy>(f: &RealFn) -> F {
    let a = f.get();
    debug_assert_eq!(
        core::mem::size_of::<F>(),
        core::mem::size_of::<*const c_void>()
    );
    // SAFETY: the caller guarantees F is the function's type; a is non-null.
    unsafe { core::mem::transmute_copy::<usize, F>(&a) }
}

type SigactionFn = unsafe extern "C" fn(
    core::ffi::c_int,
    *const libc::sigaction,
    *mut libc::sigaction,
) -> core::ffi::c_int;

/// The real `sigaction`, for the shim's own handlers.
///
/// # Safety
/// As `sigaction(2)`.
pub unsafe fn sigaction(
    sig: core::ffi::c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> core::ffi::c_int {
    // SAFETY: the slot holds glibc's sigaction.
    let f: SigactionFn = unsafe { as_fn(&SIGACTION) };
    // SAFETY: forwarded contract.
    unsafe { f(sig, act, old) }
}

/// glibc's `dlsym`, found with `dlvsym` (which the shim does not
/// interpose), so that resolving it never recurses into the `dlsym` hook.
#[link_section = ".ia2shim_sealed"]
pub static REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);

pub fn real_dlsym() -> usize {
    let a = REAL_DLSYM.load(Ordering::Acquire);
    if a != 0 {
        return a;
    }
    for version in [c"GLIBC_2.34", c"GLIBC_2.2.5"] {
        // SAFETY: dlvsym with RTLD_NEXT and NUL-terminated strings.
        let f =
            unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr()) } as usize;
        if f != 0 {
            crate::pku::with_shim_writes(|| REAL_DLSYM.store(f, Ordering::Release));
            return f;
        }
    }
    crate::lifecycle::fatal(format_args!("dlvsym(RTLD_NEXT, \"dlsym\") found no dlsym"))
}

/// glibc's `dlsym(handle, name)` asked by the shim's own code, past the
/// shim's `dlsym` hook: glibc sees the shim as the caller, as the hook
/// would arrange with a return gadget it first searches for (a
/// `dl_iterate_phdr` walk per call). For callers that hold every key
/// (the constructor, binding with all keys open), where the hook's added
/// libc rights change nothing.
///
/// # Safety
/// `handle` is `RTLD_DEFAULT`, `RTLD_NEXT` or a handle `dlopen` returned.
pub unsafe fn dlsym_past_hook(handle: *mut c_void, name: &CStr) -> usize {
    type DlsymFn = unsafe extern "C" fn(*mut c_void, *const libc::c_char) -> *mut c_void;
    // SAFETY: the slot holds glibc's dlsym.
    let dlsym: DlsymFn = unsafe { core::mem::transmute::<usize, DlsymFn>(real_dlsym()) };
    // SAFETY: the caller's handle and a NUL-terminated name.
    unsafe { dlsym(handle, name.as_ptr()) as usize }
}

/// `dlsym(RTLD_DEFAULT, name)` from start-up code ([`dlsym_past_hook`]).
pub fn global_symbol(name: &CStr) -> Option<usize> {
    // SAFETY: RTLD_DEFAULT.
    let a = unsafe { dlsym_past_hook(libc::RTLD_DEFAULT, name) };
    (a != 0).then_some(a)
}

//! The real libc functions behind our interposed symbols, resolved once with
//! `dlsym(RTLD_NEXT)` into atomics. A hook that runs before the constructor
//! resolves its own slot on first use. A null result is fatal: there is no
//! silent fallback that could bypass the protection.

use core::ffi::{c_void, CStr};
use core::sync::atomic::{AtomicUsize, Ordering};

pub struct RealFn {
    name: &'static CStr,
    addr: AtomicUsize,
}

impl RealFn {
    const fn new(name: &'static CStr) -> Self {
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

    fn resolve(&self) -> usize {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
        let a = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) } as usize;
        if a == 0 {
            crate::runtime::fatal(format_args!(
                "dlsym(RTLD_NEXT, \"{}\") returned NULL: cannot find the real function",
                self.name.to_str().unwrap_or("?")
            ));
        }
        self.addr.store(a, Ordering::Release);
        a
    }

    pub fn name(&self) -> &'static str {
        self.name.to_str().unwrap_or("?")
    }
}

pub static LIBC_START_MAIN: RealFn = RealFn::new(c"__libc_start_main");
pub static SIGACTION: RealFn = RealFn::new(c"sigaction");
pub static SIGNAL: RealFn = RealFn::new(c"signal");

/// Every slot, resolved together by the constructor.
pub static ALL: &[&RealFn] = &[&LIBC_START_MAIN, &SIGACTION, &SIGNAL];

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

//! libc's protection-key API, guarded. glibc exports `pkey_set` (a WRPKRU in
//! shared code, which the WRPKRU scanner does not look at), `pkey_free` and
//! `pkey_mprotect`: with them any compartment could give itself another
//! compartment's key, free a compartment's key and allocate it again (the
//! kernel grants the allocating thread access), or move another
//! compartment's pages to a key it holds. The shim exports the same names;
//! a call that touches a key the shim allocated, or pages the plan tagged,
//! is refused with `EPERM` and one warning line. Calls about the program's
//! own keys go to libc. The shim's own key operations use raw syscalls
//! (`crate::pku`), never these. The same calls made as raw syscalls are the
//! syscall filter's business (`crate::syscalls`).

use crate::real::{self, RealFn};
use crate::runtime::{self, Runtime};
use core::ffi::{c_int, c_uint, c_void};

/// Is `key` one of the shim's compartment keys (or key 0, which every
/// compartment shares and none may give up)?
fn shim_key(rt: &Runtime, key: c_int) -> bool {
    key == 0 || (key > 0 && rt.keys.iter().any(|&k| k != 0 && k as c_int == key))
}

/// Does `[addr, addr+len)` overlap pages that carry a compartment's key?
pub fn overlaps_tagged(addr: usize, len: usize) -> bool {
    crate::tagmap::other_key_in(addr, len, 0, true).is_some()
}

fn refuse(what: core::fmt::Arguments<'_>) -> c_int {
    log::warn!("{what} refused: the key or the pages belong to a compartment");
    runtime::set_errno(libc::EPERM);
    -1
}

/// # Safety
/// `f` must have type `F`.
unsafe fn real_fn<F: Copy>(f: &RealFn) -> F {
    // SAFETY: forwarded contract.
    unsafe { real::as_fn(f) }
}

/// `pkey_set(3)`: refused for the shim's keys and key 0.
pub fn pkey_set(key: c_int, rights: c_uint) -> c_int {
    if let Some(rt) = runtime::active() {
        if shim_key(rt, key) {
            return refuse(format_args!("pkey_set({key}, {rights})"));
        }
    }
    // SAFETY: glibc's pkey_set has this type.
    let f: extern "C" fn(c_int, c_uint) -> c_int = unsafe { real_fn(&real::PKEY_SET) };
    f(key, rights)
}

/// `pkey_get(3)`: only reads the thread's PKRU; forwarded.
pub fn pkey_get(key: c_int) -> c_int {
    // SAFETY: glibc's pkey_get has this type.
    let f: extern "C" fn(c_int) -> c_int = unsafe { real_fn(&real::PKEY_GET) };
    f(key)
}

/// `pkey_alloc(2)`: forwarded. Getting back a key the shim holds means
/// someone freed it behind the shim's back (a raw syscall): the calling
/// thread now holds that compartment's rights, so the process dies.
pub fn pkey_alloc(flags: c_uint, rights: c_uint) -> c_int {
    // SAFETY: glibc's pkey_alloc has this type.
    let f: extern "C" fn(c_uint, c_uint) -> c_int = unsafe { real_fn(&real::PKEY_ALLOC) };
    let k = f(flags, rights);
    if let Some(rt) = runtime::active() {
        if k > 0 && shim_key(rt, k) {
            crate::lifecycle::fatal(format_args!(
                "pkey_alloc returned key {k}, which belongs to a compartment: it was freed behind the shim's back"
            ));
        }
    }
    k
}

/// `pkey_free(2)`: refused for the shim's keys and key 0.
pub fn pkey_free(key: c_int) -> c_int {
    if let Some(rt) = runtime::active() {
        if shim_key(rt, key) {
            return refuse(format_args!("pkey_free({key})"));
        }
    }
    // SAFETY: glibc's pkey_free has this type.
    let f: extern "C" fn(c_int) -> c_int = unsafe { real_fn(&real::PKEY_FREE) };
    f(key)
}

/// `pkey_mprotect(2)`: refused with one of the shim's keys, or on pages the
/// plan tagged.
///
/// # Safety
/// As `pkey_mprotect(2)`.
pub unsafe fn pkey_mprotect(addr: *mut c_void, len: usize, prot: c_int, key: c_int) -> c_int {
    if let Some(rt) = runtime::active() {
        if (key != -1 && shim_key(rt, key) && key != 0) || overlaps_tagged(addr as usize, len) {
            return refuse(format_args!(
                "pkey_mprotect({addr:p}, {len:#x}, {prot:#x}, {key})"
            ));
        }
    }
    // SAFETY: glibc's pkey_mprotect has this type.
    let f: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int) -> c_int =
        unsafe { real_fn(&real::PKEY_MPROTECT) };
    // SAFETY: forwarded contract.
    unsafe { f(addr, len, prot, key) }
}

//! The shim's own anonymous mappings: address-space reservations and
//! stacks between guard pages (gate-frame stacks, the per-thread alternate
//! signal stack). Plain syscalls only, so async-signal-safe.

use crate::objects::PAGE;
use core::ffi::c_void;

/// Map `len` bytes (whole pages) of private anonymous memory with `prot`,
/// charged to nothing until touched (`MAP_NORESERVE`), where the kernel
/// picks; `None` (errno set) if `mmap` fails.
pub fn reserve(len: usize, prot: i32) -> Option<usize> {
    // SAFETY: a fresh anonymous mapping at an address the kernel picks; it
    // touches no existing memory.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as usize)
}

/// Bytes of the mapping behind a [`guarded_stack`] of `bytes`.
pub const fn guarded_len(bytes: usize, guard_above: bool) -> usize {
    bytes + PAGE + if guard_above { PAGE } else { 0 }
}

/// A read-write stack of `bytes` (key 0) with an inaccessible guard page
/// below it and, if `guard_above`, one above it. Returns the stack's base;
/// the mapping starts one page lower and spans [`guarded_len`] bytes
/// ([`unmap_guarded`] gives it back).
pub fn guarded_stack(bytes: usize, guard_above: bool) -> Option<usize> {
    let total = guarded_len(bytes, guard_above);
    let p = reserve(total, libc::PROT_NONE)?;
    let base = p + PAGE;
    // SAFETY: the part of the mapping just made between its guard pages.
    let r = unsafe {
        libc::mprotect(
            base as *mut c_void,
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    };
    if r != 0 {
        unmap_guarded(base, bytes, guard_above);
        return None;
    }
    Some(base)
}

/// Unmap a [`guarded_stack`], guard pages included.
pub fn unmap_guarded(base: usize, bytes: usize, guard_above: bool) {
    // SAFETY: the caller's own guarded stack, which nothing runs on now.
    unsafe {
        libc::munmap(
            (base - PAGE) as *mut c_void,
            guarded_len(bytes, guard_above),
        )
    };
}

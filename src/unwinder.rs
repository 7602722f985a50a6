//! The shim's private copy of libgcc's unwinder (`libgcc_eh.a`, linked in
//! by `build.rs` instead of `libgcc_s.so.1`), and which copy runs what.
//!
//! - The shim's own stack walks (the fault gate's walk through the signal
//!   frame, `_Unwind_Find_FDE`, std's backtraces) use the private copy: it
//!   works in a process that never loads `libgcc_s`.
//! - Exceptions and forced unwinds stay with the process's unwinder: the
//!   shim's `_Unwind_RaiseException`, `_Unwind_Resume_or_Rethrow`,
//!   `_Unwind_Resume` and `__gcc_personality_v0` go on to the next
//!   definition (`libgcc_s`, which every object that raises or resumes
//!   depends on), and fall back to the private copies only while none is
//!   loaded ([`crate::real::RealFn::get_or`]).
//! - The personality routines the shim runs inside someone's unwind (the
//!   gate's, `crate::cxx`'s wrappers) read and set the frame's registers
//!   with the private `_Unwind_GetGR`/`_Unwind_SetGR`/`_Unwind_GetIP`/
//!   `_Unwind_SetIP`. The context layout is libgcc's own, but `GetGR` and
//!   `SetGR` size each register from a table that the private copy fills
//!   only when it first walks a stack: [`ready`] walks one frame first.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicBool, Ordering};

type Trace = extern "C" fn(*mut c_void, *mut c_void) -> c_int;

extern "C" {
    fn _Unwind_Backtrace(trace: Trace, arg: *mut c_void) -> c_int;
    // The private copies of the functions the shim interposes (renamed by
    // build.rs, so that they do not clash with the shim's hooks).
    fn ia2shim_libgcc_Unwind_Resume(exc: *mut c_void);
    fn ia2shim_libgcc_Unwind_RaiseException(exc: *mut c_void) -> c_int;
    fn ia2shim_libgcc_Unwind_Resume_or_Rethrow(exc: *mut c_void) -> c_int;
    fn ia2shim_libgcc__gcc_personality_v0(
        version: c_int,
        actions: c_int,
        class: u64,
        exc: *mut c_void,
        ctx: *mut c_void,
    ) -> c_int;
}

/// The private copies of the interposed functions, for `RealFn::get_or`.
pub fn private_resume() -> usize {
    ia2shim_libgcc_Unwind_Resume as *const () as usize
}
pub fn private_raise() -> usize {
    ia2shim_libgcc_Unwind_RaiseException as *const () as usize
}
pub fn private_rethrow() -> usize {
    ia2shim_libgcc_Unwind_Resume_or_Rethrow as *const () as usize
}
pub fn private_gcc_personality() -> usize {
    ia2shim_libgcc__gcc_personality_v0 as *const () as usize
}

/// Set once the private copy has walked a stack (its register-size table
/// is filled). On key 0: rewriting it only makes the next walk happen again.
static READY: AtomicBool = AtomicBool::new(false);

extern "C" fn stop(_ctx: *mut c_void, _arg: *mut c_void) -> c_int {
    // _URC_END_OF_STACK: one frame is enough.
    5
}

/// Make the private `_Unwind_GetGR`/`_Unwind_SetGR` usable on any context:
/// walk one frame with the private copy the first time. Allocation-free
/// (signal handlers and glibc's SIGCANCEL unwinding call it).
pub fn ready() {
    if READY.load(Ordering::Acquire) {
        return;
    }
    // SAFETY: libgcc's _Unwind_Backtrace with a callback that stops at the
    // first frame; it reads only this thread's stack and unwind tables.
    unsafe { _Unwind_Backtrace(stop, core::ptr::null_mut()) };
    READY.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" {
        fn _Unwind_GetGR(ctx: *mut c_void, reg: c_int) -> usize;
        fn _Unwind_GetIP(ctx: *mut c_void) -> usize;
    }

    extern "C" fn first_frame(ctx: *mut c_void, arg: *mut c_void) -> c_int {
        // SAFETY: the unwinder's context; DWARF register 3 is rbx (saved by
        // every walk), as the gate's personality reads it.
        unsafe {
            let out = arg as *mut [usize; 2];
            (*out)[0] = _Unwind_GetIP(ctx);
            (*out)[1] = _Unwind_GetGR(ctx, 3);
        }
        5
    }

    #[inline(never)]
    fn walk() -> [usize; 2] {
        let mut out = [0usize; 2];
        // SAFETY: as in `ready`, with a callback that writes two words.
        unsafe { _Unwind_Backtrace(first_frame, (&mut out as *mut [usize; 2]).cast()) };
        out
    }

    #[test]
    fn the_private_copy_walks_and_reads_registers() {
        ready();
        assert!(READY.load(Ordering::Acquire));
        let [ip, _rbx] = walk();
        // The first frame handed to the callback is the caller's.
        let f = walk as *const () as usize;
        assert!(ip > f && ip < f + 4096, "ip {ip:#x}, walk at {f:#x}");
        // The renamed copies are linked in.
        let all = [
            private_resume(),
            private_raise(),
            private_rethrow(),
            private_gcc_personality(),
        ];
        assert!(all.iter().all(|&a| a != 0));
    }
}

//! Memory for what only a fault report needs: iced's decoder tables and
//! Intel formatter (about 8 M instructions and a few hundred KiB to build)
//! are made on the first report, inside the SIGSEGV handler, where `malloc`
//! must not be called. The address space is reserved at start-up (one
//! `mmap`, no page touched); while a thread runs [`with_arena`], the shim's
//! Rust allocations on that thread are bump-allocated from it. Arena blocks
//! are never reused: what is built there lives as long as the process.
//!
//! The shim's global allocator is [`ShimAlloc`]: `System` (the malloc family,
//! as before), except on the thread that holds the arena, and for blocks of
//! the sealed heap (`crate::sealed`: made inside its scopes, freed and
//! grown there wherever they are dropped).

use crate::sealed;
use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::alloc::System;

/// Address space reserved for the arena: far more than the report needs,
/// and free until touched (`MAP_NORESERVE`).
const SIZE: usize = 32 << 20;

/// Start of the reservation (0: none yet).
#[link_section = ".ia2shim_sealed"]
static BASE: AtomicUsize = AtomicUsize::new(0);
/// Bytes handed out.
static USED: AtomicUsize = AtomicUsize::new(0);
/// Kernel thread id of the thread allocating from the arena (0: none).
static OWNER: AtomicI32 = AtomicI32::new(0);

/// Reserve the arena's address space (start-up; idempotent). Returns
/// `false` if `mmap` failed: the first report then maps it, or prints the
/// instruction as unknown.
pub fn reserve() -> bool {
    if BASE.load(Ordering::Acquire) != 0 {
        return true;
    }
    let Some(p) = crate::anon::reserve(SIZE, libc::PROT_READ | libc::PROT_WRITE) else {
        return false;
    };
    // BASE is sealed state: a compartment that moved it would have the
    // next report's tables written where it chose, with every key open.
    let set = crate::pku::with_shim_writes(|| {
        BASE.compare_exchange(0, p, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    });
    if !set {
        // SAFETY: our own mapping, not published.
        unsafe { libc::munmap(p as *mut core::ffi::c_void, SIZE) };
    }
    true
}

/// Bytes the arena has handed out.
#[cfg(test)]
pub fn used() -> usize {
    USED.load(Ordering::Relaxed)
}

fn tid() -> i32 {
    // SAFETY: gettid has no preconditions and is async-signal-safe.
    unsafe { libc::gettid() }
}

/// Run `f` with this thread's Rust allocations served from the arena.
/// Threads faulting at once take turns (each waits up to a second, so each
/// report shows its instruction in full); `None` if another thread holds
/// the arena longer than that, when the calling thread already holds it (a
/// fault inside `f`), or when no arena can be mapped.
pub fn with_arena<R>(f: impl FnOnce() -> R) -> Option<R> {
    if !reserve() {
        return None;
    }
    let me = tid();
    for _ in 0..1000 {
        match OWNER.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => {
                let r = f();
                OWNER.store(0, Ordering::Release);
                return Some(r);
            }
            // A fault inside `f` on the same thread (say, while the decoder
            // tables are being built): do not re-enter the half-built state.
            Err(o) if o == me => return None,
            Err(_) => {
                let ms = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 1_000_000,
                };
                // SAFETY: nanosleep is async-signal-safe.
                unsafe { libc::nanosleep(&ms, core::ptr::null_mut()) };
            }
        }
    }
    None
}

fn in_arena(p: *mut u8) -> bool {
    let base = BASE.load(Ordering::Relaxed);
    base != 0 && (base..base + SIZE).contains(&(p as usize))
}

/// Is the calling thread the arena's holder? One relaxed load when no
/// report is being made.
fn holding() -> bool {
    let o = OWNER.load(Ordering::Relaxed);
    o != 0 && o == tid()
}

/// Bump-allocate `layout` (only the holder calls this, so no race on USED
/// beyond the holder's own nested use).
fn bump(layout: Layout) -> *mut u8 {
    let base = BASE.load(Ordering::Acquire);
    let used = USED.load(Ordering::Relaxed);
    let start = (base + used).next_multiple_of(layout.align().max(16));
    let end = start + layout.size().max(1);
    if base == 0 || end > base + SIZE {
        return core::ptr::null_mut();
    }
    USED.store(end - base, Ordering::Relaxed);
    start as *mut u8
}

/// The shim's global allocator: see the module documentation.
pub struct ShimAlloc;

// SAFETY: every block comes from `System`, from the arena, whose blocks
// never overlap (bump allocation) and are never handed out twice, or from
// the sealed heap (talc); each is released to where it came from (arena
// blocks: never).
unsafe impl GlobalAlloc for ShimAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if holding() {
            return bump(layout);
        }
        if sealed::serving() {
            return sealed::alloc(layout, false);
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if holding() {
            // Fresh anonymous memory, never reused: already zero.
            return bump(layout);
        }
        if sealed::serving() {
            return sealed::alloc(layout, true);
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if sealed::contains(ptr) {
            // SAFETY: a sealed-heap block, with its layout.
            return unsafe { sealed::dealloc(ptr, layout) };
        }
        // The holder may be in a signal handler: it never calls `free` (a
        // System block it drops leaks).
        if !in_arena(ptr) && !holding() {
            // SAFETY: a System block, with its layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if sealed::contains(ptr) {
            // SAFETY: a sealed-heap block, with its layout.
            return unsafe { sealed::realloc(ptr, layout, new_size) };
        }
        // A System block grown inside a sealed scope moves into the sealed
        // heap, through the copy below (the scope has the shim key open).
        if !in_arena(ptr) && !holding() && !sealed::serving() {
            // SAFETY: a System block, with its layout.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees a valid new layout.
        let new =
            unsafe { self.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
        if !new.is_null() {
            // SAFETY: both blocks are live and at least this long.
            unsafe { core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            // SAFETY: the old block, with its layout.
            unsafe { self.dealloc(ptr, layout) };
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_serves_only_its_holder_and_keeps_blocks() {
        let outside = Box::new(7u64);
        assert!(!in_arena(&*outside as *const u64 as *mut u8));
        let (v, s) = with_arena(|| {
            let mut v: Vec<u32> = Vec::with_capacity(4);
            v.extend(0..1000); // grows by realloc inside the arena
            let s = String::from("made in the arena");
            (v, s)
        })
        .unwrap();
        assert!(in_arena(v.as_ptr() as *mut u8) && in_arena(s.as_ptr() as *mut u8));
        assert_eq!(v.iter().sum::<u32>(), 499_500);
        assert_eq!(s, "made in the arena");
        // Outside the arena again: System blocks; dropping arena blocks is a no-op.
        let after = Box::new(1u8);
        assert!(!in_arena(&*after as *const u8 as *mut u8));
        drop((v, s));
        assert!(used() > 4000);
    }

    #[test]
    fn the_first_report_builds_the_formatter_in_the_arena() {
        // mov rax, fs:[0x28] (the stack-guard load), padded to the 15 bytes
        // the report reads.
        let mut code = [0x90u8; 15];
        code[..9].copy_from_slice(&[0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0]);
        let before = used();
        let mut b = crate::stackfmt::StackBuf::<256>::new();
        super::super::write_instruction(&mut b, code.as_ptr() as usize);
        assert_eq!(b.as_str(), "mov rax,fs:[28h]");
        assert!(super::super::FORMATTER.get().is_some());
        assert!(used() > before, "the formatter was not built in the arena");
    }
}

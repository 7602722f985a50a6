//! The sealed heap: where the shim allocates the state it trusts when it
//! decides rights (the runtime's configuration and census: which object,
//! and so which compartment, owns an address). Once hardened its pages and
//! its allocator's metadata are on the shim key, which every compartment
//! PKRU leaves readable and write-disabled, so compartment code can read
//! the census but not rewrite it (`tests/escapes.rs`, `census`).
//!
//! While a thread runs [`with_sealed`], the shim's Rust allocations on that
//! thread come from here (the global allocator asks [`serving`]), with the
//! shim key open for writing; blocks are freed and grown here wherever
//! they are dropped ([`contains`]). One talc allocator over a reservation
//! that grows by committing more of it, as the compartment heaps do.
//! Before the shim key exists (the constructor builds the census first)
//! the pages are on key 0; [`harden`] moves them and the metadata.

use crate::pku;
use crate::spin::SpinLock;
use core::alloc::Layout;
use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};
use talc::base::binning::Binning;
use talc::base::Talc;
use talc::source::Source;
use talc::DefaultBinning;

/// Address space reserved (`MAP_NORESERVE`, `PROT_NONE` until committed):
/// the first of these sizes that `mmap` grants (an address-space limit,
/// `ulimit -v`, refuses the larger ones).
const SIZES: [usize; 4] = [4 << 30, 1 << 30, 256 << 20, 64 << 20];
/// Commit at least this much at a time.
const GROW: usize = 1 << 20;
/// Slack for talc's bin table and chunk tags.
const SLACK: usize = 16 << 10;

/// Where the reservation starts (0: not yet), outside the sealed page: the
/// global allocator asks [`contains`] for every block it frees.
#[link_section = ".ia2shim_sealed"]
static BASE: AtomicUsize = AtomicUsize::new(0);
/// Its length.
#[link_section = ".ia2shim_sealed"]
static LEN: AtomicUsize = AtomicUsize::new(0);

/// talc's memory source: commits more of the reservation.
#[derive(Debug)]
struct Commit {
    /// talc's current heap end (0: nothing claimed yet).
    heap_end: usize,
    /// End of the committed part (0: nothing committed yet).
    committed: usize,
}

/// Everything a compartment must not write: the scope lock, which thread
/// is inside a scope, and talc's bins. On a page of its own.
/// The locks are spin locks: a fork child can release what the parent's
/// prepare handler took (a `Mutex` guard cannot cross `fork`).
#[repr(C, align(4096))]
struct State {
    scope: SpinLock,
    /// `pthread_self` of the thread inside a scope (0: none).
    owner: AtomicUsize,
    talc: UnsafeCell<Talc<Commit, DefaultBinning>>,
    lock: SpinLock,
}
// SAFETY: `talc` is only touched with `lock` held.
unsafe impl Sync for State {}
const _: () = assert!(core::mem::size_of::<State>() == 4096);

static STATE: State = State {
    scope: SpinLock::new(),
    owner: AtomicUsize::new(0),
    talc: UnsafeCell::new(Talc::new(Commit {
        heap_end: 0,
        committed: 0,
    })),
    lock: SpinLock::new(),
};

/// Hold both locks across `fork`, so that a child never inherits one held
/// by a thread it does not have (a timer's notification record being
/// made, say): its next scope would wait forever. Lock order: a scope,
/// then the allocator; both after the census and `dlopen` locks (scopes
/// run under them), before the key map's (growth records its pages). So
/// this registers after the key map's handlers and before the rest: fork
/// runs prepare handlers in the reverse order.
pub fn register_fork_handlers() {
    extern "C" fn prepare() {
        pku::with_shim_writes(|| {
            STATE.scope.lock();
            STATE.lock.lock();
        });
    }
    extern "C" fn release() {
        pku::with_shim_writes(|| {
            // SAFETY: the prepare handler took both (in a child: the parent's).
            unsafe {
                STATE.lock.unlock();
                STATE.scope.unlock();
            }
        });
    }
    // Plain functions that never allocate.
    let r = crate::real::own_atfork(prepare, release, release);
    if r != 0 {
        log::warn!("sealed heap: pthread_atfork failed ({r}); a fork child may inherit its lock");
    }
}

fn me() -> usize {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() as usize }
}

/// Reserve the address space (idempotent); `None` if `mmap` failed.
fn base() -> Option<usize> {
    let b = BASE.load(Ordering::Acquire);
    if b != 0 {
        return Some(b);
    }
    // Only ever called inside a scope, whose lock serialises this.
    for len in SIZES {
        if let Some(p) = crate::anon::reserve(len, libc::PROT_NONE) {
            LEN.store(len, Ordering::Relaxed);
            BASE.store(p, Ordering::Release);
            return Some(p);
        }
    }
    // Fail closed with a line, not an allocation failure's abort.
    crate::lifecycle::fatal(format_args!(
        "the sealed heap cannot reserve {} MiB of address space (errno {}); \
         raise the address-space limit (ulimit -v)",
        SIZES[SIZES.len() - 1] >> 20,
        crate::stackfmt::errno()
    ))
}

// SAFETY: `acquire` only makes syscalls and calls `claim`/`extend` on the
// talc it is given; it never allocates.
unsafe impl Source for Commit {
    fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
        grow(talc, layout).ok_or(())
    }
}

fn grow<B: Binning>(talc: &mut Talc<Commit, B>, layout: Layout) -> Option<()> {
    let start = base()?;
    let cur = talc.source.committed.max(start);
    let need = layout
        .size()
        .checked_add(layout.align())?
        .checked_add(SLACK)?;
    let step = need.max(GROW).next_multiple_of(GROW);
    let new_end = cur
        .checked_add(step)
        .filter(|&e| e <= start + LEN.load(Ordering::Relaxed))?;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: the range lies inside our own PROT_NONE reservation.
    if unsafe { libc::mprotect(cur as *mut libc::c_void, step, rw) } != 0 {
        return None;
    }
    let key = pku::shim_key();
    if key != 0 {
        pku::seal(cur, step, rw, key, "sealed heap");
    }
    talc.source.committed = new_end;
    let he = if talc.source.heap_end == 0 {
        // SAFETY: [start, new_end) is freshly committed memory of the
        // reservation, owned by this talc for the life of the process.
        unsafe { talc.claim(start as *mut u8, new_end - start) }?
    } else {
        // SAFETY: heap_end is the end talc returned last time and the
        // memory up to new_end is committed and unused.
        unsafe {
            talc.extend(
                NonNull::new_unchecked(talc.source.heap_end as *mut u8),
                new_end as *mut u8,
            )
        }
    };
    talc.source.heap_end = he.as_ptr() as usize;
    Some(())
}

/// Run `f` with the calling thread's Rust allocations served from the
/// sealed heap and the shim key writable. Nothing in `f` may run program
/// code. Scopes exclude each other; a nested scope on the same thread just
/// runs `f`.
pub fn with_sealed<R>(f: impl FnOnce() -> R) -> R {
    if serving() {
        return f();
    }
    pku::with_shim_writes(|| {
        STATE.scope.lock();
        STATE.owner.store(me(), Ordering::Relaxed);
        let r = f();
        STATE.owner.store(0, Ordering::Relaxed);
        // SAFETY: taken above on this thread.
        unsafe { STATE.scope.unlock() };
        r
    })
}

/// Is the calling thread inside [`with_sealed`]? One relaxed load otherwise.
#[inline]
pub fn serving() -> bool {
    let o = STATE.owner.load(Ordering::Relaxed);
    o != 0 && o == me()
}

/// Is `p` a block of the sealed heap?
#[inline]
pub fn contains(p: *mut u8) -> bool {
    let b = BASE.load(Ordering::Relaxed);
    b != 0 && (b..b + LEN.load(Ordering::Relaxed)).contains(&(p as usize))
}

/// A block of `layout` (null when the reservation is full), zeroed if asked.
pub fn alloc(layout: Layout, zeroed: bool) -> *mut u8 {
    pku::with_shim_writes(|| {
        STATE.lock.lock();
        // SAFETY: the lock is held, so this is the only reference.
        let talc = unsafe { &mut *STATE.talc.get() };
        // SAFETY: talc's contract: a non-zero-size layout (Rust's
        // GlobalAlloc never asks for zero bytes).
        let p = match unsafe { talc.allocate(layout) } {
            Some(p) => {
                if zeroed {
                    // SAFETY: a fresh block of layout.size() bytes.
                    unsafe { core::ptr::write_bytes(p.as_ptr(), 0, layout.size()) };
                }
                p.as_ptr()
            }
            None => core::ptr::null_mut(),
        };
        // SAFETY: taken above on this thread.
        unsafe { STATE.lock.unlock() };
        p
    })
}

/// Free a block of the sealed heap.
///
/// # Safety
/// `p` came from [`alloc`] with `layout` and is not used again.
pub unsafe fn dealloc(p: *mut u8, layout: Layout) {
    pku::with_shim_writes(|| {
        STATE.lock.lock();
        // SAFETY: the lock is held, so this is the only reference.
        let talc = unsafe { &mut *STATE.talc.get() };
        // SAFETY: the caller's block and layout.
        unsafe { talc.deallocate(p, layout) };
        // SAFETY: taken above on this thread.
        unsafe { STATE.lock.unlock() };
    })
}

/// Grow or shrink a block of the sealed heap (into a new one).
///
/// # Safety
/// As [`dealloc`]; `new_size` with `layout`'s alignment is a valid layout.
pub unsafe fn realloc(p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
    // SAFETY: the caller guarantees a valid new layout.
    let new = alloc(
        unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) },
        false,
    );
    if !new.is_null() {
        pku::with_shim_writes(|| {
            // SAFETY: both blocks are live and at least this long.
            unsafe { core::ptr::copy_nonoverlapping(p, new, layout.size().min(new_size)) }
        });
        // SAFETY: the caller's block, with its layout.
        unsafe { dealloc(p, layout) };
    }
    new
}

/// Put the committed heap and the allocator's page on the shim key
/// (`IA2_HARDEN=on`, hardware keys); later growth is sealed as it commits.
pub fn harden(key: u32) {
    pku::with_shim_writes(|| {
        STATE.lock.lock();
        // SAFETY: the lock is held, so this is the only reference.
        let talc = unsafe { &*STATE.talc.get() };
        let start = BASE.load(Ordering::Acquire);
        if start != 0 && talc.source.committed > start {
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            pku::seal(start, talc.source.committed - start, rw, key, "sealed heap");
        }
        // SAFETY: taken above on this thread.
        unsafe { STATE.lock.unlock() };
    });
    pku::seal_static(&STATE, key, "sealed heap's allocator");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_serves_its_thread_from_the_sealed_heap() {
        let outside = Box::new(1u64);
        assert!(!contains(&*outside as *const u64 as *mut u8));
        // A System block grown inside a scope moves into the sealed heap.
        let mut moved: Vec<u64> = vec![7; 4];
        assert!(!contains(moved.as_ptr() as *mut u8));
        with_sealed(|| moved.extend(0..1000));
        assert!(contains(moved.as_ptr() as *mut u8));
        assert_eq!(moved[..4], [7; 4]);
        let (v, s) = with_sealed(|| {
            let mut v: Vec<u32> = Vec::new();
            v.extend(0..10_000); // grows by realloc inside the heap
            let other = std::thread::spawn(|| {
                let b = Box::new(2u64);
                contains(&*b as *const u64 as *mut u8)
            })
            .join()
            .unwrap();
            assert!(!other, "another thread was served from the sealed heap");
            (v, String::from("sealed"))
        });
        assert!(contains(v.as_ptr() as *mut u8) && contains(s.as_ptr() as *mut u8));
        assert_eq!(v.iter().sum::<u32>(), 49_995_000);
        // Freed and grown outside a scope: still the sealed heap's.
        let mut s = s;
        s.push_str(" and grown");
        assert!(contains(s.as_ptr() as *mut u8));
        drop(v);
        let after = Box::new(3u8);
        assert!(!contains(&*after as *const u8 as *mut u8));
    }
}

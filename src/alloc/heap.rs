//! The shim's heaps: one reservation of address space, cut into equal
//! slots. Heap `h` (0 = the shared heap on pkey 0, `c` = compartment `c`'s
//! heap, tagged with its key) owns [`ARENAS`] consecutive slots, each an
//! arena: a lock and a [`talc`] allocator whose memory is the slot's
//! committed prefix. An arena grows by committing (and tagging) more of its
//! slot and handing it to talc with `extend`, so the owner of any pointer
//! is found by arithmetic: `(p - base) >> slot_shift`.
//!
//! Every allocation is preceded by a 16-byte header: talc's layout size
//! (talc frees by size) with the block's allocation site id in its top 16
//! bits ([`super::sites`]), and a tag with a magic number and the offset
//! from talc's chunk to the payload (16 for ordinary allocations, more for
//! over-aligned ones). The magic lets `free` refuse pointers that were
//! never handed out, and catches most double frees.
//!
//! In front of the arenas, each thread keeps a small cache of freed blocks
//! per heap and size class (up to [`CACHE_MAX`] bytes, as glibc's tcache
//! does): most `malloc`/`free` pairs take no lock and never reach talc.
//! A thread's cache lives in the shared heap, is found through one
//! thread-local pointer, and is flushed back to the arenas by a
//! `pthread_key` destructor when the thread exits.
//!
//! Nothing here allocates, so the hooks can use it from any context; the
//! metadata of every arena lives in the shim's own `.bss` (pkey 0) and at the
//! start of its slot. Operations on a compartment heap that the calling
//! thread's PKRU cannot reach (a cross-compartment `free`, a callback) add
//! that key for the length of the operation.

use crate::pku;
use crate::spin::SpinLock;
use core::alloc::Layout;
use core::cell::{Cell, UnsafeCell};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};
use talc::base::binning::Binning;
use talc::base::Talc;
use talc::source::Source;
use talc::DefaultBinning;

/// Heap 0 is shared; heap `c` belongs to compartment `c` (1–15).
pub const HEAPS: usize = 16;
/// Arenas (locks) per heap; threads are spread over them round-robin.
pub const ARENAS: usize = 4;
const SLOTS: usize = HEAPS * ARENAS;
/// Bytes of our header in front of every payload; also the minimum alignment.
pub const HDR: usize = 16;
pub const MIN_ALIGN: usize = 16;
/// Larger alignments are refused (the header keeps the offset in 32 bits).
pub const MAX_ALIGN: usize = 1 << 30;
/// Largest slot (64 GiB) and smallest acceptable one when the address space
/// is limited (`ulimit -v`).
const MAX_SLOT_SHIFT: u32 = 36;
const MIN_SLOT_SHIFT: u32 = 28;

const MAGIC: usize = 0x1a2a_a110 << 32;
const FREED: usize = 0x1a2a_f7ee << 32;
/// The tag of a block that sits in a thread cache.
const CACHED: usize = 0x1a2a_cac4 << 32;
const MAGIC_MASK: usize = 0xffff_ffff << 32;
const OFFSET_MASK: usize = 0x7fff_ffff;
/// Tag bit: audit mode put some of the block's pages on key 0 (see
/// [`share_page_for_audit`]); `free` puts them back on the heap's key.
const PROMOTED: usize = 1 << 31;
const _: () = assert!(MAX_ALIGN <= OFFSET_MASK);
/// The size word keeps the site id above bit 48 (sizes stay below a slot).
const SITE_SHIFT: u32 = 48;
const SIZE_MASK: usize = (1 << SITE_SHIFT) - 1;
const _: () = assert!(MAX_SLOT_SHIFT < SITE_SHIFT);

/// Arena growth: at least `MIN_GROW`, then half of what the arena already
/// has (capped at `MAX_GROW`), in `GROW_UNIT`s. Committing only reserves;
/// pages cost memory when first touched.
const MIN_GROW: usize = 1 << 20;
const MAX_GROW: usize = 256 << 20;
const GROW_UNIT: usize = 64 << 10;
/// Slack for talc's bin table (first claim) and chunk tags.
const GROW_SLACK: usize = 16 << 10;
/// Freeing a block at least this large returns its pages to the kernel.
const TRIM_THRESHOLD: usize = 4 << 20;
const PAGE: usize = crate::objects::PAGE;

// ---------------------------------------------------------------- region

/// Where the heaps lie and which key tags each: set once (the reservation,
/// the keys at start-up), read on every operation. On a page of its own
/// that `IA2_HARDEN=on` puts on the shim key ([`harden`]): a compartment
/// that zeroed another's key here would have that heap's next growth
/// committed on key 0 (`tests/escapes.rs`, `heap-keys`), and one that moved
/// the region would defeat every pointer check below.
#[repr(C, align(4096))]
struct Fixed {
    base: AtomicUsize,
    len: AtomicUsize,
    shift: AtomicU32,
    /// 0: not reserved, 1: being reserved, 2: reserved, 3: reservation failed.
    state: AtomicU8,
    /// The protection key that tags each heap (0: untagged).
    keys: [AtomicU32; HEAPS],
}
const _: () = assert!(core::mem::size_of::<Fixed>() == 4096);

static FIXED: Fixed = Fixed {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    shift: AtomicU32::new(0),
    state: AtomicU8::new(0),
    keys: [const { AtomicU32::new(0) }; HEAPS],
};

/// Put the heaps' layout and keys on the shim key (`IA2_HARDEN=on`); their
/// writers open it.
pub fn harden(key: u32) {
    pku::seal_static(&FIXED, key, "heap layout and keys");
}

/// `(base, slot_shift)` of the reservation, reserving it on first use.
#[inline]
fn region() -> Option<(usize, u32)> {
    let base = FIXED.base.load(Ordering::Acquire);
    if base != 0 {
        return Some((base, FIXED.shift.load(Ordering::Relaxed)));
    }
    reserve_region()
}

#[cold]
fn reserve_region() -> Option<(usize, u32)> {
    pku::with_shim_writes(reserve_region_open)
}

fn reserve_region_open() -> Option<(usize, u32)> {
    loop {
        match FIXED
            .state
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => break,
            Err(2) => {
                return Some((
                    FIXED.base.load(Ordering::Acquire),
                    FIXED.shift.load(Ordering::Relaxed),
                ))
            }
            Err(3) => return None,
            Err(_) => core::hint::spin_loop(),
        }
    }
    for shift in (MIN_SLOT_SHIFT..=MAX_SLOT_SHIFT).rev() {
        let len = SLOTS << shift;
        if let Some(p) = crate::anon::reserve(len, libc::PROT_NONE) {
            FIXED.shift.store(shift, Ordering::Relaxed);
            FIXED.len.store(len, Ordering::Relaxed);
            FIXED.base.store(p, Ordering::Release);
            FIXED.state.store(2, Ordering::Release);
            log::debug!(
                "heap: reserved {len:#x} bytes at {p:#x}, {SLOTS} slots of {:#x}",
                1usize << shift
            );
            return Some((p, shift));
        }
    }
    FIXED.state.store(3, Ordering::Release);
    log::error!("heap: cannot reserve address space for the shim's heaps");
    None
}

/// Reserve the heaps' address space now (the constructor does, so that the
/// first allocation does not pay for it).
pub fn reserve() -> bool {
    region().is_some()
}

/// The reservation `(start, end)`, or `None` before the first allocation.
pub fn region_range() -> Option<(usize, usize)> {
    let base = FIXED.base.load(Ordering::Acquire);
    (base != 0).then(|| (base, base + FIXED.len.load(Ordering::Relaxed)))
}

/// Is `p` inside the shim's heaps (any heap, committed or not)?
#[inline]
pub fn owns(p: usize) -> bool {
    let base = FIXED.base.load(Ordering::Acquire);
    base != 0 && p.wrapping_sub(base) < FIXED.len.load(Ordering::Relaxed)
}

/// The heap whose slots hold `p`, if any.
#[inline]
pub fn heap_of(p: usize) -> Option<usize> {
    let base = FIXED.base.load(Ordering::Acquire);
    if base == 0 || p.wrapping_sub(base) >= FIXED.len.load(Ordering::Relaxed) {
        return None;
    }
    Some(((p - base) >> FIXED.shift.load(Ordering::Relaxed)) / ARENAS)
}

// ---------------------------------------------------------------- keys

/// Tag heap `heap`'s future growth with `key`. Set by the constructor before
/// any compartment heap is used; heap 0 always stays on key 0.
pub fn set_key(heap: usize, key: u32) {
    if heap != 0 && heap < HEAPS {
        pku::with_shim_writes(|| FIXED.keys[heap].store(key, Ordering::Relaxed));
    }
}

pub fn key_of(heap: usize) -> u32 {
    FIXED
        .keys
        .get(heap)
        .map_or(0, |k| k.load(Ordering::Relaxed))
}

/// Gives the calling thread access to a compartment heap for the length of
/// one operation when its PKRU lacks that heap's key; restores the PKRU on
/// drop. A no-op for the shared heap, under `sim`, and in the common case.
struct Rights(Option<u32>);

impl Rights {
    #[inline]
    fn for_heap(heap: usize) -> Rights {
        if heap == 0 || pku::backend() != pku::Backend::Hardware {
            return Rights(None);
        }
        let key = key_of(heap);
        if key == 0 {
            return Rights(None);
        }
        let pkru = pku::rdpkru();
        if pku::pkru_allows(pkru, key, true) {
            return Rights(None);
        }
        // SAFETY: only adds a key; the hardware backend means PKU is enabled.
        unsafe { pku::wrpkru(pkru & !(3 << (2 * key))) };
        Rights(Some(pkru))
    }
}

impl Drop for Rights {
    #[inline]
    fn drop(&mut self) {
        if let Some(pkru) = self.0 {
            // SAFETY: restores the caller's own PKRU.
            unsafe { pku::wrpkru(pkru) };
        }
    }
}

// ---------------------------------------------------------------- arenas

/// talc's memory source for one arena: commits more of the arena's slot.
#[derive(Debug)]
pub struct Grow {
    slot: usize,
    /// talc's current heap end (0: nothing claimed yet).
    heap_end: usize,
    /// End of the committed part of the slot (0: nothing committed yet).
    committed: usize,
}

// SAFETY: `acquire` only makes syscalls and calls `claim`/`extend` on the
// talc it is given; it never allocates.
unsafe impl Source for Grow {
    fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
        grow(talc, layout).ok_or(())
    }
}

fn grow<B: Binning>(talc: &mut Talc<Grow, B>, layout: Layout) -> Option<()> {
    let (base, shift) = region()?;
    let slot = talc.source.slot;
    let start = base + (slot << shift);
    let end = start + (1usize << shift);
    let cur = if talc.source.committed == 0 {
        start
    } else {
        talc.source.committed
    };
    let need = layout
        .size()
        .checked_add(layout.align())?
        .checked_add(GROW_SLACK)?;
    let step = need.max(((cur - start) / 2).clamp(MIN_GROW, MAX_GROW));
    let step = step.checked_add(GROW_UNIT - 1)? & !(GROW_UNIT - 1);
    let new_end = if end - cur >= step {
        cur + step
    } else if end - cur >= need {
        end
    } else {
        return None;
    };
    commit(cur, new_end - cur, key_of(slot / ARENAS))?;
    talc.source.committed = new_end;
    COMMITTED[slot].store(new_end, Ordering::Release);
    if talc.source.heap_end == 0 {
        // SAFETY: [start, new_end) is freshly committed memory of this
        // arena's slot, owned by this talc for the life of the process.
        let he = unsafe { talc.claim(start as *mut u8, new_end - start) }?;
        talc.source.heap_end = he.as_ptr() as usize;
    } else {
        // SAFETY: heap_end is the end talc returned last time and the
        // memory up to new_end is committed and unused.
        let he = unsafe {
            talc.extend(
                NonNull::new_unchecked(talc.source.heap_end as *mut u8),
                new_end as *mut u8,
            )
        };
        talc.source.heap_end = he.as_ptr() as usize;
    }
    Some(())
}

/// Make `[start, start+len)` of the reservation readable and writable, and
/// tag it with `key` when it is a compartment's.
fn commit(start: usize, len: usize, key: u32) -> Option<()> {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: the range lies inside our own PROT_NONE reservation.
    if unsafe { libc::mprotect(start as *mut libc::c_void, len, rw) } != 0 {
        log::warn!(
            "heap: mprotect({start:#x}, {len:#x}) failed (errno {})",
            crate::stackfmt::errno()
        );
        return None;
    }
    if key != 0 {
        if let Err(e) = pku::protect(start, len, rw, key) {
            log::error!("heap: pkey_mprotect({start:#x}, {len:#x}, key {key}) failed (errno {e})");
            // Never hand out compartment memory on the wrong key.
            // SAFETY: as above.
            unsafe { libc::mprotect(start as *mut libc::c_void, len, libc::PROT_NONE) };
            return None;
        }
    }
    Some(())
}

/// One cache line pair per arena: threads on different arenas share nothing.
#[repr(align(128))]
struct Arena {
    lock: SpinLock,
    talc: UnsafeCell<Talc<Grow, DefaultBinning>>,
}

// SAFETY: `talc` is only touched with `lock` held.
unsafe impl Sync for Arena {}

impl Arena {
    const fn new(slot: usize) -> Self {
        Arena {
            lock: SpinLock::new(),
            talc: UnsafeCell::new(Talc::new(Grow {
                slot,
                heap_end: 0,
                committed: 0,
            })),
        }
    }
}

const fn arenas() -> [Arena; SLOTS] {
    let mut a = [const { Arena::new(0) }; SLOTS];
    let mut i = 0;
    while i < SLOTS {
        a[i] = Arena::new(i);
        i += 1;
    }
    a
}

static ARENA: [Arena; SLOTS] = arenas();
/// Each slot's committed end, readable without the arena's lock (pointer
/// validation must not read past it).
static COMMITTED: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

/// Held arena: unlocks on drop.
struct Held(&'static Arena);

impl Held {
    // The lock is held for as long as `self` lives, so the &mut is unique.
    #[allow(clippy::mut_from_ref)]
    fn talc(&self) -> &mut Talc<Grow, DefaultBinning> {
        // SAFETY: the lock is held, so no other reference exists.
        unsafe { &mut *self.0.talc.get() }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: Held exists only while its lock is held.
        unsafe { self.0.lock.unlock() };
    }
}

fn lock(slot: usize) -> Held {
    let a = &ARENA[slot];
    a.lock.lock();
    Held(a)
}

static NEXT_HINT: AtomicUsize = AtomicUsize::new(0);

/// Lock an arena of `heap`: the thread's own (`*hint`) first, another free
/// one if that is busy (and remember it), else wait for the thread's own.
fn lock_some(heap: usize, hint: &mut usize) -> (usize, Held) {
    let first = *hint % ARENAS;
    for i in 0..ARENAS {
        let a = (first + i) % ARENAS;
        let slot = heap * ARENAS + a;
        if ARENA[slot].lock.try_lock() {
            *hint = a;
            return (a, Held(&ARENA[slot]));
        }
    }
    (first, lock(heap * ARENAS + first))
}

// ---------------------------------------------------------------- thread caches

/// Largest usable size that thread caches keep; sizes are classed by 16.
pub const CACHE_MAX: usize = 1024;
const CLASSES: usize = CACHE_MAX / MIN_ALIGN;
/// Blocks per class and heap in one thread's cache.
const BIN_LIMIT: u8 = 16;

/// One heap's share of a thread cache: a list of free blocks per class,
/// linked through their first word.
#[repr(C)]
struct Bins {
    head: [usize; CLASSES],
    count: [u8; CLASSES],
}

#[repr(C)]
struct Cache {
    /// This thread's first-choice arena (same index in every heap).
    hint: usize,
    bins: [Bins; HEAPS],
}

thread_local! {
    /// The calling thread's cache (null: none yet). Constant initialiser,
    /// no destructor: safe in any hook; the cache is flushed by a
    /// `pthread_key` destructor instead.
    static CACHE: Cell<*mut Cache> = const { Cell::new(core::ptr::null_mut()) };
}

/// The key whose destructor flushes an exiting thread's cache (`u32::MAX`: none).
static CACHE_KEY: AtomicU32 = AtomicU32::new(u32::MAX);

/// Size class of a request (1..=CLASSES); its blocks have `class * 16` usable bytes.
#[inline]
fn class_of_request(size: usize) -> usize {
    size.div_ceil(MIN_ALIGN).max(1)
}

/// The calling thread's cache, made on first use; null if it cannot be.
#[inline]
fn cache() -> *mut Cache {
    let c = CACHE.with(Cell::get);
    if c.is_null() {
        new_cache()
    } else {
        c
    }
}

#[cold]
fn new_cache() -> *mut Cache {
    let mut hint = NEXT_HINT.fetch_add(1, Ordering::Relaxed) % ARENAS;
    let c = alloc_locked(
        0,
        core::mem::size_of::<Cache>(),
        MIN_ALIGN,
        true,
        &mut hint,
        0,
    ) as *mut Cache;
    if c.is_null() {
        return c;
    }
    // SAFETY: a fresh, zeroed block of the right size: all lists empty.
    unsafe { (*c).hint = hint };
    // Publish first: pthread_setspecific may allocate, and that must find it.
    CACHE.with(|t| t.set(c));
    let key = CACHE_KEY.load(Ordering::Acquire);
    if key != u32::MAX {
        // SAFETY: a key made by pthread_key_create; the value is ours.
        unsafe { libc::pthread_setspecific(key, c as *const libc::c_void) };
    }
    c
}

/// `pthread_key` destructor: give an exiting thread's cached blocks back to
/// their arenas, then the cache itself.
extern "C" fn flush_cache(c: *mut libc::c_void) {
    let c = c as *mut Cache;
    if CACHE.with(Cell::get) == c {
        CACHE.with(|t| t.set(core::ptr::null_mut()));
    }
    for heap in 0..HEAPS {
        let _rights = Rights::for_heap(heap);
        for k in 0..CLASSES {
            // SAFETY: the cache belongs to this (exiting) thread.
            let mut p = unsafe { (*c).bins[heap].head[k] };
            while p != 0 {
                // SAFETY: cached blocks are live blocks of `heap` holding the next link.
                let next = unsafe { *(p as *const usize) };
                // SAFETY: the block leaves the cache for its arena.
                unsafe { ((p - HDR + 8) as *mut usize).write(MAGIC | HDR) };
                // SAFETY: as above.
                let _ = unsafe { free_locked(p) };
                p = next;
            }
        }
    }
    // SAFETY: the cache is a live block of the shared heap, no longer reachable.
    let _ = unsafe { free_locked(c as usize) };
}

/// Make the key whose destructor flushes thread caches at thread exit.
fn create_cache_key() {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: a plain out pointer and a destructor that never unwinds.
    if unsafe { libc::pthread_key_create(&mut key, Some(flush_cache)) } == 0 {
        CACHE_KEY.store(key, Ordering::Release);
        // The calling thread may have made its cache already.
        let c = CACHE.with(Cell::get);
        if !c.is_null() {
            // SAFETY: as in new_cache.
            unsafe { libc::pthread_setspecific(key, c as *const libc::c_void) };
        }
    } else {
        log::warn!("heap: pthread_key_create failed; exiting threads keep their cached blocks");
    }
}

// ---------------------------------------------------------------- header

/// Read the header of payload `p` in `slot`, checking it without trusting it.
/// Returns `(talc size, offset to talc's chunk)`.
///
/// # Safety
/// `p - HDR .. p` must be committed memory of `slot` that the caller's PKRU
/// can read.
unsafe fn header(p: usize, slot_start: usize) -> Option<(usize, usize)> {
    let h = (p - HDR) as *const usize;
    // SAFETY: the caller vouches that the header words are readable.
    let (size, tag) = unsafe { (h.read() & SIZE_MASK, h.add(1).read()) };
    let off = tag & OFFSET_MASK;
    let ok = tag & MAGIC_MASK == MAGIC
        && off >= HDR
        && off % MIN_ALIGN == 0
        && off <= p - slot_start
        && size >= off;
    ok.then_some((size, off))
}

/// # Safety
/// `p - HDR .. p` is writable, inside the chunk that talc just handed out.
unsafe fn write_header(p: usize, size: usize, off: usize, site: u16) {
    let h = (p - HDR) as *mut usize;
    // SAFETY: as the contract says.
    unsafe {
        h.write(size | (site as usize) << SITE_SHIFT);
        h.add(1).write(MAGIC | off);
    }
}

/// Why a pointer given to `free` or `realloc` was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bad {
    /// Not inside any of the shim's heaps.
    NotOurs,
    /// Inside a heap, but not the start of a live allocation (an interior
    /// pointer, a double free, or corruption of the header in front of it).
    NotLive,
}

/// Locate `p`: `(slot, slot start)`, checking that its header is committed.
fn locate(p: usize) -> Result<(usize, usize), Bad> {
    let (base, shift) = match region() {
        Some(r) if owns(p) => r,
        _ => return Err(Bad::NotOurs),
    };
    let slot = (p - base) >> shift;
    let start = base + (slot << shift);
    if p % MIN_ALIGN != 0 || p < start + HDR || p > COMMITTED[slot].load(Ordering::Acquire) {
        return Err(Bad::NotLive);
    }
    Ok((slot, start))
}

// ---------------------------------------------------------------- operations

fn layout(total: usize) -> Option<Layout> {
    Layout::from_size_align(total, MIN_ALIGN).ok()
}

/// Allocate `size` bytes aligned to `align` (a power of two) from heap
/// `heap`, zeroed if `zero`. Null when out of memory or address space.
#[inline]
pub fn alloc(heap: usize, size: usize, align: usize, zero: bool, site: u16) -> *mut u8 {
    if heap >= HEAPS {
        return core::ptr::null_mut();
    }
    let c = cache();
    if c.is_null() {
        let mut hint = 0;
        return alloc_locked(heap, size, align, zero, &mut hint, site);
    }
    if align <= MIN_ALIGN && size <= CACHE_MAX {
        let k = class_of_request(size);
        let _rights = Rights::for_heap(heap);
        // SAFETY: the cache is this thread's; Rights gives access to the heap.
        let p = unsafe { pop(&mut (*c).bins[heap], k, heap, site) };
        if p != 0 {
            if zero {
                // SAFETY: the block has class k's k * 16 >= size bytes.
                unsafe { core::ptr::write_bytes(p as *mut u8, 0, size) };
            }
            return p as *mut u8;
        }
        // Allocate the whole class, so that the block fits it when freed.
        // SAFETY: the cache is this thread's.
        return alloc_locked(
            heap,
            k * MIN_ALIGN,
            MIN_ALIGN,
            zero,
            // SAFETY: the cache is this thread's.
            unsafe { &mut (*c).hint },
            site,
        );
    }
    // SAFETY: the cache is this thread's.
    alloc_locked(heap, size, align, zero, unsafe { &mut (*c).hint }, site)
}

/// Take a block of class `k` from `bins`, checking what the list gives.
///
/// # Safety
/// `bins` is the calling thread's for `heap`, whose memory it can access.
#[inline]
unsafe fn pop(bins: &mut Bins, k: usize, heap: usize, site: u16) -> usize {
    let p = bins.head[k - 1];
    if p == 0 {
        return 0;
    }
    // A cached block must still be a cached block of this heap: anything
    // else means the list was overwritten (a use after free).
    let tag = (p - HDR + 8) as *mut usize;
    // SAFETY: a non-zero head was pushed by free(), which validated it.
    if heap_of(p) != Some(heap) || unsafe { tag.read() } != CACHED | HDR {
        corrupt_cache(p);
    }
    // SAFETY: as above; the first word holds the next link. The block
    // takes its new owner's site.
    unsafe {
        bins.head[k - 1] = *(p as *const usize);
        tag.write(MAGIC | HDR);
        let sw = (p - HDR) as *mut usize;
        sw.write(sw.read() & SIZE_MASK | (site as usize) << SITE_SHIFT);
    }
    bins.count[k - 1] -= 1;
    p
}

#[cold]
fn foreign_chunk(heap: usize, p: usize) -> ! {
    crate::lifecycle::fatal(format_args!(
        "heap: heap {heap}'s allocator handed out {p:#x}, outside its slots: \
         its state (in the shim's .bss) was overwritten"
    ))
}

#[cold]
fn corrupt_cache(p: usize) -> ! {
    crate::lifecycle::fatal(format_args!(
        "heap: the thread cache holds {p:#x}, which is no longer a freed block of its heap: \
         a freed block was written after free (use after free)"
    ))
}

/// [`alloc`] without the thread cache: from an arena, under its lock.
fn alloc_locked(
    heap: usize,
    size: usize,
    align: usize,
    zero: bool,
    hint: &mut usize,
    site: u16,
) -> *mut u8 {
    if heap >= HEAPS || !align.is_power_of_two() || align > MAX_ALIGN {
        return core::ptr::null_mut();
    }
    let align = align.max(MIN_ALIGN);
    // Over-aligned: a 16-aligned chunk of size + align always holds an
    // `align`-aligned payload with a header in front of it.
    let total = match size.checked_add(if align == MIN_ALIGN { HDR } else { align }) {
        Some(t) => t,
        None => return core::ptr::null_mut(),
    };
    let Some(layout) = layout(total) else {
        return core::ptr::null_mut();
    };
    let _rights = Rights::for_heap(heap);
    let (first, held) = lock_some(heap, hint);
    // SAFETY: layout.size() is nonzero.
    let mut chunk = unsafe { held.talc().allocate(layout) };
    drop(held);
    // This arena's slot is full: try the heap's other arenas.
    let mut i = 1;
    while chunk.is_none() && i < ARENAS {
        let held = lock(heap * ARENAS + (first + i) % ARENAS);
        // SAFETY: as above.
        chunk = unsafe { held.talc().allocate(layout) };
        i += 1;
    }
    let Some(chunk) = chunk else {
        return core::ptr::null_mut();
    };
    let base = chunk.as_ptr() as usize;
    // talc's bins live in the shim's `.bss`: a chunk outside this heap's
    // slots means they were overwritten, and handing it out would put a
    // compartment's data where another can read it.
    if heap_of(base) != Some(heap) || heap_of(base + total - 1) != Some(heap) {
        foreign_chunk(heap, base);
    }
    let p = (base + HDR + align - 1) & !(align - 1);
    // SAFETY: base..base+total is ours; p - HDR >= base and p + size <= base + total.
    unsafe {
        write_header(p, total, p - base, site);
        if zero {
            core::ptr::write_bytes(p as *mut u8, 0, size);
        }
    }
    p as *mut u8
}

/// Free payload `p`: into the thread's cache when it fits, else to its arena.
///
/// # Safety
/// `p` must not be in use by anyone after this call (the usual `free`
/// contract); any other misuse is detected as far as the header allows.
#[inline]
pub unsafe fn free(p: usize) -> Result<(), Bad> {
    let (slot, start) = locate(p)?;
    let heap = slot / ARENAS;
    let _rights = Rights::for_heap(heap);
    // SAFETY: locate() checked that the header is committed; Rights gives access.
    let (size, off) = unsafe { header(p, start) }.ok_or(Bad::NotLive)?;
    // SAFETY: the header was just validated.
    if unsafe { ((p - HDR + 8) as *const usize).read() } & PROMOTED != 0 {
        unpromote(p, size - off, key_of(heap));
    }
    let k = (size - off) / MIN_ALIGN;
    if off == HDR && (1..=CLASSES).contains(&k) {
        let c = CACHE.with(Cell::get);
        if !c.is_null() {
            // SAFETY: the cache is this thread's.
            let bins = unsafe { &mut (*c).bins[heap] };
            if bins.count[k - 1] < BIN_LIMIT {
                // SAFETY: p is a live block of >= 16 bytes that the caller gives up.
                unsafe {
                    *(p as *mut usize) = bins.head[k - 1];
                    ((p - HDR + 8) as *mut usize).write(CACHED | HDR);
                }
                bins.head[k - 1] = p;
                bins.count[k - 1] += 1;
                return Ok(());
            }
        }
    }
    // SAFETY: the caller's contract.
    unsafe { free_locked(p) }
}

/// Free payload `p` to its arena, under the arena's lock.
///
/// # Safety
/// As [`free`].
unsafe fn free_locked(p: usize) -> Result<(), Bad> {
    let (slot, start) = locate(p)?;
    let _rights = Rights::for_heap(slot / ARENAS);
    let held = lock(slot);
    // SAFETY: locate() checked that the header is committed; Rights gives access.
    let (size, off) = unsafe { header(p, start) }.ok_or(Bad::NotLive)?;
    if size >= TRIM_THRESHOLD {
        // Give a large block's pages back to the kernel. talc keeps its
        // bookkeeping at the ends of free chunks, never in their interior,
        // and discarded pages read back as zeros; keys stay as they are.
        let a = (p + 64 + PAGE - 1) & !(PAGE - 1);
        let b = (p - off + size - 64) & !(PAGE - 1);
        if a < b {
            // SAFETY: the interior of a block that is being freed, in our slot.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
        }
    }
    // SAFETY: the header is valid and we hold the arena's lock.
    unsafe {
        ((p - HDR + 8) as *mut usize).write(FREED);
        held.talc().deallocate(
            (p - off) as *mut u8,
            Layout::from_size_align_unchecked(size, MIN_ALIGN),
        );
    }
    Ok(())
}

/// The site id in the header of payload `p`.
///
/// # Safety
/// `p`'s header is committed, readable and valid.
unsafe fn site_word(p: usize) -> u16 {
    // SAFETY: as the contract says.
    (unsafe { ((p - HDR) as *const usize).read() } >> SITE_SHIFT) as u16
}

/// The usable size and the allocation site of live payload `p`.
pub fn usable_size_and_site(p: usize) -> Result<(usize, u16), Bad> {
    let (slot, start) = locate(p)?;
    let _rights = Rights::for_heap(slot / ARENAS);
    // SAFETY: locate() checked that the header is committed; Rights gives access.
    let (size, off) = unsafe { header(p, start) }.ok_or(Bad::NotLive)?;
    // SAFETY: validated above.
    Ok((size - off, unsafe { site_word(p) }))
}

/// A block of the shim's heaps, as found for a fault report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// The payload's first byte and usable size.
    pub start: usize,
    pub size: usize,
    pub site: u16,
    /// In a thread cache: freed, so the access was a use after free.
    pub cached: bool,
}

/// The block whose header or payload holds `addr`: scans back from `addr`
/// for the nearest block header (16-byte aligned, magic tag) within the
/// committed part of its slot, and checks that the block reaches `addr`.
/// For fault reports: the caller must be able to read every heap (the
/// fault handler runs with all keys). `None` for free space and talc's
/// own metadata; a payload that happens to hold a header pattern can
/// mislead it.
pub fn block_at(addr: usize) -> Option<Block> {
    let (base, shift) = region()?;
    if !owns(addr) {
        return None;
    }
    let slot = (addr - base) >> shift;
    let start = base + (slot << shift);
    let committed = COMMITTED[slot].load(Ordering::Acquire);
    if addr >= committed {
        return None;
    }
    let mut h = addr & !(MIN_ALIGN - 1);
    loop {
        if h < start || h + HDR > committed {
            return None;
        }
        // SAFETY: [h, h + 16) is committed memory of this slot, and the
        // caller can read it.
        let (word, tag) = unsafe {
            (
                (h as *const usize).read(),
                (h as *const usize).add(1).read(),
            )
        };
        let live = tag & MAGIC_MASK == MAGIC;
        if live || tag == CACHED | HDR {
            let p = h + HDR;
            let size = word & SIZE_MASK;
            let off = tag & OFFSET_MASK;
            if off >= HDR && size >= off && off <= p - start && p + (size - off) <= committed {
                let usable = size - off;
                return (addr < p + usable).then_some(Block {
                    start: p,
                    size: usable,
                    site: (word >> SITE_SHIFT) as u16,
                    cached: !live,
                });
            }
        }
        h = h.checked_sub(MIN_ALIGN)?;
    }
}

/// Audit mode: put the page at `page`, which lies wholly inside live
/// block `b`'s payload, on key 0 so that the other compartment's accesses
/// stop faulting, and mark the block so that `free` gives the page back to
/// its heap's key (its memory must not stay shared for the next block).
/// Call with every key allowed (the fault handler).
pub fn share_page_for_audit(b: &Block, page: usize) -> bool {
    if page < b.start || page + PAGE > b.start + b.size || b.cached {
        return false;
    }
    let tag = (b.start - HDR + 8) as *mut usize;
    // SAFETY: the block's header (found by block_at), readable and
    // writable with every key.
    unsafe { tag.write(tag.read() | PROMOTED) };
    crate::pku::protect(page, PAGE, libc::PROT_READ | libc::PROT_WRITE, 0).is_ok()
}

#[cold]
fn unpromote(p: usize, usable: usize, key: u32) {
    let a = (p + PAGE - 1) & !(PAGE - 1);
    let b = (p + usable) & !(PAGE - 1);
    if key != 0 && a < b {
        let _ = crate::pku::protect(a, b - a, libc::PROT_READ | libc::PROT_WRITE, key);
    }
    // SAFETY: the caller validated p's header.
    unsafe {
        let tag = (p - HDR + 8) as *mut usize;
        tag.write(tag.read() & !PROMOTED);
    }
}

/// The usable size of payload `p`.
pub fn usable_size(p: usize) -> Result<usize, Bad> {
    let (slot, start) = locate(p)?;
    let _rights = Rights::for_heap(slot / ARENAS);
    // SAFETY: locate() checked that the header is committed; Rights gives access.
    let (size, off) = unsafe { header(p, start) }.ok_or(Bad::NotLive)?;
    Ok(size - off)
}

/// `realloc` of payload `p` (non-null, `size` > 0) within its own heap:
/// in place when talc can, else allocate, copy and free. `Ok(null)` when out
/// of memory (then `p` is untouched).
///
/// # Safety
/// As `realloc(3)`: `p` must not be used after a successful move.
pub unsafe fn realloc(p: usize, size: usize) -> Result<*mut u8, Bad> {
    let (slot, start) = locate(p)?;
    let heap = slot / ARENAS;
    let _rights = Rights::for_heap(heap);
    let old_usable;
    let site;
    {
        let held = lock(slot);
        // SAFETY: locate() checked that the header is committed; Rights gives access.
        let (total, off) = unsafe { header(p, start) }.ok_or(Bad::NotLive)?;
        old_usable = total - off;
        // SAFETY: the header was just validated.
        site = unsafe { site_word(p) };
        // SAFETY: as above.
        if unsafe { ((p - HDR + 8) as *const usize).read() } & PROMOTED != 0 {
            unpromote(p, old_usable, key_of(heap));
        }
        if off == HDR {
            if let Some(new_total) = size.checked_add(HDR).filter(|&t| layout(t).is_some()) {
                let base = (p - HDR) as *mut u8;
                // SAFETY: base/total describe a live chunk of this arena (lock held).
                if unsafe {
                    held.talc().try_realloc_in_place(
                        base,
                        Layout::from_size_align_unchecked(total, MIN_ALIGN),
                        new_total,
                    )
                } {
                    // SAFETY: the header is ours.
                    unsafe { write_header(p, new_total, HDR, site) };
                    return Ok(p as *mut u8);
                }
            }
        } else if size <= old_usable {
            // Over-aligned blocks shrink by keeping their chunk.
            return Ok(p as *mut u8);
        }
    }
    // The block keeps its heap and its site.
    let new = alloc(heap, size, MIN_ALIGN, false, site);
    if new.is_null() {
        return Ok(new);
    }
    // SAFETY: both blocks are live, distinct and accessible (Rights).
    unsafe {
        core::ptr::copy_nonoverlapping(p as *const u8, new, old_usable.min(size));
        free(p)?;
    }
    Ok(new)
}

// ---------------------------------------------------------------- fork

extern "C" fn fork_prepare() {
    for a in ARENA.iter() {
        a.lock.lock();
    }
}

extern "C" fn fork_release() {
    for a in ARENA.iter().rev() {
        // SAFETY: fork_prepare took every lock in this process (in the
        // child: in the parent, whose memory the child copied).
        unsafe { a.lock.unlock() };
    }
}

static FORK_HANDLERS: AtomicU8 = AtomicU8::new(0);

/// Take every arena lock around `fork`, so that the child never inherits a
/// heap in the middle of an update (thread caches are per thread and need
/// nothing), and make the thread caches' key. Once, by the constructor.
pub fn register_fork_handlers() {
    if FORK_HANDLERS.swap(1, Ordering::AcqRel) == 0 {
        create_cache_key();
        // The handlers are plain functions that never allocate.
        let r = crate::real::own_atfork(fork_prepare, fork_release, fork_release);
        if r != 0 {
            log::warn!(
                "heap: pthread_atfork failed ({r}); fork while allocating may deadlock the child"
            );
        }
    }
}

//! Unit tests of the heaps and the `shared_*` semantics, called directly
//! (the hooks are not part of unit-test binaries).

use super::heap::{self, Bad, ARENAS, HDR};
use super::*;
use core::ptr::null_mut;

fn errno() -> i32 {
    crate::stackfmt::errno()
}

#[test]
fn malloc_free_and_usable_size() {
    for size in [0usize, 1, 15, 16, 17, 100, 4096, 100_000, 3 << 20] {
        let p = shared_malloc(size) as *mut u8;
        assert!(!p.is_null(), "size {size}");
        assert_eq!(p as usize % 16, 0);
        assert!(heap::usable_size(p as usize).unwrap() >= size);
        assert_eq!(heap::heap_of(p as usize), Some(0));
        // SAFETY: p has `size` bytes.
        unsafe { core::ptr::write_bytes(p, 0xa5, size) };
        // SAFETY: p is live.
        unsafe { shared_free(p.cast(), 0) };
    }
    // SAFETY: free(NULL) does nothing.
    unsafe { shared_free(null_mut(), 0) };
}

#[test]
fn alignment_up_to_a_page_and_beyond() {
    let mut live = Vec::new();
    for shift in 0..=21 {
        let align = 1usize << shift;
        for size in [1usize, 24, 4096, 70_000] {
            let p = shared_memalign(align, size) as usize;
            assert!(
                p != 0 && p % align == 0,
                "align {align} size {size}: {p:#x}"
            );
            assert!(heap::usable_size(p).unwrap() >= size);
            // SAFETY: p has `size` bytes.
            unsafe { core::ptr::write_bytes(p as *mut u8, shift as u8, size) };
            live.push((p, size, shift as u8));
        }
    }
    for (p, size, v) in live {
        // SAFETY: each block is live and was filled with v.
        let s = unsafe { core::slice::from_raw_parts(p as *const u8, size) };
        assert!(s.iter().all(|&b| b == v), "overlap at {p:#x}");
        // SAFETY: live.
        unsafe { shared_free(p as *mut c_void, 0) };
    }
    // Not a power of two: memalign rounds up.
    let p = shared_memalign(48, 10) as usize;
    assert_eq!(p % 64, 0);
    // SAFETY: live.
    unsafe { shared_free(p as *mut c_void, 0) };
}

#[test]
fn posix_memalign_rules() {
    let mut p: *mut c_void = null_mut();
    // SAFETY: p is writable.
    unsafe {
        assert_eq!(shared_posix_memalign(&mut p, 3, 8), libc::EINVAL);
        assert_eq!(
            shared_posix_memalign(&mut p, 4, 8),
            libc::EINVAL,
            "not a multiple of sizeof(void *)"
        );
        assert!(p.is_null());
        assert_eq!(shared_posix_memalign(&mut p, 8192, 100), 0);
        assert_eq!(p as usize % 8192, 0);
        shared_free(p, 0);
        assert_eq!(
            shared_posix_memalign(&mut p, 64, usize::MAX - 8),
            libc::ENOMEM
        );
    }
}

#[test]
fn calloc_zeroes_and_detects_overflow() {
    // Dirty some memory first so that reuse would show.
    let d = shared_malloc(4096) as *mut u8;
    // SAFETY: 4096 bytes.
    unsafe { core::ptr::write_bytes(d, 0xff, 4096) };
    // SAFETY: live.
    unsafe { shared_free(d.cast(), 0) };
    let p = shared_calloc(64, 64) as *const u8;
    assert!(!p.is_null());
    // SAFETY: 4096 bytes.
    assert!(unsafe { core::slice::from_raw_parts(p, 4096) }
        .iter()
        .all(|&b| b == 0));
    // SAFETY: live.
    unsafe { shared_free(p as *mut c_void, 0) };
    set_errno(0);
    assert!(shared_calloc(usize::MAX / 2, 3).is_null());
    assert_eq!(errno(), libc::ENOMEM);
    set_errno(0);
    assert!(shared_malloc(usize::MAX - 4).is_null());
    assert_eq!(errno(), libc::ENOMEM);
}

#[test]
fn realloc_semantics() {
    // SAFETY: every pointer below is live where used.
    unsafe {
        let p = shared_realloc(null_mut(), 10, 0) as *mut u8;
        assert!(!p.is_null());
        for i in 0..10 {
            *p.add(i) = i as u8;
        }
        // Grow (probably moves), shrink (in place), grow a lot.
        let q = shared_realloc(p.cast(), 5000, 0) as *mut u8;
        assert!((0..10).all(|i| *q.add(i) == i as u8));
        let r = shared_realloc(q.cast(), 3, 0) as *mut u8;
        assert_eq!(r, q, "shrinking stays in place");
        assert!((0..3).all(|i| *r.add(i) == i as u8));
        let s = shared_realloc(r.cast(), 8 << 20, 0) as *mut u8;
        assert!((0..3).all(|i| *s.add(i) == i as u8));
        *s.add((8 << 20) - 1) = 7;
        // Size 0 frees and returns NULL.
        assert!(shared_realloc(s.cast(), 0, 0).is_null());
        // Over-aligned blocks keep their data and come back 16-aligned.
        let a = shared_memalign(4096, 100) as *mut u8;
        core::ptr::write_bytes(a, 9, 100);
        let b = shared_realloc(a.cast(), 50, 0) as *mut u8;
        assert_eq!(b, a);
        let c = shared_realloc(b.cast(), 100_000, 0) as *mut u8;
        assert!((0..50).all(|i| *c.add(i) == 9));
        shared_free(c.cast(), 0);
        // Out of memory leaves the block alone.
        let d = shared_malloc(32) as *mut u8;
        *d = 42;
        set_errno(0);
        assert!(shared_realloc(d.cast(), usize::MAX - 100, 0).is_null());
        assert_eq!(errno(), libc::ENOMEM);
        assert_eq!(*d, 42);
        shared_free(d.cast(), 0);
    }
}

#[test]
fn strdup_copies() {
    // SAFETY: a valid C string.
    let p = unsafe { shared_strdup(c"compartments".as_ptr()) };
    // SAFETY: p is a NUL-terminated copy.
    assert_eq!(unsafe { CStr::from_ptr(p) }, c"compartments");
    assert_eq!(heap::heap_of(p as usize), Some(0));
    // SAFETY: live.
    unsafe { shared_free(p.cast(), 0) };
}

#[test]
fn bad_pointers_are_refused() {
    let x = 0u64;
    // SAFETY: heap::free only validates foreign pointers.
    unsafe {
        assert_eq!(heap::free(&x as *const u64 as usize), Err(Bad::NotOurs));
        let p = shared_malloc(100) as usize;
        assert_eq!(heap::free(p + 16), Err(Bad::NotLive), "interior pointer");
        assert_eq!(heap::free(p + 3), Err(Bad::NotLive), "misaligned");
        assert_eq!(heap::free(p), Ok(()));
        assert_eq!(heap::free(p), Err(Bad::NotLive), "double free");
        assert_eq!(heap::usable_size(p), Err(Bad::NotLive));
        // Beyond the committed part of a slot: refused without touching it.
        let (start, _) = heap::region_range().unwrap();
        assert_eq!(
            heap::free(start + (ARENAS - 1) * (1 << 28) + HDR),
            Err(Bad::NotLive)
        );
    }
}

#[test]
fn compartment_heaps_are_separate() {
    let a = heap::alloc(3, 64, 16, false, 0) as usize;
    let b = heap::alloc(5, 64, 16, false, 0) as usize;
    assert_eq!(heap::heap_of(a), Some(3));
    assert_eq!(heap::heap_of(b), Some(5));
    // SAFETY: live blocks.
    unsafe {
        assert_eq!(
            heap::realloc(a, 200_000).map(|q| heap::heap_of(q as usize)),
            Ok(Some(3))
        );
        heap::free(b).unwrap();
    }
}

#[test]
fn grows_by_adding_regions() {
    // Far more than one growth step, in blocks that stay live.
    let blocks: Vec<usize> = (0..64).map(|_| shared_malloc(1 << 20) as usize).collect();
    assert!(blocks.iter().all(|&p| p != 0));
    let mut sorted = blocks.clone();
    sorted.sort();
    assert!(
        sorted.windows(2).all(|w| w[1] - w[0] >= 1 << 20),
        "no overlap"
    );
    for p in blocks {
        // SAFETY: live.
        unsafe { shared_free(p as *mut c_void, 0) };
    }
}

#[test]
fn large_blocks_return_their_pages_and_stay_usable() {
    for round in 0..3u8 {
        let p = shared_malloc(32 << 20) as *mut u8;
        assert!(!p.is_null());
        // SAFETY: 32 MiB block.
        unsafe {
            core::ptr::write_bytes(p, round + 1, 32 << 20);
            assert_eq!(*p.add((16 << 20) + 5), round + 1);
            shared_free(p.cast(), 0);
        }
    }
    // A neighbour of a trimmed block keeps its contents.
    let a = shared_malloc(8 << 20) as *mut u8;
    let b = shared_malloc(64) as *mut u8;
    // SAFETY: live blocks.
    unsafe {
        core::ptr::write_bytes(b, 7, 64);
        shared_free(a.cast(), 0);
        assert!(core::slice::from_raw_parts(b, 64).iter().all(|&x| x == 7));
        shared_free(b.cast(), 0);
    }
}

/// Random malloc/realloc/free from several threads, with blocks handed
/// between threads through a shared table, and a checksum on each block.
#[test]
fn threads_stress() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const SLOTS: usize = 512;
    let table: Arc<Vec<AtomicUsize>> = Arc::new((0..SLOTS).map(|_| AtomicUsize::new(0)).collect());
    fn fill(p: usize, size: usize, seed: u8) {
        // SAFETY: p has `size` bytes.
        unsafe { core::ptr::write_bytes(p as *mut u8, seed, size.min(256)) };
    }
    fn check(p: usize, size: usize, seed: u8) {
        // SAFETY: p has `size` bytes.
        let s = unsafe { core::slice::from_raw_parts(p as *const u8, size.min(256)) };
        assert!(s.iter().all(|&b| b == seed), "corrupted block {p:#x}");
    }
    // Each slot holds a pointer to a (block, size, seed) record in the block itself.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let table = table.clone();
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                let mut rnd = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                for _ in 0..20_000 {
                    let r = rnd();
                    let slot = &table[(r % SLOTS as u64) as usize];
                    let size = 24 + (1usize << (rnd() % 17)) + (rnd() % 64) as usize;
                    let seed = (r >> 32) as u8;
                    let old = slot.swap(0, Ordering::AcqRel);
                    let new = if old == 0 {
                        let p = shared_malloc(size) as usize;
                        assert!(p != 0);
                        p
                    } else {
                        // SAFETY: the record lives in the block's first 16 bytes.
                        let (osize, oseed) =
                            unsafe { (*(old as *const usize), *((old + 8) as *const u8)) };
                        check(old + 16, osize - 16, oseed);
                        if r & 1 == 0 {
                            // SAFETY: we own old.
                            unsafe { shared_free(old as *mut c_void, 0) };
                            continue;
                        }
                        // SAFETY: we own old.
                        let p = unsafe { shared_realloc(old as *mut c_void, size, 0) } as usize;
                        assert!(p != 0);
                        check(p + 16, osize.min(size) - 16, oseed);
                        p
                    };
                    // SAFETY: new has `size` >= 24 bytes.
                    unsafe {
                        *(new as *mut usize) = size;
                        *((new + 8) as *mut u8) = seed;
                    }
                    fill(new + 16, size - 16, seed);
                    let prev = slot.swap(new, Ordering::AcqRel);
                    if prev != 0 {
                        // SAFETY: we took prev out of the table.
                        unsafe { shared_free(prev as *mut c_void, 0) };
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for s in table.iter() {
        let p = s.swap(0, std::sync::atomic::Ordering::AcqRel);
        // SAFETY: the remaining blocks are owned by the table.
        unsafe { shared_free(p as *mut c_void, 0) };
    }
}

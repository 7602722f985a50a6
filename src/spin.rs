//! A test-and-test-and-set spin lock that yields after a short spin (the
//! heaps' arenas, the sealed heap). It never allocates, needs no thread identity (so the fork
//! handlers can release in the child what the parent's prepare handler
//! took), and its release is a plain store.

use core::sync::atomic::{AtomicBool, Ordering};

pub struct SpinLock(AtomicBool);

/// Spins before each `sched_yield` while the lock is held.
const SPINS: u32 = 64;

impl SpinLock {
    pub const fn new() -> Self {
        Self(AtomicBool::new(false))
    }

    /// Take the lock if it is free right now.
    #[inline]
    pub fn try_lock(&self) -> bool {
        !self.0.load(Ordering::Relaxed) && !self.0.swap(true, Ordering::Acquire)
    }

    #[inline]
    pub fn lock(&self) {
        if !self.try_lock() {
            self.lock_slow();
        }
    }

    #[cold]
    fn lock_slow(&self) {
        loop {
            let mut spins = 0;
            while self.0.load(Ordering::Relaxed) {
                if spins < SPINS {
                    core::hint::spin_loop();
                    spins += 1;
                } else {
                    // SAFETY: sched_yield has no preconditions.
                    unsafe { libc::sched_yield() };
                    spins = 0;
                }
            }
            if !self.0.swap(true, Ordering::Acquire) {
                return;
            }
        }
    }

    /// Release the lock.
    ///
    /// # Safety
    /// The caller holds the lock (or, in a fork child, its parent's prepare
    /// handler took it).
    #[inline]
    pub unsafe fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Default for SpinLock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn excludes_and_releases() {
        let l = SpinLock::new();
        assert!(l.try_lock());
        assert!(!l.try_lock());
        // SAFETY: held above.
        unsafe { l.unlock() };
        assert!(l.try_lock());
        // SAFETY: held above.
        unsafe { l.unlock() };
    }

    #[test]
    fn counts_correctly_under_contention() {
        struct Shared(SpinLock, core::cell::UnsafeCell<u64>);
        // SAFETY: the counter is only touched under the lock.
        unsafe impl Sync for Shared {}
        let s = Arc::new(Shared(SpinLock::new(), core::cell::UnsafeCell::new(0)));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        s.0.lock();
                        // SAFETY: exclusive under the lock.
                        unsafe { *s.1.get() += 1 };
                        // SAFETY: held above.
                        unsafe { s.0.unlock() };
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // SAFETY: all threads joined.
        assert_eq!(unsafe { *s.1.get() }, 80_000);
    }
}

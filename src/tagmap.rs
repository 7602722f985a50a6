//! Which address ranges carry a compartment's key right now: every
//! `pku::protect` records here, so the guards on libc's `pkey_mprotect` and
//! the syscall filter's handler can ask "does this range hold another key?"
//! without reading `/proc/self/smaps` (which allocates, and cannot run in a
//! signal handler). Covers the plan, thread TLS, dlopen'ed objects and the
//! per-compartment heaps alike. A fixed table under a spin lock: writers
//! (start-up, dlopen, thread start and exit, heap growth) wait; readers in
//! signal handlers only try, and a busy table answers "tagged" (fail closed).
//!
//! A compartment that could erase an entry would have the guards let it move
//! another compartment's pages to a key of its own, so `IA2_HARDEN=on` puts
//! the table on the shim key ([`harden`]): every compartment reads it, and
//! writers open the key for the write. The lock word stays on key 0, since
//! readers take it; a compartment that holds it stalls the writers and makes
//! the readers answer "tagged", which fails closed.

use crate::pku;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const CAP: usize = 2048;

#[derive(Clone, Copy)]
struct Entry {
    start: usize,
    end: usize,
    key: u32,
}

struct Table {
    n: usize,
    e: [Entry; CAP],
}

/// The table and its overflow count, on pages of their own (the shim key
/// once hardened).
#[repr(C, align(4096))]
struct Sealed {
    table: core::cell::UnsafeCell<Table>,
    /// Ranges that did not fit: while non-zero, every query answers "tagged".
    overflow: AtomicUsize,
}

// SAFETY: `table` is only touched while `BUSY` is held.
unsafe impl Sync for Sealed {}

static SEALED: Sealed = Sealed {
    table: core::cell::UnsafeCell::new(Table {
        n: 0,
        e: [Entry {
            start: 0,
            end: 0,
            key: 0,
        }; CAP],
    }),
    overflow: AtomicUsize::new(0),
};
/// The table's lock (key 0: readers take it too).
static BUSY: AtomicBool = AtomicBool::new(false);

/// Put the table on the shim key (`IA2_HARDEN=on`, hardware keys; once the
/// key exists and before any compartment code runs).
pub fn harden(key: u32) {
    pku::seal_static(&SEALED, key, "key map");
}

fn with<R>(wait: bool, f: impl FnOnce(&mut Table) -> R) -> Option<R> {
    loop {
        if BUSY
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            break;
        }
        if !wait {
            return None;
        }
        core::hint::spin_loop();
    }
    // SAFETY: `busy` is ours until the store below.
    let r = f(unsafe { &mut *SEALED.table.get() });
    BUSY.store(false, Ordering::Release);
    Some(r)
}

/// Hold the table's lock across `fork`, so that the child never inherits
/// it held by a thread it does not have (one that was recording an
/// `munmap` the filter checked, say): the child's next record, at its first
/// thread start, would spin forever. Registered first of the shim's fork
/// handlers, so its prepare handler runs last, after the heaps' and the
/// census's: every other lock that a recorder may hold is taken before it.
pub fn register_fork_handlers() {
    extern "C" fn prepare() {
        while BUSY
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
    }
    extern "C" fn release() {
        BUSY.store(false, Ordering::Release);
    }
    // Plain functions that never allocate.
    let r = crate::real::own_atfork(prepare, release, release);
    if r != 0 {
        log::warn!("key map: pthread_atfork failed ({r}); a fork child may inherit its lock");
    }
}

/// Record that `[start, start+len)` now carries `key` (0: no compartment's).
pub fn record(start: usize, len: usize, key: u32) {
    let end = start.saturating_add(len);
    pku::with_shim_writes(|| with(true, |t| record_in(t, start, end, key)));
}

fn record_in(t: &mut Table, start: usize, end: usize, key: u32) {
    {
        // Cut the range out of every entry, splitting where needed.
        let mut i = 0;
        while i < t.n {
            let e = t.e[i];
            if e.end <= start || end <= e.start {
                i += 1;
                continue;
            }
            let (left, right) = (e.start < start, end < e.end);
            match (left, right) {
                (false, false) => {
                    t.n -= 1;
                    t.e[i] = t.e[t.n];
                    continue;
                }
                (true, false) => t.e[i].end = start,
                (false, true) => t.e[i].start = end,
                (true, true) => {
                    t.e[i].end = start;
                    if t.n < CAP {
                        t.e[t.n] = Entry { start: end, ..e };
                        t.n += 1;
                    } else {
                        SEALED.overflow.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            i += 1;
        }
        if key != 0 {
            if t.n < CAP {
                t.e[t.n] = Entry { start, end, key };
                t.n += 1;
            } else {
                SEALED.overflow.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The key of some compartment range overlapping `[start, start+len)`
/// other than `except` (0: any), or `Some(u32::MAX)` when the table cannot
/// answer (busy in a signal handler, or overflowed): fail closed.
pub fn other_key_in(start: usize, len: usize, except: u32, wait: bool) -> Option<u32> {
    if SEALED.overflow.load(Ordering::Relaxed) != 0 {
        return Some(u32::MAX);
    }
    let end = start.saturating_add(len);
    with(wait, |t| {
        t.e[..t.n]
            .iter()
            .find(|e| e.start < end && start < e.end && e.key != except)
            .map(|e| e.key)
    })
    .unwrap_or(Some(u32::MAX))
}

/// The keys (bit k = key k) of compartment ranges overlapping
/// `[start, start+len)`; every bit when the table cannot answer (busy and
/// `!wait`, or overflowed): fail closed.
pub fn keys_in(start: usize, len: usize, wait: bool) -> u32 {
    if SEALED.overflow.load(Ordering::Relaxed) != 0 {
        return u32::MAX;
    }
    let end = start.saturating_add(len);
    with(wait, |t| {
        t.e[..t.n]
            .iter()
            .filter(|e| e.start < end && start < e.end)
            .fold(0u32, |m, e| m | 1 << (e.key & 31))
    })
    .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_splits_and_answers() {
        let base = 0x7000_0000_0000usize;
        record(base, 0x4000, 3);
        assert_eq!(other_key_in(base + 0x1000, 0x10, 0, true), Some(3));
        assert_eq!(other_key_in(base + 0x1000, 0x10, 3, true), None);
        // Back to key 0 in the middle: the ends keep key 3.
        record(base + 0x1000, 0x2000, 0);
        assert_eq!(other_key_in(base + 0x1000, 0x2000, 0, true), None);
        assert_eq!(other_key_in(base, 0x1000, 0, true), Some(3));
        assert_eq!(other_key_in(base + 0x3000, 0x1000, 0, true), Some(3));
        assert_eq!(other_key_in(base - 0x1000, 0x1000, 0, true), None);
        assert_eq!(keys_in(base, 0x4000, true), 1 << 3);
        record(base, 0x4000, 0);
        assert_eq!(other_key_in(base, 0x4000, 0, true), None);
        assert_eq!(keys_in(base, 0x4000, true), 0);
    }
}

//! The site table (one entry per distinct page, key and RIP) and the hot pages that audit mode stops faulting on.

use super::*;

// ---------------------------------------------------------------- the site table

pub(in crate::fault) const SITE_CAP: usize = 4096;
pub(in crate::fault) const EMPTY: u32 = 0;
pub(in crate::fault) const CLAIMED: u32 = 1;
pub(in crate::fault) const READY: u32 = 2;

/// One distinct (page, key, RIP). Written once by the thread that claims
/// it; afterwards only `hits` changes, and the summary's scratch fields.
pub(in crate::fault) struct Site {
    pub(in crate::fault) state: AtomicU32,
    /// Page address | key.
    pub(in crate::fault) page_key: AtomicUsize,
    pub(in crate::fault) rip: AtomicUsize,
    /// The first faulting address.
    pub(in crate::fault) addr: AtomicUsize,
    /// The interrupted PKRU at the first fault.
    pub(in crate::fault) pkru: AtomicU32,
    pub(in crate::fault) write: AtomicBool,
    pub(in crate::fault) hits: AtomicU64,
    /// The compartment-heap block's allocation site at the first fault:
    /// `site id | heap << 16` (0: not heap memory). Kept because the block
    /// may be gone by the time the summary is printed.
    pub(in crate::fault) heap_site: AtomicU32,
    // Summary scratch: group key, the page range of this site's fix, and
    // whether it leads a group whose fix is emitted.
    pub(in crate::fault) gkey: [AtomicUsize; 3],
    pub(in crate::fault) fix: [AtomicUsize; 2],
    pub(in crate::fault) emitted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
pub(in crate::fault) const NEW_SITE: Site = Site {
    state: AtomicU32::new(EMPTY),
    page_key: AtomicUsize::new(0),
    rip: AtomicUsize::new(0),
    addr: AtomicUsize::new(0),
    pkru: AtomicU32::new(0),
    write: AtomicBool::new(false),
    hits: AtomicU64::new(0),
    heap_site: AtomicU32::new(0),
    gkey: [
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ],
    fix: [AtomicUsize::new(0), AtomicUsize::new(0)],
    emitted: AtomicBool::new(false),
};

// Large: with the other large statics (sealed.ld).
#[link_section = ".bss.ia2shim_large"]
pub(in crate::fault) static SITES: [Site; SITE_CAP] = [NEW_SITE; SITE_CAP];
/// `ORDER[n]` = 1 + the slot of the n-th site seen (0: being written).
#[allow(clippy::declare_interior_mutable_const)]
pub(in crate::fault) const NO_ORDER: AtomicU32 = AtomicU32::new(0);
// Large: with the other large statics (sealed.ld).
#[link_section = ".bss.ia2shim_large"]
pub(in crate::fault) static ORDER: [AtomicU32; SITE_CAP] = [NO_ORDER; SITE_CAP];
pub(in crate::fault) static ORDER_LEN: AtomicUsize = AtomicUsize::new(0);
/// Faults not recorded because the table was full.
pub(in crate::fault) static DROPPED: AtomicU64 = AtomicU64::new(0);
pub(in crate::fault) static SUMMARY_DONE: AtomicBool = AtomicBool::new(false);

pub(in crate::fault) fn hash(page_key: usize, rip: usize) -> usize {
    let h = (page_key ^ rip.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 40) & (SITE_CAP - 1)
}

/// Record a fault; returns the site's first-seen number (1-based; 0 for a
/// site seen before), whether it is new and its hits so far, or `None` when
/// the table is full.
pub(in crate::fault) fn record(
    page_key: usize,
    rip: usize,
    addr: usize,
    pkru: u32,
    write: bool,
) -> Option<(usize, bool, u64)> {
    let mut i = hash(page_key, rip);
    let mut probes = 0;
    let mut spins = 0u32;
    while probes < SITE_CAP {
        let s = &SITES[i];
        match s.state.load(Acquire) {
            EMPTY => {
                if s.state
                    .compare_exchange(EMPTY, CLAIMED, AcqRel, Acquire)
                    .is_ok()
                {
                    s.page_key.store(page_key, Relaxed);
                    s.rip.store(rip, Relaxed);
                    s.addr.store(addr, Relaxed);
                    s.pkru.store(pkru, Relaxed);
                    s.write.store(write, Relaxed);
                    s.hits.store(1, Relaxed);
                    let n = ORDER_LEN.fetch_add(1, AcqRel);
                    if let Some(o) = ORDER.get(n) {
                        o.store(i as u32 + 1, Release);
                    }
                    s.state.store(READY, Release);
                    return Some((n + 1, true, 1));
                }
                continue; // lost the race: look at this slot again
            }
            CLAIMED if spins < 100_000 => {
                // Another thread is filling it in (a few stores).
                spins += 1;
                core::hint::spin_loop();
                continue;
            }
            READY if s.page_key.load(Relaxed) == page_key && s.rip.load(Relaxed) == rip => {
                let hits = s.hits.fetch_add(1, Relaxed) + 1;
                return Some((0, false, hits));
            }
            _ => {}
        }
        spins = 0;
        probes += 1;
        i = (i + 1) & (SITE_CAP - 1);
    }
    DROPPED.fetch_add(1, Relaxed);
    None
}

/// The site first seen `n`-th (1-based), as [`record`] numbers them.
pub(in crate::fault) fn site_by_order(n: usize) -> Option<&'static Site> {
    let slot = ORDER.get(n.checked_sub(1)?)?.load(Acquire);
    SITES.get((slot as usize).checked_sub(1)?)
}

/// The recorded sites in first-seen order.
pub(in crate::fault) fn sites() -> impl Iterator<Item = &'static Site> {
    let n = ORDER_LEN.load(Acquire).min(SITE_CAP);
    (0..n).filter_map(|k| {
        let slot = ORDER[k].load(Acquire);
        let s = SITES.get((slot as usize).checked_sub(1)?)?;
        (s.state.load(Acquire) == READY).then_some(s)
    })
}

// ---------------------------------------------------------------- hot pages

/// Faults on one page after which audit mode shares it (key 0) for the rest
/// of the run. Sharing is per page, so once a page has faulted the learned
/// policy shares it whatever else touches it: later faults could only add
/// counts and sites, at the price of two signals each (a hot loop in the
/// emulated guest would otherwise run for hours).
pub const HOT_PAGE: u64 = 1000;
pub(in crate::fault) const PROMOTED_CAP: usize = 256;
#[allow(clippy::declare_interior_mutable_const)]
pub(in crate::fault) const NO_PAGE: AtomicUsize = AtomicUsize::new(0);
/// Page | key of each page shared early.
pub(in crate::fault) static PROMOTED: [AtomicUsize; PROMOTED_CAP] = [NO_PAGE; PROMOTED_CAP];
pub(in crate::fault) static PROMOTED_LEN: AtomicUsize = AtomicUsize::new(0);

/// Faults seen (sampling clock for `page_hits`).
pub(in crate::fault) static FAULTS: AtomicU64 = AtomicU64::new(0);

pub(in crate::fault) fn page_hits(page_key: usize) -> u64 {
    sites()
        .filter(|s| s.page_key.load(Relaxed) == page_key)
        .map(|s| s.hits.load(Relaxed))
        .sum()
}

pub(in crate::fault) fn promoted(page_key: usize) -> bool {
    let n = PROMOTED_LEN.load(Acquire).min(PROMOTED_CAP);
    PROMOTED[..n].iter().any(|p| p.load(Relaxed) == page_key)
}

/// Share a hot page: put it on key 0 with the protection the plan recorded.
pub(in crate::fault) fn promote(addr: usize, page_key: usize) -> bool {
    if promoted(page_key) {
        return true; // another thread did it; this fault raced with it
    }
    let Some(rt) = runtime::get() else {
        return false;
    };
    let Ok(c) = rt.census.try_read() else {
        return false;
    };
    let Some(e) = c.plan.lookup(addr) else {
        return false;
    };
    let n = PROMOTED_LEN.fetch_add(1, AcqRel);
    if n >= PROMOTED_CAP || crate::pku::protect(page_down(addr), PAGE, e.prot, 0).is_err() {
        return false;
    }
    PROMOTED[n].store(page_key, Release);
    true
}

//! Per-thread TLS geometry on x86-64 glibc (TLS variant II): the thread
//! pointer and TCB at `%fs:0`, the DTV pointer at `%fs:8`, static TLS blocks
//! below the thread pointer.

use crate::objects::{page_down, Range, PAGE};

/// Size of one DTV entry (`dtv_t`: a pointer pair).
const DTV_ENTRY: usize = 16;

/// The calling thread's thread pointer (`%fs:0`, the TCB's self pointer).
pub fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: on x86-64 Linux `%fs:0` always holds the TCB self pointer.
    unsafe {
        core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags))
    };
    tp
}

/// The calling thread's DTV pointer (`%fs:8`), which points at `dtv[0]` (the
/// generation counter); `dtv[-1]` holds the number of entries allocated.
pub fn dtv_pointer() -> usize {
    let dtv: usize;
    // SAFETY: `%fs:8` is tcbhead_t.dtv in glibc's TCB.
    unsafe {
        core::arch::asm!("mov {}, qword ptr fs:[8]", out(reg) dtv, options(nostack, readonly, preserves_flags))
    };
    dtv
}

/// The DTV's full extent, header included: `[dtv-16, dtv + 16*(len+1))`.
///
/// # Safety
/// `dtv` must be a live glibc DTV pointer (from `%fs:8` of some thread).
pub unsafe fn dtv_range(dtv: usize) -> Range {
    // SAFETY: dtv[-1].counter is the allocated length (see glibc's allocate_dtv).
    let len = unsafe { *((dtv - DTV_ENTRY) as *const usize) };
    Range::new(dtv - DTV_ENTRY, dtv + DTV_ENTRY * (len + 1))
}

/// The calling thread's TLS block of module `modid`, read from its DTV
/// (what `dl_iterate_phdr` reports as `dlpi_tls_data`, without taking
/// ld.so's lock, which a `fork` child may have inherited held). `None`:
/// not allocated in this thread (yet).
pub fn dtv_block(modid: usize) -> Option<usize> {
    let dtv = dtv_pointer();
    // SAFETY: this thread's live DTV; dtv[-1].counter is its length.
    let len = unsafe { *((dtv - DTV_ENTRY) as *const usize) };
    if modid == 0 || modid > len {
        return None;
    }
    // SAFETY: entry `modid` is inside the DTV; its first word is the block
    // (TLS_DTV_UNALLOCATED, all ones, until first use).
    let v = unsafe { *((dtv + DTV_ENTRY * modid) as *const usize) };
    (v != 0 && v != usize::MAX).then_some(v)
}

/// The page holding the thread pointer.
pub fn tcb_page(tp: usize) -> Range {
    Range::new(page_down(tp), page_down(tp) + PAGE)
}

/// The single page right below the TCB page.
pub fn below_tcb_page(tp: usize) -> Range {
    Range::new(page_down(tp) - PAGE, page_down(tp))
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static MARK: core::cell::Cell<u64> = const { core::cell::Cell::new(7) };
    }

    #[test]
    fn geometry_of_this_thread() {
        let tp = thread_pointer();
        assert_ne!(tp, 0);
        // Static TLS lies below the thread pointer (variant II).
        let mark = MARK.with(|m| m as *const _ as usize);
        assert!(mark < tp, "{mark:#x} {tp:#x}");
        let dtv = dtv_pointer();
        // SAFETY: our own thread's DTV.
        let r = unsafe { dtv_range(dtv) };
        assert!(r.len() >= 3 * DTV_ENTRY && r.contains(dtv));
        assert_eq!(tcb_page(tp).len(), PAGE);
        assert_eq!(below_tcb_page(tp).end, tcb_page(tp).start);
    }
}

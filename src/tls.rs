//! Per-thread TLS geometry on x86-64 glibc (TLS variant II): the thread
//! pointer and TCB at `%fs:0`, the DTV pointer at `%fs:8`, static TLS blocks
//! below the thread pointer.

use crate::objects::{page_down, Range, PAGE};
use core::sync::atomic::{AtomicBool, Ordering};

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

/// Whether the TLS layout is in effect: `ia2run` preloaded pad objects, and
/// the loader aligned the thread pointer to a page (a 4096-aligned pad).
static LAYOUT: AtomicBool = AtomicBool::new(false);

/// Record, once the census is taken, whether pad objects are loaded.
pub fn note_layout(pads_loaded: bool) {
    let aligned = thread_pointer() % PAGE == 0;
    LAYOUT.store(pads_loaded && aligned, Ordering::Relaxed);
}

pub fn layout() -> bool {
    LAYOUT.load(Ordering::Relaxed)
}

/// The page the `below_tcb` carveout keeps shared: the page below the TCB
/// page, or nothing under the TLS layout, where the TCB's page holds no
/// block and the page below it holds the first TLS module's block alone
/// (padded to the page), so the plan's TLS rules decide its key.
pub fn below_tcb_shared(tp: usize) -> Range {
    if layout() {
        Range::new(page_down(tp), page_down(tp))
    } else {
        below_tcb_page(tp)
    }
}

/// Put `LD_PRELOAD` back to `original` (`IA2_TLS_PRELOAD`) in this
/// process's environment, in place: the loader has used the layout's list,
/// and programs this one executes must not inherit it (they have their own
/// link maps). Returns false when there is nothing to restore or the
/// original is longer than the current value.
pub fn restore_preload(original: &str) -> bool {
    extern "C" {
        static environ: *const *mut libc::c_char;
    }
    const KEY: &[u8] = b"LD_PRELOAD=";
    // SAFETY: the constructor runs before any thread exists; `environ` is a
    // NULL-terminated array of NUL-terminated strings that the process owns.
    unsafe {
        let mut p = environ;
        while !p.is_null() && !(*p).is_null() {
            let entry = *p;
            let len = libc::strlen(entry);
            let bytes = core::slice::from_raw_parts(entry as *const u8, len);
            if bytes.starts_with(KEY) {
                let value_len = len - KEY.len();
                if original.len() > value_len {
                    return false;
                }
                let dst = entry.add(KEY.len()) as *mut u8;
                core::ptr::copy_nonoverlapping(original.as_ptr(), dst, original.len());
                *dst.add(original.len()) = 0;
                return true;
            }
            p = p.add(1);
        }
    }
    false
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

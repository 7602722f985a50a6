//! The step table (pending single-steps per thread) and the signal frame's XSAVE PKRU slot.

use super::*;

// ---------------------------------------------------------------- the step table

pub(in crate::fault) const STEP_CAP: usize = 512;

/// A pending single step: claimed by one thread (by tid) between its fault
/// and its trap. Only the owning thread writes the fields.
pub(in crate::fault) struct Step {
    pub(in crate::fault) tid: AtomicI32,
    pub(in crate::fault) seq: AtomicU64,
    pub(in crate::fault) saved: AtomicU32,
    pub(in crate::fault) allow: AtomicU32,
    pub(in crate::fault) rip: AtomicUsize,
    pub(in crate::fault) page_key: AtomicUsize,
    /// TF was set before we set it: the program (or a debugger) is
    /// single-stepping, so the trap is theirs too.
    pub(in crate::fault) program_tf: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
pub(in crate::fault) const NEW_STEP: Step = Step {
    tid: AtomicI32::new(0),
    seq: AtomicU64::new(0),
    saved: AtomicU32::new(0),
    allow: AtomicU32::new(0),
    rip: AtomicUsize::new(0),
    page_key: AtomicUsize::new(0),
    program_tf: AtomicBool::new(false),
};

pub(in crate::fault) static STEPS: [Step; STEP_CAP] = [NEW_STEP; STEP_CAP];
pub(in crate::fault) static STEP_SEQ: AtomicU64 = AtomicU64::new(1);

pub(in crate::fault) fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// The calling thread's newest pending step.
pub(in crate::fault) fn newest_step(tid: i32) -> Option<&'static Step> {
    STEPS
        .iter()
        .filter(|s| s.tid.load(Acquire) == tid)
        .max_by_key(|s| s.seq.load(Relaxed))
}

pub(in crate::fault) fn claim_step(tid: i32) -> Option<&'static Step> {
    let s = STEPS.iter().find(|s| {
        s.tid.load(Relaxed) == 0 && s.tid.compare_exchange(0, tid, AcqRel, Relaxed).is_ok()
    })?;
    s.seq.store(STEP_SEQ.fetch_add(1, Relaxed), Relaxed);
    Some(s)
}

// ---------------------------------------------------------------- XSAVE access

/// The PKRU slot in the signal frame's XSAVE area, if the frame has one
/// that the kernel will restore on `sigreturn`.
///
/// # Safety
/// `uc` must be the ucontext passed to a signal handler.
pub(in crate::fault) unsafe fn pkru_slot(
    uc: *mut libc::ucontext_t,
) -> Option<(*mut u32, *mut u64)> {
    let off = PKRU_XSAVE_OFFSET.load(Relaxed);
    // SAFETY: the kernel passes a valid ucontext.
    let fp = unsafe { (*uc).uc_mcontext.fpregs } as *mut u8;
    if off == 0 || fp.is_null() {
        return None;
    }
    // SAFETY: the legacy FXSAVE area is 512 bytes; its software-reserved
    // bytes 464.. hold `struct _fpx_sw_bytes` (magic1, extended_size,
    // xfeatures, xstate_size).
    let (magic, xfeatures, size) = unsafe {
        (
            core::ptr::read_unaligned(fp.add(464) as *const u32),
            core::ptr::read_unaligned(fp.add(472) as *const u64),
            core::ptr::read_unaligned(fp.add(480) as *const u32) as usize,
        )
    };
    if magic != FP_XSTATE_MAGIC1 || xfeatures & XFEATURE_PKRU == 0 || size < off + 4 {
        return None;
    }
    // SAFETY: the XSAVE header follows the legacy area, and the PKRU
    // component lies inside the frame's xstate_size (checked above).
    Some(unsafe { (fp.add(off) as *mut u32, fp.add(512) as *mut u64) })
}

/// # Safety
/// `slot` must come from [`pkru_slot`] for a live signal frame.
pub(in crate::fault) unsafe fn set_frame_pkru(slot: (*mut u32, *mut u64), pkru: u32) {
    // SAFETY: both pointers lie in the frame (see `pkru_slot`).
    unsafe {
        core::ptr::write_unaligned(slot.0, pkru);
        let bv = core::ptr::read_unaligned(slot.1);
        core::ptr::write_unaligned(slot.1, bv | XFEATURE_PKRU);
    }
}

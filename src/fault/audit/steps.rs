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

// Large: with the other large statics (sealed.ld).
#[link_section = ".bss.ia2shim_large"]
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

// The frame's PKRU slot: one reader and writer for every signal path.
pub(in crate::fault) use crate::sigframe::{pkru_slot, set_frame_pkru};

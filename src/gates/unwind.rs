//! The gate's personality routine: C++ exceptions and forced unwinds that cross a gate restore the caller's PKRU.

use super::*;

/// The personality routine of the variant code's FDEs, at a gate's return
/// point. Search phase: add the caller's rights (the unwinder is about to
/// read the caller's unwind data). Cleanup phase (exceptions and forced
/// unwinds): land in the variant's pad.
pub(super) unsafe extern "C" fn gate_personality(
    _version: c_int,
    actions: c_int,
    _class: u64,
    exc: *mut c_void,
    ctx: *mut c_void,
) -> c_int {
    const UA_SEARCH_PHASE: c_int = 1;
    const UA_CLEANUP_PHASE: c_int = 2;
    const URC_INSTALL_CONTEXT: c_int = 7;
    const URC_CONTINUE_UNWIND: c_int = 8;
    // A forced unwind may run in glibc's SIGCANCEL handler (key 0 alone).
    pku::open_shim_reads();
    // The private _Unwind_GetGR/_Unwind_SetGR below, on the process
    // unwinder's context.
    crate::unwinder::ready();
    // SAFETY: ctx is the unwinder's context for this frame.
    let ip = unsafe { _Unwind_GetIP(ctx) };
    let pad = match return_point(ip) {
        Some(false) => addr(ia2shim_gate_pad_hw),
        Some(true) => addr(ia2shim_gate_pad_sim),
        None => return URC_CONTINUE_UNWIND,
    };
    if actions & UA_SEARCH_PHASE != 0 {
        // The search goes on into the caller's frames, whose unwind data
        // (personality and type-info pointers, `DW.ref.*`) may sit in the
        // caller's tagged .data. Add the caller's rights to the thread's
        // for the rest of the search; `crate::cxx`'s personality wrappers
        // narrow again when it ends, and the pad restores the caller's
        // exact PKRU in the cleanup phase.
        // SAFETY: DWARF register 3 is rbx, which holds the gate frame at
        // the gate's return point.
        let frame = unsafe { _Unwind_GetGR(ctx, 3) };
        if frame != 0 {
            // SAFETY: a live gate frame of this thread (on key 0).
            let caller = unsafe { core::ptr::read_volatile((frame + 32) as *const u32) };
            pku::write_pkru(pku::read_pkru() & caller);
        }
        return URC_CONTINUE_UNWIND;
    }
    if actions & UA_CLEANUP_PHASE == 0 {
        return URC_CONTINUE_UNWIND;
    }
    // SAFETY: DWARF register 0 is rax, which the pad reads; the pad is code
    // that expects exactly this frame state.
    unsafe {
        _Unwind_SetGR(ctx, 0, exc as usize);
        _Unwind_SetIP(ctx, pad);
    }
    URC_INSTALL_CONTEXT
}

//! Kernel SIGSEGVs: the rseq area that the kernel writes with the running PKRU.

use super::*;

// ---------------------------------------------------------------- kernel SIGSEGVs

/// glibc's `__rseq_offset` (from the thread pointer) and `__rseq_size` (0:
/// rseq not registered, e.g. `GLIBC_TUNABLES=glibc.pthread.rseq=0`).
pub(in crate::fault) static RSEQ_OFFSET: AtomicIsize = AtomicIsize::new(0);
pub(in crate::fault) static RSEQ_SIZE: AtomicUsize = AtomicUsize::new(0);

/// Read glibc's rseq ABI variables (constructor time).
pub(in crate::fault) fn read_rseq_abi() {
    let get = |name: &CStr| -> Option<usize> {
        // SAFETY: dlsym with a NUL-terminated name.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as *const usize;
        // SAFETY: a non-null result points at the variable, plain data in
        // libc (an `unsigned int` size, a `ptrdiff_t` offset: 8 bytes are
        // readable either way, and the caller masks the size).
        (!p.is_null()).then(|| unsafe { core::ptr::read_unaligned(p) })
    };
    let size = get(c"__rseq_size").map_or(0, |v| v & 0xffff_ffff);
    if let Some(off) = get(c"__rseq_offset") {
        RSEQ_OFFSET.store(off as isize, Relaxed);
        RSEQ_SIZE.store(size, Relaxed);
    }
}

/// The page of the main thread's rseq area, if the plan gave it a key:
/// `(area, page entry's compartment, its key, its protection)`.
pub(in crate::fault) fn tagged_rseq_page(
    rt: &Runtime,
    c: &Census,
) -> Option<(usize, u8, u32, i32)> {
    if RSEQ_SIZE.load(Relaxed) == 0 {
        return None;
    }
    let area = crate::tls::thread_pointer().wrapping_add_signed(RSEQ_OFFSET.load(Relaxed));
    let e = c.plan.lookup(area)?;
    let comp = e.compartment?;
    Some((area, comp, rt.key_of(comp), e.prot))
}

/// Audit mode cannot let the kernel's own writes through: when the kernel
/// fails to update a thread's rseq area on preemption or signal delivery,
/// no fault reaches the shim, the kernel kills the process (when the write
/// was for delivering a SIGSEGV, without running any handler). So when the
/// plan tagged the page of the main thread's rseq area, audit mode keeps it
/// on key 0 and records it as a site (RIP 0: the kernel), so that the
/// summary's policy shares it.
pub(in crate::fault) fn share_rseq_page() {
    let Some(rt) = runtime::get() else { return };
    let Ok(c) = rt.census.read() else { return };
    let Some((area, _, key, prot)) = tagged_rseq_page(rt, &c) else {
        return;
    };
    if crate::pku::protect(page_down(area), PAGE, prot, 0).is_ok() {
        record(
            page_down(area) | key as usize,
            0,
            area,
            crate::pku::pkru_allowing(0),
            true,
        );
    }
}

/// A SIGSEGV that the kernel raised itself (`SI_KERNEL`). The likeliest
/// cause under the shim: on preemption and signal delivery the kernel
/// writes the thread's rseq area (in glibc's `struct pthread`, next to the
/// TCB) with the thread's PKRU, and fails when that page carries a key the
/// running compartment lacks. Say so, with the fix, and in audit mode add
/// it to the summary's policy. Call with every key allowed.
///
/// # Safety
/// `uc` must be the ucontext passed to a SIGSEGV handler.
pub(in crate::fault) unsafe fn kernel_segv(uc: *const libc::ucontext_t) {
    let rt = runtime::get();
    let census = rt.and_then(|r| r.census.try_read().ok());
    let Some((rt, c)) = rt.zip(census.as_deref()) else {
        return;
    };
    let Some((area, comp, key, _)) = tagged_rseq_page(rt, c) else {
        return;
    };
    // SAFETY: the caller's signal frame.
    let pkru = unsafe { interrupted_pkru(uc) }.unwrap_or(0);
    if crate::pku::pkru_allows(pkru, key, true) {
        return;
    }
    // SAFETY: valid ucontext from the kernel.
    let rip = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] } as usize;
    let class = classify(Some(c), area);
    let fix = Fix::for_site(Some(c), class, area);
    let n = if configured() {
        record(page_down(area) | key as usize, rip, area, pkru, true).map(|(n, _, _)| n)
    } else {
        None
    };
    let p = pid();
    let mut b = StackBuf::<1024>::new();
    if json() {
        let _ = writeln!(
            b,
            "{{\"type\":\"kernel_fault\",\"pid\":{p},\"site\":{},\"cause\":\"rseq\",\"addr\":\"{area:#x}\",\"page\":\"{:#x}\",\"pkey\":{key},\"page_compartment\":{comp},\"running_compartment\":{},\"pkru\":\"{pkru:#010x}\",\"rip\":\"{rip:#x}\",\"class\":\"{}\",\"fix\":\"{}\"}}",
            N(n),
            page_down(area),
            N(running_compartment(Some(rt), pkru)),
            class.kind(),
            share_assignment(&fix).as_str(),
        );
    } else {
        let _ = writeln!(
            b,
            "ia2shim[{p}]: SIGSEGV from the kernel (SI_KERNEL): the thread's rseq area at {area:#x} \
             (in glibc's struct pthread) lies on a page with key {key} = compartment {comp}, which \
             the running code (PKRU {pkru:#010x}) may not write, so the kernel cannot update it; \
             fix {} (or GLIBC_TUNABLES=glibc.pthread.rseq=0)",
            share_assignment(&fix).as_str()
        );
    }
    emit(&b);
}

//! Per-thread gate-frame stacks: their TLS words, mapping, thread start and exit, and the first-gate fix-up.

use super::*;

// ---------------------------------------------------------------- per-thread state

/// The calling thread's copy of the quadword at byte `OFF` of the shim's
/// gate TLS words (`ia2shim_gate_tls`: 0 frame-stack top, 16 stack base).
pub(super) fn tls_quad<const OFF: usize>() -> usize {
    let v: usize;
    // SAFETY: reads this thread's copy of a TLS word of the shim (initial
    // exec: the shim is in the static TLS set); OFF is inside the 24 bytes.
    unsafe {
        core::arch::asm!(
            "mov {t}, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
            "mov {v}, qword ptr fs:[{t} + {off}]",
            t = out(reg) _,
            v = out(reg) v,
            off = const OFF,
            options(nostack, readonly, preserves_flags)
        );
    }
    v
}

pub(super) fn set_tls_quad<const OFF: usize>(value: usize) {
    // SAFETY: writes this thread's copy of the shim's TLS word at OFF.
    unsafe {
        core::arch::asm!(
            "mov {t}, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
            "mov qword ptr fs:[{t} + {off}], {v}",
            t = out(reg) _,
            v = in(reg) value,
            off = const OFF,
            options(nostack, preserves_flags)
        );
    }
}

/// The calling thread's gate-frame stack top (0: none yet).
pub fn stack_top() -> usize {
    tls_quad::<0>()
}

/// The return address saved by the gate that the calling thread entered
/// last and has not returned from (its caller's call site), or 0 outside
/// any gate. The allocator records it as part of an allocation site.
#[inline]
pub fn current_gate_caller() -> usize {
    let (top, base): (usize, usize);
    // SAFETY: reads this thread's copies of the shim's TLS words at 0 and
    // 16 (as tls_quad, in one block: this runs on every allocation).
    unsafe {
        core::arch::asm!(
            "mov {t}, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
            "mov {top}, qword ptr fs:[{t}]",
            "mov {base}, qword ptr fs:[{t} + 16]",
            t = out(reg) _,
            top = out(reg) top,
            base = out(reg) base,
            options(nostack, readonly, preserves_flags)
        );
    }
    if top == base || top == 0 {
        return 0;
    }
    // SAFETY: the newest frame of this thread's gate-frame stack (mapped,
    // key 0); its first word is written before the gate switches PKRU.
    unsafe { ((top - FRAME) as *const usize).read() }
}

/// The target of the gate whose stub is at `stub` (a GOT slot's value),
/// or `None` when `stub` is not a handed-out stub.
pub fn stub_target(stub: usize) -> Option<usize> {
    let pool = pool_range();
    if !pool.contains(stub) || (stub - pool.start) % 16 != 0 {
        return None;
    }
    // SAFETY: an index below MAX_GATES; handed-out entries are not rewritten.
    let t = unsafe { (*GATE_MEM.table.get())[(stub - pool.start) / 16].target };
    // A GOT gate into an entry-gated function targets its relocated body:
    // name the function.
    (t != 0).then(|| super::entry::function_of_body(t).unwrap_or(t))
}

pub(super) fn set_stack_top(top: usize) {
    set_tls_quad::<0>(top)
}

/// The base of the calling thread's gate-frame stack (0: none).
pub(super) fn stack_base() -> usize {
    tls_quad::<16>()
}

pub(super) fn set_stack_base(base: usize) {
    set_tls_quad::<16>(base)
}

/// Each thread's slot of the frame region (hardened): a guard page, then
/// [`STACK_BYTES`] of frames.
const SLOT_BYTES: usize = STACK_BYTES + PAGE;
/// Threads that can hold a gate-frame stack at once when hardened (the
/// region's last page stays a guard).
const SLOTS: usize = (REGION_BYTES - PAGE) / SLOT_BYTES;
/// Claimed slots of the region, one bit each. Sealed: a compartment that
/// cleared another thread's bit would have the next new thread share that
/// thread's frame stack, and return through its frames.
#[link_section = ".ia2shim_sealed"]
static SLOT_USED: [AtomicU64; SLOTS.div_ceil(64)] =
    [const { AtomicU64::new(0) }; SLOTS.div_ceil(64)];

/// The frame region's base (0: not hardened).
pub(super) fn region() -> usize {
    // SAFETY: a plain read of the meta page (written once at install).
    unsafe { (*GATE_MEM.meta.get()).region }
}

/// Hardening at install: reserve the frame region (1 GiB, aligned on
/// 1 GiB, inaccessible until a thread claims a slot), put the meta page
/// and the gate table on the shim key, and tell the gates both. PKRU
/// allows every key.
pub(super) fn harden(key: u32) {
    let len = 2 * REGION_BYTES;
    let Some(p) = crate::anon::reserve(len, libc::PROT_NONE) else {
        crate::lifecycle::fatal(format_args!(
            "IA2_HARDEN=on: cannot reserve the {} MiB gate-frame region (errno {})",
            REGION_BYTES >> 20,
            crate::stackfmt::errno()
        ));
    };
    // The parts below and above the aligned region stay reserved
    // (inaccessible, key 0, no memory charged): trimming them cost two
    // `munmap`s, 6 µs of every start-up.
    let base = (p + REGION_BYTES - 1) & !(REGION_BYTES - 1);
    // SAFETY: the meta page is the shim's own, written once before any
    // gate reads it (install runs before the first gate is made).
    unsafe {
        let m = GATE_MEM.meta.get();
        (*m).region = base;
        (*m).open_mask = !(3u32 << (2 * key));
    }
    let start = GATE_MEM.meta.get() as usize;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    pku::seal(start, META_BYTES + TABLE_BYTES, rw, key, "gate table");
    // The empty stretch too: a region slot no thread holds stays
    // inaccessible, and any page that becomes accessible is the key's.
    pku::seal(
        base,
        REGION_BYTES,
        libc::PROT_NONE,
        key,
        "gate-frame region",
    );
}

/// Map a gate-frame stack: a guard page, [`STACK_BYTES`], a guard page;
/// hardened, a slot of the frame region. Async-signal-safe. Returns the
/// base of the usable part.
pub(super) fn map_stack() -> Option<usize> {
    let region = region();
    if region != 0 {
        let slot = claim_slot()?;
        let base = region + slot * SLOT_BYTES + PAGE;
        // SAFETY: our claimed slot of the region; plain mprotect keeps its
        // pages' shim key.
        let r = unsafe {
            libc::mprotect(
                base as *mut c_void,
                STACK_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if r != 0 {
            release_slot(slot);
            return None;
        }
        return Some(base);
    }
    crate::anon::guarded_stack(STACK_BYTES, true)
}

fn claim_slot() -> Option<usize> {
    crate::pku::with_shim_writes(claim_slot_open)
}

fn claim_slot_open() -> Option<usize> {
    for (w, word) in SLOT_USED.iter().enumerate() {
        let mut cur = word.load(Ordering::Relaxed);
        loop {
            let free = !cur;
            if free == 0 {
                break;
            }
            let b = free.trailing_zeros() as usize;
            if w * 64 + b >= SLOTS {
                break;
            }
            match word.compare_exchange(cur, cur | 1 << b, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(w * 64 + b),
                Err(now) => cur = now,
            }
        }
    }
    None
}

fn release_slot(slot: usize) {
    crate::pku::with_shim_writes(|| {
        SLOT_USED[slot / 64].fetch_and(!(1 << (slot % 64)), Ordering::AcqRel)
    });
}

/// Give back a stack that [`map_stack`] made. A region slot is emptied
/// (its stale frames gone) and made inaccessible, never unmapped, so the
/// region stays whole.
fn unmap_stack(base: usize) {
    let region = region();
    if region != 0 && base > region && base < region + REGION_BYTES {
        // SAFETY: this thread's own slot: discard its frames, then no access.
        unsafe {
            libc::madvise(base as *mut c_void, STACK_BYTES, libc::MADV_DONTNEED);
            libc::mprotect(base as *mut c_void, STACK_BYTES, libc::PROT_NONE);
        }
        release_slot((base - region) / SLOT_BYTES);
        return;
    }
    crate::anon::unmap_guarded(base, STACK_BYTES, true);
}

/// Erase the calling thread's popped gate frames (hardened; right before
/// `main`): a frame saved while start-up ran with every key must not be
/// left for a callee to return through later (the return check accepts
/// any slot of the region).
pub fn erase_popped_frames() {
    let (top, base) = (stack_top(), stack_base());
    let region = region();
    if region == 0 || base == 0 || top < base || top >= base + STACK_BYTES {
        return;
    }
    let next_page = (top + PAGE - 1) & !(PAGE - 1);
    // SAFETY: the unused part of this thread's own frame stack: the rest of
    // the top page is zeroed (the shim key opened for it), whole pages
    // above are discarded (they read back as zeros).
    unsafe {
        pku::with_shim_writes(|| core::ptr::write_bytes(top as *mut u8, 0, next_page - top));
        libc::madvise(
            next_page as *mut c_void,
            base + STACK_BYTES - next_page,
            libc::MADV_DONTNEED,
        );
    }
}

/// Give the calling thread a gate-frame stack if it has none. Call it at
/// thread start (the thread trampoline); a thread that never does gets one
/// on its first gate, through [`fixup_fault`].
pub fn thread_start() {
    if stack_top() == 0 {
        match map_stack() {
            Some(base) => {
                set_stack_base(base);
                set_stack_top(base);
            }
            None => crate::lifecycle::fatal(format_args!(
                "cannot map a {} KiB gate-frame stack for this thread (errno {}; \
                 IA2_HARDEN=on holds {SLOTS} threads' stacks at once)",
                STACK_BYTES >> 10,
                crate::stackfmt::errno()
            )),
        }
    }
}

/// Release the calling thread's gate-frame stack (thread exit). No gate
/// may be active in this thread any more.
pub fn thread_exit() {
    free_cancel_table();
    let base = stack_base();
    if base == 0 {
        return;
    }
    set_stack_top(0);
    set_stack_base(0);
    unmap_stack(base);
}

/// Called first by the SIGSEGV handler. A gate entered by a thread without
/// a gate-frame stack faults at its `_fix` label with `r10 == FRAME`: map a
/// stack, move the reservation onto it and resume. Returns `true` when the
/// fault was that and has been fixed.
///
/// # Safety
/// `info` and `ctx` must be the kernel's arguments to a SIGSEGV handler
/// running on the faulting thread.
pub unsafe fn fixup_fault(info: *const libc::siginfo_t, ctx: *mut c_void) -> bool {
    const SEGV_MAPERR: c_int = 1;
    const SEGV_ACCERR: c_int = 2;
    // SAFETY: valid siginfo from the kernel.
    let code = unsafe { (*info).si_code };
    if code == SEGV_ACCERR {
        // SAFETY: valid siginfo from the kernel.
        let a = unsafe { (*info).si_addr() } as usize;
        let base = stack_base();
        if base != 0 && a >= base + STACK_BYTES && a < base + STACK_BYTES + PAGE {
            let mut b = crate::stackfmt::StackBuf::<256>::new();
            let _ = writeln!(
                b,
                "ia2shim[{}]: gate-frame stack overflow ({} nested cross-compartment calls): \
                 unbounded recursion across compartments, or longjmp out of gated calls",
                crate::stackfmt::pid(),
                STACK_BYTES / FRAME
            );
            b.write_to_fd(crate::fault::REPORT_FD.load(Ordering::Relaxed));
        }
        return false;
    }
    if code != SEGV_MAPERR {
        return false;
    }
    let uc = ctx as *mut libc::ucontext_t;
    // SAFETY: valid ucontext from the kernel.
    let gregs = unsafe { &mut (*uc).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as usize;
    let Some(reg) = fix_labels()
        .iter()
        .find(|&&(at, _)| at == rip)
        .map(|&(_, reg)| reg)
        .or_else(|| record_fix_register(rip, frame_top_tpoff() as i32))
    else {
        return false;
    };
    if gregs[reg] as usize != FRAME || stack_top() != FRAME {
        return false;
    }
    let Some(base) = map_stack() else {
        return false;
    };
    set_stack_base(base);
    set_stack_top(base + FRAME);
    gregs[reg] = (base + FRAME) as i64;
    // A thread the shim did not start: free the stack when it exits, and
    // give it the shim's alternate signal stack from now on.
    crate::threads::adopt_foreign();
    crate::signals::foreign_thread_start();
    true
}

// ---------------------------------------------------------------- cancellation

// C code's `pthread_cleanup_push` saves a `sigsetjmp` buffer and registers
// it (`__pthread_register_cancel`). Cancellation and `pthread_exit` unwind
// with a stop function that `longjmp`s to the buffer as soon as the unwind
// reaches its frame, which can be before (or instead of) the gate's
// personality routine: the cleanup would run with the callee's PKRU, above
// a leaked gate frame. So the shim points each registered buffer's saved
// PC at `ia2shim_cancel_landing`, which restores the PKRU and gate-frame
// stack top of the registration and then jumps to the saved PC.

/// Registered buffers of this thread, innermost last.
const CANCEL_DEPTH: usize = 32;

/// (buffer, saved SP, saved PC, gate-frame stack top, PKRU).
type CancelEntry = (usize, usize, usize, usize, u32);

/// This thread's registered buffers and how many.
struct CancelTable([CancelEntry; CANCEL_DEPTH], usize);

std::thread_local! {
    /// Made on the thread's first registration (a pointer: the table stays
    /// out of the shim's static TLS, whose size shifts the TLS layout of
    /// every thread), freed at thread exit.
    static CANCEL: core::cell::Cell<*mut CancelTable> = const { core::cell::Cell::new(core::ptr::null_mut()) };
}

/// `f` on this thread's table (made if `create`).
/// The table is in the sealed heap, written with the shim key open: a
/// compartment that rewrote an entry would pick the PKRU a cancellation
/// lands with; and one that pointed this thread's `CANCEL` word (key-0
/// TLS) at a table of its own is refused.
fn with_cancel<R>(create: bool, f: impl FnOnce(&mut CancelTable) -> R) -> Option<R> {
    let mut p = CANCEL.get();
    if p.is_null() {
        if !create {
            return None;
        }
        let t = CancelTable([(0, 0, 0, 0, 0); CANCEL_DEPTH], 0);
        p = crate::sealed::with_sealed(|| Box::into_raw(Box::new(t)));
        CANCEL.set(p);
    }
    if !crate::sealed::contains(p as *mut u8) {
        crate::lifecycle::fatal(format_args!(
            "this thread's cancellation table {p:p} is not one of the shim's: refused"
        ));
    }
    // SAFETY: this thread's own table, made above; no other reference.
    Some(pku::with_shim_writes(|| f(unsafe { &mut *p })))
}

/// Free this thread's table (thread exit).
fn free_cancel_table() {
    let p = CANCEL.replace(core::ptr::null_mut());
    if !p.is_null() {
        // SAFETY: made by Box::into_raw in with_cancel, freed once.
        drop(unsafe { Box::from_raw(p) });
    }
}

/// glibc's pointer guard (`%fs:0x30`), which mangles saved SP and PC.
fn pointer_guard() -> usize {
    let g: usize;
    // SAFETY: the TCB's pointer_guard word on x86-64 glibc.
    unsafe {
        core::arch::asm!("mov {}, qword ptr fs:[0x30]", out(reg) g, options(nostack, readonly, preserves_flags))
    };
    g
}

fn demangle(v: usize) -> usize {
    v.rotate_right(0x11) ^ pointer_guard()
}

fn mangle(v: usize) -> usize {
    (v ^ pointer_guard()).rotate_left(0x11)
}

const JB_RSP: usize = 6;
const JB_PC: usize = 7;

core::arch::global_asm!(
    ".pushsection .text.ia2shim_cancel_landing,\"ax\",@progbits",
    ".globl ia2shim_cancel_landing",
    ".hidden ia2shim_cancel_landing",
    ".type ia2shim_cancel_landing,@function",
    ".p2align 4",
    "ia2shim_cancel_landing:",
    // longjmp arrived: rax = setjmp's value, rsp = the caller's frame.
    "push rax",
    "push rdx",
    "lea rdi, [rsp + 16]",
    "call {landed}",
    "mov r11, rax",
    "pop rdx",
    "pop rax",
    "jmp r11",
    ".size ia2shim_cancel_landing, .-ia2shim_cancel_landing",
    ".popsection",
    landed = sym cancel_landed,
);

extern "C" {
    fn ia2shim_cancel_landing();
}

/// The landing pad's work: restore what the registration saw, pop the
/// entry, return the PC to continue at.
extern "C" fn cancel_landed(sp: usize) -> usize {
    // Reached from glibc's unwinder, which may run in its SIGCANCEL
    // handler: the kernel's PKRU there leaves the shim's state unreadable.
    pku::open_shim_reads();
    let found = with_cancel(false, |c| {
        let i = (0..c.1).rev().find(|&i| c.0[i].1 == sp)?;
        c.1 = i;
        Some(c.0[i])
    })
    .flatten();
    let Some((_, _, pc, top, pkru)) = found else {
        crate::lifecycle::fatal(format_args!(
            "cancellation landed at sp {sp:#x}, which no registered cleanup buffer saved"
        ));
    };
    if stack_top() != 0 && stack_top() != top {
        set_stack_top(top);
    }
    pku::write_pkru(pkru);
    pc
}

/// Before glibc registers `buf` (a `__pthread_unwind_buf_t`, whose first
/// member is the `sigsetjmp` buffer): remember its PC, the gate-frame stack
/// top and PKRU, and point the PC at the landing pad.
///
/// # Safety
/// `buf` is the buffer the caller passes to `__pthread_register_cancel`.
pub unsafe fn cancel_register(buf: *mut c_void) {
    let jb = buf as *mut usize;
    // SAFETY: the jmp_buf's eight words at the start of the buffer.
    let (sp, pc) = unsafe { (demangle(*jb.add(JB_RSP)), demangle(*jb.add(JB_PC))) };
    let top = stack_top();
    let pkru = pku::read_pkru();
    let stored = with_cancel(true, |c| {
        let n = c.1;
        if n == CANCEL_DEPTH {
            return false;
        }
        c.0[n] = (buf as usize, sp, pc, top, pkru);
        c.1 = n + 1;
        true
    }) == Some(true);
    if stored {
        // SAFETY: as above; mangled as glibc's longjmp expects.
        unsafe { *jb.add(JB_PC) = mangle(ia2shim_cancel_landing as *const () as usize) };
    }
}

/// After glibc unregisters `buf` (`pthread_cleanup_pop`): put its PC back
/// and forget it.
///
/// # Safety
/// `buf` is the buffer the caller passes to `__pthread_unregister_cancel`.
pub unsafe fn cancel_unregister(buf: *mut c_void) {
    let pc = with_cancel(false, |c| {
        let i = (0..c.1).rev().find(|&i| c.0[i].0 == buf as usize)?;
        c.1 = i;
        Some(c.0[i].2)
    })
    .flatten();
    if let Some(pc) = pc {
        // SAFETY: the buffer's saved PC word.
        unsafe { *(buf as *mut usize).add(JB_PC) = mangle(pc) };
    }
}

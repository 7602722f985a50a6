//! The SIGSEGV handler: a report for every `SEGV_PKUERR` (or, in audit mode,
//! a log line and a single step past it: see [`audit`]), and chaining to the
//! program's own handler for every other fault.
//!
//! The handler runs with the kernel's default PKRU (key 0 only), which is
//! enough: the shim's state lives on key 0. It formats into a stack buffer
//! and writes with `write(2)`; it takes locks only with `try_*`, so a fault
//! inside the shim's own critical section still gets a (shorter) report.

use crate::objects::{page_down, PAGE};
use crate::plan::Reason;
use crate::runtime;
use crate::stackfmt::{pid, StackBuf};
use core::ffi::{c_int, c_void, CStr};
use core::fmt::Write;
use core::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

mod audit;

/// `si_code` of a protection-key fault.
pub const SEGV_PKUERR: i32 = 4;
/// Byte offset of `si_pkey` in x86-64 `siginfo_t` (after `si_addr` and the
/// 8-byte `_addr_bnd` padding).
const SI_PKEY_OFFSET: usize = 32;

/// The program's own SIGSEGV disposition, recorded by the `sigaction` hook.
/// 0 = SIG_DFL, 1 = SIG_IGN, else a handler address.
static PROGRAM_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PROGRAM_FLAGS: AtomicI32 = AtomicI32::new(0);
/// Where reports go (stderr unless `IA2_REPORT_FILE`).
pub static REPORT_FD: AtomicI32 = AtomicI32::new(2);

/// Formatter made once at install time, so the handler does not allocate one.
static FORMATTER: OnceLock<Mutex<SendFormatter>> = OnceLock::new();

struct SendFormatter(iced_x86::IntelFormatter);
// SAFETY: the formatter's boxed trait objects are iced's defaults (no symbol
// resolver, default options provider), which hold no thread-affine state;
// the Mutex serialises all use.
unsafe impl Send for SendFormatter {}
/// Offset of PKRU in the XSAVE area (CPUID.(0xD,9).EBX), 0 if unknown.
static PKRU_XSAVE_OFFSET: AtomicUsize = AtomicUsize::new(0);

/// Install the shim's SIGSEGV handler (through the real `sigaction`).
pub fn install() {
    let _ = FORMATTER.set(Mutex::new(SendFormatter(iced_x86::IntelFormatter::new())));
    // CPUID leaf 0xD returns zeros on CPUs without it: "unknown".
    let leaf = core::arch::x86_64::__cpuid_count(0xd, 9);
    PKRU_XSAVE_OFFSET.store(leaf.ebx as usize, Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is a valid starting point; we set every
    // field we rely on.
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = segv_handler as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    let mut old: libc::sigaction =
        // SAFETY: plain-old-data.
        unsafe { core::mem::zeroed() };
    // SAFETY: installing a handler with valid sigaction structs.
    let r = unsafe { crate::real::sigaction(libc::SIGSEGV, &sa, &mut old) };
    if r != 0 {
        crate::lifecycle::fatal(format_args!("sigaction(SIGSEGV) failed"));
    }
    // A handler installed before us (by a library constructor) is the program's.
    if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != segv_handler as *const () as usize {
        PROGRAM_HANDLER.store(old.sa_sigaction, Ordering::Relaxed);
        PROGRAM_FLAGS.store(old.sa_flags, Ordering::Relaxed);
    }
    audit::read_rseq_abi();
    if audit::configured() {
        audit::install();
    }
}

/// Does the shim own this signal's disposition (SIGSEGV always, SIGTRAP in
/// audit mode)? The `sigaction` and `signal` hooks then record the
/// program's handler with [`intercept_sigaction`] instead of installing it.
pub fn intercepts(sig: c_int) -> bool {
    sig == libc::SIGSEGV || (sig == libc::SIGTRAP && audit::active())
}

/// Record the program's disposition of `sig` (one that [`intercepts`]
/// says the shim owns) instead of installing it, and report the previous
/// one. Returns `true` if the call was handled here.
///
/// # Safety
/// `act` and `oldact` must be null or valid `sigaction` pointers.
pub unsafe fn intercept_sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    oldact: *mut libc::sigaction,
) -> bool {
    let (handler, flags) = if sig == libc::SIGTRAP {
        (&audit::TRAP_HANDLER, &audit::TRAP_FLAGS)
    } else {
        (&PROGRAM_HANDLER, &PROGRAM_FLAGS)
    };
    if !oldact.is_null() {
        // SAFETY: the caller passes a valid out pointer.
        let old = unsafe { &mut *oldact };
        // SAFETY: zeroed sigaction is valid.
        *old = unsafe { core::mem::zeroed() };
        old.sa_sigaction = handler.load(Ordering::Relaxed);
        old.sa_flags = flags.load(Ordering::Relaxed);
    }
    if !act.is_null() {
        // SAFETY: the caller passes a valid sigaction.
        let act = unsafe { &*act };
        handler.store(act.sa_sigaction, Ordering::Relaxed);
        flags.store(act.sa_flags, Ordering::Relaxed);
    }
    true
}

/// Read the interrupted PKRU from the signal frame's XSAVE area.
///
/// # Safety
/// `uc` must be the ucontext passed to a signal handler.
pub(crate) unsafe fn interrupted_pkru(uc: *const libc::ucontext_t) -> Option<u32> {
    let off = PKRU_XSAVE_OFFSET.load(Ordering::Relaxed);
    // SAFETY: the kernel passes a valid ucontext.
    let fp = unsafe { (*uc).uc_mcontext.fpregs } as *const u8;
    if off == 0 || fp.is_null() {
        return None;
    }
    // SAFETY: fpregs points at the frame's XSAVE area: legacy area (512
    // bytes), then the header whose first word is XSTATE_BV, then components.
    let xstate_bv = unsafe { core::ptr::read_unaligned(fp.add(512) as *const u64) };
    if xstate_bv & (1 << 9) == 0 {
        // PKRU in its init state: all keys allowed.
        return Some(0);
    }
    // SAFETY: PKRU component is present at the CPUID-given offset.
    Some(unsafe { core::ptr::read_unaligned(fp.add(off) as *const u32) })
}

extern "C" fn segv_handler(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // The kernel entered with PKRU allowing key 0 only; in strict mode the
    // libc and ld.so state the report needs (dladdr's lock, ...) carries the
    // libc compartment's key. The shim is trusted: allow every key. The
    // kernel restores the interrupted PKRU from the frame on return.
    if crate::pku::backend() == crate::pku::Backend::Hardware {
        crate::pku::write_pkru(0);
    }
    // SAFETY: the kernel's arguments, on the faulting thread.
    if unsafe { crate::gates::fixup_fault(info, ctx) } {
        return; // a gate's first use on a thread without a gate-frame stack
    }
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let code = unsafe { (*info).si_code };
    if code == SEGV_PKUERR {
        let on_fault = runtime::get().map(|r| r.config.on_fault);
        if on_fault == Some(crate::config::OnFault::Audit)
            // SAFETY: valid siginfo and ucontext from the kernel.
            && unsafe { audit::on_pku_fault(info, ctx as *mut libc::ucontext_t) }
        {
            return;
        }
        if on_fault != Some(crate::config::OnFault::Silent) {
            // SAFETY: valid siginfo and ucontext from the kernel.
            unsafe { report_pku_fault(info, ctx as *const libc::ucontext_t) };
        }
        audit::summary(Some(sig));
        die_by_sigsegv();
        return;
    }
    // Not ours: the program's handler, or the default action.
    let h = PROGRAM_HANDLER.load(Ordering::Relaxed);
    let flags = PROGRAM_FLAGS.load(Ordering::Relaxed);
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        if code == libc::SI_KERNEL {
            // SAFETY: valid ucontext from the kernel.
            unsafe { audit::kernel_segv(ctx as *const libc::ucontext_t) };
        }
        audit::summary(Some(sig));
        die_by_sigsegv();
        return;
    }
    call_program_handler(h, flags, sig, info, ctx);
}

/// Run the program's handler `h` for `sig` with its own compartment's
/// rights (the kernel runs handlers with only key 0 accessible), else the
/// rights of the code it interrupted.
fn call_program_handler(
    h: usize,
    flags: c_int,
    sig: c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut c_void,
) {
    crate::signals::run_in_compartment(h, flags, sig, info, ctx);
}

/// Restore the default action and return: the faulting instruction runs
/// again and the process dies by SIGSEGV, as it would without the shim.
fn die_by_sigsegv() {
    // SAFETY: a zeroed sigaction with SIG_DFL is valid.
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = libc::SIG_DFL;
    // SAFETY: valid arguments; sigaction is async-signal-safe.
    unsafe { crate::real::sigaction(libc::SIGSEGV, &sa, core::ptr::null_mut()) };
}

struct Sym {
    name: &'static str,
    offset: usize,
    object: &'static str,
}

/// `dladdr` symbolisation (dynsym only; stripped objects give the object).
fn symbolize(addr: usize) -> Option<Sym> {
    // SAFETY: zeroed Dl_info is valid for dladdr to fill.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: dladdr only reads loader data.
    if unsafe { libc::dladdr(addr as *const c_void, &mut info) } == 0 {
        return None;
    }
    let cstr = |p: *const libc::c_char| {
        if p.is_null() {
            ""
        } else {
            // SAFETY: dladdr returns NUL-terminated strings owned by the loader.
            unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("?")
        }
    };
    let (name, base) = if info.dli_sname.is_null() {
        ("", info.dli_fbase as usize)
    } else {
        (cstr(info.dli_sname), info.dli_saddr as usize)
    };
    Some(Sym {
        name,
        offset: addr.wrapping_sub(base),
        object: cstr(info.dli_fname),
    })
}

fn write_sym<W: Write>(out: &mut W, addr: usize) {
    match symbolize(addr) {
        Some(s) if !s.name.is_empty() => {
            let _ = write!(out, "{}+{:#x} ({})", s.name, s.offset, s.object);
        }
        Some(s) => {
            let _ = write!(out, "{}+{:#x}", s.object, s.offset);
        }
        None => {
            let _ = write!(out, "{addr:#x} (no object)");
        }
    }
}

/// Formats into a stack buffer (iced's `FormatterOutput`).
struct InsnOut<'a, const N: usize>(&'a mut StackBuf<N>);

impl<const N: usize> iced_x86::FormatterOutput for InsnOut<'_, N> {
    fn write(&mut self, text: &str, _kind: iced_x86::FormatterTextKind) {
        self.0.push_bytes(text.as_bytes());
    }
}

fn write_instruction<const N: usize>(out: &mut StackBuf<N>, rip: usize) {
    use iced_x86::Formatter;
    // SAFETY: RIP points into mapped text (it just executed); text stays on key 0.
    let bytes = unsafe { core::slice::from_raw_parts(rip as *const u8, 15) };
    let mut dec = iced_x86::Decoder::with_ip(64, bytes, rip as u64, iced_x86::DecoderOptions::NONE);
    let insn = dec.decode();
    // Another thread may be formatting its own fault: wait a little, but
    // never block (a fault inside the formatter must not deadlock).
    let mut guard = None;
    for _ in 0..200 {
        guard = FORMATTER.get().and_then(|m| m.try_lock().ok());
        if guard.is_some() {
            break;
        }
        // SAFETY: sched_yield has no preconditions and is async-signal-safe.
        unsafe { libc::sched_yield() };
    }
    match guard {
        Some(mut f) => f.0.format(&insn, &mut InsnOut(out)),
        None => {
            let _ = write!(out, "{:?}", insn.mnemonic());
        }
    }
}

/// Print the report for a `SEGV_PKUERR`.
///
/// # Safety
/// `info` and `uc` must be the kernel's arguments to a SIGSEGV handler.
unsafe fn report_pku_fault(info: *const libc::siginfo_t, uc: *const libc::ucontext_t) {
    // SAFETY: valid siginfo from the kernel.
    let addr = unsafe { (*info).si_addr() } as usize;
    // SAFETY: si_pkey lies inside siginfo_t (128 bytes) at a fixed offset.
    let pkey = unsafe { *((info as *const u8).add(SI_PKEY_OFFSET) as *const u32) };
    // SAFETY: valid ucontext from the kernel.
    let rip = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] } as usize;
    // SAFETY: as above.
    let pkru = unsafe { interrupted_pkru(uc) };
    let rt = runtime::get();

    let mut b = StackBuf::<4096>::new();
    let p = pid();
    let _ = writeln!(
        b,
        "ia2shim[{p}]: ==== protection-key fault (SEGV_PKUERR) ===="
    );
    let _ = write!(
        b,
        "ia2shim[{p}]:   address     {addr:#x} (page {:#x}), page key {pkey}",
        page_down(addr)
    );
    if let Some(c) = rt.and_then(|r| r.compartment_of_key(pkey)) {
        let _ = write!(b, " = compartment {c}");
    }
    let _ = writeln!(b);
    let _ = write!(b, "ia2shim[{p}]:   running as  ");
    match pkru {
        Some(v) => {
            let cur = rt.and_then(|r| r.running_compartment(v));
            match cur {
                Some(c) => {
                    let _ = write!(b, "compartment {c}");
                }
                None => {
                    let _ = write!(b, "no compartment");
                }
            }
            let _ = writeln!(b, " (PKRU {v:#010x})");
        }
        None => {
            let _ = writeln!(b, "unknown (PKRU not in the signal frame)");
        }
    }

    let census = rt.and_then(|r| r.census.try_read().ok());
    let heap_fault = crate::alloc::heap_fault(addr);
    let _ = write!(b, "ia2shim[{p}]:   owner       ");
    let mut disabled_cover: Option<&[crate::carveouts::Located]> = None;
    match census.as_deref() {
        Some(c) => {
            let what = c.plan.lookup(addr);
            match what.map(|e| &e.reason) {
                Some(Reason::Data { object }) => {
                    let o = &c.objects[*object];
                    let _ = write!(b, "{} writable data (.data/.bss)", o.display_name());
                }
                Some(Reason::Tls { object, thread }) => {
                    let o = &c.objects[*object];
                    let modid = o.tls.map(|t| t.modid).unwrap_or(0);
                    let _ = write!(
                        b,
                        "TLS block of module {modid} ({}) in thread {thread}",
                        o.display_name()
                    );
                }
                Some(Reason::LoaderHeap) => {
                    let _ = write!(b, "loader heap (ld.so's start-up allocations)");
                }
                Some(Reason::TlsShared { object, thread }) => {
                    let o = &c.objects[*object];
                    let _ = write!(
                        b,
                        "shared TLS page of {} in thread {thread}",
                        o.display_name()
                    );
                }
                Some(Reason::Carveout { name, .. }) => {
                    let _ = write!(b, "carveout {name} (should be shared)");
                }
                None => match &heap_fault {
                    Some(h) => h.write_owner(&mut b, Some(&c.objects)),
                    None => {
                        let _ = write!(b, "not in the shim's plan");
                    }
                },
            }
            // Several carveouts can locate the same page (the DTV and the
            // rseq area often share one): name each; any disabled one's
            // toggle would share the page.
            for l in c
                .carveouts
                .iter()
                .filter(|l| crate::carveouts::covers(l, addr))
            {
                let _ = write!(
                    b,
                    "; this is the {} page (carveout {})",
                    l.carveout.name, l.carveout.name
                );
            }
            disabled_cover = Some(&c.carveouts);
            let _ = writeln!(b);
        }
        None => {
            let _ = writeln!(b, "unknown (shim state busy or not initialised)");
        }
    }
    let _ = write!(b, "ia2shim[{p}]:   symbol      ");
    write_sym(&mut b, addr);
    let _ = writeln!(b);
    let _ = write!(b, "ia2shim[{p}]:   instruction ");
    write_sym(&mut b, rip);
    let _ = write!(b, ": ");
    write_instruction(&mut b, rip);
    let _ = writeln!(b);
    let _ = write!(b, "ia2shim[{p}]:   to share    ");
    let mut toggles = disabled_cover
        .into_iter()
        .flatten()
        .filter(|l| !l.enabled && crate::carveouts::covers(l, addr))
        .peekable();
    match toggles.peek() {
        Some(_) => {
            for (i, l) in toggles.enumerate() {
                let sep = if i == 0 { "" } else { " or " };
                let _ = write!(b, "{sep}{}=1", l.carveout.toggle);
            }
            let _ = writeln!(b);
        }
        None if heap_fault.is_some() => {
            let objects = census.as_deref().map(|c| c.objects.as_slice());
            match heap_fault.as_ref().and_then(|h| h.term(objects)) {
                Some(t) => {
                    let _ = writeln!(b, "IA2_HEAP_SHARED={t}");
                }
                None => {
                    let _ = writeln!(
                        b,
                        "shared_malloc in the source (no allocation site recorded)"
                    );
                }
            }
        }
        None => {
            match symbolize(addr) {
                Some(s) if !s.name.is_empty() => {
                    let base = s.object.rsplit('/').next().unwrap_or(s.object);
                    let _ = write!(b, "IA2_SHARE={base}:{} or ", s.name);
                }
                _ => {}
            }
            let _ = writeln!(b, "IA2_SHARE={:#x}+{PAGE}", page_down(addr));
        }
    }
    b.write_to_fd(REPORT_FD.load(Ordering::Relaxed));
}
